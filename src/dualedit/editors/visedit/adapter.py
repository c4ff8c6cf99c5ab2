"""VisEdit's visual edit adapter (VEAD): DualEdit's cross-attention adapter on the image
positions, its update scaled per image position by VisEdit's influence map.

`h_hat_i = h_i + m_i * W_o MHA(W_q LN(h_i), W_k LN(h_e), W_v LN(h_e))` at every image position i,
with `m_i = sigmoid(mean over heads of <f(LN(h_i)), g(LN(e))>_head / sqrt(hidden / heads))`, where
`e` is the edit sample's state at its last prompt token (same layer) and f, g are residual MLPs
(`x + W2 relu(W1 x)`). The map lets an edit change only the image regions its prompt points at.
Facts from the VisEdit release (qizhou000/VisEdit, editor/vllm_editors/vead/adpt_model.py); the
cross-attention is DualEdit's (`CrossAttentionAdapter`: one query projection where VisEdit
composes two linear maps, which is the same family of functions; output projection zero at
initialisation, so a fresh adapter is an identity).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dualedit.editors.dualedit.adapter import CrossAttentionAdapter


class ResidualMLP(nn.Module):
    """`x + W2 relu(W1 x)`: [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, width: int, **kwargs):
        super().__init__()
        self.inner = nn.Linear(dim, width, **kwargs)
        self.outer = nn.Linear(width, dim, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.relu(self.inner(x)))


class InfluenceMap(nn.Module):
    """How much each image position takes the edit: [b, n, hidden] x [b, hidden] -> [b, n] in
    (0, 1).

    Args:
        hidden_size: width of the decoder states.
        width: inner width of the two residual MLPs.
        heads: the dot product is taken per head of `hidden_size / heads` and averaged.
    """

    def __init__(self, hidden_size: int, width: int, heads: int, **kwargs):
        super().__init__()
        if hidden_size % heads:
            raise ValueError(
                f"influence map: hidden size {hidden_size} is not divisible by {heads} heads"
            )
        self.heads = heads
        self.norm_image = nn.LayerNorm(hidden_size, **kwargs)
        self.norm_edit = nn.LayerNorm(hidden_size, **kwargs)
        self.image_map = ResidualMLP(hidden_size, width, **kwargs)
        self.edit_map = ResidualMLP(hidden_size, width, **kwargs)

    def forward(self, h: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        b, n, hidden = h.shape
        d = hidden // self.heads
        x = self.image_map(self.norm_image(h)).view(b, n, self.heads, d)  # [b, n, heads, d]
        a = self.edit_map(self.norm_edit(anchor)).view(b, self.heads, d)  # [b, heads, d]
        scores = torch.einsum("bnhd,bhd->bnh", x, a).mean(dim=-1) / math.sqrt(d)  # [b, n]
        return torch.sigmoid(scores)


class InfluenceAdapter(CrossAttentionAdapter):
    """`CrossAttentionAdapter` whose update is scaled by an `InfluenceMap` (when `influence`).

    Args:
        hidden_size, width, heads, dtype, device: as for `CrossAttentionAdapter`.
        influence: scale the update by the influence map (False: DualEdit's visual adapter).
        influence_width: inner width of the map's MLPs.
    """

    def __init__(
        self,
        hidden_size: int,
        width: int,
        heads: int,
        *,
        influence: bool = True,
        influence_width: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(hidden_size, width, heads, dtype=dtype, device=device)
        self.influence = None
        if influence:
            self.influence = InfluenceMap(
                hidden_size, influence_width or width, heads, dtype=dtype, device=device
            )

    @property
    def uses_anchor(self) -> bool:
        """The hooks pass each edit's last-prompt-token state (`anchor`) to `delta`."""
        return self.influence is not None

    def delta(
        self,
        h: torch.Tensor,
        h_edit: torch.Tensor,
        edit_mask: torch.Tensor,
        edit_rows: torch.Tensor | None = None,
        anchor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The update of `CrossAttentionAdapter.delta`, times the influence map.

        Args:
            h, h_edit, edit_mask, edit_rows: as for `CrossAttentionAdapter.delta`.
            anchor: [u, hidden] each edit's state at its last prompt token (required with the
                influence map).

        Returns:
            [batch, n, hidden].
        """
        update = super().delta(h, h_edit, edit_mask, edit_rows)  # [b, n, hidden]
        if self.influence is None:
            return update
        if anchor is None:
            raise ValueError("VisEdit's influence map needs each edit's last prompt-token state")
        if edit_rows is not None:
            anchor = anchor.index_select(0, edit_rows)  # [b, hidden]
        weight = self.influence(h.to(self.dtype), anchor.to(self.dtype))  # [b, n]
        return update * weight[..., None].to(update.dtype)
