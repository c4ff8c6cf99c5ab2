"""`EditorTrainable`: the members of a `dualedit.train.Trainable` that every method trained
around its own editor shares (MEND, KE, SERAC, LTE): the run meta (the editor's resolved config
and the base model's `base_model_meta`), saving the editor's folder, no finishing step, and
closing (the base model's `requires_grad` flags given back, the editor detached).

A method's trainable sets `editor`, `name` and `module` and, when it froze the base model,
`_flags` (`weights.freeze`), and writes its own `parameters`, `loss` and `metrics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dualedit.data.mmedit import MMEditDataset
from dualedit.editors.base import Editor
from dualedit.editors.weights import GradFlags
from dualedit.train.meta import base_model_meta


class EditorTrainable:
    """Mixin: `run_meta`, `save`, `finish` and `close` of a trainable built on an editor."""

    editor: Editor
    module: nn.Module
    _flags: GradFlags | None = None

    def run_meta(self) -> dict[str, Any]:
        """What must match on resume: the editor's resolved config and the base model."""
        editor = self.editor
        return {"config": editor.config_dict(), **base_model_meta(editor.model, editor.backbone)}

    def save(self, directory: Path) -> None:
        self.editor.save_pretrained(directory)

    def finish(self, best_dir: Path, dataset: MMEditDataset, val_idx: list[int]) -> None:
        """Nothing after training (no calibrated setting)."""
        return None

    def close(self) -> None:
        """Give the base model's flags back, drop the trained gradients, detach the editor."""
        if self._flags is not None:
            self._flags.give_back()
        for p in self.module.parameters():
            p.grad = None
        self.editor.detach()
