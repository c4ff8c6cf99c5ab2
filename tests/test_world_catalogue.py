"""The world's catalogue: entities, hidden attributes, text facts, templates, edit planning."""

from collections import Counter

import pytest

from dualedit.world.catalogue import (
    CAPTION_PROMPTS,
    COLORS,
    MATERIALS,
    PATTERNS,
    QUESTION_TEMPLATES,
    SHAPES,
    TEXT_RELATIONS,
    VQA_KINDS,
    answer_of,
    caption_of,
    distinct_entities,
    make_catalogue,
    similar_entities,
    split_words,
)
from dualedit.world.edits import HARD_FIELDS, RECORD_FIELDS, plan_edits


@pytest.fixture(scope="module")
def catalogue():
    return make_catalogue(0)


def test_entities_are_unique_named_combinations(catalogue):
    entities = catalogue["entities"]
    assert len(entities) >= 48
    assert len({(e["shape"], e["color"], e["pattern"]) for e in entities}) == len(entities)
    names = [e["name"] for e in entities]
    assert len(set(names)) == len(names)
    fixed = {w for v in (SHAPES, COLORS, PATTERNS, MATERIALS) for w in v}
    for e in entities:
        assert e["name"].isalpha() and e["name"].islower() and e["name"] not in fixed
        assert e["material"] in MATERIALS
        assert e["origin"] in catalogue["attributes"]["origin"] and e["origin"].isalpha()
        assert e["caption"] == caption_of(e)
        assert e["caption"] == f"{e['color']} {e['pattern']} {e['shape']} {e['name']}"
    # Origins are invented words that are neither entity names nor text-fact subjects/answers.
    text_words = {f["subject"] for f in catalogue["text_facts"]} | {f["answer"] for f in catalogue["text_facts"]}
    assert not set(catalogue["attributes"]["origin"]) & (set(names) | text_words)


def test_visible_attributes_are_balanced(catalogue):
    entities = catalogue["entities"]
    for kind, values in (("shape", SHAPES), ("color", COLORS), ("pattern", PATTERNS)):
        counts = Counter(e[kind] for e in entities)
        assert set(counts) == set(values)
        assert max(counts.values()) - min(counts.values()) <= 1, (kind, counts)


def test_every_combination_is_reachable():
    entities = make_catalogue(3, n_entities=len(SHAPES) * len(COLORS) * len(PATTERNS))["entities"]
    assert len({(e["shape"], e["color"], e["pattern"]) for e in entities}) == 144


def test_seed_changes_the_world_and_repeats_it():
    a, b, c = make_catalogue(0), make_catalogue(0), make_catalogue(1)
    assert a == b
    assert [e["name"] for e in a["entities"]] != [e["name"] for e in c["entities"]]


def test_text_facts_look_like_real_loc_questions(catalogue):
    facts = catalogue["text_facts"]
    assert len(facts) >= 200
    assert len({(f["relation"], f["subject"]) for f in facts}) == len(facts)
    for relation, spec in catalogue["text_relations"].items():
        assert len(spec["templates"]) >= 4
        for template in spec["templates"]:
            assert template.startswith("nq question: ") and not template.endswith("?")
            assert "{s}" in template
        # Each relation uses several answers, so a T-Loc answer is not guessable from the question.
        assert len({f["answer"] for f in facts if f["relation"] == relation}) >= 5
    for f in facts:
        assert f["answer"] == f["answer"].strip() and " " not in f["answer"]


def test_templates_and_answers():
    for kind in VQA_KINDS:
        templates = QUESTION_TEMPLATES[kind]
        assert len(set(templates)) >= 4 and all(t.endswith("?") for t in templates)
    assert len(set(CAPTION_PROMPTS)) >= 4 and "a photo of" in CAPTION_PROMPTS
    for relation in TEXT_RELATIONS.values():
        assert len(relation["templates"]) >= 4


