"""The small shared base of the backbone + head models, and pad/crop helpers."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.weights import load_matching, read_weights


class SimpleSegmentationModel(nn.Module):
    """``backbone`` returns a dict of features; ``classifier`` maps ``features["out"]`` to
    logits, ``aux_classifier`` (optional) maps ``features["aux"]``; both are upsampled
    bilinearly (``align_corners=False``) to the input size.

    ``Tensor[N, 3, H, W] -> Tensor[N, C, H, W]``, or ``{"out": ..., "aux": ...}`` when the model
    has an auxiliary classifier. Subclasses with another head input override :meth:`head`.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None
                 ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"])

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = F.interpolate(self.head(features), size=size, mode="bilinear", align_corners=False)
        if self.aux_classifier is None:
            return out
        aux = F.interpolate(self.aux_classifier(features["aux"]), size=size, mode="bilinear",
                            align_corners=False)
        return {"out": out, "aux": aux}


def model_outputs(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """A semantic model's outputs as ``{"out": logits[, "aux": logits]}``, whether it returns a
    tensor or a dict."""
    out = model(images)
    return out if isinstance(out, dict) else {"out": out}


def forward_logits(model: nn.Module, images: Tensor) -> Tensor:
    """The main logits ``Tensor[N, C, H, W]`` of a semantic model (:func:`model_outputs` ``["out"]``)."""
    return model_outputs(model, images)["out"]


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad bottom and right: ``Tensor[N, C, H, W] -> Tensor[N, C, ceil(H/m)*m, ceil(W/m)*m]``."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple))


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Keep the top-left ``size``: ``Tensor[N, C, H', W'] -> Tensor[N, C, H, W]`` (``H <= H'``)."""
    return x[..., : size[0], : size[1]]


def load_model_weights(model: nn.Module, path: str, name: str) -> None:
    """Load a whole-model state dict from a local file into ``model`` (strict, torchvision keys).
    A checkpoint with an auxiliary classifier also loads into a model built without one."""
    state = read_weights(path)
    if getattr(model, "aux_classifier", None) is None:
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    load_matching(model, state, f"{name}(pretrained={path!r})")
