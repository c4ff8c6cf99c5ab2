"""Pixels of the built-in world: one entity drawn at a random place, size, angle and background.

Legibility comes first: a small ViT with 4-px patches must read shape, color and pattern at
32 px after a few CPU minutes of training. Hence few, far-apart shapes; saturated colors;
patterns whose period is >= 4 px at 32 px (stripes 3 on / 3 off, checker cells of 4 px, a
hollow outline of >= 2 px); objects 50-85 % of the image; dark-to-mid grey backgrounds far from
every entity color and from the white of the patterns; mild rotation and light noise.

Drawing happens at `SUPERSAMPLE` times the size and is box-filtered down, so edges are
anti-aliased and thin pattern features survive as blends instead of vanishing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 185, 50),
    "blue": (40, 80, 240),
    "yellow": (245, 220, 20),
    "purple": (160, 40, 210),
    "orange": (250, 130, 0),
    # Only in worlds of more than 144 entities (catalogue.EXTRA_COLORS); world.json lists the
    # colors its world uses.
    "cyan": (0, 205, 215),
    "pink": (255, 125, 200),
}
# The second color of striped and checkered fills.
PATTERN_RGB: tuple[int, int, int] = (245, 245, 245)
# Dark to mid greys, some slightly tinted: far from the saturated entity colors and from white.
BACKGROUND_RGB: tuple[tuple[int, int, int], ...] = (
    (20, 20, 28), (40, 40, 40), (58, 56, 68), (84, 84, 84),
    (108, 108, 116), (120, 114, 104), (66, 78, 76), (92, 82, 98),
)

SCALE_RANGE = (0.5, 0.85)   # object diameter / image size
MAX_ANGLE = 20.0            # degrees either way; a square never looks like the diamond (45 deg)
COLOR_JITTER = 10           # +- per channel, entity color and background
NOISE_STD = 3.0             # gaussian pixel noise after downsampling
# Pattern geometry in pixels of a 32-px image; scaled with the image size.
STRIPE_PERIOD_32 = 6.0
CHECKER_CELL_32 = 4.0
HOLLOW_WIDTH_32 = 2.0

# Vertices of each polygon shape with circumradius <= 1, y pointing up.
_STAR = tuple(
    (r * math.cos(math.pi / 2 + k * math.pi / 5), r * math.sin(math.pi / 2 + k * math.pi / 5))
    for k in range(10) for r in ((1.0, 0.48)[k % 2],)
)
_CROSS_W = 0.36
# The classic heart curve (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), centred
# on its bounding box and scaled to circumradius 1: lobes on top, point at the bottom.
_HEART_T = tuple(2 * math.pi * k / 48 for k in range(48))
_HEART_XY = tuple((16 * math.sin(t) ** 3,
                   13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t) + 2.539)
                  for t in _HEART_T)
_HEART = tuple((x / 18.23, y / 18.23) for x, y in _HEART_XY)
# Pointing up: a wide head over a shaft, so its lower half is narrow where a triangle is wide.
_ARROW_W = 0.32
_ARROW = ((0.0, 1.0), (0.82, 0.12), (_ARROW_W, 0.12), (_ARROW_W, -0.94), (-_ARROW_W, -0.94),
          (-_ARROW_W, 0.12), (-0.82, 0.12))
SHAPE_VERTICES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)),
    "triangle": tuple((math.cos(a), math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)),
    "diamond": ((0.0, 1.0), (0.68, 0.0), (0.0, -1.0), (-0.68, 0.0)),
    "cross": ((-_CROSS_W, 0.95), (_CROSS_W, 0.95), (_CROSS_W, _CROSS_W), (0.95, _CROSS_W),
              (0.95, -_CROSS_W), (_CROSS_W, -_CROSS_W), (_CROSS_W, -0.95), (-_CROSS_W, -0.95),
              (-_CROSS_W, -_CROSS_W), (-0.95, -_CROSS_W), (-0.95, _CROSS_W), (-_CROSS_W, _CROSS_W)),
    "star": _STAR,
    # Only in worlds of more than 144 entities (catalogue.EXTRA_SHAPES).
    "heart": _HEART,
    "arrow": _ARROW,
}
SHAPES_DRAWN = ("circle",) + tuple(SHAPE_VERTICES)


@dataclass(frozen=True)
class Placement:
    """Where and how one rendering draws its entity. Lengths in pixels of the final image."""

    center: tuple[float, float]        # (x, y), y pointing down as in the image
    radius: float                      # circumradius of the shape
    angle: float                       # degrees, counter-clockwise
    background: tuple[int, int, int]
    color: tuple[int, int, int]        # the entity color after jitter
    phase: float                       # offset of stripes/checker in [0, 1) periods
    noise_seed: int


def sample_placement(rng: np.random.Generator, color: str, size: int) -> Placement:
    """Draw a random placement for an entity of `color` in a `size` x `size` image."""
    if color not in COLOR_RGB:
        raise ValueError(f"unknown color {color!r}; expected one of {sorted(COLOR_RGB)}")
    radius = float(rng.uniform(*SCALE_RANGE)) * size / 2
    cx, cy = (float(rng.uniform(radius, size - radius)) for _ in range(2))
    angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    base_bg = BACKGROUND_RGB[int(rng.integers(len(BACKGROUND_RGB)))]
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=6)
    background = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(base_bg, jitter[:3]))
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOR_RGB[color], jitter[3:]))
    return Placement(center=(cx, cy), radius=radius, angle=angle, background=background,
                     color=rgb, phase=float(rng.uniform()), noise_seed=int(rng.integers(2**31)))


def _shape_mask(shape: str, placement: Placement, size: int) -> np.ndarray:
    """Boolean mask [H, W] of the shape at supersampled resolution H = W = size * SUPERSAMPLE."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = placement.center
    r = placement.radius
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    elif shape in SHAPE_VERTICES:
        a = math.radians(placement.angle)
        cos_a, sin_a = math.cos(a), math.sin(a)
        # Rotate in y-up coordinates, then flip y for the image.
        points = [((cx + r * (x * cos_a - y * sin_a)) * s, (cy - r * (x * sin_a + y * cos_a)) * s)
                  for x, y in SHAPE_VERTICES[shape]]
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES_DRAWN}")
    return np.asarray(canvas) > 127


