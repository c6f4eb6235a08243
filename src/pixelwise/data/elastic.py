"""The U-Net paper's elastic deformation as a :class:`Sample` transform.

Ronneberger, Fischer, Brox, *U-Net: Convolutional Networks for Biomedical Image Segmentation*,
MICCAI 2015 (arXiv:1505.04597), Sec. 3.1: "We generate smooth deformations using random
displacement vectors on a coarse 3 by 3 grid. The displacements are sampled from a Gaussian
distribution with 10 pixels standard deviation. Per-pixel displacements are then computed using
bicubic interpolation."

Here, for an ``H x W`` sample:

1. a ``grid x grid`` array of displacement vectors (dy, dx) is drawn, every component from
   ``N(0, sigma^2)`` (``grid = 3``, ``sigma = 10`` px by default); the nodes sit on the pixel
   positions ``k (H - 1) / (grid - 1)`` and ``k (W - 1) / (grid - 1)``, so the outer nodes are
   the corner pixels;
2. the per-pixel field ``u(p)`` is their bicubic interpolation: cubic convolution (Keys' kernel,
   ``a = -0.5``), separable over rows and columns, the missing neighbours beyond an end node
   taken equal to it (as OpenCV and torch do). It passes through the node values exactly and is
   continuously differentiable;
3. output pixel ``p`` samples the input at ``p + u(p)``: the image bilinearly, the class mask,
   the weight map and the instance masks by nearest neighbour, with mirrored borders
   (reflect-101, the paper's extrapolation at image borders), so every output label is one of the
   input's labels and nothing becomes ignored.

:func:`random_displacement` and :func:`warp_sample` are the two steps as pure functions;
:class:`ElasticDeform` draws from numpy's global RNG, which the trainer seeds per epoch and per
worker, like the rest of the augmentation.
"""

from __future__ import annotations

import numbers

import cv2
import numpy as np

from pixelwise.errors import UserError
from pixelwise.sample import Sample, visible_instances

KEYS_A = -0.5  # Keys' cubic convolution parameter ("bicubic" in Matlab; OpenCV and torch use -0.75)


def cubic_kernel(x: np.ndarray, a: float = KEYS_A) -> np.ndarray:
    """Keys' cubic convolution kernel ``W(x)``: float[...] -> float[...]; ``W(0) = 1``,
    ``W(+-1) = W(+-2) = 0``, zero for ``|x| >= 2``."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def interpolation_matrix(size: int, nodes: int, a: float = KEYS_A) -> np.ndarray:
    """float64[size, nodes]: row ``i`` holds the bicubic weights of the ``nodes`` grid values at
    pixel ``i``, the nodes at pixels ``k (size - 1) / (nodes - 1)``, neighbours beyond the end
    nodes clamped to them. ``matrix @ values`` interpolates; each row sums to 1."""
    if nodes < 2 or size < 1:
        raise ValueError(f"need at least 2 nodes and 1 pixel, got nodes={nodes}, size={size}")
    t = np.arange(size, dtype=np.float64) * (nodes - 1) / max(size - 1, 1)  # node coordinates
    base = np.floor(t).astype(np.int64)
    matrix = np.zeros((size, nodes))
    rows = np.arange(size)
    for offset in (-1, 0, 1, 2):
        k = base + offset
        np.add.at(matrix, (rows, np.clip(k, 0, nodes - 1)), cubic_kernel(t - k, a))
    return matrix


def dense_displacement(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float[2, g, g] node displacements (dy, dx) -> float32[2, H, W] per-pixel displacements, the
    bicubic interpolation of :func:`interpolation_matrix` along rows and columns."""
    coarse = np.asarray(coarse, dtype=np.float64)
    rows = interpolation_matrix(shape[0], coarse.shape[1])
    cols = interpolation_matrix(shape[1], coarse.shape[2])
    # rows @ (c @ cols.T): the other order, (H x g) @ (g x W), is ~100x slower in threaded BLAS
    return np.stack([rows @ (c @ cols.T) for c in coarse]).astype(np.float32)


def random_displacement(shape: tuple[int, int], sigma: float = 10.0, grid: int = 3,
                        rng: np.random.RandomState | np.random.Generator | None = None) -> np.ndarray:
    """float32[2, H, W] (dy, dx): a ``grid x grid`` array of vectors with ``N(0, sigma^2)``
    components, interpolated bicubically (:func:`dense_displacement`). ``rng``: numpy's global
    RNG unless given."""
    draw = (rng or np.random).normal(0.0, sigma, size=(2, grid, grid))
    return dense_displacement(draw, shape)


def warp_sample(s: Sample, displacement: np.ndarray) -> Sample:
    """Output pixel ``p`` of every array of ``s`` := input at ``p + displacement[:, p]``
    (float[2, H, W], dy then dx): image bilinear; mask, weight and instance masks nearest; borders
    mirrored. Instance boxes are recomputed and instances that vanished are dropped."""
    h, w = s.mask.shape
    if displacement.shape != (2, h, w):
        raise ValueError(f"displacement {displacement.shape} does not fit a {h}x{w} sample")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    map_y, map_x = ys + displacement[0], xs + displacement[1]

    def remap(a: np.ndarray, interpolation: int) -> np.ndarray:
        return cv2.remap(np.ascontiguousarray(a), map_x, map_y, interpolation, borderMode=cv2.BORDER_REFLECT_101)

    new: dict = {"image": remap(s.image, cv2.INTER_LINEAR), "mask": remap(s.mask, cv2.INTER_NEAREST)}
    if s.weight is not None:
        new["weight"] = remap(np.asarray(s.weight, dtype=np.float32), cv2.INTER_NEAREST)
    if s.instance_masks is not None:
        inst = np.asarray(s.instance_masks, dtype=np.uint8)
        warped = (np.stack([remap(m, cv2.INTER_NEAREST) for m in inst]).astype(bool) if len(inst)
                  else np.zeros((0, h, w), dtype=bool))
        new.update(visible_instances(warped, s.instance_labels))
    return s.replace(**new)


MAX_SIGMA = 1000.0  # pixels of displacement (the paper's 10): far beyond any image's size, and finite


class ElasticDeform:
    """Sample -> Sample: :func:`warp_sample` by a fresh :func:`random_displacement` (the U-Net
    paper's 3x3 grid, 10 px standard deviation by default)."""

    def __init__(self, sigma: float = 10.0, grid: int = 3):
        if not (isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) and 0 <= float(sigma) <= MAX_SIGMA):
            # infinity (and 1e15) gave every sample one class and a flat image
            raise UserError(f"elastic sigma must be a number of pixels from 0 to {MAX_SIGMA:g}, got {sigma!r}")
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 2:
            raise UserError(f"elastic grid must be an integer >= 2 (nodes per side), got {grid!r}")
        self.sigma: float = float(sigma)
        self.grid: int = grid

    def __repr__(self) -> str:
        return f"ElasticDeform(sigma={self.sigma}, grid={self.grid})"

    def __call__(self, s: Sample) -> Sample:
        return warp_sample(s, random_displacement(s.mask.shape, self.sigma, self.grid))
