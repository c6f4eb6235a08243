"""The U-Net paper's elastic deformation (Sec. 3.1): displacement statistics against the definition
(3x3 grid of N(0, 10^2) vectors, bicubic per-pixel field), smoothness, and labels that stay valid."""

from __future__ import annotations

import numpy as np
import pytest

from pixelwise.data.augment import build_transform
from pixelwise.data.base import Sample
from pixelwise.data.elastic import (
    ElasticDeform,
    dense_displacement,
    interpolation_matrix,
    random_displacement,
    warp_sample,
)
from pixelwise.errors import UserError
from pixelwise.sample import boxes_from_masks


def keys(x: float) -> float:
    """Keys' cubic convolution kernel with a = -0.5, written out independently of the module."""
    x = abs(x)
    if x <= 1:
        return 1.5 * x**3 - 2.5 * x**2 + 1
    if x < 2:
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
    return 0.0


def bicubic_reference(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixel by pixel: nodes at k (size - 1) / (g - 1), neighbours beyond the ends clamped."""
    g = grid.shape[0]
    out = np.zeros((h, w))
    for i in range(h):
        ti = i * (g - 1) / (h - 1)
        for j in range(w):
            tj = j * (g - 1) / (w - 1)
            total = 0.0
            for k in range(int(np.floor(ti)) - 1, int(np.floor(ti)) + 3):
                for m in range(int(np.floor(tj)) - 1, int(np.floor(tj)) + 3):
                    kk, mm = min(max(k, 0), g - 1), min(max(m, 0), g - 1)
                    total += keys(ti - k) * keys(tj - m) * grid[kk, mm]
            out[i, j] = total
    return out


def test_field_is_the_bicubic_interpolation_of_the_grid():
    rng = np.random.default_rng(0)
    coarse = rng.normal(0, 10, (2, 3, 3))
    field = dense_displacement(coarse, (17, 23))
    assert field.shape == (2, 17, 23) and field.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(field[c], bicubic_reference(coarse[c], 17, 23), atol=1e-4)
    # it passes through the node values: nodes at rows 0, 8, 16 and columns 0, 11, 22
    np.testing.assert_allclose(field[:, ::8, ::11], coarse, atol=1e-5)


def test_displacement_statistics_match_the_paper():
    """Nodes: N(0, 10^2) per component, independent; between nodes the std follows from the
    interpolation weights: at t = 0.5 the four Keys weights are (-1, 9, 9, -1) / 16, the first
    clamped onto node 0, so the std is 10 sqrt(0.5^2 + (9/16)^2 + (1/16)^2)."""
    rng = np.random.default_rng(1)
    fields = np.stack([random_displacement((33, 33), sigma=10.0, grid=3, rng=rng) for _ in range(4000)])
    nodes = fields[:, :, ::16, ::16]  # (draw, component, 3, 3)
    assert nodes.std(axis=0) == pytest.approx(np.full((2, 3, 3), 10.0), rel=0.05)
    assert np.abs(nodes.mean(axis=0)).max() < 0.6  # 4 standard errors
    flat = nodes.reshape(len(nodes), -1)
    corr = np.corrcoef(flat, rowvar=False)
    assert np.abs(corr - np.eye(18)).max() < 0.08  # components and nodes are independent
    between = fields[:, :, 0, 8]  # row 0, halfway between the nodes at columns 0 and 16
    expected = 10 * np.sqrt(0.5**2 + (9 / 16) ** 2 + (1 / 16) ** 2)
    assert between.std(axis=0) == pytest.approx([expected, expected], rel=0.05)
    assert fields.std() < 10.0  # interpolation only averages: no pixel varies more than a node


def test_field_is_smooth_cubic_between_nodes_and_c1_across_them():
    rng = np.random.default_rng(2)
    u = dense_displacement(rng.normal(0, 10, (2, 3, 3)), (49, 49)).astype(np.float64)[1]  # nodes at 0, 24, 48
    row = u[10]
    # one cubic polynomial per interval: fourth differences inside an interval vanish
    for lo, hi in ((0, 24), (24, 48)):
        piece = row[lo:hi + 1]
        assert np.abs(np.diff(piece, 4)).max() < 1e-3
    # continuously differentiable at the middle node: one-sided slopes agree to O(h)
    left = (row[24] - row[22]) / 2
    right = (row[26] - row[24]) / 2
    curvature = np.abs(np.diff(row, 2)).max()
    assert abs(left - right) <= 2 * curvature + 1e-6
    # and the field moves by well under a pixel per pixel for a 10 px grid 24 px apart
    assert np.abs(np.diff(u, axis=0)).max() < 3 and np.abs(np.diff(u, axis=1)).max() < 3


def _blocky(h=40, w=56, classes=5, block=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, classes, (h // block, w // block)), np.ones((block, block))).astype(np.uint8)
    mask[:4, :4] = 255  # an ignored corner
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.where(mask == 255, 250, mask * 40)
    inst = np.stack([mask == c for c in range(1, classes)])
    return Sample(image=image, mask=mask, weight=mask.astype(np.float32) + 1.0, instance_masks=inst,
                  instance_labels=np.arange(1, classes), boxes=boxes_from_masks(inst))


def test_integer_displacement_is_an_exact_shift_with_mirrored_borders():
    s = _blocky()
    h, w = s.mask.shape
    disp = np.zeros((2, h, w), np.float32)
    disp[0], disp[1] = 2, -3  # output (y, x) reads input (y + 2, x - 3)
    o = warp_sample(s, disp)
    np.testing.assert_array_equal(o.mask[: h - 2, 3:], s.mask[2:, : w - 3])
    np.testing.assert_array_equal(o.image[: h - 2, 3:], s.image[2:, : w - 3])
    np.testing.assert_array_equal(o.weight[: h - 2, 3:], s.weight[2:, : w - 3])
    # reflect-101 at the bottom: output row h-1 reads input row h+1, mirrored to h-3
    np.testing.assert_array_equal(o.mask[h - 1, 3:], s.mask[h - 3, : w - 3])
    # and on the left: output column 0 reads input column -3, mirrored to 3
    rows = np.arange(h) + 2
    np.testing.assert_array_equal(o.mask[:, 0], s.mask[np.minimum(rows, 2 * (h - 1) - rows), 3])


@pytest.mark.parametrize("seed", range(5))
def test_elastic_keeps_labels_valid_and_everything_aligned(seed):
    s = _blocky(seed=seed)
    np.random.seed(seed)
    o = ElasticDeform(sigma=10, grid=3)(s)
    assert o.mask.dtype == np.uint8 and o.mask.shape == s.mask.shape
    assert set(np.unique(o.mask)) <= set(np.unique(s.mask))  # nearest: no new label values
    assert set(np.unique(o.weight)) <= set(np.unique(s.weight))
    np.testing.assert_array_equal(o.weight, o.mask.astype(np.float32) + 1.0)  # same sampling positions
    assert o.instance_masks.dtype == bool
    for k, label in enumerate(o.instance_labels):  # instances moved exactly as the class mask
        np.testing.assert_array_equal(o.instance_masks[k], o.mask == label)
    np.testing.assert_array_equal(o.boxes, boxes_from_masks(o.instance_masks))
    # the image is bilinear: where the class is constant in a 3x3 neighbourhood it encodes that class
    m = o.mask.astype(int)
    pad = np.pad(m, 1, mode="edge")
    interior = np.ones_like(m, bool)
    for dy in range(3):
        for dx in range(3):
            interior &= pad[dy:dy + m.shape[0], dx:dx + m.shape[1]] == m
    interior &= m != 255
    agree = np.abs(o.image[..., 0].astype(int) - m * 40) <= 1
    assert agree[interior].mean() > 0.97
    assert not np.array_equal(o.mask, s.mask)  # it did deform


def test_elastic_is_reproducible_from_numpy_seed():
    s = _blocky()
    np.random.seed(3)
    a = ElasticDeform()(s)
    np.random.seed(3)
    b = ElasticDeform()(s)
    np.testing.assert_array_equal(a.image, b.image)
    assert ElasticDeform(sigma=0)(s).mask.tolist() == s.mask.tolist()  # zero displacement: identity


def test_elastic_augment_key():
    s = _blocky()
    t = build_transform({"elastic": True, "flip": False, "jitter": False}, train=True)
    assert t.elastic is not None and t.elastic.sigma == 10.0 and t.elastic.grid == 3
    np.random.seed(0)
    o = t(s)
    np.testing.assert_array_equal(o.weight, o.mask.astype(np.float32) + 1.0)
    custom = build_transform({"elastic": {"sigma": 4, "grid": 5}}, train=True).elastic
    assert (custom.sigma, custom.grid) == (4.0, 5)
    assert build_transform({"elastic": False}, train=True).elastic is None
    assert build_transform({"elastic": True}, train=False).elastic is None  # evaluation never deforms
    for bad in ({"sigma": "x"}, {"grid": 1}, {"alpha": 3}, 10, [3, 10]):
        with pytest.raises(UserError, match="elastic"):
            build_transform({"elastic": bad}, train=True)


@pytest.mark.parametrize("size, nodes", [(5, 1), (5, 0), (0, 3), (-1, 3)])
def test_interpolation_matrix_refuses_too_few_nodes_or_pixels(size, nodes):
    with pytest.raises(ValueError, match="need at least 2 nodes and 1 pixel"):
        interpolation_matrix(size, nodes)


def test_a_one_pixel_side_takes_the_first_node():
    # one pixel: its node coordinate is 0 (k (size - 1) / (nodes - 1) with size 1), so the weights
    # are W(0), W(-1), W(-2) = 1, 0, 0 by Keys' kernel (hand-derived)
    np.testing.assert_allclose(interpolation_matrix(1, 3), [[1.0, 0.0, 0.0]])
    coarse = np.arange(2 * 3 * 3, dtype=np.float64).reshape(2, 3, 3)
    field = dense_displacement(coarse, (1, 5))  # a one-row sample
    assert field.shape == (2, 1, 5) and np.isfinite(field).all()
    np.testing.assert_allclose(field[:, 0, [0, 2, 4]], coarse[:, 0, :])  # the first row of nodes, exactly


def test_dense_displacement_takes_nested_lists_of_node_vectors():
    coarse = [[[0.0, 1.0], [2.0, 3.0]], [[-1.0, 0.5], [4.0, 0.0]]]  # (dy, dx) on a 2x2 grid
    field = dense_displacement(coarse, (3, 3))
    np.testing.assert_allclose(field, dense_displacement(np.asarray(coarse), (3, 3)))
    np.testing.assert_allclose(field[:, [0, 0, 2, 2], [0, 2, 0, 2]], np.asarray(coarse).reshape(2, 4))  # corners


def test_elastic_grid_of_two_nodes_is_the_smallest_taken():
    assert ElasticDeform(grid=2).grid == 2  # the corners alone: a valid (bilinear-like) field
    with pytest.raises(UserError, match="integer >= 2"):
        ElasticDeform(grid=1)


def test_random_displacement_defaults_are_the_papers_3x3_grid_and_10_px():
    # the same draws, made by hand: a (2, 3, 3) array of N(0, 10^2) node vectors, interpolated
    field = random_displacement((9, 13), rng=np.random.default_rng(5))
    nodes = np.random.default_rng(5).normal(0.0, 10.0, size=(2, 3, 3))
    np.testing.assert_allclose(field, dense_displacement(nodes, (9, 13)), atol=1e-5)
    np.testing.assert_allclose(field[:, ::4, ::6], nodes, atol=1e-5)  # nodes at rows 0, 4, 8 and columns 0, 6, 12
