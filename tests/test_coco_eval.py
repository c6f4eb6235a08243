"""coco_evaluate: perfect predictions score 1, worse ones less, none 0; inputs in Mask R-CNN's format."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pixelwise.coco_eval import boundary_rle, coco_evaluate, decode_mask, encode_mask


def rect_target(rects: list[tuple[int, int, int, int, int]], h: int = 64, w: int = 64) -> dict:
    """Instances from (x1, y1, x2, y2, label) rectangles (x2/y2 exclusive)."""
    masks = torch.zeros(len(rects), h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2, _) in enumerate(rects):
        masks[i, y1:y2, x1:x2] = 1
    return {
        "boxes": torch.tensor([r[:4] for r in rects], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([r[4] for r in rects], dtype=torch.int64),
        "masks": masks,
    }


def as_prediction(target: dict, scores: list[float] | None = None) -> dict:
    """A prediction equal to the target, masks as Mask R-CNN returns them ([D, 1, H, W] floats)."""
    k = target["labels"].numel()
    return {
        "boxes": target["boxes"].clone(),
        "labels": target["labels"].clone(),
        "scores": torch.tensor(scores if scores is not None else [0.9] * k),
        "masks": target["masks"][:, None].float() * 0.8,
    }


TARGETS = [
    rect_target([(4, 4, 30, 30, 1), (35, 10, 60, 40, 2)]),
    rect_target([(10, 30, 50, 60, 1)]),
    rect_target([(0, 0, 20, 12, 2), (40, 40, 64, 64, 2), (22, 5, 38, 25, 1)]),
]


def test_perfect_predictions_score_one():
    out = coco_evaluate([as_prediction(t) for t in TARGETS], TARGETS, class_ids=[1, 2])
    for key in ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "box_AP50", "box_AP75"):
        assert out[key] == pytest.approx(1.0), key
    assert out["num_images"] == 3


def test_wrong_labels_and_shifted_boxes_score_less():
    perfect = coco_evaluate([as_prediction(t) for t in TARGETS], TARGETS, class_ids=[1, 2])
    swapped = []
    for t in TARGETS:
        p = as_prediction(t)
        p["labels"] = 3 - p["labels"]  # 1 <-> 2
        swapped.append(p)
    out = coco_evaluate(swapped, TARGETS, class_ids=[1, 2])
    assert out["mask_AP"] == 0.0 and out["box_AP"] == 0.0
    shifted = []
    for t in TARGETS:
        p = as_prediction(t)
        p["boxes"] = p["boxes"] + 4
        p["masks"] = torch.roll(p["masks"], shifts=(4, 4), dims=(-2, -1))
        shifted.append(p)
    out = coco_evaluate(shifted, TARGETS, class_ids=[1, 2])
    assert 0.0 < out["mask_AP"] < perfect["mask_AP"] and 0.0 < out["box_AP"] < perfect["box_AP"]
    assert out["mask_AP50"] > out["mask_AP75"]


def test_predictions_shuffled_across_images_and_empty():
    shuffled = [as_prediction(t) for t in TARGETS[1:] + TARGETS[:1]]
    out = coco_evaluate(shuffled, TARGETS, class_ids=[1, 2])
    assert out["mask_AP"] < 0.2
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 1, 64, 64),
    }
    out = coco_evaluate([empty] * 3, TARGETS, class_ids=[1, 2])
    assert out["mask_AP"] == 0.0 and out["box_AP"] == 0.0


def test_false_positive_with_higher_score_lowers_ap():
    preds = [as_prediction(t) for t in TARGETS]
    fp = rect_target([(45, 0, 63, 10, 1)])
    preds[1] = {
        k: torch.cat([as_prediction(fp, [0.99])[k], preds[1][k]]) for k in ("boxes", "labels", "scores", "masks")
    }
    out = coco_evaluate(preds, TARGETS, class_ids=[1, 2])
    assert 0.5 < out["mask_AP"] < 1.0
    # class 2 alone is unaffected by the class-1 false positive
    assert coco_evaluate(preds, TARGETS, class_ids=[2])["mask_AP"] == pytest.approx(1.0)


def test_undefined_sizes_are_nan_and_mismatch_raises():
    out = coco_evaluate([as_prediction(t) for t in TARGETS], TARGETS, class_ids=[1, 2])
    assert math.isnan(out["mask_APl"])  # no object above 96**2 pixels in 64x64 images
    with pytest.raises(ValueError, match="predictions"):
        coco_evaluate([], TARGETS, class_ids=[1])


def test_crowd_regions_and_json_areas_are_scored_as_pycocotools_scores_the_file(tmp_path):
    """A COCO split read by the reader and scored by `pixelwise eval`'s path equals pycocotools run
    on the annotation file itself: a detection on an iscrowd region is neither right nor wrong,
    the size ranges use the annotations' ``area``, and an object under 1 px wide (not trained on)
    or with an empty mask is ground truth all the same."""
    import contextlib
    import io
    import json

    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pixelwise.data import build_dataset, sample_target

    h, w = 48, 64
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    images, anns = [], []
    rng = np.random.default_rng(0)
    for image_id in (5, 9):
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "val2017" / f"{image_id:012d}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w})
        for k, (y, x, crowd) in enumerate(((4, 4, 0), (20, 30, 0), (2, 40, 1))):
            m = np.zeros((h, w), np.uint8)
            m[y:y + 12, x:x + 14] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": (3, 7)[k % 2], "iscrowd": crowd,
                         "bbox": [x, y, 14, 12], "area": 2000.0 if k == 1 else 168.0, "segmentation": rle})
    # under 1 px wide (30 mask pixels): found once, missed once; a crowd region of that shape; an empty mask
    for image_id, crowd, x in ((5, 0, 60), (9, 0, 60), (9, 1, 2), (5, 0, 1)):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 3, "iscrowd": crowd,
                     "bbox": [x, 10, 0.9 if x > 1 else 0, 30], "area": 27.0 if x > 1 else 0.0,
                     "segmentation": [[x, 10, x + (0.9 if x > 1 else 0), 10, x + (0.9 if x > 1 else 0), 40, x, 40]]})
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    ds = build_dataset("coco", str(tmp_path), "val")
    assert ds.check() == []
    with contextlib.redirect_stdout(io.StringIO()):
        file = COCO(str(tmp_path / "annotations" / "instances_val2017.json"))
    predictions, targets, results = [], [], []
    for i in range(len(ds)):
        sample = ds.load(i)
        targets.append(sample_target(sample))
        # a detection of each object of the file, crowds included, except the second thin one; one shifted
        found = [a for a in file.imgToAnns[sample.meta["image_id"]] if a["id"] != 8]
        masks = [file.annToMask(a).astype(bool) for a in found] + [np.roll(sample.instance_masks[0], 3, axis=1)]
        labels = [ds.cat_to_label[a["category_id"]] for a in found] + [2]
        scores = rng.uniform(0.3, 1.0, len(masks)).tolist()
        boxes = np.array([mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))) for m in masks])
        xyxy = np.c_[boxes[:, :2], boxes[:, :2] + boxes[:, 2:]]
        predictions.append({"masks": torch.as_tensor(np.stack(masks)), "labels": torch.as_tensor(labels),
                            "scores": torch.as_tensor(scores), "boxes": torch.as_tensor(xyxy, dtype=torch.float32)})
        for m, label, score, box in zip(masks, labels, scores, boxes):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": sample.meta["image_id"], "category_id": ds.category_ids[label], "score": score,
                            "segmentation": rle, "bbox": box.tolist()})
    ours = coco_evaluate(predictions, targets, class_ids=range(1, ds.num_classes))
    for prefix, iou_type in (("mask", "segm"), ("box", "bbox")):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(tmp_path / "annotations" / "instances_val2017.json"))
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, reference in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6]):
            value = ours[f"{prefix}_{name}"]
            assert (math.isnan(value) and reference < 0) or value == pytest.approx(reference, abs=1e-9), (prefix, name)
    assert ours["mask_AP"] < 1  # the shifted extra detection costs something; the crowd ones cost nothing
    assert sum(len(s.meta["untrained"]["labels"]) for s in map(ds.load, range(len(ds)))) == 3

    # training's validation (which picks best.safetensors) scores against the same ground truth
    from torch.utils.data import DataLoader

    from pixelwise.data import collate
    from pixelwise.engine.validate import ScoredInstances, validate_instances

    class Replay(torch.nn.Module):
        """Answers with the detections above, in order; a constant loss when given targets."""

        def __init__(self):
            super().__init__()
            self.seen = 0

        def forward(self, images, targets=None):
            if targets is not None:
                assert all(t["masks"].shape[0] == 2 for t in targets)  # the loss sees the instances only
                return {"loss": torch.tensor(0.5)}
            out = predictions[self.seen:self.seen + len(images)]
            self.seen += len(images)
            return [{k: (v[:, None].float() if k == "masks" else v) for k, v in p.items()} for p in out]

    loader = DataLoader(ScoredInstances(ds), batch_size=2, collate_fn=collate)
    validated = validate_instances(Replay(), loader, ds, torch.device("cpu"), show=False)
    assert validated["loss"] == pytest.approx(0.5)
    for key, value in ours.items():
        assert (math.isnan(value) and math.isnan(validated[key])) or validated[key] == pytest.approx(value), key


def test_eval_refuses_an_instance_checkpoint_trained_on_other_classes(tmp_path):
    """As for semantic models: a checkpoint scored on data with another number of classes, or other
    class names, is refused in one line, not scored label against label."""
    import json

    import numpy as np
    from PIL import Image

    from pixelwise import create_model, save_checkpoint
    from pixelwise.errors import UserError
    from pixelwise.inference.evaluate import evaluate_checkpoint

    kwargs = {"min_size": 32, "max_size": 32}
    model = create_model("maskrcnn_resnet18_fpn", num_classes=3, **kwargs)
    checkpoint = tmp_path / "m.safetensors"
    save_checkpoint(checkpoint, model, {"model": "maskrcnn_resnet18_fpn", "num_classes": 3, "model_kwargs": kwargs,
                                        "class_names": ["background", "cup", "fork"]})

    def data(categories: list[dict]) -> str:
        root = tmp_path / "-".join(c["name"] for c in categories)
        (root / "val2017").mkdir(parents=True)
        (root / "annotations").mkdir()
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "val2017" / "1.png")
        ann = {"id": 1, "image_id": 1, "category_id": categories[0]["id"], "iscrowd": 0, "area": 64.0,
               "bbox": [4, 4, 8, 8], "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]}
        (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
            {"images": [{"id": 1, "file_name": "1.png", "width": 32, "height": 32}], "annotations": [ann],
             "categories": categories}))
        return str(root)

    with pytest.raises(UserError, match="the checkpoint predicts 3 classes but the data has 4") as e:
        evaluate_checkpoint(str(checkpoint), "coco", data([{"id": 1, "name": "cup"}, {"id": 5, "name": "fork"},
                                                           {"id": 90, "name": "knife"}]), progress=False)
    assert "\n" not in str(e.value) and "trained for" in str(e.value)
    with pytest.raises(UserError, match="the checkpoint's classes are background, cup, fork but the data's are "
                                        "background, ball, box"):
        evaluate_checkpoint(str(checkpoint), "coco", data([{"id": 5, "name": "ball"}, {"id": 90, "name": "box"}]),
                            progress=False)
    same = evaluate_checkpoint(str(checkpoint), "coco", data([{"id": 2, "name": "cup"}, {"id": 3, "name": "fork"}]),
                               progress=False)
    assert same["num_images"] == 1 and 0.0 <= same["mask_AP"] <= 1.0


def test_class_check_compares_coco_category_ids_where_the_checkpoint_records_them():
    from types import SimpleNamespace

    from pixelwise.errors import UserError
    from pixelwise.inference.evaluate import check_same_classes

    ds = SimpleNamespace(num_classes=3, class_names=["background", "a", "b"], category_ids=[0, 1, 5])
    check_same_classes({"num_classes": 3, "class_names": ["background", "a", "b"]}, ds)  # no ids recorded: fine
    check_same_classes({"num_classes": 3, "category_ids": [0, 1, 5]}, ds)
    with pytest.raises(UserError, match="COCO category ids 0, 1, 90 but the data's have 0, 1, 5"):
        check_same_classes({"num_classes": 3, "category_ids": [0, 1, 90]}, ds)


@pytest.mark.parametrize("class_ids", [[1, 2], [2]])
def test_no_detections_score_as_pycocotools_scores_a_lone_false_positive(class_ids):
    """Nothing detected: 0 where an area range holds an object to find, NaN where it holds none,
    exactly what pycocotools answers for one false positive far from every object."""
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 64, 64)}
    lone = as_prediction(rect_target([(60, 0, 63, 3, class_ids[0])]), [0.5])
    none = coco_evaluate([empty] * 3, TARGETS, class_ids=class_ids)
    reference = coco_evaluate([lone, empty, empty], TARGETS, class_ids=class_ids)
    assert none.keys() == reference.keys()
    for key, value in reference.items():
        assert (math.isnan(none[key]) and math.isnan(value)) or none[key] == value, key
    assert none["mask_APs"] == 0.0 and math.isnan(none["mask_APl"])
    assert (none["mask_APm"] == 0.0) == (class_ids == [1, 2])  # the one medium object is of class 1


# ---------------------------------------------------------------------------------------------
# Boundary AP (Cheng et al., arXiv:2103.16562): a pair's IoU is min(mask IoU, band IoU)


def _reference_band(mask: np.ndarray) -> np.ndarray:
    """The paper's reference mask_to_boundary: zero-pad one pixel, erode round(0.02 * diagonal)
    times with a 3x3 square (OpenCV), subtract."""
    import cv2

    h, w = mask.shape
    d = max(1, int(round(0.02 * math.hypot(h, w))))
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    return mask & ~cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1].astype(bool)


def test_boundary_rle_is_the_reference_band_of_the_whole_image():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(3)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(8, 120, 2))
        mask = np.zeros((h, w), bool)
        y0, x0 = (int(v) for v in rng.integers(0, (h // 2, w // 2)))  # some touch the image border
        mask[y0:y0 + int(rng.integers(1, h)), x0:x0 + int(rng.integers(1, w))] = True
        mask &= rng.random((h, w)) < 0.97
        assert np.array_equal(mask_utils.decode(boundary_rle(mask)).astype(bool), _reference_band(mask))
    assert not mask_utils.decode(boundary_rle(np.zeros((5, 7), bool))).any()


def test_boundary_ap_of_a_shifted_square_by_hand():
    """One object and one detection: AP at each threshold t of 0.50:0.95 is 1 where the pair's IoU
    reaches t, else 0. A 50x50 square moved 1 px right keeps a mask IoU of 49/51 but its 3-px band
    (2% of the 100x100 image's diagonal) overlaps far less."""
    target = rect_target([(10, 10, 60, 60, 1)], 100, 100)
    moved = as_prediction(target)
    moved["boxes"] = moved["boxes"] + torch.tensor([1.0, 0.0, 1.0, 0.0])
    moved["masks"] = torch.roll(moved["masks"], shifts=1, dims=-1)
    out = coco_evaluate([moved], [target], class_ids=[1], boundary=True)
    gt, dt = target["masks"][0].bool().numpy(), moved["masks"][0, 0].bool().numpy()
    mask_iou = (gt & dt).sum() / (gt | dt).sum()
    band_gt, band_dt = _reference_band(gt), _reference_band(dt)
    band_iou = (band_gt & band_dt).sum() / (band_gt | band_dt).sum()
    assert mask_iou == pytest.approx(49 / 51) and 0.7 < band_iou < 0.75
    thresholds = np.linspace(0.5, 0.95, 10)
    assert out["mask_AP"] == pytest.approx(np.mean(mask_iou >= thresholds))
    assert out["boundary_AP"] == pytest.approx(np.mean(min(mask_iou, band_iou) >= thresholds))
    assert out["mask_AP"] == pytest.approx(1.0) and out["boundary_AP"] == pytest.approx(0.5)  # 0.50-0.70: 5 of 10
    assert out["boundary_AP50"] == pytest.approx(1.0) and out["boundary_AP75"] == 0.0 < out["mask_AP75"]


def test_boundary_ap_equals_mask_ap_where_every_object_is_all_band():
    """Objects thinner than a band (2 * 2 + 1 px in a 64x64 image) are all band, so each pair's
    band IoU is its mask IoU, and Boundary AP is mask AP: crowds, false positives, sizes and all."""
    rng = np.random.default_rng(0)
    targets, predictions = [], []
    for _ in range(4):
        rects = []
        for _ in range(int(rng.integers(1, 4))):
            x, y = (int(v) for v in rng.integers(0, 56, 2))
            long_side, across = int(rng.integers(6, 30)), int(rng.integers(1, 5))
            rect = (x, y, x + long_side, y + across) if rng.random() < 0.5 else (x, y, x + across, y + long_side)
            rects.append((rect[0], rect[1], min(rect[2], 64), min(rect[3], 64), int(rng.integers(1, 3))))
        t = rect_target(rects)
        t["iscrowd"] = torch.tensor([int(i == 0 and rng.random() < 0.3) for i in range(len(rects))])
        p = as_prediction(t, scores=rng.random(len(rects)).tolist())
        p["masks"] = torch.roll(p["masks"], shifts=int(rng.integers(0, 2)), dims=-1)
        targets.append(t)
        predictions.append(p)
    # a crowd region scored as COCO scores crowds (the share of the detection inside it): the
    # detection covering its left half is ignored, not a false positive that outranks the object
    t = rect_target([(4, 10, 44, 13, 1), (10, 30, 40, 33, 1)])
    t["iscrowd"] = torch.tensor([1, 0])
    p = as_prediction(rect_target([(4, 10, 24, 13, 1), (10, 30, 40, 33, 1)]), scores=[0.9, 0.5])
    targets.append(t)
    predictions.append(p)
    out = coco_evaluate(predictions, targets, class_ids=[1, 2], boundary=True)
    assert 0.0 < out["mask_AP"] < 1.0
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        m, b = out[f"mask_{name}"], out[f"boundary_{name}"]
        assert (math.isnan(m) and math.isnan(b)) or m == pytest.approx(b), name


def test_boundary_ap_is_asked_for_perfect_is_one_and_none_is_zero():
    plain = coco_evaluate([as_prediction(t) for t in TARGETS], TARGETS, class_ids=[1, 2])
    assert not any(k.startswith("boundary_") for k in plain)  # training's validation does not pay for it
    out = coco_evaluate([as_prediction(t) for t in TARGETS], TARGETS, class_ids=[1, 2], boundary=True)
    assert out["boundary_AP"] == out["boundary_AP75"] == pytest.approx(1.0)
    for key, value in plain.items():
        assert out[key] == value or (math.isnan(out[key]) and math.isnan(value)), key
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 64, 64)}
    none = coco_evaluate([empty] * 3, TARGETS, class_ids=[1, 2], boundary=True)
    assert none["boundary_AP"] == none["mask_AP"] == 0.0


