"""Preprocessing shared by training, evaluation, prediction and the web demo, plus
paired image/mask augmentation.

:func:`preprocess` is the only place where an image becomes a model input: every path
(train, eval, predict, serve) goes through it so that they cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import torch

from pixelwise.data.base import Sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8[H, W, 3] RGB -> float32 Tensor[3, H, W], scaled to [0, 1] and normalised."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"preprocess expects uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(m).div_(s)


def sample_to_tensors(sample: Sample, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """A :class:`Sample` -> dict of tensors: image Tensor[3,H,W], mask int64 Tensor[H,W],
    and where present weight Tensor[H,W], masks bool Tensor[K,H,W], labels, boxes."""
    out = {
        "image": preprocess(sample.image, mean, std),
        "mask": torch.from_numpy(np.require(sample.mask, requirements=["C", "W"])).long(),
        "name": sample.name,
    }
    if sample.weight is not None:
        out["weight"] = torch.from_numpy(np.ascontiguousarray(sample.weight, dtype=np.float32))
    if sample.instance_masks is not None:
        out["target"] = {
            "masks": torch.from_numpy(np.ascontiguousarray(sample.instance_masks, dtype=bool)),
            "labels": torch.as_tensor(sample.instance_labels, dtype=torch.int64),
            "boxes": torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4),
        }
    return out


class RandomFlip:
    """Horizontal flip with probability p (image, mask, weight and instances together).

    Draws from numpy's global RNG, which the trainer seeds per epoch and per worker."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, s: Sample) -> Sample:
        if np.random.random() >= self.p:
            return s
        w = s.image.shape[1]
        kw = {"image": s.image[:, ::-1].copy(), "mask": s.mask[:, ::-1].copy()}
        if s.weight is not None:
            kw["weight"] = s.weight[:, ::-1].copy()
        if s.instance_masks is not None:
            kw["instance_masks"] = s.instance_masks[:, :, ::-1].copy()
            b = np.asarray(s.boxes, dtype=np.float32).copy()
            b[:, [0, 2]] = w - b[:, [2, 0]]
            kw["boxes"] = b
        return s.replace(**kw)


class RandomCrop:
    """Random crop to (h, w); smaller images are padded first (image 0, mask 255, weight 0)."""

    def __init__(self, size: tuple[int, int]):
        self.h, self.w = size

    def __call__(self, s: Sample) -> Sample:
        H, W = s.mask.shape
        ph, pw = max(0, self.h - H), max(0, self.w - W)
        if ph or pw:
            pad2 = ((0, ph), (0, pw))
            s = s.replace(image=np.pad(s.image, pad2 + ((0, 0),)),
                          mask=np.pad(s.mask, pad2, constant_values=255),
                          weight=None if s.weight is None else np.pad(s.weight, pad2),
                          instance_masks=None if s.instance_masks is None
                          else np.pad(s.instance_masks, ((0, 0),) + pad2))
            H, W = s.mask.shape
        y = int(np.random.randint(0, H - self.h + 1))
        x = int(np.random.randint(0, W - self.w + 1))
        sl = (slice(y, y + self.h), slice(x, x + self.w))
        kw: dict = {"image": s.image[sl], "mask": s.mask[sl]}
        if s.weight is not None:
            kw["weight"] = s.weight[sl]
        if s.instance_masks is not None:
            masks = s.instance_masks[:, sl[0], sl[1]]
            keep = masks.reshape(len(masks), -1).any(1)
            kw["instance_masks"] = masks[keep]
            kw["instance_labels"] = np.asarray(s.instance_labels)[keep]
            kw["boxes"] = boxes_from_masks(masks[keep])
        return s.replace(**kw)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """bool[K, H, W] -> float32[K, 4] (x1, y1, x2, y2), x2/y2 exclusive; empty masks give zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes
