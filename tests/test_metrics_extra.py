"""BF score and ISBI 2012 metrics vs hand-computed cases and naive (loop) reference implementations."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from pixelwise.metrics import (
    BFMeter,
    BoundaryIoUMeter,
    ChallengeMeter,
    RandMeter,
    ThresholdPixelMeter,
    boundary_band,
    boundary_f1,
    boundary_width,
    class_boundary,
    confusion_matrix,
    image_bf_scores,
    image_boundary_counts,
    label_components,
    pixel_error,
    rand_counts,
    rand_error_over_thresholds,
    rand_scores,
)

# ---------------------------------------------------------------------------------------------
# naive references: plain loops, no scipy


def naive_boundary(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and not mask[yy, xx]:
                    out[y, x] = True
    return out


def naive_bf(pred: np.ndarray, target: np.ndarray, num_classes: int, tol_frac: float = 0.0075,
             ignore: int = 255) -> dict[int, float]:
    h, w = target.shape
    tol = tol_frac * math.sqrt(h * h + w * w)
    pred = pred.copy()
    pred[target == ignore] = ignore
    out = {}
    for c in range(num_classes):
        if not (target == c).any():
            continue
        bp = list(zip(*np.nonzero(naive_boundary(pred == c))))
        bg = list(zip(*np.nonzero(naive_boundary(target == c))))
        if not bp and not bg:
            out[c] = 1.0
            continue
        if not bp or not bg:
            out[c] = 0.0
            continue

        def matched(src, dst):
            return sum(1 for (y, x) in src if min(math.hypot(y - v, x - u) for (v, u) in dst) <= tol)

        p = matched(bp, bg) / len(bp)
        r = matched(bg, bp) / len(bg)
        out[c] = 2 * p * r / (p + r) if p + r else 0.0
    return out


def naive_components(mask: np.ndarray) -> np.ndarray:
    """4-connected flood fill, labels 1..K."""
    h, w = mask.shape
    lab = np.zeros((h, w), dtype=np.int64)
    k = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and lab[y, x] == 0:
                k += 1
                lab[y, x] = k
                queue = deque([(y, x)])
                while queue:
                    cy, cx = queue.popleft()
                    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                        yy, xx = cy + dy, cx + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and lab[yy, xx] == 0:
                            lab[yy, xx] = k
                            queue.append((yy, xx))
    return lab


def naive_rand_counts(pred: np.ndarray, target: np.ndarray, fg: int = 1) -> tuple[int, int, int]:
    """Count ordered pixel pairs (self-pairs included) over ground-truth foreground pixels."""
    g = naive_components(target == fg)
    p = naive_components(pred == fg)
    pts = list(zip(*np.nonzero(g)))
    ab = a = b = 0
    for i, (y1, x1) in enumerate(pts):
        for j, (y2, x2) in enumerate(pts):
            same_g = g[y1, x1] == g[y2, x2]
            same_p = i == j or (p[y1, x1] != 0 and p[y1, x1] == p[y2, x2])
            ab += same_g and same_p
            a += same_g
            b += same_p
    return ab, a, b


def blocky(rng, shape, classes, cell):
    """Random piecewise-constant label map (blocks of ``cell`` pixels) with some noise."""
    small = rng.integers(0, classes, (shape[0] // cell + 1, shape[1] // cell + 1))
    out = np.kron(small, np.ones((cell, cell), dtype=np.int64))[: shape[0], : shape[1]]
    flip = rng.random(shape) < 0.05
    out[flip] = rng.integers(0, classes, int(flip.sum()))
    return out


# ---------------------------------------------------------------------------------------------
# BF score


def test_class_boundary_matches_naive_and_ignores_image_border():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((13, 17)) < 0.5
        assert np.array_equal(class_boundary(m), naive_boundary(m))
    assert not class_boundary(np.ones((5, 6), bool)).any()
    square = np.zeros((6, 6), bool)
    square[1:5, 1:5] = True
    expected = square.copy()
    expected[2:4, 2:4] = False
    assert np.array_equal(class_boundary(square), expected)


def test_bf_hand_computed_step():
    # Ground truth: class 1 on rows 0-9, class 0 on rows 10-19 of a 20x20 image.
    # Prediction: the boundary is moved 3 rows down on columns 10-19.
    # Per class: 22 predicted boundary pixels of which 11 lie within 1 px of the true boundary,
    # 11 of the 20 true boundary pixels are found -> BF = 2*11 / (22 + 20) = 11/21.
    target = np.zeros((20, 20), np.int64)
    target[:10] = 1
    pred = target.copy()
    pred[10:13, 10:] = 1
    tol = 1.0 / math.hypot(20, 20)  # exactly one pixel
    scores = image_bf_scores(pred, target, 2, tolerance=tol)
    assert scores == pytest.approx({0: 11 / 21, 1: 11 / 21})
    # with the SegNet tolerance (0.21 px here) only exact boundary pixels count: 10/22 and 10/20
    strict = image_bf_scores(pred, target, 2)
    assert strict == pytest.approx({0: 2 * 10 / 42, 1: 2 * 10 / 42})


def test_bf_perfect_shift_and_tolerance():
    target = np.zeros((40, 60), np.int64)
    target[:, 30:] = 1
    assert image_bf_scores(target, target, 2) == {0: 1.0, 1: 1.0}
    shifted = np.zeros_like(target)
    shifted[:, 28:] = 1  # 2 px off; default tolerance 0.0075 * 72.1 = 0.54 px
    assert image_bf_scores(shifted, target, 2) == {0: 0.0, 1: 0.0}
    assert image_bf_scores(shifted, target, 2, tolerance=2.0 / math.hypot(40, 60)) == {0: 1.0, 1: 1.0}


def test_bf_edge_cases():
    t = np.zeros((8, 8), np.int64)
    assert boundary_f1(np.zeros((8, 8), bool), np.zeros((8, 8), bool), 1.0) == 1.0
    one = np.zeros((8, 8), bool)
    one[3, 3] = True
    assert boundary_f1(one, np.zeros((8, 8), bool), 1.0) == 0.0
    assert boundary_f1(np.zeros((8, 8), bool), one, 1.0) == 0.0
    # a class only in the prediction is not scored; the true class loses its (empty) boundary match
    pred = t.copy()
    pred[2:5, 2:5] = 2
    assert image_bf_scores(pred, t, 3) == {0: 0.0}
    # ignored pixels: the prediction there is replaced by the ignore label, so no penalty
    t2 = t.copy()
    t2[:, 4:] = 255
    p2 = np.where(np.arange(8)[None, :] >= 4, 1, 0).repeat(8, 0)
    assert image_bf_scores(p2, t2, 2) == {0: 1.0}
    assert image_bf_scores(t2, np.full((8, 8), 255), 2) == {}
    with pytest.raises(ValueError):
        image_bf_scores(t, t[:4], 2)
    with pytest.raises(ValueError):
        image_bf_scores(t, t + 5, 2)


@pytest.mark.parametrize("seed", range(3))
def test_bf_matches_naive(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
    target = blocky(rng, shape, 4, 6)
    target[rng.random(shape) < 0.03] = 255
    pred = blocky(rng, shape, 4, 6)
    pred = np.where(rng.random(shape) < 0.6, np.where(target == 255, 0, target), pred)
    tol = float(rng.choice([0.0075, 0.03, 0.06]))
    got = image_bf_scores(pred, target, 4, tolerance=tol)
    want = naive_bf(pred, target, 4, tol)
    assert got.keys() == want.keys()
    for c in want:
        assert got[c] == pytest.approx(want[c], abs=1e-12)


def test_bf_meter_means_over_images_then_classes():
    rng = np.random.default_rng(5)
    meter = BFMeter(3, tolerance=0.05)
    per_image, per_class = [], {0: [], 1: [], 2: []}
    for _ in range(3):
        t = blocky(rng, (24, 30), 3, 8)
        p = np.where(rng.random(t.shape) < 0.7, t, blocky(rng, (24, 30), 3, 8))
        ref = naive_bf(p, t, 3, 0.05)
        per_image.append(np.mean(list(ref.values())))
        for c, v in ref.items():
            per_class[c].append(v)
        assert meter.update(p, t) == pytest.approx(per_image[-1])  # the image's own score
    assert meter.update(np.zeros((5, 5), np.int64), np.full((5, 5), 255)) is None  # no valid pixels: skipped
    out = meter.compute()
    assert out["bf_score"] == pytest.approx(np.mean(per_image))
    assert out["per_class_bf"] == pytest.approx([np.mean(per_class[c]) for c in range(3)])
    assert BFMeter(2).compute() == {"bf_score": None, "per_class_bf": [None, None]}


# ---------------------------------------------------------------------------------------------
# ISBI 2012: Rand error and pixel error


def _two_cells() -> np.ndarray:
    t = np.ones((5, 5), np.int64)  # 1 = cell
    t[:, 2] = 0  # a membrane column splits two 10-pixel cells
    return t


def test_rand_hand_computed():
    t = _two_cells()
    # perfect: F = 1
    assert rand_counts(t, t) == (200.0, 200.0, 200.0)
    assert rand_scores(*rand_counts(t, t))["rand_error"] == 0.0
    # everything predicted as one cell (a merge): sum_b = 20^2 -> P = 1/2, R = 1, error 1/3
    merged = np.ones_like(t)
    assert rand_counts(merged, t) == (200.0, 200.0, 400.0)
    s = rand_scores(*rand_counts(merged, t))
    assert (s["rand_precision"], s["rand_recall"]) == (0.5, 1.0)
    assert s["rand_error"] == pytest.approx(1 / 3)
    # the left cell split by a predicted membrane row: 4 + 4 pixels + 2 singletons
    split = t.copy()
    split[2, :2] = 0
    assert rand_counts(split, t) == (134.0, 200.0, 134.0)
    s = rand_scores(*rand_counts(split, t))
    assert s["rand_precision"] == 1.0 and s["rand_recall"] == pytest.approx(0.67)
    assert s["rand_error"] == pytest.approx(1 - 268 / 334)


def test_rand_ignores_membrane_of_ground_truth_and_is_label_free():
    t = _two_cells()
    p = t.copy()
    p[:, 2] = 1  # filling the true membrane merges the cells in the prediction ...
    assert rand_counts(p, t) == (200.0, 200.0, 400.0)  # ... which is a merge error
    q = t.copy()
    q[0, 2] = 1  # predicting cell on one membrane pixel that touches both cells: same merge
    assert rand_counts(q, t) == (200.0, 200.0, 400.0)
    # relabelling classes is not the point, components are: a no-foreground ground truth is undefined
    assert rand_scores(*rand_counts(t, np.zeros_like(t)))["rand_error"] is None


def test_rand_void_pixels_do_not_join_predicted_cells():
    # two 2-pixel cells separated by a void (255) pixel, not by membrane; the prediction calls the
    # void pixel cell too. Void is pruned from both maps (default ignore_index), so the prediction
    # is two cells, not one merged cell: sum_ab = sum_a = sum_b = 2^2 + 2^2 = 8, error 0 -- the same
    # as predicting membrane there. (Counted, the void pixel would merge them: sum_b = 4^2 = 16.)
    target = np.array([[1, 1, 255, 1, 1]])
    pred = np.ones((1, 5), np.int64)
    assert rand_counts(pred, target) == (8.0, 8.0, 8.0)
    assert rand_counts(np.array([[1, 1, 0, 1, 1]]), target) == (8.0, 8.0, 8.0)
    meter = RandMeter()
    meter.update(pred, target)
    assert meter.compute()["rand_error"] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_rand_matches_naive_pair_counting(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(8, 14)), int(rng.integers(8, 14)))
    t = (rng.random(shape) < 0.7).astype(np.int64)
    p = np.where(rng.random(shape) < 0.8, t, 1 - t)
    assert np.array_equal(label_components(t == 1) > 0, naive_components(t == 1) > 0)
    assert rand_counts(p, t) == tuple(float(v) for v in naive_rand_counts(p, t))


def test_rand_meter_pools_counts_and_thresholds():
    rng = np.random.default_rng(7)
    targets = [(rng.random((10, 12)) < 0.7).astype(np.int64) for _ in range(3)]
    probs = [np.clip(t * 0.6 + rng.random(t.shape) * 0.5, 0, 1) for t in targets]
    meter = RandMeter()
    total = np.zeros(3)
    for t, pr in zip(targets, probs):
        pred = (pr > 0.5).astype(np.int64)
        meter.update(pred, t)
        total += naive_rand_counts(pred, t)
    assert meter.compute() == pytest.approx(rand_scores(*total))
    best = rand_error_over_thresholds(probs, targets, thresholds=(0.3, 0.5, 0.7))
    each = [rand_scores(*sum(np.array(naive_rand_counts((pr > th).astype(np.int64), t))
                             for pr, t in zip(probs, targets)))["rand_f"] for th in (0.3, 0.5, 0.7)]
    assert best["rand_f"] == pytest.approx(max(each))
    assert best["threshold"] == (0.3, 0.5, 0.7)[int(np.argmax(each))]
    # no foreground anywhere: F is undefined at every threshold, so nothing is "best"
    none = rand_error_over_thresholds([np.ones((4, 4))], [np.zeros((4, 4), np.int64)])
    assert none["rand_error"] is None and none["threshold"] is None


def test_pixel_error_is_share_of_wrong_pixels():
    t = _two_cells()
    p = t.copy()
    p[0, 0] = 0
    p[4, 4] = 0
    cm = confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), 2)
    assert pixel_error(cm) == pytest.approx(2 / 25)
    assert pixel_error(torch.zeros(2, 2, dtype=torch.int64)) is None


def test_leaderboard_pixel_error_is_one_minus_the_best_f_score_of_cell_pixels():
    """The challenge's "1 - maximal F-score of pixel similarity", by hand on a 2x3 image, then
    against a per-pixel loop on random maps pooled over images (ignored pixels left out)."""
    target = np.array([[1, 1, 0], [1, 0, 255]])
    prob = np.array([[0.9, 0.4, 0.6], [0.2, 0.1, 0.95]])
    meter = ThresholdPixelMeter(thresholds=(0.3, 0.5), foreground=1)
    meter.update(prob, target)
    # t=0.3: cells predicted at (0,0), (0,1), (0,2): TP 2, FP 1, FN 1 -> F = 4/6
    # t=0.5: predicted (0,0), (0,2): TP 1, FP 1, FN 2 -> F = 2/5
    assert meter.compute() == {"pixel_error": pytest.approx(1 - 4 / 6), "threshold": 0.3}

    rng = np.random.default_rng(3)
    targets = [np.where(rng.random((9, 11)) < 0.1, 255, (rng.random((9, 11)) < 0.7).astype(np.int64))
               for _ in range(3)]
    probs = [np.clip((t == 1) * 0.5 + rng.random(t.shape) * 0.6, 0, 1) for t in targets]
    meter = ThresholdPixelMeter()
    for pr, t in zip(probs, targets):
        meter.update(pr, t)
    best_f, best_t = -1.0, None
    for th in [k / 10 for k in range(10)]:
        tp = fp = fn = 0
        for pr, t in zip(probs, targets):
            for y in range(t.shape[0]):
                for x in range(t.shape[1]):
                    if t[y, x] == 255:
                        continue
                    cell, said = t[y, x] == 1, pr[y, x] > th
                    tp, fp, fn = tp + (cell and said), fp + (said and not cell), fn + (cell and not said)
        f = 2 * tp / (2 * tp + fp + fn)
        if f > best_f:
            best_f, best_t = f, th
    assert meter.compute() == {"pixel_error": pytest.approx(1 - best_f), "threshold": best_t}
    assert ThresholdPixelMeter().compute() == {"pixel_error": None, "threshold": None}


def test_challenge_meter_is_its_parts():
    rng = np.random.default_rng(4)
    targets = [(rng.random((12, 12)) < 0.7).astype(np.int64) for _ in range(2)]
    probs = [np.clip(t * 0.5 + rng.random(t.shape) * 0.6, 0, 1) for t in targets]
    meter, at_argmax, pixel = ChallengeMeter(), RandMeter(), ThresholdPixelMeter()
    for pr, t in zip(probs, targets):
        meter.update((pr > 0.5).astype(np.int64), pr, t)
        at_argmax.update((pr > 0.5).astype(np.int64), t)
        pixel.update(pr, t)
    got, best = meter.compute(), rand_error_over_thresholds(probs, targets)
    assert {k: got[k] for k in ("rand_error", "rand_precision", "rand_recall", "rand_f")} == at_argmax.compute()
    assert (got["rand_error_best"], got["rand_best_threshold"]) == (best["rand_error"], best["threshold"])
    assert (got["pixel_error_best"], got["pixel_best_threshold"]) == tuple(pixel.compute().values())


def test_bf_default_tolerance_is_three_quarters_percent_of_the_diagonal():
    # 100x100 image: diagonal 141.4 px, SegNet tolerance 0.0075 * 141.4 = 1.06 px (docs/metrics.md).
    # A vertical class edge moved by 1 px lies within it (BF 1 for both classes), one moved by 2 px
    # lies outside it (no boundary pixel matches: BF 0). Hand-derived, not from the implementation.
    target = np.zeros((100, 100), np.int64)
    target[:, 50:] = 1
    one_off, two_off = np.zeros_like(target), np.zeros_like(target)
    one_off[:, 49:] = 1
    two_off[:, 48:] = 1
    assert image_bf_scores(one_off, target, 2) == {0: 1.0, 1: 1.0}
    assert image_bf_scores(two_off, target, 2) == {0: 0.0, 1: 0.0}


def test_prediction_equal_to_num_classes_is_rejected():
    # class C does not exist: it must raise, not land in the next row of the flattened matrix
    with pytest.raises(ValueError, match="prediction has labels outside"):
        confusion_matrix(torch.tensor([2, 0]), torch.tensor([0, 0]), 2)
    with pytest.raises(ValueError, match="prediction has labels outside"):
        confusion_matrix(np.array([[1, 3]]), np.array([[0, 1]]), 3)


def test_rand_counts_reject_floating_prediction():
    # docstring of rand_counts: floating or boolean maps raise TypeError, the prediction too
    target = np.ones((4, 4), np.int64)
    with pytest.raises(TypeError, match="integer class labels"):
        rand_counts(np.full((4, 4), 0.9), target)
    with pytest.raises(TypeError, match="integer class labels"):
        rand_counts(np.ones((4, 4), bool), target)


def test_bf_rejects_a_batch_with_the_one_image_message():
    t = np.zeros((2, 8, 8), np.int64)
    with pytest.raises(ValueError, match="one image at a time"):
        image_bf_scores(t, t, 2)


def test_pixel_error_rejects_a_label_map():
    # a non-square [H, W] label map is not a confusion matrix
    with pytest.raises(ValueError, match="confusion matrix"):
        pixel_error(np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match="confusion matrix"):
        pixel_error(torch.zeros(5, dtype=torch.int64))


def test_rand_scores_of_a_single_pixel_cell():
    # one labelled pixel predicted as a cell: sum_ab = sum_a = sum_b = 1 -> P = R = F = 1, error 0
    assert rand_scores(1.0, 1.0, 1.0) == {"rand_precision": 1.0, "rand_recall": 1.0, "rand_f": 1.0,
                                          "rand_error": 0.0}
    target = np.zeros((3, 3), np.int64)
    target[1, 1] = 1
    assert rand_counts(target, target) == (1.0, 1.0, 1.0)


def test_negative_prediction_is_rejected():
    # -1 must raise, not be counted as class C-1 of the previous ground-truth row
    with pytest.raises(ValueError, match="prediction has labels outside"):
        confusion_matrix(torch.tensor([-1, 0]), torch.tensor([1, 0]), 2)


def test_threshold_rand_never_thresholds_above_0_9():
    # four one-pixel cells, probability 1 everywhere: every threshold 0.0..0.9 predicts one merged
    # cell: sum_ab = 4 (four singleton joints), sum_a = 4, sum_b = 4^2 = 16 -> P = 1/4, R = 1,
    # F = 0.4, error 0.6 at the first threshold. (A threshold of 1.0 would predict no cell at all
    # and score a perfect 0, which the challenge's 0.0..0.9 grid never does.)
    target = np.zeros((4, 4), np.int64)
    target[::2, ::2] = 1
    out = rand_error_over_thresholds([np.ones((4, 4))], [target])
    assert out["rand_error"] == pytest.approx(0.6) and out["threshold"] == 0.0


def test_threshold_rand_prunes_void_pixels_by_default():
    # the thresholded form of test_rand_void_pixels_do_not_join_predicted_cells: two 2-pixel cells
    # split by a void (255) pixel, probability 1 everywhere. With the default ignore_index the void
    # pixel joins nothing: error 0 at every threshold. (Counted, it merges the cells: sum_ab = 8,
    # sum_a = 8, sum_b = 16 -> P = 1/2, R = 1, F = 2/3, error 1/3.)
    target = np.array([[1, 1, 255, 1, 1]])
    out = rand_error_over_thresholds([np.ones((1, 5))], [target])
    assert out["rand_error"] == 0.0 and out["threshold"] == 0.0
    merged = rand_error_over_thresholds([np.ones((1, 5))], [target], ignore_index=254)
    assert merged["rand_error"] == pytest.approx(1 / 3)


def test_threshold_rand_with_class_0_as_the_cell_class():
    # foreground=0: the pixels under each threshold must become "not a cell", not class 0. Cells
    # 0 at columns 0-1 and 3-4, membrane 1 at column 2, whose probability of cell is 0: every
    # threshold 0.0..0.9 predicts the two cells exactly, error 0. (Were the membrane pixel called
    # class 0, the prediction would be one merged cell: F = 2/3, error 1/3, as above.)
    target = np.array([[0, 0, 1, 0, 0]])
    prob = np.array([[1.0, 1.0, 0.0, 1.0, 1.0]])
    out = rand_error_over_thresholds([prob], [target], foreground=0)
    assert out["rand_error"] == 0.0 and out["threshold"] == 0.0
    merged = rand_error_over_thresholds([np.ones((1, 5))], [target], foreground=0)
    assert merged["rand_error"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# Boundary IoU (Cheng et al., arXiv:2103.16562)


def _erosion_band(mask: np.ndarray, d: int) -> np.ndarray:
    """The reference implementation's mask_to_boundary: pad one zero pixel, erode d times with a 3x3
    square (OpenCV), subtract."""
    import cv2

    h, w = mask.shape
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1]
    return mask & ~eroded.astype(bool)


def test_boundary_band_of_a_square_by_hand_and_the_image_border_is_a_contour():
    m = np.zeros((11, 11), bool)
    m[2:9, 2:9] = True  # 7x7 square
    assert boundary_band(m, 1).sum() == 49 - 25 and boundary_band(m, 2).sum() == 49 - 9
    assert boundary_band(m, 3).sum() == 48 and boundary_band(m, 3)[5, 5] == 0  # the centre is 4 from outside
    assert boundary_band(m, 4).sum() == 49  # thinner than 2 * 4 + 1: all band
    assert not boundary_band(m, 1)[3:8, 3:8].any()
    full = np.ones((5, 6), bool)  # a class filling the image: its band runs along the image border
    assert boundary_band(full, 1).sum() == 30 - 3 * 4
    assert not boundary_band(np.zeros((4, 4), bool), 2).any()
    with pytest.raises(ValueError, match="at least 1"):
        boundary_band(m, 0)


@pytest.mark.parametrize("seed", range(4))
def test_boundary_band_matches_the_reference_erosion(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = np.kron(rng.random((h // 3 + 1, w // 3 + 1)) < 0.5, np.ones((3, 3), bool))[:h, :w]
        mask ^= rng.random((h, w)) < 0.03
        d = int(rng.integers(1, 6))
        assert np.array_equal(boundary_band(mask, d), _erosion_band(mask, d)), (h, w, d)


def test_boundary_width_is_two_percent_of_the_diagonal_rounded_and_at_least_one():
    assert boundary_width(360, 480) == 12  # 0.02 * 600
    assert boundary_width(300, 400) == 10
    assert boundary_width(20, 20) == 1  # 0.57 rounds to 1
    assert boundary_width(10, 10) == 1  # 0.28 would round to 0
    assert boundary_width(300, 400, dilation=0.05) == 25


def test_boundary_iou_meter_sums_bands_over_images_per_class():
    rng = np.random.default_rng(7)
    k = 3
    pairs = []
    for h, w in ((30, 40), (52, 61), (100, 120)):
        target = np.kron(rng.integers(0, k, (h // 6 + 1, w // 6 + 1)), np.ones((6, 6), int))[:h, :w]
        pred = np.where(rng.random((h, w)) < 0.15, rng.integers(0, k, (h, w)), target)
        target[rng.random((h, w)) < 0.05] = 255
        pairs.append((pred, target))
    meter = BoundaryIoUMeter(k)
    inter, union = np.zeros(k), np.zeros(k)
    for pred, target in pairs:
        alone = meter.update(pred, target)
        d = max(1, int(round(0.02 * math.hypot(*target.shape))))
        own = []
        for c in range(k):
            g, q = _erosion_band(target == c, d), _erosion_band((pred == c) & (target != 255), d)
            inter[c] += (g & q).sum()
            union[c] += (g | q).sum()
            own += [(g & q).sum() / (g | q).sum()] if (g | q).any() else []
        assert alone == pytest.approx(np.mean(own))  # the image's own Boundary IoU
    got = meter.compute()
    want = [inter[c] / union[c] for c in range(k)]
    assert got["per_class_boundary_iou"] == pytest.approx(want)
    assert got["boundary_iou"] == pytest.approx(sum(want) / k)
    assert 0.2 < got["boundary_iou"] < 0.95  # neither trivial nor perfect


def test_boundary_iou_absent_classes_void_and_a_perfect_prediction():
    target = np.zeros((20, 20), int)
    target[5:15, 5:15] = 1
    meter = BoundaryIoUMeter(4)
    meter.update(target, target)
    assert meter.compute() == {"boundary_iou": 1.0, "per_class_boundary_iou": [1.0, 1.0, None, None]}
    pred = target.copy()
    pred[0, 0] = 2  # a class only predicted: IoU 0, and it counts in the mean
    meter = BoundaryIoUMeter(4)
    meter.update(pred, target)
    got = meter.compute()
    assert got["per_class_boundary_iou"][2:] == [0.0, None] and got["boundary_iou"] < 1.0
    void = target.copy()
    void[8:12, 8:12] = 255  # what is predicted under void changes nothing
    a = image_boundary_counts(np.where(void == 255, 3, target), void, 4)
    b = image_boundary_counts(target, void, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and a[0][3] == a[1][3] == 0
    with pytest.raises(TypeError, match="integer class labels"):
        BoundaryIoUMeter(4).update(target.astype(np.float32), target)
    with pytest.raises(ValueError, match="one image at a time"):
        BoundaryIoUMeter(4).update(target[None], target[None])
    with pytest.raises(ValueError, match="outside 0..3"):
        BoundaryIoUMeter(4).update(np.full_like(target, 4), target)
