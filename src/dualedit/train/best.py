"""The run's `best/` folder: the validation-best editor folder, finished and published as a whole.

During training the validation-best folder lives in `checkpoint/best/` (part of the resumable
state). When the run ends, a copy of it is finished (`Trainable.finish`, e.g. DualEdit's tau
chosen on the validation edits) and swapped in as `out_dir/best/` in one step
(`folders.replace_folder`): a run killed before or during the finish step leaves no `best/`
with unfinished settings, and resuming it finishes it.

What the finish step returned is recorded beside it (`finish.json`: the summary, the step the run
stood at, the data, the validation edits, the trainable's `finish_settings` and a digest of the
finished folder's JSON files). A later call on the finished run that trains no step (a cached run
asked again) reuses that record instead of finishing again, when all of it matches; anything
else (`best/` recalibrated in place, too) finishes again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from dualedit.data.mmedit import MMEditDataset
from dualedit.folders import lock_path, replace_folder
from dualedit.io import atomic_write_text
from dualedit.jsondata import jsonable
from dualedit.train.checkpoint import checkpoint_dir
from dualedit.train.trainable import Trainable

logger = logging.getLogger(__name__)

BEST_DIR = "best"
#: The record of the last finish step, in the run folder.
FINISH_FILE = "finish.json"


def publish_best(
    out_dir: Path,
    trainable: Trainable,
    dataset: MMEditDataset,
    val_idx: list[int],
    finish: bool,
    *,
    step: int | None = None,
    reuse: bool = False,
) -> Any:
    """Finish a copy of the validation-best folder (`Trainable.finish`, when `finish`) and swap
    it in as `out_dir/best` as a whole; returns the finish summary.

    `step`: the step the run stands at (recorded with the summary). `reuse`: no step was trained
    in this call, so an earlier finish of the same best folder (its record matching `step`, the
    data, the validation edits and `finish_settings`) is returned instead of finishing again."""
    record_path = out_dir / FINISH_FILE
    key = _finish_key(trainable, dataset, val_idx, step)
    if finish and reuse and (out_dir / BEST_DIR).is_dir():
        record = _read_record(record_path)
        if (record is not None and record.get("key") == key
                and record.get("best") == _json_digest(out_dir / BEST_DIR)):
            logger.info("%s: finished before at step %s; its finish step is not run again",
                        out_dir, step)
            load = getattr(trainable, "load_finish", None)
            return load(record["summary"]) if callable(load) else record["summary"]
    record_path.unlink(missing_ok=True)
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
    if finish:
        _write_record(record_path, key, summary, _json_digest(out_dir / BEST_DIR))
    return summary


def _json_digest(folder: Path) -> str:
    """A digest of the JSON files of a finished folder (its config: tau, the gate heads' meta),
    so a folder changed since its finish (`dualedit calibrate` in place) is finished again."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _finish_key(trainable: Trainable, dataset: MMEditDataset, val_idx: list[int],
                step: int | None) -> dict[str, Any]:
    settings = getattr(trainable, "finish_settings", None)
    return jsonable({"step": step, "data": os.fspath(Path(dataset.path).resolve()),
                   "records": len(dataset), "validation": list(val_idx),
                   "settings": settings() if callable(settings) else None})


def _write_record(path: Path, key: dict[str, Any], summary: Any, best: str) -> None:
    try:
        text = json.dumps({"key": key, "best": best, "summary": jsonable(summary)}, indent=1,
                          sort_keys=True)
    except (TypeError, ValueError):  # a summary that is not JSON data: finished again next time
        return
    atomic_write_text(path, text + "\n")


def _read_record(path: Path) -> dict[str, Any] | None:
    """The finish record, or None when missing or unreadable (then the finish step runs)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "summary" in record else None
