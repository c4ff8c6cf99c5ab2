"""Small VLMs of the real transformers architectures, pretrained on the built-in world.

tokenizer.py (word-level tokenizers from the world's words), configs.py (models and processors
per architecture and size), corpus.py (the pretraining corpus as tensors), vision.py (vision
warm-up and frozen tower features), evaluate.py (held-out accuracy, generation exact match),
pretrain.py (cached, atomic two-stage pretraining).
"""

from dualedit.small_vlm.configs import (
    SIZES,
    VLMSize,
    build_model,
    build_processor,
    num_image_tokens,
    parameter_counts,
    resolve_size,
)
from dualedit.small_vlm.pretrain import DEFAULT_SETTINGS, METRICS_FILE, TrainSettings, pretrain
from dualedit.small_vlm.tokenizer import build_tokenizer, build_world_tokenizer, world_words

__all__ = [
    "DEFAULT_SETTINGS",
    "METRICS_FILE",
    "SIZES",
    "TrainSettings",
    "VLMSize",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "build_world_tokenizer",
    "num_image_tokens",
    "parameter_counts",
    "pretrain",
    "resolve_size",
    "world_words",
]
