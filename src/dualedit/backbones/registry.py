"""Backbones by `config.model_type`: the one place that maps architectures to their classes."""

from __future__ import annotations

from typing import Any

from dualedit.backbones.base import Backbone, config_of
from dualedit.backbones.blip2 import Blip2Backbone
from dualedit.backbones.llava import LlavaBackbone

BACKBONES: dict[str, type[Backbone]] = {
    LlavaBackbone.model_type: LlavaBackbone,
    Blip2Backbone.model_type: Blip2Backbone,
}


def get_backbone(model_or_config: Any) -> Backbone:
    """The backbone for a model or config, by `config.model_type`.

    Example:
        >>> backbone = get_backbone(model)
        >>> backbone.depth(model), backbone.hidden_size(model)
        (32, 4096)

    Raises:
        ValueError: the model type is not supported (the message lists the supported ones).
    """
    config = config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    cls = BACKBONES.get(model_type)
    if cls is None:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(BACKBONES)}")
    return cls(config)
