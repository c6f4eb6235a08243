"""The second stage of Mask R-CNN: box classification/regression and mask prediction per RoI.

Layout and keys as torchvision: ``box_roi_pool`` (RoIAlign 7x7 on FPN levels "0".."3"),
``box_head`` (``fc6``, ``fc7``), ``box_predictor`` (``cls_score``, ``bbox_pred``),
``mask_roi_pool`` (14x14), ``mask_head`` (four 3x3 convs, keys ``N.0.*``), ``mask_predictor``
(``conv5_mask`` 2x2 transposed conv, ``mask_fcn_logits``).

Training (targets given): ground-truth boxes join the proposals, proposals are matched at
IoU 0.5 and 512 per image sampled with 25% foreground; losses are cross-entropy on the
classes, smooth-L1 (beta 1/9) on the true class's deltas / #sampled, and per-pixel BCE of the
true class's 28x28 mask against the ground-truth mask RoIAligned onto the proposal.
Inference: softmax scores per class, decoded per-class boxes, score threshold, NMS per
class, best ``detections_per_img``, and the predicted class's mask probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise import ops
from pixelwise.models._checks import fraction, number_in, numbers_of, whole_number

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@dataclass
class RoIHeadsConfig:
    """Second-stage thresholds (torchvision's ``box_*`` keyword names without the prefix)."""

    score_thresh: float = 0.05  # detections need a class probability above this
    nms_thresh: float = 0.5  # per-class NMS of detections
    detections_per_img: int = 100
    fg_iou_thresh: float = 0.5  # proposals at least this close to a box are foreground
    bg_iou_thresh: float = 0.5  # proposals below this are background
    batch_size_per_image: int = 512  # proposals sampled per image for the loss
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    min_box_size: float = 1e-2  # detections with a side below this (pixels) are dropped

    def __post_init__(self) -> None:
        """Check every field; a ``ValueError`` names it as the keyword argument (``box_<field>``,
        ``bbox_reg_weights``) and says its range: counts whole numbers >= 1, thresholds and the
        fraction in [0, 1], four positive box-coding weights."""
        for name in ("detections_per_img", "batch_size_per_image"):
            setattr(self, name, whole_number(f"box_{name}", getattr(self, name)))
        for name in ("score_thresh", "nms_thresh", "fg_iou_thresh", "bg_iou_thresh", "positive_fraction"):
            setattr(self, name, fraction(f"box_{name}", getattr(self, name)))
        self.bbox_reg_weights = numbers_of(  # type: ignore[assignment]
            "bbox_reg_weights", self.bbox_reg_weights, 4, positive=True)
        self.min_box_size = number_in("box_min_box_size", self.min_box_size, 0.0)
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError(f"box_bg_iou_thresh ({self.bg_iou_thresh:g}) must not be above box_fg_iou_thresh "
                             f"({self.fg_iou_thresh:g})")


class TwoMLPHead(nn.Module):
    """``Tensor[R, C, 7, 7] -> Tensor[R, representation_size]``: flatten, fc6 + ReLU, fc7 + ReLU."""

    def __init__(self, in_features: int, representation_size: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)))))


class FastRCNNPredictor(nn.Module):
    """``Tensor[R, D] -> (class logits Tensor[R, K], per-class deltas Tensor[R, 4K])``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskRCNNHeads(nn.Sequential):
    """Four 3x3 conv + ReLU layers: ``Tensor[R, C, 14, 14] -> Tensor[R, layers[-1], 14, 14]``."""

    def __init__(self, in_channels: int, layers: tuple[int, ...] = (256, 256, 256, 256)) -> None:
        blocks = []
        for out_channels in layers:
            blocks.append(nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)))
            in_channels = out_channels
        super().__init__(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class MaskRCNNPredictor(nn.Sequential):
    """``Tensor[R, C, 14, 14] -> Tensor[R, num_classes, 28, 28]`` mask logits."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.relu = nn.ReLU(inplace=True)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)
        for m in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- training targets


def match_proposals(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, matcher: ops.Matcher
) -> tuple[Tensor, Tensor]:
    """Proposals ``Tensor[P, 4]`` vs ground truth -> (index of the matched box ``Tensor[P]``,
    clamped to >= 0; class label ``Tensor[P]``: the box's label, 0 background, -1 ignored)."""
    if gt_boxes.numel() == 0:
        zeros = torch.zeros(proposals.shape[0], dtype=torch.int64, device=proposals.device)
        return zeros, zeros.clone()
    matched = matcher(ops.box_iou(gt_boxes, proposals))
    labels = gt_labels[matched.clamp(min=0)].to(torch.int64)
    labels[matched == matcher.BELOW_LOW_THRESHOLD] = 0
    labels[matched == matcher.BETWEEN_THRESHOLDS] = -1
    return matched.clamp(min=0), labels


