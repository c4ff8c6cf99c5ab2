"""Editing methods behind one contract (base.Editor), looked up by name (registry)."""

from dualedit.editors.base import Editor, ImageLoader
from dualedit.editors.finetune import FineTuneLayer
from dualedit.editors.none import NoEditor
from dualedit.editors.registry import EDITORS, editor_class, make_editor, register_editor

__all__ = [
    "EDITORS",
    "Editor",
    "FineTuneLayer",
    "ImageLoader",
    "NoEditor",
    "editor_class",
    "make_editor",
    "register_editor",
]
