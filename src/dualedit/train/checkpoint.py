"""The resumable training checkpoint: tensors in safetensors, everything else in JSON, no pickles.

`out_dir/checkpoint/` holds `state.safetensors` (the trained module's weights, keyed
"adapter/<name>" as the first, DualEdit-only checkpoints were, Adam state tensors, the
torch / numpy / python RNG states), `state.json` (step, counters, best score, the run meta,
the log so far, Adam's hyper-parameters, the scalar parts of the RNG states, the name of its
tensor file) and `best/`, the validation-best editor folder of the run so far. The folder is
written as a whole (`dualedit.folders`: a new folder swapped in, `state.json` its manifest with
the tensor file's SHA-256), so a run killed at any point resumes from the last complete
checkpoint, and a checkpoint that fails its checks (damaged bytes, NaN) is refused on resume
instead of being trained on and written back. A checkpoint with NaN or infinite weights is never
written: the run stops with an error and the last good one stays.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dualedit.folders import FolderReader, check_finite, read_folder, write_folder
from dualedit.version import versions

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
TENSOR_FILE = "state.safetensors"
CHECKPOINT_FORMAT = 2
#: Format 1: the tensor file named by step, no checksums.
READABLE_FORMATS = (1, 2)


@dataclass
class LoopState:
    """The training loop's counters, saved with every checkpoint.

    Attributes:
        step: optimisation steps done.
        best_score, best_step: the best validation score so far and its step (None: none yet).
        evals_since_best: validations since the best one (for patience).
        stop_reason: "early_stopping" once patience ran out (a resumed run then stops at once).
        log: the train_log entries so far.
        pending: running sums of the training loss terms since the last log entry.
    """

    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stop_reason: str | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "stop_reason": self.stop_reason,
            "log": self.log,
            "pending": self.pending,
        }


class CheckpointMismatch(ValueError):
    """A run folder's checkpoint belongs to another run (other config, data or trajectory
    settings): resuming it would mix two runs."""


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters (names, shapes, dtypes, and each tensor's sum and sum
    of absolute values, accumulated in float64 without a float64 copy of the tensor): another
    checkpoint saved under the same path, such as a pretrained model of the demo's cache trained
    again, gets another fingerprint. Two reductions per tensor, on the tensor's own device.

    Example:
        >>> weights_fingerprint(model)
        '3f0c9a1b2d4e5f60'
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            total = p.sum(dtype=torch.float64)
            absolute = torch.linalg.vector_norm(p, ord=1, dtype=torch.float64)
            sums = torch.stack([total, absolute]).cpu().tolist()
            digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{sums[0]!r}|{sums[1]!r};".encode())
    return digest.hexdigest()[:16]


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def has_checkpoint(out_dir: str | Path) -> bool:
    return (checkpoint_dir(out_dir) / STATE_FILE).is_file()


def save_checkpoint(
    out_dir: str | Path,
    state: LoopState,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> Path:
    """Write the checkpoint of `state.step` (see the module docstring); returns its folder.

    Args:
        module: what is trained (`Trainable.module`): its `state_dict` is saved.
        meta: what must match on resume (settings, config, model type, ...), saved as given.
    """
    folder = checkpoint_dir(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        tensors[f"adapter/{name}"] = tensor
    optim = optimizer.state_dict()
    for index, per_param in optim["state"].items():
        for name, value in per_param.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{name} is not a tensor: {type(value)}")
            tensors[f"optim/{index}/{name}"] = value
    try:
        check_finite(tensors, f"training state at step {state.step}")
    except ValueError as error:
        raise ValueError(
            f"{error}: the run diverged (try a lower lr or grad_clip); the checkpoint in "
            f"{folder} was not replaced"
        ) from None
    rng, rng_json = _rng_state()
    tensors.update(rng)
    record = {
        "format": CHECKPOINT_FORMAT,
        "tensors": TENSOR_FILE,
        "state": state.to_dict(),
        "optimizer": {
            "param_groups": optim["param_groups"],
            "params_with_state": sorted(int(i) for i in optim["state"]),
        },
        "rng": rng_json,
        "meta": meta,
        "versions": versions(),
    }
    with write_folder(folder, manifest=STATE_FILE, what="training checkpoint") as writer:
        writer.tensors(TENSOR_FILE, tensors)
        writer.manifest(STATE_FILE, record, covers=[TENSOR_FILE])
        if folder.is_dir():  # tensor files of format 1, named by step
            writer.drop(*(p.name for p in folder.glob("state-*.safetensors")))
    logger.info("checkpoint at step %d written to %s", state.step, folder)
    return folder


def read_checkpoint_meta(out_dir: str | Path) -> dict[str, Any]:
    """The `meta` saved with the checkpoint (to check it against this run before loading)."""
    return _read_record(checkpoint_dir(out_dir) / STATE_FILE)["meta"]


def load_checkpoint(
    out_dir: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer
) -> LoopState:
    """Restore the trained module (`Trainable.module`), optimizer and RNG states from the
    checkpoint; returns the loop state.

    Raises:
        FileNotFoundError: no checkpoint, or its tensor file is missing.
        ValueError: an unknown format, or module / optimizer tensors that do not fit (named).
    """
    folder = checkpoint_dir(out_dir)
    path = folder / STATE_FILE
    record, tensors = _read(folder)
    tensor_path = folder / record["tensors"]
    own = module.state_dict()
    saved = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("adapter/")}
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ValueError(f"{tensor_path}: module keys missing {missing}, unexpected {unexpected}")
    for name, tensor in saved.items():
        if tensor.shape != own[name].shape:
            raise ValueError(
                f"{tensor_path}: module tensor {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(own[name].shape)}"
            )
    module.load_state_dict(saved, strict=True)
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            optim_state.setdefault(int(index), {})[name] = value
    groups = record["optimizer"]["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    except (ValueError, KeyError) as error:
        raise ValueError(f"{path}: optimizer state does not fit the module ({error})") from error
    _set_rng_state(tensors, record["rng"])
    state = LoopState(**record["state"])
    logger.info("resumed from the checkpoint at step %d (%s)", state.step, folder)
    return state


def _read_record(path: Path) -> dict[str, Any]:
    """The checkpoint's state.json, checked (its checksum, format, fields)."""
    folder = path.parent
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} not found")
    return read_folder(folder, lambda reader: _check_record(reader, path))


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """state.json and its tensors, from one version of the folder, verified."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} not found")

    def read(reader: FolderReader) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        record = _check_record(reader, path)
        name = record["tensors"]
        if not isinstance(name, str) or not reader.exists(name):
            raise FileNotFoundError(f"{path}: its tensor file {folder / str(name)} is missing")
        if not reader.checked():
            logger.warning("%s: a checkpoint written before checksums; read unverified", path)
        return record, reader.tensors(name)

    return read_folder(folder, read)


def _check_record(reader: FolderReader, path: Path) -> dict[str, Any]:
    record = reader.read_manifest(STATE_FILE, what="training checkpoint")
    if record.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{path}: not a DualEdit training checkpoint of format {list(READABLE_FORMATS)}"
        )
    missing = [
        k for k in ("tensors", "state", "optimizer", "rng", "meta") if not isinstance(record.get(k), (dict, str))
    ]
    if record["format"] >= 2 and not reader.checked():
        missing.append("files")
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; the checkpoint is damaged")
    return record


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch, CUDA, numpy and python RNG states as tensors plus their JSON scalars."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = cuda_state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng/python"] = torch.tensor(internal, dtype=torch.int64)
    scalars = {
        "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
        "python": {"version": version, "gauss_next": gauss_next},
    }
    return tensors, scalars


def _set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    np_scalars = scalars["numpy"]
    np.random.set_state(
        (
            np_scalars["name"],
            tensors["rng/numpy"].numpy().astype(np.uint32),
            np_scalars["pos"],
            np_scalars["has_gauss"],
            np_scalars["cached"],
        )
    )
    py = scalars["python"]
    internal = tuple(int(x) for x in tensors["rng/python"].tolist())
    random.setstate((py["version"], internal, py["gauss_next"]))
