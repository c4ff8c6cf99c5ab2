"""Training the DualEdit adapters (docs/SPEC section 1): loss, frozen-prefix passes, the loop with
validation, early stopping, resumable checkpoints and data parallelism.

settings.py    TrainSettings, TrainResult
data.py        validation split, seeded data order, EditBatch (the samples of n edits)
losses.py      edit_pass (edit states, reference and edited logits from one frozen prefix), loss
checkpoint.py  resumable checkpoint (safetensors + JSON, atomic)
loop.py        train_dualedit
calibration.py tau of trained adapters on the validation edits (end of training, or later)
"""

from dualedit.train.calibration import calibrate_adapters
from dualedit.train.checkpoint import (
    CheckpointMismatch,
    LoopState,
    load_checkpoint,
    save_checkpoint,
)
from dualedit.train.data import EditBatch, encode_edits_batch, split_indices, step_records
from dualedit.train.loop import train_dualedit
from dualedit.train.losses import METRICS, PassOutput, edit_pass, edit_states_from_prefix
from dualedit.train.settings import TrainResult, TrainSettings

__all__ = [
    "METRICS",
    "CheckpointMismatch",
    "EditBatch",
    "LoopState",
    "PassOutput",
    "TrainResult",
    "TrainSettings",
    "calibrate_adapters",
    "edit_pass",
    "edit_states_from_prefix",
    "encode_edits_batch",
    "load_checkpoint",
    "save_checkpoint",
    "split_indices",
    "step_records",
    "train_dualedit",
]
