"""Readers on small synthetic trees built in tmp_path: layouts, label mapping, splits, check/drop."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelwise.data import DATASETS, base, build_dataset
from pixelwise.data.ade20k import ADE20K
from pixelwise.data.base import Sample, SegmentationDataset, sample_target
from pixelwise.data.cityscapes import Cityscapes
from pixelwise.data.coco import COCOInstances
from pixelwise.data.folder import FolderDataset, inferred_class_count, val_stems
from pixelwise.data.io import write_mask
from pixelwise.data.shapes import ShapesDataset
from pixelwise.data.voc import VOCSegmentation
from pixelwise.errors import UserError

RNG = np.random.default_rng(1)


def _img(path, h, w, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def _mask(path, m, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mask(path, m, palette)


# ---------------------------------------------------------------------------------------------- VOC
def _voc_tree(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    masks = {}
    for stem in ("2007_000001", "2007_000002", "2007_000003"):
        _img(voc / "JPEGImages" / f"{stem}.jpg", 12, 16)
        m = RNG.integers(0, 21, (12, 16)).astype(np.uint8)
        m[0, :] = 255
        _mask(voc / "SegmentationClass" / f"{stem}.png", m)
        masks[stem] = m
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000001\n2007_000002\n")
    (sets / "val.txt").write_text("2007_000003\n")
    return voc, masks


@pytest.mark.parametrize("which", ["devkit", "voc2012", "parent"])
def test_voc_roots_and_masks(tmp_path, which):
    voc, masks = _voc_tree(tmp_path)
    root = {"devkit": voc.parent, "voc2012": voc, "parent": tmp_path}[which]
    ds = VOCSegmentation(root, "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.class_names[15] == "person"
    s = ds.load(1)
    assert s.image.shape == (12, 16, 3) and s.name == "2007_000002"
    np.testing.assert_array_equal(s.mask, masks["2007_000002"])  # palette indices, never colours
    assert len(VOCSegmentation(root, "val")) == 1
    assert ds.check() == []
    assert ds.palette[1] == (128, 0, 0) and ds.palette[15] == (192, 128, 128)  # standard VOC colours


def test_voc_train_aug_from_sbd_mat(tmp_path):
    from scipy.io import savemat

    voc, masks = _voc_tree(tmp_path)
    sbd = tmp_path / "sbd"
    (sbd / "cls").mkdir(parents=True)
    extra = RNG.integers(0, 21, (12, 16)).astype(np.uint8)
    savemat(sbd / "cls" / "2008_000009.mat", {"GTcls": {"Segmentation": extra}})
    savemat(sbd / "cls" / "2007_000003.mat", {"GTcls": {"Segmentation": extra}})
    _img(voc / "JPEGImages" / "2008_000009.jpg", 12, 16)
    (sbd / "train.txt").write_text("2008_000009\n2007_000003\n")
    (sbd / "val.txt").write_text("")
    ds = VOCSegmentation(voc, "train_aug", sbd_root=str(sbd))
    names = [ds.name_of(i) for i, _ in ds.items]
    assert names == ["2007_000001", "2007_000002", "2008_000009"]  # VOC val (..03) excluded
    np.testing.assert_array_equal(ds.load(2).mask, extra)
    assert ds.check() == []
    with pytest.raises(UserError, match="train_aug"):
        VOCSegmentation(voc, "train_aug")


def test_voc_train_aug_from_segmentationclassaug(tmp_path):
    voc, masks = _voc_tree(tmp_path)
    for stem in ("2007_000001", "2007_000003", "2009_000001"):
        _mask(voc / "SegmentationClassAug" / f"{stem}.png", masks.get(stem, masks["2007_000001"]))
    _img(voc / "JPEGImages" / "2009_000001.jpg", 12, 16)
    ds = VOCSegmentation(voc, "train_aug")
    # VOC train (..01, ..02) joins the Aug masks (mmseg's converter writes only SBD's there), minus val (..03);
    # VOC's own PNG where it has one, as the sbd_root route does
    assert [ds.name_of(i) for i, _ in ds.items] == ["2007_000001", "2007_000002", "2009_000001"]
    assert [Path(m).parent.name for _, m in ds.items] == ["SegmentationClass"] * 2 + ["SegmentationClassAug"]
    np.testing.assert_array_equal(ds.load(1).mask, masks["2007_000002"])
    (voc / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("2009_000001\n2007_000002\n")  # mmseg's list
    listed = VOCSegmentation(voc, "train_aug")
    assert [listed.name_of(i) for i, _ in listed.items] == ["2009_000001", "2007_000002"]


def test_voc_class_names_are_the_devkit_classes_in_order():
    # VOCdevkit's VOCinit.m lists the 20 classes in this order; index 0 is background
    devkit = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
              "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    assert VOCSegmentation.class_names == ["background", *devkit]


def test_voc_a_stem_listed_twice_is_used_once_and_skip_invalid_drops_a_missing_mask(tmp_path):
    voc, _ = _voc_tree(tmp_path)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000002\n2007_000001\n")
    ds = VOCSegmentation(voc, "train")
    assert [ds.name_of(i) for i, _ in ds.items] == ["2007_000001", "2007_000002"]
    assert len(ds.notes()) == 1 and "lists 1 image(s) more than once (first: 2007_000001.jpg)" in ds.notes()[0]
    (voc / "SegmentationClass" / "2007_000002.png").unlink()
    kept = VOCSegmentation(voc, "train", skip_invalid=True)
    assert [kept.name_of(i) for i, _ in kept.items] == ["2007_000001"]


def test_voc_download_fetches_the_published_trainval_tar(tmp_path, monkeypatch):
    import pixelwise.data.voc as voc_module

    calls = []

    def fetched(archive, root):  # stands in for the 2 GB download: unpacks a small tree
        calls.append((archive.url, archive.sha256, archive.size, Path(root)))
        _voc_tree(Path(root))

    monkeypatch.setattr(voc_module, "download_and_extract", fetched)
    ds = VOCSegmentation(tmp_path, "train", download=True)
    assert len(ds) == 2
    # the file and its size and SHA-256 as tensorflow/datasets publishes them (url_checksums/voc.txt)
    assert calls == [("https://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                      "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb", 1999639040, tmp_path)]
    assert len(VOCSegmentation(tmp_path, "train", download=True)) == 2 and len(calls) == 1  # present: not again


# ---------------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_label_ids_to_train_ids(tmp_path):
    raw = np.array([[7, 8, 26, 33], [0, 5, 255, 24], [23, 31, 16, 11]], dtype=np.uint8)
    expected = np.array([[0, 1, 13, 18], [255, 255, 255, 11], [10, 16, 255, 2]], dtype=np.uint8)
    for split, city in (("train", "aachen"), ("val", "lindau")):
        name = f"{city}_000000_000019"
        _img(tmp_path / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", 3, 4)
        _mask(tmp_path / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", raw)
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 1 and ds.num_classes == 19 and ds.class_names[13] == "car"
    assert ds.palette[0] == (128, 64, 128)
    s = ds.load(0)
    assert s.name == "aachen_000000_000019"
    np.testing.assert_array_equal(s.mask, expected)
    assert ds.check() == []
    with pytest.raises(UserError, match="cityscapes-dataset.com"):
        Cityscapes(tmp_path, "train", download=True)


# ------------------------------------------------------------------------------------------- ADE20K
def test_ade20k_shift_and_out_of_range(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150], [2, 75, 0]], dtype=np.uint8)
    _img(root / "images" / "training" / "ADE_train_00000001.jpg", 2, 3)
    _mask(root / "annotations" / "training" / "ADE_train_00000001.png", raw)
    _img(root / "images" / "training" / "ADE_train_00000002.jpg", 2, 3)
    _mask(root / "annotations" / "training" / "ADE_train_00000002.png", np.full((2, 3), 151, np.uint8))
    ds = ADE20K(tmp_path, "train")  # parent of ADEChallengeData2016 is accepted
    assert len(ds) == 2 and ds.num_classes == 150 and ds.class_names[0] == "wall"
    np.testing.assert_array_equal(ds.load(0).mask, [[255, 0, 149], [1, 74, 255]])
    problems = ds.check()
    assert len(problems) == 1 and problems[0].path.endswith("ADE_train_00000002.png")
    assert "151" in problems[0].message
    assert len(ADE20K(root, "train", skip_invalid=True)) == 1



def test_check_item_reads_labels_by_default_and_load_keeps_both_paths(tmp_path):
    """FilePairDataset.check_item (ADE20K does not override it) decodes the mask unless labels=False;
    load() puts the item's image and mask paths in meta; an item whose mask ref is None (files.py:
    "mask_ref may be None when the mask is missing") is a UserError naming the image, not a crash."""
    root = tmp_path / "ADEChallengeData2016"
    _img(root / "images" / "training" / "ADE_train_00000001.jpg", 2, 3)
    _mask(root / "annotations" / "training" / "ADE_train_00000001.png", np.full((2, 3), 151, np.uint8))
    ds = ADE20K(root, "train")
    image, mask = ds.items[0]
    found = ds.check_item(image, mask)
    assert [p.path for p in found] == [mask] and found[0].message.startswith("label values 151 outside")
    assert ds.check_item(image, mask, labels=False) == []
    assert ds.load(0).meta == {"image_path": image, "mask_path": mask}
    ds.items = [(image, None)]
    with pytest.raises(UserError, match=f"^{re.escape(image)}: no mask for this image"):
        ds.load(0)

# official cityscapesScripts labels.py: label id -> train id of the 19 evaluated classes; every other id of 0..33 -> 255
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# and the names and colours labels.py gives those classes, in train-id order
CITYSCAPES_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                    "bicycle"]
CITYSCAPES_COLOURS = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                      (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]


def test_cityscapes_every_label_id_and_the_ids_beyond_33(tmp_path):
    """All 34 label ids (and 255) map as labels.py says; 34 and 254 are not Cityscapes labels."""
    raw = np.array([list(range(0, 12)), list(range(12, 24)), list(range(24, 34)) + [255, 255]], np.uint8)
    expected = np.vectorize(lambda v: CITYSCAPES_TRAIN_IDS.get(int(v), 255))(raw).astype(np.uint8)
    beyond = np.full((3, 12), 7, np.uint8)
    beyond[0, 0], beyond[2, 5] = 34, 254
    for split, city, mask in (("test", "berlin", raw), ("val", "lindau", beyond)):
        name = f"{city}_000000_000019"
        _img(tmp_path / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", 3, 12)
        _mask(tmp_path / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", mask)
    _img(tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.png", 3, 12)
    _mask(tmp_path / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png", raw)
    assert Cityscapes.class_names == CITYSCAPES_NAMES and Cityscapes.palette == CITYSCAPES_COLOURS
    _img(tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png", 3, 12)
    _mask(tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", raw)
    assert [Path(i).parts[-3] for i, _ in Cityscapes(tmp_path).items] == ["train"]  # the default split
    test = Cityscapes(tmp_path, "test")
    assert len(test) == 1 and test.check() == []
    np.testing.assert_array_equal(test.load(0).mask, expected)
    val = Cityscapes(tmp_path, "val")
    problems = val.check()
    assert [Path(p.path).name for p in problems] == ["lindau_000000_000019_gtFine_labelIds.png"]
    assert "label values 34, 254 outside the 19 classes" in problems[0].message
    with pytest.raises(UserError, match="cityscapes has no split 'bogus'"):
        Cityscapes(tmp_path, "bogus")
    with pytest.raises(UserError, match="expected leftImg8bit/ and gtFine/"):
        Cityscapes(tmp_path / "nothing", "train")


def test_cityscapes_missing_mask_names_the_coarse_file_of_its_own_split_first(tmp_path):
    """gtCoarse holds train_extra as well: of two coarse files of the image, the one of the split read is named."""
    name = "aachen_000000_000019"
    _img(tmp_path / "leftImg8bit" / "train" / "aachen" / f"{name}_leftImg8bit.png", 3, 4)
    for split in ("train_extra", "train", "val"):  # glob order is the file system's
        _mask(tmp_path / "gtCoarse" / split / "aachen" / f"{name}_gtCoarse_labelIds.png", np.zeros((3, 4), np.uint8))
    ds = Cityscapes(tmp_path, "train")
    note = ds.missing_mask_note(ds.items[0][0])
    assert f"gtCoarse/train/aachen/{name}_gtCoarse_labelIds.png is there" in note.replace("\\", "/")


def test_ade20k_validation_split_image_extensions_and_errors(tmp_path):
    """val and validation read validation/; .jpg, .JPEG and .png images are taken, other files are not."""
    root = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150]], np.uint8)
    for stem, ext in (("ADE_val_00000001", ".jpg"), ("ADE_val_00000002", ".JPEG"), ("ADE_val_00000003", ".png")):
        _img(root / "images" / "validation" / f"{stem}{ext}", 1, 3, fmt="PNG" if ext == ".png" else "JPEG")
        _mask(root / "annotations" / "validation" / f"{stem}.png", raw)
    (root / "images" / "validation" / "notes.txt").write_text("not an image")
    _img(root / "images" / "training" / "ADE_train_00000001.jpg", 1, 3)
    _mask(root / "annotations" / "training" / "ADE_train_00000001.png", raw)
    for split in ("val", "validation"):
        ds = ADE20K(root, split)
        assert [Path(i).name for i, _ in ds.items] == ["ADE_val_00000001.jpg", "ADE_val_00000002.JPEG",
                                                       "ADE_val_00000003.png"]
        assert ds.check() == []
        np.testing.assert_array_equal(ds.load(2).mask, [[255, 0, 149]])
    assert len(ADE20K(root, "training")) == 1
    # the VOC colour map without its black entry 0: colours 1, 2, 3 and 150 worked out by hand, all distinct
    ds = ADE20K(root, "val")
    # objectInfo150's first names, in label order, as mmsegmentation's ADE20KDataset lists them ("bed " stripped)
    assert hashlib.sha256("\n".join(ds.class_names).encode()).hexdigest() == \
        "f9dbd8a75a0722c971d8c82db76dc205e06cb422d98153f4e5bbf90408ef5438"
    assert (ds.class_names[12], ds.class_names[77], ds.class_names[149]) == ("person", "bar", "flag")
    palette = ds.palette
    assert len(palette) == 150 and len(set(palette)) == 150 and (0, 0, 0) not in palette
    assert palette[:3] == [(128, 0, 0), (0, 128, 0), (128, 128, 0)] and palette[149] == (0, 224, 128)
    with pytest.raises(UserError, match="ade20k has no split 'test'"):
        ADE20K(root, "test")
    with pytest.raises(UserError, match="expected ADEChallengeData2016/images/validation"):
        ADE20K(tmp_path / "nothing", "val")


def test_ade20k_download_fetches_the_challenge_zip_once(tmp_path, monkeypatch):
    import pixelwise.data.ade20k as ade_module

    calls = []

    def fetched(archive, root):  # stands in for the 920 MB download: unpacks a small tree
        calls.append((archive.url, archive.sha256, archive.size, Path(root)))
        unpacked = Path(root) / "ADEChallengeData2016"
        _img(unpacked / "images" / "training" / "ADE_train_00000001.jpg", 2, 3)
        _mask(unpacked / "annotations" / "training" / "ADE_train_00000001.png", np.ones((2, 3), np.uint8))

    monkeypatch.setattr(ade_module, "download_and_extract", fetched)
    assert len(ADE20K(tmp_path / "a", "train", download=True)) == 1
    # the file and its size and SHA-256 as tensorflow/datasets publishes them (url_checksums/ade20k.txt)
    assert calls == [("https://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                      "7ff1be44964418441f542a7cc1e1a650e7dc0fc275f5d23252bc9bbdbc977b29", 967382037, tmp_path / "a")]
    assert len(ADE20K(tmp_path / "a", "train", download=True)) == 1 and len(calls) == 1  # present: not again
    flat = tmp_path / "flat"  # the contents of ADEChallengeData2016 given as the root: not fetched either
    _img(flat / "images" / "training" / "x.jpg", 2, 3)
    _mask(flat / "annotations" / "training" / "x.png", np.ones((2, 3), np.uint8))
    assert len(ADE20K(flat, "train", download=True)) == 1 and len(calls) == 1
    with pytest.raises(UserError, match="not found"):
        ADE20K(tmp_path / "b", "train")  # download not asked: nothing fetched
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------- COCO
def _coco_tree(tmp_path):
    images = tmp_path / "val2017"
    _img(images / "000000000001.jpg", 40, 50)
    _img(images / "000000000002.jpg", 30, 20)
    anns = [
        # big rectangle of category 7 (-> label 3)
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 600.0, "bbox": [5, 5, 30, 20],
         "segmentation": [[5, 5, 35, 5, 35, 25, 5, 25]]},
        # small rectangle inside it, category 1 (-> label 1): painted on top
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 25.0, "bbox": [10, 10, 5, 5],
         "segmentation": [[10, 10, 15, 10, 15, 15, 10, 15]]},
        # crowd region of category 3: ignored, not an instance
        {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 1, "area": 50.0, "bbox": [40, 30, 10, 5],
         "segmentation": [[40, 30, 50, 30, 50, 35, 40, 35]]},
        # degenerate (zero-width) annotation: skipped
        {"id": 4, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 0.0, "bbox": [1, 1, 0, 3],
         "segmentation": [[1, 1, 1, 1, 1, 4, 1, 4]]},
    ]
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    data = {"images": [{"id": 1, "file_name": "000000000001.jpg", "width": 50, "height": 40},
                       {"id": 2, "file_name": "000000000002.jpg", "width": 20, "height": 30}],
            "annotations": anns, "categories": cats}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return data


def test_coco_instances_semantic_crowd_and_ids(tmp_path):
    _coco_tree(tmp_path)
    ds = COCOInstances(tmp_path, "val")
    assert ds.task == "instance" and len(ds) == 2
    assert ds.class_names == ["background", "person", "car", "train"]
    assert ds.category_ids == [0, 1, 3, 7]
    s = ds.load(0)
    assert s.instance_masks.shape == (2, 40, 50) and s.instance_masks.dtype == bool
    assert s.instance_labels.tolist() == [3, 1]  # larger first
    np.testing.assert_allclose(s.boxes, [[5, 5, 35, 25], [10, 10, 15, 15]])
    # each instance mask lies inside its box
    for m, (x1, y1, x2, y2) in zip(s.instance_masks, s.boxes):
        ys, xs = np.nonzero(m)
        assert xs.min() >= x1 - 1 and xs.max() < x2 + 1 and ys.min() >= y1 - 1 and ys.max() < y2 + 1
    assert (s.mask[s.instance_masks[1]] == 1).all()  # small object on top
    assert (s.mask[s.instance_masks[0] & ~s.instance_masks[1]] == 3).all()
    assert s.mask[32, 45] == 255 and s.mask[0, 0] == 0  # crowd ignored, rest background
    empty = ds.load(1)
    assert empty.instance_masks.shape == (0, 30, 20) and empty.boxes.shape == (0, 4)
    assert ds.check() == []
    assert len(COCOInstances(tmp_path, "val", skip_empty=True)) == 1


def test_coco_check_names_bad_items(tmp_path):
    data = _coco_tree(tmp_path)
    data["images"][1]["width"] = 21  # size mismatch with the file
    data["annotations"].append({"id": 9, "image_id": 1, "category_id": 99, "iscrowd": 0, "area": 1.0,
                                "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]})
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = COCOInstances(tmp_path, "val")
    problems = ds.check()
    text = "\n".join(map(str, problems))
    assert "000000000002.jpg: image is 20x30 but the annotations say 21x30" in text
    assert "annotation 9 has unknown category_id 99" in text
    with pytest.raises(UserError, match="000000000002.jpg"):
        ds.load(1)
    assert ds.drop(problems) == 2 and len(ds) == 0


@pytest.mark.parametrize("break_it, words", [
    (lambda d: d["annotations"][0].pop("bbox"), "annotation 1 has bbox None, not [x, y, width, height]"),
    (lambda d: d["annotations"][0].update(bbox=[5, 5, "wide", 20]), "annotation 1 has bbox [5, 5, 'wide', 20]"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), "annotation 1 has a polygon that is not"),
    (lambda d: d["annotations"][0].update(segmentation={"size": [10, 10], "counts": "0"}),
     "annotation 1 has an RLE of size [10, 10] on a 50x40 image"),
])
def test_coco_malformed_annotations_are_problems_not_tracebacks(tmp_path, break_it, words):
    data = _coco_tree(tmp_path)
    break_it(data)
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = COCOInstances(tmp_path, "val")
    problems = ds.check()
    assert len(problems) == 1 and words in str(problems[0]), problems
    with pytest.raises(UserError, match="annotation 1 of image 1"):
        ds.load(0)  # the file of a dataset loaded without its check: named, not a KeyError


@pytest.mark.parametrize("key", ["file_name", "height"])
def test_coco_image_entries_without_a_file_or_size_are_refused(tmp_path, key):
    data = _coco_tree(tmp_path)
    data["images"][1].pop(key)
    data["categories"][0].pop("name")  # cosmetic: named after its id instead
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="image 2 needs a file_name and a width and height that are whole numbers"):
        COCOInstances(tmp_path, "val")
    data["images"][1][key] = "000000000002.jpg" if key == "file_name" else 30
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    assert COCOInstances(tmp_path, "val").class_names[1] == "category_1"


# ------------------------------------------------------------------------------------------- folder
def _folder(tmp_path, n=20, h=6, w=8, classes=3):
    masks = {}
    for i in range(n):
        stem = f"img{i:03d}"
        _img(tmp_path / "images" / f"{stem}.jpg", h, w)
        m = RNG.integers(0, classes, (h, w)).astype(np.uint8)
        _mask(tmp_path / "masks" / f"{stem}.png", m)
        masks[stem] = m
    return masks


def test_folder_default_splits_disjoint_and_stable(tmp_path):
    masks = _folder(tmp_path)
    full = FolderDataset(tmp_path, "all")
    train, val = FolderDataset(tmp_path, "train"), FolderDataset(tmp_path, "val")
    assert len(full) == 20 and len(val) == 2 and len(train) == 18
    t = {full.name_of(i) for i, _ in train.items}
    v = {full.name_of(i) for i, _ in val.items}
    assert not t & v and t | v == set(masks)
    assert full.num_classes == 3  # inferred from the largest label
    _img(tmp_path / "images" / "zzz_new.jpg", 6, 8)
    _mask(tmp_path / "masks" / "zzz_new.png", np.zeros((6, 8), np.uint8))
    v2 = {full.name_of(i) for i, _ in FolderDataset(tmp_path, "val").items}
    assert len(v2 & v) >= 1  # adding a file keeps most of the held-out set
    s = full.load(3)
    np.testing.assert_array_equal(s.mask, masks["img003"])


def test_folder_split_lists_and_classes_json_colour_masks(tmp_path):
    pal = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
    idx = RNG.integers(0, 3, (5, 7)).astype(np.uint8)
    rgb = np.array(pal, dtype=np.uint8)[idx]
    rgb[0, 0] = (255, 255, 255)  # ignore colour
    for stem in ("a", "b"):
        _img(tmp_path / "images" / f"{stem}.png", 5, 7)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / "masks" / f"{stem}.png")
    bad = rgb.copy()
    bad[1, 1] = (9, 9, 9)  # a colour outside the palette
    _img(tmp_path / "images" / "c.png", 5, 7)
    Image.fromarray(bad).save(tmp_path / "masks" / "c.png")
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["bg", "red", "blue"], "palette": pal}))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\nc\n")
    (tmp_path / "splits" / "val.txt").write_text("b\n")
    ds = FolderDataset(tmp_path, "train")
    assert ds.class_names == ["bg", "red", "blue"] and ds.palette == pal and len(ds) == 2
    expected = idx.copy()
    expected[0, 0] = 255
    np.testing.assert_array_equal(ds.load(0).mask, expected)
    problems = ds.check()
    assert len(problems) == 1 and problems[0].path.endswith("c.png")
    assert "colours that are not in the palette of" in problems[0].message  # not an internal label value
    with pytest.raises(UserError, match="test.txt"):
        FolderDataset(tmp_path, "test")
    (tmp_path / "classes.json").write_text(json.dumps({"names": "abc"}))  # not three classes a, b, c
    with pytest.raises(UserError, match="names must be a list, got 'abc'"):
        FolderDataset(tmp_path, "train")
    for names, words in ((["bg", "red", "bg"], "classes 0 and 2 are both named 'bg'"),
                         (["bg", "", "blue"], "class 1 has an empty name")):  # reports could not tell them apart
        (tmp_path / "classes.json").write_text(json.dumps({"names": names, "palette": pal}))
        with pytest.raises(UserError, match=re.escape(f"classes.json: names: {words}")):
            FolderDataset(tmp_path, "train")
    (tmp_path / "classes.json").write_text('{"names": ' + "[" * 5000 + "]" * 5000 + "}")  # was a RecursionError
    with pytest.raises(UserError, match="classes.json: not valid JSON"):
        FolderDataset(tmp_path, "train")


def test_folder_split_list_not_utf8_and_with_bom(tmp_path, capsys):
    from pixelwise.cli import main

    _folder(tmp_path, n=3)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_bytes("img002\n".encode("utf-8-sig"))  # Notepad's BOM
    assert [s for s, _ in (FolderDataset(tmp_path, "val").items)] != []
    (tmp_path / "splits" / "train.txt").write_bytes("img000\nimg001\n".encode("utf-16"))
    with pytest.raises(UserError, match=r"train.txt: split list is not UTF-8 text; save it as UTF-8"):
        FolderDataset(tmp_path, "train")
    out = tmp_path / "out"
    assert main(["train", "--dataset", "folder", "--data", str(tmp_path), "--model-kwargs", '{"base_channels": 4}',
                 "--epochs", "1", "--batch-size", "2", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and err.endswith("split list is not UTF-8 text; save it as UTF-8")
    assert not out.exists()


def test_folder_bad_files_named_dropped_and_skipped(tmp_path):
    _folder(tmp_path, n=6)
    # truncated image, missing mask, size mismatch, label out of range
    data = (tmp_path / "images" / "img000.jpg").read_bytes()
    (tmp_path / "images" / "img000.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "masks" / "img001.png").unlink()
    _mask(tmp_path / "masks" / "img002.png", np.zeros((7, 8), np.uint8))
    _mask(tmp_path / "masks" / "img003.png", np.full((6, 8), 200, np.uint8))
    ds = FolderDataset(tmp_path, "all", num_classes=3)
    problems = ds.check()
    by_path = {p.path.rsplit("/", 1)[-1]: p.message for p in problems}
    assert "truncated" in by_path["img000.jpg"]
    assert "missing mask" in by_path["img001.png"]
    assert "8x7" in by_path["img002.png"] and "8x6" in by_path["img002.png"]
    assert "200" in by_path["img003.png"]
    assert len(problems) == 4
    with pytest.raises(UserError, match="img000.jpg"):
        ds.load(0)
    with pytest.raises(UserError, match="img002.png"):
        ds.load(2)
    assert ds.drop(problems) == 4 and len(ds) == 2 and ds.check() == []
    skipped = FolderDataset(tmp_path, "all", num_classes=3, skip_invalid=True)
    assert len(skipped) == 2 and len(skipped.dropped) == 4


@pytest.mark.parametrize("link", ["image", "mask"])
def test_an_image_and_its_mask_that_are_one_file_are_a_problem(tmp_path, link):
    """images/a.png a link to masks/a.png trained on the label file as the photo without a word (the
    other way round was only refused because a photo is no index mask)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("a", "b"):
        _img(tmp_path / "images" / f"{stem}.png", 8, 10)
        _mask(tmp_path / "masks" / f"{stem}.png", np.arange(80, dtype=np.uint8).reshape(8, 10) % 3)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\nb\n")
    image, mask = tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png"
    if link == "image":
        image.unlink()
        image.symlink_to(Path("..") / "masks" / "a.png")
    else:
        Image.fromarray(np.arange(80, dtype=np.uint8).reshape(8, 10) % 3).save(image)  # a gray image of values 0..2
        mask.unlink()
        mask.symlink_to(Path("..") / "images" / "a.png")
    ds = FolderDataset(tmp_path, "train", num_classes=3)
    problems = ds.check()
    assert [p.path for p in problems] == [str(mask)] and "same file as its image" in problems[0].message


