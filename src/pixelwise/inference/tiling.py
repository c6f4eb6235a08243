"""Sliding-window prediction: overlapping tiles blended with a smooth window."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``size`` with step ``stride``; the last
    tile is flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def tile_weight(tile_h: int, tile_w: int) -> Tensor:
    """Tensor[h, w]: a smooth window (Hann, floored at 0.1) so tile seams blend without steps."""
    wy = torch.hann_window(tile_h + 2, periodic=False)[1:-1].clamp_min(0.1)
    wx = torch.hann_window(tile_w + 2, periodic=False)[1:-1].clamp_min(0.1)
    return wy[:, None] * wx[None, :]


def tiled_probs(probs_fn: Callable[[Tensor], Tensor], x: Tensor, tile: int | None, overlap: float) -> Tensor:
    """``probs_fn`` (Tensor[1, C_in, h, w] -> probabilities Tensor[1, K, h, w]) over ``x``
    Tensor[1, C_in, H, W] in tiles of side ``tile`` overlapping by ``overlap`` (a fraction of the
    tile), blended with :func:`tile_weight`; the whole image at once when ``tile`` is None or the
    image fits in one tile."""
    h, w = x.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return probs_fn(x)
    th, tw = min(tile, h), min(tile, w)
    stride_h = max(1, int(th * (1 - overlap)))
    stride_w = max(1, int(tw * (1 - overlap)))
    weight = tile_weight(th, tw).to(x.device)
    acc = norm = None
    for y in tile_starts(h, th, stride_h):
        for x0 in tile_starts(w, tw, stride_w):
            p = probs_fn(x[..., y : y + th, x0 : x0 + tw]) * weight
            if acc is None or norm is None:
                acc = x.new_zeros((1, p.shape[1], h, w))
                norm = x.new_zeros((1, 1, h, w))
            acc[..., y : y + th, x0 : x0 + tw] += p
            norm[..., y : y + th, x0 : x0 + tw] += weight
    assert acc is not None and norm is not None
    return acc / norm
