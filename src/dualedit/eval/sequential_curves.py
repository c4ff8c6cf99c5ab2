"""Figures of the sequential protocol: each metric against N, the number of edits held at once.

`dualedit eval --protocol sequential` and `dualedit bench quality --protocol sequential` call
`write_sequential_curves` right after writing results.json; it writes PNGs beside it:

- one method (an eval, or a bench of one method): `sequential.png`, a grid of panels, one per
  (backbone, dataset) cell (rows: datasets, columns: backbones), one line per metric the cell
  has (Rel, T-Gen, V-Gen, T-Loc, M-Loc, Hard M-Loc; M-Loc and hard M-Loc share a colour, hard
  dashed).
- several methods (a bench with `--methods all`): `sequential_{metric}.png` per metric
  (`sequential_rel.png`, `sequential_t_gen.png`, ..., `sequential_m_loc_hard.png`), the same
  grid, one line per method. Eleven methods times six metrics on one panel cannot be read; one
  metric at a time the methods compare directly, and a method keeps its colour and marker in
  every file.

Every panel: x = N on a log axis ticked at the N values scored, y = score in % (0-100), markers
at the scored points; over several seeds (a bench) a point is the mean and its error bar the
sample std. The layout follows the methods that have scores (a bench whose other methods were
all skipped draws `sequential.png`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dualedit.analysis.figures import pyplot, read_json, save_figure
from dualedit.eval.report import DATASET_NAMES, OPTIONAL_COLUMNS, TABLE_COLUMNS

logger = logging.getLogger(__name__)

SEQUENTIAL = "sequential"
#: The metrics drawn, in legend order.
CURVE_METRICS = ("rel", "t_gen", "v_gen", "t_loc", "m_loc", "m_loc_hard")
TITLES = dict(TABLE_COLUMNS + OPTIONAL_COLUMNS)
#: File of the one-method figure; the per-metric ones are `sequential_{metric}.png`.
FIGURE_FILE = "sequential.png"
METRIC_STYLES = {
    "rel": {"color": "tab:blue", "marker": "o"},
    "t_gen": {"color": "tab:orange", "marker": "s"},
    "v_gen": {"color": "tab:green", "marker": "^"},
    "t_loc": {"color": "tab:purple", "marker": "D"},
    "m_loc": {"color": "tab:red", "marker": "v"},
    "m_loc_hard": {"color": "tab:red", "marker": "x", "linestyle": "--"},
}
METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")
#: matplotlib's ten cycle colours, then dark ones (the registry has eleven methods).
METHOD_COLORS = tuple(f"C{i}" for i in range(10)) + ("black", "darkgoldenrod", "teal", "navy")
X_LABEL = "N (edits held at once)"


@dataclass(frozen=True)
class CurvePoint:
    """One scored N of one method in one (backbone, dataset) cell.

    `means`: metric -> score in % (the mean over seeds in a bench), only the finite ones among
    `CURVE_METRICS`; `stds`: metric -> sample std over seeds (empty with one seed).
    """

    method: str
    backbone: str
    dataset: str
    n_edits: int
    means: Mapping[str, float]
    stds: Mapping[str, float]


def sequential_points(results: Mapping[str, Any]) -> list[CurvePoint]:
    """The sequential points of a loaded results.json, in file order.

    Reads both layouts: `dualedit eval`'s (`protocol`, `runs[*].n_edits`, `runs[*].means`) and
    `dualedit bench quality`'s (`settings.protocol`, `rows[*]` with method, backbone, dataset,
    n_edits, status, mean, std). Skipped bench rows and single-edit runs are left out.

    Returns:
        [] when the results are not of the sequential protocol.

    Raises:
        ValueError: `results` is neither layout.
    """
    if "runs" in results and "protocol" in results:
        if results["protocol"] != SEQUENTIAL:
            return []
        backbone, dataset = _eval_labels(results)
        return [
            CurvePoint(str(results["method"]), backbone, dataset, int(run["n_edits"]),
                       _finite(run["means"]), {})
            for run in results["runs"]
            if run.get("n_edits") is not None
        ]
    if "rows" in results and isinstance(results.get("settings"), Mapping):
        if results["settings"].get("protocol") != SEQUENTIAL:
            return []
        return [
            CurvePoint(str(row["method"]), str(row["backbone"]),
                       DATASET_NAMES.get(row["dataset"], str(row["dataset"])),
                       int(row["n_edits"]), _finite(row["mean"]), _finite(row.get("std") or {}))
            for row in results["rows"]
            if row.get("status") == "done" and row.get("n_edits") is not None
        ]
    raise ValueError("results: neither a `dualedit eval` results.json (protocol, runs) nor a "
                     "`dualedit bench quality` one (settings, rows)")


def write_sequential_curves(
    results: Mapping[str, Any], out_dir: str | os.PathLike
) -> list[Path]:
    """Draw the metrics of a sequential results.json against N into `out_dir` (beside it).

    Args:
        results: the loaded results.json of `dualedit eval` (`results_dict`) or of
            `dualedit bench quality`.
        out_dir: the folder of that results.json.

    Returns:
        The PNGs written (atomically): `[out_dir/sequential.png]` for one method,
        `out_dir/sequential_{metric}.png` for each metric some point has with several methods,
        or [] when the results are not sequential (nothing is written).

    Example:
        >>> write_sequential_curves(read_json("runs/seq/results.json"), "runs/seq")
        [PosixPath('runs/seq/sequential_rel.png'), ...]
    """
    points = sequential_points(results)
    if not points:
        return []
    out = Path(out_dir)
    methods = _unique(p.method for p in points)
    note = _note(results)
    if len(methods) == 1:
        paths = [_metrics_figure(points, methods[0], note, out / FIGURE_FILE)]
    else:
        present = [m for m in CURVE_METRICS if any(m in p.means for p in points)]
        paths = [
            _methods_figure(points, metric, methods, note, out / f"sequential_{metric}.png")
            for metric in present
        ]
    logger.info("sequential curves written: %s", ", ".join(str(p) for p in paths))
    return paths


def write_sequential_curves_of(path: str | os.PathLike) -> list[Path]:
    """`write_sequential_curves` of a results.json file already written (an earlier run's),
    beside it."""
    path = Path(path)
    return write_sequential_curves(read_json(path, what="results"), path.parent)


def _metrics_figure(
    points: Sequence[CurvePoint], method: str, note: str, path: Path
) -> Path:
    """One method: a panel per cell, a line per metric."""
    fig, panels, legend_ax = _grid(points)
    handles: dict[str, Any] = {}
    for (backbone, dataset), ax in panels.items():
        cell = _cell(points, backbone, dataset)
        for metric in CURVE_METRICS:
            handle = _line(ax, cell, metric, METRIC_STYLES[metric])
            if handle is not None:
                handles.setdefault(TITLES[metric], handle)
        _format_panel(ax, cell, f"{backbone} · {dataset}")
    _legend(legend_ax, handles, "metric")
    fig.suptitle(f"{method}: scores after N sequential edits{note}")
    return save_figure(fig, path)


def _methods_figure(
    points: Sequence[CurvePoint], metric: str, methods: Sequence[str], note: str, path: Path
) -> Path:
    """One metric: a panel per cell, a line per method."""
    fig, panels, legend_ax = _grid(points)
    handles: dict[str, Any] = {}
    for (backbone, dataset), ax in panels.items():
        cell = _cell(points, backbone, dataset)
        drawn = False
        for index, method in enumerate(methods):
            ours = [p for p in cell if p.method == method]
            handle = _line(ax, ours, metric, _method_style(index), label=method)
            if handle is not None:
                handles.setdefault(method, handle)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {TITLES[metric]} here", transform=ax.transAxes,
                    ha="center", va="center", color="gray")
        _format_panel(ax, cell, f"{backbone} · {dataset}")
    _legend(legend_ax, handles, "method")
    fig.suptitle(f"{TITLES[metric]} after N sequential edits, per method{note}")
    return save_figure(fig, path)


def _grid(points: Sequence[CurvePoint]) -> tuple[Any, dict[tuple[str, str], Any], Any]:
    """A figure with a panel per (backbone, dataset) of `points` (rows: datasets, columns:
    backbones, in file order) and a last, axis-less column for the legend (so that
    `save_figure`'s tight layout makes room for it)."""
    plt = pyplot()
    backbones = _unique(p.backbone for p in points)
    datasets = _unique(p.dataset for p in points)
    fig = plt.figure(figsize=(4.6 * len(backbones) + 1.6, 3.5 * len(datasets) + 0.7))
    grid = fig.add_gridspec(len(datasets), len(backbones) + 1,
                            width_ratios=[1.0] * len(backbones) + [0.32])
    panels = {}
    for row, dataset in enumerate(datasets):
        for col, backbone in enumerate(backbones):
            ax = fig.add_subplot(grid[row, col])
            if _cell(points, backbone, dataset):
                panels[(backbone, dataset)] = ax
            else:  # every method skipped this cell
                ax.set_axis_off()
                ax.set_title(f"{backbone} · {dataset}")
                ax.text(0.5, 0.5, "no sequential scores", ha="center", va="center",
                        color="gray", transform=ax.transAxes)
    legend_ax = fig.add_subplot(grid[:, -1])
    legend_ax.set_axis_off()
    return fig, panels, legend_ax


def _line(
    ax: Any, points: Sequence[CurvePoint], metric: str, style: Mapping[str, Any],
    label: str | None = None,
) -> Any:
    """The points having `metric`, by N, as a line with markers (error bars where a point has
    a std); None when no point has it."""
    have = sorted((p for p in points if metric in p.means), key=lambda p: p.n_edits)
    if not have:
        return None
    xs = [p.n_edits for p in have]
    ys = [p.means[metric] for p in have]
    errors = [p.stds.get(metric, 0.0) for p in have]
    options = {"linewidth": 1.6, "markersize": 6, "label": label or TITLES[metric], **style}
    if any(errors):
        return ax.errorbar(xs, ys, yerr=errors, capsize=3, **options)
    (handle,) = ax.plot(xs, ys, **options)
    return handle


def _format_panel(ax: Any, cell: Sequence[CurvePoint], title: str) -> None:
    """Log x ticked at the cell's N values, y 0-100, grid, labels and title."""
    from matplotlib.ticker import NullLocator

    ns = sorted({p.n_edits for p in cell})
    ax.set_xscale("log")
    ax.set_xlim(ns[0] / 1.5, ns[-1] * 1.5)
    ax.set_xticks(ns, labels=[str(n) for n in ns])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(-4, 104)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel("score (%)")
    ax.set_title(title)


def _legend(ax: Any, handles: Mapping[str, Any], title: str) -> None:
    ax.legend(list(handles.values()), list(handles), title=title, loc="center left",
              frameon=False)


def _method_style(index: int) -> dict[str, Any]:
    """The index-th method's colour, marker, and a dashed line once the colours come round."""
    return {
        "color": METHOD_COLORS[index % len(METHOD_COLORS)],
        "marker": METHOD_MARKERS[index % len(METHOD_MARKERS)],
        "linestyle": "-" if index < len(METHOD_COLORS) else "--",
    }


def _cell(points: Sequence[CurvePoint], backbone: str, dataset: str) -> list[CurvePoint]:
    return [p for p in points if p.backbone == backbone and p.dataset == dataset]


def _eval_labels(results: Mapping[str, Any]) -> tuple[str, str]:
    """(backbone, dataset) as the eval table names them: the model folder's name (else its
    model type) and "E-VQA eval" / "E-IC eval"."""
    backbone_info = results.get("backbone") or {}
    name = backbone_info.get("name_or_path") or backbone_info.get("model_type") or "?"
    backbone = Path(str(name).rstrip("/")).name or str(name)
    dataset_info = results.get("dataset") or {}
    task = dataset_info.get("task", "?")
    dataset = DATASET_NAMES.get(task, str(task))
    if dataset_info.get("split"):
        dataset += f" {dataset_info['split']}"
    return backbone, dataset


def _note(results: Mapping[str, Any]) -> str:
    """What the title adds: a scorer other than the paper's, the seeds a mean is over."""
    parts = []
    if results.get("scorer") not in (None, "paper"):
        parts.append(f"{results['scorer']} scorer")
    seeds = (results.get("settings") or {}).get("seeds") if "rows" in results else None
    if seeds and len(seeds) > 1:
        parts.append(f"mean ± sample std over {len(seeds)} seeds")
    return f" ({'; '.join(parts)})" if parts else ""


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The curve metrics of `values` that hold a finite number."""
    return {
        key: float(values[key])
        for key in CURVE_METRICS
        if isinstance(values.get(key), (int, float)) and not isinstance(values[key], bool)
        and math.isfinite(values[key])
    }


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))
