"""FT-V: fine-tune the vision side on the edit samples (the DualEdit paper's Table 2 baseline,
from MMEdit): what maps image features into the language model (LLaVA: the multi-modal
projector; BLIP-2: the Q-Former, its query tokens and the language projection), optionally with
the last blocks of the vision encoder."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from dualedit.editors.finetune.core import FineTuneEditor
from dualedit.editors.spec import MethodSpec
from dualedit.options import check_positive

#: Steps and lr per (model type, scale): "small" chosen on validation edits of the built-in
#: world's train split (docs/results.md, "FT-L and FT-V tuned"); "real" not from a paper (none
#: publishes them for these backbones): a start for tuning.
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("llava", "small"): {"steps": 20, "lr": 5e-4},
    ("blip-2", "small"): {"steps": 20, "lr": 5e-4},
    ("llava", "real"): {"steps": 20, "lr": 1e-4},
    ("blip-2", "real"): {"steps": 20, "lr": 1e-4},
}


@dataclasses.dataclass(frozen=True)
class FineTuneVisionConfig:
    """FT-V options.

    Attributes:
        vision_blocks: how many of the vision encoder's last blocks are tuned as well (0: none).
        steps: Adam steps per `apply`; None = the backbone's default (`DEFAULTS`).
        lr: learning rate; None = the backbone's default.
        batch_size: edit samples per forward (gradients accumulate over the batches).
    """

    vision_blocks: int = 0
    steps: int | None = None
    lr: float | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        blocks = self.vision_blocks
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ValueError(f"ft-v option vision_blocks: expected an int >= 0, got {blocks!r}")
        check_positive("ft-v", "steps", self.steps)
        check_positive("ft-v", "batch_size", self.batch_size, optional=False)
        check_positive("ft-v", "lr", self.lr, number=True)


class FineTuneVision(FineTuneEditor):
    """FT-V: the vision-to-language mapping (and `vision_blocks` last encoder blocks)."""

    name = "ft-v"
    Config = FineTuneVisionConfig
    DEFAULTS = DEFAULTS

    def targets(self) -> dict[str, nn.Module | nn.Parameter]:
        parts = dict(self.backbone.vision_adapter(self.model))
        blocks = self.backbone.vision_blocks(self.model)
        if self.config.vision_blocks > len(blocks):
            raise ValueError(
                f"ft-v option vision_blocks: {self.config.vision_blocks}, but the vision encoder "
                f"has {len(blocks)} blocks"
            )
        for i in range(len(blocks) - self.config.vision_blocks, len(blocks)):
            parts[f"vision_block_{i}"] = blocks[i]
        return parts


METHOD = MethodSpec(
    name=FineTuneVision.name,
    editor=FineTuneVision,
    summary="fine-tune the vision side (projector / Q-Former) on the edit (Adam, fixed steps); "
    "untrained",
)
