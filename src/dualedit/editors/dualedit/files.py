"""DualEdit's side of its editor folder (`editors/files.py`): the saved `DualEditConfig`, read
back with the legacy defaults of older folders, and the adapter weights, loaded strictly.

The config JSON records the resolved `DualEditConfig`, the base model's name, model type, hidden
size and depth, and the versions of dualedit, transformers and torch. Loading checks the base
model (type, hidden size) and the weights strictly (missing and unexpected keys, shapes).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dualedit.editors.dualedit.config import DualEditConfig
from dualedit.editors.files import CONFIG_FILE, WEIGHTS_FILE, read_editor_meta
from dualedit.editors.weights import check_tensors

METHOD = "dualedit"

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "load_adapter_tensors",
    "load_adapter_weights",
    "read_adapter_config",
]


def read_adapter_config(
    directory: str | os.PathLike, model_type: str, hidden_size: int
) -> DualEditConfig:
    """The `DualEditConfig` saved in `directory`, checked against the model it will sit on.

    Raises:
        FileNotFoundError: no adapter_config.json.
        ValueError: another method's folder, another model type or hidden size, or an unknown
            format.
    """
    path = Path(directory) / CONFIG_FILE
    meta = read_editor_meta(directory)
    if meta["method"] != METHOD:
        raise ValueError(
            f"{path}: saved by method {meta['method']!r}, not DualEdit (dualedit.load_editor "
            "picks the class from the folder)"
        )
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
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: no \"config\" object")
    fields = dict(meta["config"])
    # Files written before the field existed hold adapters trained the released way.
    fields.setdefault("text_prompt_end", False)
    fields.setdefault("text_keys", "all")
    # Before gate_key defaulted per architecture, a file without it meant this one.
    fields.setdefault("gate_key", "prompt_end_image")
    return DualEditConfig.from_dict(fields, where=str(path))


def load_adapter_weights(adapters: nn.Module, path: str | os.PathLike) -> None:
    """Load weights into `adapters` strictly, casting to their dtype.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing or unexpected keys (named), or a shape that does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights {path} not found")
    load_adapter_tensors(adapters, load_file(str(path)), where=str(path))


def load_adapter_tensors(
    adapters: nn.Module, tensors: dict[str, torch.Tensor], *, where: str = "adapters"
) -> None:
    """Load `tensors` into `adapters` strictly (names and shapes), casting to their dtype."""
    check_tensors(adapters.state_dict(), tensors, where=where)
    adapters.load_state_dict(tensors, strict=True)
