"""A small VLM taught to read a stated fact from its context: the model variant on which
in-context editing (IKE) can be measured fairly.

The built-in world's models were pretrained on plain question -> answer lines only, so they
never learned to use a fact written before a question. This continues a pretrained model on
lessons in IKE's form (`New Fact: <question> <answer>` then `Prompt: <question>`), built from the
world's corpus with *invented* answers:

- copy: the context states the question itself with an invented answer; the target is that
  answer (the model must read it from the context);
- retain: the context states another question of the corpus with an invented answer; the target
  is the true answer (an unrelated fact must be ignored);
- plain: no context; the true answer (what the model knew stays).

Invented answers are words of the world's vocabulary that are no edit target of any edit file
(train or eval, E-VQA or E-IC): the variant never sees an edit's new answer, so it learns to read
context, not the benchmark. The result is a separate model folder (`save_pretrained`), cached by
its settings and the base model's weights; every other method keeps the default models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dualedit.backbones import get_backbone
from dualedit.data.mmedit import ImageStore
from dualedit.data.prompts import Sample, encode, target_text, task_prompt
from dualedit.numerics import cpu_threads, flush_denormals
from dualedit.small_vlm.corpus import read_corpus
from dualedit.small_vlm.tokenizer import split_words
from dualedit.small_vlm.vision import vision_tower
from dualedit.train.checkpoint import weights_fingerprint
from dualedit.version import versions

logger = logging.getLogger(__name__)

METRICS_FILE = "context_reading_metrics.json"
#: The edit files whose new answers the lessons must never contain.
EDIT_FILES = (
    "vqa/vqa_train.json", "vqa/vqa_eval.json",
    "caption/caption_train_edit.json", "caption/caption_eval_edit.json",
)
KINDS = ("copy", "retain", "plain")


@dataclass(frozen=True)
class ContextSettings:
    """How the variant is taught.

    Attributes:
        steps, batch_size, lr: AdamW steps on the connector and language model, the lessons per
            step (image and text-only batches alternate), the rate. (600 steps at lr 3e-4 taught
            the small LLaVA to copy a stated answer in only 6.8 % of held-out lessons.)
        shares: the proportions of copy, retain and plain lessons.
        fact_prefix, question_prefix: the context's words around the fact and the question
            (IKE's template, `dualedit.editors.ike.TEMPLATES["ike"]`).
        eval_lines: held-out corpus lines per kind for the accuracies reported.
        seed: the lessons drawn and their order.
    """

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    shares: tuple[float, float, float] = (0.4, 0.3, 0.3)
    fact_prefix: str = "New Fact: "
    question_prefix: str = "\nPrompt: "
    eval_lines: int = 128
    seed: int = 0


def invented_answers(world_dir: Path, corpus: list[dict]) -> list[str]:
    """Corpus answers (one word each) that share no word with any edit target of the world."""
    targets: set[str] = set()
    for name in EDIT_FILES:
        path = world_dir / name
        if path.is_file():
            for record in json.loads(path.read_text(encoding="utf-8")):
                targets.update(split_words(record["alt"]))
    words = sorted({line["answer"] for line in corpus if len(split_words(line["answer"])) == 1})
    allowed = [w for w in words if not set(split_words(w)) & targets]
    if not allowed:
        raise ValueError(f"{world_dir}: every corpus answer is an edit target; nothing to invent")
    return allowed


def lesson(line: dict, kind: str, other: dict, answers: list[str], rng: random.Random,
           settings: ContextSettings) -> Sample:
    """One lesson from a corpus line (`other`: the unrelated line a retain lesson states)."""
    prompt = task_prompt(line["task"], line["question"])
    if kind == "plain":
        return Sample(line["image"], prompt, target_text(line["answer"]))
    invented = rng.choice([a for a in answers if a != line["answer"]])
    stated = line if kind == "copy" else other
    fact = task_prompt(stated["task"], stated["question"]) + target_text(invented)
    context = settings.fact_prefix + fact + settings.question_prefix
    answer = invented if kind == "copy" else line["answer"]
    return Sample(line["image"], context + prompt, target_text(answer))


def lessons(lines: list[dict], n: int, answers: list[str], rng: random.Random,
            settings: ContextSettings) -> list[tuple[str, Sample]]:
    """`n` (kind, lesson) pairs drawn from `lines` in the settings' proportions."""
    drawn = []
    for _ in range(n):
        kind = rng.choices(KINDS, weights=settings.shares)[0]
        line, other = rng.choice(lines), rng.choice(lines)
        while other["question"] == line["question"] and len(lines) > 1:
            other = rng.choice(lines)
        drawn.append((kind, lesson(line, kind, other, answers, rng, settings)))
    return drawn


def _loss_and_hits(model: nn.Module, processor: Any, samples: list[Sample], images: ImageStore):
    backbone = get_backbone(model)
    batch = encode(samples, processor, backbone, images)
    logits = backbone.forward_logits(
        model, batch.input_ids, batch.attention_mask, batch.pixel_values
    )  # [b, seq, vocab]
    chosen = logits[batch.target_mask].float()  # [k, vocab]
    targets = batch.target_ids[batch.target_mask]  # [k]
    loss = nn.functional.cross_entropy(chosen, targets)
    rows = batch.target_mask.nonzero()[:, 0]  # [k]
    hits = torch.zeros(len(samples)).index_add_(0, rows, (chosen.argmax(-1) == targets).float())
    counts = torch.zeros(len(samples)).index_add_(0, rows, torch.ones_like(rows, dtype=torch.float))
    return loss, (hits == counts).float()  # every answer token right, per lesson


def accuracy(model: nn.Module, processor: Any, drawn: list[tuple[str, Sample]],
             images: ImageStore, batch_size: int = 32) -> dict[str, float]:
    """Per kind, the fraction of lessons whose answer tokens are all predicted (x100)."""
    scores: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with torch.no_grad():
        for has_image in (True, False):
            group = [(k, s) for k, s in drawn if s.has_image == has_image]
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                _, right = _loss_and_hits(model, processor, [s for _, s in chunk], images)
                for (kind, _), hit in zip(chunk, right.tolist()):
                    scores[kind].append(hit)
    return {kind: 100 * sum(v) / len(v) for kind, v in scores.items() if v}


def teach_context_reading(
    base_dir: str | Path,
    world_dir: str | Path,
    out_dir: str | Path,
    *,
    settings: ContextSettings | None = None,
    progress: bool = True,
    threads: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Continue the pretrained model in `base_dir` on context-reading lessons; write the variant
    to `out_dir` (cached: a folder made with the same settings from the same base weights is
    reused unless `force`).

    Returns:
        The metrics also written to `out_dir/context_reading_metrics.json`: held-out lesson
        accuracy per kind before and after, seconds, the settings (the cache key).

    Example:
        >>> teach_context_reading("cache/models/llava-seed0", "cache/world-seed0",
        ...                       "cache/models/llava-seed0-context")["after"]["copy"]
    """
    from dualedit.evaluate import load_vlm
    from dualedit.small_vlm.pretrain import language_side, write_model_folder

    settings = settings or ContextSettings()
    base_dir, world_dir, out_dir = Path(base_dir), Path(world_dir), Path(out_dir)
    model, processor = load_vlm(base_dir)
    key = json.loads(json.dumps({  # as read back from the JSON (tuples become lists)
        "base": str(base_dir.resolve()),
        "base_weights": weights_fingerprint(model),
        "settings": dataclasses.asdict(settings),
    }))
    cached = out_dir / METRICS_FILE
    if cached.is_file() and not force:
        metrics = json.loads(cached.read_text(encoding="utf-8"))
        if metrics.get("key") == key:
            logger.info("%s: cached context-reading variant matches; not retraining", out_dir)
            return metrics
    train_lines = read_corpus(world_dir / "corpus" / "train.jsonl")
    heldout_lines = read_corpus(world_dir / "corpus" / "heldout.jsonl")
    answers = invented_answers(world_dir, train_lines + heldout_lines)
    images = ImageStore(world_dir / "images")
    rng = random.Random(settings.seed)
    by_kind = {True: [x for x in train_lines if x["image"]],
               False: [x for x in train_lines if not x["image"]]}
    held = [x for x in heldout_lines if x["image"]] or by_kind[True]
    evaluation = lessons(held, settings.eval_lines * 3, answers, random.Random(settings.seed + 1),
                         settings)
    evaluation += lessons(by_kind[False], settings.eval_lines, answers,
                          random.Random(settings.seed + 2), settings)
    started = time.perf_counter()
    with cpu_threads(threads), flush_denormals():
        before = accuracy(model, processor, evaluation, images)
        params = [p for _, p in language_side(model)]
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        vision_tower(model).requires_grad_(False)  # as pretraining's language stage
        model.train()
        curve = []
        try:
            for step in tqdm(range(settings.steps), desc="context reading", disable=not progress):
                has_image = step % 2 == 0 or not by_kind[False]
                drawn = lessons(by_kind[has_image], settings.batch_size, answers, rng, settings)
                loss, _ = _loss_and_hits(model, processor, [s for _, s in drawn], images)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                if (step + 1) % 50 == 0:
                    curve.append({"step": step + 1, "loss": loss.item()})
        finally:
            model.eval()
            vision_tower(model).requires_grad_(True)
        after = accuracy(model, processor, evaluation, images)
    metrics = {
        "key": key,
        "invented_answers": answers,
        "before": before,
        "after": after,
        "loss_curve": curve,
        "train_seconds": round(time.perf_counter() - started, 1),
        "versions": versions(),
    }
    write_model_folder(out_dir, model, processor, metrics, METRICS_FILE)
    logger.info("context-reading variant in %s: %s -> %s", out_dir, before, after)
    return metrics