def test_registry_and_errors(tmp_path):
    assert {"camvid", "voc", "cityscapes", "ade20k", "isbi2012", "coco", "folder"} <= set(DATASETS)
    with pytest.raises(UserError, match="images/ and masks/"):
        build_dataset("folder", str(tmp_path), "train")
    with pytest.raises(UserError, match="no split"):
        build_dataset("camvid", str(tmp_path), "bogus")
    with pytest.raises(UserError, match="registration"):
        build_dataset("isbi2012", str(tmp_path), "train", download=True)
    with pytest.raises(UserError, match="folder has no option .nonsense.; options: transform"):
        build_dataset("folder", str(tmp_path), "train", nonsense=1)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ih=st.integers(1, 12), iw=st.integers(1, 12), mh=st.integers(1, 12), mw=st.integers(1, 12),
       mode=st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"]), seed=st.integers(0, 99))
def test_folder_odd_modes_and_sizes(tmp_path_factory, ih, iw, mh, mw, mode, seed):
    root = tmp_path_factory.mktemp("f")
    rng = np.random.default_rng(seed)
    (root / "images").mkdir()
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (ih, iw)).astype(np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)).convert(mode)
    img.save(root / "images" / "x.png")
    m = rng.integers(0, 2, (mh, mw)).astype(np.uint8)
    _mask(root / "masks" / "x.png", m)
    ds = FolderDataset(root, "all", num_classes=2)
    problems = ds.check()
    if (ih, iw) == (mh, mw):
        assert problems == []
        s = ds.load(0)
        assert s.image.shape == (ih, iw, 3) and s.image.dtype == np.uint8
        np.testing.assert_array_equal(s.mask, m)
    else:
        assert len(problems) == 1 and "x.png" in str(problems[0]) and f"{mw}x{mh}" in problems[0].message
        with pytest.raises(UserError, match="x.png"):
            ds.load(0)



