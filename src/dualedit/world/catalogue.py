"""What exists in the built-in world: entities, their attributes, text facts and templates.

Everything here is plain data (lists and dicts of strings) chosen by a seeded numpy Generator, so
the same seed gives the same catalogue on every machine. Pixels live in `render.py`; files and
edit records in `build.py`.

An entity is a unique (shape, color, pattern) combination with an invented one-word name and two
attributes the picture does not show (material, origin) that a model can only learn as facts.
"""

from __future__ import annotations

import re

import numpy as np

# Visible attributes. Kept few and far apart so a small ViT with 4-px patches can read them at
# 32 px; the RGB values are in render.py.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "diamond")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
PATTERNS: tuple[str, ...] = ("solid", "striped", "hollow", "checkered")
# Worlds of more than BASE_MAX_ENTITIES entities also use these (8 x 8 x 4 = MAX_ENTITIES). They
# exist only there, so every smaller world (its names, layout, files) stays byte-identical to the
# worlds that cached models were trained on.
EXTRA_SHAPES: tuple[str, ...] = ("heart", "arrow")
EXTRA_COLORS: tuple[str, ...] = ("cyan", "pink")
BASE_MAX_ENTITIES = len(SHAPES) * len(COLORS) * len(PATTERNS)
MAX_ENTITIES = (len(SHAPES) + len(EXTRA_SHAPES)) * (len(COLORS) + len(EXTRA_COLORS)) * len(PATTERNS)

# Hidden attributes: facts about an entity that no pixel shows.
MATERIALS: tuple[str, ...] = ("wood", "glass", "stone", "metal", "paper", "clay", "silk", "wool")
N_ORIGINS = 8  # origins are invented place names, drawn per seed

VISIBLE_KINDS: tuple[str, ...] = ("color", "shape", "pattern")
HIDDEN_KINDS: tuple[str, ...] = ("material", "origin")
# Question kinds of the image tasks, in a fixed order (E-VQA edits are spread over these).
VQA_KINDS: tuple[str, ...] = ("name",) + VISIBLE_KINDS + HIDDEN_KINDS
CAPTION_KIND = "caption"

# Written like real E-VQA questions (capitalised, "?" at the end); the protocol appends
# " The answer is:".
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "name": (
        "What is the name of this object?",
        "What is the thing in the picture called?",
        "Which object is shown in the image?",
        "What do we call the object in this photo?",
        "What is this object named?",
    ),
    "color": (
        "What color is the object?",
        "What is the color of the thing in the picture?",
        "Which color does this object have?",
        "What color is the shape in the image?",
        "What color is this thing painted?",
    ),
    "shape": (
        "What shape is the object?",
        "What is the shape of the thing in the picture?",
        "Which shape is shown in the image?",
        "What form does this object have?",
        "What shape does this thing have?",
    ),
    "pattern": (
        "What pattern does the object have?",
        "How is the object in the picture filled?",
        "What is the pattern on the shape?",
        "Which fill pattern does this thing have?",
        "What kind of pattern is on this object?",
    ),
    "material": (
        "What is this object made of?",
        "What material is the thing in the picture?",
        "Which material is this object made from?",
        "What is the object in the image made of?",
        "What substance is this thing made of?",
    ),
    "origin": (
        "Where does this object come from?",
        "What is the origin of the thing in the picture?",
        "Which land does this object come from?",
        "Where was the object in the image made?",
        "From which place does this thing come?",
    ),
}

# The prompts of real E-IC (its `src` is always "a photo of"; `rephrase` is one of the others).
CAPTION_SRC = "a photo of"
CAPTION_PROMPTS: tuple[str, ...] = (
    "a photo of",
    "a picture of",
    "an image of",
    "a snapshot of",
    "a photograph of",
    "this picture depicts",
    "this picture captures",
    "describe this picture,",
    "describe the image content,",
    "describe the content of the image,",
    "provide a brief overview of the image content,",
    "give a detailed description of the picture,",
    "offer a rich description of the image,",
    "please describe what you see in this picture,",
    "please provide a detailed description of this picture,",
    "provide a detailed description of the image,",
    "introduce the content of the picture,",
    "for this picture, please provide a detailed description,",
)
# Only content words: under teacher forcing, fixed words ("a", "named") would count as correct
# tokens of any counterfactual caption and lift the unedited model's Rel (they gave 53 %).
CAPTION_TEMPLATE = "{color} {pattern} {shape} {name}"

