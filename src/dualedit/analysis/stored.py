"""The gate analysis with every analysed record's edit stored at once (`dualedit analyze gate
--stored`): the nearest-of-many decision a real edit memory makes.

The pairwise analysis (gate.py) compares each query with its own record's edit only. Here each
query is compared with every stored edit, the nearest one c (argmax of the similarity, as
`EditMemory.lookup` takes it) is chosen, and the gate opens when that similarity reaches c's
threshold. A generality query (T-Gen, V-Gen) is right when c is its own record's edit and the
gate opens; a locality query (M-Loc, hard M-Loc, T-Loc) is right when the gate stays closed.
Two rules give the thresholds:

- "tau": one global threshold for every edit, chosen by the highest mean over the query kinds
  present of each kind's right-rate (every kind weighted alike, as `gate.kind_threshold`).
- "radius": one threshold per edit in the manner of GRACE (Hartvigsen et al. 2023, "Aging with
  GRACE"): edits are inserted in record order, each with the angular radius rho0 = arccos(tau0);
  an inserted edit whose ball overlaps an earlier edit's ball (angle < the sum of the radii) and
  whose target differs shrinks both radii to half their angle. Its threshold is cos(radius);
  tau0 is searched over a grid by the same mean-over-kinds criterion.
- "image_first" (LiveEdit's hard filter on the picture, then the question), for the gate keys
  built from the prompt end and an image part: only the stored edits whose image cosine reaches
  an image threshold are candidates; among them the nearest by the prompt-end cosine is chosen,
  and the gate opens when that cosine reaches a question threshold. The image threshold is
  searched over `IMAGE_TAU_GRID` (-1: no filter), the question threshold as rule 1's tau.

Similarities are the gate's own (`gate_vectors` + `similarity_matrix`) for its key kinds and the
cosine of the normalised means for the analysis's mean keys ("image_mean", "text_mean"; a zero
mean, a sample without an image, has cosine 0 with everything).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dualedit.analysis.figures import pyplot, save_figure
from dualedit.analysis.scopes import (
    IN_SCOPE,
    MEAN_KEYS,
    OUT_OF_SCOPE,
    QUERY_KINDS,
    first_run_middle,
    threshold_candidates,
)
from dualedit.editors.dualedit.gate import (
    KIND_PARTS,
    gate_vectors,
    similarity_matrix,
    unit_groups,
)
from dualedit.editors.memory import argmax_rows

#: The tau0 searched by the radius rule (the rule-1 tau is added to it).
TAU0_GRID: tuple[float, ...] = tuple(round(0.80 + 0.01 * i, 2) for i in range(20))
RULES: tuple[str, ...] = ("tau", "radius")
#: The image thresholds searched by the image-first rule (-1: every stored edit is a candidate).
IMAGE_TAU_GRID: tuple[float, ...] = (-1.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96,
                                     0.97, 0.98, 0.99)
#: The similarity given to a query that no stored edit passes the image filter for (closed).
NO_CANDIDATE = -2.0

NOTES: dict[str, str] = {
    "decision": "every analysed record's edit is stored at once; a query's nearest stored edit "
    "c is the argmax of its similarity over all of them, and the gate opens when that "
    "similarity >= c's threshold",
    "right": "a generality query (t_gen, v_gen) is right when c is its own record's edit and "
    "the gate opens; a locality query (m_loc, m_loc_hard, t_loc) when the gate stays closed",
    "tau": "one global threshold, chosen by the highest mean over the query kinds present of "
    "each kind's right-rate (candidates: midpoints of the sorted distinct nearest similarities "
    "plus the extremes; ties: the middle of the first run of tied candidates)",
    "radius": "per-edit thresholds (GRACE, Hartvigsen et al. 2023): edits inserted in record "
    "order with angular radius rho0 = arccos(tau0); an inserted edit j and every earlier edit i "
    "with angle < rho_i + rho0 and another target both shrink to at most angle / 2; threshold "
    "= cos(radius); tau0 from TAU0_GRID plus the rule-1 tau, by the same mean criterion",
    "image_first": "for keys of the prompt end and an image part: candidates are the stored "
    "edits whose image cosine (image mean, or the mean of the image-group cosines) >= "
    "image_tau; the nearest candidate by prompt-end cosine is chosen and the gate opens when "
    "that cosine >= tau; image_tau from IMAGE_TAU_GRID (-1: no filter), tau as rule 1's",
    "similarity": "gate keys: the gate's similarity_matrix of gate_vectors; image_mean and "
    "text_mean: cosine of the normalised means (a zero mean, no image, has cosine 0)",
    "split": "train-split records may repeat a fact (two edits of the same entity and question "
    "kind), which makes a locality or generality decision ambiguous; the eval split's edits "
    "change distinct facts (use --split eval for this section)",
    "best": "the (layer, key) of the highest mean right-rate per rule (ties: the first in layer, "
    "then key order)",
}


@dataclass(frozen=True)
class Nearest:
    """The nearest stored edit of every query of one kind.

    Attributes:
        similarity: [q] float64, the similarity to the nearest stored edit.
        chosen: [q] int, the nearest stored edit (its record position).
        own: [q] int, the query's own record position.
    """

    similarity: np.ndarray
    chosen: np.ndarray
    own: np.ndarray

    def __post_init__(self) -> None:
        sizes = {self.similarity.shape, self.chosen.shape, self.own.shape}
        if len(sizes) != 1 or self.similarity.ndim != 1:
            raise ValueError(f"Nearest: similarity, chosen and own must be equal 1-d arrays, "
                             f"got shapes {sorted(sizes)}")


# -- similarities ----------------------------------------------------------------------------------


def key_vectors(key: str, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The vectors compared under `key`: the normalised mean for a mean key (zero stays zero),
    else the gate's `gate_vectors`. {feature: [n, width]} -> [n, d]."""
    if key in MEAN_KEYS:
        return F.normalize(features[key].float(), dim=-1)
    return gate_vectors(dict(features), key)


