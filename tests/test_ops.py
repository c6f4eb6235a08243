"""pixelwise.ops against torchvision's fixtures and against naive loop implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import assert_matches, load_fixture
from pixelwise import ops
from pixelwise.ops import (
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
    MultiScaleRoIAlign,
    RoIAlign,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes_to_image,
    infer_scales,
    map_roi_levels,
    multiscale_roi_align,
    nms,
    pool_feature_table,
    remove_small_boxes,
    roi_align,
    roi_feature_table,
)

# ----------------------------------------------------------------------------- naive references


def _bilinear(feat: np.ndarray, y: float, x: float) -> np.ndarray:
    """One bilinear sample of ``feat[C, H, W]`` with torchvision's border rules (float64)."""
    _, h, w = feat.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_lo, x_lo = int(y), int(x)
    if y_lo >= h - 1:
        y_lo = y_hi = h - 1
        y = float(y_lo)
    else:
        y_hi = y_lo + 1
    if x_lo >= w - 1:
        x_lo = x_hi = w - 1
        x = float(x_lo)
    else:
        x_hi = x_lo + 1
    ly, lx = y - y_lo, x - x_lo
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * feat[:, y_lo, x_lo]
        + hy * lx * feat[:, y_lo, x_hi]
        + ly * hx * feat[:, y_hi, x_lo]
        + ly * lx * feat[:, y_hi, x_hi]
    )


def naive_roi_align(feat, rois, out_hw, scale, sampling_ratio, aligned) -> np.ndarray:
    """RoIAlign written from the definition with Python loops over boxes, bins and samples."""
    feat = np.asarray(feat, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    out_h, out_w = out_hw
    out = np.zeros((len(rois), feat.shape[1], out_h, out_w))
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois):
        x1, y1, x2, y2 = (v * scale - offset for v in (x1, y1, x2, y2))
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        g_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        g_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(g_h * g_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                acc = np.zeros(feat.shape[1])
                for iy in range(g_h):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / g_h
                    for ix in range(g_w):
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / g_w
                        acc += _bilinear(feat[int(b)], y, x)
                out[k, :, ph, pw] = acc / count
    return out


def naive_nms(boxes: np.ndarray, scores: np.ndarray, t: float) -> list[int]:
    """Greedy NMS: visit by (score desc, index asc); keep a box unless IoU > t with a kept box."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            iw = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            ih = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = iw * ih
            a_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            a_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            if inter / (a_i + a_j - inter) > t:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def numpy_nms(boxes: torch.Tensor, scores: torch.Tensor, t: float) -> list[int]:
    """The previous ``pixelwise.ops.nms`` (kept as a reference): the full IoU matrix in numpy, in the box
    dtype (float32 stays float32, anything else float64) against a double threshold, then a greedy pass
    over the sorted boxes; exact against torchvision's fixture, fast enough for a few thousand boxes."""
    order = torch.sort(scores, descending=True, stable=True).indices.numpy()
    b = boxes.numpy()[order]
    if b.dtype != np.float32:
        b = b.astype(np.float64)
    x1, y1, x2, y2 = (b[:, i] for i in range(4))
    area = (x2 - x1) * (y2 - y1)
    w = np.maximum(np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1), 0)
    h = np.maximum(np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1), 0)
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):
        over = inter / (area[:, None] + area - inter) > np.float64(t)
    suppressed = np.zeros(len(b), dtype=bool)
    keep = []
    for i in range(len(b)):
        if not suppressed[i]:
            keep.append(int(order[i]))
            suppressed[i + 1 :] |= over[i, i + 1 :]
    return keep


def numpy_batched_nms(boxes, scores, idxs, t) -> list[int]:
    """Per-category :func:`numpy_nms` on the original coordinates, merged by (score desc, index asc)."""
    keep = []
    for c in torch.unique(idxs):
        members = torch.where(idxs == c)[0]
        keep += [int(members[i]) for i in numpy_nms(boxes[members], scores[members], t)]
    return sorted(keep, key=lambda i: (-float(scores[i]), i))


