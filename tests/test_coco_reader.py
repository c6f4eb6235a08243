"""COCO reader: what pycocotools would read differently from pixelwise is a check() problem (ids used
twice, negative box sizes and areas); boxes under 1 px are not trained on but are ground truth."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from pixelwise.data import sample_target
from pixelwise.data.coco import COCOInstances
from pixelwise.errors import UserError


def _tree(tmp_path) -> dict:
    """Three 40x50 images (ids 1, 2, 3), two categories (ids 4 and 9), two objects in image 1, one
    in image 2, none in image 3."""
    (tmp_path / "val2017").mkdir()
    images = []
    for image_id in (1, 2, 3):
        Image.fromarray(np.full((40, 50, 3), 80, np.uint8)).save(tmp_path / "val2017" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 50, "height": 40})

    def rect(ann_id, image_id, cat, x, y, w, h, **extra):
        return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0, "area": float(w * h),
                "bbox": [x, y, w, h], "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], **extra}

    data = {"images": images,
            "annotations": [rect(11, 1, 4, 5, 5, 20, 10), rect(12, 1, 9, 30, 20, 10, 10), rect(13, 2, 4, 2, 2, 8, 8)],
            "categories": [{"id": 4, "name": "cup"}, {"id": 9, "name": "fork"}]}
    _write(tmp_path, data)
    return data


def _write(tmp_path, data: dict) -> None:
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))


def test_a_clean_file_has_no_problems(tmp_path):
    _tree(tmp_path)
    ds = COCOInstances(tmp_path, "val")
    assert ds.check() == [] and ds.notes() == []


def test_duplicate_annotation_ids_are_a_problem_of_each_image_concerned(tmp_path):
    data = _tree(tmp_path)
    data["annotations"][2]["id"] = 11  # image 2's object has the id of one of image 1's
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    problems = [str(p) for p in ds.check()]
    assert len(problems) == 2, problems
    assert all("annotation id 11 is used by 2 annotations of the file (of images 1, 2)" in p
               and "give each annotation its own id" in p for p in problems)
    assert [p.split(": ", 1)[0].rsplit("#", 1)[1] for p in problems] == ["1", "2"]  # the images' entries
    with pytest.raises(UserError, match="2 problem"):
        ds.check_or_refuse(skip_invalid=False, purpose="train")
    assert len(ds.check_or_refuse(skip_invalid=True, purpose="train")) == 2 and len(ds) == 1  # image 3 stays

    data["annotations"][2]["id"] = 13
    data["annotations"][1]["id"] = 11  # twice within one image: one line
    _write(tmp_path, data)
    problems = COCOInstances(tmp_path, "val").check()
    assert len(problems) == 1 and problems[0].path.endswith("instances_val2017.json#1")
    assert "(of images 1, 1)" in problems[0].message


def test_duplicate_image_ids_are_a_problem_and_never_loaded_with_another_images_objects(tmp_path):
    data = _tree(tmp_path)
    # a fourth entry with image 1's id but image 3's file: pycocotools keeps it, 1.png would vanish
    data["images"].append({**data["images"][0], "file_name": "3.png"})
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    problems = ds.check()
    assert [str(p).split("instances_val2017.json")[1] for p in problems] == [
        "#1: image id 1 is listed 2 times (files 1.png, 3.png); pycocotools keeps the last entry and gives it the "
        "objects of all: give each image its own id"]
    with pytest.raises(UserError, match="image id 1 is listed 2 times"):
        ds.load(0)  # without the check: refused, not 3.png with 1.png's objects
    ds.check_or_refuse(skip_invalid=True, purpose="evaluate")
    assert [ds.load(i).meta["image_id"] for i in range(len(ds))] == [2, 3]


def test_duplicate_category_ids_are_a_problem(tmp_path):
    data = _tree(tmp_path)
    data["categories"].append({"id": 4, "name": "mug"})
    _write(tmp_path, data)
    problems = COCOInstances(tmp_path, "val").check()
    assert len(problems) == 1 and problems[0].path.endswith("instances_val2017.json")
    assert problems[0].message.startswith("category id 4 is listed 2 times (names 'cup', 'mug')")
    assert problems[0].message.endswith("give each category its own id")
    with pytest.raises(UserError, match="category id 4 is listed 2 times"):
        COCOInstances(tmp_path, "val").check_or_refuse(skip_invalid=False, purpose="train")


@pytest.mark.parametrize("change, words", [
    ({"bbox": [10, 10, -5, 20]}, "annotation 11 has bbox [10, 10, -5, 20] of negative width or height"),
    ({"bbox": [10, 10, 5, -0.5]}, "annotation 11 has bbox [10, 10, 5, -0.5] of negative width or height"),
    ({"area": -3}, "annotation 11 has area -3, not a non-negative number"),
    ({"area": "big"}, "annotation 11 has area 'big', not a non-negative number"),
])
def test_negative_box_sizes_and_areas_are_problems(tmp_path, change, words):
    data = _tree(tmp_path)
    data["annotations"][0].update(change)
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    problems = ds.check()
    assert len(problems) == 1 and words in str(problems[0]) and problems[0].path.endswith("#1"), problems
    with pytest.raises(UserError, match="annotation 11 of image 1"):
        ds.load(0)


def test_boxes_under_a_pixel_and_empty_masks_are_scored_not_trained_on(tmp_path):
    data = _tree(tmp_path)
    data["annotations"] += [
        # 0.9 px wide, 30 pixels of mask
        {"id": 20, "image_id": 1, "category_id": 9, "iscrowd": 0, "area": 27.0, "bbox": [40, 2, 0.9, 30],
         "segmentation": [[40, 2, 40.9, 2, 40.9, 32, 40, 32]]},
        # no width at all: an empty mask
        {"id": 21, "image_id": 3, "category_id": 4, "iscrowd": 0, "area": 0.0, "bbox": [1, 1, 0, 3],
         "segmentation": [[1, 1, 1, 1, 1, 4, 1, 4]]},
        # a crowd region of the same shape as 20
        {"id": 22, "image_id": 3, "category_id": 9, "iscrowd": 1, "area": 27.0, "bbox": [40, 2, 0.9, 30],
         "segmentation": [[40, 2, 40.9, 2, 40.9, 32, 40, 32]]},
    ]
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert ds.check() == []  # not a problem: training goes on without them
    notes = ds.notes()
    assert len(notes) == 1 and "2 annotation(s) with a bbox under 1 px wide or tall (ids 20, 21)" in notes[0]
    from pixelwise.data.inspect import format_report, inspect_dataset

    assert "note: " + notes[0] in format_report(inspect_dataset(ds, progress=False))  # data inspect shows it

    s = ds.load(0)
    assert s.instance_labels.tolist() == [1, 2] and s.instance_masks.shape == (2, 40, 50)  # trained: as before
    thin = s.meta["untrained"]
    assert thin["labels"] == [2] and thin["areas"] == [27.0] and thin["masks"].shape == (1, 40, 50)
    assert thin["masks"][0].sum() > 0 and (s.mask[thin["masks"][0]] == 0).all()  # not painted
    target = sample_target(s)
    assert target["labels"].tolist() == [1, 2, 2] and target["iscrowd"].tolist() == [0, 0, 0]
    assert target["area"].tolist() == [200.0, 100.0, 27.0]
    np.testing.assert_allclose(target["boxes"][2].numpy(), [40, 2, 40.9, 32], rtol=1e-6)

    target = sample_target(ds.load(2))  # image 3: an empty-mask object and a thin crowd region
    assert target["labels"].tolist() == [1, 2] and target["iscrowd"].tolist() == [0, 1]
    assert target["masks"].shape == (2, 40, 50) and not target["masks"][0].any() and target["masks"][1].any()


def _runs(mask: np.ndarray) -> list[int]:
    """COCO's run lengths of ``mask``, counted here: column-major, alternating 0s and 1s, 0s first."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def _expect_problem(tmp_path, data: dict, words: str) -> None:
    """Annotation 11 (image 1) is a named problem of image 1 only; load refuses it with a UserError
    (no crash); --skip-invalid drops image 1 and the rest loads."""
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    problems = [str(p) for p in ds.check()]
    assert len(problems) == 1 and "#1: annotation 11 " in problems[0] and words in problems[0], problems
    with pytest.raises(UserError, match="annotation 11 of image 1 .*fix it or use --skip-invalid"):
        ds.load(0)  # without the check: refused before pycocotools sees it
    with pytest.raises(UserError, match="1 problem"):
        ds.check_or_refuse(skip_invalid=False, purpose="train")
    assert len(ds.check_or_refuse(skip_invalid=True, purpose="train")) == 1
    assert [ds.load(i).meta["image_id"] for i in range(len(ds))] == [2, 3]


