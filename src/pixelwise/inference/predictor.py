"""Prediction on single images of any size with a trained model.

:meth:`Predictor.from_checkpoint` returns a :class:`SemanticPredictor` or an
:class:`InstancePredictor` according to the checkpoint's task. Both apply the checkpoint's input
contract through :func:`pixelwise.preprocess.preprocess` (normalisation, training size, channels)
and return results at the input image's size, so ``predict``, ``eval`` and the web server see the
same pixels as training validation did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.checkpoint import (
    class_names_problem,
    file_version,
    input_spec_from_meta,
    load_checkpoint,
    palette_problem,
    unwrap,
)
from pixelwise.data.palette import default_palette
from pixelwise.errors import UserError, brief
from pixelwise.inference import cancel
from pixelwise.inference.crf import CRFSettings, as_crf_settings, check_crf_size, dense_crf
from pixelwise.inference.fast import instance_runner, make_runner
from pixelwise.inference.int8 import calibration_batches
from pixelwise.inference.mc_dropout import MAX_MC_SAMPLES, has_dropout, mc_dropout, model_lock, predictive_entropy
from pixelwise.inference.onnx_runner import OnnxModel, is_onnx, load_onnx
from pixelwise.inference.tiling import blend_rows, model_geometry, plan_tiles
from pixelwise.inference.tta import TTA_MODES, tta_probs
from pixelwise.layers import unpools_by_index
from pixelwise.models import forward_logits, model_info
from pixelwise.models.maskrcnn import MaskRCNN
from pixelwise.models.registry import MAX_SEMANTIC_CLASSES
from pixelwise.preprocess import InputSpec, as_spec, check_image, preprocess, resize_image, upsample_probs
from pixelwise.runtime import check_device
from pixelwise.runtime import progress as progress_bar

MIN_TILE = 16
DEFAULT_OVERLAP = 0.25  # tile overlap for models that state no context (see pixelwise.inference.tiling)
DEFAULT_BATCH_SIZE = 4  # model inputs (images or tiles) per forward pass
UPSAMPLE_ROWS = 256  # image rows brought back to the image's size at a time after tiling
# the largest C x H x W float32 map brought back to the image's size in one interpolation (above it:
# in bands of UPSAMPLE_ROWS rows): 19 classes of a 1024 x 2048 Cityscapes frame take 159 MiB
WHOLE_UPSAMPLE_BYTES = 256 * 2**20
P = TypeVar("P", bound="Predictor")
Bands = Iterator[tuple[int, torch.Tensor]]  # (first row y, probabilities Tensor[C, n, W] of rows y .. y + n - 1)
MaskRows = Iterator[tuple[int, np.ndarray, np.ndarray | None]]  # (y, mask uint8[n, W], entropy float32[n, W] | None)


def own_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off while a predictor runs its model: each mode has its precision (eager float32,
    the fast path's plan, int8), and a caller's ``torch.autocast`` around ``predict`` changed masks,
    or failed inside torch (int8's quantize, Mask R-CNN's mask pasting)."""
    return torch.autocast(device.type, enabled=False)


