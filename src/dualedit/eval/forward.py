"""Running the edited model on protocol samples in batches (the editor owns the forward)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from dualedit.backbones import Backbone
from dualedit.data.prompts import Sample, encode
from dualedit.editors.base import Editor, ImageLoader
from dualedit.eval.scorers import SamplePrediction, Scorer


@dataclass(frozen=True)
class Item:
    """One sample to score: `record` is the record's position in the evaluated list."""

    record: int
    key: str
    sample: Sample


@dataclass
class EvalContext:
    """What every forward of an evaluation needs; built once by `evaluate`."""

    model: nn.Module
    processor: Any
    backbone: Backbone
    editor: Editor
    scorer: Scorer
    load_image: ImageLoader
    task: str
    batch_size: int
    progress: bool
    case_sensitive: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def record_items(
    samples: Sequence[dict[str, Sample]],
    positions: Iterable[int],
    keys: Iterable[str] | None = None,
) -> list[Item]:
    """Items of the records at `positions`, for every sample key (or only `keys`)."""
    wanted = None if keys is None else set(keys)
    return [
        Item(position, key, sample)
        for position in positions
        for key, sample in samples[position].items()
        if wanted is None or key in wanted
    ]


def chunk_items(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Batches of at most `batch_size` items, image samples and text-only samples apart.

    Order is kept within each kind, so the same items always give the same batches.
    """
    chunks = []
    for has_image in (True, False):
        kind = [item for item in items if item.sample.has_image == has_image]
        chunks += [kind[i : i + batch_size] for i in range(0, len(kind), batch_size)]
    return chunks


def predict(
    ctx: EvalContext, items: Sequence[Item], *, desc: str = "", progress: bool | None = None
) -> dict[tuple[int, str], SamplePrediction]:
    """Teacher-forced `editor.logits` of `items`, with the edits the editor holds now.

    Returns:
        (record position, sample key) -> the scorer's summary of that sample's logits.
    """
    out: dict[tuple[int, str], SamplePrediction] = {}
    chunks = chunk_items(items, ctx.batch_size)
    show = ctx.progress if progress is None else progress
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc=desc, disable=not show, leave=False, unit="batch"):
            samples = [item.sample for item in chunk]
            batch = encode(samples, ctx.processor, ctx.backbone, ctx.load_image)
            device_batch = batch.to(ctx.device)
            logits = ctx.editor.logits(device_batch)  # [b, s, V], the editor owns the forward
            for key in dict.fromkeys(item.key for item in chunk):
                rows = [i for i, item in enumerate(chunk) if item.key == key]
                index = torch.tensor(rows, device=logits.device)
                summaries = ctx.scorer.predictions(
                    key,
                    logits.index_select(0, index),
                    device_batch.target_ids.index_select(0, index),
                    device_batch.target_mask.index_select(0, index),
                    device_batch.attention_mask.index_select(0, index),
                )
                for row, summary in zip(rows, summaries):
                    out[(chunk[row].record, key)] = summary
    return out
