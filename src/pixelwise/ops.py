"""Detection ops in pure PyTorch: RoIAlign, NMS, box utilities and the Mask R-CNN helpers.

Every function here has torchvision's signature and semantics (``torchvision.ops`` and
``torchvision.models.detection._utils``), so code written against torchvision ports by
changing one import, and the results match torchvision's fixtures (see ``tests/test_ops.py``).
Boxes are always ``(x1, y1, x2, y2)`` in absolute coordinates.

How RoIAlign is computed
------------------------
torchvision's kernel averages, for each output bin, ``g_h x g_w`` bilinear samples; each sample
reads 4 feature pixels. Each output value is therefore a weighted sum of at most
``4 * g_h * g_w`` rows of the feature map viewed channels-last as a table ``[N*H*W, C]``.
We build the (index, weight) pairs for all boxes and bins at once by broadcasting over a
``[K, PH, PW, G_h, G_w, 2, 2]`` layout (``G`` = the largest grid of any box; with an adaptive
``sampling_ratio`` the padding slots of boxes with smaller grids are dropped before summing, so
the sum does exactly torchvision's taps) and let one :func:`torch.nn.functional.embedding_bag`
call (mode ``"sum"``, per-sample weights) do the gather-multiply-sum. No Python loop runs over
boxes, bins, samples or pyramid levels; memory is the int64 tap indices
(``K * PH * PW * 4 * G_h * G_w``, e.g. 13 MB for 512 boxes at 14x14 with a 2x2 grid) plus the
output, never ``K x C x H x W``. Gradients w.r.t. the input flow through ``embedding_bag``;
like torchvision, no gradient flows to the boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BalancedPositiveNegativeSampler",
    "BoxCoder",
    "Matcher",
    "MultiScaleRoIAlign",
    "RoIAlign",
    "RoIFeatureTable",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "convert_boxes_to_roi_format",
    "infer_scales",
    "map_roi_levels",
    "multiscale_roi_align",
    "nms",
    "pool_feature_table",
    "remove_small_boxes",
    "roi_align",
    "roi_feature_table",
]


# ----------------------------------------------------------------------------- box utilities


def _upcast(t: Tensor) -> Tensor:
    """Avoid integer overflow in products: int -> int32/int64, floats unchanged (as torchvision)."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of ``boxes: Tensor[N, 4]`` -> ``Tensor[N]`` (no +1)."""
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``boxes1: Tensor[N, 4]`` and ``boxes2: Tensor[M, 4]`` -> ``Tensor[N, M]``.

    IoU = inter / (area1 + area2 - inter); two empty boxes give NaN (0 / 0), as in torchvision.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = _upcast(rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / union


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp ``boxes: Tensor[..., 4]`` to an image of ``size = (height, width)``.

    x coordinates go to ``[0, width]`` and y to ``[0, height]``; same shape as the input.
    """
    height, width = size
    boxes_x = boxes[..., 0::2].clamp(min=0, max=width)
    boxes_y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((boxes_x, boxes_y), dim=boxes.dim()).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices ``Tensor[K]`` (int64, ascending) of ``boxes: Tensor[N, 4]`` whose width and height
    are both ``>= min_size``."""
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


# ----------------------------------------------------------------------------- NMS


def _iou_threshold(dtype: torch.dtype, iou_threshold: float) -> float:
    """The threshold to compare an IoU of ``dtype`` with so that ``iou > result`` in ``dtype`` equals
    torchvision's C++ ``(double) iou > iou_threshold``: for float32 the largest float32 ``<= t``
    (exact: no float32 lies strictly between it and ``t``), for float64 ``t`` itself."""
    if dtype != torch.float32:
        return float(iou_threshold)
    t32 = torch.tensor(iou_threshold, dtype=torch.float32)
    if float(t32) > iou_threshold:
        t32 = torch.nextafter(t32, torch.tensor(-math.inf))
    return float(t32)


def _overlaps(rows: Tensor, cols: Tensor, threshold: float) -> Tensor:
    """``IoU > threshold`` of ``rows: Tensor[5, B]`` against ``cols: Tensor[5, M]`` -> bool ``Tensor[B, M]``.

    Boxes are columns ``(x1, y1, x2, y2, area)`` (coordinates as rows, so every operand below is
    contiguous); the IoU is computed as torchvision's kernel does, ``inter / (area_i + area_j -
    inter)`` in the box dtype (0 / 0 gives NaN, which never suppresses).
    """
    x1, y1, x2, y2, area = rows[:, :, None]
    w = torch.min(x2, cols[2]).sub_(torch.max(x1, cols[0])).clamp_(min=0)
    h = torch.min(y2, cols[3]).sub_(torch.max(y1, cols[1])).clamp_(min=0)
    inter = w.mul_(h)
    return inter / (area + cols[4]).sub_(inter) > threshold


def _resolve_block(over: Tensor) -> Tensor:
    """Greedy NMS inside one block: ``over: bool Tensor[B, B]``, ``over[j, i]`` for ``j < i`` (strict upper
    triangle) means box ``j`` suppresses box ``i`` if ``j`` is kept -> bool ``Tensor[B]`` kept.

    ``keep[i] = not any(over[j, i] and keep[j] for j < i)`` is solved by fixed-point iteration: entry
    ``i`` of the next iterate depends only on entries ``j < i``, so after ``t`` rounds the first ``t``
    entries are final whatever the start; the iteration therefore reaches the unique fixed point (the
    greedy answer) after at most ``B`` rounds, in practice after a few (the longest keep/suppress
    alternation inside the block). Each round is one masked ``any`` over the ``B x B`` block.
    """
    over_t = over.t().contiguous()  # over_t[i, j]: j suppresses i
    keep = ~over_t.any(1)  # never overlapped by an earlier box: kept whatever happens
    while True:
        new = ~(over_t & keep).any(1)
        if torch.equal(new, keep):
            return keep
        keep = new


# Elements per IoU tile (rows x columns): below PyTorch's intra-op grain size (32768), so every op
# on a tile runs inline on the calling thread (a fork/join per small op costs far more than the op,
# and stalls for a whole scheduler slice on a busy CPU), and its temporaries (64 KB) stay in cache.
_TILE = 16384


def _greedy_nms(boxes: Tensor, threshold: float, segments: Tensor | None = None, block: int = 128) -> Tensor:
    """Greedy NMS of ``boxes: Tensor[N, 4]`` already in visit order -> int64 positions of the kept boxes
    (ascending, i.e. in visit order).

    With ``segments: Tensor[N]`` (non-decreasing, e.g. class ids of boxes sorted by class) only boxes
    of the same segment suppress each other. The remaining boxes are processed in blocks of
    ``block``: resolve the block (:func:`_resolve_block` on its ``B x B`` overlaps), then let its kept
    boxes suppress the later boxes of their segments and drop those from the remaining list. So the
    IoU is only ever computed for (kept box, later unsuppressed box) pairs, like torchvision's kernel,
    with a few vectorised ops per block and tile instead of a loop per box. Only a window of the
    remaining boxes is materialised: from the current block to the end of its last segment (all of
    them without segments), so with many segments each block costs the size of its segments, not N.
    """
    n, device = boxes.shape[0], boxes.device
    x1, y1, x2, y2 = boxes.t()
    all_data = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)])  # [5, N], one box per column
    position = torch.arange(n, device=device)
    if segments is None:
        all_meta = torch.stack([position, torch.zeros_like(position)])  # [original position, segment]
        segment_end = None
    else:
        segments = segments.contiguous()
        # the first position of a box's segment serves as its int64 segment id
        all_meta = torch.stack([position, torch.searchsorted(segments, segments)])
        segment_end = torch.searchsorted(segments, segments, right=True).tolist()
    data, meta, pulled = all_data[:, :0], all_meta[:, :0], 0
    kept = []
    while True:
        # the window: at least a block (while boxes remain), then up to the end of the block's last segment
        want = block if segment_end is not None else n
        if data.shape[1] < want and pulled < n:
            stop = min(pulled + want - data.shape[1], n)
            data, meta = torch.cat([data, all_data[:, pulled:stop]], 1), torch.cat([meta, all_meta[:, pulled:stop]], 1)
            pulled = stop
        if data.shape[1] == 0:
            break
        b = min(block, data.shape[1])
        if segment_end is not None:
            stop = segment_end[int(meta[0, b - 1])]
            if stop > pulled:
                data = torch.cat([data, all_data[:, pulled:stop]], 1)
                meta = torch.cat([meta, all_meta[:, pulled:stop]], 1)
                pulled = stop
        rows, rest = data[:, :b], data[:, b:]
        arange = torch.arange(b, device=device)
        over = _overlaps(rows, rows, threshold) & (arange[:, None] < arange)  # j suppresses i only if j < i
        if segment_end is not None:
            over &= meta[1, :b, None] == meta[1, :b]
        # Integer positions + index_select throughout: advanced indexing (t[mask], t[idx]) forks
        # threads even for a few hundred elements, which costs milliseconds on a busy CPU.
        keep = _resolve_block(over).nonzero().squeeze(1)
        kept.append(meta[0, :b].index_select(0, keep))
        data, meta = rest, meta[:, b:]
        if rest.shape[1] == 0:
            continue
        kept_rows = rows.index_select(1, keep)
        kept_seg = all_meta[1].index_select(0, kept[-1])[:, None]
        step = max(_TILE // max(keep.numel(), 1), 1)
        hits = []
        for c in range(0, rest.shape[1], step):
            hit = _overlaps(kept_rows, rest[:, c : c + step], threshold)
            if segment_end is not None:
                hit &= kept_seg == meta[1, c : c + step]
            hits.append(hit.any(0))
        survivors = (~torch.cat(hits)).nonzero().squeeze(1)
        data, meta = rest.index_select(1, survivors), meta.index_select(1, survivors)
    return torch.cat(kept)


def _nms_input(boxes: Tensor, scores: Tensor, where: str) -> Tensor:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{where}: boxes must be Tensor[N, 4], got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"{where}: scores must be Tensor[{boxes.shape[0]}], got shape {tuple(scores.shape)}")
    boxes = boxes.detach()
    return boxes if boxes.dtype == torch.float32 else boxes.double()


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression (torchvision semantics), on the boxes' device.

    Args:
        boxes: ``Tensor[N, 4]`` boxes ``(x1, y1, x2, y2)``.
        scores: ``Tensor[N]``.
        iou_threshold: discard a box when its IoU with a kept, higher-scoring box is ``> iou_threshold``.

    Returns:
        ``Tensor[K]`` int64 indices of the kept boxes, in decreasing score order; equal scores
        are visited in ascending index order (stable sort), like torchvision.

    The IoU is computed in float32 for float32 boxes and in float64 otherwise, and compared as
    torchvision's C++ does (float IoU against a double threshold). How: boxes sorted by score are
    taken in blocks of 128; a block is resolved by a short fixed-point iteration on its 128 x 128
    overlaps, then its kept boxes remove every later box they overlap. Cost ``O(K N)`` IoUs for
    ``K`` kept boxes (never the full ``N x N`` matrix), and a few tensor ops per block.
    """
    boxes = _nms_input(boxes, scores, "nms")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    kept = _greedy_nms(boxes.index_select(0, order), _iou_threshold(boxes.dtype, iou_threshold))
    return order.index_select(0, kept)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS done independently per category ``idxs`` (torchvision semantics).

    Args:
        boxes: ``Tensor[N, 4]``; scores: ``Tensor[N]``; idxs: ``Tensor[N]`` int category of each box.

    Returns:
        ``Tensor[K]`` int64 kept indices in decreasing score order.

    For ``boxes.numel() <= 4000`` on CPU (20000 elsewhere) this is torchvision's coordinate trick,
    ``nms(boxes + idxs[:, None] * (boxes.max() + 1), ...)``, and reproduces its output exactly.
    Larger inputs are sorted by (category, score) and suppressed within each category in one
    blocked pass (the IoU of the original coordinates, as torchvision's per-category loop computes
    it), then merged with a stable sort by score, where torchvision uses an unstable sort: the kept
    set is the same, the order among tied scores may differ.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    limit = 4000 if boxes.device.type == "cpu" else 20000
    if boxes.numel() <= limit:
        max_coordinate = boxes.max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    boxes = _nms_input(boxes, scores, "batched_nms")
    scores = scores.detach()
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order.index_select(0, torch.sort(idxs.index_select(0, order), stable=True).indices)
    threshold = _iou_threshold(boxes.dtype, iou_threshold)
    keep = order.index_select(0, _greedy_nms(boxes.index_select(0, order), threshold, idxs.index_select(0, order)))
    keep = torch.sort(keep).values  # equal scores end up in ascending index order, as in nms
    return keep.index_select(0, torch.sort(scores.index_select(0, keep), descending=True, stable=True).indices)


# ----------------------------------------------------------------------------- RoIAlign


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    size = tuple(int(s) for s in output_size)
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or (h, w), got {output_size!r}")
    return size[0], size[1]


def convert_boxes_to_roi_format(boxes: Sequence[Tensor]) -> Tensor:
    """List of per-image ``Tensor[K_i, 4]`` -> ``Tensor[sum K_i, 5]``.

    Rows are ``(image index, x1, y1, x2, y2)``, images in list order.
    """
    concat = torch.cat(list(boxes), dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat], dim=1)


def _as_rois(boxes: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"roi_align: boxes Tensor must be [K, 5], got shape {tuple(boxes.shape)}")
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(f"roi_align: boxes must be a Tensor[K, 5] or a list of Tensor[K_i, 4], got {type(boxes)}")
    for b in boxes:
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError("roi_align: each element of a boxes list must be a Tensor[K_i, 4]")
    if len(boxes) == 0:
        raise ValueError("roi_align: boxes list is empty; pass one Tensor[K_i, 4] per image")
    return convert_boxes_to_roi_format(boxes)


def _axis_taps(coord: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear rule along one axis, for sample coordinates ``coord`` in feature pixels.

    Returns ``(low index, high index, low weight, high weight)``, each shaped like ``coord``.
    A sample outside ``[-1, size]`` gets zero weights; otherwise the coordinate is clamped below
    at 0 and, when ``floor >= size - 1``, set to ``size - 1``.
    """
    valid = (coord >= -1) & (coord <= size)
    c = torch.where(valid, coord, torch.zeros_like(coord)).clamp(min=0)
    low = c.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, low, low + 1)
    c = torch.where(at_end, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    zero = torch.zeros_like(frac)
    return low, high, torch.where(valid, 1 - frac, zero), torch.where(valid, frac, zero)


def _roi_align_rows(
    table: Tensor,
    rois: Tensor,
    base: Tensor,
    height: Tensor,
    width: Tensor,
    scale: Tensor,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    channels_last: bool = False,
) -> Tensor:
    """RoIAlign over a channels-last row table; the engine of :func:`roi_align` and the multi-scale op.

    Args:
        table: ``Tensor[M, C]`` feature pixels as rows (one or more ``[B, H, W]`` maps flattened).
        rois: ``Tensor[K, 4]`` boxes ``(x1, y1, x2, y2)`` in image coordinates.
        base: ``Tensor[K]`` int64 row of pixel (0, 0) of each box's map in ``table``.
        height, width: ``Tensor[K]`` int64 size of each box's map.
        scale: ``Tensor[K]`` float64 spatial scale of each box's map.

    Returns:
        ``Tensor[K, C, PH, PW]`` in ``table.dtype``; with ``channels_last`` the pooled rows are
        returned as they come out, i.e. in channels-last memory format (no transposing copy).
    """
    dtype, device = table.dtype, table.device
    ph_n, pw_n = output_size
    k_n, c_n = rois.shape[0], table.shape[1]
    if k_n == 0:  # empty, but still attached to the graph so that backward() works
        empty = table[:0, None, None, :].expand(0, ph_n, pw_n, c_n).contiguous().permute(0, 3, 1, 2)
        return empty if channels_last else empty.contiguous()
    rois = rois.detach().to(device=device, dtype=dtype)
    # (T) (coord * spatial_scale - offset), the product taken in double as in the C++ kernel.
    start = (rois.double() * scale[:, None] - (0.5 if aligned else 0.0)).to(dtype)
    x1, y1, x2, y2 = start.unbind(1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_h, bin_w = roi_h / ph_n, roi_w / pw_n
    if sampling_ratio > 0:
        grid_h = torch.full((k_n,), sampling_ratio, dtype=torch.int64, device=device)
        grid_w = grid_h
    else:
        grid_h, grid_w = torch.ceil(bin_h).long(), torch.ceil(bin_w).long()
    # A grid <= 0 on either axis (aligned boxes with x2 <= x1) samples nothing: output 0.
    grid_h, grid_w = grid_h.clamp(min=0), grid_w.clamp(min=0)
    empty_grid = (grid_h == 0) | (grid_w == 0)
    grid_h = torch.where(empty_grid, 0, grid_h)
    grid_w = torch.where(empty_grid, 0, grid_w)
    count = (grid_h * grid_w).clamp(min=1).to(dtype)

    def taps(lo: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: Tensor) -> tuple[Tensor, Tensor]:
        # Sample coordinates [K, pooled, G]: lo + p * bin + (i + 0.5) * bin / grid, in dtype;
        # G is the largest grid of any box, slots i >= grid of a box get weight 0 (and are dropped).
        g_max = max(int(grid.max()), 1)
        p = torch.arange(pooled, device=device, dtype=dtype)[None, :, None]
        i = torch.arange(g_max, device=device, dtype=dtype)[None, None, :] + 0.5
        gdiv = grid.clamp(min=1).to(dtype)[:, None, None]
        coord = (lo[:, None, None] + p * bin_size[:, None, None]) + i * bin_size[:, None, None] / gdiv
        low, high, w_low, w_high = _axis_taps(coord, size[:, None, None])
        # The two taps of each sample last: [K, pooled, G, 2].
        return torch.stack((low, high), -1), torch.stack((w_low, w_high), -1)

    y_idx, y_w = taps(y1, bin_h, grid_h, ph_n, height)  # [K, PH, Gh, 2]
    x_idx, x_w = taps(x1, bin_w, grid_w, pw_n, width)  # [K, PW, Gw, 2]
    gh_max, gw_max = y_idx.shape[2], x_idx.shape[2]

    # Taps of bag (k, ph, pw) laid out [K, PH, PW, Gh, Gw, 2 (y tap), 2 (x tap)] by broadcasting.
    y_rows = base[:, None, None, None] + y_idx * width[:, None, None, None]
    rows = y_rows[:, :, None, :, None, :, None] + x_idx[:, None, :, None, :, None, :]
    y_w = y_w / count[:, None, None, None]
    weights = y_w[:, :, None, :, None, :, None] * x_w[:, None, :, None, :, None, :]
    bins = k_n * ph_n * pw_n
    if bool((grid_h * grid_w < gh_max * gw_max).any()):
        # Boxes with a smaller adaptive grid than the largest: drop their padding slots so that
        # embedding_bag does exactly the taps torchvision does.
        slot_h = torch.arange(gh_max, device=device)[None, :] < grid_h[:, None]  # [K, Gh]
        slot_w = torch.arange(gw_max, device=device)[None, :] < grid_w[:, None]  # [K, Gw]
        slot = (slot_h[:, None, None, :, None, None, None] & slot_w[:, None, None, None, :, None, None]).expand(
            rows.shape
        )
        rows, weights = rows[slot], weights[slot]
        counts = (4 * grid_h * grid_w).repeat_interleave(ph_n * pw_n)
    else:
        rows, weights = rows.reshape(-1), weights.reshape(-1)
        counts = torch.full((bins,), 4 * gh_max * gw_max, dtype=torch.int64, device=device)
    offsets = torch.cumsum(counts, 0) - counts
    out = F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights)
    out = out.reshape(k_n, ph_n, pw_n, c_n).permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (Mask R-CNN, He et al. 2017) with torchvision's exact sampling rules.

    Args:
        input: ``Tensor[N, C, H, W]`` feature map (float32 or float64; bf16 and fp16 maps are
            pooled in float32 and the result returned in their dtype, as torchvision's autocast op).
        boxes: ``Tensor[K, 5]`` rows ``(image index, x1, y1, x2, y2)`` (index truncated to int),
            or a list of ``N`` per-image ``Tensor[K_i, 4]``.
        output_size: ``int`` or ``(PH, PW)``.
        spatial_scale: factor mapping box coordinates to ``input`` pixels (e.g. 1/16).
        sampling_ratio: bilinear samples per bin and axis; ``<= 0`` means adaptive,
            ``ceil(roi_size / output_size)`` per box and axis.
        aligned: subtract 0.5 from the scaled box (pixel-centre model); if ``False`` the box is
            at least 1x1 feature pixel.

    Returns:
        ``Tensor[K, C, PH, PW]``. Samples outside ``[-1, H] x [-1, W]`` count as 0; a bin's value is
        the mean over its ``g_h * g_w`` samples. Differentiable w.r.t. ``input``.
    """
    if input.dim() != 4:
        raise ValueError(f"roi_align: input must be Tensor[N, C, H, W], got shape {tuple(input.shape)}")
    rois = _as_rois(boxes)
    n, c, h, w = input.shape
    output_size = _pair(output_size)
    device = input.device
    batch = rois[:, 0].detach().to(device).long()
    if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= n):
        raise ValueError(f"roi_align: box image index out of range [0, {n}) for input of batch size {n}")
    # bf16 / fp16 maps are pooled in float32 and the result cast back, as torchvision's autocast
    # roi_align does: sample positions and bilinear weights in half precision are off by ~1e-2
    table = input.permute(0, 2, 3, 1).contiguous().reshape(n * h * w, c).to(_pooling_dtype(input.dtype))
    k = rois.shape[0]
    full = torch.full((k,), 0, dtype=torch.int64, device=device)
    return _roi_align_rows(
        table,
        rois[:, 1:],
        batch * (h * w),
        full + h,
        full + w,
        torch.full((k,), float(spatial_scale), dtype=torch.float64, device=device),
        output_size,
        int(sampling_ratio),
        bool(aligned),
    ).to(input.dtype)


def _pooling_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype RoIAlign computes in for maps of ``dtype``: float32 for half precisions."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`.

    ``forward(input: Tensor[N, C, H, W], rois) -> Tensor[K, C, PH, PW]``.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


# ----------------------------------------------------------------------------- multi-scale RoIAlign


def infer_scales(feature_sizes: Sequence[Sequence[int]], image_shapes: Sequence[Sequence[int]]) -> list[float]:
    """Spatial scale of each pyramid level, as torchvision's ``MultiScaleRoIAlign`` infers it.

    Args:
        feature_sizes: ``(H_l, W_l)`` of each level.
        image_shapes: ``(h, w)`` of each image in the batch (before padding).

    Returns:
        ``2 ** round(log2(H_l / max_h))`` per level (float32 log2, round half to even), e.g.
        ``[1/4, 1/8, 1/16, 1/32]`` for an FPN on a 160-pixel batch. Only the height is used,
        like torchvision.
    """
    if not image_shapes:
        raise ValueError("infer_scales: image_shapes is empty")
    max_h = max(int(s[0]) for s in image_shapes)
    scales = []
    for size in feature_sizes:
        approx = float(size[0]) / float(max_h)
        scales.append(2 ** float(torch.tensor(approx).log2().round()))
    return scales


def map_roi_levels(
    boxes: Sequence[Tensor],
    k_min: int,
    k_max: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Tensor:
    """FPN level of each box (FPN paper, eq. 1), as an index into the pyramid.

    Args:
        boxes: per-image ``Tensor[K_i, 4]``.
        k_min, k_max: the pyramid's finest and coarsest level (``-log2`` of their scales).

    Returns:
        ``Tensor[sum K_i]`` int64 in ``[0, k_max - k_min]``:
        ``clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), k_min, k_max) - k_min``,
        computed in the box dtype; -1 for a box of negative area (inverted on one axis), whose square
        root is NaN: no level (torchvision's LevelMapper casts the NaN to an integer that matches none of
        its levels, so :func:`multiscale_roi_align` pools such a box to zeros).
    """
    s = torch.sqrt(torch.cat([box_area(b) for b in boxes]))
    levels = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    levels = torch.clamp(levels, min=k_min, max=k_max)
    levels = torch.where(torch.isnan(levels), torch.full_like(levels, k_min - 1), levels)  # a cast NaN is undefined
    return levels.to(torch.int64) - k_min


class RoIFeatureTable(NamedTuple):
    """The maps of a feature pyramid stacked as one channels-last row table, ready to pool from.

    ``table: Tensor[sum_l N * H_l * W_l, C]`` (level by level, each ``[N, H_l, W_l]`` flattened),
    ``heights, widths, base: Tensor[L]`` int64 (size and first row of each level), ``scales``
    (:func:`infer_scales`) and ``batch_size`` ``N``. Build it once with :func:`roi_feature_table`
    to pool several box sets (e.g. Mask R-CNN's box and mask branches) from the same features.
    """

    table: Tensor
    heights: Tensor
    widths: Tensor
    base: Tensor
    scales: list[float]
    batch_size: int


def roi_feature_table(
    features: Sequence[Tensor], image_shapes: Sequence[Sequence[int]], dtype: torch.dtype | None = None
) -> RoIFeatureTable:
    """``L`` maps ``Tensor[N, C, H_l, W_l]`` (finest first) -> :class:`RoIFeatureTable`.

    One copy of the features (free of any transpose when they are channels-last), converted to
    ``dtype`` on the way when given (e.g. bfloat16 maps pooled in float32).
    """
    if not features:
        raise ValueError("multiscale_roi_align: no feature maps given")
    n, c = features[0].shape[:2]
    device = features[0].device
    heights = torch.tensor([f.shape[-2] for f in features], dtype=torch.int64, device=device)
    widths = torch.tensor([f.shape[-1] for f in features], dtype=torch.int64, device=device)
    level_rows = n * heights * widths
    dtype = dtype or features[0].dtype
    rows = [f.permute(0, 2, 3, 1) for f in features]
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):
        table = torch.cat([r.reshape(-1, c).to(dtype) for r in rows])  # differentiable
    else:  # one pass: transpose (if any), dtype conversion and stacking in the same copy
        table = torch.empty((sum(r.shape[0] * r.shape[1] * r.shape[2] for r in rows), c), dtype=dtype, device=device)
        start = 0
        for r in rows:
            size = r.shape[0] * r.shape[1] * r.shape[2]
            table[start : start + size].view(r.shape).copy_(r)
            start += size
    scales = infer_scales([f.shape[-2:] for f in features], image_shapes)
    return RoIFeatureTable(table, heights, widths, torch.cumsum(level_rows, 0) - level_rows, scales, n)


def pool_feature_table(
    pyramid: RoIFeatureTable,
    boxes: list[Tensor],
    output_size: int | tuple[int, int],
    sampling_ratio: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    channels_last: bool = False,
) -> Tensor:
    """:func:`multiscale_roi_align` from a prepared :class:`RoIFeatureTable` -> ``Tensor[sum K_i, C, PH, PW]``
    in the table's dtype (channels-last memory format when ``channels_last``, saving a transpose)."""
    if len(boxes) != pyramid.batch_size:
        raise ValueError(
            f"multiscale_roi_align: got {len(boxes)} box tensors for a batch of {pyramid.batch_size} images"
        )
    scales, device = pyramid.scales, pyramid.table.device
    k_min = int(-torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item())
    k_max = int(-torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item())
    rois = _as_rois(boxes)
    if len(scales) == 1:  # torchvision's roi_align itself: a box inverted on one axis is pooled, not zeroed
        levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=device)
    else:
        levels = map_roi_levels(boxes, k_min, k_max, canonical_scale, canonical_level).to(device)
    unmapped = levels < 0  # a box of negative area: on no level, its row is zeros (torchvision's)
    levels = levels.clamp(min=0)
    heights, widths = pyramid.heights.index_select(0, levels), pyramid.widths.index_select(0, levels)
    batch = rois[:, 0].detach().to(device).long()
    pooled = _roi_align_rows(
        pyramid.table,
        rois[:, 1:],
        pyramid.base.index_select(0, levels) + batch * heights * widths,
        heights,
        widths,
        torch.tensor(scales, dtype=torch.float64, device=device).index_select(0, levels),
        _pair(output_size),
        int(sampling_ratio),
        False,
        channels_last,
    )
    if bool(unmapped.any()):
        pooled = pooled.masked_fill(unmapped[:, None, None, None], 0)
    return pooled


