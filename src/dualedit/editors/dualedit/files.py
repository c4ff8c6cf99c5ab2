"""DualEdit's side of its editor folder (`editors/files.py`): the saved `DualEditConfig`, and the
adapter weights, loaded strictly.

The config JSON records the resolved `DualEditConfig`, the base model's name, model type, hidden
size, depth and weight fingerprint, and the versions of dualedit, transformers and torch. Every
config field is required; only format-1 folders (written before three fields existed) get those
fields' values of that time. Loading checks the base model and the weights strictly (missing and
unexpected keys, shapes, NaN).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dualedit.editors.dualedit.config import DualEditConfig
from dualedit.editors.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EditorFolder,
    read_editor_folder,
)
from dualedit.editors.weights import check_tensors
from dualedit.folders import check_finite
from dualedit.options import config_fields

METHOD = "dualedit"
#: What format-1 folders (no field yet) held: adapters trained the released way, gate key of then.
FORMAT_1_DEFAULTS = {"text_prompt_end": False, "text_keys": "all", "gate_key": "prompt_end_image"}

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "adapter_config",
    "merge_config",
    "load_adapter_tensors",
    "load_adapter_weights",
    "read_adapter_config",
]


def adapter_config(
    folder: EditorFolder, config_class: type[DualEditConfig] = DualEditConfig, method: str = METHOD
) -> DualEditConfig:
    """The `DualEditConfig` (or `config_class`, for a method built on DualEdit's adapters such
    as VisEdit, named `method`) saved in an editor folder (every field required).

    Raises:
        ValueError: another method's folder, or a config field missing or invalid (named).
    """
    path = folder.path / CONFIG_FILE
    meta = folder.meta
    if meta["method"] != method:
        raise ValueError(
            f"{path}: saved by method {meta['method']!r}, not {method!r} (dualedit.load_editor "
            "picks the class from the folder)"
        )
    fields = dict(meta["config"])
    if meta["format"] == 1:
        fields = {**FORMAT_1_DEFAULTS, **fields}
    missing = [name for name in config_fields(config_class) if name not in fields]
    if missing:
        raise ValueError(
            f"{path}: config lacks field(s) {missing}; the folder is incomplete or damaged"
        )
    for name in ("tau", "text_layer", "visual_layer"):
        if fields[name] is None:
            raise ValueError(f"{path}: config field {name!r} is null; a saved editor fixes it")
    return config_class.from_dict(fields, where=str(path))


def read_adapter_config(
    directory: str | os.PathLike, model_type: str, hidden_size: int
) -> DualEditConfig:
    """The `DualEditConfig` saved in `directory`, checked against the model it will sit on.

    Raises:
        FileNotFoundError: no adapter_config.json.
        ValueError: another method's folder, another model type or hidden size, a damaged
            file, a missing field, or an unknown format.
    """
    folder = read_editor_folder(directory)
    path = folder.path / CONFIG_FILE
    meta = folder.meta
    if meta.get("model_type") != model_type:
        raise ValueError(
            f"{path}: adapters were trained for model_type {meta.get('model_type')!r} "
            f"({meta.get('base_model') or 'unnamed base'}), this model is {model_type!r}"
        )
    if meta.get("hidden_size") != hidden_size:
        raise ValueError(
            f"{path}: adapters expect hidden size {meta.get('hidden_size')}, this model has "
            f"{hidden_size}"
        )
    return adapter_config(folder)


def load_adapter_weights(adapters: nn.Module, path: str | os.PathLike) -> None:
    """Load weights from a safetensors file into `adapters` strictly, casting to their dtype
    (the file is not verified against a manifest: prefer loading the whole folder).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, missing or unexpected keys (named), a shape that does
            not match, or NaN.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights {path} not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    load_adapter_tensors(adapters, tensors, where=str(path))


def load_adapter_tensors(
    adapters: nn.Module, tensors: dict[str, torch.Tensor], *, where: str = "adapters"
) -> None:
    """Load `tensors` into `adapters` strictly (names, shapes, floating dtypes, finite values),
    casting to their dtype."""
    check_tensors(adapters.state_dict(), tensors, where=where)
    wrong = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if wrong:
        raise ValueError(f"{where}: tensors {wrong} are not floating point")
    check_finite(tensors, where)
    adapters.load_state_dict(tensors, strict=True)


def merge_config(
    saved: DualEditConfig, given: dict[str, Any], method: str = "dualedit"
) -> DualEditConfig:
    """The saved config with the run-time fields of `given` replaced."""
    known = config_fields(type(saved))
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(
            f"method {method!r}: unknown option(s) {unknown}; known: {sorted(known)}"
        )
    changed = [k for k in saved.architecture if k in given and given[k] != getattr(saved, k)]
    if changed:
        raise ValueError(
            f"{method}: {changed} differ from the saved adapters' "
            f"{ {k: getattr(saved, k) for k in changed} }; the weights fix them"
        )
    return dataclasses.replace(saved, **given)
