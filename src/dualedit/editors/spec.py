"""`MethodSpec`: what the registry knows of one editing method.

Each method's own module defines its spec (`METHOD = MethodSpec(...)`); `registry.py` collects
them. The CLI, the demo and the benchmarks read a method's name, editor class, config class,
trainer and small-model recipe from here and never branch on a method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dualedit.editors.base import Editor
from dualedit.train.settings import TrainSettings


@dataclass(frozen=True)
class Recipe:
    """How the demo runs a method on the built-in world's small models.

    Attributes:
        options: config fields for the small models (e.g. DualEdit's adapter layers).
        train: the training settings of a trained method (None: not trained).
    """

    options: Mapping[str, Any] = field(default_factory=dict)
    train: TrainSettings | None = None


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: the registry name (`--method NAME`).
        editor: its `Editor` subclass (`editor.Config` is its config dataclass).
        summary: one line for `dualedit methods`.
        train: for a trained method, the function that trains it:
            `train(model, processor, train_dataset, *, config, settings, out_dir, resume,
            progress, **train_options) -> TrainResult` whose `best_dir` is a folder that
            `load_editor` loads. None: the method needs no training.
        calibrate: a method's post-training step run again on saved weights
            (`calibrate(model, processor, directory, train_dataset, *, out_dir, **options)`),
            e.g. DualEdit's gate threshold; None: it has none.
        recipe: the small-model recipe of the demo.
        train_data_option, train_task_option: config fields that name an MMEdit data folder
            and task whose train split the method reads when it edits (Transformer-Patcher's
            memory set); `eval`, `bench` and the demo fill them with the evaluated data folder
            and task unless given. None: the method reads no data.
    """

    name: str
    editor: type[Editor]
    summary: str
    train: Callable[..., Any] | None = None
    calibrate: Callable[..., Any] | None = None
    recipe: Recipe = field(default_factory=Recipe)
    train_data_option: str | None = None
    train_task_option: str | None = None

    def with_train_data(
        self, options: Mapping[str, Any] | None, data_root: Any, task: str
    ) -> dict[str, Any]:
        """`options` with the train-data fields filled in where the method has them and they
        are not given."""
        filled = dict(options or {})
        if self.train_data_option is not None:
            filled.setdefault(self.train_data_option, str(data_root))
        if self.train_task_option is not None:
            filled.setdefault(self.train_task_option, task)
        return filled

    def __post_init__(self) -> None:
        if not self.name or self.name != self.editor.name:
            raise ValueError(
                f"method spec {self.name!r}: the name must equal {self.editor.__name__}.name "
                f"({self.editor.name!r})"
            )

    @property
    def config(self) -> type:
        """The method's config dataclass."""
        return self.editor.Config

    @property
    def trainable(self) -> bool:
        return self.train is not None
