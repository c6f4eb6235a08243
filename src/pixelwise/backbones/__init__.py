"""Backbones with torchvision's state-dict keys, and the encoder contract they publish.

Every backbone has ``feature_info``: a tuple of :class:`FeatureInfo` (stage name, output
channels, stride). Decoders size themselves from it, never from a backbone's name.
"""

from pixelwise.backbones.features import FeatureInfo
from pixelwise.backbones.resnet import (
    FrozenBatchNorm2d,
    IntermediateLayerGetter,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)
from pixelwise.backbones.vgg import VGG, VGGFeatures, vgg16, vgg16_bn

__all__ = [
    "VGG",
    "FeatureInfo",
    "FrozenBatchNorm2d",
    "IntermediateLayerGetter",
    "ResNet",
    "VGGFeatures",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vgg16",
    "vgg16_bn",
]
