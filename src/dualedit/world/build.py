"""Write the built-in world to a folder in the exact MMEdit layout (docs/architecture.md).

The whole folder is built in a temporary sibling directory and moved into place at the end, so
a crash never leaves a half-written world behind. Every byte is a function of the arguments:
seeded numpy Generators per stream, fixed iteration orders, fixed JSON key order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dualedit.io import atomic_write_text

from .catalogue import (
    CAPTION_KIND,
    CAPTION_PROMPTS,
    CAPTION_SRC,
    CAPTION_TEMPLATE,
    QUESTION_TEMPLATES,
    VQA_KINDS,
    answer_of,
    make_catalogue,
)
from .edits import STREAM_CORPUS, STREAM_HELDOUT, RenderJob, plan_edits
from .render import (
    BACKGROUND_RGB,
    COLOR_RGB,
    MAX_ANGLE,
    NOISE_STD,
    PATTERN_RGB,
    SCALE_RANGE,
    render_entity,
)

logger = logging.getLogger(__name__)

# 2: E-IC captions of content words only, alts differing in every visible attribute.
# 3: eval locality questions never ask a fact an eval edit changes.
FORMAT_VERSION = 3
WORLD_FILE = "world.json"
IMAGE_ROOT = "images"
VQA_TRAIN = "vqa/vqa_train.json"
VQA_EVAL = "vqa/vqa_eval.json"
CAPTION_TRAIN = "caption/caption_train_edit.json"
CAPTION_EVAL = "caption/caption_eval_edit.json"
CORPUS_TRAIN = "corpus/train.jsonl"
CORPUS_HELDOUT = "corpus/heldout.jsonl"


def _corpus(world: dict, seed: int, stream: int, folder: str, renderings: int,
            with_text: bool) -> tuple[list[dict], list[RenderJob]]:
    """Corpus lines and their renderings: per entity `renderings` images, each carrying one line
    per VQA kind and one caption line (random template / prompt); then, if `with_text`, every
    text fact with every template.
    """
    rng = np.random.default_rng([seed, stream])
    lines: list[dict] = []
    jobs: list[RenderJob] = []
    for i, entity in enumerate(world["entities"]):
        for r in range(renderings):
            n = i * renderings + r
            path = f"{folder}/{n:06d}.png"
            jobs.append(RenderJob(path, i, (stream, n)))
            for kind in VQA_KINDS:
                templates = QUESTION_TEMPLATES[kind]
                question = templates[int(rng.integers(len(templates)))]
                lines.append(_line("vqa", path, question, answer_of(entity, kind), kind, entity["name"]))
            prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
            lines.append(_line("caption", path, prompt, entity["caption"], CAPTION_KIND, entity["name"]))
    if with_text:
        for fact in world["text_facts"]:
            for template in world["text_relations"][fact["relation"]]["templates"]:
                lines.append(_line("text", None, template.format(s=fact["subject"]), fact["answer"],
                                   fact["relation"], None))
    return lines, jobs


def _line(task: str, image: str | None, question: str, answer: str, kind: str, entity: str | None) -> dict:
    # Key order is part of the file format.
    return {"task": task, "image": image, "question": question, "answer": answer, "kind": kind,
            "entity": entity}


def _write_json(path: Path, data, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(data, indent=4, sort_keys=sort_keys) + "\n")


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))


def _check_target(out_dir: Path) -> None:
    """Refuse to replace a non-empty folder that is not a world (it could be someone's data)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / WORLD_FILE).is_file():
            raise ValueError(f"{out_dir}: folder is not empty and holds no {WORLD_FILE}; refusing to "
                             f"replace it with a world")


def _swap_into_place(built: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        _check_target(out_dir)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "world")
    os.replace(built, out_dir)
    if old is not None:
        shutil.rmtree(old)


def _render_all(jobs: list[RenderJob], world: dict, seed: int, root: Path, size: int, noise: float,
                progress: bool) -> None:
    folders = sorted({str(Path(job.path).parent) for job in jobs})
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for job in tqdm(jobs, desc="rendering world", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, *job.key])
        image = render_entity(world["entities"][job.entity], rng, size, noise)
        # Files inside the build folder: the folder itself is moved into place atomically.
        image.save(root / job.path, format="PNG")


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def build_world(out_dir: str | os.PathLike, seed: int = 0, *, image_size: int = 32, n_entities: int = 48,
                n_train_vqa: int = 1000, n_eval_vqa: int = 200, n_train_caption: int = 500,
                n_eval_caption: int = 48, renderings_per_entity: int = 120, heldout_per_entity: int = 10,
                text_subjects_per_relation: int = 60, noise: float = NOISE_STD,
                progress: bool = True) -> Path:
    """Generate the built-in world into `out_dir` (replacing a previous world there).

    Args:
        out_dir: target folder; must not exist, be empty, or hold a previous world.
        seed: the same seed gives byte-identical files; another seed another world.
        image_size: side of the square RGB PNGs in pixels.
        n_entities: named entities (unique shape/color/pattern combinations), <= 256; above
            144 the world has 8 shapes and 8 colors instead of 6 (catalogue.make_catalogue).
            A world of E entities has 6E distinct E-VQA facts: n_eval_vqa must leave some
            unedited for the locality questions.
        n_train_vqa, n_eval_vqa: E-VQA edit records per split.
        n_train_caption, n_eval_caption: E-IC edit records per split (eval: at most one per
            entity, so at most n_entities).
        renderings_per_entity: corpus images per entity (each carries 7 corpus lines).
        heldout_per_entity: extra renderings per entity for corpus/heldout.jsonl.
        text_subjects_per_relation: invented subjects per text relation (4 relations, 4
            templates each, all in the corpus).
        noise: standard deviation of the gaussian pixel noise.
        progress: show a tqdm bar while rendering.

    Returns:
        the world folder as a Path.

    Example:
        >>> root = build_world("out/world", seed=0, progress=False)
        >>> len(load_world(root)["entities"])
        48
    """
    _check_counts(n_train_vqa=n_train_vqa, n_eval_vqa=n_eval_vqa, n_train_caption=n_train_caption,
                  n_eval_caption=n_eval_caption, renderings_per_entity=renderings_per_entity,
                  heldout_per_entity=heldout_per_entity)
    if renderings_per_entity < 1:
        raise ValueError("renderings_per_entity must be >= 1 (the corpus teaches every entity)")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    out_dir = Path(out_dir)
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    world = make_catalogue(seed, n_entities, text_subjects_per_relation)
    vqa = plan_edits(world, seed, "vqa", n_train_vqa, n_eval_vqa)
    cap = plan_edits(world, seed, "caption", n_train_caption, n_eval_caption)
    corpus, corpus_jobs = _corpus(world, seed, STREAM_CORPUS, "corpus", renderings_per_entity, True)
    heldout, heldout_jobs = _corpus(world, seed, STREAM_HELDOUT, "heldout", heldout_per_entity, False)
    jobs = corpus_jobs + heldout_jobs + vqa.jobs + cap.jobs

    counts = {"entities": n_entities, "text_facts": len(world["text_facts"]),
              "vqa_train": len(vqa.train), "vqa_eval": len(vqa.eval),
              "caption_train": len(cap.train), "caption_eval": len(cap.eval),
              "corpus_lines": len(corpus), "heldout_lines": len(heldout), "images": len(jobs),
              "renderings_per_entity": renderings_per_entity, "heldout_per_entity": heldout_per_entity}
    meta = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "image_size": image_size,
        "noise": noise,
        "counts": counts,
        "kinds": list(VQA_KINDS),
        "caption_kind": CAPTION_KIND,
        "attributes": world["attributes"],
        "entities": world["entities"],
        "question_templates": {k: list(v) for k, v in QUESTION_TEMPLATES.items()},
        "caption_src": CAPTION_SRC,
        "caption_prompts": list(CAPTION_PROMPTS),
        "caption_template": CAPTION_TEMPLATE,
        "text_relations": world["text_relations"],
        "text_facts": world["text_facts"],
        # The colors of this world only (worlds of <= 144 entities never list the extra ones).
        "render": {"color_rgb": {k: list(COLOR_RGB[k]) for k in world["attributes"]["color"]},
                   "pattern_rgb": list(PATTERN_RGB), "background_rgb": [list(c) for c in BACKGROUND_RGB],
                   "scale_range": list(SCALE_RANGE), "max_angle": MAX_ANGLE},
        # What each edit record is about (records keep exactly the MMEdit fields).
        "record_index": {"vqa_train": vqa.train_index, "vqa_eval": vqa.eval_index,
                         "caption_train": cap.train_index, "caption_eval": cap.eval_index},
        "files": {"vqa_train": VQA_TRAIN, "vqa_eval": VQA_EVAL, "caption_train": CAPTION_TRAIN,
                  "caption_eval": CAPTION_EVAL, "corpus_train": CORPUS_TRAIN,
                  "corpus_heldout": CORPUS_HELDOUT, "image_root": IMAGE_ROOT},
    }

    # Not mkdtemp: its 0700 mode would become the world folder's; mkdir applies the umask.
    build = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}-{time.time_ns()}"
    build.mkdir()
    try:
        _render_all(jobs, world, seed, build / IMAGE_ROOT, image_size, noise, progress)
        _write_json(build / VQA_TRAIN, vqa.train)
        _write_json(build / VQA_EVAL, vqa.eval)
        _write_json(build / CAPTION_TRAIN, cap.train)
        _write_json(build / CAPTION_EVAL, cap.eval)
        _write_jsonl(build / CORPUS_TRAIN, corpus)
        _write_jsonl(build / CORPUS_HELDOUT, heldout)
        _write_json(build / WORLD_FILE, meta, sort_keys=True)
        _swap_into_place(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    logger.info("built world seed=%d in %s: %d entities, %d images, %d corpus lines (%.1f s)",
                seed, out_dir, n_entities, len(jobs), len(corpus), time.perf_counter() - start)
    return out_dir


def load_world(world_dir: str | os.PathLike) -> dict:
    """Read `world.json` of a world folder written by `build_world`.

    Raises FileNotFoundError naming the path when there is none, ValueError when its
    `format_version` is not this library's.
    """
    path = Path(world_dir) / WORLD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {WORLD_FILE}; build a world with `dualedit world --out DIR`")
    with open(path, encoding="utf-8") as f:
        world = json.load(f)
    version = world.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: field 'format_version' is {version!r}, this library reads {FORMAT_VERSION}")
    return world