def test_folder_stems_with_dots_and_two_images_of_one_stem(tmp_path):
    for stem in ("scan.001", "scan.002", "scan.003", "scan"):
        _img(tmp_path / "images" / f"{stem}.png", 6, 8)
        _mask(tmp_path / "masks" / f"{stem}.png", np.zeros((6, 8), np.uint8))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("scan.001\nscan.002.png\n")  # a stem, or a file name
    (tmp_path / "splits" / "val.txt").write_text("scan.003\n")  # not 'scan', whose image also exists
    assert [Path(i).name for i, _ in FolderDataset(tmp_path, "train").items] == ["scan.001.png", "scan.002.png"]
    assert [Path(i).name for i, _ in FolderDataset(tmp_path, "val").items] == ["scan.003.png"]
    _img(tmp_path / "images" / "scan.001.jpg", 6, 8)
    with pytest.raises(UserError, match="scan.001.jpg and scan.001.png have the same stem"):
        FolderDataset(tmp_path, "train")


def test_coco_annotations_of_images_the_file_does_not_list_are_a_problem(tmp_path):
    data = _coco_tree(tmp_path)
    data["annotations"].append({**data["annotations"][0], "id": 40, "image_id": 77})  # no image 77
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = COCOInstances(tmp_path, "val")
    problems = ds.check()
    assert len(problems) == 1 and "annotations of 1 image id(s) the file does not list under images: 77" in str(
        problems[0])
    assert len(ds.check_or_refuse(skip_invalid=True, purpose="train")) == 1 and len(ds) == 2  # the images stay
    with pytest.raises(UserError, match="1 problem"):
        COCOInstances(tmp_path, "val").check_or_refuse(skip_invalid=False, purpose="train")


