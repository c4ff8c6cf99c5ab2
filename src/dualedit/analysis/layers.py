"""The layer sweep (the paper's Table 1 and Figure 5): which decoder layers DualEdit should edit.

Every variant is a DualEdit training through the shared loop (`train_dualedit`, the registry's
trainer) on the train split, then the harness (`evaluate`) on the validation edits that the
training held out, with the gate off (the sweep measures what an adapter can do at a layer, not
the gate):

- "text-L": the text adapter alone at layer L (Table 1, text rows);
- "visual-L": the visual adapter alone at layer L (Table 1, visual rows);
- "pair-T-V": both adapters, text at T, visual at V (T <= V, which DualEdit requires: the
  visual adapter reads the edit chosen at the text layer), for the heat map of Figure 5.

Each variant trains in `out/layers-runs/<variant>` (a killed sweep resumes its unfinished
training; a finished one trains no step) and its scores are kept in `out/layers-cells/
<variant>.json` with the settings that made them (reused on a rerun with the same settings).
The eval split is never read: a recommendation drawn from the sweep leaves it unseen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dualedit.analysis.figures import as_written, pyplot, read_json, save_figure, write_json
from dualedit.train.settings import TrainSettings

logger = logging.getLogger(__name__)

#: The sweep's default training: small enough for the 6-layer models of the built-in world on a
#: 2-core CPU (about a minute a variant), the recipe's rate and batch; validation at the end.
SWEEP_SETTINGS = TrainSettings(lr=5e-3, batch_size=8, max_steps=150, eval_every=150)
#: Which variants `run_layer_sweep` trains.
SWEEPS: tuple[str, ...] = ("text", "visual", "pairs")
METRICS: tuple[str, ...] = ("rel", "t_gen", "v_gen", "t_loc", "m_loc", "avg")
RESULT_FILE = "layers.json"
#: Score points within which two layer pairs count as tied.
TIE = 1.0


@dataclass(frozen=True)
class Variant:
    """One trained variant of the sweep."""

    name: str
    kind: str  # "text", "visual" or "pair"
    text_layer: int
    visual_layer: int

    def options(self) -> dict[str, Any]:
        """DualEdit config fields of this variant (the gate is off in training anyway)."""
        options: dict[str, Any] = {"text_layer": self.text_layer,
                                   "visual_layer": self.visual_layer}
        if self.kind == "text":
            options["use_visual"] = False
        elif self.kind == "visual":
            options["use_text"] = False
        return options


def sweep_variants(
    depth: int, sweeps: Sequence[str] = SWEEPS, layers: Sequence[int] | None = None
) -> list[Variant]:
    """The variants over `layers` (default all `depth`): single-adapter rows, then pairs T <= V."""
    bad = [s for s in sweeps if s not in SWEEPS]
    if bad or not sweeps:
        raise ValueError(f"sweeps: expected some of {SWEEPS}, got {list(sweeps)}")
    layers = list(range(depth)) if layers is None else sorted(set(layers))
    out_of_range = [layer for layer in layers if not 0 <= layer < depth]
    if out_of_range or not layers:
        raise ValueError(f"layers: 0-based decoder layers below {depth}, got {out_of_range or []}")
    variants = []
    if "text" in sweeps:
        variants += [Variant(f"text-{layer}", "text", layer, layer) for layer in layers]
    if "visual" in sweeps:
        variants += [Variant(f"visual-{layer}", "visual", layer, layer) for layer in layers]
    if "pairs" in sweeps:
        variants += [Variant(f"pair-{t}-{v}", "pair", t, v) for t in layers for v in layers
                     if t <= v]
    return variants


def run_layer_sweep(
    model: Any,
    processor: Any,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    task: str = "vqa",
    sweeps: Sequence[str] = SWEEPS,
    layers: Sequence[int] | None = None,
    settings: TrainSettings | None = None,
    options: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and score every variant; write `layers.json`, `layers_table1.png` and
    `layers_heatmap.png` (when pairs were swept) under `out_dir`.

    Args:
        model, processor: the frozen VLM (its weights are never changed).
        data_root: the MMEdit folder (its train split trains; the validation edits that
            `settings.val_edits` holds out of it score).
        task: "vqa" or "caption". sweeps, layers: which variants (`sweep_variants`).
        settings: each variant's training (default `SWEEP_SETTINGS`).
        options: DualEdit config fields every variant shares (e.g. width).
        limit: score only the first `limit` validation edits.
        source: where the model and data came from (for the JSON).

    Returns:
        The JSON's content: settings, and per variant its layers, scores, train seconds.
    """
    from dualedit.backbones import get_backbone
    from dualedit.data.mmedit import load_split
    from dualedit.editors.registry import get_method

    spec = get_method("dualedit")
    settings = settings or SWEEP_SETTINGS
    depth = get_backbone(model).depth(model)
    variants = sweep_variants(depth, sweeps, layers)
    out = Path(out_dir)
    train_split = load_split(data_root, task, "train")
    rows = []
    started = time.perf_counter()
    for variant in tqdm(variants, desc=f"layer sweep ({task})", disable=not progress,
                        unit="variant"):
        rows.append(scored_cell(spec, model, processor, train_split, variant, out, "layers",
                                task=task, settings=settings, options=options, limit=limit,
                                progress=progress, source=source))
    result = {
        "analysis": "layers",
        "source": source or {},
        "task": task,
        "depth": depth,
        "train_settings": dataclasses.asdict(settings),
        "options": options or {},
        "limit": limit,
        "split": "val",
        "gate": False,
        "seconds": time.perf_counter() - started,
        "variants": rows,
    }
    write_json(out / RESULT_FILE, result)
    plot_layers(result, out)
    return result


