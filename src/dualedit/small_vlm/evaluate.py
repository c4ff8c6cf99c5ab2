"""Held-out measurements of a small VLM on corpus lines: teacher-forced answer-token accuracy
(the paper scorer's way: per line, then averaged) and greedy generation exact match."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from dualedit.backbones.registry import get_backbone
from dualedit.data.prompts import encode_prompts, question_sample
from dualedit.small_vlm.corpus import EncodedCorpus, batch_inputs
from dualedit.small_vlm.tokenizer import split_words


@torch.no_grad()
def answer_accuracy(
    model: nn.Module, corpus: EncodedCorpus, pixel_values: torch.Tensor | None, batch_size: int,
) -> dict:
    """Teacher-forced answer-token accuracy, per line then averaged (the paper scorer's way).

    Returns:
        {"by_task": {task: acc}, "by_kind": {"task/kind": acc}, "lines": {task: n}}, acc in [0, 1].
    """
    backbone = get_backbone(model)
    special = torch.tensor(corpus.special_ids)
    was_training = model.training
    model.eval()
    per_line = torch.zeros(len(corpus.tasks))
    for has_image in (True, False):
        rows_all = torch.nonzero((corpus.image_index >= 0) == has_image).flatten()
        for start in range(0, len(rows_all), batch_size):
            rows = rows_all[start:start + batch_size]
            ids, attention, _, scored = batch_inputs(corpus, rows, 1.0, special)
            images = pixel_values[corpus.image_index[rows]] if has_image else None  # [b, 3, H, W]
            logits = backbone.forward_logits(model, ids, attention, images)  # [b, s, vocab]
            right = (logits[:, :-1].argmax(-1) == ids[:, 1:]) & scored  # [b, s - 1]
            per_line[rows] = right.sum(1).float() / scored.sum(1).clamp(min=1).float()
    model.train(was_training)
    groups: dict[str, list[int]] = {}
    for index, (task, kind) in enumerate(zip(corpus.tasks, corpus.kinds)):
        groups.setdefault(task, []).append(index)
        groups.setdefault(f"{task}/{kind}", []).append(index)
    means = {key: float(per_line[idx].mean()) for key, idx in sorted(groups.items())}
    return {
        "by_task": {k: v for k, v in means.items() if "/" not in k},
        "by_kind": {k: v for k, v in means.items() if "/" in k},
        "lines": {k: len(v) for k, v in sorted(groups.items()) if "/" not in k},
    }


@torch.no_grad()
def generation_exact_match(model: nn.Module, processor, lines: list[dict], image_root: Path,
                           batch_size: int = 32, max_new_tokens: int = 12) -> dict[str, float]:
    """Greedy `generate()` on the protocol prompts of `lines`: fraction whose decoded output
    (stopped at ``</s>``) equals the answer, per task. Checks that the model also stops."""
    backbone = get_backbone(model)
    tokenizer = processor.tokenizer

    def load(rel: str) -> Image.Image:
        with Image.open(image_root / rel) as image:
            return image.convert("RGB")

    hits: dict[str, list[bool]] = {}
    samples = [(line["task"], question_sample(line["task"], line["image"], line["question"],
                                              line["answer"])) for line in lines]
    for has_image in (True, False):
        group = [(task, s) for task, s in samples if s.has_image == has_image]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            batch = encode_prompts([s for _, s in chunk], processor, backbone, load)
            new = backbone.generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                    max_new_tokens=max_new_tokens, do_sample=False)
            for (task, sample), row in zip(chunk, new.tolist()):
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                stopped = tokenizer.eos_token_id in row
                expected = " ".join(split_words(sample.target))
                hits.setdefault(task, []).append(stopped and text == expected)
    return {task: sum(v) / len(v) for task, v in sorted(hits.items())}


def spread(lines: list[dict], n: int) -> list[dict]:
    """Up to `n` lines per task, evenly spaced through the file (every kind and entity)."""
    out = []
    for task in sorted({line["task"] for line in lines}):
        of_task = [line for line in lines if line["task"] == task]
        step = max(1, len(of_task) // n)
        out.extend(of_task[::step][:n])
    return out
