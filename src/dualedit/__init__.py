"""dualedit: edit the knowledge of vision-language models.

The DualEdit method (text and visual cross-attention adapters with a similarity gate) and the
methods it is compared with behind one editor contract and one registry, the MMEdit evaluation
protocol, a built-in procedurally drawn world and small VLMs of the real transformers
architectures pretrained on it.

The user API is importable from here; it is loaded on first use, so `import dualedit` does not
import torch or transformers:

    >>> from dualedit import load_vlm, load_editor, make_editor
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dualedit.version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    "EditRequest": "dualedit.editors",
    "Editor": "dualedit.editors",
    "METHODS": "dualedit.editors",
    "MethodSpec": "dualedit.editors",
    "load_editor": "dualedit.editors",
    "make_editor": "dualedit.editors",
    "register_method": "dualedit.editors",
    "DualEditConfig": "dualedit.editors.dualedit",
    "DualEditor": "dualedit.editors.dualedit",
    "GateDecision": "dualedit.editors.dualedit",
    "IKEditor": "dualedit.editors.ike",
    "KnowledgeEditor": "dualedit.editors.ke",
    "LTEditor": "dualedit.editors.lte",
    "MENDEditor": "dualedit.editors.mend",
    "SERACEditor": "dualedit.editors.serac",
    "VisEditor": "dualedit.editors.visedit",
    "TrainSettings": "dualedit.train",
    "edit_and_ask": "dualedit.editing",
    "load_vlm": "dualedit.evaluate",
    "train_dualedit": "dualedit.editors.dualedit",
}

__all__ = [
    "METHODS",
    "DualEditConfig",
    "DualEditor",
    "EditRequest",
    "Editor",
    "GateDecision",
    "IKEditor",
    "KnowledgeEditor",
    "LTEditor",
    "MENDEditor",
    "MethodSpec",
    "SERACEditor",
    "TrainSettings",
    "VisEditor",
    "__version__",
    "edit_and_ask",
    "load_editor",
    "load_vlm",
    "make_editor",
    "register_method",
    "train_dualedit",
]

if TYPE_CHECKING:
    from dualedit.editing import edit_and_ask
    from dualedit.editors import (
        METHODS,
        EditRequest,
        Editor,
        MethodSpec,
        load_editor,
        make_editor,
        register_method,
    )
    from dualedit.editors.dualedit import (
        DualEditConfig,
        DualEditor,
        GateDecision,
        train_dualedit,
    )
    from dualedit.editors.ike import IKEditor
    from dualedit.editors.ke import KnowledgeEditor
    from dualedit.editors.lte import LTEditor
    from dualedit.editors.mend import MENDEditor
    from dualedit.editors.serac import SERACEditor
    from dualedit.editors.visedit import VisEditor
    from dualedit.evaluate import load_vlm
    from dualedit.train import TrainSettings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dualedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
