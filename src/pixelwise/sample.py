"""The sample contract every reader, transform and loss agrees on, and its constants.

Labels are class indices ``0..C-1``, with ``IGNORE_INDEX = 255`` for pixels that take no part
in losses or metrics, everywhere inside pixelwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

IGNORE_INDEX = 255


# the largest image size a file's input contract, an augment resize or crop, or --crop may ask for
# (268 MP: 3 GB as a float32 RGB tensor); above it a size is a damaged file or a typo, which would
# otherwise fail inside OpenCV (out of memory, or past a C long)
MAX_INPUT_PIXELS = 2**28


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


def visible_instances(masks: np.ndarray, labels: np.ndarray | None) -> dict:
    """Transformed instance masks bool[K, H, W] and their labels -> the Sample fields
    ``instance_masks``, ``instance_labels`` and ``boxes`` of those with a pixel left (a crop, warp
    or downscale can erase an object; a box of no area is refused by Mask R-CNN)."""
    keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)  # -1 is not inferred from 0
    fields = {"instance_masks": masks[keep], "boxes": boxes_from_masks(masks[keep])}
    if labels is not None:
        fields["instance_labels"] = np.asarray(labels).reshape(-1)[keep]
    return fields


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """bool[K, H, W] -> float32[K, 4] tight boxes (x1, y1, x2, y2), x2/y2 exclusive; empty -> zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, m in enumerate(masks):
        cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
        if cols.size:
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes
