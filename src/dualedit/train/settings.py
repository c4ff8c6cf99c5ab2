"""`TrainSettings` (how a method is trained by the loop) and `TrainResult` (what a run produced)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Fields that change what a run computes: a resumed run must use the same values. The others
# (how long, how often to checkpoint or log, data workers) may change between a run and its resume,
# except `max_steps` under a decaying schedule (the rate at every step depends on it).
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
TRAJECTORY_FIELDS: tuple[str, ...] = (
    "lr",
    "batch_size",
    "warmup_steps",
    "lr_schedule",
    "grad_clip",
    "text_loc_kl",
    "eval_every",
    "eval_batch_size",
    "val_edits",
    "patience",
    "min_delta",
    "seed",
)


@dataclass(frozen=True)
class TrainSettings:
    """How a method is trained (for DualEdit, docs/SPEC section 1: Adam, batch 4; lr see below).

    Attributes:
        lr: Adam learning rate (after warm-up). Default 2e-3, not the paper's 1e-4: on the
            6-layer models of the built-in world the adapters stay at the answer prior (val Rel
            about 10) for hundreds of steps even at 1e-3; 2e-3 is what the default adapters
            were trained with (see the DualEditConfig notes).
        batch_size: edits per optimisation step over all processes (each process takes
            batch_size / processes of them); must be divisible by the number of processes.
        max_steps: step budget; training ends there at the latest.
        warmup_steps: linear learning-rate warm-up from lr / warmup_steps to lr (0: none).
        lr_schedule: the rate after warm-up: "constant" (lr throughout), "cosine" or "linear"
            (from lr down to 0 at `max_steps`; early stopping does not shorten the schedule).
        grad_clip: clip the trained parameters' gradient norm to this value (None: no clipping).
        text_loc_kl: DualEdit: include the KL term on the text-only locality sample (the
            paper's loss); False drops it as the released code does.
        eval_every: validate every this many steps (and at the last step).
        eval_batch_size: validation edits per forward on each process.
        val_edits: held-out edits of the train split used for validation (a fixed, seeded
            selection independent of `seed`; never the eval split).
        patience: stop after this many validations without an improvement of the best score by
            more than `min_delta` (None: no early stopping).
        min_delta: the improvement (in score points, 0-100) that counts.
        checkpoint_every: write the resumable checkpoint every this many steps (and at the end).
        log_every: log the mean training loss over this many steps.
        seed: seed of the data order (and of the RNGs, saved in checkpoints).
        num_workers: DataLoader worker processes that tokenise and load images ahead (0: none).

    Example:
        >>> TrainSettings(batch_size=8, max_steps=5000, eval_every=250, patience=8)
    """

    lr: float = 2e-3
    batch_size: int = 4
    max_steps: int = 2000
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    text_loc_kl: bool = True
    eval_every: int = 100
    eval_batch_size: int = 8
    val_edits: int = 64
    patience: int | None = 10
    min_delta: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        _positive_number("lr", self.lr)
        for name in ("batch_size", "max_steps", "eval_every", "eval_batch_size", "val_edits"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("checkpoint_every", "log_every"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("warmup_steps", "seed", "num_workers"):
            _int_at_least(name, getattr(self, name), 0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"TrainSettings: lr_schedule must be one of {list(LR_SCHEDULES)}, "
                f"got {self.lr_schedule!r}"
            )
        if self.grad_clip is not None:
            _positive_number("grad_clip", self.grad_clip)
        if self.patience is not None:
            _int_at_least("patience", self.patience, 1)
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)):
            raise TypeError(f"TrainSettings: min_delta must be a number, got {self.min_delta!r}")
        if self.min_delta < 0:
            raise ValueError(f"TrainSettings: min_delta must be >= 0, got {self.min_delta!r}")
        if not isinstance(self.text_loc_kl, bool):
            raise TypeError(f"TrainSettings: text_loc_kl must be a bool, got {self.text_loc_kl!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "settings") -> TrainSettings:
        """Build from a dict, naming unknown keys (a typo is an error)."""
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown TrainSettings field(s) {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainSettings:
        """Read settings from a JSON file (missing fields take their defaults)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train settings {path} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        return cls.from_dict(data, where=str(path))

    def trajectory_changes(self, other: TrainSettings) -> dict[str, tuple[Any, Any]]:
        """{field: (self's value, other's value)} for the trajectory fields that differ
        (`max_steps` too when either decays the rate towards it)."""
        names = TRAJECTORY_FIELDS
        if {self.lr_schedule, other.lr_schedule} != {"constant"}:
            names = (*names, "max_steps")
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in names
            if getattr(self, name) != getattr(other, name)
        }


@dataclass(frozen=True)
class TrainResult:
    """What a training run (`train.loop.train`, e.g. through `train_dualedit`) produced.

    Attributes:
        out_dir: the run folder.
        best_dir: `out_dir/best`, the method's editor folder with the best validation score
            (e.g. `DualEditor.from_pretrained(model, processor, best_dir)`); None before any
            validation.
        last_dir: `out_dir/last`, the editor folder at the last step.
        best_score: best validation score (the mean of the method's validation metrics, 0-100;
            DualEdit: Rel, T-Gen, V-Gen, T-Loc, M-Loc).
        best_step: the step it was reached at.
        steps: steps trained in total (over all runs of a resumed training).
        stop_reason: "max_steps" or "early_stopping".
        resumed_from: the checkpoint step this call started from (None: a fresh run).
        seconds: wall time of this call.
        step_seconds: mean wall time of one optimisation step in this call (None: no step ran).
        log_path: `out_dir/train_log.json`.
        finish: what the method's finish step returned (`Trainable.finish`; DualEdit: the gate
            threshold chosen on the validation edits and saved in `best_dir`, a
            `calibrate.TauChoice`); None when it did not run.
    """

    out_dir: Path
    best_dir: Path | None
    last_dir: Path
    best_score: float | None
    best_step: int | None
    steps: int
    stop_reason: str
    resumed_from: int | None
    seconds: float
    step_seconds: float | None
    log_path: Path
    finish: Any = None

    @property
    def tau(self) -> Any:
        """DualEdit's name for `finish`: the `calibrate.TauChoice` (None: not calibrated)."""
        return self.finish


def _positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"TrainSettings: {name} must be a positive number, got {value!r}")


def _int_at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TrainSettings: {name} must be an int >= {minimum}, got {value!r}")
