"""VGG-16 (Simonyan & Zisserman, ICLR 2015) with torchvision's module names and state-dict keys.

``features`` is the 13-conv stack (with BatchNorm after every conv in ``vgg16_bn``),
``avgpool`` an ``AdaptiveAvgPool2d(7)`` and ``classifier`` the three fully connected layers
(``classifier.0``, ``.3``, ``.6``), so torchvision's published checkpoints load unchanged.

Encoder contract (``VGG.feature_info``, one entry per max pool)::

    name   pool1  pool2  pool3  pool4  pool5
    chans     64    128    256    512    512
    stride     2      4      8     16     32

:meth:`VGG.forward_features` returns every pooled stage output and, on request, the max-pool
argmax indices and pre-pool sizes that SegNet / DeconvNet decoders feed to
:func:`pixelwise.layers.max_unpool`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.backbones.features import FeatureInfo
from pixelwise.weights import load_matching, read_weights

__all__ = ["VGG", "VGGFeatures", "features_info", "forward_stages", "make_features", "vgg16", "vgg16_bn"]

URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg16_bn": "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
}

# configuration "D": conv widths, "M" = 2x2 max pool
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


class VGGFeatures(NamedTuple):
    """What :meth:`VGG.forward_features` returns for an input ``Tensor[N, 3, H, W]``.

    ``stages[i]``: output of pool ``i+1``, ``Tensor[N, C_i, H_i, W_i]`` with ``H_i =
    floor(H_{i-1} / 2)``, ``H_{-1} = H`` (channels and strides in ``VGG.feature_info``);
    ``indices[i]``: its argmax indices (same shape, int64), empty list unless requested;
    ``sizes[i]``: the pre-pool ``(H_{i-1}, W_{i-1})``, the ``output_size`` for unpooling.
    """

    stages: list[Tensor]
    indices: list[Tensor]
    sizes: list[torch.Size]


def make_features(cfg: tuple[int | str, ...], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU(inplace=True))
        in_ch = int(v)
    return nn.Sequential(*layers)


def features_info(features: nn.Sequential) -> tuple[FeatureInfo, ...]:
    """The encoder contract of a conv/pool stack: one :class:`FeatureInfo` per max pool."""
    infos, channels, stride = [], 3, 1
    for m in features:
        if isinstance(m, nn.Conv2d):
            channels = m.out_channels
        elif isinstance(m, nn.MaxPool2d):
            stride *= 2
            infos.append(FeatureInfo(f"pool{len(infos) + 1}", channels, stride))
    return tuple(infos)


def forward_stages(features: nn.Sequential, x: Tensor, return_indices: bool = False) -> VGGFeatures:
    """Run a VGG ``features`` stack, keeping each pool's output (and, on request, its argmax
    indices); ``Tensor[N, 3, H, W] ->`` :class:`VGGFeatures`. Models that hold only the
    ``features`` stack (FCN, SegNet) use this directly."""
    stages, indices, sizes = [], [], []
    for m in features:
        if isinstance(m, nn.MaxPool2d):
            sizes.append(x.shape[-2:])
            if return_indices:
                x, idx = F.max_pool2d(x, kernel_size=2, stride=2, return_indices=True)
                indices.append(idx)
            else:
                x = m(x)
            stages.append(x)
        else:
            x = m(x)
    return VGGFeatures(stages, indices, sizes)


class VGG(nn.Module):
    """``Tensor[N, 3, H, W] -> Tensor[N, num_classes]`` logits (any H, W >= 32)."""

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        self.feature_info: tuple[FeatureInfo, ...] = features_info(features)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor, return_indices: bool = False) -> VGGFeatures:
        """Run ``features`` stage by stage; see :class:`VGGFeatures` for the shapes."""
        return forward_stages(self.features, x, return_indices)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(name: str, batch_norm: bool, num_classes: int, pretrained: str | None) -> VGG:
    model = VGG(make_features(VGG16_CFG, batch_norm), num_classes=num_classes)
    if pretrained is not None:
        load_matching(model, read_weights(pretrained, {"imagenet": URLS[name]}), f"{name}(pretrained={pretrained!r})",
                      optional=("classifier.6.",))
    return model


def vgg16(num_classes: int = 1000, pretrained: str | None = None) -> VGG:
    """VGG-16 (configuration D). ``pretrained``: ``None``, ``"imagenet"`` (torchvision's
    ``vgg16-397923af.pth``) or a path; with ``num_classes != 1000`` the last layer stays random."""
    return _vgg("vgg16", False, num_classes, pretrained)


def vgg16_bn(num_classes: int = 1000, pretrained: str | None = None) -> VGG:
    """VGG-16 with BatchNorm after every conv (torchvision ``vgg16_bn-6c64b313.pth``)."""
    return _vgg("vgg16_bn", True, num_classes, pretrained)
