"""The editor contract: how the harness changes what a model's forward computes.

An editor wraps one model. `apply` adds edits (they accumulate until `restore`); `restore` brings
the model back to exactly its unedited state (`state_dict()` byte-identical). The harness runs the
model's forward itself, inside `editor.context(batch)`, so that an editor working through hooks can
see per-call facts (prompt ends, image positions) without keeping them on modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Iterator, Sequence

from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.records import EditRecord

#: Loads an image by its path relative to the dataset's image root.
ImageLoader = Callable[[str], Any]


class Editor(ABC):
    """Base class of every editing method.

    Attributes:
        name: the registry name ("none", "ft-l", ...), recorded in results.json.
        batched: True when `apply` is a no-op, so the harness may score every record in big
            batches without applying edits one by one.
        options: the method's validated options (a dataclass), recorded in results.json.

    Subclasses declare `Options` (a dataclass validated in `__post_init__`); unknown keyword
    options raise `TypeError` naming them.
    """

    name: str = ""
    batched: bool = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        """No options."""

    def __init__(self, model: nn.Module, processor: Any, backbone: Backbone, **options: Any):
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"editor {self.name!r}: unknown option(s) {unknown}; known: {sorted(known)}"
            )
        self.model = model
        self.processor = processor
        self.backbone = backbone
        self.options = self.Options(**options)

    def option_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict."""
        return dataclasses.asdict(self.options)

    def fit(self, train_records: Sequence[EditRecord], task: str, images: ImageLoader) -> None:
        """Train the method's own parameters (hypernetworks, adapters). Default: nothing."""

    @abstractmethod
    def apply(self, records: Sequence[EditRecord], task: str, images: ImageLoader) -> None:
        """Add the edits of `records` (each targets its record's `alt`) on top of earlier ones."""

    @abstractmethod
    def restore(self) -> None:
        """Remove every edit: the model computes and stores exactly what it did before."""

    def context(self, batch: Any) -> ContextManager[None]:
        """Wrap one forward or generate() call of the harness on `batch` (an `EncodedBatch`).

        Hook-based editors set per-call state here (and clear it in `finally`); weight editors
        need nothing. Default: a no-op context.
        """
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def applied(
        self, records: Sequence[EditRecord], task: str, images: ImageLoader
    ) -> Iterator["Editor"]:
        """`apply(records)` for the duration of a `with` block, then `restore()`."""
        try:
            self.apply(records, task, images)
            yield self
        finally:
            self.restore()
