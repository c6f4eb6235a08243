"""Dataset readers. ``DATASETS`` maps a ``--dataset`` kind to its reader class."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from inspect import signature

import numpy as np

from pixelwise.data import ade20k, camvid, cityscapes, isbi
from pixelwise.data.ade20k import ADE20K
from pixelwise.data.base import IGNORE_INDEX, Problem, Sample, SegmentationDataset, collate, sample_target
from pixelwise.data.camvid import CamVid
from pixelwise.data.cityscapes import Cityscapes
from pixelwise.data.coco import COCOInstances
from pixelwise.data.folder import FolderDataset
from pixelwise.data.isbi import ISBI2012
from pixelwise.data.shapes import ShapesDataset
from pixelwise.data.voc import VOCSegmentation
from pixelwise.errors import UserError, brief, finite_number

DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "shapes": ShapesDataset,
    "camvid": CamVid,
    "voc": VOCSegmentation,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "isbi2012": ISBI2012,
    "coco": COCOInstances,
    "folder": FolderDataset,
}


@dataclass(frozen=True)
class StoredLabels:
    """How a dataset kind stores its label files, where a stored value is not the class id:
    ``lut`` maps a stored value to a class id (255: ignore, -1: not a label of the dataset);
    ``gray``: the file is read by its gray levels (a 1-bit or palette label by the colour of its
    pixels), not by its stored values."""

    describe: str
    lut: np.ndarray
    gray: bool = False
    # files of the dataset's layout that hold class ids already: {name ending: what to send instead}
    not_these: tuple[tuple[str, str], ...] = ()


# the kinds whose label files are not class-id masks (VOC's palette PNGs and SBD's, a folder's
# masks, COCO's polygons are class ids or are read otherwise)
STORED_LABELS: dict[str, StoredLabels] = {
    "camvid": StoredLabels(camvid.STORED_LABELS, camvid.LABEL_LUT),
    "cityscapes": StoredLabels(cityscapes.STORED_LABELS, cityscapes.LABEL_LUT, not_these=(
        ("_labelTrainIds.png", "holds train ids, which are class ids: send it with truth_format=classes"),)),
    "ade20k": StoredLabels(ade20k.STORED_LABELS, ade20k.LABEL_LUT),
    "isbi2012": StoredLabels(isbi.STORED_LABELS, isbi.LABEL_LUT, gray=True),
}


def build_dataset(kind: str, root: str | None, split: str, **kwargs) -> SegmentationDataset:
    """Open dataset ``kind`` at ``root`` for ``split``; kwargs go to the reader. An unknown option
    or a bad ``transform mean std`` is a UserError here; each reader checks its own options."""
    if kind not in DATASETS:
        close = difflib.get_close_matches(str(kind), DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown dataset kind {kind!r}; {hint}choose one of: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[kind]
    options = [n for n, p in signature(cls).parameters.items()
               if n not in ("root", "split") and p.kind is not p.VAR_KEYWORD]
    for key in kwargs:
        if key not in options:
            close = difflib.get_close_matches(str(key), options, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"--dataset-kwargs: {kind} has no option {key!r}; {hint}options: {', '.join(options)}")
    _check_common(kind, kwargs)
    _check_types(kind, cls, kwargs)
    try:
        return cls(root=root, split=split, **kwargs)
    except TypeError as e:
        raise UserError(f"--dataset-kwargs: bad option for {kind!r}: {e}") from None


def scoring_kwargs(kind: str, kwargs: Mapping) -> tuple[dict, list[str]]:
    """``kwargs`` for a split that is scored (validation, eval): without the reader's
    training-only options (:attr:`SegmentationDataset.training_only_options`), which are named."""
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"dataset_kwargs must map the reader's option names to values, e.g. {{'num_train': 200}}, "
                        f"not {kwargs!r}")
    only = getattr(DATASETS.get(kind), "training_only_options", ())
    return {k: v for k, v in kwargs.items() if k not in only}, [k for k in kwargs if k in only]


# what a reader's annotated option accepts: JSON's true/false for bool, whole numbers for int (not
# true/false, which Python counts as 1/0), any number for float, a path string where None is allowed
_ACCEPTS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("a whole number", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    "int | None": ("a whole number or null",
                   lambda v: v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool))),
    "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    "str | None": ("a string (a path) or null", lambda v: v is None or isinstance(v, str)),
}


def _check_types(kind: str, cls: Callable[..., SegmentationDataset], kwargs: dict) -> None:
    """Each option of a type in :data:`_ACCEPTS` holds a value of that type: ``"join_val": "no"``
    is true to Python and would join the val split; a UserError names the option instead."""
    if getattr(cls, "checks_option_types", False):
        return
    params = signature(cls).parameters
    for key, value in kwargs.items():
        accepts = _ACCEPTS.get(str(params[key].annotation))
        if accepts is not None and not accepts[1](value):
            raise UserError(f"--dataset-kwargs: {kind} option {key!r} must be {accepts[0]}, got {brief(value)}")


def _check_common(kind: str, kwargs: dict) -> None:
    """The options every reader takes (``transform mean std``); each reader checks its own."""
    if kwargs.get("transform") is not None and not callable(kwargs["transform"]):
        raise UserError(f"--dataset-kwargs: {kind} transform must be a Python callable, not {kwargs['transform']!r}; "
                        "remove it (train builds it from --augment)")
    for key in ("mean", "std"):
        value = kwargs.get(key)
        if value is None:
            continue
        valid = isinstance(value, list | tuple) and len(value) == 3 and all(
            finite_number(v) for v in value)
        if not valid or (key == "std" and min(value) <= 0):
            example = "[0.229, 0.224, 0.225]" if key == "std" else "[0.485, 0.456, 0.406]"
            raise UserError(f"--dataset-kwargs: {kind} {key} must be three numbers (R, G, B on a 0..1 scale"
                            f"{', each > 0' if key == 'std' else ''}), e.g. {example}, got {brief(value)}")


__all__ = ["DATASETS", "IGNORE_INDEX", "Problem", "Sample", "SegmentationDataset", "build_dataset", "collate",
           "sample_target", "scoring_kwargs"]
