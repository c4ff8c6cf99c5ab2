"""The benchmark's prompt protocol: records -> backbone-agnostic samples.

Prompts follow the paper's released code (docs/SPEC section 2): E-VQA "{src} The answer is:",
M-Loc "{m_loc_q} The answer is:", T-Loc "{loc}?" without an image, E-IC the prompt as written
("a photo of") with the caption as target. Every target is scored as " " + answer. How a sample
becomes model text is the backbone's `prompt_text` (LLaVA puts "<image>\\n" first, BLIP-2 lets its
processor put the query placeholders first). `encode` makes teacher-forced model inputs.
"""

from __future__ import annotations

import dataclasses

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from dualedit.data.records import ALT_POLICIES, EditRecord

if TYPE_CHECKING:
    from dualedit.backbones.base import Backbone

TASKS: tuple[str, ...] = ("vqa", "caption")
# Corpus lines also carry text-only facts ("nq question: ..."), prompted like T-Loc.
CORPUS_TASKS: tuple[str, ...] = ("vqa", "caption", "text")
ANSWER_SUFFIX = " The answer is:"
SAMPLE_KEYS: tuple[str, ...] = ("rel", "t_gen", "v_gen", "t_loc", "m_loc")

PROMPT_PROTOCOL: dict[str, Any] = {
    "name": "mmedit-paper-code",
    "version": 1,
    "vqa_prompt": "{src} The answer is:",
    "vqa_rephrase_prompt": "{rephrase} The answer is:",
    "caption_prompt": "{src}",
    "caption_rephrase_prompt": "{rephrase}",
    "t_loc_prompt": "{loc}?",
    "t_loc_image": None,
    "m_loc_prompt": "{m_loc_q} The answer is:",
    "target": " {answer}",
    "alt_policy": "strip",
    "llava_text": "<image>\n{prompt} (text-only: {prompt}); no chat template",
    "blip2_text": "{prompt} after the processor's query placeholders (text-only: {prompt})",
    "teacher_forcing": "input = prompt + target; logits at p predict token p+1",
}


@dataclass(frozen=True)
class Sample:
    """One scored query, backbone-agnostic.

    Attributes:
        image: image path relative to the dataset's image root, or None for text-only.
        prompt: the protocol prompt (no image token, no chat template).
        target: the scored continuation, already with its leading space (" " + answer).
    """

    image: str | None
    prompt: str
    target: str

    @property
    def has_image(self) -> bool:
        return self.image is not None


def prompt_protocol(alt_policy: str = "strip") -> dict[str, Any]:
    """A copy of `PROMPT_PROTOCOL` with the dataset's alt whitespace policy, for results.json."""
    if alt_policy not in ALT_POLICIES:
        raise ValueError(f"unknown alt_policy {alt_policy!r}; expected one of {ALT_POLICIES}")
    protocol = copy.deepcopy(PROMPT_PROTOCOL)
    protocol["alt_policy"] = alt_policy
    return protocol


def vqa_prompt(question: str) -> str:
    """E-VQA and M-Loc prompt: vqa_prompt("What is it?") -> "What is it? The answer is:"."""
    return question + ANSWER_SUFFIX


def caption_prompt(prompt: str) -> str:
    """E-IC prompt: the record's `src` / `rephrase` as written (e.g. "a photo of")."""
    return prompt


def text_loc_prompt(loc: str) -> str:
    """T-Loc prompt. `loc` already starts with "nq question: "; the protocol appends "?"."""
    return loc + "?"


def target_text(answer: str) -> str:
    """The scored continuation: " " + answer. Example: target_text("2") -> " 2"."""
    return " " + answer


def task_prompt(task: str, question: str) -> str:
    """The prompt for a question of a task ("vqa", "caption" or, for corpus facts, "text").

    Example:
        >>> task_prompt("vqa", "How many dogs?")
        'How many dogs? The answer is:'
    """
    if task == "vqa":
        return vqa_prompt(question)
    if task == "caption":
        return caption_prompt(question)
    if task == "text":
        return text_loc_prompt(question)
    raise ValueError(f"unknown task {task!r}; expected one of {CORPUS_TASKS}")


