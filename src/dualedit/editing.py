"""One edit as a user runs it (`dualedit edit`): load a VLM folder and an editor (a saved editor
folder of any method, or a new editor of an untrained method), apply the edit, ask questions,
and report each answer before and after (with the gate's decision where the method has one).

Prompt choice: the user gives plain questions ("What colour is the ball?"); the model was trained
and is scored on the protocol's VQA prompt (data/prompts.py), so the prompt it sees is
`"{question} The answer is:"`, unless the question already ends with "The answer is:" (any case),
which is then taken as the full prompt. `task="caption"` takes every question as is (E-IC
prompts such as "a photo of").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dualedit.data.prompts import ANSWER_SUFFIX, Sample, encode_prompts, vqa_prompt
from dualedit.editors.base import Editor, open_image
from dualedit.editors.registry import check_editor_request, open_editor
from dualedit.evaluate import load_vlm

logger = logging.getLogger(__name__)

TASKS = ("vqa", "caption")

PathLike = str | os.PathLike


def question_prompt(question: str, task: str = "vqa") -> str:
    """The prompt the model sees for a user's question (see the module docstring).

    Example:
        >>> question_prompt("What colour is the ball?")
        'What colour is the ball? The answer is:'
        >>> question_prompt("What colour is the ball? The answer is:")
        'What colour is the ball? The answer is:'
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"a question must be a non-empty string, got {question!r}")
    question = question.strip()
    if task == "caption" or question.lower().endswith(ANSWER_SUFFIX.strip().lower()):
        return question
    return vqa_prompt(question)


def edit_and_ask(
    model_path: PathLike,
    editor_path: PathLike | None,
    image: PathLike | None,
    prompt: str,
    target: str,
    questions: Sequence[str] | None = None,
    ask_images: Sequence[PathLike | None] | None = None,
    max_new_tokens: int = 8,
    *,
    task: str = "vqa",
    device: str = "cpu",
    method: str | None = None,
    options: dict[str, Any] | None = None,
    ignore_base_mismatch: bool = False,
) -> list[dict[str, Any]]:
    """Apply one edit and answer questions before and after it (greedy decoding).

    Args:
        model_path: a VLM folder (`save_pretrained`, loaded with `load_vlm`).
        editor_path: a saved editor folder of any method (`save_pretrained`, e.g. a
            `dualedit train` best/ folder; its method is read from it), or None for a new
            editor of the untrained `method`.
        image: the edit's image, or None for a text-only edit.
        prompt: the edit's question (made into the protocol prompt, see `question_prompt`).
        target: the new answer.
        questions: what to ask afterwards; None asks the edit's own question.
        ask_images: one image per question, or a single one for all; None uses the edit's image.
        max_new_tokens: the longest answer generated.
        task: "vqa" (default) or "caption": how questions become prompts.
        device: where the model runs.
        method: the method (None: the one `editor_path` was saved by).
        options: config fields of the method (for a folder: run-time overrides).

    Returns:
        One dict per question: question, prompt (what the model saw), image (str or None),
        before, after (decoded answers), similarity (a gated method's similarity of the question
        to the nearest edit, NaN for methods without a gate), edited (whether the method
        changed this question; None where it cannot tell).

    Raises:
        FileNotFoundError: a model, adapter or image path is missing.
        ValueError: a bad argument (names it).
    """
    n_new = max_new_tokens
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    asked = [prompt] if questions is None else list(questions)
    if not asked:
        raise ValueError("questions: give at least one question (or None for the edit's own)")
    images = _ask_images(image, ask_images, len(asked))
    prompts = [question_prompt(q, task) for q in asked]
    edit_prompt = question_prompt(prompt, task)
    for path in dict.fromkeys(p for p in [image, *images] if p is not None):
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} not found")
        open_image(path)  # a damaged image fails here, naming it, before the model loads

    check_editor_request(method, editor_path)
    model, processor = load_vlm(model_path, device=device)
    editor = open_editor(
        model,
        processor,
        method=method,
        directory=editor_path,
        options=options,
        ignore_base_mismatch=ignore_base_mismatch,
    )
    try:
        asks = list(zip(images, prompts, strict=True))
        before = [_answer(editor, img, text, n_new, edited=False) for img, text in asks]
        edit_id = editor.edit(image, edit_prompt, target.strip())
        logger.info("edit %s: %r -> %r", edit_id, edit_prompt, target)
        after = [_answer(editor, img, text, n_new, edited=True) for img, text in asks]
    finally:
        editor.detach()
    return [
        {
            "question": question,
            "prompt": text,
            "image": None if img is None else str(img),
            "before": old[0],
            "after": new[0],
            "similarity": new[1],
            "edited": new[2],
        }
        for question, text, img, old, new in zip(asked, prompts, images, before, after, strict=True)
    ]


def _ask_images(
    image: PathLike | None, ask_images: Sequence[PathLike | None] | None, n: int
) -> list[PathLike | None]:
    if ask_images is None:
        return [image] * n
    given = list(ask_images)
    if len(given) == 1:
        return given * n
    if len(given) != n:
        raise ValueError(f"ask_images: {len(given)} images for {n} questions (give 1 or {n})")
    return given


def _answer(
    editor: Editor, image: PathLike | None, prompt: str, max_new_tokens: int, *, edited: bool
) -> tuple[str, float, bool | None]:
    """(decoded greedy answer, gate similarity, edited) for one question."""
    loaded = None if image is None else open_image(image)
    sample = Sample(None if loaded is None else "ask", prompt, "")
    batch = encode_prompts([sample], editor.processor, editor.backbone, lambda _: loaded).to(
        next(editor.model.parameters()).device
    )
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    with torch.no_grad():
        if not edited:
            with editor.disabled():
                tokens = editor.generate(batch, **kwargs)  # [1, new]
            return _decode(editor, tokens), float("nan"), False
        tokens = editor.generate(batch, **kwargs)  # [1, new]
    decision = editor.explain(loaded, prompt)
    if decision is None:
        return _decode(editor, tokens), float("nan"), None
    return _decode(editor, tokens), decision.similarity, decision.edited


def _decode(editor: Editor, tokens: torch.Tensor) -> str:
    tokenizer = getattr(editor.processor, "tokenizer", editor.processor)
    return tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
