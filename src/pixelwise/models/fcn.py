"""Fully Convolutional Networks (Long, Shelhamer & Darrell, CVPR 2015).

Two families live here:

* ``fcn32s``, ``fcn16s``, ``fcn8s``: the paper's VGG-16 networks. fc6/fc7 become a 7x7 and a
  1x1 convolution (4096 channels, ReLU, dropout 0.5), ``score_fr`` a 1x1 class scorer, and
  coarse scores are upsampled by transposed convolutions initialised to bilinear kernels and
  fused with 1x1 scores of pool4 (16s) and pool3 (8s). Module names follow the reference
  Caffe nets (``fc6 fc7 score_fr score_pool4 score_pool3 upscore2 upscore_pool4 upscore8``);
  ``features`` holds torchvision's VGG-16 ``features`` keys.
* ``fcn_resnet50``, ``fcn_resnet101``: torchvision's FCN (dilated ResNet at stride 8 plus an
  ``FCNHead``), with its state-dict keys, so torchvision's checkpoints load unchanged.

Alignment of the VGG networks (how logits come out at the input size for any H, W)
----------------------------------------------------------------------------------
The Caffe nets pad conv1_1 by 100 pixels, run fc6 as a *valid* 7x7 conv, upsample without
padding and crop each fused map by hand-computed offsets (5 and 9 for the pool4/pool3 scores,
31 for FCN-8s' output, 19 for FCN-32s'). Here instead:

1. the input is zero-padded at the bottom/right to a multiple of 32, so pool_k has exactly
   ``H/2^k`` rows and stride-s cells tile the padded image;
2. every conv is "same" padded, fc6 included (padding 3), so pool3, pool4 and score_fr are
   stride 8/16/32 grids whose cell ``i`` is centred on input pixel ``s*i + (s-1)/2``;
3. each upsampling is a transposed conv with kernel ``2f``, stride ``f`` and padding ``f/2``
   (:class:`~pixelwise.layers.BilinearUpsample`), which maps that grid exactly onto the
   grid ``f`` times finer (output ``o`` reads input coordinate ``(o + 0.5)/f - 0.5``), so
   skip maps add without any crop offset;
4. the stride-1 logits are cropped back to ``H x W``.

The kernels and therefore the parameter count are the paper's (FCN-8s, 21 classes:
134,489,759 including the three upsampling kernels). Differences to Caffe: fc6 sees zeros
beyond the (padded) image border instead of 100 px of padding, which also cuts a 500x500
forward from 181.5 to 111.3 GMACs. As in the paper, the intermediate upsamplers (``upscore2``,
``upscore_pool4``) are learned and the final one is fixed bilinear; all score layers start at
zero (so FCN-8s initially predicts what its coarser parts predict).

Staged training (CVPR paper, Sec. 4.2): FCN-16s "is learned end-to-end, initialized with the
parameters of the last, coarser net ... The new parameters acting on pool4 are zero-initialized so
that the net starts with unmodified predictions", then FCN-8s from FCN-16s. ``pretrained=<a
pixelwise checkpoint of a coarser FCN-VGG>`` does that (:func:`load_coarser_fcn`): every layer the
two nets share is loaded, the new score layers keep their zero initialisation and the new
upsamplers their bilinear one, the coarser net's final upsampler is left out, and
``model.pretrained_note`` says in one line what was loaded and initialised (``pixelwise train``
prints it). The new net's prediction then equals the coarser one's up to the difference between
one bilinear upsampling and two in a row (x2 then x16 instead of x32): identical on the middle
half of every coarse cell, the corners of the bilinear surface cut near the coarse pixel centres,
as in the reference Caffe nets.

``at_once=True`` is the reference "at-once" FCN-8s (``voc-fcn8s-atonce/net.py`` of
shelhamer/fcn.berkeleyvision.org): pool4 and pool3 are multiplied by the fixed constants 0.01 and
0.0001 before their score layers ("scale pool4 skip for compatibility"), so that the skips, trained
together with everything else from ImageNet weights, start small against the stride-32 scores.
Same parameters and keys; only the forward pass changes.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from pixelwise.backbones.resnet import IntermediateLayerGetter, resnet50, resnet101
from pixelwise.backbones.vgg import URLS as VGG_URLS
from pixelwise.backbones.vgg import VGG16_CFG, features_info, forward_stages, make_features
from pixelwise.errors import UserError
from pixelwise.layers import BilinearUpsample
from pixelwise.models._checks import dropout_rate
from pixelwise.models._utils import SimpleSegmentationModel, crop_top_left, load_model_weights, pad_to_multiple
from pixelwise.models.registry import register_model
from pixelwise.weights import check_values, load_matching, read_weights, saved_model_kwargs

__all__ = ["FCN", "FCNHead", "FCNVGG", "fcn8s", "fcn16s", "fcn32s", "fcn_resnet50", "fcn_resnet101",
           "load_coarser_fcn", "score_conv", "vgg16_to_fcn"]

PAPER = "Long et al., CVPR 2015"
AT_ONCE_SCALES = {"pool4": 0.01, "pool3": 0.0001}  # voc-fcn8s-atonce's fixed Scale layers


# --------------------------------------------------------------------------- FCN on VGG-16


def score_conv(in_channels: int, num_classes: int) -> nn.Conv2d:
    """A 1x1 class scorer ``Tensor[N, in, h, w] -> Tensor[N, num_classes, h, w]``, zero-initialised
    as in the paper (so FCN-8s first predicts what its coarser parts predict)."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    for p in conv.parameters():
        nn.init.zeros_(p)
    return conv