def test_coco_skip_empty_drops_images_from_training_only(tmp_path, monkeypatch):
    """skip_empty filtered the validation split too: a detection on an image without objects no
    longer counted as a false positive, so validation AP (and best.safetensors) was inflated
    (torchvision drops such images from training alone)."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import open_datasets
    from pixelwise.inference.evaluate import evaluate_checkpoint

    _coco_tree(tmp_path)
    lines = []
    cfg = TrainConfig(model="maskrcnn_resnet18_fpn", dataset="coco", data=str(tmp_path), train_split="val",
                      val_split="val", dataset_kwargs={"skip_empty": True})
    train, val = open_datasets(cfg, lines.append)
    assert (len(train), len(val)) == (1, 2)
    assert "note: skip_empty applies to the training split; validation scores every image of val" in lines
    import pixelwise.inference.evaluate as evaluate

    seen = []

    def opened(kind, root, split, **kwargs):
        seen.append(kwargs)
        raise KeyboardInterrupt  # enough: what eval opens its split with
    monkeypatch.setattr(evaluate, "build_dataset", opened)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint("x.safetensors", "coco", str(tmp_path), "val", dataset_kwargs={"skip_empty": True})
    assert seen == [{}]


def test_coco_without_area_paints_larger_objects_first_and_takes_sizes_written_as_floats(tmp_path):
    """Without `area` in the file the semantic mask was painted in file order: a small object listed
    before a large one that covers it vanished. A width written 50.0 was refused as not positive."""
    data = _coco_tree(tmp_path)
    data["annotations"] = [data["annotations"][1], data["annotations"][0]]  # small first
    for a in data["annotations"]:
        a.pop("area")
    data["images"][0].update(width=50.0, height=40.0)
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = COCOInstances(tmp_path, "val")
    s = ds.load(0)
    assert ds.check() == []
    small = s.instance_masks[list(s.instance_labels).index(1)]
    assert small.sum() == 25 and (s.mask[small] == 1).all()
    assert sorted(s.meta["areas"]) == [25.0, 600.0]  # the masks' pixels where the file has no area


@pytest.mark.parametrize("x, outside", [(-0.6, False), (29.7, False), (-1.5, True), (30.6, True)])
def test_coco_bbox_reaches_as_far_past_the_left_as_the_right(tmp_path, x, outside):
    """A bbox starting 0.6 px left of the image (the extent of its polygon, which is accepted) was
    refused, while the same box mirrored to the right border (to 50.6 of 50) was accepted."""
    data = _coco_tree(tmp_path)
    a = data["annotations"][0]
    a["bbox"] = [x, 5, 20.9, 25]
    left, right = max(x, 0), min(x + 20.9, 50)  # the polygon inside: only the box is looked at
    a["segmentation"] = [[left, 5, right, 5, right, 30, left, 30]]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    problems = [str(p) for p in COCOInstances(tmp_path, "val").check()]
    assert problems == ([f"{tmp_path / 'annotations' / 'instances_val2017.json'}#1: annotation 1 has bbox "
                         f"{a['bbox']} outside the 50x40 image"] if outside else [])


def naive_class_count(labels: set[int]) -> int:
    """The docstring's rule, by brute force over L."""
    best = 0
    for top in range(max(labels, default=0) + 1):
        if top in labels and 2 * sum(1 for v in labels if v <= top) >= top + 1:
            best = top + 1
    return max(best, 2)


