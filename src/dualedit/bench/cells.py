"""One cell of the quality bench: a method on one backbone and one dataset for one seed.

A cell trains the method where it is trained (through the demo's cache: resumable), evaluates it
with `run_eval`, and measures, apart from the scoring, the median time of one edit's `apply` and
the bytes the editor keeps per edit. Each finished cell is written to its own JSON file with the
settings that made it; a rerun reuses a file whose settings match and redoes one whose differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dualedit.data.mmedit import load_split
from dualedit.data.requests import EditRequest, edit_requests
from dualedit.demo import cached_training
from dualedit.editors.base import Editor, ImageLoader
from dualedit.editors.registry import open_editor
from dualedit.editors.spec import MethodSpec
from dualedit.eval.report import results_dict
from dualedit.evaluate import run_eval
from dualedit.io import atomic_write_text
from dualedit.jsondata import jsonable
from dualedit.train import TrainSettings, read_trained_seconds
from dualedit.version import dualedit_version

logger = logging.getLogger(__name__)

CELLS_DIR = "cells"
#: Bumped when a cell file's fields change meaning: older files are then redone.
CELL_FORMAT = 1


class Source(Protocol):
    """Where a bench's models and data come from (see `quality.WorldSource`, `FolderSource`)."""

    def data_root(self, seed: int) -> Path:
        """The MMEdit folder of `seed` (vqa/, caption/, images/)."""

    def model(self, seed: int, backbone: str) -> tuple[Any, Any]:
        """(model, processor) of `backbone` for `seed`."""

    def train_key(self, backbone: str) -> str:
        """The name a trained run of `backbone` is cached under."""


@dataclass(frozen=True)
class CellJob:
    """What one cell runs.

    Attributes:
        seed, backbone, task: the world seed, the backbone's label, "vqa" or "caption".
        spec: the method.
        options: the method's config fields (for a trained method: its training config).
        train_settings: a trained method's training settings, seed included (None: untrained).
    """

    seed: int
    spec: MethodSpec
    backbone: str
    task: str
    options: dict[str, Any]
    train_settings: TrainSettings | None
    #: An ablation's name (None: the method as registered); its trained run and cell file are
    #: kept apart under it.
    variant: str | None = None
    #: The trained run's name when it is not the method's own (an ablation's training); cells
    #: of one training share it.
    train_variant: str | None = None
    #: Config fields given when the trained editor is loaded for evaluation (e.g. gate off).
    eval_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        """The method's name, with the variant's."""
        return self.spec.name + (f" [{self.variant}]" if self.variant else "")

    @property
    def name(self) -> str:
        return f"seed {self.seed} {self.label} {self.backbone} {self.task}"


@dataclass(frozen=True)
class EvalSettings:
    """The bench-wide settings every cell runs under."""

    protocol: str
    n_values: tuple[int, ...]
    limit: int | None
    apply_samples: int
    cache: Path
    progress: bool
    #: Measure apply time and bytes again for reused cells (their scores are kept), so that
    #: every cell's timing comes from this one run.
    retime: bool = False


@dataclass(frozen=True)
class ApplyMeasure:
    """One edit's `apply`, measured apart from scoring.

    Attributes:
        median_s: the median wall time of `apply([request])` (None: not measured).
        bytes_per_edit: what the first timed edit adds to the files of a saved editor folder
            (None: not measured).
        samples: the edits timed.
    """

    median_s: float | None
    bytes_per_edit: int | None
    samples: int


def cell_path(out_dir: Path, job: CellJob, protocol: str) -> Path:
    """`out_dir/cells/seed{S}/{method}-{backbone}-{dataset}-{protocol}.json`."""
    parts = (job.spec.name, *([job.variant] if job.variant else []), job.backbone, job.task,
             protocol)
    name = "-".join(_safe(part) for part in parts)
    return Path(out_dir) / CELLS_DIR / f"seed{job.seed}" / f"{name}.json"


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", part)


