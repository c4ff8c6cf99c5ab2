"""`train_dualedit`: train the DualEdit adapters on the train split of an MMEdit-format dataset.

One function that reads top to bottom: data order, learning rate, edited pass, loss, backward,
gradient averaging over processes, clipping, Adam step, logging, validation (best checkpoint,
early stopping), resumable checkpoint. See losses.py for the pass itself (frozen prefix run once,
backward through layers >= min(t, v) only).

Files under `out_dir`: `best/` and `last/` (adapters, `DualEditor.save_pretrained` format),
`checkpoint/` (resumable state, see checkpoint.py), `train_log.json` (loss and validation scores).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from dualedit.backbones import get_backbone
from dualedit.data.mmedit import SPLIT_FILES, MMEditDataset
from dualedit.editors.dualedit import DualEditConfig, DualEditor
from dualedit.editors.dualedit.calibrate import CALIBRATION_MODES
from dualedit.io import atomic_write_text
from dualedit.numerics import flush_denormals
from dualedit.train.calibration import calibrate_on
from dualedit.train.checkpoint import (
    CheckpointMismatch,
    LoopState,
    has_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    weights_fingerprint,
)
from dualedit.train.data import (
    EditBatch,
    StepBatches,
    encode_edits_batch,
    keep_as_is,
    split_indices,
    steps_per_epoch,
)
from dualedit.train.losses import METRICS, edit_pass
from dualedit.train.settings import TrainResult, TrainSettings

logger = logging.getLogger(__name__)

BEST_DIR = "best"
LAST_DIR = "last"
LOG_FILE = "train_log.json"
LOSS_TERMS: tuple[str, ...] = ("loss", "l_rel", "l_gen", "l_loc")


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
            training and saved as configured for evaluation.
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

    Returns:
        A `TrainResult` (best score and step, folders, timing).

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
    if calibration not in CALIBRATION_MODES:  # checked before hours of training, not after
        raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, got {calibration!r}")
    settings = settings if settings is not None else TrainSettings()
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    if isinstance(config, dict):
        config = DualEditConfig.from_dict(config, where="train_dualedit config")
    config = config if config is not None else DualEditConfig()
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out_dir = Path(out_dir)
    rank, world, main = (
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.is_main_process,
    )
    if settings.batch_size % world:
        raise ValueError(
            f"batch_size {settings.batch_size} is not divisible by the {world} processes"
        )
    if train_dataset.path.name == Path(SPLIT_FILES[(train_dataset.task, "eval")]).name:
        raise ValueError(
            f"{train_dataset.path}: the eval split; train on the train split (validation edits "
            "are held out of it)"
        )
    n_val = _validation_size(len(train_dataset), settings, val_fraction)
    train_idx, val_idx = split_indices(len(train_dataset), n_val)
    steps_per_epoch(len(train_idx), settings.batch_size)  # enough training edits?

    if not hasattr(model, "hf_device_map") and _input_device(model) != accelerator.device:
        model.to(accelerator.device)
    backbone = get_backbone(model)
    was_training = model.training
    model.eval()
    editor = DualEditor(model, processor, backbone, config=config)
    try:
        device = _input_device(model)
        params = list(editor.parameters())
        optimizer = torch.optim.Adam(params, lr=settings.lr)
        meta = _run_meta(editor, train_dataset, settings, n_val)
        state, resumed_from = _start(out_dir, resume, meta, editor, optimizer, settings, main)
        accelerator.wait_for_everyone()
        val_batches = [
            encode_edits_batch(
                [train_dataset[j] for j in chunk],
                train_dataset.task,
                processor,
                backbone,
                train_dataset.images,
            )
            for chunk in _chunks(val_idx[rank::world], settings.eval_batch_size)
        ]
        loader = torch.utils.data.DataLoader(
            StepBatches(
                train_dataset,
                train_idx,
                batch_size=settings.batch_size,
                seed=settings.seed,
                start=state.step,
                stop=settings.max_steps if state.stop_reason is None else state.step,
                rank=rank,
                world=world,
                processor=processor,
                backbone=backbone,
            ),
            batch_size=None,
            collate_fn=keep_as_is,
            num_workers=settings.num_workers,
        )
        bar = tqdm(
            total=settings.max_steps,
            initial=state.step,
            disable=not (progress and main),
            desc="dualedit adapters",
        )
        step_time, steps_run = 0.0, 0
        tick = time.perf_counter()
        for batch in loader:
            # -- step: lr, edited pass, loss, backward, average, clip, Adam --------------------
            lr = _lr_at(settings, state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = edit_pass(editor, batch.to(device), text_loc=settings.text_loc_kl)
            loss, terms = out.loss(settings.text_loc_kl)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            logged = torch.stack([loss, *terms.values()]).detach()  # [4], as LOSS_TERMS
            logged = _average_gradients(params, logged, accelerator)
            max_norm = settings.grad_clip if settings.grad_clip is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            state.step += 1
            steps_run += 1
            step_time += time.perf_counter() - tick
            bar.update(1)
            # -- log -------------------------------------------------------------------------
            values = dict(zip(LOSS_TERMS, logged.tolist(), strict=True))
            _accumulate(state, values, float(grad_norm), lr)
            if state.step % settings.log_every == 0:
                entry = _flush(state)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
            # -- validation, best adapters, early stopping -------------------------------------
            if state.step % settings.eval_every == 0 or state.step == settings.max_steps:
                metrics = _validate(editor, val_batches, device, accelerator)
                _record_eval(state, metrics, settings)
                if state.best_step == state.step and main:
                    editor.save_pretrained(out_dir / BEST_DIR)
                logger.info("step %d validation %s", state.step, state.log[-1])
            # -- checkpoint --------------------------------------------------------------------
            stop = state.stop_reason is not None or state.step >= settings.max_steps
            if stop and state.pending:
                _flush(state)
            if state.step % settings.checkpoint_every == 0 or stop:
                if main:
                    save_checkpoint(out_dir, state, editor.adapters, optimizer, meta)
                    _write_log(out_dir, state, meta)
                accelerator.wait_for_everyone()
            tick = time.perf_counter()
            if stop:
                break
        bar.close()
        if main:
            editor.save_pretrained(out_dir / LAST_DIR)
            _write_log(out_dir, state, meta)
        accelerator.wait_for_everyone()
    finally:
        editor.detach()
        model.train(was_training)
    best_dir = out_dir / BEST_DIR if state.best_step is not None else None
    tau = None
    if calibrate_tau and best_dir is not None and main:
        tau = calibrate_on(model, processor, best_dir, train_dataset, val_idx, calibration)
    accelerator.wait_for_everyone()
    return TrainResult(
        out_dir=out_dir,
        best_dir=best_dir,
        last_dir=out_dir / LAST_DIR,
        best_score=state.best_score,
        best_step=state.best_step,
        steps=state.step,
        stop_reason=state.stop_reason or "max_steps",
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
        step_seconds=step_time / steps_run if steps_run else None,
        log_path=out_dir / LOG_FILE,
        tau=tau,
    )


# -- starting and resuming -----------------------------------------------------------------------


def _start(
    out_dir: Path,
    resume: bool,
    meta: dict[str, Any],
    editor: DualEditor,
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    main: bool,
) -> tuple[LoopState, int | None]:
    """The loop state to start from: the checkpoint's (checked against this run) or a fresh one."""
    if resume and has_checkpoint(out_dir):
        _check_resume(read_checkpoint_meta(out_dir), meta, out_dir)
        state = load_checkpoint(out_dir, editor.adapters, optimizer)
        return state, state.step
    if main:
        if has_checkpoint(out_dir):
            logger.warning(
                "%s: starting afresh (resume=False); earlier results are replaced", out_dir
            )
        for name in (BEST_DIR, LAST_DIR, "checkpoint"):
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
        out_dir.mkdir(parents=True, exist_ok=True)
    # Training draws no random numbers today; seeding makes any future use reproducible and the
    # saved RNG states meaningful.
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    random.seed(settings.seed)
    return LoopState(), None


def _run_meta(
    editor: DualEditor, dataset: MMEditDataset, settings: TrainSettings, n_val: int
) -> dict[str, Any]:
    model = editor.model
    return {
        "settings": settings.to_dict(),
        "config": editor.config.to_dict(),
        "model_type": model.config.model_type,
        "base_model": str(getattr(model.config, "name_or_path", "") or ""),
        "base_weights": weights_fingerprint(model),
        "hidden_size": editor.backbone.hidden_size(model),
        "depth": editor.backbone.depth(model),
        "dataset": {"path": str(dataset.path), "task": dataset.task, "records": len(dataset)},
        "val_edits": n_val,
    }


def _check_resume(saved: dict[str, Any], meta: dict[str, Any], out_dir: Path) -> None:
    """A checkpoint from another run is an error that names what differs."""
    problems = []
    changes = TrainSettings.from_dict(saved["settings"]).trajectory_changes(
        TrainSettings.from_dict(meta["settings"])
    )
    problems += [f"settings.{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changes.items()]
    for key in ("config", "model_type", "hidden_size", "depth", "val_edits"):
        if saved.get(key) != meta[key]:
            problems.append(f"{key}: checkpoint {saved.get(key)!r}, now {meta[key]!r}")
    # A checkpoint written before the fingerprint existed cannot show it trained on this model.
    if saved.get("base_weights") != meta["base_weights"]:
        problems.append(
            f"base model weights: checkpoint {saved.get('base_weights')}, now "
            f"{meta['base_weights']} (the model at {meta['base_model'] or 'this path'} is not the "
            "one the checkpoint was trained on)"
        )
    for key in ("task", "records"):
        if saved["dataset"].get(key) != meta["dataset"][key]:
            problems.append(
                f"dataset {key}: checkpoint {saved['dataset'].get(key)!r}, "
                f"now {meta['dataset'][key]!r}"
            )
    if problems:
        raise CheckpointMismatch(
            f"{out_dir}: the checkpoint belongs to another run ({'; '.join(problems)}); use another "
            "out_dir or resume=False"
        )


def _validation_size(n_records: int, settings: TrainSettings, val_fraction: float | None) -> int:
    if val_fraction is None:
        return settings.val_edits
    if isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    return max(1, round(val_fraction * n_records))


# -- one step's helpers ----------------------------------------------------------------------------


def _lr_at(settings: TrainSettings, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    return settings.lr


def _average_gradients(
    params: list[nn.Parameter], extra: torch.Tensor, accelerator: Accelerator
) -> torch.Tensor:
    """Average the adapters' gradients (and `extra`, the logged loss terms) over processes in one
    all-reduce; returns the averaged `extra`.

    A parameter without a gradient (an adapter no input of this batch reached) gets zeros, so every
    process reduces the same layout and Adam treats it the same in any number of processes.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if accelerator.num_processes == 1:
        return extra
    flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [extra.float()])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        size = p.numel()
        p.grad.copy_(flat[offset : offset + size].view_as(p.grad))
        offset += size
    return flat[offset:]


def _accumulate(state: LoopState, values: dict[str, float], grad_norm: float, lr: float) -> None:
    pending = state.pending
    for key, value in values.items():
        pending[key] = pending.get(key, 0.0) + value
    pending["grad_norm"] = pending.get("grad_norm", 0.0) + grad_norm
    pending["steps"] = pending.get("steps", 0.0) + 1
    pending["lr"] = lr


def _flush(state: LoopState) -> dict[str, Any]:
    """Turn the pending sums into a "train" log entry (means over the steps since the last)."""
    pending = state.pending
    steps = pending.pop("steps")
    lr = pending.pop("lr")
    entry = {"kind": "train", "step": state.step, "lr": lr, "steps": int(steps)}
    entry.update({key: value / steps for key, value in sorted(pending.items())})
    state.log.append(entry)
    state.pending = {}
    return entry


# -- validation ------------------------------------------------------------------------------------


def _validate(
    editor: DualEditor,
    batches: list[EditBatch],
    device: torch.device,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Rel / T-Gen / V-Gen token accuracy and T-Loc / M-Loc agreement (gate off), x100, over the
    validation edits of all processes."""
    totals = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=device)  # sums, count
    with torch.no_grad():
        for batch in batches:
            metrics = edit_pass(editor, batch.to(device), text_loc=True).metrics()
            sums = torch.stack([metrics[key].sum() for key in METRICS])  # [5]
            totals += torch.cat([sums.to(totals), totals.new_tensor([batch.n])])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    values = (totals[:-1] / totals[-1] * 100).tolist()
    metrics = dict(zip(METRICS, values, strict=True))
    metrics["score"] = sum(values) / len(values)
    return metrics


def _record_eval(state: LoopState, metrics: dict[str, float], settings: TrainSettings) -> None:
    score = metrics["score"]
    improved = state.best_score is None or score > state.best_score + settings.min_delta
    if improved:
        state.best_score, state.best_step, state.evals_since_best = score, state.step, 0
    else:
        state.evals_since_best += 1
    state.log.append({"kind": "eval", "step": state.step, **metrics, "improved": improved})
    if settings.patience is not None and state.evals_since_best >= settings.patience:
        state.stop_reason = "early_stopping"
        logger.info(
            "early stopping at step %d: no improvement in %d validations (best %.2f at step %d)",
            state.step,
            settings.patience,
            state.best_score,
            state.best_step,
        )


def _write_log(out_dir: Path, state: LoopState, meta: dict[str, Any]) -> None:
    record = {
        "meta": meta,
        "step": state.step,
        "best_score": state.best_score,
        "best_step": state.best_step,
        "stop_reason": state.stop_reason,
        "entries": state.log,
    }
    atomic_write_text(out_dir / LOG_FILE, json.dumps(record, indent=1, sort_keys=True))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _input_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
