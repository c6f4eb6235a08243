"""Input and output handling of Mask R-CNN: normalise, resize, batch; and back.

Equivalent to torchvision's ``GeneralizedRCNNTransform`` (resize rule, padding, box and mask
rescaling) and ``paste_masks_in_image``. Images are ``Tensor[3, H, W]`` in ``[0, 1]``; the
transform subtracts ``image_mean`` and divides by ``image_std`` unless built with
``normalize=False`` (inputs already normalised, e.g. by :func:`pixelwise.data.transforms.preprocess`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.errors import brief
from pixelwise.models._checks import numbers_of, whole_number
from pixelwise.preprocess import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class TransformConfig:
    """How images are prepared before the backbone (torchvision's keyword names)."""

    min_size: tuple[int, ...] = (800,)  # shorter side after resize; with targets in train mode one is drawn
    max_size: int = 1333  # longer side never exceeds this
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    size_divisible: int = 32  # the batch is zero-padded (bottom/right) to multiples of this
    normalize: bool = True  # False: images are already (x - mean) / std, skip that step

    def __post_init__(self) -> None:
        """Check every field (``ValueError`` naming it and its range) and bring it to its type:
        ``min_size`` one whole number or a non-empty list of them, each >= 1; ``max_size`` and
        ``size_divisible`` whole numbers >= 1; ``image_mean`` three numbers, ``image_std`` three
        positive ones."""
        self.min_size = min_sizes(self.min_size)
        self.max_size = whole_number("max_size", self.max_size)
        self.size_divisible = whole_number("size_divisible", self.size_divisible)
        self.image_mean = numbers_of("image_mean", self.image_mean, 3)  # type: ignore[assignment]
        self.image_std = numbers_of("image_std", self.image_std, 3, positive=True)  # type: ignore[assignment]
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")


def min_sizes(value: Any) -> tuple[int, ...]:
    """``min_size`` as torchvision takes it (one size, or several to draw from in multi-scale
    training) -> a non-empty tuple of whole numbers >= 1, else ``ValueError``."""
    many = isinstance(value, Iterable) and not isinstance(value, str | bytes)
    sizes = tuple(value) if many else (value,)
    try:
        if not sizes:
            raise ValueError
        return tuple(whole_number("min_size", s) for s in sizes)
    except ValueError:
        raise ValueError("min_size must be a whole number >= 1 or a non-empty list of them, got "
                         f"{brief(value)}") from None


class ImageBatch(NamedTuple):
    """Padded batch ``tensors: Tensor[N, 3, Hp, Wp]`` and each image's size after resizing."""

    tensors: Tensor
    image_sizes: list[tuple[int, int]]


def normalize_image(image: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``Tensor[3, H, W] -> (image - mean) / std`` per channel; ``image`` float (an integer dtype
    would cast mean and std to it)."""
    if not image.is_floating_point():
        raise ValueError(f"normalize_image needs a float image with values in [0, 1], got {image.dtype}")
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    return (image - m[:, None, None]) / s[:, None, None]


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """The factor that brings the shorter side to ``min_size`` unless the longer side would
    exceed ``max_size`` (then the longer side becomes ``max_size``)."""
    return min(min_size / min(height, width), max_size / max(height, width))


def _too_thin(x: Tensor, scale: float) -> tuple[int, int] | None:
    """For an image whose side ``floor(side * scale)`` would be 0 (a 1 x 2000 strip): its resized
    (H, W) with each side at least 1; None for every other image, resized as torchvision does."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if min(math.floor(h * scale), math.floor(w * scale)) >= 1:
        return None
    return max(1, math.floor(h * scale)), max(1, math.floor(w * scale))


def resize_image(image: Tensor, scale: float) -> Tensor:
    """``Tensor[C, H, W] -> Tensor[C, floor(H*scale), floor(W*scale)]`` (each at least 1), bilinear."""
    size = _too_thin(image, scale)
    if size is not None:
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def resize_masks(masks: Tensor, scale: float) -> Tensor:
    """Instance masks ``[K, H, W] -> uint8[K, floor(H*scale), floor(W*scale)]`` (each at least 1), nearest."""
    size = _too_thin(masks, scale)
    if masks.shape[0] == 0:
        h, w = masks.shape[-2:]
        return masks.new_zeros((0, *(size or (math.floor(h * scale), math.floor(w * scale)))), dtype=torch.uint8)
    if size is not None:
        return F.interpolate(masks[:, None].float(), size=size)[:, 0].byte()
    out = F.interpolate(masks[:, None].float(), scale_factor=scale, recompute_scale_factor=True)
    return out[:, 0].byte()


def resize_boxes(boxes: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Boxes ``Tensor[K, 4]`` (x1, y1, x2, y2) of an ``old_size`` (H, W) image -> ``new_size``."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32) / torch.tensor(old_size[0], dtype=torch.float32)
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32) / torch.tensor(old_size[1], dtype=torch.float32)
    ratios = torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]).to(boxes)
    return boxes * ratios