@pytest.mark.parametrize("side", [0, 32])
def test_no_detections_count_an_object_on_an_area_ranges_end(side):
    """COCO keeps an object whose area lies on a range's end (areaRng [0, 32**2], [32**2, 96**2]):
    an empty mask (area 0) is in "all" and "small", a 32x32 square (area 32**2) in "small" and
    "medium"; with nothing detected each such range scores 0, as pycocotools scores a lone far
    false positive, and only the ranges without the object are NaN."""
    target = rect_target([(8, 8, 8 + side, 8 + side, 1)])
    assert int(target["masks"].sum()) == side * side
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 64, 64)}
    lone = as_prediction(rect_target([(60, 0, 63, 3, 1)]), [0.5])
    none = coco_evaluate([empty], [target], class_ids=[1])
    reference = coco_evaluate([lone], [target], class_ids=[1])
    for key, value in reference.items():
        assert (math.isnan(none[key]) and math.isnan(value)) or none[key] == value, key
    held = {0: ("AP", "AP50", "AP75", "APs"), 32: ("AP", "AP50", "AP75", "APs", "APm")}[side]
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert (none[f"mask_{name}"] == 0.0) if name in held else math.isnan(none[f"mask_{name}"]), name


def test_decode_mask_reads_an_uncompressed_rle_of_run_lengths_column_major():
    """COCO's uncompressed RLE (counts a list, as iscrowd annotations and other tools write it):
    runs of 0, 1, 0, ... down the columns. [1, 2, 3] on 2x3: one 0, two 1s ((1, 0) and (0, 1)),
    three 0s. The compressed form of the same mask decodes to the same array."""
    want = np.array([[False, True, False], [True, False, False]])
    got = decode_mask([2, 3], [1, 2, 3])
    assert got.dtype == bool and np.array_equal(got, want)
    compressed = encode_mask(want)["counts"]
    assert np.array_equal(decode_mask((2, 3), compressed.decode("ascii")), want)
    assert np.array_equal(decode_mask((2, 3), compressed), want)
