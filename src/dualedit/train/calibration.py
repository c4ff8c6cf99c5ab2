"""The gate threshold of trained adapters, chosen on the validation edits of the train split (the
same fixed selection training validates on) and saved with the adapters: at the end of
`train_dualedit`, or later for saved adapters (`calibrate_adapters`, `dualedit calibrate`), e.g.
for another gate key or calibration mode, or after the data changed."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from dualedit.data.mmedit import SPLIT_FILES, MMEditDataset
from dualedit.editors.dualedit import DualEditor
from dualedit.editors.dualedit.calibrate import CALIBRATION_MODES, TauChoice, choose_tau
from dualedit.train.data import split_indices
from dualedit.train.settings import TrainSettings

logger = logging.getLogger(__name__)


def calibrate_adapters(
    model: nn.Module,
    processor: Any,
    adapters_dir: str | os.PathLike,
    train_dataset: MMEditDataset,
    *,
    out_dir: str | os.PathLike | None = None,
    val_edits: int | None = None,
    mode: str = "single",
    gate_key: str | None = None,
) -> TauChoice:
    """Choose tau for saved adapters on the validation edits and save the adapters with it.

    Args:
        model, processor: the VLM the adapters were trained on.
        adapters_dir: a `save_pretrained` folder (e.g. a training run's best/).
        train_dataset: the train split; the validation edits are `split_indices(len, val_edits)`
            of it, the selection training held out (never the eval split).
        out_dir: where to save the calibrated adapters (None: `adapters_dir`, in place).
        val_edits: how many validation edits training held out (None: `TrainSettings`'s).
        mode: "single" or "sequential" (see `calibrate.choose_tau`).
        gate_key: choose tau for this gate key and save it with the adapters (None: theirs).

    Returns:
        The `TauChoice`.

    Raises:
        ValueError: the eval split, an unknown mode, or a bad number of validation edits.

    Example:
        >>> calibrate_adapters(model, processor, "runs/vqa/best", load_split(root, "vqa", "train"),
        ...                    out_dir="runs/vqa/best-seq", mode="sequential")
    """
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode must be one of {CALIBRATION_MODES}, got {mode!r}")
    if train_dataset.path.name == Path(SPLIT_FILES[(train_dataset.task, "eval")]).name:
        raise ValueError(f"{train_dataset.path}: the eval split; tau is chosen on the validation "
                         "edits of the train split")
    n_val = TrainSettings().val_edits if val_edits is None else val_edits
    _, val_idx = split_indices(len(train_dataset), n_val)
    overrides = {} if gate_key is None else {"gate_key": gate_key}
    return calibrate_on(
        model, processor, Path(adapters_dir), train_dataset, val_idx, mode,
        out_dir=Path(out_dir) if out_dir is not None else None, **overrides,
    )


def calibrate_on(
    model: nn.Module,
    processor: Any,
    adapters_dir: Path,
    dataset: MMEditDataset,
    val_idx: list[int],
    mode: str = "single",
    *,
    out_dir: Path | None = None,
    **overrides: Any,
) -> TauChoice:
    """Choose tau on the edits `val_idx` and save the adapters with it (and `overrides`, run-time
    config fields such as gate_key) to `out_dir` (default: `adapters_dir`)."""
    editor = DualEditor.from_pretrained(model, processor, adapters_dir, **overrides)
    was_training = model.training
    model.eval()
    try:
        choice = choose_tau(editor, dataset, val_idx, mode=mode)
    finally:
        editor.detach()
        model.train(was_training)
    calibrated = DualEditor.from_pretrained(
        model, processor, adapters_dir, **overrides, tau=choice.tau
    )
    try:
        calibrated.save_pretrained(out_dir if out_dir is not None else adapters_dir)
    finally:
        calibrated.detach()
    logger.info("gate threshold chosen on %d validation edits (%s): tau %.4f (accuracy %.3f, "
                "pass rates %s)", choice.edits, choice.mode, choice.tau, choice.accuracy,
                {k: round(v, 3) for k, v in choice.pass_rates.items()})
    return choice
