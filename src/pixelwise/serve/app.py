"""The web application of ``pixelwise serve``: a page at ``/`` and a JSON API under ``/api/``.

:func:`create_app` builds a FastAPI application around one predictor (the same
:class:`~pixelwise.inference.predictor.Predictor` and preprocessing as ``pixelwise predict``), so
a mask from the API is the PNG ``predict`` writes. :func:`run` serves it with uvicorn.

Routes: ``GET /`` (the page; ``/static/`` its script and style), ``POST /api/predict``,
``GET /api/info``, ``GET /api/health``, ``GET /api/samples/{name}`` (and ``.../ground_truth``),
``GET /openapi.json`` and ``GET /docs`` (the API reference rendered here from the schema:
FastAPI's Swagger UI would load its script from a CDN).

Every request is answered: predictions run in a bounded :class:`~pixelwise.serve.pool.InferencePool`
(503 with Retry-After when it is full), bad uploads get 400/413/415/422 with a ``detail``
sentence, and any other failure of a request is logged and answered 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import html
import inspect
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from pixelwise._version import __version__
from pixelwise.checkpoint import file_version
from pixelwise.data import STORED_LABELS, StoredLabels
from pixelwise.data.folder import IGNORE_COLOUR
from pixelwise.data.io import set_max_image_pixels
from pixelwise.data.palette import clear_class
from pixelwise.errors import UserError, shown
from pixelwise.inference import cancel
from pixelwise.inference.cancel import TimedOut
from pixelwise.inference.crf import MAX_CRF_PIXELS, CRFSettings, check_crf_size
from pixelwise.inference.mc_dropout import has_dropout
from pixelwise.inference.predictor import InstancePredictor, Predictor, SemanticPredictor
from pixelwise.inference.tta import TTA_MODES
from pixelwise.inference.writers import IMAGE_SUFFIXES, source_files
from pixelwise.serve.config import ServeConfig, host_warning
from pixelwise.serve.pool import InferencePool, PoolFull
from pixelwise.serve.results import compare, instance_result, semantic_result
from pixelwise.serve.samples import Sample, folder_samples, shapes_samples
from pixelwise.serve.uploads import Part, UploadError, decode_image, decode_mask, read_multipart

log = logging.getLogger("pixelwise.serve")
STATIC = Path(__file__).parent / "static"
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_CSP = "default-src 'none'; style-src 'self'; base-uri 'none'; frame-ancestors 'none'"
TRUE, FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no", "none", ""}
# module level: FastAPI resolves the (string) annotations of require_key in this module's globals
KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
BEARER = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")
GRACE_SECONDS = 5  # on Ctrl-C or SIGTERM, running requests get this long before they are stopped
SHUTDOWN_RETRY_AFTER = 10  # Retry-After (s) of the 503 a request gets when the server stops under it


class RevalidatedFiles(StaticFiles):
    """The page's script and style, which the browser must revalidate (no-cache, as the page itself):
    a cached app.js of an earlier version beside the new page would send fields it no longer reads."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


# ------------------------------------------------------------------ response schemas (for /docs)

class ClassShare(BaseModel):
    id: int
    name: str
    color: list[int] = Field(description="[r, g, b] as in the mask PNG's palette")
    pixels: int = Field(description="pixels of this class in the predicted mask")
    share: float = Field(description="pixels / all pixels")


class Instance(BaseModel):
    id: int = Field(description="1-based, by decreasing score")
    label: int
    class_name: str
    category_id: int | None = Field(None, description="the training dataset's own id of the class (COCO's "
                                                      "category id), where the checkpoint records it")
    score: float
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels")
    area: int
    segmentation: dict = Field(description="COCO RLE: {size: [h, w], counts: string}")
    color: list[int] = Field(description="r, g, b: the instance's colour in the overlay")


class ClassScore(BaseModel):
    id: int
    name: str
    iou: float | None = Field(description="null when the class is in neither mask")
    boundary_iou: float | None = Field(description="Boundary IoU (bands 2% of the diagonal wide); null when the "
                                                   "class is in neither mask")
    acc: float | None = Field(description="null when the class is not in the ground truth")
    pixels: int = Field(description="ground-truth pixels of the class")


class Metrics(BaseModel):
    pixel_acc: float | None
    mean_acc: float | None
    mIoU: float | None
    boundary_iou: float | None = Field(description="mean Boundary IoU over the classes in either mask, as "
                                                   "`pixelwise eval` computes it")
    per_class: list[ClassScore]
    confusion: list[list[int]] = Field(description="pixel counts; rows: ground truth, columns: prediction")
    ignored_pixels: int = Field(description="ground-truth pixels labelled 255 (not counted)")


