"""Editing methods by name: the one table the CLI, the demo and the harness look methods up in.

Each method's module defines its `MethodSpec` (`METHOD`); this module collects them. A method of
one's own joins with `register_method(MethodSpec(...))` in Python, or, for the command line, from
an installed package that names its spec under the entry-point group `dualedit.methods`
(`[project.entry-points."dualedit.methods"] my-method = "my_pkg.editor:METHOD"`); it then works
with every command (`dualedit train/eval/edit --method NAME`), `make_editor` and `load_editor`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from importlib import metadata
from typing import Any

from torch import nn

from dualedit.backbones import Backbone
from dualedit.editors import ike, ke, mend, none, patcher
from dualedit.editors.finetune import ftl, ftv
from dualedit.editors.base import Editor
from dualedit.editors.dualedit import method as dualedit_method
from dualedit.editors.lte import method as lte_method
from dualedit.editors.serac import method as serac_method
from dualedit.editors.visedit import method as visedit_method
from dualedit.editors.files import saved_method
from dualedit.editors.spec import MethodSpec

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dualedit.methods"
METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method under its name.

    Raises:
        TypeError: not a `MethodSpec`.
        ValueError: the name is taken by another method.
    """
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method takes a MethodSpec, got {type(spec).__name__}")
    taken = METHODS.get(spec.name)
    if taken is not None and taken.editor is not spec.editor:
        raise ValueError(f"method name {spec.name!r} is taken by {taken.editor.__name__}")
    METHODS[spec.name] = spec
    return spec


for _spec in (
    none.METHOD,
    ftl.METHOD,
    ftv.METHOD,
    ke.METHOD,
    ike.METHOD,
    serac_method.METHOD,
    mend.METHOD,
    patcher.METHOD,
    lte_method.METHOD,
    visedit_method.METHOD,
    dualedit_method.METHOD,
):
    register_method(_spec)


def register_entry_points(entry_points: Iterable[Any] | None = None) -> list[str]:
    """Register the `MethodSpec`s that installed packages name under `dualedit.methods`.

    A broken plug-in (it fails to import, is not a `MethodSpec`, or takes a built-in name) is
    skipped with a warning naming it, so one bad package does not take the tool down.

    Returns:
        The names registered.
    """
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    added = []
    for entry in entry_points:
        try:
            spec = entry.load()
            register_method(spec)
        except Exception as error:  # a third party's package: report it, keep going
            logger.warning("method plug-in %r (%s) skipped: %s", entry.name, entry.value, error)
            continue
        added.append(spec.name)
    return added


register_entry_points()


def get_method(name: str) -> MethodSpec:
    """The method registered as `name`.

    Raises:
        ValueError: no such method (the message lists the registered ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def editor_class(name: str) -> type[Editor]:
    """The editor class of method `name`."""
    return get_method(name).editor


def make_editor(
    name: str,
    model: nn.Module,
    processor: Any,
    backbone: Backbone | None = None,
    *,
    config: Any = None,
    **options: Any,
) -> Editor:
    """A new editor of method `name` on `model` (config from `config` and/or `options`).

    Example:
        >>> editor = make_editor("ft-l", model, processor, steps=10)
    """
    return editor_class(name)(model, processor, backbone, config=config, **options)


def load_editor(
    model: nn.Module,
    processor: Any,
    directory: str | os.PathLike,
    backbone: Backbone | None = None,
    **overrides: Any,
) -> Editor:
    """The editor saved in `directory` (by any method's `save_pretrained`), of the method its
    config names, on `model`.

    Example:
        >>> editor = load_editor(model, processor, "runs/vqa/best")
    """
    return editor_class(saved_method(directory)).from_pretrained(
        model, processor, directory, backbone, **overrides
    )


def open_editor(
    model: nn.Module,
    processor: Any,
    *,
    method: str | None = None,
    directory: str | os.PathLike | None = None,
    options: dict[str, Any] | None = None,
    untrained: bool = False,
    ignore_base_mismatch: bool = False,
) -> Editor:
    """The editor a user asks for: loaded from `directory` (its method read from the folder;
    `method`, if given, must agree) or new of `method`; `options` are config fields.

    A trained method without a folder is refused unless `untrained` (its parameters would be
    the untrained initial ones, for DualEdit an identity: scores of no edit at all). A folder
    saved for other base weights is refused unless `ignore_base_mismatch`.

    Raises:
        ValueError: neither given, a method that disagrees with the folder's, or a trained
            method without trained weights.
    """
    options = dict(options or {})
    check_editor_request(method, directory, untrained)
    if directory is not None:
        saved = saved_method(directory)
        if method is not None and method != saved:
            raise ValueError(
                f"--method {method!r} but the editor folder {directory} was saved by {saved!r}"
            )
        return load_editor(
            model, processor, directory, ignore_base_mismatch=ignore_base_mismatch, **options
        )
    return make_editor(method, model, processor, **options)


def check_editor_request(
    method: str | None, directory: str | os.PathLike | None, untrained: bool = False
) -> None:
    """What `open_editor` refuses, checked before anything is loaded.

    Raises:
        ValueError: neither a method nor a folder, an unknown method, or a trained method
            without a folder (unless `untrained`).
    """
    if directory is not None:
        return
    if method is None:
        raise ValueError("give a method name or an editor folder")
    if get_method(method).trainable and not untrained:
        raise ValueError(
            f"method {method!r} is trained: give its trained weights (--editor DIR, the best/ "
            f"folder of `dualedit train --method {method}`), or --untrained to score the "
            "untrained initialisation"
        )
