"""Instance-centred crops (DeconvNet's first training stage): a ``Sample -> Sample`` transform.

Each call picks one object uniformly at random (numpy's global RNG, which the trainer seeds)
and crops a window centred on it: the object's box scaled by ``context``, widened to the output
aspect ratio so objects are not distorted, then resized to ``size``. Objects come from the
sample's instance masks when it has any, otherwise from the connected components of each
non-background class of the semantic mask (``scipy.ndimage.label``, 8-connectivity). Outside
the image the window is padded (image 0, mask ignore, weight 0). A sample without objects is
resized whole. The class mask keeps every labelled pixel in the window, not only the object's.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from pixelwise.data.base import IGNORE_INDEX, Sample, boxes_from_masks
from pixelwise.sample import visible_instances


def object_boxes(sample: Sample, background: int | None = 0,
                 ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """float32[K, 4] boxes (x1, y1, x2, y2; x2/y2 exclusive) of the sample's objects: its
    instance masks, else connected components of every class except ``background`` / ignore."""
    if sample.instance_masks is not None and len(sample.instance_masks):
        boxes = boxes_from_masks(np.asarray(sample.instance_masks, dtype=bool))
        return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    out = []
    for k in np.unique(sample.mask):
        if k == ignore_index or (background is not None and k == background):
            continue
        labels, _ = ndimage.label(sample.mask == k, structure=np.ones((3, 3), dtype=bool))
        for sl in ndimage.find_objects(labels):
            if sl is not None:
                out.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def _window(a: np.ndarray, y0: int, x0: int, h: int, w: int, fill, lead: bool = False) -> np.ndarray:
    """The (h, w) window at (y0, x0) of ``a``, padded with ``fill`` outside: ``a`` is [H, W] or
    [H, W, C], or [K, H, W] with ``lead=True``."""
    H, W = (a.shape[1:3] if lead else a.shape[:2])
    out_shape = (a.shape[0], h, w) if lead else (h, w) + a.shape[2:]
    out = np.full(out_shape, fill, dtype=a.dtype)
    ys, ye = max(y0, 0), min(y0 + h, H)
    xs, xe = max(x0, 0), min(x0 + w, W)
    if ys < ye and xs < xe:
        if lead:
            out[:, ys - y0:ye - y0, xs - x0:xe - x0] = a[:, ys:ye, xs:xe]
        else:
            out[ys - y0:ye - y0, xs - x0:xe - x0] = a[ys:ye, xs:xe]
    return out


class InstanceCrop:
    """Crop around one random object and resize to ``size`` (h, w); see the module docstring."""

    def __init__(self, size: tuple[int, int], context: float = 1.2, background: int | None = 0,
                 ignore_index: int = IGNORE_INDEX):
        if context <= 0:
            raise ValueError(f"context must be positive, got {context}")
        self.size = (int(size[0]), int(size[1]))
        self.context, self.background, self.ignore_index = float(context), background, ignore_index

    def __repr__(self) -> str:
        return f"InstanceCrop(size={self.size}, context={self.context})"

    def window(self, box: np.ndarray) -> tuple[int, int, int, int]:
        """Box (x1, y1, x2, y2) -> window (y0, x0, h, w) centred on it, aspect of ``size``."""
        x1, y1, x2, y2 = (float(v) for v in box)
        aspect = self.size[1] / self.size[0]
        h = max((y2 - y1) * self.context, (x2 - x1) * self.context / aspect, 1.0)
        w = h * aspect
        cy, cx = (y1 + y2) / 2, (x1 + x2) / 2
        hi, wi = max(1, int(round(h))), max(1, int(round(w)))
        return int(round(cy - hi / 2)), int(round(cx - wi / 2)), hi, wi

    def __call__(self, s: Sample) -> Sample:
        boxes = object_boxes(s, self.background, self.ignore_index)
        if len(boxes):
            y0, x0, h, w = self.window(boxes[int(np.random.randint(len(boxes)))])
        else:
            y0, x0, (h, w) = 0, 0, s.mask.shape
        oh, ow = self.size

        def resize(a: np.ndarray, nearest: bool) -> np.ndarray:
            interp = cv2.INTER_NEAREST_EXACT if nearest else cv2.INTER_LINEAR
            return cv2.resize(a, (ow, oh), interpolation=interp)

        kw: dict = {"image": resize(_window(s.image, y0, x0, h, w, 0), False),
                    "mask": resize(_window(s.mask, y0, x0, h, w, self.ignore_index), True)}
        if s.weight is not None:
            kw["weight"] = resize(_window(np.asarray(s.weight, np.float32), y0, x0, h, w, 0.0), True)
        if s.instance_masks is not None:
            inst = np.asarray(s.instance_masks, dtype=bool)
            if len(inst):
                win = _window(inst, y0, x0, h, w, False, lead=True).astype(np.uint8)
                inst = np.stack([resize(m, True) for m in win]).astype(bool)
            else:
                inst = np.zeros((0, oh, ow), dtype=bool)
            kw.update(visible_instances(inst, s.instance_labels))
        return s.replace(**kw)
