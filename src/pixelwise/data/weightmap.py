"""The U-Net paper's per-pixel loss weights as a :class:`Sample` transform.

Ronneberger et al. (2015), Eq. 2: ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``
with ``w0 = 10`` and ``sigma = 5`` pixels, ``w_c`` the class-balancing term and d1, d2 the
distances to the nearest and second-nearest cell. For semantic labels such as ISBI 2012
(membrane / cell) the cells are the 4-connected components of the foreground class.

:class:`UNetWeightMap` sets ``Sample.weight`` from the sample's ground truth. It must run before
any augmentation (the map belongs to the label geometry; the augmentation then moves image,
mask and weight together) and caches the map per sample name, since the ground truth of a
sample never changes. :func:`fast_weight_map` gives the same values as
:func:`pixelwise.models.unet.unet_weight_map` but computes each cell's distance transform only
in a window of ``radius`` (default ``6 sigma``) pixels around it: beyond that the border term
is below ``w0 * exp(-18)`` (1.5e-7 for w0 = 10) and is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import distance_transform_edt, find_objects, label

from pixelwise.data.base import IGNORE_INDEX, Compose, Sample


def class_balance(mask: np.ndarray, class_weights: np.ndarray | None = None,
                  ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """uint8[H, W] class ids -> float64[H, W] w_c(x). Default weights: inverse class frequency in
    this mask, scaled so the most frequent class has weight 1 (as ``unet_weight_map``); ignored
    pixels weigh 0 (a mask with none labelled: all 0, so it adds no loss)."""
    m = np.asarray(mask).astype(np.int64)
    if class_weights is None:
        freq = np.bincount(m[m != ignore_index].ravel(), minlength=1)
        with np.errstate(divide="ignore"):
            class_weights = np.where(freq > 0, freq.max() / np.maximum(freq, 1), 0.0)
    lut = np.zeros(256, dtype=np.float64)
    lut[: len(class_weights)] = class_weights
    lut[ignore_index] = 0.0
    return lut[m]


def fast_weight_map(mask: np.ndarray, foreground: int = 1, w0: float = 10.0, sigma: float = 5.0,
                    class_weights: np.ndarray | None = None, radius: float | None = None,
                    ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """uint8[H, W] class mask -> float32[H, W] U-Net weights (Eq. 2).

    Cells = 4-connected components of ``mask == foreground``; the border term is added on
    pixels outside every cell (the membrane), using the two smallest cell distances found within
    ``radius`` (default ``6 * sigma``) pixels."""
    mask = np.asarray(mask)
    weight = class_balance(mask, class_weights, ignore_index)
    cells, k = label(mask == foreground, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]))
    if k < 2:
        return weight.astype(np.float32)
    r = 6.0 * sigma if radius is None else float(radius)
    pad = int(np.ceil(r))
    h, w = mask.shape
    d1 = np.full((h, w), np.inf)
    d2 = np.full((h, w), np.inf)
    for idx, box in enumerate(find_objects(cells), start=1):
        ys = slice(max(box[0].start - pad, 0), min(box[0].stop + pad, h))
        xs = slice(max(box[1].start - pad, 0), min(box[1].stop + pad, w))
        d = distance_transform_edt(cells[ys, xs] != idx)  # exact: the whole cell lies in the window
        a, b = d1[ys, xs], d2[ys, xs]
        d2[ys, xs] = np.minimum(b, np.maximum(a, d))
        d1[ys, xs] = np.minimum(a, d)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))  # inf -> 0
    outside = (cells == 0) & (mask != ignore_index)
    return (weight + np.where(outside, border, 0.0)).astype(np.float32)


class UNetWeightMap:
    """Sample -> Sample with ``weight`` = :func:`fast_weight_map` of its mask (cached by name).

    >>> ds.transform = compose(UNetWeightMap(foreground=1), augmentation)
    """

    def __init__(self, foreground: int = 1, w0: float = 10.0, sigma: float = 5.0,
                 class_weights: list[float] | None = None):
        self.foreground, self.w0, self.sigma = foreground, w0, sigma
        self.class_weights = None if class_weights is None else np.asarray(class_weights, dtype=np.float64)
        self._cache: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"UNetWeightMap(foreground={self.foreground}, w0={self.w0}, sigma={self.sigma})"

    def __call__(self, s: Sample) -> Sample:
        key = s.name
        weight = self._cache.get(key) if key else None
        if weight is None or weight.shape != s.mask.shape:
            weight = fast_weight_map(s.mask, self.foreground, self.w0, self.sigma, self.class_weights)
            if key:
                self._cache[key] = weight
        return s.replace(weight=weight)


def compose(*steps: Callable[[Sample], Sample] | None) -> Compose:
    """Chain Sample transforms left to right (``None`` entries are skipped)."""
    return Compose([s for s in steps if s is not None])
