"""DualEdit adapter files: `adapter_config.json` + `adapter_model.safetensors`, no pickles.

The JSON records the resolved `DualEditConfig`, the base model's name, model type, hidden size and
depth, and the versions of dualedit and transformers. Loading checks the base model (type, hidden
size) and the weights strictly (missing and unexpected keys, shapes). Writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import transformers
from safetensors.torch import load_file
from torch import nn

import dualedit
from dualedit.editors.dualedit.config import DualEditConfig
from dualedit.io import atomic_save_safetensors, atomic_write_text

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FORMAT = 1


def save_adapters(
    directory: str | os.PathLike,
    adapters: nn.Module,
    config: DualEditConfig,
    *,
    base_model: str,
    model_type: str,
    hidden_size: int,
    depth: int,
) -> Path:
    """Write the adapters' weights and config under `directory`; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": ADAPTER_FORMAT,
        "config": config.to_dict(),
        "base_model": base_model,
        "model_type": model_type,
        "hidden_size": hidden_size,
        "depth": depth,
        "versions": {"dualedit": dualedit.__version__, "transformers": transformers.__version__},
    }
    tensors = {k: t.detach().cpu().contiguous() for k, t in adapters.state_dict().items()}
    atomic_save_safetensors(tensors, directory / WEIGHTS_FILE)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True))
    return directory


def read_adapter_config(
    directory: str | os.PathLike, model_type: str, hidden_size: int
) -> DualEditConfig:
    """The `DualEditConfig` saved in `directory`, checked against the model it will sit on.

    Raises:
        FileNotFoundError: no adapter_config.json.
        ValueError: another model type or hidden size, or an unknown format.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"adapter config {path} not found")
    meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not a DualEdit adapter config of format {ADAPTER_FORMAT}")
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
    tensors = load_file(str(path))
    own = adapters.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the adapter needs "
                f"{tuple(own[name].shape)}"
            )
    adapters.load_state_dict(tensors, strict=True)

