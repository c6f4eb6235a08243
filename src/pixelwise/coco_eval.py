"""COCO box and mask AP (pycocotools) from in-memory predictions and ground-truth instances.

No annotation files are involved: the ground truth is built as a COCO dataset in memory
(one image per target, annotation ids from 1, ``iscrowd``, ``area`` and ``bbox_xywh`` from the
target where it has them, else 0, the mask's pixels and its ``boxes``) and the
predictions are loaded as COCO results (masks thresholded at 0.5, as torchvision's reference
evaluation does). Numbers follow COCO's definitions: AP averaged over IoU 0.50:0.95, AP50,
AP75, and AP for small / medium / large objects, at 100 detections per image. ``boundary=True``
adds Boundary AP (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation", arXiv:2103.16562): mask AP with each pair's IoU the smaller of its mask IoU and
the Boundary IoU of the two masks' contour bands (:func:`pixelwise.metrics.boundary_band`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from pixelwise.metrics import boundary_band, boundary_width

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_mask(mask: np.ndarray) -> dict:
    """bool/uint8 ``[H, W]`` -> COCO RLE (``{"size": [H, W], "counts": bytes}``)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def boundary_rle(mask: np.ndarray) -> dict:
    """bool ``[H, W]`` instance mask -> COCO RLE of its contour band, ``round(2%)`` of the image
    diagonal wide (:func:`~pixelwise.metrics.boundary_band`)."""
    return encode_mask(boundary_band(mask, boundary_width(*mask.shape)))


def xyxy_to_xywh(boxes: Tensor) -> list[list[float]]:
    """``Tensor[K, 4]`` (x1, y1, x2, y2) -> COCO ``[x, y, w, h]`` lists."""
    b = boxes.detach().cpu().double().reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()


def decode_mask(size: Sequence[int], counts: str | bytes | list[int]) -> np.ndarray:
    """A COCO RLE of ``size`` (H, W), compressed (a string) or not (a list of run lengths), ->
    bool [H, W]. The caller checks the RLE first (:func:`pixelwise.data.coco.segmentation_problem`):
    pycocotools reads a broken one past its end."""
    h, w = int(size[0]), int(size[1])
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def binary_masks(masks: Tensor, threshold: float = 0.5) -> np.ndarray:
    """Masks ``[K, H, W]`` or ``[K, 1, H, W]`` (bool, uint8 or probabilities) -> bool ``[K, H, W]``;
    float masks are thresholded at ``>= threshold``."""
    m = masks.detach().cpu()
    if m.dim() == 4:
        m = m[:, 0]
    m = m >= threshold if m.is_floating_point() else m.bool()
    return m.numpy()


def ground_truth_coco(targets: Sequence[dict[str, Tensor]], class_ids: Sequence[int], boundary: bool = False) -> COCO:
    """Targets (``boxes`` Tensor[K, 4], ``labels`` Tensor[K], ``masks`` [K, H, W], and optionally
    ``iscrowd`` Tensor[K] (default 0), ``area`` Tensor[K] (default: the mask's pixels) and
    ``bbox_xywh`` Tensor[K, 4] (COCO boxes as an annotation file has them, used instead of
    ``boxes``: float32 corners turned back into a width can land on the other side of an IoU
    threshold)) -> a COCO index. ``boundary``: each annotation also holds its contour band
    (:func:`boundary_rle`), for Boundary AP."""
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id, t in enumerate(targets):
        masks = binary_masks(t["masks"])
        h, w = masks.shape[-2:]
        images.append({"id": image_id, "height": int(h), "width": int(w)})
        crowd = t["iscrowd"].tolist() if "iscrowd" in t else [0] * len(masks)
        areas = t["area"].tolist() if "area" in t else [None] * len(masks)
        boxes = t["bbox_xywh"].double().tolist() if "bbox_xywh" in t else xyxy_to_xywh(t["boxes"])
        for box, label, mask, is_crowd, area in zip(boxes, t["labels"].tolist(), masks, crowd, areas, strict=True):
            rle = encode_mask(mask)
            annotation = {
                "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                "image_id": image_id,
                "category_id": int(label),
                "bbox": box,
                "segmentation": rle,
                "area": float(mask_utils.area(rle)) if area is None else float(area),
                "iscrowd": int(is_crowd),
            }
            if boundary:
                annotation["boundary"] = boundary_rle(mask)
            annotations.append(annotation)
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(c), "name": str(c)} for c in class_ids],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection_results(predictions: Sequence[dict[str, Tensor]], class_ids: Sequence[int], iou_type: str) -> list[dict]:
    """Predictions (``boxes``, ``labels``, ``scores``, ``masks``) -> COCO result dicts, one per
    detection of a class in ``class_ids``, holding ``segmentation`` (RLE) for ``iou_type="segm"``,
    that and the contour band's RLE (``boundary``) for ``"boundary"``, and ``bbox`` for ``"bbox"``
    (separate, so that pycocotools takes each detection's area from its mask or its box
    respectively)."""
    wanted = {int(c) for c in class_ids}
    results = []
    for image_id, p in enumerate(predictions):
        masks = binary_masks(p["masks"]) if iou_type != "bbox" else [None] * len(p["scores"])
        for box, label, score, mask in zip(xyxy_to_xywh(p["boxes"]), p["labels"].tolist(), p["scores"].tolist(), masks):
            if int(label) not in wanted:
                continue
            result: dict = {"image_id": image_id, "category_id": int(label), "score": float(score)}
            if iou_type == "bbox":
                result["bbox"] = box
            else:
                result["segmentation"] = encode_mask(mask)
            if iou_type == "boundary":
                result["boundary"] = boundary_rle(mask)
            results.append(result)
    return results


