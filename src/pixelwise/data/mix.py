"""ClassMix: Olsson, Tranheden, Pinto, Svensson, "ClassMix: Segmentation-Based Data Augmentation
for Semi-Supervised Learning", WACV 2021 (arXiv:2007.07936), used here on labelled batches.

An image receives the pixels of half of the classes of another image of its batch, with their
labels: objects appear on new backgrounds and at new places, which a from-scratch model trained
on a few streets otherwise never sees. Draws from torch's global generator, which the trainer
seeds per epoch and restores on resume, so a resumed run mixes the same way.
"""

from __future__ import annotations

import torch

from pixelwise.sample import IGNORE_INDEX


def class_mix(batch: dict, p: float, ignore_index: int = IGNORE_INDEX) -> dict:
    """``batch`` (``image`` Tensor[N, C, H, W], ``mask`` Tensor[N, H, W], optional ``weight``
    Tensor[N, H, W]) -> a new batch in which image i, with probability ``p``, shows the pixels of
    image ``(i + 1) % N`` wherever that image's class is one of a random half (rounded up) of the
    classes it contains (``ignore_index`` is never chosen), with that image's labels and weights.
    Sources are the unmixed images; a batch of one is returned unchanged."""
    n = len(batch["mask"])
    if n < 2 or p <= 0:
        return batch
    keys = [k for k in ("image", "mask", "weight") if isinstance(batch.get(k), torch.Tensor)]
    mixed = {k: batch[k].clone() for k in keys}
    for i in range(n):
        if torch.rand(()).item() >= p:
            continue
        j = (i + 1) % n
        classes = batch["mask"][j].unique()
        classes = classes[classes != ignore_index]
        if len(classes) == 0:
            continue
        chosen = classes[torch.randperm(len(classes))[: (len(classes) + 1) // 2]]
        paste = torch.isin(batch["mask"][j], chosen)
        for k in keys:
            mixed[k][i] = torch.where(paste, batch[k][j], batch[k][i])
    return {**batch, **mixed}
