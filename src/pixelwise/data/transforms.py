"""Preprocessing shared by training, evaluation and prediction (augmentation presets live in
:mod:`pixelwise.data.augment`).

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
