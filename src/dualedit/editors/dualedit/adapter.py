"""The DualEdit adapter: cross-attention from a layer's states to an edit sample's states.

`h_hat = h + W_o · MHA(W_q · LN(h), W_k · LN(h_e), W_v · LN(h_e))`, with padding of `h_e` masked.
The paper writes the un-normalised single-head form `h + softmax(h W1 (h_e W2)^T) h_e W3`; the
released code normalises both inputs and attends in a 1024-wide, 8-head space, as here. The output
projection starts at zero, so a fresh adapter is an exact identity (`h + 0`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionAdapter(nn.Module):
    """Multi-head cross-attention with a residual, identity at initialisation.

    Args:
        hidden_size: width of the decoder states (queries and edit states).
        width: width of the attention space (split over `heads`).
        heads: number of attention heads.
        dtype: parameter and compute dtype; inputs are cast to it and the update cast back.
        device: where the parameters live.

    Example:
        >>> adapter = CrossAttentionAdapter(4096, 1024, 8)
        >>> out = adapter(h, h_e, edit_mask)  # == h at initialisation
    """

    def __init__(
        self,
        hidden_size: int,
        width: int,
        heads: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"adapter width {width} is not divisible by heads {heads}")
        self.hidden_size = hidden_size
        self.width = width
        self.heads = heads
        kwargs = {"dtype": dtype, "device": device}
        self.norm_query = nn.LayerNorm(hidden_size, **kwargs)
        self.norm_edit = nn.LayerNorm(hidden_size, **kwargs)
        self.query = nn.Linear(hidden_size, width, **kwargs)
        # No key bias: it shifts all of a query's scores equally, which softmax ignores, so it
        # would only drift on rounding noise.
        self.key = nn.Linear(hidden_size, width, bias=False, **kwargs)
        self.value = nn.Linear(hidden_size, width, **kwargs)
        self.out = nn.Linear(width, hidden_size, **kwargs)
        # Zero output projection: the adapter adds exactly 0 until it is trained.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.out.weight.dtype

    def delta(
        self,
        h: torch.Tensor,
        h_edit: torch.Tensor,
        edit_mask: torch.Tensor,
        edit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The update the adapter adds to `h`, in `h`'s dtype.

        Args:
            h: [batch, n, hidden] queries (the selected positions of the layer output).
            h_edit: [u, m, hidden] edit samples' states at this layer.
            edit_mask: [u, m] bool, False on padding of `h_edit`.
            edit_rows: [batch] long, the row of `h_edit` each query row attends to; None: row i
                attends to row i (u == batch). Rows that share an edit share its keys and
                values, which are projected once per edit, not once per row.

        Returns:
            [batch, n, hidden].
        """
        batch, n, _ = h.shape
        u, m, _ = h_edit.shape
        heads, head_dim = self.heads, self.width // self.heads
        x = self.norm_query(h.to(self.dtype))  # [b, n, hidden]
        e = self.norm_edit(h_edit.to(self.dtype))  # [u, m, hidden]
        q = self.query(x).view(batch, n, heads, head_dim).transpose(1, 2)  # [b, heads, n, d]
        k = self.key(e).view(u, m, heads, head_dim).transpose(1, 2)  # [u, heads, m, d]
        v = self.value(e).view(u, m, heads, head_dim).transpose(1, 2)  # [u, heads, m, d]
        attend = edit_mask.to(torch.bool)[:, None, None, :]  # [u, 1, 1, m]
        if edit_rows is not None:
            k, v, attend = (t.index_select(0, edit_rows) for t in (k, v, attend))  # [b, ...]
        # One fused kernel (scaled by 1/sqrt(d), softmax over the unpadded edit positions).
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)  # [b, heads, n, d]
        mixed = mixed.transpose(1, 2).reshape(batch, n, self.width)  # [b, n, width]
        return self.out(mixed).to(h.dtype)  # [b, n, hidden]

    def forward(
        self, h: torch.Tensor, h_edit: torch.Tensor, edit_mask: torch.Tensor
    ) -> torch.Tensor:
        """`h` plus the adapter's update: [batch, n, hidden] -> [batch, n, hidden]."""
        return h + self.delta(h, h_edit, edit_mask)