def random_rois(gen: torch.Generator, k: int, n_img: int, h: int, w: int, scale: float) -> torch.Tensor:
    """Rois [K, 5] in image coordinates: many partly outside, some tiny, some degenerate."""
    cx = torch.rand(k, generator=gen) * (w + 6) - 3
    cy = torch.rand(k, generator=gen) * (h + 6) - 3
    bw = torch.rand(k, generator=gen) * w * 0.9
    bh = torch.rand(k, generator=gen) * h * 0.9
    bw[::7] = 0.3  # tiny
    bh[1::9] = 0.0  # zero height
    xyxy = torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), 1) / scale
    idx = torch.randint(0, n_img, (k, 1), generator=gen).double()
    return torch.cat((idx, xyxy.double()), 1)


# ----------------------------------------------------------------------------- roi_align


def test_roi_align_matches_torchvision_fixture():
    meta, arrays, _ = load_fixture("roi_align")
    features = torch.from_numpy(arrays["features"])
    assert len(meta["cases"]) == 8
    for case in meta["cases"]:
        rois = torch.from_numpy(arrays["rois"][case["rois_index"]])
        out = roi_align(features, rois, (7, 7), case["spatial_scale"], case["sampling_ratio"], case["aligned"])
        assert out.dtype == torch.float32
        assert_matches(out, arrays["output"][case["index"]])


def test_roi_align_fixture_box_kinds_are_not_trivial():
    """The fixture's zero-size aligned roi must give exactly 0 and fully-outside rois 0 too."""
    meta, arrays, _ = load_fixture("roi_align")
    assert "fully outside" in meta["box_kinds"]
    features = torch.from_numpy(arrays["features"])
    rois = torch.from_numpy(arrays["rois"][0])
    out = roi_align(features, rois, 7, 1.0, -1, True)
    assert torch.all(out[19] == 0)  # zero size, aligned: empty sampling grid
    assert torch.all(out[26:29] == 0)  # fully outside the map
    assert out[:10].abs().sum() > 0


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_roi_align_matches_naive_loops(aligned, sampling_ratio, scale):
    gen = torch.Generator().manual_seed(7 + int(aligned) + 2 * sampling_ratio)
    feat = torch.randn(2, 3, 11, 13, generator=gen, dtype=torch.float64)
    rois = random_rois(gen, 24, 2, 11, 13, scale)
    expected = naive_roi_align(feat, rois, (3, 4), scale, sampling_ratio, aligned)
    out64 = roi_align(feat, rois, (3, 4), scale, sampling_ratio, aligned)
    assert out64.dtype == torch.float64 and out64.shape == (24, 3, 3, 4)
    np.testing.assert_allclose(out64.numpy(), expected, rtol=1e-10, atol=1e-12)
    out32 = roi_align(feat.float(), rois.float(), (3, 4), scale, sampling_ratio, aligned)
    assert out32.dtype == torch.float32
    assert_matches(out32, expected)


def test_roi_align_adaptive_grid_for_large_boxes():
    """Boxes needing different adaptive grids (1x1 up to 8x5) in one call."""
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 2, 30, 40, generator=gen, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, 0.0, 0.0, 40.0, 30.0],
            [0, 2.0, 3.0, 4.0, 5.0],
            [0, 5.0, 1.0, 35.5, 28.0],
            [0, 10, 10, 10.5, 29],
        ],
        dtype=torch.float64,
    )
    for aligned in (False, True):
        expected = naive_roi_align(feat, rois, (4, 5), 1.0, -1, aligned)
        np.testing.assert_allclose(roi_align(feat, rois, (4, 5), 1.0, -1, aligned).numpy(), expected, atol=1e-12)


def test_roi_align_gradcheck():
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 1, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.6, 4.2, 3.9], [1, -1.5, 1.2, 2.7, 6.5], [1, 2.2, 0.1, 7.5, 3.3], [0, 1.0, 1.0, 1.0, 1.0]],
        dtype=torch.float64,
    )
    for sampling_ratio, aligned in [(2, False), (-1, True)]:
        assert torch.autograd.gradcheck(
            lambda f, sr=sampling_ratio, al=aligned: roi_align(f, rois, (2, 3), 0.9, sr, al), (feat,)
        )


