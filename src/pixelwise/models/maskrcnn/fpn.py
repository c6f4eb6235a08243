"""Feature Pyramid Network (Lin et al., CVPR 2017) over a ResNet, with torchvision's keys.

``BackboneWithFPN`` = ``body`` (an :class:`~pixelwise.backbones.IntermediateLayerGetter` that
returns ``layer1..layer4`` as ``"0".."3"``) + ``fpn``. State-dict keys: ``body.*`` (the ResNet's),
``fpn.inner_blocks.N.0.*`` (1x1 laterals), ``fpn.layer_blocks.N.0.*`` (3x3 outputs).
The FPN takes its input channels from the body's ``feature_info``, never from a name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.backbones import IntermediateLayerGetter


def _conv(in_ch: int, out_ch: int, kernel_size: int) -> nn.Sequential:
    """A biased conv wrapped in ``Sequential`` (torchvision's ``Conv2dNormActivation`` without
    norm and activation, hence the ``.0.`` in the keys)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, padding=(kernel_size - 1) // 2))


class FeaturePyramidNetwork(nn.Module):
    """``{name_l: Tensor[N, in_channels[l], H_l, W_l]}`` (fine to coarse) -> the same names with
    ``Tensor[N, out_channels, H_l, W_l]``, plus ``"pool"`` (``max_pool2d(P_last, 1, stride 2)``)
    when ``extra_pool`` is set: top-down pathway with nearest upsampling and lateral sums."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, extra_pool: bool = True) -> None:
        super().__init__()
        if any(c <= 0 for c in in_channels):
            raise ValueError(f"FPN in_channels must be positive, got {list(in_channels)}")
        self.inner_blocks = nn.ModuleList(_conv(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(_conv(out_channels, out_channels, 3) for _ in in_channels)
        self.extra_pool = extra_pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        names, xs = list(features.keys()), list(features.values())
        last_inner = self.inner_blocks[-1](xs[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(xs) - 2, -1, -1):
            lateral = self.inner_blocks[idx](xs[idx])
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        if self.extra_pool:
            names.append("pool")
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(names, results))


class BackboneWithFPN(nn.Module):
    """``Tensor[N, 3, H, W] -> {"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``, each
    ``Tensor[N, out_channels, H / s, W / s]`` for s = 4, 8, 16, 32, 64.

    ``body`` returns an ordered dict of stages and publishes ``feature_info`` (new name ->
    ``FeatureInfo`` with ``channels``); ``out_channels`` is what the heads read."""

    body: IntermediateLayerGetter
    fpn: FeaturePyramidNetwork

    def __init__(self, body: IntermediateLayerGetter, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        in_channels = [info.channels for info in body.feature_info.values()]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(x))
