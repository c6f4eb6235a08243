"""``shapes``: the built-in synthetic scene dataset (no download).

Each scene has a textured, noisy background and several overlapping circles, rectangles and
triangles of random size, colour and rotation. Colours are drawn from one distribution for all
kinds, so a model has to use shape, not colour. Semantic classes: background, circle,
rectangle, triangle. Every scene also carries per-object instance masks (visible parts after
occlusion) and boxes, for Mask R-CNN.

Scenes are a pure function of ``(seed, split, index)`` through numpy's PCG64 generator, so the
same seed gives the same scenes on every machine.
"""

from __future__ import annotations

import numpy as np

from pixelwise.data.base import Sample, SegmentationDataset, boxes_from_masks
from pixelwise.data.io import max_image_pixels
from pixelwise.errors import UserError, brief

CLASS_NAMES = ["background", "circle", "rectangle", "triangle"]
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200)]
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _whole(name: str, value: object, least: int) -> int:
    """Option ``name`` as an int >= ``least`` (a float such as 8.0 is taken as 8); else a UserError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"--dataset-kwargs: shapes {name} must be a whole number >= {least}, got {brief(value)}")
    return value


def _non_negative(name: str, value: object) -> float:
    """Option ``name`` as a finite float >= 0; else a UserError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise UserError(f"--dataset-kwargs: shapes {name} must be a number >= 0, got {brief(value)}")
    return float(value)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32[H, W, 3] in [0, 1]: a colour gradient plus oriented sinusoidal texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.15, 0.85, 3).astype(np.float32)
    tilt = rng.uniform(-0.3, 0.3, (2, 3)).astype(np.float32)
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    for _ in range(3):
        freq = rng.uniform(3, 14)
        angle = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        img += wave[..., None] * rng.uniform(0.02, 0.06, 3).astype(np.float32)
    return img


def _shape_mask(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """bool[H, W] for one randomly placed, sized and rotated shape of ``kind`` (1..3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    r = rng.uniform(0.1, 0.25) * size
    theta = rng.uniform(0, 2 * np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    if kind == 1:  # circle
        return u**2 + v**2 <= r**2
    if kind == 2:  # rectangle, aspect 1:1 .. 1:2.5
        aspect = rng.uniform(1.0, 2.5)
        return (np.abs(u) <= r) & (np.abs(v) <= r / aspect)
    # triangle: intersection of three half-planes (equilateral, circumradius 1.4 r, so that its
    # area is comparable to the other kinds')
    inside = np.ones((size, size), dtype=bool)
    for k in range(3):
        a = 2 * np.pi * k / 3
        inside &= (u * np.cos(a) + v * np.sin(a)) <= 0.7 * r
    return inside


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray, min_diff: float = 0.25) -> np.ndarray:
    """A uniformly random colour, redrawn (up to 20 times) until it differs from the mean colour
    it covers by ``min_diff`` on average over channels: every kind gets the same colour
    distribution, but no shape is invisible."""
    for _ in range(20):
        colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        if np.abs(colour - under).mean() >= min_diff:
            break
    return colour


def make_scene(rng: np.random.Generator, size: int, max_objects: int = 6,
               noise: float = 0.06) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """-> (image uint8[H, W, 3], semantic mask uint8[H, W], [(class id, visible bool[H, W]), ...])."""
    img = _background(rng, size)
    sem = np.zeros((size, size), dtype=np.uint8)
    inst = np.zeros((size, size), dtype=np.int32)  # 0 = none, k = k-th object drawn
    kinds = []
    for k in range(1, int(rng.integers(1, max_objects + 1)) + 1):
        kind = int(rng.integers(1, 4))
        m = _shape_mask(kind, rng, size)
        colour = _contrasting_colour(rng, img[m].mean(0) if m.any() else img.mean((0, 1)))
        shade = 1.0 + 0.15 * np.sin(np.mgrid[0:size, 0:size][1] / rng.uniform(2, 6))[..., None]
        img = np.where(m[..., None], colour * shade, img)
        sem[m] = kind
        inst[m] = k
        kinds.append(kind)
    img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    image = (img.clip(0, 1) * 255).round().astype(np.uint8)
    objects = [(kind, inst == k) for k, kind in enumerate(kinds, start=1)]
    return image, sem, [(c, m) for c, m in objects if m.sum() >= 12]


class ShapesDataset(SegmentationDataset):
    """Synthetic scenes, generated on the fly and cached.

    Options: ``num_train`` (default 800), ``num_val`` (200), ``num_test`` (200), ``size`` (96,
    square side in pixels, >= 16), ``max_objects`` (6, >= 1), ``noise`` (0.06, >= 0), ``seed`` (0, >= 0).
    It reads no folder: a ``root`` (``--data``) is refused, since whoever gives one meant a dataset on
    disk. A bad option, or a split of 0 scenes, is a UserError naming the option.
    """

    class_names = CLASS_NAMES
    palette = PALETTE
    task = "instance"
    checks_option_types = True  # build_dataset leaves the types to it: its messages give the ranges too

    def __init__(self, root: str | None = None, split: str = "train", *, num_train: int = 800,
                 num_val: int = 200, num_test: int = 200, size: int = 96, max_objects: int = 6,
                 noise: float = 0.06, seed: int = 0, transform=None, mean=None, std=None):
        super().__init__(transform=transform, mean=mean, std=std)
        if root is not None:
            raise UserError(f"--data {root}: the shapes dataset is generated, it reads no folder; leave --data "
                            "out, or name the kind of dataset in that folder with --dataset (camvid, voc, folder, ...)")
        if split not in _SPLIT_IDS:
            raise UserError(f"shapes has no split {split!r}; choose one of: {', '.join(_SPLIT_IDS)}")
        counts = {key: _whole(f"num_{key}", n, 0)
                  for key, n in (("train", num_train), ("val", num_val), ("test", num_test))}
        if counts[split] == 0:  # as the file readers refuse a split without images
            raise UserError(f"--dataset-kwargs: shapes num_{split} is 0, so split {split!r} has no images; "
                            f"give num_{split} >= 1")
        self.split = split
        self.count = counts[split]
        self.size = _whole("size", size, 16)
        if self.size * self.size > max_image_pixels():  # as a file of that size is refused, not a MemoryError
            raise UserError(f"--dataset-kwargs: shapes size {self.size} makes images of {self.size * self.size:,} "
                            f"pixels, above the limit of {max_image_pixels():,} (--max-pixels); give a smaller size")
        self.max_objects = _whole("max_objects", max_objects, 1)
        self.noise = _non_negative("noise", noise)
        self.seed = _whole("seed", seed, 0)
        self._cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        if index not in self._cache:
            rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
            image, sem, objects = make_scene(rng, self.size, self.max_objects, self.noise)
            masks = np.stack([m for _, m in objects]) if objects else np.zeros((0,) + sem.shape, bool)
            self._cache[index] = Sample(
                image=image, mask=sem, name=f"{self.split}_{index:05d}",
                instance_masks=masks,
                instance_labels=np.array([c for c, _ in objects], dtype=np.int64),
                boxes=boxes_from_masks(masks),
            )
        return self._cache[index]
