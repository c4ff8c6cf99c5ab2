"""`Switchable`: an editor whose edits act only while a flag is on, for `disabled()` of methods
whose hooks or forward read that flag (Transformer-Patcher's neurons, IKE's prefix)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Switchable:
    """Mixin: `active` is True except inside `with editor.disabled(): ...` (nesting restores the
    outer state)."""

    active: bool = True

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the editor's edits do not act."""
        outer, self.active = self.active, False
        try:
            yield
        finally:
            self.active = outer
