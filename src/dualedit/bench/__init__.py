"""Benchmarks of the registered methods (`dualedit bench ...`).

quality.py   run_quality_bench: methods x backbones x datasets (x seeds) -> results.json, table.md;
             where the models and data come from (the built-in world, or a model and MMEdit folder)
cells.py     one cell: train (cached), evaluate, time one edit's apply; its resumable file
table.py     the cells' aggregates over seeds and the Markdown table shaped like the paper's Table 2
command.py   the `dualedit bench` subcommands (parsers light to import: the CLI starts fast)
"""

from typing import Any

__all__ = ["run_quality_bench"]


def __getattr__(name: str) -> Any:
    # `run_quality_bench` loads torch and the models' code: imported when first asked for.
    if name == "run_quality_bench":
        from dualedit.bench.quality import run_quality_bench

        return run_quality_bench
    raise AttributeError(f"module 'dualedit.bench' has no attribute {name!r}")