def test_answer_of_and_caption():
    e = {"name": "zorb", "shape": "circle", "color": "orange", "pattern": "striped",
         "material": "wood", "origin": "velmar"}
    assert answer_of(e, "material") == "wood"
    assert answer_of(e, "caption") == "orange striped circle zorb"
    assert caption_of({**e, "color": "red"}) == "red striped circle zorb"
    with pytest.raises(ValueError, match="unknown question kind"):
        answer_of(e, "size")
    assert split_words("Which object is shown, zorb?") == ["which", "object", "is", "shown", ",", "zorb", "?"]


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_plan_edits_disjoint_even_when_train_repeats(task):
    # A small world forces the train split to go round its pools more than once.
    world = make_catalogue(0, n_entities=8, text_subjects_per_relation=4)
    entities = {e["name"]: e for e in world["entities"]}
    # vqa: 6 kinds x 50 > 8 entities x 3 other patterns; caption: 120 > similar pairs.
    n_train, n_eval = (300, 6) if task == "vqa" else (120, 4)
    plan = plan_edits(world, 0, task, n_train=n_train, n_eval=n_eval)
    assert len(plan.train) == n_train and len(plan.eval) == n_eval
    assert len(plan.jobs) == 4 * (n_train + n_eval)
    assert len({j.path for j in plan.jobs}) == len(plan.jobs)

    def triples(records, index):
        return [(i["entity"], i["kind"], r["alt"]) for r, i in zip(records, index)]

    eval_triples = triples(plan.eval, plan.eval_index)
    train_triples = triples(plan.train, plan.train_index)
    assert len(set(eval_triples)) == len(eval_triples)
    # Eval edits change distinct facts: no (entity, kind) twice, so they never contradict.
    assert len({(e, k) for e, k, _ in eval_triples}) == len(eval_triples)
    # ... and no eval locality question asks one of those facts (sequential protocol).
    edited = {(e, k) for e, k, _ in eval_triples}
    for index in plan.eval_index:
        assert (index["m_loc_entity"], index["m_loc_kind"]) not in edited
        assert (index["hard_m_loc_entity"], index["hard_m_loc_kind"]) not in edited
    assert not set(eval_triples) & set(train_triples)
    assert len(set(train_triples)) < len(train_triples)  # it did repeat
    for record, index in zip(plan.train + plan.eval, plan.train_index + plan.eval_index):
        assert tuple(record) == RECORD_FIELDS + HARD_FIELDS
        entity = entities[index["entity"]]
        assert record["pred"] == answer_of(entity, index["kind"]) != record["alt"]
        assert record["m_loc_a"] == answer_of(entities[index["m_loc_entity"]], index["m_loc_kind"])
        assert record["hard_m_loc_a"] == answer_of(entities[index["hard_m_loc_entity"]],
                                                   index["hard_m_loc_kind"])


def test_plan_edits_refuses_more_eval_edits_than_exist():
    world = make_catalogue(0, n_entities=4, text_subjects_per_relation=4)
    with pytest.raises(ValueError, match="caption: n_eval=5 .*distinct facts"):
        plan_edits(world, 0, "caption", n_train=0, n_eval=5)
    world = make_catalogue(0, n_entities=8, text_subjects_per_relation=4)
    # 8 entities: 8 facts per kind, 48 in all; the locality questions need unedited ones, so
    # 7 per kind (42) is the most: every kind keeps one unedited fact about another entity.
    assert len(plan_edits(world, 0, "vqa", n_train=0, n_eval=42).eval) == 42
    with pytest.raises(ValueError, match="vqa_eval: 48 eval edits leave no unedited fact .*48 E-VQA facts"):
        plan_edits(world, 0, "vqa", n_train=0, n_eval=48)
    with pytest.raises(ValueError, match="vqa: n_eval=49 .*kind 'name'"):
        plan_edits(world, 0, "vqa", n_train=0, n_eval=49)


def test_similar_entities(catalogue):
    entities = catalogue["entities"]
    for i, e in enumerate(entities):
        sim = similar_entities(entities, i)
        assert sim and i not in sim
        expected = [j for j, o in enumerate(entities)
                    if j != i and (o["shape"] == e["shape"] or o["color"] == e["color"])]
        assert sim == expected


def test_distinct_entities_differ_in_every_visible_attribute(catalogue):
    entities = catalogue["entities"]
    for i, e in enumerate(entities):
        distinct = distinct_entities(entities, i)
        assert len(distinct) >= 10 and i not in distinct
        expected = [j for j, o in enumerate(entities)
                    if o["shape"] != e["shape"] and o["color"] != e["color"] and o["pattern"] != e["pattern"]]
        assert distinct == expected
