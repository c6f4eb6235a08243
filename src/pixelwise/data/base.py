"""The dataset contract every reader follows.

A reader subclasses :class:`SegmentationDataset` and implements ``__len__``, ``load(i)``
(raw arrays, no augmentation) and sets ``class_names`` / ``palette``. ``__getitem__``
applies the dataset's ``transform`` (a callable ``Sample -> Sample`` on numpy arrays,
e.g. an augmentation preset from :mod:`pixelwise.data.augment`) and then turns the image into a
tensor with the one shared :func:`pixelwise.preprocess.preprocess` under ``input_spec``.

Labels are class indices ``0..C-1`` with ``IGNORE_INDEX = 255`` for ignored pixels,
everywhere inside pixelwise (:mod:`pixelwise.sample`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pixelwise.errors import UserError, brief
from pixelwise.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec, preprocess
from pixelwise.sample import IGNORE_INDEX, Sample, boxes_from_masks

__all__ = ["IGNORE_INDEX", "Compose", "Problem", "Sample", "SegmentationDataset", "boxes_from_masks", "collate",
           "sample_target", "sample_to_tensors"]


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

    # Options that shape what a model trains on, not what it is scored on (COCO's skip_empty, as
    # torchvision applies it to the training split alone): validation and eval leave them out.
    training_only_options: tuple[str, ...] = ()

    # What to do when every labelled pixel is class 0 (train's refusal says it)
    all_background_hint = ("If these are binary masks with the foreground stored as 255, store it as 1 (255 means "
                           "'ignore')")

    # The class whose connected components are the objects of Rand-error scoring (ISBI's cells),
    # or None where that metric does not apply.
    rand_foreground: int | None = None

    def __init__(self, transform: Callable[[Sample], Sample] | None = None,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None):
        self.transform = transform
        self.mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        self.std = tuple(std) if std is not None else IMAGENET_STD
        # How __getitem__ turns images into tensors; the trainer sets the model's contract here.
        self.input_spec = InputSpec(mean=self.mean, std=self.std)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Sample:
        """The raw sample, without augmentation."""
        raise NotImplementedError

    def has_instances(self) -> bool:
        """Whether the samples carry instance annotations (what an instance model trains and is
        scored on); read off the first sample. An empty dataset answers True: nothing to refuse."""
        return len(self) == 0 or self.load(0).instance_masks is not None

    def check(self) -> list[Problem]:
        """Cheap validation (headers and sizes, not full decodes). Default: nothing to check."""
        return []

    def notes(self) -> list[str]:
        """Things about the data that are not problems but change what training does (``data
        inspect`` prints them). Default: none."""
        return []

    def where(self) -> str:
        """``"the val split of CamVid"``: the data named in messages."""
        split = getattr(self, "split", None)
        return f"the {split} split of {type(self).__name__}" if split else type(self).__name__

    def check_or_refuse(self, skip_invalid: bool, purpose: str, empty: str | None = None,
                        problems: list[Problem] | None = None) -> list[Problem]:
        """Run :meth:`check` (or take its ``problems``): with problems, refuse (a UserError naming
        the first ones and the way out) unless ``skip_invalid``, which drops the files concerned.
        ``purpose``: what the caller does with the data ("train", "evaluate"); ``empty``: what the
        refusal says when nothing is left (default "nothing to <purpose>"). -> the problems (dropped)."""
        problems = self.check() if problems is None else problems
        where = self.where()
        if problems and not skip_invalid:
            shown = "; ".join(str(p) for p in problems[:2])
            raise UserError(f"{len(problems)} problem(s) in {where}, e.g. {shown}; fix them or pass --skip-invalid "
                            f"to {purpose} without those files (`pixelwise data inspect` lists them all)")
        if problems:
            self.drop(problems)
            if len(self) == 0:
                raise UserError(f"every item of {where} has a problem, e.g. {problems[0]}; "
                                f"{empty or f'nothing to {purpose}'}")
        return problems

    def drop(self, problems: list[Problem]) -> int:
        """Leave out the files named in ``problems`` (``--skip-invalid``); -> how many items went.
        Readers that keep a list of files override this."""
        if problems:
            raise UserError(f"{type(self).__name__} cannot skip invalid files; fix {problems[0]}")
        return 0

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, numbers.Integral) or isinstance(index, bool):
            raise TypeError(f"{type(self).__name__} is indexed by one whole number, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range for {n} item(s)")
        sample = self.load(int(index) % n)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample_to_tensors(sample, self.input_spec)


def sample_to_tensors(sample: Sample, spec: InputSpec = InputSpec()) -> dict:  # noqa: B008 - frozen
    """A :class:`Sample` -> dict of tensors: image ``preprocess(sample.image, spec)``
    Tensor[C, h, w], mask int64 Tensor[H, W] (at the sample's own size, also when ``spec``
    resizes the image: metrics are taken at full resolution), and where present weight
    Tensor[H, W] and ``target`` (masks bool Tensor[K, H, W], labels, boxes)."""
    out = {
        "image": preprocess(sample.image, spec),
        "mask": torch.from_numpy(np.require(sample.mask, requirements=["C", "W"])).long(),
        "name": sample.name,
    }
    if sample.weight is not None:
        out["weight"] = torch.from_numpy(np.ascontiguousarray(sample.weight, dtype=np.float32))
    if sample.instance_masks is not None:
        out["target"] = {
            "masks": torch.from_numpy(np.ascontiguousarray(sample.instance_masks, dtype=bool)),
            "labels": torch.as_tensor(sample.instance_labels, dtype=torch.int64),
            "boxes": torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4),
        }
    return out


def sample_target(sample: Sample) -> dict[str, torch.Tensor]:
    """Ground-truth instances of a raw sample as tensors (masks bool[K, H, W]); where the reader
    gives them (COCO), also the objects it does not train on (``meta["untrained"]``: boxes under
    1 px, empty masks; ``iscrowd`` 0) and its crowd regions (``iscrowd`` 1), after the instances,
    the annotations' own ``area`` and, where given, their boxes as the file has them (``bbox_xywh``
    float64, which COCO's box IoU is taken on): the ground truth COCO's evaluation scores."""
    target = {"boxes": torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.as_tensor(sample.instance_labels, dtype=torch.int64),
              "masks": torch.as_tensor(sample.instance_masks, dtype=torch.bool)}
    crowd, areas = sample.meta.get("crowd"), sample.meta.get("areas")
    if crowd is None or areas is None:
        return target
    h, w = target["masks"].shape[-2:]
    untrained = sample.meta.get("untrained") or {"masks": np.zeros((0, h, w), bool), "labels": [], "boxes": [],
                                                 "areas": [], "bboxes": []}
    parts = [untrained, crowd]
    out = {"boxes": torch.cat([target["boxes"], *(torch.as_tensor(p["boxes"], dtype=torch.float32).reshape(-1, 4)
                                                  for p in parts)]),
           "labels": torch.cat([target["labels"], *(torch.as_tensor(p["labels"], dtype=torch.int64) for p in parts)]),
           "masks": torch.cat([target["masks"], *(torch.as_tensor(p["masks"], dtype=torch.bool) for p in parts)]),
           "iscrowd": torch.cat([torch.zeros(len(target["labels"]) + len(untrained["labels"]), dtype=torch.int64),
                                 torch.ones(len(crowd["labels"]), dtype=torch.int64)]),
           "area": torch.as_tensor([*areas, *untrained["areas"], *crowd["areas"]], dtype=torch.float64)}
    bboxes = [sample.meta.get("bboxes"), untrained.get("bboxes"), crowd.get("bboxes")]
    if all(b is not None for b in bboxes):
        out["bbox_xywh"] = torch.as_tensor([box for b in bboxes for box in b], dtype=torch.float64).reshape(-1, 4)
    return out


def collate(batch: list[dict]) -> dict:
    """Stack images, masks and weights of equal size; keep them as lists when their sizes differ
    (Mask R-CNN takes a list of images of any sizes; a semantic trainer refuses such a batch), and
    instance targets (variable K) always as lists."""
    out: dict = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if (key in ("image", "mask", "weight") and all(isinstance(v, torch.Tensor) for v in values)
                and all(v.shape == values[0].shape for v in values)):
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


def check_dataset(call: str, ds: object) -> None:
    """A TypeError naming what ``call`` takes, for a path or a list where a dataset reader goes
    (else an AttributeError deep inside: "'str' object has no attribute 'num_classes'")."""
    if not isinstance(ds, SegmentationDataset):
        raise TypeError(f"{call} takes a dataset reader, such as pixelwise.data.build_dataset(kind, root, split), "
                        f"got {type(ds).__name__} {brief(ds)}")
