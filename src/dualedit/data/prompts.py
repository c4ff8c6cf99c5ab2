"""The benchmark's prompt protocol: records -> backbone-agnostic samples.

Prompts follow the paper's released code (docs/SPEC section 2): E-VQA "{src} The answer is:",
M-Loc "{m_loc_q} The answer is:", T-Loc "{loc}?" without an image, E-IC the prompt as written
("a photo of") with the caption as target. Every target is scored as " " + answer. How a sample
becomes model text is the backbone's `prompt_text` (LLaVA puts "<image>\\n" first, BLIP-2 lets its
processor put the query placeholders first). `encode` turns samples into teacher-forced model inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from dualedit.data.records import ALT_POLICIES, EditRecord

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
    """E-VQA and M-Loc prompt. Example: vqa_prompt("What is it?") -> "What is it? The answer is:"."""
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
