"""`VisEditor`: VisEdit (Chen et al., "Attribution Analysis Meets Model Editing: Advancing
Knowledge Correction in Vision Language Models with VisEdit", AAAI 2025) on a frozen VLM.

One visual edit adapter on the image positions of one decoder layer (adapter.py), with no
similarity gate: every input with an image takes an edit (the nearest stored one when several
are held, by DualEdit's key at the same layer). An edit stores the frozen model's states of the
edit sample at that layer, as DualEdit's does. Everything else (hooks, edit memory, files, the
edited training pass) is DualEdit's: VisEdit differs only in its config (one layer, no text
adapter, no gate) and its adapter (the influence map).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from dualedit.editors.dualedit.adapter import CrossAttentionAdapter
from dualedit.editors.dualedit.config import ARCHITECTURE_FIELDS, DualEditConfig
from dualedit.editors.dualedit.editor import DualEditor
from dualedit.editors.visedit.adapter import InfluenceAdapter

#: The adapter layer as a fraction of the depth, per `config.model_type`: the VisEdit release's
#: configs (configs/vead/*.yaml) put it on layer 18 of LLaVA-1.5-7B's 32 and 19 of
#: BLIP2-OPT-2.7B's 32; other architectures get LLaVA's fraction.
LAYER_FRACTION: dict[str, float] = {"llava": 18 / 32, "blip-2": 19 / 32}


@dataclass(frozen=True)
class VisEditConfig(DualEditConfig):
    """VisEdit settings: DualEdit's fields, fixed to one visual adapter without a gate, plus
    the influence map.

    Attributes:
        visual_layer: the adapter's decoder layer (0-based). None: `LAYER_FRACTION` of the depth
            (18 of 32 for LLaVA, 19 of 32 for BLIP-2, as released).
        text_layer: must equal `visual_layer` (where the nearest stored edit is chosen); None:
            the same.
        width, heads: the adapter's attention space (released: 1024 wide, 8 heads; None: min(1024,
            hidden size)).
        influence: scale the adapter's update per image position by VisEdit's influence map
            (released: on). False: the plain visual adapter.
        influence_width: inner width of the map's MLPs (released: 1024; None: `width`).
        use_text, gate: False (VisEdit has neither a text adapter nor a gate).
        text_keys: "all" (the edit's states at every position, stored once).
        The other DualEdit fields (tau, gate_key, ...) keep their meaning for choosing the nearest
        of several stored edits; tau is unused.
    """

    architecture: ClassVar[tuple[str, ...]] = (*ARCHITECTURE_FIELDS, "influence", "influence_width")

    use_text: bool = False
    gate: bool = False
    text_keys: str = "all"
    influence: bool = True
    influence_width: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_text or self.gate or not self.use_visual:
            raise ValueError(
                "VisEditConfig: VisEdit has one visual adapter and no gate (use_text=False, "
                "gate=False, use_visual=True)"
            )
        if (
            self.text_layer is not None
            and self.visual_layer is not None
            and self.text_layer != self.visual_layer
        ):
            raise ValueError(
                f"VisEditConfig: text_layer {self.text_layer} must equal visual_layer "
                f"{self.visual_layer} (VisEdit reads and edits one layer)"
            )
        if not isinstance(self.influence, bool):
            raise ValueError(f"VisEditConfig: influence must be a bool, got {self.influence!r}")
        width = self.influence_width
        bad = isinstance(width, bool) or not isinstance(width, int) or width < 1
        if width is not None and bad:
            raise ValueError(f"VisEditConfig: influence_width must be an int >= 1, got {width!r}")

    def resolve(
        self,
        depth: int,
        hidden_size: int,
        model_type: str,
        dtype: torch.dtype = torch.float32,
    ) -> VisEditConfig:
        """A copy with every None field derived from the model (see `DualEditConfig.resolve`)."""
        layer = self.visual_layer if self.visual_layer is not None else self.text_layer
        if layer is None:
            fraction = LAYER_FRACTION.get(model_type, LAYER_FRACTION["llava"])
            layer = min(max(int(fraction * depth + 0.5), 0), depth - 1)
        tau = self.tau if self.tau is not None else 1.0  # unused without a gate
        resolved = DualEditConfig.resolve(
            dataclasses.replace(self, text_layer=layer, visual_layer=layer, tau=tau),
            depth, hidden_size, model_type, dtype,
        )
        if resolved.influence_width is None:
            resolved = dataclasses.replace(resolved, influence_width=resolved.width)
        return resolved


class VisEditor(DualEditor):
    """VisEdit: one visual edit adapter with VisEdit's influence map, no gate (see the module
    docstring). Built, used, saved and trained as `DualEditor` is.

    Example:
        >>> editor = VisEditor.from_pretrained(model, processor, "runs/visedit/best")
        >>> eid = editor.edit(image, "What colour is the ball? The answer is:", "blue")
    """

    name = "visedit"
    Config = VisEditConfig

    adapter_kinds = ("visual",)

    def _adapter_module(self, hidden: int, kind: str) -> CrossAttentionAdapter:
        return InfluenceAdapter(
            hidden,
            self.config.width,
            self.config.heads,
            influence=self.config.influence,
            influence_width=self.config.influence_width,
            dtype=self.config.torch_dtype,
        )