def scored_cell(spec, model, processor, train_split, variant, out, stage, *, task, settings,
                options, limit, progress, source) -> dict[str, Any]:
    """`variant`'s scores: read from `out/<stage>-cells/<variant>.json` when it was scored with
    the same settings, else trained in `out/<stage>-runs/<variant>`, scored and written there."""
    config = {**(options or {}), **variant.options()}
    cell_settings = {"task": task, "config": config, "limit": limit,
                     "train": dataclasses.asdict(settings), "source": source or {}}
    cell_path = Path(out) / f"{stage}-cells" / f"{variant.name}.json"
    cell = read_cell(cell_path, cell_settings)
    if cell is None:
        cell = train_and_score(spec, model, processor, train_split, variant, config, settings,
                               Path(out) / f"{stage}-runs", limit, progress)
        cell["settings"] = cell_settings
        write_json(cell_path, cell)
    return cell


def train_and_score(spec, model, processor, train_split, variant, config, settings, runs, limit,
                    progress) -> dict[str, Any]:
    """Train `variant` in `runs/<variant name>` (resuming an unfinished run) and score it on the
    validation edits that `settings.val_edits` holds out of `train_split`, with the gate off."""
    from dualedit.editors.registry import open_editor
    from dualedit.eval.harness import evaluate
    from dualedit.train.checkpoint import CheckpointMismatch
    from dualedit.train.log import read_trained_seconds

    run_dir = Path(runs) / variant.name

    def train(resume: bool = True):
        return spec.train(model, processor, train_split, config=config, settings=settings,
                          out_dir=run_dir, resume=resume, progress=progress,
                          calibrate_tau=False)

    try:
        trained = train()
    except CheckpointMismatch as error:
        logger.warning("%s: training again (%s)", variant.name, error)
        trained = train(resume=False)
    if trained.best_dir is None:
        raise ValueError(f"{run_dir}: the training of {variant.name} saved no editor")
    from dualedit.train.data import split_indices

    val = train_split.select(split_indices(len(train_split), settings.val_edits)[1])
    editor = open_editor(model, processor, method=spec.name, directory=trained.best_dir,
                         options={"gate": False})
    try:
        results = evaluate(model, processor, val, editor, limit=limit, generation=False,
                           progress=False)
    finally:
        editor.detach()
    means = results.runs[0].means
    return {
        "variant": variant.name,
        "kind": variant.kind,
        "text_layer": variant.text_layer,
        "visual_layer": variant.visual_layer,
        "scores": {key: means.get(key) for key in METRICS},
        "train_s": read_trained_seconds(run_dir),
        "steps": trained.steps,
        "best_step": trained.best_step,
        "editor": str(trained.best_dir),
    }


def read_cell(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A scored cell written with exactly `settings`, else None (a damaged one is scored again)."""
    if not path.is_file():
        return None
    try:
        cell = read_json(path, what="layer-sweep cell")
    except ValueError as error:
        logger.warning("%s; scoring the variant again", error)
        return None
    if cell.get("settings") != as_written(settings):
        return None
    return cell


def edit_score(row: dict[str, Any]) -> float:
    """A scored variant's mean of Rel, T-Gen and V-Gen (what the adapters can do; locality is the
    gate's job)."""
    scores = row["scores"]
    return (scores["rel"] + scores["t_gen"] + scores["v_gen"]) / 3


def pair_rank(row: dict[str, Any]) -> tuple[float, float, int]:
    """Sort key of scored pairs, best last: edit score on a grid of `TIE` points (scores within
    a point rank alike), then Avg, then the deeper text layer (a longer frozen prefix)."""
    return (TIE * (edit_score(row) // TIE), row["scores"].get("avg") or 0.0, row["text_layer"])


# -- figures --------------------------------------------------------------------------------------


def plot_layers(result: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """`layers_table1.png` (each metric per layer, text-only and visual-only adapters) and
    `layers_heatmap.png` (Rel over (text layer, visual layer) pairs) from a sweep's result."""
    plt = pyplot()
    out, written = Path(out_dir), []
    rows = result["variants"]
    single = {kind: sorted((r for r in rows if r["kind"] == kind), key=_layer_of)
              for kind in ("text", "visual")}
    if single["text"] or single["visual"]:
        names = ["rel", "t_gen", "v_gen", "t_loc", "m_loc"]
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True)
        for ax, metric in zip(axes, names):
            for kind, marker in (("text", "o"), ("visual", "s")):
                if single[kind]:
                    ax.plot([_layer_of(r) for r in single[kind]],
                            [r["scores"][metric] for r in single[kind]], marker=marker,
                            label=f"{kind} adapter only")
            ax.set_title(_METRIC_TITLES[metric])
            ax.set_xlabel("decoder layer")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("score (validation edits, no gate)")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"single-modality edits per layer ({result['task']})")
        written.append(save_figure(fig, out / "layers_table1.png"))
    pairs = [r for r in rows if r["kind"] == "pair"]
    if pairs:
        import numpy as np

        depth = result["depth"]
        grid = np.full((depth, depth), np.nan)
        for r in pairs:
            grid[r["text_layer"], r["visual_layer"]] = r["scores"]["rel"]
        fig, ax = plt.subplots(figsize=(5.2, 4.4))
        image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=100)
        for r in pairs:
            ax.text(r["visual_layer"], r["text_layer"], f"{r['scores']['rel']:.0f}",
                    ha="center", va="center", color="white", fontsize=7)
        ax.set_xlabel("visual adapter layer")
        ax.set_ylabel("text adapter layer")
        ax.set_title(f"Rel of both adapters, no gate ({result['task']})")
        fig.colorbar(image, ax=ax, label="Rel")
        written.append(save_figure(fig, out / "layers_heatmap.png"))
    return written


def _layer_of(row: dict[str, Any]) -> int:
    return row["text_layer"] if row["kind"] == "text" else row["visual_layer"]


_METRIC_TITLES = {"rel": "Rel", "t_gen": "T-Gen", "v_gen": "V-Gen", "t_loc": "T-Loc",
                  "m_loc": "M-Loc", "avg": "Avg"}
