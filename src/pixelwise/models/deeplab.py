"""DeepLabV3 (Chen et al., arXiv 2017) and DeepLabV3+ (Chen et al., ECCV 2018) on dilated ResNets.

``deeplabv3_resnet50`` / ``_resnet101`` are torchvision's models with its state-dict keys
(``backbone.*``, ``classifier.0.convs.*`` for ASPP, ``aux_classifier.*``): a ResNet whose
last stages trade stride for dilation, ASPP (1x1 conv, three dilated 3x3 convs, image
pooling; concatenated and projected to 256 with dropout 0.5), a 3x3 conv and a 1x1 scorer,
logits upsampled bilinearly to the input size. ``output_stride=8`` (torchvision's choice)
dilates layer3 and layer4 and uses rates 12/24/36; ``output_stride=16`` dilates only layer4
and uses the paper's rates 6/12/18.

``multi_grid=(1, 2, 4)`` is the paper's Multi-Grid (Sec. 3.2): the three 3x3 convs of layer4
("block4") get unit rates (1, 2, 4) times the stage's rate, i.e. rates (2, 4, 8) at output stride
16 and (4, 8, 16) at 8, instead of torchvision's (1, 2, 2) and (2, 4, 4). The paper's DeepLabV3
with ASPP uses (1, 2, 4) (77.21 mIoU on VOC 2012 val at output stride 16, its Table 6); the
default ``None`` keeps torchvision's rates, so its checkpoints reproduce its outputs.

``deeplabv3plus_resnet50`` adds the V3+ decoder: ASPP output (stride 16) upsampled to the
stride-4 layer1 features, which are first reduced to 48 channels by a 1x1 conv; the
concatenation goes through two 3x3 convs of 256 channels and a 1x1 scorer, and the stride-4
logits are upsampled to the input size. The decoder reads the channel counts from the
backbone's ``feature_info``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.backbones.resnet import IntermediateLayerGetter, resnet18, resnet50, resnet101
from pixelwise.layers import conv_bn_relu
from pixelwise.models._utils import SimpleSegmentationModel, load_model_weights
from pixelwise.models.fcn import FCNHead
from pixelwise.models.registry import register_model

__all__ = ["ASPP", "DeepLabHead", "DeepLabV3", "DeepLabV3Plus", "DeepLabV3PlusHead", "deeplabv3_resnet50",
           "deeplabv3_resnet101", "deeplabv3plus_resnet18", "deeplabv3plus_resnet50"]

PAPER_V3 = "Chen et al., arXiv:1706.05587"
PAPER_V3PLUS = "Chen et al., ECCV 2018"

# output stride -> (replace_stride_with_dilation for layer2..4, ASPP rates)
OUTPUT_STRIDES: dict[int, tuple[list[bool], tuple[int, int, int]]] = {
    8: ([False, True, True], (12, 24, 36)),
    16: ([False, False, True], (6, 12, 18)),
}


# --------------------------------------------------------------------------- blocks


class ASPPConv(nn.Sequential):
    """Dilated 3x3 conv, BN, ReLU: ``Tensor[N, in, h, w] -> Tensor[N, out, h, w]``."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPPooling(nn.Sequential):
    """Image-level features: global average, 1x1 conv, BN, ReLU, broadcast back to ``h x w``
    (bilinear from 1x1, i.e. a copy): ``Tensor[N, in, h, w] -> Tensor[N, out, h, w]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``Tensor[N, in, h, w] -> Tensor[N, out, h, w]``."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in atrous_rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP, 3x3 conv 256, BN, ReLU, 1x1 scorer: ``Tensor[N, in, h, w] -> Tensor[N, C, h, w]``."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36)
                 ) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1),
        )


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the deep features plus the V3+ decoder on the low-level ones.

    ``x: Tensor[N, in, h, w]`` (stride 16), ``low: Tensor[N, low_in, 4h', 4w']`` (stride 4)
    ``-> Tensor[N, C, H/4, W/4]`` (the size of ``low``).
    """

    def __init__(self, in_channels: int, low_channels: int, num_classes: int,
                 atrous_rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, atrous_rates)
        self.reduce = conv_bn_relu(low_channels, 48, kernel_size=1)
        self.fuse = nn.Sequential(conv_bn_relu(256 + 48, 256), conv_bn_relu(256, 256))
        self.score = nn.Conv2d(256, num_classes, 1)

    def forward(self, x: Tensor, low: Tensor) -> Tensor:
        low = self.reduce(low)
        x = F.interpolate(self.aspp(x), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.score(self.fuse(torch.cat([x, low], dim=1)))


# --------------------------------------------------------------------------- models


class DeepLabV3(SimpleSegmentationModel):
    """torchvision's DeepLabV3: dilated ResNet, :class:`DeepLabHead`, optional FCN aux head."""

    # ASPP's image-pooling branch normalises one value per channel and image: BatchNorm in training
    # needs two images in a batch (the trainer refuses --batch-size 1 for such a model)
    min_train_batch = 2


class DeepLabV3Plus(SimpleSegmentationModel):
    """DeepLabV3+: the backbone also returns ``"low"`` (layer1) for the decoder."""

    min_train_batch = 2  # as DeepLabV3's: ASPP's image pooling

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"], features["low"])


def _body(resnet, pretrained: str | None, output_stride: int, return_layers: dict[str, str],
          multi_grid: Sequence[int] | None = None) -> tuple[IntermediateLayerGetter, tuple[int, int, int]]:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    dilation, rates = OUTPUT_STRIDES[output_stride]
    grid = {} if multi_grid is None else {"multi_grid": multi_grid}  # ResNet-50/101 only
    backbone = resnet(pretrained="imagenet" if pretrained == "imagenet" else None,
                      replace_stride_with_dilation=dilation, **grid)
    return IntermediateLayerGetter(backbone, return_layers), rates


def _deeplabv3(resnet, name: str, num_classes: int, pretrained: str | None, aux_loss: bool,
               output_stride: int, multi_grid: Sequence[int] | None) -> DeepLabV3:
    return_layers = {"layer4": "out", "layer3": "aux"} if aux_loss else {"layer4": "out"}
    body, rates = _body(resnet, pretrained, output_stride, return_layers, multi_grid)
    info = body.feature_info
    model = DeepLabV3(body, DeepLabHead(info["out"].channels, num_classes, rates),
                      FCNHead(info["aux"].channels, num_classes) if aux_loss else None)
    if pretrained not in (None, "imagenet"):
        load_model_weights(model, pretrained, name, tags=("imagenet",))
    return model


@register_model("deeplabv3_resnet50", paper=PAPER_V3)
def deeplabv3_resnet50(num_classes: int, pretrained: str | None = None, aux_loss: bool = False,
                       output_stride: int = 8, multi_grid: Sequence[int] | None = None) -> DeepLabV3:
    """torchvision's ``deeplabv3_resnet50``. ``pretrained``: ``"imagenet"`` (ResNet-50 backbone)
    or a local whole-model file (e.g. torchvision's ``deeplabv3_resnet50_coco-cd0a2569.pth``);
    ``output_stride``: 8 (torchvision) or 16 (the paper's training setting); ``multi_grid``:
    e.g. ``(1, 2, 4)``, the paper's Multi-Grid unit rates for layer4 (None: torchvision's rates)."""
    return _deeplabv3(resnet50, "deeplabv3_resnet50", num_classes, pretrained, aux_loss, output_stride, multi_grid)


@register_model("deeplabv3_resnet101", paper=PAPER_V3)
def deeplabv3_resnet101(num_classes: int, pretrained: str | None = None, aux_loss: bool = False,
                        output_stride: int = 8, multi_grid: Sequence[int] | None = None) -> DeepLabV3:
    """torchvision's ``deeplabv3_resnet101``; arguments as :func:`deeplabv3_resnet50`."""
    return _deeplabv3(resnet101, "deeplabv3_resnet101", num_classes, pretrained, aux_loss, output_stride,
                      multi_grid)


def _deeplabv3plus(resnet, name: str, num_classes: int, pretrained: str | None, aux_loss: bool,
                   output_stride: int, multi_grid: Sequence[int] | None, input_norm: bool = False
                   ) -> DeepLabV3Plus:
    return_layers = {"layer1": "low", "layer3": "aux", "layer4": "out"} if aux_loss else \
        {"layer1": "low", "layer4": "out"}
    body, rates = _body(resnet, pretrained, output_stride, return_layers, multi_grid)
    info = body.feature_info
    head = DeepLabV3PlusHead(info["out"].channels, info["low"].channels, num_classes, rates)
    model = DeepLabV3Plus(body, head, FCNHead(info["aux"].channels, num_classes) if aux_loss else None,
                          input_norm=input_norm)
    if pretrained not in (None, "imagenet"):
        load_model_weights(model, pretrained, name, tags=("imagenet",))
    return model


@register_model("deeplabv3plus_resnet50", paper=PAPER_V3PLUS)
def deeplabv3plus_resnet50(num_classes: int, pretrained: str | None = None, aux_loss: bool = False,
                           output_stride: int = 16, multi_grid: Sequence[int] | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ on ResNet-50: ASPP at ``output_stride`` 16 (rates 6/12/18) or 8 (12/24/36),
    decoder at stride 4. ``pretrained``: ``"imagenet"`` (backbone) or a local whole-model file;
    ``multi_grid`` as :func:`deeplabv3_resnet50`."""
    return _deeplabv3plus(resnet50, "deeplabv3plus_resnet50", num_classes, pretrained, aux_loss, output_stride,
                          multi_grid)


@register_model("deeplabv3plus_resnet18", paper=PAPER_V3PLUS)
def deeplabv3plus_resnet18(num_classes: int, pretrained: str | None = None, aux_loss: bool = False,
                           output_stride: int = 16, input_norm: bool = False) -> DeepLabV3Plus:
    """DeepLabV3+ on ResNet-18, the light configuration of the V3+ decoder: layer1 gives the
    decoder 64 channels, layer4 the ASPP 512 (both 3x3 convs of a dilated stage's basic blocks
    take its rate, see :class:`pixelwise.backbones.resnet.BasicBlock`); otherwise as
    :func:`deeplabv3plus_resnet50` (no Multi-Grid: it sets the rate of a bottleneck's one 3x3).
    ``input_norm``: standardise each image over its own pixels first (training from scratch)."""
    return _deeplabv3plus(resnet18, "deeplabv3plus_resnet18", num_classes, pretrained, aux_loss, output_stride,
                          None, input_norm)
