"""dualedit: edit the knowledge of vision-language models.

The DualEdit method (text and visual cross-attention adapters with a similarity gate), the
MMEdit evaluation protocol, a built-in procedurally drawn world and small VLMs of the real
transformers architectures pretrained on it.

The user API is importable from here; it is loaded on first use, so `import dualedit` does not
import torch or transformers:

    >>> from dualedit import DualEditor, load_vlm
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "DualEditConfig": "dualedit.editors.dualedit",
    "DualEditor": "dualedit.editors.dualedit",
    "GateDecision": "dualedit.editors.dualedit",
    "TrainSettings": "dualedit.train",
    "edit_and_ask": "dualedit.editing",
    "load_vlm": "dualedit.evaluate",
    "train_dualedit": "dualedit.train",
}

__all__ = [
    "DualEditConfig",
    "DualEditor",
    "GateDecision",
    "TrainSettings",
    "__version__",
    "edit_and_ask",
    "load_vlm",
    "train_dualedit",
]

if TYPE_CHECKING:
    from dualedit.editing import edit_and_ask
    from dualedit.editors.dualedit import DualEditConfig, DualEditor, GateDecision
    from dualedit.evaluate import load_vlm
    from dualedit.train import TrainSettings, train_dualedit


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dualedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
