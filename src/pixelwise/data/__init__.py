"""Dataset readers. ``DATASETS`` maps a ``--dataset`` kind to its reader class."""

from __future__ import annotations

from collections.abc import Callable

from pixelwise.data.ade20k import ADE20K
from pixelwise.data.base import IGNORE_INDEX, Problem, Sample, SegmentationDataset, collate
from pixelwise.data.camvid import CamVid
from pixelwise.data.cityscapes import Cityscapes
from pixelwise.data.coco import COCOInstances
from pixelwise.data.folder import FolderDataset
from pixelwise.data.isbi import ISBI2012
from pixelwise.data.shapes import ShapesDataset
from pixelwise.data.voc import VOCSegmentation
from pixelwise.errors import UserError

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


def build_dataset(kind: str, root: str | None, split: str, **kwargs) -> SegmentationDataset:
    """Open dataset ``kind`` at ``root`` for ``split``; kwargs go to the reader."""
    if kind not in DATASETS:
        raise UserError(f"unknown dataset kind {kind!r}; choose one of: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[kind]
    try:
        return cls(root=root, split=split, **kwargs)
    except TypeError as e:
        raise UserError(f"bad dataset option for {kind!r}: {e}") from None


__all__ = ["DATASETS", "IGNORE_INDEX", "Problem", "Sample", "SegmentationDataset", "build_dataset", "collate"]