@pytest.mark.parametrize("value", [1e9, 1e7, -1e9, 10**30, 51.5, -1.5, float("nan"), float("inf")])
def test_a_polygon_point_far_outside_the_image_is_a_problem(tmp_path, value):
    # pycocotools would allocate memory in proportion to the coordinate (1e9: segfault or OOM kill)
    data = _tree(tmp_path)
    data["annotations"][0]["segmentation"] = [[5, 5, 25, 5, 25, 15, value, 15]]
    _expect_problem(tmp_path, data, f"has polygon point ({value!r}, 15) outside the 50x40 image")


def test_a_far_out_point_of_a_crowd_polygon_is_refused_by_load(tmp_path):
    data = _tree(tmp_path)
    data["annotations"][0].update(iscrowd=1, segmentation=[[5, 5, 25, 5, 25, 1e6, 5, 15]])
    _expect_problem(tmp_path, data, "has polygon point (25, 1000000.0) outside")


def test_a_polygon_slightly_over_the_border_is_fine(tmp_path):
    # real COCO polygons touch or cross the border by a fraction of a pixel: 1 px is allowed, as for bboxes
    data = _tree(tmp_path)
    data["annotations"][1].update(bbox=[30, 20, 20.5, 21], area=20.5 * 21,
                                  segmentation=[[30, 20, 50.5, 20, 51, 41, 30, 40.5]])
    data["annotations"][2]["segmentation"] = [[-0.5, 2, 10, -1, 10, 10, 2, 10]]
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert ds.check() == []
    s = ds.load(0)
    assert s.instance_masks.shape == (2, 40, 50) and s.instance_masks[:, 39, 49].any()  # the corner
    assert ds.load(1).instance_masks[0, 2, 0]  # the left edge, at x = -0.5


