"""SERAC's scope classifier, embedding form (SERAC's default `cross_attend: false`).

An encoder maps an input (image and text) to a vector f(x); an edit e and a query q are in scope
with probability

    p(e, q) = exp(-||f(e) - f(q)||^2)              (squared L2, fixed scale 1)

No text encoder can be downloaded here, so f is the FROZEN base VLM's hidden states after one
decoder layer, mean-pooled over the input's positions (image positions included: the classifier
sees the image), layer-normalised (no affine: real VLMs' hidden states differ in scale by orders
of magnitude between layers and models) and mapped by a trained 2-layer MLP. An edit is encoded
as its edit sample "prompt target" with its image (SERAC caches "input [SEP] label"), a query as
its prompt with its image, without any target.

Training uses SERAC's balanced binary cross-entropy: mean(-log p) over the in-scope pairs plus
mean(-log(1 - p)) over the out-of-scope pairs (`balanced_bce`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dualedit.backbones import Backbone
from dualedit.editors.capture import LayerTrace


class ScopeClassifier(nn.Module):
    """The trained part of the scope classifier: layer norm (no affine) and a 2-layer GELU MLP
    from the frozen encoder's pooled states to the embedding in which distances are measured.

    The output is scaled by 1/sqrt(width) (as attention scales its logits) so that squared
    distances start O(1) whatever the width.

    Args:
        hidden: the width of the pooled states (the VLM's hidden size).
        width: the MLP's inner and output width.

    Example:
        >>> classifier = ScopeClassifier(128, 256)
        >>> d2 = squared_distances(classifier(query_states), classifier(edit_states))  # [q, n]
    """

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.hidden = hidden
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[batch, hidden] pooled states -> [batch, width] embeddings (float32)."""
        x = F.layer_norm(pooled.float(), (self.hidden,))  # [batch, hidden]
        return self.mlp(x) / math.sqrt(self.width)  # [batch, width]


def squared_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """||q - k||^2 of every query to every key: [q, width], [n, width] -> [q, n] (computed from
    the differences, not the expanded form, so near-equal embeddings lose no precision)."""
    return (queries[:, None, :] - keys[None, :, :]).pow(2).sum(dim=-1)  # [q, n]


def log_out_of_scope(d2: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-d2)), stably for every d2 >= 0 (-inf avoided by a floor on d2)."""
    d2 = d2.clamp_min(1e-6)
    small = d2 < math.log(2)
    return torch.where(
        small,
        torch.log(-torch.expm1(-d2.clamp_max(math.log(2)))),
        torch.log1p(-torch.exp(-d2.clamp_min(math.log(2)))),
    )


def balanced_bce(d2: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """SERAC's balanced BCE of squared distances `d2` (log p = -d2): the mean of -log p over the
    pairs where `positive` (same shape, bool) is True plus the mean of -log(1 - p) over the
    others. Both kinds must be present."""
    negative = ~positive
    if not bool(positive.any()) or not bool(negative.any()):
        raise ValueError("balanced_bce needs in-scope and out-of-scope pairs")
    return d2[positive].mean() - log_out_of_scope(d2[negative]).mean()


def prompt_positions(
    attention_mask: torch.Tensor, prompt_end: torch.Tensor
) -> torch.Tensor:
    """[batch, seq] bool: the unpadded positions up to and including each row's prompt end (a
    query is read without its target)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [seq]
    return attention_mask.bool() & (pos[None] <= prompt_end.to(pos.device)[:, None])


def pack_left(
    input_ids: torch.Tensor, keep: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens at `keep` moved to the start, right-padded: (input_ids, attention_mask)
    [batch, width]. The encoder then sees every input as it sees it alone, whatever the padding
    side of the batch (left-padded prompts would shift Llama's positions)."""
    lengths = keep.sum(dim=1)  # [batch]
    width = max(int(lengths.max()), 1)
    ids = torch.full((input_ids.shape[0], width), pad_id, dtype=input_ids.dtype,
                     device=input_ids.device)
    mask = torch.arange(width, device=input_ids.device)[None] < lengths[:, None]  # [batch, width]
    ids[mask] = input_ids[keep]
    return ids, mask.long()


def pooled_states(
    model: nn.Module,
    backbone: Backbone,
    layer: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
) -> torch.Tensor:
    """The frozen model's output of decoder layer `layer`, mean-pooled over the unpadded
    positions: [batch, hidden] float32. One forward that stops after that layer, no gradient.

    `input_ids` must be right-padded (see `pack_left`); image positions are pooled with the rest.
    """
    with torch.no_grad(), LayerTrace(model, backbone, [layer], stop=True) as trace:
        outputs = trace.run(
            lambda: backbone.forward_logits(model, input_ids, attention_mask, pixel_values)
        )
    hidden = outputs[layer].float()  # [batch, seq, hidden]
    mask = attention_mask.to(hidden.device)[:, :, None].float()  # [batch, seq, 1]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)  # [batch, hidden]


def encoded_states(
    model: nn.Module,
    backbone: Backbone,
    layer: int,
    batch: Any,
    pad_id: int,
    *,
    prompt_only: bool,
) -> torch.Tensor:
    """`pooled_states` of an `EncodedBatch` / `PromptBatch`: each row's prompt alone
    (`prompt_only`, a query) or its whole unpadded input (an edit sample "prompt target")."""
    keep = batch.attention_mask.bool()
    if prompt_only:
        keep = prompt_positions(batch.attention_mask, batch.prompt_end)
    input_ids, attention_mask = pack_left(batch.input_ids, keep, pad_id)
    return pooled_states(model, backbone, layer, input_ids, attention_mask, batch.pixel_values)
