"""coco_evaluate: perfect predictions score 1, worse ones less, none 0; inputs in Mask R-CNN's format."""

from __future__ import annotations

import math

import pytest
import torch

from pixelwise.coco_eval import coco_evaluate


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
    and the size ranges use the annotations' ``area``."""
    import contextlib
    import io
    import json

    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pixelwise.data import build_dataset
    from pixelwise.data import sample_target

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
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    ds = build_dataset("coco", str(tmp_path), "val")
    predictions, targets, results = [], [], []
    for i in range(len(ds)):
        sample = ds.load(i)
        targets.append(sample_target(sample))
        crowd = sample.meta["crowd"]
        masks = [*sample.instance_masks, *crowd["masks"], np.roll(sample.instance_masks[0], 3, axis=1)]
        labels = [*sample.instance_labels.tolist(), *crowd["labels"], 2]
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
