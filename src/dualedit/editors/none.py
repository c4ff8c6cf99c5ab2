"""The `none` editor: no edit at all, the unedited model's scores (a floor for Rel, 100 for Loc)."""

from __future__ import annotations

from typing import Sequence

from dualedit.data.records import EditRecord
from dualedit.editors.base import Editor, ImageLoader


class NoEditor(Editor):
    """Leaves the model untouched; `apply` and `restore` do nothing."""

    name = "none"
    batched = True

    def apply(self, records: Sequence[EditRecord], task: str, images: ImageLoader) -> None:
        """Nothing to do: the unedited model answers."""

    def restore(self) -> None:
        """Nothing to undo."""
