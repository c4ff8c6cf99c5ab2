"""`dualedit bench quality`: every method x backbone x dataset (x world seed) -> one table.

On the built-in world each seed has its own world and its own pretrained small LLaVA and BLIP-2
(cached like the demo's, `demo.cached_world` and `pretrain`); a trained method is trained per
backbone, dataset and seed with its small-model recipe (`demo.cached_training`: cached and
resumable). With a model folder and an MMEdit folder instead, that one model is benchmarked on
that data, and a trained method is trained on the data's train split as `dualedit train` would
(its config defaults, `TrainSettings()`), cached under a key of the two folders.

Each finished cell is written at once to `out_dir/cells/seed{S}/...json` (see `cells.py`), so a
killed bench resumes where it stopped; at the end `out_dir/results.json` and `out_dir/table.md`
(and, under the sequential protocol, the metrics against N: `sequential_curves.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dualedit.bench.cells import (
    CellJob,
    EvalSettings,
    cell_path,
    cell_settings,
    jsonable,
    read_cell,
    retime_cell,
    run_cell,
    write_cell,
)
from dualedit.bench.table import REFERENCE_METHOD, bench_rows, bench_table
from dualedit.data.mmedit import split_path
from dualedit.demo import ARCHS, TASKS, cached_world, default_cache_dir, method_names
from dualedit.editors.registry import METHODS, get_method
from dualedit.editors.spec import MethodSpec
from dualedit.eval.protocols import PROTOCOLS
from dualedit.eval.sequential_curves import write_sequential_curves
from dualedit.evaluate import load_vlm
from dualedit.io import atomic_write_text
from dualedit.numerics import cpu_threads
from dualedit.small_vlm.pretrain import pretrain
from dualedit.train import TrainSettings
from dualedit.version import versions

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"


class WorldSource:
    """The built-in world: per seed its own world and small pretrained models, under `cache`
    (the demo's cache layout, so the demo's worlds, models and trained runs are reused)."""

    def __init__(
        self,
        cache: Path,
        archs: Sequence[str],
        *,
        progress: bool,
        world_options: dict | None,
        pretrain_options: dict | None,
        threads: int | None,
    ):
        self.cache = cache
        self.backbones = tuple(archs)
        self.progress = progress
        self.world_options = dict(world_options or {})
        self.pretrain_options = dict(pretrain_options or {})
        self.threads = threads
        self._worlds: dict[int, Path] = {}
        self._loaded: tuple[tuple[int, str], tuple[Any, Any]] | None = None

    def data_root(self, seed: int) -> Path:
        if seed not in self._worlds:
            self._worlds[seed] = cached_world(self.cache, seed, self.progress, self.world_options)
        return self._worlds[seed]

    def model(self, seed: int, backbone: str) -> tuple[Any, Any]:
        """The pretrained model (pretrained now where the cache lacks it); one held at a time."""
        if self._loaded is None or self._loaded[0] != (seed, backbone):
            self._loaded = None  # let the previous model go before the next one loads
            model_dir = self.cache / "models" / f"{backbone}-seed{seed}"
            extra = {} if self.threads is None else {"threads": self.threads}
            pretrain(self.data_root(seed), backbone, model_dir, seed=seed,
                     progress=self.progress, **self.pretrain_options, **extra)
            self._loaded = ((seed, backbone), load_vlm(model_dir))
        return self._loaded[1]

    def train_key(self, backbone: str) -> str:
        return backbone  # the demo's: its trained runs serve the bench

    def options(self, spec: MethodSpec) -> dict[str, Any]:
        """The method's small-model recipe options."""
        return dict(spec.recipe.options)

    def train_settings(self, spec: MethodSpec) -> TrainSettings:
        """The method's small-model recipe training (`TrainSettings()` where it has none)."""
        return spec.recipe.train or TrainSettings()

    def describe(self) -> dict[str, Any]:
        return {"kind": "world", "world_options": self.world_options,
                "pretrain_options": self.pretrain_options}