def multiscale_roi_align(
    features: Sequence[Tensor],
    boxes: list[Tensor],
    image_shapes: Sequence[Sequence[int]],
    output_size: int | tuple[int, int],
    sampling_ratio: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """RoIAlign on an FPN: each box is pooled from the level its size maps to.

    Args:
        features: ``L`` maps ``Tensor[N, C, H_l, W_l]``, finest first (scales inferred by
            :func:`infer_scales`).
        boxes: ``N`` per-image ``Tensor[K_i, 4]`` in image coordinates.
        image_shapes: ``N`` image sizes ``(h, w)``.
        output_size: ``int`` or ``(PH, PW)``; sampling_ratio as in :func:`roi_align` (``aligned=False``).

    Returns:
        ``Tensor[sum K_i, C, PH, PW]``, rows in the order of ``boxes`` (image 0 first).

    All levels are pooled in one vectorised call (the levels are stacked into one row table,
    :func:`roi_feature_table`), which gives the same numbers as torchvision's per-level loop.
    """
    if features and len(boxes) != features[0].shape[0]:
        raise ValueError(
            f"multiscale_roi_align: got {len(boxes)} box tensors for a batch of {features[0].shape[0]} images"
        )
    dtype = features[0].dtype if features else torch.float32
    pyramid = roi_feature_table(features, image_shapes, _pooling_dtype(dtype))  # as roi_align: half in float32
    return pool_feature_table(pyramid, boxes, output_size, sampling_ratio, canonical_scale, canonical_level).to(dtype)


class MultiScaleRoIAlign(nn.Module):
    """Module form of :func:`multiscale_roi_align` over the named maps of an FPN output dict.

    ``forward(x: dict[str, Tensor[N, C, H_l, W_l]], boxes: list[Tensor[K_i, 4]],
    image_shapes: list[(h, w)]) -> Tensor[sum K_i, C, PH, PW]``. Maps are taken in
    ``featmap_names`` order (finest first). Unlike torchvision, which caches the scales from the
    first call, scales are re-inferred on every call (it is cheap), so batches of different sizes
    are always pooled correctly.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        missing = [name for name in self.featmap_names if name not in x]
        if missing:
            raise ValueError(f"MultiScaleRoIAlign: feature maps {missing} not in input keys {list(x)}")
        return multiscale_roi_align(
            [x[name] for name in self.featmap_names],
            boxes,
            image_shapes,
            self.output_size,
            self.sampling_ratio,
            self.canonical_scale,
            self.canonical_level,
        )

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}"
        )


# ----------------------------------------------------------------------------- detection helpers


class BoxCoder:
    """Encodes boxes as regression targets relative to reference boxes, and decodes them back.

    Targets are ``(wx * dx / w, wy * dy / h, ww * log(w' / w), wh * log(h' / h))`` with centre
    offsets ``dx, dy`` (R-CNN parametrisation); torchvision's ``detection._utils.BoxCoder``.
    ``bbox_xform_clip`` caps ``dw, dh`` before ``exp`` when decoding.
    """

    def __init__(
        self, weights: tuple[float, float, float, float], bbox_xform_clip: float = math.log(1000.0 / 16)
    ) -> None:
        self.weights = tuple(weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, ...]:
        """Per image: ``reference_boxes[i]: Tensor[K_i, 4]`` (targets, e.g. matched GT) relative to
        ``proposals[i]: Tensor[K_i, 4]`` -> tuple of ``Tensor[K_i, 4]`` codes."""
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """``reference_boxes, proposals: Tensor[K, 4]`` -> codes ``Tensor[K, 4]``.

        Computed in the dtype of ``reference_boxes``.
        """
        wx, wy, ww, wh = torch.as_tensor(self.weights, dtype=reference_boxes.dtype, device=reference_boxes.device)
        ex_w = proposals[:, 2:3] - proposals[:, 0:1]
        ex_h = proposals[:, 3:4] - proposals[:, 1:2]
        ex_cx = proposals[:, 0:1] + 0.5 * ex_w
        ex_cy = proposals[:, 1:2] + 0.5 * ex_h
        gt_w = reference_boxes[:, 2:3] - reference_boxes[:, 0:1]
        gt_h = reference_boxes[:, 3:4] - reference_boxes[:, 1:2]
        gt_cx = reference_boxes[:, 0:1] + 0.5 * gt_w
        gt_cy = reference_boxes[:, 1:2] + 0.5 * gt_h
        dx = wx * (gt_cx - ex_cx) / ex_w
        dy = wy * (gt_cy - ex_cy) / ex_h
        dw = ww * torch.log(gt_w / ex_w)
        dh = wh * torch.log(gt_h / ex_h)
        return torch.cat((dx, dy, dw, dh), dim=1)

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        """``rel_codes: Tensor[sum K_i, 4 * A]`` applied to the concatenated ``boxes[i]: Tensor[K_i, 4]``
        -> ``Tensor[sum K_i, A, 4]`` (A = number of classes, or 1)."""
        if not isinstance(boxes, (list, tuple)):
            raise ValueError("BoxCoder.decode: boxes must be a list of Tensor[K_i, 4]")
        box_sum = sum(int(b.shape[0]) for b in boxes)
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred = self.decode_single(rel_codes, torch.cat(list(boxes), dim=0))
        if box_sum > 0:
            pred = pred.reshape(box_sum, -1, 4)
        return pred

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """``rel_codes: Tensor[K, 4 * A]`` and ``boxes: Tensor[K, 4]`` -> ``Tensor[K, 4 * A]`` boxes."""
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        pred = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)
        return pred.flatten(1)


class Matcher:
    """Assigns each prediction to the ground-truth box it overlaps most (torchvision's ``Matcher``).

    ``matcher(match_quality_matrix: Tensor[M gt, N predictions]) -> Tensor[N]`` int64: the gt index,
    or ``BELOW_LOW_THRESHOLD`` (-1) when the best quality is ``< low_threshold``, or
    ``BETWEEN_THRESHOLDS`` (-2) when it is in ``[low, high)``. With ``allow_low_quality_matches``,
    every prediction that ties for the best quality of some gt keeps its match even below the
    thresholds (Faster R-CNN, sec. 3.1.2).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"Matcher: low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        if match_quality_matrix.numel() == 0:
            if match_quality_matrix.shape[0] == 0:
                raise ValueError("No ground-truth boxes available for one of the images during training")
            raise ValueError("No proposal boxes available for one of the images during training")
        matched_vals, matches = match_quality_matrix.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        below = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below] = self.BELOW_LOW_THRESHOLD
        matches[between] = self.BETWEEN_THRESHOLDS
        if all_matches is not None:
            best_per_gt = match_quality_matrix.max(dim=1).values
            pred_inds = torch.where(match_quality_matrix == best_per_gt[:, None])[1]
            matches[pred_inds] = all_matches[pred_inds]
        return matches


class BalancedPositiveNegativeSampler:
    """Samples a fixed-size, class-balanced minibatch of predictions per image (torchvision's sampler).

    ``sampler(matched_idxs: list[Tensor[N_i]]) -> (pos_masks, neg_masks)``, lists of ``Tensor[N_i]``
    bool masks. In ``matched_idxs``, ``>= 1`` is positive, ``0`` negative, ``< 0`` ignored. Up to
    ``int(batch_size_per_image * positive_fraction)`` positives are drawn, and negatives fill
    the rest, both with ``torch.randperm`` (so ``torch.manual_seed`` makes it reproducible).
    torchvision returns uint8 masks; bool masks index the same way.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos_masks, neg_masks = [], []
        for labels in matched_idxs:
            positive = torch.where(labels >= 1)[0]
            negative = torch.where(labels == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels, dtype=torch.bool)
            neg_mask = torch.zeros_like(labels, dtype=torch.bool)
            pos_mask[pos] = True
            neg_mask[neg] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks
