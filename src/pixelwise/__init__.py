"""pixelwise: semantic and instance segmentation in pure PyTorch.

The public names below are loaded on first use (PEP 562), so that ``pixelwise --help`` and
``pixelwise --version`` answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pixelwise._version import __version__

if TYPE_CHECKING:
    from pixelwise.checkpoint import load_checkpoint, save_checkpoint
    from pixelwise.inference import InstancePredictor, Predictor, SemanticPredictor
    from pixelwise.models import create_model, list_models
    from pixelwise.preprocess import InputSpec, preprocess

_EXPORTS = {
    "load_checkpoint": "pixelwise.checkpoint",
    "save_checkpoint": "pixelwise.checkpoint",
    "Predictor": "pixelwise.inference",
    "SemanticPredictor": "pixelwise.inference",
    "InstancePredictor": "pixelwise.inference",
    "create_model": "pixelwise.models",
    "list_models": "pixelwise.models",
    "InputSpec": "pixelwise.preprocess",
    "preprocess": "pixelwise.preprocess",
}

__all__ = ["InputSpec", "InstancePredictor", "Predictor", "SemanticPredictor", "__version__", "create_model",
           "list_models", "load_checkpoint", "preprocess", "save_checkpoint"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pixelwise' has no attribute {name!r}")
