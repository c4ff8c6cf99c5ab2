"""Typed configs from user input: dataclasses built from dicts, JSON files and KEY=VALUE pairs.

Every method's config is a frozen dataclass validated in its `__post_init__`; these helpers build
one from what a user typed, refusing unknown keys by name (a typo is an error, never a silently
ignored setting), and save it as sorted JSON. A leaf module: it imports nothing of dualedit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def config_fields(cls: type) -> tuple[str, ...]:
    """The field names of a config dataclass."""
    return tuple(f.name for f in dataclasses.fields(cls))


def config_from_dict(cls: type[T], data: Any, *, where: str = "config") -> T:
    """`cls(**data)`, with unknown keys refused by name.

    Raises:
        TypeError: `data` is not a dict.
        ValueError: unknown keys (named, with the known ones), or what the dataclass's own
            validation raises.

    Example:
        >>> config_from_dict(FineTuneConfig, {"steps": 5})
        FineTuneConfig(layer=None, steps=5, lr=None, batch_size=8)
    """
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a JSON object of options, got {type(data).__name__}")
    known = config_fields(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


def check_positive(
    where: str, name: str, value: Any, *, number: bool = False, optional: bool = True
) -> None:
    """ValueError naming option `name` of `where` unless `value` is a positive int (a positive
    number with `number`), or None when `optional`."""
    if value is None and optional:
        return
    types = (int, float) if number else (int,)
    if isinstance(value, bool) or not isinstance(value, types) or not value > 0:
        what = "a positive number" if number else "a positive int"
        raise ValueError(
            f"{where} option {name}: expected {what}{' or null' if optional else ''}, got {value!r}"
        )


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (its own `to_dict` when it has one)."""
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else dataclasses.asdict(config)


def config_to_json(config: Any) -> str:
    """Sorted, indented JSON of a config dataclass."""
    return json.dumps(config_to_dict(config), indent=2, sort_keys=True)


def read_json_object(path: str | os.PathLike, *, what: str = "config") -> dict[str, Any]:
    """A JSON object from a file, with errors that name the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON, or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def parse_option_pairs(pairs: list[str], *, flag: str = "--option") -> dict[str, Any]:
    """`["tau=0.7", "gate_key=last_position", "gate=false"]` -> {"tau": 0.7, ...}.

    Values are read as JSON when they parse (numbers, true/false, null, lists), else kept as
    strings. A key given twice keeps its last value.

    Raises:
        ValueError: an item without "=" or with an empty key.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options
