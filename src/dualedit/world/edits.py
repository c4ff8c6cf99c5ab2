"""Counterfactual edit records of the built-in world, in the MMEdit record layout.

Each record asks about one entity: `pred` is the world's true answer, `alt` another valid answer
of the same kind (E-IC: the caption of an entity that differs in shape, color and pattern, so that no word of
the counterfactual caption is one the unedited model would predict).
Images are not drawn here: every record names four new renderings (edit, rephrase, m_loc,
hard_m_loc) and returns them as `RenderJob`s for build.py.

Train and eval never share an (entity, kind, alt) triple nor an image file. Eval triples are
drawn first, one per (entity, kind) at most (eval edits never contradict each other); train triples repeat (with new images and templates) only when the
requested count exceeds the remaining distinct triples of a kind.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from .catalogue import (
    CAPTION_KIND,
    CAPTION_PROMPTS,
    CAPTION_SRC,
    QUESTION_TEMPLATES,
    VQA_KINDS,
    answer_of,
    caption_of,
    distinct_entities,
    similar_entities,
)

logger = logging.getLogger(__name__)

# The 11 fields of real MMEdit records, in their real order, then the hard-locality extension.
RECORD_FIELDS: tuple[str, ...] = ("src", "pred", "rephrase", "alt", "image", "image_rephrase",
                                  "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")
HARD_FIELDS: tuple[str, ...] = ("hard_m_loc", "hard_m_loc_q", "hard_m_loc_a")

# Seed streams (numpy SeedSequence entropy [seed, stream, ...]) so that every random choice is
# independent of the order in which others are made.
STREAM_CATALOGUE, STREAM_CORPUS, STREAM_HELDOUT, STREAM_PLAN = 0, 1, 2, 3
SPLIT_STREAMS: dict[str, int] = {"vqa_train": 10, "vqa_eval": 11, "caption_train": 12, "caption_eval": 13}


class RenderJob(NamedTuple):
    """One PNG to draw: `path` relative to the image root, which entity, and its seed key."""

    path: str
    entity: int
    key: tuple[int, ...]


class Triple(NamedTuple):
    entity: int
    kind: str
    alt: str


def _candidate_triples(entities: list[dict], attributes: dict[str, list[str]], kind: str) -> list[Triple]:
    """Every counterfactual (entity, kind, alt) of one kind, in a fixed order."""
    triples: list[Triple] = []
    for i, entity in enumerate(entities):
        if kind == CAPTION_KIND:
            triples.extend(Triple(i, kind, caption_of(entities[j])) for j in distinct_entities(entities, i))
        else:
            true = answer_of(entity, kind)
            triples.extend(Triple(i, kind, v) for v in attributes[kind] if v != true)
    return triples


def _draw_triples(rng: np.random.Generator, pools: dict[str, list[Triple]], kinds: tuple[str, ...],
                  n_eval: int, n_train: int, task: str) -> tuple[list[Triple], list[Triple]]:
    """Eval and train triples, kinds taken round-robin; train disjoint from eval.

    Eval edits change distinct facts: no two share an (entity, kind), so that any number of them
    can sit in an editor's memory together (the sequential protocol) without contradicting each
    other. A world has len(entities) facts per kind.
    """
    shuffled = {k: [pools[k][i] for i in rng.permutation(len(pools[k]))] for k in kinds}
    eval_triples: list[Triple] = []
    cursor = {k: 0 for k in kinds}
    edited: set[tuple[int, str]] = set()
    for j in range(n_eval):
        kind = kinds[j % len(kinds)]
        pool = shuffled[kind]
        while cursor[kind] < len(pool) and (pool[cursor[kind]].entity, kind) in edited:
            cursor[kind] += 1
        if cursor[kind] == len(pool):
            facts = len({t.entity for t in pool})
            raise ValueError(f"{task}: n_eval={n_eval} asks for more eval edits of kind {kind!r} than "
                             f"the world has distinct facts of that kind ({facts}); use more entities "
                             f"or fewer eval edits")
        eval_triples.append(pool[cursor[kind]])
        edited.add((pool[cursor[kind]].entity, kind))
    eval_set = set(eval_triples)
    remaining = {k: [t for t in shuffled[k] if t not in eval_set] for k in kinds}
    train_triples: list[Triple] = []
    cursor = {k: 0 for k in kinds}
    for j in range(n_train):
        kind = kinds[j % len(kinds)]
        pool = remaining[kind]
        if not pool:
            raise ValueError(f"{task}: no train edits of kind {kind!r} left after the eval split")
        if cursor[kind] == len(pool):
            # Pool used up: go round again in a new order (new images and templates per record).
            remaining[kind] = pool = [pool[i] for i in rng.permutation(len(pool))]
            cursor[kind] = 0
        train_triples.append(pool[cursor[kind]])
        cursor[kind] += 1
    repeats = len(train_triples) - len(set(train_triples))
    if repeats:
        logger.info("%s: %d of %d train edits repeat an (entity, kind, alt) triple (with new "
                    "images and templates): the world has too few distinct ones", task, repeats, n_train)
    return eval_triples, train_triples


def _choice(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def _unrelated_entity(rng: np.random.Generator, entities: list[dict], index: int, avoid: set[int]) -> int:
    """An entity sharing neither shape nor color with `index` and not in `avoid`, if any exists."""
    similar = set(similar_entities(entities, index))
    candidates = [j for j in range(len(entities)) if j != index and j not in similar and j not in avoid]
    if not candidates:
        candidates = [j for j in range(len(entities)) if j != index]
    return _choice(rng, candidates)


def _unedited_fact(rng: np.random.Generator, entities: list[dict], index: int, avoid: set[int],
                   edited: frozenset) -> tuple[int, str] | None:
    """An (entity, VQA kind) that no edit of the split changes, about an entity other than `index`
    and outside `avoid` when one exists; None when every such fact is edited."""
    others = [j for j in range(len(entities)) if j != index]
    for pool in ([j for j in others if j not in avoid], others):
        facts = [(j, kind) for j in pool for kind in VQA_KINDS if (j, kind) not in edited]
        if facts:
            return _choice(rng, facts)
    return None


def _text_locality(rng: np.random.Generator, world: dict) -> tuple[str, str]:
    fact = _choice(rng, world["text_facts"])
    template = _choice(rng, world["text_relations"][fact["relation"]]["templates"])
    return template.format(s=fact["subject"]), fact["answer"]


class EditPlan(NamedTuple):
    """Records of one task, what each is about, and the images they need."""

    train: list[dict]
    eval: list[dict]
    # Per record (same order): entity names and question kinds of the edit, m_loc and hard_m_loc.
    train_index: list[dict]
    eval_index: list[dict]
    jobs: list[RenderJob]


def _record(rng: np.random.Generator, world: dict, triple: Triple, split: str, k: int,
            jobs: list[RenderJob], edited: frozenset = frozenset()) -> tuple[dict, dict]:
    """One record for `triple` and its index entry, appending its four render jobs to `jobs`.

    `edited`: the (entity, kind) facts that the split's edits change; the locality questions
    avoid them (an editor holding all of them should change those answers). Empty: no constraint.
    """
    entities = world["entities"]
    stream = SPLIT_STREAMS[split]
    paths = {"image": f"edit/{split}_{k:05d}.png", "image_rephrase": f"rephrase/{split}_{k:05d}.png",
             "m_loc": f"loc/{split}_{k:05d}_m.png", "hard_m_loc": f"loc/{split}_{k:05d}_hard.png"}

    if triple.kind == CAPTION_KIND:
        src = CAPTION_SRC
        rephrase = _choice(rng, [p for p in CAPTION_PROMPTS if p != src])
        alt_entity = next(j for j, e in enumerate(entities) if e["caption"] == triple.alt)
        avoid = {alt_entity}
    else:
        templates = QUESTION_TEMPLATES[triple.kind]
        src = _choice(rng, templates)
        rephrase = _choice(rng, [t for t in templates if t != src])
        avoid = {j for j, e in enumerate(entities) if e["name"] == triple.alt}
    loc, loc_ans = _text_locality(rng, world)

    similar = similar_entities(entities, triple.entity)
    if edited:
        fact = _unedited_fact(rng, entities, triple.entity, avoid | set(similar), edited)
        if fact is None:
            raise ValueError(f"{split}: {len(edited)} eval edits leave no unedited fact for the M-Loc "
                             f"question of record {k} (the world has {len(VQA_KINDS) * len(entities)} "
                             f"E-VQA facts); use fewer eval edits or more entities")
        m_entity, m_kind = fact
    else:
        m_entity = _unrelated_entity(rng, entities, triple.entity, avoid)
        m_kind = _choice(rng, VQA_KINDS)
    m_q = _choice(rng, QUESTION_TEMPLATES[m_kind])

    hard_pool = similar or [j for j in range(len(entities)) if j != triple.entity]
    if edited and triple.kind != CAPTION_KIND:
        # The hard question asks the edit's own kind: take a look-alike whose fact is unedited.
        hard_pool = ([j for j in similar if (j, triple.kind) not in edited]
                     or [j for j in range(len(entities))
                         if j != triple.entity and (j, triple.kind) not in edited])
        if not hard_pool:
            raise ValueError(f"{split}: the eval edits change the {triple.kind!r} fact of every "
                             f"entity ({len(entities)}); no unedited one is left for the hard M-Loc "
                             f"question of record {k}; use fewer eval edits or more entities")
    hard_entity = _choice(rng, hard_pool)
    if triple.kind == CAPTION_KIND:
        # Real E-IC m_loc is a VQA question, so the hard variant is one too.
        hard_kind = _choice(rng, VQA_KINDS)
        hard_q = _choice(rng, QUESTION_TEMPLATES[hard_kind])
    else:
        # The very question of the edit, about a look-alike: the hardest locality probe.
        hard_kind, hard_q = triple.kind, src

    record = {
        "src": src,
        "pred": answer_of(entities[triple.entity], triple.kind),
        "rephrase": rephrase,
        "alt": triple.alt,
        "image": paths["image"],
        "image_rephrase": paths["image_rephrase"],
        "loc": loc,
        "loc_ans": loc_ans,
        "m_loc": paths["m_loc"],
        "m_loc_q": m_q,
        "m_loc_a": answer_of(entities[m_entity], m_kind),
        "hard_m_loc": paths["hard_m_loc"],
        "hard_m_loc_q": hard_q,
        "hard_m_loc_a": answer_of(entities[hard_entity], hard_kind),
    }
    index = {"entity": entities[triple.entity]["name"], "kind": triple.kind,
             "m_loc_entity": entities[m_entity]["name"], "m_loc_kind": m_kind,
             "hard_m_loc_entity": entities[hard_entity]["name"], "hard_m_loc_kind": hard_kind}
    for slot, (field, entity) in enumerate((("image", triple.entity), ("image_rephrase", triple.entity),
                                            ("m_loc", m_entity), ("hard_m_loc", hard_entity))):
        jobs.append(RenderJob(paths[field], entity, (stream, k, slot)))
    return record, index


def plan_edits(world: dict, seed: int, task: str, n_train: int, n_eval: int) -> EditPlan:
    """Train and eval edit records of one task and the renderings they need.

    Args:
        world: catalogue dict (entities, attributes, text_facts, text_relations).
        seed: world seed.
        task: "vqa" (E-VQA, kinds round-robin over VQA_KINDS) or "caption" (E-IC).
        n_train, n_eval: record counts.

    Returns:
        EditPlan; records are dicts with RECORD_FIELDS then HARD_FIELDS, in that order.
    """
    if task not in ("vqa", "caption"):
        raise ValueError(f"task must be 'vqa' or 'caption', got {task!r}")
    kinds = VQA_KINDS if task == "vqa" else (CAPTION_KIND,)
    pools = {k: _candidate_triples(world["entities"], world["attributes"], k) for k in kinds}
    rng = np.random.default_rng([seed, STREAM_PLAN, SPLIT_STREAMS[f"{task}_train"]])
    eval_triples, train_triples = _draw_triples(rng, pools, kinds, n_eval, n_train, task)
    jobs: list[RenderJob] = []
    out: dict[str, tuple[list[dict], list[dict]]] = {}
    for split, triples in ((f"{task}_eval", eval_triples), (f"{task}_train", train_triples)):
        split_rng = np.random.default_rng([seed, STREAM_PLAN, SPLIT_STREAMS[split], 1])
        # Eval locality questions avoid every fact the eval edits change (sequential protocol).
        edited = frozenset((t.entity, t.kind) for t in triples) if split.endswith("_eval") else frozenset()
        pairs = [_record(split_rng, world, t, split, k, jobs, edited) for k, t in enumerate(triples)]
        out[split] = ([r for r, _ in pairs], [i for _, i in pairs])
    (train, train_index), (eval_, eval_index) = out[f"{task}_train"], out[f"{task}_eval"]
    return EditPlan(train, eval_, train_index, eval_index, jobs)
