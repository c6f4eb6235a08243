"""inspect_dataset / median-frequency weights on a synthetic folder and on the real CamVid copy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import CAMVID, require
from pixelwise.data.base import Problem, Sample, SegmentationDataset
from pixelwise.data.camvid import CamVid
from pixelwise.data.folder import FolderDataset
from pixelwise.data.inspect import format_report, image_sizes, inspect_dataset, label_presence, median_frequency_weights
from pixelwise.data.io import write_mask
from pixelwise.errors import UserError

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


def test_format_report_table_by_hand():
    report = {"num_images": 3, "class_names": ["bg", "road"], "class_pixels": [3_000_000, 1_000_000],
              "ignored_pixels": 1_000_000, "image_sizes": {f"{w}x10": 1 for w in range(1, 7)},
              "median_freq_weights": [0.5, None], "problems": ["p0", "p1", "p2", "p3"], "notes": ["n1"]}
    assert format_report(report, max_problems=2).splitlines() == [
        "images: 3   classes: 2   pixels: 5,000,000 (1,000,000 ignored)",
        "sizes (width x height): 1x10 x1, 2x10 x1, 3x10 x1, 4x10 x1, 5x10 x1 (+1 more)",
        "class          pixels    share  mf weight",
        "bg          3,000,000   60.00%     0.5000",
        "road        1,000,000   20.00%          -",
        "problems: 4",
        "  p0",
        "  p1",
        "  ... and 2 more",
        "note: n1",
    ]
    empty = {**report, "class_pixels": [0, 0], "ignored_pixels": 0, "image_sizes": {"4x3": 2}, "problems": [],
             "notes": []}
    assert format_report(empty).splitlines()[1:] == [
        "sizes (width x height): 4x3 x2", "class          pixels    share  mf weight",
        "bg                  0    0.00%     0.5000", "road                0    0.00%          -", "problems: none"]


class _InMemory(SegmentationDataset):
    """Two classes, masks given as arrays: no files, no items, no check of label values."""

    class_names = ["bg", "fg"]
    palette = [(0, 0, 0), (255, 255, 255)]

    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def load(self, index):
        m = np.asarray(self.masks[index], np.uint8)
        return Sample(image=np.zeros((*m.shape, 3), np.uint8), mask=m, name=f"m{index}")


def test_class_ids_outside_the_classes_are_named_per_sample_and_not_counted():
    ds = _InMemory([[[0, 1, 5], [7, 7, 255]], [[0, 1, 1], [0, 0, 0]]])
    report = inspect_dataset(ds, progress=False)
    assert report["problems"] == ["m0: class ids [5, 7] outside the 2 classes"]
    assert report["class_pixels"] == [5, 3] and report["ignored_pixels"] == 1 and report["num_images"] == 2
    # a reader without mask files (items) is taken to have labels of both kinds: nothing to read
    assert label_presence(ds) == (True, True)


def test_image_sizes_stops_at_the_limit_of_distinct_sizes(tmp_path):
    for i, (h, w) in enumerate([(6, 8), (6, 8), (5, 9), (7, 7)]):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "images" / f"i{i}.png")
        write_mask(tmp_path / "masks" / f"i{i}.png", np.zeros((h, w), np.uint8))
    ds = FolderDataset(tmp_path, "all")
    assert image_sizes(ds) == [(6, 8), (5, 9)]  # (height, width), first seen first, 2 at most
    assert image_sizes(ds, limit=5) == [(6, 8), (5, 9), (7, 7)]
    assert image_sizes(ds, limit=1) == [(6, 8)]


def test_weights_count_a_one_pixel_class_and_only_the_images_that_hold_it():
    masks = [np.array([[0, 0, 1], [0, 0, 0]]), np.array([[0, 0], [0, 0]])]  # class 1: one pixel, in one image
    report = inspect_dataset(_InMemory(masks), progress=False)
    np.testing.assert_allclose(report["median_freq_weights"], _naive_mfb(masks, 2), rtol=1e-12)
    # a class whose images add up to 1 pixel has frequency 1 (pixels / 1), not pixels / 2
    np.testing.assert_allclose(median_frequency_weights(np.array([1, 2]), np.array([1, 8])), [0.625, 2.5])


def test_a_file_that_check_names_and_that_fails_to_load_is_named_once():
    class Broken(_InMemory):  # a reader without items: its broken file is loaded, and fails
        def check(self):
            return [Problem("scan.png", "damaged")]

        def load(self, index):
            if index == 1:
                raise UserError("scan.png: cannot be decoded")
            return super().load(index)

    report = inspect_dataset(Broken([[[0, 1]], [[1, 1]]]), progress=False)
    assert report["problems"] == ["scan.png: damaged"] and report["num_images"] == 1


def test_a_coco_split_of_crowd_regions_only_is_not_called_binary_masks(tmp_path):
    """The 255 of a COCO split are its crowd regions: the 0/255 binary-mask advice ('store the
    foreground as 1') does not apply to an annotation file, and was what data inspect said."""
    from pixelwise.data.coco import COCOInstances

    (tmp_path / "val2017").mkdir()
    Image.fromarray(np.full((20, 30, 3), 80, np.uint8)).save(tmp_path / "val2017" / "1.png")
    crowd = {"id": 1, "image_id": 1, "category_id": 4, "iscrowd": 1, "area": 25.0, "bbox": [2, 2, 5, 5],
             "segmentation": [[2, 2, 7, 2, 7, 7, 2, 7]]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "1.png", "width": 30, "height": 20}], "annotations": [crowd],
         "categories": [{"id": 4, "name": "cup"}]}))
    report = inspect_dataset(COCOInstances(tmp_path, "val"))
    assert len(report["problems"]) == 1 and "crowd regions" in report["problems"][0]
    assert "binary masks" not in report["problems"][0]