@dataclass
class SampledRoIs:
    """The RoIs of one image chosen for the loss, with what they should predict."""

    boxes: Tensor  # Tensor[S, 4]
    labels: Tensor  # Tensor[S] int64, 0 = background
    matched_idxs: Tensor  # Tensor[S] index into the image's ground truth
    regression_targets: Tensor  # Tensor[S, 4]


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """Crop and resize each matched ground-truth mask ``[K, H, W]`` to its RoI ``Tensor[S, 4]``
    with RoIAlign -> ``Tensor[S, size, size]`` in [0, 1]."""
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return ops.roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0)[:, 0]


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor
) -> tuple[Tensor, Tensor]:
    """``class_logits Tensor[S, K]``, ``box_regression Tensor[S, 4K]``, ``labels Tensor[S]``,
    ``regression_targets Tensor[S, 4]`` -> (cross-entropy, smooth-L1 of foreground / S);
    both 0 (and still in the graph) when S = 0, i.e. no proposal and no ground truth at all."""
    if labels.numel() == 0:
        zero = class_logits.sum() * 0 + box_regression.sum() * 0
        return zero, zero.clone()
    cls_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels[pos]]
    box_loss = F.smooth_l1_loss(deltas, regression_targets[pos], beta=1 / 9, reduction="sum")
    return cls_loss, box_loss / max(labels.numel(), 1)


def maskrcnn_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
    """``mask_logits Tensor[S, K, M, M]`` of foreground RoIs, their ``labels Tensor[S]`` and
    ``mask_targets Tensor[S, M, M]`` -> mean BCE of the labelled class's mask (0 if S = 0,
    still connected to the graph)."""
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(picked, mask_targets)


# ----------------------------------------------------------------------------- inference


def postprocess_image(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Tensor,
    image_size: tuple[int, int],
    box_coder: ops.BoxCoder,
    cfg: RoIHeadsConfig,
) -> dict[str, Tensor]:
    """One image's ``class_logits Tensor[P, K]``, ``box_regression Tensor[P, 4K]`` and
    ``proposals Tensor[P, 4]`` -> ``{"boxes" Tensor[D, 4], "scores" Tensor[D], "labels" Tensor[D]}``,
    best score first, D <= ``detections_per_img``; each (proposal, foreground class) pair is a candidate."""
    num_classes = class_logits.shape[-1]
    boxes = box_coder.decode_single(box_regression, proposals).reshape(proposals.shape[0], num_classes, 4)
    boxes = ops.clip_boxes_to_image(boxes, image_size)
    scores = F.softmax(class_logits, -1)
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
    keep = torch.where(scores > cfg.score_thresh)[0]
    keep = keep.index_select(0, ops.remove_small_boxes(boxes.index_select(0, keep), min_size=cfg.min_box_size))
    # index_select, not advanced indexing: the latter forks threads even for small tensors
    boxes, scores, labels = boxes.index_select(0, keep), scores.index_select(0, keep), labels.index_select(0, keep)
    keep = ops.batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
    boxes, scores, labels = boxes.index_select(0, keep), scores.index_select(0, keep), labels.index_select(0, keep)
    return {"boxes": boxes, "scores": scores, "labels": labels}


