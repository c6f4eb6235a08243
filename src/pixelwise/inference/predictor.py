"""Inference on single images of any size: whole-image or overlapping tiles, optional
horizontal-flip test-time augmentation, optional uncertainty.

Every input goes through the shared :func:`pixelwise.data.transforms.preprocess` with the
checkpoint's normalisation, exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.data.transforms import IMAGENET_MEAN, IMAGENET_STD, preprocess
from pixelwise.models._utils import forward_logits


@dataclass
class Prediction:
    """mask: uint8[H, W] class ids; probs: float32 Tensor[C, H, W];
    uncertainty: float32[H, W] (predictive entropy in nats) when asked for."""

    mask: np.ndarray
    probs: torch.Tensor
    uncertainty: np.ndarray | None = None


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``size`` with step ``stride``; the last
    tile is flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def _tile_weight(tile_h: int, tile_w: int) -> torch.Tensor:
    """Tensor[h, w]: a smooth window (Hann, floored at 0.1) so tile seams blend without steps."""
    wy = torch.hann_window(tile_h + 2, periodic=False)[1:-1].clamp_min(0.1)
    wx = torch.hann_window(tile_w + 2, periodic=False)[1:-1].clamp_min(0.1)
    return wy[:, None] * wx[None, :]


class Predictor:
    """Semantic segmentation of single images with a trained model.

    >>> p = Predictor.from_checkpoint("runs/demo/best.safetensors")
    >>> pred = p.predict(image)          # image: uint8[H, W, 3]
    >>> pred.mask.shape == image.shape[:2]
    """

    def __init__(self, model: nn.Module, meta: dict | None = None, device: str | torch.device = "cpu",
                 tile: int | None = None, overlap: float = 0.25, tta: bool = False):
        if tile is not None and tile < 16:
            raise ValueError(f"tile must be at least 16 pixels, got {tile}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.meta = meta or {}
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tile, self.overlap, self.tta = tile, overlap, tta
        self._mc_samples = 0
        self.mean = tuple(self.meta.get("mean", IMAGENET_MEAN))
        self.std = tuple(self.meta.get("std", IMAGENET_STD))
        self.class_names = self.meta.get("class_names") or [str(i) for i in range(self.meta.get("num_classes", 0))]
        from pixelwise.data.palette import default_palette

        self.palette = [tuple(c) for c in self.meta.get("palette") or default_palette(max(len(self.class_names), 1))]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> Predictor:
        from pixelwise.engine.checkpoint import load_checkpoint

        model, meta = load_checkpoint(path, device)
        return cls(model, meta, device, **kwargs)

    @property
    def task(self) -> str:
        return self.meta.get("task", "semantic")

    def _single_probs(self, x: torch.Tensor) -> torch.Tensor:
        if self._mc_samples:
            from pixelwise.models.segnet import mc_predict

            return mc_predict(self.model, x, self._mc_samples, measure="entropy")[0]
        return F.softmax(forward_logits(self.model, x), 1)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[1, 3, H, W] -> probabilities Tensor[1, C, H, W] (averaged with the flip for TTA)."""
        p = self._single_probs(x)
        if self.tta:
            p = (p + self._single_probs(x.flip(-1)).flip(-1)) / 2
        return p

    def _tiled_probs(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = self.tile
        if t is None or (h <= t and w <= t):
            return self._probs(x)
        th, tw = min(t, h), min(t, w)
        stride_h = max(1, int(th * (1 - self.overlap)))
        stride_w = max(1, int(tw * (1 - self.overlap)))
        weight = _tile_weight(th, tw).to(x.device)
        acc = norm = None
        for y in tile_starts(h, th, stride_h):
            for x0 in tile_starts(w, tw, stride_w):
                p = self._probs(x[..., y : y + th, x0 : x0 + tw]) * weight
                if acc is None:
                    acc = x.new_zeros((1, p.shape[1], h, w))
                    norm = x.new_zeros((1, 1, h, w))
                acc[..., y : y + th, x0 : x0 + tw] += p
                norm[..., y : y + th, x0 : x0 + tw] += weight
        return acc / norm

    @torch.no_grad()
    def predict_instances(self, image: np.ndarray, score_thresh: float = 0.5) -> dict[str, torch.Tensor]:
        """Instance models: uint8[H, W, 3] -> ``{"boxes" Float[D, 4], "labels" Int64[D], "scores" Float[D],
        "masks" Bool[D, H, W]}`` on the CPU, detections with score >= ``score_thresh``, by decreasing
        score (masks thresholded at 0.5, as in COCO evaluation)."""
        if self.task != "instance":
            raise ValueError("predict_instances needs an instance-segmentation model")
        x = preprocess(image, self.mean, self.std).to(self.device)
        det = {k: v.detach().cpu() for k, v in self.model([x])[0].items()}
        keep = det["scores"] >= score_thresh
        order = det["scores"][keep].argsort(descending=True)
        out = {k: v[keep][order] for k, v in det.items()}
        masks = out["masks"]
        out["masks"] = (masks[:, 0] if masks.dim() == 4 else masks) >= 0.5
        return out

    @torch.no_grad()
    def predict_probs(self, image: np.ndarray) -> torch.Tensor:
        """uint8[H, W, 3] -> class probabilities float32 Tensor[C, H, W] on the CPU."""
        x = preprocess(image, self.mean, self.std).unsqueeze(0).to(self.device)
        return self._tiled_probs(x)[0].float().cpu()

    @torch.no_grad()
    def predict(self, image: np.ndarray, uncertainty: bool = False, mc_samples: int = 8) -> Prediction:
        """uint8[H, W, 3] -> :class:`Prediction` at the input's size.

        With ``uncertainty``, models with dropout (Bayesian SegNet) are sampled ``mc_samples``
        times with dropout on (Monte-Carlo dropout) and the mean probabilities are used; the
        uncertainty is the predictive entropy of the (mean) probabilities."""
        self._mc_samples = mc_samples if uncertainty and _has_dropout(self.model) else 0
        try:
            probs = self.predict_probs(image)
        finally:
            self._mc_samples = 0
        mask = probs.argmax(0).numpy().astype(np.uint8)
        unc = None
        if uncertainty:
            unc = (-(probs * probs.clamp_min(1e-12).log()).sum(0)).numpy().astype(np.float32)
        return Prediction(mask=mask, probs=probs, uncertainty=unc)


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
