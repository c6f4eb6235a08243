"""Cells from a membrane (boundary) probability map, by seeded watershed.

A network trained on the ISBI 2012 membranes gives, per pixel, the probability of being inside a
cell. Thresholding it at ``t`` makes the cells the connected regions above ``t``, and every pixel
at or below ``t`` membrane; the challenge's Rand error counts each such pixel that lies inside a
true cell as a segment of its own (docs/metrics.md), so a map whose membranes are a pixel thicker
than the annotator's loses about 0.05 with no cell joined or cut. The watershed keeps the
threshold's decision about *which* cells there are (its seeds are the regions above ``t``) and
gives every other pixel to the seed it floods to first over the membrane probability
``1 - p`` (so cells meet on the ridge of the membrane map), leaving a boundary one pixel wide
between cells. The metric: Arganda-Carreras et al., Crowdsourcing the creation of image
segmentation algorithms for connectomics, Frontiers in Neuroanatomy 2015; the U-Net paper
(arXiv:1505.04597) reports its result without post-processing.

:func:`watershed_cells` labels the cells; :func:`cell_map` draws them as a cell / boundary map;
:func:`with_boundaries` draws those boundaries into the probability map as certain membrane,
which is what ``pixelwise eval --watershed`` scores: one map whose low thresholds give the
watershed cells (for the Rand error) and whose middle thresholds give the network's membranes
about as they were (for the pixel error, which wants the annotators' membrane widths).
"""

from __future__ import annotations

import numpy as np

from pixelwise.errors import UserError
from pixelwise.metrics import label_components

LEVELS = 64  # the flooding's levels: the membrane probability in steps of 1/64


def check_seed_threshold(threshold: float) -> None:
    """``--watershed T`` of ``eval`` and ``predict``: a cell probability in [0, 1)."""
    if not 0.0 <= threshold < 1.0:  # NaN fails too
        raise UserError(f"--watershed {threshold}: the seed threshold is a cell probability in [0, 1), e.g. 0.5")


def watershed_cells(prob_cell: np.ndarray, threshold: float) -> np.ndarray:
    """int32[H, W] cell labels 1..N of a cell-probability map float[H, W] in [0, 1].

    The seeds are the 4-connected regions where ``prob_cell > threshold`` (the cells of the map
    thresholded at ``threshold``). The membrane probability ``1 - prob_cell``, in 64 levels, is
    flooded from its lowest level up: at each level every labelled region grows, one pixel per
    round into its 4-neighbours at or below the level, until none can; so pixels join the cell
    they are reached from at the lowest membrane probability, a plateau (a membrane the network is
    sure of) is split down its middle, and every region stays connected to its seed. A pixel no
    seed reaches, and every pixel of a map with no seed, is 0."""
    prob = np.asarray(prob_cell, dtype=np.float64)
    if prob.ndim != 2:
        raise ValueError(f"prob_cell must be a 2-D map, got shape {prob.shape}")
    labels = label_components(prob > threshold).astype(np.int32)
    if not labels.any():
        return labels
    relief = np.rint((1.0 - np.clip(prob, 0.0, 1.0)) * LEVELS).astype(np.int16)
    for level in np.unique(relief[labels == 0]):
        open_ = (relief <= level) & (labels == 0)
        while True:
            near = _neighbour_label(labels)
            reached = open_ & (near > 0)
            if not reached.any():
                break
            labels[reached] = near[reached]
            open_ &= ~reached
    return labels


def _neighbour_label(labels: np.ndarray) -> np.ndarray:
    """For each pixel, the label of its first labelled 4-neighbour (above, below, left, right),
    0 where none is labelled."""
    found = np.zeros_like(labels)
    for rows, cols, from_rows, from_cols in ((np.s_[1:], np.s_[:], np.s_[:-1], np.s_[:]),   # from above
                                             (np.s_[:-1], np.s_[:], np.s_[1:], np.s_[:]),   # from below
                                             (np.s_[:], np.s_[1:], np.s_[:], np.s_[:-1]),   # from the left
                                             (np.s_[:], np.s_[:-1], np.s_[:], np.s_[1:])):  # from the right
        target, source = found[rows, cols], labels[from_rows, from_cols]
        np.copyto(target, source, where=target == 0)
    return found


def cell_map(labels: np.ndarray) -> np.ndarray:
    """bool[H, W] of cell labels int[H, W]: True inside a cell, False on a boundary and where the
    label is 0. Of every two 4-neighbours with different labels, the upper or left one becomes
    boundary, so no two cells touch and the 4-connected regions of the map are the cells (a cell
    that a boundary cuts in two counts as two)."""
    labels = np.asarray(labels)
    inside = labels > 0
    inside[:, :-1] &= labels[:, :-1] == labels[:, 1:]
    inside[:-1, :] &= labels[:-1, :] == labels[1:, :]
    return inside


FLOOR = 1 / 255  # off the boundaries, the least cell probability: one grey level of an 8-bit map


def with_boundaries(prob_cell: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The cell probability map float[H, W] with the boundaries of its watershed cells seeded at
    ``threshold`` drawn in as certain membrane: 0 on them, and at least :data:`FLOOR` elsewhere
    (the network's own certain membrane, probability 0, is a shade less certain than the drawn
    boundaries). Thresholded at 0 it gives those cells with one-pixel boundaries; at higher
    levels, the network's own membranes about as they were. The map ``pixelwise eval
    --watershed`` scores."""
    prob = np.asarray(prob_cell)
    inside = cell_map(watershed_cells(prob, threshold))
    return np.where(inside, np.maximum(prob, FLOOR), 0.0).astype(prob.dtype, copy=False)
