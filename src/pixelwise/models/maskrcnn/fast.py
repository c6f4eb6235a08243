"""Fast inference for Mask R-CNN: ``optimize_for_inference(model) -> FastMaskRCNN``.

The returned module answers ``fast(images)`` exactly like ``model(images)`` (per image ``boxes``,
``labels``, ``scores``, ``masks``) and leaves ``model`` untouched (float32, trainable). Steps:

1. BatchNorm folding: every BatchNorm after a convolution in the backbone (``FrozenBatchNorm2d``
   or an eval-mode ``BatchNorm2d``) is folded into that convolution's weight and bias (in float64,
   then cast), so the backbone is convolutions, ReLUs and adds only.
2. Reduced precision where the FLOPs are: the backbone + FPN, the RPN's shared 3x3 conv, the box
   head's ``fc6``/``fc7``, the mask head's four convs and its transposed conv run in ``dtype``
   (bfloat16 on CPUs with AVX512-BF16/AMX and on CUDA, else float32), channels-last. Their
   weights are stored in that dtype (no per-call casts, unlike autocast).
3. float32 wherever a decision is made: the RPN's objectness and box-delta 1x1 convs, anchor
   decoding, top-n, clipping and NMS; the box predictor (class logits, box deltas), softmax,
   score threshold and per-class NMS; RoI pooling (from a float32 copy of the features); the mask
   logits and their sigmoid; box rescaling and mask pasting. So bfloat16 only perturbs the
   features that these float32 steps read.
4. Fewer ops: RoIs of both branches are pooled from one float32 row table of the FPN levels
   (:func:`pixelwise.ops.roi_feature_table`, built once) and come out channels-last, which is
   what the channels-last mask head wants and what ``fc6`` reads once its input columns are
   permuted to (y, x, channel) order; the mask logits are computed for each detection's
   predicted class only (1 of ``num_classes`` output channels of ``mask_fcn_logits``); anchors
   are cached per padded batch size; everything runs under ``torch.inference_mode()``.

It is inference only: ``fast(images, targets)`` raises. Settings that the eager model reads at
call time (``fast.roi_heads.score_thresh``, ``detections_per_img``, the transform and RPN
configs) are read the same way here.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise import ops
from pixelwise.backbones import FrozenBatchNorm2d
from pixelwise.backbones.resnet import IntermediateLayerGetter
from pixelwise.models.maskrcnn.model import MaskRCNN
from pixelwise.models.maskrcnn.roi_heads import MaskRCNNPredictor, TwoMLPHead, postprocess_image
from pixelwise.models.maskrcnn.rpn import flatten_predictions
from pixelwise.models.maskrcnn.transform import ImageBatch
from pixelwise.runtime import cpu_has_native_bf16, cuda_has_native_bf16

__all__ = ["FastMaskRCNN", "detection_agreement", "fold_batchnorm", "optimize_for_inference", "reduced_precision_dtype"]

_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _fold(conv: nn.Conv2d | nn.ConvTranspose2d, norm: FrozenBatchNorm2d | nn.BatchNorm2d) -> None:
    """Fold ``norm`` (``y = (x - mean) / sqrt(var + eps) * weight + bias``) into ``conv`` in place
    (a transposed convolution's output channels are its weight's dimension 1)."""
    if isinstance(norm, nn.BatchNorm2d) and norm.training:
        raise ValueError("fold_batchnorm: BatchNorm2d is in training mode; call model.eval() first")
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("fold_batchnorm: BatchNorm2d has no running statistics (track_running_stats=False)")
    mean, var = norm.running_mean.double(), norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + norm.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    if isinstance(conv, nn.ConvTranspose2d):
        if conv.groups != 1:
            raise ValueError("fold_batchnorm: grouped transposed convolutions are not supported")
        weight = conv.weight.double() * scale.reshape(1, -1, 1, 1)
    else:
        weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(conv.weight.dtype), requires_grad=False)


def _to(module: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
    """``module.to(dtype=dtype, memory_format=memory_format)`` in place (``memory_format`` applies to
    its 4-D parameters and buffers)."""
    # torch's Module.to accepts memory_format (it parses its arguments like Tensor.to), its stubs do not list it
    module.to(dtype=dtype, memory_format=memory_format)  # type: ignore[call-overload]  # stubs lack memory_format


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place; returns the count.

    Recognised pairs, where the order of computation is known: attributes ``conv<k>`` / ``bn<k>`` of
    a module whose class says ``bn<k>`` normalises ``conv<k>``'s output (``bn_follows_conv = True``:
    ResNet's stem and blocks, ENet's initial block; a pre-activation block, whose ``bn1`` comes
    before ``conv1``, names them alike), and consecutive ``Conv2d`` (or ``ConvTranspose2d``), norm
    children of an ``nn.Sequential`` or an :class:`IntermediateLayerGetter`, which run their
    children in order (ResNet's ``downsample``, U-Net's, SegNet's and DeconvNet's blocks, the FCN
    and DeepLab heads). The norm is replaced by ``nn.Identity``. Works for ``FrozenBatchNorm2d``
    and eval-mode ``BatchNorm2d``."""
    folded = 0
    for parent in list(module.modules()):
        if getattr(parent, "bn_follows_conv", False):
            for name, child in list(parent.named_children()):
                conv = getattr(parent, "conv" + name[2:], None) if name.startswith("bn") else None
                if isinstance(child, _NORMS) and isinstance(conv, _CONVS):
                    _fold(conv, child)
                    setattr(parent, name, nn.Identity())
                    folded += 1
        if isinstance(parent, nn.Sequential | IntermediateLayerGetter):
            children = list(parent.named_children())
            for (_, first), (name, second) in zip(children, children[1:]):
                if isinstance(first, _CONVS) and isinstance(second, _NORMS):
                    _fold(first, second)
                    setattr(parent, name, nn.Identity())
                    folded += 1
    return folded