def _erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Shrink a boolean mask by `pixels` (square structuring element)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    # Repeated 3x3 min filters: an exact square element, cheaper than one large MinFilter.
    for _ in range(pixels):
        image = image.filter(ImageFilter.MinFilter(3))
    return np.asarray(image) > 127


def _fill(pattern: str, mask: np.ndarray, placement: Placement, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which supersampled pixels get the entity color and which get PATTERN_RGB.

    Returns two boolean masks [H, W] (color, white). Stripes and checker follow the object's own
    axes, so they rotate with it.
    """
    s = SUPERSAMPLE
    if pattern == "solid":
        return mask, np.zeros_like(mask)
    if pattern == "hollow":
        width = max(1, round(HOLLOW_WIDTH_32 * size / 32 * s))
        return mask & ~_erode(mask, width), np.zeros_like(mask)
    if pattern not in ("striped", "checkered"):
        raise ValueError(f"unknown pattern {pattern!r}; expected solid, striped, hollow or checkered")
    coords = (np.arange(size * s, dtype=np.float64) + 0.5) / s        # [H] pixel centres
    x, y = np.meshgrid(coords - placement.center[0], placement.center[1] - coords)  # y up
    a = math.radians(placement.angle)
    u = x * math.cos(a) + y * math.sin(a)                               # [H, W] object axes
    v = -x * math.sin(a) + y * math.cos(a)
    if pattern == "striped":
        half = STRIPE_PERIOD_32 * size / 32 / 2
        on = np.floor(v / half + 2 * placement.phase) % 2 == 0
    else:
        cell = CHECKER_CELL_32 * size / 32
        on = (np.floor(u / cell + placement.phase) + np.floor(v / cell + placement.phase)) % 2 == 0
    return mask & on, mask & ~on


def draw_entity(shape: str, pattern: str, placement: Placement, size: int, noise: float = NOISE_STD) -> Image.Image:
    """Draw one entity with an explicit placement; deterministic.

    Args:
        shape, pattern: attribute values (catalogue.SHAPES / PATTERNS).
        placement: from `sample_placement`.
        size: side of the square RGB image in pixels.
        noise: standard deviation of gaussian pixel noise (0 for none).

    Returns:
        RGB PIL image of `size` x `size`.
    """
    if size < 8:
        raise ValueError(f"image size must be >= 8 pixels, got {size}")
    mask = _shape_mask(shape, placement, size)
    colored, white = _fill(pattern, mask, placement, size)
    big = np.empty(mask.shape + (3,), dtype=np.float32)                # [H, W, 3]
    big[...] = placement.background
    big[colored] = placement.color
    big[white] = PATTERN_RGB
    # Box filter = mean over each SUPERSAMPLE x SUPERSAMPLE block.
    small = big.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))  # [S, S, 3]
    if noise > 0:
        small = small + np.random.default_rng(placement.noise_seed).normal(0.0, noise, small.shape)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8))


def render_entity(entity: dict, rng: np.random.Generator, size: int = 32, noise: float = NOISE_STD) -> Image.Image:
    """A random rendering of `entity` (a dict with shape, color, pattern); see `draw_entity`."""
    placement = sample_placement(rng, entity["color"], size)
    return draw_entity(entity["shape"], entity["pattern"], placement, size, noise)
