"""What one plain model call was given, read from the inputs at the modules every forward of both
backbones passes through (used by `hooks.HookSet` for automatic per-call contexts).

`model(**inputs)` and `model.generate(**inputs)` give a hook-based method no image positions or
prompt ends of their own. They are read from the inputs instead, at two places every forward of
both backbones passes through (checked for transformers 5.24):

- the language model's input embedding module receives the token ids *with* the image
  placeholders still in them: LLaVA's forward embeds `input_ids` before scattering the image
  features in; BLIP-2's forward and its own `generate()` (which never calls the model's forward)
  do the same before handing `inputs_embeds` to the OPT language model;
- the decoder stack (the module owning the decoder layers: LLaVA's Llama model, BLIP-2's OPT
  decoder) is called with the 2-d `attention_mask` and the KV `cache` as keyword arguments, and
  with `input_ids` itself when the OPT language model is run on text alone.

So an embedding pre-hook remembers the ids, and the decoder stack's pre-hook turns ids and
attention mask into a `StackCall`; a pass whose cache already holds tokens is a decode step
(`continuation`): the cache carries what the prompt pass computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dualedit.backbones import Backbone


@dataclass
class StackCall:
    """What one call of the decoder stack was given.

    Attributes:
        input_ids: [batch, seq] token ids with image placeholders, or None when unknown.
        attention_mask: [batch, seq] bool, False on padding (None when `input_ids` is).
        continuation: the KV cache already holds earlier tokens (a decode step).
    """

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    continuation: bool


def decoder_stack(model: nn.Module, backbone: Backbone) -> nn.Module:
    """The module that owns the decoder layers (LLaVA: `model.model.language_model`; BLIP-2:
    `model.language_model.model.decoder`), found by identity as the parent of
    `backbone.decoder_layers(model)`.

    Raises:
        ValueError: no module of the model holds the decoder layers as a direct child.
    """
    layers = backbone.decoder_layers(model)
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError(f"{backbone}: no module of the model holds the decoder layers")


def embedding_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The [batch, seq] token ids an embedding module was called with, or None (e.g. the 0-d
    lookup of the image token that LLaVA and BLIP-2 make when given `inputs_embeds`)."""
    ids = args[0] if args else kwargs.get("input")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        return ids
    return None


def cached_length(kwargs: dict[str, Any]) -> int:
    """How many tokens the KV cache passed to the decoder stack already holds (0: none)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def stack_call(
    kwargs: dict[str, Any], pending_ids: torch.Tensor | None, pad_token_id: int | None
) -> StackCall:
    """Ids and attention mask of one decoder-stack call.

    Args:
        kwargs: the keyword arguments of the decoder stack's forward.
        pending_ids: the ids the input embedding module last saw (LLaVA, BLIP-2 with an image),
            used when the stack was given `inputs_embeds` only.
        pad_token_id: padding id, for the attention mask when the call has no 2-d mask.

    Returns:
        A `StackCall`; its `input_ids` is None when no ids of the pass's shape are known. Ids
        given for fewer rows than the pass (generate() repeats each input per beam / returned
        sequence) are repeated in place.

    Example:
        >>> seen = stack_call({"attention_mask": mask, "inputs_embeds": embeds}, ids, 0)
        >>> seen.input_ids.shape == mask.shape  # [batch, seq]
    """
    if cached_length(kwargs) > 0:
        return StackCall(None, None, continuation=True)
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        ids = pending_ids
    embeds = kwargs.get("inputs_embeds")
    if ids is None:
        return StackCall(None, None, continuation=False)
    batch, seq = embeds.shape[:2] if isinstance(embeds, torch.Tensor) else ids.shape
    if ids.shape[1] != seq or batch % ids.shape[0]:
        return StackCall(None, None, continuation=False)  # stale ids of another pass
    if ids.shape[0] != batch:
        ids = ids.repeat_interleave(batch // ids.shape[0], dim=0)  # [batch, seq]
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, seq)):
        # No 2-d mask given (or a custom 4-d one): padding is where the pad id is.
        mask = ids != pad_token_id if pad_token_id is not None else torch.ones_like(ids)
    return StackCall(ids, mask.bool(), continuation=False)


def pad_token_id(model: nn.Module) -> int | None:
    """The language model's pad id from the model config (text config first)."""
    config = model.config
    for source in (getattr(config, "text_config", None), config):
        value = getattr(source, "pad_token_id", None)
        if value is not None:
            return int(value)
    return None
