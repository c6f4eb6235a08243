"""The model registry: one small dict from paper name to builder.

Each model file registers its public builders with :func:`register_model`; the
builders themselves are the public API (``pixelwise.models.unet.unet(...)``), the
registry only lets the CLI and configs find them by name.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import traceback
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from pixelwise.errors import UserError, brief


class UnknownModelError(UserError, KeyError):
    """An unknown model name (a KeyError for the API, a one-line error for the CLI)."""

    def __str__(self) -> str:
        return str(self.args[0])


class ModelOptionError(UserError, TypeError, ValueError):
    """A model option (builder keyword argument) that is unknown, of the wrong type or refused by
    the builder: a TypeError / ValueError for the API, a one-line error for the CLI."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    task: str  # "semantic" or "instance"
    paper: str  # short citation, e.g. "Ronneberger et al., MICCAI 2015"


_MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, *, task: str = "semantic", paper: str = "") -> Callable:
    """Decorator: register ``builder(num_classes, pretrained=None, **kwargs)`` under ``name``."""
    if task not in ("semantic", "instance"):
        raise ValueError(f"task must be 'semantic' or 'instance', got {task!r}")

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelInfo(name, builder, task, paper)
        return builder

    return wrap


def list_models(task: str | None = None) -> list[str]:
    """Names of all registered models (optionally only one task), sorted."""
    if task not in (None, "semantic", "instance"):
        raise ValueError(f"task must be 'semantic' or 'instance' (or None for all), got {task!r}")
    return sorted(n for n, i in _MODELS.items() if task is None or i.task == task)


