"""The run meta: what makes two training runs the same, saved with every checkpoint and log, and
compared when a run resumes (a checkpoint of another run is `CheckpointMismatch`, naming what
differs).

A run meta is the trainable's own part (`Trainable.run_meta`: its config and, as a rule, the base
model's `base_model_meta`) plus the loop's: "method", "settings", "dataset", "val_edits".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.mmedit import MMEditDataset
from dualedit.train.checkpoint import CheckpointMismatch, weights_fingerprint
from dualedit.train.settings import TrainSettings
from dualedit.train.trainable import Trainable

#: Keys of `base_model_meta`.
BASE_MODEL_KEYS: tuple[str, ...] = (
    "model_type",
    "base_model",
    "base_weights",
    "hidden_size",
    "depth",
)
#: Keys that need not match on resume: where the model was loaded from (a moved folder holds the
#: same model, and "base_weights" says whether it does).
INFORMATIONAL_KEYS: tuple[str, ...] = ("base_model",)
#: Keys the loop writes itself (a trainable's `run_meta` may not use them).
LOOP_META_KEYS: tuple[str, ...] = ("method", "settings", "dataset", "val_edits")


def base_model_meta(model: nn.Module, backbone: Backbone) -> dict[str, Any]:
    """The base model's part of a run meta (`BASE_MODEL_KEYS`): its type, where it was loaded
    from, the fingerprint of its weights, hidden size and depth.

    Example:
        >>> base_model_meta(model, get_backbone(model))["model_type"]
        'llava'
    """
    return {
        "model_type": model.config.model_type,
        "base_model": str(getattr(model.config, "name_or_path", "") or ""),
        "base_weights": weights_fingerprint(model),
        "hidden_size": backbone.hidden_size(model),
        "depth": backbone.depth(model),
    }


def run_meta(
    trainable: Trainable, dataset: MMEditDataset, settings: TrainSettings, n_val: int
) -> dict[str, Any]:
    """The run meta of training `trainable` on `dataset` with `settings` and `n_val` validation
    edits.

    Raises:
        ValueError: the trainable's `run_meta` sets one of `LOOP_META_KEYS`.
    """
    own = trainable.run_meta()
    clash = sorted(set(own) & set(LOOP_META_KEYS))
    if clash:
        raise ValueError(f"{trainable.name}: run_meta may not set {clash} (the loop's own)")
    return {
        "method": trainable.name,
        "settings": settings.to_dict(),
        **own,
        "dataset": {"path": str(dataset.path), "task": dataset.task, "records": len(dataset)},
        "val_edits": n_val,
    }


def check_resume(saved: dict[str, Any], meta: dict[str, Any], out_dir: Path) -> None:
    """Refuse to resume the checkpoint of another run: another method, trajectory settings
    (`TrainSettings.trajectory_changes`), any run meta key but `INFORMATIONAL_KEYS`, base model
    weights, or dataset task / size.

    Raises:
        CheckpointMismatch: naming what differs.
    """
    # Checkpoints written when only DualEdit trained name no method: nothing to compare.
    method = saved.get("method", meta["method"])
    if method != meta["method"]:
        raise CheckpointMismatch(
            f"{out_dir}: the checkpoint belongs to another method (checkpoint {method!r}, now "
            f"{meta['method']!r}); use another out_dir or resume=False"
        )
    problems = []
    changes = TrainSettings.from_dict(saved["settings"]).trajectory_changes(
        TrainSettings.from_dict(meta["settings"])
    )
    problems += [f"settings.{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changes.items()]
    skip = {"method", "settings", "dataset", "base_weights", *INFORMATIONAL_KEYS}
    for key, value in meta.items():
        if key not in skip and saved.get(key) != value:
            problems.append(f"{key}: checkpoint {saved.get(key)!r}, now {value!r}")
    # A checkpoint written before the fingerprint existed cannot show it trained on this model.
    if "base_weights" in meta and saved.get("base_weights") != meta["base_weights"]:
        problems.append(
            f"base model weights: checkpoint {saved.get('base_weights')}, now "
            f"{meta['base_weights']} (the model at {meta.get('base_model') or 'this path'} is "
            "not the one the checkpoint was trained on)"
        )
    for key in ("task", "records"):
        if saved["dataset"].get(key) != meta["dataset"][key]:
            problems.append(
                f"dataset {key}: checkpoint {saved['dataset'].get(key)!r}, "
                f"now {meta['dataset'][key]!r}"
            )
    if problems:
        raise CheckpointMismatch(
            f"{out_dir}: the checkpoint belongs to another run ({'; '.join(problems)}); use "
            "another out_dir or resume=False"
        )