def reduced_precision_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where it is fast (CUDA with bf16 support; CPUs with bf16 arithmetic in hardware,
    AVX512-BF16 or AMX: :func:`pixelwise.runtime.cpu_has_native_bf16`), else float32."""
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float32
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


class FastMaskRCNN(nn.Module):
    """Inference-only Mask R-CNN built by :func:`optimize_for_inference` (see the module docstring).

    ``forward(images) -> list[dict]`` with the eager model's contract. Submodules keep the eager
    names (``transform``, ``backbone``, ``rpn``, ``roi_heads``) so its settings are reachable.
    """

    def __init__(self, model: MaskRCNN, dtype: torch.dtype, channels_last: bool = True) -> None:
        super().__init__()
        heads = model.roi_heads
        if not isinstance(heads.box_head, TwoMLPHead) or not isinstance(heads.mask_predictor, MaskRCNNPredictor):
            raise TypeError("optimize_for_inference supports the standard TwoMLPHead / MaskRCNNPredictor heads")
        model = copy.deepcopy(model).eval().requires_grad_(False)
        self.transform, self.backbone, self.rpn = model.transform, model.backbone, model.rpn
        heads = self.roi_heads = model.roi_heads
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        fold_batchnorm(self.backbone)
        _to(self.backbone, dtype, self.memory_format)
        _to(self.rpn.head.conv, dtype, self.memory_format)
        _to(heads.mask_head, dtype, self.memory_format)
        _to(heads.mask_predictor.conv5_mask, dtype, self.memory_format)
        # fc6 reads the pooled RoIs as they come out of the pooler, (y, x, channel), not (channel, y, x).
        fc6 = heads.box_head.fc6
        ph, pw = heads.box_roi_pool.output_size
        channels = fc6.in_features // (ph * pw)
        weight = fc6.weight.reshape(-1, channels, ph, pw).permute(0, 2, 3, 1).reshape(fc6.out_features, -1)
        fc6.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        heads.box_head.to(dtype=dtype)
        self._anchors: dict[tuple, Tensor] = {}

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> list[dict[str, Tensor]]:
        if targets is not None:
            raise ValueError("FastMaskRCNN is inference only; compute losses with the original model")
        return self.predict(images)

    @torch.inference_mode()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, _ = self.transform(images)
        x = batch.tensors.to(self.dtype).contiguous(memory_format=self.memory_format)
        features = self.backbone(x)
        proposals = self.propose(batch, list(features.values()))
        pooler = self.roi_heads.box_roi_pool
        pyramid = ops.roi_feature_table([features[k] for k in pooler.featmap_names], batch.image_sizes, torch.float32)
        detections = self.detect(pyramid, proposals, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def anchors(self, batch: ImageBatch, levels: list[Tensor]) -> Tensor:
        """The RPN's float32 anchors, cached per (padded batch size, level sizes, device)."""
        batch_hw = tuple(batch.tensors.shape[-2:])
        sizes = [tuple(f.shape[-2:]) for f in levels]
        key = (batch_hw, tuple(sizes), str(levels[0].device))
        if key not in self._anchors:
            if len(self._anchors) > 16:
                self._anchors.clear()
            self._anchors[key] = self.rpn.anchor_generator(batch_hw, sizes, torch.float32, levels[0].device)
        return self._anchors[key]

    def propose(self, batch: ImageBatch, levels: list[Tensor]) -> list[Tensor]:
        """RPN: shared 3x3 conv in ``dtype``, then the 1x1 objectness/delta convs and the whole
        proposal selection in float32 -> per image ``Tensor[P_i, 4]``."""
        head = self.rpn.head
        logits, deltas = [], []
        for f in levels:
            t = head.conv(f).float()
            logits.append(head.cls_logits(t))
            deltas.append(head.bbox_pred(t))
        anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in logits]
        objectness, box_deltas = flatten_predictions(logits, deltas)
        anchors = self.anchors(batch, levels)
        return self.rpn.propose(anchors, objectness, box_deltas, anchors_per_level, batch.image_sizes, training=False)

    def detect(
        self, pyramid: ops.RoIFeatureTable, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Box branch, per-class selection, then the mask branch for the detections only."""
        heads = self.roi_heads
        box_pool, mask_pool = heads.box_roi_pool, heads.mask_roi_pool
        pooled = ops.pool_feature_table(
            pyramid,
            proposals,
            box_pool.output_size,
            box_pool.sampling_ratio,
            box_pool.canonical_scale,
            box_pool.canonical_level,
            channels_last=True,
        )
        x = pooled.permute(0, 2, 3, 1).reshape(pooled.shape[0], -1).to(self.dtype)  # (y, x, c) rows, no copy
        x = F.relu(heads.box_head.fc7(F.relu(heads.box_head.fc6(x))))
        class_logits, box_regression = heads.box_predictor(x.float())
        counts = [p.shape[0] for p in proposals]
        detections = [
            postprocess_image(c, r, p, size, heads.box_coder, heads.config)
            for c, r, p, size in zip(class_logits.split(counts), box_regression.split(counts), proposals, image_sizes)
        ]
        boxes = [d["boxes"] for d in detections]
        labels = torch.cat([d["labels"] for d in detections])
        predictor = heads.mask_predictor
        m = predictor.mask_fcn_logits
        if labels.numel() == 0:  # the transposed conv doubles the pooled size
            probs = pyramid.table.new_zeros((0, 1, 2 * mask_pool.output_size[0], 2 * mask_pool.output_size[1]))
        else:
            pooled = ops.pool_feature_table(
                pyramid,
                boxes,
                mask_pool.output_size,
                mask_pool.sampling_ratio,
                mask_pool.canonical_scale,
                mask_pool.canonical_level,
                channels_last=True,
            )
            y = F.relu(predictor.conv5_mask(heads.mask_head(pooled.to(self.dtype))))
            # The predicted class's logit only: a dot product over channels per detection and pixel.
            d, c, h, w = y.shape
            rows = y.permute(0, 2, 3, 1).reshape(d, h * w, c).float()
            if m.bias is None:  # MaskRCNNPredictor always builds it with a bias
                raise TypeError("FastMaskRCNN: mask_predictor.mask_fcn_logits has no bias")
            weight = m.weight[labels, :, 0, 0].float()
            bias = m.bias[labels].float()
            logits = torch.baddbmm(bias[:, None, None], rows, weight[:, :, None]).view(d, 1, h, w)
            probs = logits.sigmoid()
        for det, masks in zip(detections, probs.split([b.shape[0] for b in boxes])):
            det["masks"] = masks
        return detections


def optimize_for_inference(
    model: MaskRCNN, dtype: torch.dtype | None = None, channels_last: bool = True
) -> FastMaskRCNN:
    """A fast, inference-only copy of a Mask R-CNN (``model`` itself is not modified).

    Args:
        model: a :class:`MaskRCNN` (e.g. ``maskrcnn_resnet50_fpn(...)``) with the standard heads.
        dtype: precision of the convolution and linear layers of the backbone, FPN, RPN conv, box
            head and mask head; default :func:`reduced_precision_dtype` of the model's device
            (bfloat16 where the hardware has it, else float32, which still gets the folding and
            the other savings). Decisions (scores, NMS, boxes, mask logits) are always float32.
        channels_last: run the convolutions in channels-last memory format (oneDNN's fast path).

    Returns:
        :class:`FastMaskRCNN`: ``fast(images) -> [{"boxes", "labels", "scores", "masks"}]``.
    """
    device = next(model.parameters()).device
    return FastMaskRCNN(model, dtype or reduced_precision_dtype(device), channels_last)


def detection_agreement(
    reference: dict[str, Tensor], candidate: dict[str, Tensor], score_thresh: float = 0.5, iou_thresh: float = 0.9
) -> tuple[int, int]:
    """How many of ``reference``'s detections with score ``> score_thresh`` ``candidate`` reproduces.

    Both are one image's ``{"boxes", "labels", "scores"}``. Reference detections are taken by
    decreasing score; each is matched to the unused candidate detection (of any score) of the same
    label with the highest box IoU, if that IoU is ``>= iou_thresh``. Returns ``(matched, total)``.
    """
    selected = reference["scores"] > score_thresh
    boxes, labels = reference["boxes"][selected], reference["labels"][selected]
    if boxes.shape[0] == 0 or candidate["boxes"].shape[0] == 0:
        return 0, int(boxes.shape[0])
    order = torch.sort(reference["scores"][selected], descending=True, stable=True).indices
    iou = ops.box_iou(boxes[order].float(), candidate["boxes"].float())
    iou[labels[order][:, None] != candidate["labels"][None, :]] = -1
    used = torch.zeros(iou.shape[1], dtype=torch.bool)
    matched = 0
    for row in iou:
        row = torch.where(used, -1.0, row)
        best = int(row.argmax())
        if row[best] >= iou_thresh:
            used[best] = True
            matched += 1
    return matched, int(boxes.shape[0])
