"""ENet (Paszke, Chaurasia, Kim & Culurciello, "ENet: A Deep Neural Network Architecture for
Real-Time Semantic Segmentation", arXiv:1606.02147).

A network built for speed, trained from scratch in the paper (51.3 class IoU on CamVid's test
split at 480x360): a large encoder and a small decoder of *bottleneck* blocks, each a residual
unit whose convolutional branch projects the channels down by 4 (1x1, or 2x2 stride 2 when the
block downsamples), convolves (3x3, dilated 3x3, or an asymmetric 5x1 + 1x5), expands back (1x1)
and ends in spatial dropout, all with BatchNorm and PReLU. Table 1 of the paper:

- ``initial``: a 3x3 stride-2 convolution with 13 filters beside a 2x2 max pool of the input,
  concatenated (16 channels at 1/2 resolution);
- stage 1: bottleneck 1.0 downsamples to 64 channels (its main branch is the max pool, whose
  indices are kept, zero-padded to 64 channels), then 4 bottlenecks (spatial dropout 0.01);
- stage 2: bottleneck 2.0 downsamples to 128 channels (1/8 resolution), then regular, dilated 2,
  asymmetric 5, dilated 4, regular, dilated 8, asymmetric 5, dilated 16 (dropout 0.1 from here);
- stage 3: stage 2's eight blocks again, without the downsampling;
- stage 4: an upsampling bottleneck to 64 channels (its main branch a 1x1 convolution and
  max *unpooling* with stage 2's indices, its other branch a stride-2 transposed 3x3), then 2
  bottlenecks; stage 5: the same to 16 channels with stage 1's indices, then 1 bottleneck;
- ``fullconv``: a 2x2 stride-2 transposed convolution to the classes at full resolution.

Parameters: 359,786 with 11 classes (the paper's Table 3 rounds ENet to 0.37M; ports differ by
a few thousand in biases and in the decoder's inner width, which here is a quarter of each
block's input, as the paper describes the projection). Convolutions have no bias where a BatchNorm
follows; weights get the fan-in He initialisation, PReLU slopes 0.25.

``input_norm`` (off by default, as in the paper) standardises each image per channel over its own
pixels first, as ``unet``'s option of that name does. Any input size: the input is zero-padded at
the bottom/right to a multiple of 8 and the logits cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.layers import standardize_image, unpool
from pixelwise.models._checks import dropout_rate
from pixelwise.models._utils import crop_top_left, init_msra, pad_to_multiple
from pixelwise.models.registry import register_model
from pixelwise.weights import load_matching, read_weights

__all__ = ["ENet", "enet"]

STRIDE = 8  # three 2x2 poolings: the initial block, bottleneck 1.0 and 2.0


def conv_bn_prelu(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                  padding: int | tuple[int, int] = 0, dilation: int = 1, prelu: bool = True) -> nn.Sequential:
    """``Conv2d`` without bias -> ``BatchNorm2d`` [-> ``PReLU``]: ENet's unit, unlike
    :func:`pixelwise.layers.conv_bn` (bias, ReLU) and ``conv_bn_relu`` (ReLU), which it does not fit."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, bias=False),
                               nn.BatchNorm2d(cout)]
    if prelu:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Initial(nn.Module):
    """``cat(conv3x3 stride 2 (16 - Cin filters), maxpool 2x2 (Cin channels))``, BN, PReLU.

    The BatchNorm of the concatenation is kept as two (``bn`` of the convolution's channels,
    ``pool_bn`` of the pooled ones): BatchNorm is per channel, so this is the same layer, and the
    first half can be folded into the convolution for inference."""

    bn_follows_conv = True  # bn normalises conv's output (fast paths fold it)

    def __init__(self, in_channels: int, out_channels: int = 16):
        super().__init__()
        if not 0 < in_channels < out_channels:
            raise ValueError(f"ENet's initial block needs 1-{out_channels - 1} input channels, got {in_channels}")
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels - in_channels)
        self.pool_bn = nn.BatchNorm2d(in_channels)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(torch.cat([self.bn(self.conv(x)), self.pool_bn(F.max_pool2d(x, 2))], dim=1))


