"""Procedurally generated, learnable image classification data (no files, no downloads).

This module owns :class:`SyntheticImages`, the stand-in for ImageNet used by tests, smoke runs and
benchmarks on machines without the real data.

A class is a combination of three visual factors:

* **shape** (8): disk, square, triangle, plus, ring, star, bar, half-disk;
* **colour family** (11 hues, 1/11 of the colour wheel apart);
* **texture** (13): plain, or stripes at 4 orientations (fixed in the image frame) x 3 periods
  (relative to the object's size, so they survive the scale nuisance).

That gives ``MAX_CLASSES = 8 * 11 * 13 = 1144`` distinct classes. Class ``c`` is mapped to its
factor combination by a fixed bijection of ``[0, MAX_CLASSES)`` that spreads consecutive classes
over the factor space, so with a few classes several pairs share a colour or a shape and the task
still needs more than one cue; any two classes always differ in at least one factor.

Per sample the nuisances are: object position, scale and rotation (a full turn; the shapes are
chosen to stay distinct under rotation), the colour's exact hue/saturation/value, stripe phase, a
background made of a two-colour linear gradient in a random direction with random faint
hue, pixel noise, a few faint blurry blobs, and (half the time) a smaller distractor object of
random factors underneath the class object, which is always the larger one.

Every sample is a pure function of ``(seed, split, index)``: its random numbers come from a
``numpy.random.Generator`` seeded with that triple (never the global RNG). Labels are
``index % num_classes``, so classes are balanced to within one sample.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from stitching.messages import short_repr

__all__ = ["SyntheticImages", "MAX_CLASSES", "NUM_SHAPES", "NUM_HUES", "NUM_TEXTURES", "class_factors"]

NUM_SHAPES = 8
NUM_HUES = 11
NUM_TEXTURES = 13  # 0 = plain, then 4 orientations x 3 periods
MAX_CLASSES = NUM_SHAPES * NUM_HUES * NUM_TEXTURES
SPLITS = ("train", "val", "test")

# Multiplier of the class -> combination bijection: coprime with MAX_CLASSES (= 2^3 * 11 * 13) and
# near MAX_CLASSES / golden ratio, so consecutive classes land far apart in the factor space.
_CLASS_STRIDE = 707
_STRIPE_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
_STRIPE_PERIODS = (1.05, 0.62, 0.38)  # in units of the object's radius

_MIN_IMG_SIZE = 16
_SHAPE_EXTENT = 1.12  # every shape lies within this many radii of its centre
_HUE_JITTER = 0.25  # in units of one hue family
_DISTRACTOR_PROB = 0.5


def class_factors(label: int) -> tuple[int, int, int]:
    """Return ``(shape, hue, texture)`` indices defining class ``label`` (0 <= label < MAX_CLASSES)."""
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"label must be in [0, {MAX_CLASSES}), got {label}")
    combo = (label * _CLASS_STRIDE) % MAX_CLASSES
    return combo % NUM_SHAPES, (combo // NUM_SHAPES) % NUM_HUES, combo // (NUM_SHAPES * NUM_HUES)


def _shape_distance(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the shape's outline in object units (object radius = 1)."""
    if shape == 0:  # disk
        return np.hypot(u, v) - 0.95
    if shape == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) - 0.78
    if shape == 2:  # equilateral triangle: three edges with outward normals 120 degrees apart
        d = v - 0.55
        for ang in (7 * math.pi / 6, 11 * math.pi / 6):
            d = np.maximum(d, math.cos(ang) * u + math.sin(ang) * v - 0.55)
        return d
    if shape == 3:  # plus
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    if shape == 4:  # ring
        return np.abs(np.hypot(u, v) - 0.72) - 0.28
    if shape == 5:  # five-pointed star
        r = np.hypot(u, v)
        sector = 2 * math.pi / 5
        a = np.mod(np.arctan2(v, u), sector)
        t = np.abs(a - sector / 2) / (sector / 2)  # 1 at a tip, 0 between tips
        return r - (0.45 + 0.65 * t * t)
    if shape == 6:  # bar, 3:1
        return np.maximum(np.abs(u) - 1.05, np.abs(v) - 0.35)
    if shape == 7:  # half-disk, centred on its bounding box
        vv = v + 0.45
        return np.maximum(np.hypot(u, vv) - 1.0, -vv)
    raise ValueError(f"unknown shape {shape}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


class SyntheticImages(torch.utils.data.Dataset):
    """Deterministic procedural image classification dataset.

    ``dataset[i]`` returns ``(image, label)`` with ``image`` a PIL RGB ``img_size x img_size``
    image (or ``transform(image)`` when a transform is given) and ``label = i % num_classes``.
    The same ``(seed, split, index)`` always gives the same sample; ``split`` in
    ``{"train", "val", "test"}`` selects disjoint random streams.
    """

    def __init__(
        self,
        num_classes: int = 10,
        length: int = 1000,
        img_size: int = 64,
        seed: int = 0,
        split: str = "train",
        transform: Optional[Callable] = None,
    ) -> None:
        for name, value in (("num_classes", num_classes), ("length", length), ("img_size", img_size), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {type(value).__name__} {short_repr(value)}")
        if not 2 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if img_size < _MIN_IMG_SIZE:
            raise ValueError(f"img_size must be >= {_MIN_IMG_SIZE}, got {img_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {short_repr(split)}")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable or None, got {type(transform).__name__}")
        self.num_classes = int(num_classes)
        self.length = int(length)
        self.img_size = int(img_size)
        self.seed = int(seed)
        self.split = split
        self.transform = transform
        self._split_key = zlib.crc32(split.encode("utf-8"))
        # pixel-centre coordinates in [-1, 1] (row = y, col = x), shared by every sample
        axis = (np.arange(self.img_size, dtype=np.float32) + 0.5) / self.img_size * 2.0 - 1.0
        self._ys, self._xs = np.meshgrid(axis, axis, indexing="ij")
        self.classes = [str(c) for c in range(self.num_classes)]

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (
            f"SyntheticImages(num_classes={self.num_classes}, length={self.length}, "
            f"img_size={self.img_size}, seed={self.seed}, split={self.split!r})"
        )

    @property
    def targets(self) -> list[int]:
        """All labels, in index order (ImageFolder-compatible attribute)."""
        return [i % self.num_classes for i in range(self.length)]

    def rng(self, index: int) -> np.random.Generator:
        """The generator that draws every random number of sample ``index``."""
        return np.random.default_rng([self.seed, self._split_key, int(index)])

    def render(self, index: int) -> np.ndarray:
        """Sample ``index`` as an ``(img_size, img_size, 3)`` uint8 array."""
        rng = self.rng(index)
        label = index % self.num_classes
        shape, hue_family, texture = class_factors(label)
        n = self.img_size
        xs, ys = self._xs, self._ys
        px = 2.0 / n  # one pixel in [-1, 1] units

        # background: faint two-colour gradient along a random direction, plus pixel noise
        bg_hue = rng.random()
        c0 = _hsv(bg_hue, rng.uniform(0.0, 0.4), rng.uniform(0.2, 0.85))
        c1 = _hsv(bg_hue + rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.4), rng.uniform(0.2, 0.85))
        g_ang = rng.uniform(0.0, 2 * math.pi)
        t = np.clip((xs * math.cos(g_ang) + ys * math.sin(g_ang)) * 0.5 + 0.5, 0.0, 1.0)[..., None]
        img = c0 + (c1 - c0) * t

        # distractors: faint blurry blobs of random colour
        for _ in range(int(rng.integers(0, 4))):
            bx, by = rng.uniform(-1, 1, size=2)
            br = rng.uniform(0.1, 0.35)
            blob = _hsv(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.9))
            strength = rng.uniform(0.15, 0.35)
            rows, cols = self._window(bx, by, 3.0 * br)
            x, y = xs[rows, cols], ys[rows, cols]
            w = np.exp(((x - bx) ** 2 + (y - by) ** 2) * (-1.0 / (2 * br * br)))
            patch = img[rows, cols]
            img[rows, cols] = patch + (blob - patch) * (w * strength)[..., None]

        # a smaller distractor object of random factors (half the time), then the class object on
        # top: the class is carried by the larger object
        radius = rng.uniform(0.32, 0.55)
        if rng.random() < _DISTRACTOR_PROB:
            d_shape, d_hue, d_texture = (int(k) for k in rng.integers((NUM_SHAPES, NUM_HUES, NUM_TEXTURES)))
            d_radius = radius * rng.uniform(0.4, 0.65)
            self._draw_object(img, rng, d_shape, d_hue, d_texture, d_radius, px)
        self._draw_object(img, rng, shape, hue_family, texture, radius, px)

        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.01, 0.06))
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def _window(self, cx: float, cy: float, half: float) -> tuple[slice, slice]:
        """Row and column slices of the pixels within ``half`` (plus 2 px) of ``(cx, cy)``."""
        n = self.img_size
        margin = half + 4.0 / n

        def span(c: float) -> slice:
            lo = int(math.floor((c - margin + 1.0) * n / 2.0))
            hi = int(math.ceil((c + margin + 1.0) * n / 2.0))
            return slice(min(max(lo, 0), n), min(max(hi, 0), n))

        return span(cy), span(cx)

    def _draw_object(
        self, img: np.ndarray, rng: np.random.Generator, shape: int, hue_family: int, texture: int,
        radius: float, px: float,
    ) -> None:
        """Composite one object (random position, rotation, colour jitter, stripe phase) onto img in place."""
        cx, cy = rng.uniform(-0.9 + radius, 0.9 - radius, size=2)
        rot = rng.uniform(0.0, 2 * math.pi)
        hue = (hue_family + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) / NUM_HUES
        colour = _hsv(hue, rng.uniform(0.45, 0.95), rng.uniform(0.55, 1.0))
        if texture:
            angle = _STRIPE_ANGLES[(texture - 1) % 4] + rng.uniform(-0.12, 0.12)
            period = _STRIPE_PERIODS[(texture - 1) // 4] * radius
            phase = rng.uniform(0.0, 2 * math.pi)

        # only the pixels that the object can cover (every shape fits in 1.12 radii)
        rows, cols = self._window(cx, cy, _SHAPE_EXTENT * radius)
        xs, ys = self._xs[rows, cols], self._ys[rows, cols]
        dx, dy = (xs - cx) / radius, (ys - cy) / radius
        cr, sr = math.cos(rot), math.sin(rot)
        u, v = cr * dx + sr * dy, -sr * dx + cr * dy
        dist = _shape_distance(shape, u, v) * radius  # back to image units
        alpha = np.clip(0.5 - dist / (1.2 * px), 0.0, 1.0)[..., None]
        if texture:
            coord = xs * math.cos(angle) + ys * math.sin(angle)
            stripes = 0.5 + 0.5 * np.sin(coord * (2 * math.pi / period) + phase)
            fill = colour * (1.0 - 0.6 * stripes)[..., None]
        else:
            fill = colour
        patch = img[rows, cols]
        img[rows, cols] = patch + (fill - patch) * alpha

    def __getitem__(self, index: int):
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for dataset of length {self.length}")
        image = Image.fromarray(self.render(int(index)))
        label = int(index) % self.num_classes
        if self.transform is not None:
            image = self.transform(image)
        return image, label
