"""The second stage of the layer choice: the short sweep's best pairs, trained again at the full
recipe budget, and the one that scores best on the validation edits.

The layer sweep (`layers.py`) trains every variant for a short budget (150 steps) to rank them
cheaply. Its ranking can mislead: a pair that learns fast is not always the pair that ends
highest (on world seed 2's LLaVA, the sweep's first pair (0, 3) reaches 97.0 Avg on the eval
split after 600 steps against 98.1 for (0, 1), its fifth). This stage trains the sweep's `top`
pairs and the `include` pairs (by default the method recipe's, the layers a user gets without
the analysis) with the recipe's training (600 steps, lr 5e-3, batch 8) on the task of the
recommendation, scores each on the validation edits with the gate off, as the sweep does, and
chooses:

- the finalist with the best mean of Rel, T-Gen and V-Gen;
- but an included pair is kept unless another finalist beats it by more than `TIE` points (the
  validation edits are 64: one edit moves a score by 1.6 points; change the recipe's layers
  only on evidence);
- among the rest, ties go by the sweep's rule (`layers.pair_rank`).

The sweep may be of another task (an E-IC recommendation may narrow its pairs with the E-VQA
sweep): the finalists are always trained and scored on `task`. Each finalist trains in
`out/finalists-runs/pair-T-V` (a killed stage resumes) and its scores are kept in
`out/finalists-cells/pair-T-V.json` with their settings. The eval split is never read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dualedit.analysis.figures import pyplot, read_json, save_figure, write_json
from dualedit.analysis.layers import RESULT_FILE as SWEEP_FILE
from dualedit.analysis.layers import TIE, Variant, edit_score, pair_rank, scored_cell
from dualedit.train.settings import TrainSettings

logger = logging.getLogger(__name__)

RESULT_FILE = "finalists.json"
#: How many of the sweep's best pairs go on by default.
TOP = 2


def finalist_pairs(
    sweep: dict[str, Any], top: int, include: Sequence[tuple[int, int]] = ()
) -> list[dict[str, Any]]:
    """The sweep's `top` best pairs (by `pair_rank`), then the `include` pairs not among them:
    [{"text_layer", "visual_layer", "sweep_rank" (1-based, None if not swept), "sweep_score",
    "included"}].

    Raises:
        ValueError: `top` below 0, nothing to train, a sweep without scored pairs while `top`
            asks for some, or an included pair out of order or range.
    """
    if top < 0:
        raise ValueError(f"top: a count of the sweep's best pairs, got {top}")
    depth = sweep.get("depth")
    pairs = [r for r in sweep.get("variants", []) if r.get("kind") == "pair" and r.get("scores")]
    if top and not pairs:
        raise ValueError("the layer sweep has no scored pairs; run `dualedit analyze layers` "
                         "with --sweeps pairs first")
    ranked = sorted(pairs, key=pair_rank, reverse=True)
    rank_of = {(r["text_layer"], r["visual_layer"]): (i + 1, edit_score(r))
               for i, r in enumerate(ranked)}
    chosen: list[dict[str, Any]] = []
    for row in ranked[:top]:
        key = (row["text_layer"], row["visual_layer"])
        chosen.append(_finalist(key, rank_of, included=False))
    for t, v in include:
        t, v = int(t), int(v)
        if not 0 <= t <= v or (isinstance(depth, int) and v >= depth):
            raise ValueError(f"include: a pair (text layer, visual layer) with text <= visual "
                             f"below the depth {depth}, got ({t}, {v})")
        same = [f for f in chosen if (f["text_layer"], f["visual_layer"]) == (t, v)]
        if same:
            same[0]["included"] = True
        else:
            chosen.append(_finalist((t, v), rank_of, included=True))
    if not chosen:
        raise ValueError("no finalists: give top >= 1 or an included pair")
    return chosen


def _finalist(key, rank_of, *, included: bool) -> dict[str, Any]:
    rank, score = rank_of.get(key, (None, None))
    return {"text_layer": key[0], "visual_layer": key[1], "sweep_rank": rank,
            "sweep_score": score, "included": included}


def choose_finalist(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The chosen scored finalist and the reason (the rule in the module's docstring)."""
    if not rows:
        raise ValueError("no scored finalists to choose from")
    best = max(rows, key=lambda r: (edit_score(r), pair_rank(r)))
    kept = [r for r in rows if r["included"] and edit_score(best) - edit_score(r) <= TIE]
    if kept:
        keep = max(kept, key=lambda r: (edit_score(r), pair_rank(r)))
        if keep is best:
            return keep, (f"the best finalist ({edit_score(keep):.1f}), an included pair")
        return keep, (f"an included pair ({edit_score(keep):.1f}) within {TIE:g} point of the "
                      f"best finalist ({best['variant']}, {edit_score(best):.1f})")
    top = max(rows, key=pair_rank)
    return top, (f"the best of {len(rows)} finalists ({edit_score(top):.1f}); the included "
                 f"pairs score more than {TIE:g} point lower")


def run_finalists(
    model: Any,
    processor: Any,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    sweep: str | os.PathLike | None = None,
    task: str = "vqa",
    top: int = TOP,
    include: Sequence[tuple[int, int]] | None = None,
    settings: TrainSettings | None = None,
    options: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and score the finalists; write `finalists.json` and `finalists.png` under `out_dir`.

    Args:
        model, processor: the frozen VLM (its weights are never changed).
        data_root: the MMEdit folder (its train split trains; its validation edits score).
        sweep: the folder (or file) of the layer sweep's `layers.json` (default `out_dir`).
        task: the task the finalists train and score on.
        top: how many of the sweep's best pairs. include: pairs trained besides them (default
            the method recipe's layers, where it names both and they fit the model).
        settings: the finalists' training (default the method recipe's).
        options: DualEdit config fields every finalist shares. limit: first N validation edits.

    Returns:
        The JSON's content: settings, the finalists with their short-sweep rank and scores, the
        chosen pair and why.
    """
    from dualedit.backbones import get_backbone
    from dualedit.data.mmedit import load_split
    from dualedit.editors.registry import get_method

    spec = get_method("dualedit")
    out = Path(out_dir)
    sweep_path = Path(sweep) if sweep is not None else out
    if sweep_path.is_dir():
        sweep_path = sweep_path / SWEEP_FILE
    swept = read_json(sweep_path, what="layer sweep")
    depth = get_backbone(model).depth(model)
    if swept.get("depth") not in (None, depth):
        raise ValueError(f"{sweep_path}: a sweep of a model with {swept.get('depth')} decoder "
                         f"layers, this model has {depth}")
    if include is None:
        recipe = spec.recipe.options
        pair = (recipe.get("text_layer"), recipe.get("visual_layer"))
        include = [pair] if None not in pair and 0 <= pair[0] <= pair[1] < depth else []
    settings = settings or spec.recipe.train or TrainSettings()
    candidates = finalist_pairs(swept, top, include)
    train_split = load_split(data_root, task, "train")
    rows, started = [], time.perf_counter()
    for candidate in tqdm(candidates, desc=f"finalists ({task})", disable=not progress,
                          unit="pair"):
        t, v = candidate["text_layer"], candidate["visual_layer"]
        cell = scored_cell(spec, model, processor, train_split, Variant(f"pair-{t}-{v}", "pair",
                           t, v), out, "finalists", task=task, settings=settings,
                           options=options, limit=limit, progress=progress, source=source)
        rows.append({**cell, **candidate})
    chosen, reason = choose_finalist(rows)
    result = {
        "analysis": "finalists",
        "source": source or {},
        "task": task,
        "depth": depth,
        "sweep": str(sweep_path),
        "sweep_task": swept.get("task"),
        "sweep_settings": swept.get("train_settings"),
        "train_settings": dataclasses.asdict(settings),
        "top": top,
        "include": [list(map(int, p)) for p in include],
        "options": options or {},
        "limit": limit,
        "split": "val",
        "gate": False,
        "seconds": time.perf_counter() - started,
        "finalists": rows,
        "chosen": {"text_layer": chosen["text_layer"], "visual_layer": chosen["visual_layer"],
                   "variant": chosen["variant"], "editor": chosen.get("editor"),
                   "edit_score": edit_score(chosen), "reason": reason},
    }
    write_json(out / RESULT_FILE, result)
    plot_finalists(result, out)
    return result


def plot_finalists(result: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """`finalists.png`: each finalist's short-sweep score beside its full-budget score."""
    import numpy as np

    plt = pyplot()
    rows = result["finalists"]
    labels = [f"({r['text_layer']}, {r['visual_layer']})" + ("*" if r["included"] else "")
              for r in rows]
    x = np.arange(len(rows))
    short = [r["sweep_score"] if r["sweep_score"] is not None else np.nan for r in rows]
    full = [edit_score(r) for r in rows]
    steps = result["train_settings"]["max_steps"]
    short_steps = (result.get("sweep_settings") or {}).get("max_steps", "?")
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 3, 3.8))
    ax.bar(x - 0.2, short, width=0.4, color="tab:gray",
           label=f"sweep, {short_steps} steps ({result.get('sweep_task')})")
    chosen = (result["chosen"]["text_layer"], result["chosen"]["visual_layer"])
    ax.bar(x + 0.2, full, width=0.4, label=f"finalist, {steps} steps ({result['task']})",
           color=["tab:red" if (r["text_layer"], r["visual_layer"]) == chosen else "tab:blue"
                  for r in rows])
    ax.set_xticks(x, labels)
    ax.set_xlabel("(text layer, visual layer); * included pair")
    ax.set_ylabel("mean Rel/T-Gen/V-Gen (validation, no gate)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"finalists: chosen {chosen}")
    return save_figure(fig, Path(out_dir) / "finalists.png")
