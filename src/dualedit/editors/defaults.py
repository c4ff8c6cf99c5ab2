"""Per-backbone defaults of a method's options: one table per method, keyed by model type and
scale ("small": the built-in world's models; "real": LLaVA-1.5-7B, BLIP2-OPT-2.7B)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dualedit.backbones import Backbone

#: Models with fewer decoder layers than this get the small-model defaults (the built-in world's
#: models have 6); others the defaults for the real checkpoints.
SMALL_DEPTH = 12


def backbone_defaults(
    table: Mapping[tuple[str, str], dict[str, Any]], model: nn.Module, backbone: Backbone
) -> dict[str, Any]:
    """The row of `table` for `model` ((model type, scale); LLaVA's row of that scale for a
    model type the table lacks)."""
    scale = "small" if backbone.depth(model) < SMALL_DEPTH else "real"
    return table.get((model.config.model_type, scale), table[("llava", scale)])
