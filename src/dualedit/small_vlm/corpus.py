"""A world's pretraining corpus as tensors: read once, images pre-processed once, ids padded.

Corpus lines (docs/architecture.md) become protocol samples (`question_sample`), then backbone
text (`prompt_text`), then token ids laid out exactly as the model's processor lays them out
(checked against the processor on the first line of each kind), with ``</s>`` appended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dualedit.data.prompts import CORPUS_TASKS, question_sample
from dualedit.small_vlm.tokenizer import IMAGE

LINE_FIELDS = {"task": str, "question": str, "answer": str, "kind": str}


def read_corpus(path: str | Path) -> list[dict]:
    """The lines of a corpus JSONL file, validated.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not JSON or a field is missing or of the wrong type (names the
            file, line and field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file missing; build the world first")
    lines = []
    with path.open(encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not JSON ({error})") from None
            for field, kind in LINE_FIELDS.items():
                if not isinstance(row.get(field), kind):
                    raise ValueError(f"{path}:{line_no}: field {field!r} must be a {kind.__name__}")
            if row["task"] not in CORPUS_TASKS:
                raise ValueError(f"{path}:{line_no}: task {row['task']!r} not in {CORPUS_TASKS}")
            image = row.get("image")
            if (row["task"] == "text") != (image is None):
                raise ValueError(f"{path}:{line_no}: field 'image' must be null exactly for text")
            lines.append(row)
    if not lines:
        raise ValueError(f"{path}: no corpus lines")
    return lines


def load_images(image_root: Path, lines: list[dict], processor, progress: bool = False):
    """Decode and pre-process every distinct image of `lines` once.

    Returns:
        pixel_values [n_images, 3, H, W] float32, and {relative path: row}.
    """
    paths = sorted({line["image"] for line in lines if line["image"] is not None})
    index = {path: row for row, path in enumerate(paths)}
    chunks = []
    for start in tqdm(range(0, len(paths), 512), desc="images", disable=not progress, leave=False):
        images = []
        for rel in paths[start:start + 512]:
            full = image_root / rel
            if not full.is_file():
                raise FileNotFoundError(f"{full}: image named by the corpus is missing")
            with Image.open(full) as image:
                images.append(np.asarray(image.convert("RGB")))
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        chunks.append(torch.as_tensor(pixels, dtype=torch.float32))
    if not chunks:
        return torch.zeros(0, 3, 1, 1), index
    return torch.cat(chunks), index  # [n_images, 3, H, W]


@dataclass
class EncodedCorpus:
    """Corpus lines as right-padded token ids. Targets start at `prompt_lens` and last
    `target_lens` tokens; ``</s>`` follows them; `image_index` is -1 for text-only lines."""

    input_ids: torch.Tensor  # [n, max_len]
    lengths: torch.Tensor  # [n]
    prompt_lens: torch.Tensor  # [n]
    target_lens: torch.Tensor  # [n]
    image_index: torch.Tensor  # [n]
    tasks: list[str]
    kinds: list[str]
    special_ids: tuple[int, ...]  # never trained as targets: pad, bos, image placeholder

    def select(self, mask: torch.Tensor) -> EncodedCorpus:
        """The lines where `mask` [n] is True, in order."""
        rows = torch.nonzero(mask).flatten()
        return EncodedCorpus(
            self.input_ids[rows], self.lengths[rows], self.prompt_lens[rows],
            self.target_lens[rows], self.image_index[rows],
            [self.tasks[i] for i in rows.tolist()], [self.kinds[i] for i in rows.tolist()],
            self.special_ids,
        )


def _check_layout(processor, text: str, has_image: bool, ids: list[int], pixel_hw: int) -> None:
    """The processor's ids for `text` must be ours (without the appended target and </s>)."""
    image = [Image.new("RGB", (pixel_hw, pixel_hw))] if has_image else None
    reference = processor(images=image, text=[text])["input_ids"][0]
    reference = list(reference.tolist() if hasattr(reference, "tolist") else reference)
    if reference != ids:
        raise RuntimeError(f"corpus encoding disagrees with the processor for {text!r}: "
                           f"{ids} != {reference}")


def encode_corpus(lines: list[dict], image_index: dict[str, int], processor, backbone,
                  n_image_tokens: int, image_size: int) -> EncodedCorpus:
    """Token ids of every line: prompt text of the backbone, " " + answer, then ``</s>``.

    LLaVA's "<image>" expands into `n_image_tokens` placeholders after ``<s>``; BLIP-2's
    placeholders go before ``<s>``, as their processors do.
    """
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    prompts, fulls, has_image = [], [], []
    for line in lines:
        sample = question_sample(line["task"], line["image"], line["question"], line["answer"])
        text = backbone.prompt_text(sample.prompt, sample.has_image)
        prompts.append(text)
        fulls.append(text + sample.target)
        has_image.append(sample.has_image)
    expand = backbone.model_type == "llava"

    def tokenize(texts: list[str]) -> list[list[int]]:
        if expand:
            texts = [t.replace(IMAGE, IMAGE * n_image_tokens) for t in texts]
        return tokenizer(texts, add_special_tokens=True)["input_ids"]

    prompt_ids, full_ids = tokenize(prompts), tokenize(fulls)
    rows = []
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        if f[:len(p)] != p or len(f) == len(p):
            raise ValueError(f"corpus line {i + 1}: answer {lines[i]['answer']!r} does not tokenize "
                             "as a continuation of its prompt")
        if has_image[i] and not expand:
            p, f = [image_id] * n_image_tokens + p, [image_id] * n_image_tokens + f
        rows.append((p, f + [tokenizer.eos_token_id]))
    for flag in (True, False):
        first = next((i for i, h in enumerate(has_image) if h == flag), None)
        if first is not None:
            _check_layout(processor, prompts[first], flag, rows[first][0], image_size)

    max_len = max(len(f) for _, f in rows)
    input_ids = torch.full((len(rows), max_len), tokenizer.pad_token_id, dtype=torch.long)
    for i, (_, f) in enumerate(rows):
        input_ids[i, :len(f)] = torch.tensor(f)
    return EncodedCorpus(
        input_ids=input_ids,
        lengths=torch.tensor([len(f) for _, f in rows]),
        prompt_lens=torch.tensor([len(p) for p, _ in rows]),
        target_lens=torch.tensor([len(f) - len(p) - 1 for p, f in rows]),
        image_index=torch.tensor([image_index[x["image"]] if x["image"] is not None else -1
                                  for x in lines]),
        tasks=[x["task"] for x in lines],
        kinds=[x["kind"] for x in lines],
        special_ids=(tokenizer.pad_token_id, tokenizer.bos_token_id, image_id),
    )


def batch_inputs(corpus: EncodedCorpus, rows: torch.Tensor, answer_weight: float,
                  special_ids: torch.Tensor):
    """Right-padded model inputs for some corpus rows, with what each position predicts.

    Position p predicts token p + 1. Returns input_ids [b, s], attention_mask [b, s], loss
    weights [b, s - 1] (0 where the next token is padding, ``<s>`` or an image placeholder;
    `answer_weight` where it is an answer token or the final ``</s>``; 1 for prompt words), and
    `scored` [b, s - 1] (True where the next token is an answer token, ``</s>`` excluded: the
    positions the protocol scores).
    """
    length = int(corpus.lengths[rows].max())
    ids = corpus.input_ids[rows, :length]  # [b, s]
    pos = torch.arange(length)
    attention = (pos[None, :] < corpus.lengths[rows, None]).long()  # [b, s]
    nxt = pos[None, 1:]  # position p predicts token p + 1: [1, s - 1]
    starts = corpus.prompt_lens[rows, None]  # first target token index: [b, 1]
    is_text = (attention[:, 1:] == 1) & ~torch.isin(ids[:, 1:], special_ids)  # [b, s - 1]
    is_answer = (nxt >= starts) & (attention[:, 1:] == 1)  # answer tokens and </s>
    weights = torch.where(is_answer, answer_weight, is_text.float())  # [b, s - 1]
    scored = (nxt >= starts) & (nxt < starts + corpus.target_lens[rows, None])  # answer, no </s>
    return ids, attention, weights, scored


def vision_labels(lines: list[dict], image_index: dict[str, int],
                  classes: dict[str, list[str]] | None = None):
    """Class labels per image for every VQA question kind.

    Args:
        classes: kind -> class names to use (e.g. those of the training corpus, for held-out
            lines); None: the sorted distinct answers of each kind in `lines`.

    Returns:
        (labels, classes): kind -> [n_images] class index (-100 where the image has no question
        of that kind or its answer is not a class), and the classes used.

    Raises:
        ValueError: one image has two different answers for one kind (a broken corpus).
    """
    answers: dict[str, dict[int, str]] = {}
    for line in lines:
        if line["task"] != "vqa":
            continue
        row, known = image_index[line["image"]], answers.setdefault(line["kind"], {})
        if known.setdefault(row, line["answer"]) != line["answer"]:
            raise ValueError(f"image {line['image']}: two answers for kind {line['kind']!r}: "
                             f"{known[row]!r} and {line['answer']!r}")
    if classes is None:
        classes = {kind: sorted(set(answers[kind].values())) for kind in sorted(answers)}
    labels = {}
    for kind, names in classes.items():
        index = {name: i for i, name in enumerate(names)}
        y = torch.full((len(image_index),), -100, dtype=torch.long)
        for row, answer in answers.get(kind, {}).items():
            y[row] = index.get(answer, -100)
        labels[kind] = y
    return labels, classes
