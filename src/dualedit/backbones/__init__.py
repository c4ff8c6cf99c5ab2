"""Architecture knowledge (decoder layers, image positions, prompt text) per VLM family."""

from dualedit.backbones.base import Backbone, config_of, layer_output_tensor, replace_layer_output
from dualedit.backbones.blip2 import Blip2Backbone
from dualedit.backbones.llava import LlavaBackbone
from dualedit.backbones.registry import BACKBONES, get_backbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "Blip2Backbone",
    "LlavaBackbone",
    "config_of",
    "get_backbone",
    "layer_output_tensor",
    "replace_layer_output",
]
