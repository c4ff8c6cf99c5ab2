"""The world folder: MMEdit layout, determinism, counterfactual edits, corpus, disjoint splits."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualedit.world import (
    CAPTION_EVAL,
    CAPTION_TRAIN,
    CORPUS_HELDOUT,
    CORPUS_TRAIN,
    HARD_FIELDS,
    RECORD_FIELDS,
    VQA_EVAL,
    VQA_KINDS,
    VQA_TRAIN,
    build_world,
    load_world,
    split_words,
    world_vocabulary,
)
from dualedit.world.catalogue import CAPTION_PROMPTS, QUESTION_TEMPLATES, answer_of, distinct_entities, similar_entities
from dualedit.world.render import COLOR_RGB

TINY = dict(image_size=32, n_train_vqa=36, n_eval_vqa=12, n_train_caption=12, n_eval_caption=6,
            renderings_per_entity=2, heldout_per_entity=1, text_subjects_per_relation=50, progress=False)
SPLITS = {"vqa_train": VQA_TRAIN, "vqa_eval": VQA_EVAL, "caption_train": CAPTION_TRAIN,
          "caption_eval": CAPTION_EVAL}
CORPUS_KEYS = ["task", "image", "question", "answer", "kind", "entity"]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("w") / "world", seed=0, **TINY)


@pytest.fixture(scope="module")
def world(world_dir):
    return load_world(world_dir)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def records(world_dir, split):
    return read_json(world_dir / SPLITS[split])


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path, world_dir):
    again = file_bytes(build_world(tmp_path / "again", seed=0, **TINY))
    first = file_bytes(world_dir)
    assert list(again) == list(first)
    assert again == first
    other = file_bytes(build_world(tmp_path / "other", seed=1, **TINY))
    assert other["world.json"] != first["world.json"]
    assert other["images/corpus/000000.png"] != first["images/corpus/000000.png"]
    assert other[VQA_EVAL] != first[VQA_EVAL]


def test_layout_counts_and_fields(world_dir, world):
    expected = {"vqa_train": 36, "vqa_eval": 12, "caption_train": 12, "caption_eval": 6}
    for split, n in expected.items():
        recs = records(world_dir, split)
        assert len(recs) == n == world["counts"][split] == len(world["record_index"][split])
        for r in recs:
            assert list(r) == list(RECORD_FIELDS + HARD_FIELDS)
            assert all(isinstance(v, str) and v for v in r.values())
            for field in ("image", "image_rephrase", "m_loc", "hard_m_loc"):
                path = world_dir / "images" / r[field]
                assert path.is_file(), path
    n_entities = len(world["entities"])
    assert n_entities >= 48 and world["seed"] == 0 and world["image_size"] == 32
    corpus = read_jsonl(world_dir / CORPUS_TRAIN)
    heldout = read_jsonl(world_dir / CORPUS_HELDOUT)
    per_rendering = len(VQA_KINDS) + 1
    n_text = sum(len(world["text_relations"][f["relation"]]["templates"]) for f in world["text_facts"])
    assert len(corpus) == n_entities * 2 * per_rendering + n_text == world["counts"]["corpus_lines"]
    assert len(heldout) == n_entities * 1 * per_rendering
    for line in corpus + heldout:
        assert list(line) == CORPUS_KEYS
        if line["image"] is not None:
            assert (world_dir / "images" / line["image"]).is_file()
    pngs = list((world_dir / "images").rglob("*.png"))
    assert len(pngs) == world["counts"]["images"] == n_entities * 3 + 4 * sum(expected.values())


def test_images_are_rgb_of_the_configured_size(tmp_path, world_dir):
    for path in sorted((world_dir / "images").rglob("*.png"))[::25]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
    small = build_world(tmp_path / "w48", seed=2, **{**TINY, "image_size": 48, "n_train_vqa": 6,
                                                      "n_train_caption": 0, "n_eval_caption": 1})
    with Image.open(small / "images" / records(small, "vqa_eval")[0]["image"]) as im:
        assert im.size == (48, 48)


def test_record_images_show_the_record_entity(world_dir, world):
    """Legibility end to end: the dominant entity color of every record image is its entity's."""
    entities = {e["name"]: e for e in world["entities"]}
    for split in SPLITS:
        for r, index in zip(records(world_dir, split), world["record_index"][split]):
            for field, who in (("image", "entity"), ("image_rephrase", "entity"),
                               ("m_loc", "m_loc_entity"), ("hard_m_loc", "hard_m_loc_entity")):
                px = np.asarray(Image.open(world_dir / "images" / r[field])).astype(int)
                counts = {c: int((np.abs(px - np.asarray(rgb)).max(axis=-1) < 40).sum())
                          for c, rgb in COLOR_RGB.items()}
                assert max(counts, key=counts.get) == entities[index[who]]["color"], (split, field)


