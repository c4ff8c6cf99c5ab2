"""Training the DualEdit adapters: `DualEditTrainable` (what the one training loop needs from
DualEdit) and `train_dualedit` (the loop run for it, ending with tau chosen on the validation
edits).

The loss and the validation metrics are one edited pass (losses.py: the frozen prefix run once,
backward through layers >= min(t, v) only); the loop (`dualedit.train.loop.train`) does the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from dualedit.backbones import Backbone, get_backbone
from dualedit.data.mmedit import MMEditDataset
from dualedit.editors.dualedit.calibrate import (
    CALIBRATION_MODES,
    TauChoice,
    calibrate_on,
    check_heads_mlp,
)
from dualedit.editors.dualedit.config import DualEditConfig
from dualedit.editors.dualedit.editor import DualEditor
from dualedit.editors.dualedit.gate import LEARNED
from dualedit.editors.dualedit.gate_fit import MIN_RECORDS
from dualedit.editors.dualedit.losses import METRICS, edit_pass
from dualedit.numerics import flush_denormals
from dualedit.train.data import EditBatch
from dualedit.train.devices import place_model
from dualedit.train.loop import train, validation_split
from dualedit.train.settings import TrainResult, TrainSettings
from dualedit.train.meta import base_model_meta

logger = logging.getLogger(__name__)


class DualEditTrainable:
    """The DualEdit adapters as the training loop trains them (a `dualedit.train.Trainable`).

    Holds a `DualEditor` attached to `model` (base model frozen, gate off in every training and
    validation pass); `module` is its adapters. `close()` detaches it.

    Args:
        model, processor: the VLM, already where it trains (`train.loop.place_model`).
        config: the adapters' `DualEditConfig` (or a dict of its fields; None: the defaults); the
            gate is saved as configured, for evaluation.
        text_loc_kl: include the KL on the text-only locality sample in the loss
            (`TrainSettings.text_loc_kl`).
        calibration: how `finish` stores the validation edits while it chooses tau: "single" or
            "sequential" (see `calibrate.choose_tau`).
        heads_mlp: with the "learned" gate key, hidden units of the gate heads `finish` fits
            (0: linear heads; None: `heads.MLP`; see `heads.GateHeads`).
        backbone: where the model's layers are (None: looked up).
        editor_class: `DualEditor` or a method built on its adapters (VisEdit's `VisEditor`):
            the editor trained, its `Config` and its name in the run meta.

    Example:
        >>> trainable = DualEditTrainable(model, processor, config={"width": 256})
        >>> result = train(trainable, model, processor, train_split, out_dir="runs/vqa")
    """

    name = DualEditor.name

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        config: DualEditConfig | dict[str, Any] | None = None,
        text_loc_kl: bool = True,
        calibration: str = "single",
        heads_mlp: int | None = None,
        backbone: Backbone | None = None,
        editor_class: type[DualEditor] = DualEditor,
    ):
        if calibration not in CALIBRATION_MODES:
            raise ValueError(
                f"calibration must be one of {CALIBRATION_MODES}, got {calibration!r}"
            )
        if not isinstance(text_loc_kl, bool):
            raise TypeError(f"text_loc_kl must be a bool, got {text_loc_kl!r}")
        config = _resolve_config(config, editor_class.Config, where=f"{editor_class.name} config")
        self.name = editor_class.name
        self.text_loc_kl = text_loc_kl
        self.calibration = calibration
        check_heads_mlp(heads_mlp, config.gate_key or "default", where="the config's gate key")
        self.heads_mlp = heads_mlp
        self.editor = editor_class(
            model, processor, backbone if backbone is not None else get_backbone(model),
            config=config,
        )
        self.module: nn.Module = self.editor.adapters

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.editor.parameters()

    def loss(self, batch: EditBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """l_rel + l_gen + l_loc (paper eq. 5, see losses.py) and the three terms."""
        out = edit_pass(self.editor, batch, text_loc=self.text_loc_kl)
        return out.loss(self.text_loc_kl)

    def metrics(self, batch: EditBatch) -> dict[str, torch.Tensor]:
        """Rel / T-Gen / V-Gen token accuracy and T-Loc / M-Loc agreement (gate off), per edit,
        in `METRICS` order (the score is summed in it)."""
        metrics = edit_pass(self.editor, batch, text_loc=True).metrics()
        return {key: metrics[key] for key in METRICS}

    def run_meta(self) -> dict[str, Any]:
        editor = self.editor
        return {
            "config": editor.config.to_dict(),
            **base_model_meta(editor.model, editor.backbone),
        }

    def save(self, directory: Path) -> None:
        self.editor.save_pretrained(directory)

    def finish(self, best_dir: Path, dataset: MMEditDataset, val_idx: list[int]) -> TauChoice:
        """Choose tau on the validation edits and save it in the best adapters' config."""
        return calibrate_on(
            self.editor.model, self.editor.processor, best_dir, dataset, val_idx, self.calibration,
            heads_mlp=self.heads_mlp,
        )

    def finish_settings(self) -> dict[str, Any]:
        """What `finish` depends on beyond the run (a recorded finish is reused only with them)."""
        return {"calibration": self.calibration, "heads_mlp": self.heads_mlp}

    def load_finish(self, summary: dict[str, Any]) -> TauChoice:
        """A recorded `finish` summary (`train.best.FINISH_FILE`) as the `TauChoice` it was."""
        return TauChoice(**summary)

    def close(self) -> None:
        self.editor.detach()


@flush_denormals()  # subnormal floats slow CPU training many times over (numerics.py)
def train_dualedit(
    model: nn.Module,
    processor: Any,
    train_dataset: MMEditDataset,
    *,
    config: DualEditConfig | dict[str, Any] | None = None,
    settings: TrainSettings | None = None,
    out_dir: str | Path,
    val_fraction: float | None = None,
    resume: bool = True,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    calibrate_tau: bool = True,
    calibration: str = "single",
    heads_mlp: int | None = None,
    editor_class: type[DualEditor] = DualEditor,
) -> TrainResult:
    """Train the DualEdit adapters of `model` (frozen) and keep the best by validation.

    Args:
        model: the VLM; its weights are never changed (only `requires_grad` flags while training,
            given back at the end). It is put in eval mode while training (no dropout), and moved
            to `accelerator.device` unless it is already there or sharded (`hf_device_map`).
        processor: its processor.
        train_dataset: the train split (`load_split(root, task, "train")`); validation edits are
            a fixed selection of it (see `split_indices`), never the eval split.
        config: the adapters' `DualEditConfig` (or a dict of its fields); the gate is off while
            training and saved as configured for evaluation. Without gate_key and tau, DualEdit
            saves the "learned" key (`default_gate_key`): its heads are fitted before tau is
            chosen (one frozen pass over the train split and a short fit).
        settings: `TrainSettings` (default: `TrainSettings()`).
        out_dir: the run folder (created).
        val_fraction: if given, the validation edits are this fraction of the train split
            (overrides `settings.val_edits`).
        resume: continue from `out_dir/checkpoint` when there is one (its settings and config
            must match); False starts afresh and replaces earlier results in `out_dir`.
        progress: show a tqdm bar (main process only).
        accelerator: for data parallelism (`accelerate launch`, or a torchrun-style environment
            with `Accelerator(cpu=True)` on CPUs): each process takes batch_size / processes
            edits of every step and gradients are averaged. None: `Accelerator(cpu=<no CUDA>)`.
        calibrate_tau: after training, choose the gate threshold on the validation edits
            (`calibrate.choose_tau`) and save it in the best adapters' config (the configured
            tau is kept when False). Logged and returned as `TrainResult.tau`.
        calibration: how the validation edits are stored while tau is chosen: "single" (one
            at a time) or "sequential" (all at once, as the sequential protocol holds them);
            see `calibrate.choose_tau`.
        heads_mlp: with the "learned" gate key, hidden units of the fitted gate heads (0:
            linear; None: `heads.MLP`; a number is refused with another key).
        editor_class: the editor trained (`DualEditor`, or VisEdit's `VisEditor`, which shares
            its adapters, hooks and edited pass).

    Returns:
        A `TrainResult` (best score and step, folders, timing, `tau`).

    Raises:
        ValueError: bad settings, too few edits, a batch size not divisible by the processes, or
            a checkpoint from another run (names what differs).

    Example:
        >>> ds = load_split("world", "vqa", "train")
        >>> result = train_dualedit(model, processor, ds, config={"width": 256},
        ...                         settings=TrainSettings(max_steps=3000), out_dir="runs/vqa")
        >>> editor = DualEditor.from_pretrained(model, processor, result.best_dir)
    """
    started = time.perf_counter()
    # Everything that can be refused is refused before the model moves or the editor attaches,
    # not after hours of training.
    if calibration not in CALIBRATION_MODES:
        raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, got {calibration!r}")
    settings = settings if settings is not None else TrainSettings()
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    config = _resolve_config(config, editor_class.Config, where=f"train {editor_class.name} config")
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    train_idx, _ = validation_split(
        train_dataset, settings, val_fraction=val_fraction, processes=accelerator.num_processes
    )
    config = default_gate_key(config, editor_class, calibrate_tau, len(train_idx))
    check_heads_mlp(heads_mlp, config.gate_key or "default", where="the config's gate key")
    if config.gate_key == LEARNED and calibrate_tau and len(train_idx) < MIN_RECORDS:
        raise ValueError(
            f"gate_key=learned: its heads are fitted on the train records outside the validation "
            f"edits, at least {MIN_RECORDS}; {train_dataset.path} leaves {len(train_idx)}"
        )
    place_model(model, accelerator)
    trainable = DualEditTrainable(
        model, processor, config=config, text_loc_kl=settings.text_loc_kl, calibration=calibration,
        heads_mlp=heads_mlp, editor_class=editor_class,
    )
    result = train(
        trainable,
        model,
        processor,
        train_dataset,
        settings=settings,
        out_dir=out_dir,
        val_fraction=val_fraction,
        resume=resume,
        progress=progress,
        accelerator=accelerator,
        finish=calibrate_tau,
    )
    return dataclasses.replace(result, seconds=time.perf_counter() - started)


def default_gate_key(
    config: DualEditConfig,
    editor_class: type[DualEditor],
    calibrate_tau: bool,
    fit_records: int,
) -> DualEditConfig:
    """The gate key a DualEdit training saves when its config names none: "learned" (heads
    fitted on the train split with tau chosen after them), chosen on validation edits over the
    fixed keys (docs/experiments/lifelong_gate.md: more right gate decisions on both small
    backbones, one edit at a time and with 300 or 1000 stored). The fixed per-architecture key
    (`ARCH_GATE_KEY`) stays when the config fixes tau (a learned key's tau is chosen after its
    heads), turns the gate off (no heads to fit for it), when tau is not calibrated, for other
    editors (VisEdit), and when fewer than `MIN_RECORDS` train records (`fit_records`, the
    validation edits held out) are there to fit the heads on (logged)."""
    if (editor_class is not DualEditor or not calibrate_tau or config.gate_key is not None
            or config.tau is not None or not config.gate):
        return config
    if fit_records < MIN_RECORDS:
        logger.warning("%d train records outside the validation edits: too few to fit the "
                       "learned gate key's heads; the fixed key of the architecture is kept",
                       fit_records)
        return config
    return dataclasses.replace(config, gate_key=LEARNED)


def _resolve_config(
    config: DualEditConfig | dict[str, Any] | None,
    config_class: type[DualEditConfig] = DualEditConfig,
    *,
    where: str,
) -> DualEditConfig:
    if isinstance(config, dict):
        return config_class.from_dict(config, where=where)
    return config if config is not None else config_class()
