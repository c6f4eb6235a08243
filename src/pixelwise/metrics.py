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

Beyond the confusion matrix (definitions in docs/metrics.md):
- :class:`BFMeter`: SegNet's boundary F1 score (Csurka et al. 2013), tolerance 0.75% of the
  image diagonal, mean over images of the mean over the classes present in each ground truth.
- :class:`BoundaryIoUMeter`: Boundary IoU (Cheng et al. 2021), the IoU of the bands within 2% of
  the image diagonal inside each class region's contour, summed over the dataset per class.
- :class:`RandMeter` / :func:`pixel_error`: the ISBI 2012 EM challenge's foreground-restricted
  Rand error (on 4-connected components of the cell class) and pixel error;
  :class:`ThresholdRandMeter` / :class:`ThresholdPixelMeter`: the challenge's leaderboard forms,
  1 - the maximal F-score over thresholds of the cell probability.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_cdt, distance_transform_edt, label

from pixelwise.errors import brief


def _labels(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    """An integer label map (torch or numpy, any shape) -> int64 Tensor, flattened. Floating or
    boolean maps raise TypeError: truncating 0.6 to class 0 would score soft masks as labels."""
    if isinstance(x, torch.Tensor):
        t = x
    else:  # a read-only array (np.asarray of a PIL image) is copied: torch warns that it cannot share it
        a = np.asarray(x)
        t = torch.as_tensor(a if a.flags.writeable else a.copy())
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer class labels, got dtype {t.dtype} (take argmax over the "
                        "class axis of probabilities first)")
    return t.reshape(-1).long().cpu()


def _array(x: object) -> torch.Tensor | np.ndarray:
    """A tensor as it is; anything else (numpy arrays, nested lists) as a numpy array."""
    return x if isinstance(x, torch.Tensor) else np.asarray(x)


def _valid_labels(pred: object, target: object, num_classes: int, ignore_index: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (target, prediction) labels, flattened int64, of the pixels whose ground truth is not
    ``ignore_index``: integer maps of equal shape (TypeError for floating or boolean maps), with
    ground truth in ``0..C-1`` (or the ignore label) and predictions in ``0..C-1`` (ValueError)."""
    pred, target = _array(pred), _array(target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    t = _labels(target, "target")
    p = _labels(pred, "prediction")
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target has labels outside 0..{num_classes - 1} (and {ignore_index} = ignore)")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"prediction has labels outside 0..{num_classes - 1}")
    return t, p


def _one_image(pred: object, target: object, what: str) -> tuple[np.ndarray, np.ndarray]:
    """pred, target as numpy arrays of one image, int[H, W] each: integer labels (TypeError
    otherwise) of equal shape, two dimensions (a batch of maps is a ValueError that says so)."""
    pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred)
    target = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target)
    _labels(target.reshape(-1)[:0], "target")
    _labels(pred.reshape(-1)[:0], "prediction")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
    if target.ndim != 2:
        raise ValueError(f"{what} scores one image at a time: pred and target int[H, W], got shape {target.shape}"
                         + ("; call it once per image of the batch" if target.ndim > 2 else ""))
    return pred, target


def _class_count(num_classes: object, where: str) -> int:
    """``num_classes`` as an int >= 1: a TypeError for a non-integer (2.5, "3", True), a ValueError
    for 0 or less (torch's own messages, "zeros(): argument 'size'...", named neither)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"{where}: num_classes must be a whole number >= 1, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"{where}: num_classes must be a whole number >= 1, got {num_classes}")
    return int(num_classes)


def _fraction_of_diagonal(value: object, name: str, where: str, default: float) -> float:
    """A tolerance or band width as a fraction of the image diagonal: a finite number >= 0. NaN
    or a negative one scored every boundary 0.0 (BF) or fell back to a 1-pixel band (Boundary IoU)
    without a word."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {name} must be a finite fraction of the image diagonal >= 0 "
                         f"(default {default}), got {brief(value)}")
    return float(value)


def confusion_matrix(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """pred, target: integer label maps (torch, numpy or nested lists) of equal shape -> int64
    Tensor[C, C] (rows: truth, cols: prediction).

    Ground-truth values other than ``0..C-1`` and ``ignore_index``, and predictions outside
    ``0..C-1``, raise ValueError; floating-point or boolean maps raise TypeError."""
    num_classes = _class_count(num_classes, "confusion_matrix")
    t, p = _valid_labels(pred, target, num_classes, ignore_index)
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def segmentation_metrics(cm: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Confusion matrix Tensor[C, C] -> dict with ``pixel_acc mean_acc mIoU fwIoU dice per_class``.

    ``per_class`` is a list of ``{"name", "iou", "acc", "dice", "pixels"}``; values are floats or
    None per the absent-class rule in the module docstring."""
    cm = torch.as_tensor(cm).double()
    c = cm.shape[0]
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} names for a {c}-class confusion matrix")
    names = class_names or [str(i) for i in range(c)]
    tp = cm.diag()
    gt = cm.sum(1)
    pr = cm.sum(0)
    total = cm.sum().item()
    union = gt + pr - tp
    per_class: list[dict] = []
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
        self.num_classes, self.ignore_index = _class_count(num_classes, "ConfusionMeter"), ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> torch.Tensor:
        """pred, target: integer label maps (torch or numpy) of equal shape. -> their own confusion
        matrix, the one added (eval's per-image scores)."""
        added = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.cm += added
        return added

    def compute(self, class_names: list[str] | None = None) -> dict:
        return segmentation_metrics(self.cm, class_names)


# --------------------------------------------------------------------------------------------
# Boundary F1 (BF) score: Csurka, Larlus, Perronnin, "What is a good evaluation measure for
# semantic segmentation?", BMVC 2013, as reported by SegNet (PAMI 2017, Tables 1-4).
# --------------------------------------------------------------------------------------------

BF_TOLERANCE = 0.0075  # fraction of the image diagonal (SegNet: 0.75%)


def class_boundary(mask: np.ndarray) -> np.ndarray:
    """bool[H, W] region -> bool[H, W] its inner boundary: region pixels with at least one
    4-neighbour outside the region. The image border is not a boundary (pixels beyond the image
    count as inside), so a class filling the whole image has no boundary."""
    m = np.asarray(mask, dtype=bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def boundary_f1(pred_boundary: np.ndarray, gt_boundary: np.ndarray, tolerance: float) -> float:
    """BF of one class in one image. pred_boundary, gt_boundary: bool[H, W]; tolerance in pixels.

    precision = share of predicted boundary pixels within Euclidean distance <= tolerance of a
    ground-truth boundary pixel; recall = share of ground-truth boundary pixels within the
    tolerance of a predicted one; BF = 2PR / (P + R). Both boundaries empty -> 1.0 (nothing to
    find, nothing found); exactly one empty -> 0.0."""
    n_pred, n_gt = int(pred_boundary.sum()), int(gt_boundary.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    dist_to_gt = distance_transform_edt(~gt_boundary)
    dist_to_pred = distance_transform_edt(~pred_boundary)
    precision = float((dist_to_gt[pred_boundary] <= tolerance).sum()) / n_pred
    recall = float((dist_to_pred[gt_boundary] <= tolerance).sum()) / n_gt
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def image_bf_scores(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255,
                    tolerance: float = BF_TOLERANCE) -> dict[int, float]:
    """Per-class BF of one image. pred, target: int[H, W] -> {class: BF} for every class present
    in the (non-ignored) ground truth.

    Ignored ground-truth pixels are given the ignore label in the prediction too, so the outlines
    of void regions appear identically in both maps and neither reward nor penalise. The distance
    tolerance is ``tolerance * sqrt(H^2 + W^2)`` pixels. Labels are checked as
    :func:`confusion_matrix` checks them: floating or boolean maps raise TypeError, labels out of
    range ValueError, and so does a batch of maps (one image at a time)."""
    pred, target = _one_image(pred, target, "the BF score")
    _valid_labels(pred, target, num_classes, ignore_index)
    h, w = target.shape
    tol_px = tolerance * float(np.hypot(h, w))
    valid = target != ignore_index
    pred = np.where(valid, pred, ignore_index)
    scores = {}
    for c in np.unique(target[valid]).tolist():
        scores[int(c)] = boundary_f1(class_boundary(pred == c), class_boundary(target == c), tol_px)
    return scores


class BFMeter:
    """Dataset BF score: the mean over images of the mean over the classes present in each
    image's ground truth (images without valid pixels are skipped). Also keeps, per class, the
    mean over the images where the class is present."""

    def __init__(self, num_classes: int, ignore_index: int = 255, tolerance: float = BF_TOLERANCE):
        self.num_classes, self.ignore_index = _class_count(num_classes, "BFMeter"), ignore_index
        self.tolerance = _fraction_of_diagonal(tolerance, "tolerance", "BFMeter", BF_TOLERANCE)
        self.image_scores: list[float] = []
        self.class_sums = np.zeros(num_classes)
        self.class_counts = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> float | None:
        """pred, target: int[H, W] for one image (checked as :func:`image_bf_scores` checks them).
        -> the image's BF score (the mean over the classes of its ground truth), None without valid pixels."""
        scores = image_bf_scores(pred, target, self.num_classes, self.ignore_index, self.tolerance)
        if not scores:
            return None
        self.image_scores.append(sum(scores.values()) / len(scores))
        for c, s in scores.items():
            self.class_sums[c] += s
            self.class_counts[c] += 1
        return self.image_scores[-1]

    def compute(self) -> dict:
        """-> ``{"bf_score": float | None, "per_class_bf": [float | None] * C}``."""
        per_class = [float(self.class_sums[c] / self.class_counts[c]) if self.class_counts[c] else None
                     for c in range(self.num_classes)]
        score = float(np.mean(self.image_scores)) if self.image_scores else None
        return {"bf_score": score, "per_class_bf": per_class}


# --------------------------------------------------------------------------------------------
# Boundary IoU: Cheng, Girshick, Dollar, Berg, Kirillov, "Boundary IoU: Improving Object-Centric
# Image Segmentation Evaluation", CVPR 2021, arXiv:2103.16562.
# --------------------------------------------------------------------------------------------

BOUNDARY_IOU_DILATION = 0.02  # band width as a fraction of the image diagonal (the paper's default)


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """bool[H, W] region -> bool[H, W] its pixels within ``width`` pixels (chessboard distance) of a
    pixel outside it, the image border counting as outside: what ``width`` erosions by a 3x3 square
    take away (the paper's ``G_d`` intersected with ``G``), so a region thinner than
    ``2 * width + 1`` is all band."""
    m = np.asarray(mask, dtype=bool)
    if width < 1:
        raise ValueError(f"the band width must be at least 1 pixel, got {width}")
    band = np.zeros(m.shape, dtype=bool)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if len(rows):  # worked out inside the region's box: every pixel beyond it is outside, as the border is
        box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        inside = m[box]
        band[box] = inside & (distance_transform_cdt(np.pad(inside, 1), metric="chessboard")[1:-1, 1:-1] <= width)
    return band


def boundary_width(height: int, width: int, dilation: float = BOUNDARY_IOU_DILATION) -> int:
    """The band width in pixels for an image: ``round(dilation * diagonal)``, at least 1 (the
    reference implementation's rule)."""
    return max(1, int(round(dilation * float(np.hypot(height, width)))))


def image_boundary_counts(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255,
                          dilation: float = BOUNDARY_IOU_DILATION) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (intersection, union) pixel counts, int64[C] each, of the boundary bands of one
    image's prediction and ground truth. As for the BF score, pixels ignored in the ground truth
    are ignored in the prediction too (no class there), so a void region's outline is the same in
    both maps. Labels are checked as :func:`confusion_matrix` checks them."""
    pred, target = _one_image(pred, target, "Boundary IoU")
    _valid_labels(pred, target, num_classes, ignore_index)
    d = boundary_width(target.shape[0], target.shape[1], dilation)
    valid = target != ignore_index
    pred = np.where(valid, pred, -1)
    inter = np.zeros(num_classes, dtype=np.int64)
    union = np.zeros(num_classes, dtype=np.int64)
    present = set(np.unique(target[valid]).tolist()) | set(np.unique(pred[valid]).tolist())
    for c in sorted(present):
        gt_band, pred_band = boundary_band(target == c, d), boundary_band(pred == c, d)
        inter[c] = int((gt_band & pred_band).sum())
        union[c] = int((gt_band | pred_band).sum())
    return inter, union


class BoundaryIoUMeter:
    """Dataset Boundary IoU: per class, the intersections over the unions of the boundary bands
    summed over every image (as mIoU sums a confusion matrix); ``boundary_iou`` is their mean over
    the classes with a band somewhere (a class in neither map of any image is left out, as in mIoU)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, dilation: float = BOUNDARY_IOU_DILATION):
        self.num_classes, self.ignore_index = _class_count(num_classes, "BoundaryIoUMeter"), ignore_index
        self.dilation = _fraction_of_diagonal(dilation, "dilation", "BoundaryIoUMeter", BOUNDARY_IOU_DILATION)
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.union = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> float | None:
        """pred, target: int[H, W] for one image (checked as :func:`image_boundary_counts` checks them).
        -> the image's own Boundary IoU (its classes' band IoUs averaged, the split's rule on one
        image), None where no class has a band."""
        inter, union = image_boundary_counts(pred, target, self.num_classes, self.ignore_index, self.dilation)
        self.intersection += inter
        self.union += union
        return _mean([float(i / u) if u else None for i, u in zip(inter, union)])

    def compute(self) -> dict:
        """-> ``{"boundary_iou": float | None, "per_class_boundary_iou": [float | None] * C}``."""
        per_class = [float(i / u) if u else None for i, u in zip(self.intersection, self.union)]
        return {"boundary_iou": _mean(per_class), "per_class_boundary_iou": per_class}


# --------------------------------------------------------------------------------------------
# ISBI 2012 EM challenge: pixel error and foreground-restricted Rand error.
# --------------------------------------------------------------------------------------------

_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


def label_components(mask: np.ndarray) -> np.ndarray:
    """bool[H, W] -> int64[H, W]: 4-connected components numbered 1..K, 0 outside the mask."""
    labels, _ = label(np.asarray(mask, dtype=bool), structure=_FOUR_CONNECTED)
    return labels.astype(np.int64)


def rand_counts(pred: np.ndarray, target: np.ndarray, foreground: int = 1,
                ignore_index: int = 255) -> tuple[float, float, float]:
    """Foreground-restricted Rand pair counts of one image (ISBI 2012, N^2 normalisation).

    pred, target: int[H, W] class maps. Ground-truth segments are the 4-connected components of
    ``target == foreground``, predicted segments those of ``pred == foreground``. Only pixels in
    a ground-truth segment are counted (the membrane, i.e. the zero component of the ground
    truth, and ignored pixels are pruned). A pixel predicted as background is a segment of its
    own. With n_ij = #pixels in ground-truth segment i and predicted segment j (j >= 1),
    n_i0 = #pixels of segment i predicted as background:

    - ``sum_ab = sum_ij n_ij^2 + sum_i n_i0``  (pairs joined in both)
    - ``sum_a  = sum_i (sum_j n_ij + n_i0)^2`` (pairs joined in the ground truth)
    - ``sum_b  = sum_j (sum_i n_ij)^2 + sum_i n_i0`` (pairs joined in the prediction)

    Returns ``(sum_ab, sum_a, sum_b)`` as floats; counts of several images add up. Floating or
    boolean maps raise TypeError (as in :func:`confusion_matrix`), and a batch of maps ValueError
    (one image at a time). Any integer labels are allowed: only ``foreground`` and
    ``ignore_index`` are looked for (a prediction may mark boundaries with -1)."""
    pred, target = _one_image(pred, target, "the Rand error")
    return segment_rand_counts(label_components(target == foreground),
                               label_components((pred == foreground) & (target != ignore_index)))


def segment_rand_counts(gt_seg: np.ndarray, pred_seg: np.ndarray) -> tuple[float, float, float]:
    """:func:`rand_counts` of two labellings, int[H, W] with 0 = no segment (membrane): only pixels
    with ``gt_seg > 0`` are counted, and a 0 of ``pred_seg`` among them is a segment of its own."""
    keep = gt_seg > 0
    g, p = gt_seg[keep], pred_seg[keep]
    if g.size == 0:
        return 0.0, 0.0, 0.0
    n_zero = float((p == 0).sum())
    joint = np.unique(g[p > 0] * (int(p.max()) + 1) + p[p > 0], return_counts=True)[1].astype(np.float64)
    a = np.bincount(g).astype(np.float64)
    b = np.bincount(p[p > 0]).astype(np.float64)
    return float((joint**2).sum() + n_zero), float((a**2).sum()), float((b**2).sum() + n_zero)


def rand_scores(sum_ab: float, sum_a: float, sum_b: float) -> dict:
    """Pair counts -> ``{"rand_precision", "rand_recall", "rand_f", "rand_error"}``.

    precision = sum_ab / sum_b (merges lower it), recall = sum_ab / sum_a (splits lower it),
    F = 2PR / (P + R), Rand error = 1 - F. No foreground at all -> all None."""
    if sum_a <= 0 or sum_b <= 0:
        return {"rand_precision": None, "rand_recall": None, "rand_f": None, "rand_error": None}
    precision, recall = sum_ab / sum_b, sum_ab / sum_a
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"rand_precision": precision, "rand_recall": recall, "rand_f": f, "rand_error": 1.0 - f}


RAND_THRESHOLDS = tuple(k / 10 for k in range(10))  # 0.0, 0.1, ..., 0.9 (the challenge's scripts)


def rand_error_over_thresholds(prob_foreground: list[np.ndarray], targets: list[np.ndarray],
                               thresholds: tuple[float, ...] = RAND_THRESHOLDS,
                               foreground: int = 1, ignore_index: int = 255) -> dict:
    """The challenge's "maximal F-score" form: for each threshold t the prediction is
    ``prob_foreground > t`` (float[H, W] per image), the pair counts are summed over all images,
    and the best F over the thresholds is kept. -> ``rand_scores(...)`` plus ``threshold``."""
    meter = ThresholdRandMeter(thresholds, foreground, ignore_index)
    for prob, target in zip(prob_foreground, targets):
        meter.update(prob, target)
    return meter.compute()


class RandMeter:
    """Accumulates :func:`rand_counts` over images; :meth:`compute` -> :func:`rand_scores`."""

    def __init__(self, foreground: int = 1, ignore_index: int = 255):
        if isinstance(foreground, bool) or not isinstance(foreground, (int, np.integer)) or foreground < 0 \
                or foreground == ignore_index:
            # a class that no map holds (-1, the ignore label) gave None for every score without a word
            raise ValueError(f"RandMeter: foreground must be the cell class, a whole number >= 0 other than "
                             f"ignore_index={ignore_index}, got {foreground!r}")
        self.foreground, self.ignore_index = int(foreground), ignore_index
        self.counts = np.zeros(3)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """pred, target: int[H, W] for one image (checked as :func:`rand_counts` checks them)."""
        self.counts += rand_counts(pred, target, self.foreground, self.ignore_index)

    def compute(self) -> dict:
        return rand_scores(*self.counts)


class ThresholdRandMeter:
    """:func:`rand_error_over_thresholds` image by image: one :class:`RandMeter` per threshold on
    the foreground probability; :meth:`compute` -> the best ``rand_scores`` plus ``threshold``
    (all None when no threshold has a defined F)."""

    def __init__(self, thresholds: tuple[float, ...] = RAND_THRESHOLDS, foreground: int = 1,
                 ignore_index: int = 255):
        self.foreground = foreground
        self.meters = {t: RandMeter(foreground, ignore_index) for t in thresholds}

    def update(self, prob_foreground: np.ndarray, target: np.ndarray) -> None:
        prob = np.asarray(prob_foreground)
        for t, meter in self.meters.items():
            meter.update(np.where(prob > t, self.foreground, -1), target)  # -1: anything but the foreground

    def compute(self) -> dict:
        best: dict = {**rand_scores(0, 0, 0), "threshold": None}
        for t, meter in self.meters.items():
            scores = meter.compute()
            if scores["rand_f"] is not None and (best["rand_f"] is None or scores["rand_f"] > best["rand_f"]):
                best = {**scores, "threshold": t}
        return best


class ThresholdPixelMeter:
    """The challenge's leaderboard pixel error, "1 - the maximal F-score of pixel similarity": for
    each threshold t the cells predicted are ``prob_foreground > t`` and the cells of the ground
    truth are its ``foreground`` pixels (ignored pixels left out); true and false positives and
    false negatives are summed over the images, F = 2TP / (2TP + FP + FN), and :meth:`compute`
    gives ``{"pixel_error": 1 - the best F, "threshold": its t}`` (both None without any cell
    predicted or labelled). Unlike :func:`pixel_error` (1 - accuracy at the argmax) it counts the
    correctly found membrane pixels nowhere, so for the same map it is the smaller number."""

    def __init__(self, thresholds: tuple[float, ...] = RAND_THRESHOLDS, foreground: int = 1,
                 ignore_index: int = 255):
        self.thresholds, self.foreground, self.ignore_index = tuple(thresholds), foreground, ignore_index
        self.counts = np.zeros((len(self.thresholds), 3))  # TP, FP, FN per threshold

    def update(self, prob_foreground: np.ndarray, target: np.ndarray) -> None:
        target = np.asarray(target)
        valid = target != self.ignore_index
        prob, cell = np.asarray(prob_foreground)[valid], target[valid] == self.foreground
        for k, t in enumerate(self.thresholds):
            predicted = prob > t
            self.counts[k] += (np.count_nonzero(predicted & cell), np.count_nonzero(predicted & ~cell),
                               np.count_nonzero(~predicted & cell))

    def compute(self) -> dict:
        tp, fp, fn = self.counts.T
        denominator = 2 * tp + fp + fn
        if not denominator.any():
            return {"pixel_error": None, "threshold": None}
        f = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        k = int(np.argmax(f))  # the first threshold reaching the best F
        return {"pixel_error": float(1.0 - f[k]), "threshold": self.thresholds[k]}


class ChallengeMeter:
    """The ISBI 2012 errors of one split, image by image: the Rand error of the predicted class map
    (:class:`RandMeter`: ``rand_error rand_precision rand_recall rand_f``) and the leaderboard
    forms over thresholds of the cell probability (``rand_error_best rand_best_threshold``,
    ``pixel_error_best pixel_best_threshold``). The pair and pixel counts are in
    :meth:`arrays`, so that processes can add them up."""

    def __init__(self, foreground: int = 1, ignore_index: int = 255):
        self.at_argmax = RandMeter(foreground, ignore_index)
        self.rand = ThresholdRandMeter(foreground=foreground, ignore_index=ignore_index)
        self.pixel = ThresholdPixelMeter(foreground=foreground, ignore_index=ignore_index)

    def update(self, pred: np.ndarray, prob_foreground: np.ndarray, target: np.ndarray) -> None:
        """pred: int[H, W] class map; prob_foreground: float[H, W]; target: int[H, W]."""
        self.at_argmax.update(pred, target)
        self.rand.update(prob_foreground, target)
        self.pixel.update(prob_foreground, target)

    def arrays(self) -> list:
        """Every meter's count array (replace an entry's contents in place to merge counts)."""
        return [self.at_argmax.counts, *(m.counts for m in self.rand.meters.values()), self.pixel.counts]

    def compute(self) -> dict:
        rand, pixel = self.rand.compute(), self.pixel.compute()
        return {**self.at_argmax.compute(), "rand_error_best": rand["rand_error"],
                "rand_best_threshold": rand["threshold"], "pixel_error_best": pixel["pixel_error"],
                "pixel_best_threshold": pixel["threshold"]}


def pixel_error(cm: torch.Tensor | np.ndarray) -> float | None:
    """ISBI 2012 pixel error from a confusion matrix (Tensor or numpy [C, C], e.g.
    ``ConfusionMeter.cm``; not label maps): the share of (non-ignored) pixels whose predicted
    class differs from the ground truth, i.e. the squared Euclidean distance between the binary
    label images divided by the pixel count (= 1 - pixel accuracy)."""
    cm = torch.as_tensor(np.asarray(cm) if not isinstance(cm, torch.Tensor) else cm)
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"pixel_error takes a confusion matrix [C, C] (confusion_matrix(pred, target, C) or "
                         f"ConfusionMeter.cm), got shape {tuple(cm.shape)}")
    total = cm.sum().item()
    return 1.0 - cm.diag().sum().item() / total if total else None