# COCOeval's area ranges of the six stats (``Params.areaRng``): all, all, all, small, medium, large
STAT_AREAS = ((0, 1e10), (0, 1e10), (0, 1e10), (0, 32**2), (32**2, 96**2), (96**2, 1e10))


def no_detection_stats(gt: COCO, class_ids: Sequence[int]) -> list[float]:
    """COCOeval's first six stats when nothing was detected: 0 where the area range holds a
    ground-truth object that counts (not a crowd, of a scored class; COCO keeps an object whose area
    lies in the range, ends included), NaN where it holds none (undefined, as COCOeval says)."""
    ids = {int(c) for c in class_ids}
    areas = [a["area"] for a in gt.dataset["annotations"] if a["category_id"] in ids and not a.get("iscrowd", 0)]
    return [0.0 if any(lo <= area <= hi for area in areas) else float("nan") for lo, hi in STAT_AREAS]


class BoundaryEval(COCOeval):
    """COCOeval of masks whose pair IoU is ``min(mask IoU, Boundary IoU)``: Boundary AP, as the
    Boundary IoU paper's own COCO evaluation computes it. Areas (small/medium/large) and crowd
    regions are those of the masks; a crowd region's band IoU is taken as its mask IoU is
    (intersection over the detection's band). Every annotation and result holds ``boundary``."""

    def computeIoU(self, imgId, catId):  # COCOeval's names
        ious = super().computeIoU(imgId, catId)  # the masks', detections sorted by score as below
        if len(ious) == 0:
            return ious
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][: self.params.maxDets[-1]]
        crowd = [int(g["iscrowd"]) for g in gt]
        return np.minimum(ious, mask_utils.iou([d["boundary"] for d in dt], [g["boundary"] for g in gt], crowd))


def run_cocoeval(gt: COCO, results: list[dict], iou_type: str, class_ids: Sequence[int]) -> list[float]:
    """COCOeval ``iou_type`` ("bbox", "segm" or "boundary": :class:`BoundaryEval`) -> its first six
    stats (NaN where undefined)."""
    if not results:  # pycocotools cannot load an empty result list; its answer is known without it
        return no_detection_stats(gt, class_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = BoundaryEval(gt, dt, "segm") if iou_type == "boundary" else COCOeval(gt, dt, iou_type)
        ev.params.catIds = [int(c) for c in class_ids]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) if s >= 0 else float("nan") for s in ev.stats[: len(STAT_NAMES)]]


def coco_evaluate(
    predictions: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    class_ids: Sequence[int],
    boundary: bool = False,
) -> dict[str, float]:
    """COCO AP of instance predictions against ground truth, per image in the same order.

    ``predictions[i]``: ``boxes`` Tensor[D, 4] (x1, y1, x2, y2), ``labels`` int Tensor[D],
    ``scores`` Tensor[D], ``masks`` Tensor[D, 1, H, W] probabilities (Mask R-CNN's output) or
    bool/uint8 Tensor[D, H, W]. ``targets[i]``: ``boxes`` Tensor[K, 4], ``labels`` Tensor[K],
    ``masks`` Tensor[K, H, W]. ``class_ids``: the category ids to average over (e.g. ``1..C-1``).

    Returns ``mask_AP mask_AP50 mask_AP75 mask_APs mask_APm mask_APl`` and the same with
    ``box_``, as fractions in [0, 1] (NaN where COCO leaves a value undefined, e.g. no object of
    that size), plus ``num_images``. With no predictions at all, AP is 0 wherever there is an
    object to find (NaN where there is none, as with predictions). ``boundary``: also Boundary
    AP, the same six with ``boundary_`` (:class:`BoundaryEval`).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    gt = ground_truth_coco(targets, class_ids, boundary)
    out: dict[str, float] = {}
    for prefix, iou_type in (("mask", "segm"), ("box", "bbox"), *([("boundary", "boundary")] if boundary else [])):
        results = detection_results(predictions, class_ids, iou_type)
        for name, value in zip(STAT_NAMES, run_cocoeval(gt, results, iou_type, class_ids)):
            out[f"{prefix}_{name}"] = value
    out["num_images"] = len(targets)
    return out