@pytest.mark.parametrize("labels, expected", [
    (set(), 2), ({0}, 2), ({1}, 2), ({0, 1, 2}, 3),
    ({0, 3}, 4),        # 2 of 0..3 occur: exactly half, so 4 classes
    ({0, 4}, 2),        # 2 of 0..4: less than half, so 4 is a far label
    ({0, 5}, 2), ({0, 1, 2, 9}, 3), ({0, 1, 2, 7}, 8), ({0, 1, 2, 3, 4, 200}, 5),
])
def test_inferred_class_count_by_hand(labels, expected):
    assert inferred_class_count(labels) == expected == naive_class_count(labels)


def test_inferred_class_count_matches_the_rule_on_random_label_sets():
    rng = random.Random(0)
    for _ in range(300):
        labels = set(rng.sample(range(40), rng.randint(0, 8)))
        assert inferred_class_count(labels) == naive_class_count(labels), labels


def test_val_stems_of_fewer_than_two_images_is_empty():
    assert val_stems([]) == set()
    assert val_stems(["only"]) == set()


@pytest.mark.parametrize("n", [2, 9, 10, 11, 20, 21])
def test_val_stems_holds_out_the_ceil_tenth_with_the_smallest_sha1(n):
    stems = [f"im{i:03d}" for i in range(n)]
    k = math.ceil(0.1 * n)
    expected = set(sorted(stems, key=lambda s: hashlib.sha1(s.encode()).hexdigest())[:k])
    assert val_stems(stems) == expected and len(expected) == k