def question_sample(task: str, image: str | None, question: str, answer: str) -> Sample:
    """A sample from a (task, image, question, answer) tuple, e.g. a pretraining corpus line.

    Text facts ("text") must have no image; VQA and caption questions must have one.
    """
    if (task == "text") != (image is None):
        raise ValueError(f"task {task!r} with image {image!r}: only 'text' samples have no image")
    return Sample(image=image, prompt=task_prompt(task, question), target=target_text(answer))


def record_samples(record: EditRecord, task: str) -> dict[str, Sample]:
    """The protocol's samples for one record.

    Args:
        record: the edit record (its `alt` already under the dataset's whitespace policy).
        task: "vqa" (E-VQA) or "caption" (E-IC).

    Returns:
        {"rel", "t_gen", "v_gen", "t_loc", "m_loc"} and "m_loc_hard" when the record has the
        hard-locality fields. Rel/T-Gen/V-Gen target the new answer `alt`; T-Loc and M-Loc target
        their own answers (scored against the unedited model's predictions).

    Example:
        >>> s = record_samples(vqa_train[0], "vqa")["rel"]
        >>> s.prompt, s.target
        ('How many skyscrapers are there? The answer is:', ' 2')
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    edit_prompt = task_prompt(task, record.src)
    target = target_text(record.alt)
    samples = {
        "rel": Sample(record.image, edit_prompt, target),
        "t_gen": Sample(record.image, task_prompt(task, record.rephrase), target),
        "v_gen": Sample(record.image_rephrase, edit_prompt, target),
        "t_loc": Sample(None, text_loc_prompt(record.loc), target_text(record.loc_ans)),
        "m_loc": Sample(record.m_loc, vqa_prompt(record.m_loc_q), target_text(record.m_loc_a)),
    }
    if record.has_hard:
        samples["m_loc_hard"] = Sample(
            record.hard_m_loc, vqa_prompt(record.hard_m_loc_q), target_text(record.hard_m_loc_a)
        )
    return samples


# -- encoding: samples -> teacher-forced model inputs ---------------------------------------------

LoadImage = Callable[[str], Image.Image]


@dataclass
class EncodedBatch:
    """Teacher-forced inputs for prompt + target, right-padded.

    Logits at position p predict token p + 1, so `target_mask` is True at the positions from the
    last prompt token to the second-to-last target token, and `target_ids` holds the token each of
    those positions must predict.

    Attributes:
        input_ids: [batch, seq] long, image placeholders included.
        attention_mask: [batch, seq] long, 0 on padding.
        pixel_values: [batch, 3, H, W] float, or None for a text-only batch.
        target_mask: [batch, seq] bool.
        target_ids: [batch, seq] long, -100 where `target_mask` is False.
        prompt_end: [batch] long, index of the last prompt token.
        image_mask: [batch, seq] bool, True at image placeholder positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    target_mask: torch.Tensor
    target_ids: torch.Tensor
    prompt_end: torch.Tensor
    image_mask: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward (pixel_values only when there are images)."""
        return _model_inputs(self)

    def to(self, device: torch.device | str) -> EncodedBatch:
        """A copy with every tensor on `device`."""
        return _to(self, device)


@dataclass
class PromptBatch:
    """Prompts alone, for generate(): left-padded by default so every prompt ends at seq - 1.

    Attributes as in `EncodedBatch`, without the target fields.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    prompt_end: torch.Tensor
    image_mask: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return _model_inputs(self)

    def to(self, device: torch.device | str) -> PromptBatch:
        return _to(self, device)


def select_rows(batch: Any, rows: slice | torch.Tensor) -> Any:
    """The rows `rows` (a slice, or [k] long indices) of an `EncodedBatch` or `PromptBatch`, as
    a batch of the same type and width (every tensor field taken along dim 0)."""
    fields = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            value = value[rows] if isinstance(rows, slice) else value.index_select(
                0, rows.to(value.device)
            )
        fields[f.name] = value
    return type(batch)(**fields)


def group_by_image(samples: Sequence[Sample]) -> dict[bool, list[int]]:
    """Indices of the samples with and without an image: {True: [...], False: [...]}.

    `encode` takes one kind per batch; this is how a caller splits a mixed list.
    """
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, sample in enumerate(samples):
        groups[sample.has_image].append(i)
    return groups