def upsample_rows(probs: torch.Tensor, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start .. stop - 1`` of ``upsample_probs(probs[None], size)[0]`` (Tensor[C, h, w] ->
    Tensor[C, stop - start, W]), computed from only the source rows they need, so that a large
    image never holds its C x H x W probabilities. The formula is PyTorch's (half-pixel centres,
    float32 source coordinates, the same order of operations); the values agree to float32 rounding
    of the source coordinates (about 1e-7 of a coordinate's magnitude)."""
    (h, w), (out_h, out_w) = probs.shape[-2:], size

    def source(n_in: int, n_out: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in, dtype=torch.float32) / n_out
        pos = (scale * (idx.float() + 0.5) - 0.5).clamp_min(0)
        lo = pos.long().clamp_max(n_in - 1)
        frac = pos - lo
        return lo, (lo + 1).clamp_max(n_in - 1), frac

    y0, y1, fy = source(h, out_h, torch.arange(start, stop))
    x0, x1, fx = source(w, out_w, torch.arange(out_w))
    fy = fy[:, None]
    top, bottom = probs[:, y0], probs[:, y1]
    return (1 - fy) * ((1 - fx) * top[..., x0] + fx * top[..., x1]) + \
        fy * ((1 - fx) * bottom[..., x0] + fx * bottom[..., x1])


@dataclass
class Prediction:
    """mask: uint8[H, W] class ids; probs: float32 Tensor[C, H, W] (None when not kept, see
    :meth:`SemanticPredictor.predict`); uncertainty: float32[H, W] (predictive entropy in nats)
    when asked for."""

    mask: np.ndarray
    probs: torch.Tensor | None
    uncertainty: np.ndarray | None = None


@torch.no_grad()  # on a generator: each step runs without autograd, wherever it is read
def mask_rows(bands: Iterable[tuple[int, torch.Tensor]], uncertainty: bool = False) -> MaskRows:
    """Row bands of probabilities ``(y, Tensor[C, n, W])`` -> ``(y, mask uint8[n, W], entropy
    float32[n, W] or None)``: what a writer needs, band by band."""
    for y, probs in bands:
        mask = probs.argmax(0).to(torch.uint8).numpy()
        yield y, mask, predictive_entropy(probs, dim=0).numpy() if uncertainty else None


def collect(bands: Iterable[tuple[int, torch.Tensor]], shape: tuple[int, int], uncertainty: bool = False,
            keep_probs: bool = True) -> Prediction:
    """The :class:`Prediction` of an image of ``shape`` from its probabilities in row bands
    (``(y, Tensor[C, n, W])``, top to bottom): the mask and the entropy are filled band by band."""
    mask = np.empty(shape, np.uint8)
    entropy = np.empty(shape, np.float32) if uncertainty else None
    probs_all: torch.Tensor | None = None
    for y, probs in bands:
        mask[y : y + probs.shape[1]] = probs.argmax(0).numpy()
        if entropy is not None:
            entropy[y : y + probs.shape[1]] = predictive_entropy(probs, dim=0).numpy()
        if keep_probs and y == 0 and probs.shape[1] == shape[0]:
            probs_all = probs  # one band: the whole image
        elif keep_probs:  # filled band by band: never the bands and their concatenation at once
            if probs_all is None:
                probs_all = probs.new_empty((probs.shape[0], *shape))
            probs_all[:, y : y + probs.shape[1]] = probs
    return Prediction(mask=mask, probs=probs_all, uncertainty=entropy)


def model_task(model: nn.Module, meta: dict) -> str:
    """"semantic" or "instance": the metadata's ``task``, else its registered ``model``'s, else
    read off the model (a Mask R-CNN is an instance model)."""
    if meta.get("task") in ("semantic", "instance"):
        return str(meta["task"])
    if isinstance(meta.get("model"), str):
        try:
            return model_info(meta["model"]).task
        except (KeyError, ValueError, UserError):
            pass
    return "instance" if isinstance(unwrap(model), MaskRCNN) else "semantic"


class Predictor:
    """What both predictors share: the model in eval mode on ``device``, its metadata, the input
    contract (``input_spec``; default the checkpoint's), class names and palette.

    >>> p = Predictor.from_checkpoint("runs/demo/best.safetensors")  # a SemanticPredictor here
    >>> pred = p.predict(image)          # image: uint8[H, W, 3]
    >>> isinstance(pred, Prediction) and pred.mask.shape == image.shape[:2]

    :meth:`predict` is typed ``Prediction | dict[str, Tensor]`` (semantic or instance): a type
    checker needs ``isinstance(pred, Prediction)``, or ``SemanticPredictor.from_checkpoint``,
    whose ``predict`` returns a :class:`Prediction`.
    """

    task = ""
    source: Path | None = None  # the file it was loaded from (from_checkpoint); None when built from a model
    # file_version(source) when it was read: the record's SHA-256 must be of that file, not of one
    # written over it since (a training run's best.safetensors)
    source_version: tuple[int, ...] | None = None

    def __init__(self, model: nn.Module, meta: dict | None = None, device: str | torch.device | None = "cpu",
                 input_spec: InputSpec | dict | None = None) -> None:
        if not isinstance(model, nn.Module):  # a str gave "cannot create weak reference to 'str' object"
            raise TypeError(f"{type(self).__name__} takes a model (torch.nn.Module); for a checkpoint file use "
                            f"{type(self).__name__}.from_checkpoint(path), got {type(model).__name__} {brief(model)}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"{type(self).__name__}: meta must be the checkpoint's metadata dict (or None), "
                            f"got {type(meta).__name__}")
        # a .half() model failed inside a convolution: "Input type (float) and bias type (c10::Half)"; float64
        # models run (in float64), as the tiling tests' bit-for-bit comparisons use them
        half = {p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
        if half:
            raise TypeError(f"{type(self).__name__} runs float32 (or float64) models, got one with "
                            f"{sorted(map(str, half))} parameters; give model.float()")
        self.meta = meta or {}
        problem = given_meta_problem(self.meta)
        if problem:  # a palette of "red" or [300, 0, 0] failed in the writers ("not enough values to unpack"),
            # one too short coloured every class black, class_names "abc" named the classes a, b, c
            raise ValueError(f"{type(self).__name__}: meta's {problem} (save_checkpoint refuses it too)")
        if self.task:
            task = model_task(model, self.meta)
            if task != self.task:
                right = "InstancePredictor" if task == "instance" else "SemanticPredictor"
                article = "an" if task == "instance" else "a"
                raise UserError(f"{self.meta.get('model') or type(unwrap(model)).__name__} is {article} {task} model; "
                                f"use {right} (or Predictor.from_checkpoint, which picks it)")
        self.device = check_device(str("cpu" if device is None else device))
        with model_lock(model):  # not while another predictor of this model samples its dropout
            self.model = model.to(self.device).eval()  # in place: the caller's module is left in eval mode
        # an InputSpec, or a checkpoint's meta["input"] dict; anything else is a TypeError
        self.input_spec = as_spec(input_spec) if input_spec is not None else input_spec_from_meta(self.meta, model)
        names = self.meta.get("class_names")
        if names:
            self.class_names: list[str] = list(names)
        elif "num_classes" in self.meta:
            # the folder reader's names of classes without classes.json, as below
            self.class_names = [f"class_{i}" for i in range(self.meta["num_classes"])]
        else:  # no metadata: the model's own count, with generic names
            self.class_names = [f"class_{i}" for i in range(self._model_classes() or 0)]
        self.palette = [tuple(c) for c in self.meta.get("palette") or default_palette(max(len(self.class_names), 1))]

    def _model_classes(self) -> int | None:
        """The number of classes the model predicts, for a predictor built without metadata that
        says it (None where it cannot be found)."""
        return None

    def predict(self, image: np.ndarray, uncertainty: bool = False) -> Prediction | dict[str, torch.Tensor]:
        """uint8[H, W, 3] -> a :class:`Prediction` (:class:`SemanticPredictor`) or the detections
        (:class:`InstancePredictor`); implemented by each."""
        raise NotImplementedError(f"{type(self).__name__} does not predict; use SemanticPredictor or "
                                  "InstancePredictor, or Predictor.from_checkpoint, which picks one")

    @classmethod
    def from_checkpoint(cls: type[P], path: str | Path, device: str | torch.device | None = "cpu", *,
                        resize: tuple[int, int] | None = None, native_size: bool = False, **options: Any) -> P:
        """The predictor for the checkpoint's task. ``resize`` = (h, w) overrides the size the
        checkpoint was trained at; ``native_size`` predicts at each image's own size instead (not
        both). ``options`` go to the task's predictor; one that does not apply is a UserError.
        ``device`` None is the default, the CPU."""
        device = "cpu" if device is None else device
        own = sorted(k for k in ("model", "meta", "input_spec") if k in options)
        if own:
            raise UserError(f"Predictor.from_checkpoint takes no {', '.join(own)}: it uses the checkpoint's model, "
                            "metadata and input contract (change its size with resize=(h, w) or native_size=True); "
                            "for another contract, build SemanticPredictor(model, meta, input_spec=...) or "
                            "InstancePredictor(...) from pixelwise.load_checkpoint(path)")
        if native_size and resize is not None:
            raise UserError(f"give resize={tuple(resize)!r} (predict at that size) or native_size=True (at each "
                            "image's own size), not both")
        version = file_version(path)
        model, meta = load_onnx(path) if is_onnx(path) else load_checkpoint(path, device)
        if file_version(path) != version:
            raise UserError(f"{path} was replaced while it was read (a training run or a copy writing it?); try "
                            "again once it is written")
        task = meta.get("task", "semantic")
        kind: type[Predictor] = SemanticPredictor if task == "semantic" else InstancePredictor
        if cls is not Predictor and cls is not kind:
            raise UserError(f"{path} holds {'an' if task == 'instance' else 'a'} {task} model; use {kind.__name__}")
        allowed = set(inspect.signature(kind.__init__).parameters) - {"self", "model", "meta", "device", "input_spec"}
        bad = sorted(k for k, v in options.items() if k not in allowed and v is not None and v is not False)
        if "uncertainty" in bad:  # a question of each call, not a way of predicting
            raise UserError("uncertainty is an argument of predict(image, uncertainty=True), not of the predictor")
        if bad:
            flags = ", ".join("--" + k.replace("_", "-") for k in bad)
            raise UserError(f"{flags} does not apply to {task} models like {meta['model']} ({path}); "
                            f"leave {flags} out")
        # refused as the CLI refuses it: it would be recorded among the options as if it had acted
        if options.get("overlap") is not None and options.get("tile") is None:
            raise UserError(f"overlap={options['overlap']!r} goes with tile=N (how much tiles overlap); "
                            "give tile, or leave overlap out")
        spec = input_spec_from_meta(meta, model)
        if resize is not None and not (isinstance(resize, list | tuple) and len(resize) == 2 and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in resize)):
            raise UserError(f"resize must be (height, width), two whole numbers > 0, got {resize!r}")
        if native_size or resize is not None:
            spec = dataclasses.replace(spec, resize=None if native_size else tuple(resize))  # type: ignore[arg-type]
        chosen = {k: v for k, v in options.items() if k in allowed}
        predictor = kind(model, meta, device, input_spec=spec, **chosen)
        predictor.source, predictor.source_version = Path(path), version
        return cast(P, predictor)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8[H, W, 3] (gray uint8[H, W] too for a one-channel contract) -> the model input
        Tensor[1, C, h, w] on the predictor's device."""
        return preprocess(image, self.input_spec).unsqueeze(0).to(self.device)


def given_meta_problem(meta: dict) -> str | None:
    """What is wrong with a hand-made ``meta`` given to a predictor, by the checks
    :func:`~pixelwise.checkpoint.save_checkpoint` makes (a class count other than the model's is
    told at predict, where the model's is known), or None."""
    n = meta.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        return f"num_classes must be a whole number >= 1, and is {brief(n)}"
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list | tuple) or not all(isinstance(x, str) for x in names)):
        return f"class_names must be a list of names (text), one per class, and is {brief(names)}"
    count = len(names) if names else None if n is None else int(n)  # np.int64 too
    return palette_problem(meta.get("palette"), count) or (
        class_names_problem(names, count) if count is not None else None)


