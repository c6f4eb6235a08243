"""benchmarks/isbi_rand_parts.py: the pair counts of labellings it uses (pixelwise.metrics.
segment_rand_counts) against a hand computation and rand_counts, and the attribution of
membrane-called cell pixels to the nearest segment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pixelwise.metrics import label_components, rand_counts, rand_scores, segment_rand_counts

spec = importlib.util.spec_from_file_location(
    "isbi_rand_parts", Path(__file__).parents[1] / "benchmarks" / "isbi_rand_parts.py")
assert spec is not None and spec.loader is not None
parts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parts)


def two_cells(membrane_cols: list[int]) -> np.ndarray:
    """6x7 class map: 1 = cell, 0 = membrane in the given columns."""
    mask = np.ones((6, 7), np.int64)
    mask[:, membrane_cols] = 0
    return mask


def test_thick_membranes_cost_recall_and_attribution_gives_it_back():
    truth, pred = two_cells([3]), two_cells([2, 3, 4])  # predicted membrane 1 px thicker each side
    counts = segment_rand_counts(label_components(truth == 1), label_components(pred == 1))
    # by hand: cells of 18 px; 12 px of each found, 6 called membrane (12 singletons in all)
    assert list(counts) == [12**2 * 2 + 12, 18**2 * 2, 12**2 * 2 + 12]
    assert np.allclose(counts, rand_counts(pred, truth))
    assert rand_scores(*counts)["rand_error"] == pytest.approx(1 - 2 * (300 / 648) / (1 + 300 / 648))
    attributed = parts.attribute_to_nearest(label_components(pred == 1))
    # the called-membrane pixels go back to the cell beside them: nothing joined, nothing cut
    assert rand_scores(*segment_rand_counts(label_components(truth == 1), attributed))["rand_error"] == 0


def test_attribution_joins_nothing_new():
    truth = two_cells([3])
    pred = np.ones_like(truth)  # the membrane missed: both cells one segment
    counts = segment_rand_counts(label_components(truth == 1), parts.attribute_to_nearest(label_components(pred)))
    assert np.allclose(counts, rand_counts(pred, truth))
    assert parts.attribute_to_nearest(np.zeros((3, 3), np.int64)).tolist() == np.zeros((3, 3)).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_match_the_library_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    truth = (rng.random((24, 24)) > 0.3).astype(np.int64)
    pred = (rng.random((24, 24)) > 0.35).astype(np.int64)
    got = segment_rand_counts(label_components(truth == 1), label_components(pred == 1))
    assert np.allclose(got, rand_counts(pred, truth))
