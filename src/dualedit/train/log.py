"""The training log (`train_log.json`): loss means per `log_every` steps, validation scores, and
the wall time trained so far ("elapsed_s", over every call of a resumed run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dualedit.io import atomic_write_text
from dualedit.train.checkpoint import LoopState

LOG_FILE = "train_log.json"


def accumulate(state: LoopState, values: dict[str, float], grad_norm: float, lr: float) -> None:
    pending = state.pending
    for key, value in values.items():
        pending[key] = pending.get(key, 0.0) + value
    pending["grad_norm"] = pending.get("grad_norm", 0.0) + grad_norm
    pending["steps"] = pending.get("steps", 0.0) + 1
    pending["lr"] = lr


def flush(state: LoopState) -> dict[str, Any]:
    """Turn the pending sums into a "train" log entry (means over the steps since the last)."""
    pending = state.pending
    steps = pending.pop("steps")
    lr = pending.pop("lr")
    entry = {"kind": "train", "step": state.step, "lr": lr, "steps": int(steps)}
    entry.update({key: value / steps for key, value in sorted(pending.items())})
    state.log.append(entry)
    state.pending = {}
    return entry


def write_log(out_dir: Path, state: LoopState, meta: dict[str, Any]) -> None:
    record = {
        "meta": meta,
        "step": state.step,
        "best_score": state.best_score,
        "best_step": state.best_step,
        "stop_reason": state.stop_reason,
        "entries": state.log,
    }
    atomic_write_text(out_dir / LOG_FILE, json.dumps(record, indent=1, sort_keys=True))


def trained_seconds(entries: list[dict[str, Any]]) -> float | None:
    """The wall time a run has trained (its log's last "elapsed_s"; None: a log written before
    the loop recorded it)."""
    times = [entry["elapsed_s"] for entry in entries if "elapsed_s" in entry]
    return max(times) if times else None


def read_trained_seconds(out_dir: str | Path) -> float | None:
    """`trained_seconds` of the run in `out_dir` (None: no log, or one without times)."""
    path = Path(out_dir) / LOG_FILE
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("entries", [])
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{path}: not a training log ({error})") from error
    return trained_seconds(entries)