def pairwise(queries: torch.Tensor, edits: torch.Tensor, key: str) -> torch.Tensor:
    """Similarity of every query to every edit: [q, d], [n, d] (`key_vectors`) -> [q, n].

    Example:
        >>> pairwise(torch.eye(2), torch.eye(2), "text_mean")
        tensor([[1., 0.],
                [0., 1.]])
    """
    if key in MEAN_KEYS:
        return F.normalize(queries.float(), dim=-1) @ F.normalize(edits.float(), dim=-1).T
    return similarity_matrix(queries.float(), edits.float(), key)  # the gate's float32


def nearest(
    queries: torch.Tensor, edits: torch.Tensor, key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest edit of each query: [q, d], [n, d] -> (similarity [q], chosen [q] long).

    Example:
        >>> nearest(torch.tensor([[1.0, 0.1]]), torch.eye(2), "prompt_end")
        (tensor([0.9950]), tensor([0]))
    """
    if edits.shape[0] == 0:
        raise ValueError("nearest: no stored edits")
    chosen, similarity = argmax_rows(pairwise(queries, edits, key))  # [q], [q]
    return similarity, chosen


def split_vectors(key: str, features: Mapping[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(image [n, d_i], question [n, d_q]) vectors whose dot products are the image cosine (of
    the image means, or the mean of the image-group cosines; 0 without an image) and the
    prompt-end cosine; None for a key without both parts."""
    parts = KIND_PARTS.get(key, ())
    if "prompt_end" not in parts or len(parts) != 2:
        return None
    question = F.normalize(features["prompt_end"].float(), dim=-1)
    if "image_groups" in parts:
        image = unit_groups(features["image_groups"])
    else:
        image = F.normalize(features["image_mean"].float(), dim=-1)
    return image, question


def nearest_image_first(
    queries: tuple[torch.Tensor, torch.Tensor], edits: tuple[torch.Tensor, torch.Tensor],
    image_tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image-first rule's choice: among the edits whose image cosine >= image_tau, the
    nearest by prompt-end cosine. (image [q, d_i], question [q, d_q]), the same of [n] edits ->
    (prompt-end similarity [q], chosen [q] long); NO_CANDIDATE and -1 where none passes.

    Example:
        >>> img, q = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> nearest_image_first((img[:1], q[:1]), (img, q), 0.5)
        (tensor([1.]), tensor([0]))
    """
    return _masked_nearest(queries[0] @ edits[0].T, queries[1] @ edits[1].T, image_tau)


def _masked_nearest(image: torch.Tensor, question: torch.Tensor, image_tau: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_image_first` from the [q, n] image and prompt-end cosines."""
    masked = question.masked_fill(image < image_tau, NO_CANDIDATE)
    similarity, chosen = masked.max(dim=1)  # [q], [q]
    chosen = torch.where(similarity > NO_CANDIDATE, chosen, torch.full_like(chosen, -1))
    return similarity, chosen


def best_image_first(found: Mapping[float, Mapping[str, Nearest]]) -> dict[str, Any]:
    """The image-first entry {"image_tau", "tau", "mean", "right"} of the image threshold (and
    its best question tau) with the highest mean; ties: the middle of the first run."""
    tried = [(image_tau, *best_stored_tau(near)) for image_tau, near in sorted(found.items())]
    image_tau, tau, mean, right = tried[first_run_middle(np.array([t[2] for t in tried]))]
    return {"image_tau": image_tau, "tau": tau, "mean": mean, "right": right}


# -- the radius rule -------------------------------------------------------------------------------


def grace_thresholds(
    edits: torch.Tensor, key: str, tau0: float, targets: Sequence[str]
) -> np.ndarray:
    """Per-edit thresholds of the radius rule: [n, d] edit vectors (`key_vectors`) -> [n].

    Edit j (in order) starts at rho0 = arccos(tau0); every earlier edit i with angle
    theta_ij = arccos(sim_ij) < rho_i + rho0 and a target other than j's shrinks to
    min(rho_i, theta_ij / 2), and j to min(rho0, min over those i of theta_ij / 2). Edits with
    the same target never shrink each other. Threshold = cos(rho).

    Example:
        >>> vectors = torch.tensor([[1.0, 0.0], [math.cos(0.2), math.sin(0.2)]])
        >>> grace_thresholds(vectors, "prompt_end", math.cos(0.3), ["a", "b"])  # cos(0.1) x2
        array([0.99500417, 0.99500417])
    """
    if len(targets) != edits.shape[0]:
        raise ValueError(f"grace_thresholds: {len(targets)} targets for {edits.shape[0]} edits")
    angles = edit_angles(edits, key)  # [n, n]
    return np.cos(_radii(angles, tau0, _differ(targets)))


def edit_angles(edits: torch.Tensor, key: str) -> np.ndarray:
    """[n, d] -> [n, n] float64 angles arccos(clamp(similarity, -1, 1)) between stored edits."""
    similarity = pairwise(edits, edits, key).double().cpu().numpy()  # [n, n]
    return np.arccos(np.clip(similarity, -1.0, 1.0))


def _differ(targets: Sequence[str]) -> np.ndarray:
    """[n] targets -> [n, n] bool: the two edits' target texts differ."""
    array = np.asarray(list(targets), dtype=object)
    return array[:, None] != array[None, :]


def _radii(angles: np.ndarray, tau0: float, differ: np.ndarray) -> np.ndarray:
    """The angular radii [n] after inserting the edits in order ([n, n] angles and differ)."""
    rho0 = float(np.arccos(np.clip(tau0, -1.0, 1.0)))
    rho = np.full(angles.shape[0], rho0)  # [n]
    for j in range(1, angles.shape[0]):
        theta = angles[j, :j]  # [j] to the earlier edits
        clash = (theta < rho[:j] + rho0) & differ[j, :j]
        if clash.any():
            half = theta[clash] / 2
            rho[:j][clash] = np.minimum(rho[:j][clash], half)
            rho[j] = min(rho0, float(half.min()))
    return rho


# -- scoring ---------------------------------------------------------------------------------------


def score_rule(
    found: Mapping[str, Nearest], threshold: float | np.ndarray
) -> dict[str, float | None]:
    """Each query kind's right-rate under a global threshold (float) or per-edit thresholds
    ([n] array, indexed by the chosen edit); None for a kind without queries.

    Example:
        >>> near = {"t_gen": Nearest(np.array([0.9]), np.array([1]), np.array([0])),
        ...         "m_loc": Nearest(np.array([0.3]), np.array([0]), np.array([0]))}
        >>> score_rule(near, 0.5)  # T-Gen opens on another record's edit: wrong
        {'t_gen': 0.0, 'm_loc': 1.0}
    """
    rates: dict[str, float | None] = {}
    for kind, near in found.items():
        if near.similarity.size == 0:
            rates[kind] = None
            continue
        limit = threshold if np.isscalar(threshold) else np.asarray(threshold)[near.chosen]
        opened = near.similarity >= limit  # [q]
        right = opened & (near.chosen == near.own) if kind in IN_SCOPE else ~opened
        rates[kind] = float(np.mean(right))
    return rates


def mean_rate(rates: Mapping[str, float | None]) -> float:
    """The mean over the kinds present (every kind weighted alike)."""
    present = [rate for rate in rates.values() if rate is not None]
    if not present:
        raise ValueError("mean_rate: no query kind has queries")
    return float(np.mean(present))


def best_stored_tau(found: Mapping[str, Nearest]) -> tuple[float, float, dict[str, float | None]]:
    """Rule 1: (tau, mean right-rate, {kind: right-rate}) of the global tau with the highest mean
    over the kinds present, over the midpoints of the sorted distinct nearest similarities plus
    the extremes; ties: the middle of the first run of tied candidates.

    Example:
        >>> near = {"t_gen": Nearest(np.array([0.9]), np.array([0]), np.array([0])),
        ...         "m_loc": Nearest(np.array([0.3]), np.array([0]), np.array([1]))}
        >>> best_stored_tau(near)
        (0.6, 1.0, {'t_gen': 1.0, 'm_loc': 1.0})
    """
    present = {kind: near for kind, near in found.items() if near.similarity.size}
    if not present:
        raise ValueError("best_stored_tau: no queries")
    candidates = threshold_candidates(np.concatenate([n.similarity for n in present.values()]))
    rates = []
    for kind, near in present.items():
        if kind in IN_SCOPE:  # right: own edit chosen and similarity >= tau
            hits = np.sort(near.similarity[near.chosen == near.own])
            rates.append((hits.size - np.searchsorted(hits, candidates, side="left"))
                         / near.similarity.size)
        else:  # right: similarity < tau
            rates.append(np.searchsorted(np.sort(near.similarity), candidates, side="left")
                         / near.similarity.size)
    best = first_run_middle(np.mean(rates, axis=0))
    tau = float(candidates[best])
    right = score_rule(found, tau)
    return tau, mean_rate(right), right


def best_radius(
    found: Mapping[str, Nearest],
    edits: torch.Tensor,
    key: str,
    targets: Sequence[str],
    grid: Sequence[float] = TAU0_GRID,
) -> tuple[float, np.ndarray, float, dict[str, float | None]]:
    """Rule 2: (tau0, thresholds [n], mean right-rate, {kind: right-rate}) of the tau0 in `grid`
    (sorted, distinct) with the highest mean; ties: the middle of the first run."""
    if len(targets) != edits.shape[0]:
        raise ValueError(f"best_radius: {len(targets)} targets for {edits.shape[0]} edits")
    grid = sorted({float(g) for g in grid})
    if not grid:
        raise ValueError("best_radius: an empty tau0 grid")
    angles, differ = edit_angles(edits, key), _differ(targets)
    tried = []
    for tau0 in grid:
        thresholds = np.cos(_radii(angles, tau0, differ))  # [n]
        right = score_rule(found, thresholds)
        tried.append((tau0, thresholds, mean_rate(right), right))
    return tried[first_run_middle(np.array([t[2] for t in tried]))]


def stored_separation(
    found: Mapping[str, Nearest],
    edits: torch.Tensor,
    key: str,
    targets: Sequence[str],
    grid: Sequence[float] = TAU0_GRID,
) -> dict[str, Any]:
    """The JSON entry of one (layer, key) with `edits` ([n, d] `key_vectors`) all stored:
    {"tau": {"tau", "mean", "right": {kind: rate}}, "radius": {"tau0", "median_threshold",
    "shrunk", "mean", "right"}, "stored": n}; "shrunk" is the fraction of edits whose threshold
    rose above cos(rho0)."""
    tau, tau_mean, tau_right = best_stored_tau(found)
    tau0, thresholds, radius_mean, radius_right = best_radius(
        found, edits, key, targets, list(grid) + [float(np.clip(tau, -1.0, 1.0))])
    start = min(max(tau0, -1.0), 1.0)  # every edit's threshold before any shrinking
    return {
        "tau": {"tau": tau, "mean": tau_mean, "right": tau_right},
        "radius": {"tau0": tau0, "median_threshold": float(np.median(thresholds)),
                   "shrunk": float(np.mean(thresholds > start + 1e-9)),
                   "mean": radius_mean, "right": radius_right},
        "stored": int(edits.shape[0]),
    }


# -- collecting during the gate analysis's forward passes ------------------------------------------


class NearestLog:
    """Per (layer, key, query kind), the nearest stored edit of every query, gathered batch by
    batch while the gate analysis runs (after every edit sample's features are known), so no
    query feature is kept: only [q] similarities and choices.

    Example:
        >>> log = NearestLog(["prompt_end"])
        >>> log.add(3, "t_gen", query_features, edit_features, rows=[0, 1])
        >>> log.section([3], targets)["best"]["tau"]
    """

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)
        self._edits: dict[tuple[int, str], torch.Tensor] = {}  # [n, d] per (layer, key)
        self._found: dict[tuple[int, str, str], list[tuple[torch.Tensor, ...]]] = {}
        self._split: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor] | None] = {}
        # Per (layer, key, kind, image_tau): the image-first choices, batch by batch.
        self._first: dict[tuple[int, str, str, float], list[tuple[torch.Tensor, ...]]] = {}

    def add(self, layer: int, kind: str, queries: Mapping[str, torch.Tensor],
            edits: Mapping[str, torch.Tensor], rows: Sequence[int]) -> None:
        """One batch of `kind` queries ({feature: [batch, width]}) against every stored edit
        ({feature: [n, width]}, complete: the edits' vectors are built once per (layer, key))."""
        own = torch.as_tensor(list(rows), dtype=torch.long)  # [batch]
        for key in self.keys:
            stored = self._edits.get((layer, key))
            if stored is None:
                stored = self._edits[(layer, key)] = key_vectors(key, edits)
            similarity, chosen = nearest(key_vectors(key, queries), stored, key)
            self._found.setdefault((layer, key, kind), []).append((similarity, chosen, own))
            if (layer, key) not in self._split:
                self._split[(layer, key)] = split_vectors(key, edits)
            split = self._split[(layer, key)]
            if split is None:
                continue
            asked = split_vectors(key, queries)
            image, question = asked[0] @ split[0].T, asked[1] @ split[1].T  # [batch, n] each
            for image_tau in IMAGE_TAU_GRID:
                similarity, chosen = _masked_nearest(image, question, image_tau)
                self._first.setdefault((layer, key, kind, image_tau), []).append(
                    (similarity, chosen, own))

    def stored_vectors(self, layer: int, key: str) -> torch.Tensor:
        """The stored edits' [n, d] `key_vectors` at one (layer, key) (KeyError: no query yet)."""
        return self._edits[(layer, key)]

    def found(self, layer: int, key: str, image_tau: float | None = None
              ) -> dict[str, Nearest]:
        """{query kind: Nearest} of one (layer, key) (with `image_tau`: the image-first rule's
        choices at that image threshold); empty arrays for kinds without queries."""
        out = {}
        for kind in QUERY_KINDS:
            parts = (self._found.get((layer, key, kind), []) if image_tau is None
                     else self._first.get((layer, key, kind, image_tau), []))
            joined = [torch.cat([p[i] for p in parts]).double().numpy() if parts
                      else np.zeros(0) for i in range(3)]
            out[kind] = Nearest(joined[0], joined[1].astype(np.int64),
                                joined[2].astype(np.int64))
        return out

    def section(self, layers: Sequence[int], targets: Sequence[str],
                grid: Sequence[float] = TAU0_GRID, progress: bool = False) -> dict[str, Any]:
        """gate.json's "stored" section: {"notes", "edits", "tau0_grid", "per_layer":
        {str(layer): {key: entry}}, "best": {"tau": {layer, key, mean, tau}, "radius": {layer,
        key, mean, tau0, median_threshold}}}."""
        per_layer: dict[str, dict[str, Any]] = {}
        for layer in tqdm(layers, desc="gate stored", unit="layer", disable=not progress):
            per_layer[str(layer)] = {}
            for key in self.keys:
                entry = stored_separation(self.found(layer, key), self._edits[(layer, key)],
                                          key, targets, grid)
                if self._split.get((layer, key)) is not None:
                    entry["image_first"] = best_image_first(
                        {t: self.found(layer, key, t) for t in IMAGE_TAU_GRID})
                per_layer[str(layer)][key] = entry
        best = {}
        for rule, fields in (("tau", ("tau",)), ("radius", ("tau0", "median_threshold")),
                             ("image_first", ("image_tau", "tau"))):
            pairs = [(layer, key) for layer in per_layer for key in self.keys
                     if rule in per_layer[layer][key]]
            if not pairs:
                continue
            layer, key = max(pairs, key=lambda p: per_layer[p[0]][p[1]][rule]["mean"])
            entry = per_layer[layer][key][rule]
            best[rule] = {"layer": int(layer), "key": key, "mean": entry["mean"],
                          **{name: entry[name] for name in fields}}
        return {"notes": dict(NOTES), "edits": len(targets), "tau0_grid": sorted(grid),
                "image_tau_grid": list(IMAGE_TAU_GRID),
                "per_layer": per_layer, "best": best}


