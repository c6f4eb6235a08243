"""Watershed cells from a membrane map (pixelwise.inference.cells), and the ISBI errors scored on them."""

import math

import numpy as np
import pytest
from scipy import ndimage

from pixelwise.errors import UserError
from pixelwise.inference.cells import cell_map, check_seed_threshold, watershed_cells, with_boundaries
from pixelwise.metrics import ChallengeMeter, label_components


def _grid(cells=4, size=14, membrane=3):
    """A ground truth of cells x cells square cells, membranes ``membrane`` px wide (0), cells 1."""
    side = cells * size
    target = np.ones((side, side), dtype=np.uint8)
    for k in range(cells + 1):
        lo = max(k * size - membrane // 2, 0)
        target[lo:lo + membrane, :] = 0
        target[:, lo:lo + membrane] = 0
    return target


def _thick_map(target, extra=1):
    """The cell probability of a network sure of its membranes but drawing them ``extra`` px thicker
    on each side than the annotator: 0 on the thickened membranes, 1 elsewhere, with a one-pixel ramp."""
    thick = ndimage.binary_dilation(target == 0, np.ones((3, 3)), iterations=extra)
    return np.clip(ndimage.distance_transform_edt(~thick) / 2, 0, 1)


def test_two_cells_meet_on_the_ridge_with_a_one_pixel_boundary():
    # columns: a cell, a membrane band whose probability peaks at column 9, another cell
    profile = np.array([1, 1, 1, 1, 1, 0.9, 0.6, 0.4, 0.2, 0.05, 0.3, 0.5, 0.7, 1, 1, 1, 1])
    prob = np.tile(profile, (6, 1))
    labels = watershed_cells(prob, 0.5)
    assert labels[0, 0] != labels[0, -1] and set(np.unique(labels)) == {labels[0, 0], labels[0, -1]}
    left = np.nonzero(labels[0] == labels[0, 0])[0]
    assert left.max() in (8, 9)  # the band's pixels went to the cell on their side of the ridge
    inside = cell_map(labels)
    assert (~inside).sum() == 6 and (~inside[:, left.max()]).all()  # one boundary column, at the ridge
    assert label_components(inside).max() == 2


def test_seeds_are_kept_and_every_region_is_connected_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(20):
        prob = ndimage.gaussian_filter(rng.random((40, 50)), 2.5)
        prob = (prob - prob.min()) / (prob.max() - prob.min())
        labels = watershed_cells(prob, 0.6)
        seeds = label_components(prob > 0.6)
        assert (labels[seeds > 0] == seeds[seeds > 0]).all()  # each seed keeps its own label
        assert (labels > 0).all()  # the map is connected: every pixel is reached
        for k in range(1, int(seeds.max()) + 1):
            assert label_components(labels == k).max() == 1  # a region grows from its seed without jumps
        inside = cell_map(labels)
        # no two 4-neighbours inside cells belong to different cells
        assert not (inside[:, :-1] & inside[:, 1:] & (labels[:, :-1] != labels[:, 1:])).any()
        assert not (inside[:-1] & inside[1:] & (labels[:-1] != labels[1:])).any()


def test_no_seed_gives_no_cell_and_bad_shapes_are_refused():
    assert not watershed_cells(np.full((5, 6), 0.3), 0.5).any()
    assert not cell_map(np.zeros((4, 4), dtype=np.int32)).any()
    with pytest.raises(ValueError, match="2-D"):
        watershed_cells(np.zeros((2, 3, 4)), 0.5)


def test_watershed_boundaries_remove_the_cost_of_thick_membranes_and_keep_merges():
    """Membranes predicted too thick cost the thresholded map Rand error with every cell right; the
    same map with its watershed boundaries drawn in scores 0 (at a low threshold, where only those
    boundaries are membrane) and keeps its pixel error. A map that joins two cells joins them either way."""
    target = _grid()
    prob = _thick_map(target)
    drawn = with_boundaries(prob, 0.5)
    assert drawn.dtype == prob.dtype and ((drawn == np.maximum(prob, 1 / 255)) | (drawn == 0)).all()
    assert (drawn == 0).sum() < (prob == 0).sum() / 3  # one-pixel boundaries where the membranes were 5 wide
    thresholded, watershed = ChallengeMeter(), ChallengeMeter()
    thresholded.update((prob > 0.5).astype(np.uint8), prob, target)
    watershed.update((drawn > 0.5).astype(np.uint8), drawn, target)
    assert thresholded.compute()["rand_error_best"] > 0.02
    assert watershed.compute()["rand_error_best"] == pytest.approx(0.0, abs=1e-12)
    assert watershed.compute()["rand_best_threshold"] == 0.0
    assert watershed.compute()["pixel_error_best"] == pytest.approx(thresholded.compute()["pixel_error_best"], abs=0.01)

    joined = prob.copy()
    joined[14 + 2:28 - 2, 10:19] = 1.0  # a gap in the membrane between two cells
    merged = ChallengeMeter()
    drawn = with_boundaries(joined, 0.5)
    merged.update((drawn > 0.5).astype(np.uint8), drawn, target)
    assert merged.compute()["rand_precision"] < 1.0 and merged.compute()["rand_error_best"] > 0.01


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.01, math.nan])
def test_seed_threshold_outside_zero_to_one_is_refused(bad):
    # docstring: a cell probability in [0, 1): 1 would leave no seed at all (prob > 1 never holds)
    with pytest.raises(UserError, match="seed threshold"):
        check_seed_threshold(bad)


@pytest.mark.parametrize("good", [0.0, 0.5, 0.99])
def test_seed_threshold_inside_is_accepted(good):
    check_seed_threshold(good)


def test_seeds_are_strictly_above_the_threshold():
    # a pixel exactly at the threshold is no seed: [0.9, 0.5, 0.9] at 0.5 has two seeds, and the
    # middle pixel floods from its first labelled neighbour in the order above, below, left, right
    # (the left one). By hand: labels [1, 1, 2].
    labels = watershed_cells(np.array([[0.9, 0.5, 0.9]]), 0.5)
    assert labels.tolist() == [[1, 1, 2]]


def test_cells_meet_on_the_membrane_ridge_not_halfway():
    # seeds at both ends; the membrane probability 1 - p is 0.6 on pixels 1-3 and 0.9 on pixel 4
    # (the ridge). Flooding level by level, the left cell takes pixels 1-3 at level 0.6 before the
    # right one can cross the ridge, which goes to its first labelled neighbour (the left one).
    # A plain breadth-first growth (ignoring the relief) would meet halfway: [1, 1, 1, 2, 2, 2].
    labels = watershed_cells(np.array([[0.9, 0.4, 0.4, 0.4, 0.1, 0.9]]), 0.5)
    assert labels.tolist() == [[1, 1, 1, 1, 1, 2]]