class FCNVGG(nn.Module):
    """FCN-32s / 16s / 8s (``output_stride`` = coarsest skip kept: 32, 16 or 8).

    ``Tensor[N, 3, H, W] -> Tensor[N, num_classes, H, W]`` for any ``H, W`` (see the module
    docstring for the pad / align / crop scheme). ``at_once``: scale pool4 / pool3 by 0.01 /
    0.0001 before their score layers, as the reference at-once FCN-8s (refused at stride 32,
    which has no skips). ``dropout`` (after fc6 and fc7): in [0, 1).
    """

    pretrained_note: str | None = None  # set by the builder when it initialised from a coarser net

    def __init__(self, num_classes: int, output_stride: int = 8, dropout: float = 0.5, at_once: bool = False
                 ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        dropout = dropout_rate(dropout)
        if at_once and output_stride == 32:
            raise ValueError("at_once scales the pool4 and pool3 skips, and FCN-32s has none: use it with fcn16s "
                             "or fcn8s")
        self.output_stride = output_stride
        self.alignment = 32  # inputs are padded to multiples of the pool5 grid; read by tiled inference
        self.at_once = bool(at_once)
        self.skip_scale = dict(AT_ONCE_SCALES) if at_once else {"pool4": 1.0, "pool3": 1.0}
        self.features = make_features(VGG16_CFG, batch_norm=False)
        info = {f.name: f for f in features_info(self.features)}
        self.fc6 = nn.Conv2d(info["pool5"].channels, 4096, 7, padding=3)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)
        self.score_fr = score_conv(4096, num_classes)
        if output_stride == 32:
            self.upscore = BilinearUpsample(num_classes, 32, learnable=False)
        else:
            self.score_pool4 = score_conv(info["pool4"].channels, num_classes)
            self.upscore2 = BilinearUpsample(num_classes, 2)
        if output_stride == 16:
            self.upscore16 = BilinearUpsample(num_classes, 16, learnable=False)
        if output_stride == 8:
            self.score_pool3 = score_conv(info["pool3"].channels, num_classes)
            self.upscore_pool4 = BilinearUpsample(num_classes, 2)
            self.upscore8 = BilinearUpsample(num_classes, 8, learnable=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """He (fan-out) init for the VGG convs and fc6/fc7; the scorers are already zero."""
        for m in (*self.features, self.fc6, self.fc7):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pool3, pool4, pool5 = forward_stages(self.features, pad_to_multiple(x, 32)).stages[2:]
        h = self.drop(self.relu(self.fc6(pool5)))
        h = self.drop(self.relu(self.fc7(h)))
        score = self.score_fr(h)  # stride 32
        if self.output_stride == 32:
            return crop_top_left(self.upscore(score), height, width)
        score = self.upscore2(score) + self.score_pool4(pool4 * self.skip_scale["pool4"])  # stride 16
        if self.output_stride == 16:
            return crop_top_left(self.upscore16(score), height, width)
        score = self.upscore_pool4(score) + self.score_pool3(pool3 * self.skip_scale["pool3"])  # stride 8
        return crop_top_left(self.upscore8(score), height, width)


def vgg16_to_fcn(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision VGG-16 ImageNet weights -> the ``features``/``fc6``/``fc7`` part of an FCN
    state dict: ``classifier.0`` (4096 x 25088) becomes ``fc6`` (4096 x 512 x 7 x 7; torch's
    flatten order is C, H, W), ``classifier.3`` becomes ``fc7`` (4096 x 4096 x 1 x 1);
    ``classifier.6`` (the 1000-class scorer) is dropped."""
    out = {k: v for k, v in state.items() if k.startswith("features.")}
    out["fc6.weight"] = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
    out["fc6.bias"] = state["classifier.0.bias"]
    out["fc7.weight"] = state["classifier.3.weight"].reshape(4096, 4096, 1, 1)
    out["fc7.bias"] = state["classifier.3.bias"]
    return out


def _stride_of(state: dict[str, Tensor]) -> int:
    """The output stride of the FCN-VGG whose state dict this is (8, 16 or 32), from its keys."""
    return 8 if "score_pool3.weight" in state else 16 if "score_pool4.weight" in state else 32


def load_coarser_fcn(model: FCNVGG, state: dict[str, Tensor], source: str) -> str:
    """Initialise ``model`` from the state dict of a coarser (or equal) FCN-VGG, as the paper's
    staged training does; -> the one-line note of what was loaded and initialised.

    Every tensor the two nets share (same name; features, fc6, fc7, score_fr and, going from 16s
    to 8s, score_pool4 and the learned upscore2) is copied; shapes must match (same classes). The
    target's layers absent from ``state`` keep their initialisation: score layers zero, upsamplers
    bilinear. The source's final upsampler (``upscore`` of FCN-32s, ``upscore16`` of FCN-16s) is
    not used. A finer source (FCN-8s into FCN-16s) is a :class:`UserError`."""
    name, src = f"fcn{model.output_stride}s", _stride_of(state)
    where = f"{name}(pretrained={source!r})"
    if src < model.output_stride:
        raise UserError(f"{where}: the weights are of a finer fcn{src}s; staged training goes fcn32s -> fcn16s -> "
                        f"fcn8s, each initialised from the coarser one")
    own = model.state_dict()
    shared = {k: v for k, v in state.items() if k in own}
    for k, v in shared.items():
        if v.shape != own[k].shape:
            raise UserError(f"{where}: weight {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)} "
                            "(staged training keeps the classes: build it with the checkpoint's num_classes)")
    fresh = sorted({k.split(".")[0] for k in own if k not in state})
    unused = sorted({k.split(".")[0] for k in state if k not in own})
    if src == model.output_stride:
        load_matching(model, state, where)
        return f"{name}: loaded all {len(state)} tensors of the fcn{src}s weights {source}"
    check_values(shared, own, where)
    model.load_state_dict(shared, strict=False)
    how = {"score": "zero", "upscore": "bilinear"}
    init = ", ".join(f"{m} ({how['score' if m.startswith('score') else 'upscore']}"
                     f"{'' if getattr(model, m).weight.requires_grad else ', fixed'})" for m in fresh)
    return (f"{name}: loaded {len(shared)} tensors of the fcn{src}s weights {source}; initialised {init}"
            + (f"; not used: {', '.join(unused)}" if unused else ""))


def match_skip_scales(state: dict[str, Tensor], source_at_once: bool, model: FCNVGG) -> tuple[dict[str, Tensor], str]:
    """The weights of an FCN-VGG trained with ``at_once`` ``source_at_once`` for ``model``, whose own
    may differ: a skip scorer computes ``W (s x) + b``, so with the other scale ``s'`` its weights
    become ``W s / s'``, the same function (the at-once nets' pool4 x 0.01 and pool3 x 0.0001 came
    in 100x and 10,000x too strong in a plain FCN). -> (the state, a note of what was rescaled)."""
    if source_at_once == model.at_once:
        return state, ""
    state, done = dict(state), []
    for pool, scale in AT_ONCE_SCALES.items():
        key = f"score_{pool}.weight"
        if key in state:
            factor = scale if source_at_once else 1 / scale
            state[key] = state[key] * factor
            done.append(f"score_{pool} x {factor:g}")
    return state, (f"; rescaled {', '.join(done)} (the weights were trained with at_once={source_at_once}, this "
                   f"model has at_once={model.at_once}: the same function)" if done else "")


def _fcn_vgg(output_stride: int, num_classes: int, pretrained: str | None, dropout: float = 0.5,
             at_once: bool = False) -> FCNVGG:
    model = FCNVGG(num_classes, output_stride, dropout=dropout, at_once=at_once)
    if pretrained is None:
        return model
    state = read_weights(pretrained, {"imagenet": VGG_URLS["vgg16"]})
    if "classifier.0.weight" in state:  # ImageNet VGG-16 weights (downloaded or a local copy)
        load_matching(model, vgg16_to_fcn(state), f"fcn{output_stride}s(pretrained={pretrained!r})",
                      optional=("score", "upscore"))
    elif "score_fr.weight" in state:  # an FCN-VGG: the same net, or a coarser stage of the staged training
        state, rescaled = match_skip_scales(state, bool((saved_model_kwargs(pretrained) or {}).get("at_once")), model)
        model.pretrained_note = load_coarser_fcn(model, state, str(pretrained)) + rescaled
    else:
        load_model_weights(model, pretrained, f"fcn{output_stride}s")
    return model


# The builders state their options: the output stride is each one's own (not an option), and
# at_once belongs to the nets with skips to scale (FCN-32s has none, so it has no such option).


@register_model("fcn32s", paper=PAPER)
def fcn32s(num_classes: int, pretrained: str | None = None, dropout: float = 0.5) -> FCNVGG:
    """FCN-32s. ``pretrained``: ``"imagenet"`` (torchvision's VGG-16 into features/fc6/fc7), a
    local VGG-16 ``.pth`` (same conversion), or the weights of an FCN-VGG (a pixelwise checkpoint):
    the same net, or a coarser one for staged training (:func:`load_coarser_fcn`). ``dropout``:
    after fc6 and fc7, in [0, 1) (0.5). No ``at_once``: FCN-32s has no skips to scale."""
    return _fcn_vgg(32, num_classes, pretrained, dropout=dropout)


@register_model("fcn16s", paper=PAPER)
def fcn16s(num_classes: int, pretrained: str | None = None, dropout: float = 0.5, at_once: bool = False) -> FCNVGG:
    """FCN-16s (pool4 skip); ``pretrained`` and ``dropout`` as :func:`fcn32s`; ``at_once``: scale
    the pool4 skip by 0.01 (the at-once nets' fixed scale)."""
    return _fcn_vgg(16, num_classes, pretrained, dropout=dropout, at_once=at_once)


@register_model("fcn8s", paper=PAPER)
def fcn8s(num_classes: int, pretrained: str | None = None, dropout: float = 0.5, at_once: bool = False) -> FCNVGG:
    """FCN-8s (pool4 and pool3 skips); ``pretrained`` and ``dropout`` as :func:`fcn32s`;
    ``at_once``: the reference at-once FCN-8s (pool4 x 0.01, pool3 x 0.0001 before their scores)."""
    return _fcn_vgg(8, num_classes, pretrained, dropout=dropout, at_once=at_once)


# --------------------------------------------------------------------------- FCN on ResNet


class FCNHead(nn.Sequential):
    """3x3 conv to ``in/4`` channels, BN, ReLU, dropout 0.1, 1x1 conv to ``channels``:
    ``Tensor[N, in, h, w] -> Tensor[N, channels, h, w]``."""

    def __init__(self, in_channels: int, channels: int) -> None:
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, channels, 1),
        )


class FCN(SimpleSegmentationModel):
    """torchvision's FCN: a dilated ResNet (output stride 8), an :class:`FCNHead` on layer4 and
    optionally one on layer3, logits upsampled bilinearly to the input size."""


def _fcn_resnet(resnet, name: str, num_classes: int, pretrained: str | None, aux_loss: bool = False) -> FCN:
    backbone = resnet(pretrained="imagenet" if pretrained == "imagenet" else None,
                      replace_stride_with_dilation=[False, True, True])
    return_layers = {"layer4": "out", "layer3": "aux"} if aux_loss else {"layer4": "out"}
    body = IntermediateLayerGetter(backbone, return_layers)
    info = body.feature_info
    model = FCN(body, FCNHead(info["out"].channels, num_classes),
                FCNHead(info["aux"].channels, num_classes) if aux_loss else None)
    if pretrained not in (None, "imagenet"):
        load_model_weights(model, pretrained, name, tags=("imagenet",))
    return model


@register_model("fcn_resnet50", paper=PAPER)
def fcn_resnet50(num_classes: int, pretrained: str | None = None, aux_loss: bool = False) -> FCN:
    """torchvision's ``fcn_resnet50``. ``pretrained``: ``"imagenet"`` (ResNet-50 backbone) or a
    local whole-model file (e.g. torchvision's ``fcn_resnet50_coco-1167a1af.pth``)."""
    return _fcn_resnet(resnet50, "fcn_resnet50", num_classes, pretrained, aux_loss)


@register_model("fcn_resnet101", paper=PAPER)
def fcn_resnet101(num_classes: int, pretrained: str | None = None, aux_loss: bool = False) -> FCN:
    """torchvision's ``fcn_resnet101``; ``pretrained`` as :func:`fcn_resnet50`."""
    return _fcn_resnet(resnet101, "fcn_resnet101", num_classes, pretrained, aux_loss)
