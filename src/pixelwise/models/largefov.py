"""DeepLab-LargeFOV, the first DeepLab (Chen, Papandreou, Kokkinos, Murphy & Yuille, "Semantic
Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015,
arXiv:1412.7062), the model SegNet's paper compares with on CamVid and SUN RGB-D.

The network (the paper's Sec. 3 and its released ``DeepLab-LargeFOV`` net)
--------------------------------------------------------------------------
VGG-16's 13 convolutions with torchvision's ``features.N`` keys, changed in three ways so that the
scores come out at stride 8 instead of 32 ("hole" / atrous algorithm):

- every max pool is 3x3 with padding 1 and Caffe's ceil rounding; pools 1-3 keep stride 2, pools
  4 and 5 have stride 1;
- the three conv5 layers are dilated by 2 (the stride that pool4 gave up);
- fc6 is a 3x3 convolution dilated by 12 with 1,024 channels (the "large field of view": 224
  pixels of input at stride 8 with 3x3 taps), fc7 a 1x1 convolution of 1,024 channels, each with
  ReLU and dropout 0.5, and ``fc8`` the 1x1 class scorer (Gaussian init, std 0.01).

21 classes: 20,505,429 parameters, the paper's "20.5M" (its Table 2); at 4 bytes each 82 MB,
SegNet's Table 6 lists the model file at 83 MB.

Alignment (how the stride-8 scores become logits at the input size, for any H, W)
-----------------------------------------------------------------------------------
With 3x3 windows, padding 1 and ceil rounding, cell ``i`` of each stride-2 pool is centred on
pixel ``2i`` of its input, and the last cell reaches the last row; so score cell ``i`` is centred
on input pixel ``8i`` and a map of ``h`` rows covers pixels ``0 .. 8(h - 1) >= H - 1``. The
scores are upsampled bilinearly with ``align_corners=True`` to ``8(h - 1) + 1`` rows, which puts
each cell exactly on its pixel (the released net's ``Interp`` layer, zoom 8, on its 321 / 513
crops), and cropped to ``H x W``. No padding of the input is needed.

Pretrained weights
------------------
``pretrained="imagenet"`` loads torchvision's VGG-16 (``vgg16_bn`` with ``batch_norm=True``)
into the convolutions and, as the paper does (Sec. 3.1: "subsampling (by decimation)"), fc6 and
fc7 from VGG's fully connected layers: fc6's 7x7 taps decimated to 3x3 (rows and columns 0, 3,
6) and both layers' 4,096 channels to 1,024 (every fourth). ``fc8`` starts fresh.

Differences from the paper: training losses are computed on the logits at the input size (the
paper subsamples the ground truth by 8 instead); ``batch_norm=True`` adds BatchNorm after every
convolution, fc6 and fc7 included, as SegNet's paper did for its comparison ("BN added to all
models", its Table 3); the fully connected CRF that gives DeepLab its name is not part of the
model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.backbones.vgg import VGG16_CFG, features_info, load_features, make_features
from pixelwise.models._checks import dropout_rate
from pixelwise.models._utils import crop_top_left, holds_whole_model, init_msra, load_model_weights, local_weights
from pixelwise.models.registry import register_model
from pixelwise.weights import load_matching

__all__ = ["DeepLabLargeFOV", "deeplab_largefov", "largefov_features", "vgg16_to_largefov"]

PAPER = "Chen et al., ICLR 2015"
STRIDE = 8  # the output stride
FC_CHANNELS = 1024
FC6_DILATION = 12


def largefov_features(batch_norm: bool = False) -> nn.Sequential:
    """VGG-16's ``features`` (same modules, same keys) made stride 8: every pool 3x3, padding 1,
    ceil rounding, stride 2 for pools 1-3 and 1 for pools 4-5; the conv5 layers dilated by 2."""
    features = make_features(VGG16_CFG, batch_norm)
    pools = 0
    for i, m in enumerate(features):
        if isinstance(m, nn.MaxPool2d):
            pools += 1
            features[i] = nn.MaxPool2d(3, stride=2 if pools <= 3 else 1, padding=1, ceil_mode=True)
        elif isinstance(m, nn.Conv2d) and pools == 4:  # conv5_1..3
            m.dilation, m.padding = (2, 2), (2, 2)
    return features


class DeepLabLargeFOV(nn.Module):
    """DeepLab-LargeFOV: ``Tensor[N, 3, H, W] -> Tensor[N, num_classes, H, W]`` for any ``H, W``
    (see the module docstring). ``dropout``: after fc6 and fc7, in [0, 1) (0.5); ``batch_norm``:
    BatchNorm after every convolution but the scorer (SegNet's comparison)."""

    pretrained_note: str | None = None  # set by the builder when it loaded only part of the weights

    def __init__(self, num_classes: int, dropout: float = 0.5, batch_norm: bool = False) -> None:
        super().__init__()
        dropout = dropout_rate(dropout)
        self.batch_norm = bool(batch_norm)
        self.alignment = STRIDE  # tiles placed on multiples of 8 see the same score grid; read by tiled inference
        self.features = largefov_features(self.batch_norm)
        channels = features_info(self.features)[-1].channels
        self.fc6 = nn.Conv2d(channels, FC_CHANNELS, 3, padding=FC6_DILATION, dilation=FC6_DILATION)
        self.fc7 = nn.Conv2d(FC_CHANNELS, FC_CHANNELS, 1)
        self.bn6: nn.Module = nn.BatchNorm2d(FC_CHANNELS) if self.batch_norm else nn.Identity()
        self.bn7: nn.Module = nn.BatchNorm2d(FC_CHANNELS) if self.batch_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)
        self.fc8 = nn.Conv2d(FC_CHANNELS, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """He (fan-out) init for the VGG convs, fc6 and fc7 (as FCN's, for training from scratch);
        ``fc8`` Gaussian with std 0.01 and zero bias, the released net's filler."""
        init_msra(self, mode="fan_out")
        nn.init.normal_(self.fc8.weight, 0.0, 0.01)

    def scores(self, x: Tensor) -> Tensor:
        """The stride-8 class scores ``Tensor[N, C, h, w]``, ``h = ceil((ceil((ceil((H + 1) / 2) +
        1) / 2) + 1) / 2)`` (cell ``i`` centred on input pixel ``8i``), before upsampling."""
        h = self.drop(self.relu(self.bn6(self.fc6(self.features(x)))))
        h = self.drop(self.relu(self.bn7(self.fc7(h))))
        return self.fc8(h)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        score = self.scores(x)
        size = ((score.shape[-2] - 1) * STRIDE + 1, (score.shape[-1] - 1) * STRIDE + 1)
        up = F.interpolate(score, size=size, mode="bilinear", align_corners=True)
        return crop_top_left(up, height, width)


def vgg16_to_largefov(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision VGG-16 (or VGG-16-BN) ImageNet weights -> the ``features``, ``fc6`` and ``fc7``
    of a :class:`DeepLabLargeFOV` state dict, fc6/fc7 by decimation: ``classifier.0`` (4096 x 25088,
    i.e. 4096 x 512 x 7 x 7) keeps taps 0, 3, 6 of each spatial axis and every fourth output, so
    fc6 is 1024 x 512 x 3 x 3; ``classifier.3`` keeps every fourth output and input (1024 x 1024
    x 1 x 1). ``classifier.6`` (the ImageNet scorer) is dropped."""
    taps = torch.tensor([0, 3, 6])
    keep = slice(None, None, 4096 // FC_CHANNELS)
    fc6 = state["classifier.0.weight"].reshape(4096, 512, 7, 7)[keep][:, :, taps][:, :, :, taps]
    out = {k: v for k, v in state.items() if k.startswith("features.")}
    out["fc6.weight"] = fc6.contiguous()
    out["fc6.bias"] = state["classifier.0.bias"][keep].contiguous()
    out["fc7.weight"] = state["classifier.3.weight"][keep, keep].reshape(FC_CHANNELS, FC_CHANNELS, 1, 1).contiguous()
    out["fc7.bias"] = state["classifier.3.bias"][keep].contiguous()
    return out


@register_model("deeplab_largefov", paper=PAPER)
def deeplab_largefov(num_classes: int, pretrained: str | None = None, dropout: float = 0.5,
                     batch_norm: bool = False) -> DeepLabLargeFOV:
    """DeepLab-LargeFOV (DeepLab v1). ``pretrained``: ``None``, ``"imagenet"`` (torchvision's
    ``vgg16``, or ``vgg16_bn`` with ``batch_norm``, into the convolutions, fc6 and fc7 by
    :func:`vgg16_to_largefov`), a local copy of that file (same conversion), or the weights of a
    DeepLab-LargeFOV (a run's checkpoint). ``dropout``: after fc6 and fc7, in [0, 1) (0.5).
    ``batch_norm``: BatchNorm after every convolution but ``fc8``."""
    model = DeepLabLargeFOV(num_classes, dropout=dropout, batch_norm=batch_norm)
    if pretrained is None:
        return model
    name = "vgg16_bn" if model.batch_norm else "vgg16"
    state = local_weights(pretrained)
    if holds_whole_model(model, state):  # e.g. a run's last.safetensors
        load_model_weights(model, pretrained, "deeplab_largefov", state=state)
        return model
    state = load_features(model.features, pretrained, name, state=state)  # refuses the other VGG-16 by name
    if "classifier.0.weight" in state:
        load_matching(model, vgg16_to_largefov(state), f"deeplab_largefov(pretrained={pretrained!r})",
                      optional=("fc8.", "bn6.", "bn7."))
    else:
        model.pretrained_note = (f"deeplab_largefov: loaded the convolutions of {pretrained}; fc6 and fc7 start "
                                 "fresh (the file has no fully connected layers to decimate)")
    return model