def _rle_tree(tmp_path, segmentation: dict, iscrowd: int = 0) -> dict:
    data = _tree(tmp_path)
    data["annotations"][0].update(segmentation=segmentation, iscrowd=iscrowd)
    return data


@pytest.mark.parametrize("counts, words", [
    ("garbage!!", "compressed counts are invalid (character 'r' at 2 is not one of '0'..'o')"),
    ("00 0", "compressed counts are invalid (character ' ' at 2 is not one of '0'..'o')"),
    ("", "compressed counts cover 0 pixels, not the 40x50 = 2000 of the image"),
    ("o", "compressed counts are invalid (the string ends inside value 1)"),  # continuation bit on the end
    ("P", "compressed counts are invalid (the string ends inside value 1)"),
    ("`", "compressed counts are invalid (the string ends inside value 1)"),  # 0x30: continuation
    ("@", "compressed counts decode to a negative count"),  # 0x10: the sign bit, -16
    ("3" * 3 + "@", "compressed counts decode to a negative count"),  # the fourth: 3 - 16 (a delta)
    ("d1", "compressed counts cover 52 pixels"),  # 0x34 (continuation, 20) then 1: 20 + 32
    ("0" * 200 + "3`1", "compressed counts cover"),
    ("oooooooooooooooooooo0", "longer than 13 characters"),
    ([1000, 999], "counts cover 1999 pixels, not the 40x50 = 2000"),
    ([1000, 1001], "counts cover 2001 pixels"),
    ([2001, -1], "counts are not all non-negative integers"),
    ([1000.0, 1000], "counts are not all non-negative integers"),
    ([], "counts cover 0 pixels"),
    (None, "counts are a NoneType, not a list or a compressed string"),
])
@pytest.mark.parametrize("iscrowd", [0, 1])
def test_bad_rle_counts_are_problems(tmp_path, counts, words, iscrowd):
    # pycocotools: a traceback ("garbage!!") or a mask of uninitialised memory ("")
    data = _rle_tree(tmp_path, {"size": [40, 50], "counts": counts}, iscrowd)
    _expect_problem(tmp_path, data, words)


def test_an_rle_of_another_size_is_a_problem(tmp_path):
    for size in ([50, 40], 2000, None):
        data = _rle_tree(tmp_path, {"size": size, "counts": [2000]})
        _expect_problem(tmp_path, data, f"has an RLE of size {size!r} on a 50x40 image")
        (tmp_path / "val2017").rename(tmp_path / f"old{size!s:.2}")
        (tmp_path / "annotations" / "instances_val2017.json").unlink()


@pytest.mark.parametrize("iscrowd", [0, 1])
def test_valid_rles_read_as_pycocotools_reads_them(tmp_path, iscrowd):
    from pycocotools import mask as mask_utils

    data = _tree(tmp_path)

    m = np.zeros((40, 50), np.uint8)
    m[5:15, 5:25] = 1
    m[20, 30:] = 1
    compressed = mask_utils.encode(np.asfortranarray(m))
    for seg in ({"size": [40, 50], "counts": compressed["counts"].decode()},
                {"size": [40, 50], "counts": _runs(m)}):
        data["annotations"][0].update(segmentation=seg, iscrowd=iscrowd)
        _write(tmp_path, data)
        ds = COCOInstances(tmp_path, "val")
        assert ds.check() == []
        s = ds.load(0)
        if iscrowd:
            assert s.meta["crowd"]["masks"][0].tolist() == m.astype(bool).tolist()
            assert (s.mask[5:15, 5:25] == 255).all()
        else:
            assert s.instance_masks[0].tolist() == m.astype(bool).tolist()


def test_load_turns_a_pycocotools_value_error_into_a_user_error(tmp_path):
    _tree(tmp_path)
    ds = COCOInstances(tmp_path, "val")

    def refuse(ann):
        raise ValueError("Invalid RLE mask representation")

    ds.coco.annToMask = refuse  # type: ignore[method-assign]
    with pytest.raises(UserError, match=r"instances_val2017.json: annotation 1\d of image 1 has a segmentation "
                                        r"pycocotools cannot read \(ValueError: Invalid RLE mask representation\)"):
        ds.load(0)


