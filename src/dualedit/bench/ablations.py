"""`dualedit bench ablations`: the DualEdit paper's Table 3 on the built-in world's small models.

The paper (BLIP2-OPT, 32 decoder layers) trains DualEdit's adapters at the layer pairs (text,
visual) = (1,2) (2,2) (5,5) (10,10) (30,30) (16,19) without the gate, and text-only, visual-only
and both adapters with the gate. On a model of depth D a paper layer l maps by depth fraction to
round(l * D / 32), capped at D - 1 (`map_layer`; on the 6-layer models (1,2) and (2,2) both become
(0,0) and are trained once). The gate rows use the method's own layers on that model (the
small-model recipe: text 0, visual 1), and a fourth gate row, "both, no gate", shows what the
gate adds to the same adapters.

Each row is a cell of the quality bench (`cells.py`): trained through the demo's cache under a
name of its own (`cached_training(variant=...)`, resumable), evaluated with `run_eval`, written
at once to `out_dir/cells/`, so a killed run resumes; then `results.json` and `table.md`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dualedit.backbones import get_backbone
from dualedit.bench.cells import (
    CellJob,
    EvalSettings,
    cell_path,
    cell_settings,
    jsonable,
    read_cell,
    run_cell,
    write_cell,
)
from dualedit.bench.quality import WorldSource
from dualedit.demo import ARCHS, TASKS, default_cache_dir
from dualedit.editors.registry import get_method
from dualedit.eval.report import DATASET_NAMES
from dualedit.io import atomic_write_text
from dualedit.numerics import cpu_threads
from dualedit.train import TrainSettings
from dualedit.version import versions

RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
#: The paper's layer pairs (text, visual) of Table 3, on its 32-layer BLIP2-OPT.
PAPER_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (2, 2), (5, 5), (10, 10), (30, 30), (16, 19))
PAPER_DEPTH = 32
METHOD = "dualedit"
COLUMNS = (("rel", "Rel"), ("t_gen", "T-Gen"), ("v_gen", "V-Gen"), ("t_loc", "T-Loc"),
           ("m_loc", "M-Loc"), ("avg", "Avg"), ("m_loc_hard", "Hard M-Loc"))


def map_layer(layer: int, depth: int, paper_depth: int = PAPER_DEPTH) -> int:
    """The layer of a `depth`-layer model at the depth fraction of the paper's `layer`."""
    return min(depth - 1, round(layer * depth / paper_depth))


@dataclass(frozen=True)
class Ablation:
    """One row of Table 3.

    Attributes:
        name: the cell's variant name (files); label: the row's text.
        paper: the paper's rows this one stands for.
        train_options: DualEdit config fields of its training (over the recipe's).
        eval_options: config fields when it is evaluated (gate off for the layer rows).
        train_name: the trained run's name (None: the recipe's own run, shared with the
            quality bench).
    """

    name: str
    label: str
    paper: str
    train_options: dict[str, Any] = field(default_factory=dict)
    eval_options: dict[str, Any] = field(default_factory=dict)
    train_name: str | None = None


def ablations(depth: int, recipe: dict[str, Any]) -> list[Ablation]:
    """Table 3's rows for a model of `depth` layers, the recipe's layers for the gate rows."""
    rows: list[Ablation] = []
    mapped: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for pair in PAPER_PAIRS:
        mapped.setdefault((map_layer(pair[0], depth), map_layer(pair[1], depth)), []).append(pair)
    for (t, v), pairs in mapped.items():
        name = f"pair-{t}-{v}"
        rows.append(Ablation(
            name=name, label=f"layers ({t}, {v}), no gate",
            paper=" ".join(f"({a},{b})" for a, b in pairs),
            train_options={"text_layer": t, "visual_layer": v, "gate": False},
            eval_options={"gate": False}, train_name=name,
        ))
    t, v = recipe.get("text_layer"), recipe.get("visual_layer")
    rows += [
        Ablation("text-only", f"text only ({t}), gate", "text-only, gate",
                 {"use_visual": False}, {}, "text-only"),
        Ablation("visual-only", f"visual only ({v}), gate", "visual-only, gate",
                 {"use_text": False}, {}, "visual-only"),
        Ablation("both", f"both ({t}, {v}), gate", "both, gate (DualEdit)"),
        Ablation("both-nogate", f"both ({t}, {v}), no gate", "-", {}, {"gate": False}),
    ]
    return rows


