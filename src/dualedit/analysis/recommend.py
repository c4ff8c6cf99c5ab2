"""A recommendation for a backbone: (text layer, visual layer, gate key, tau), drawn from the
analyses in one folder, with the evidence that chose it.

Rules, in order of the evidence available:

- **Layers.** From the finalists (`finalists.json`, `finalists.py`) when they were trained: the
  short sweep's best pairs trained again at the full recipe budget, the chosen one and its
  trained editor. Else from the layer sweep (`layers.json`): the adapter pair with the best mean
  of Rel, T-Gen and V-Gen on the validation edits (the sweep runs without the gate, so locality
  is the gate's job, chosen below); ties within `TIE` points go to the pair with the higher Avg,
  then to the deeper text layer (a longer frozen prefix: cheaper training and editing). Without
  pairs, the best text-only layer and the best visual-only layer at or above it. Without a
  sweep, the noise analysis (`noise.json`): the layer where noise on the text positions moves
  the answer most, and the layer at or above it most sensitive to noise on the image positions.
  Without either, the paper's depth ratio (0.5 and 0.6 of the depth).
- **Gate.** From the gate analysis (`gate.json`) at the chosen text layer (the gate reads its
  key there): the key kind the DualEdit gate supports (`GATE_KEYS`) with the lowest mean error
  over the input kinds (T-Gen, V-Gen rejected; M-Loc, hard M-Loc, T-Loc accepted; each kind
  weighed alike, as DualEdit's tau calibration does), and that key's threshold as tau.
  "last_position" is left out unless asked for: under teacher forcing it reads the answer
  itself, which a real query never has (SPEC section 1).
  Without a gate analysis the key and tau stay None: the backbone's default key, and tau
  chosen on the validation edits after training (`dualedit train` calibrates a None tau).

`dualedit train --method dualedit --from-recommendation recommendation.json` trains with it;
after a finalists stage, `trained_editor` names adapters already trained with its layers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dualedit.analysis.figures import pyplot, read_json, save_figure, write_json
from dualedit.analysis.layers import edit_score, pair_rank

logger = logging.getLogger(__name__)

RESULT_FILE = "recommendation.json"
#: The method whose config a recommendation fills.
METHOD = "dualedit"
#: Gate key kinds a `DualEditConfig.gate_key` takes (the gate analysis measures others too).
GATE_KEYS: tuple[str, ...] = ("prompt_end", "prompt_end_image", "prompt_end_and_image",
                              "prompt_end_image_groups", "last_position")
#: Axis labels of the gate criteria.
_CRITERIA = {"kind_error": "mean error over input kinds",
             "balanced_error": "balanced error"}
#: The config fields a recommendation sets.
FIELDS: tuple[str, ...] = ("text_layer", "visual_layer", "gate_key", "tau")


def recommend(
    folder: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out_dir: str | os.PathLike | None = None,
    allow_last_position: bool = False,
) -> dict[str, Any]:
    """Read the analyses in `folder` (any of layers.json, noise.json, gate.json, attention.json)
    and write `recommendation.json` and `recommendation.png` to `out_dir` (default `folder`).

    `folder` may be several folders: each analysis is read from the first one that has it (e.g.
    the E-IC gate analysis with the layer sweep that was run on E-VQA for the same model).

    Returns:
        {"analysis": "recommend", "recommendation": {text_layer, visual_layer, gate_key, tau},
        "reasons": [...], "evidence": {...}, "inputs": [files read]}.

    Raises:
        FileNotFoundError: no folder holds any of the analyses' JSON files.
        ValueError: the folders' analyses are of models of different depths.
    """
    folders = [Path(folder)] if isinstance(folder, (str, os.PathLike)) else [
        Path(f) for f in folder]
    if not folders:
        raise ValueError("recommend: give at least one folder")
    found: dict[str, Path] = {}
    for name in ("finalists", "layers", "noise", "gate", "attention"):
        for candidate in folders:
            if (candidate / f"{name}.json").is_file():
                found[name] = candidate / f"{name}.json"
                break
    folder = folders[0]
    if not found:
        raise FileNotFoundError(
            f"{', '.join(map(str, folders))}: no analysis results (finalists.json, layers.json, "
            "noise.json, gate.json); run `dualedit analyze layers|noise|gate --out` there first"
        )
    results = {name: read_json(path, what=f"{name} analysis") for name, path in found.items()}
    depth = _depth(results, folder)
    reasons: list[str] = []
    evidence: dict[str, Any] = {}
    text_layer, visual_layer = _layers(results, depth, reasons, evidence)
    gate_key, tau = _gate(results.get("gate"), text_layer, allow_last_position, reasons, evidence)
    result = {
        "analysis": "recommend",
        "method": METHOD,
        "depth": depth,
        "source": next(iter(results.values())).get("source", {}),
        "recommendation": {"text_layer": text_layer, "visual_layer": visual_layer,
                           "gate_key": gate_key, "tau": tau},
        "reasons": reasons,
        "evidence": evidence,
        # The finalist's adapters, trained with these layers at the recipe budget (None without
        # a finalists stage): `dualedit eval --editor` takes them with the gate options above.
        "trained_editor": (results.get("finalists") or {}).get("chosen", {}).get("editor"),
        "inputs": sorted(str(p) for p in found.values()),
    }
    out = Path(out_dir) if out_dir is not None else folder
    write_json(out / RESULT_FILE, result)
    plot_recommendation(result, results, out)
    return result


def recommendation_options(path: str | os.PathLike, method: str = METHOD) -> dict[str, Any]:
    """The config fields of a `recommendation.json` for `method` (fields it leaves None are left
    out, so the method's defaults apply).

    Raises:
        ValueError: not a recommendation, one for another method, or unknown fields.
    """
    data = read_json(path, what="recommendation")
    if data.get("analysis") != "recommend" or not isinstance(data.get("recommendation"), dict):
        raise ValueError(f"{path}: not a recommendation (written by `dualedit analyze recommend`)")
    if data.get("method", METHOD) != method:
        raise ValueError(f"{path}: a recommendation for {data.get('method')!r}, not for the "
                         f"method {method!r}")
    chosen = data["recommendation"]
    unknown = sorted(set(chosen) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown recommendation fields {unknown}; expected {FIELDS}")
    return {key: value for key, value in chosen.items() if value is not None}


def _depth(results: dict[str, dict[str, Any]], folder: Path) -> int:
    """The model's depth: a sweep states it; the other analyses list the layers they covered
    (a lower bound when run on some layers only)."""
    stated = (results.get("finalists") or results.get("layers") or {}).get("depth")
    seen = [max(int(x) for x in data["layers"]) + 1 for data in results.values()
            if isinstance(data.get("layers"), list) and data["layers"]]
    if isinstance(stated, int):
        if any(depth > stated for depth in seen):
            raise ValueError(f"{folder}: the analyses are of models of different depths "
                             f"(the sweep's {stated}, other files up to {max(seen)})")
        return stated
    if seen:
        return max(seen)
    raise ValueError(f"{folder}: the analysis files do not say the model's depth")


def _layers(results, depth, reasons, evidence) -> tuple[int, int]:
    finalists = results.get("finalists")
    if finalists is not None:
        chosen = finalists["chosen"]
        evidence["finalists"] = [
            {**_row_summary(r), "sweep_rank": r.get("sweep_rank"),
             "sweep_score": r.get("sweep_score"), "included": r.get("included")}
            for r in finalists["finalists"]]
        steps = finalists.get("train_settings", {}).get("max_steps")
        reasons.append(
            f"layers ({chosen['text_layer']}, {chosen['visual_layer']}): of "
            f"{len(finalists['finalists'])} finalists trained {steps} steps on "
            f"{finalists.get('task')}, {chosen['reason']} (mean Rel/T-Gen/V-Gen on the "
            "validation edits, no gate)")
        return int(chosen["text_layer"]), int(chosen["visual_layer"])
    sweep = results.get("layers")
    rows = [] if sweep is None else [r for r in sweep.get("variants", []) if r.get("scores")]
    pairs = [r for r in rows if r["kind"] == "pair"]
    if pairs:
        ranked = sorted(pairs, key=pair_rank, reverse=True)
        best = ranked[0]
        evidence["layer_pairs"] = [_row_summary(r) for r in ranked[:5]]
        reasons.append(
            f"layers ({best['text_layer']}, {best['visual_layer']}): the best of "
            f"{len(pairs)} swept pairs by mean Rel/T-Gen/V-Gen on the validation edits "
            f"({edit_score(best):.1f}; Avg {best['scores']['avg']:.1f}, no gate)"
        )
        return best["text_layer"], best["visual_layer"]
    text = [r for r in rows if r["kind"] == "text"]
    visual = [r for r in rows if r["kind"] == "visual"]
    if text and visual:
        t = max(text, key=lambda r: (edit_score(r), r["text_layer"]))["text_layer"]
        above = [r for r in visual if r["visual_layer"] >= t] or visual
        v = max(above, key=lambda r: (edit_score(r), r["visual_layer"]))["visual_layer"]
        v = max(v, t)
        evidence["single_layers"] = [_row_summary(r) for r in text + visual]
        reasons.append(f"layers ({t}, {v}): the best text-only layer and the best visual-only "
                       "layer at or above it (no pairs were swept)")
        return t, v
    noise = results.get("noise")
    if noise is not None:
        t, v, shown = _noise_layers(noise, depth)
        evidence["noise"] = shown
        reasons.append(f"layers ({t}, {v}): the text layer most sensitive to noise on the text "
                       "positions and the visual layer at or above it most sensitive to noise "
                       "on the image positions (no layer sweep)")
        return t, v
    t, v = round(0.5 * depth), round(0.6 * depth)
    t, v = min(t, depth - 1), min(max(v, t), depth - 1)
    reasons.append(f"layers ({t}, {v}): the paper's depth ratio, no layer evidence")
    return t, v


def _row_summary(row: dict[str, Any]) -> dict[str, Any]:
    return {"variant": row["variant"], "text_layer": row["text_layer"],
            "visual_layer": row["visual_layer"], "edit_score": edit_score(row),
            "scores": row["scores"]}


def _noise_layers(noise: dict[str, Any], depth: int) -> tuple[int, int, dict[str, Any]]:
    """(text layer, visual layer) of the highest KL at the middle sigma."""
    entries = noise.get("per_layer") or noise.get("results") or []
    sigmas = sorted({float(e["sigma"]) for e in entries if e.get("sigma") is not None})
    if not sigmas:
        raise ValueError("noise.json holds no (layer, modality, sigma) entries")
    sigma = sigmas[len(sigmas) // 2]

    def kl(modality: str) -> dict[int, float]:
        return {int(e["layer"]): float(e["kl_mean"]) for e in entries
                if e["modality"] == modality and float(e["sigma"]) == sigma
                and e.get("kl_mean") is not None}

    text, image = kl("text"), kl("image")
    if not text or not image:
        raise ValueError("noise.json lacks text or image entries")
    t = max(text, key=lambda layer: (text[layer], -layer))
    above = {layer: value for layer, value in image.items() if layer >= t} or image
    v = max(max(above, key=lambda layer: (above[layer], -layer)), t)
    return min(t, depth - 1), min(v, depth - 1), {"sigma": sigma, "text_kl": text,
                                                  "image_kl": image}


def _gate(gate, text_layer, allow_last_position, reasons, evidence):
    if gate is None:
        reasons.append("gate: no gate analysis; the backbone's default key, tau chosen on the "
                       "validation edits after training")
        return None, None
    per_layer = gate.get("per_layer", {})
    at = per_layer.get(str(text_layer))
    if at is None:
        reasons.append(f"gate: the gate analysis has no layer {text_layer}; default key, tau "
                       "chosen after training")
        return None, None
    keys = [k for k in GATE_KEYS if k in at and (allow_last_position or k != "last_position")]
    if not keys:
        raise ValueError(f"gate.json layer {text_layer}: none of the gate's key kinds {GATE_KEYS}")
    # The per-kind criterion when the file has it (the one DualEdit's calibration uses): every
    # input kind weighs alike, so hard M-Loc is not diluted by the easy random M-Loc and T-Loc.
    per_kind = all("kind_error" in at[k] for k in keys)
    error, tau = ("kind_error", "tau_kinds") if per_kind else ("balanced_error", "tau")
    best = min(keys, key=lambda k: (at[k][error], GATE_KEYS.index(k)))
    evidence["gate"] = {k: {"tau": at[k][tau], "error": at[k][error], "criterion": error,
                            "auroc": at[k].get("auroc")} for k in keys}
    criterion = ("mean error over the input kinds" if per_kind else
                 "balanced error (generality against locality)")
    reasons.append(
        f"gate: {best} at layer {text_layer}, tau {at[best][tau]:.4f}, the lowest {criterion} "
        f"({at[best][error]:.3f}) of {len(keys)} key kinds between each edit's generality and "
        "locality inputs"
    )
    return best, float(at[best][tau])


def plot_recommendation(result: dict[str, Any], results: dict[str, dict[str, Any]],
                        out_dir: Path) -> Path:
    """`recommendation.png`: the evidence behind the choice (layer scores, gate errors)."""
    plt = pyplot()
    chosen = result["recommendation"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    sweep = results.get("layers")
    pairs = [] if sweep is None else [r for r in sweep["variants"] if r["kind"] == "pair"]
    if pairs:
        labels = [f"{r['text_layer']},{r['visual_layer']}" for r in pairs]
        ax.bar(range(len(pairs)), [edit_score(r) for r in pairs], color=[
            "tab:red" if (r["text_layer"], r["visual_layer"]) ==
            (chosen["text_layer"], chosen["visual_layer"]) else "tab:blue" for r in pairs])
        ax.set_xticks(range(len(pairs)), labels, rotation=90, fontsize=7)
        ax.set_xlabel("(text layer, visual layer)")
        ax.set_ylabel("mean Rel/T-Gen/V-Gen (no gate)")
    else:
        ax.text(0.5, 0.5, "no layer sweep", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"layers: chosen ({chosen['text_layer']}, {chosen['visual_layer']})")
    ax = axes[1]
    gate = result["evidence"].get("gate")
    if gate:
        names = list(gate)
        ax.bar(range(len(names)), [gate[k]["error"] for k in names], color=[
            "tab:red" if k == chosen["gate_key"] else "tab:blue" for k in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(_CRITERIA.get(gate[names[0]]["criterion"], "error") + " at the best tau")
    else:
        ax.text(0.5, 0.5, "no gate analysis", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"gate at layer {chosen['text_layer']}: {chosen['gate_key']}")
    return save_figure(fig, out_dir / "recommendation.png")
