"""An edit's states and gate key parts, captured from the frozen model: one forward per batch of
samples that stops after layer max(text layer, visual layer), adapters off, no gradient (what
`DualEditor.apply` stores and `encode_edits` hands a trainer)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.prompts import Sample, encode, group_by_image
from dualedit.editors.base import ImageLoader
from dualedit.editors.capture import LayerTrace
from dualedit.editors.dualedit.memory import EditStates, edit_states, pad_states

Triple = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def capture_states(
    model: nn.Module,
    processor: Any,
    backbone: Backbone,
    hooks: Any,
    config: Any,
    samples: Sequence[Sample],
    load_image: ImageLoader,
    *,
    batch_size: int,
    device: torch.device,
) -> list[Triple]:
    """(text states, visual states, gate key parts) of each sample, in order.

    Args:
        hooks: the editor's `DualEditHooks` (disabled during the capture).
        config: the resolved `DualEditConfig` (text_layer, visual_layer, text_keys).
    """
    t, v = config.text_layer, config.visual_layer
    out: list[Any] = [None] * len(samples)
    # model.eval() walks every submodule (~4 ms on the small VLMs, a sixth of a forward):
    # only a model in training mode is switched, and switched back after.
    was_training = model.training
    if was_training:
        model.eval()
    try:
        for rows in group_by_image(samples).values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = encode(
                    [samples[i] for i in chunk], processor, backbone, load_image
                ).to(device)
                forward = functools.partial(backbone.forward_logits, model, batch.input_ids,
                                            batch.attention_mask, batch.pixel_values)
                with (
                    torch.no_grad(),
                    hooks.disabled(),
                    LayerTrace(model, backbone, [t, v], stop=True) as trace,
                ):
                    outputs = trace.run(forward)
                for row, i in enumerate(chunk):
                    out[i] = _edit_states(outputs, t, v, batch, row, config.text_keys)
    finally:
        if was_training:
            model.train()
    return out


def states_of(
    states: Sequence[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]],
    device: torch.device | str | None = None,
) -> EditStates:
    """Pad per-edit (text, visual, keys) triples into one `EditStates`, one edit per row."""
    text, text_mask = pad_states([s[0] for s in states], device)
    visual, visual_mask = pad_states([s[1] for s in states], device)
    keys = {k: torch.stack([s[2][k] for s in states]).to(text.device) for k in states[0][2]}
    return EditStates(text, text_mask, visual, visual_mask, keys)


def _edit_states(
    outputs: dict[int, torch.Tensor], t: int, v: int, batch: Any, row: int, text_keys: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One edit's trimmed states and gate key parts from a right-padded captured batch
    (`memory.edit_states` on that row alone, padding cut)."""
    n = int(batch.attention_mask[row].sum())
    one = slice(row, row + 1)
    states = edit_states(
        outputs[t][one, :n], outputs[v][one, :n], batch.attention_mask[one, :n],
        batch.image_mask[one, :n], batch.prompt_end[one], text_keys,
    )
    text = states.text[0].clone()  # [n_text, hidden]
    if v != t:
        visual = states.visual[0].clone()  # [n, hidden]
    else:
        visual = text if text.shape[0] == n else outputs[t][row, :n].clone()
    return text, visual, {k: key[0].clone() for k, key in states.keys.items()}
