"""Region proposal network (Ren et al., NeurIPS 2015) as used by torchvision's Mask R-CNN.

The head predicts, at every location of every FPN level, an objectness logit and four box
deltas per anchor. Proposals: keep the ``pre_nms_top_n`` best anchors per level, decode them,
clip, drop tiny boxes, NMS per level, keep the ``post_nms_top_n`` best. Losses: anchors are
matched to ground truth (IoU >= 0.7 foreground, < 0.3 background, plus each box's best
anchors), 256 per image are sampled half/half, then BCE on objectness and smooth-L1
(beta 1/9) on the deltas of the foreground ones, both normalised by the sample count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise import ops
from pixelwise.models._checks import fraction, number_in, whole_number
from pixelwise.models.maskrcnn.anchors import AnchorGenerator
from pixelwise.models.maskrcnn.transform import ImageBatch

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@dataclass
class RPNConfig:
    """RPN thresholds (torchvision's ``rpn_*`` keyword names without the prefix)."""

    pre_nms_top_n_train: int = 2000  # per level, when computing losses
    pre_nms_top_n_test: int = 1000  # per level, when predicting
    post_nms_top_n_train: int = 2000  # per image, when computing losses
    post_nms_top_n_test: int = 1000  # per image, when predicting
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7  # anchors at least this close to a box are foreground
    bg_iou_thresh: float = 0.3  # anchors below this are background
    batch_size_per_image: int = 256  # anchors sampled per image for the loss
    positive_fraction: float = 0.5
    score_thresh: float = 0.0  # minimum objectness probability of a proposal
    min_size: float = 1e-3  # proposals with a side below this (pixels) are dropped

    def __post_init__(self) -> None:
        """Check every field; a ``ValueError`` names it as the keyword argument (``rpn_<field>``)
        and says its range: counts whole numbers >= 1, thresholds and the fraction in [0, 1]."""
        for name in ("pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train", "post_nms_top_n_test",
                     "batch_size_per_image"):
            setattr(self, name, whole_number(f"rpn_{name}", getattr(self, name)))
        for name in ("nms_thresh", "fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "score_thresh"):
            setattr(self, name, fraction(f"rpn_{name}", getattr(self, name)))
        self.min_size = number_in("rpn_min_size", self.min_size, 0.0)
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError(f"rpn_bg_iou_thresh ({self.bg_iou_thresh:g}) must not be above rpn_fg_iou_thresh "
                             f"({self.fg_iou_thresh:g})")


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 convs: per level ``Tensor[N, C, H, W]`` ->
    objectness ``Tensor[N, A, H, W]`` and deltas ``Tensor[N, 4A, H, W]``.
    Keys ``conv.0.0.*``, ``cls_logits.*``, ``bbox_pred.*`` as in torchvision."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        conv = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
        self.conv = nn.Sequential(conv)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_level(x: Tensor, channels: int) -> Tensor:
    """``Tensor[N, A * channels, H, W] -> Tensor[N, H * W * A, channels]``, ordered (y, x, a)
    like the anchors."""
    n, _, h, w = x.shape
    return x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels)


def flatten_predictions(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head outputs -> objectness ``Tensor[N, R]`` and deltas ``Tensor[N, R, 4]``,
    R = all anchors of all levels."""
    obj = torch.cat([flatten_level(o, 1) for o in logits], dim=1)[..., 0]
    box = torch.cat([flatten_level(d, 4) for d in deltas], dim=1)
    return obj, box


def top_n_per_level(objectness: Tensor, anchors_per_level: list[int], top_n: int) -> Tensor:
    """Indices ``Tensor[N, K]`` of the ``top_n`` highest objectness of each level (levels in
    order, each sorted by score), into ``objectness`` ``Tensor[N, R]``."""
    out, offset = [], 0
    for level in objectness.split(anchors_per_level, dim=1):
        k = min(top_n, level.shape[1])
        out.append(level.topk(k, dim=1).indices + offset)
        offset += level.shape[1]
    return torch.cat(out, dim=1)


def filter_image_proposals(
    boxes: Tensor,
    scores: Tensor,
    levels: Tensor,
    image_size: tuple[int, int],
    cfg: RPNConfig,
    post_nms_top_n: int,
) -> tuple[Tensor, Tensor]:
    """One image's candidates ``boxes Tensor[K, 4]``, ``scores Tensor[K]`` (probabilities),
    ``levels Tensor[K]`` -> the kept proposals ``Tensor[P, 4]`` and scores, best first."""
    boxes = ops.clip_boxes_to_image(boxes, image_size)
    keep = ops.remove_small_boxes(boxes, cfg.min_size)
    keep = keep.index_select(0, torch.where(scores.index_select(0, keep) >= cfg.score_thresh)[0])
    boxes, scores, levels = boxes.index_select(0, keep), scores.index_select(0, keep), levels.index_select(0, keep)
    keep = ops.batched_nms(boxes, scores, levels, cfg.nms_thresh)[:post_nms_top_n]
    return boxes.index_select(0, keep), scores.index_select(0, keep)


def anchor_labels(anchors: Tensor, gt_boxes: Tensor, matcher: ops.Matcher) -> tuple[Tensor, Tensor]:
    """Anchors ``Tensor[R, 4]`` vs ground truth ``Tensor[K, 4]`` -> labels ``Tensor[R]`` (1 fg,
    0 bg, -1 ignored) and the matched boxes ``Tensor[R, 4]`` (zeros where K = 0)."""
    if gt_boxes.numel() == 0:
        return anchors.new_zeros(anchors.shape[0]), anchors.new_zeros(anchors.shape, dtype=gt_boxes.dtype)
    matched = matcher(ops.box_iou(gt_boxes, anchors))
    labels = (matched >= 0).to(anchors.dtype)
    labels[matched == matcher.BELOW_LOW_THRESHOLD] = 0.0
    labels[matched == matcher.BETWEEN_THRESHOLDS] = -1.0
    return labels, gt_boxes[matched.clamp(min=0)]


def rpn_loss(
    objectness: Tensor,
    deltas: Tensor,
    labels: Tensor,
    targets: Tensor,
    sampler: ops.BalancedPositiveNegativeSampler,
) -> tuple[Tensor, Tensor]:
    """``objectness Tensor[N, R]``, ``deltas Tensor[N, R, 4]``, ``labels Tensor[N, R]``,
    regression ``targets Tensor[N, R, 4]`` -> (objectness BCE, box smooth-L1 / #sampled)."""
    pos_masks, neg_masks = sampler(list(labels))
    pos = torch.where(torch.cat(pos_masks))[0]
    neg = torch.where(torch.cat(neg_masks))[0]
    sampled = torch.cat([pos, neg])
    flat_deltas, flat_targets = deltas.reshape(-1, 4), targets.reshape(-1, 4)
    box_loss = F.smooth_l1_loss(flat_deltas[pos], flat_targets[pos], beta=1 / 9, reduction="sum")
    box_loss = box_loss / max(sampled.numel(), 1)
    obj_loss = F.binary_cross_entropy_with_logits(objectness.reshape(-1)[sampled], labels.reshape(-1)[sampled])
    return obj_loss, box_loss


class RegionProposalNetwork(nn.Module):
    """``forward(images, features, targets=None) -> (proposals, losses)``.

    ``proposals``: per image ``Tensor[P_i, 4]`` in the resized image's pixels. With
    ``targets`` the training thresholds are used and ``losses`` holds ``loss_objectness`` and
    ``loss_rpn_box_reg``; without, the test thresholds and ``losses`` is empty."""

    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, config: RPNConfig) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.config = config
        self.box_coder = ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=BBOX_XFORM_CLIP)
        self.matcher = ops.Matcher(config.fg_iou_thresh, config.bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = ops.BalancedPositiveNegativeSampler(config.batch_size_per_image, config.positive_fraction)

    def anchors(self, images: ImageBatch, features: list[Tensor]) -> Tensor:
        """The anchors ``Tensor[R, 4]`` shared by every image of the batch."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        return self.anchor_generator(tuple(images.tensors.shape[-2:]), sizes, features[0].dtype, features[0].device)

    def propose(
        self,
        anchors: Tensor,
        objectness: Tensor,
        deltas: Tensor,
        anchors_per_level: list[int],
        image_sizes: list[tuple[int, int]],
        training: bool,
    ) -> list[Tensor]:
        """Decode, select per level, filter: ``objectness Tensor[N, R]``, ``deltas Tensor[N, R, 4]``
        -> per image proposals ``Tensor[P_i, 4]`` (no gradient)."""
        cfg = self.config
        pre_n = cfg.pre_nms_top_n_train if training else cfg.pre_nms_top_n_test
        post_n = cfg.post_nms_top_n_train if training else cfg.post_nms_top_n_test
        n = objectness.shape[0]
        objectness = objectness.detach()
        levels = torch.cat(
            [torch.full((k,), i, dtype=torch.int64, device=objectness.device) for i, k in enumerate(anchors_per_level)]
        )
        idx = top_n_per_level(objectness, anchors_per_level, pre_n)
        scores = torch.sigmoid(torch.gather(objectness, 1, idx))
        # Decoding is per anchor, so decode only the selected ones (torchvision decodes all R first).
        # gather / index_select rather than advanced indexing, which forks threads for small tensors.
        selected = torch.gather(deltas.detach(), 1, idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        flat = idx.reshape(-1)
        boxes = self.box_coder.decode_single(selected, anchors.index_select(0, flat)).view(n, -1, 4)
        levels = levels.index_select(0, flat).view(idx.shape)
        return [
            filter_image_proposals(b, s, lv, size, cfg, post_n)[0]
            for b, s, lv, size in zip(boxes, scores, levels, image_sizes)
        ]

    def losses(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        labels, regression = [], []
        for t in targets:
            # the boxes as given (float32): under bf16 autocast the anchors are bf16, and rounding the
            # boxes to them moved labels and targets (torchvision matches and encodes in float32)
            lab, matched = anchor_labels(anchors, t["boxes"], self.matcher)
            labels.append(lab)
            regression.append(self.box_coder.encode_single(matched, anchors))
        obj_loss, box_loss = rpn_loss(objectness, deltas, torch.stack(labels), torch.stack(regression), self.sampler)
        return {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}

    def forward(
        self, images: ImageBatch, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        levels = list(features.values())
        logits, deltas = self.head(levels)
        anchors = self.anchors(images, levels)
        anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in logits]
        objectness, deltas = flatten_predictions(logits, deltas)
        training = targets is not None
        proposals = self.propose(anchors, objectness, deltas, anchors_per_level, images.image_sizes, training)
        losses = self.losses(anchors, objectness, deltas, targets) if targets is not None else {}
        return proposals, losses
