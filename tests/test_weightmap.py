"""U-Net weight map transform: equals models.unet.unet_weight_map on connected components, caching."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import label

from pixelwise.data.base import Sample
from pixelwise.data.weightmap import UNetWeightMap, class_balance, compose, fast_weight_map
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


def _two_cells():
    """5 x 13: cell A in columns 0-4, a 2-pixel membrane (5, 6), cell B in 7-11, membrane column 12."""
    mask = np.zeros((5, 13), np.uint8)
    mask[:, 0:5] = 1
    mask[:, 7:12] = 1
    return mask


def test_equation_2_on_a_hand_made_mask():
    """w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / (2 sigma^2)), w0 = 10, sigma = 5, by hand: the rows
    are identical, so distances are horizontal. Column 5: d1 = 1 (A), d2 = 2 (B); column 6: d1 = 1
    (B), d2 = 2 (A); column 12: d1 = 1 (B), d2 = 8 (A). w_c: 50 cell and 15 membrane pixels, the
    most frequent class weighs 1, so w_c = 1 on cells and 50/15 on the membrane."""
    mask = _two_cells()
    w = fast_weight_map(mask)
    wc = 50 / 15
    expected_row = [1.0] * 5 + [wc + 10 * np.exp(-9 / 50)] * 2 + [1.0] * 5 + [wc + 10 * np.exp(-81 / 50)]
    np.testing.assert_allclose(w, np.tile(expected_row, (5, 1)), rtol=1e-6)
    # given class weights are the w_c term, not a factor on the border term
    given = fast_weight_map(mask, class_weights=np.array([2.0, 0.5]))
    np.testing.assert_allclose(given[0], [0.5] * 5 + [2 + 10 * np.exp(-9 / 50)] * 2 + [0.5] * 5
                               + [2 + 10 * np.exp(-81 / 50)], rtol=1e-6)


@pytest.mark.parametrize("class_weights", [None, [2.0, 0.5]])
def test_unet_loss_is_equation_1_with_one_weighting(class_weights):
    """The trainer's loss with ``weight_map: unet`` is the paper's energy (Eq. 1), the mean of
    ``w(x) * -log p_l(x)(x)`` with w from Eq. 2; class weights, when given, are its w_c term and
    are not applied a second time."""
    import torch
    import torch.nn.functional as F

    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import train_transform
    from pixelwise.losses import LossSpec, combined_loss

    cfg = TrainConfig(weight_map="unet", augment={"flip": False, "jitter": False, "scale": None})
    mask = _two_cells()
    sample = Sample(image=np.zeros((5, 13, 3), np.uint8), mask=mask, name="two_cells")
    out = train_transform(cfg, class_weights)(sample)
    wc = {0: 50 / 15, 1: 1.0} if class_weights is None else {0: 2.0, 1: 0.5}
    border = [0.0] * 5 + [10 * np.exp(-9 / 50)] * 2 + [0.0] * 5 + [10 * np.exp(-81 / 50)]  # as worked out above
    w = np.vectorize(wc.get)(mask) + np.tile(border, (5, 1))
    np.testing.assert_allclose(out.weight, w, rtol=1e-6)
    logits = torch.randn(1, 2, 5, 13, generator=torch.Generator().manual_seed(0))
    target = torch.from_numpy(mask.astype(np.int64))[None]
    nll = -F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    energy = (torch.from_numpy(w) * nll.double()).mean()
    # what the trainer builds: the map carries the class weights, the loss none (plan_stages)
    spec = LossSpec("ce", class_weights=None)
    got = combined_loss({"out": logits}, target, spec, torch.from_numpy(out.weight)[None])
    assert got.item() == pytest.approx(energy.item(), rel=1e-5)


def test_plan_stages_does_not_weight_classes_twice(tmp_path):
    import torch

    from pixelwise.engine import trainer
    from pixelwise.engine.config import TrainConfig

    cfg = TrainConfig(model="unet", dataset="shapes", out=str(tmp_path), progress=False, class_weights="median-freq",
                      model_kwargs={"base_channels": 4, "batch_norm": True, "dropout": 0},
                      dataset_kwargs={"num_train": 4, "num_val": 2, "size": 32})
    info, device = trainer.dist.setup("cpu")
    for weight_map, expect_in_loss in (("none", True), ("unet", False)):
        run = trainer.setup_run(TrainConfig(**{**cfg.to_dict(), "weight_map": weight_map}), info, device,
                                lambda *_: None)
        assert isinstance(run.class_weights, torch.Tensor)
        (stage,) = trainer.plan_stages(run)
        assert (stage.loss.class_weights is not None) == expect_in_loss, weight_map


def test_instance_crops_get_the_weight_map_of_their_own_window():
    """With instance crops the map is computed on the whole mask and cropped with it: every crop
    gets its own window of that map (computed after the crop and cached by the image's name, a
    later crop was handed an earlier crop's map, 13 off per pixel)."""
    import dataclasses

    from pixelwise.data import build_dataset
    from pixelwise.data.instance_crop import InstanceCrop
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import train_transform

    sample = build_dataset("shapes", None, "train", num_train=2, num_val=1, size=64).load(0)
    cfg = TrainConfig(dataset="shapes", weight_map="unet", weight_map_class=1, instance_crops=True, crop="24x24",
                      augment={"scale": None, "flip": False, "jitter": False})
    transform = train_transform(cfg)
    whole = dataclasses.replace(sample, weight=fast_weight_map(sample.mask, 1))
    windows = set()
    for seed in range(6):
        np.random.seed(seed)
        got = transform(sample)
        np.random.seed(seed)
        want = InstanceCrop((24, 24), cfg.instance_context)(whole)
        np.testing.assert_allclose(got.weight, want.weight, atol=1e-6)
        np.testing.assert_array_equal(got.mask, want.mask)
        windows.add(want.mask.tobytes())
    assert len(windows) > 1, "every seed cropped the same window: the test would not see a stale map"


def test_a_mask_with_no_labelled_pixel_weighs_nothing():
    """--weight-map unet without class weights crashed (max of an empty array) on an all-255 mask."""
    from pixelwise.data.weightmap import class_balance, fast_weight_map

    ignored = np.full((12, 10), 255, np.uint8)
    assert not class_balance(ignored).any() and not fast_weight_map(ignored).any()
    assert fast_weight_map(ignored).shape == (12, 10)


def test_class_balance_weighs_a_single_pixel_class():
    # 8 pixels of class 0 and 1 of class 1: inverse frequency scaled so the most frequent class
    # weighs 1 -> w_c = 1 on class 0 and 8/1 = 8 on class 1 (by hand); one cell: no border term.
    mask = np.zeros((3, 3), np.uint8)
    mask[1, 1] = 1
    expected = np.ones((3, 3))
    expected[1, 1] = 8.0
    np.testing.assert_array_equal(class_balance(mask), expected)
    np.testing.assert_array_equal(fast_weight_map(mask), expected.astype(np.float32))


def test_the_border_term_keeps_only_cells_within_radius_along_both_axes():
    """Two 2-px-wide cells at columns 0-1 and 4-5, radius 2: each cell's distances are taken in its
    box padded by 2 px, so only columns 2 and 3 (1 and 2 px from the two cells) see both cells;
    column 8 (3 and 7 px away) gets no border term, though sigma = 50 would make it ~9.8."""
    mask = np.zeros((5, 40), np.uint8)
    mask[:, 0:2] = 1
    mask[:, 4:6] = 1
    expected = np.ones(40)
    expected[2:4] = 1 + 10.0 * np.exp(-((1 + 2) ** 2) / (2 * 50.0**2))
    for m, line in ((mask, lambda w: w[0]), (mask.T.copy(), lambda w: w[:, 0])):
        w = fast_weight_map(m, w0=10.0, sigma=50.0, class_weights=np.array([1.0, 1.0]), radius=2)
        np.testing.assert_allclose(line(w), expected, rtol=1e-6)
