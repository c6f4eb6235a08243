"""U-Net weight map transform: equals models.unet.unet_weight_map on connected components, caching."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import label

from pixelwise.data.base import Sample
from pixelwise.data.weightmap import UNetWeightMap, compose, fast_weight_map
from pixelwise.models.unet import unet_weight_map


def _membranes(rng, h=64, w=80):
    m = np.ones((h, w), np.uint8)
    m[rng.integers(0, h, 5), :] = 0
    m[:, rng.integers(0, w, 6)] = 0
    m[rng.random((h, w)) < 0.02] = 0
    return m


@pytest.mark.parametrize("seed", range(3))
def test_fast_weight_map_equals_reference(seed):
    rng = np.random.default_rng(seed)
    mask = _membranes(rng)
    cells, k = label(mask == 1, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]))
    instances = np.stack([cells == i for i in range(1, k + 1)])
    ref = unet_weight_map(instances, mask, w0=10.0, sigma=5.0)
    got = fast_weight_map(mask, foreground=1, w0=10.0, sigma=5.0)
    assert got.dtype == np.float32 and got.shape == mask.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # with an unbounded window the values are identical to float precision
    np.testing.assert_allclose(fast_weight_map(mask, radius=1e9), ref, rtol=1e-6, atol=1e-6)
    # the border term is largest on thin membranes between two cells
    assert got[mask == 0].max() > 5 and got[mask == 1].max() == pytest.approx(1.0)


def test_weight_map_edge_cases_and_ignore():
    one_cell = np.zeros((10, 10), np.uint8)
    one_cell[2:8, 2:8] = 1
    w = fast_weight_map(one_cell)
    freq = np.bincount(one_cell.ravel())
    np.testing.assert_allclose(w, np.where(one_cell == 1, freq.max() / freq[1], freq.max() / freq[0]))
    ignored = one_cell.copy()
    ignored[0, :] = 255
    assert (fast_weight_map(ignored)[0] == 0).all()
    np.testing.assert_allclose(fast_weight_map(one_cell, class_weights=np.array([2.0, 0.5])),
                               np.where(one_cell == 1, 0.5, 2.0))


def test_transform_sets_weight_caches_and_composes():
    rng = np.random.default_rng(4)
    mask = _membranes(rng, 32, 40)
    sample = Sample(image=np.zeros((32, 40, 3), np.uint8), mask=mask, name="slice_00")
    t = UNetWeightMap()
    out = t(sample)
    np.testing.assert_array_equal(out.weight, fast_weight_map(mask))
    assert t(sample).weight is out.weight  # cached by name
    flipped = compose(t, lambda s: s.replace(mask=s.mask[:, ::-1], weight=s.weight[:, ::-1]), None)(sample)
    np.testing.assert_array_equal(flipped.weight, fast_weight_map(mask)[:, ::-1])


def test_trainer_attaches_weight_map_before_augmentation(tmp_path):
    from pixelwise.cli import main
    from pixelwise.data.shapes import ShapesDataset
    from pixelwise.data.weightmap import fast_weight_map
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import train_transform

    cfg = TrainConfig(weight_map="unet", weight_map_class=1, augment={"flip": False, "jitter": False, "scale": None})
    sample = ShapesDataset(split="train", num_train=1, size=48).load(0)
    out = train_transform(cfg)(sample)
    assert out.weight is not None and out.weight.shape == sample.mask.shape
    np.testing.assert_allclose(out.weight, fast_weight_map(sample.mask, 1), rtol=1e-6)
    # DataLoader workers started with spawn (macOS, Windows) receive the transform pickled
    import pickle

    again = pickle.loads(pickle.dumps(train_transform(cfg)))(sample)
    np.testing.assert_array_equal(again.weight, out.weight)
    # and end to end: one tiny epoch trains with it
    assert main(["train", "--model", "unet", "--dataset", "shapes", "--out", str(tmp_path / "o"), "--epochs", "1",
                 "--batch-size", "4", "--weight-map", "unet", "--no-progress",
                 "--model-kwargs", '{"base_channels": 4, "batch_norm": true, "dropout": 0}',
                 "--dataset-kwargs", '{"num_train": 8, "num_val": 4, "size": 32}']) == 0
