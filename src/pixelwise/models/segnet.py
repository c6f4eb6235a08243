"""SegNet, SegNet-Basic (Badrinarayanan, Kendall & Cipolla, PAMI 2017) and Bayesian SegNet
(Kendall, Badrinarayanan & Cipolla, BMVC 2017).

An encoder of conv+BN+ReLU stages, each ending in a 2x2 max pool whose argmax indices are kept;
a decoder that mirrors it stage by stage: *upsample with the encoder's pooling indices* (values go
back to where their max came from, zeros elsewhere), then conv+BN(+ReLU); a classifier conv.

- ``segnet``: the 13-conv VGG16-BN encoder (keys ``features.*`` exactly as torchvision's
  ``vgg16_bn``, so ImageNet weights load unchanged); its decoder mirrors those 13 convs except the
  very last, which becomes the 3x3 classifier (Caffe ``conv1_1_D``, no BN). 29,449,355 parameters
  with 11 classes, as counted from the authors' ``segnet_train.prototxt``.
- ``segnet_basic``: LRN on the input, 4 x (7x7 conv 64 + BN + ReLU + pool) encoder, 4 x (unpool +
  7x7 conv 64 + BN, *no ReLU*) decoder, 1x1 classifier; 1,416,587 parameters with 11 classes.
- ``bayesian_segnet``: ``segnet`` plus dropout (p=0.5) after the three deepest encoder pools and
  at the end of the three deepest decoder stages ("central encoder-decoder",
  ``bayesian_segnet_train.prototxt``: ``encdrop3-5``, ``decdrop5-3``); Monte-Carlo dropout
  (:func:`pixelwise.inference.mc_dropout.mc_dropout`) samples it.

``decoder_upsample`` swaps index unpooling for unlearned alternatives (``"nearest"``, ``"zeros"``
= fixed top-left position, ``"bilinear"``) to reproduce the spirit of the paper's Table 1.

Any input size: the input is zero-padded at the bottom/right to a multiple of ``2**pools`` (32 for
VGG, 16 for SegNet-Basic) and the logits are cropped back. Zero is the ImageNet mean colour after
:func:`pixelwise.data.transforms.preprocess`; unlike reflect padding it also works for inputs
smaller than the pad.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.backbones.vgg import URLS, VGG16_CFG, make_features
from pixelwise.errors import UserError
from pixelwise.layers import max_unpool, upsample_nearest, upsample_zeros
from pixelwise.models._utils import pad_to_multiple
from pixelwise.models.registry import register_model
from pixelwise.weights import load_matching, read_weights

__all__ = [
    "UPSAMPLE_MODES",
    "DecoderStage",
    "SegNet",
    "bayesian_segnet",
    "conv_bn",
    "crop_top_left",
    "encode",
    "mirror_channels",
    "segnet",
    "segnet_basic",
    "unpool",
]

UPSAMPLE_MODES = ("indices", "nearest", "zeros", "bilinear")


# --------------------------------------------------------------------------- functions


def crop_top_left(x: Tensor, height: int, width: int) -> Tensor:
    """``Tensor[N, C, H', W'] -> Tensor[N, C, height, width]``, the top-left part (``height <= H'``).
    A negative ``F.pad`` rather than a slice, so that ``torch.export`` does not specialise the
    program on whether the input needed padding (with a slice it does)."""
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))


def unpool(x: Tensor, indices: Tensor, size: Sequence[int], mode: str = "indices") -> Tensor:
    """2x upsampling of ``Tensor[N, C, h, w]`` to ``Tensor[N, C, H, W]`` (``size = (H, W)``, the
    pre-pool size). ``"indices"``: max-unpooling with the encoder's argmax ``indices`` (same shape
    as ``x``); ``"nearest"``: copy into each 2x2 cell; ``"zeros"``: top-left of each cell, zeros
    elsewhere; ``"bilinear"``: bilinear interpolation (``align_corners=False``). Only ``"indices"``
    reads ``indices``."""
    if mode == "indices":
        if torch.jit.is_tracing():  # F.max_unpool2d's Python-side size check fails under jit.trace
            return torch.ops.aten.max_unpool2d(x, indices, list(size[-2:]))
        return max_unpool(x, indices, size)
    if mode == "nearest":
        return upsample_nearest(x, 2, tuple(size))
    if mode == "zeros":
        return upsample_zeros(x, 2, tuple(size))
    if mode == "bilinear":
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    raise ValueError(f"unknown upsampling {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")


def encode(features: nn.Sequential, x: Tensor, dropout: Sequence[nn.Module] = ()
           ) -> tuple[Tensor, list[Tensor], list[torch.Size]]:
    """Run a VGG-style ``features`` stack, recording what the decoder needs at each max pool.

    ``x``: ``Tensor[N, 3, H, W]``. Returns the deepest output ``Tensor[N, C, H/2^P, W/2^P]`` (P
    pools), and per pool (shallowest first) the argmax ``indices`` (int64, shape of the pooled
    output) and the pre-pool ``(H_i, W_i)``. ``dropout[i]``, if given, is applied after pool ``i``.
    """
    indices: list[Tensor] = []
    sizes: list[torch.Size] = []
    for m in features:
        if isinstance(m, nn.MaxPool2d):
            sizes.append(x.shape[-2:])
            x, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                  return_indices=True)
            indices.append(idx)
            if dropout:
                x = dropout[len(indices) - 1](x)
        else:
            x = m(x)
    return x, indices, sizes


def mirror_channels(features: nn.Sequential) -> list[list[tuple[int, int, int]]]:
    """The decoder layout that mirrors an encoder, as data: per decoder stage (deepest first) a
    list of ``(in_channels, out_channels, kernel_size)``, i.e. the encoder's convs in reverse order
    with in/out swapped. The conv that would map back to the image channels (the mirror of the
    first encoder conv) is left out: each model ends with its own classifier."""
    stages: list[list[tuple[int, int, int]]] = []
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


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, relu: bool = True,
            transposed: bool = False, padding: int | None = None) -> nn.Sequential:
    """``Conv2d`` (or ``ConvTranspose2d``) with bias -> ``BatchNorm2d`` [-> ``ReLU``], keys ``0.*``,
    ``1.*``. Default padding ``k // 2`` keeps ``H, W`` (bias kept as in the Caffe models, whose
    parameter counts include it)."""
    pad = kernel_size // 2 if padding is None else padding
    conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = [conv_cls(in_channels, out_channels, kernel_size, padding=pad),
                               nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- modules


class DecoderStage(nn.Module):
    """``Tensor[N, C_in, h, w]`` -> :func:`unpool` (``mode``) to the pre-pool size -> ``blocks``."""

    def __init__(self, blocks: nn.Sequential, mode: str = "indices") -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsampling {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")
        self.mode = mode
        self.blocks = blocks

    def forward(self, x: Tensor, indices: Tensor, size: Sequence[int]) -> Tensor:
        return self.blocks(unpool(x, indices, size, self.mode))


class SegNet(nn.Module):
    """``Tensor[N, 3, H, W]`` -> ``Tensor[N, num_classes, H, W]`` logits, any ``H, W``.

    ``features``: encoder (``nn.Sequential`` with P ``MaxPool2d``); ``decoder``: P stages, deepest
    first; ``classifier``: the last conv. ``dropout > 0`` puts ``nn.Dropout(dropout)`` after the
    ``dropout_stages`` deepest pools and after the first ``dropout_stages`` decoder stages
    (Bayesian SegNet); it stays active only in train mode or under Monte-Carlo dropout
    (:mod:`pixelwise.inference.mc_dropout`).
    """

    def __init__(self, features: nn.Sequential, decoder: Sequence[DecoderStage], classifier: nn.Module,
                 dropout: float = 0.0, dropout_stages: int = 0) -> None:
        super().__init__()
        pools = sum(isinstance(m, nn.MaxPool2d) for m in features)
        if len(decoder) != pools:
            raise ValueError(f"decoder has {len(decoder)} stages for an encoder with {pools} pools")
        if not 0 <= dropout_stages <= pools:
            raise ValueError(f"dropout_stages must be in [0, {pools}], got {dropout_stages}")
        self.features = features
        self.decoder = nn.ModuleList(decoder)
        self.classifier = classifier
        self.size_divisor = 2**pools

        def drop(on: bool) -> nn.Module:
            return nn.Dropout(dropout) if on and dropout > 0 else nn.Identity()

        self.encoder_dropout = nn.ModuleList(drop(i >= pools - dropout_stages) for i in range(pools))
        self.decoder_dropout = nn.ModuleList(drop(i < dropout_stages) for i in range(pools))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.size_divisor)
        x, indices, sizes = encode(self.features, x, self.encoder_dropout)
        for stage, drop, idx, size in zip(self.decoder, self.decoder_dropout, indices[::-1], sizes[::-1]):
            x = drop(stage(x, idx, size))
        return crop_top_left(self.classifier(x), h, w)


# --------------------------------------------------------------------------- builders


def init_weights(module: nn.Module) -> None:
    """He (Caffe "msra", fan-in) normal init for every conv, zero bias; BatchNorm to (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def load_vgg_features(features: nn.Sequential, pretrained: str, name: str = "vgg16_bn") -> dict[str, Tensor]:
    """Load torchvision-format VGG weights (``"imagenet"`` -> download, or a local path) into
    ``features`` from the ``features.*`` keys; returns the whole state dict for callers that also
    want ``classifier.*`` (DeconvNet's fc6/fc7)."""
    state = read_weights(pretrained, {"imagenet": URLS[name]})
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    load_matching(features, feats, f"{name}(pretrained={pretrained!r}) features")
    return state


def decoder_stages(layout: list[list[tuple[int, int, int]]], mode: str, relu: bool = True,
                   transposed: bool = False) -> list[DecoderStage]:
    """One :class:`DecoderStage` of :func:`conv_bn` blocks per entry of :func:`mirror_channels`."""
    return [DecoderStage(nn.Sequential(*(conv_bn(i, o, k, relu, transposed) for i, o, k in stage)), mode)
            for stage in layout]


def _vgg_segnet(num_classes: int, pretrained: str | None, decoder_upsample: str, dropout: float) -> SegNet:
    features = make_features(VGG16_CFG, batch_norm=True)
    layout = mirror_channels(features)
    last = layout[-1][-1][1]  # 64: channels entering the classifier
    classifier = nn.Conv2d(last, num_classes, 3, padding=1)
    model = SegNet(features, decoder_stages(layout, decoder_upsample), classifier,
                   dropout=dropout, dropout_stages=3 if dropout else 0)
    init_weights(model)
    if pretrained is not None:
        load_vgg_features(model.features, pretrained)
    return model


@register_model("segnet", paper="Badrinarayanan et al., PAMI 2017")
def segnet(num_classes: int, pretrained: str | None = None, decoder_upsample: str = "indices") -> SegNet:
    """SegNet with the VGG16-BN encoder. ``pretrained``: ``None``, ``"imagenet"`` (torchvision's
    ``vgg16_bn`` weights into the encoder) or a path to such a torchvision-format VGG16-BN state
    dict. ``decoder_upsample``: one of :data:`UPSAMPLE_MODES`."""
    return _vgg_segnet(num_classes, pretrained, decoder_upsample, dropout=0.0)


@register_model("bayesian_segnet", paper="Kendall et al., BMVC 2017")
def bayesian_segnet(num_classes: int, pretrained: str | None = None, decoder_upsample: str = "indices",
                    dropout: float = 0.5) -> SegNet:
    """Bayesian SegNet: :func:`segnet` with ``dropout`` after pools 3-5 and decoder stages 5-3.
    Sample it with ``pixelwise predict --mc-samples N`` (:mod:`pixelwise.inference.mc_dropout`); a plain
    eval-mode forward is the deterministic
    "weight averaging" prediction."""
    if not 0 < dropout < 1:
        raise ValueError(f"dropout must be in (0, 1), got {dropout}")
    return _vgg_segnet(num_classes, pretrained, decoder_upsample, dropout=dropout)


@register_model("segnet_basic", paper="Badrinarayanan et al., PAMI 2017")
def segnet_basic(num_classes: int, pretrained: str | None = None, decoder_upsample: str = "indices",
                 lrn: bool = True) -> SegNet:
    """SegNet-Basic (``segnet_basic_train.prototxt``): ``LocalResponseNorm(5, 1e-4, 0.75)`` on the
    input (``lrn=False`` drops it), 4 x (7x7 conv 64, BN, ReLU, 2x2 max pool), 4 x (unpool, 7x7
    conv 64, BN) without ReLU, 1x1 classifier. No pretrained weights exist (trained from scratch)."""
    if pretrained is not None:
        raise UserError(f"segnet_basic has no pretrained weights (got pretrained={pretrained!r}); "
                        "train it from scratch with pretrained=None")
    layers: list[nn.Module] = [nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)] if lrn else []
    in_ch = 3
    for _ in range(4):
        layers += [*conv_bn(in_ch, 64, 7), nn.MaxPool2d(2, 2)]
        in_ch = 64
    features = nn.Sequential(*layers)
    layout = mirror_channels(features)
    layout[-1].append((64, 64, 7))  # conv_decode1 keeps 64 channels; the 1x1 classifier follows
    decoder = decoder_stages(layout, decoder_upsample, relu=False)
    model = SegNet(features, decoder, nn.Conv2d(64, num_classes, 1))
    init_weights(model)
    return model