def unknown_tokens(processor: Any, text: str) -> int:
    """How many of `text`'s tokens are the tokenizer's unknown token (0 without one)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0
    return tokenizer(text, add_special_tokens=False)["input_ids"].count(unk)


def encode(
    samples: Sequence[Sample], processor: Any, backbone: Backbone, load_image: LoadImage
) -> EncodedBatch:
    """Tokenise prompt + target for teacher forcing, right padding.

    Prompt + target is tokenised by the processor (which expands the image placeholders and
    processes the image, once); the prompt's tokens are its tokenizer's, with the placeholders
    expanded to the model's count, when they are a prefix of the full tokens (else the processor
    tokenises the prompt too, see `_prompt_prefix`). The target tokens are those after the
    prompt's tokens, which must be a prefix of the full tokens.

    Args:
        samples: all with an image or all without (see `group_by_image`).
        processor: the model's processor (LlavaProcessor, Blip2Processor).
        backbone: the model's backbone (knows the prompt text and the image token).
        load_image: relative image path -> PIL image (e.g. an `ImageStore`).

    Returns:
        The batch; see `EncodedBatch`.

    Raises:
        ValueError: mixed image/text-only samples, an empty target, a tokenizer that merges prompt
            and target tokens, or an image placeholder count that does not match the model.

    Example:
        >>> batch = encode([Sample("a.png", "What is it? The answer is:", " cat")], proc, bb, store)
        >>> logits = model(**batch.model_inputs()).logits
        >>> hits = logits.argmax(-1)[batch.target_mask] == batch.target_ids[batch.target_mask]
    """
    has_image = _check_batch(samples)
    rows: list[list[int]] = []
    prompt_lens: list[int] = []
    pixels: list[torch.Tensor] = []
    for i, sample in enumerate(samples):
        image = _load(load_image, sample, i) if has_image else None
        text = backbone.prompt_text(sample.prompt, has_image)
        full_ids, pixel_values = _tokenize(processor, text + sample.target, image)
        prompt_ids = _prompt_prefix(processor, backbone, text, full_ids, has_image)
        if prompt_ids is None:
            prompt_ids, _ = _tokenize(processor, text, image)
        _check_split(prompt_ids, full_ids, sample, i, processor)
        _check_image_tokens(full_ids, backbone, has_image, i)
        rows.append(full_ids)
        prompt_lens.append(len(prompt_ids))
        if pixel_values is not None:
            pixels.append(pixel_values)
    input_ids, attention_mask, offsets = _pad(rows, _pad_id(processor), "right")
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)  # [batch, seq]
    target_ids = torch.full_like(input_ids, -100)  # [batch, seq]
    for i, (row, n_prompt) in enumerate(zip(rows, prompt_lens, strict=True)):
        # logits at p predict p + 1: positions n_prompt-1 .. len-2 predict the target tokens.
        target_mask[i, n_prompt - 1 : len(row) - 1] = True
        target_ids[i, n_prompt - 1 : len(row) - 1] = torch.tensor(row[n_prompt:])
    return EncodedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(pixels) if has_image else None,
        target_mask=target_mask,
        target_ids=target_ids,
        prompt_end=torch.tensor([n - 1 for n in prompt_lens]) + offsets,
        image_mask=backbone.image_mask(backbone.config, input_ids) & attention_mask.bool(),
    )


def encode_prompts(
    samples: Sequence[Sample],
    processor: Any,
    backbone: Backbone,
    load_image: LoadImage,
    padding_side: str = "left",
) -> PromptBatch:
    """Tokenise the prompts alone (targets ignored) for generate().

    Args and Raises as in `encode`; `padding_side` "left" (for generate) or "right".

    Example:
        >>> batch = encode_prompts(samples, proc, bb, store)
        >>> new_tokens = bb.generate(model, **batch.model_inputs(), max_new_tokens=8)
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    has_image = _check_batch(samples)
    rows: list[list[int]] = []
    pixels: list[torch.Tensor] = []
    for i, sample in enumerate(samples):
        image = _load(load_image, sample, i) if has_image else None
        ids, pixel_values = _tokenize(
            processor, backbone.prompt_text(sample.prompt, has_image), image
        )
        _check_image_tokens(ids, backbone, has_image, i)
        rows.append(ids)
        if pixel_values is not None:
            pixels.append(pixel_values)
    input_ids, attention_mask, offsets = _pad(rows, _pad_id(processor), padding_side)
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(pixels) if has_image else None,
        prompt_end=torch.tensor([len(row) - 1 for row in rows]) + offsets,
        image_mask=backbone.image_mask(backbone.config, input_ids) & attention_mask.bool(),
    )


