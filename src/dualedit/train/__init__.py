"""The one training loop of every trained method: settings, data order and batches, resumable
checkpoints, validation-best with early stopping, data parallelism. A method plugs in as a
`Trainable` (its loss, metrics, run meta, files); DualEdit's is `editors/dualedit/train.py`.

trainable.py   Trainable (what the loop needs from a method)
meta.py        the run meta (base_model_meta for trainables) and the resume check
settings.py    TrainSettings, TrainResult
data.py        validation split, seeded data order, EditBatch (the samples of n edits)
checkpoint.py  resumable checkpoint (safetensors + JSON, atomic)
loop.py        train (and place_model, validation_split for callers that build a trainable)
"""

from dualedit.train.checkpoint import (
    CheckpointMismatch,
    LoopState,
    load_checkpoint,
    save_checkpoint,
)
from dualedit.train.data import EditBatch, encode_edits_batch, split_indices, step_records
from dualedit.train.devices import place_model
from dualedit.train.log import read_trained_seconds
from dualedit.train.loop import train, validation_split
from dualedit.train.settings import TrainResult, TrainSettings
from dualedit.train.meta import base_model_meta
from dualedit.train.trainable import Trainable

__all__ = [
    "CheckpointMismatch",
    "EditBatch",
    "LoopState",
    "TrainResult",
    "TrainSettings",
    "Trainable",
    "base_model_meta",
    "encode_edits_batch",
    "load_checkpoint",
    "place_model",
    "read_trained_seconds",
    "save_checkpoint",
    "split_indices",
    "step_records",
    "train",
    "validation_split",
]
