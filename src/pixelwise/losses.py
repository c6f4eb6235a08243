"""Loss functions: pure functions with shapes in their docstrings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None,
                  pixel_weights: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel-wise cross-entropy.

    logits: Tensor[N, C, H, W]; target: Int64[N, H, W] with ``ignore_index`` for ignored pixels;
    class_weights: Tensor[C] (e.g. median-frequency weights); pixel_weights: Tensor[N, H, W]
    (e.g. the U-Net boundary map). Returns the scalar mean over non-ignored pixels, weighted like
    ``F.cross_entropy`` (normalised by the sum of the class weights of the counted pixels).
    """
    if pixel_weights is None:
        return F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index,
                                reduction="none")
    valid = target != ignore_index
    norm = torch.ones_like(per_pixel) if class_weights is None else class_weights[target.clamp(max=logits.shape[1] - 1)]
    denom = (norm * valid).sum().clamp_min(1e-12)
    return (per_pixel * pixel_weights).sum() / denom