def test_roi_align_box_formats_agree_and_module():
    gen = torch.Generator().manual_seed(1)
    feat = torch.randn(3, 4, 9, 9, generator=gen)
    per_image = [
        torch.tensor([[1.0, 1.0, 6.0, 5.0], [0.0, 2.0, 8.0, 8.5]]),
        torch.zeros(0, 4),
        torch.tensor([[3.0, 3.0, 7.0, 9.0]]),
    ]
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0], [0, 0.0, 2.0, 8.0, 8.5], [2, 3.0, 3.0, 7.0, 9.0]])
    a = roi_align(feat, per_image, 3, 1.0, 2)
    b = roi_align(feat, rois, (3, 3), 1.0, 2)
    assert a.shape == (3, 4, 3, 3)
    assert torch.equal(a, b)
    assert torch.equal(RoIAlign(3, 1.0, 2)(feat, rois), b)
    # image index matters: the same box on image 1 reads different values
    moved = rois.clone()
    moved[:, 0] = 1
    assert not torch.allclose(roi_align(feat, moved, 3, 1.0, 2), b)


def test_roi_align_empty_boxes():
    feat = torch.randn(2, 5, 8, 8, requires_grad=True)
    out = roi_align(feat, torch.zeros(0, 5), (3, 4))
    assert out.shape == (0, 5, 3, 4)
    out_list = roi_align(feat, [torch.zeros(0, 4), torch.zeros(0, 4)], 2)
    assert out_list.shape == (0, 5, 2, 2)
    out_list.sum().backward()
    assert feat.grad is None or torch.all(feat.grad == 0)
    # boxes whose sampling grid is empty (aligned, x2 <= x1) give zeros, and backward still works
    degenerate = torch.tensor([[0, 2.0, 2.0, 2.0, 2.0], [1, 3.0, 3.0, 1.0, 6.0]])
    out = roi_align(feat, degenerate, 2, 1.0, -1, aligned=True)
    assert out.shape == (2, 5, 2, 2) and torch.all(out == 0)
    out.sum().backward()


def test_roi_align_rejects_bad_input():
    feat = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        roi_align(feat, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="out of range"):
        roi_align(feat, torch.tensor([[1.0, 0, 0, 2, 2]]), 2)
    with pytest.raises(ValueError, match="N, C, H, W"):
        roi_align(feat[0], torch.tensor([[0.0, 0, 0, 2, 2]]), 2)


def test_roi_align_rejects_a_boxes_list_whose_elements_are_not_k_by_4_tensors():
    """A list holds one Tensor[K_i, 4] per image: a [K, 5] tensor (rows that already carry the image
    index), a plain list of numbers or an empty list is a ValueError naming the rule."""
    feat = torch.randn(1, 2, 8, 8)
    for boxes in ([torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]])], [[0.0, 0.0, 2.0, 2.0]], [torch.zeros(4)]):
        with pytest.raises(ValueError, match=r"each element of a boxes list must be a Tensor\[K_i, 4\]"):
            roi_align(feat, boxes, 2)
    with pytest.raises(ValueError, match="boxes list is empty"):
        roi_align(feat, [], 2)


# ----------------------------------------------------------------------------- multi-scale


def _msra_fixture():
    meta, arrays, _ = load_fixture("multiscale_roi_align")
    x = {str(i): torch.from_numpy(arrays[f"features.{i}"]) for i in range(4)}
    boxes = [torch.from_numpy(arrays["boxes.0"]), torch.from_numpy(arrays["boxes.1"])]
    sizes = [tuple(s) for s in arrays["image_sizes"].tolist()]
    return meta, arrays, x, boxes, sizes


def test_multiscale_roi_align_matches_torchvision_fixture():
    meta, arrays, x, boxes, sizes = _msra_fixture()
    pooler = MultiScaleRoIAlign(meta["kwargs"]["featmap_names"], meta["kwargs"]["output_size"], 2)
    out = pooler(x, boxes, sizes)
    assert_matches(out, arrays["output"])
    # same through the functional form
    assert torch.equal(multiscale_roi_align([x[k] for k in "0123"], boxes, sizes, 7, 2), out)


def test_multiscale_levels_and_scales_match_fixture():
    meta, arrays, x, boxes, sizes = _msra_fixture()
    scales = infer_scales([f.shape[-2:] for f in x.values()], sizes)
    assert scales == meta["inferred_scales"]
    levels = map_roi_levels(boxes, k_min=2, k_max=5)
    assert levels.dtype == torch.int64
    np.testing.assert_array_equal(levels.numpy(), arrays["levels"])
    assert set(levels.tolist()) == {0, 1, 2, 3}  # the fixture exercises every level


