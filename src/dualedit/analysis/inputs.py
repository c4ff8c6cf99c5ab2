"""What every layer analysis reads: a frozen VLM, its backbone, some records of one split, and
their protocol samples encoded in batches.

The analyses look at the unedited model, so any split may be read; the default is the train
split (`dualedit analyze` never needs the eval split, and a recommendation drawn from the train
split leaves the eval edits unseen). `select_records` draws a fixed, seeded subset, the same
for every analysis of one run, so the figures of one folder describe the same records.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dualedit.backbones import Backbone, get_backbone
from dualedit.data.prompts import EncodedBatch, Sample, encode, record_samples
from dualedit.data.records import EditRecord

#: Sample kinds an analysis can ask for: the protocol's samples of a record, and "edit", the
#: edit sample itself (image, prompt, new target: what an editor reads when it stores an edit).
SAMPLE_KINDS: tuple[str, ...] = ("edit", "rel", "t_gen", "v_gen", "t_loc", "m_loc", "m_loc_hard")
#: Splits `load_analysis_data` reads ("val": the validation edits that training holds out).
SPLITS: tuple[str, ...] = ("train", "val", "eval")


@dataclass
class AnalysisData:
    """A frozen model and the records an analysis runs on.

    Attributes:
        model, processor: the VLM (eval mode) and its processor.
        backbone: the model's backbone (layers, image positions, prompt text).
        records: the selected records, in order.
        task: "vqa" (E-VQA) or "caption" (E-IC).
        load_image: relative image path -> PIL image.
        source: where the records came from (for the JSON beside the figures).
    """

    model: nn.Module
    processor: Any
    backbone: Backbone
    records: list[EditRecord]
    task: str
    load_image: Any
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def depth(self) -> int:
        return self.backbone.depth(self.model)

    def samples(self, kind: str) -> list[tuple[int, Sample]]:
        """(position in `records`, sample) of every record that has a `kind` sample."""
        if kind not in SAMPLE_KINDS:
            raise ValueError(f"unknown sample kind {kind!r}; expected one of {SAMPLE_KINDS}")
        key = "rel" if kind == "edit" else kind
        out = []
        for i, record in enumerate(self.records):
            samples = record_samples(record, self.task)
            if key in samples:
                out.append((i, samples[key]))
        return out

    def batches(
        self, kind: str, batch_size: int = 8
    ) -> Iterator[tuple[list[int], EncodedBatch]]:
        """Teacher-forced batches (prompt + target) of the `kind` samples, on the model's
        device: (record positions, batch). Image and text-only samples never share a batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = self.samples(kind)
        for has_image in (True, False):
            group = [(i, s) for i, s in items if s.has_image == has_image]
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                batch = encode([s for _, s in chunk], self.processor, self.backbone,
                               self.load_image)
                yield [i for i, _ in chunk], batch.to(self.device)


def select_records(
    records: Sequence[EditRecord], samples: int | None, seed: int = 0
) -> list[EditRecord]:
    """`samples` records drawn without replacement by a seeded generator, in file order (all of
    them when `samples` is None or at least their number)."""
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if samples is None or samples >= len(records):
        return list(records)
    chosen = np.random.default_rng(seed).choice(len(records), size=samples, replace=False)
    return [records[i] for i in sorted(chosen.tolist())]


def analysis_data(
    model: nn.Module,
    processor: Any,
    dataset: Any,
    *,
    samples: int | None = None,
    seed: int = 0,
    source: dict[str, Any] | None = None,
) -> AnalysisData:
    """`AnalysisData` over an already loaded model and an `MMEditDataset` (or a selection of
    one: anything with records, `.task` and `.images`)."""
    records = select_records(list(dataset), samples, seed)
    if not records:
        raise ValueError("no records to analyse")
    model.eval()
    return AnalysisData(
        model=model,
        processor=processor,
        backbone=get_backbone(model),
        records=records,
        task=dataset.task,
        load_image=dataset.images,
        source={**(source or {}), "records": len(records), "samples": samples, "seed": seed,
                "record_indices": [r.index for r in records]},
    )


def load_analysis_data(
    model_path: str | os.PathLike,
    data_root: str | os.PathLike,
    task: str = "vqa",
    *,
    split: str = "train",
    samples: int | None = 64,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> AnalysisData:
    """Load a VLM folder and `samples` records of one split of an MMEdit folder.

    Args:
        model_path: a `save_pretrained` folder. data_root: the folder holding vqa/ and caption/.
        task: "vqa" or "caption". split: "train", "val" (the validation edits training holds
            out) or "eval". samples: how many records (None: all). seed: which ones.
        attn_implementation: load the model with this attention ("eager", "sdpa"; None: the
            folder's default).
    """
    from dualedit.evaluate import load_dataset_split, load_vlm

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    model, processor = load_vlm(model_path)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    dataset = load_dataset_split(data_root, task, split)
    return analysis_data(
        model, processor, dataset, samples=samples, seed=seed,
        source={"model": str(Path(model_path)), "data": str(Path(data_root)), "task": task,
                "split": split},
    )


def prompt_text_mask(batch: Any, first_token: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, seq] bool: the prompt's text positions (attended, not image, at or before the last
    prompt token), without `first_token` ([batch, seq] bool, e.g. `sink_mask`) where given."""
    seq = batch.input_ids.shape[1]
    positions = torch.arange(seq, device=batch.input_ids.device)  # [seq]
    upto = positions[None, :] <= batch.prompt_end[:, None].to(positions.device)  # [batch, seq]
    mask = upto & batch.attention_mask.bool() & ~batch.image_mask
    if first_token is not None:
        mask = mask & ~first_token
    return mask


def sink_mask(batch: Any, bos_token_id: int | None) -> torch.Tensor:
    """[batch, seq] bool: the first attended text position of each row when it is the BOS token
    (the "attention sink" that draws much of every row's attention); all False without a BOS."""
    mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)  # [batch, seq]
    if bos_token_id is None:
        return mask
    text = batch.attention_mask.bool() & ~batch.image_mask  # [batch, seq]
    first = text.int().argmax(dim=1)  # [batch]
    rows = torch.arange(mask.shape[0], device=mask.device)
    is_bos = batch.input_ids[rows, first] == bos_token_id
    mask[rows, first] = is_bos & text[rows, first]
    return mask


def bos_token_id(processor: Any) -> int | None:
    """The tokenizer's BOS id (None without one)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return getattr(tokenizer, "bos_token_id", None)
