"""Editing methods behind one contract (`base.Editor`), looked up by name (`registry`).

Shared machinery for methods: `weights` (snapshots with byte-exact restore, freezing),
`files` (editor folders), `spec` (what the registry knows of a method), `hooks` (`HookSet`: owned
forward hooks, explicit and automatic per-call contexts), `calls` (`StackCall`: what a plain model
call gave the decoder stack), `capture` (`LayerTrace`: retain, edit, stop at, or take gradients
of decoder layer outputs).
"""

from dualedit.editors.base import EditId, EditInfo, Editor, EditRequest, ImageLoader
from dualedit.editors.calls import StackCall
from dualedit.editors.capture import LayerTrace
from dualedit.editors.finetune import (
    FineTuneConfig,
    FineTuneLayer,
    FineTuneVision,
    FineTuneVisionConfig,
)
from dualedit.editors.hooks import HookSet
from dualedit.editors.none import NoEditor
from dualedit.editors.registry import (
    METHODS,
    editor_class,
    get_method,
    load_editor,
    make_editor,
    register_method,
)
from dualedit.editors.spec import MethodSpec, Recipe

__all__ = [
    "METHODS",
    "EditId",
    "EditInfo",
    "EditRequest",
    "Editor",
    "FineTuneConfig",
    "FineTuneLayer",
    "FineTuneVision",
    "FineTuneVisionConfig",
    "HookSet",
    "ImageLoader",
    "LayerTrace",
    "MethodSpec",
    "NoEditor",
    "Recipe",
    "StackCall",
    "editor_class",
    "get_method",
    "load_editor",
    "make_editor",
    "register_method",
]
