"""Plain JSON data from the values results and records hold: `jsonable`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


def jsonable(value: Any) -> Any:
    """`value` as plain JSON data (dataclasses as dicts, paths as strings, tuples as lists, sets
    sorted); TypeError on anything else."""
    return json.loads(json.dumps(value, default=_json_default, sort_keys=True))


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON data: {type(value).__name__} {value!r}")
