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
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(m).div_(s)


def sample_to_tensors(sample: Sample, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """A :class:`Sample` -> dict of tensors: image Tensor[3,H,W], mask int64 Tensor[H,W],
    and where present weight Tensor[H,W], masks bool Tensor[K,H,W], labels, boxes."""
    out = {
        "image": preprocess(sample.image, mean, std),
        "mask": torch.from_numpy(np.ascontiguousarray(sample.mask)).long(),
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
    """Horizontal flip with probability p (image, mask, weight and instances together)."""

    def __init__(self, p: float = 0.5, seed: int | None = None):
        self.p = p
        self.rng = np.random.default_rng(seed)

    def __call__(self, s: Sample) -> Sample:
        if self.rng.random() >= self.p:
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
