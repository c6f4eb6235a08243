"""The model registry: one small dict from paper name to builder.

Each model file registers its public builders with :func:`register_model`; the
builders themselves are the public API (``pixelwise.models.unet.unet(...)``), the
registry only lets the CLI and configs find them by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from pixelwise.errors import UserError


class UnknownModelError(UserError, KeyError):
    """An unknown model name (a KeyError for the API, a one-line error for the CLI)."""

    def __str__(self) -> str:
        return str(self.args[0])


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
    return sorted(n for n, i in _MODELS.items() if task is None or i.task == task)


def model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int, pretrained: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model. ``pretrained`` is ``None``, ``"imagenet"`` (backbone weights),
    a model-specific tag such as ``"coco"``, or a path to a local weights file."""
    return model_info(name).builder(num_classes=num_classes, pretrained=pretrained, **kwargs)
