"""Training, evaluation and prediction glue for instance-segmentation models (Mask R-CNN).

The model contract (DESIGN.md): ``model(images)`` -> per image ``{"boxes", "labels", "scores",
"masks"}`` (masks ``[D, 1, H, W]`` probabilities), ``model(images, targets)`` -> dict of losses,
in either mode. Images come from the shared ``preprocess()`` already normalised, so the model's
own normalisation is switched off (``normalize=False``) when pixelwise builds it for training.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from pixelwise.data.base import Sample, SegmentationDataset
from pixelwise.engine.coco_eval import coco_evaluate


def instance_model_kwargs(kwargs: dict) -> dict:
    """Builder kwargs for training on ``preprocess()``-ed images: the images are normalised
    already, so the model must not normalise again (unless the user says otherwise)."""
    return {"normalize": False, **kwargs}


def _to_cpu(d: dict) -> dict:
    return {k: v.detach().cpu() for k, v in d.items()}


def sample_target(sample: Sample) -> dict[str, torch.Tensor]:
    """Ground-truth instances of a raw sample as tensors (masks bool[K, H, W])."""
    return {"boxes": torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(sample.instance_labels, dtype=torch.int64),
            "masks": torch.as_tensor(sample.instance_masks, dtype=torch.bool)}


@torch.no_grad()
def evaluate_instances(model: nn.Module, loader: Iterable, dataset: SegmentationDataset,
                       device: torch.device, show: bool = True) -> dict:
    """Validation loss (the losses' sum, same call as in training) and COCO box/mask AP."""
    model.eval()
    predictions, targets = [], []
    loss_sum, n = 0.0, 0
    for batch in tqdm(loader, desc="eval", leave=False, disable=not show, dynamic_ncols=True):
        images = [im.to(device) for im in batch["image"]]
        batch_targets = [{k: v.to(device) for k, v in t.items()} for t in batch["target"]]
        loss_sum += float(sum(model(images, batch_targets).values())) * len(images)
        n += len(images)
        predictions += [_to_cpu(p) for p in model(images)]
        targets += [_to_cpu(t) for t in batch["target"]]
    metrics = coco_evaluate(predictions, targets, class_ids=range(1, dataset.num_classes))
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics


def evaluate_instance_predictor(predictor, dataset: SegmentationDataset, progress: bool = True) -> dict:
    """COCO AP of a checkpoint's model over a dataset split, image by image through the Predictor."""
    predictions, targets = [], []
    for i in tqdm(range(len(dataset)), desc="eval", disable=not progress, dynamic_ncols=True):
        sample = dataset.load(i)
        predictions.append(predictor.predict_instances(sample.image, score_thresh=0.0))
        targets.append(sample_target(sample))
    return coco_evaluate(predictions, targets, class_ids=range(1, dataset.num_classes))
