"""Test-time augmentation: average the class probabilities over transformed copies of the input.

Each mode is a list of invertible transforms of ``Tensor[N, C, H, W]`` (flips and rotations by
multiples of 90 degrees, exact on the pixel grid), applied to the input and undone on the
probabilities before averaging.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Transform = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]  # (forward, inverse)


def _rot(k: int, flip: bool) -> Transform:
    def forward(x: Tensor) -> Tensor:
        x = x.flip(-1) if flip else x
        return x.rot90(k, dims=(-2, -1)) if k else x

    def inverse(x: Tensor) -> Tensor:
        x = x.rot90(-k, dims=(-2, -1)) if k else x
        return x.flip(-1) if flip else x

    return forward, inverse


TTA_MODES: dict[str, list[Transform]] = {
    "flip": [_rot(0, False), _rot(0, True)],  # the image and its horizontal mirror
    "d4": [_rot(k, f) for f in (False, True) for k in range(4)],  # the 8 rotations and flips of the square
}


def tta_probs(probs_fn: Callable[[Tensor], Tensor], x: Tensor, mode: str | None) -> Tensor:
    """Mean of ``inverse(probs_fn(forward(x)))`` over the transforms of ``mode`` (None: ``probs_fn(x)``)."""
    if mode is None:
        return probs_fn(x)
    transforms = TTA_MODES[mode]
    total = None
    for forward, inverse in transforms:
        p = inverse(probs_fn(forward(x)))
        total = p if total is None else total + p
    assert total is not None
    return total / len(transforms)
