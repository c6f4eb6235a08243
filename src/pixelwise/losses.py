"""Loss functions: pure functions with shapes in their docstrings.

Every loss takes raw logits ``Tensor[N, C, H, W]`` and an int64 target ``Tensor[N, H, W]`` whose
pixels equal to ``ignore_index`` (255) take no part. All return a scalar tensor.
:class:`LossSpec` names a training loss and :func:`combined_loss` applies it to a model's main
and auxiliary outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pixelwise.sample import IGNORE_INDEX


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) -> float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _weight_norm(target: torch.Tensor, valid: torch.Tensor, num_classes: int,
                 class_weights: torch.Tensor | None) -> torch.Tensor:
    """Tensor[N, H, W] per-pixel class weight (1 without weights), 0 at ignored pixels."""
    if class_weights is None:
        return valid.to(torch.float32)
    return class_weights[target.clamp(0, num_classes - 1)] * valid


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None,
                  pixel_weights: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel-wise cross-entropy.

    logits: Tensor[N, C, H, W]; target: Int64[N, H, W] with ``ignore_index`` for ignored pixels;
    class_weights: Tensor[C] (e.g. median-frequency weights); pixel_weights: Tensor[N, H, W]
    (e.g. the U-Net boundary map). Returns ``sum_i w_i * pw_i * -log p_i(y_i) / sum_i w_i`` over
    non-ignored pixels i, where ``w_i`` is the class weight of ``y_i`` (``F.cross_entropy``'s
    normalisation; the pixel weights scale the numerator only), and 0 (with zero gradients) for a
    batch where no pixel counts (all ignored, or only classes of weight 0), where
    ``F.cross_entropy``'s mean is 0/0 = NaN and would stop training as if it had diverged.
    """
    logits = _upcast(logits)
    if class_weights is not None:
        class_weights = class_weights.to(logits.dtype)
    per_pixel = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index,
                                reduction="none")
    if pixel_weights is not None:
        per_pixel = per_pixel * pixel_weights
    norm = _weight_norm(target, target != ignore_index, logits.shape[1], class_weights)
    return per_pixel.sum() / norm.sum().clamp_min(1e-12)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               class_weights: torch.Tensor | None = None, pixel_weights: torch.Tensor | None = None,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): ``-(1 - p_t) ** gamma * log p_t`` per pixel, reduced exactly
    like :func:`cross_entropy` (so ``gamma=0`` *is* cross-entropy, with the same weights).

    logits: Tensor[N, C, H, W]; target: Int64[N, H, W]; class_weights: Tensor[C] (the alpha
    term); pixel_weights: Tensor[N, H, W]. -> scalar.
    """
    valid = target != ignore_index
    safe = target.clamp(0, logits.shape[1] - 1).where(valid, torch.zeros_like(target))
    logp = F.log_softmax(_upcast(logits), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)  # [N, H, W]
    # 1 - p_t clamped above 0: its power's derivative is infinite at 0 for gamma < 1, and a pixel
    # predicted with float certainty would get inf * 0 = NaN gradients
    per_pixel = -((1 - logp.exp()).clamp_min(torch.finfo(logp.dtype).tiny) ** gamma) * logp if gamma else -logp
    w = _weight_norm(safe, valid, logits.shape[1], class_weights)
    num = per_pixel * w if pixel_weights is None else per_pixel * w * pixel_weights
    return num.sum() / w.sum().clamp_min(1e-12)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Soft Dice loss over the whole batch: ``1 - mean_c (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)``
    with softmax probabilities ``p`` and one-hot targets ``g``, summed over all non-ignored
    pixels of the batch. The mean runs over the classes present in the target (absent classes
    would only add a constant-ish term that pushes their probability to 0 on its own).

    logits: Tensor[N, C, H, W]; target: Int64[N, H, W]. -> scalar in [0, 1].
    """
    c = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # [N, 1, H, W]
    probs = F.softmax(_upcast(logits), dim=1) * valid
    onehot = F.one_hot(target.clamp(0, c - 1) * valid.squeeze(1), c).permute(0, 3, 1, 2).to(probs.dtype) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    card = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (card + smooth)  # [C]
    present = onehot.sum(dims) > 0
    if not present.any():
        return (probs.sum() * 0).reshape(())
    return 1 - dice[present].mean()


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss (Berman et al. 2018, Alg. 1).

    gt_sorted: Float[P] ground-truth indicator (0/1) of the pixels sorted by decreasing error.
    -> Float[P]: ``g_i = J(pi_1..pi_i) - J(pi_1..pi_{i-1})`` where ``J(M) = 1 - |F \\ M| / |F u M|``
    is the Jaccard loss when the pixels in M are wrong and F is the foreground.
    """
    total = gt_sorted.sum()
    intersection = total - gt_sorted.cumsum(0)
    union = total + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   classes: str = "present") -> torch.Tensor:
    """Lovasz-softmax loss (Berman, Triki, Blaschko, CVPR 2018), computed over the whole batch.

    For each class c: pixel errors ``m_i(c) = |[y_i = c] - p_i(c)|`` with softmax ``p``; the loss
    of c is the Lovasz extension of the Jaccard loss at ``m(c)``: ``sum_i m_(i) g_i`` with the
    errors sorted decreasingly and ``g`` from :func:`lovasz_grad`. The result is the mean over
    classes present in the target (``classes="present"``) or over all classes (``"all"``). For
    one-hot ``p`` it equals 1 - IoU averaged over those classes.

    logits: Tensor[N, C, H, W]; target: Int64[N, H, W]. -> scalar.
    """
    c = logits.shape[1]
    probs = F.softmax(_upcast(logits), dim=1).permute(0, 2, 3, 1).reshape(-1, c)  # [P, C]
    labels = target.reshape(-1)
    keep = labels != ignore_index
    probs, labels = probs[keep], labels[keep]
    losses = []
    for k in range(c):
        fg = (labels == k).to(probs.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probs[:, k]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[order])))
    if not losses:  # nothing labelled: 0, joined to the graph (the float32 probabilities: a half sum overflows)
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce",
                      class_weights: torch.Tensor | None = None, pixel_weights: torch.Tensor | None = None,
                      focal_gamma: float = 2.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The loss named by ``kind``: ``ce | dice | focal | lovasz | ce+dice | ce+lovasz`` (the last two:
    the cross-entropy plus the set-level term, unscaled).

    Class weights and per-pixel weights apply to the pixel-wise terms (ce, focal); dice and
    lovasz are set-level losses and ignore them. logits: Tensor[N, C, H, W]; target: Int64[N, H, W].
    """
    if kind == "ce":
        return cross_entropy(logits, target, class_weights, pixel_weights, ignore_index)
    if kind == "focal":
        return focal_loss(logits, target, focal_gamma, class_weights, pixel_weights, ignore_index)
    if kind == "dice":
        return dice_loss(logits, target, ignore_index=ignore_index)
    if kind == "lovasz":
        return lovasz_softmax(logits, target, ignore_index)
    if kind in ("ce+dice", "ce+lovasz"):
        return (cross_entropy(logits, target, class_weights, pixel_weights, ignore_index)
                + segmentation_loss(logits, target, kind.removeprefix("ce+"), ignore_index=ignore_index))
    raise ValueError(f"unknown loss {kind!r}; choose ce, dice, focal, lovasz, ce+dice or ce+lovasz")