def test_multiscale_equals_per_level_roi_align():
    """One vectorised call == torchvision's algorithm: a roi_align per level on that level's boxes."""
    gen = torch.Generator().manual_seed(5)
    feats = [torch.randn(2, 3, 64 // 2**i, 48 // 2**i, generator=gen) for i in range(3)]
    sizes = [(256, 192), (240, 180)]
    boxes = []
    for _ in range(2):
        xy = torch.rand(12, 2, generator=gen) * 150
        wh = torch.rand(12, 2, generator=gen) ** 2 * 300 + 1
        boxes.append(torch.cat((xy, xy + wh), 1))
    out = multiscale_roi_align(feats, boxes, sizes, (5, 4), -1)
    scales = infer_scales([f.shape[-2:] for f in feats], sizes)
    assert scales == [0.25, 0.125, 0.0625]
    levels = map_roi_levels(boxes, 2, 4)
    assert len(set(levels.tolist())) == 3
    rois = torch.cat([torch.cat((torch.full((len(b), 1), float(i)), b), 1) for i, b in enumerate(boxes)])
    expected = torch.zeros_like(out)
    for lvl, (f, s) in enumerate(zip(feats, scales)):
        sel = torch.where(levels == lvl)[0]
        expected[sel] = roi_align(f, rois[sel], (5, 4), s, -1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_multiscale_over_one_map_pools_a_box_inverted_on_one_axis_as_roi_align_does():
    """With one feature map every box is pooled from it, as torchvision's single-level shortcut does,
    even a box of negative area (x2 < x1), whose FPN level would be NaN."""
    feat = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    boxes = [torch.tensor([[6.0, 1.0, 2.0, 5.0], [1.0, 1.0, 5.0, 7.0]])]
    out = multiscale_roi_align([feat], boxes, [(32, 32)], (2, 2), 2)
    torch.testing.assert_close(out, roi_align(feat, boxes, (2, 2), 0.25, 2, False), rtol=0, atol=0)


def test_multiscale_over_several_maps_pools_a_box_of_negative_area_to_zeros_as_torchvision():
    """Over two or more maps, the FPN level of a box inverted on one axis is the square root of a
    negative area, NaN: the cast made a huge level and pooling raised IndexError. torchvision's
    LevelMapper casts it to an integer that matches none of its levels, so its row stays zeros;
    the other boxes are pooled as without it."""
    feats = [torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16) + 1, torch.ones(1, 2, 8, 8)]
    inverted, upright = torch.tensor([[6.0, 1.0, 2.0, 5.0]]), torch.tensor([[1.0, 1.0, 5.0, 7.0]])
    assert map_roi_levels([torch.cat([inverted, upright])], 2, 3).tolist() == [-1, 0]
    out = multiscale_roi_align(feats, [torch.cat([inverted, upright])], [(64, 64)], (2, 2), 2)
    assert out.shape == (2, 2, 2, 2) and not out[0].any()
    torch.testing.assert_close(out[1:], multiscale_roi_align(feats, [upright], [(64, 64)], (2, 2), 2), rtol=0, atol=0)
    assert out[1].abs().sum() > 0


def test_multiscale_rejects_missing_level():
    pooler = MultiScaleRoIAlign(["0", "1"], 7, 2)
    with pytest.raises(ValueError, match="not in input keys"):
        pooler({"0": torch.zeros(1, 1, 8, 8)}, [torch.zeros(0, 4)], [(32, 32)])


# ----------------------------------------------------------------------------- NMS and boxes


def test_nms_and_batched_nms_match_torchvision_fixture():
    meta, arrays, _ = load_fixture("nms")
    boxes, scores, idxs = (torch.from_numpy(arrays[k]) for k in ("boxes", "scores", "idxs"))
    for t in meta["thresholds"]:
        keep = nms(boxes, scores, t)
        assert keep.dtype == torch.int64
        np.testing.assert_array_equal(keep.numpy(), arrays[f"keep.{t}"])
        np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, t).numpy(), arrays[f"batched_keep.{t}"])


