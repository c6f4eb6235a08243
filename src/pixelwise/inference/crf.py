"""The fully connected CRF of DeepLab (Chen et al., ICLR 2015, arXiv:1412.7062), after Krähenbühl &
Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials" (NIPS 2011,
arXiv:1210.5644): mean-field inference over every pair of pixels, with Gaussian filtering on the
permutohedral lattice (Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the
Permutohedral Lattice", Eurographics 2010).

The model (as the ``densecrf`` library of Krähenbühl, which DeepLab and ``pydensecrf`` use)
------------------------------------------------------------------------------------------
Unary ``U = -log p`` of the network's probabilities (``p`` clipped below at 1e-5); two Potts
pairwise terms, an appearance kernel over position and colour and a smoothness kernel over
position::

    k(i, j) = bi_w * exp(-|p_i - p_j|^2 / 2 bi_xy_std^2 - |I_i - I_j|^2 / 2 bi_rgb_std^2)
            + pos_w * exp(-|p_i - p_j|^2 / 2 pos_xy_std^2)

Mean field from ``Q = softmax(-U)``, ``iterations`` times::

    Q <- softmax(-U + bi_w * K_bi(Q) + pos_w * K_pos(Q))

where each ``K`` is its Gaussian filter with ``densecrf``'s default symmetric normalisation,
``K(Q) = D G (D Q)``, ``D = diag(1 / sqrt(G 1))``, ``G`` the lattice's Gaussian sum over all
pixels (each pixel's own weight included). Positions are pixel (column, row); colours the
image's 0-255 values (one grey channel for grey images).

Defaults: DeepLab-LargeFOV's cross-validated values on PASCAL VOC (``bi_w = 4``, ``bi_xy_std =
121``, ``bi_rgb_std = 5``, ``pos_w = 3``, ``pos_xy_std = 3``, 10 iterations); other models and
datasets want their own (the paper cross-validates them on 100 val images).

The lattice
-----------
Each pixel's feature vector (divided by its standard deviations) is lifted onto the
``d``-dimensional hyperplane of ``Z^(d+1)`` scaled as in the reference code, the enclosing simplex
found by rounding to the nearest remainder-0 point and sorting, and its value splatted onto the
simplex's ``d + 1`` vertices with barycentric weights; the values are blurred with ``[1 2 1]``
along each of the ``d + 1`` lattice axes and sliced back with the same weights (times the
reference's constant ``1 / (1 + 2^-d)``). The vertices of all pixels are made unique and their
neighbours found by sorting (numpy), not by a hash table; splat and slice are one sparse matrix.
The result equals ``densecrf``'s to float32 rounding (tests/test_crf.py checks it against
values that library computed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from pixelwise.errors import UserError, brief, finite_number

__all__ = ["MAX_CRF_PIXELS", "CRFSettings", "PermutohedralLattice", "as_crf_settings", "check_crf_size", "dense_crf"]

MAX_CRF_PIXELS = 4_000_000  # up to ~1.6 KB a pixel at the peak (noise-like colours): 6.4 GB at this size
CLIP = 1e-5  # probabilities below this become this before the log (pydensecrf's unary_from_softmax)
# the lattice scales the features (pixels / xy_std, gray levels / rgb_std) into int32 coordinates, and the
# messages are float32: a std far below a pixel or a gray level overflowed the int32 cast (an IndexError, or
# a wrong filter), a weight beyond float32 became inf and every probability NaN (an all-class-0 mask)
MIN_STD = 0.01
MAX_WEIGHT = 1e6
# ... and a large image at a small std still could: its features times (d + 1)^2, which bounds the
# lattice coordinates they are lifted to, must stay below 2^24, the last integer float32 holds exactly
LATTICE_EXACT = 2 ** 24


@dataclass(frozen=True)
class CRFSettings:
    """The fully connected CRF's parameters (see the module docstring); defaults DeepLab-LargeFOV's."""

    iterations: int = 10
    bi_w: float = 4.0
    bi_xy_std: float = 121.0
    bi_rgb_std: float = 5.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or not 1 <= self.iterations <= 100:
            raise UserError(f"crf iterations must be a whole number from 1 to 100, got {self.iterations!r}")
        for name in ("bi_w", "pos_w"):
            value = getattr(self, name)
            if not finite_number(value) or value < 0:
                raise UserError(f"crf {name} must be a number >= 0, got {brief(value)}")
            if value > MAX_WEIGHT:
                raise UserError(f"crf {name} must be at most {MAX_WEIGHT:g} (larger weights overflow the CRF's "
                                f"float32 messages), got {brief(value)}")
        for name in ("bi_xy_std", "bi_rgb_std", "pos_xy_std"):
            value = getattr(self, name)
            if not finite_number(value) or value <= 0:
                raise UserError(f"crf {name} must be a number above 0, got {brief(value)}")
            if value < MIN_STD:
                raise UserError(f"crf {name} must be at least {MIN_STD:g} (pixels or gray levels; smaller ones "
                                f"overflow the CRF's lattice), got {brief(value)}")

    def text(self) -> str:
        """The settings as ``--crf`` takes them (:meth:`parse`): ``iterations=10,bi_w=4,...``."""
        return ",".join(f"{k}={v:g}" for k, v in dataclasses.asdict(self).items())

    @classmethod
    def parse(cls, text: str, flag: str = "--crf") -> CRFSettings:
        """``"bi_w=4,bi_xy_std=121,iterations=5"`` (any subset; empty: the defaults) -> settings."""
        names = [f for f in cls.__dataclass_fields__]
        values: dict[str, float | int] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise UserError(f"{flag}: {part!r} is not NAME=VALUE with NAME one of {', '.join(names)} "
                                "(e.g. bi_w=4,bi_xy_std=121)")
            if key in values:  # which one was meant cannot be told
                raise UserError(f"{flag}: {key} is given twice; give each setting once")
            try:
                values[key] = int(value) if key == "iterations" else float(value)
            except ValueError:
                raise UserError(f"{flag}: {key} must be a number, got {value.strip()!r}") from None
        try:
            return cls(**values)  # type: ignore[arg-type]
        except UserError as e:
            raise UserError(f"{flag}: {str(e).removeprefix('crf ')}") from None


def as_crf_settings(crf: CRFSettings | dict | bool | None) -> CRFSettings | None:
    """A predictor's ``crf`` option: None or False (no CRF), True (the defaults), a mapping of some
    settings (as the server's record of its options holds them), or settings."""
    if crf is None or crf is False:
        return None
    if crf is True:
        return CRFSettings()
    if isinstance(crf, CRFSettings):
        return crf
    if isinstance(crf, dict) and set(crf) <= set(CRFSettings.__dataclass_fields__):
        return CRFSettings(**crf)
    raise UserError(f"crf must be None, True (DeepLab's settings), a CRFSettings or a dict of its fields "
                    f"({', '.join(CRFSettings.__dataclass_fields__)}), got {crf!r}")


class PermutohedralLattice:
    """Gaussian filtering of values at ``N`` points with features ``float32[N, d]`` (already divided
    by their standard deviations): :meth:`filter` ``float32[N, V] -> float32[N, V]``, each point's
    result the (approximate) sum over all points of ``exp(-|f_i - f_j|^2 / 2) * value_j``."""

    CODE_LIMIT = 2 ** 62  # vertices are sorted as int64 codes where their coordinates' ranges fit one, else as rows

    def __init__(self, features: np.ndarray) -> None:
        f = np.ascontiguousarray(features, dtype=np.float32)
        n, d = f.shape
        self.n, self.d = n, d
        scale = (np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
                 / np.sqrt(np.arange(1, d + 1, dtype=np.float64) * np.arange(2, d + 2)).astype(np.float32))
        # lift onto the plane x_0 + ... + x_d = 0 (Adams et al., p. 5)
        elevated = np.empty((n, d + 1), np.float32)
        total = np.zeros(n, np.float32)
        for j in range(d, 0, -1):
            cf = f[:, j - 1] * scale[j - 1]
            elevated[:, j] = total - np.float32(j) * cf
            total = total + cf
        elevated[:, 0] = total
        # the nearest remainder-0 point, then the simplex: each coordinate's rank in the residuals
        down = np.rint(elevated * np.float32(1.0 / (d + 1)))
        rem0 = (down * (d + 1)).astype(np.int32)
        shift = down.sum(1).astype(np.int32)
        residual = elevated - rem0
        rank = np.zeros((n, d + 1), np.int32)
        for i in range(d):
            for j in range(i + 1, d + 1):
                less = residual[:, i] < residual[:, j]
                rank[:, i] += less
                rank[:, j] += ~less
        rank += shift[:, None]
        wrap = (d + 1) * ((rank < 0).astype(np.int32) - (rank >= d + 1).astype(np.int32))  # off the plane: wrap around
        rank += wrap
        rem0 += wrap
        # barycentric weights of the d + 1 vertices (p. 10)
        bary = np.zeros((n, d + 2), np.float32)
        part = (elevated - rem0) * np.float32(1.0 / (d + 1))
        rows = np.arange(n)
        for i in range(d + 1):
            bary[rows, d - rank[:, i]] += part[:, i]
            bary[rows, d - rank[:, i] + 1] -= part[:, i]
        bary[:, 0] += 1 + bary[:, d + 1]
        # vertex r of each point: rem0 plus the canonical simplex's vertex r, in the simplex's order;
        # each vertex one int64 (mixed radix over the coordinates' ranges, widened by the neighbours'
        # reach) where that fits: sorting integers is ~20x faster than sorting rows, and a
        # neighbour's code is the vertex's plus a constant
        offsets = [np.where(rank[:, :d] <= d - r, r, r - (d + 1)) for r in range(d + 1)]
        low = rem0[:, :d].min(0).astype(np.int64) - 2 * (d + 1)
        span = rem0[:, :d].max(0).astype(np.int64) + 2 * d + 1 - low + 1
        self._radix = (np.array([math.prod(int(v) for v in span[k + 1:]) for k in range(d)], np.int64)
                       if math.prod(int(v) for v in span) < self.CODE_LIMIT else None)
        if self._radix is not None:
            base = (rem0[:, :d] - low) @ self._radix
            codes = np.stack([base + offset @ self._radix for offset in offsets], 1)
            lattice, vertex = np.unique(codes.ravel(), return_inverse=True)
            self._neighbours = self._coded_neighbours(lattice, self._radix)
        else:
            keys = np.stack([rem0[:, :d] + offset for offset in offsets], 1).reshape(-1, d)
            lattice, vertex = np.unique(keys, axis=0, return_inverse=True)
            self._neighbours = self._row_neighbours(lattice)
        self.m = len(lattice)
        self._splat = scipy.sparse.csr_matrix(
            (bary[:, : d + 1].ravel(), (vertex.ravel(), np.repeat(rows, d + 1))), shape=(self.m, n))
        self._alpha = np.float32(1.0 / (1.0 + 2.0 ** -d))

    def _coded_neighbours(self, lattice: np.ndarray, radix: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per lattice axis ``j``, the indices of each vertex's two neighbours along it (``m``, the
        index of a zero row, where there is none): all coordinates -1 but ``j`` +d, and the opposite.
        ``lattice``: the sorted vertex codes; a step is one constant added to every code."""
        m, d = len(lattice), self.d
        out = []
        for j in range(d + 1):
            step = int(radix.sum()) - ((d + 1) * int(radix[j]) if j < d else 0)  # the last axis: x_d alone
            pair = []
            for code in (lattice - step, lattice + step):
                at = np.searchsorted(lattice, code).clip(max=m - 1)
                pair.append(np.where(lattice[at] == code, at, m))
            out.append((pair[0], pair[1]))
        return out

    def _row_neighbours(self, lattice: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`_coded_neighbours` for vertices kept as rows (coordinates too spread for a code)."""
        m, d = lattice.shape
        steps = []
        for j in range(d + 1):
            n1, n2 = lattice - 1, lattice + 1
            if j < d:  # the last axis moves the implied coordinate x_d alone
                n1[:, j] = lattice[:, j] + d
                n2[:, j] = lattice[:, j] - d
            steps += [n1, n2]
        unique, index = np.unique(np.concatenate([lattice, *steps]), axis=0, return_inverse=True)
        found = np.full(len(unique), m, np.int64)
        found[index[:m]] = np.arange(m)
        hits = found[index[m:]].reshape(2 * (d + 1), m)
        return [(hits[2 * j], hits[2 * j + 1]) for j in range(d + 1)]

    def filter(self, values: np.ndarray) -> np.ndarray:
        """``float32[N, V] -> float32[N, V]``: splat, blur along every lattice axis, slice."""
        grid = np.zeros((self.m + 1, values.shape[1]), np.float32)
        grid[: self.m] = self._splat @ values
        for n1, n2 in self._neighbours:
            blurred = grid.copy()
            blurred[: self.m] += 0.5 * (grid[n1] + grid[n2])
            grid = blurred
        return np.asarray(self._splat.T @ grid[: self.m], np.float32) * self._alpha


class _Kernel:
    """A Gaussian kernel with ``densecrf``'s symmetric normalisation: ``Q -> D G (D Q)``."""

    def __init__(self, features: np.ndarray) -> None:
        self.lattice = PermutohedralLattice(features)
        self.norm = (1.0 / np.sqrt(self.lattice.filter(np.ones((self.lattice.n, 1), np.float32)) + 1e-20)
                     ).astype(np.float32)

    def __call__(self, q: np.ndarray) -> np.ndarray:
        return self.lattice.filter(q * self.norm) * self.norm


def _features(image: np.ndarray, xy_std: float, rgb_std: float | None) -> np.ndarray:
    h, w = image.shape[:2]
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    parts = [cols.ravel() / np.float32(xy_std), rows.ravel() / np.float32(xy_std)]
    if rgb_std is not None:
        channels = image.reshape(h * w, -1).astype(np.float32)
        parts += [channels[:, c] / np.float32(rgb_std) for c in range(channels.shape[1])]
    return np.stack(parts, 1)


def check_crf_size(height: int, width: int, name: str | None = None, settings: CRFSettings | None = None) -> None:
    """An image the CRF can refine: at most :data:`MAX_CRF_PIXELS` pixels and, with ``settings``, no
    kernel whose lattice coordinates (extent / std times (d+1)^2) pass float32's exact integers;
    else a UserError (that begins with the image's ``name`` where given). The colour kernel is
    checked as an RGB image's (d = 5) also for a grey one (d = 3, a 2.25 times smaller bound), so
    that a size known from a file's header suffices. Said in the settings' own names, which the
    CLI's ``--crf``, the server's ``crf`` field and :class:`CRFSettings` share."""
    where = f"{name}: " if name else ""
    if height * width > MAX_CRF_PIXELS:
        raise UserError(f"{where}the CRF refines images of up to {MAX_CRF_PIXELS:,} pixels "
                        f"(its lattice holds up to 1.6 KB a pixel); this one has {height * width:,} "
                        f"({width}x{height}): predict it without the CRF, or give a smaller copy of the image (the "
                        "CRF runs at the image's own size)")
    if settings is None:
        return
    for weight, setting, std in ((settings.bi_w, "bi_xy_std", settings.bi_xy_std),
                                 (settings.bi_w, "bi_rgb_std", settings.bi_rgb_std),
                                 (settings.pos_w, "pos_xy_std", settings.pos_xy_std)):
        d = 5 if setting.startswith("bi") else 2
        extent = 255 if setting == "bi_rgb_std" else max(height, width)
        if weight > 0 and extent / std * (d + 1) ** 2 >= LATTICE_EXACT:
            raise UserError(f"{where}the CRF setting {setting}={std:g} spreads this {width}x{height} image over more "
                            f"lattice positions than its float32 coordinates hold exactly; give {setting} of at least "
                            f"{extent * (d + 1) ** 2 / LATTICE_EXACT:.3g}")


def dense_crf(image: np.ndarray, probs: torch.Tensor | np.ndarray, settings: CRFSettings | None = None
              ) -> torch.Tensor:
    """Refine class probabilities with the fully connected CRF: ``image`` uint8[H, W, 3] (or a grey
    uint8[H, W] / [H, W, 1]) and ``probs`` float Tensor[C, H, W] (summing to 1 over C) -> float32
    Tensor[C, H, W], the mean-field marginals ``Q`` after ``settings.iterations`` steps (CPU)."""
    settings = settings or CRFSettings()
    p = probs.detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float32)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:  # the colour kernel's units are 0-255
        raise UserError(f"the CRF needs the image as uint8 (0-255, as read from its file), got "
                        f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or p.ndim != 3 or image.shape[:2] != p.shape[1:]:
        raise UserError(f"the CRF needs an image [H, W, channels] and probabilities [C, H, W] of the same H, W; got "
                        f"{list(image.shape)} and {list(p.shape)}")
    c, h, w = p.shape
    check_crf_size(h, w, settings=settings)
    unary = -np.log(np.clip(p.reshape(c, -1).T, CLIP, 1.0)).astype(np.float32)  # [N, C]
    kernels = []
    if settings.bi_w > 0:
        kernels.append((np.float32(settings.bi_w), _Kernel(_features(image, settings.bi_xy_std, settings.bi_rgb_std))))
    if settings.pos_w > 0:
        kernels.append((np.float32(settings.pos_w), _Kernel(_features(image, settings.pos_xy_std, None))))
    q = _softmax(-unary)
    for _ in range(settings.iterations):
        energy = -unary
        for weight, kernel in kernels:
            energy = energy + weight * kernel(q)
        q = _softmax(energy)
    return torch.from_numpy(np.ascontiguousarray(q.T.reshape(c, h, w)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)
