"""Where an ISBI 2012 checkpoint's Rand error comes from.

The challenge's foreground-restricted Rand error (docs/metrics.md) counts every pixel of a
ground-truth cell that the thresholded map calls membrane as a segment of its own, so membranes
predicted thicker than the ground truth's cost recall even when no two cells are joined and none
is cut. This script scores a checkpoint on a split at each of the challenge's thresholds and
separates the two:

- ``rand``, ``P / R``: the challenge's Rand error, precision and recall (as ``pixelwise eval``);
- ``cell->membrane``: the share of ground-truth cell pixels the map calls membrane, and how far
  they lie from the nearest ground-truth membrane pixel (1 px, 2 px, 3-4, 5-8, farther);
- ``attributed``: the Rand error when each of those pixels is given to the nearest predicted
  segment instead of counting alone. This joins nothing new and cuts nothing, so what remains
  is the error of the segmentation's topology: merges (precision) and splits (recall). It is a
  diagnosis, not the challenge's score; ``pixelwise eval --watershed`` makes a real segmentation
  of the same idea (the pixels go to the cell they flood to first, with one-pixel boundaries
  between cells, pixelwise.inference.cells) and scores it as the challenge does.
- ``watershed``: the Rand error of the watershed cells seeded at the threshold, with one-pixel
  boundaries (pixelwise.inference.cells; ``pixelwise eval --watershed T`` scores them at its
  threshold 0.0).

First, without any model, it scores the ground truth itself with its membranes eroded by 1 pixel
and dilated by 1, 2 and 3 pixels (3x3 square): the error a segmentation gets for membranes that
much thinner (gaps join cells) or thicker, with everything else perfect.

    PYTHONPATH=src python benchmarks/isbi_rand_parts.py --data ~/data/isbi2012 \\
        [--checkpoint RUN/last.safetensors --tta d4]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from pixelwise.data import build_dataset
from pixelwise.inference.cells import cell_map, watershed_cells
from pixelwise.inference.predictor import Predictor
from pixelwise.metrics import RAND_THRESHOLDS, label_components, rand_counts, rand_scores, segment_rand_counts

BANDS = ((0, 1.5, "1"), (1.5, 2.5, "2"), (2.5, 4.5, "3-4"), (4.5, 8.5, "5-8"), (8.5, np.inf, ">8"))


def attribute_to_nearest(pred_seg: np.ndarray) -> np.ndarray:
    """Each 0 pixel of a labelling takes the label of the nearest labelled pixel."""
    if not pred_seg.any():
        return pred_seg
    rows, cols = ndimage.distance_transform_edt(pred_seg == 0, return_distances=False, return_indices=True)
    return pred_seg[rows, cols]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="without it: only the ground truth with grown or shrunk membranes")
    ap.add_argument("--data", required=True, help="the isbi2012 folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--val-count", type=int, default=4, help="the reader's val_count (the recipes' 4)")
    ap.add_argument("--tta", default=None, help="as pixelwise eval --tta (d4: the paper's averaging)")
    args = ap.parse_args()

    ds = build_dataset("isbi2012", args.data, split=args.split, val_count=args.val_count)
    fg = ds.rand_foreground
    samples = [ds.load(i) for i in range(len(ds))]
    cell_pixels = sum(np.count_nonzero(sample.mask == fg) for sample in samples)
    for px in (-1, 1, 2, 3):
        counts, lost = np.zeros(3), 0
        for sample in samples:
            grow = ndimage.binary_dilation if px > 0 else ndimage.binary_erosion
            membrane = grow(sample.mask != fg, structure=np.ones((3, 3)), iterations=abs(px))
            counts += rand_counts(np.where(membrane, -1, fg), sample.mask, foreground=fg)
            lost += np.count_nonzero(membrane & (sample.mask == fg))
        print(f"{args.split} ground truth, membranes {abs(px)} px {'thicker' if px > 0 else 'thinner'}: Rand error "
              f"{rand_scores(*counts)['rand_error']:.4f}, cell pixels lost {lost / cell_pixels:.3f}")
    if not args.checkpoint:
        return
    predictor = Predictor.from_checkpoint(args.checkpoint, tta=args.tta)
    slices = []
    for sample in samples:
        cell = sample.mask == fg
        slices.append((predictor.predict(sample.image).probs[fg].numpy(), label_components(cell),
                       ndimage.distance_transform_edt(cell)))
    print(f"{args.checkpoint}, {args.split} ({len(slices)} slices), tta {args.tta}")
    print("thr   rand    P / R        cell->membrane  by distance " + " / ".join(b[2] for b in BANDS)
          + " px   attributed: rand  P / R        watershed: rand  P / R")
    for t in RAND_THRESHOLDS[1:]:  # 0.0 calls nearly every pixel cell: never the best
        plain, attributed, shed, bands = np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(len(BANDS))
        for prob, gt_seg, dist in slices:
            called_cell = prob > t
            pred_seg = label_components(called_cell)  # as rand_counts labels it (pixelwise eval's metric)
            plain += segment_rand_counts(gt_seg, pred_seg)
            attributed += segment_rand_counts(gt_seg, attribute_to_nearest(pred_seg))
            # the watershed cells seeded at t, with one-pixel boundaries (eval --watershed t, at threshold 0.0)
            shed += segment_rand_counts(gt_seg, label_components(cell_map(watershed_cells(prob, t))))
            lost = (gt_seg > 0) & ~called_cell
            bands += [np.count_nonzero(lost & (dist > lo) & (dist <= hi)) for lo, hi, _ in BANDS]
        s, a, w = rand_scores(*plain), rand_scores(*attributed), rand_scores(*shed)
        print(f"{t:.1f}  {s['rand_error']:.4f}  {s['rand_precision']:.3f} / {s['rand_recall']:.3f}  "
              f"{bands.sum() / cell_pixels:.3f}           " + " / ".join(f"{b / cell_pixels:.3f}" for b in bands)
              + f"   {a['rand_error']:.4f}  {a['rand_precision']:.3f} / {a['rand_recall']:.3f}"
              + f"        {w['rand_error']:.4f}  {w['rand_precision']:.3f} / {w['rand_recall']:.3f}")


if __name__ == "__main__":
    main()
