"""Word-level tokenizers of the small VLMs: special ids, splitting, round trip, world coverage."""

from __future__ import annotations

import json

import pytest

from dualedit.small_vlm.tokenizer import (
    SPECIAL_TOKENS,
    build_tokenizer,
    build_world_tokenizer,
    split_words,
    world_words,
)

@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from dualedit.world import build_world

    return build_world(tmp_path_factory.mktemp("world") / "w", seed=0, n_entities=12, n_train_vqa=4,
                       n_eval_vqa=2, n_train_caption=2, n_eval_caption=2, renderings_per_entity=2,
                       heldout_per_entity=1, text_subjects_per_relation=2, progress=False)


WORDS = ["what", "color", "is", "the", "object", "?", "answer", ":", "red", "a", "photo", "of",
         "nq", "question", "zorb"]


@pytest.mark.parametrize("arch", ["llava", "blip2"])
def test_special_tokens_have_fixed_ids(arch):
    tok = build_tokenizer(WORDS, arch)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == len(SPECIAL_TOKENS) + len(set(WORDS))


@pytest.mark.parametrize("arch", ["llava", "blip2"])
def test_encode_lowercases_splits_punctuation_and_prepends_bos(arch):
    tok = build_tokenizer(WORDS, arch)
    ids = tok("<image>\nWhat color is the object? The answer is: RED</s>").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == ["<s>", "<image>", "what", "color", "is", "the", "object", "?", "the",
                      "answer", "is", ":", "red", "</s>"]
    # No </s> unless the text has it: training appends it explicitly.
    assert tok("red").input_ids == [1, tok.convert_tokens_to_ids("red")]
    assert tok("<image><image>").input_ids == [1, 4, 4]


def test_round_trip_and_unknown_words():
    tok = build_tokenizer(WORDS, "llava")
    text = "nq question: What color is zorb?"
    ids = tok(text).input_ids
    # Word-level decoding puts one space between tokens, punctuation included.
    assert tok.decode(ids, skip_special_tokens=True) == "nq question : what color is zorb ?"
    assert tok.decode(ids, skip_special_tokens=True) == " ".join(split_words(text))
    assert tok("blorp").input_ids == [1, tok.unk_token_id]


def test_image_token_attribute_only_for_llava():
    assert build_tokenizer(WORDS, "llava").image_token == "<image>"
    assert not hasattr(build_tokenizer(WORDS, "blip2"), "image_token")
    with pytest.raises(ValueError, match="arch"):
        build_tokenizer(WORDS, "opt")


def test_split_words_matches_the_tokenizer():
    assert split_words("Describe this picture, please!") == ["describe", "this", "picture", ",",
                                                             "please", "!"]


def test_world_tokenizer_covers_every_corpus_and_record_word(tiny_world):
    tok = build_world_tokenizer(tiny_world, "blip2")
    texts = []
    for name in ("train", "heldout"):
        for line in (tiny_world / "corpus" / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    for record in json.loads((tiny_world / "vqa" / "vqa_eval.json").read_text()):
        texts += [record["src"], record["alt"], record["loc"], record["m_loc_q"]]
    ids = tok(texts, add_special_tokens=False).input_ids
    assert all(tok.unk_token_id not in row for row in ids)
    assert set(world_words(tiny_world)) == set(tok.get_vocab()) - set(SPECIAL_TOKENS)
