"""Evaluation: scorers, the single and sequential protocols, the harness and the report."""

from dualedit.eval.harness import evaluate
from dualedit.version import versions
from dualedit.eval.report import markdown_table, read_results, write_results
from dualedit.eval.results import Results, RunResult, mean_metrics
from dualedit.eval.scorers import SCORERS, Scorer, exact_match, get_scorer

__all__ = [
    "SCORERS",
    "Results",
    "RunResult",
    "Scorer",
    "evaluate",
    "exact_match",
    "get_scorer",
    "markdown_table",
    "mean_metrics",
    "read_results",
    "versions",
    "write_results",
]
