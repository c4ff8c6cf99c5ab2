"""What an evaluation produces: per-record metrics, their means, and how they were obtained."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dualedit.eval.scorers import AVG_KEYS

#: Metric keys in report order; `avg` is derived, `gen_em` comes from generation.
METRIC_KEYS = ("rel", "t_gen", "v_gen", "t_loc", "m_loc", "m_loc_hard", "gen_em")


@dataclass
class RunResult:
    """One scored set of records: all records (single-edit) or the first N (sequential).

    `records` holds one dict per record: {"index": int, <metric>: fraction in [0, 1], ...} and,
    with generation, "gen_text" (the decoded answer).
    `means` holds the means over records x100 and "avg" (mean of the five paper metrics).
    """

    n_edits: int | None
    records: list[dict[str, Any]]
    means: dict[str, float]
    wall_s: float
    records_per_s: float


@dataclass
class Results:
    """Everything `write_results` saves: metrics plus the protocol, scorer and versions."""

    method: str
    editor_options: dict[str, Any]
    backbone: dict[str, Any]
    dataset: dict[str, Any]
    protocol: str
    scorer: str
    prompt_protocol: Any
    settings: dict[str, Any]
    versions: dict[str, str]
    time: str
    runs: list[RunResult] = field(default_factory=list)
    wall_s: float = 0.0
    records_per_s: float = 0.0


def mean_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means x100 of the metrics, plus "avg" (mean of the five paper metrics).

    The five paper metrics must be in every record. The optional ones (hard M-Loc, generation
    exact match) are averaged over the records that have them.

    Raises:
        ValueError: when no records are given, or a record lacks one of the five.
    """
    if not records:
        raise ValueError("cannot average metrics of zero records")
    means = {}
    for key in METRIC_KEYS:
        values = [record[key] for record in records if key in record]
        if key in AVG_KEYS and len(values) < len(records):
            lacking = [record.get("index") for record in records if key not in record]
            raise ValueError(f"metric {key!r} is missing for records {lacking[:5]}")
        if values:
            means[key] = 100.0 * math.fsum(values) / len(values)
    if all(key in means for key in AVG_KEYS):
        means["avg"] = math.fsum(means[key] for key in AVG_KEYS) / len(AVG_KEYS)
    return means
