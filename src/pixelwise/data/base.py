"""The dataset contract every reader follows.

A reader subclasses :class:`SegmentationDataset` and implements ``__len__``, ``load(i)``
(raw arrays, no augmentation) and sets ``class_names`` / ``palette``. ``__getitem__``
applies the dataset's ``transform`` (a callable ``Sample -> Sample`` on numpy arrays,
e.g. an albumentations preset from :mod:`pixelwise.data.transforms`) and then the one
shared :func:`pixelwise.data.transforms.preprocess` to produce tensors.

Labels are class indices ``0..C-1`` with ``IGNORE_INDEX = 255`` for ignored pixels,
everywhere inside pixelwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = 255


@dataclass
class Sample:
    """One raw example.

    image: uint8[H, W, 3] RGB.  mask: uint8[H, W] class ids, 255 = ignore.
    Instance data (optional, for Mask R-CNN and instance-aware crops):
    instance_masks: bool[K, H, W]; instance_labels: int64[K] (class ids, 1..C-1 for
    foreground); boxes: float32[K, 4] as x1, y1, x2, y2 in pixels (x2/y2 exclusive).
    weight: float32[H, W] optional per-pixel loss weight (U-Net boundary map).
    """

    image: np.ndarray
    mask: np.ndarray
    name: str = ""
    instance_masks: np.ndarray | None = None
    instance_labels: np.ndarray | None = None
    boxes: np.ndarray | None = None
    weight: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def replace(self, **kw) -> Sample:
        return replace(self, **kw)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset file, as found by ``check()``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SegmentationDataset(Dataset):
    """Base class. Subclasses set ``class_names``, ``palette`` and implement ``load``."""

    class_names: list[str] = []
    palette: list[tuple[int, int, int]] = []
    task: str = "semantic"  # or "instance" where instance targets are available

    def __init__(self, transform: Callable[[Sample], Sample] | None = None,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None):
        from pixelwise.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.transform = transform
        self.mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        self.std = tuple(std) if std is not None else IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Sample:
        """The raw sample, without augmentation."""
        raise NotImplementedError

    def check(self) -> list[Problem]:
        """Cheap validation (headers and sizes, not full decodes). Default: nothing to check."""
        return []

    def drop(self, problems: list[Problem]) -> None:
        """Leave out the files named in ``problems`` (``--skip-invalid``). Readers that keep a list
        of files override this."""
        if problems:
            from pixelwise.errors import UserError

            raise UserError(f"{type(self).__name__} cannot skip invalid files; fix {problems[0]}")

    def __getitem__(self, index: int) -> dict:
        from pixelwise.data.transforms import sample_to_tensors

        sample = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample_to_tensors(sample, self.mean, self.std)


def collate(batch: list[dict]) -> dict:
    """Stack equally-sized samples; keep instance targets (variable K) as lists."""
    out: dict = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if key in ("image", "mask", "weight") and all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class Compose:
    """Apply ``Sample -> Sample`` transforms in order (a class, not a closure, so that DataLoader
    workers started with spawn can pickle it)."""

    def __init__(self, steps: Sequence[Callable]):
        self.steps = list(steps)

    def __repr__(self) -> str:
        return f"Compose({self.steps})"

    def __call__(self, sample):
        for step in self.steps:
            sample = step(sample)
        return sample


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """bool[K, H, W] -> float32[K, 4] tight boxes (x1, y1, x2, y2), x2/y2 exclusive; empty -> zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, m in enumerate(masks):
        cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
        if cols.size:
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes
