"""Gate separability (the paper's Figure 4): can a cosine gate tell the inputs an edit should
change (its generality queries) from those it should leave alone (its locality queries)?

Every record's edit sample (image, prompt + " " + new target, teacher forced) and its queries run
through the frozen model once, stopping after the last traced layer. At each layer every sample
gets one vector per key kind, and each query is compared with ITS OWN record's edit sample (a
pairwise cosine, not the nearest of a memory):

- "image_mean": the mean state over the image positions. A text-only query (T-Loc) has no
  image, so its cosine against an image edit is undefined; it is counted as 0.
- "text_mean": the mean state over the prompt's text positions, without the BOS "attention sink"
  (whose large state would otherwise dominate every mean and make every cosine near 1).
- the gate's own kinds (`dualedit.editors.dualedit.gate.KIND_PARTS`), built exactly as `decide`
  builds them (`key_parts` on the layer output with the last prompt token, the last non-pad
  position and the attended image positions, then `gate_vectors` and `similarity_rows`):
  "prompt_end" (the last prompt token), "last_position" (the last non-pad position, the released
  code's key: under teacher forcing the last TARGET token, for the edit sample too),
  "prompt_end_image", "prompt_end_and_image", "prompt_end_image_groups".

Per (layer, key) `best_threshold` picks the tau that best separates in-scope (T-Gen, V-Gen) from
out-of-scope (M-Loc, hard M-Loc, T-Loc) similarities; `run_gate` writes gate.json, one histogram
grid per layer (gate_hist_L{layer}.png) and the balanced error per layer (gate_error.png).
With `stored=True` it also scores the nearest-of-many decision of a memory holding every
analysed record's edit at once (stored.py: a "stored" section and gate_stored.png).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dualedit.analysis.figures import pyplot, save_figure, write_json
from dualedit.analysis.inputs import AnalysisData, bos_token_id, prompt_text_mask, sink_mask
from dualedit.analysis.scopes import (
    IN_SCOPE,
    MEAN_KEYS,
    OUT_OF_SCOPE,
    QUERY_KINDS,
    first_run_middle,
    threshold_candidates,
)
from dualedit.analysis.stored import NearestLog, plot_stored
from dualedit.editors.capture import LayerTrace
from dualedit.editors.dualedit.gate import (
    KIND_PARTS,
    gate_vectors,
    key_parts,
    last_positions,
    similarity_rows,
)

logger = logging.getLogger(__name__)

KEYS: tuple[str, ...] = MEAN_KEYS + tuple(KIND_PARTS)

LABELS: dict[str, str] = {
    "t_gen": "T-Gen (rephrased question)",
    "v_gen": "V-Gen (rephrased image)",
    "m_loc": "M-Loc (random)",
    "m_loc_hard": "M-Loc (hard)",
    "t_loc": "T-Loc (text only)",
}
NOTES: dict[str, str] = {
    "similarity": "cosine of each query's key to its own record's edit sample key (pairwise)",
    "accept": "an input is accepted (gate open) when similarity >= tau",
    "balanced_error": "mean of the in-scope rejection rate and the out-of-scope acceptance rate, "
    "each pooled over its kinds",
    "image_mean": "a text-only sample has no image: its cosine against an image edit is "
    "undefined and counted as 0",
    "text_mean": "mean over the prompt's text positions without the BOS attention sink",
    "last_position": "last non-pad position: under teacher forcing the last target token",
}


# -- the threshold ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """The best gate threshold for one set of similarities.

    Attributes:
        tau: accept (open the gate) when similarity >= tau.
        balanced_error: (in_reject + out_accept) / 2 at tau; 0.5 is chance.
        in_reject: fraction of in-scope similarities below tau.
        out_accept: fraction of out-of-scope similarities at or above tau.
        auroc: probability that an in-scope similarity exceeds an out-of-scope one (ties 1/2).
    """

    tau: float
    balanced_error: float
    in_reject: float
    out_accept: float
    auroc: float


def best_threshold(in_scope: Sequence[float], out_scope: Sequence[float]) -> Threshold:
    """The tau minimising the balanced error, searched over the midpoints of the sorted distinct
    observed values plus the extremes (the lowest value: accept all; just above the highest:
    reject all); ties go to the lowest tau.

    Example:
        >>> best_threshold([0.8, 0.9], [0.1, 0.2])
        Threshold(tau=0.5, balanced_error=0.0, in_reject=0.0, out_accept=0.0, auroc=1.0)
    """
    inside = _values(in_scope, "in_scope")
    outside = _values(out_scope, "out_scope")
    candidates = threshold_candidates(np.concatenate([inside, outside]))
    reject = np.searchsorted(inside, candidates, side="left") / inside.size  # in < tau
    accept = 1.0 - np.searchsorted(outside, candidates, side="left") / outside.size  # out >= tau
    error = (reject + accept) / 2
    best = int(np.argmin(error))
    return Threshold(
        tau=float(candidates[best]),
        balanced_error=float(error[best]),
        in_reject=float(reject[best]),
        out_accept=float(accept[best]),
        auroc=auroc(inside, outside),
    )


def kind_threshold(values: dict[str, Sequence[float]]) -> tuple[float, float]:
    """(tau, error) minimising the mean over input kinds of each kind's error rate (T-Gen and
    V-Gen rejected, M-Loc, hard M-Loc and T-Loc accepted), every kind present weighted alike: the
    criterion of DualEdit's own tau calibration (most right decisions over one sample of each
    kind per edit). Ties: the middle of the first run of tied candidates.

    Example:
        >>> kind_threshold({"t_gen": [0.9], "v_gen": [0.8], "m_loc": [0.1], "t_loc": [0.2]})
        (0.5, 0.0)
    """
    present = {k: _values(v, k) for k, v in values.items() if len(v)}
    inside = [k for k in present if k in IN_SCOPE]
    outside = [k for k in present if k in OUT_OF_SCOPE]
    if not inside or not outside:
        raise ValueError("kind_threshold needs in-scope and out-of-scope similarities")
    candidates = threshold_candidates(np.concatenate(list(present.values())))
    errors = []
    for kind, array in present.items():
        below = np.searchsorted(array, candidates, side="left") / array.size  # < tau
        errors.append(below if kind in IN_SCOPE else 1.0 - below)
    error = np.mean(errors, axis=0)
    best = first_run_middle(-error)
    return float(candidates[best]), float(error[best])


def auroc(in_scope: Sequence[float], out_scope: Sequence[float]) -> float:
    """P(in > out) + P(in == out) / 2 over all (in-scope, out-of-scope) pairs."""
    inside = _values(in_scope, "in_scope")
    outside = _values(out_scope, "out_scope")
    below = np.searchsorted(outside, inside, side="left")  # out < each in value
    tied = np.searchsorted(outside, inside, side="right") - below
    return float((below + tied / 2).sum() / (inside.size * outside.size))


def _values(values: Sequence[float], name: str) -> np.ndarray:
    array = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if array.size == 0:
        raise ValueError(f"{name}: no similarities to separate")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: similarities must be finite")
    return array


# -- the analysis ----------------------------------------------------------------------------------


def run_gate(
    data: AnalysisData,
    out_dir: str | os.PathLike,
    *,
    layers: Sequence[int] | None = None,
    keys: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    stored: bool = False,
) -> dict[str, Any]:
    """Gate separability per layer and key kind; writes gate.json and the figures in `out_dir`.

    Args:
        data: the frozen model and records (`analysis_data`).
        out_dir: folder for gate.json, gate_hist_L{layer}.png and gate_error.png (created).
        layers: decoder layers (0-based; default all). keys: key kinds (default `KEYS`).
        batch_size: samples per forward. progress: show a progress bar.
        stored: also score the nearest-of-many decision with every record's edit stored at
            once (stored.py): a "stored" section and gate_stored.png.

    Returns:
        What gate.json holds: {"analysis", "source", "task", "layers", "keys", "in_scope",
        "out_of_scope", "counts", "record_positions", "notes", "per_layer": {layer: {key: {tau,
        balanced_error, reject, accept, auroc, similarity: {kind: [...]}}}}, "best": {layer:
        key}, "overall_best": {layer, key, tau, balanced_error}, "figures"} (and "stored").

    Example:
        >>> result = run_gate(analysis_data(model, processor, dataset, samples=64), "out/gate")
        >>> result["overall_best"]
        {'layer': 14, 'key': 'prompt_end_image', 'tau': 0.83, 'balanced_error': 0.07}
    """
    layers, keys = _check(data, layers, keys)
    similarity, positions, log = _similarities(data, layers, keys, batch_size, progress, stored)
    per_layer = {
        str(layer): {key: _separation(similarity[layer][key]) for key in keys} for layer in layers
    }
    best = {
        layer: min(keys, key=lambda k, table=table: table[k]["balanced_error"])
        for layer, table in per_layer.items()
    }
    top = min(per_layer, key=lambda layer: per_layer[layer][best[layer]]["balanced_error"])
    chosen = per_layer[top][best[top]]
    result: dict[str, Any] = {
        "analysis": "gate",
        "source": data.source,
        "task": data.task,
        "layers": layers,
        "keys": list(keys),
        "in_scope": list(IN_SCOPE),
        "out_of_scope": list(OUT_OF_SCOPE),
        "counts": {kind: len(positions[kind]) for kind in QUERY_KINDS},
        "record_positions": positions,
        "notes": dict(NOTES),
        "per_layer": per_layer,
        "best": best,
        "overall_best": {"layer": int(top), "key": best[top], "tau": chosen["tau"],
                         "balanced_error": chosen["balanced_error"]},
        "figures": [f"gate_hist_L{layer}.png" for layer in layers] + ["gate_error.png"],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for layer in tqdm(layers, desc="gate figures", unit="layer", disable=not progress):
        plot_histograms(result, layer, out / f"gate_hist_L{layer}.png")
    plot_errors(result, out / "gate_error.png")
    if log is not None:
        result["stored"] = log.section(layers, [record.alt for record in data.records],
                                       progress=progress)
        result["figures"].append("gate_stored.png")
        plot_stored(result["stored"], layers, keys, out / "gate_stored.png")
    write_json(out / "gate.json", result)
    logger.info("gate separability: best layer %s key %s (balanced error %.3f) -> %s",
                top, best[top], chosen["balanced_error"], out)
    return result


def _check(
    data: AnalysisData, layers: Sequence[int] | None, keys: Sequence[str] | None
) -> tuple[list[int], tuple[str, ...]]:
    depth = data.depth
    chosen = list(range(depth)) if layers is None else list(layers)
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layers: {layer!r} is not a layer index")
        if not 0 <= layer < depth:
            raise ValueError(
                f"layer {layer} is out of range: the decoder has layers 0..{depth - 1}"
            )
    if not chosen:
        raise ValueError("layers: no layers given")
    kinds = KEYS if keys is None else tuple(keys)
    for key in kinds:
        if key not in KEYS:
            raise ValueError(f"unknown gate analysis key {key!r}; expected one of {KEYS}")
    if not kinds:
        raise ValueError("keys: no key kinds given")
    return sorted({int(layer) for layer in chosen}), tuple(dict.fromkeys(kinds))


def _similarities(
    data: AnalysisData, layers: list[int], keys: tuple[str, ...], batch_size: int,
    progress: bool, stored: bool = False,
) -> tuple[dict[int, dict[str, dict[str, list[float]]]], dict[str, list[int]], Any]:
    """{layer: {key: {query kind: [cosine per sample]}}}, {query kind: [record positions]} and,
    with `stored`, the `stored.NearestLog` of every query's nearest edit (else None)."""
    log = NearestLog(keys) if stored else None
    parts = _parts_of(keys)
    bos = bos_token_id(data.processor)
    kinds = ("edit",) + QUERY_KINDS
    total = sum(_batch_count(data, kind, batch_size) for kind in kinds)
    edit: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    similarity = {layer: {key: {kind: [] for kind in QUERY_KINDS} for key in keys}
                  for layer in layers}
    positions: dict[str, list[int]] = {kind: [] for kind in QUERY_KINDS}
    n = len(data.records)
    with (
        torch.no_grad(),
        LayerTrace(data.model, data.backbone, layers, retain=True, stop=True) as trace,
        tqdm(total=total, desc="gate keys", unit="batch", disable=not progress) as bar,
    ):
        for kind in kinds:  # "edit" first: every query is compared with its record's edit
            for rows, batch in data.batches(kind, batch_size):
                outputs = trace.run(_forward(data, batch))
                index = torch.tensor(rows)
                for layer in layers:
                    feats = sample_features(outputs[layer], batch, parts, bos)
                    if kind == "edit":
                        for part, value in feats.items():
                            store = edit[layer].setdefault(part, value.new_zeros(n, value.shape[1]))
                            store[index] = value
                        continue
                    own = {part: value[index] for part, value in edit[layer].items()}
                    for key in keys:
                        values = key_similarity(key, feats, own)  # [batch]
                        similarity[layer][key][kind].extend(values.tolist())
                    if log is not None:  # every edit is stored by now ("edit" ran first)
                        log.add(layer, kind, feats, edit[layer], rows)
                if kind != "edit":
                    positions[kind].extend(rows)
                bar.update(1)
    return similarity, positions, log


