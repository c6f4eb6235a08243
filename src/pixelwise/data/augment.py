"""Paired augmentation presets (albumentations 2.x) working on :class:`Sample` -> :class:`Sample`.

- :func:`train_preset`: optional resize, optional elastic deformation (the U-Net paper's,
  :mod:`pixelwise.data.elastic`), optional random quarter turn, random scale, pad-if-needed
  (image 0, mask ignore), random crop, horizontal flip, photometric jitter.
- :func:`eval_preset`: optional resize, otherwise the identity.

The resize is :func:`resize_sample`, built on :func:`pixelwise.preprocess.resize_image` (the
one bilinear resize that ``preprocess`` applies at inference) and nearest neighbour for labels.
- :func:`build_transform`: a small YAML/dict of keys -> one of the presets.

Every geometric step moves the image, the class mask, the optional per-pixel weight map and the
optional instance masks together. Masks and weights always use nearest-neighbour sampling, so no
new label values can appear. Padding: image 0, class mask ``ignore_index``, weight 0, instance
masks empty. After the transform, instance boxes are recomputed from the instance masks (tight,
x2/y2 exclusive) and instances whose mask left the crop are dropped.

Randomness: each call reseeds the albumentations pipeline from numpy's global RNG, so seeding
numpy makes augmentation reproducible; the trainer seeds it before each sample from the epoch and
the sample's index (``engine.trainer.SampleSeeded``), whichever DataLoader worker loads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np

from pixelwise.data.elastic import ElasticDeform
from pixelwise.errors import UserError, brief
from pixelwise.preprocess import MAX_INPUT_PIXELS, resize_image, resize_labels
from pixelwise.sample import IGNORE_INDEX, Sample, visible_instances


def resize_sample(s: Sample, size: tuple[int, int]) -> Sample:
    """A Sample at ``size`` = (h, w): the image bilinear (:func:`pixelwise.preprocess.resize_image`),
    class mask, weight map and instance masks nearest; boxes recomputed from the instance masks."""
    if s.image.shape[:2] == tuple(size):
        return s
    new: dict = {"image": resize_image(s.image, size), "mask": resize_labels(s.mask, size)}
    if s.weight is not None:
        new["weight"] = resize_labels(np.asarray(s.weight, dtype=np.float32), size)
    if s.instance_masks is not None:
        inst = np.asarray(s.instance_masks, dtype=np.uint8)
        new.update(visible_instances(np.stack([resize_labels(m, size) for m in inst]).astype(bool) if len(inst)
                                     else np.zeros((0, *size), dtype=bool), s.instance_labels))
    return s.replace(**new)


class RandomScale(A.RandomScale):
    """albumentations' RandomScale whose scaled sides are at least 1 pixel: its own rounds a side of
    1 pixel scaled below 1 to 0, and OpenCV's resize then fails (an image 1 pixel high or wide)."""

    def apply(self, img: np.ndarray, scale: float, **params) -> np.ndarray:
        return _scale(img, scale, self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, scale: float, **params) -> np.ndarray:
        return _scale(mask, scale, self.mask_interpolation)


def _scale(img: np.ndarray, scale: float, interpolation: int) -> np.ndarray:
    """``img`` resized by ``scale`` (sides rounded down as albumentations does, but to at least 1 pixel)."""
    h, w = img.shape[:2]
    size = (max(1, int(h * scale)), max(1, int(w * scale)))
    if size == (h, w):
        return img
    out = cv2.resize(img, (size[1], size[0]), interpolation=interpolation)
    return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out  # OpenCV drops a single channel