def calibration_record(images: Sequence[np.ndarray], crop: int) -> dict:
    """The int8 calibration in a record: how many images, the crop, and a SHA-256 of the images."""
    digest = hashlib.sha256()
    for image in images:
        array = np.ascontiguousarray(image)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return {"images": len(images), "crop": crop, "sha256": digest.hexdigest()}


def grey_if_grey(image: np.ndarray) -> np.ndarray:
    """The image the CRF's colour kernel sees: a grey image's one channel, whether it came as
    uint8[H, W] (or [H, W, 1]) or as the RGB image of three equal channels its file reads as (a
    grey PNG through read_image), so both are refined alike; a colour image as it is."""
    if image.ndim == 3 and image.shape[2] == 3 and (image[..., 1:] == image[..., :1]).all():
        return image[..., 0]
    return image


REAL_OPTIONS = ("overlap", "score_thresh")  # prediction options that take any number; the others whole ones
OPTIONAL_OPTIONS = ("tile", "overlap")  # prediction options for which None means "not given" (no tiles, the default)


def _check_types(**options: object) -> None:
    """A UserError for a prediction option of the wrong type (whole numbers, or a number for
    :data:`REAL_OPTIONS`) given through the Python API; the CLI's flags are typed by argparse."""
    for name, value in options.items():
        real = name in REAL_OPTIONS
        kind = numbers.Real if real else numbers.Integral
        if value is None and name in OPTIONAL_OPTIONS:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):  # None too: "'<=' not supported" in the bound check
            what = "a number" if real else "a whole number"
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {brief(value)}")


