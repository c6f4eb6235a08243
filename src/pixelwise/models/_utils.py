"""What the model files share: the small base of the backbone + head models, reading a model's
logits, pad/crop helpers for any input size, the msra initialisation and whole-model weights."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pixelwise.layers import standardize_image
from pixelwise.weights import backbone_file, load_matching, read_weights, weights_not_found


class SimpleSegmentationModel(nn.Module):
    """``backbone`` returns a dict of features; ``classifier`` maps ``features["out"]`` to
    logits, ``aux_classifier`` (optional) maps ``features["aux"]``; both are upsampled
    bilinearly (``align_corners=False``) to the input size.

    ``Tensor[N, 3, H, W] -> Tensor[N, C, H, W]``, or ``{"out": ..., "aux": ...}`` when the model
    has an auxiliary classifier. Subclasses with another head input override :meth:`head`.
    ``input_norm`` (off: torchvision's models) standardises each image per channel over its own
    pixels first, for training from scratch without a dataset's mean and std.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None,
                 input_norm: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.input_norm = input_norm
        info = getattr(backbone, "feature_info", {})
        self.alignment = info["out"].stride if "out" in info else 1  # the output stride, for tiled inference

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"])

    def _main(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The main logits at the input's size, and the backbone's features."""
        size = x.shape[-2:]
        if self.input_norm:  # each image's channels to mean 0, variance 1 over its own pixels
            x = standardize_image(x)
        features = self.backbone(x)
        return F.interpolate(self.head(features), size=size, mode="bilinear", align_corners=False), features

    def logits(self, x: Tensor) -> Tensor:
        """The main logits alone: the auxiliary head (a training loss) is not computed, where
        ``forward`` computes it as torchvision's models do (about 7% of an FCN-ResNet50's work)."""
        return self._main(x)[0]

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        out, features = self._main(x)
        size = x.shape[-2:]
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


@contextmanager
def kept_as_it_was(model: nn.Module) -> Iterator[None]:
    """Puts ``model`` back in its training mode and on its device when the block ends, whatever the
    block did to it (export and bench trace or time it in eval mode, on their own device)."""
    training = model.training
    held = next(iter(model.parameters()), None)
    device = held.device if held is not None else None  # now: .to() moves the same parameter objects
    try:
        yield
    finally:
        model.train(training)
        if device is not None:
            model.to(device)


def forward_logits(model: nn.Module, images: Tensor) -> Tensor:
    """The main logits ``Tensor[N, C, H, W]`` of a semantic model (:func:`model_outputs` ``["out"]``),
    without computing an auxiliary head where the model can leave it out
    (:meth:`SimpleSegmentationModel.logits`): inference, export and the FLOPs bench counts."""
    if isinstance(model, SimpleSegmentationModel):
        return model.logits(images)
    return model_outputs(model, images)["out"]


class Logits(nn.Module):
    """A semantic model's main logits as the one output of a module (what the ONNX export and the
    int8 quantiser trace; the auxiliary head, if any, is left out)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return forward_logits(self.model, x)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad bottom and right: ``Tensor[N, C, H, W] -> Tensor[N, C, ceil(H/m)*m, ceil(W/m)*m]``."""
    h, w = x.shape[-2:]
    # the padded sizes written as multiples (not h + (-h % m)), which torch.export's solver can reason about:
    # with -h % m, ENet's pooling sizes were an inequality it could not solve
    padded_h, padded_w = (h + multiple - 1) // multiple * multiple, (w + multiple - 1) // multiple * multiple
    return F.pad(x, (0, padded_w - w, 0, padded_h - h))


def crop_top_left(x: Tensor, height: int, width: int) -> Tensor:
    """``Tensor[N, C, H', W'] -> Tensor[N, C, height, width]``, the top-left part (``height <= H'``),
    undoing :func:`pad_to_multiple`. A negative ``F.pad`` rather than a slice, so that
    ``torch.export`` does not specialise the program on whether the input needed padding (with a
    slice it does)."""
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))


def init_msra(module: nn.Module, mode: Literal["fan_in", "fan_out"] = "fan_in") -> None:
    """He (Caffe "msra", fan-in) normal init for every conv and transposed conv of ``module``,
    zero bias; BatchNorm to weight 1, bias 0 (SegNet's and DeconvNet's initialisation).
    ``mode="fan_out"``: torchvision's VGG initialisation instead (FCN's, DeepLab-LargeFOV's)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def local_weights(pretrained: str) -> dict[str, Tensor] | None:
    """The state dict of ``pretrained`` when it is a local file, read once for the builder to look
    at and load (:func:`holds_whole_model`); None for a tag (downloaded by the loader) or a path
    that is not there (which the loader names)."""
    return read_weights(pretrained) if Path(pretrained).is_file() else None


def holds_whole_model(model: nn.Module, state: dict[str, Tensor] | None, encoder: str = "features.") -> bool:
    """Whether ``state`` holds weights of ``model`` beyond its encoder (a pixelwise checkpoint of the
    same net, such as a run's ``last.safetensors``), so that it loads whole
    (:func:`load_model_weights`) rather than as ImageNet weights of the encoder alone."""
    own = model.state_dict()
    return state is not None and any(k in own and not k.startswith(encoder) for k in state)


def load_model_weights(model: nn.Module, path: str, name: str, tags: tuple[str, ...] = (),
                       state: dict[str, Tensor] | None = None) -> None:
    """Load a whole-model state dict from a local file into ``model`` (strict, torchvision keys).
    A checkpoint with an auxiliary classifier also loads into a model built without one. A file
    of the backbone alone (e.g. a local copy of torchvision's ImageNet ResNet, whose keys are
    ``conv1.weight``, ``layer1.0...``, ``fc.*``) fills ``model.backbone`` and leaves the heads
    fresh, as ``pretrained="imagenet"`` does, so the download can be done by hand. ``tags``: the
    model's own tags (handled by its builder), named when ``path`` is neither one nor a file.
    ``state``: the file's contents where the caller has read them already."""
    if tags and not Path(path).expanduser().exists():
        raise weights_not_found(path, tags, name)
    state = read_weights(path) if state is None else state
    where = f"{name}(pretrained={path!r})"
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and (alone := backbone_file(state, backbone)) is not None:
        load_matching(backbone, alone, where)
        return
    if getattr(model, "aux_classifier", None) is None:
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    # the heads' last layers score the classes: a file of another class count (torchvision's 21-class
    # COCO FCN / DeepLab) fine-tunes with them fresh, as torchvision's recipe replaces classifier[4]
    own = model.state_dict()
    scorers: tuple[str, ...] = ()
    for head in ("classifier", "aux_classifier"):
        module = getattr(model, head, None)
        if isinstance(module, nn.Sequential):
            scorers += (f"{head}.{len(module) - 1}.",)
        elif isinstance(getattr(module, "score", None), nn.Conv2d):  # DeepLabV3+'s head scores in .score
            scorers += (f"{head}.score.",)
    # a scorer of another class count only (its other dimensions the model's): that whole layer is fresh
    fresh = sorted({k.rsplit(".", 1)[0] for k, v in state.items() if k.startswith(scorers) and k in own
                    and v.shape[0] != own[k].shape[0] and v.shape[1:] == own[k].shape[1:]})
    file_classes = next((state[k].shape[0] for k in state if fresh and k.startswith(fresh[0] + ".")), None)
    layers = tuple(f"{layer}." for layer in fresh)
    if fresh:
        state = {k: v for k, v in state.items() if not k.startswith(layers)}
    load_matching(model, state, where, optional=layers)
    if fresh:
        note = (f"{name}: loaded the weights {path} but {', '.join(fresh)}, which score "
                f"{file_classes} classes in the file: initialised for this model's classes (fine-tuning)")
        setattr(model, "pretrained_note", note)  # noqa: B010 - what pixelwise train prints (as FCN-VGG's)


_PACKAGE = str(Path(__file__).resolve().parents[1])  # the pixelwise package's folder


def caller_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` for a warning raised by the function that calls this one,
    naming the first frame outside pixelwise: the user's line, whether they called a builder
    directly or through ``create_model`` (a fixed level named the registry's line then)."""
    frame, level = sys._getframe(1), 1  # the function that warns
    while frame.f_back is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
