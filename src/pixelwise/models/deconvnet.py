"""DeconvNet (Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015).

VGG16 conv layers with BatchNorm (keys ``features.*`` as torchvision's ``vgg16_bn``), then the
fully connected layers as convolutions: ``fc6`` 7x7 conv 4096 (valid: 7x7 -> 1x1), ``fc7`` 1x1 conv
4096, ``deconv_fc6`` 7x7 transposed conv back to 7x7x512, each with BN + ReLU; then a decoder that
mirrors the 13 convs: per stage, max-unpooling with the encoder's pooling indices followed by 3x3
deconvolutions (``ConvTranspose2d``) + BN + ReLU; finally a 1x1 score conv. With 21 classes this is
251,805,653 parameters, the count of the authors' ``DeconvNet_inference_deploy.prototxt``.

Built from the blocks SegNet also uses (and nothing of SegNet's): the encoder runs through
:func:`pixelwise.backbones.vgg.forward_stages`, which keeps the pooling indices; the decoder
layout is :func:`~pixelwise.backbones.vgg.mirror_channels` of it, each stage a
:class:`pixelwise.layers.DecoderStage` of transposed :func:`~pixelwise.layers.conv_bn` blocks.

Input size. The paper's network sees 224x224 proposals (pool5 is 7x7, fc6 sees all of it). Here
the input is zero-padded at the bottom/right to a multiple of 32 and to at least 224 in each
dimension, and the logits are cropped back. At exactly 224x224 this is the paper's network; on a
larger canvas fc6 slides over pool5 like FCN's convolutionalised fc6 and ``deconv_fc6`` sums the
overlapping 7x7 reconstructions, a fully convolutional generalisation whose statistics differ
from those seen when training on 224 crops. The paper's own way to handle large images is
:func:`instance_wise_predict`: crops around object proposals, each resized to 224x224.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.backbones.vgg import (
    VGG16_CFG,
    features_info,
    forward_stages,
    load_features,
    make_features,
    mirror_channels,
)
from pixelwise.errors import UserError
from pixelwise.layers import DecoderStage, conv_bn, decoder_stages
from pixelwise.models._checks import whole_number
from pixelwise.models._utils import (
    crop_top_left,
    forward_logits,
    holds_whole_model,
    init_msra,
    load_model_weights,
    local_weights,
    pad_to_multiple,
)
from pixelwise.models.registry import register_model

__all__ = ["DeconvNet", "crop_boxes", "deconvnet", "instance_wise_predict", "load_pretrained", "pad_to_min"]


def pad_to_min(x: Tensor, min_size: int) -> Tensor:
    """Zero-pad ``Tensor[N, C, H, W]`` at the bottom/right to at least ``min_size`` in each dimension
    (``torch.sym_max`` keeps the sizes symbolic under ``torch.export``, ``torch.clamp`` of the
    traced sizes under ``torch.jit.trace`` and so ``pixelwise export``)."""
    h, w = x.shape[-2:]
    if torch.jit.is_tracing():  # jit.trace (ONNX export) hands out sizes as tensors: keep them traced
        pad_w = torch.clamp(w, min=min_size) - w  # type: ignore[call-overload]  # traced sizes are tensors
        pad_h = torch.clamp(h, min=min_size) - h  # type: ignore[call-overload]
        return F.pad(x, (0, pad_w, 0, pad_h))
    return F.pad(x, (0, torch.sym_max(w, min_size) - w, 0, torch.sym_max(h, min_size) - h))


class DeconvNet(nn.Module):
    """``Tensor[N, 3, H, W]`` -> ``Tensor[N, num_classes, H, W]`` logits, any ``H, W``.

    ``features``: the encoder (``nn.Sequential`` with P max pools; its deepest stage has C
    channels at stride S, :func:`~pixelwise.backbones.vgg.features_info`); ``decoder``: P
    :class:`~pixelwise.layers.DecoderStage` (deepest first); ``classifier``: the score conv.
    Between them ``fc6`` (``fc_kernel`` x ``fc_kernel`` valid conv C -> ``fc_channels``), ``fc7``
    (1x1) and ``deconv_fc6`` (transposed ``fc_kernel`` conv back to C). Inputs are padded to a
    multiple of S and to at least ``fc_kernel * S`` (224 for VGG16)."""

    def __init__(self, features: nn.Sequential, decoder: Sequence[DecoderStage], classifier: nn.Module,
                 fc_channels: int = 4096, fc_kernel: int = 7) -> None:
        super().__init__()
        fc_channels = whole_number("fc_channels", fc_channels)
        fc_kernel = whole_number("fc_kernel", fc_kernel)
        info = features_info(features)
        if len(decoder) != len(info):
            raise ValueError(f"decoder has {len(decoder)} stages for an encoder with {len(info)} pools")
        channels, stride = info[-1].channels, info[-1].stride
        self.features = features
        self.fc6 = conv_bn(channels, fc_channels, fc_kernel, padding=0)
        self.fc7 = conv_bn(fc_channels, fc_channels, 1)
        self.deconv_fc6 = conv_bn(fc_channels, channels, fc_kernel, transposed=True, padding=0)
        self.decoder = nn.ModuleList(decoder)
        self.classifier = classifier
        self.size_divisor = stride
        self.alignment = stride  # the pooling grid, read by tiled inference
        self.min_size = fc_kernel * stride

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(pad_to_min(x, self.min_size), self.size_divisor)
        enc = forward_stages(self.features, x, return_indices=True)
        x = self.deconv_fc6(self.fc7(self.fc6(enc.stages[-1])))
        for stage, idx, size in zip(self.decoder, enc.indices[::-1], enc.sizes[::-1]):
            x = stage(x, idx, size)
        return crop_top_left(self.classifier(x), h, w)


@register_model("deconvnet", paper="Noh et al., ICCV 2015")
def deconvnet(num_classes: int, pretrained: str | None = None, fc_channels: int = 4096) -> DeconvNet:
    """DeconvNet on VGG16-BN. ``pretrained``: ``None``, ``"imagenet"`` (torchvision's ``vgg16_bn``
    weights: ``features.*`` into the encoder, ``classifier.0``/``classifier.3`` reshaped into
    ``fc6``/``fc7`` when ``fc_channels == 4096``) or a path to a torchvision-format VGG16-BN state
    dict. ``fc_channels=1024`` is the smaller variant the SegNet paper retrained; its fc layers
    start from scratch. ``fc_channels`` must be a whole number >= 1."""
    fc_channels = whole_number("fc_channels", fc_channels)  # before building the 138M-parameter encoder
    features = make_features(VGG16_CFG, batch_norm=True)
    layout = mirror_channels(features)
    layout[-1].append((64, 64, 3))  # deconv1_2 keeps 64 channels; the 1x1 score conv follows
    model = DeconvNet(features, decoder_stages(layout, "indices", transposed=True),
                      nn.Conv2d(64, num_classes, 1), fc_channels=fc_channels)
    init_msra(model)
    if pretrained is not None:
        state = local_weights(pretrained)
        if holds_whole_model(model, state):  # e.g. a run's last.safetensors
            load_model_weights(model, pretrained, "deconvnet", state=state)
        else:
            load_pretrained(model, pretrained, state)
    return model


def load_pretrained(model: DeconvNet, pretrained: str, state: dict[str, Tensor] | None = None) -> None:
    """Load torchvision-format VGG16-BN weights into ``model``: ``features.*`` into the encoder and,
    when the shapes fit (``fc_channels == 4096``, 7x7 fc6), ``classifier.0`` -> ``fc6`` (reshaped
    ``[4096, 25088] -> [4096, 512, 7, 7]``, the order in which VGG flattens pool5) and
    ``classifier.3`` -> ``fc7`` (``[4096, 4096, 1, 1]``). ``state``: the file's contents where the
    caller has read them already."""
    state = load_features(model.features, pretrained, state=state)
    fc6, fc7 = model.fc6[0], model.fc7[0]
    if not isinstance(fc6, nn.Conv2d) or not isinstance(fc7, nn.Conv2d):
        raise TypeError(f"fc6/fc7 must be conv_bn blocks, got {type(fc6).__name__}/{type(fc7).__name__}")
    if fc6.out_channels != 4096 or fc6.kernel_size != (7, 7):
        return  # another fc shape than VGG16's: fc6/fc7 keep their fresh initialisation
    if "classifier.0.weight" not in state or "classifier.3.weight" not in state:
        raise UserError(f"{pretrained}: no classifier.0 / classifier.3 weights for DeconvNet's fc6/fc7; "
                        "pass a full torchvision vgg16_bn state dict (or build with fc_channels=1024)")
    fc6.load_state_dict({"weight": state["classifier.0.weight"].reshape(fc6.weight.shape),
                         "bias": state["classifier.0.bias"]})
    fc7.load_state_dict({"weight": state["classifier.3.weight"].reshape(fc7.weight.shape),
                         "bias": state["classifier.3.bias"]})


# --------------------------------------------------------------------------- instance-wise inference


def crop_boxes(boxes: Tensor, scale: float, height: int, width: int) -> Tensor:
    """Enlarge ``boxes`` ``Tensor[K, 4]`` (``x0, y0, x1, y1`` pixels, ``x1`` exclusive) by ``scale``
    about their centres and round outwards to integer crops ``Tensor[K, 4]`` (int64). Crops may
    extend past the image (the image is zero-padded there); each is at least 1x1 and overlaps
    the ``height x width`` image by at least one pixel."""
    boxes = boxes.to(torch.float64)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    hw = (boxes[:, 2] - boxes[:, 0]).clamp_min(1) * scale / 2
    hh = (boxes[:, 3] - boxes[:, 1]).clamp_min(1) * scale / 2
    crops = torch.stack([(cx - hw).floor(), (cy - hh).floor(), (cx + hw).ceil(), (cy + hh).ceil()], 1).long()
    crops[:, 0].clamp_(max=width - 1)
    crops[:, 1].clamp_(max=height - 1)
    crops[:, 2] = torch.maximum(crops[:, 2], crops[:, 0] + 1).clamp(min=1)
    crops[:, 3] = torch.maximum(crops[:, 3], crops[:, 1] + 1).clamp(min=1)
    return crops


def _cut(image: Tensor, x0: int, y0: int, x1: int, y1: int) -> Tensor:
    """``image[:, y0:y1, x0:x1]`` of ``Tensor[C, H, W]`` with zeros where the window leaves the image."""
    h, w = image.shape[-2:]
    patch = image.new_zeros(image.shape[0], y1 - y0, x1 - x0)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    patch[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[:, sy0:sy1, sx0:sx1]
    return patch


@torch.no_grad()
def instance_wise_predict(model: nn.Module, image: Tensor, boxes: Tensor, crop_scale: float = 1.2,
                          input_size: int = 224, background: int = 0, batch_size: int = 8) -> Tensor:
    """The paper's instance-wise inference: segment each proposal on its own and merge by maximum.

    ``image``: preprocessed ``Tensor[3, H, W]``; ``boxes``: ``Tensor[K, 4]`` (``x0, y0, x1, y1``,
    e.g. from the user or a detector such as Mask R-CNN). Each box is enlarged by ``crop_scale``
    (:func:`crop_boxes`; outside the image the crop is zero-padded, as in the authors' MATLAB code),
    resized (bilinear) to ``input_size`` squared, run through ``model`` (call ``model.eval()``
    first), and its logits resized back to the crop. The class score map of the image is the
    pixel-wise maximum over proposals of their score maps zero-padded outside each crop
    (``P = max_i G_i``, Sec. 4 of the paper; the authors' code starts the maximum from zeros), and
    the result is its softmax over classes.

    Returns class probabilities ``Tensor[C, H, W]``; pixels no crop covers get probability 1 for
    ``background``. ``K = 0`` gives an all-background map only if the class count is known, so it
    raises ``ValueError``.
    """
    if image.dim() != 3 or boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"expected image [3, H, W] and boxes [K, 4], got {tuple(image.shape)} and "
                         f"{tuple(boxes.shape)}")
    if boxes.shape[0] == 0:
        raise ValueError("no boxes: instance-wise inference needs at least one proposal")
    if not math.isfinite(crop_scale) or crop_scale <= 0:
        raise ValueError(f"crop_scale must be a positive number, got {crop_scale}")
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes hold NaN or infinite coordinates")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError("boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0; some are reversed")
    h, w = image.shape[-2:]
    crops = crop_boxes(boxes, crop_scale, h, w).tolist()
    scores: Tensor | None = None
    covered = torch.zeros(h, w, dtype=torch.bool, device=image.device)
    for start in range(0, len(crops), batch_size):
        chunk = crops[start:start + batch_size]
        batch = torch.stack([F.interpolate(_cut(image, *c)[None], size=(input_size, input_size),
                                           mode="bilinear", align_corners=False)[0] for c in chunk])
        logits = forward_logits(model, batch).float()
        if scores is None:
            scores = logits.new_zeros(logits.shape[1], h, w)
        for (x0, y0, x1, y1), g in zip(chunk, logits):
            g = F.interpolate(g[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
            sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
            scores[:, sy0:sy1, sx0:sx1] = torch.maximum(scores[:, sy0:sy1, sx0:sx1],
                                                        g[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0])
            covered[sy0:sy1, sx0:sx1] = True
    assert scores is not None
    if not 0 <= background < scores.shape[0]:
        raise ValueError(f"background={background} is not a class of the model's {scores.shape[0]}")
    probs = scores.softmax(dim=0)
    probs[:, ~covered] = 0.0
    probs[background, ~covered] = 1.0
    return probs
