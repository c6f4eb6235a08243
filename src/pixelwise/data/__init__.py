"""Dataset readers. ``DATASETS`` maps a ``--dataset`` kind to its reader class."""

from __future__ import annotations

from pixelwise.data.base import IGNORE_INDEX, Problem, Sample, SegmentationDataset, collate
from pixelwise.data.shapes import ShapesDataset
from pixelwise.errors import UserError

DATASETS: dict[str, type[SegmentationDataset]] = {
    "shapes": ShapesDataset,
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
