"""The `none` editor: no edit at all, the unedited model's scores (a floor for Rel, 100 for Loc)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from dualedit.data.requests import EditRequest
from dualedit.editors.base import EditId, Editor, ImageLoader, NoConfig
from dualedit.editors.spec import MethodSpec


class NoEditor(Editor):
    """Leaves the model untouched: `apply` books the requests (so `edits()` lists them) and
    changes nothing the model computes."""

    name = "none"
    Config = NoConfig
    batched = True

    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Nothing to do: the unedited model answers."""
        return self._hold(requests, ids)

    def restore(self) -> None:
        """Nothing to undo; forgets the booked requests."""
        self._held = []

    def remove(self, edit_id: EditId) -> None:
        """Forget one booked request (KeyError for an unknown id)."""
        self._forget(edit_id)

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


METHOD = MethodSpec(
    name=NoEditor.name,
    editor=NoEditor,
    summary="no edit: the unedited model's scores (the floor for Rel, 100 for locality)",
)
