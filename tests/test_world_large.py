"""Worlds of more than 144 entities (8 shapes x 8 colors x 4 patterns), and the pin that keeps
every world of <= 144 entities byte-identical to the one cached models were trained on."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dualedit.small_vlm.pretrain import _fingerprint
from dualedit.world import build_world, load_world, make_catalogue, world_vocabulary
from dualedit.world.catalogue import (
    BASE_MAX_ENTITIES,
    COLORS,
    EXTRA_COLORS,
    EXTRA_SHAPES,
    MAX_ENTITIES,
    PATTERNS,
    SHAPES,
)
from dualedit.world.edits import plan_edits
from dualedit.world.render import (
    BACKGROUND_RGB,
    COLOR_RGB,
    PATTERN_RGB,
    Placement,
    draw_entity,
    sample_placement,
)

TINY = dict(image_size=32, n_train_vqa=36, n_eval_vqa=12, n_train_caption=12, n_eval_caption=6,
            renderings_per_entity=2, heldout_per_entity=1, text_subjects_per_relation=50, progress=False)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _plan_digest(plan) -> str:
    return _digest([plan.train, plan.eval, plan.train_index, plan.eval_index, [list(j) for j in plan.jobs]])


# Computed with the code before worlds of more than 144 entities existed (commit 608215a). Cached
# models (pretraining fingerprint) and reported figures depend on these worlds: never update
# these values to make a change pass.
PINNED_CATALOGUES = {
    48: "08a28afd07e23bbeeeb5b3280e453b8daa4a2c6f5f1e21d7290bdae7b113f350",
    144: "179d0ed1554d82fa5f1164d0b71716b111c0615eef3baaef46af19ed872a3c06",
    8: "dea490e8fa6ee7bedfc5fd4c78c04b02db866404c5f5b01a220102fe9530093a",
}
PINNED_PLANS = {
    "vqa": "74d561d3dc65fc6f2098eb23d4ad852972c6e42d57c0bf53ac4dc3fa1d3de9dd",
    "caption": "a857ae3df7aeca6ff23928ae6059ac1fdca5d7ba6d6c334366d54c8fe878b89d",
}
PINNED_TINY_FINGERPRINT = "12a311000d487394bd815c4bd3dad1f4c66bcb85749e32696a1a394c02701479"
PINNED_TINY_FILES = "fb314a1a25b6dd8227a30d071854229128aa206f44dda44485eed424daf4b2d9"


@pytest.mark.parametrize("n_entities", sorted(PINNED_CATALOGUES))
def test_catalogues_up_to_144_entities_are_unchanged(n_entities):
    assert _digest(make_catalogue(0, n_entities)) == PINNED_CATALOGUES[n_entities]


def test_default_edit_plans_are_unchanged():
    world = make_catalogue(0)
    assert _plan_digest(plan_edits(world, 0, "vqa", 1000, 200)) == PINNED_PLANS["vqa"]
    assert _plan_digest(plan_edits(world, 0, "caption", 500, 48)) == PINNED_PLANS["caption"]


def _files_digest(root) -> str:
    """Text files by bytes, images by decoded pixels (PNG bytes depend on the zlib build)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        digest.update(str(path.relative_to(root)).encode())
        if path.suffix == ".png":
            with Image.open(path) as image:
                digest.update(np.asarray(image.convert("RGB")).tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_small_default_build_and_its_pretraining_fingerprint_are_unchanged(tmp_path):
    root = build_world(tmp_path / "w", seed=0, **TINY)
    assert _fingerprint(root) == PINNED_TINY_FINGERPRINT
    assert _files_digest(root) == PINNED_TINY_FILES


def test_large_world_adds_two_shapes_and_two_colors_balanced_and_distinct():
    world = make_catalogue(0, MAX_ENTITIES)
    entities = world["entities"]
    assert len(entities) == 256
    assert len({(e["shape"], e["color"], e["pattern"]) for e in entities}) == 256
    assert world["attributes"]["shape"] == list(SHAPES + EXTRA_SHAPES)
    assert world["attributes"]["color"] == list(COLORS + EXTRA_COLORS)
    for kind, values, per_value in (("shape", SHAPES + EXTRA_SHAPES, 32),
                                    ("color", COLORS + EXTRA_COLORS, 32), ("pattern", PATTERNS, 64)):
        assert Counter(e[kind] for e in entities) == {v: per_value for v in values}, kind
    # No invented word collides with a new attribute word.
    names = {e["name"] for e in entities} | set(world["attributes"]["origin"])
    assert not names & set(EXTRA_SHAPES + EXTRA_COLORS)
    # One entity more than the base layout holds already switches to 8 x 8.
    assert make_catalogue(0, BASE_MAX_ENTITIES + 1)["attributes"]["shape"] == list(SHAPES + EXTRA_SHAPES)
    assert make_catalogue(0, BASE_MAX_ENTITIES)["attributes"]["shape"] == list(SHAPES)
    with pytest.raises(ValueError, match=r"n_entities must be in \[2, 256\], got 257"):
        make_catalogue(0, 257)


def test_large_world_holds_1000_distinct_eval_facts_with_unedited_locality():
    world = make_catalogue(0, 256, text_subjects_per_relation=4)
    plan = plan_edits(world, 0, "vqa", n_train=60, n_eval=1000)
    edited = {(i["entity"], i["kind"]) for i in plan.eval_index}
    assert len(edited) == 1000
    for index in plan.eval_index:
        assert (index["m_loc_entity"], index["m_loc_kind"]) not in edited
        assert index["m_loc_entity"] != index["entity"]
        assert (index["hard_m_loc_entity"], index["hard_m_loc_kind"]) not in edited


def test_too_many_eval_edits_name_the_count():
    world = make_catalogue(0, 8, text_subjects_per_relation=4)
    with pytest.raises(ValueError, match="vqa_eval: 48 eval edits .*48 E-VQA facts"):
        plan_edits(world, 0, "vqa", n_train=0, n_eval=48)


@pytest.mark.parametrize("shape", EXTRA_SHAPES)
def test_new_shapes_differ_from_every_other_shape(shape):
    background = (40, 40, 40)

    def mask(name):
        placement = Placement(center=(16.0, 16.0), radius=12.0, angle=0.0, background=background,
                              color=COLOR_RGB["red"], phase=0.0, noise_seed=0)
        pixels = np.asarray(draw_entity(name, "solid", placement, 32, noise=0.0)).astype(int)
        return np.abs(pixels - np.asarray(background)).max(axis=-1) > 60  # [H, W]

    mine = mask(shape)
    assert mine.sum() > 0.15 * 32 * 32
    for other in SHAPES + EXTRA_SHAPES:
        if other != shape:
            theirs = mask(other)
            iou = (mine & theirs).sum() / (mine | theirs).sum()
            assert iou < 0.75, (shape, other, iou)


@pytest.mark.parametrize("color", EXTRA_COLORS)
def test_new_colors_are_far_from_every_other_color_white_and_the_backgrounds(color):
    rgb = np.asarray(COLOR_RGB[color], dtype=float)
    others = [COLOR_RGB[c] for c in COLORS + EXTRA_COLORS if c != color]
    # The closest pair of the base colors (yellow, orange) is 92 apart.
    assert min(np.linalg.norm(rgb - np.asarray(o)) for o in others) > 120
    assert np.linalg.norm(rgb - np.asarray(PATTERN_RGB)) > 120
    assert min(np.linalg.norm(rgb - np.asarray(b)) for b in BACKGROUND_RGB) > 150
    # A random solid rendering shows the color at the object's centre.
    rng = np.random.default_rng(1)
    placement = sample_placement(rng, color, 32)
    pixels = np.asarray(draw_entity("square", "solid", placement, 32)).astype(int)
    cx, cy = (int(round(c)) for c in placement.center)
    assert np.abs(pixels[cy, cx] - rgb).max() < 30


def test_large_world_files_list_its_colors_and_small_ones_do_not(tmp_path):
    small = dict(TINY, n_train_vqa=12, n_eval_vqa=12, renderings_per_entity=1, heldout_per_entity=0,
                 text_subjects_per_relation=4)
    root = build_world(tmp_path / "big", seed=0, n_entities=150, **small)
    world = load_world(root)
    assert sorted(world["render"]["color_rgb"]) == sorted(COLORS + EXTRA_COLORS)
    assert len(world["entities"]) == 150
    assert {"heart", "arrow", "cyan", "pink"} <= set(world_vocabulary(world))
    default = load_world(build_world(tmp_path / "small", seed=0, **small))
    assert sorted(default["render"]["color_rgb"]) == sorted(COLORS)
    assert not {"heart", "arrow", "cyan", "pink"} & set(world_vocabulary(default))
