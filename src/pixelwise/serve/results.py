"""Predictions -> the API's JSON: the same files ``pixelwise predict`` writes, as base64 PNGs.

The class mask is the palette-indexed PNG ``predict`` writes (:func:`pixelwise.data.io.encode_png`;
class id = pixel value), the overlay the one of :func:`pixelwise.data.palette.overlay` (semantic) or
:func:`pixelwise.inference.writers.draw_instances` (instance), instances the documents of
:func:`pixelwise.inference.writers.instances_json`; the tests check byte for byte that a mask from
the API equals the PNG ``predict`` writes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pixelwise.data.io import encode_png
from pixelwise.data.palette import clear_class, overlay
from pixelwise.inference.predictor import Prediction
from pixelwise.inference.writers import draw_instances, entropy_to_gray, instance_colors, instance_maps, instances_json
from pixelwise.metrics import BoundaryIoUMeter, confusion_matrix, segmentation_metrics


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_png(image: np.ndarray) -> bytes:
    """uint8[H, W, 3] decoded pixels -> an RGB PNG (lossless: decoded again, the same pixels)."""
    return png(Image.fromarray(image))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def mask_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """uint8[H, W] class ids -> the palette-indexed PNG that ``pixelwise predict`` writes to a
    file (the same encoder, in memory)."""
    return encode_png(np.ascontiguousarray(mask, dtype=np.uint8), "P", palette)


def uncertainty_png(uncertainty: np.ndarray, num_classes: int) -> bytes:
    """Predictive entropy float32[H, W] -> 8-bit gray PNG, 255 = the largest possible entropy
    (``log C``), as ``pixelwise predict --uncertainty`` writes ``<stem>_uncertainty.png``."""
    return encode_png(entropy_to_gray(uncertainty, num_classes), "L")


def class_shares(mask: np.ndarray, class_names: list[str], palette: Sequence[Sequence[int]]) -> list[dict]:
    """Per class: ``id name color pixels share`` (share of the image's pixels)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    total = max(int(mask.size), 1)
    return [{"id": i, "name": name, "color": [int(v) for v in palette[i]] if i < len(palette) else [255, 255, 255],
             "pixels": int(counts[i]), "share": round(int(counts[i]) / total, 6)}
            for i, name in enumerate(class_names)]


def compare(mask: np.ndarray, truth: np.ndarray, class_names: list[str]) -> dict:
    """Scores of one predicted mask against a ground truth (255 = ignored): ``pixel_acc mean_acc
    mIoU boundary_iou per_class`` (``id name iou boundary_iou acc pixels``, with
    :mod:`pixelwise.metrics`' absent-class rule; Boundary IoU as ``pixelwise eval`` computes it)
    and ``confusion`` (rows: truth, columns: prediction; pixel counts)."""
    cm = confusion_matrix(torch.from_numpy(mask), torch.from_numpy(truth), len(class_names))
    m = segmentation_metrics(cm, class_names)
    bands = BoundaryIoUMeter(len(class_names))
    bands.update(mask, truth)
    boundary = bands.compute()
    per_class = [{"id": i, "name": row["name"], "iou": row["iou"], "boundary_iou": b, "acc": row["acc"],
                  "pixels": row["pixels"]}
                 for i, (row, b) in enumerate(zip(m["per_class"], boundary["per_class_boundary_iou"]))]
    return {"pixel_acc": m["pixel_acc"], "mean_acc": m["mean_acc"], "mIoU": m["mIoU"],
            "boundary_iou": boundary["boundary_iou"], "per_class": per_class, "confusion": cm.tolist(),
            "ignored_pixels": int((truth == 255).sum())}


def semantic_result(image: np.ndarray, pred: Prediction, class_names: list[str],
                    palette: Sequence[Sequence[int]], with_overlay: bool = True, with_image: bool = False) -> dict:
    """The answer to one image: mask PNG, class shares, the uncertainty PNG where predicted, and,
    as asked, the overlay PNG and the decoded image as a PNG (else null)."""
    h, w = pred.mask.shape
    pal = [(int(c[0]), int(c[1]), int(c[2])) for c in palette]
    clear = clear_class(class_names)
    out = {"task": "semantic", "width": w, "height": h, "classes": class_shares(pred.mask, class_names, palette),
           "mask_png_base64": b64(mask_png(pred.mask, palette)),
           "overlay_png_base64": b64(png(Image.fromarray(overlay(image, pred.mask, pal, clear=clear))))
                                 if with_overlay else None,
           "uncertainty_png_base64": None, "image_png_base64": b64(image_png(image)) if with_image else None}
    if pred.uncertainty is not None:
        out["uncertainty_png_base64"] = b64(uncertainty_png(pred.uncertainty, len(class_names)))
    return out


def instance_result(image: np.ndarray, det: dict[str, torch.Tensor], class_names: list[str],
                    palette: Sequence[Sequence[int]], with_overlay: bool = True, with_image: bool = False,
                    category_ids: Sequence[int] | None = None) -> tuple[dict, np.ndarray]:
    """-> (the JSON, the class mask): predict's ``<stem>.png`` (each pixel the class of the
    highest-scoring instance covering it), its ``<stem>.json`` instances, each with ``color``, its
    colour in the overlay, and as asked the overlay and the decoded image as PNGs (else null)."""
    masks, labels = det["masks"].numpy(), det["labels"].numpy()
    classes, _ = instance_maps(masks, labels, image.shape[:2])
    doc = instances_json(det, image.shape, class_names, category_ids)
    for instance, color in zip(doc["instances"], instance_colors(len(masks))):
        instance["color"] = [int(v) for v in color]
    drawn = None
    if with_overlay:
        drawn = b64(png(draw_instances(image, masks, det["boxes"].numpy(), labels, det["scores"].numpy(),
                                       class_names)))
    out = {"task": "instance", "width": doc["width"], "height": doc["height"],
           "classes": class_shares(classes, class_names, palette),
           "mask_png_base64": b64(mask_png(classes, palette)), "overlay_png_base64": drawn,
           "uncertainty_png_base64": None, "image_png_base64": b64(image_png(image)) if with_image else None,
           "instances": doc["instances"]}
    return out, classes
