"""Validation during training: a model on the validation loader, after every epoch.

Semantic models are scored exactly as ``pixelwise eval`` scores a checkpoint: the images arrive
through the model's input contract (``preprocess``, which may resize them), the probabilities are
brought back to each label mask's full resolution (:func:`pixelwise.preprocess.upsample_probs`)
and the metrics come from one confusion matrix; data with a ``rand_foreground`` class (ISBI 2012)
also gets ``pixel_error``, ``pixel_error_best``, ``rand_error`` and ``rand_error_best``, as
``pixelwise eval`` computes them. Instance models get COCO box and mask AP, scored against the
ground truth ``pixelwise eval`` scores against (:class:`ScoredInstances`: COCO's crowd regions and
annotation areas included). One difference: validation runs in the run's training precision
(``--amp``; autocast), ``pixelwise eval`` in float32, so under bf16/fp16 the recorded metrics,
which pick ``best.safetensors``, can differ from ``eval``'s in the third or fourth digit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from pixelwise.coco_eval import coco_evaluate
from pixelwise.data import SegmentationDataset, collate, sample_target
from pixelwise.data.base import sample_to_tensors
from pixelwise.engine import distributed as dist
from pixelwise.engine.precision import autocast
from pixelwise.metrics import ChallengeMeter, ConfusionMeter, pixel_error
from pixelwise.models import forward_logits
from pixelwise.preprocess import upsample_probs
from pixelwise.runtime import progress
from pixelwise.sample import IGNORE_INDEX


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            t = v.to(device, non_blocking=True)
            if channels_last and k == "image" and t.ndim == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            out[k] = t
        elif k == "target":
            out[k] = [{kk: vv.to(device) for kk, vv in t.items()} for t in v]
        elif k in ("image", "mask", "weight") and isinstance(v, list):  # sizes differ: kept as a list
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


def eval_collate(batch: list[dict]) -> list[dict]:
    """Stack when all images and masks have one size each, else one batch per image (VOC-style
    varied sizes; a resizing input contract gives equal images but masks of the original sizes)."""
    if len({(tuple(b["image"].shape), tuple(b["mask"].shape)) for b in batch}) == 1:
        return [collate(batch)]
    return [collate([b]) for b in batch]


@torch.no_grad()
def validate_semantic(model: nn.Module, loader: Iterable, num_classes: int, device: torch.device,
                      class_names: list[str] | None = None, show: bool = True, amp: str = "off",
                      channels_last: bool = False, rand_foreground: int | None = None) -> dict:
    """Validation loss (unweighted cross-entropy of the full-resolution probabilities) and the
    confusion-matrix metrics; with ``rand_foreground`` (the class whose connected components are
    the objects) also the ISBI 2012 errors of :mod:`pixelwise.metrics`. Batches may be dicts or lists
    of dicts (:func:`eval_collate`). Under torchrun each rank passes its own shard and the sums
    are reduced over ranks."""
    model.eval()
    meter = ConfusionMeter(num_classes)
    challenge = ChallengeMeter(rand_foreground) if rand_foreground is not None else None
    loss_sum, pixels, n = 0.0, 0, 0
    for group in progress(loader, "eval", show, leave=False):
        for batch in group if isinstance(group, list) else [group]:
            batch = to_device(batch, device, channels_last)
            with autocast(amp, device):
                logits = forward_logits(model, batch["image"])
            probs = upsample_probs(F.softmax(logits.float(), 1), batch["mask"].shape[-2:])
            # summed over the labelled pixels and divided by their count at the end: the split's
            # mean over pixels, whatever the batches (an all-ignored image adds nothing)
            loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), batch["mask"], ignore_index=IGNORE_INDEX,
                                   reduction="sum").item()
            pixels += int((batch["mask"] != IGNORE_INDEX).sum())
            n += len(probs)
            pred = probs.argmax(1)
            meter.update(pred, batch["mask"])
            if challenge is not None:
                for p, prob, target in zip(pred.cpu().numpy(), probs[:, rand_foreground].cpu().numpy(),
                                           batch["mask"].cpu().numpy()):
                    challenge.update(p, prob, target)
    if dist.active():
        cm = dist.all_reduce_sum(meter.cm.to(device)).cpu()
        meter.cm.copy_(cm)
        sums = dist.all_reduce_sum(torch.tensor([loss_sum, float(pixels), float(n)], dtype=torch.float64,
                                                device=device))
        loss_sum, pixels, n = sums[0].item(), int(sums[1].item()), int(sums[2].item())
        if challenge is not None:
            for counts in challenge.arrays():
                counts[...] = dist.all_reduce_sum(torch.from_numpy(counts).to(device)).cpu().numpy()
    metrics = meter.compute(class_names)
    if challenge is not None:
        scores = challenge.compute()
        metrics["pixel_error"] = pixel_error(meter.cm)
        metrics.update({k: scores[k] for k in ("pixel_error_best", "rand_error", "rand_error_best")})
    metrics["loss"] = loss_sum / max(pixels, 1)
    metrics["num_images"] = n
    return metrics


class ScoredInstances(Dataset):
    """An instance dataset's validation samples as tensors (``dataset[i]``, no augmentation), each
    with ``scored``: its ground truth as COCO scores it (:func:`~pixelwise.data.sample_target`,
    crowd regions included). ``target``, the training target, gives the validation loss."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset.load(index)
        out = sample_to_tensors(sample, self.dataset.input_spec)
        out["scored"] = sample_target(sample)
        return out


def _to_cpu(d: dict) -> dict:
    return {k: v.detach().cpu() for k, v in d.items()}


@torch.no_grad()
def validate_instances(model: nn.Module, loader: Iterable, dataset: SegmentationDataset,
                       device: torch.device, show: bool = True) -> dict:
    """Validation loss (the losses' sum, same call as in training) and COCO box/mask AP against
    each batch's ``scored`` ground truth (a loader over :class:`ScoredInstances`). Detections come
    from batches of equal-size images only, else image by image: the model pads a batch to its
    largest image, which changes the others' detections, and ``pixelwise eval`` predicts one image
    at a time."""
    model.eval()
    predictions, targets = [], []
    loss_sum, n = 0.0, 0
    for batch in progress(loader, "eval", show, leave=False):
        images = [im.to(device) for im in batch["image"]]
        batch_targets = [{k: v.to(device) for k, v in t.items()} for t in batch["target"]]
        loss_sum += float(sum(model(images, batch_targets).values())) * len(images)
        n += len(images)
        same_size = len({tuple(im.shape) for im in images}) == 1
        found = model(images) if same_size else [model([im])[0] for im in images]
        predictions += [_to_cpu(p) for p in found]
        targets += [_to_cpu(t) for t in batch["scored"]]
    metrics = coco_evaluate(predictions, targets, class_ids=range(1, dataset.num_classes))
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics
