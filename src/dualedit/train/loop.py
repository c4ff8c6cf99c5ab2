"""`train`: the one training loop of every trained method, on the train split of an MMEdit-format
dataset.

One function that reads top to bottom: data order, learning rate, the method's loss, backward,
gradient averaging over processes, clipping, Adam step, logging, validation (best checkpoint,
early stopping), resumable checkpoint, the last folder, the method's finish step. What is trained
and how its loss is computed is the `Trainable`'s (trainable.py); nothing here knows a method.

The caller builds the trainable on the model where it will train (`place_model` first), then hands
both over: building a method attaches it (hooks, frozen flags) and places its parameters beside
the layers, so the model must be on the accelerator's device before, not after.
`editors/dualedit/train.py` (`train_dualedit`) is the example.

Files under `out_dir`: `best/` and `last/` (`Trainable.save`, the method's editor folder),
`checkpoint/` (resumable state, with the validation-best folder so far, see checkpoint.py),
`train_log.json` (loss and validation scores); `best/` only once the run is finished (best.py).
One run at a time writes to an `out_dir` (a lock beside it): a second is refused at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from tqdm.auto import tqdm

from dualedit.backbones import get_backbone
from dualedit.data.mmedit import SPLIT_FILES, MMEditDataset
from dualedit.folders import folder_lock
from dualedit.numerics import flush_denormals
from dualedit.train.checkpoint import (
    LoopState,
    checkpoint_dir,
    has_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from dualedit.train.data import (
    EditBatch,
    StepBatches,
    encode_edits_batch,
    keep_as_is,
    split_indices,
    steps_per_epoch,
)
from dualedit.train.best import BEST_DIR, publish_best
from dualedit.train.devices import input_device, same_device
from dualedit.train.log import LOG_FILE, accumulate, flush, trained_seconds, write_log
from dualedit.train.meta import check_resume, run_meta
from dualedit.train.settings import TrainResult, TrainSettings
from dualedit.train.trainable import Trainable

logger = logging.getLogger(__name__)

LAST_DIR = "last"
#: Names a loss term or a metric may not take: they are the log entries' own fields.
RESERVED_TERMS: frozenset[str] = frozenset(
    {"loss", "grad_norm", "lr", "steps", "step", "kind", "elapsed_s"}
)
RESERVED_METRICS: frozenset[str] = frozenset({"score", "improved", "step", "kind", "elapsed_s"})


@flush_denormals()  # subnormal floats slow CPU training many times over (numerics.py)
def train(
    trainable: Trainable,
    model: nn.Module,
    processor: Any,
    train_dataset: MMEditDataset,
    *,
    settings: TrainSettings | None = None,
    out_dir: str | Path,
    val_fraction: float | None = None,
    resume: bool = True,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    finish: bool = True,
) -> TrainResult:
    """Train `trainable` on `train_dataset` and keep the best by validation.

    The loop owns `trainable` from here on: it is closed (`Trainable.close`) when training ends,
    also on an error, and then finished (`Trainable.finish`) on the best folder.

    Args:
        trainable: the method to train, built on `model` (already on `accelerator.device`, see
            `place_model`).
        model: the VLM the trainable is built on; put in eval mode while training (no dropout),
            its mode given back at the end.
        processor: its processor (to encode the batches).
        train_dataset: the train split (`load_split(root, task, "train")`); validation edits are
            a fixed selection of it (see `split_indices`), never the eval split.
        settings: `TrainSettings` (default: `TrainSettings()`).
        out_dir: the run folder (created).
        val_fraction: if given, the validation edits are this fraction of the train split
            (overrides `settings.val_edits`).
        resume: continue from `out_dir/checkpoint` when there is one (its method, settings and
            run meta must match); False starts afresh and replaces earlier results in `out_dir`.
        progress: show a tqdm bar (main process only).
        accelerator: for data parallelism (`accelerate launch`, or a torchrun-style environment
            with `Accelerator(cpu=True)` on CPUs): each process takes batch_size / processes
            edits of every step and gradients are averaged. None: `Accelerator(cpu=<no CUDA>)`.
        finish: run `trainable.finish` on the best folder after training (main process).

    Returns:
        A `TrainResult` (best score and step, folders, timing, the finish summary).

    Raises:
        ValueError: bad settings, too few edits, a batch size not divisible by the processes, the
            eval split, a model off the accelerator's device, a trainable whose parameters are
            not its module's, or a checkpoint from another run (`CheckpointMismatch`, names what
            differs).

    Example:
        >>> place_model(model, accelerator)
        >>> trainable = DualEditTrainable(model, processor, config={"width": 256})
        >>> result = train(trainable, model, processor, load_split("world", "vqa", "train"),
        ...                settings=TrainSettings(max_steps=3000), out_dir="runs/vqa")
    """
    started = time.perf_counter()
    if not isinstance(trainable, Trainable):
        raise TypeError(f"trainable: not a Trainable ({type(trainable).__name__})")
    with contextlib.ExitStack() as run_lock:  # held until best/ is published
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(trainable.close)
            settings = settings if settings is not None else TrainSettings()
            if not isinstance(settings, TrainSettings):
                raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
            if accelerator is None:
                accelerator = Accelerator(cpu=not torch.cuda.is_available())
            out_dir = Path(out_dir)
            if out_dir.exists() and not out_dir.is_dir():
                raise ValueError(f"out_dir {out_dir} exists and is not a folder")
            rank, world, main = (
                accelerator.process_index,
                accelerator.num_processes,
                accelerator.is_main_process,
            )
            if main:  # a second run on this out_dir is refused at once (FolderLocked)
                run_lock.enter_context(folder_lock(out_dir, timeout=0, what="training run's folder"))
            train_idx, val_idx = validation_split(
                train_dataset, settings, val_fraction=val_fraction, processes=world
            )
            device = input_device(model)
            if not hasattr(model, "hf_device_map") and not same_device(device, accelerator.device):
                raise ValueError(
                    f"the model is on {device}, the accelerator on {accelerator.device}: move it "
                    "(place_model) before building the trainable"
                )
            backbone = get_backbone(model)
            cleanup.callback(model.train, model.training)
            model.eval()
            params = _trained_parameters(trainable)
            optimizer = torch.optim.Adam(_parameter_groups(trainable, params, settings))
            meta = run_meta(trainable, train_dataset, settings, len(val_idx))
            state, resumed_from = _start(out_dir, resume, meta, trainable, optimizer, settings, main)
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
                desc=f"training {trainable.name}",
            )
            term_names: list[str] | None = None  # the trainable's loss terms, sorted
            step_time, steps_run = 0.0, 0
            # Wall time of the run so far, over every call of a resumed run (up to the last entry
            # before a kill): logged in each entry as "elapsed_s".
            elapsed_before = trained_seconds(state.log) or 0.0
            call_started = time.perf_counter()
            tick = time.perf_counter()
            for batch in loader:
                # -- step: lr, loss, backward, average, clip, Adam ----------------------------------
                lr = _lr_at(settings, state.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_factor", 1.0)
                loss, terms = trainable.loss(batch.to(device))
                term_names = _check_terms(terms, term_names)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # One layout on every process: "loss", then the terms in sorted order.
                logged = torch.stack([loss, *(terms[k] for k in term_names)]).detach()
                logged = _average_gradients(params, logged, accelerator)
                max_norm = settings.grad_clip if settings.grad_clip is not None else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                optimizer.step()
                state.step += 1
                steps_run += 1
                step_time += time.perf_counter() - tick
                bar.update(1)
                # -- log -------------------------------------------------------------------------
                values = dict(zip(["loss", *term_names], logged.tolist(), strict=True))
                accumulate(state, values, float(grad_norm), lr)
                if state.step % settings.log_every == 0:
                    entry = flush(state)
                    entry["elapsed_s"] = elapsed_before + time.perf_counter() - call_started
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
                # -- validation, best folder, early stopping ---------------------------------------
                if state.step % settings.eval_every == 0 or state.step == settings.max_steps:
                    metrics = _validate(trainable, val_batches, device, accelerator)
                    _record_eval(state, metrics, settings)
                    elapsed = elapsed_before + time.perf_counter() - call_started
                    state.log[-1]["elapsed_s"] = elapsed
                    if state.best_step == state.step and main:
                        trainable.save(checkpoint_dir(out_dir) / BEST_DIR)
                    logger.info("%s: step %d validation %s", trainable.name, state.step, state.log[-1])
                # -- checkpoint --------------------------------------------------------------------
                stop = state.stop_reason is not None or state.step >= settings.max_steps
                if stop and state.pending:
                    flush(state)
                if state.step % settings.checkpoint_every == 0 or stop:
                    if main:
                        save_checkpoint(out_dir, state, trainable.module, optimizer, meta)
                        write_log(out_dir, state, meta)
                    accelerator.wait_for_everyone()
                tick = time.perf_counter()
                if stop:
                    break
            bar.close()
            if main:
                trainable.save(out_dir / LAST_DIR)
                write_log(out_dir, state, meta)
            accelerator.wait_for_everyone()
        # The trainable is closed (its hooks removed) before the finish step loads the best folder.
        best_dir = out_dir / BEST_DIR if state.best_step is not None else None
        summary = None
        if best_dir is not None and main:
            summary = publish_best(out_dir, trainable, train_dataset, val_idx, finish,
                                   step=state.step, reuse=steps_run == 0)
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
        finish=summary,
    )


def validation_split(
    dataset: MMEditDataset,
    settings: TrainSettings,
    *,
    val_fraction: float | None = None,
    processes: int = 1,
) -> tuple[list[int], list[int]]:
    """The (train, validation) record indices of a run, after the checks `train` makes before
    anything else: a caller may run them before building its trainable (they are pure).

    Raises:
        ValueError: a batch size not divisible by `processes`, the eval split, a bad
            `val_fraction`, or too few edits for the validation and one batch.
    """
    if settings.batch_size % processes:
        raise ValueError(
            f"batch_size {settings.batch_size} is not divisible by the {processes} processes"
        )
    if dataset.path.name == Path(SPLIT_FILES[(dataset.task, "eval")]).name:
        raise ValueError(
            f"{dataset.path}: the eval split; train on the train split (validation edits "
            "are held out of it)"
        )
    n_val = _validation_size(len(dataset), settings, val_fraction)
    train_idx, val_idx = split_indices(len(dataset), n_val)
    steps_per_epoch(len(train_idx), settings.batch_size)  # enough training edits?
    return train_idx, val_idx


# -- starting and resuming -----------------------------------------------------------------------


def _trained_parameters(trainable: Trainable) -> list[nn.Parameter]:
    """The trainable's parameters, checked: a parameter outside `module` would train but not
    resume (checkpoints hold the module)."""
    params = list(trainable.parameters())
    if not params:
        raise ValueError(f"{trainable.name}: the trainable has no parameters")
    own = {id(p) for p in trainable.module.parameters()}
    names = {id(p): name for name, p in trainable.module.named_parameters()}
    for i, p in enumerate(params):
        if id(p) not in own:
            raise ValueError(f"{trainable.name}: trained parameter {i} is not in its module")
        if not p.requires_grad:
            raise ValueError(f"{trainable.name}: parameter {names[id(p)]} does not require grad")
    return params


def _parameter_groups(
    trainable: Trainable, params: list[nn.Parameter], settings: TrainSettings
) -> list[dict[str, Any]]:
    """Adam's parameter groups: every parameter at `settings.lr`, except those a trainable's
    optional `parameter_lrs()` ({module parameter name: lr}, e.g. MEND's step sizes) names.
    Each group's "lr_factor" scales the schedule's rate (warm-up included)."""
    rates = getattr(trainable, "parameter_lrs", lambda: {})()
    names = {id(p): name for name, p in trainable.module.named_parameters()}
    unknown = sorted(set(rates) - set(names.values()))
    if unknown:
        raise ValueError(f"{trainable.name}: parameter_lrs names unknown parameters {unknown}")
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        rate = rates.get(names[id(p)], settings.lr)
        groups.setdefault(float(rate), []).append(p)
    return [
        {"params": group, "lr": rate, "lr_factor": rate / settings.lr}
        for rate, group in groups.items()
    ]


def _start(
    out_dir: Path,
    resume: bool,
    meta: dict[str, Any],
    trainable: Trainable,
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    main: bool,
) -> tuple[LoopState, int | None]:
    """The loop state to start from: the checkpoint's (checked against this run) or a fresh one."""
    if resume and has_checkpoint(out_dir):
        check_resume(read_checkpoint_meta(out_dir), meta, out_dir)
        state = load_checkpoint(out_dir, trainable.module, optimizer)
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
    # Seeded so that a method drawing random numbers (dropout, sampling) is reproducible and the
    # saved RNG states meaningful.
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    random.seed(settings.seed)
    return LoopState(), None


def _validation_size(n_records: int, settings: TrainSettings, val_fraction: float | None) -> int:
    if val_fraction is None:
        return settings.val_edits
    if isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    return max(1, round(val_fraction * n_records))


# -- one step's helpers ----------------------------------------------------------------------------


def _lr_at(settings: TrainSettings, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then `settings.lr_schedule`: constant, or a cosine or
    linear decay from lr at the end of warm-up to 0 at `max_steps`."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "constant":
        return settings.lr
    span = max(1, settings.max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    if settings.lr_schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.lr * (1.0 - progress)


def _check_terms(terms: dict[str, torch.Tensor], seen: list[str] | None) -> list[str]:
    """The sorted term names, the same as every earlier step's."""
    names = sorted(terms)
    if seen is None:
        reserved = sorted(RESERVED_TERMS & set(names))
        if reserved:
            raise ValueError(f"loss terms may not be named {reserved} (log fields)")
    elif names != seen:
        raise ValueError(f"loss terms changed between steps: {seen} then {names}")
    return names


def _average_gradients(
    params: list[nn.Parameter], extra: torch.Tensor, accelerator: Accelerator
) -> torch.Tensor:
    """Average the trained gradients (and `extra`, the logged loss terms) over processes in one
    all-reduce; returns the averaged `extra`.

    A parameter without a gradient (e.g. an adapter no input of this batch reached) gets zeros, so
    every process reduces the same layout and Adam treats it the same in any number of processes.
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


# -- validation ------------------------------------------------------------------------------------


def _validate(
    trainable: Trainable,
    batches: list[EditBatch],
    device: torch.device,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Each of the trainable's metrics x100 over the validation edits of all processes, and the
    score (their mean)."""
    names: list[str] | None = None
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            metrics = trainable.metrics(batch.to(device))
            if names is None:
                names = list(metrics)
            elif list(metrics) != names:
                raise ValueError(
                    f"{trainable.name}: metrics changed: {names} then {list(metrics)}"
                )
            for key, per_edit in metrics.items():  # [n] each
                sums[key] = sums.get(key, count.new_zeros(())) + per_edit.sum().to(count)
            count = count + batch.n
    if accelerator.num_processes > 1:
        # Process 0 always holds validation edits; the others may hold none (fewer edits than
        # processes) and learn the names, in process 0's order, from it.
        names = broadcast_object_list([names], from_process=0)[0]
    if not names:
        raise ValueError(f"{trainable.name}: metrics returned no metric")
    reserved = sorted(RESERVED_METRICS & set(names))
    if reserved:
        raise ValueError(f"{trainable.name}: metrics may not be named {reserved} (log fields)")
    if sums and set(sums) != set(names):
        raise ValueError(f"{trainable.name}: metrics differ between processes: {sorted(sums)} "
                         f"here, {sorted(names)} on process 0")
    zero = count.new_zeros(())
    totals = torch.stack([sums.get(key, zero) for key in names] + [count])  # sums, count
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    values = (totals[:-1] / totals[-1] * 100).tolist()
    metrics = dict(zip(names, values, strict=True))
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


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
