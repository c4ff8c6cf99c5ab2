"""Rendering of world entities: legible shape, color and pattern at 32 px."""

import itertools

import numpy as np
import pytest

from dualedit.world.catalogue import COLORS, PATTERNS, SHAPES
from dualedit.world.render import (
    COLOR_RGB,
    PATTERN_RGB,
    Placement,
    draw_entity,
    render_entity,
    sample_placement,
)

BG = (40, 40, 40)


def place(color="red", radius=12.0, angle=0.0, center=(16.0, 16.0), phase=0.0):
    return Placement(center=center, radius=radius, angle=angle, background=BG,
                     color=COLOR_RGB[color], phase=phase, noise_seed=0)


def pixels(shape, pattern, color="red", size=32, **kw):
    image = draw_entity(shape, pattern, place(color, **kw), size, noise=0.0)
    assert image.mode == "RGB" and image.size == (size, size)
    return np.asarray(image).astype(int)  # [H, W, 3]


def close(pixel, rgb, tol=30):
    return np.abs(np.asarray(pixel) - np.asarray(rgb)).max() <= tol


@pytest.mark.parametrize("shape", SHAPES)
def test_solid_entity_takes_its_color_and_leaves_the_background(shape):
    for color in COLORS:
        px = pixels(shape, "solid", color)
        assert close(px[16, 16], COLOR_RGB[color]), (shape, color, px[16, 16])
        assert close(px[0, 0], BG) and close(px[31, 31], BG)


def test_hollow_shows_background_inside_and_color_on_the_rim():
    px = pixels("circle", "hollow", radius=12.0)
    assert close(px[16, 16], BG)
    assert close(px[16, 5], COLOR_RGB["red"])   # x = 16 - 12 + 1: on the rim


def test_stripes_alternate_with_period_six_at_32px():
    px = pixels("square", "striped", radius=13.0)
    column = [close(px[y, 16], COLOR_RGB["red"]) for y in range(8, 24)]
    white = [close(px[y, 16], PATTERN_RGB) for y in range(8, 24)]
    assert all(c or w for c, w in zip(column, white))       # crisp: 3-px bands at phase 0
    changes = [y for y in range(1, len(column)) if column[y] != column[y - 1]]
    assert np.diff(changes).tolist() == [3] * (len(changes) - 1) and len(changes) >= 4
    # Horizontal stripes: a row is one band.
    assert len({close(px[16, x], COLOR_RGB["red"]) for x in range(8, 24)}) == 1


def test_checker_alternates_in_both_directions():
    px = pixels("square", "checkered", radius=13.0)
    row = [close(px[18, x], COLOR_RGB["red"]) for x in range(8, 24)]
    col = [close(px[y, 18], COLOR_RGB["red"]) for y in range(8, 24)]
    assert True in row and False in row and True in col and False in col


def test_shapes_differ_from_each_other():
    masks = {}
    for shape in SHAPES:
        px = pixels(shape, "solid")
        masks[shape] = np.abs(px - np.asarray(BG)).max(axis=-1) > 60  # [H, W]
        assert masks[shape].sum() > 0.15 * 32 * 32
    for a, b in itertools.combinations(SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.85, (a, b, iou)


def test_rotation_turns_the_pattern_with_the_object():
    flat = pixels("square", "striped", radius=13.0)
    turned = pixels("square", "striped", radius=13.0, angle=20.0)
    assert (flat != turned).any()
    # A horizontal row inside the turned square crosses several stripes.
    assert len({close(turned[16, x], COLOR_RGB["red"]) for x in range(10, 22)}) == 2


@pytest.mark.parametrize("size", [32, 48])
def test_random_renderings_are_legible_and_deterministic(size):
    rng = np.random.default_rng(0)
    for shape, color, pattern in itertools.product(SHAPES, COLORS, PATTERNS):
        entity = {"shape": shape, "color": color, "pattern": pattern}
        placement = sample_placement(np.random.default_rng(1), color, size)
        r = placement.radius
        assert 0.25 * size <= r <= 0.425 * size
        assert r <= placement.center[0] <= size - r and r <= placement.center[1] <= size - r
        px = np.asarray(render_entity(entity, rng, size)).astype(int)  # [S, S, 3]
        # The entity color is the most frequent of the six colors in the picture.
        counts = {c: int((np.abs(px - np.asarray(rgb)).max(axis=-1) < 40).sum()) for c, rgb in COLOR_RGB.items()}
        assert max(counts, key=counts.get) == color, (entity, counts)
        assert counts[color] >= 0.02 * size * size
    a = np.asarray(render_entity(entity, np.random.default_rng(5), size))
    b = np.asarray(render_entity(entity, np.random.default_rng(5), size))
    c = np.asarray(render_entity(entity, np.random.default_rng(6), size))
    assert (a == b).all() and (a != c).any()


def test_bad_attributes_are_named():
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        draw_entity("blob", "solid", place(), 32)
    with pytest.raises(ValueError, match="unknown pattern 'dots'"):
        draw_entity("circle", "dots", place(), 32)
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        sample_placement(np.random.default_rng(0), "teal", 32)