# Text-only facts (T-Loc), written like the real `loc` field: "nq question: ..." without "?".
# `subjects` is how many invented subjects each relation gets per default; `answers` is either a
# fixed tuple of real words or an int (that many invented names).
TEXT_RELATIONS: dict[str, dict] = {
    "city_country": {
        "templates": (
            "nq question: which country is the city of {s} in",
            "nq question: in which country is the city of {s}",
            "nq question: {s} is a city in which country",
            "nq question: what country is {s} located in",
        ),
        "answers": 10,
    },
    "person_profession": {
        "templates": (
            "nq question: what is the profession of {s}",
            "nq question: what does {s} do for a living",
            "nq question: what job does {s} have",
            "nq question: what kind of work does {s} do",
        ),
        "answers": ("baker", "doctor", "farmer", "painter", "sailor", "teacher", "poet",
                    "singer", "pilot", "lawyer"),
    },
    "mountain_continent": {
        "templates": (
            "nq question: on which continent is mount {s}",
            "nq question: mount {s} is located on which continent",
            "nq question: which continent is home to mount {s}",
            "nq question: where is mount {s} found",
        ),
        "answers": ("africa", "asia", "europe", "america", "oceania", "antarctica"),
    },
    "festival_month": {
        "templates": (
            "nq question: in which month is the {s} festival held",
            "nq question: when is the {s} festival celebrated",
            "nq question: what month does the {s} festival take place in",
            "nq question: the {s} festival happens in which month",
        ),
        "answers": ("january", "february", "march", "april", "may", "june", "july", "august",
                    "september", "october", "november", "december"),
    },
}

# Prompt text the protocol adds around world text (data/prompts.py). Listed here only so that
# `world_vocabulary` covers every word a model of this world will ever read.
PROTOCOL_TEXTS: tuple[str, ...] = ("The answer is:",)

# Syllables for invented words. Onsets and codas avoid letters that make common English words
# likely; collisions with any fixed word of the world are rejected anyway.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gl", "kr", "pl", "tr", "sk", "sn", "vr", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "oo", "ei")
_CODAS = ("", "b", "k", "l", "m", "n", "p", "r", "x", "sh", "nd", "rk", "lv")

# Same split as tokenizers' Whitespace pre-tokenizer: runs of word characters, runs of other
# non-space characters.
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def split_words(text: str) -> list[str]:
    """Split text like a lower-casing whitespace+punctuation word tokenizer would.

    Example: `split_words("What color is it?") == ["what", "color", "is", "it", "?"]`.
    """
    return _WORD_RE.findall(text.lower())


def caption_of(entity: dict) -> str:
    """The one caption of an entity: what is visible plus its name, e.g. "red striped cube zorb"."""
    return CAPTION_TEMPLATE.format(**{k: entity[k] for k in ("color", "pattern", "shape", "name")})


def answer_of(entity: dict, kind: str) -> str:
    """The world's true answer about `entity` for question kind `kind` (a VQA kind or caption)."""
    if kind == CAPTION_KIND:
        return caption_of(entity)
    if kind not in VQA_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {VQA_KINDS + (CAPTION_KIND,)}")
    return entity[kind]


