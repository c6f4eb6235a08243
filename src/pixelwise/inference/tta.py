"""Test-time augmentation: average the class probabilities over transformed copies of the input.

Each mode is a list of transforms of ``Tensor[N, C, H, W]``, each a pair (forward, inverse):
``forward`` makes the copy the model sees, ``inverse`` brings the model's probabilities for it back
onto the input's pixel grid. The modes:

- ``flip``: the input and its horizontal mirror (2 passes);
- ``d4``: the 8 rotations and flips of the square (exact on the pixel grid; 8 passes);
- ``ms``: DeepLab's multi-scale inference (Chen et al., "Rethinking Atrous Convolution", 2017,
  arXiv:1706.05587: scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, each with its mirror; 12 passes). Each copy is the input
  resized bilinearly to ``round(H * s) x round(W * s)``; its probabilities are resized bilinearly back
  to ``H x W`` (DeepLab resizes logits and then takes the softmax; here the model's probabilities are
  resized, so that every mode averages what the predictor's one model call returns).

Under tiling a mode applies to each tile's window (core plus context), see
:class:`pixelwise.inference.predictor.SemanticPredictor`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pixelwise.preprocess import upsample_probs

Forward = Callable[[Tensor], Tensor]
Inverse = Callable[[Tensor, tuple[int, int]], Tensor]  # (probabilities, the input's (H, W)) -> on the input's grid
Transform = tuple[Forward, Inverse]

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _rot(k: int, flip: bool) -> Transform:
    def forward(x: Tensor) -> Tensor:
        x = x.flip(-1) if flip else x
        return x.rot90(k, dims=(-2, -1)) if k else x

    def inverse(x: Tensor, size: tuple[int, int]) -> Tensor:
        x = x.rot90(-k, dims=(-2, -1)) if k else x
        return x.flip(-1) if flip else x

    return forward, inverse


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(round(H * scale), round(W * scale))``, halves rounded up, at least 1."""
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


def _scale(scale: float, flip: bool) -> Transform:
    def forward(x: Tensor) -> Tensor:
        x = upsample_probs(x, scaled_size((x.shape[-2], x.shape[-1]), scale))
        return x.flip(-1) if flip else x

    def inverse(p: Tensor, size: tuple[int, int]) -> Tensor:
        return upsample_probs(p.flip(-1) if flip else p, size)

    return forward, inverse


TTA_MODES: dict[str, list[Transform]] = {
    "flip": [_rot(0, False), _rot(0, True)],  # the image and its horizontal mirror
    "d4": [_rot(k, f) for f in (False, True) for k in range(4)],  # the 8 rotations and flips of the square
    "ms": [_scale(s, f) for s in MS_SCALES for f in (False, True)],  # DeepLab's scales, each with its mirror
}


def tta_probs(probs_fn: Callable[[Tensor], Tensor], x: Tensor, mode: str | None) -> Tensor:
    """Mean of ``inverse(probs_fn(forward(x)))`` over the transforms of ``mode`` (None: ``probs_fn(x)``)."""
    if mode is None:
        return probs_fn(x)
    size = (x.shape[-2], x.shape[-1])
    transforms = TTA_MODES[mode]
    total = None
    for forward, inverse in transforms:
        p = inverse(probs_fn(forward(x)), size)
        total = p if total is None else total + p
    assert total is not None
    return total / len(transforms)
