"""The main job on the built-in world: world -> small VLMs -> evaluation of every method -> table.

Everything expensive is cached under `cache_dir` (the world per seed, each pretrained model per
arch and seed, each trained method's run per arch and dataset), so a second run only evaluates.
Methods are looked up in the registry; a trained method is trained with its small-model recipe
(`MethodSpec.recipe`) before it is evaluated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from dualedit.editors.registry import METHODS, get_method
from dualedit.editors.spec import MethodSpec
from dualedit.eval.report import markdown_table, results_dict
from dualedit.evaluate import load_vlm, run_eval
from dualedit.io import atomic_write_text
from dualedit.jsondata import jsonable
from dualedit.numerics import cpu_threads
from dualedit.small_vlm.pretrain import pretrain
from dualedit.train import CheckpointMismatch, TrainResult, TrainSettings
from dualedit.world import WORLD_FILE, build_world, load_world

logger = logging.getLogger(__name__)

ARCHS = ("llava", "blip2")
#: What `dualedit demo` evaluates by default (a trained method is first trained per backbone and
#: dataset, cached and resumed like the models).
DEFAULT_METHODS = ("none", "ft-l", "dualedit")
TASKS = ("vqa", "caption")
#: The method name that stands for every registered method (`--methods all`).
ALL_METHODS = "all"


def method_names(names: Sequence[str] | None, default: Sequence[str] = DEFAULT_METHODS) -> list[str]:
    """The methods to run: `names` (`"all"` among them: every registered method, in registry
    order), or `default` when none are given; each once, in the order given.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).

    Example:
        >>> method_names(["ft-l", "none", "ft-l"])
        ['ft-l', 'none']
    """
    chosen: list[str] = []
    for name in names or default:
        expanded = list(METHODS) if name == ALL_METHODS else [name]
        for method in expanded:
            if method not in METHODS:
                raise ValueError(
                    f"unknown method {method!r}; available: {', '.join(METHODS)} "
                    f"(or {ALL_METHODS!r} for every one)"
                )
            if method not in chosen:
                chosen.append(method)
    return chosen


def default_cache_dir() -> Path:
    """`$DUALEDIT_CACHE`, else `~/.cache/dualedit`."""
    return Path(os.environ.get("DUALEDIT_CACHE", Path.home() / ".cache" / "dualedit"))


def cached_world(
    cache_dir: Path, seed: int, progress: bool = True, world_options: dict | None = None
) -> Path:
    """The world for `seed` (default size unless `world_options`), built once under `cache_dir`.

    A cache folder holds one world per seed: give a cache of its own to other world options. A
    world written by another format version of the library is drawn again (in place, atomically).
    """
    world_dir = cache_dir / f"world-seed{seed}"
    if (world_dir / WORLD_FILE).is_file():
        try:
            load_world(world_dir)
        except ValueError as error:
            logger.warning("drawing the world again: %s", error)
        else:
            logger.info("reusing the world in %s", world_dir)
            return world_dir
    logger.info("drawing the world into %s", world_dir)
    return build_world(world_dir, seed=seed, progress=progress, **(world_options or {}))


def cached_training(
    cache_dir: Path,
    spec: MethodSpec,
    arch: str,
    task: str,
    seed: int,
    world_dir: Path,
    model_and_processor: tuple,
    progress: bool = True,
    settings: TrainSettings | None = None,
    options: dict[str, Any] | None = None,
    variant: str | None = None,
) -> TrainResult:
    """A trained method's run for (arch, task) on the world's train split, cached under
    `cache_dir/trained/<method>/<arch>-<task>-seed<seed>[-<variant>]`, with the method's recipe
    (or the given `settings` / config `options`, e.g. an ablation's, named by `variant`); the
    seed is the demo's.

    A killed run in the cache resumes from its checkpoint; a finished one trains no step (its
    finishing step, such as DualEdit's gate fit and tau calibration, is reused from its record,
    `train.best.FINISH_FILE`), or trains on when `settings` has a larger step budget than it
    ran. A cached run of another recipe or over other base weights (`CheckpointMismatch`) is
    trained again in place, as a stale world is drawn again. The result's `best_dir` holds the
    best editor by validation.
    """
    from dualedit.data.mmedit import load_split

    if spec.train is None or (spec.recipe.train is None and settings is None):
        raise ValueError(f"method {spec.name!r} has no training recipe")
    model, processor = model_and_processor
    run_name = f"{arch}-{task}-seed{seed}" + (f"-{variant}" if variant else "")
    out_dir = cache_dir / "trained" / spec.name / run_name
    train = functools.partial(
        spec.train,
        model,
        processor,
        load_split(world_dir, task, "train"),
        config=dict(spec.recipe.options if options is None else options),
        settings=dataclasses.replace(settings or spec.recipe.train, seed=seed),
        out_dir=out_dir,
        progress=progress,
    )
    try:
        return train()
    except CheckpointMismatch as error:
        logger.warning("training %s again: %s", spec.name, error)
        return train(resume=False)


def run_demo(
    out_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    limit: int | None = None,
    methods: Sequence[str] | None = None,
    archs: Sequence[str] = ARCHS,
    progress: bool = True,
    world_options: dict | None = None,
    pretrain_options: dict | None = None,
    threads: int | None = None,
    train_settings: TrainSettings | None = None,
    train_steps: int | None = None,
) -> str:
    """Run the demo and return its Markdown table.

    Writes `out_dir/results.json` (every run, plus each model's pretraining metrics) and
    `out_dir/table.md`. `methods`: registered names, `"all"` for every registered method
    (default: `DEFAULT_METHODS`, the fast subset). `world_options` (for `build_world`) and
    `pretrain_options` (`size`, `settings` for `pretrain`) shrink the demo for tests; the
    defaults are the real demo.
    `train_settings`: the training of every trained method (default: each method's recipe,
    `MethodSpec.recipe.train`); `train_steps` replaces its step budget. The summary records, per
    trained method, backbone and dataset, the run behind the rows (steps, best step, the
    finishing step's summary).
    `threads` sets torch's CPU threads for the whole run, pretraining included (restored after;
    None: torch's own and the pretraining settings').
    """
    if threads is not None:
        pretrain_options = {**(pretrain_options or {}), "threads": threads}
    with cpu_threads(threads):
        return _run_demo(out_dir, cache_dir, seed, limit, methods, archs, progress, world_options,
                         pretrain_options, train_settings, train_steps)


def _run_demo(
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None,
    seed: int,
    limit: int | None,
    methods: Sequence[str] | None,
    archs: Sequence[str],
    progress: bool,
    world_options: dict | None,
    pretrain_options: dict | None,
    train_settings: TrainSettings | None,
    train_steps: int | None,
) -> str:
    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    specs = [get_method(m) for m in method_names(methods)]  # unknown names fail before any work
    world_dir = cached_world(cache, seed, progress, world_options)
    all_results, pretraining, trained_runs = [], {}, {}
    for arch in archs:
        model_dir = cache / "models" / f"{arch}-seed{seed}"
        pretraining[arch] = pretrain(
            world_dir, arch, model_dir, seed=seed, progress=progress, **(pretrain_options or {})
        )
        model_and_processor = load_vlm(model_dir)
        for task in TASKS:
            for spec in specs:
                editor_dir, options = None, dict(spec.recipe.options)
                if spec.trainable:
                    settings = train_settings or spec.recipe.train
                    if train_steps is not None:
                        settings = dataclasses.replace(settings, max_steps=train_steps)
                    trained = cached_training(
                        cache, spec, arch, task, seed, world_dir, model_and_processor, progress,
                        settings,
                    )
                    trained_runs[f"{spec.name} {arch}-{task}"] = {
                        "path": str(trained.best_dir),
                        "steps": trained.steps,
                        "best_step": trained.best_step,
                        "best_validation_score": trained.best_score,
                        "finish": jsonable(trained.finish),
                    }
                    editor_dir, options = trained.best_dir, {}
                logger.info("evaluating %s on %s %s", spec.name, arch, task)
                all_results.append(
                    run_eval(
                        model_and_processor=model_and_processor,
                        data_root=world_dir,
                        task=task,
                        split="eval",
                        method=spec.name,
                        editor_dir=editor_dir,
                        editor_options=options or None,
                        limit=limit,
                        progress=progress,
                    )
                )
    table = markdown_table(all_results)
    summary = {
        "world": str(world_dir),
        "seed": seed,
        "pretraining": pretraining,
        "trained": trained_runs,
        "runs": [results_dict(r) for r in all_results],
    }
    atomic_write_text(out_dir / "results.json", json.dumps(summary, indent=2, sort_keys=True))
    atomic_write_text(out_dir / "table.md", table + "\n")
    return table
