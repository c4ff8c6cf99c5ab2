"""Where the model is, and putting it where the accelerator trains."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn


def place_model(model: nn.Module, accelerator: Accelerator) -> None:
    """Move `model` to `accelerator.device` unless it is there already or sharded
    (`hf_device_map`): what a caller of `train` does before building the trainable."""
    if not hasattr(model, "hf_device_map") and input_device(model) != accelerator.device:
        model.to(accelerator.device)


def input_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether `a` and `b` are one device ("cpu" and "cpu:0" are; "cuda" is the current GPU)."""
    if a.type != b.type:
        return False
    return a.type == "cpu" or a.index is None or b.index is None or a.index == b.index