def test_val_stems_hashes_a_lone_surrogate_as_its_three_bytes():
    """A Windows name with a lone UTF-16 surrogate: hashed as its surrogatepass bytes (ED A0 80)."""
    lone = "scan\ud800"
    stems = [lone] + [f"im{i}" for i in range(9)]
    raw = {s: (b"scan\xed\xa0\x80" if s == lone else s.encode()) for s in stems}
    expected = {min(stems, key=lambda s: hashlib.sha1(raw[s]).hexdigest())}
    assert val_stems(stems) == expected


def test_a_split_list_line_that_is_a_stem_ending_in_an_image_suffix_stays_a_stem(tmp_path):
    """docs/data.md: a line is a stem, or a file name whose image extension is dropped. The image
    photo.jpg.png has the stem "photo.jpg": that line names it, not a missing "photo"."""
    for sub in ("images", "masks", "splits"):
        (tmp_path / sub).mkdir()
    for stem in ("photo.jpg", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    (tmp_path / "splits" / "train.txt").write_text("photo.jpg\nb.png\n")
    ds = build_dataset("folder", str(tmp_path), "train")
    assert sorted(i.rsplit("/", 1)[1] for i, _ in ds.items) == ["b.png", "photo.jpg.png"]


def _folder_with(tmp_path, masks: dict[str, np.ndarray]):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir(exist_ok=True)
    for stem, m in masks.items():
        Image.fromarray(np.zeros((*m.shape, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(m.astype(np.uint8)).save(tmp_path / "masks" / f"{stem}.png")


def test_labels_far_above_the_others_are_recorded_and_left_out_of_the_class_count(tmp_path):
    _folder_with(tmp_path, {"a": np.array([[0, 1], [1, 0]]), "b": np.array([[0, 200], [255, 1]])})
    ds = build_dataset("folder", str(tmp_path), "all")
    assert len(ds.class_names) == 2 and ds.classes_inferred  # {0, 1, 200}: 200 is far (rule above)
    assert ds.far_labels == [200]


def test_a_split_list_naming_an_image_of_an_unread_format_says_it_is_there(tmp_path):
    _folder_with(tmp_path, {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))})
    (tmp_path / "images" / "c.heic").write_bytes(b"not read")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\nc\n")
    with pytest.raises(UserError, match=r"first: 'c'; c\.heic is there, but \.heic images are not read"):
        build_dataset("folder", str(tmp_path), "train")


def test_a_colour_out_of_range_names_the_value_outside_not_an_earlier_valid_one(tmp_path):
    _folder_with(tmp_path, {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))})
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["bg", "x"], "palette": [[0, 0, 0], [10, 300, 0]]}))
    with pytest.raises(UserError, match=r"palette\[1\] is \[10, 300, 0\].*\(300 is outside 0\.\.255\)"):
        build_dataset("folder", str(tmp_path), "train")


