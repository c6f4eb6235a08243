"""pixelwise: semantic and instance segmentation in pure PyTorch."""

__version__ = "0.1.0"

from pixelwise.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pixelwise.inference.predictor import Predictor  # noqa: E402
from pixelwise.models import create_model, list_models  # noqa: E402

__all__ = ["Predictor", "__version__", "create_model", "list_models", "load_checkpoint", "save_checkpoint"]
