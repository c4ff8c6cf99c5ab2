"""`GateDecision`: what the DualEdit hooks decide for one question (which stored edit is nearest,
how similar, whether the question is edited), read from a forward that stops at the text layer.
`DualEditor.explain` is the user's entry point."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

from dualedit.editors.base import EditId
from dualedit.editors.dualedit.config import DualEditConfig
from dualedit.editors.dualedit.hooks import CallContext


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


def decision_of(
    ctx: CallContext, row: int, ids: Sequence[EditId], config: DualEditConfig
) -> GateDecision:
    """Row `row`'s decision from a context whose first pass has run (`ids`: the memory's ids in
    lookup order; `config`: the editor's resolved config)."""
    if not ctx.decided or ctx.similarity is None:
        return GateDecision(None, math.nan, False, False)
    position = int(ctx.chosen[row])
    edit_id = ids[position] if position >= 0 else None
    gate_open = bool(ctx.open[row])
    visual_ungated = (
        config.use_visual and config.gate_scope == "text" and bool(ctx.image_mask[row].any())
    )
    return GateDecision(edit_id, float(ctx.similarity[row]), gate_open, gate_open or visual_ungated)