class PredictResponse(BaseModel):
    task: str = Field(description="semantic or instance")
    width: int
    height: int
    classes: list[ClassShare]
    mask_png_base64: str = Field(description="the palette-indexed PNG `pixelwise predict` writes: pixel = class id")
    overlay_png_base64: str | None = Field(description="the overlay PNG `pixelwise predict` writes (null when "
                                                       "the form's overlay is false)")
    uncertainty_png_base64: str | None = Field(description="8-bit predictive entropy (255 = log C), when asked for")
    image_png_base64: str | None = Field(description="the decoded image (EXIF orientation applied, the pixels "
                                                     "the model saw) as a PNG, when the form's return_image is true")
    instances: list[Instance] | None = Field(None, description="instance models: predict's <stem>.json instances")
    metrics: Metrics | None = Field(None, description="when a ground_truth mask was sent")
    options: dict = Field(description="the prediction options used")
    ms: float = Field(description="milliseconds to decode, predict and encode (on the server)")
    queue_ms: float = Field(description="milliseconds the request waited for a worker")


class ErrorResponse(BaseModel):
    detail: str


class HealthResponse(BaseModel):
    status: str
    model: str
    pool: dict[str, int] = Field(description="workers queue running waiting")


PREDICT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary",
                  "description": "PNG, JPEG, BMP, GIF, TIFF, WebP, PPM, AVIF, TGA, PCX or ICO "
                                 "(data.io.UPLOAD_FORMATS); any mode; EXIF orientation applied"},
        "tile": {"type": "integer", "minimum": 0,
                 "description": "semantic: predict in tiles of this side (>= 16) that see their real surroundings; "
                                "0: whole image"},
        "overlap": {"type": "number", "description": "semantic: tile overlap as a fraction of the tile, [0, 1) "
                    "(default 0 for models that state their context, such as the valid U-Net, else 0.25)"},
        "tta": {"type": "string", "enum": ["none", *TTA_MODES],
                "description": "semantic: test-time augmentation (flip: image + mirror; d4: 8 rotations/flips; "
                               "ms: scales 0.5-1.75, each with its mirror)"},
        "uncertainty": {"type": "boolean", "description": "semantic: also return the uncertainty map (Monte-Carlo "
                        "dropout for models with dropout, else the softmax's entropy)"},
        "crf": {"type": "string", "description": "semantic: refine with DeepLab's fully connected CRF (about 1 s for "
                "a 360x480 image; images up to 4 MP): true (the server's --crf settings, else DeepLab's), false, "
                "or settings NAME=VALUE,... (iterations, bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std; "
                "the others DeepLab's)"},
        "score_thresh": {"type": "number", "description": "instance: keep detections scoring at least this"},
        "overlay": {"type": "boolean", "default": True,
                    "description": "return the overlay PNG (false: overlay_png_base64 is null; the mask is enough "
                                   "to draw one)"},
        "return_image": {"type": "boolean", "default": False,
                         "description": "also return the decoded image as a PNG (image_png_base64), for clients that "
                                        "cannot show the upload's format, such as TIFF or PPM in a browser"},
        "ground_truth": {"type": "string", "format": "binary",
                         "description": "a mask of the same size (index PNG, 255 = ignore, or colours of the "
                                        "model's palette, white = ignore): adds per-class IoU and the "
                                        "confusion matrix"},
        "truth_format": {"type": "string", "enum": ["classes", "dataset"], "default": "classes",
                         "description": "classes: the ground truth holds class ids (as predict writes them); "
                                        "dataset: it is a label file of the model's training dataset, read as that "
                                        "dataset's reader reads it (ADE20K's 0 = other, Cityscapes' label ids, "
                                        "ISBI's 0/255, CamVid's void 11; /api/info's truth_formats)"},
    }}}}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "undecodable, truncated or malformed upload"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when the server has one)"},
    408: {"model": ErrorResponse, "description": "the upload took longer than the server waits for one"},
    413: {"model": ErrorResponse, "description": "upload over the size limit, or image over the pixel limit"},
    415: {"model": ErrorResponse, "description": "not multipart/form-data, or not an accepted image format"},
    422: {"model": ErrorResponse, "description": "missing image, image sent as a text value, a field given twice, "
                                                 "bad option, ground truth that does not fit"},
    503: {"model": ErrorResponse, "description": "queue full, or the server stopped (Ctrl-C, SIGTERM) before the "
                                                 "prediction was ready; the Retry-After header says when to retry"},
    504: {"model": ErrorResponse, "description": "the prediction ran longer than the server's time limit "
                                                 "(--timeout) and was stopped"},
}


# ------------------------------------------------------------------ prediction options