def _check_batch(samples: Sequence[Sample]) -> bool:
    if not samples:
        raise ValueError("cannot encode an empty list of samples")
    kinds = {sample.has_image for sample in samples}
    if len(kinds) > 1:
        raise ValueError(
            "samples mix image and text-only inputs; encode them as separate batches "
            "(see group_by_image)"
        )
    return kinds.pop()


def _load(load_image: LoadImage, sample: Sample, i: int) -> Image.Image:
    image = load_image(sample.image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"sample {i}: load_image({sample.image!r}) returned {type(image).__name__}")
    return image


def _tokenize(
    processor: Any, text: str, image: Image.Image | None
) -> tuple[list[int], torch.Tensor | None]:
    if image is None:
        out = processor(text=text, return_tensors="pt")
        return out["input_ids"][0].tolist(), None
    out = processor(text=text, images=image, return_tensors="pt")
    return out["input_ids"][0].tolist(), out["pixel_values"]  # pixel_values [1, 3, H, W]


def _prompt_prefix(
    processor: Any, backbone: Backbone, text: str, full_ids: list[int], has_image: bool
) -> list[int] | None:
    """The prompt's tokens as a prefix of `full_ids`, from the tokenizer alone, or None.

    The processor's text work is mostly argument checking and its image work is repeated for
    every call, so the prompt (tokenised only to find where the target starts) skips both: the
    tokenizer's ids of `text`, with the image placeholders counted as the model's number of image
    tokens, must match `full_ids` on every non-placeholder token and on the placeholder count.
    Anything else (a processor that does more than expand placeholders) returns None, and the
    caller asks the processor.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        ids = list(tokenizer(text)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot run alone: use the processor
        return None
    if not has_image:
        return ids if full_ids[: len(ids)] == ids else None
    placeholder = backbone.image_token_id(backbone.config)
    expected = backbone.num_image_tokens(backbone.config)
    n = len(ids) - ids.count(placeholder) + expected
    prefix = full_ids[:n]
    if prefix.count(placeholder) != expected:
        return None
    if [t for t in prefix if t != placeholder] != [t for t in ids if t != placeholder]:
        return None
    return prefix


def _check_split(
    prompt_ids: list[int], full_ids: list[int], sample: Sample, i: int, processor: Any
):
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids:
        tokenizer = getattr(processor, "tokenizer", processor)
        raise ValueError(
            f"sample {i}: the prompt's tokens are not a prefix of prompt + target (the tokenizer "
            f"merges across the boundary): prompt {sample.prompt!r} target {sample.target!r}; "
            f"prompt ends {tokenizer.convert_ids_to_tokens(prompt_ids[-3:])}, full has "
            f"{tokenizer.convert_ids_to_tokens(full_ids[max(n - 3, 0) : n + 2])}"
        )
    if len(full_ids) == n:
        raise ValueError(f"sample {i}: target {sample.target!r} has no tokens")


def _check_image_tokens(ids: list[int], backbone: Backbone, has_image: bool, i: int) -> None:
    # BLIP-2 does not check the placeholder count itself; a mismatch silently drops image content.
    found = ids.count(backbone.image_token_id(backbone.config))
    expected = backbone.num_image_tokens(backbone.config) if has_image else 0
    if found != expected:
        raise ValueError(
            f"sample {i}: {found} image placeholder tokens, the {backbone.model_type} model "
            f"expects {expected}; is the processor the model's own (patch size, num_query_tokens, "
            "image token id)?"
        )


def _pad_id(processor: Any) -> int:
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
    return int(tokenizer.pad_token_id)


def _pad(
    rows: list[list[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest row. Returns input_ids, attention_mask [batch, seq] and each row's
    offset (how far its tokens moved right: 0 for right padding)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [batch, seq]
    offsets = torch.zeros(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        input_ids[i, start : start + len(row)] = torch.tensor(row)
        attention_mask[i, start : start + len(row)] = 1
        offsets[i] = start
    return input_ids, attention_mask, offsets


def _model_inputs(batch: EncodedBatch | PromptBatch) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.pixel_values is not None:
        inputs["pixel_values"] = batch.pixel_values
    return inputs


def _to(batch: Any, device: torch.device | str) -> Any:
    moved = {
        f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
        for f in fields(batch)
        for v in [getattr(batch, f.name)]
    }
    return type(batch)(**moved)