def batch_images(images: list[Tensor], size_divisible: int) -> Tensor:
    """``[Tensor[C, H_i, W_i]] -> Tensor[N, C, Hp, Wp]``, zero-padded at the bottom/right to the
    largest size rounded up to a multiple of ``size_divisible``."""
    h = max(img.shape[-2] for img in images)
    w = max(img.shape[-1] for img in images)
    h = int(math.ceil(h / size_divisible) * size_divisible)
    w = int(math.ceil(w / size_divisible) * size_divisible)
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for img, slot in zip(images, batch):
        slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch


def check_image(image: Tensor, i: int) -> None:
    """Raise ``ValueError`` unless ``image`` (``images[i]``) is a float ``Tensor[3, H, W]`` with
    ``H, W >= 1``. Integer images are refused, as torchvision does, rather than normalised with
    a mean and std cast to their dtype (uint8: 0 and 0, so every pixel would become inf)."""
    if not isinstance(image, Tensor):
        raise ValueError(f"images[{i}] must be a Tensor[3, H, W], got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"images[{i}] must be Tensor[3, H, W], got shape {list(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"images[{i}] is {image.dtype}; Mask R-CNN takes float images with values in [0, 1] "
                         "(e.g. image.float() / 255 for an image read as uint8)")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"images[{i}] is empty ({image.shape[1]}x{image.shape[2]} pixels)")


class RCNNTransform(nn.Module):
    """``forward(images, targets=None) -> (ImageBatch, targets)``; ``postprocess`` maps
    detections back to the original image sizes and pastes the masks. No parameters."""

    def __init__(self, config: TransformConfig) -> None:
        super().__init__()
        self.config = config

    def pick_min_size(self, random_scale: bool) -> float:
        sizes = self.config.min_size
        if random_scale and len(sizes) > 1:
            return float(sizes[int(torch.randint(0, len(sizes), (1,)).item())])
        return float(sizes[-1])

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        """Images ``[Tensor[3, H_i, W_i]]``; targets (copied, never modified in place) have their
        ``boxes`` and ``masks`` resized with the image. A random ``min_size`` is drawn only when
        targets are given in train mode (multi-scale training)."""
        cfg = self.config
        if len(images) == 0:
            raise ValueError("no images: Mask R-CNN takes a list of one or more Tensor[3, H, W]")
        out_images: list[Tensor] = []
        out_targets: list[dict[str, Tensor]] = []
        for i, image in enumerate(images):
            check_image(image, i)
            if cfg.normalize:
                image = normalize_image(image, cfg.image_mean, cfg.image_std)
            h, w = image.shape[-2:]
            min_size = self.pick_min_size(random_scale=targets is not None and self.training)
            scale = resize_scale(h, w, min_size, float(cfg.max_size))
            image = resize_image(image, scale)
            out_images.append(image)
            if targets is not None:
                new_h, new_w = image.shape[-2:]
                out_targets.append(self._resize_target(targets[i], (h, w), (new_h, new_w), scale))
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in out_images]
        batch = ImageBatch(batch_images(out_images, cfg.size_divisible), sizes)
        return batch, (out_targets if targets is not None else None)

    @staticmethod
    def _resize_target(
        target: dict[str, Tensor], old_size: tuple[int, int], new_size: tuple[int, int], scale: float
    ) -> dict[str, Tensor]:
        target = dict(target)
        target["boxes"] = resize_boxes(target["boxes"], old_size, new_size)
        if "masks" in target:
            target["masks"] = resize_masks(target["masks"], scale)
        return target

    def postprocess(
        self,
        detections: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Rescale ``boxes`` to each original image and paste the 28x28 ``masks`` into it
        (``Tensor[D, 1, H, W]`` probabilities)."""
        out = []
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det = dict(det)
            det["boxes"] = resize_boxes(det["boxes"], size, original)
            if "masks" in det:
                det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], original)
            out.append(det)
        return out


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale ``Tensor[K, 4]`` boxes about their centres by ``scale``."""
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)