def _clustered_boxes(gen: torch.Generator, n: int) -> torch.Tensor:
    centres = torch.rand(n // 6 + 1, 2, generator=gen, dtype=torch.float64) * 100
    c = centres[torch.randint(0, len(centres), (n,), generator=gen)] + torch.randn(n, 2, generator=gen) * 4
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 20 + 5
    return torch.cat((c - wh / 2, c + wh / 2), 1)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_nms_matches_naive_greedy(t):
    gen = torch.Generator().manual_seed(11)
    boxes = _clustered_boxes(gen, 150)
    boxes[120:] = boxes[:30] + 0.3 * torch.randn(30, 4, generator=gen, dtype=torch.float64)  # near-copies
    scores = torch.rand(150, generator=gen, dtype=torch.float64)
    scores[10:20] = scores[0]  # ties: visited in index order
    expected = naive_nms(boxes.numpy(), scores.numpy(), t)
    keep = nms(boxes, scores, t)
    assert keep.tolist() == expected
    assert 0 < len(expected) < 150


def test_nms_threshold_compare_follows_box_dtype():
    """IoU 3/10 rounds up in float32 (0.3000000119 > 0.3) but is exactly 0.3 in float64;
    torchvision compares the IoU in the box dtype against a double threshold."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.3).tolist() == [0]
    assert nms(boxes.double(), scores, 0.3).tolist() == [0, 1]
    assert nms(boxes, scores, 0.30000002).tolist() == [0, 1]


def test_nms_below_a_negative_threshold_counts_boxes_apart_on_one_axis_as_iou_zero():
    """Boxes that share their x range but lie apart in y have IoU 0 (their overlap's height is
    clamped at 0, never below): with a threshold below 0 the higher-scoring one suppresses the
    other, as in torchvision and the naive loop; boxes apart on both axes likewise."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 20.0, 10.0, 30.0], [20.0, 0.0, 30.0, 10.0],
                          [40.0, 40.0, 50.0, 50.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    for t in (-0.01, -0.5):
        assert naive_nms(boxes.numpy(), scores.numpy(), t) == [0]
        assert nms(boxes, scores, t).tolist() == [0]
        assert nms(boxes.double(), scores, t).tolist() == [0]
    assert nms(boxes, scores, 0.0).tolist() == [0, 1, 2, 3]


def test_batched_nms_small_and_large_paths_match_per_class_reference():
    gen = torch.Generator().manual_seed(12)
    for n in (300, 1200):  # 1200 * 4 > 4000 takes the per-category path
        boxes = _clustered_boxes(gen, n)
        scores = torch.rand(n, generator=gen, dtype=torch.float64)
        idxs = torch.randint(0, 3, (n,), generator=gen)
        expected = []
        for c in range(3):
            members = torch.where(idxs == c)[0].numpy()
            expected += [int(members[i]) for i in naive_nms(boxes.numpy()[members], scores.numpy()[members], 0.5)]
        expected.sort(key=lambda i: -float(scores[i]))
        assert batched_nms(boxes, scores, idxs, 0.5).tolist() == expected
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)


def _sliding_chain(n: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """10-px boxes 1 px apart with decreasing scores: IoU 9/11 with the next box, 8/12 with the one
    after, so at t = 0.7 greedy keeps every other box and each decision depends on the previous one
    (the longest possible keep/suppress chain, across block boundaries)."""
    x = torch.arange(n, dtype=dtype)
    boxes = torch.stack((x, torch.zeros_like(x), x + 10, torch.full_like(x, 10)), 1)
    return boxes, torch.linspace(1, 0, n, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_matches_old_numpy_nms_on_large_inputs(dtype):
    gen = torch.Generator().manual_seed(21)
    boxes = _clustered_boxes(gen, 1500).to(dtype)
    scores = torch.rand(1500, generator=gen, dtype=torch.float64).to(dtype)
    scores[100:300] = scores[:200].clone()  # ties, also across the 256-box blocks
    boxes[1000:1200] = boxes[:200]  # exact duplicates
    boxes[1300:1310, 2:] = boxes[1300:1310, :2].clone()  # empty boxes: IoU 0 / 0 = NaN never suppresses
    for t in (0.3, 0.5, 0.7):
        keep = nms(boxes, scores, t)
        assert keep.dtype == torch.int64
        assert keep.tolist() == numpy_nms(boxes, scores, t)
    chain, chain_scores = _sliding_chain(700, dtype)
    assert nms(chain, chain_scores, 0.7).tolist() == list(range(0, 700, 2))
    assert nms(chain, chain_scores, 0.7).tolist() == numpy_nms(chain, chain_scores, 0.7)


def test_batched_nms_large_path_matches_per_category_numpy_nms():
    """Many categories of very different sizes (one box up to hundreds), idxs not sorted."""
    gen = torch.Generator().manual_seed(22)
    n = 5000
    boxes = _clustered_boxes(gen, n).float()
    scores = torch.rand(n, generator=gen)
    idxs = (torch.rand(n, generator=gen) ** 3 * 90).long()
    idxs[:5] = 95  # a category with a few boxes, and
    idxs[5] = 99  # one with a single box
    for t in (0.5, 0.7):
        assert batched_nms(boxes, scores, idxs, t).tolist() == numpy_batched_nms(boxes, scores, idxs, t)
    tied = (scores * 20).round() / 20  # many equal scores across categories: ascending index order
    assert batched_nms(boxes, tied, idxs, 0.5).tolist() == numpy_batched_nms(boxes, tied, idxs, 0.5)
    chain, chain_scores = _sliding_chain(1500)
    two = torch.cat((chain, chain))
    keep = batched_nms(two, torch.cat((chain_scores, chain_scores)), torch.arange(3000) // 1500, 0.7)
    assert sorted(keep.tolist()) == list(range(0, 1500, 2)) + list(range(1500, 3000, 2))


def test_box_utilities():
    b1 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0]])
    b2 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    np.testing.assert_allclose(box_area(b1).numpy(), [100.0, 200.0])
    iou = box_iou(b1, b2)
    assert iou.shape == (2, 3)
    expected = [[1.0, 50 / 150, 0.0], [25 / 275, 50 / 250, 0.0]]
    np.testing.assert_allclose(iou.numpy(), expected, rtol=1e-6)
    assert box_area(torch.tensor([[0, 0, 3, 4]], dtype=torch.uint8)).dtype == torch.int32
    clipped = clip_boxes_to_image(torch.tensor([[[-3.0, -1.0, 50.0, 12.0]]]), (10, 40))
    assert clipped.tolist() == [[[0.0, 0.0, 40.0, 10.0]]]
    small = torch.tensor([[0, 0, 1, 5], [0, 0, 5, 5], [0, 0, 5, 0.5], [1, 1, 3, 3.0]])
    assert remove_small_boxes(small, 2.0).tolist() == [1, 3]


def test_clip_boxes_clamps_each_coordinate_to_its_own_axis():
    """x1, x2 go to [0, width] and y1, y2 to [0, height], each from its own value: a box inside the
    image is unchanged, one crossing each border is cut there (hand-worked, size (10, 40))."""
    boxes = torch.tensor([[5.0, 2.0, 30.0, 8.0], [-4.0, 3.0, 45.0, 15.0], [12.0, -2.0, 20.0, 9.5]])
    assert clip_boxes_to_image(boxes, (10, 40)).tolist() == [
        [5.0, 2.0, 30.0, 8.0], [0.0, 3.0, 40.0, 10.0], [12.0, 0.0, 20.0, 9.5]]


# ----------------------------------------------------------------------------- detection helpers


def test_box_coder_round_trip_and_values():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = [
        torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 9.0, 7.0]]),
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
    ]
    targets = [
        torch.tensor([[2.0, 4.0, 12.0, 24.0], [4.0, 4.0, 12.0, 10.0]]),
        torch.tensor([[0.0, 0.0, 4.0, 6.0]]),
    ]
    codes = coder.encode(targets, proposals)
    assert [c.shape for c in codes] == [(2, 4), (1, 4)]
    # first box: same size, centre moved by (2, 4) on a 10 x 20 proposal
    np.testing.assert_allclose(codes[0][0].numpy(), [10 * 2 / 10, 10 * 4 / 20, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(codes[0][1, 2:].numpy(), [5 * math.log(2.0), 5 * math.log(3.0)], rtol=1e-6)
    decoded = coder.decode(torch.cat(codes), proposals)
    assert decoded.shape == (3, 1, 4)
    torch.testing.assert_close(decoded[:, 0], torch.cat(targets), rtol=1e-5, atol=1e-5)
    # several classes per box, and the exp clip
    rel = torch.zeros(3, 8)
    rel[:, 6] = 5 * 100.0  # dw = 100 for class 1, clipped to log(1000/16)
    out = coder.decode(rel, proposals)
    assert out.shape == (3, 2, 4)
    torch.testing.assert_close(out[:, 0], torch.cat(proposals))
    w = torch.cat(proposals)[:, 2] - torch.cat(proposals)[:, 0]
    torch.testing.assert_close(out[:, 1, 2] - out[:, 1, 0], w * 1000 / 16, rtol=1e-5, atol=1e-4)
    assert coder.decode_single(torch.zeros(2, 4), proposals[0]).shape == (2, 4)


def test_matcher_thresholds_and_low_quality_matches():
    # 2 gt x 5 predictions
    quality = torch.tensor([[0.9, 0.5, 0.1, 0.2, 0.0], [0.1, 0.6, 0.35, 0.35, 0.2]])
    m = Matcher(0.7, 0.3)
    assert m(quality).tolist() == [0, -2, -2, -2, -1]
    # gt 1's best is 0.6 at prediction 1, gt 0's is 0.9 at prediction 0
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(quality).tolist() == [0, 1, -2, -2, -1]
    # ties for a gt's best quality both get matched
    tied = torch.tensor([[0.2, 0.25, 0.25, 0.1]])
    assert Matcher(0.5, 0.3, True)(tied).tolist() == [-1, 0, 0, -1]
    assert Matcher(0.5, 0.3, False)(tied).tolist() == [-1, -1, -1, -1]
    assert Matcher.BELOW_LOW_THRESHOLD == -1 and Matcher.BETWEEN_THRESHOLDS == -2
    with pytest.raises(ValueError, match="ground-truth"):
        Matcher(0.7, 0.3)(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)


def test_balanced_sampler_counts_and_determinism():
    labels = torch.cat([torch.ones(10), torch.zeros(100), -torch.ones(20), torch.full((3,), 5.0)]).long()
    few_pos = torch.cat([torch.ones(3), torch.zeros(100)]).long()
    sampler = BalancedPositiveNegativeSampler(64, 0.25)
    torch.manual_seed(0)
    pos, neg = sampler([labels, few_pos])
    assert int(pos[0].sum()) == 13  # only 13 positives (10 + 3 of class 5) exist, below 16
    assert int(neg[0].sum()) == 64 - 13
    assert int(pos[1].sum()) == 3 and int(neg[1].sum()) == 61
    assert torch.all(labels[pos[0]] >= 1) and torch.all(labels[neg[0]] == 0)
    assert not torch.any(pos[0] & neg[0])
    many = torch.cat([torch.ones(50), torch.zeros(30)]).long()
    p, n = sampler([many])
    assert int(p[0].sum()) == 16 and int(n[0].sum()) == 30  # fewer negatives than the 48 wanted
    torch.manual_seed(0)
    pos2, neg2 = sampler([labels, few_pos])
    assert all(torch.equal(a, b) for a, b in zip(pos + neg, pos2 + neg2))


# --- half precision: pooled in float32, as torchvision's autocast roi_align (2026-12-06) ----------
def test_roi_align_of_half_precision_maps_pools_in_float32():
    """Sample positions and bilinear weights in bf16 were off by ~1e-2 (features of std 0.2 off by up
    to 0.27); the pooled values are now float32 pooling of the same maps, cast back."""
    from pixelwise import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 40, 56, generator=g).bfloat16()
    boxes = [torch.tensor([[3.3, 5.7, 150.1, 90.9], [40.2, 12.6, 77.7, 101.3]]),
             torch.tensor([[0.5, 0.5, 200.0, 150.0]])]
    for dtype in (torch.bfloat16, torch.float16):
        half = x.to(dtype)
        out = ops.roi_align(half, boxes, (7, 7), spatial_scale=0.25, sampling_ratio=2)
        assert out.dtype == dtype
        assert torch.equal(out, ops.roi_align(half.float(), boxes, (7, 7), 0.25, 2).to(dtype))
    levels = [x, x[:, :, ::2, ::2].contiguous()]
    multi = ops.multiscale_roi_align(levels, boxes, [(160, 224)] * 2, (7, 7), 2)
    assert multi.dtype == torch.bfloat16
    assert torch.equal(multi, ops.multiscale_roi_align([m.float() for m in levels], boxes, [(160, 224)] * 2,
                                                       (7, 7), 2).bfloat16())


def test_rpn_matches_and_encodes_the_ground_truth_boxes_unrounded(monkeypatch):
    """Under bf16 autocast the anchors are bf16; the ground truth was rounded to them before
    matching and encoding (17 anchors relabelled on an 800x1088 image). It stays float32."""
    from pixelwise.models import create_model
    from pixelwise.models.maskrcnn import rpn as rpn_module

    seen = []
    real = rpn_module.anchor_labels

    def spy(anchors, gt_boxes, matcher):
        seen.append(gt_boxes)
        return real(anchors, gt_boxes, matcher)

    monkeypatch.setattr(rpn_module, "anchor_labels", spy)
    rpn = create_model("maskrcnn_resnet18_fpn", num_classes=3).rpn
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [100.0, 100.0, 228.0, 164.0]]).bfloat16()
    boxes = torch.tensor([[1.37, 2.71, 33.33, 31.19]])  # not representable in bf16
    losses = rpn.losses(anchors, torch.zeros(1, 2), torch.zeros(1, 2, 4), [{"boxes": boxes}])
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], boxes)
    assert all(torch.isfinite(v) for v in losses.values())


