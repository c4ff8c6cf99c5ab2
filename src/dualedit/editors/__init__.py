"""Editing methods behind one contract (`base.Editor`), looked up by name (`registry`).

Shared machinery for methods: `weights` (snapshots with byte-exact restore, freezing),
`files` (editor folders), `spec` (what the registry knows of a method).
"""

from dualedit.editors.base import EditId, EditInfo, Editor, EditRequest, ImageLoader
from dualedit.editors.finetune import FineTuneConfig, FineTuneLayer
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
    "ImageLoader",
    "MethodSpec",
    "NoEditor",
    "Recipe",
    "editor_class",
    "get_method",
    "load_editor",
    "make_editor",
    "register_method",
]