class FolderSource:
    """One model folder and one MMEdit folder, the same for every seed (a seed then changes only
    how a trained method is trained)."""

    def __init__(self, model: Path, data: Path):
        self.model_dir = model.resolve()
        self.data = data.resolve()
        name = self.model_dir.name or "model"
        self.backbones = (name,)
        digest = hashlib.sha256(f"{self.model_dir}\n{self.data}".encode()).hexdigest()[:8]
        self._train_key = f"{name}-{digest}"
        self._loaded: tuple[Any, Any] | None = None

    def data_root(self, seed: int) -> Path:
        return self.data

    def model(self, seed: int, backbone: str) -> tuple[Any, Any]:
        if self._loaded is None:
            self._loaded = load_vlm(self.model_dir)
        return self._loaded

    def train_key(self, backbone: str) -> str:
        return self._train_key  # a run per model and data folder

    def options(self, spec: MethodSpec) -> dict[str, Any]:
        """None: the method's config defaults (resolved from the model), not the small models'."""
        return {}

    def train_settings(self, spec: MethodSpec) -> TrainSettings:
        """As `dualedit train` without flags."""
        return TrainSettings()

    def describe(self) -> dict[str, Any]:
        return {"kind": "folders", "model": str(self.model_dir), "data": str(self.data)}

    def check(self, specs: Sequence[MethodSpec], datasets: Sequence[str]) -> None:
        """Refuse, before any work, a model folder without a config, or data that lacks an eval
        split, or the train split a trained method is trained on."""
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}: not a model folder (no config.json)")
        trained = [spec.name for spec in specs if spec.trainable]
        needed = {"eval": "the evaluation"}
        if trained:
            needed["train"] = f"training {', '.join(trained)}"
        for task in datasets:
            for split, why in needed.items():
                path = split_path(self.data, task, split)
                if not path.is_file():
                    raise FileNotFoundError(f"{path} not found ({why} on {task} needs it)")


def run_quality_bench(
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    backbones: Sequence[str] | None = None,
    datasets: Sequence[str] = TASKS,
    protocol: str = "single",
    n_values: Sequence[int] = (1, 10, 100),
    seeds: Sequence[int] = (0,),
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    apply_samples: int = 10,
    progress: bool = True,
    threads: int | None = None,
    world_options: dict | None = None,
    pretrain_options: dict | None = None,
    train_steps: int | None = None,
    train_settings: TrainSettings | None = None,
    retime: bool = False,
) -> str:
    """Benchmark methods x backbones x datasets (x seeds); write results.json and table.md.

    Args:
        out_dir: gets `results.json`, `table.md` and `cells/` (one file per finished cell, reused
            on a rerun with the same settings, redone with others); under the sequential
            protocol also `sequential_{metric}.png` (`sequential.png` for one method).
        methods: registered names, "all" among them for every one; None: every registered one.
        backbones: among "llava", "blip2" (None: both); not with `model`.
        datasets: "vqa" (E-VQA) and/or "caption" (E-IC).
        protocol: "single" or "sequential" (with `n_values`; a method whose editor cannot hold
            many edits, raising NotImplementedError, is recorded as skipped).
        seeds: world seeds; each has its own world and pretrained models (with `model`: the same
            model and data, only a trained method's training seed changes). Several seeds give
            "mean ± sample std" per cell.
        limit: score only the first `limit` eval records.
        cache_dir: worlds, models and trained runs (default `default_cache_dir()`).
        model, data: a VLM folder and an MMEdit folder to benchmark instead of the built-in
            world (give both). A trained method is then trained on `data`'s train split with
            its config defaults and `TrainSettings()`, as `dualedit train` does.
        apply_samples: eval records on which one edit's `apply` is timed (0: not measured).
        progress: tqdm bars. threads: torch CPU threads for the whole bench (None: torch's).
        world_options, pretrain_options: for `build_world` and `pretrain` (tests shrink them).
        train_steps: replaces the step budget of every trained method's training.
        train_settings: the training of every trained method (default: each one's recipe).
        retime: measure apply time and bytes again for the cells reused from their files (their
            scores are kept), so every cell's timing, and the ratios to DualEdit's, come from
            this run.

    Returns:
        The Markdown table (also in `table.md`).

    Raises:
        ValueError: an unknown method, backbone, dataset or protocol, or bad numbers, before
            any work. FileNotFoundError: `model` / `data` lack what the bench needs.

    Example:
        >>> table = run_quality_bench("runs/bench", methods=["none", "ft-l"], datasets=["vqa"])
    """
    specs = [get_method(name) for name in method_names(methods, default=tuple(METHODS))]
    datasets = [_choice("dataset", task, TASKS) for task in datasets]
    if not datasets or len(set(datasets)) != len(datasets):
        raise ValueError(f"datasets: give each of {list(TASKS)} at most once, got {datasets}")
    run = EvalSettings(
        protocol=_choice("protocol", protocol, tuple(PROTOCOLS)),
        n_values=tuple(_positive_ints("n_values", n_values)),
        limit=None if limit is None else _positive_ints("limit", [limit])[0],
        apply_samples=_count("apply_samples", apply_samples),
        cache=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        progress=progress,
        retime=bool(retime),
    )
    seeds = _seeds(seeds)
    if train_steps is not None:
        _positive_ints("train_steps", [train_steps])
    source = _source(backbones, run.cache, model, data, progress, world_options,
                     pretrain_options, threads, specs, datasets)
    with cpu_threads(threads):
        cells = _run_cells(Path(out_dir), source, specs, datasets, seeds, run, train_steps,
                           train_settings)
    names = [spec.name for spec in specs]
    rows = bench_rows(cells, methods=names, backbones=source.backbones, datasets=datasets)
    table = bench_table(rows, seeds=seeds, protocol=run.protocol,
                        reference_column=REFERENCE_METHOD in names)
    summary = {
        "settings": jsonable({
            "methods": names,
            "backbones": source.backbones,
            "datasets": datasets,
            "protocol": run.protocol,
            "n_values": run.n_values if run.protocol == "sequential" else None,
            "seeds": seeds,
            "limit": run.limit,
            "apply_samples": run.apply_samples,
            "train_steps": train_steps,
            "train_settings": train_settings,
            "cache": run.cache,
            "source": source.describe(),
            "versions": versions(),
        }),
        "cells": cells,
        "rows": rows,
    }
    out = Path(out_dir)
    text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(out / RESULTS_FILE, text + "\n")
    atomic_write_text(out / TABLE_FILE, table)
    if run.protocol == "sequential":
        write_sequential_curves(summary, out)  # sequential*.png, logged
    return table


