"""FT-L: fine-tune the last language-model layer's MLP on the edit samples (the DualEdit paper's
Table 2 baseline: "fine-tunes last layer of the language model")."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from dualedit.backbones import Backbone
from dualedit.editors.finetune.core import FineTuneEditor
from dualedit.editors.spec import MethodSpec
from dualedit.options import check_positive

#: Steps and lr per (model type, scale). "small": the built-in world's 6-layer models, chosen on
#: validation edits of the train split (docs/results.md, "FT-L and FT-V tuned"); "real":
#: LLaVA-1.5-7B / BLIP2-OPT-2.7B, not from a paper (none publishes them for these backbones): a
#: start for tuning, at the rate MMEdit-style fine-tuning baselines use for one 7B layer.
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # Validation Avg (E-VQA, 64 edits): LLaVA 99.4 (steps 10-20 x lr 5e-4, 2e-3); BLIP-2 99.7
    # (steps 10-40 x lr 5e-4, 2e-3, 1e-2; 5e-4 reached Rel 20 in 20 steps).
    ("llava", "small"): {"steps": 20, "lr": 5e-4},
    ("blip-2", "small"): {"steps": 20, "lr": 2e-3},
    ("llava", "real"): {"steps": 20, "lr": 1e-4},
    ("blip-2", "real"): {"steps": 20, "lr": 1e-4},
}


@dataclasses.dataclass(frozen=True)
class FineTuneConfig:
    """FT-L options.

    Attributes:
        layer: 0-based decoder layer whose MLP is fine-tuned; None = the last one.
        steps: Adam steps per `apply`; None = the backbone's default (`DEFAULTS`).
        lr: learning rate; None = the backbone's default.
        batch_size: edit samples per forward (gradients accumulate over the batches).
    """

    layer: int | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        layer = self.layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ValueError(f"ft-l option layer: expected an int or None, got {self.layer!r}")
        check_positive("ft-l", "steps", self.steps)
        check_positive("ft-l", "batch_size", self.batch_size, optional=False)
        check_positive("ft-l", "lr", self.lr, number=True)


class FineTuneLayer(FineTuneEditor):
    """FT-L on decoder layer `layer`'s MLP (default: the last decoder layer)."""

    name = "ft-l"
    Config = FineTuneConfig
    DEFAULTS = DEFAULTS

    def __init__(self, model: nn.Module, processor: Any, backbone: Backbone | None = None, **kw):
        self.layer: int | None = None
        super().__init__(model, processor, backbone, **kw)

    def targets(self) -> dict[str, nn.Module]:
        depth = self.backbone.depth(self.model)
        self.layer = self.config.layer if self.config.layer is not None else depth - 1
        return {"mlp": self.backbone.mlp(self.model, self.layer)}  # validates the layer index

    def config_dict(self) -> dict[str, Any]:
        """The config with the layer, steps and lr resolved."""
        return {**super().config_dict(), "layer": self.layer}


METHOD = MethodSpec(
    name=FineTuneLayer.name,
    editor=FineTuneLayer,
    summary="fine-tune the last language-model layer's MLP on the edit (Adam, fixed steps); "
    "untrained",
)