def test_the_rle_decoder_agrees_with_pycocotools_encoding_of_random_masks():
    from pycocotools import mask as mask_utils

    from pixelwise.data.coco import rle_counts_from_string

    rng = np.random.default_rng(0)
    masks = [np.zeros((40, 50), np.uint8), np.ones((40, 50), np.uint8), np.zeros((300, 400), np.uint8),
             np.ones((1, 1), np.uint8), np.zeros((1, 1), np.uint8), np.ones((1000, 900), np.uint8)]
    one = np.zeros((60, 70), np.uint8)
    one[59, 69] = 1
    masks.append(one)
    for density in (0.001, 0.05, 0.5, 0.95, 0.999):
        h, w = rng.integers(1, 300, size=2)
        masks.append((rng.random((h, w)) < density).astype(np.uint8))
    blobs = np.zeros((500, 700), np.uint8)  # long runs of varying length: multi-character values and deltas
    for _ in range(30):
        y, x, bh, bw = rng.integers(0, 500), rng.integers(0, 700), rng.integers(1, 200), rng.integers(1, 300)
        blobs[y:y + bh, x:x + bw] ^= 1
    masks.append(blobs)
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m))
        counts = rle_counts_from_string(rle["counts"])
        assert counts == _runs(m), m.shape  # independent reference: run lengths counted from the mask
        assert rle_counts_from_string(rle["counts"].decode()) == counts
        assert sum(counts) == m.size and all(c >= 0 for c in counts)


@pytest.mark.parametrize(("where", "bad", "message"), [
    ("images", "im1", "image id 'im1' is not a whole number"),
    ("images", "1", "image id '1' is not a whole number"),
    ("images", 1.5, "image id 1.5 is not a whole number"),
    ("categories", "c4", "category id 'c4' is not a whole number"),
    ("categories", True, "category id True is not a whole number"),
])
def test_ids_that_are_not_whole_numbers_are_refused_in_one_line(tmp_path, where, bad, message):
    """String or fractional ids were a ValueError or KeyError traceback (pycocotools reads them)."""
    data = _tree(tmp_path)
    old = data[where][0]["id"]
    data[where][0]["id"] = bad
    for a in data["annotations"]:
        key = "image_id" if where == "images" else "category_id"
        a[key] = bad if a[key] == old else a[key]
    _write(tmp_path, data)
    with pytest.raises(UserError, match=message + ".*renumber the " + where):
        COCOInstances(tmp_path, "val")


def test_ids_written_as_whole_floats_are_read_like_integers(tmp_path):
    data = _tree(tmp_path)
    for image in data["images"]:
        image["id"] = float(image["id"])
    for a in data["annotations"]:
        a["image_id"], a["category_id"] = float(a["image_id"]), float(a["category_id"])
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert ds.check() == [] and ds.category_ids == [0, 4, 9]
    sample = ds.load(0)
    assert sample.meta["image_id"] == 1 and sample.instance_labels.tolist() == [1, 2]


def test_an_annotation_whose_category_id_is_a_string_says_so(tmp_path):
    data = _tree(tmp_path)
    data["annotations"][0]["category_id"] = "4"
    _write(tmp_path, data)
    problems = [str(p) for p in COCOInstances(tmp_path, "val").check()]
    assert len(problems) == 1 and "unknown category_id '4' (a string: ids are numbers)" in problems[0], problems


