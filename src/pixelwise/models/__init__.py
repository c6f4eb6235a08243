"""Model files register themselves on import; add one line per model file."""

import pixelwise.models.deconvnet  # noqa: F401
import pixelwise.models.deeplab  # noqa: F401
import pixelwise.models.enet  # noqa: F401
import pixelwise.models.fcn  # noqa: F401
import pixelwise.models.largefov  # noqa: F401
import pixelwise.models.maskrcnn  # noqa: F401
import pixelwise.models.segnet  # noqa: F401
import pixelwise.models.unet  # noqa: F401
from pixelwise.models._utils import Logits, forward_logits, kept_as_it_was, model_outputs
from pixelwise.models.registry import create_model, list_models, model_info, register_model

__all__ = ["Logits", "create_model", "forward_logits", "kept_as_it_was", "list_models", "model_info", "model_outputs",
           "register_model"]