def run_ablation_bench(
    out_dir: str | os.PathLike,
    *,
    backbones: Sequence[str] | None = None,
    datasets: Sequence[str] = ("vqa",),
    seed: int = 0,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    threads: int | None = None,
    train_steps: int | None = None,
    train_settings: TrainSettings | None = None,
    world_options: dict | None = None,
    pretrain_options: dict | None = None,
) -> str:
    """Train and score every Table 3 row on each backbone and dataset; write `results.json`
    and `table.md` under `out_dir` (cells under `out_dir/cells/`, reused on a rerun).

    Args:
        backbones: among "llava", "blip2" (None: both). datasets: "vqa" and/or "caption".
        seed: the world seed. limit: score only the first `limit` eval records.
        train_steps: replaces the recipe's step budget (every row alike).
        train_settings: every row's training (default: DualEdit's recipe).
        Others as `run_quality_bench`.

    Returns:
        The Markdown table.
    """
    spec = get_method(METHOD)
    archs = list(ARCHS if backbones is None else backbones)
    bad = [a for a in archs if a not in ARCHS] + [t for t in datasets if t not in TASKS]
    if bad or not archs or not datasets:
        raise ValueError(f"unknown or missing backbones / datasets: {bad or 'none given'}")
    run = EvalSettings(
        protocol="single", n_values=(1,), limit=limit, apply_samples=0,
        cache=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        progress=progress,
    )
    source = WorldSource(run.cache, archs, progress=progress, world_options=world_options,
                         pretrain_options=pretrain_options, threads=threads)
    settings = train_settings or source.train_settings(spec)
    if train_steps is not None:
        settings = replace(settings, max_steps=train_steps)
    settings = replace(settings, seed=seed)
    recipe = source.options(spec)
    cells, rows = [], []
    with cpu_threads(threads):
        for arch in archs:
            model, _ = source.model(seed, arch)
            variants = ablations(get_backbone(model).depth(model), recipe)
            for task in datasets:
                for ablation in tqdm(variants, desc=f"ablations {arch} {task}",
                                     disable=not progress):
                    job = CellJob(
                        seed, spec, arch, task, {**recipe, **ablation.train_options}, settings,
                        variant=ablation.name, eval_options=ablation.eval_options,
                        train_variant=ablation.train_name,
                    )
                    cell = _cell(Path(out_dir), job, run, source)
                    cells.append(cell)
                    rows.append(_row(cell, ablation, arch, task))
    table = ablation_table(rows)
    summary = {"settings": jsonable({"backbones": archs, "datasets": list(datasets),
                                     "seed": seed, "limit": limit, "train_settings": settings,
                                     "recipe": recipe, "versions": versions()}),
               "rows": rows, "cells": cells}
    out = Path(out_dir)
    atomic_write_text(out / RESULTS_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / TABLE_FILE, table)
    return table


def _cell(out_dir: Path, job: CellJob, run: EvalSettings, source: WorldSource) -> dict:
    path = cell_path(out_dir, job, run.protocol)
    settings = cell_settings(job, run, source.describe())
    cell = read_cell(path, settings)
    if cell is None:
        cell = run_cell(job, run, source, settings)
        write_cell(path, cell)
    return cell


def _row(cell: dict, ablation: Ablation, arch: str, task: str) -> dict[str, Any]:
    means = cell["results"]["runs"][0]["means"]
    return {"backbone": arch, "dataset": task, "variant": ablation.name,
            "label": ablation.label, "paper": ablation.paper,
            "train_s": cell.get("train_s"), "means": {k: means.get(k) for k, _ in COLUMNS}}


def ablation_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per (dataset, backbone, ablation), Table 3's metrics."""
    header = ["dataset", "backbone", "ablation", "paper row"] + [t for _, t in COLUMNS]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * len(COLUMNS)) + "|"]
    for row in rows:
        values = [row["means"][k] for k, _ in COLUMNS]
        cells = [DATASET_NAMES.get(row["dataset"], row["dataset"]), row["backbone"],
                 row["label"], row["paper"]]
        cells += ["-" if v is None else f"{v:.2f}" for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