def test_training_refuses_a_val_split_with_other_categories(tmp_path):
    """A val file lacking a category validated the model's class k against another class's objects
    (mask AP 0.15 for a model eval scores 0.39) and picked best.safetensors on it."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import open_datasets

    data = _tree(tmp_path)
    train = json.loads(json.dumps(data))
    (tmp_path / "train2017").symlink_to(tmp_path / "val2017")
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    cfg = TrainConfig(model="maskrcnn_resnet18_fpn", dataset="coco", data=str(tmp_path))
    open_datasets(cfg, log=lambda _: None)  # the same categories: fine
    data["categories"] = [{"id": 4, "name": "cup"}, {"id": 10, "name": "fork"}]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 4]
    _write(tmp_path, data)
    with pytest.raises(UserError, match=r"the val split's COCO category ids \(0, 4, 10\) are not the train split's "
                                        r"\(0, 4, 9\): validation would score each class against another's"):
        open_datasets(cfg, log=lambda _: None)
    data["categories"] = [{"id": 4, "name": "cup"}]
    _write(tmp_path, data)
    with pytest.raises(UserError, match=r"the val split's classes \(background, cup\) are not the train split's "
                                        r"\(background, cup, fork\)"):
        open_datasets(cfg, log=lambda _: None)


def test_validation_detects_in_batches_of_one_size_only(tmp_path):
    """Mask R-CNN pads a batch to its largest image, which changes the other images' detections, so
    validation batched by --batch-size scored other detections than eval (box AP75 0.144 vs 0.203)
    and picked best.safetensors on them. Mixed sizes are now detected image by image, as eval does."""
    import torch
    from torch.utils.data import DataLoader

    from pixelwise.data import collate
    from pixelwise.engine.validate import ScoredInstances, validate_instances

    data = _tree(tmp_path)
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, images, targets=None):
            if targets is not None:
                return {"loss": torch.tensor(1.0)}
            calls.append([tuple(im.shape[1:]) for im in images])
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                     "scores": torch.zeros(0), "masks": torch.zeros(0, 1, *im.shape[1:])} for im in images]

    def validate():
        calls.clear()
        ds = COCOInstances(tmp_path, "val")
        validate_instances(Recorder(), DataLoader(ScoredInstances(ds), batch_size=3, collate_fn=collate), ds,
                           torch.device("cpu"), show=False)
        return list(calls)

    assert validate() == [[(40, 50)] * 3]  # one size: one call
    Image.fromarray(np.full((30, 60, 3), 80, np.uint8)).save(tmp_path / "val2017" / "2.png")
    data["images"][1].update(width=60, height=30)
    data["annotations"][2]["segmentation"] = [[2, 2, 10, 2, 10, 10, 2, 10]]
    _write(tmp_path, data)
    assert validate() == [[(40, 50)], [(30, 60)], [(40, 50)]]


def test_own_files_per_split_with_split_placeholder_and_paths_under_the_root(tmp_path):
    """ann_file/image_dir applied to both splits (a user's train.json and val.json could not be
    given), were not found relative to --data, and still needed --data when both were given."""
    from pixelwise.data import build_dataset

    data = _tree(tmp_path)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "val.json").write_text(json.dumps(data))
    train = {**data, "images": data["images"][:1], "annotations": data["annotations"][:2]}
    (tmp_path / "labels" / "train.json").write_text(json.dumps(train))
    (tmp_path / "pictures").mkdir()
    (tmp_path / "val2017").rename(tmp_path / "pictures" / "val")
    (tmp_path / "pictures" / "train").symlink_to(tmp_path / "pictures" / "val")
    kw = {"ann_file": "labels/{split}.json", "image_dir": "pictures/{split}"}
    assert [len(build_dataset("coco", str(tmp_path), s, **kw)) for s in ("train", "val")] == [1, 3]
    absolute = {k: str(tmp_path / v) for k, v in kw.items()}
    val = build_dataset("coco", None, "val", **absolute)  # no --data needed
    assert len(val) == 3 and val.ann_file == tmp_path / "labels" / "val.json"
    assert val.load(0).instance_labels.tolist() == [1, 2]
    with pytest.raises(UserError, match="needs --data"):
        build_dataset("coco", None, "val", ann_file=absolute["ann_file"])


@pytest.mark.parametrize("value", ["x", -1, 2, 1.5, float("nan"), None, []])
def test_an_iscrowd_other_than_0_or_1_is_a_problem(tmp_path, value):
    """Any truthy value made the object an ignored crowd region (pycocotools takes int(): 1.5 is 1
    there, 0.5 is 0); an empty list or null made it an object."""
    data = _tree(tmp_path)
    data["annotations"][0]["iscrowd"] = value
    _expect_problem(tmp_path, data, f"has iscrowd {value!r}, not 0 or 1")


@pytest.mark.parametrize("value", [True, False, 1.0])
def test_iscrowd_true_false_and_1_0_are_read_as_1_and_0(tmp_path, value):
    data = _tree(tmp_path)
    data["annotations"][0]["iscrowd"] = value
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert ds.check() == []
    assert (ds.load(0).mask == 255).any() == bool(value)  # a crowd region is ignored in the semantic mask


@pytest.mark.parametrize("where, key, value, words", [
    ("categories", "name", None, "category 4 has name None, not text"),
    ("categories", "name", ["cup"], "category 4 has name ['cup'], not text"),
    ("annotations", "image_id", True, "annotation 11 has image_id true, not a number"),
    ("annotations", "category_id", True, "annotation 11 has category_id true, not a number"),
])
def test_names_that_are_not_text_and_ids_that_are_true_are_refused(tmp_path, where, key, value, words):
    """A name of null became the class 'None'; an annotation's image_id true joined image 1 (True == 1
    in Python), while the same true as an image's own id was refused."""
    data = _tree(tmp_path)
    data[where][0][key] = value
    _write(tmp_path, data)
    with pytest.raises(UserError, match=re.escape(words)):
        COCOInstances(tmp_path, "val")