def mask_probabilities(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """``Tensor[D, K, M, M]`` logits and predicted ``labels Tensor[D]`` -> ``Tensor[D, 1, M, M]``
    sigmoid probabilities of each detection's class."""
    index = torch.arange(mask_logits.shape[0], device=labels.device)
    return mask_logits[index, labels].sigmoid()[:, None]


class RoIHeads(nn.Module):
    """``forward(features, proposals, image_sizes, targets=None)``: without targets ->
    per image ``{"boxes", "labels", "scores", "masks" Tensor[D, 1, 28, 28]}``; with targets ->
    ``{"loss_classifier", "loss_box_reg", "loss_mask"}``."""

    # FastMaskRCNN reads the pools' settings, fc6/fc7 and conv5_mask/mask_fcn_logits directly.
    box_roi_pool: ops.MultiScaleRoIAlign
    box_head: TwoMLPHead
    box_predictor: nn.Module
    mask_roi_pool: ops.MultiScaleRoIAlign
    mask_head: nn.Module
    mask_predictor: MaskRCNNPredictor

    def __init__(
        self,
        box_roi_pool: ops.MultiScaleRoIAlign,
        box_head: TwoMLPHead,
        box_predictor: nn.Module,
        mask_roi_pool: ops.MultiScaleRoIAlign,
        mask_head: nn.Module,
        mask_predictor: MaskRCNNPredictor,
        config: RoIHeadsConfig,
    ) -> None:
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.config = config
        self.box_coder = ops.BoxCoder(config.bbox_reg_weights, bbox_xform_clip=BBOX_XFORM_CLIP)
        self.matcher = ops.Matcher(config.fg_iou_thresh, config.bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = ops.BalancedPositiveNegativeSampler(config.batch_size_per_image, config.positive_fraction)

    # torchvision sets these two after construction (e.g. the fixture does); keep them as attributes.
    @property
    def score_thresh(self) -> float:
        return self.config.score_thresh

    @score_thresh.setter
    def score_thresh(self, value: float) -> None:
        self.config.score_thresh = fraction("score_thresh", value)

    @property
    def detections_per_img(self) -> int:
        return self.config.detections_per_img

    @detections_per_img.setter
    def detections_per_img(self, value: int) -> None:
        self.config.detections_per_img = whole_number("detections_per_img", value)

    def box_forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """RoIs per image -> (class logits ``Tensor[R, K]``, deltas ``Tensor[R, 4K]``), R = all RoIs."""
        x = self.box_head(self.box_roi_pool(features, boxes, image_sizes))
        return self.box_predictor(x)

    def mask_forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """RoIs per image -> mask logits ``Tensor[R, K, 28, 28]``."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_sizes)))

    def sample_rois(self, proposals: Tensor, target: dict[str, Tensor]) -> SampledRoIs:
        """Add the ground-truth boxes to one image's proposals, match and sample them."""
        gt_boxes = target["boxes"].to(proposals.dtype)
        proposals = torch.cat([proposals, gt_boxes])
        matched, labels = match_proposals(proposals, gt_boxes, target["labels"], self.matcher)
        pos, neg = self.sampler([labels])
        keep = torch.where(pos[0] | neg[0])[0]
        proposals, labels, matched = proposals[keep], labels[keep], matched[keep]
        matched_boxes = gt_boxes[matched] if gt_boxes.numel() else torch.zeros_like(proposals)
        return SampledRoIs(proposals, labels, matched, self.box_coder.encode_single(matched_boxes, proposals))

    def losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        samples = [self.sample_rois(p, t) for p, t in zip(proposals, targets)]
        class_logits, box_regression = self.box_forward(features, [s.boxes for s in samples], image_sizes)
        labels = torch.cat([s.labels for s in samples])
        cls_loss, box_loss = fastrcnn_loss(
            class_logits, box_regression, labels, torch.cat([s.regression_targets for s in samples])
        )
        fg = [torch.where(s.labels > 0)[0] for s in samples]
        mask_logits = self.mask_forward(features, [s.boxes[i] for s, i in zip(samples, fg)], image_sizes)
        size = mask_logits.shape[-1]
        per_image = [
            project_masks_on_boxes(t["masks"], s.boxes[i], s.matched_idxs[i], size)
            for s, i, t in zip(samples, fg, targets)
            if i.numel()
        ]
        mask_targets = torch.cat(per_image) if per_image else mask_logits.new_zeros((0, size, size))
        mask_loss = maskrcnn_loss(mask_logits, torch.cat([s.labels[i] for s, i in zip(samples, fg)]), mask_targets)
        return {"loss_classifier": cls_loss, "loss_box_reg": box_loss, "loss_mask": mask_loss}

    def detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        class_logits, box_regression = self.box_forward(features, proposals, image_sizes)
        counts = [p.shape[0] for p in proposals]
        detections = [
            postprocess_image(c, r, p, size, self.box_coder, self.config)
            for c, r, p, size in zip(class_logits.split(counts), box_regression.split(counts), proposals, image_sizes)
        ]
        mask_logits = self.mask_forward(features, [d["boxes"] for d in detections], image_sizes)
        probs = mask_probabilities(mask_logits, torch.cat([d["labels"] for d in detections]))
        for det, masks in zip(detections, probs.split([d["boxes"].shape[0] for d in detections])):
            det["masks"] = masks
        return detections

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        if targets is not None:
            return self.losses(features, proposals, image_sizes, targets)
        return self.detect(features, proposals, image_sizes)