class Augment:
    """Apply albumentations transforms to a Sample (image, mask, weight, instances together),
    after an optional :func:`resize_sample` to ``resize`` = (h, w) and an optional
    :class:`~pixelwise.data.elastic.ElasticDeform` of the whole (resized) sample."""

    def __init__(self, transforms: Sequence[A.BasicTransform], ignore_index: int = IGNORE_INDEX,
                 resize: tuple[int, int] | None = None, elastic: ElasticDeform | None = None):
        self.transforms = list(transforms)
        self.ignore_index = ignore_index
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))
        self.elastic = elastic
        self.compose = (A.Compose(self.transforms, additional_targets={"weight": "mask"})
                        if transforms else None)

    def __repr__(self) -> str:
        return (f"Augment({[type(t).__name__ for t in self.transforms]}, ignore_index={self.ignore_index}, "
                f"resize={self.resize}, elastic={self.elastic})")

    def __call__(self, s: Sample) -> Sample:
        if self.resize is not None:
            s = resize_sample(s, self.resize)
        if self.elastic is not None:
            s = self.elastic(s)
        if self.compose is None:
            return s
        self.compose.set_random_seed(int(np.random.randint(0, 2**31 - 1)))
        # Shift labels by one so that padding (0) is told apart from class 0: every pad lands on ignore.
        kw: dict = {"image": np.ascontiguousarray(s.image), "mask": s.mask.astype(np.uint16) + 1}
        if s.weight is not None:
            kw["weight"] = np.ascontiguousarray(s.weight, dtype=np.float32)
        has_instances = s.instance_masks is not None and len(s.instance_masks) > 0
        if has_instances:
            kw["masks"] = np.ascontiguousarray(s.instance_masks, dtype=np.uint8)
        out = self.compose(**kw)
        shifted = out["mask"]
        mask = np.where(shifted == 0, self.ignore_index, shifted.astype(np.int32) - 1).astype(np.uint8)
        new: dict = {"image": out["image"], "mask": mask}
        if s.weight is not None:
            new["weight"] = out["weight"].astype(np.float32)
        if s.instance_masks is not None:
            inst = np.asarray(out["masks"]).astype(bool) if has_instances else np.zeros((0, *mask.shape), dtype=bool)
            new.update(visible_instances(inst, s.instance_labels if has_instances else np.zeros((0,), np.int64)))
        return s.replace(**new)


def train_preset(crop: tuple[int, int] | None = None, scale: tuple[float, float] | None = (0.5, 2.0),
                 flip: bool = True, jitter: bool = True, ignore_index: int = IGNORE_INDEX,
                 resize: tuple[int, int] | None = None, elastic: ElasticDeform | None = None,
                 rotate90: bool = False) -> Augment:
    """Training augmentation: [resize] -> [elastic deformation] -> [rotation by 0, 90, 180 or 270
    degrees, equally likely] -> random scale in ``scale`` -> pad to ``crop`` -> random ``crop``
    (h, w) -> horizontal flip (p=0.5) -> colour jitter (p=0.8).

    Without ``crop`` the image size is kept: no random scaling, no padding, no crop (use it when
    every image already has the training size; a quarter turn of a non-square image then changes
    its shape). ``scale=None`` disables scaling. ``rotate90`` with ``flip`` draws each of the 8
    symmetries of the square with probability 1/8 (for images with no preferred orientation,
    such as EM sections; the training counterpart of ``--tta d4``).
    """
    t: list[A.BasicTransform] = [A.RandomRotate90(p=1.0)] if rotate90 else []
    if crop is not None:
        h, w = int(crop[0]), int(crop[1])
        if scale is not None and tuple(scale) != (1.0, 1.0):
            lo, hi = float(scale[0]), float(scale[1])
            if not MIN_SCALE <= lo <= hi:
                raise UserError(f"augment scale {scale}: need {MIN_SCALE} <= low <= high (a smaller scale shrinks "
                                "an image to a few pixels, or none)")
            if not hi <= MAX_SCALE:  # [50, 200] meant as percent asked for 1.3-20 GB per CamVid sample
                raise UserError(f"augment scale {scale}: need high <= {MAX_SCALE:g} (factors of the image's size, "
                                "e.g. [0.5, 2.0]; a larger one enlarges each image to gigabytes)")
            t.append(RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                                 mask_interpolation=cv2.INTER_NEAREST_EXACT, p=1.0))
        t.append(A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT,
                               fill=0, fill_mask=0))
        t.append(A.RandomCrop(h, w))
    if flip:
        t.append(A.HorizontalFlip(p=0.5))
    if jitter:
        t.append(A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.02, p=0.8))
    return Augment(t, ignore_index, resize, elastic)


def eval_preset(resize: tuple[int, int] | None = None) -> Augment:
    """Evaluation: resize to (h, w) (mask nearest) or nothing."""
    return Augment([], resize=resize)


