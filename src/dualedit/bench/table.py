"""The quality bench's rows (cells aggregated over seeds) and its Markdown table.

One row per (dataset, backbone, method[, N]): the paper's Table 2 metrics (Rel, T-Gen, V-Gen,
T-Loc, M-Loc, Avg), hard M-Loc and Gen-EM, then what a method costs: the time its training ran,
the median time of one edit's `apply`, that time over the reference method's (DualEdit's) in the
same seed, backbone and dataset, and the bytes it keeps per edit. Over several seeds a cell reads
"mean ± sample std".
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from dualedit.eval.report import DATASET_NAMES, OPTIONAL_COLUMNS, TABLE_COLUMNS

#: The method the "apply ×" column divides by, and its name in the column's title.
REFERENCE_METHOD = "dualedit"
REFERENCE_TITLE = "DualEdit"
METRIC_DECIMALS = 2
#: (key, title, decimals) of the columns after the metrics.
EXTRA_COLUMNS = (
    ("train_s", "train s", 1),
    ("apply_ms", "apply ms", 3),
    ("apply_x_reference", f"apply × {REFERENCE_TITLE}", 2),
    ("bytes_per_edit", "bytes/edit", 0),
)


def bench_rows(
    cells: Sequence[dict[str, Any]],
    *,
    methods: Sequence[str],
    backbones: Sequence[str],
    datasets: Sequence[str],
    reference: str | None = REFERENCE_METHOD,
) -> list[dict[str, Any]]:
    """The table's rows in order (dataset, backbone, method, then N), each aggregated over the
    seeds that have it.

    Returns:
        Dicts {"method", "backbone", "dataset", "n_edits" (None: single-edit), "status" ("done",
        or "skipped" with "reasons" per seed when every seed skipped it), "seeds", "per_seed"
        ({seed: {metric or extra: value}}), "mean", "std" (sample std, None under 2 values) and
        "count" (seeds with a value), per key}.
    """
    reference_apply = {
        _group(cell): cell["apply_s_median"]
        for cell in cells
        if cell["method"] == reference and cell["status"] == "done"
    }
    values: dict[tuple, dict[int, dict[str, float | None]]] = defaultdict(dict)
    skipped: dict[tuple, dict[str, str]] = defaultdict(dict)
    for cell in cells:
        where = (cell["dataset"], cell["backbone"], cell["method"])
        if cell["status"] != "done":
            skipped[where][str(cell["seed"])] = cell.get("reason") or "skipped"
            continue
        extras = _extras(cell, reference_apply.get(_group(cell)))
        for run in cell["results"]["runs"]:
            values[(*where, run["n_edits"])][cell["seed"]] = {**run["means"], **extras}
    rows = []
    for task in datasets:
        for backbone in backbones:
            for method in methods:
                where = (task, backbone, method)
                ns = sorted({key[3] for key in values if key[:3] == where}, key=_n_order)
                rows += [_row(where, n, values[(*where, n)]) for n in ns]
                if not ns and where in skipped:
                    rows.append({**_labels(where, None), "status": "skipped",
                                 "reasons": skipped[where], "seeds": [], "per_seed": {},
                                 "mean": {}, "std": {}, "count": {}})
    return rows


def _group(cell: dict[str, Any]) -> tuple:
    """A cell's (seed, backbone, dataset): the cells the reference column compares."""
    return cell["seed"], cell["backbone"], cell["dataset"]


def _extras(cell: dict[str, Any], reference_s: float | None) -> dict[str, float | None]:
    apply_s = cell["apply_s_median"]
    ratio = None
    if apply_s is not None and reference_s:
        ratio = apply_s / reference_s
    return {
        "train_s": cell["train_s"],
        "apply_ms": None if apply_s is None else 1000.0 * apply_s,
        "apply_x_reference": ratio,
        "bytes_per_edit": cell["bytes_per_edit"],
    }


def _n_order(n: int | None) -> int:
    return -1 if n is None else n


def _labels(where: tuple, n: int | None) -> dict[str, Any]:
    task, backbone, method = where
    return {"method": method, "backbone": backbone, "dataset": task, "n_edits": n}


def _row(where: tuple, n: int | None, per_seed: dict[int, dict[str, float | None]]) -> dict:
    seeds = sorted(per_seed)
    keys = sorted({key for entry in per_seed.values() for key in entry})
    mean, std, count = {}, {}, {}
    for key in keys:
        found = [per_seed[s][key] for s in seeds if per_seed[s].get(key) is not None]
        count[key] = len(found)
        mean[key] = math.fsum(found) / len(found) if found else None
        std[key] = statistics.stdev(found) if len(found) > 1 else None
    return {
        **_labels(where, n),
        "status": "done",
        "seeds": seeds,
        "per_seed": {str(s): per_seed[s] for s in seeds},
        "mean": mean,
        "std": std,
        "count": count,
    }


def bench_table(
    rows: Sequence[dict[str, Any]],
    *,
    seeds: Sequence[int],
    protocol: str,
    reference_column: bool,
) -> str:
    """The Markdown table of `bench_rows`, under a line naming the protocol and the seeds.

    Columns: method | backbone | dataset (| N under the sequential protocol) | Rel | T-Gen | V-Gen
    | T-Loc | M-Loc | Avg, Hard M-Loc and Gen-EM where some row has them, then train s | apply ms
    (| apply × DualEdit with `reference_column`) | bytes/edit; "-" where a row has no value.
    """
    sequential = protocol == "sequential"
    columns = [(key, title, METRIC_DECIMALS) for key, title in TABLE_COLUMNS]
    columns += [
        (key, title, METRIC_DECIMALS)
        for key, title in OPTIONAL_COLUMNS
        if any(row["mean"].get(key) is not None for row in rows)
    ]
    columns += [c for c in EXTRA_COLUMNS if reference_column or c[0] != "apply_x_reference"]
    labels = ["method", "backbone", "dataset"] + (["N"] if sequential else [])
    lines = [
        _caption(seeds, protocol),
        "",
        "| " + " | ".join(labels + [title for _, title, _ in columns]) + " |",
        "|" + "|".join(["---"] * len(labels) + ["---:"] * len(columns)) + "|",
    ]
    for row in rows:
        method = row["method"] + (" (skipped)" if row["status"] != "done" else "")
        cells = [method, row["backbone"], DATASET_NAMES.get(row["dataset"], row["dataset"])]
        if sequential:
            cells.append("-" if row["n_edits"] is None else str(row["n_edits"]))
        cells += [_format(row, key, decimals) for key, _, decimals in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _caption(seeds: Sequence[int], protocol: str) -> str:
    kind = "sequential-edit protocol" if protocol == "sequential" else "single-edit protocol"
    if len(seeds) == 1:
        return f"Quality bench, {kind}, 1 seed ({seeds[0]})."
    listed = ", ".join(str(s) for s in seeds)
    return f"Quality bench, {kind}, {len(seeds)} seeds ({listed}): mean ± sample std per cell."


def _format(row: dict[str, Any], key: str, decimals: int) -> str:
    mean = row["mean"].get(key)
    if mean is None:
        return "-"
    text = f"{mean:.{decimals}f}"
    std = row["std"].get(key)
    return text if std is None else f"{text} ± {std:.{decimals}f}"
