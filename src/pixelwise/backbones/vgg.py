"""VGG-16 (Simonyan & Zisserman, ICLR 2015) with torchvision's module names and state-dict keys,
and the index-carrying encoder that FCN, SegNet, Bayesian SegNet and DeconvNet share.

``VGG.features`` is the 13-conv stack (with BatchNorm after every conv in ``vgg16_bn``),
``avgpool`` an ``AdaptiveAvgPool2d(7)`` and ``classifier`` the three fully connected layers
(``classifier.0``, ``.3``, ``.6``), so torchvision's published checkpoints load unchanged.

The encoder contract
--------------------
An encoder is a ``features`` stack: an ``nn.Sequential`` of convs (with BN / ReLU or any other
module) in which every ``MaxPool2d`` ends a stage. What a decoder may rely on is data, computed
from the stack itself, never from a name:

- :func:`features_info` ``(features)``: one :class:`FeatureInfo` ``(name, channels, stride)``
  per max pool (``pool1``, ``pool2``, ...): the channels of the last conv before the pool and
  the product of the pool strides so far. For VGG-16 (``VGG.feature_info``)::

      name   pool1  pool2  pool3  pool4  pool5
      chans     64    128    256    512    512
      stride     2      4      8     16     32

- :func:`forward_stages` ``(features, x, return_indices, hooks)``: runs the stack once and
  returns :class:`VGGFeatures` ``(stages, indices, sizes)``: every stage output, on request the
  argmax indices of each pool (each pool with its own kernel, stride, padding, dilation and
  ``ceil_mode``) and the pre-pool sizes, which is what unpooling decoders need
  (:func:`pixelwise.layers.unpool`). ``hooks[i]`` (e.g. Bayesian SegNet's dropout) is applied
  to the output of pool ``i + 1`` before the next stage sees it.
- :func:`mirror_channels` ``(features)``: the decoder layout that mirrors the encoder, as data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.backbones.features import FeatureInfo
from pixelwise.errors import UserError
from pixelwise.weights import load_matching, read_weights

__all__ = [
    "URLS",
    "VGG",
    "VGG16_CFG",
    "VGGFeatures",
    "features_info",
    "forward_stages",
    "load_features",
    "make_features",
    "mirror_channels",
    "vgg16",
    "vgg16_bn",
]

URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg16_bn": "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
}

# configuration "D": conv widths, "M" = 2x2 max pool
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")

# A decoder layout: per stage, deepest first, the ``(in_channels, out_channels, kernel_size)`` of its convs.
Layout = list[list[tuple[int, int, int]]]


# --------------------------------------------------------------------------- the encoder


class VGGFeatures(NamedTuple):
    """What :func:`forward_stages` returns for an input ``Tensor[N, C, H, W]``, shallowest first.

    ``stages[i]``: output of pool ``i+1`` (after ``hooks[i]`` when given), ``Tensor[N, C_i, H_i,
    W_i]`` with ``C_i, stride_i`` as in :func:`features_info` (``H_i = floor(H_{i-1} / 2)``,
    ``H_{-1} = H`` for 2x2 pools); ``indices[i]``: its argmax indices (int64, same shape, flat
    positions within each pre-pool ``H_{i-1} * W_{i-1}`` plane), an empty list unless requested;
    ``sizes[i]``: the pre-pool ``(H_{i-1}, W_{i-1})``, the ``output_size`` for unpooling.
    """

    stages: list[Tensor]
    indices: list[Tensor]
    sizes: list[torch.Size]


def make_features(cfg: tuple[int | str, ...], batch_norm: bool) -> nn.Sequential:
    """A VGG ``features`` stack from a config: an int is a 3x3 conv (padding 1) of that width
    (+ BN) + ReLU, ``"M"`` a 2x2 max pool. Keys ``N.weight`` as torchvision's ``features.N``."""
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


