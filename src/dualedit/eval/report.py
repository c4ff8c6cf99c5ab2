"""results.json (atomic, sorted) and the paper-style markdown table."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

from dualedit.eval.results import Results, RunResult
from dualedit.io import atomic_write_text

#: Columns of the paper's Table 2 after method | backbone | dataset.
TABLE_COLUMNS = (
    ("rel", "Rel"),
    ("t_gen", "T-Gen"),
    ("v_gen", "V-Gen"),
    ("t_loc", "T-Loc"),
    ("m_loc", "M-Loc"),
    ("avg", "Avg"),
)
#: Extra columns, shown only when some row has them.
OPTIONAL_COLUMNS = (("m_loc_hard", "Hard M-Loc"), ("gen_em", "Gen-EM"))
DATASET_NAMES = {"vqa": "E-VQA", "caption": "E-IC"}


def results_dict(results: Results) -> dict:
    """The JSON-ready dict of `results`, with a note on the units."""
    data = dataclasses.asdict(results)
    data["units"] = "records[*][metric] are fractions in [0, 1]; means are percentages"
    return data


def write_results(results: Results, path: str | os.PathLike) -> Path:
    """Write `results` as sorted JSON to `path` atomically (temp file, then os.replace).

    Returns:
        The path written.
    """
    path = Path(path)
    text = json.dumps(results_dict(results), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def read_results(path: str | os.PathLike) -> Results:
    """Load a results.json written by `write_results`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    data.pop("units", None)
    fields = {f.name for f in dataclasses.fields(Results)}
    unknown = sorted(set(data) - fields)
    missing = sorted(f.name for f in dataclasses.fields(Results) if f.name not in data)
    if unknown or missing:
        raise ValueError(f"{path}: not a results file (unknown {unknown}, missing {missing})")
    data["runs"] = [RunResult(**run) for run in data["runs"]]
    return Results(**data)


def _row_labels(results: Results, run: RunResult) -> tuple[str, str, str]:
    method = results.method
    if run.n_edits is not None:
        method += f" (seq N={run.n_edits})"
    if results.scorer != "paper":
        method += f" [{results.scorer}]"
    backbone = results.backbone.get("name_or_path") or results.backbone.get("model_type", "?")
    backbone = Path(str(backbone).rstrip("/")).name or str(backbone)
    task = results.dataset.get("task", "?")
    dataset = DATASET_NAMES.get(task, str(task))
    split = results.dataset.get("split")
    if split:
        dataset += f" {split}"
    return method, backbone, dataset


def markdown_table(results_list: Results | Sequence[Results]) -> str:
    """A markdown table shaped like the paper's Table 2, one row per run.

    Columns: method | backbone | dataset | Rel | T-Gen | V-Gen | T-Loc | M-Loc | Avg, then
    Hard M-Loc and Gen-EM when some row has them ("-" where a row lacks them). Numbers are
    percentages with 2 decimals. A sequential run's method reads "ft-l (seq N=10)"; a scorer
    other than "paper" is named in brackets. A single `Results` is one table too.
    """
    if isinstance(results_list, Results):
        results_list = [results_list]
    runs = [(results, run) for results in results_list for run in results.runs]
    columns = list(TABLE_COLUMNS)
    columns += [col for col in OPTIONAL_COLUMNS if any(col[0] in run.means for _, run in runs)]
    header = ["method", "backbone", "dataset"] + [title for _, title in columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * len(columns)) + "|",
    ]
    for results, run in runs:
        cells = list(_row_labels(results, run))
        cells += [f"{run.means[key]:.2f}" if key in run.means else "-" for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
