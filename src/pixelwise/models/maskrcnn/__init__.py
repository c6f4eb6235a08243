"""Mask R-CNN builders: ``maskrcnn_resnet50_fpn`` (torchvision-equivalent) and the lighter
``maskrcnn_resnet18_fpn`` for CPU training.

Keyword arguments are torchvision's (``min_size``, ``box_score_thresh``, ``rpn_post_nms_top_n_test``,
``trainable_backbone_layers``...) with their meaning; they are grouped into
:class:`TransformConfig`, :class:`RPNConfig` and :class:`RoIHeadsConfig`. See ``docs/maskrcnn.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from pixelwise import ops
from pixelwise.backbones import FrozenBatchNorm2d, IntermediateLayerGetter, ResNet, resnet18, resnet50
from pixelwise.errors import UserError
from pixelwise.models._checks import whole_number
from pixelwise.models._utils import caller_stacklevel
from pixelwise.models.maskrcnn.anchors import AnchorGenerator
from pixelwise.models.maskrcnn.fast import FastMaskRCNN, optimize_for_inference
from pixelwise.models.maskrcnn.fpn import BackboneWithFPN, FeaturePyramidNetwork
from pixelwise.models.maskrcnn.model import MaskRCNN
from pixelwise.models.maskrcnn.roi_heads import (
    FastRCNNPredictor,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    RoIHeads,
    RoIHeadsConfig,
    TwoMLPHead,
)
from pixelwise.models.maskrcnn.rpn import RegionProposalNetwork, RPNConfig, RPNHead
from pixelwise.models.maskrcnn.transform import RCNNTransform, TransformConfig, paste_masks_in_image
from pixelwise.models.registry import register_model
from pixelwise.weights import backbone_file, load_matching, read_weights, saved_model_kwargs, weights_not_found

__all__ = [
    "AnchorGenerator",
    "BackboneWithFPN",
    "FastMaskRCNN",
    "FeaturePyramidNetwork",
    "HeadWidths",
    "MaskRCNN",
    "RPNConfig",
    "RoIHeadsConfig",
    "TransformConfig",
    "build_maskrcnn",
    "maskrcnn_resnet18_fpn",
    "maskrcnn_resnet50_fpn",
    "optimize_for_inference",
    "paste_masks_in_image",
    "split_kwargs",
]

COCO_URL = "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
COCO_NUM_CLASSES = 91
# Layers whose shape depends on num_classes: left at their initialisation when fine-tuning COCO
# weights to another number of classes.
CLASS_SPECIFIC = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


# ----------------------------------------------------------------------------- keyword arguments


def split_kwargs(kwargs: dict[str, Any]) -> tuple[TransformConfig, RPNConfig, RoIHeadsConfig]:
    """torchvision's keyword arguments -> the three config dataclasses.

    ``min_size max_size image_mean image_std size_divisible normalize`` go to the transform,
    ``rpn_<field>`` to :class:`RPNConfig`, ``box_<field>`` (and ``bbox_reg_weights``) to
    :class:`RoIHeadsConfig`. Unknown names raise :class:`UserError`; values out of range (sizes
    below 1, thresholds and fractions outside [0, 1], counts below 1, ...) ``ValueError``."""
    transform, rpn, roi = {}, {}, {}
    transform_fields = {f.name for f in dataclasses.fields(TransformConfig)}
    rpn_fields = {f.name for f in dataclasses.fields(RPNConfig)}
    roi_fields = {f.name for f in dataclasses.fields(RoIHeadsConfig)}
    for key, value in kwargs.items():
        if key in transform_fields:
            transform[key] = value
        elif key.startswith("rpn_") and key[4:] in rpn_fields:
            rpn[key[4:]] = value
        elif key.startswith("box_") and key[4:] in roi_fields - {"bbox_reg_weights"}:
            roi[key[4:]] = value
        elif key == "bbox_reg_weights":  # torchvision's name, the one field without box_
            roi[key] = value
        else:
            known = sorted(transform_fields | {f"rpn_{f}" for f in rpn_fields} | {"bbox_reg_weights"}
                           | {f"box_{f}" for f in roi_fields - {"bbox_reg_weights"}})
            raise UserError(f"maskrcnn: unknown argument {key!r}; known: {', '.join(known)}, trainable_backbone_layers")
    # each config checks its fields (ValueError naming the keyword and its range) and brings
    # them to their types: min_size 800 -> (800,), lists -> tuples
    return TransformConfig(**transform), RPNConfig(**rpn), RoIHeadsConfig(**roi)


# ----------------------------------------------------------------------------- assembly


def freeze_backbone_layers(body: nn.Module, trainable_layers: int) -> None:
    """Keep gradients only for the last ``trainable_layers`` of conv1, layer1..layer4 (torchvision's rule;
    5 also trains ``bn1`` where it has parameters)."""
    if not 0 <= trainable_layers <= 5:
        raise UserError(f"trainable_backbone_layers must be in 0..5, got {trainable_layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, param in body.named_parameters():
        if not any(name.startswith(layer) for layer in train):
            param.requires_grad_(False)


@dataclass(frozen=True)
class HeadWidths:
    """Channel widths of the parts after the backbone (torchvision's Mask R-CNN: the defaults)."""

    fpn: int = 256  # FPN output channels, also the RPN head's and the RoI features'
    representation: int = 1024  # fc6/fc7 of the box head
    mask: int = 256  # the four mask-head convs and conv5_mask


LIGHT_HEADS = HeadWidths(fpn=128, representation=512, mask=128)  # maskrcnn_resnet18_fpn, for CPUs


def build_maskrcnn(
    backbone: nn.Module,
    num_classes: int,
    transform: TransformConfig,
    rpn: RPNConfig,
    roi: RoIHeadsConfig,
    widths: HeadWidths = HeadWidths(),  # noqa: B008 - frozen dataclass, safe as a default
) -> MaskRCNN:
    """Assemble a Mask R-CNN on a ResNet-like ``backbone`` (children ``conv1 ... layer4`` and
    ``feature_info``, from which the FPN takes its input channels)."""
    body = IntermediateLayerGetter(backbone, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
    features = BackboneWithFPN(body, out_channels=widths.fpn)
    c, r, m = features.out_channels, widths.representation, widths.mask
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    region_proposals = RegionProposalNetwork(anchors, RPNHead(c, anchors.num_anchors_per_location()[0]), rpn)
    names = ["0", "1", "2", "3"]
    heads = RoIHeads(
        box_roi_pool=ops.MultiScaleRoIAlign(names, 7, 2),
        box_head=TwoMLPHead(c * 7 * 7, r),
        box_predictor=FastRCNNPredictor(r, num_classes),
        mask_roi_pool=ops.MultiScaleRoIAlign(names, 14, 2),
        mask_head=MaskRCNNHeads(c, (m, m, m, m)),
        mask_predictor=MaskRCNNPredictor(m, m, num_classes),
        config=roi,
    )
    return MaskRCNN(RCNNTransform(transform), features, region_proposals, heads)


def overwrite_eps(model: nn.Module, eps: float) -> None:
    """Set ``eps`` of every FrozenBatchNorm2d (torchvision uses 0.0 with its COCO weights)."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def load_detection_weights(model: MaskRCNN, pretrained: str, num_classes: int) -> None:
    """``"coco"`` or a path to a full Mask R-CNN state dict (torchvision layout, with or without
    ``num_batches_tracked``) -> loaded into ``model``; with ``num_classes != 91`` the
    class-specific layers keep their initialisation (fine-tuning). A file of the ResNet alone (a
    local copy of the ImageNet weights) fills the backbone's body, as ``"imagenet"`` would."""
    state = read_weights(pretrained, {"coco": COCO_URL})
    alone = backbone_file(state, model.backbone.body)
    if alone is not None:
        load_matching(model.backbone.body, alone, f"maskrcnn(pretrained={pretrained!r}) backbone")
        return
    optional = CLASS_SPECIFIC if num_classes != COCO_NUM_CLASSES else ()
    fresh = load_matching(model, state, f"maskrcnn(pretrained={pretrained!r})", optional=optional)
    if fresh:  # what pixelwise train prints: the class layers that did not come from the file, and why
        own = model.state_dict()
        shaped = {k: v for k, v in state.items() if k in own and v.shape != own[k].shape}  # another class count
        other = [layer for layer in fresh if any(k.startswith(layer + ".") for k in shaped)]
        lacking = [layer for layer in fresh if layer not in other]  # in whole or in part
        classes = next((int(v.shape[0]) // (4 if k.rsplit(".", 2)[-2] == "bbox_pred" else 1)  # 4 box values a class
                        for k, v in shaped.items()), None)
        why = ([f"{', '.join(other)}, which score {classes} classes in the file"] if other else []) + (
            [f"{', '.join(lacking)}, which the file lacks"] if lacking else [])
        model.pretrained_note = (f"maskrcnn: loaded the weights {pretrained} but {' and '.join(why)}: initialised "
                                 f"for this model's {num_classes} classes (fine-tuning)")
    # torchvision's COCO weights were trained with frozen BatchNorm of eps 0: the tag, or a hand-downloaded
    # copy of that file (the download error's advice), kept under its name
    if pretrained == "coco" or os.path.basename(str(pretrained)) == COCO_URL.rsplit("/", 1)[1]:
        overwrite_eps(model, 0.0)


def _maskrcnn(make_resnet: Callable[..., ResNet], widths: HeadWidths, num_classes: int, pretrained: str | None,
              kwargs: dict[str, Any]) -> MaskRCNN:
    """Mask R-CNN on the ResNet that ``make_resnet(pretrained=..., norm_layer=...)`` builds, with
    heads of ``widths``: each public builder states both, nothing is looked up by name."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be a whole number >= 2 for Mask R-CNN (class 0 is the background, "
                         f"so one kind of object needs 2), got {num_classes!r}")
    trainable = kwargs.pop("trainable_backbone_layers", None)
    if trainable is not None:
        trainable = whole_number("trainable_backbone_layers", trainable, 0, 5)
    frozen = kwargs.pop("frozen_bn_eps", None)
    if frozen is not None and (isinstance(frozen, bool) or not isinstance(frozen, numbers.Real) or not frozen >= 0):
        raise ValueError(f"frozen_bn_eps must be a number >= 0 (the eps of a frozen BatchNorm), got {frozen!r}")
    transform, rpn, roi = split_kwargs(kwargs)
    if pretrained not in (None, "imagenet", "coco"):  # a file
        path = os.path.expanduser(str(pretrained))
        if not os.path.exists(path):  # resnet18 has no COCO weights
            raise weights_not_found(str(pretrained), ("imagenet", "coco") if make_resnet is resnet50 else ("imagenet",))
        if frozen is None:  # a pixelwise checkpoint records the eps of the frozen BatchNorm it trained with (COCO's: 0)
            frozen = (saved_model_kwargs(path) or {}).get("frozen_bn_eps")
    # torchvision's rule: BatchNorm is frozen under pretrained weights and trains from scratch.
    # frozen_bn_eps freezes it whatever the weights: a checkpoint trained from pretrained weights
    # records it, so that it is rebuilt as the model it is (no num_batches_tracked, COCO's eps 0)
    norm_layer: Callable[[int], nn.Module] = (nn.BatchNorm2d if pretrained is None and frozen is None else
                                              functools.partial(FrozenBatchNorm2d, eps=float(
                                                  1e-5 if frozen is None else frozen)))
    backbone = make_resnet(pretrained="imagenet" if pretrained == "imagenet" else None, norm_layer=norm_layer)
    model = build_maskrcnn(backbone, num_classes, transform, rpn, roi, widths)
    if pretrained not in (None, "imagenet"):
        load_detection_weights(model, pretrained, num_classes)
    # torchvision: without pretrained weights every layer trains; with them 3 by default.
    if pretrained is None and trainable is not None:
        warnings.warn(
            f"trainable_backbone_layers={trainable} has no effect without pretrained weights; "
            "all backbone layers are trained",
            stacklevel=caller_stacklevel(),
        )
    trainable = 5 if pretrained is None else (3 if trainable is None else trainable)
    freeze_backbone_layers(model.backbone.body, trainable)
    return model


@register_model("maskrcnn_resnet50_fpn", task="instance", paper="He et al., ICCV 2017")
def maskrcnn_resnet50_fpn(num_classes: int = 91, pretrained: str | None = None, **kwargs: Any) -> MaskRCNN:
    """Mask R-CNN with a ResNet-50-FPN backbone, equivalent to torchvision's (same layers, keys,
    defaults and outputs; 44,401,393 parameters at 91 classes).

    ``pretrained``: ``None``; ``"imagenet"`` (ResNet-50 backbone weights); ``"coco"``
    (torchvision's ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``, box AP 37.9 / mask AP 34.6 on
    COCO val2017; for another ``num_classes`` the class-specific layers stay random); or a path
    to a full state dict. kwargs: see :func:`split_kwargs` and ``trainable_backbone_layers``
    (0..5, default 3 with pretrained weights, all 5 without).
    """
    return _maskrcnn(resnet50, HeadWidths(), num_classes, pretrained, dict(kwargs))


@register_model("maskrcnn_resnet18_fpn", task="instance", paper="He et al., ICCV 2017 (ResNet-18 backbone)")
def maskrcnn_resnet18_fpn(num_classes: int = 91, pretrained: str | None = None, **kwargs: Any) -> MaskRCNN:
    """Mask R-CNN on ResNet-18 with narrower heads (:data:`LIGHT_HEADS`: FPN 128 channels, box
    head 512, mask head 128), meant for CPU training and tests: about 2.3x fewer backbone
    FLOPs than ResNet-50 and 4x fewer per RoI in the mask head. FPN inputs 64/128/256/512 come
    from the backbone's ``feature_info``.
    No COCO weights exist for it; ``pretrained`` is ``None``, ``"imagenet"`` or a path."""
    if pretrained == "coco":
        raise UserError("maskrcnn_resnet18_fpn has no COCO weights; use pretrained='imagenet' or maskrcnn_resnet50_fpn")
    return _maskrcnn(resnet18, LIGHT_HEADS, num_classes, pretrained, dict(kwargs))