def check_flags(**flags: object) -> None:
    """A UserError for an on/off option of the Python API (``uncertainty``, ``probs``) that is not
    True or False: ``uncertainty="no"`` would count as true (the CLI's are switches)."""
    for name, value in flags.items():
        if not isinstance(value, bool | np.bool_):
            raise UserError(f"{name} must be True or False, got {brief(value)}")


def check_mc_samples(mc_samples: int) -> None:
    """The checks of ``mc_samples`` that need no model (a whole number from 0 to
    :data:`MAX_MC_SAMPLES`): a semantic predictor's and an ensemble's, which samples its members
    with dropout. (Its mode, eager only, is checked once the model is known to have dropout.)"""
    _check_types(mc_samples=mc_samples)
    if not 0 <= mc_samples <= MAX_MC_SAMPLES:  # a typed 1e9 ran for days without a word
        raise UserError(f"--mc-samples must be from 0 to {MAX_MC_SAMPLES:,}, got {mc_samples}")




class SemanticPredictor(Predictor):
    """Class probabilities and masks of a semantic model.

    tile: predict in tiles whose cores are ``tile`` x ``tile`` pixels, each seen with its real
    context from the image, blended where cores overlap by ``overlap`` (a fraction of the tile;
    default 0 for models that state their context, such as the valid U-Net, whose tiles then give
    the whole-image result, else 0.25); see :mod:`pixelwise.inference.tiling`. A tiled image is
    preprocessed tile by tile from its uint8 pixels and its probabilities are streamed, so its
    memory grows with its pixels only by the uint8 image, mask and outputs.
    tta: a mode of :data:`pixelwise.inference.tta.TTA_MODES` (``"flip"``, ``"d4"``, ``"ms"``),
    applied to every model input (the whole image, or each tile's window).
    mc_samples: average that many Monte-Carlo dropout samples (:mod:`pixelwise.inference.mc_dropout`;
    needs a model with dropout), 0 for the deterministic forward pass.
    batch_size: model inputs per forward pass; equal-size tiles of one image run stacked (the same
    stacks wherever the image is predicted), and so do equal-size images in :meth:`predict_batch`,
    whose results equal one at a time only up to float32 rounding (stacked inputs run other
    kernels; a pixel whose two best classes nearly tie can flip). Models that unpool by pooling
    indices (SegNet, DeconvNet, ENet) run one input at a time: for them stacking moves more.
    crf: refine each image's probabilities (after tiles, TTA, Monte-Carlo dropout and an
    ensemble's averaging) with the fully connected CRF of DeepLab (:mod:`pixelwise.inference.crf`;
    ``True``: its default settings; a dict: some of them), on the image's own pixels and size; the image is then
    predicted whole before its mask comes (no row bands), and may hold up to
    :data:`~pixelwise.inference.crf.MAX_CRF_PIXELS` pixels.
    mode: ``eager``, ``fast`` or ``int8`` (:func:`pixelwise.inference.fast.make_runner`); int8 is
    calibrated on random ``calib_crop``-pixel crops of ``calib_data`` (training images,
    uint8[H, W, 3]) and, unless ``measuring`` (eval), offered only for the models whose plan allows it.
    ``fast`` runs bfloat16 only for the models whose bf16 accuracy was measured (the plans), else
    float32. A ``fast`` or ``int8`` predictor runs a copy of the model taken when it is built
    (folded, cast or quantised), while ``self.model`` stays the live model: weights changed
    afterwards are not seen by its runner (Monte-Carlo dropout, which runs the live model in eager,
    does see them), so build the predictor again after changing the weights.

    Built without ``meta`` (or one without ``num_classes`` and ``class_names``), the predictor
    takes the class count from the model's output (one forward pass of a small blank input) and
    names the classes ``class_0``, ``class_1``, ... with one palette colour each.

    Threads: a predictor may be used from several threads at once, and every result equals the
    one-thread result. With ``mc_samples``, the sampling of a model runs one call at a time (the
    model's lock, :func:`pixelwise.inference.mc_dropout.model_lock`, shared by every predictor of
    that model object), its dropout masks drawn from a generator of the call's own (seeded 0), so
    torch's global random state, which the caller's other threads may be drawing from, is neither
    read nor changed, and the model's eval mode is as it was; threads then wait
    for each other rather than run in parallel. (A predictor without ``mc_samples`` that shares
    the model object with one that samples would see dropout on while the other samples: give
    it its own copy of the model.)
    """

    task = "semantic"

    def __init__(self, model: nn.Module, meta: dict | None = None, device: str | torch.device | None = "cpu",
                 input_spec: InputSpec | dict | None = None, *, tile: int | None = None, overlap: float | None = None,
                 tta: str | None = None, mc_samples: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                 mode: str = "eager", calib_data: Sequence[np.ndarray] | None = None, calib_crop: int = 256,
                 measuring: bool = False, crf: CRFSettings | dict | bool | None = None) -> None:
        super().__init__(model, meta, device, input_spec)
        self.crf = as_crf_settings(crf)
        if len(self.class_names) > MAX_SEMANTIC_CLASSES:  # masks are uint8 and 255 is "ignore"
            raise UserError(f"{self.meta.get('model', 'the model')} has {len(self.class_names)} classes; pixelwise's "
                            f"masks hold class ids 0-{MAX_SEMANTIC_CLASSES - 1} (uint8, 255 = ignore)")
        self.context, self.alignment = model_geometry(self.model)
        if overlap is None:
            overlap = 0.0 if self.context else DEFAULT_OVERLAP
        _check_types(tile=tile, batch_size=batch_size, overlap=overlap)
        check_mc_samples(mc_samples)
        if tile is not None and tile < MIN_TILE:
            raise UserError(f"--tile must be at least {MIN_TILE} pixels, got {tile}")
        if not 0 <= overlap < 1:
            raise UserError(f"--overlap must be a fraction in [0, 1), got {overlap}")
        if tta is not None and (not isinstance(tta, str) or tta not in TTA_MODES):  # a list: "unhashable type"
            raise UserError(f"--tta {tta!r} is not one of: {', '.join(TTA_MODES)}")
        if mc_samples and isinstance(self.model, OnnxModel):
            raise UserError("--mc-samples needs dropout layers, and an ONNX export has none (it is traced without "
                            "them); give the --checkpoint for Monte-Carlo dropout")
        if mc_samples and not has_dropout(self.model):
            raise UserError(f"--mc-samples needs a model with dropout layers (such as bayesian_segnet); "
                            f"{self.meta.get('model', type(model).__name__)} has none")
        if not 1 <= batch_size <= 4096:
            raise UserError(f"--batch-size must be from 1 to 4,096, got {batch_size}")
        self.tile, self.overlap, self.tta, self.mc_samples = tile, overlap, tta, mc_samples
        self.batch_size = batch_size
        # SegNet, DeconvNet, ENet: inputs run one at a time, so that no mask depends on the batch size
        # (an ONNX export's graph has no modules to tell by, and runs stacked)
        self._one_by_one = unpools_by_index(self.model)
        # the runner of each batch (pixelwise.inference.fast): eager, the fast path, an ONNX session
        self.mode = mode
        # int8: calib_data are training images (uint8[H, W, 3]); random crops of them, preprocessed
        # with this predictor's input contract, calibrate the activation ranges
        calib_data = None if calib_data is None else list(calib_data)  # read once: hashed, then cropped
        # which calibration quantised the model: int8 masks depend on it, so predict's record and
        # eval's provenance say it (predict --resume keeps no masks of another calibration)
        self.calibration = None if calib_data is None else calibration_record(calib_data, calib_crop)
        calibration = None if calib_data is None else calibration_batches(calib_data, self.input_spec, crop=calib_crop)
        try:
            with own_precision(self.device):  # int8 calibrates, the fast path measures, in their own precision
                self.runner = make_runner(self.model, mode, self.meta.get("model", ""), self.device,
                                          mc_samples=mc_samples, calibration=calibration, measuring=measuring)
        except UserError as e:
            if calibration is None and "needs calibration images" in str(e):  # the runner speaks of CLI flags only
                raise UserError("mode='int8' (--mode int8) needs calibration images: pass calib_data= (a list of "
                                "training images, uint8[H, W, 3]), or on the command line --calib-dataset KIND "
                                "--calib-data PATH") from None
            raise

    def _model_classes(self) -> int | None:
        """The model's class count: the channels of its logits for a small blank input (its size a
        multiple of the model's alignment, with its context around: every model predicts it)."""
        context, alignment = model_geometry(self.model)
        size = 2 * context + max(32, alignment)
        size = -(-size // alignment) * alignment
        x = torch.zeros(1, self.input_spec.channels, size, size, device=self.device)
        try:
            with torch.no_grad():
                logits = forward_logits(self.model, x)
        except (RuntimeError, ValueError, TypeError, AttributeError):  # a model this does not fit: no names
            return None
        return int(logits.shape[1]) if isinstance(logits, torch.Tensor) and logits.dim() == 4 else None

    def _model_probs(self, x: torch.Tensor) -> torch.Tensor:
        with own_precision(self.device):
            if self.mc_samples:
                # seeded, input by input: an input's dropout masks do not depend on what it is stacked
                # with, so predict, predict_batch, serve and every --batch-size give the same masks and maps
                return torch.cat([mc_dropout(self.model, xi[None], self.mc_samples, measure="entropy", seed=0)[0]
                                  for xi in x])
            if self._one_by_one and x.shape[0] > 1:  # index unpooling: stacking would change the result
                return torch.cat([F.softmax(self.runner(xi[None]).float(), 1) for xi in x])
            return F.softmax(self.runner(x).float(), 1)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        cancel.check()  # a server's job stops here, between batches, once it is cancelled
        return tta_probs(self._model_probs, x, self.tta)

    def _run(self, inputs: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Probabilities Tensor[K, h, w] of each model input Tensor[C, h, w], in order; consecutive
        inputs of equal size run stacked, up to ``batch_size`` at a time."""
        batch: list[torch.Tensor] = []
        for x in inputs:
            if batch and (x.shape != batch[0].shape or len(batch) == self.batch_size):
                yield from self._probs(torch.stack(batch).to(self.device))
                batch = []
            batch.append(x)
        if batch:
            yield from self._probs(torch.stack(batch).to(self.device))

    def _model_size(self, image: np.ndarray) -> tuple[int, int]:
        """(h, w) at which the model sees ``image``: the contract's resize, or its own size."""
        return self.input_spec.resize or (image.shape[0], image.shape[1])

    def needs_tiles(self, image: np.ndarray) -> bool:
        """Whether ``image`` is predicted in tiles (it is larger than one tile at the model's size)."""
        return self.tile is not None and max(self._model_size(image)) > self.tile

    def _probs_at_model_size(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Probabilities Tensor[C, h, w] of whole images (no tiling) at the model's size (the
        contract's resize, or their own); images of equal model-input size run as batches."""
        inputs = [preprocess(image, self.input_spec) for image in images]
        order = sorted(range(len(inputs)), key=lambda i: tuple(inputs[i].shape))  # equal sizes side by side
        probs: dict[int, torch.Tensor] = {}
        for i, p in zip(order, self._run(inputs[i] for i in order)):
            probs[i] = p.float()  # on the model's device: a small one is brought back there
        return [probs[i] for i in range(len(images))]

    @staticmethod
    def _at_size(probs: torch.Tensor, shape: tuple[int, int]) -> Bands:
        """``probs`` at the model's size -> row bands at the image's ``shape`` on the CPU: itself
        where the sizes agree; one ``F.interpolate`` on its device where the result is at most
        :data:`WHOLE_UPSAMPLE_BYTES` (a Cityscapes frame's); else band by band
        (:func:`upsample_rows`, 3-5x slower), so that a model with a small resize contract never
        holds a 12-MP photo's C x H x W probabilities."""
        if tuple(probs.shape[-2:]) == tuple(shape[:2]):
            yield 0, probs.cpu()
            return
        if probs.shape[0] * shape[0] * shape[1] * 4 <= WHOLE_UPSAMPLE_BYTES:
            yield 0, upsample_probs(probs[None], shape[:2])[0].cpu()
            return
        probs = probs.cpu()
        for y in range(0, shape[0], UPSAMPLE_ROWS):
            yield y, upsample_rows(probs, shape[:2], y, min(y + UPSAMPLE_ROWS, shape[0]))

    def _whole_bands(self, images: Sequence[np.ndarray]) -> list[Bands]:
        """The row bands of whole images (no tiling), predicted now, at their own sizes."""
        return [self._at_size(p, image.shape[:2]) for p, image in zip(self._probs_at_model_size(images), images)]

    def _whole_probs(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Probabilities Tensor[C, H, W] of whole images at their own sizes (an ensemble averages
        its members' as they are); the same values as :meth:`_whole_bands`."""
        return [torch.cat([band for _, band in bands], 1) for bands in self._whole_bands(images)]

    def _bands(self, image: np.ndarray, progress: bool | None = False) -> Bands:
        """The class probabilities of ``image`` at its size, in row bands top to bottom: tiled and
        streamed when :meth:`needs_tiles`, else predicted whole and brought back to the image's
        size band by band."""
        check_image(image, self.input_spec.channels)
        if not self.needs_tiles(image):
            yield from self._whole_bands([image])[0]
            return
        assert self.tile is not None
        h, w = self._model_size(image)
        src = resize_image(image, (h, w))  # uint8; tiles are cut from it and preprocessed one by one
        spec = dataclasses.replace(self.input_spec, resize=None)
        plan = plan_tiles(h, w, self.tile, self.overlap, self.context, self.alignment)
        inputs = (preprocess(src[rows, cols], spec) for rows, cols in plan.windows())
        outputs = progress_bar(self._run(inputs), "tiles", show=progress, total=len(plan), unit="tile", leave=False)
        bands = blend_rows(plan, outputs)
        if (h, w) == image.shape[:2]:
            yield from bands
            return
        yield from self._at_size(torch.cat([band for _, band in bands], 1), image.shape[:2])  # small: the contract's

    @torch.no_grad()
    def predict_probs(self, image: np.ndarray) -> torch.Tensor:
        """uint8[H, W, 3] -> class probabilities float32 Tensor[C, H, W] on the CPU (predicted at
        the contract's size, then brought back to H x W by :func:`upsample_probs`)."""
        probs = self.predict(image).probs
        assert probs is not None
        return probs

    @torch.no_grad()
    def predict(self, image: np.ndarray, uncertainty: bool = False, *, probs: bool = True,
                progress: bool | None = False) -> Prediction:
        """uint8[H, W, 3] -> :class:`Prediction` at the input's size; with ``uncertainty``, the
        predictive entropy of the (Monte-Carlo, TTA and tile averaged) probabilities.
        ``probs=False`` keeps no probabilities (``Prediction.probs`` is None): a tiled image then
        never holds its C x H x W floats. ``progress``: a bar over tiles (None: on a terminal).
        A one-channel contract takes a gray uint8[H, W] image too."""
        check_flags(uncertainty=uncertainty, probs=probs)
        check_image(image, self.input_spec.channels)
        return collect(self._named(self._refined(image, self._bands(image, progress))), image.shape[:2],
                       uncertainty, probs)

    def _refined(self, image: np.ndarray, bands: Iterable[tuple[int, torch.Tensor]]
                 ) -> Iterable[tuple[int, torch.Tensor]]:
        """``bands`` as they are, or with ``crf`` the whole image's probabilities refined by the
        CRF, as one band (an image too large for it is refused here, before the model runs)."""
        if self.crf is None:
            return bands
        check_crf_size(image.shape[0], image.shape[1], settings=self.crf)
        return self._crf_band(grey_if_grey(image), bands, self.crf)

    @staticmethod
    def _crf_band(image: np.ndarray, bands: Iterable[tuple[int, torch.Tensor]], settings: CRFSettings
                  ) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, dense_crf(image, torch.cat([band for _, band in bands], 1), settings)

    def _named(self, bands: Iterable[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
        """``bands`` as they are, once each is checked to hold a probability per named class: a
        hand-made ``meta`` of another class count than the model's would name and colour the masks
        wrongly (a checkpoint's cannot: the model is built from it)."""
        for y, probs in bands:
            if self.class_names and probs.shape[0] != len(self.class_names):  # none: a model it could not probe
                raise UserError(f"the model predicts {probs.shape[0]} classes and the metadata names "
                                f"{len(self.class_names)} ({', '.join(self.class_names[:4])}"
                                f"{', ...' if len(self.class_names) > 4 else ''}); give the meta of this model")
            yield y, probs

    @torch.no_grad()
    def _batch_bands(self, images: Iterable[np.ndarray], progress: bool | None = False
                     ) -> tuple[list[np.ndarray], list[Iterable[tuple[int, torch.Tensor]]]]:
        """The images (any iterable, read once into a list) and the probability bands of each:
        images that need no tiles are predicted now, stacked by equal model-input size; tiled ones
        lazily, when their bands are read."""
        if isinstance(images, np.ndarray):  # one image: its rows would pass for images
            raise ValueError(f"predict_batch and predict_rows expect a sequence of uint8[H, W, 3] images, got one "
                             f"array {images.dtype}{list(images.shape)}; use predict() for one image, or a list")
        if isinstance(images, str | bytes | dict) or not isinstance(images, Iterable):
            raise TypeError(f"predict_batch and predict_rows expect images: a list (or any iterable) of uint8[H, W, 3] "
                            f"arrays, got {type(images).__name__}; use predict() for one image")
        images = list(images)
        for image in images:
            check_image(image, self.input_spec.channels)
        whole = [i for i, image in enumerate(images) if not self.needs_tiles(image)]
        out = dict(zip(whole, self._whole_bands([images[i] for i in whole])))
        return images, [self._named(self._refined(image, out.pop(i) if i in out else self._bands(image, progress)))
                        for i, image in enumerate(images)]

    @torch.no_grad()
    def predict_batch(self, images: Iterable[np.ndarray], uncertainty: bool = False, *, probs: bool = True,
                      progress: bool | None = False) -> list[Prediction]:
        """:meth:`predict` of each image (a list, or any iterable such as a generator: it is read
        once); images that need no tiles run stacked by equal model-input size (``batch_size`` at
        a time), for throughput: equal to :meth:`predict` up to float32 rounding (a near-tie pixel
        can flip). ``pixelwise predict`` runs images one at a time, so that its masks are the ones
        ``eval`` scores."""
        check_flags(uncertainty=uncertainty, probs=probs)
        images, bands = self._batch_bands(images, progress)
        return [collect(b, image.shape[:2], uncertainty, probs) for image, b in zip(images, bands)]

    def predict_rows(self, images: Iterable[np.ndarray], uncertainty: bool = False, *,
                     progress: bool | None = False) -> list[MaskRows]:
        """For each image (a list, or any iterable: read once), its mask (and with
        ``uncertainty`` its entropy) in row bands top to bottom, for writers that stream: a tiled
        image's rows come as its tiles finish, and no full-size mask or probabilities are ever
        held. Batched as :meth:`predict_batch`; the iterators run the model as they are read."""
        check_flags(uncertainty=uncertainty)
        return [mask_rows(bands, uncertainty) for bands in self._batch_bands(images, progress)[1]]



class InstancePredictor(Predictor):
    """Detections of an instance model (Mask R-CNN) with score >= ``score_thresh``."""

    task = "instance"

    def __init__(self, model: nn.Module, meta: dict | None = None, device: str | torch.device | None = "cpu",
                 input_spec: InputSpec | dict | None = None, *, score_thresh: float = 0.5, mode: str = "eager") -> None:
        super().__init__(model, meta, device, input_spec)
        _check_types(score_thresh=score_thresh)
        if not 0 <= score_thresh <= 1:
            raise UserError(f"--score-thresh must be in [0, 1], got {score_thresh}")
        self.score_thresh = score_thresh
        self.mode = mode
        with own_precision(self.device):
            self.runner = instance_runner(self.model, mode, self.meta.get("model", ""))

    def _model_classes(self) -> int | None:
        """The class count of the box classifier (background included), for names and colours
        of a detector built without metadata."""
        model = unwrap(self.model)  # pixelwise's MaskRCNN (an ONNX model carries its metadata)
        head = model.get_submodule("roi_heads.box_predictor.cls_score") if isinstance(model, MaskRCNN) else None
        return int(head.out_features) if isinstance(head, nn.Linear) else None

    @torch.no_grad()
    def predict(self, image: np.ndarray, uncertainty: bool = False) -> dict[str, torch.Tensor]:
        """uint8[H, W, 3] -> ``{"boxes" Float[D, 4], "labels" Int64[D], "scores" Float[D],
        "masks" Bool[D, H, W]}`` on the CPU at the image's size, by decreasing score (masks
        thresholded at 0.5, as in COCO evaluation). ``uncertainty`` (a semantic model's entropy
        map) does not apply: True is a UserError."""
        check_flags(uncertainty=uncertainty)
        if uncertainty:
            raise UserError("uncertainty (--uncertainty) is the entropy of a semantic model's class probabilities; "
                            f"it does not apply to instance models like {self.meta.get('model', 'Mask R-CNN')}")
        check_image(image)
        x = self.preprocess(image)
        with own_precision(self.device):
            found = self.runner([x[0]])[0]
        det = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in found.items()}
        keep = det["scores"] >= self.score_thresh
        order = det["scores"][keep].argsort(descending=True, stable=True)
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
