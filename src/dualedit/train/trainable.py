"""`Trainable`: what the one training loop (loop.py) needs from a trained editing method.

A method that trains (DualEdit's adapters, and the hypernetworks and classifiers of the baselines
to come) writes a small object of this shape beside its editor (`editors/<method>/train.py`);
`train.loop.train` does the rest (data order, validation split, Adam, clipping, logging,
validation-best, early stopping, resumable checkpoints, data parallelism) the same for all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dualedit.data.mmedit import MMEditDataset
from dualedit.train.data import EditBatch


@runtime_checkable
class Trainable(Protocol):
    """A trained method as the training loop sees it.

    Why this shape:
    - A protocol, not a base class: a method keeps its own editor class and only exposes these
      few members; a test can train a ten-line stand-in (torchtune's recipes over small
      protocols rather than EasyEdit's deep trainer hierarchy).
    - The loop owns everything method-neutral (data, schedule, optimizer, checkpoints, the
      all-reduce); the method owns its forward: `loss` and `metrics` take the batch and return
      named tensors, so the loop logs, averages and compares them without knowing what they are.
    - `module` is the one place that holds the trained state: its `state_dict` is what a
      checkpoint saves and restores, so resuming needs nothing from the method but that module.
    - `run_meta` is the method's part of what makes two runs the same (its config, the base
      model's `meta.base_model_meta`); the loop adds the settings, the data and `name`, so a
      checkpoint of another method, config or base model is refused (`CheckpointMismatch`).
    - `save` writes the method's own loadable folder (`best/`, `last/`), `finish` does what
      comes after training on the best folder (DualEdit: choose tau), and `close` gives the model
      back (hooks, `requires_grad` flags). The loop calls `close` in `finally`, then `finish`
      (on the main process), so `finish` meets the model as it was before training.

    Attributes:
        name: the method's name, recorded in the run meta ("method") and the logs.
        module: holds every trained parameter; its `state_dict` is what checkpoints save/restore.
    """

    name: str
    module: nn.Module

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trained parameters (all `requires_grad`, all in `module`), in a fixed order."""
        ...

    def loss(self, batch: EditBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, {term: scalar}) of one batch (on the model's input device); the same
        term names every step (logged beside "loss", not "loss", "lr", "grad_norm", "steps")."""
        ...

    def metrics(self, batch: EditBatch) -> dict[str, torch.Tensor]:
        """Validation: {metric: [n] per-edit fractions in 0..1}, called under `torch.no_grad()`.
        The loop averages each over all validation edits (x100); the score is their mean, summed
        in the order given. The same names in the same order every call."""
        ...

    def run_meta(self) -> dict[str, Any]:
        """What must match on resume (JSON values): e.g. the config and `base_model_meta`;
        every key is compared but `meta.INFORMATIONAL_KEYS`."""
        ...

    def save(self, directory: Path) -> None:
        """Write a loadable editor folder (the method's `save_pretrained`)."""
        ...

    def finish(self, best_dir: Path, dataset: MMEditDataset, val_idx: list[int]) -> Any:
        """After training, on the main process, after `close`: work on the best folder (e.g.
        DualEdit's tau calibration); returns a summary (`TrainResult.finish`) or None."""
        ...

    # Optional: `parameter_lrs() -> {module parameter name: learning rate}` for parameters
    # trained at their own rate (MEND's step sizes); the rest take `TrainSettings.lr`.

    def close(self) -> None:
        """Release hooks and give back `requires_grad` flags (called in `finally`)."""
        ...