def test_remove_small_boxes_measures_height_as_y2_minus_y1_away_from_the_origin():
    """Every box in test_box_utilities starts at y1 = 0 or 1, so a height of y2 + y1 passed.
    Hand-computed: [0, 10, 5, 11] is 5 wide and 1 high -> dropped at min_size 2; [10, 10, 15, 12]
    is 5 x 2 -> kept; [10, 20, 11, 30] is 1 wide -> dropped."""
    boxes = torch.tensor([[0.0, 10.0, 5.0, 11.0], [10.0, 10.0, 15.0, 12.0], [10.0, 20.0, 11.0, 30.0]])
    assert remove_small_boxes(boxes, 2.0).tolist() == [1]


# --- RoIAlign with one sample a bin, the matcher at equal thresholds, the module's public names -------
def test_roi_align_sampling_ratio_one_takes_one_sample_per_bin():
    """sampling_ratio=1 is a fixed grid of one sample per bin, not the adaptive ceil(bin size) grid:
    on boxes several pixels per bin the two differ, and 1 must match the naive loop with g = 1."""
    gen = torch.Generator().manual_seed(11)
    feat = torch.randn(1, 2, 30, 40, generator=gen, dtype=torch.float64)
    rois = torch.tensor([[0, 0.0, 0.0, 40.0, 30.0], [0, 5.0, 1.0, 35.5, 28.0]], dtype=torch.float64)
    for aligned in (False, True):
        expected = naive_roi_align(feat, rois, (3, 4), 1.0, 1, aligned)
        out = roi_align(feat, rois, (3, 4), 1.0, 1, aligned).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-12)
        adaptive = naive_roi_align(feat, rois, (3, 4), 1.0, -1, aligned)
        assert np.abs(out - adaptive).max() > 1e-3  # the case tells the two grids apart