def paste_weights(lo: Tensor, hi: Tensor, size_in: int, first: Tensor, count: int, size_out: int) -> Tensor:
    """Bilinear resize-and-place weights along one image axis, for every box at once.

    ``lo, hi: Tensor[D]`` int64 first and last (inclusive) pixel of each box; a mask axis of
    ``size_in`` is resized to ``max(hi - lo + 1, 1)`` pixels exactly as
    ``F.interpolate(mode="bilinear", align_corners=False)`` does (float32 source index
    ``max(scale * (i + 0.5) - 0.5, 0)`` with ``scale = size_in / size``, two taps, the upper one
    clamped to the mask) and placed at ``lo``. Returns ``Tensor[D, count, size_in]`` (float32): row
    ``r`` holds the weights of image pixel ``first + r`` (at most two non-zeros; all zero outside
    ``[lo, hi]`` and outside the image axis ``[0, size_out)``).
    """
    pos = first[:, None] + torch.arange(count, device=lo.device)
    local = pos - lo[:, None]  # [D, count] pixel index inside the resized mask
    inside = (local >= 0) & (pos <= hi[:, None]) & (pos < size_out)
    length = (hi - lo + 1).clamp(min=1).to(torch.float32)
    scale = torch.tensor(float(size_in), dtype=torch.float32, device=lo.device) / length
    src = (scale[:, None] * (local.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    low = src.floor().to(torch.int64).clamp(min=0, max=size_in - 1)
    frac = (src - low.to(torch.float32)).clamp(0, 1)
    high = low + (low < size_in - 1).to(torch.int64)
    weights = torch.zeros((*local.shape, size_in), dtype=torch.float32, device=lo.device)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> Tensor:
    """Masks ``Tensor[D, 1, M, M]`` inside ``boxes`` ``Tensor[D, 4]`` -> ``Tensor[D, 1, H, W]`` (float32).

    As torchvision: the mask is padded by ``padding`` pixels and the box enlarged by the same
    factor ``(M + 2 * padding) / M`` and truncated to integers ``(x1, y1, x2, y2)``; the mask is
    resized (bilinear) to ``(y2 - y1 + 1, x2 - x1 + 1)`` and written at ``(y1, x1)``, zero elsewhere.

    All boxes at once, no loop: bilinear resizing is separable, so the visible part of each resized
    mask is ``W_y @ (mask @ W_x^T)`` with the per-axis weights of :func:`paste_weights` (two batched
    matrix products over the largest visible box, the same taps and weights as torchvision's
    per-box ``F.interpolate``), then one ``scatter_add_`` writes every patch into the zeroed output
    (padding slots of smaller boxes add an exact 0).
    """
    height, width = int(image_size[0]), int(image_size[1])
    n = masks.shape[0]
    out = torch.zeros((n, height * width), dtype=torch.float32, device=masks.device)
    if n == 0:
        return out.view(0, 1, height, width)
    m = masks.shape[-1]
    padded = F.pad(masks[:, 0].to(torch.float32), (padding,) * 4)
    x1, y1, x2, y2 = expand_boxes(boxes, (m + 2 * padding) / m).to(torch.int64).unbind(1)
    # the visible part of each box: rows [top, top + rows), columns [left, left + cols)
    top, left = y1.clamp(min=0), x1.clamp(min=0)
    rows = ((y2 + 1).clamp(max=height) - top).clamp(min=0)
    cols = ((x2 + 1).clamp(max=width) - left).clamp(min=0)
    max_rows, max_cols = int(rows.max()), int(cols.max())
    if max_rows == 0 or max_cols == 0:
        return out.view(n, 1, height, width)
    size = padded.shape[-1]
    wy = paste_weights(y1, y2, size, top, max_rows, height)  # [D, R, M'], zero rows beyond the box
    wx = paste_weights(x1, x2, size, left, max_cols, width)  # [D, C, M']
    patch = torch.bmm(wy, torch.bmm(padded, wx.transpose(1, 2)))  # [D, R, C], exactly 0 outside
    # Padding slots point at a pixel of their own box (or any pixel when nothing is visible) and add 0.
    r = torch.minimum(torch.arange(max_rows, device=masks.device), (rows[:, None] - 1).clamp(min=0))
    c = torch.minimum(torch.arange(max_cols, device=masks.device), (cols[:, None] - 1).clamp(min=0))
    row_start = (top.clamp(max=height - 1)[:, None] + r) * width  # [D, R]
    index = row_start[:, :, None] + (left.clamp(max=width - 1)[:, None] + c)[:, None, :]
    out.scatter_add_(1, index.view(n, -1), patch.view(n, -1))
    return out.view(n, 1, height, width)