# the form's fields are the ones its OpenAPI schema documents; any other is refused
FORM_FIELDS = frozenset(PREDICT_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"])


@dataclass(frozen=True)
class Wanted:
    """What a request asks to get back besides the mask."""

    uncertainty: bool = False
    overlay: bool = True
    image: bool = False
    truth: StoredLabels | None = None  # how the ground truth stores classes (truth_format=dataset)


def parse_options(form: dict[str, Part], predictor: Predictor) -> tuple[dict[str, Any], Wanted]:
    """The form's fields -> (prediction options by the predictor's parameter names, what to return).
    Values that cannot be parsed are 422; options the predictor does not take are checked by
    :func:`with_options`."""
    unknown = sorted(set(form) - FORM_FIELDS)
    if unknown:  # a misspelt option would otherwise be ignored without a word
        raise UploadError(422, f"unknown form field {unknown[0]!r}; the fields are {', '.join(sorted(FORM_FIELDS))}")
    options: dict[str, Any] = {}

    def number(name: str, kind: type) -> None:
        if name in form and form[name].text() != "":
            text = form[name].text()
            try:
                value = float(text)
                if not math.isfinite(value) or (kind is int and not value.is_integer()):
                    raise ValueError
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise UploadError(422, f"{name} must be {what}, got {text!r}") from None
            options[name] = kind(value)  # 1e3 as a browser's number field may send it: 1000

    number("tile", int)
    number("overlap", float)
    number("score_thresh", float)
    if options.get("tile") == 0:
        options["tile"] = None  # 0: no tiling
    if "tta" in form and form["tta"].text() != "":
        text = form["tta"].text().lower()
        if text in TTA_MODES:
            options["tta"] = text
        elif text in TRUE:
            options["tta"] = "flip"
        elif text in FALSE:
            options["tta"] = None
        else:
            raise UploadError(422, f"tta must be one of none, {', '.join(TTA_MODES)}; got {text!r}")
    if "crf" in form and form["crf"].text() != "":
        options["crf"] = crf_option(form["crf"].text(), predictor)

    def flag(name: str, default: bool) -> bool:
        if name not in form:
            return default
        text = form[name].text().lower()
        if text not in TRUE | FALSE:
            raise UploadError(422, f"{name} must be true or false, got {text!r}")
        return text in TRUE

    # empty, as a form's unset select sends it, is the default, as for tile, tta and crf
    truth_format = (form["truth_format"].text().lower() if "truth_format" in form else "") or "classes"
    if truth_format not in ("classes", "dataset"):
        raise UploadError(422, f"truth_format must be classes or dataset, got {truth_format!r}")
    try:
        truth = truth_reading(predictor, truth_format, "truth_format")
    except UserError as e:
        raise UploadError(422, str(e)) from None
    wanted = Wanted(flag("uncertainty", False), flag("overlay", True), flag("return_image", False), truth)
    if wanted.uncertainty and not isinstance(predictor, SemanticPredictor):
        raise UploadError(422, "uncertainty applies to semantic models only")
    return options, wanted


def crf_option(text: str, predictor: Predictor) -> CRFSettings | None:
    """The form's ``crf`` -> the CRF a request asks for: true keeps the server's settings (DeepLab's
    where it has none), false none, ``NAME=VALUE,...`` those settings over DeepLab's."""
    if text.lower() in TRUE:
        return getattr(predictor, "crf", None) or CRFSettings()
    if text.lower() in FALSE:
        return None
    if "=" not in text:
        raise UploadError(422, f"crf must be true, false or settings NAME=VALUE,... (e.g. iterations=5,bi_w=5), "
                               f"got {text!r}")
    try:
        return CRFSettings.parse(text, "crf")
    except UserError as e:
        raise UploadError(422, str(e)) from None


def log_colours() -> bool:
    """Colour in the server's log only where it goes to a terminal (uvicorn would look at stdout and
    write to stderr: codes in a redirected log) and the user has not asked for none (NO_COLOR,
    TERM=dumb)."""
    return sys.stderr.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def ignore_colour(predictor: Predictor) -> tuple[int, ...]:
    """The colour that means 'ignore' in the colour masks of the model's training data: its folder
    dataset's ignore_color (recorded in the checkpoint), else white."""
    colour = predictor.meta.get("ignore_color")
    if isinstance(colour, list | tuple) and len(colour) == 3 and all(isinstance(v, int) for v in colour):
        return tuple(colour)
    return IGNORE_COLOUR


def stored_labels(predictor: Predictor) -> StoredLabels | None:
    """How the label files of the model's training dataset store classes, where not as class ids
    (:data:`pixelwise.data.STORED_LABELS`), for a semantic model whose classes are that dataset's."""
    stored = STORED_LABELS.get(str(predictor.meta.get("dataset")))
    return stored if stored is not None and isinstance(predictor, SemanticPredictor) else None


def truth_reading(predictor: Predictor, truth_format: str, what: str) -> StoredLabels | None:
    """How a ground truth stored as ``truth_format`` is read: None for ``classes`` (class ids or the
    palette's colours), the model's training dataset's table for ``dataset``; a UserError naming
    ``what`` (the field or flag) where that dataset stores class ids."""
    if truth_format != "dataset":
        return None
    stored = stored_labels(predictor)
    if stored is None:
        raise UserError(f"{what} dataset: the model's training data ({predictor.meta.get('dataset', 'unknown')}) "
                        "stores class ids (or its palette's colours), which the default, classes, reads; leave it out")
    return stored


RUNNER_OPTIONS = ("mode", "mc_samples")  # what a predictor's runner is built from (inference.fast.make_runner)


def with_options(predictor: Predictor, options: dict[str, Any]) -> Predictor:
    """A predictor like ``predictor`` (same model, metadata, device and input contract) with
    ``options`` changed, passed by name to its class's constructor, which checks them; options it
    does not take are a UserError. The server's own choices are kept for the rest."""
    current = options_of(predictor)
    unknown = sorted(set(options) - set(current))
    if unknown:
        raise UserError(f"{' and '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not apply to "
                        f"{predictor.task} models")
    merged = {**current, **options}
    if "overlap" in options and merged.get("tile") is None:  # it would be answered as if it had acted
        raise UserError(f"overlap {options['overlap']} goes with tile (how much tiles overlap) and this request does "
                        "not tile; send tile too, or leave overlap out")
    if all(current[k] == v for k, v in options.items()):
        return predictor
    if any(merged[k] != current[k] for k in RUNNER_OPTIONS if k in current):
        return type(predictor)(predictor.model, predictor.meta, predictor.device, input_spec=predictor.input_spec,
                               **merged)
    # the server's runner serves these options too: an int8 runner keeps its calibration (which the
    # constructor would ask for again) and a fast one is not folded anew for each request
    assert isinstance(predictor, (SemanticPredictor, InstancePredictor))  # the classes that take mode
    changed = type(predictor)(predictor.model, predictor.meta, predictor.device, input_spec=predictor.input_spec,
                              **{**merged, "mode": "eager"})
    changed.mode, changed.runner = predictor.mode, predictor.runner
    return changed


def options_of(predictor: Predictor) -> dict[str, Any]:
    """The keyword-only options of the predictor's constructor, with the values it holds; overlap
    None where it does not tile (no overlap acted, as eval's record says; the constructor takes None
    as its default)."""
    params = inspect.signature(type(predictor).__init__).parameters
    options = {name: getattr(predictor, name) for name, p in params.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and hasattr(predictor, name)}
    if options.get("crf") is not None:  # settings, as JSON and as the constructor takes them back
        options["crf"] = dataclasses.asdict(options["crf"])
    if "overlap" in options and options.get("tile") is None:
        options["overlap"] = None
    return options


# ------------------------------------------------------------------ the application

class _SecurityHeaders:
    """ASGI middleware: ``X-Content-Type-Options: nosniff`` on every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Service:
    """What the routes share: the predictor, the pool, the samples and the limits."""

    def __init__(self, predictor: Predictor, config: ServeConfig, samples: list[Sample],
                 reload: Callable[[], Predictor] | None = None) -> None:
        self.predictor, self.config = predictor, config
        # --reload: how to load the checkpoint again once it is written over (a training run's new best)
        self._reload, self._reload_lock = reload, threading.Lock()
        self.reload_error: str | None = None  # why the last file seen could not be served, until another is
        self._refused: tuple[int, ...] | None = None  # that file's version: not tried again
        self.samples = {s.name: s for s in samples}
        # Monte-Carlo dropout samples behind a dropout model's uncertainty map: the predictor's own, else
        # the config's; 0 (a model without dropout, or --mc-samples 0) is the entropy of its probabilities
        own = predictor.mc_samples if isinstance(predictor, SemanticPredictor) else 0
        self.mc_samples = (own or config.uncertainty_samples) if has_dropout(predictor.model) else 0
        # Monte-Carlo dropout switches the shared model's dropout layers to sampling; no other
        # prediction may run meanwhile, so a model with dropout predicts one request at a time: its
        # pool has one worker whatever --workers says. (A lock inside the job would make the wait for
        # the model count against --timeout, as prediction time in `ms` and as `running` in health;
        # in the pool it is queue time, `queue_ms`, like any wait for a worker.)
        self.workers = 1 if self.mc_samples else config.workers
        self.pool = InferencePool(self.workers, config.queue, config.predict_timeout)
        # never contended (one worker); it keeps the rule true for a caller of predict() outside the pool
        self._model_lock: contextlib.AbstractContextManager = (threading.Lock() if self.mc_samples
                                                               else contextlib.nullcontext())
        self.name = str(predictor.meta.get("model", type(predictor.model).__name__))
        # which files it serves (name and SHA-256, as each mask predict writes records them), read now: a
        # file written over later (a training run's best.safetensors) is not what this server predicts with,
        # unless --reload loads it (refresh)
        self.model_files = source_files(predictor)

    def refresh(self) -> Predictor:
        """The predictor to answer with: with ``--reload``, a checkpoint written over since it was
        loaded is loaded now and served from here on (``/api/info`` names the new file's SHA-256). One
        that cannot be loaded, or holds a model this server cannot serve as it stands (another task, or
        dropout where the old had none or the other way round: the pool's size depends on it), is
        logged and reported as ``reload_error``; the old model goes on answering, and the file is
        tried again only once it changes again. Runs in a worker thread (loading takes seconds)."""
        p = self.predictor
        source = getattr(p, "source", None)
        if self._reload is None or source is None:
            return p
        now = file_version(source)
        if now is None or now in (p.source_version, self._refused):
            return p
        with self._reload_lock:
            if self.predictor is not p:  # another request loaded it meanwhile
                return self.predictor
            try:
                new = self._reload()
                if new.task != p.task:
                    raise UserError(f"it now holds {'an' if new.task == 'instance' else 'a'} {new.task} model; "
                                    f"this server serves {p.task} models: restart it")
                if has_dropout(new.model) != has_dropout(p.model):
                    raise UserError("its model " + ("has" if has_dropout(new.model) else "has no") + " dropout and "
                                    "the one served " + ("has" if has_dropout(p.model) else "has no") + " dropout "
                                    "(it predicts one request at a time with dropout): restart the server")
                files = source_files(new)
            except UserError as e:
                self._refused, self.reload_error = now, f"{source} was written over and not loaded: {e}"
                log.warning(shown(self.reload_error))
                return p
            self.predictor, self.model_files, self._refused, self.reload_error = new, files, None, None
            self.name = str(new.meta.get("model", type(new.model).__name__))
            sha = files[0]["sha256"][:12] if files and files[0] else "?"
            log.info(f"reloaded {source} ({self.name}, sha256 {sha}...): it answers from now on")
            return new

    def info(self) -> dict:
        p = self.refresh()
        clear = clear_class(p.class_names) if isinstance(p, SemanticPredictor) else None
        classes = [{"id": i, "name": n, "color": list(p.palette[i]) if i < len(p.palette) else [255, 255, 255],
                    "clear": i == clear} for i, n in enumerate(p.class_names)]
        uncertainty = None
        if isinstance(p, SemanticPredictor):
            uncertainty = "mc_dropout" if self.mc_samples else "entropy"
        return {
            "model": self.name, "model_files": self.model_files, "task": p.task, "version": __version__,
            "reload": {"enabled": self._reload is not None, "error": self.reload_error},
            "classes": classes,
            "input": {**p.input_spec.to_dict(), "description": p.input_spec.describe()},
            "options": options_of(p), "tta_modes": list(TTA_MODES), "uncertainty": uncertainty,
            "uncertainty_samples": self.mc_samples,
            "truth_formats": {"classes": "class ids, as predict writes them (255 = ignore), or the palette's colours",
                              **({"dataset": stored.describe} if (stored := stored_labels(p)) else {})},
            "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
                       "workers": self.workers, "queue": self.config.queue},
            # percent-encoded: a name with '#', '?' or '%' is a path, not a fragment or a query
            "samples": [{"name": s.name, "url": f"/api/samples/{quote(s.name, safe='')}",
                         "ground_truth_url": (f"/api/samples/{quote(s.name, safe='')}/ground_truth"
                                              if s.ground_truth else None)}
                        for s in self.samples.values()],
        }

    def keep(self, part: Part, role: str) -> None:
        """Save an upload as received into ``--keep-uploads DIR`` (never elsewhere)."""
        folder = self.config.keep_uploads
        assert folder is not None
        suffix = Path(part.filename or "").suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES else ".bin"
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{stamp}-{uuid.uuid4().hex[:12]}-{role}{suffix}", "xb") as f:
            f.write(part.data)

    def predictor_for(self, served: Predictor, options: dict[str, Any], uncertainty: bool) -> Predictor:
        """The ``served`` predictor with a request's options (a 422 when they do not fit); a model with
        dropout asked for uncertainty samples it, as ``pixelwise predict --uncertainty`` does."""
        try:
            predictor = with_options(served, options)
            if (uncertainty and self.mc_samples and isinstance(predictor, SemanticPredictor)
                    and not predictor.mc_samples):
                # Monte-Carlo dropout samples the model itself, in eager mode (as predict --uncertainty does
                # under --mode fast): a fast or int8 runner is a frozen copy without sampling dropout
                predictor = with_options(predictor, {"mc_samples": self.mc_samples, "mode": "eager"})
        except UserError as e:  # the predictor names its options as flags: --score-thresh -> score_thresh
            detail = re.sub(r"--([a-z]+(?:-[a-z]+)*)", lambda m: m[1].replace("-", "_"), str(e))
            raise UploadError(422, detail) from None
        return predictor

    def predict(self, image_part: Part, truth_part: Part | None, options: dict[str, Any], wanted: Wanted,
                queued: float) -> dict:
        """One request's work, in a worker thread: decode, predict, encode, score."""
        start = time.perf_counter()
        if self.config.keep_uploads is not None:
            self.keep(image_part, "image")
            if truth_part is not None:
                self.keep(truth_part, "ground_truth")
        p = self.refresh()
        image = decode_image(image_part.data, self.config.max_pixels, image_part.content_type)
        truth = None
        if truth_part is not None:
            truth = decode_mask(truth_part.data, self.config.max_pixels, p.palette, len(p.class_names),
                                image.shape[:2], truth_part.content_type, wanted.truth, ignore_colour(p),
                                truth_part.filename)
            if (truth == 255).all():  # scores of nothing: most likely a photo or another palette's colours
                raise UploadError(422, "the ground truth has no pixel of any class: every pixel is 255 (ignore) "
                                       "or a colour outside the model's palette; send a mask of class ids, or "
                                       "one coloured with the model's palette (GET /api/info)")
        with self._model_lock:  # a predictor's constructor sets the shared model's modes too
            predictor = self.predictor_for(p, options, wanted.uncertainty)
            crf = getattr(predictor, "crf", None)
            if crf is not None:  # before the model runs: too large a request is a 413, too fine settings a 422
                if image.shape[0] * image.shape[1] > MAX_CRF_PIXELS:
                    raise UploadError(413, f"the CRF refines images of up to {MAX_CRF_PIXELS:,} pixels and this one "
                                           f"has {image.shape[0] * image.shape[1]:,} ({image.shape[1]}x"
                                           f"{image.shape[0]}); send it with crf=false, or a smaller copy")
                try:
                    check_crf_size(image.shape[0], image.shape[1], settings=crf)
                except UserError as e:
                    raise UploadError(422, str(e)) from None
            if isinstance(predictor, SemanticPredictor):
                # the mask and entropy are filled band by band; the probabilities, which the answer
                # does not carry, are not kept (a 12-MP photo's would be 1.1 GB for 12 classes)
                pred = predictor.predict(image, uncertainty=wanted.uncertainty, probs=False)
                cancel.check()  # stopped during its last model batch: no need to encode the answer
                out = semantic_result(image, pred, p.class_names, p.palette, wanted.overlay, wanted.image)
                mask = pred.mask
            else:
                assert isinstance(predictor, InstancePredictor)
                det = predictor.predict(image)
                cancel.check()
                out, mask = instance_result(image, det, p.class_names, p.palette, wanted.overlay, wanted.image,
                                            p.meta.get("category_ids"))
        if truth is not None:
            out["metrics"] = compare(mask, truth, p.class_names)
        out["options"] = options_of(predictor)
        out["ms"] = round((time.perf_counter() - start) * 1000, 2)
        out["queue_ms"] = round((start - queued) * 1000, 2)
        return out


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(predictor: Predictor, config: ServeConfig | None = None, samples: list[Sample] | None = None,
               reload: Callable[[], Predictor] | None = None) -> FastAPI:
    """The page and the API around ``predictor``. ``samples``: the page's sample images (default:
    ``config.samples_dir``'s, else held-out synthetic scenes). ``reload``: how to load the
    predictor's checkpoint again (``serve --reload``: :meth:`Service.refresh`); None serves the
    model loaded at start for as long as the server runs."""
    config = config or ServeConfig()
    if Image.MAX_IMAGE_PIXELS is not None and config.max_pixels > Image.MAX_IMAGE_PIXELS:
        set_max_image_pixels(config.max_pixels)  # else PIL's own guard refuses images the server accepts
    if samples is None:
        if config.samples_dir is not None:
            stored = truth_reading(predictor, config.samples_truth_format, "--samples-truth-format")
            samples, problems = folder_samples(config.samples_dir, config.max_pixels, predictor.palette,
                                               len(predictor.class_names), stored, ignore_colour(predictor))
            for problem in problems:
                log.warning(shown(problem))
        else:
            samples = shapes_samples(predictor.class_names)
    service = Service(predictor, config, samples, reload)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        service.pool.close()

    app = FastAPI(title="pixelwise serve", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description=f"Segment images with `{service.name}` ({predictor.task}). Every `/api/` route "
                              + ("needs the API key (`X-API-Key` or `Authorization: Bearer`)." if config.api_key
                                 else "is open (no API key configured)."))
    app.state.service = service
    app.add_middleware(_SecurityHeaders)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization"], max_age=600,
                           expose_headers=["Retry-After", "WWW-Authenticate"])  # a 503's and a 401's advice

    def require_key(key: Annotated[str | None, Security(KEY_HEADER)] = None,
                    token: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None) -> None:
        if config.api_key is None:
            return
        given = key if key is not None else (token.credentials if token else None)
        if given is None or not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise HTTPException(401, "this server needs an API key: send it as X-API-Key or Authorization: Bearer",
                                headers={"WWW-Authenticate": "Bearer"})

    api = [Security(require_key)] if config.api_key else []

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, e: UploadError) -> JSONResponse:
        return _error(e.status, e.detail)

    @app.exception_handler(PoolFull)
    async def pool_full(request: Request, e: PoolFull) -> JSONResponse:
        return _error(503, str(e), {"Retry-After": str(e.retry_after)})

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", RevalidatedFiles(directory=STATIC), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi()), headers={"Content-Security-Policy": DOCS_CSP})

    @app.get("/api/health", response_model=HealthResponse, dependencies=api, responses={401: ERRORS[401]},
             summary="Liveness and the pool's load")
    async def health() -> dict:
        return {"status": "ok", "model": service.name, "pool": service.pool.stats()}

    @app.get("/api/info", dependencies=api, responses={401: ERRORS[401]},
             summary="The model: task, classes and palette, input contract, options, limits, samples")
    def info() -> dict:  # run in a thread: with --reload it may load the checkpoint again
        return service.info()

    @app.get("/api/samples/{name}", dependencies=api, summary="A sample image the page offers",
             responses={200: {"content": {"image/*": {}}}, 401: ERRORS[401], 404: {"model": ErrorResponse}})
    async def sample(name: str) -> Response:
        s = service.samples.get(name)
        if s is None:
            return _error(404, f"no sample named {name!r}")
        return Response(s.image, media_type=_media_type(s.image))

    @app.get("/api/samples/{name}/ground_truth", dependencies=api, summary="A sample's ground-truth mask (PNG)",
             responses={200: {"content": {"image/png": {}}}, 401: ERRORS[401], 404: {"model": ErrorResponse}})
    async def sample_truth(name: str) -> Response:
        s = service.samples.get(name)
        if s is None or s.ground_truth is None:
            return _error(404, f"no ground truth for a sample named {name!r}")
        return Response(s.ground_truth, media_type="image/png")

    @app.post("/api/predict", dependencies=api, response_model=PredictResponse, responses=ERRORS,
              openapi_extra=PREDICT_BODY, summary="Segment one image",
              description="Multipart form with the image in field `image`. Returns the mask and overlay PNGs "
                          "`pixelwise predict` writes, the classes' pixel shares, instances for instance models, "
                          "and scores against `ground_truth` when one is sent.")
    async def predict(request: Request) -> JSONResponse:
        ticket = service.pool.admit()  # PoolFull -> 503 before the body is read
        try:
            if request.query_params:  # an option there would be ignored: the answer would use the defaults
                names = ", ".join(sorted(set(request.query_params.keys())))
                raise UploadError(422, f"options go in the multipart form, not in the query string (got {names}): "
                                       "send each as a form field, e.g. curl -F score_thresh=0.3")
            try:
                form = await asyncio.wait_for(read_multipart(
                    request.headers.get("content-type", ""), request.headers.get("content-length"),
                    request.stream(), config.max_upload_bytes), config.upload_timeout)
            except asyncio.TimeoutError:
                raise UploadError(408, f"the upload took longer than {config.upload_timeout:g} s") from None
            except ClientDisconnect:
                return _error(400, "the client went away before its upload ended")
            image = form.get("image")
            if image is None or (image.filename is None and not image.data):
                raise UploadError(422, "the form has no field 'image' (send the image file in the field 'image')")
            truth = form.get("ground_truth")
            if truth is not None and not truth.data:
                if truth.filename:  # a file was chosen and it is empty (the page's empty input has no name)
                    raise UploadError(400, "the ground-truth mask is empty")
                truth = None
            options, wanted = parse_options(form, service.predictor)
            queued = time.perf_counter()  # the upload is in: from here on it waits for a worker (queue_ms)
            job = asyncio.ensure_future(service.pool.run(ticket, service.predict, image, truth, options,
                                                         wanted, queued))
            gone = asyncio.ensure_future(_disconnected(request))
            try:  # a client that goes away cancels its job: no worker predicts for nobody
                await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when this task is cancelled (the server stops): the job stops too
                gone.cancel()
                job.cancel()
            if not job.done() or job.cancelled():
                log.info("POST /api/predict: the client went away; its prediction was stopped")
                return _error(400, "the client went away before its prediction was ready")
            return JSONResponse(job.result())
        except TimedOut as e:
            return _error(504, f"{e} (--timeout); send a smaller image, larger tiles or less test-time augmentation")
        except (UploadError, PoolFull):
            raise
        except asyncio.CancelledError:
            # the server stops (Ctrl-C, SIGTERM) and this request outlived its grace period: uvicorn
            # cancels its task. Its job was stopped above; the client gets an answer it can act on
            # (uvicorn's own would be a plain-text 500) and the log one line, not a traceback.
            uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()  # handled: this task goes on to send the answer
            log.info("POST /api/predict: the server is shutting down; its prediction was stopped (503)")
            return _error(503, "the server is shutting down; retry, on this server once it is back or on another",
                          {"Retry-After": str(SHUTDOWN_RETRY_AFTER)})
        except Exception as e:  # never let one request take the server down: log it, answer 500
            log.exception("POST /api/predict failed")
            return _error(500, f"the prediction failed on the server ({type(e).__name__}: {e})")
        finally:
            if not ticket.submitted:
                ticket.release()

    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client of ``request`` (whose body has been read) goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _media_type(data: bytes) -> str:
    for magic, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp"), (b"RIFF", "image/webp")):
        if data.startswith(magic):
            return kind
    return "application/octet-stream"


def render_docs(schema: dict) -> str:
    """The OpenAPI schema as one static HTML page (no scripts, nothing from another host)."""
    e = html.escape
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(schema['info']['title'])} API</title>"
           "<link rel=stylesheet href=/static/style.css></head><body class=docs><main>",
           f"<h1>{e(schema['info']['title'])} API <small>{e(schema['info']['version'])}</small></h1>",
           f"<p>{e(schema['info'].get('description', ''))}</p>",
           "<p>Machine-readable: <a href=/openapi.json>/openapi.json</a>. Page: <a href=/>/</a>.</p>"]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            out.append(f"<section><h2><code>{method.upper()} {e(path)}</code></h2><p>{e(op.get('summary', ''))}</p>")
            if op.get("description"):
                out.append(f"<p>{e(op['description'])}</p>")
            body = op.get("requestBody", {}).get("content", {})
            for ctype, content in body.items():
                props = content.get("schema", {}).get("properties", {})
                required = set(content.get("schema", {}).get("required", []))
                out.append(f"<h3>Body: <code>{e(ctype)}</code></h3><table><tr><th>field</th><th>type</th>"
                           "<th>description</th></tr>")
                for name, prop in props.items():
                    kind = prop.get("format", prop.get("type", "")) + (" (required)" if name in required else "")
                    enum = f" One of: {', '.join(map(str, prop['enum']))}." if "enum" in prop else ""
                    out.append(f"<tr><td><code>{e(name)}</code></td><td>{e(kind)}</td>"
                               f"<td>{e(prop.get('description', ''))}{e(enum)}</td></tr>")
                out.append("</table>")
            out.append("<h3>Responses</h3><ul>")
            for code, resp in op.get("responses", {}).items():
                out.append(f"<li><code>{e(str(code))}</code> {e(resp.get('description', ''))}</li>")
            out.append("</ul></section>")
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("PredictResponse", "Metrics", "ClassShare", "Instance"):
        if name in schemas:
            out.append(f"<section><h2>{e(name)}</h2><table><tr><th>field</th><th>description</th></tr>")
            for field_name, prop in schemas[name].get("properties", {}).items():
                out.append(f"<tr><td><code>{e(field_name)}</code></td><td>{e(prop.get('description', ''))}</td></tr>")
            out.append("</table></section>")
    out.append("</main></body></html>")
    return "\n".join(out)


