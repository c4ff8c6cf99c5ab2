"""Editing methods by name: the one table the CLI and the harness look methods up in."""

from __future__ import annotations

from typing import Any

from torch import nn

from dualedit.backbones import Backbone, get_backbone
from dualedit.editors.base import Editor
from dualedit.editors.dualedit import DualEditor
from dualedit.editors.finetune import FineTuneLayer
from dualedit.editors.none import NoEditor

EDITORS: dict[str, type[Editor]] = {
    NoEditor.name: NoEditor,
    FineTuneLayer.name: FineTuneLayer,
    DualEditor.name: DualEditor,
}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Add an editor class under its `name` (usable as a class decorator).

    Raises:
        ValueError: the name is empty or already taken by another class.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name is empty")
    if EDITORS.get(cls.name, cls) is not cls:
        raise ValueError(f"editor name {cls.name!r} is taken by {EDITORS[cls.name].__name__}")
    EDITORS[cls.name] = cls
    return cls


def editor_class(name: str) -> type[Editor]:
    """The editor class registered as `name`."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; available: {sorted(EDITORS)}")
    return EDITORS[name]


def make_editor(
    name: str, model: nn.Module, processor: Any, backbone: Backbone | None = None, **options: Any
) -> Editor:
    """An editor `name` on `model`, with its options (backbone looked up when not given).

    Example:
        >>> editor = make_editor("ft-l", model, processor, steps=10)
    """
    return editor_class(name)(model, processor, backbone or get_backbone(model), **options)