def test_edits_are_counterfactual(world_dir, world):
    entities = {e["name"]: e for e in world["entities"]}
    ordered = world["entities"]
    for split in SPLITS:
        task = split.split("_")[0]
        for r, index in zip(records(world_dir, split), world["record_index"][split]):
            entity, kind = entities[index["entity"]], index["kind"]
            assert r["pred"] == answer_of(entity, kind)
            assert r["alt"] != r["pred"] and r["rephrase"] != r["src"]
            assert r["m_loc_a"] == answer_of(entities[index["m_loc_entity"]], index["m_loc_kind"])
            assert r["m_loc_q"] in QUESTION_TEMPLATES[index["m_loc_kind"]]
            assert r["hard_m_loc_a"] == answer_of(entities[index["hard_m_loc_entity"]], index["hard_m_loc_kind"])
            assert r["hard_m_loc_q"] in QUESTION_TEMPLATES[index["hard_m_loc_kind"]]
            i = ordered.index(entity)
            assert ordered.index(entities[index["hard_m_loc_entity"]]) in similar_entities(ordered, i)
            assert index["m_loc_entity"] != index["entity"]
            assert r["loc"].startswith("nq question: ") and not r["loc"].endswith("?")
            if task == "vqa":
                assert r["src"] in QUESTION_TEMPLATES[kind] and r["rephrase"] in QUESTION_TEMPLATES[kind]
                assert r["alt"] in world["attributes"][kind]
                assert r["hard_m_loc_q"] == r["src"] and index["hard_m_loc_kind"] == kind
                for field in ("pred", "alt", "m_loc_a", "hard_m_loc_a", "loc_ans"):
                    assert " " not in r[field]
            else:
                assert kind == "caption" and r["src"] == "a photo of" and r["rephrase"] in CAPTION_PROMPTS
                alt_entity = next(e for e in ordered if e["caption"] == r["alt"])
                assert ordered.index(alt_entity) in distinct_entities(ordered, i)
                # No word of the counterfactual caption is a word of the true one.
                assert not set(r["alt"].split()) & set(r["pred"].split())
    kinds = [index["kind"] for index in world["record_index"]["vqa_eval"]]
    assert sorted(set(kinds)) == sorted(VQA_KINDS)


def test_corpus_states_only_true_facts_and_never_an_alt(world_dir, world):
    entities = {e["name"]: e for e in world["entities"]}
    facts = {(f["relation"], f["subject"]): f["answer"] for f in world["text_facts"]}
    corpus = read_jsonl(world_dir / CORPUS_TRAIN)
    taught = set()
    for line in corpus:
        if line["task"] == "text":
            assert line["entity"] is None and line["image"] is None
            subject = next(s for (rel, s) in facts if rel == line["kind"] and f" {s} " in f" {line['question']} ")
            assert line["answer"] == facts[(line["kind"], subject)]
        else:
            assert line["answer"] == answer_of(entities[line["entity"]], line["kind"])
            taught.add((line["entity"], line["kind"], line["answer"]))
    for split in SPLITS:
        for r, index in zip(records(world_dir, split), world["record_index"][split]):
            assert (index["entity"], index["kind"], r["alt"]) not in taught
            assert (index["entity"], index["kind"], r["pred"]) in taught
    # Every entity x kind, every caption, every text fact with every template.
    for e in entities:
        for kind in VQA_KINDS + ("caption",):
            assert (e, kind, answer_of(entities[e], kind)) in taught
    questions = {(line["question"], line["answer"]) for line in corpus if line["task"] == "text"}
    for f in world["text_facts"]:
        for template in world["text_relations"][f["relation"]]["templates"]:
            assert (template.format(s=f["subject"]), f["answer"]) in questions


def test_train_and_eval_are_disjoint(world_dir, world):
    for task in ("vqa", "caption"):
        triples = {}
        for split in (f"{task}_train", f"{task}_eval"):
            triples[split] = {(i["entity"], i["kind"], r["alt"])
                              for r, i in zip(records(world_dir, split), world["record_index"][split])}
        assert not triples[f"{task}_train"] & triples[f"{task}_eval"]
    # No image file is used twice anywhere: not by two records, not by a record and the corpus.
    used = [r[f] for split in SPLITS for r in records(world_dir, split)
            for f in ("image", "image_rephrase", "m_loc", "hard_m_loc")]
    used += [line["image"] for name in (CORPUS_TRAIN, CORPUS_HELDOUT)
             for line in read_jsonl(world_dir / name) if line["image"] is not None][::len(VQA_KINDS) + 1]
    assert len(used) == len(set(used))


def test_vocabulary_covers_every_word_of_every_file(world_dir, world):
    vocab = world_vocabulary(world)
    assert vocab == sorted(set(vocab)) and all(w == w.lower() for w in vocab)
    words = set(split_words("The answer is:"))
    for split in SPLITS:
        for r in records(world_dir, split):
            for field in RECORD_FIELDS + HARD_FIELDS:
                if field not in ("image", "image_rephrase", "m_loc", "hard_m_loc"):
                    words.update(split_words(r[field]))
    for line in read_jsonl(world_dir / CORPUS_TRAIN):
        words.update(split_words(line["question"] + " " + line["answer"]))
    assert words <= set(vocab), sorted(words - set(vocab))[:10]
    assert {"circle", "red", "striped", "nq", "question", ":", "?", ","} <= set(vocab)


def test_rebuild_replaces_a_world_but_not_other_data(tmp_path, world):
    target = build_world(tmp_path / "w", seed=0, **{**TINY, "n_train_vqa": 6, "n_train_caption": 0,
                                                    "n_eval_caption": 1})
    (target / "stale.txt").write_text("old")
    build_world(target, seed=3, **{**TINY, "n_train_vqa": 6, "n_train_caption": 0, "n_eval_caption": 1})
    assert load_world(target)["seed"] == 3 and not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp folders left
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds no world.json"):
        build_world(precious, seed=0, **TINY)
    assert (precious / "mine.txt").read_text() == "keep"


def test_bad_arguments_and_missing_world(tmp_path):
    with pytest.raises(ValueError, match="n_eval_vqa"):
        build_world(tmp_path / "x", n_eval_vqa=-1, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        build_world(tmp_path / "x", image_size=4, progress=False)
    with pytest.raises(FileNotFoundError, match="world.json"):
        load_world(tmp_path / "nothing")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "world.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load_world(tmp_path / "old")
    assert not (tmp_path / "x").exists()