@pytest.mark.parametrize("colour", [[10, 20], [1, 2, 3, 4]])
def test_a_colour_of_the_wrong_length_is_one_user_error(tmp_path, colour):
    _folder_with(tmp_path, {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))})
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["bg", "x"], "palette": [[0, 0, 0], colour]}))
    with pytest.raises(UserError, match=r"colours are \[r, g, b\] with whole numbers 0\.\.255$"):
        build_dataset("folder", str(tmp_path), "train")


# ------------------------------------------------------------------ the base contract (data.base)
class _Empty(SegmentationDataset):
    def __len__(self):
        return 0

    def load(self, index):
        raise AssertionError("an empty dataset loads nothing")


def test_indexing_takes_negative_indices_python_style_and_names_the_sample():
    ds = ShapesDataset(split="val", num_val=3, size=16)
    for index, expected in ((0, 0), (1, 1), (2, 2), (-1, 2), (-3, 0)):
        item = ds[index]
        assert item["name"] == f"val_{expected:05d}"
        assert torch.equal(item["mask"], torch.from_numpy(ds.load(expected).mask).long())
    for bad in (3, -4):
        with pytest.raises(IndexError, match="out of range for 3 item"):
            ds[bad]
    with pytest.raises(TypeError, match="one whole number"):
        ds[True]


