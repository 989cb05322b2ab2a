"""A deterministic synthetic 10-class dataset of 28x28 glyphs that needs no files (and a 32x32 colour variant).

Each class is a glyph made of straight strokes (seven-segment digits, or letter-like shapes with diagonals);
every sample draws its own rotation, scale, shear, shift, stroke weight and pixel noise from a fixed seed, so the
same call always returns the same bytes. It stands in for a real dataset when none is available (CI, quick start,
offline machines); a small classifier separates the classes easily, so generation scores and utility numbers
stay meaningful, but they are not comparable with the paper's.

Variants give each substituted domain its own look (stroke weight, glyph set, texture, polarity), so a scenario
whose domains all fall back to synthetic data still has distinguishable domains for the clustering:
0 = `synthetic` itself, 1..4 = stand-ins for MNIST, FashionMNIST, KMNIST and NotMNIST.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .imageset import ImageSet

SYNTHETIC_SEED = 20250712
TEST_PER_CLASS = 100
IMAGE_SIZE = 28

# Stroke end points in glyph units: x in [-0.6, 0.6], y in [-1, 1] (y grows downwards, as image rows do).
_SEGMENTS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "a": ((-0.6, -1.0), (0.6, -1.0)),  # top
    "b": ((0.6, -1.0), (0.6, 0.0)),  # upper right
    "c": ((0.6, 0.0), (0.6, 1.0)),  # lower right
    "d": ((-0.6, 1.0), (0.6, 1.0)),  # bottom
    "e": ((-0.6, 0.0), (-0.6, 1.0)),  # lower left
    "f": ((-0.6, -1.0), (-0.6, 0.0)),  # upper left
    "g": ((-0.6, 0.0), (0.6, 0.0)),  # middle
    "h": ((-0.6, -1.0), (0.6, 1.0)),  # diagonal down
    "i": ((0.6, -1.0), (-0.6, 1.0)),  # diagonal up
    "j": ((0.0, -1.0), (0.0, 1.0)),  # centre vertical
}
# Seven-segment digits 0..9.
_DIGITS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")
# Letter-like shapes: X, Z, N, T, I, H, L, C, P, +.
_LETTERS = ("hi", "aid", "fehbc", "aj", "ajd", "fegbc", "fed", "afed", "abgfe", "gj")


@dataclass(frozen=True)
class _Style:
    glyphs: tuple[str, ...]
    stroke: tuple[float, float]  # half-width range in pixels
    shear: float  # italic slant
    texture: str  # "plain", "stripes", "dots"
    inverted: bool
    unit: float  # pixels per glyph unit (glyph size)


_STYLES = (
    _Style(_DIGITS, (0.7, 1.1), 0.0, "plain", False, 7.0),
    _Style(_DIGITS, (1.8, 2.6), 0.3, "plain", False, 7.5),
    _Style(_LETTERS, (2.4, 3.2), 0.0, "stripes", False, 8.0),
    _Style(_LETTERS[::-1], (1.0, 1.5), -0.2, "dots", False, 6.0),
    _Style(_LETTERS[3:] + _LETTERS[:3], (1.4, 2.0), 0.0, "plain", True, 7.0),
)
# Which variant substitutes which dataset when it is not available.
VARIANTS = {"synthetic": 0, "MNIST": 1, "FashionMNIST": 2, "KMNIST": 3, "NotMNIST": 4}


def _render_class(rng: np.random.Generator, glyph: str, n: int, style: _Style, size: int = IMAGE_SIZE) -> np.ndarray:
    """n samples of one glyph as float [n, size, size] in [0, 1]."""
    seg = np.array([_SEGMENTS[s] for s in glyph], dtype=np.float64)  # [S, 2 ends, 2 coords]
    unit = style.unit if size == IMAGE_SIZE else style.unit * size / IMAGE_SIZE
    theta = rng.uniform(-0.21, 0.21, n)  # about +-12 degrees
    sx = rng.uniform(0.85, 1.15, n) * unit
    sy = rng.uniform(0.85, 1.15, n) * unit
    shear = style.shear + rng.uniform(-0.1, 0.1, n)
    shift = rng.uniform(-2.0, 2.0, (n, 2)) + (size - 1) / 2
    half_width = rng.uniform(*style.stroke, n)

    # Forward map of the stroke end points for each sample: shear, scale, rotate, shift.
    x, y = seg[..., 0][None], seg[..., 1][None]  # [1, S, 2]
    x = x + shear[:, None, None] * y
    x, y = x * sx[:, None, None], y * sy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    px = c * x - s * y + shift[:, 0, None, None]
    py = s * x + c * y + shift[:, 1, None, None]
    # Distance of every pixel to every stroke, in float32 and per coordinate to keep the temporaries small.
    ax, ay = px[..., 0, None].astype(np.float32), py[..., 0, None].astype(np.float32)  # [n, S, 1]
    dx, dy = px[..., 1, None].astype(np.float32) - ax, py[..., 1, None].astype(np.float32) - ay
    rows, cols = np.mgrid[0:size, 0:size]
    gx = cols.ravel().astype(np.float32)[None, None]  # [1, 1, P]
    gy = rows.ravel().astype(np.float32)[None, None]
    rx, ry = gx - ax, gy - ay
    t = np.clip((rx * dx + ry * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    ex, ey = rx - t * dx, ry - t * dy
    dist = np.sqrt((ex * ex + ey * ey).min(axis=1))  # [n, P]
    ink = np.clip(half_width[:, None] + 0.5 - dist, 0.0, 1.0)

    if style.texture == "stripes":
        ink = ink * np.where(rows.ravel() % 3 == 0, 0.55, 1.0)[None]
    elif style.texture == "dots":
        ink = ink * np.where((rows.ravel() + cols.ravel()) % 2 == 0, 1.0, 0.4)[None]
    ink = ink * rng.uniform(0.8, 1.0, (n, 1))
    if style.inverted:
        ink = 1.0 - 0.85 * ink
    ink = ink + rng.normal(0.0, 0.05, ink.shape)
    return np.clip(ink, 0.0, 1.0).reshape(n, size, size)


def synthetic_split(per_class: int, train: bool = True, variant: int = 0, name: str = "synthetic") -> ImageSet:
    """One split: `per_class` samples of each of the 10 classes, in a seeded shuffled order."""
    if per_class <= 0:
        raise ValueError("per_class must be positive")
    if not 0 <= variant < len(_STYLES):
        raise ValueError(f"synthetic variant must be in 0..{len(_STYLES) - 1}")
    style = _STYLES[variant]
    # One stream per (variant, split): the train and test splits never share samples.
    rng = np.random.default_rng([SYNTHETIC_SEED, variant, 0 if train else 1])
    images = np.empty((10 * per_class, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    for k, glyph in enumerate(style.glyphs):
        images[k * per_class : (k + 1) * per_class] = np.rint(_render_class(rng, glyph, per_class, style) * 255)
    order = rng.permutation(len(labels))
    return ImageSet.from_numpy(name, images[order], labels[order])


def synthetic_sets(per_class: int, variant: int = 0, name: str = "synthetic") -> tuple[ImageSet, ImageSet]:
    """(train, test): `per_class` x 10 training samples and 1,000 test samples."""
    return (
        synthetic_split(per_class, True, variant, name),
        synthetic_split(TEST_PER_CLASS, False, variant, name),
    )


# Colour variant: each class's glyph drawn in its own hue (jittered per sample) on a dark, tinted background.
COLOUR_SIZE = 32
_HUES = np.array(
    [
        (0.95, 0.25, 0.2),
        (0.2, 0.8, 0.3),
        (0.25, 0.45, 0.95),
        (0.95, 0.85, 0.2),
        (0.85, 0.3, 0.85),
        (0.2, 0.85, 0.85),
        (0.95, 0.6, 0.2),
        (0.6, 0.95, 0.4),
        (0.6, 0.5, 0.95),
        (0.95, 0.95, 0.95),
    ]
)


def synthetic_colour_split(
    per_class: int, train: bool = True, name: str = "synthetic-colour", size: int = COLOUR_SIZE
) -> ImageSet:
    """A colour split: the digit glyphs as RGB [N, 3, size, size], `per_class` of each of the 10 classes."""
    if per_class <= 0:
        raise ValueError("per_class must be positive")
    style = _STYLES[1]
    rng = np.random.default_rng([SYNTHETIC_SEED, 100, 0 if train else 1])
    n = 10 * per_class
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    for k, glyph in enumerate(style.glyphs):
        ink = _render_class(rng, glyph, per_class, style, size)[:, None]  # [n, 1, size, size]
        fg = np.clip(_HUES[k][None] + rng.normal(0.0, 0.06, (per_class, 3)), 0.0, 1.0)[:, :, None, None]
        bg = rng.uniform(0.0, 0.25, (per_class, 3))[:, :, None, None]
        rgb = ink * fg + (1.0 - ink) * bg
        images[k * per_class : (k + 1) * per_class] = np.rint(np.clip(rgb, 0.0, 1.0) * 255)
    order = rng.permutation(n)
    return ImageSet.from_numpy(name, images[order], labels[order])


def synthetic_colour_sets(per_class: int, name: str = "synthetic-colour") -> tuple[ImageSet, ImageSet]:
    """(train, test) of the colour variant: `per_class` x 10 training samples and 1,000 test samples."""
    return synthetic_colour_split(per_class, True, name), synthetic_colour_split(TEST_PER_CLASS, False, name)


__all__ = [
    "SYNTHETIC_SEED",
    "VARIANTS",
    "synthetic_colour_sets",
    "synthetic_colour_split",
    "synthetic_sets",
    "synthetic_split",
]
