"""Segmentation metrics from one confusion matrix.

Rows of the confusion matrix are ground truth, columns predictions; pixels whose ground truth
is ``ignore_index`` are not counted.

The rule for absent classes (the source of endless NaN-vs-0-vs-1 issues elsewhere):
- IoU and Dice of class c are ``null`` (None) when c appears in neither the ground truth nor
  the prediction, and such classes are left out of mIoU / mean Dice. A class that is predicted
  but absent from the ground truth has IoU 0 and counts.
- Accuracy (recall) of class c is ``null`` when c is absent from the ground truth, and is left
  out of the mean class accuracy.
- fwIoU weights each class by its ground-truth frequency, so absent classes weigh 0.
"""

from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """pred, target: Int[...] of equal shape -> int64 Tensor[C, C] (rows: truth, cols: prediction).

    Ground-truth values other than ``0..C-1`` and ``ignore_index`` raise ValueError."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target has labels outside 0..{num_classes - 1} (and {ignore_index} = ignore)")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"prediction has labels outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def segmentation_metrics(cm: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Confusion matrix Tensor[C, C] -> dict with ``pixel_acc mean_acc mIoU fwIoU dice per_class``.

    ``per_class`` is a list of ``{"name", "iou", "acc", "dice", "pixels"}``; values are floats or
    None per the absent-class rule in the module docstring."""
    cm = cm.double()
    c = cm.shape[0]
    names = class_names or [str(i) for i in range(c)]
    tp = cm.diag()
    gt = cm.sum(1)
    pr = cm.sum(0)
    total = cm.sum().item()
    union = gt + pr - tp
    per_class = []
    for i in range(c):
        per_class.append({
            "name": names[i],
            "iou": (tp[i] / union[i]).item() if union[i] > 0 else None,
            "acc": (tp[i] / gt[i]).item() if gt[i] > 0 else None,
            "dice": (2 * tp[i] / (gt[i] + pr[i])).item() if union[i] > 0 else None,
            "pixels": int(gt[i].item()),
        })
    fw = sum((gt[i].item() / total) * (per_class[i]["iou"] or 0.0) for i in range(c)) if total else None
    return {
        "pixel_acc": tp.sum().item() / total if total else None,
        "mean_acc": _mean([p["acc"] for p in per_class]),
        "mIoU": _mean([p["iou"] for p in per_class]),
        "fwIoU": fw,
        "dice": _mean([p["dice"] for p in per_class]),
        "per_class": per_class,
    }


class ConfusionMeter:
    """Accumulates a confusion matrix over batches."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.cm += confusion_matrix(pred.cpu(), target.cpu(), self.num_classes, self.ignore_index)

    def compute(self, class_names: list[str] | None = None) -> dict:
        return segmentation_metrics(self.cm, class_names)
