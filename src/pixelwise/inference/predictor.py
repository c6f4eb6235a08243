"""Prediction on single images of any size with a trained model.

:meth:`Predictor.from_checkpoint` returns a :class:`SemanticPredictor` or an
:class:`InstancePredictor` according to the checkpoint's task. Both apply the checkpoint's input
contract through :func:`pixelwise.preprocess.preprocess` (normalisation, training size, channels)
and return results at the input image's size, so ``predict``, ``eval`` and the web server see the
same pixels as training validation did.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.checkpoint import input_spec_from_meta, load_checkpoint
from pixelwise.data.palette import default_palette
from pixelwise.errors import UserError
from pixelwise.inference.fast import instance_runner, make_runner
from pixelwise.inference.mc_dropout import has_dropout, mc_dropout, predictive_entropy
from pixelwise.inference.onnx_runner import is_onnx, load_onnx
from pixelwise.inference.tiling import tiled_probs
from pixelwise.inference.tta import TTA_MODES, tta_probs
from pixelwise.preprocess import InputSpec, preprocess

MIN_TILE = 16
P = TypeVar("P", bound="Predictor")


def upsample_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probabilities Tensor[N, C, h, w] -> Tensor[N, C, H, W] (bilinear, ``align_corners=False``),
    how a prediction at the model's input size is brought back to the image's size."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


@dataclass
class Prediction:
    """mask: uint8[H, W] class ids; probs: float32 Tensor[C, H, W];
    uncertainty: float32[H, W] (predictive entropy in nats) when asked for."""

    mask: np.ndarray
    probs: torch.Tensor
    uncertainty: np.ndarray | None = None


class Predictor:
    """What both predictors share: the model in eval mode on ``device``, its metadata, the input
    contract (``input_spec``; default the checkpoint's), class names and palette.

    >>> p = Predictor.from_checkpoint("runs/demo/best.safetensors")
    >>> pred = p.predict(image)          # image: uint8[H, W, 3]
    >>> pred.mask.shape == image.shape[:2]
    """

    task = ""

    def __init__(self, model: nn.Module, meta: dict | None = None, device: str | torch.device = "cpu",
                 input_spec: InputSpec | None = None) -> None:
        self.meta = meta or {}
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_spec = input_spec or input_spec_from_meta(self.meta, model)
        n = self.meta.get("num_classes", 0)
        self.class_names: list[str] = list(self.meta.get("class_names") or [str(i) for i in range(n)])
        self.palette = [tuple(c) for c in self.meta.get("palette") or default_palette(max(len(self.class_names), 1))]

    @classmethod
    def from_checkpoint(cls: type[P], path: str | Path, device: str | torch.device = "cpu", *,
                        resize: tuple[int, int] | None = None, native_size: bool = False, **options) -> P:
        """The predictor for the checkpoint's task. ``resize`` = (h, w) overrides the size the
        checkpoint was trained at; ``native_size`` predicts at each image's own size instead.
        ``options`` go to the task's predictor; one that does not apply is a UserError."""
        model, meta = load_onnx(path) if is_onnx(path) else load_checkpoint(path, device)
        task = meta.get("task", "semantic")
        kind: type[Predictor] = SemanticPredictor if task == "semantic" else InstancePredictor
        if cls is not Predictor and cls is not kind:
            raise UserError(f"{path} holds a {task} model; use {kind.__name__}")
        allowed = set(inspect.signature(kind.__init__).parameters) - {"self", "model", "meta", "device", "input_spec"}
        bad = sorted(k for k, v in options.items() if k not in allowed and v not in (None, False, 0))
        if bad:
            flags = ", ".join("--" + k.replace("_", "-") for k in bad)
            raise UserError(f"{flags} does not apply to {task} models like {meta['model']}")
        spec = input_spec_from_meta(meta, model)
        if native_size or resize is not None:
            spec = dataclasses.replace(spec, resize=None if native_size else tuple(resize))  # type: ignore[arg-type]
        chosen = {k: v for k, v in options.items() if k in allowed}
        return cast(P, kind(model, meta, device, input_spec=spec, **chosen))

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8[H, W, 3] -> the model input Tensor[1, C, h, w] on the predictor's device."""
        return preprocess(image, self.input_spec).unsqueeze(0).to(self.device)


class SemanticPredictor(Predictor):
    """Class probabilities and masks of a semantic model.

    tile: predict in overlapping ``tile`` x ``tile`` windows (see :mod:`pixelwise.inference.tiling`)
    with ``overlap`` (fraction of the tile); tta: a mode of :data:`pixelwise.inference.tta.TTA_MODES`
    (``"flip"``, ``"d4"``); mc_samples: average that many Monte-Carlo dropout samples
    (:mod:`pixelwise.inference.mc_dropout`; needs a model with dropout), 0 for the deterministic
    forward pass.
    """

    task = "semantic"

    def __init__(self, model: nn.Module, meta: dict | None = None, device: str | torch.device = "cpu",
                 input_spec: InputSpec | None = None, *, tile: int | None = None, overlap: float = 0.25,
                 tta: str | None = None, mc_samples: int = 0, mode: str = "eager") -> None:
        super().__init__(model, meta, device, input_spec)
        if tile is not None and tile < MIN_TILE:
            raise UserError(f"--tile must be at least {MIN_TILE} pixels, got {tile}")
        if not 0 <= overlap < 1:
            raise UserError(f"--overlap must be a fraction in [0, 1), got {overlap}")
        if tta is not None and tta not in TTA_MODES:
            raise UserError(f"--tta {tta!r} is not one of: {', '.join(TTA_MODES)}")
        if mc_samples < 0:
            raise UserError(f"--mc-samples must be >= 0, got {mc_samples}")
        if mc_samples and not has_dropout(self.model):
            raise UserError(f"--mc-samples needs a model with dropout layers (such as bayesian_segnet); "
                            f"{self.meta.get('model', type(model).__name__)} has none")
        self.tile, self.overlap, self.tta, self.mc_samples = tile, overlap, tta, mc_samples
        # the runner of each batch (pixelwise.inference.fast): eager, the fast path, an ONNX session
        self.mode = mode
        self.runner = make_runner(self.model, mode, self.meta.get("model", ""), self.device, mc_samples=mc_samples)

    def _model_probs(self, x: torch.Tensor) -> torch.Tensor:
        if self.mc_samples:
            return mc_dropout(self.model, x, self.mc_samples, measure="entropy")[0]
        return F.softmax(self.runner(x).float(), 1)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return tta_probs(self._model_probs, x, self.tta)

    @torch.no_grad()
    def predict_probs(self, image: np.ndarray) -> torch.Tensor:
        """uint8[H, W, 3] -> class probabilities float32 Tensor[C, H, W] on the CPU (predicted at
        the contract's size, then brought back to H x W by :func:`upsample_probs`)."""
        probs = tiled_probs(self._probs, self.preprocess(image), self.tile, self.overlap)
        return upsample_probs(probs, image.shape[:2])[0].float().cpu()

    def predict(self, image: np.ndarray, uncertainty: bool = False) -> Prediction:
        """uint8[H, W, 3] -> :class:`Prediction` at the input's size; with ``uncertainty``, the
        predictive entropy of the (Monte-Carlo averaged, with ``mc_samples``) probabilities."""
        probs = self.predict_probs(image)
        mask = probs.argmax(0).numpy().astype(np.uint8)
        unc = predictive_entropy(probs, dim=0).numpy().astype(np.float32) if uncertainty else None
        return Prediction(mask=mask, probs=probs, uncertainty=unc)


class InstancePredictor(Predictor):
    """Detections of an instance model (Mask R-CNN) with score >= ``score_thresh``."""

    task = "instance"

    def __init__(self, model: nn.Module, meta: dict | None = None, device: str | torch.device = "cpu",
                 input_spec: InputSpec | None = None, *, score_thresh: float = 0.5, mode: str = "eager") -> None:
        super().__init__(model, meta, device, input_spec)
        if not 0 <= score_thresh <= 1:
            raise UserError(f"--score-thresh must be in [0, 1], got {score_thresh}")
        self.score_thresh = score_thresh
        self.mode = mode
        self.runner = instance_runner(self.model, mode, self.meta.get("model", ""))

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """uint8[H, W, 3] -> ``{"boxes" Float[D, 4], "labels" Int64[D], "scores" Float[D],
        "masks" Bool[D, H, W]}`` on the CPU at the image's size, by decreasing score (masks
        thresholded at 0.5, as in COCO evaluation)."""
        x = self.preprocess(image)
        det = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
               for k, v in self.runner([x[0]])[0].items()}
        keep = det["scores"] >= self.score_thresh
        order = det["scores"][keep].argsort(descending=True)
        out = {k: v[keep][order] for k, v in det.items()}
        masks = out["masks"]
        masks = masks if masks.dim() == 4 else masks[:, None]
        h, w = image.shape[:2]
        if tuple(masks.shape[-2:]) != (h, w):  # the contract resized the image: back to its size
            sy, sx = h / masks.shape[-2], w / masks.shape[-1]
            out["boxes"] = out["boxes"] * torch.tensor([sx, sy, sx, sy])
            masks = upsample_probs(masks.float(), (h, w))
        out["masks"] = masks[:, 0] >= 0.5
        return out
