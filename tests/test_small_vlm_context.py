"""The context-reading model variant (for IKE): lessons in IKE's form with invented answers that
are never an edit target, a separate cached model folder."""

from __future__ import annotations

import json
import random

import pytest

from dualedit.editors.ike import TEMPLATES
from dualedit.small_vlm.context_reading import (
    EDIT_FILES,
    METRICS_FILE,
    ContextSettings,
    invented_answers,
    lessons,
    teach_context_reading,
)
from dualedit.small_vlm.corpus import read_corpus
from dualedit.small_vlm.pretrain import pretrain
from dualedit.small_vlm.tokenizer import split_words
from dualedit.train.checkpoint import weights_fingerprint
from test_small_vlm_pretrain import QUICK


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from dualedit.world import build_world

    return build_world(tmp_path_factory.mktemp("world") / "w", seed=0, n_entities=12,
                       n_train_vqa=4, n_eval_vqa=2, n_train_caption=2, n_eval_caption=2,
                       renderings_per_entity=2, heldout_per_entity=1,
                       text_subjects_per_relation=2, progress=False)


def test_lessons_read_the_context_and_never_state_an_edit_target(world):
    corpus = read_corpus(world / "corpus" / "train.jsonl")
    answers = invented_answers(world, corpus)
    targets = set()
    for name in EDIT_FILES:
        targets |= {w for r in json.loads((world / name).read_text()) for w in split_words(r["alt"])}
    assert answers and not {w for a in answers for w in split_words(a)} & targets
    settings = ContextSettings()
    assert (settings.fact_prefix, settings.question_prefix) == TEMPLATES["ike"][:2]
    drawn = lessons([x for x in corpus if x["image"]], 300, answers, random.Random(0), settings)
    kinds = [k for k, _ in drawn]
    assert {"copy", "retain", "plain"} == set(kinds)
    truth = {(x["image"], x["question"]): x["answer"] for x in corpus}
    for kind, sample in drawn:
        question = sample.prompt.rsplit(settings.question_prefix, 1)[-1]
        if kind == "plain":
            assert settings.fact_prefix not in sample.prompt
            continue
        fact = sample.prompt.split(settings.question_prefix)[0]
        stated = fact.rsplit(" ", 1)[-1]
        assert stated in answers  # the context's answer is invented
        if kind == "copy":  # the question itself is stated: its answer is read from context
            assert fact.startswith(settings.fact_prefix + question)
            assert sample.target == " " + stated
        else:  # an unrelated question is stated: the true answer stays
            assert not fact.startswith(settings.fact_prefix + question)
            image_question = question.removesuffix(" The answer is:")
            assert sample.target == " " + truth[(sample.image, image_question)]


def test_the_variant_is_a_cached_model_folder_of_its_own(world, tmp_path):
    base = tmp_path / "base"
    pretrain(world, "llava", base, size="tiny", settings=QUICK, progress=False)
    settings = ContextSettings(steps=2, batch_size=4, eval_lines=4)
    out = tmp_path / "variant"
    metrics = teach_context_reading(base, world, out, settings=settings, progress=False)
    assert (out / "config.json").is_file() and (out / METRICS_FILE).is_file()
    assert set(metrics["before"]) == set(metrics["after"]) == {"copy", "retain", "plain"}
    from dualedit.evaluate import load_vlm

    base_model, _ = load_vlm(base)
    variant, _ = load_vlm(out)
    assert weights_fingerprint(variant) != weights_fingerprint(base_model)  # taught, apart
    again = teach_context_reading(base, world, out, settings=settings, progress=False)
    assert again == metrics  # reused from the cache