def model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list_models(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownModelError(f"unknown model {name!r}; {hint}choose one of: {', '.join(list_models())}") from None


def model_options(name: str) -> dict[str, inspect.Parameter] | None:
    """The options (keyword arguments besides ``num_classes`` and ``pretrained``) of model
    ``name``: its builder's keyword parameters and, where the builder passes ``**kwargs`` on to
    the model class it returns (its return annotation, whose constructor takes ``num_classes``),
    that constructor's. None where the builder takes ``**kwargs`` it checks itself (Mask R-CNN)."""
    builder = model_info(name).builder
    params = dict(inspect.signature(builder).parameters)
    options = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        returned = _hints(builder).get("return")
        init = inspect.signature(returned).parameters if inspect.isclass(returned) else {}
        if "num_classes" not in init or any(p.kind is p.VAR_KEYWORD for p in init.values()):
            return None
        options.update({n: p for n, p in init.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)})
    return {n: p for n, p in options.items() if n not in ("self", "num_classes", "pretrained")}


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except (NameError, TypeError):  # annotations this module cannot resolve: no type check
        return {}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` where the hint is a plain type (bool, int, float, str) or an
    optional/union of them; anything else is not checked here (the builder checks it)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    plain = [a for a in args if a in (bool, int, float, str, type(None))]
    if len(plain) < len(args):
        return True
    if value is None:
        return type(None) in args
    if isinstance(value, bool):
        return bool in args
    return (isinstance(value, int) and (int in args or float in args)) or (isinstance(value, float) and float in args) \
        or (isinstance(value, str) and str in args)


def _plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with numpy scalars (``np.int64(4)`` of an ``np.arange`` sweep, ``np.bool_``) as
    the Python values they hold, as ``num_classes`` takes them."""
    return {k: v.item() if type(v).__module__ == "numpy" and getattr(v, "shape", None) == () else v
            for k, v in kwargs.items()}


def _check_names_and_types(name: str, kwargs: Mapping[str, Any], where: str) -> None:
    options = model_options(name)
    if options is None:
        return
    hints = {**_hints(model_info(name).builder), **(_hints(_returned_class(name)) or {})}
    for key, value in kwargs.items():
        if key in ("num_classes", "pretrained"):
            raise ModelOptionError(f"{where}: {key!r} is set by pixelwise (from the data, or --pretrained); remove it")
        if key not in options:
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ModelOptionError(f"{where}: {name} has no option {key!r}; {hint}options: {', '.join(options)}")
        if key in hints and not _type_ok(value, hints[key]):
            default = options[key].default
            example = f" (default {default!r})" if default is not inspect.Parameter.empty else ""
            raise ModelOptionError(f"{where}: {name} option {key!r} must be {_type_name(hints[key])}{example}, "
                                   f"got {brief(value)}")


def _returned_class(name: str) -> Any:
    returned = _hints(model_info(name).builder).get("return")
    return returned if inspect.isclass(returned) else None


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], where: str | None = None) -> int:
    """Check ``kwargs`` for model ``name`` before anything else is done: known names (with the
    closest one suggested), types where annotated, and whatever the builder itself refuses, by
    building it on the meta device (no memory, no weights). Raises :class:`ModelOptionError`.
    -> the model's parameter count (with two classes), which its options alone set."""
    where = where or f"model {name!r}"
    kwargs = _plain(kwargs)
    _check_names_and_types(name, kwargs, where)
    try:
        with torch.device("meta"):
            model = model_info(name).builder(num_classes=2, pretrained=None, **kwargs)
    except (TypeError, ValueError, RuntimeError, UserError) as e:  # RuntimeError: e.g. a negative layer size
        raise ModelOptionError(f"{where}: {name}: {e}") from e
    return sum(p.numel() for p in model.parameters())


MAX_SEMANTIC_CLASSES = 255  # semantic classes a mask can hold: ids 0-254 in uint8, 255 being "ignore"


def create_model(name: str, num_classes: int, pretrained: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model. ``pretrained`` is ``None``, ``"imagenet"`` (backbone weights),
    a model-specific tag such as ``"coco"``, or a path to a local weights file. An unknown or
    wrongly typed option, or one the builder refuses, is a :class:`ModelOptionError`; so is a
    RuntimeError that a torch layer's constructor raises for a size an option set (any other
    RuntimeError is a bug and propagates unchanged)."""
    info = model_info(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ModelOptionError(f"model {name!r}: num_classes must be a whole number >= 1, got {num_classes!r}")
    num_classes = int(num_classes)
    if info.task == "semantic" and not 2 <= num_classes <= MAX_SEMANTIC_CLASSES:
        raise ModelOptionError(
            f"model {name!r}: num_classes must be from 2 to {MAX_SEMANTIC_CLASSES} for a semantic model, got "
            f"{num_classes}: it scores every class and takes the best, so one class is class 0 everywhere (a binary "
            f"task is 2 classes, background and foreground), and masks hold class ids 0-{MAX_SEMANTIC_CLASSES - 1} "
            "(uint8, 255 = ignore)")
    kwargs = _plain(kwargs)
    if pretrained is not None and not str(pretrained).strip():
        raise ModelOptionError(f"model {name!r}: pretrained is empty; give a tag such as imagenet, the path of a "
                               "weights file, or None")
    _check_names_and_types(name, kwargs, f"model {name!r}")
    try:
        return info.builder(num_classes=num_classes, pretrained=pretrained, **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise ModelOptionError(f"model {name!r}: {e}") from e
    except RuntimeError as e:
        if not kwargs or not _raised_building_a_layer(e):  # a bug elsewhere keeps its traceback
            raise
        raise ModelOptionError(f"model {name!r}: a layer refused the options {kwargs}: "
                               f"{str(e).strip().splitlines()[0]}") from e


def _raised_building_a_layer(error: BaseException) -> bool:
    """Whether ``error`` came out of the constructor of a torch layer (``torch/nn/modules``):
    a size an option set, such as a negative channel count (``torch.empty(-5, ...)``), that the
    builder did not check itself. A RuntimeError from anywhere else (loading weights, our own
    code) is not an option error and keeps its traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    return any(f.name in ("__init__", "reset_parameters") and "torch/nn/modules/" in f.filename.replace("\\", "/")
               for f in frames)
