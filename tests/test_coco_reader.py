"""COCO reader: what pycocotools would read differently from pixelwise is a check() problem (ids used
twice, negative box sizes and areas); boxes under 1 px are not trained on but are ground truth."""

from __future__ import annotations

import json

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
