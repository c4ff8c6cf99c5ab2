"""`GateDecision`: what the DualEdit hooks decide for one question (which stored edit is nearest,
how similar, whether the question is edited), read from a forward that stops at the text layer.
`DualEditor.explain` is the user's entry point."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dualedit.data.prompts import Sample, encode_prompts
from dualedit.editors.dualedit.capture import LayerCapture
from dualedit.editors.dualedit.hooks import CallContext
from dualedit.editors.dualedit.memory import EditId

if TYPE_CHECKING:
    from PIL import Image

    from dualedit.editors.dualedit.editor import DualEditor


@dataclass(frozen=True)
class GateDecision:
    """The hooks' decision for one input.

    Attributes:
        edit_id: the nearest stored edit (None: no edit stored).
        similarity: cosine similarity of the input's gate key to that edit's (NaN: none stored).
        gate_open: the similarity reaches tau (always True with the gate off and an edit stored).
        edited: some adapter changes this input: the gate is open, or the visual adapter acts on
            every image input (`gate_scope="text"`).
    """

    edit_id: EditId | None
    similarity: float
    gate_open: bool
    edited: bool


def decision_of(editor: DualEditor, ctx: CallContext, row: int) -> GateDecision:
    """Row `row`'s decision from a context whose first pass has run."""
    if not ctx.decided or ctx.similarity is None:
        return GateDecision(None, math.nan, False, False)
    position = int(ctx.chosen[row])
    edit_id = editor.memory.ids[position] if position >= 0 else None
    gate_open = bool(ctx.open[row])
    config = editor.config
    visual_ungated = (
        config.use_visual and config.gate_scope == "text" and bool(ctx.image_mask[row].any())
    )
    return GateDecision(edit_id, float(ctx.similarity[row]), gate_open, gate_open or visual_ungated)


def explain(editor: DualEditor, image: Image.Image | None, prompt: str) -> GateDecision:
    """The decision for `prompt` (as the model sees it, e.g. "What is it? The answer is:") on
    `image` (a PIL image or None), as `model.generate` on that prompt would take it."""
    if not isinstance(prompt, str):
        raise TypeError(f"explain: prompt must be a string, got {type(prompt).__name__}")
    sample = Sample(None if image is None else "query", prompt, "")
    batch = encode_prompts(
        [sample], editor.processor, editor.backbone, lambda _: image.convert("RGB")
    ).to(next(editor.model.parameters()).device)
    layer = editor.config.text_layer

    def forward() -> torch.Tensor:
        return editor.backbone.forward_logits(
            editor.model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )

    with (
        torch.no_grad(),
        editor.session(batch.input_ids, batch.attention_mask) as ctx,
        LayerCapture(editor.model, editor.backbone, [layer]) as capture,
    ):
        capture.run(forward)  # registered after the editor's hooks: the gate decides first
    return decision_of(editor, ctx, 0)