def _forward(data: AnalysisData, batch: Any) -> Any:
    def forward() -> Any:
        return data.backbone.forward_logits(
            data.model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )

    return forward


def _batch_count(data: AnalysisData, kind: str, batch_size: int) -> int:
    items = data.samples(kind)
    with_image = sum(sample.has_image for _, sample in items)
    return -(-with_image // batch_size) - (-(len(items) - with_image) // batch_size)


def _parts_of(keys: Sequence[str]) -> tuple[str, ...]:
    """The features `keys` need: the gate's key parts of its kinds, and the mean keys."""
    parts = [part for key in keys if key in KIND_PARTS for part in KIND_PARTS[key]]
    return tuple(dict.fromkeys(parts + [key for key in keys if key in MEAN_KEYS]))


def sample_features(
    h: torch.Tensor, batch: Any, parts: Sequence[str], bos: int | None
) -> dict[str, torch.Tensor]:
    """One layer's features of a batch: the gate's key parts ("prompt_end", "last_position",
    "image_mean", "image_groups"), read as `decide` reads them, and "text_mean".

    Args:
        h: [batch, seq, hidden] the layer's output. batch: its `EncodedBatch`.
        parts: which features. bos: the BOS id (its sink position is left out of "text_mean").

    Returns:
        {feature: [batch, width] float32 on the CPU}.
    """
    attended = batch.attention_mask.bool()  # [batch, seq]
    gate_parts = tuple(p for p in parts if p != "text_mean")
    out = key_parts(h, batch.prompt_end, last_positions(batch.attention_mask),
                    batch.image_mask & attended, gate_parts)
    if "text_mean" in parts:
        mask = prompt_text_mask(batch, sink_mask(batch, bos)).to(h.device, torch.float32)
        total = torch.einsum("bs,bsh->bh", mask, h.float())  # [batch, hidden]
        out["text_mean"] = total / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return {part: value.detach().float().cpu() for part, value in out.items()}


def key_similarity(
    key: str, queries: dict[str, torch.Tensor], edits: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Similarity of each query row to the edit of the same row under key kind `key`: a plain
    cosine of the means (0 where either is zero: no image), or the gate's own similarity.
    {feature: [batch, width]} x2 -> [batch]."""
    if key in MEAN_KEYS:
        return F.cosine_similarity(queries[key], edits[key], dim=-1)
    query = gate_vectors({p: queries[p] for p in KIND_PARTS[key]}, key)
    stored = gate_vectors({p: edits[p] for p in KIND_PARTS[key]}, key)
    return similarity_rows(query, stored, key)


def _separation(values: dict[str, list[float]]) -> dict[str, Any]:
    """The JSON entry of one (layer, key): best tau, its error and rates, AUROC, the values."""
    inside = [v for kind in IN_SCOPE for v in values[kind]]
    outside = [v for kind in OUT_OF_SCOPE for v in values[kind]]
    best = best_threshold(inside, outside)

    def rate(kind: str, accepted: bool) -> float | None:
        if not values[kind]:
            return None
        array = np.asarray(values[kind])
        return float(np.mean(array >= best.tau if accepted else array < best.tau))

    tau_kinds, kind_error = kind_threshold({kind: values[kind] for kind in QUERY_KINDS})

    return {
        "tau": best.tau,
        "balanced_error": best.balanced_error,
        "tau_kinds": tau_kinds,
        "kind_error": kind_error,
        "in_reject": best.in_reject,
        "out_accept": best.out_accept,
        "reject": {kind: rate(kind, False) for kind in IN_SCOPE},
        "accept": {kind: rate(kind, True) for kind in OUT_OF_SCOPE},
        "auroc": best.auroc,
        "similarity": {kind: list(values[kind]) for kind in QUERY_KINDS},
    }


# -- figures ---------------------------------------------------------------------------------------

_STYLE: dict[str, dict[str, Any]] = {
    "t_gen": {"color": "tab:blue", "histtype": "stepfilled", "alpha": 0.35},
    "v_gen": {"color": "tab:green", "histtype": "stepfilled", "alpha": 0.35},
    "m_loc": {"color": "tab:red", "histtype": "step", "linewidth": 1.6},
    "m_loc_hard": {"color": "tab:purple", "histtype": "step", "linewidth": 1.6},
    "t_loc": {"color": "tab:orange", "histtype": "step", "linewidth": 1.6, "linestyle": "--"},
}


def plot_histograms(result: dict[str, Any], layer: int, path: str | os.PathLike) -> Path:
    """One layer's grid of histograms (a panel per key kind): in-scope vs locality similarities
    to the own edit, with the chosen tau."""
    plt = pyplot()
    keys = result["keys"]
    columns = min(4, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns, 3.5 * rows), squeeze=False)
    table = result["per_layer"][str(layer)]
    for i, (ax, key) in enumerate(zip(axes.flat, keys, strict=False)):
        entry = table[key]
        every = [v for values in entry["similarity"].values() for v in values]
        low, high = min(every), max(every)
        if high - low < 1e-6:
            low, high = low - 0.01, high + 0.01
        bins = np.linspace(low, high, 31)
        for kind in QUERY_KINDS:
            values = entry["similarity"][kind]
            if values:
                ax.hist(values, bins=bins, density=True, label=f"{LABELS[kind]} (n={len(values)})",
                        **_STYLE[kind])
        ax.axvline(entry["tau"], color="black", linestyle=":", linewidth=1.5,
                   label="best tau (accept at or above)")
        ax.set_title(f"{key}: tau {entry['tau']:.3f}\nbalanced error "
                     f"{entry['balanced_error']:.3f}, AUROC {entry['auroc']:.3f}", fontsize=9)
        if i // columns == rows - 1 or i + columns >= len(keys):
            ax.set_xlabel("cosine to the own edit sample")
        if i % columns == 0:
            ax.set_ylabel("density")
        ax.locator_params(nbins=5)
    # One legend for the grid (every panel shows the same kinds), in a spare cell if any.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(keys):]
    for ax in spare:
        ax.axis("off")
    if spare:
        spare[0].legend(handles, labels, loc="center", fontsize=8)
    else:
        axes.flat[0].legend(handles, labels, loc="upper left", fontsize=6)
    fig.suptitle(f"Gate separability at layer {layer}: generality (filled) vs locality (lines)")
    return save_figure(fig, path, dpi=100)


def plot_errors(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Balanced error of the best tau per layer, one line per key kind."""
    plt = pyplot()
    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 4), 4.2))
    for key in result["keys"]:
        errors = [result["per_layer"][str(layer)][key]["balanced_error"] for layer in layers]
        ax.plot(layers, errors, marker="o", markersize=3, label=key)
    ax.axhline(0.5, color="gray", linestyle=":", label="chance (0.5)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("balanced error at the best tau (lower is better)")
    ax.set_ylim(-0.02, 0.55)
    if len(layers) <= 48:
        ax.set_xticks(layers)
    ax.set_title("Gate separability per layer: generality vs locality")
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    return save_figure(fig, path)
