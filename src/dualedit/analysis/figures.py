"""Writing what an analysis found: PNG figures (matplotlib, headless) and the JSON of the numbers
behind them, each written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dualedit.io import atomic_write_text, atomic_write_with


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG at `path` (atomically) and close it."""
    plt = pyplot()
    try:
        fig.tight_layout()
        return atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """`data` as indented JSON at `path` (atomically); NaN / inf are written as null."""
    return atomic_write_text(path, json.dumps(_finite(data), indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "analysis") -> dict[str, Any]:
    """A JSON object written by `write_json`; a clear error naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable {what} JSON file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} file holds a JSON object, got {type(data).__name__}")
    return data


def as_written(data: Any) -> Any:
    """`data` as `read_json` gives it back after `write_json` (tuples as lists, string keys,
    NaN as None): for comparing settings with those stored in a file."""
    return json.loads(json.dumps(_finite(data), sort_keys=True))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
