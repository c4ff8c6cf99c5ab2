"""Pretrain a small VLM on a built-in world's corpus, cached and atomic.

Two stages (vision.py has the vision side):
1. vision warm-up: the vision tower alone learns to classify every image question kind of the
   corpus through throw-away linear heads (flip and shift augmentation).
2. the connector and the language model, on frozen tower features computed once per image (as
   LLaVA and BLIP-2 keep their encoders frozen), with a language-modelling loss over entire text
   sequences (prompt and answer tokens; image placeholders and padding excluded), answer tokens
   weighted higher; each step one batch of image lines (VQA, captions) and one of text facts.
   Training on prompts too matters: answer words then also train as inputs, which editors that
   read the target from hidden states rely on.

Every sequence is built with the protocol prompts (data/prompts.py) and the backbone's
`prompt_text`, and ends with ``</s>`` so `generate()` stops. The held-out accuracy at the end is
measured with the model's own forward on pixels, end to end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dualedit.version import versions
from dualedit.backbones.registry import get_backbone
from dualedit.numerics import cpu_threads, flush_denormals
from dualedit.small_vlm.configs import (
    TIE_EMBEDDINGS,
    build_model,
    build_processor,
    num_image_tokens,
    parameter_counts,
    resolve_size,
)
from dualedit.small_vlm.corpus import (
    EncodedCorpus,
    batch_inputs,
    encode_corpus,
    load_images,
    read_corpus,
    vision_labels,
)
from dualedit.small_vlm.evaluate import answer_accuracy, generation_exact_match, spread
from dualedit.small_vlm.tokenizer import build_world_tokenizer
from dualedit.small_vlm.vision import (
    head_accuracy,
    logits_from_features,
    tower_features,
    vision_tower,
    warm_up_vision,
)

logger = logging.getLogger(__name__)

# Bump when a change here changes the trained weights: cached models then retrain.
PRETRAIN_VERSION = 4
METRICS_FILE = "pretrain_metrics.json"
WORLD_FILES = ("world.json", "corpus/train.jsonl", "corpus/heldout.jsonl")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one pretraining run; all recorded in the metrics, all but
    `num_threads` in the cache key."""

    steps: int = 600  # stage 2 steps
    batch_size: int = 64  # image lines (VQA and captions) per step
    text_batch_size: int = 32  # text facts per step, a separate text-only forward
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.01
    answer_weight: float = 3.0  # loss weight of answer tokens and </s>; prompt tokens weigh 1
    grad_clip: float = 1.0
    vision_steps: int = 2000  # stage 1 steps
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    vision_shift: int = 2  # augmentation shift in px
    eval_batch_size: int = 128
    generation_probe: int = 48  # lines per task for the generate() exact-match probe
    num_threads: int = 2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"TrainSettings.{field.name}: expected a number >= 0, got {value!r}")
        for name in ("steps", "batch_size", "text_batch_size", "vision_batch_size", "eval_batch_size",
                     "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings.{name}: must be >= 1")


# Measured on the default world (2 shared CPU cores): both reach the held-out targets in about
# 6-7 minutes. LLaVA's language side is the dearer one (64 image tokens per sequence against
# BLIP-2's 8 queries), so it gets fewer language steps and more vision steps; BLIP-2's ViT
# prefers the lower warm-up learning rate.
DEFAULT_SETTINGS: dict[str, TrainSettings] = {
    "llava": TrainSettings(steps=400, vision_steps=2400),
    "blip2": TrainSettings(steps=1000, vision_steps=2000, vision_lr=1e-3),
}


#: world.json fields about the edit records, not about what the model learns from: a world whose
#: edit records change (and only they) keeps its pretrained models.
EDIT_FIELDS = ("counts", "files", "format_version", "record_index")


def _fingerprint(world_dir: Path) -> str:
    """Hash of what pretraining reads: the corpus files and world.json without EDIT_FIELDS."""
    digest = hashlib.sha256()
    for name in WORLD_FILES:
        path = world_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; build the world first (dualedit world)")
        data = path.read_bytes()
        if name == "world.json":
            meta = {k: v for k, v in json.loads(data).items() if k not in EDIT_FIELDS}
            data = json.dumps(meta, sort_keys=True).encode()
        digest.update(name.encode())
        digest.update(data)
    return digest.hexdigest()