def cell_settings(job: CellJob, run: EvalSettings, source: dict[str, Any]) -> dict[str, Any]:
    """Everything that made a cell, as compared on resume."""
    sequential = run.protocol == "sequential"
    return jsonable({
        "format": CELL_FORMAT,
        "seed": job.seed,
        "method": job.spec.name,
        "backbone": job.backbone,
        "dataset": job.task,
        "protocol": run.protocol,
        "n_values": list(run.n_values) if sequential else None,
        "limit": run.limit,
        "apply_samples": run.apply_samples,
        "options": job.options,
        "train_settings": job.train_settings,
        **({"variant": job.variant, "train_variant": job.train_variant,
            "eval_options": job.eval_options} if job.variant else {}),
        "source": source,
        "dualedit": dualedit_version(),
    })


def read_cell(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished cell in `path` if it was made with `settings`, else None (to redo)."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("redoing %s: unreadable (%s)", path, error)
        return None
    saved = cell.get("settings") if isinstance(cell, dict) else None
    if saved != settings:
        saved = saved if isinstance(saved, dict) else {}
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        logger.info("redoing %s: other settings (%s)", path, ", ".join(differ))
        return None
    return cell


def write_cell(path: Path, cell: dict[str, Any]) -> Path:
    """Write a finished cell atomically."""
    text = json.dumps(cell, indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def run_cell(
    job: CellJob, run: EvalSettings, source: Source, settings: dict[str, Any]
) -> dict[str, Any]:
    """Train (if the method is trained), evaluate and measure one cell.

    Returns:
        The cell: its key fields, `settings`, `status` ("done", or "skipped" when the method
        cannot run the protocol: `reason` says why), `results` (`results_dict` of `run_eval`'s
        `Results`), `train_s`, `trained` (the run behind it), `apply_s_median`, `apply_samples`
        and `bytes_per_edit`.
    """
    model_and_processor = source.model(job.seed, job.backbone)
    data_root = source.data_root(job.seed)
    cell: dict[str, Any] = {
        "seed": job.seed,
        "method": job.spec.name,
        "variant": job.variant,
        "backbone": job.backbone,
        "dataset": job.task,
        "protocol": run.protocol,
        "settings": settings,
        "train_s": None,
        "trained": None,
    }
    editor_dir, options = None, job.options
    if job.train_settings is not None:
        trained = cached_training(
            run.cache, job.spec, source.train_key(job.backbone), job.task, job.seed, data_root,
            model_and_processor, run.progress, job.train_settings, job.options,
            job.train_variant,
        )
        if trained.best_dir is None:
            raise ValueError(f"{trained.out_dir}: the training of {job.spec.name} saved no editor")
        editor_dir, options = trained.best_dir, dict(job.eval_options)
        cell["train_s"] = read_trained_seconds(trained.out_dir)
        cell["trained"] = jsonable({
            "path": trained.best_dir,
            "steps": trained.steps,
            "best_step": trained.best_step,
            "best_validation_score": trained.best_score,
            "finish": trained.finish,
        })
    try:
        results = run_eval(
            model_and_processor=model_and_processor,
            data_root=data_root,
            task=job.task,
            split="eval",
            method=job.spec.name,
            editor_dir=editor_dir,
            editor_options=options or None,
            protocol=run.protocol,
            n_values=run.n_values,
            limit=run.limit,
            progress=run.progress,
        )
    except NotImplementedError as error:
        logger.warning("%s: skipped, the method cannot run the %s protocol (%s)", job.name,
                       run.protocol, error)
        return {**cell, "status": "skipped", "reason": str(error) or type(error).__name__,
                "results": None, "apply_s_median": None, "apply_samples": 0,
                "bytes_per_edit": None}
    measure = measure_apply(
        *model_and_processor, job.spec, data_root, job.task, editor_dir=editor_dir,
        options=options, samples=run.apply_samples,
    )
    logger.info(
        "cell %s: Avg %s; apply %s ms, %s bytes per edit", job.name,
        ", ".join(f"{r.means.get('avg', float('nan')):.2f}" for r in results.runs),
        "-" if measure.median_s is None else f"{1000 * measure.median_s:.3f}",
        "-" if measure.bytes_per_edit is None else measure.bytes_per_edit,
    )
    return jsonable({
        **cell,
        "status": "done",
        "reason": None,
        "results": results_dict(results),
        "apply_s_median": measure.median_s,
        "apply_samples": measure.samples,
        "bytes_per_edit": measure.bytes_per_edit,
    })


def retime_cell(
    cell: dict[str, Any], job: CellJob, run: EvalSettings, source: Source
) -> dict[str, Any]:
    """`cell` (reused from its file) with its apply time and bytes per edit measured again now;
    the scores are kept. A skipped cell stays as it is."""
    if cell["status"] != "done" or run.apply_samples < 1:
        return cell
    editor_dir = (cell.get("trained") or {}).get("path")
    measure = measure_apply(
        *source.model(job.seed, job.backbone), job.spec, source.data_root(job.seed), job.task,
        editor_dir=editor_dir, options=dict(job.eval_options) if editor_dir else job.options,
        samples=run.apply_samples,
    )
    logger.info("cell %s: apply timed again, %.3f ms", job.name, 1000 * measure.median_s)
    return jsonable({
        **cell,
        "apply_s_median": measure.median_s,
        "apply_samples": measure.samples,
        "bytes_per_edit": measure.bytes_per_edit,
    })


def saved_bytes(editor: Editor, directory: Path) -> int:
    """The bytes of `editor` saved (`save_pretrained`) to the new folder `directory`: its
    config, tensors and the method's own files (DualEdit's edit memory, for one)."""
    editor.save_pretrained(directory)
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def measure_apply(
    model: Any,
    processor: Any,
    spec: MethodSpec,
    data_root: str | os.PathLike,
    task: str,
    *,
    editor_dir: str | os.PathLike | None,
    options: dict[str, Any],
    samples: int,
) -> ApplyMeasure:
    """Time `apply` of one edit on each of the first `samples` eval records, apart from scoring,
    and the bytes a saved editor folder grows by with the first of them.

    The editor is opened as `run_eval` opens it (from `editor_dir`, or new of `spec` with
    `options` and the method's train-data fields filled in) and detached at the end. One untimed
    warm-up edit (apply + restore) goes first; every timed edit is restored after it. The bytes
    are those of the folder saved with the first timed edit minus those saved with no edit, so
    they count whatever the method keeps (edited weights, stored keys, the edit's description).

    Example:
        >>> measure_apply(model, processor, get_method("ft-l"), "world", "vqa",
        ...               editor_dir=None, options={}, samples=10).median_s  # doctest: +SKIP
    """
    if samples < 1:
        return ApplyMeasure(None, None, 0)
    dataset = load_split(data_root, task, "eval")
    requests = edit_requests(dataset[:samples], task)
    if not requests:
        raise ValueError(f"{dataset.path}: no records to time an edit on")
    if editor_dir is None:
        options = spec.with_train_data(options, data_root, task)
    editor = open_editor(
        model, processor, method=spec.name, directory=editor_dir, options=options or None
    )
    try:
        with tempfile.TemporaryDirectory(prefix="dualedit-bench-") as folders:
            times, per_edit = _timed_edits(editor, requests, dataset.images, Path(folders))
    finally:
        editor.restore()
        editor.detach()
    return ApplyMeasure(statistics.median(times), per_edit, len(times))


def _timed_edits(
    editor: Editor, requests: list[EditRequest], images: ImageLoader, folders: Path
) -> tuple[list[float], int]:
    """The wall time of each request's `apply` (restored after each), and the bytes the saved
    folder grows by with the first request."""
    cuda = sorted({p.device for p in editor.model.parameters() if p.device.type == "cuda"}, key=str)
    editor.restore()
    empty = saved_bytes(editor, folders / "no-edit")
    editor.apply(requests[:1], images)  # warm-up (lazy setup, caches): not timed
    editor.restore()
    times: list[float] = []
    per_edit = 0
    for i, request in enumerate(requests):
        _synchronize(cuda)
        started = time.perf_counter()
        editor.apply([request], images)
        _synchronize(cuda)
        times.append(time.perf_counter() - started)
        if i == 0:
            per_edit = saved_bytes(editor, folders / "one-edit") - empty
        editor.restore()
    return times, per_edit


def _synchronize(cuda_devices: list[torch.device]) -> None:
    """Wait for the model's CUDA devices (an edit on a GPU returns before its kernels finish)."""
    for device in cuda_devices:
        torch.cuda.synchronize(device)
