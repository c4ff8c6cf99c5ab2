"""Inputs with a text prefix inserted before each prompt: for prefix methods (IKE's in-context
facts and demonstrations, LTE's retrieved edits), which must change what the model reads.

A batch arrives encoded (`EncodedBatch` for teacher forcing, `PromptBatch` for generation); the
prefix goes into each row at the point where the prompt's text starts, after the backbone's head
(LLaVA: `<s>` and the image placeholders; BLIP-2: the query placeholders and `<s>`), so the image
stays where the model expects it and the prefix reads as part of the question. The logits of the
longer input are gathered back onto the caller's positions (`PrefixedBatch.logits_back`), so a
scorer indexing the original `target_mask` reads the right positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from dualedit.backbones import Backbone
from dualedit.data.prompts import EncodedBatch, PromptBatch


def head_tokens(processor: Any, backbone: Backbone, has_image: bool) -> list[int]:
    """The tokens an input has before its prompt's text: the processor's encoding of the
    backbone's prompt text of an empty prompt (image placeholders expanded)."""
    text = backbone.prompt_text("", has_image)
    if has_image:
        out = processor(text=text, images=Image.new("RGB", (8, 8)), return_tensors="pt")
    else:
        out = processor(text=text, return_tensors="pt")
    return out["input_ids"][0].tolist()


def prompt_start(row: Sequence[int], head: Sequence[int], leading: set[int]) -> int:
    """Where the prompt's text starts in an unpadded row: after `head` when the row begins with
    it, else after the row's leading run of `leading` tokens (BOS, image placeholders)."""
    if list(row[: len(head)]) == list(head):
        return len(head)
    start = 0
    while start < len(row) and row[start] in leading:
        start += 1
    return start


@dataclass
class PromptRows:
    """Where each row of a batch has its prompt's text: what a prefix method (IKE, LTE, SERAC)
    reads before it inserts a prefix. The head tokens are computed once per kind of input
    (with or without an image).

    Attributes:
        rows: per row, its unpadded tokens.
        starts: per row, where its prompt's text starts in `rows[i]` (after the head).
        questions: per row, its prompt's tokens (from the start to the last prompt token).
    """

    rows: list[list[int]]
    starts: list[int]
    questions: list[list[int]]


class PromptFinder:
    """Splits batches into `PromptRows` for one processor and backbone.

    Example:
        >>> finder = PromptFinder(processor, backbone)
        >>> parts = finder(batch)
        >>> insert_prefix(batch, prefixes, parts.starts, pad_id=pad, backbone=backbone)
    """

    def __init__(self, processor: Any, backbone: Backbone):
        self.processor, self.backbone = processor, backbone
        tokenizer = getattr(processor, "tokenizer", processor)
        self.leading = {backbone.image_token_id(backbone.config)}
        if tokenizer.bos_token_id is not None:
            self.leading.add(int(tokenizer.bos_token_id))
        self._heads: dict[bool, list[int]] = {}

    def head(self, has_image: bool) -> list[int]:
        """The tokens before a prompt's text (`head_tokens`), computed once."""
        if has_image not in self._heads:
            self._heads[has_image] = head_tokens(self.processor, self.backbone, has_image)
        return self._heads[has_image]

    def __call__(self, batch: EncodedBatch | PromptBatch) -> PromptRows:
        head = self.head(batch.pixel_values is not None)
        mask = batch.attention_mask.bool().cpu()  # [batch, seq]
        input_ids, prompt_end = batch.input_ids.cpu(), batch.prompt_end.cpu()
        parts = PromptRows([], [], [])
        for i in range(input_ids.shape[0]):
            row = input_ids[i][mask[i]].tolist()
            start = prompt_start(row, head, self.leading)
            # The last prompt token's index among the row's unpadded tokens.
            end = int(prompt_end[i]) - int((~mask[i, : int(prompt_end[i])]).sum()) + 1
            parts.rows.append(row)
            parts.starts.append(start)
            parts.questions.append(row[start:end])
        return parts


