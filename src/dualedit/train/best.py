"""The run's `best/` folder: the validation-best editor folder, finished and published as a whole.

During training the validation-best folder lives in `checkpoint/best/` (part of the resumable
state). When the run ends, a copy of it is finished (`Trainable.finish`, e.g. DualEdit's tau
chosen on the validation edits) and swapped in as `out_dir/best/` in one step
(`folders.replace_folder`): a run killed before or during the finish step leaves no `best/`
with unfinished settings, and resuming it finishes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dualedit.data.mmedit import MMEditDataset
from dualedit.folders import lock_path, replace_folder
from dualedit.train.checkpoint import checkpoint_dir
from dualedit.train.trainable import Trainable

BEST_DIR = "best"


def publish_best(
    out_dir: Path,
    trainable: Trainable,
    dataset: MMEditDataset,
    val_idx: list[int],
    finish: bool,
) -> Any:
    """Finish a copy of the validation-best folder (`Trainable.finish`, when `finish`) and swap
    it in as `out_dir/best` as a whole; returns the finish summary."""
    candidate = checkpoint_dir(out_dir) / BEST_DIR
    if not candidate.is_dir():  # a run folder of a version that wrote best/ during training
        candidate = out_dir / BEST_DIR
    if not candidate.is_dir():
        raise FileNotFoundError(f"{out_dir}: the validation-best folder {candidate} is missing")
    work = out_dir / f".{BEST_DIR}.finishing"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(candidate, work)
    try:
        summary = trainable.finish(work, dataset, val_idx) if finish else None
        replace_folder(work, out_dir / BEST_DIR)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock_path(work).unlink(missing_ok=True)  # only this run (it holds the run's lock) used it
    return summary