@contextlib.contextmanager
def _stderr_logging() -> Iterator[None]:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pixelwise serve: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)


class _Server(uvicorn.Server):
    """uvicorn's server, which also remembers the signal that stopped it (for the exit status),
    prints the start-up banner once it listens (with the port bound, also for ``--port 0``), and
    does not raise that signal again once it has shut down (uvicorn re-raises it for the handler it
    replaced: the CLI's SIGTERM handler would then unwind as an interruption, the default one would
    kill the process, and :func:`uvicorn.run` swallows Ctrl-C's KeyboardInterrupt)."""

    def __init__(self, config: uvicorn.Config, banner: Callable[[int], None]) -> None:
        super().__init__(config)
        self.banner = banner
        self.stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        super().handle_exit(sig, frame)  # the first signal shuts down gracefully, a second Ctrl-C at once

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.banner(self.servers[0].sockets[0].getsockname()[1])


def exit_status(stopped_by: int | None) -> int:
    """0 when the server stopped on its own; 128 + the signal's number after one (130 after Ctrl-C,
    143 after SIGTERM), as for every verb."""
    return 0 if stopped_by is None else 128 + stopped_by


def run(predictor: Predictor, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info", reload: Callable[[], Predictor] | None = None) -> int:
    """Serve ``predictor`` on ``host:port`` until Ctrl-C or SIGTERM; -> the exit status
    (:func:`exit_status`). ``port`` 0: a free port, which the banner names. ``reload``: as in
    :func:`create_app`."""
    with _stderr_logging():
        app = create_app(predictor, config, reload=reload)
        warning = host_warning(host, config.api_key)
        if warning:
            print(f"pixelwise serve: {warning}", file=sys.stderr)
        shown = f"[{host}]" if ":" in host else host
        service: Service = app.state.service
        workers = f"{service.workers} worker(s)"
        if service.workers < config.workers:
            workers += " (the model has dropout: it predicts one request at a time)"

        def banner(bound: int) -> None:
            print(f"pixelwise serve: {service.name} ({predictor.task}, {len(predictor.class_names)} classes, input: "
                  f"{predictor.input_spec.describe()}) on http://{shown}:{bound}/ (API reference: /docs; "
                  f"{workers}, room for {config.queue} waiting"
                  + (", API key required" if config.api_key else "") + ")", flush=True)

        # on Ctrl-C or SIGTERM, predictions still running after GRACE_SECONDS are stopped at their next
        # model batch and answered 503
        server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False,
                                        timeout_graceful_shutdown=GRACE_SECONDS, use_colors=log_colours()), banner)
        server.run()
        status = exit_status(server.stopped_by)
        if status:
            name = signal.Signals(server.stopped_by).name if server.stopped_by else ""
            print(f"pixelwise serve: stopped by {name} (exit status {status})", file=sys.stderr, flush=True)
        return status
