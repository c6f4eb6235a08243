"""Readers on the shared real copies of CamVid and ISBI 2012 (skipped when ../shared is absent)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import CAMVID, ISBI, require
from pixelwise.data import build_dataset, collate
from pixelwise.data.augment import train_preset
from pixelwise.errors import UserError


@pytest.mark.parametrize("split,expected", [("train", 367), ("val", 101)])
def test_camvid_counts(split, expected):
    require(CAMVID, "CamVid")
    independent = len([f for f in os.listdir(CAMVID / split) if f.endswith(".png")])
    listed = len((CAMVID / f"{split}.txt").read_text().split("\n")) - 1
    ds = build_dataset("camvid", str(CAMVID), split)
    assert len(ds) == independent == listed == expected
    assert build_dataset("camvid", str(CAMVID), "trainval").__len__() == 468


def test_camvid_pixel_counts_on_a_few_images():
    require(CAMVID, "CamVid")
    ds = build_dataset("camvid", str(CAMVID), "train")
    for i in (0, 100, 366):
        s = ds.load(i)
        raw = np.array(Image.open(CAMVID / "trainannot" / f"{s.name}.png"))
        assert s.image.shape == (360, 480, 3) and s.mask.shape == (360, 480)
        for c in range(11):
            assert (s.mask == c).sum() == (raw == c).sum()
        assert (s.mask == 255).sum() == (raw == 11).sum()
        np.testing.assert_array_equal(s.image, np.array(Image.open(CAMVID / "train" / f"{s.name}.png")))


def test_camvid_train_batch_through_preset():
    require(CAMVID, "CamVid")
    ds = build_dataset("camvid", str(CAMVID), "train", transform=train_preset(crop=(256, 256)))
    np.random.seed(0)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 256, 256) and batch["mask"].shape == (2, 256, 256)
    assert set(batch["mask"].unique().tolist()) <= set(range(11)) | {255}


def test_isbi_png_layout_splits_and_classes():
    require(ISBI, "ISBI 2012")
    n = len(os.listdir(ISBI / "train" / "image"))
    full = build_dataset("isbi2012", str(ISBI), "all")
    train = build_dataset("isbi2012", str(ISBI), "train")
    val = build_dataset("isbi2012", str(ISBI), "val", val_count=4)
    assert len(full) == n == 20 and len(train) == n - 4 and len(val) == 4
    assert [full.name_of(i) for i, _ in val.items] == ["16", "17", "18", "19"]  # the last four, numerically
    assert not {i for i, _ in train.items} & {i for i, _ in val.items}
    assert full.class_names == ["membrane", "cell"]
    s = val.load(0)
    raw = np.array(Image.open(ISBI / "train" / "label" / "16.png"))
    assert s.image.shape == (512, 512, 3) and (s.image[..., 0] == s.image[..., 2]).all()
    assert (s.mask == 0).sum() == (raw < 128).sum() and (s.mask == 1).sum() == (raw >= 128).sum()
    assert full.check() == []


def test_isbi_tiff_stack_layout(tmp_path):
    """The original multi-page TIFFs, built here from the PNG copy (or random data without it)."""
    rng = np.random.default_rng(0)
    if ISBI.exists():
        frames = [np.array(Image.open(ISBI / "train" / "image" / f"{k}.png"))[:64, :64] for k in range(6)]
        labels = [np.array(Image.open(ISBI / "train" / "label" / f"{k}.png"))[:64, :64] for k in range(6)]
    else:
        frames = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(6)]
        labels = [(rng.random((64, 64)) > 0.2).astype(np.uint8) * 255 for _ in range(6)]
    vol = [Image.fromarray(f) for f in frames]
    lab = [Image.fromarray(m) for m in labels]
    vol[0].save(tmp_path / "train-volume.tif", save_all=True, append_images=vol[1:])
    lab[0].save(tmp_path / "train-labels.tif", save_all=True, append_images=lab[1:])
    ds = build_dataset("isbi2012", str(tmp_path), "train", val_count=2)
    assert len(ds) == 4 and ds.check() == []
    s = ds.load(3)
    assert s.name == "train-volume_03"
    np.testing.assert_array_equal(s.image[..., 0], frames[3])
    np.testing.assert_array_equal(s.mask, (labels[3] >= 128).astype(np.uint8))
    assert len(build_dataset("isbi2012", str(tmp_path), "val", val_count=2)) == 2
    # a volume cut short in its page directories is named, not taken for a bad option
    data = (tmp_path / "train-volume.tif").read_bytes()
    (tmp_path / "train-volume.tif").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="train-volume.tif: unreadable or truncated"):
        build_dataset("isbi2012", str(tmp_path), "train", val_count=2)
