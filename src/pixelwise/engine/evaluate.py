"""``pixelwise eval``: a checkpoint on a dataset split, image by image through the same
:class:`~pixelwise.inference.predictor.Predictor` that ``predict`` uses, so the metrics equal
those computed from the masks ``predict`` writes (``tests/test_eval_consistency.py``).

Semantic keys: ``pixel_acc mean_acc mIoU fwIoU dice per_class num_images`` (confusion matrix,
see :mod:`pixelwise.metrics`), ``bf_score`` (SegNet's boundary F1; ``bf=False`` skips it) and,
for two-class membrane/cell data (``isbi2012``), ``pixel_error rand_error rand_precision
rand_recall`` (ISBI 2012 challenge definitions) and ``rand_error_best rand_best_threshold``
(the challenge's form: the best Rand F over cell-probability thresholds 0.0, 0.1, ..., 0.9).
Definitions: docs/metrics.md.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pixelwise.data import build_dataset
from pixelwise.errors import UserError
from pixelwise.inference.predictor import Predictor
from pixelwise.metrics import BFMeter, ConfusionMeter, RandMeter, ThresholdRandMeter, pixel_error

ISBI_CLASSES = ["membrane", "cell"]


def predict_resized(predictor: Predictor, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Predict at ``size`` = (h, w) and bring the result back to the image's size.

    image: uint8[H, W, 3] -> class probabilities Tensor[C, H, W]. The image is resized bilinearly
    (as the training ``augment: {resize: ...}`` does) and the probabilities Tensor[C, h, w]
    upsampled bilinearly to (H, W), so the argmax is taken, and the metrics computed, against the
    full-resolution labels."""
    import cv2

    h, w = image.shape[:2]
    small = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    probs = predictor.predict_probs(np.ascontiguousarray(small))
    if (h, w) != tuple(size):
        probs = F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return probs


def evaluate_checkpoint(checkpoint: str, dataset: str, data: str | None, split: str = "val", *,
                        tile: int | None = None, tta: bool = False, device: str = "cpu",
                        dataset_kwargs: dict | None = None, progress: bool = True,
                        bf: bool = True, resize: tuple[int, int] | None = None) -> dict:
    """Metrics of ``checkpoint`` on ``dataset``/``split`` (keys: module docstring).

    bf: also compute the boundary F1 score (about 0.1-0.3 s per 360x480 image on a CPU).
    resize: predict at (h, w) and upsample the probabilities to each image's size
    (:func:`predict_resized`); None predicts at the image's own size, as ``predict`` does."""
    predictor = Predictor.from_checkpoint(checkpoint, device, tile=tile, tta=tta)
    ds = build_dataset(dataset, data, split, **(dataset_kwargs or {}))
    if predictor.task == "instance":
        from pixelwise.engine.instance import evaluate_instance_predictor

        return evaluate_instance_predictor(predictor, ds, progress=progress)
    if ds.num_classes != predictor.meta["num_classes"]:
        raise UserError(f"{checkpoint} predicts {predictor.meta['num_classes']} classes but the {dataset} "
                        f"data has {ds.num_classes}; evaluate on the dataset it was trained for")
    meter = ConfusionMeter(ds.num_classes)
    bf_meter = BFMeter(ds.num_classes) if bf else None
    isbi = list(ds.class_names) == ISBI_CLASSES
    cell = ISBI_CLASSES.index("cell")
    rand_meter = RandMeter(foreground=cell) if isbi else None
    best_rand_meter = ThresholdRandMeter(foreground=cell) if isbi else None  # the challenge's form
    for i in tqdm(range(len(ds)), desc="eval", disable=not progress, dynamic_ncols=True):
        sample = ds.load(i)
        if resize is not None:
            probs = predict_resized(predictor, sample.image, resize)
            pred = probs.argmax(0).numpy().astype(np.uint8)
        else:
            prediction = predictor.predict(sample.image)
            probs, pred = prediction.probs, prediction.mask
        meter.update(torch.from_numpy(pred), torch.from_numpy(sample.mask))
        if bf_meter is not None:
            bf_meter.update(pred, sample.mask)
        if rand_meter is not None:
            rand_meter.update(pred, sample.mask)
            best_rand_meter.update(probs[cell].numpy(), sample.mask)
    metrics = meter.compute(list(ds.class_names))
    if bf_meter is not None:
        bf_result = bf_meter.compute()
        metrics["bf_score"] = bf_result["bf_score"]
        for row, value in zip(metrics["per_class"], bf_result["per_class_bf"]):
            row["bf"] = value
    if rand_meter is not None:
        metrics["pixel_error"] = pixel_error(meter.cm)
        metrics.update(rand_meter.compute())
        best = best_rand_meter.compute()
        metrics["rand_error_best"], metrics["rand_best_threshold"] = best["rand_error"], best["threshold"]
    metrics["num_images"] = len(ds)
    return metrics
