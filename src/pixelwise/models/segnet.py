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

Built from shared blocks: the encoder is a VGG-style ``features`` stack run by
:func:`pixelwise.backbones.vgg.forward_stages` (which keeps the pooling indices and applies the
dropout hooks), the decoder layout is :func:`~pixelwise.backbones.vgg.mirror_channels` of it, and
each decoder stage is a :class:`pixelwise.layers.DecoderStage` (unpool, then
:func:`~pixelwise.layers.conv_bn` blocks). ``decoder_upsample`` swaps index unpooling for
unlearned alternatives (``"nearest"``, ``"zeros"`` = fixed top-left position, ``"bilinear"``;
:data:`pixelwise.layers.UPSAMPLE_MODES`) to reproduce the spirit of the paper's Table 1.

Any input size: the input is zero-padded at the bottom/right to a multiple of the encoder's deepest
stride (32 for VGG, 16 for SegNet-Basic) and the logits are cropped back. Zero is the ImageNet mean colour after
:func:`pixelwise.preprocess.preprocess`; unlike reflect padding it also works for inputs
smaller than the pad.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from pixelwise.backbones.vgg import (
    VGG16_CFG,
    features_info,
    forward_stages,
    load_features,
    make_features,
    mirror_channels,
)
from pixelwise.layers import DecoderStage, conv_bn, decoder_stages
from pixelwise.models._checks import number_in
from pixelwise.models._utils import (
    crop_top_left,
    holds_whole_model,
    init_msra,
    load_model_weights,
    local_weights,
    pad_to_multiple,
)
from pixelwise.models.registry import register_model
from pixelwise.weights import load_matching, read_weights

__all__ = ["SegNet", "bayesian_segnet", "segnet", "segnet_basic"]


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
        info = features_info(features)
        pools = len(info)
        if len(decoder) != pools:
            raise ValueError(f"decoder has {len(decoder)} stages for an encoder with {pools} pools")
        if not 0 <= dropout_stages <= pools:
            raise ValueError(f"dropout_stages must be in [0, {pools}], got {dropout_stages}")
        self.features = features
        self.decoder = nn.ModuleList(decoder)
        self.classifier = classifier
        self.size_divisor = info[-1].stride
        self.alignment = self.size_divisor  # the pooling grid, read by tiled inference

        def drop(on: bool) -> nn.Module:
            return nn.Dropout(dropout) if on and dropout > 0 else nn.Identity()

        self.encoder_dropout = nn.ModuleList(drop(i >= pools - dropout_stages) for i in range(pools))
        self.decoder_dropout = nn.ModuleList(drop(i < dropout_stages) for i in range(pools))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        enc = forward_stages(self.features, pad_to_multiple(x, self.size_divisor), return_indices=True,
                             hooks=self.encoder_dropout)
        x = enc.stages[-1]
        for stage, drop, idx, size in zip(self.decoder, self.decoder_dropout, enc.indices[::-1], enc.sizes[::-1]):
            x = drop(stage(x, idx, size))
        return crop_top_left(self.classifier(x), h, w)


def _vgg_segnet(num_classes: int, pretrained: str | None, decoder_upsample: str, dropout: float) -> SegNet:
    features = make_features(VGG16_CFG, batch_norm=True)
    layout = mirror_channels(features)
    last = layout[-1][-1][1]  # 64: channels entering the classifier
    classifier = nn.Conv2d(last, num_classes, 3, padding=1)
    model = SegNet(features, decoder_stages(layout, decoder_upsample), classifier,
                   dropout=dropout, dropout_stages=3 if dropout else 0)
    init_msra(model)
    if pretrained is not None:
        state = local_weights(pretrained)
        if holds_whole_model(model, state):  # e.g. a run's last.safetensors
            load_model_weights(model, pretrained, "bayesian_segnet" if dropout else "segnet", state=state)
        else:
            load_features(model.features, pretrained, state=state)
    return model


@register_model("segnet", paper="Badrinarayanan et al., PAMI 2017")
def segnet(num_classes: int, pretrained: str | None = None, decoder_upsample: str = "indices") -> SegNet:
    """SegNet with the VGG16-BN encoder. ``pretrained``: ``None``, ``"imagenet"`` (torchvision's
    ``vgg16_bn`` weights into the encoder) or a path to such a torchvision-format VGG16-BN state
    dict. ``decoder_upsample``: one of :data:`pixelwise.layers.UPSAMPLE_MODES`."""
    return _vgg_segnet(num_classes, pretrained, decoder_upsample, dropout=0.0)


@register_model("bayesian_segnet", paper="Kendall et al., BMVC 2017")
def bayesian_segnet(num_classes: int, pretrained: str | None = None, decoder_upsample: str = "indices",
                    dropout: float = 0.5) -> SegNet:
    """Bayesian SegNet: :func:`segnet` with ``dropout`` after pools 3-5 and decoder stages 5-3.
    Sample it with ``pixelwise predict --mc-samples N`` (:func:`pixelwise.inference.mc_dropout.mc_dropout`);
    a plain eval-mode forward is the deterministic "weight averaging" prediction."""
    # the rule of every dropout option, [0, 1), less 0: a Bayesian SegNet without dropout has nothing to sample
    dropout = number_in("dropout", dropout, 0.0, 1.0, low_open=True, high_open=True)
    return _vgg_segnet(num_classes, pretrained, decoder_upsample, dropout=dropout)


@register_model("segnet_basic", paper="Badrinarayanan et al., PAMI 2017")
def segnet_basic(num_classes: int, pretrained: str | None = None, decoder_upsample: str = "indices",
                 lrn: bool = True) -> SegNet:
    """SegNet-Basic (``segnet_basic_train.prototxt``): ``LocalResponseNorm(5, 1e-4, 0.75)`` on the
    input (``lrn=False`` drops it), 4 x (7x7 conv 64, BN, ReLU, 2x2 max pool), 4 x (unpool, 7x7
    conv 64, BN) without ReLU, 1x1 classifier. No published weights exist (trained from scratch);
    ``pretrained``: a path to weights of a model of the same layout (a run's checkpoint, to
    fine-tune or resume from)."""
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
    init_msra(model)
    if pretrained:
        load_matching(model, read_weights(pretrained), f"segnet_basic(pretrained={pretrained!r})")
    return model