class Bottleneck(nn.Module):
    """A regular, dilated, asymmetric or downsampling bottleneck: ``PReLU(main + branch)``.

    ``kind``: ``"regular"``, ``"asymmetric"`` (5x1 then 1x5), or ``"downsample"`` (2x2 stride-2
    projection; the main branch max-pools, returns its indices and is zero-padded to ``cout``)."""

    def __init__(self, channels: int, kind: str = "regular", dilation: int = 1, dropout: float = 0.1,
                 cout: int | None = None):
        super().__init__()
        cout = channels if cout is None else cout
        if kind != "downsample" and cout != channels:
            raise ValueError("only a downsampling bottleneck changes the number of channels")
        inner = channels // 4
        self.downsample = kind == "downsample"
        self.pad = cout - channels
        k = 2 if self.downsample else 1
        self.project = conv_bn_prelu(channels, inner, k, stride=k)
        if kind == "asymmetric":
            self.conv = nn.Sequential(nn.Conv2d(inner, inner, (5, 1), padding=(2, 0), bias=False),
                                      *conv_bn_prelu(inner, inner, (1, 5), padding=(0, 2)))
        elif kind in ("regular", "downsample"):
            self.conv = conv_bn_prelu(inner, inner, 3, padding=dilation, dilation=dilation)
        else:
            raise ValueError(f"kind must be 'regular', 'asymmetric' or 'downsample', got {kind!r}")
        self.expand = conv_bn_prelu(inner, cout, 1, prelu=False)
        self.dropout = nn.Dropout2d(dropout)
        self.act = nn.PReLU(cout)

    def branch(self, x: Tensor) -> Tensor:
        return self.dropout(self.expand(self.conv(self.project(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.branch(x))

    def forward_down(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The downsampling block: ``(output, max-pool indices)`` for the decoder's unpooling."""
        main, indices = F.max_pool2d(x, 2, return_indices=True)
        main = F.pad(main, (0, 0, 0, 0, 0, self.pad))  # zero channels up to cout
        return self.act(main + self.branch(x)), indices


class Upsample(nn.Module):
    """The upsampling bottleneck: ``PReLU(unpool(BN(conv1x1(x)), indices) + branch(x))``, the
    branch's middle convolution a stride-2 transposed 3x3."""

    unpools_by_index = True  # read by pixelwise.layers.unpools_by_index

    def __init__(self, channels: int, cout: int, dropout: float = 0.1):
        super().__init__()
        inner = channels // 4
        self.main = conv_bn_prelu(channels, cout, 1, prelu=False)
        self.project = conv_bn_prelu(channels, inner, 1)
        self.conv = nn.Sequential(
            nn.ConvTranspose2d(inner, inner, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(inner), nn.PReLU(inner))
        self.expand = conv_bn_prelu(inner, cout, 1, prelu=False)
        self.dropout = nn.Dropout2d(dropout)
        self.act = nn.PReLU(cout)

    def forward(self, x: Tensor, indices: Tensor, size: Sequence[int]) -> Tensor:
        """``size``: the ``(H, W)`` before the pooling whose ``indices`` these are."""
        main = unpool(self.main(x), indices, size)  # traces to ONNX MaxUnpool for export
        return self.act(main + self.dropout(self.expand(self.conv(self.project(x)))))


def _stage(dropout: float) -> nn.Sequential:
    """Stages 2 and 3 (after the downsampling block): Table 1's eight bottlenecks."""
    return nn.Sequential(
        Bottleneck(128, dropout=dropout), Bottleneck(128, dilation=2, dropout=dropout),
        Bottleneck(128, "asymmetric", dropout=dropout), Bottleneck(128, dilation=4, dropout=dropout),
        Bottleneck(128, dropout=dropout), Bottleneck(128, dilation=8, dropout=dropout),
        Bottleneck(128, "asymmetric", dropout=dropout), Bottleneck(128, dilation=16, dropout=dropout))


class ENet(nn.Module):
    """``Tensor[N, Cin, H, W]`` -> ``Tensor[N, num_classes, H, W]`` logits, any ``H, W``.

    ``dropout``: spatial dropout from stage 2 on (the paper's 0.1); stage 1 uses a tenth of it."""

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.1, input_norm: bool = False):
        super().__init__()
        dropout = dropout_rate(dropout)
        self.in_channels = in_channels  # the input contract's channels (checkpoint.model_input_spec)
        self.input_norm = input_norm
        self.alignment = STRIDE  # the pooling grid, read by tiled inference
        p1 = dropout / 10
        self.initial = Initial(in_channels)
        self.down1 = Bottleneck(16, "downsample", dropout=p1, cout=64)
        self.stage1 = nn.Sequential(*(Bottleneck(64, dropout=p1) for _ in range(4)))
        self.down2 = Bottleneck(64, "downsample", dropout=dropout, cout=128)
        self.stage2 = _stage(dropout)
        self.stage3 = _stage(dropout)
        self.up4 = Upsample(128, 64, dropout)
        self.stage4 = nn.Sequential(Bottleneck(64, dropout=dropout), Bottleneck(64, dropout=dropout))
        self.up5 = Upsample(64, 16, dropout)
        self.stage5 = Bottleneck(16, dropout=dropout)
        self.fullconv = nn.ConvTranspose2d(16, num_classes, 2, stride=2)
        init_msra(self)
        for m in self.modules():
            if isinstance(m, nn.PReLU):
                nn.init.constant_(m.weight, 0.25)  # init_msra leaves them; PyTorch's default, the PReLU paper's

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.input_norm:  # each image's channels to mean 0, variance 1 over its own pixels
            x = standardize_image(x)
        x = self.initial(pad_to_multiple(x, STRIDE))
        size1 = x.shape[-2:]
        x, indices1 = self.down1.forward_down(x)
        x = self.stage1(x)
        size2 = x.shape[-2:]
        x, indices2 = self.down2.forward_down(x)
        x = self.stage3(self.stage2(x))
        x = self.stage4(self.up4(x, indices2, size2))
        x = self.stage5(self.up5(x, indices1, size1))
        return crop_top_left(self.fullconv(x), h, w)


@register_model("enet", paper="Paszke et al., arXiv:1606.02147")
def enet(num_classes: int, pretrained: str | None = None, in_channels: int = 3, dropout: float = 0.1,
         input_norm: bool = False) -> ENet:
    """ENet as in the paper's Table 1; trained from scratch there (no ImageNet weights exist).
    ``pretrained``: a path to weights of a model of the same layout (``.safetensors`` or a
    ``state_dict``), loaded where the names and shapes match."""
    model = ENet(num_classes, in_channels=in_channels, dropout=dropout, input_norm=input_norm)
    if pretrained:
        load_matching(model, read_weights(pretrained), f"enet(pretrained={pretrained!r})")
    return model