def test_instance_data_counts_objects_crowds_untrained_and_empty_images_per_class(tmp_path):
    """COCO's report counts per class what an instance model trains on (objects), the crowd regions
    (scored, never trained on), the degenerate objects left out of training, and the images with
    nothing to train on; counted by hand from the annotation file below."""
    from pixelwise.data.coco import COCOInstances

    (tmp_path / "val2017").mkdir()
    for i in (1, 2, 3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / "val2017" / f"{i}.png")

    def ann(id_, image_id, cat, box, crowd=0):
        x, y, w, h = box
        return {"id": id_, "image_id": image_id, "category_id": cat, "iscrowd": crowd, "area": float(w * h),
                "bbox": box, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}

    anns = [ann(1, 1, 4, [1, 1, 5, 5]), ann(2, 1, 4, [10, 1, 5, 5]), ann(3, 1, 9, [1, 10, 8, 6]),
            ann(4, 1, 4, [20, 10, 6, 6], crowd=1), ann(5, 2, 9, [3, 3, 0.5, 4])]  # 5: a box under 1 px
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in (1, 2, 3)],
         "annotations": anns, "categories": [{"id": 9, "name": "plate"}, {"id": 4, "name": "cup"}]}))
    dataset = COCOInstances(tmp_path, "val")
    report = inspect_dataset(dataset)
    cup, plate = dataset.class_names.index("cup"), dataset.class_names.index("plate")
    expected_objects = [0] * len(dataset.class_names)
    expected_objects[cup], expected_objects[plate] = 2, 1
    expected_crowds = [0] * len(dataset.class_names)
    expected_crowds[cup] = 1
    assert report["objects"] == expected_objects and report["crowd_regions"] == expected_crowds
    assert report["untrained_objects"] == 1 and report["images_without_objects"] == 2
    json.dumps(report)  # the --json file's keys are plain ints and lists
    text = format_report(report)
    cup_row = next(line for line in text.splitlines() if line.startswith("cup "))
    assert cup_row.split()[-2:] == ["2", "1"]
    assert "objects: 3 trained on, 1 not" in text and "images without an object to train on: 2" in text


def test_semantic_data_has_no_instance_keys_nor_columns(tmp_path):
    class Two(SegmentationDataset):
        class_names = ("a", "b")

        def __len__(self):
            return 1

        def load(self, index):
            return Sample(image=np.zeros((2, 2, 3), np.uint8), mask=np.array([[0, 1], [1, 1]], np.uint8), name="x")

    report = inspect_dataset(Two())
    assert "objects" not in report and "objects" not in format_report(report)


def test_image_sizes_of_a_reader_without_image_headers_is_an_empty_list():
    """Neither ``items`` nor ``image_size``, or ``items`` (as check() names them) without
    ``image_size``: no header to read, so no size, and never None."""
    ds = _InMemory([[[0, 1]]])
    assert image_sizes(ds) == []
    ds.items = [("m0.png", None)]
    assert image_sizes(ds) == []