def _run_cells(
    out_dir: Path,
    source: WorldSource | FolderSource,
    specs: Sequence[MethodSpec],
    datasets: Sequence[str],
    seeds: Sequence[int],
    run: EvalSettings,
    train_steps: int | None,
    train_settings: TrainSettings | None,
) -> list[dict[str, Any]]:
    """Every cell, reused from its file or run (seed, backbone, dataset, method: each model is
    loaded once), in that order."""
    jobs = [
        _job(source, spec, seed, backbone, task, train_steps, train_settings)
        for seed in seeds
        for backbone in source.backbones
        for task in datasets
        for spec in specs
    ]
    described = source.describe()
    cells = []
    with tqdm(total=len(jobs), desc="bench quality", unit="cell", disable=not run.progress) as bar:
        for job in jobs:
            bar.set_postfix_str(job.name)
            path = cell_path(out_dir, job, run.protocol)
            settings = cell_settings(job, run, described)
            cell = read_cell(path, settings)
            if cell is None:
                logger.info("cell %s: running", job.name)
                cell = run_cell(job, run, source, settings)
                write_cell(path, cell)
            elif run.retime:
                cell = retime_cell(cell, job, run, source)
                write_cell(path, cell)
            else:
                logger.info("cell %s: reused from %s", job.name, path)
            cells.append(cell)
            bar.update(1)
    return cells


def _job(
    source: WorldSource | FolderSource,
    spec: MethodSpec,
    seed: int,
    backbone: str,
    task: str,
    train_steps: int | None,
    train_settings: TrainSettings | None,
) -> CellJob:
    settings = None
    if spec.trainable:
        settings = train_settings or source.train_settings(spec)
        if train_steps is not None:
            settings = dataclasses.replace(settings, max_steps=train_steps)
        settings = dataclasses.replace(settings, seed=seed)  # as `cached_training` runs it
    return CellJob(seed, spec, backbone, task, source.options(spec), settings)


def _source(
    backbones: Sequence[str] | None,
    cache: Path,
    model: str | os.PathLike | None,
    data: str | os.PathLike | None,
    progress: bool,
    world_options: dict | None,
    pretrain_options: dict | None,
    threads: int | None,
    specs: Sequence[MethodSpec],
    datasets: Sequence[str],
) -> WorldSource | FolderSource:
    if (model is None) != (data is None):
        raise ValueError("give both a model folder and an MMEdit data folder, or neither")
    if model is None:
        archs = [_choice("backbone", arch, ARCHS) for arch in (ARCHS if backbones is None
                                                               else backbones)]
        if not archs or len(set(archs)) != len(archs):
            raise ValueError(f"backbones: give each of {list(ARCHS)} at most once, got {archs}")
        return WorldSource(cache, archs, progress=progress, world_options=world_options,
                           pretrain_options=pretrain_options, threads=threads)
    given = {"backbones": backbones, "world_options": world_options,
             "pretrain_options": pretrain_options}
    clash = sorted(name for name, value in given.items() if value is not None)
    if clash:
        raise ValueError(f"{', '.join(clash)}: for the built-in world's models only, not with "
                         "a model folder")
    source = FolderSource(Path(model), Path(data))
    source.check(specs, datasets)
    return source


def _choice(what: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose among {list(choices)}")
    return value


def _positive_ints(what: str, values: Sequence[int]) -> list[int]:
    values = list(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad or not values:
        raise ValueError(f"{what}: positive ints expected, got {values!r}")
    return values


def _count(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}: an int >= 0 expected, got {value!r}")
    return value


def _seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(_count("seed", s) != s for s in seeds):
        raise ValueError(f"seeds: distinct ints >= 0 expected, got {seeds!r}")
    return seeds
