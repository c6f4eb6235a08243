"""ResNet-18/34/50/101 (He et al., CVPR 2016) with torchvision's architecture and state-dict keys.

Bottleneck blocks put the stride on the 3x3 conv ("ResNet V1.5"), as torchvision does.
Dilation is a backbone option: ``replace_stride_with_dilation=[False, True, True]`` keeps
``layer3``/``layer4`` at stride 8 with dilation 2/4 (DeepLab, torchvision's FCN), ``[False,
False, True]`` gives output stride 16. As in torchvision, the first block of a dilated stage keeps
the previous stage's rate. ``multi_grid=(1, 2, 4)`` is DeepLabV3's Multi-Grid (Chen et al.,
arXiv:1706.05587, Sec. 3.2): the 3x3 convs of ``layer4``'s blocks get the stage's rate times
these unit rates, e.g. 2 x (1, 2, 4) = (2, 4, 8) at output stride 16, 4 x (1, 2, 4) at 8.

Encoder contract (``ResNet.feature_info``; strides for the default, undilated network)::

    name      relu  layer1  layer2  layer3  layer4
    chans       64   64*e   128*e   256*e   512*e      e = 1 (18, 34) or 4 (50, 101)
    stride       2      4       8      16      32

:class:`IntermediateLayerGetter` turns a ResNet into a feature extractor returning a dict of
named stage outputs; its state-dict keys are the ResNet's (minus ``fc``/``avgpool``).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from pixelwise.backbones.features import FeatureInfo
from pixelwise.weights import load_matching, read_weights

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "FrozenBatchNorm2d",
    "IntermediateLayerGetter",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
]

URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}

NormLayer = Callable[[int], nn.Module]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (torchvision semantics).

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` (no ``num_batches_tracked``;
    one in a loaded state dict is ignored), attribute ``eps``. ``Tensor[N, C, H, W] ->
    Tensor[N, C, H, W]``: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus identity; ``Tensor[N, in, H, W] -> Tensor[N, planes, H/s, W/s]``.

    ``dilation`` is the rate of ``conv2`` and ``first_dilation`` (default: the same) that of
    ``conv1``, which carries the stride: the first block of a dilated stage samples its input at
    the previous stage's rate and everything after it at the stage's own, so the dilated network
    computes the undilated one's outputs on a finer grid (torchvision refuses dilation here).
    """

    expansion = 1
    bn_follows_conv = True  # bn<k> normalises conv<k>'s output (fast paths fold the pairs)

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d, first_dilation: int | None = None
                 ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation if first_dilation is None else first_dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries stride and dilation), 1x1 expand x4, plus identity;
    ``Tensor[N, in, H, W] -> Tensor[N, 4*planes, H/s, W/s]``."""

    expansion = 4
    bn_follows_conv = True

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def unit_rates(multi_grid: object, blocks: int) -> tuple[int, ...]:
    """DeepLabV3's Multi-Grid: ``blocks`` whole numbers >= 1 (one per layer4 block) -> a tuple of
    ints, else ``ValueError``. Nothing is rounded or cast: 1.5 or True is refused, not read as 1."""
    rates = tuple(multi_grid) if isinstance(multi_grid, Sequence) and not isinstance(multi_grid, str | bytes) else None
    whole = rates is not None and all(isinstance(g, numbers.Real) and not isinstance(g, bool)
                                      and float(g).is_integer() and float(g) >= 1 for g in rates)
    if rates is None or len(rates) != blocks or not whole:
        raise ValueError(f"multi_grid needs {blocks} positive unit rates (whole numbers >= 1, one per layer4 "
                         f"block, e.g. [1, 2, 4]), got {multi_grid!r}")
    return tuple(int(g) for g in rates)


class ResNet(nn.Module):
    """``Tensor[N, 3, H, W] -> Tensor[N, num_classes]``; stages as in the module docstring."""

    bn_follows_conv = True  # the stem: bn1 after conv1

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        norm_layer: NormLayer | None = None,
        multi_grid: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if multi_grid is not None and block is BasicBlock:
            raise ValueError("multi_grid sets the rate of each layer4 block's one 3x3 conv: it is for "
                             "Bottleneck ResNets (50, 101)")
        self.multi_grid = None if multi_grid is None else unit_rates(multi_grid, layers[3])
        self._norm_layer = norm_layer or nn.BatchNorm2d
        dilate = list(replace_stride_with_dilation or (False, False, False))
        if len(dilate) != 3:
            raise ValueError(f"replace_stride_with_dilation needs 3 booleans, got {dilate}")
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate[2], unit_rates=self.multi_grid)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        e, strides, s = block.expansion, [], 4
        for d in dilate:
            s = s if d else 2 * s
            strides.append(s)
        self.feature_info: tuple[FeatureInfo, ...] = (
            FeatureInfo("relu", 64, 2),
            FeatureInfo("layer1", 64 * e, 4),
            FeatureInfo("layer2", 128 * e, strides[0]),
            FeatureInfo("layer3", 256 * e, strides[1]),
            FeatureInfo("layer4", 512 * e, strides[2]),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1, dilate: bool = False, unit_rates: Sequence[int] | None = None
                    ) -> nn.Sequential:
        """A stage of ``blocks`` blocks; the 3x3 conv of block ``i`` has dilation ``rate *
        unit_rates[i]`` (Multi-Grid) or, without unit rates, torchvision's: the previous stage's
        rate for the first block and the stage's rate for the others."""
        norm_layer, previous_dilation = self._norm_layer, self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        rates = ([previous_dilation] + [self.dilation] * (blocks - 1) if unit_rates is None
                 else [self.dilation * g for g in unit_rates])
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        if block is BasicBlock:  # two 3x3 convs: only the first block's first one keeps the previous rate
            layers: list[nn.Module] = [BasicBlock(self.inplanes, planes, stride, downsample, self.dilation,
                                                  norm_layer, first_dilation=previous_dilation)]
        else:
            layers = [block(self.inplanes, planes, stride, downsample, rates[0], norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=rates[i], norm_layer=norm_layer) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class IntermediateLayerGetter(nn.ModuleDict):
    """Wrap a model's children up to the last one named in ``return_layers`` and return their
    outputs: ``Tensor[N, 3, H, W] -> {return_layers[name]: Tensor}`` (an ``OrderedDict`` in
    execution order). Children are run in registration order, so this fits models whose
    ``forward`` is the plain sequence of their children (ResNet up to ``layer4``). Keys in the
    state dict are the wrapped model's (``conv1.weight``, ``layer4.2.bn3.running_var``...).
    ``feature_info`` (when the model has one) lists the returned stages under their new names.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        names = [n for n, _ in model.named_children()]
        if not set(return_layers).issubset(names):
            raise ValueError(f"return_layers {sorted(return_layers)} are not all children: {names}")
        wanted, layers = dict(return_layers), OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            wanted.pop(name, None)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)
        info = {f.name: f for f in getattr(model, "feature_info", ())}
        self.feature_info: dict[str, FeatureInfo] = {
            new: FeatureInfo(new, info[old].channels, info[old].stride)
            for old, new in return_layers.items() if old in info
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _resnet(name: str, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
            num_classes: int, pretrained: str | None, replace_stride_with_dilation: Sequence[bool] | None,
            norm_layer: NormLayer | None, multi_grid: Sequence[int] | None = None) -> ResNet:
    """A ResNet of ``block``s, ``layers`` per stage; ``name`` names its ImageNet weights
    (``URLS[name]``) and appears in error messages."""
    model = ResNet(block, layers, num_classes, replace_stride_with_dilation, norm_layer, multi_grid)
    if pretrained is not None:
        load_matching(model, read_weights(pretrained, {"imagenet": URLS[name]}), f"{name}(pretrained={pretrained!r})",
                      optional=("fc.",))
    return model


def resnet18(num_classes: int = 1000, pretrained: str | None = None,
             replace_stride_with_dilation: Sequence[bool] | None = None,
             norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-18. ``pretrained``: ``None``, ``"imagenet"`` (torchvision V1 weights) or a path;
    with ``num_classes != 1000`` the ``fc`` layer stays random. ``norm_layer``: e.g.
    :class:`FrozenBatchNorm2d` (default ``nn.BatchNorm2d``); ``replace_stride_with_dilation``: 3
    booleans for layer2..4 (torchvision refuses dilation for ResNet-18/34; here both 3x3 convs of
    a dilated stage's blocks take its rate, see :class:`BasicBlock`)."""
    return _resnet("resnet18", BasicBlock, (2, 2, 2, 2), num_classes, pretrained, replace_stride_with_dilation,
                   norm_layer)


def resnet34(num_classes: int = 1000, pretrained: str | None = None,
             replace_stride_with_dilation: Sequence[bool] | None = None,
             norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-34; arguments as :func:`resnet18`."""
    return _resnet("resnet34", BasicBlock, (3, 4, 6, 3), num_classes, pretrained, replace_stride_with_dilation,
                   norm_layer)


def resnet50(num_classes: int = 1000, pretrained: str | None = None,
             replace_stride_with_dilation: Sequence[bool] | None = None,
             norm_layer: NormLayer | None = None, multi_grid: Sequence[int] | None = None) -> ResNet:
    """ResNet-50 (torchvision ``resnet50-0676ba61.pth`` for ``"imagenet"``); arguments as
    :func:`resnet18`, plus ``multi_grid`` (3 unit rates for layer4's blocks, DeepLabV3's
    Multi-Grid; the weights are the same, so ImageNet weights load unchanged)."""
    return _resnet("resnet50", Bottleneck, (3, 4, 6, 3), num_classes, pretrained, replace_stride_with_dilation,
                   norm_layer, multi_grid)


def resnet101(num_classes: int = 1000, pretrained: str | None = None,
              replace_stride_with_dilation: Sequence[bool] | None = None,
              norm_layer: NormLayer | None = None, multi_grid: Sequence[int] | None = None) -> ResNet:
    """ResNet-101; arguments as :func:`resnet50`."""
    return _resnet("resnet101", Bottleneck, (3, 4, 23, 3), num_classes, pretrained, replace_stride_with_dilation,
                   norm_layer, multi_grid)
