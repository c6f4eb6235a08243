"""Test-time averaging over the 8 rotations and flips of the square (``--tta d4``), the exact-grid
form of the U-Net paper's "averaged over 7 rotated versions of the input data" (Sec. 4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pixelwise import SemanticPredictor


def _symmetrise(conv: nn.Conv2d) -> None:
    """Make a conv's kernels invariant under the 8 symmetries of the square (mean over them)."""
    with torch.no_grad():
        w = conv.weight
        orbit = [torch.rot90(w if not f else w.flip(-1), k, dims=(-2, -1)) for f in (0, 1) for k in range(4)]
        w.copy_(torch.stack(orbit).mean(0))


class _Net(nn.Module):
    """conv 3x3 -> ReLU -> conv 3x3, zero padding: a small, non-trivial segmenter."""

    def __init__(self, symmetric: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 5, 3, padding=1)
        if symmetric:  # equivariant by construction: symmetric kernels, pointwise ReLU, symmetric padding
            _symmetrise(self.a)
            _symmetrise(self.b)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _predict(model, image, tta=None):
    return SemanticPredictor(model, {"num_classes": 5}, tta=tta).predict_probs(image).numpy()


def test_d4_averaging_leaves_an_equivariant_model_unchanged():
    image = np.random.default_rng(0).integers(0, 255, (33, 33, 3), dtype=np.uint8)
    model = _Net(symmetric=True).eval()
    plain = _predict(model, image)
    np.testing.assert_allclose(_predict(model, image, "d4"), plain, atol=1e-5)
    np.testing.assert_allclose(_predict(model, image, "flip"), plain, atol=1e-5)
    # it is equivariant: rotating the input rotates the prediction
    np.testing.assert_allclose(_predict(model, np.rot90(image).copy()), np.rot90(plain, axes=(1, 2)), atol=1e-5)


def test_d4_average_of_any_model_is_the_mean_over_the_8_symmetries_and_is_equivariant():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    model = _Net(symmetric=False).eval()
    got = _predict(model, image, "d4")
    expected = np.zeros_like(got)
    for flip in (False, True):
        for k in range(4):
            x = np.rot90(image[:, ::-1] if flip else image, k).copy()  # the transformed input
            p = np.rot90(_predict(model, x), -k, axes=(1, 2))  # its prediction, rotated back
            expected += p[:, :, ::-1] if flip else p
    np.testing.assert_allclose(got, expected / 8, atol=1e-5)
    assert np.abs(_predict(model, image) - got).max() > 1e-3  # the model itself is not symmetric
    # the average is: rotations and mirrors of the input give the same rotations of the output
    np.testing.assert_allclose(_predict(model, np.rot90(image).copy(), "d4"), np.rot90(got, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(_predict(model, image[:, ::-1].copy(), "d4"), got[:, :, ::-1], atol=1e-5)