def test_instance_targets_are_k_by_4_boxes_in_both_conversions():
    ds = ShapesDataset(split="train", num_train=8, size=32)
    for i in range(8):
        s = ds.load(i)
        k = len(s.instance_labels)
        for target in (ds[i]["target"], sample_target(s)):
            assert target["boxes"].shape == (k, 4) and target["masks"].shape == (k, 32, 32)
            assert target["boxes"].tolist() == np.asarray(s.boxes, dtype=np.float32).reshape(-1, 4).tolist()
            assert target["labels"].tolist() == s.instance_labels.tolist()


def test_an_empty_dataset_has_instances_without_loading():
    assert _Empty().has_instances() is True
    assert ShapesDataset(split="val", num_val=1, size=16).has_instances() is True


def _instance_and_crowd() -> tuple[np.ndarray, np.ndarray]:
    """Masks [1, 4, 4] of an object in the top-left quarter and a crowd region in the bottom-right."""
    inst = np.zeros((1, 4, 4), bool)
    inst[0, :2, :2] = True
    crowd = np.zeros((1, 4, 4), bool)
    crowd[0, 2:, 2:] = True
    return inst, crowd


def test_sample_target_appends_crowd_regions_also_without_untrained_objects():
    inst, crowd_mask = _instance_and_crowd()
    s = Sample(image=np.zeros((4, 4, 3), np.uint8), mask=inst[0].astype(np.uint8), instance_masks=inst,
               instance_labels=np.array([1]), boxes=np.array([[0, 0, 2, 2]]),
               meta={"areas": [4.0], "crowd": {"masks": crowd_mask, "labels": [1], "boxes": [[2, 2, 4, 4]],
                                               "areas": [3.5]}})
    t = sample_target(s)
    assert t["boxes"].tolist() == [[0, 0, 2, 2], [2, 2, 4, 4]] and t["labels"].tolist() == [1, 1]
    assert t["iscrowd"].tolist() == [0, 1] and t["area"].tolist() == [4.0, 3.5]
    assert t["masks"].shape == (2, 4, 4) and bool(t["masks"][1, 3, 3]) and "bbox_xywh" not in t


def test_sample_target_keeps_the_files_xywh_boxes_of_instances_untrained_objects_and_crowds_in_that_order():
    inst, crowd_mask = _instance_and_crowd()
    s = Sample(image=np.zeros((4, 4, 3), np.uint8), mask=inst[0].astype(np.uint8), instance_masks=inst,
               instance_labels=np.array([2]), boxes=np.array([[0, 0, 2, 2]]),
               meta={"areas": [4.0], "bboxes": [[0.1, 0.2, 1.9, 1.8]],
                     "untrained": {"masks": np.zeros((1, 4, 4), bool), "labels": [3], "boxes": [[1, 1, 1.5, 1.25]],
                                   "areas": [0.0], "bboxes": [[1.0, 1.0, 0.5, 0.25]]},
                     "crowd": {"masks": crowd_mask, "labels": [1], "boxes": [[2, 2, 4, 4]], "areas": [3.5],
                               "bboxes": [[2.0, 2.0, 2.0, 2.0]]}})
    t = sample_target(s)
    # float64, as the file has them (0.1 is not a float32), one row per object: instances, untrained, crowds
    assert t["bbox_xywh"].dtype == torch.float64
    assert t["bbox_xywh"].tolist() == [[0.1, 0.2, 1.9, 1.8], [1.0, 1.0, 0.5, 0.25], [2.0, 2.0, 2.0, 2.0]]
    assert t["labels"].tolist() == [2, 3, 1] and t["iscrowd"].tolist() == [0, 0, 1]
    assert t["area"].tolist() == [4.0, 0.0, 3.5] and t["masks"].shape == (3, 4, 4)


def test_the_base_class_defaults_a_reader_inherits():
    ds = _Empty()
    assert ds.task == "semantic" and ds.class_names == [] and ds.num_classes == 0 and ds.palette == []
    assert ds.rand_foreground is None and ds.training_only_options == ()
    assert ds.check() == [] and ds.notes() == [] and ds.drop([]) == 0 and ds.where() == "_Empty"
    assert ds.check_or_refuse(skip_invalid=False, purpose="train") == []
    assert ShapesDataset(split="val", num_val=1, size=16).task == "instance"


def test_every_name_data_base_exports_is_there():
    assert set(base.__all__) <= set(dir(base))  # else `from pixelwise.data.base import *` raises


def test_ade20k_reads_the_training_split_by_default(tmp_path):
    raw = np.array([[0, 1, 150]], np.uint8)
    for sub, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        _img(tmp_path / "images" / sub / f"{stem}.jpg", 1, 3)
        _mask(tmp_path / "annotations" / sub / f"{stem}.png", raw)
    ds = ADE20K(tmp_path)
    assert ds.split == "train" and [Path(i).name for i, _ in ds.items] == ["ADE_train_00000001.jpg"]
