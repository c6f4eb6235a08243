"""inspect_dataset / median-frequency weights on a synthetic folder and on the real CamVid copy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import CAMVID, require
from pixelwise.data.camvid import CamVid
from pixelwise.data.folder import FolderDataset
from pixelwise.data.inspect import format_report, inspect_dataset, median_frequency_weights
from pixelwise.data.io import write_mask

# SegNet-Tutorial class_weighting (arXiv:1511.00561 released solver), CamVid order Sky..Bicyclist.
SEGNET_WEIGHTS = [0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614]


def _naive_mfb(masks: list[np.ndarray], num_classes: int) -> list[float | None]:
    """Independent reference: per-class loops over images, straight from the SegNet definition."""
    freqs = {}
    for c in range(num_classes):
        pixels = sum(int((m == c).sum()) for m in masks)
        total = sum(m.size for m in masks if (m == c).any())
        if pixels:
            freqs[c] = pixels / total
    med = float(np.median(list(freqs.values())))
    return [med / freqs[c] if c in freqs else None for c in range(num_classes)]


def test_inspect_counts_sizes_weights_and_problems(tmp_path):
    rng = np.random.default_rng(5)
    masks = []
    for i, (h, w) in enumerate([(6, 8), (6, 8), (5, 9), (7, 7)]):
        (tmp_path / "images").mkdir(exist_ok=True)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / f"i{i}.png")
        m = rng.choice([0, 1, 2, 255], size=(h, w), p=[0.5, 0.3, 0.1, 0.1]).astype(np.uint8)
        if i == 0:
            m[m == 2] = 1  # class 2 absent from the first image
        write_mask(tmp_path / "masks" / f"i{i}.png", m)
        masks.append(m)
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["bg", "a", "b", "never"]}))
    ds = FolderDataset(tmp_path, "all")
    report = inspect_dataset(ds, progress=False)
    assert set(report) == {"num_images", "class_names", "class_pixels", "ignored_pixels", "image_sizes",
                           "median_freq_weights", "problems", "notes"}
    assert len(report["notes"]) == 1 and "images of 3 sizes" in report["notes"][0] and "--crop" in report["notes"][0]
    json.dumps(report)  # JSON-ready
    assert report["num_images"] == 4 and report["class_names"] == ["bg", "a", "b", "never"]
    assert report["class_pixels"] == [int(sum((m == c).sum() for m in masks)) for c in range(4)]
    assert report["ignored_pixels"] == int(sum((m == 255).sum() for m in masks))
    assert report["image_sizes"] == {"8x6": 2, "9x5": 1, "7x7": 1}
    expected = _naive_mfb(masks, 4)
    assert report["median_freq_weights"][3] is None
    np.testing.assert_allclose(report["median_freq_weights"][:3], expected[:3], rtol=1e-12)
    assert report["problems"] == []
    text = format_report(report)
    assert "never" in text and "problems: none" in text and "note: images of 3 sizes" in text

    # a truncated image and a missing mask show up as problems, the rest is still counted
    data = (tmp_path / "images" / "i1.png").read_bytes()
    (tmp_path / "images" / "i1.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "masks" / "i3.png").unlink()
    report = inspect_dataset(FolderDataset(tmp_path, "all"), progress=False)
    assert report["num_images"] == 2
    assert any("i1.png" in p and "truncated" in p for p in report["problems"])
    assert any("i3.png" in p and "missing mask" in p for p in report["problems"])
    assert "problems: " in format_report(report) and "i1.png" in format_report(report)
    assert len([p for p in report["problems"] if "i3" in p]) == 1  # check() and the failed load: named once


def test_binary_masks_saved_as_0_and_255_are_a_problem(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"b{i}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:6] = 255  # the foreground, as many tools save it
        write_mask(tmp_path / "masks" / f"b{i}.png", mask)
    problems = inspect_dataset(FolderDataset(tmp_path, "all"), progress=False)["problems"]
    assert len(problems) == 1 and "store it as 1" in problems[0] and "24 are 255" in problems[0]


def test_median_frequency_weights_edge_cases():
    assert median_frequency_weights(np.zeros(3), np.zeros(3)) == [None, None, None]
    w = median_frequency_weights(np.array([10, 0, 30]), np.array([100, 0, 100]))
    assert w[1] is None
    np.testing.assert_allclose([w[0], w[2]], [0.2 / 0.1, 0.2 / 0.3])


@pytest.fixture(scope="module")
def camvid_report():
    require(CAMVID, "CamVid (SegNet layout)")
    return inspect_dataset(CamVid(CAMVID, "train"), progress=False)


def test_camvid_median_frequency_exact_vs_numpy(camvid_report):
    """Exactness: the same definition computed independently from the raw annotation PNGs."""
    files = sorted((CAMVID / "trainannot").glob("*.png"))
    pixels = np.zeros(11)
    totals = np.zeros(11)
    void = 0
    for f in files:
        raw = np.array(Image.open(f))
        values, counts = np.unique(raw, return_counts=True)
        for v, n in zip(values, counts):
            if v < 11:
                pixels[v] += n
                totals[v] += raw.size
            else:
                void += n
    freq = pixels / totals
    expected = np.median(freq) / freq
    assert camvid_report["class_pixels"] == pixels.astype(int).tolist()
    assert camvid_report["ignored_pixels"] == void
    np.testing.assert_allclose(camvid_report["median_freq_weights"], expected, rtol=1e-12)


def test_camvid_median_frequency_close_to_segnet(camvid_report):
    """SegNet's published weights were computed on a slightly different CamVid label set. On this
    copy 10 of 11 classes are within 21% (ratios 1.02..1.20, all above 1: the median class is
    relatively rarer here); SignSymbol is the outlier (3.85 here vs 9.64, ratio 0.40). The test
    allows 25% for the ten classes and pins the SignSymbol deviation so a change is noticed."""
    ours = np.array(camvid_report["median_freq_weights"])
    ratio = ours / np.array(SEGNET_WEIGHTS)
    others = np.delete(ratio, 6)
    assert np.all(np.abs(others - 1) < 0.25), ratio
    assert 0.3 < ratio[6] < 0.5
    # the ordering of the classes by weight is essentially the paper's
    rho = np.corrcoef(np.argsort(np.argsort(ours)), np.argsort(np.argsort(SEGNET_WEIGHTS)))[0, 1]
    assert rho > 0.9