def _first(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


def features_info(features: nn.Sequential, in_channels: int = 3) -> tuple[FeatureInfo, ...]:
    """The encoder contract of a conv/pool stack: one :class:`FeatureInfo` per max pool, with
    the output channels of the last conv before it (``in_channels`` if none) and the product of
    the pool strides so far."""
    infos: list[FeatureInfo] = []
    channels, stride = in_channels, 1
    for m in features:
        if isinstance(m, nn.Conv2d):
            channels = m.out_channels
        elif isinstance(m, nn.MaxPool2d):
            stride *= _first(m.stride)
            infos.append(FeatureInfo(f"pool{len(infos) + 1}", channels, stride))
    return tuple(infos)


def forward_stages(features: nn.Sequential, x: Tensor, return_indices: bool = False,
                   hooks: Iterable[Callable[[Tensor], Tensor]] = ()) -> VGGFeatures:
    """Run a ``features`` stack once, keeping every stage output and, with ``return_indices``,
    each max pool's argmax indices; ``Tensor[N, C, H, W] ->`` :class:`VGGFeatures`.

    Each pool runs with its own kernel, stride, padding, dilation and ``ceil_mode``.
    ``hooks``: empty, or one callable per pool (``nn.Identity`` where nothing should happen),
    applied to that pool's output before the next stage; Bayesian SegNet passes its dropout.
    """
    hook_list = list(hooks)
    if hook_list:
        pools = sum(isinstance(m, nn.MaxPool2d) for m in features)
        if len(hook_list) != pools:
            raise ValueError(f"got {len(hook_list)} hooks for an encoder with {pools} pools")
    stages: list[Tensor] = []
    indices: list[Tensor] = []
    sizes: list[torch.Size] = []
    for m in features:
        if not isinstance(m, nn.MaxPool2d):
            x = m(x)
            continue
        sizes.append(x.shape[-2:])
        if return_indices:
            x, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                                  return_indices=True)
            indices.append(idx)
        else:
            x = m(x)
        if hook_list:
            x = hook_list[len(stages)](x)
        stages.append(x)
    return VGGFeatures(stages, indices, sizes)


def mirror_channels(features: nn.Sequential) -> Layout:
    """The decoder layout that mirrors an encoder, as data: per decoder stage (deepest first) a
    list of ``(in_channels, out_channels, kernel_size)``, i.e. the encoder's convs in reverse order
    with in/out swapped. The conv that would map back to the image channels (the mirror of the
    first encoder conv) is left out: each model ends with its own classifier."""
    stages: Layout = []
    current: list[tuple[int, int, int]] = []
    for m in features:
        if isinstance(m, nn.Conv2d):
            current.append((m.out_channels, m.in_channels, m.kernel_size[0]))
        elif isinstance(m, nn.MaxPool2d):
            stages.append(current[::-1])
            current = []
    if current or not stages:
        raise ValueError("features must end with a max pool and contain at least one")
    stages = stages[::-1]
    stages[-1] = stages[-1][:-1]
    return stages


def load_features(features: nn.Sequential, pretrained: str, name: str = "vgg16_bn",
                  state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Load torchvision-format VGG weights (``"imagenet"`` downloads ``URLS[name]``, or a local
    path) into a ``features`` stack from their ``features.*`` keys (strict: a file of another
    architecture raises ``UserError``). Returns the whole state dict, for callers that also want
    ``classifier.*`` (DeconvNet's fc6/fc7). ``state``: the file's contents where the caller has read
    them already."""
    state = read_weights(pretrained, {"imagenet": URLS[name]}) if state is None else state
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    with_bn = any(isinstance(m, nn.BatchNorm2d) for m in features)
    if feats and with_bn != any(k.endswith("running_mean") for k in feats):  # the other VGG-16 of torchvision
        has, needs = ("VGG-16 with BatchNorm", "without") if not with_bn else ("VGG-16 without BatchNorm", "with")
        raise UserError(f"{name}(pretrained={pretrained!r}): the file holds {has}, and this model's encoder is "
                        f"VGG-16 {needs} BatchNorm: give {Path(URLS[name]).name} (torchvision's {name})")
    load_matching(features, feats, f"{name}(pretrained={pretrained!r}) features")
    return state


# --------------------------------------------------------------------------- the classifier network


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
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor, return_indices: bool = False,
                         hooks: Iterable[Callable[[Tensor], Tensor]] = ()) -> VGGFeatures:
        """:func:`forward_stages` on ``features``; see :class:`VGGFeatures` for the shapes."""
        return forward_stages(self.features, x, return_indices, hooks)

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