def _image_size(world_dir: Path, lines: list[dict]) -> int:
    world = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    size = world.get("image_size")
    if isinstance(size, int) and size > 0:
        return size
    first = next((line["image"] for line in lines if line["image"] is not None), None)
    if first is None:
        raise ValueError(f"{world_dir / 'world.json'}: no image_size and no image in the corpus")
    with Image.open(world_dir / "images" / first) as image:
        return image.size[0]


def _lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * (settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine)


def _adamw(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float):
    # No weight decay on 1-d parameters (norms, biases) nor on the learned query tokens.
    decay = [p for n, p in params if p.dim() >= 2 and "query_tokens" not in n]
    rest = [p for n, p in params if not (p.dim() >= 2 and "query_tokens" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


class _Batches:
    """Row indices in shuffled epochs, deterministic in the generator."""

    def __init__(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.rows, self.batch_size, self.generator = rows, batch_size, generator
        self.order, self.pos = rows[:0], 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order = self.rows[torch.randperm(len(self.rows), generator=self.generator)]
            self.pos = 0
        batch = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch


def _weighted_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    keep = weights > 0  # [b, s - 1]
    chosen = logits[:, :-1][keep]  # [n, vocab]
    losses = nn.functional.cross_entropy(chosen.float(), ids[:, 1:][keep], reduction="none")
    return (losses * weights[keep]).sum() / weights[keep].sum()


def language_side(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Everything but the vision tower: connector (projector / queries, Q-Former, projection)
    and language model."""
    frozen = {id(p) for p in vision_tower(model).parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in frozen]


def train_vlm(
    model: nn.Module, corpus: EncodedCorpus, features: torch.Tensor, settings: TrainSettings,
    generator: torch.Generator, progress: bool = False,
) -> list[dict]:
    """Stage 2: connector and language model on frozen tower features.

    Args:
        corpus: the encoded training lines.
        features: [n_images, tokens, vision_hidden] `tower_features` of the corpus images.

    Returns:
        the loss curve, one entry every 50 steps and at the end.
    """
    backbone = get_backbone(model)
    image_id = backbone.image_token_id(model)
    special = torch.tensor(corpus.special_ids)
    image_rows = torch.nonzero(corpus.image_index >= 0).flatten()
    text_rows = torch.nonzero(corpus.image_index < 0).flatten()
    image_batches = _Batches(image_rows, settings.batch_size, generator)
    text_batches = _Batches(text_rows, settings.text_batch_size, generator)
    params = language_side(model)
    vision_tower(model).requires_grad_(False)
    optimizer = _adamw(params, settings.lr, settings.weight_decay)
    model.train()
    curve, running = [], []
    bar = tqdm(range(settings.steps), desc=f"{model.config.model_type} language side",
               disable=not progress)
    try:
        for step in bar:
            lr = _lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = []
            if len(image_rows):
                rows = image_batches.next()
                ids, attention, weights, _ = batch_inputs(corpus, rows, settings.answer_weight, special)
                feats = features[corpus.image_index[rows]]  # [b, tokens, vision_hidden]
                logits = logits_from_features(model, ids, attention, feats, image_id)  # [b, s, V]
                losses.append(_weighted_loss(logits, ids, weights))
            if len(text_rows):
                rows = text_batches.next()
                ids, attention, weights, _ = batch_inputs(corpus, rows, settings.answer_weight, special)
                logits = backbone.forward_logits(model, ids, attention, None)  # [b, s, V]
                losses.append(_weighted_loss(logits, ids, weights))
            loss = torch.stack(losses).sum()
            loss.backward()
            nn.utils.clip_grad_norm_([p for _, p in params], settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == settings.steps:
                curve.append({"step": step + 1, "loss": sum(running) / len(running), "lr": lr})
                bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
                running = []
    finally:
        vision_tower(model).requires_grad_(True)
    model.eval()
    return curve


def _cached(out_dir: Path, settings: dict) -> dict | None:
    metrics_path = out_dir / METRICS_FILE
    if not (metrics_path.is_file() and (out_dir / "config.json").is_file()):
        return None
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("%s: unreadable, retraining", metrics_path)
        return None
    return metrics if metrics.get("settings") == settings else None


def write_model_folder(
    out_dir: Path, model, processor, metrics: dict, metrics_file: str = METRICS_FILE
) -> None:
    """Everything into a temp sibling folder, then one rename; an old folder is removed after."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / metrics_file).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def pretrain(
    world_dir: str | Path,
    arch: str,
    out_dir: str | Path,
    *,
    size=None,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    settings: TrainSettings | None = None,
    threads: int | None = None,
    tie_embeddings: bool = TIE_EMBEDDINGS,
) -> dict:
    """Pretrain a small VLM of `arch` on the world in `world_dir`; cached in `out_dir`.

    Args:
        world_dir: a folder written by `dualedit.world.build_world`.
        arch: "llava" or "blip2".
        out_dir: gets the model and processor (`save_pretrained`) and `pretrain_metrics.json`.
        size: a `VLMSize`, a preset name ("tiny", "small") or None for the default.
        seed: seeds the initial weights and the data order.
        progress: show tqdm bars.
        force: retrain even when `out_dir` holds a model trained with the same settings.
        settings: optimisation settings; None for `DEFAULT_SETTINGS[arch]`.
        threads: torch CPU threads; None for `settings.num_threads`. Not part of the cache key
            (on a machine shared with another job, 1 thread avoids spin-waiting between threads).
        tie_embeddings: tie the language model's input and output embeddings (`configs.
            TIE_EMBEDDINGS`: the default; False gives the untied variant, as LLaVA-1.5's Vicuna).

    Returns:
        the metrics dict also written to `pretrain_metrics.json`: `heldout_accuracy` (task ->
        answer-token accuracy in [0, 1]), `heldout_accuracy_by_kind`, `train_seconds`,
        `parameters`, `settings` (the cache key), versions.

    Example:
        >>> m = pretrain("runs/world", "llava", "runs/llava")
        >>> m["heldout_accuracy"]["vqa"]
        0.97
    """
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    size = resolve_size(size)
    if arch not in DEFAULT_SETTINGS:
        raise ValueError(f"arch {arch!r}: expected one of {sorted(DEFAULT_SETTINGS)}")
    settings = settings or DEFAULT_SETTINGS[arch]
    if threads is not None:
        settings = dataclasses.replace(settings, num_threads=threads)
    key = {
        "pretrain_version": PRETRAIN_VERSION,
        "world_fingerprint": _fingerprint(world_dir),
        "arch": arch,
        "size": size.to_dict(),
        "seed": seed,
        "tie_embeddings": bool(tie_embeddings),
        # Threads change the speed, not what is learned: a model trained with 1 is reused with 2.
        "train_settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "num_threads"},
    }
    if not force:
        cached = _cached(out_dir, key)
        if cached is not None:
            logger.info("%s: cached %s model matches the settings; not retraining", out_dir, arch)
            return cached

    with cpu_threads(settings.num_threads), flush_denormals():
        metrics, model, processor = _run(
            world_dir, arch, size, seed, progress, settings, tie_embeddings
        )
    metrics["settings"] = key
    write_model_folder(out_dir, model, processor, metrics)
    logger.info("%s model written to %s in %.0f s", arch, out_dir, metrics["train_seconds"])
    return metrics


def _timed(clock: dict, name: str, start: tuple[float, float]) -> tuple[float, float]:
    """Record wall and process-CPU seconds since `start` under `name`; return a new start."""
    now = (time.perf_counter(), time.process_time())
    clock[f"{name}_seconds"] = round(now[0] - start[0], 2)
    clock[f"{name}_cpu_seconds"] = round(now[1] - start[1], 2)
    return now


def _run(
    world_dir: Path,
    arch: str,
    size,
    seed: int,
    progress: bool,
    settings: TrainSettings,
    tie_embeddings: bool,
):
    clock: dict[str, float] = {}
    begin = mark = (time.perf_counter(), time.process_time())
    train_lines = read_corpus(world_dir / "corpus" / "train.jsonl")
    heldout_lines = read_corpus(world_dir / "corpus" / "heldout.jsonl")
    image_size = _image_size(world_dir, train_lines)
    tokenizer = build_world_tokenizer(world_dir, arch)
    processor = build_processor(arch, tokenizer, size, image_size)
    model = build_model(arch, tokenizer, size, image_size, seed=seed, tie_embeddings=tie_embeddings)
    backbone = get_backbone(model)
    n_image = num_image_tokens(arch, size, image_size)
    train_pixels, train_index = load_images(world_dir / "images", train_lines, processor, progress)
    held_pixels, held_index = load_images(world_dir / "images", heldout_lines, processor, progress)
    train = encode_corpus(train_lines, train_index, processor, backbone, n_image, image_size)
    heldout = encode_corpus(heldout_lines, held_index, processor, backbone, n_image, image_size)
    mark = _timed(clock, "prepare", mark)
    logger.info("%s: %d train lines, %d images, prepared in %.1f s",
                arch, len(train.tasks), len(train_pixels), clock["prepare_seconds"])

    generator = torch.Generator().manual_seed(seed)
    labels, classes = vision_labels(train_lines, train_index)
    heads = warm_up_vision(
        model, train_pixels, labels, steps=settings.vision_steps,
        batch_size=settings.vision_batch_size, lr=settings.vision_lr,
        weight_decay=settings.weight_decay, shift=settings.vision_shift,
        grad_clip=settings.grad_clip, generator=generator, progress=progress,
    )
    held_labels, _ = vision_labels(heldout_lines, held_index, classes)
    vision_acc = head_accuracy(model, heads, held_pixels, held_labels)
    mark = _timed(clock, "vision", mark)
    logger.info("%s vision warm-up: held-out head accuracy %s", arch,
                {k: round(v, 3) for k, v in vision_acc.items()})

    features = tower_features(model, train_pixels)  # [n_images, tokens, vision_hidden]
    curve = train_vlm(model, train, features, settings, generator, progress)
    del features
    mark = _timed(clock, "language", mark)

    heldout_acc = answer_accuracy(model, heldout, held_pixels, settings.eval_batch_size)
    if "text" not in heldout_acc["by_task"]:
        # Text facts have no renderings to hold out: their accuracy is on the training facts.
        text_acc = answer_accuracy(model, train.select(train.image_index < 0), None,
                                   settings.eval_batch_size)
        for key in ("by_task", "by_kind", "lines"):
            heldout_acc[key].update(text_acc[key])
        heldout_acc["text_from"] = "train"
    probe = spread(heldout_lines, settings.generation_probe) + spread(
        [x for x in train_lines if x["task"] == "text"], settings.generation_probe)
    generation = generation_exact_match(model, processor, probe, world_dir / "images",
                                        settings.eval_batch_size)
    mark = _timed(clock, "eval", mark)
    _timed(clock, "total", begin)

    metrics = {
        "arch": arch,
        "seed": seed,
        "image_size": image_size,
        "heldout_accuracy": heldout_acc["by_task"],
        "heldout_accuracy_by_kind": heldout_acc["by_kind"],
        "heldout_lines": heldout_acc["lines"],
        "text_accuracy_source": heldout_acc.get("text_from", "heldout"),
        "generation_exact_match": generation,
        "generation_probe_lines": len(probe),
        "vision_heldout_head_accuracy": vision_acc,
        "loss_curve": curve,
        "train_seconds": round(clock["vision_seconds"] + clock["language_seconds"], 2),
        "timing": clock,
        "parameters": parameter_counts(model),
        "config": {"size": size.to_dict(), "train": dataclasses.asdict(settings),
                   "vocab_size": len(tokenizer), "image_tokens": n_image},
        "corpus": {"train_lines": len(train.tasks), "train_images": len(train_pixels),
                   "heldout_lines": len(heldout.tasks), "heldout_images": len(held_pixels)},
        "versions": versions(),
    }
    return metrics, model, processor
