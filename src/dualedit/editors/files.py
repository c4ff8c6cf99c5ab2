"""Editor folders, the same for every method (PEFT-style, no pickles):

- `adapter_config.json`: `{"method": name, "format": 2, "config": {...}, "base_model",
  "model_type", "hidden_size", "depth", "versions", ...}` plus what the method adds (for a weight
  editor: the edits it holds); loading dispatches on `"method"`;
- `adapter_model.safetensors`: the method's tensors, when it has any (adapters, edited weights).

DualEdit adapter folders written before the `"method"` field existed (format 1) are read as
method "dualedit".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dualedit.io import atomic_save_safetensors, atomic_write_text
from dualedit.options import read_json_object
from dualedit.version import versions

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EDITOR_FORMAT = 2
#: Format 1: DualEdit adapter folders without a "method" field.
READABLE_FORMATS = (1, 2)
LEGACY_METHOD = "dualedit"


def write_editor_folder(
    directory: str | os.PathLike,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `meta` (with "method"; "format" and "versions" are added) and `tensors` (if any).

    The tensors are written first and the config last, each atomically, so a config on disk
    always names complete weights.
    """
    if not meta.get("method"):
        raise ValueError("an editor folder's config needs its method's name")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    record = {**meta, "format": EDITOR_FORMAT, "versions": versions()}
    weights = directory / WEIGHTS_FILE
    if tensors:
        atomic_save_safetensors(
            {k: t.detach().cpu().contiguous() for k, t in tensors.items()}, weights
        )
    elif weights.exists():
        weights.unlink()  # a method without tensors leaves none of an earlier save behind
    atomic_write_text(directory / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True))
    return directory


def read_editor_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The config JSON of an editor folder, with "method" filled in for legacy DualEdit folders.

    Raises:
        FileNotFoundError: no folder, or no config file in it.
        ValueError: not valid JSON, not an object, or an unknown format.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        what = "no such folder" if not directory.is_dir() else "not a saved editor folder"
        raise FileNotFoundError(f"{path} not found ({directory}: {what})")
    meta = read_json_object(path, what="editor config")
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{path}: editor folder format {meta.get('format')!r}; this version reads "
            f"{list(READABLE_FORMATS)}"
        )
    if meta["format"] == 1:
        meta = {**meta, "method": LEGACY_METHOD}
    if not isinstance(meta.get("method"), str) or not meta["method"]:
        raise ValueError(f"{path}: no \"method\" field naming the editing method")
    return meta


def read_editor_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an editor folder ({} when it has none)."""
    path = Path(directory) / WEIGHTS_FILE
    return load_file(str(path)) if path.is_file() else {}


def saved_method(directory: str | os.PathLike) -> str:
    """The method name an editor folder was saved by."""
    return read_editor_meta(directory)["method"]