def test_matcher_with_equal_thresholds_keeps_a_match_at_exactly_the_threshold():
    """torchvision: below is ``quality < low``, between ``low <= quality < high``; with low == high
    (the RoI heads' 0.5 / 0.5) a quality of exactly 0.5 is a match, not background."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    preds = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 21.0], [0.0, 0.0, 10.0, 12.0]])
    quality = box_iou(gt, preds)
    assert quality[0, 0].item() == 0.5  # 100 / 200, exact in float32
    assert Matcher(0.5, 0.5)(quality).tolist() == [0, -1, 0]
    assert Matcher(0.7, 0.5)(quality).tolist() == [-2, -1, 0]


def test_every_name_in_ops_all_exists():
    assert "Matcher" in ops.__all__ and "nms" in ops.__all__
    for name in ops.__all__:
        assert hasattr(ops, name), name


def test_pool_feature_table_defaults_equal_multiscale_roi_align():
    """The public two-step form with its default canonical scale and level (224, 4, the FPN paper's)
    pools the same as multiscale_roi_align, over boxes that map to every level."""
    gen = torch.Generator().manual_seed(5)
    feats = [torch.randn(1, 2, 64 // 2**i, 48 // 2**i, generator=gen) for i in range(3)]
    sizes = [(256, 192)]
    boxes = [torch.tensor([[10.0, 10.0, 40.0, 40.0], [20.0, 5.0, 160.0, 125.0], [0.0, 0.0, 230.0, 250.0]])]
    assert map_roi_levels(boxes, 2, 4).tolist() == [0, 1, 2]
    expected = multiscale_roi_align(feats, boxes, sizes, (3, 3), 2)
    out = pool_feature_table(roi_feature_table(feats, sizes), boxes, (3, 3), 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
