"""Anchor boxes for the region proposal network (torchvision's ``AnchorGenerator``).

Each feature level gets anchors of its own sizes and aspect ratios (h / w), centred on
the top-left corner of every feature cell mapped to the padded image (``x * stride``).
Anchors of a level are ordered (y, x, anchor), anchors of one location by aspect ratio
then size, and the levels are concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor


def cell_anchors(
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """Zero-centred anchors ``Tensor[len(aspect_ratios) * len(sizes), 4]`` (x1, y1, x2, y2), rounded:
    width ``size / sqrt(ratio)``, height ``size * sqrt(ratio)``."""
    scales = torch.as_tensor(sizes, dtype=dtype, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def grid_anchors(base: Tensor, grid_size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Shift ``base`` ``Tensor[A, 4]`` to every cell of a ``grid_size`` (H, W) feature map whose
    cells are ``stride`` (sy, sx) pixels apart -> ``Tensor[H * W * A, 4]``, ordered (y, x, a)."""
    shifts_x = torch.arange(0, grid_size[1], dtype=torch.int32, device=base.device) * stride[1]
    shifts_y = torch.arange(0, grid_size[0], dtype=torch.int32, device=base.device) * stride[0]
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


class AnchorGenerator(nn.Module):
    """``forward(batch_hw, feature_sizes) -> Tensor[sum_l H_l * W_l * A_l, 4]``, the anchors of
    one image (identical for every image of a padded batch). No parameters.

    ``sizes[l]`` and ``aspect_ratios[l]`` belong to feature level ``l``; the stride of a level
    is ``batch_hw // feature_size`` (integer division, per axis), as in torchvision."""

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5,
    ) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"{len(sizes)} anchor sizes but {len(aspect_ratios)} aspect-ratio lists")
        self.sizes = [tuple(s) for s in sizes]
        self.aspect_ratios = [tuple(a) for a in aspect_ratios]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def forward(
        self,
        batch_hw: tuple[int, int],
        feature_sizes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(f"{len(feature_sizes)} feature levels but anchors for {len(self.sizes)}")
        levels = []
        for size, ratios, (h, w) in zip(self.sizes, self.aspect_ratios, feature_sizes):
            base = cell_anchors(size, ratios, dtype, device)
            stride = (int(batch_hw[0]) // int(h), int(batch_hw[1]) // int(w))
            levels.append(grid_anchors(base, (int(h), int(w)), stride))
        return torch.cat(levels)