# -- the figure ------------------------------------------------------------------------------------


def plot_stored(section: Mapping[str, Any], layers: Sequence[int], keys: Sequence[str],
                path: str | os.PathLike) -> Path:
    """Per layer, the mean right-rate of each key under each rule (two panels)."""
    plt = pyplot()
    width = max(6.0, 0.3 * len(layers) + 4)
    rules = [rule for rule in (*RULES, "image_first") if rule in section["best"]]
    fig, axes = plt.subplots(1, len(rules), figsize=(len(rules) * width, 4.4), sharey=True,
                             squeeze=False)
    titles = {"tau": "one tau for every stored edit", "radius": "per-edit radius (GRACE)",
              "image_first": "image first, then question"}
    per_layer = section["per_layer"]
    first = per_layer[str(layers[0])][keys[0]]["tau"]["right"]
    present = [kind for kind, rate in first.items() if rate is not None]
    closed = sum(kind in OUT_OF_SCOPE for kind in present) / max(len(present), 1)
    for ax, rule in zip(axes.flat, rules, strict=True):
        for key in keys:
            if rule not in per_layer[str(layers[0])][key]:
                continue
            means = [per_layer[str(layer)][key][rule]["mean"] for layer in layers]
            ax.plot(layers, means, marker="o", markersize=3, label=key)
        ax.axhline(closed, color="gray", linestyle=":",
                   label=f"gate always closed ({closed:.2f})")
        best = section["best"][rule]
        ax.set_title(f"{titles[rule]}: best {best['key']} at layer {best['layer']} "
                     f"({best['mean']:.3f})", fontsize=10)
        ax.set_xlabel("decoder layer")
        ax.set_ylim(-0.02, 1.02)
        if len(layers) <= 48:
            ax.set_xticks(list(layers))
    axes.flat[0].set_ylabel("mean right-rate over query kinds (higher is better)")
    axes.flat[-1].legend(fontsize=7, loc="lower right", ncol=2)
    stored = per_layer[str(layers[0])][keys[0]]["stored"]
    fig.suptitle(f"Gate with all {stored} edits stored: nearest-of-many decisions per layer")
    return save_figure(fig, path)