MIN_SCALE = 0.1  # the smallest random scale: below it a small image becomes less than a pixel (OpenCV fails)
MAX_SCALE = 10.0  # the largest: a 360x480 image at 10x is 17 MP per sample already (recipes go to 2)
TRAIN_KEYS = ("crop", "scale", "flip", "jitter", "ignore_index", "resize", "elastic", "rotate90")


def _pair(cfg: dict, key: str, kind: type) -> tuple | None:
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and kind is int:
        v = [v, v]
    if isinstance(v, str) and kind is int and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", v):
        v = [int(side) for side in v.lower().split("x")]  # crop: 256x320, the form of train's --crop
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
        raise UserError(f"augment key {key!r}: expected two numbers like [h, w], got {brief(v)}")
    if kind is int and not all((isinstance(x, int) or math.isfinite(x) and x.is_integer()) and x > 0 for x in v):
        raise UserError(f"augment key {key!r}: expected two positive integers, got {brief(v)}")
    if kind is int and int(v[0]) * int(v[1]) > MAX_INPUT_PIXELS:  # it would fail inside OpenCV, out of memory
        h, w = int(v[0]), int(v[1])
        raise UserError(f"augment key {key!r}: {h}x{w} is {h * w:,} pixels per image, above {MAX_INPUT_PIXELS:,}; "
                        "give a size in pixels of the training images")
    return tuple(kind(x) for x in v)


def elastic_of(value: object) -> ElasticDeform | None:
    """The ``elastic`` augmentation key -> :class:`ElasticDeform` or None: ``true`` (the U-Net
    paper's 3x3 grid, 10 px), ``false``/absent, or a mapping ``{sigma: px, grid: nodes}``."""
    if value is None or value is False:
        return None
    if value is True:
        return ElasticDeform()
    if isinstance(value, dict) and set(value) <= {"sigma", "grid"}:
        sigma, grid = value.get("sigma", 10.0), value.get("grid", 3)
        if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
            return ElasticDeform(float(sigma), grid)
    raise UserError(f"augment key 'elastic': expected true, false or {{sigma: 10, grid: 3}}, got {brief(value)}")


def resize_of(cfg: dict | None) -> tuple[int, int] | None:
    """The ``resize: [h, w]`` (or one int for a square) of an augmentation config, validated."""
    pair = _pair(dict(cfg or {}), "resize", int)
    return None if pair is None else (int(pair[0]), int(pair[1]))


def build_transform(cfg: dict | None, train: bool) -> Augment:
    """A config dict -> :func:`train_preset` (``train=True``) or :func:`eval_preset`.

    Keys (all optional): ``crop: [h, w]`` (or one int for a square), ``scale: [low, high]`` or
    null, ``flip: bool``, ``jitter: bool``, ``rotate90: bool``, ``ignore_index: int``, ``resize: [h,
    w]``, ``elastic: bool`` or ``{sigma, grid}`` (:func:`elastic_of`). Evaluation only uses
    ``resize``. Unknown keys raise UserError naming the key.
    """
    cfg = dict(cfg or {})
    for key in cfg:
        if key not in TRAIN_KEYS:
            raise UserError(f"unknown augment key {key!r}; known keys: {', '.join(TRAIN_KEYS)}")
    for key in ("flip", "jitter", "rotate90"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise UserError(f"augment key {key!r}: expected true or false, got {cfg[key]!r}")
    ignore = cfg.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 255:
        raise UserError(f"augment key 'ignore_index': expected an integer 0..255, got {ignore!r}")
    resize = _pair(cfg, "resize", int)
    elastic = elastic_of(cfg.get("elastic"))
    if not train:
        return eval_preset(resize)
    scale = _pair(cfg, "scale", float) if "scale" in cfg else (0.5, 2.0)
    crop = _pair(cfg, "crop", int)
    if cfg.get("scale") is not None and crop is None:  # it would be dropped without a word
        raise UserError(f"augment scale {cfg['scale']}: random scaling comes with a crop back to one size; add "
                        "--crop HxW (or augment crop), or remove scale")
    return train_preset(crop=crop, scale=scale, flip=cfg.get("flip", True),
                        jitter=cfg.get("jitter", True), ignore_index=ignore, resize=resize, elastic=elastic,
                        rotate90=cfg.get("rotate90", False))
