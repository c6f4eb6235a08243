"""Test-time augmentation against averages computed by hand, alone and inside tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.cli import TTA_CHOICES
from pixelwise.inference.predictor import SemanticPredictor
from pixelwise.inference.tiling import model_geometry, plan_tiles
from pixelwise.inference.tta import MS_SCALES, TTA_MODES, scaled_size


@pytest.fixture(scope="module")
def model():
    """3x3 convolutions: neither flip- nor scale-equivariant, so every copy counts."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()


def _probs(model, x):
    with torch.no_grad():
        return F.softmax(model(x), 1)


def _resize(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def hand_tta(model, x, mode):
    """The average the mode promises, written out copy by copy."""
    h, w = x.shape[-2:]
    copies = []
    if mode == "flip":
        copies = [_probs(model, x), _probs(model, x.flip(-1)).flip(-1)]
    elif mode == "d4":
        for flip in (False, True):
            xf = x.flip(-1) if flip else x
            for k in range(4):
                p = _probs(model, xf.rot90(k, (-2, -1))).rot90(-k, (-2, -1))
                copies.append(p.flip(-1) if flip else p)
    elif mode == "ms":
        assert MS_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # DeepLab's set
        for s in MS_SCALES:
            xs = _resize(x, (int(h * s + 0.5), int(w * s + 0.5)))
            copies.append(_resize(_probs(model, xs), (h, w)))
            copies.append(_resize(_probs(model, xs.flip(-1)).flip(-1), (h, w)))
    return sum(copies) / len(copies), len(copies)


def test_cli_offers_every_mode():
    assert TTA_CHOICES == list(TTA_MODES) == ["flip", "d4", "ms"]


@pytest.mark.parametrize("mode, copies", [("flip", 2), ("d4", 8), ("ms", 12)])
def test_whole_image_tta_is_the_hand_computed_average(model, mode, copies):
    image = np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8)
    p = SemanticPredictor(model, {"num_classes": 4}, tta=mode)
    want, n = hand_tta(model, p.preprocess(image), mode)
    assert n == copies == len(TTA_MODES[mode])
    got = p.predict_probs(image)
    torch.testing.assert_close(got, want[0], rtol=0, atol=1e-6)
    plain = SemanticPredictor(model, {"num_classes": 4}).predict_probs(image)
    assert (got - plain).abs().max() > 1e-3  # the copies changed something


@pytest.mark.parametrize("mode", ["flip", "ms"])
def test_tta_applies_to_each_tile_window(model, mode):
    """Under tiling, each core's probabilities are the TTA average over its window (core plus
    real context), cut to the core; where the last core, flush with the image's end, overlaps the
    one before, the two are averaged."""
    image = np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    p = SemanticPredictor(model, {"num_classes": 4}, tile=32, overlap=0, tta=mode)
    x = p.preprocess(image)
    total, count = torch.zeros(4, 70, 90), torch.zeros(70, 90)
    plan = plan_tiles(70, 90, 32, 0.0, *model_geometry(model))
    assert len(plan) == 9 and plan.rows[-1].start == 38  # rows 38..63 are in two cores
    for r in plan.rows:
        for c in plan.cols:
            window, _ = hand_tta(model, x[..., r.window_start : r.window_stop, c.window_start : c.window_stop], mode)
            core = window[0, :, r.start - r.window_start : r.stop - r.window_start,
                          c.start - c.window_start : c.stop - c.window_start]
            total[:, r.start : r.stop, c.start : c.stop] += core
            count[r.start : r.stop, c.start : c.stop] += 1
    torch.testing.assert_close(p.predict_probs(image), total / count, rtol=0, atol=1e-6)


def test_scaled_size_rounds_halves_up_and_keeps_at_least_one_pixel():
    # by hand: 37 * 0.5 = 18.5 -> 19, 50 * 0.75 = 37.5 -> 38; 3 * 0.1 = 0.3 rounds to 0, kept at 1
    assert scaled_size((37, 50), 0.5) == (19, 25)
    assert scaled_size((37, 50), 0.75) == (28, 38)
    assert scaled_size((1, 3), 0.1) == (1, 1) and scaled_size((2, 1), 0.2) == (1, 1)