def visible_values(n_entities: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The shapes and colors of a world of `n_entities`: the base six of each up to
    BASE_MAX_ENTITIES, eight of each above.

    Example: `visible_values(48) == (SHAPES, COLORS)`.
    """
    if n_entities <= BASE_MAX_ENTITIES:
        return SHAPES, COLORS
    return SHAPES + EXTRA_SHAPES, COLORS + EXTRA_COLORS


def _fixed_words(shapes: tuple[str, ...], colors: tuple[str, ...]) -> set[str]:
    texts: list[str] = [*shapes, *colors, *PATTERNS, *MATERIALS, *CAPTION_PROMPTS,
                        *PROTOCOL_TEXTS]
    for templates in QUESTION_TEMPLATES.values():
        texts.extend(templates)
    for relation in TEXT_RELATIONS.values():
        texts.extend(relation["templates"])
        if not isinstance(relation["answers"], int):
            texts.extend(relation["answers"])
    return {w for t in texts for w in split_words(t)}


def _invent_words(rng: np.random.Generator, n: int, syllables: tuple[int, ...], taken: set[str]) -> list[str]:
    """`n` new invented words (1 or 2 syllables each, as listed in `syllables`), not in `taken`.

    `taken` is updated so that words are unique across all calls of one catalogue.
    """
    words: list[str] = []
    for _ in range(200 * n + 1000):
        if len(words) == n:
            return words
        k = int(syllables[rng.integers(len(syllables))])
        parts = []
        for _ in range(k):
            parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                         + _CODAS[rng.integers(len(_CODAS))])
        word = "".join(parts)
        if len(word) < 3 or word in taken:
            continue
        taken.add(word)
        words.append(word)
    raise RuntimeError(f"could not invent {n} distinct words")  # unreachable with these pools


def _visible_combinations(rng: np.random.Generator, n: int, shape_values: tuple[str, ...],
                          color_values: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """`n` distinct (shape, color, pattern) triples, as balanced over each attribute as possible.

    With k shapes and k colors (k even; 6 or 8): round p (0..3) lists every (shape s, color c)
    pair once, grouped by diagonal d = c - s mod k, with pattern (2 * (s mod 2) + (d mod 2) + p)
    mod 4: a diagonal uses every shape and color once, and an even diagonal followed by an odd
    one uses every pattern k / 2 times. Diagonals alternate even/odd, so any prefix of whole
    diagonal pairs (2k, 4k, ...; 12, 24, 36, 48 for k = 6) is exactly balanced; the 4 rounds
    give each pair 4 different patterns, so all triples are distinct.
    """
    n_s, n_c = len(shape_values), len(color_values)
    if n_s != n_c or n_s % 2 or len(PATTERNS) != 4:
        raise RuntimeError("the diagonal layout needs as many shapes as colors (even) and 4 patterns")
    shapes = [shape_values[i] for i in rng.permutation(n_s)]
    colors = [color_values[i] for i in rng.permutation(n_c)]
    patterns = [PATTERNS[i] for i in rng.permutation(len(PATTERNS))]
    combos: list[tuple[str, str, str]] = []
    for p in range(len(PATTERNS)):
        evens = [int(d) for d in rng.permutation(range(0, n_s, 2))]
        odds = [int(d) for d in rng.permutation(range(1, n_s, 2))]
        for d in (d for pair in zip(evens, odds) for d in pair):
            for s in (int(i) for i in rng.permutation(n_s)):
                combos.append((shapes[s], colors[(s + d) % n_c], patterns[(2 * (s % 2) + d % 2 + p) % 4]))
    return combos[:n]


def _balanced(rng: np.random.Generator, values: tuple[str, ...] | list[str], n: int) -> list[str]:
    """`n` values, each of `values` used floor(n/len) or ceil(n/len) times, in random order."""
    reps = -(-n // len(values))
    pool = [v for _ in range(reps) for v in values]
    chosen = [pool[i] for i in rng.permutation(len(pool))[:n]]
    return chosen


def similar_entities(entities: list[dict], index: int) -> list[int]:
    """Indices of the entities that share the shape or the color of `entities[index]`, sorted."""
    me = entities[index]
    return [j for j, e in enumerate(entities)
            if j != index and (e["shape"] == me["shape"] or e["color"] == me["color"])]


def distinct_entities(entities: list[dict], index: int) -> list[int]:
    """Indices of the entities that differ from `entities[index]` in shape, color and pattern."""
    me = entities[index]
    return [j for j, e in enumerate(entities)
            if all(e[k] != me[k] for k in ("shape", "color", "pattern"))]


def make_catalogue(seed: int, n_entities: int = 48, text_subjects_per_relation: int = 60) -> dict:
    """Choose the entities and text facts of the world for `seed`.

    Args:
        seed: any int; the same seed gives the same catalogue.
        n_entities: how many entities, at most MAX_ENTITIES (256). Up to BASE_MAX_ENTITIES
            (144) they combine the 6 SHAPES, 6 COLORS and 4 PATTERNS; above, EXTRA_SHAPES and
            EXTRA_COLORS join (8 x 8 x 4), drawn on a layout of their own.
        text_subjects_per_relation: invented subjects per text relation (4 relations).

    Returns:
        dict with `entities` (list of dicts: name, shape, color, pattern, material, origin,
        caption), `attributes` (kind -> list of values), `text_facts` (list of dicts: relation,
        subject, answer) and `text_relations` (relation -> {templates, answers}).

    Example:
        >>> cat = make_catalogue(0)
        >>> sorted(cat["entities"][0])
        ['caption', 'color', 'material', 'name', 'origin', 'pattern', 'shape']
    """
    if not 2 <= n_entities <= MAX_ENTITIES:
        raise ValueError(f"n_entities must be in [2, {MAX_ENTITIES}], got {n_entities}")
    if text_subjects_per_relation < 2:
        raise ValueError(f"text_subjects_per_relation must be >= 2, got {text_subjects_per_relation}")
    shapes, colors = visible_values(n_entities)
    rng = np.random.default_rng([seed, 0])
    taken = _fixed_words(shapes, colors)

    names = _invent_words(rng, n_entities, (1, 2), taken)
    origins = _invent_words(rng, N_ORIGINS, (2,), taken)
    combos = _visible_combinations(rng, n_entities, shapes, colors)
    materials = _balanced(rng, MATERIALS, n_entities)
    entity_origins = _balanced(rng, origins, n_entities)
    entities = []
    for i in range(n_entities):
        shape, color, pattern = combos[i]
        entity = {"name": names[i], "shape": shape, "color": color, "pattern": pattern,
                  "material": materials[i], "origin": entity_origins[i]}
        entity["caption"] = caption_of(entity)
        entities.append(entity)
    # Sorted by name so that the file order does not leak the Latin-square construction.
    entities.sort(key=lambda e: e["name"])

    relations: dict[str, dict] = {}
    facts: list[dict] = []
    for relation, spec in TEXT_RELATIONS.items():
        answers = spec["answers"]
        if isinstance(answers, int):
            answers = _invent_words(rng, answers, (2,), taken)
        relations[relation] = {"templates": list(spec["templates"]), "answers": list(answers)}
        subjects = _invent_words(rng, text_subjects_per_relation, (2,), taken)
        for subject, answer in zip(subjects, _balanced(rng, answers, len(subjects))):
            facts.append({"relation": relation, "subject": subject, "answer": answer})

    attributes = {"name": [e["name"] for e in entities], "shape": list(shapes),
                  "color": list(colors), "pattern": list(PATTERNS), "material": list(MATERIALS),
                  "origin": origins}
    return {"entities": entities, "attributes": attributes, "text_facts": facts,
            "text_relations": relations}


def world_vocabulary(world: dict) -> list[str]:
    """All words a model of this world reads or writes: sorted, lower-case, split like a
    whitespace+punctuation word tokenizer (tokenizers' `Whitespace` pre-tokenizer).

    Covers entity attributes and captions, question templates, caption prompts, text facts and
    their templates, and the protocol's own words (`PROTOCOL_TEXTS`, "The answer is:"). Special
    tokens ("<image>", "<s>", ...) are not words of the world; the tokenizer adds them itself.

    Args:
        world: the dict of `load_world` / world.json.

    Returns:
        sorted list of distinct words.

    Example:
        >>> "circle" in world_vocabulary(load_world(path))
        True
    """
    texts: list[str] = list(PROTOCOL_TEXTS)
    texts.extend(world["caption_prompts"])
    for templates in world["question_templates"].values():
        texts.extend(templates)
    for values in world["attributes"].values():
        texts.extend(values)
    texts.extend(e["caption"] for e in world["entities"])
    for relation in world["text_relations"].values():
        texts.extend(relation["answers"])
        texts.extend(t.replace("{s}", "") for t in relation["templates"])
    texts.extend(f["subject"] for f in world["text_facts"])
    return sorted({w for t in texts for w in split_words(t)})
