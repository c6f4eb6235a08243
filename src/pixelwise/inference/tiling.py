"""Sliding-window prediction with real context and a streaming accumulator.

An image is cut into **cores** of side ``tile`` (the pixels a tile predicts), stepping by
``tile * (1 - overlap)``. The model sees each core together with its real surroundings from the
image, the **window**: the core widened by a margin on every side and clipped to the image, so
only the image border is ever extrapolated, and there by the model's own padding, as when it
runs on the whole image. Only the core of each window's output is kept.

The margin and the window positions come from two attributes a model may state (read by
:func:`model_geometry`, never from its name):

- ``context``: how many pixels of input on each side an output pixel depends on (the valid
  U-Net: 92, what its unpadded convolutions consume); 0 when the model states none
  (zero-padded models, whose receptive field spans the image).
- ``alignment``: the model's pooling grid (U-Net: 16; FCN-VGG and SegNet: 32). Windows start at
  multiples of it, so every window sees the grid where the whole image does, and end a multiple
  of it before the image's end, so mirrored and rotated windows (test-time augmentation) do too.

A model with context gets a margin of ``context + alignment - 1``: where an output pixel's
receptive window lies depends on its position in the pooling grid (for the valid U-Net it reaches
92 to 107 pixels to either side), and with that margin the tiled output equals the whole-image
output (``tests/test_tiling.py``). A model without stated context gets a margin of
``tile // 8``, which keeps the zero padding of its convolutions away from the kept cores.

Where cores overlap (``overlap > 0``) their probabilities are blended with a smooth window
(:func:`tile_weight`). The blend is **streamed**: tiles run row by row, and the accumulator holds
only the rows that a later tile can still touch (at most ``tile`` rows of the full width); rows
are normalised and handed on as soon as the last tile covering them is added. These are the same
float32 additions in the same order as a full-size accumulator would do, so the probabilities,
and hence their argmax, are bit for bit those of blending into a full C x H x W array, which
never exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor


def model_geometry(model: nn.Module) -> tuple[int, int]:
    """``(context, alignment)`` that ``model`` states by its attributes of those names (see the
    module docstring); ``(0, 1)`` for a model that states neither."""
    return int(getattr(model, "context", 0)), max(1, int(getattr(model, "alignment", 1)))


def tile_margin(tile: int, context: int, alignment: int) -> int:
    """Pixels of real image each window adds around its core on every side."""
    return context + alignment - 1 if context else tile // 8


@dataclass(frozen=True)
class Span:
    """One axis of a tile: the core ``[start, stop)`` it predicts and the window
    ``[window_start, window_stop)`` the model sees (image coordinates)."""

    start: int
    stop: int
    window_start: int
    window_stop: int


def axis_spans(size: int, tile: int, overlap: float, margin: int, alignment: int) -> list[Span]:
    """The tiles along one axis of ``size`` pixels: cores of ``tile`` pixels stepping by
    ``tile * (1 - overlap)`` (rounded down to a multiple of ``alignment`` where that leaves a step,
    so that inner windows all have one size), the last flush with the end; each window is its core
    widened by ``margin``, its start rounded down to a multiple of ``alignment`` and its end moved
    on to ``size`` minus a multiple of ``alignment``, clipped to ``[0, size)``: measured from
    either end of the image a window sits on the grid, so a mirrored or rotated window (test-time
    augmentation) sees the grid where the mirrored or rotated image does."""
    if size <= tile:
        return [Span(0, size, 0, size)]
    step = max(1, int(tile * (1 - overlap)))
    stride = step // alignment * alignment or step
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    def window_stop(stop: int) -> int:
        return min(size, stop + (size - stop) % alignment)

    return [Span(s, s + tile, max(0, (s - margin) // alignment * alignment), window_stop(s + tile + margin))
            for s in starts]


@dataclass(frozen=True)
class TilePlan:
    """The tiles of an ``height`` x ``width`` image, row by row (``rows[i]`` and ``cols[j]`` give
    tile (i, j)); ``blend``: whether cores overlap and are blended with :func:`tile_weight`."""

    height: int
    width: int
    rows: list[Span]
    cols: list[Span]
    blend: bool

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def windows(self) -> Iterator[tuple[slice, slice]]:
        """``(rows, cols)`` slices of each tile's window, in the order :func:`blend_rows` wants them."""
        for r in self.rows:
            for c in self.cols:
                yield slice(r.window_start, r.window_stop), slice(c.window_start, c.window_stop)


def plan_tiles(height: int, width: int, tile: int, overlap: float, context: int = 0, alignment: int = 1
               ) -> TilePlan:
    """The :class:`TilePlan` for a model of the given ``context`` and ``alignment`` (see
    :func:`model_geometry`)."""
    margin = tile_margin(tile, context, alignment)
    rows = axis_spans(height, tile, overlap, margin, alignment)
    cols = axis_spans(width, tile, overlap, margin, alignment)
    return TilePlan(height, width, rows, cols, blend=overlap > 0)


def tile_weight(tile_h: int, tile_w: int) -> Tensor:
    """Tensor[h, w]: a smooth window (Hann, floored at 0.1) so tile seams blend without steps."""
    wy = torch.hann_window(tile_h + 2, periodic=False)[1:-1].clamp_min(0.1)
    wx = torch.hann_window(tile_w + 2, periodic=False)[1:-1].clamp_min(0.1)
    return wy[:, None] * wx[None, :]


def blend_rows(plan: TilePlan, outputs: Iterable[Tensor]) -> Iterator[tuple[int, Tensor]]:
    """Blend the tiles' outputs (probabilities ``Tensor[K, h, w]`` of each window of
    ``plan.windows()``, in that order) into finished rows: yields ``(y, Tensor[K, n, width])``,
    rows ``y .. y + n - 1`` of the blended probabilities, top to bottom, each row once.

    Without ``plan.blend`` every weight is 1, so a pixel covered by one core gets that core's
    probabilities exactly."""
    outputs = iter(outputs)
    acc = norm = torch.zeros(0)
    top = 0  # image row of acc[:, 0]
    for i, r in enumerate(plan.rows):
        for c in plan.cols:
            out = next(outputs)
            core = out[:, r.start - r.window_start : r.stop - r.window_start,
                       c.start - c.window_start : c.stop - c.window_start].float().cpu()
            if acc.shape[0] == 0:
                acc = torch.zeros(core.shape[0], r.stop - top, plan.width)
                norm = torch.zeros(1, r.stop - top, plan.width)
            elif acc.shape[1] < r.stop - top:  # a new row of tiles reaches further down
                grow = r.stop - top - acc.shape[1]
                acc = torch.cat([acc, acc.new_zeros(acc.shape[0], grow, plan.width)], 1)
                norm = torch.cat([norm, norm.new_zeros(1, grow, plan.width)], 1)
            weight = tile_weight(*core.shape[-2:]) if plan.blend else torch.ones(core.shape[-2:])
            acc[:, r.start - top : r.stop - top, c.start : c.stop] += core * weight
            norm[:, r.start - top : r.stop - top, c.start : c.stop] += weight
        done = plan.rows[i + 1].start if i + 1 < len(plan.rows) else plan.height  # no later tile reaches above
        yield top, acc[:, : done - top] / norm[:, : done - top]
        acc, norm, top = acc[:, done - top :].clone(), norm[:, done - top :].clone(), done
