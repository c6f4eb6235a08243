"""The input contract: how an image becomes a model input, the same way everywhere.

A checkpoint records an :class:`InputSpec` (normalisation, whether the model normalises itself,
the size it was trained at, input channels). :func:`preprocess` applies it, and it is the only
place where an image becomes a model input: training validation, ``eval``, ``predict``, export
and the web server all call it, so they see the same pixels. Training augmentation resizes with
the same :func:`resize_image` / :func:`resize_labels` before its random crops.
"""

from __future__ import annotations

import numbers
import os
import sys
import types
from collections.abc import Iterable, Sized
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pixelwise.errors import UserError, brief, finite
from pixelwise.sample import MAX_INPUT_PIXELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as PIL's convert("L")


def _luma(rgb: tuple[float, ...]) -> tuple[float]:
    return (sum(w * v for w, v in zip(LUMA, rgb)),)


def _finite_numbers(values: object) -> bool:
    """Whether ``values`` is a sequence of finite real numbers (no bools, no text)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sized) or not isinstance(values, Iterable):
        return False
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) and finite(v) for v in values)


def _whole(v: object) -> bool:
    """Whether ``v`` is a whole number >= 1 (an int, or a float such as 8.0; never a bool)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    return finite(v) and float(v).is_integer() and float(v) >= 1


@dataclass(frozen=True)
class InputSpec:
    """What a model expects of its input (the checkpoint's ``input`` metadata).

    mean, std: per channel, on pixel values scaled to [0, 1] (``channels`` entries each).
    normalize: True: :func:`preprocess` subtracts ``mean`` and divides by ``std``; False: the
    model normalises its own input (Mask R-CNN) and receives values in [0, 1].
    resize: ``(h, w)`` the model was trained at, or None for the image's own size; predictions
    are brought back to the input's size.
    channels: 3 (RGB) or 1 (luminance of the RGB image).
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    normalize: bool = True
    resize: tuple[int, int] | None = None
    channels: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.normalize, np.bool_):
            object.__setattr__(self, "normalize", bool(self.normalize))
        if not isinstance(self.normalize, bool):  # "no" or "false" normalised, as from_dict refuses for a file
            raise UserError(f"input normalize must be True or False, got {self.normalize!r}")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):  # True was 1 channel
            raise UserError(f"input channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not _finite_numbers(values):
                raise UserError(f"input {name} must be finite numbers, one per channel, got {brief(values)}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise UserError(f"input mean and std need {self.channels} value(s) each, got {self.mean} and {self.std}")
        if not all(s > 0 for s in self.std):
            raise UserError(f"input std must be positive, got {self.std}")
        if self.resize is not None:
            size = self.resize
            if not (isinstance(size, list | tuple) and len(size) == 2 and all(_whole(v) for v in size)):
                hint = f" such as ({size}, {size})" if _whole(size) else ""
                raise UserError(f"input resize must be (height, width): two whole numbers of pixels >= 1{hint}, "
                                f"got {size!r}")
            object.__setattr__(self, "resize", (int(size[0]), int(size[1])))

    @classmethod
    def for_channels(cls, channels: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD, **kwargs) -> InputSpec:
        """RGB statistics turned into ``channels`` entries (their luminance for one channel)."""
        if channels == 1 and len(mean) == 3:
            mean, std = _luma(mean), _luma(std)
        return cls(mean=tuple(mean), std=tuple(std), channels=channels, **kwargs)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "normalize": self.normalize,
                "resize": list(self.resize) if self.resize else None, "channels": self.channels}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        if not isinstance(d, dict):  # None: "'NoneType' object has no attribute 'get'"
            raise UserError(f"bad input contract {d!r} (an object of mean, std, normalize, resize and channels)")
        normalize, resize, channels = d.get("normalize", True), d.get("resize"), d.get("channels", 3)
        # read as written, not by truth value: null or 0 turned the normalisation off, "no" left it on
        if not isinstance(normalize, bool):
            raise UserError(f"bad input contract {d!r} (normalize must be true or false)")
        if not _whole(channels):
            raise UserError(f"bad input contract {d!r} (channels must be 1 or 3)")
        if isinstance(resize, list | tuple) and len(resize) == 2 and all(_whole(v) for v in resize) \
                and resize[0] * resize[1] > MAX_INPUT_PIXELS:
            raise UserError(f"bad input contract {d!r} (resize of {resize[0] * resize[1]:,} pixels, above "
                            f"{MAX_INPUT_PIXELS:,})")
        try:
            return cls(mean=tuple(d["mean"]), std=tuple(d["std"]), normalize=normalize,
                       resize=tuple(resize) if isinstance(resize, list | tuple) else resize,
                       channels=int(channels))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise UserError(f"bad input contract {d!r} ({e})") from None

    def describe(self) -> str:
        size = f"resize to {self.resize[0]}x{self.resize[1]}" if self.resize else "native size"
        norm = "normalised here" if self.normalize else "the model normalises"
        return f"{size}, {self.channels} channel(s), {norm}"


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8[H, W, C] -> uint8[h, w, C], bilinear (OpenCV ``INTER_LINEAR``, half-pixel centres,
    no antialiasing: what training augmentation and every inference path use)."""
    h, w = int(size[0]), int(size[1])
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_LINEAR)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Any [H, W] or [H, W, K] label/weight array -> [h, w(, K)], nearest neighbour (no new values)."""
    h, w = int(size[0]), int(size[1])
    if labels.shape[:2] == (h, w):
        return labels
    out = cv2.resize(np.ascontiguousarray(labels), (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    if labels.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel
        out = out[..., None]
    return out.astype(labels.dtype, copy=False)  # OpenCV gives int64 back as int32


def upsample_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probabilities (or images) Tensor[N, C, h, w] -> Tensor[N, C, H, W] (bilinear,
    ``align_corners=False``): how a prediction at the model's input size is brought back to the
    image's size, and how test-time scaling resizes."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


def _format_hints(image: np.ndarray, channels: int) -> list[str]:
    """How to turn a numpy array of the wrong dtype or layout into uint8[H, W, 3] (or the gray
    uint8[H, W] a one-channel contract also takes): the common cases."""
    fields = image.dtype.names  # a structured array: [('r', 'u1'), ('g', 'u1'), ('b', 'u1')] per pixel
    if fields:
        pick = fields[:1] if len(fields) < 3 or channels == 1 else fields[:3]
        stack = ", ".join(f"img[{f!r}]" for f in pick)
        return [f"np.stack([{stack}], -1) (fields {', '.join(fields)})" if len(pick) > 1 else f"{stack} (a field)"]
    hints = []
    shape = image.shape
    if image.ndim == 4 and shape[0] == 1:  # a batch of one
        hints.append("img[0] (a batch of one image)")
        shape = shape[1:]
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 2, 3, 4):
        hints.append("img.transpose(1, 2, 0) (channels first)")
        shape = (shape[1], shape[2], shape[0])
    if len(shape) == 2 and channels == 3:
        hints.append("np.repeat(img[..., None], 3, -1) (gray)")
    elif len(shape) == 3 and shape[2] == 1 and channels == 3:
        hints.append("np.repeat(img, 3, -1) (one channel)")
    elif len(shape) == 3 and shape[2] == 4:
        hints.append("img[..., :3] (RGBA)")
    elif len(shape) == 3 and shape[2] == 2:
        hints.append("np.repeat(img[..., :1], 3, -1) (gray and alpha)" if channels == 3
                     else "img[..., 0] (gray and alpha)")
    if image.dtype == np.bool_:
        hints.append("img.astype(np.uint8) * 255 (boolean)")
    elif image.dtype != np.uint8 and image.size and image.dtype.kind in "fiu" and np.isfinite(image).any():
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        if image.dtype.kind == "f" and low >= 0 and high <= 1:
            hints.append("(img * 255).round().astype(np.uint8) (floats in [0, 1])")
        elif low >= 0 and high <= 255:
            hints.append("img.round().astype(np.uint8) (values in 0..255)" if image.dtype.kind == "f"
                         else "img.astype(np.uint8) (values in 0..255)")
        else:
            hints.append(f"img scaled to 0..255, then .astype(np.uint8) (values {low:g}..{high:g})")
    return hints


def _object_hint(image: object, kind: str, channels: int) -> str:
    """How to turn an image that is not a numpy array into one (a PIL image, a tensor, a path)."""
    if kind.startswith("PIL."):  # pil_to_rgb scales 16-bit and float modes as read_image does; convert('RGB') clips
        return (" (a PIL image: pixelwise.data.io.pil_to_rgb(image), which reads every mode and the EXIF "
                "orientation as the CLI reads a file)")
    if isinstance(image, torch.Tensor):
        dense = ".to_dense()" if image.layout != torch.strided else ""
        try:
            array = image.detach().cpu().numpy()
        except (TypeError, RuntimeError):  # bfloat16, a meta or sparse tensor
            return f" (a tensor: img = image.detach(){dense}.float().cpu().numpy(), of shape {list(image.shape)})"
        hints = _format_hints(array, channels) if array.ndim in (2, 3) or array.shape[:1] == (1,) else []
        return f" (a tensor: img = image.detach().cpu().numpy(){''.join(', then ' + h for h in hints)})"
    if isinstance(image, (str, os.PathLike)):
        return " (a path: pixelwise.data.io.read_image(path))"
    if isinstance(image, (list, tuple)) and image and all(
            isinstance(x, np.ndarray | torch.Tensor) or type(x).__module__.startswith("PIL.") for x in image):
        return " (several images: predict_batch(images))"
    if isinstance(image, (list, tuple)):
        return " (nested lists of pixel values: np.asarray(image, np.uint8))"
    return ""


def check_image(image: np.ndarray, channels: int = 3) -> None:
    """A ValueError unless ``image`` is what every predictor takes: uint8[H, W, 3] with H, W >= 1;
    with ``channels=1`` (a one-channel input contract) also a gray uint8[H, W] or uint8[H, W, 1].
    The message says how to convert the common wrong formats."""
    gray = channels == 1 and isinstance(image, np.ndarray) and (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1))
    if (not isinstance(image, np.ndarray) or not (gray or (image.ndim == 3 and image.shape[2] == 3))
            or image.dtype != np.uint8 or 0 in image.shape[:2]):
        expected = "uint8[H, W, 3] (or gray uint8[H, W])" if channels == 1 else "uint8[H, W, 3]"
        if not isinstance(image, np.ndarray):
            kind = f"{type(image).__module__}.{type(image).__qualname__}"
            raise ValueError(f"preprocess expects a numpy {expected} array with H, W >= 1, got {kind}"
                             f"{_object_hint(image, kind, channels)}")
        hints = _format_hints(image, channels) if image.ndim in (2, 3) or image.shape[:1] == (1,) else []
        fix = (f"; convert it with {', then '.join(hints)}" if hints
               else "; a batch of images: predict_batch(list(img))" if image.ndim == 4 and image.shape[0] > 1
               else "; every value is NaN or infinite" if image.dtype.kind == "f" and not np.isfinite(image).any()
               else "")
        raise ValueError(f"preprocess expects {expected} with H, W >= 1, got {image.dtype}{list(image.shape)}{fix}")
    if np.ma.is_masked(image):
        raise ValueError("preprocess got a masked array with masked pixels; every pixel is predicted, so its mask "
                         "would be ignored: give img.filled(0) (or img.data) and mask the prediction afterwards")


def as_spec(spec: object) -> InputSpec:
    """``spec`` as an :class:`InputSpec`: one as it is, or a checkpoint's input-contract dict
    (``meta["input"]``, through :meth:`InputSpec.from_dict`); anything else is a TypeError."""
    if isinstance(spec, InputSpec):
        return spec
    if isinstance(spec, dict):
        return InputSpec.from_dict(spec)
    raise TypeError(f"the input contract must be an InputSpec or a checkpoint's meta['input'] dict "
                    f"(InputSpec.from_dict(meta['input']); a predictor's is predictor.input_spec), "
                    f"got {type(spec).__name__} {brief(spec)}")


def to_tensor(image: np.ndarray, spec: InputSpec | dict = InputSpec()) -> torch.Tensor:  # noqa: B008 - frozen
    """uint8[H, W, 3] RGB -> float32 Tensor[spec.channels, H, W] in [0, 1], normalised when
    ``spec.normalize`` (no resizing; training augmentation has resized already). With a
    one-channel contract a gray uint8[H, W] (or [H, W, 1]) image is taken as the RGB image whose
    three channels it fills, so it gives exactly what ``np.repeat(img[..., None], 3, -1)`` gives.
    ``spec``: an :class:`InputSpec` or a checkpoint's ``meta["input"]`` dict."""
    spec = as_spec(spec)
    check_image(image, spec.channels)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, -1)
    if min(image.strides) < 0:  # a flipped view of an axis of length 1 counts as contiguous, and torch refuses it
        image = image.copy()
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    if spec.channels == 1:
        t = torch.tensordot(torch.tensor(LUMA), t, dims=1)[None]
    if spec.normalize:
        m = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        t = t.sub_(m).div_(s)
    return t


def preprocess(image: np.ndarray, spec: InputSpec | dict = InputSpec()) -> torch.Tensor:  # noqa: B008 - frozen
    """The input contract applied: uint8[H, W, 3] RGB -> float32 Tensor[C, h, w], resized to
    ``spec.resize`` (bilinear) if set, scaled to [0, 1], normalised unless the model does it.
    ``spec``: an :class:`InputSpec`, or the checkpoint's input-contract dict ``meta["input"]``;
    with a one-channel contract a gray uint8[H, W] image is taken too (see :func:`to_tensor`)."""
    spec = as_spec(spec)
    check_image(image, spec.channels)
    if spec.resize is not None:
        image = resize_image(image, spec.resize)
    return to_tensor(image, spec)


class _CallableModule(types.ModuleType):
    """``pixelwise.preprocess(image, spec)`` is this module's :func:`preprocess`: importing the
    module (as any use of the package does) binds the package's attribute ``preprocess`` to the
    module itself, which would hide the function ``pixelwise/__init__.py`` exports under that name."""

    def __call__(self, image: np.ndarray, spec: InputSpec | dict = InputSpec()) -> torch.Tensor:  # noqa: B008 - frozen
        return preprocess(image, spec)


sys.modules[__name__].__class__ = _CallableModule