def test_semantic_training_on_coco_sees_the_drawn_masks(tmp_path):
    """The check before training read the masks as files; COCO's are drawn from the JSON, so every
    read failed and semantic training on COCO was refused: "no labelled pixel"."""
    from pixelwise.data.inspect import label_presence
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import check_training_data

    data = _tree(tmp_path)
    ds = COCOInstances(tmp_path, "val")
    assert label_presence(ds) == (True, True)
    check_training_data(TrainConfig(model="unet", dataset="coco", data=str(tmp_path)), ds, ds)  # no refusal
    data["annotations"] = [dict(a, iscrowd=1) for a in data["annotations"]]  # crowds only: no class to learn
    _write(tmp_path, data)
    assert label_presence(COCOInstances(tmp_path, "val")) == (True, False)


def test_a_missing_annotation_file_is_named_not_a_traceback(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(UserError, match="instances_val2017.json: annotation file not found"):
        COCOInstances(tmp_path, "val")


@pytest.mark.parametrize("key", ["width", "height"])
def test_an_image_of_size_0_is_refused(tmp_path, key):
    data = _tree(tmp_path)
    data["images"][1][key] = 0
    _write(tmp_path, data)
    with pytest.raises(UserError, match="image 2 needs a file_name and a width and height that are whole numbers "
                                        "above 0"):
        COCOInstances(tmp_path, "val")


def test_a_box_exactly_1_px_wide_or_tall_is_trained_and_not_noted(tmp_path):
    data = _tree(tmp_path)
    data["annotations"] += [  # 1 px is not "under 1 px": these are training instances
        {"id": 20, "image_id": 3, "category_id": 4, "iscrowd": 0, "area": 10.0, "bbox": [3, 2, 1, 10],
         "segmentation": [[3, 2, 4, 2, 4, 12, 3, 12]]},
        {"id": 21, "image_id": 3, "category_id": 9, "iscrowd": 0, "area": 10.0, "bbox": [10, 2, 10, 1],
         "segmentation": [[10, 2, 20, 2, 20, 3, 10, 3]]},
    ]
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert ds.check() == [] and ds.notes() == []
    s = ds.load(2)
    assert s.instance_labels.tolist() == [1, 2] and s.meta["untrained"]["labels"] == []
    np.testing.assert_allclose(s.boxes, [[3, 2, 4, 12], [10, 2, 20, 3]])


def test_eval_predictions_scores_every_image_whatever_the_training_only_options(tmp_path):
    """``skip_empty`` leaves images without objects out of training, never out of a score: eval
    --predictions drops it as eval --checkpoint does, and scores image 3 (no objects) too."""
    from pixelwise.inference.evaluate import evaluate_predictions

    _tree(tmp_path)
    out = tmp_path / "pred"
    out.mkdir()
    for image_id in (1, 2, 3):
        Image.fromarray(np.zeros((40, 50), np.uint8), mode="L").save(out / f"{image_id}.png")
    metrics = evaluate_predictions(out, "coco", str(tmp_path), "val", dataset_kwargs={"skip_empty": True},
                                   bf=False)
    assert metrics["num_images"] == 3 and [row["name"] for row in metrics["per_image"]] == ["1", "2", "3"]
    assert metrics["provenance"]["dataset"]["options"] == {}
    background = metrics["per_class"][0]
    assert background["pixels"] == 3 * 40 * 50 - (200 + 100 + 64)  # every pixel but the three objects' own



def test_eval_predictions_refuses_category_ids_given_as_labels(tmp_path):
    """Another tool's <stem>.json with the COCO category id as ``label`` (and as ``category_id``, no
    ``class_name``): ids 2 and 3 are within the classes 1-3, so cup was scored as fork and fork as
    knife without a word, although ``category_id`` tells the data's ids apart from its indices."""
    from pycocotools import mask as mask_utils

    from pixelwise.inference.evaluate import evaluate_predictions

    data = _tree(tmp_path)
    for ann in data["annotations"]:
        ann["category_id"] = {4: 2, 9: 3}[ann["category_id"]]
    data["categories"] = [{"id": 2, "name": "cup"}, {"id": 3, "name": "fork"}, {"id": 5, "name": "knife"}]
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert ds.category_ids == [0, 2, 3, 5]
    out = tmp_path / "pred"
    out.mkdir()
    for i in range(len(ds)):
        s = ds.load(i)
        instances = []
        for mask, label, box in zip(s.instance_masks, s.instance_labels, s.boxes):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            category = ds.category_ids[int(label)]
            instances.append({"label": category, "category_id": category, "score": 0.9,
                              "box": [float(v) for v in box],
                              "segmentation": {"size": [40, 50], "counts": rle["counts"].decode("ascii")}})
        (out / f"{s.name}.json").write_text(json.dumps({"width": 50, "height": 40, "instances": instances}))
    with pytest.raises(UserError, match=re.escape("has label 2 and category_id 2, but the data's class 2 'fork' "
                                                  "has category id 3")):
        evaluate_predictions(out, "coco", str(tmp_path), "val", bf=False, progress=False)


def test_category_names_given_twice_or_empty_are_told_apart_by_their_ids(tmp_path):
    """Public annotation files repeat names; two classes of one name could not be told apart in reports
    and the legend, and a checkpoint of them could not be saved."""
    data = _tree(tmp_path)
    data["categories"] = [{"id": 4, "name": "cup"}, {"id": 9, "name": "cup"}, {"id": 12, "name": " "},
                          {"id": 15, "name": "background"}, {"id": 20, "name": "fork"}]
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert ds.class_names == ["background", "cup (id 4)", "cup (id 9)", "category_12", "background (id 15)", "fork"]
    assert ds.category_ids == [0, 4, 9, 12, 15, 20]


HUGE = 10**400  # JSON holds it; math.isfinite() raises OverflowError on it


@pytest.mark.parametrize(("change", "words"), [
    (lambda d: d["annotations"][0].__setitem__("bbox", [0, 0, HUGE, 5]), "annotation 11 has bbox"),
    (lambda d: d["annotations"][0].__setitem__("area", HUGE), "annotation 11 has area"),
])
def test_an_annotation_number_beyond_a_floats_range_is_a_problem(tmp_path, change, words):
    data = _tree(tmp_path)
    change(data)
    _write(tmp_path, data)
    problems = [str(p) for p in COCOInstances(tmp_path, "val").check()]
    assert len(problems) == 1 and words in problems[0], problems


@pytest.mark.parametrize(("change", "words"), [
    (lambda d: d["images"][0].__setitem__("height", HUGE), "image 1 needs a file_name and a width and height"),
    (lambda d: d["images"][0].__setitem__("id", HUGE), "is not a whole number"),
    (lambda d: d["categories"][0].__setitem__("id", HUGE), "category id"),
])
def test_an_image_or_category_number_beyond_a_floats_range_is_refused(tmp_path, change, words):
    data = _tree(tmp_path)
    change(data)
    _write(tmp_path, data)
    with pytest.raises(UserError, match=words):
        COCOInstances(tmp_path, "val")


def test_an_annotation_file_nested_past_the_recursion_limit_is_refused(tmp_path):
    _tree(tmp_path)
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(UserError, match="not a valid COCO annotation file"):
        COCOInstances(tmp_path, "val")


def test_skip_empty_also_leaves_out_images_whose_objects_are_all_untrained(tmp_path):
    """skip_empty drops images with no training instance (as torchvision's recipe drops those whose
    boxes are all 1 px or less): an image whose only object is under 1 px wide is not trained on
    either, so it stays out like an image with no objects (it was kept, an empty image in training)."""
    data = _tree(tmp_path)
    data["annotations"].append({"id": 20, "image_id": 3, "category_id": 9, "iscrowd": 0, "area": 27.0,
                                "bbox": [40, 2, 0.9, 30], "segmentation": [[40, 2, 40.9, 2, 40.9, 32, 40, 32]]})
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val", skip_empty=True)
    assert [ds.image_id_of(ref) for _, ref in ds.items] == [1, 2]
    assert len(COCOInstances(tmp_path, "val")) == 3  # scored splits keep it


def test_skip_empty_that_leaves_no_image_says_so_not_that_no_images_were_found(tmp_path):
    data = _tree(tmp_path)
    for a in data["annotations"]:
        a["iscrowd"] = 1
    _write(tmp_path, data)
    with pytest.raises(UserError) as e:
        COCOInstances(tmp_path, "val", skip_empty=True)
    assert "skip_empty" in str(e.value) and "3 images" in str(e.value) and "no images found" not in str(e.value)


@pytest.mark.parametrize("split, change, words", [
    ("train", "crowd", "the train split has no object to train on"),
    ("val", "none", "the val split has no object (no annotation that is not a crowd region), so COCO's AP is "
                    "undefined"),
])
def test_training_refuses_a_split_without_objects_before_writing(tmp_path, split, change, words):
    """A training split whose objects were all crowds trained to exit 0 learning nothing, and a val
    split without objects trained to 'best epoch None (by mask_AP):' with no best.safetensors, as
    the semantic runs' all-ignore splits did before they were refused."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import fit

    data = _tree(tmp_path)
    (tmp_path / "train2017").symlink_to(tmp_path / "val2017")
    other = json.loads(json.dumps(data))
    if change == "crowd":
        for a in other["annotations"]:
            a["iscrowd"] = 1
    else:
        other["annotations"] = []
    for name, d in (("train", other if split == "train" else data), ("val", other if split == "val" else data)):
        (tmp_path / "annotations" / f"instances_{name}2017.json").write_text(json.dumps(d))
    cfg = TrainConfig(model="maskrcnn_resnet18_fpn", dataset="coco", data=str(tmp_path), out=str(tmp_path / "run"),
                      epochs=1, batch_size=3, progress=False, model_kwargs={"min_size": 32, "max_size": 32})
    with pytest.raises(UserError, match=re.escape(words)):
        fit(cfg, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_box_of_zero_height_is_scored_not_trained_on_and_not_a_problem(tmp_path):
    """Width 0 and height 0 alike are under 1 px, not negative: a note and ``meta["untrained"]``,
    never a check() problem or a refusal (only a negative size is)."""
    data = _tree(tmp_path)
    data["annotations"].append({"id": 20, "image_id": 3, "category_id": 9, "iscrowd": 0, "area": 0.0,
                                "bbox": [10, 2, 10, 0], "segmentation": [[10, 2, 20, 2, 20, 2, 10, 2]]})
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert ds.check() == []
    assert len(ds.notes()) == 1 and "1 annotation(s) with a bbox under 1 px wide or tall (ids 20)" in ds.notes()[0]
    s = ds.load(2)
    assert s.instance_labels.tolist() == [] and s.meta["untrained"]["labels"] == [2]
    assert s.meta["untrained"]["bboxes"] == [[10.0, 2.0, 10.0, 0.0]]


def test_a_box_under_one_pixel_tall_whose_mask_has_pixels_is_not_trained_on(tmp_path):
    """Height 0.9 (width 10) with a non-empty mask: untrained by its box alone, as a 0.9-wide one is."""
    data = _tree(tmp_path)
    data["annotations"].append({"id": 20, "image_id": 3, "category_id": 9, "iscrowd": 0, "area": 9.0,
                                "bbox": [10, 2, 10, 0.9], "segmentation": [[10, 2, 20, 2, 20, 2.9, 10, 2.9]]})
    _write(tmp_path, data)
    s = COCOInstances(tmp_path, "val").load(2)
    assert s.instance_labels.tolist() == [] and s.meta["untrained"]["labels"] == [2]
    assert s.meta["untrained"]["masks"][0].sum() > 0 and (s.mask[s.meta["untrained"]["masks"][0]] == 0).all()


def test_the_orphan_ids_and_the_thin_annotations_are_listed_five_then_an_ellipsis(tmp_path):
    data = _tree(tmp_path)
    base = data["annotations"][2]
    orphans = [{**base, "id": 70 + i, "image_id": 71 + i} for i in range(5)]  # image ids the file does not list
    thin = [{**base, "id": 20 + i, "image_id": 3, "bbox": [2, 2, 0.5, 8], "area": 4.0,
             "segmentation": [[2, 2, 2.5, 2, 2.5, 10, 2, 10]]} for i in range(5)]
    data["annotations"] += orphans + thin
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    problems = [p.message for p in ds.check()]
    assert problems == ["annotations of 5 image id(s) the file does not list under images: 71, 72, 73, 74, 75"]
    assert "5 annotation(s) with a bbox under 1 px wide or tall (ids 20, 21, 22, 23, 24) are" in ds.notes()[0]
    data["annotations"] += [{**orphans[0], "id": 90, "image_id": 76}, {**thin[0], "id": 25}]  # a sixth of each
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert [p.message for p in ds.check()] == [
        "annotations of 6 image id(s) the file does not list under images: 71, 72, 73, 74, 75, ..."]
    assert "6 annotation(s) with a bbox under 1 px wide or tall (ids 20, 21, 22, 23, 24, ...) are" in ds.notes()[0]


def test_more_than_254_categories_are_refused(tmp_path):
    """Labels 1..C and 255 (ignore) share the uint8 semantic mask: 254 categories fit, 255 do not."""
    data = _tree(tmp_path)
    data["categories"] += [{"id": 100 + i, "name": f"c{i}"} for i in range(252)]  # 254 in all
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert len(ds.class_names) == 255 and ds.category_ids[-1] == 351
    data["categories"].append({"id": 400, "name": "one too many"})
    _write(tmp_path, data)
    with pytest.raises(UserError, match="255 categories; at most 254 are supported"):
        COCOInstances(tmp_path, "val")


def test_an_object_of_an_unlisted_category_is_neither_painted_nor_ignored_by_load(tmp_path):
    """``iscrowd`` may be left out (0: an object); an object whose category the file does not list
    is a check() problem, and load() leaves it out: its pixels stay background, not 255 (ignore)."""
    data = _tree(tmp_path)
    for a in data["annotations"]:
        del a["iscrowd"]
    data["annotations"].append({"id": 20, "image_id": 3, "category_id": 5, "area": 64.0, "bbox": [2, 2, 8, 8],
                                "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]})
    _write(tmp_path, data)
    ds = COCOInstances(tmp_path, "val")
    assert [p.message for p in ds.check()] == ["annotation 20 has unknown category_id 5"]
    s = ds.load(2)
    assert s.instance_labels.tolist() == [] and (s.mask == 0).all()
    assert s.meta["crowd"]["labels"] == [] and s.meta["untrained"]["labels"] == []
    s = ds.load(0)  # objects without iscrowd are instances
    assert s.instance_labels.tolist() == [1, 2] and not (s.mask == 255).any()