@dataclass(frozen=True, eq=False)
class LossSpec:
    """A training loss: ``kind`` (``ce | dice | focal | lovasz | ce+dice | ce+lovasz``, see
    :func:`segmentation_loss`), class weights ``Tensor[C]`` or None, the focal exponent and the
    weight of an auxiliary head's loss."""

    kind: str = "ce"
    class_weights: torch.Tensor | None = None
    focal_gamma: float = 2.0
    aux_weight: float = 0.4


def combined_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor, spec: LossSpec,
                  pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``spec.kind`` on ``outputs["out"]`` plus ``spec.aux_weight`` times the same loss on
    ``outputs["aux"]`` when the model has an auxiliary head (the recipe of torchvision's FCN/DeepLab
    references, whose weight is 0.5; the default 0.4 is PSPNet's, Zhao et al., arXiv:1612.01105).

    outputs: ``{"out": Tensor[N, C, H, W][, "aux": Tensor[N, C, H, W]]}`` (logits);
    target: Int64[N, H, W]; pixel_weights: Tensor[N, H, W] or None. -> scalar.
    """
    loss = segmentation_loss(outputs["out"], target, spec.kind, spec.class_weights, pixel_weights, spec.focal_gamma)
    if "aux" in outputs:
        loss = loss + spec.aux_weight * segmentation_loss(outputs["aux"], target, spec.kind, spec.class_weights,
                                                          pixel_weights, spec.focal_gamma)
    return loss
