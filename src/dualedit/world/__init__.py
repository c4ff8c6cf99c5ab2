"""The built-in world: named procedurally drawn entities, text facts, and MMEdit-format files.

`build_world(dir, seed)` writes the folder (docs/architecture.md, "World folder");
`load_world(dir)` reads its world.json; `world_vocabulary(world)` lists every word for a
word-level tokenizer.
"""

from .build import (
    CAPTION_EVAL,
    CAPTION_TRAIN,
    CORPUS_HELDOUT,
    CORPUS_TRAIN,
    FORMAT_VERSION,
    IMAGE_ROOT,
    VQA_EVAL,
    VQA_TRAIN,
    WORLD_FILE,
    build_world,
    load_world,
)
from .catalogue import CAPTION_KIND, VQA_KINDS, make_catalogue, split_words, world_vocabulary
from .edits import HARD_FIELDS, RECORD_FIELDS
from .render import draw_entity, render_entity, sample_placement

__all__ = [
    "CAPTION_EVAL", "CAPTION_KIND", "CAPTION_TRAIN", "CORPUS_HELDOUT", "CORPUS_TRAIN",
    "FORMAT_VERSION", "HARD_FIELDS", "IMAGE_ROOT", "RECORD_FIELDS", "VQA_EVAL", "VQA_KINDS",
    "VQA_TRAIN", "WORLD_FILE", "build_world", "draw_entity", "load_world", "make_catalogue",
    "render_entity", "sample_placement", "split_words", "world_vocabulary",
]