@dataclass
class PrefixedBatch:
    """A batch with a prefix inserted into every row.

    Attributes:
        batch: the longer batch (same type and padding side as the original).
        index: [batch, seq] long, the position in `batch` of each original position (padding
            positions point at a padding position of the same row).
    """

    batch: EncodedBatch | PromptBatch
    index: torch.Tensor

    def logits_back(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, seq', vocab] logits of `batch` -> [batch, seq, vocab] on the original
        positions."""
        index = self.index.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1])
        return logits.gather(1, index)


def insert_prefix(
    batch: EncodedBatch | PromptBatch,
    prefixes: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    pad_id: int,
    backbone: Backbone,
) -> PrefixedBatch:
    """Insert `prefixes[i]` into row i of `batch` at `starts[i]` (an index into the row's
    unpadded tokens); rows are padded again on the side they were padded on.

    Args:
        batch: an `EncodedBatch` (right-padded) or a `PromptBatch` (left- or right-padded).
        prefixes: token ids per row (may be empty).
        starts: per row, where in its unpadded tokens the prefix goes.
        pad_id: the tokenizer's pad id.
        backbone: for the image mask of the new ids.
    """
    n_rows, width = batch.input_ids.shape
    if len(prefixes) != n_rows or len(starts) != n_rows:
        raise ValueError(f"{len(prefixes)} prefixes and {len(starts)} starts for {n_rows} rows")
    # Built on the CPU (row by row); the caller moves the new batch where the model is.
    mask = batch.attention_mask.bool().cpu()  # [batch, seq]
    batch_ids = batch.input_ids.cpu()
    # A prompt batch whose rows all end in the last column is left-padded (or unpadded): it
    # stays so, for generate(); teacher-forced batches are right-padded.
    left = isinstance(batch, PromptBatch) and bool(mask[:, -1].all())
    lengths = mask.sum(dim=1).tolist()
    new_width = max(length + len(prefix) for length, prefix in zip(lengths, prefixes))
    input_ids = torch.full((n_rows, new_width), pad_id, dtype=batch.input_ids.dtype)
    attention_mask = torch.zeros((n_rows, new_width), dtype=batch.attention_mask.dtype)
    index = torch.zeros((n_rows, width), dtype=torch.long)  # [batch, seq]
    for i in range(n_rows):
        old = mask[i].nonzero().squeeze(1)  # [length] positions of the row's tokens
        tokens = batch_ids[i, old]
        prefix = torch.tensor(list(prefixes[i]), dtype=tokens.dtype)
        start = starts[i]
        row = torch.cat([tokens[:start], prefix, tokens[start:]])
        offset = new_width - len(row) if left else 0
        input_ids[i, offset : offset + len(row)] = row
        attention_mask[i, offset : offset + len(row)] = 1
        new = torch.arange(len(tokens)) + offset  # [length]
        new[start:] += len(prefix)
        index[i, old] = new  # padding positions stay 0: their logits are never read
    fields: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_end": _moved(batch.prompt_end.cpu(), index),
        "image_mask": backbone.image_mask(backbone.config, input_ids) & attention_mask.bool(),
    }
    if isinstance(batch, EncodedBatch):
        target_mask = torch.zeros((n_rows, new_width), dtype=torch.bool)
        target_ids = torch.full((n_rows, new_width), -100, dtype=batch.target_ids.dtype)
        rows, cols = batch.target_mask.cpu().nonzero(as_tuple=True)
        target_mask[rows, index[rows, cols]] = True
        target_ids[rows, index[rows, cols]] = batch.target_ids.cpu()[rows, cols]
        fields.update(target_mask=target_mask, target_ids=target_ids)
    return PrefixedBatch(replace(batch, **fields), index)


def _moved(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-row positions ([batch] long) in the prefixed batch."""
    return index.gather(1, positions.to(index.device)[:, None]).squeeze(1)
