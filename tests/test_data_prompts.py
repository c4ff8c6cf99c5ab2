"""The protocol's prompt strings, independent of any model."""

from __future__ import annotations

import pytest

from dualedit.data.prompts import (
    PROMPT_PROTOCOL,
    Sample,
    prompt_protocol,
    question_sample,
    record_samples,
    task_prompt,
)
from dualedit.data.records import EditRecord

RECORD = EditRecord(
    index=3, src="a photo of", pred="a dog", rephrase="a picture of", alt="a red cat",
    image="edit/3.png", image_rephrase="rephrase/3.png", loc="nq question: who wrote hamlet",
    loc_ans="Shakespeare", m_loc="loc/3.png", m_loc_q="What shape is it?", m_loc_a="circle",
    hard_m_loc="loc/3_hard.png", hard_m_loc_q="What is this called?", hard_m_loc_a="zib",
)  # fmt: skip


def test_task_prompts():
    assert task_prompt("vqa", "How many?") == "How many? The answer is:"
    assert task_prompt("caption", "a photo of") == "a photo of"
    assert task_prompt("text", "nq question: who wrote hamlet") == "nq question: who wrote hamlet?"
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        task_prompt("qa", "x")


def test_question_sample():
    assert question_sample("vqa", "a.png", "What is it?", "cat") == Sample(
        "a.png", "What is it? The answer is:", " cat"
    )
    text = question_sample("text", None, "nq question: where is x", "y")
    assert (text.image, text.prompt, text.target, text.has_image) == (
        None, "nq question: where is x?", " y", False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="only 'text' samples have no image"):
        question_sample("vqa", None, "What?", "x")
    with pytest.raises(ValueError, match="only 'text' samples have no image"):
        question_sample("text", "a.png", "What?", "x")


def test_caption_record_samples_with_hard_locality():
    samples = record_samples(RECORD, "caption")
    assert list(samples) == ["rel", "t_gen", "v_gen", "t_loc", "m_loc", "m_loc_hard"]
    assert samples["rel"] == Sample("edit/3.png", "a photo of", " a red cat")
    assert samples["t_gen"] == Sample("edit/3.png", "a picture of", " a red cat")
    assert samples["v_gen"] == Sample("rephrase/3.png", "a photo of", " a red cat")
    assert samples["t_loc"] == Sample(None, "nq question: who wrote hamlet?", " Shakespeare")
    assert samples["m_loc"] == Sample("loc/3.png", "What shape is it? The answer is:", " circle")
    assert samples["m_loc_hard"] == Sample(
        "loc/3_hard.png", "What is this called? The answer is:", " zib"
    )
    vqa = record_samples(RECORD, "vqa")
    assert vqa["rel"].prompt == "a photo of The answer is:" and vqa["m_loc"] == samples["m_loc"]
    with pytest.raises(ValueError, match="unknown task"):
        record_samples(RECORD, "text")
    with pytest.raises(ValueError, match="record 3: hard-locality fields must come together"):
        EditRecord(**{**RECORD.__dict__, "hard_m_loc_a": None})


def test_protocol_dict_is_copied_and_records_policy():
    protocol = prompt_protocol("keep")
    assert protocol["alt_policy"] == "keep" and PROMPT_PROTOCOL["alt_policy"] == "strip"
    protocol["vqa_prompt"] = "changed"
    assert PROMPT_PROTOCOL["vqa_prompt"] == "{src} The answer is:"
    assert PROMPT_PROTOCOL["t_loc_prompt"] == "{loc}?" and PROMPT_PROTOCOL["target"] == " {answer}"
    with pytest.raises(ValueError):
        prompt_protocol("none")
