"""Generation exact match: greedy generate() on the Rel prompt, decoded answer vs target.

The answer is the first n generated tokens, n = the number of tokens of the target after the
prompt, cut at the first end-of-sequence token; decoded without special tokens and compared after
stripping whitespace (`scorers.exact_match`, case-sensitive by default). The benchmark's targets
carry no end-of-sequence token, so a model is not asked to stop after the answer; with n tokens,
greedy generation differs from teacher forcing only through the KV-cache path, decoding and case.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from dualedit.data.prompts import Sample, encode_prompts
from dualedit.eval.forward import EvalContext, Item, chunk_items
from dualedit.eval.scorers import exact_match


def target_length(ctx: EvalContext, sample: Sample) -> int:
    """How many tokens the target adds after the prompt (text tokenizer, image token unexpanded)."""
    tokenizer = getattr(ctx.processor, "tokenizer", ctx.processor)
    text = ctx.backbone.prompt_text(sample.prompt, sample.has_image)
    prompt_ids = tokenizer(text)["input_ids"]
    full_ids = tokenizer(text + sample.target)["input_ids"]
    return max(len(full_ids) - len(prompt_ids), 1)


def generate_answers(
    ctx: EvalContext, items: Sequence[Item], *, desc: str = "", progress: bool | None = None
) -> dict[int, str]:
    """Greedy answers for `items` (left-padded prompts), keyed by record position."""
    tokenizer = getattr(ctx.processor, "tokenizer", ctx.processor)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answers: dict[int, str] = {}
    show = ctx.progress if progress is None else progress
    chunks = chunk_items(items, ctx.batch_size)
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc=desc, disable=not show, leave=False, unit="batch"):
            samples = [item.sample for item in chunk]
            lengths = [target_length(ctx, sample) for sample in samples]
            batch = encode_prompts(samples, ctx.processor, ctx.backbone, ctx.load_image)
            device_batch = batch.to(ctx.device)
            new = ctx.editor.generate(
                device_batch,
                max_new_tokens=max(lengths),
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos,
            )  # [b, new]
            for item, row, n in zip(chunk, new.tolist(), lengths):
                row = row[:n]
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                answers[item.record] = tokenizer.decode(row, skip_special_tokens=True)
    return answers


def generation_metrics(
    ctx: EvalContext, items: Sequence[Item], *, desc: str = "", progress: bool | None = None
) -> dict[int, dict[str, object]]:
    """{record position: {"gen_em": 1.0 | 0.0, "gen_text": answer}} for the Rel items."""
    answers = generate_answers(ctx, items, desc=desc, progress=progress)
    return {
        item.record: {
            "gen_em": float(
                exact_match(
                    answers[item.record], item.sample.target, case_sensitive=ctx.case_sensitive
                )
            ),
            "gen_text": answers[item.record],
        }
        for item in items
    }
