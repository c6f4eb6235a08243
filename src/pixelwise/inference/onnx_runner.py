"""Running an exported ONNX file (``pixelwise predict --onnx FILE``, ``bench --mode onnx``).

:func:`load_onnx` reads a file written by :func:`pixelwise.inference.export.export_onnx` and
returns an :class:`OnnxModel` (an ``nn.Module`` whose forward is an onnxruntime session, so the
predictors, tiling and TTA use it like the PyTorch model) and the metadata that export stored in
the file: model name and kwargs, task, class names, palette and the input contract, i.e. what
:func:`pixelwise.checkpoint.load_checkpoint` returns for a checkpoint. The model's tiling
geometry stored there (``geometry``: ``context`` and ``alignment``, see
:mod:`pixelwise.inference.tiling`) becomes the :class:`OnnxModel`'s attributes of those names, so
that tiled prediction cuts the tiles the PyTorch model gets; a file exported without it (before
pixelwise stored it) tiles as a model that states neither.

onnxruntime is an optional dependency (``pip install -e '.[export]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pixelwise.checkpoint import input_spec_from_meta, metadata_problem
from pixelwise.errors import UserError, not_a_file
from pixelwise.preprocess import InputSpec

META_KEY = "pixelwise"  # metadata_props key holding the JSON metadata (the checkpoint's, plus "onnx")


def require_onnxruntime():
    """The onnxruntime module, or a UserError saying how to install it."""
    try:
        import onnxruntime  # optional dependency (the export extra)
    except ImportError:
        raise UserError("ONNX needs onnxruntime: pip install -e '.[export]'") from None
    return onnxruntime


def require_export_extra() -> None:
    """A UserError saying how to install them unless onnx and onnxruntime, which an export writes
    and verifies with, can be imported (checked before any work)."""
    try:
        import onnx  # noqa: F401  optional dependency (the export extra)
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime (onnx is not installed): "
                        "pip install -e '.[export]'") from None
    require_onnxruntime()


def is_onnx(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".onnx")


def session_options(threads: int | None = None):
    """onnxruntime session options: all graph optimisations, ``threads`` intra-op threads (default:
    torch's thread count, so that both runtimes are compared on the same cores)."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return opts


def make_session(model: str | os.PathLike | bytes, threads: int | None = None, *, name: str | None = None):
    """An onnxruntime CPU session on a file or serialized model. ``name``: what a load failure
    calls the model (default: its path), e.g. ``"the export at opset 11"`` for a temporary file
    that will not exist by the time the user reads the message."""
    ort = require_onnxruntime()
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        where = name or ("the model" if isinstance(model, bytes) else str(model))
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if name and isinstance(source, str):  # onnxruntime's message may name the (temporary) file too
            detail = detail.replace(source, "the file")
        raise UserError(f"onnxruntime cannot load {where}: {detail}") from None


class OnnxModel(nn.Module):
    """A semantic model run by onnxruntime: ``Tensor[N, C, H, W]`` (float32, preprocessed) ->
    logits ``Tensor[N, num_classes, H, W]`` (float32), computed on the CPU and returned on the
    input's device. Has no parameters; ``.to()``, ``.eval()`` are no-ops for it. ``context`` and
    ``alignment``: the exported model's tiling geometry
    (:func:`pixelwise.inference.tiling.model_geometry` reads them)."""

    def __init__(self, session, context: int = 0, alignment: int = 1, name: str = "the ONNX file") -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.context, self.alignment = context, alignment
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())}
        try:
            out = self.session.run(None, feed)[0]
        except MemoryError:
            raise  # the CLI's own out-of-memory line
        except Exception as e:  # onnxruntime's InvalidArgument, Fail, ...: e.g. a graph fixed to another size
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"onnxruntime cannot run {self.name} on a {list(x.shape)} input: {detail}") from None
        return torch.from_numpy(out).float().to(x.device)


def graph_problem(session) -> str | None:
    """What makes an onnxruntime session's graph unlike a pixelwise export (one float32 input
    [N, C, H, W], a first output [N, classes, H, W]), or None."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        return f"graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}), not one image batch"
    if len(inputs[0].shape) != 4 or inputs[0].type != "tensor(float)":
        return (f"graph's input {inputs[0].name} is a {inputs[0].type} of shape {inputs[0].shape}, not a "
                "float32 [N, C, H, W] batch")
    if not outputs or len(outputs[0].shape) != 4 or outputs[0].type not in ("tensor(float)", "tensor(float16)"):
        what = f"a {outputs[0].type} of shape {outputs[0].shape}" if outputs else "nothing"
        return f"graph gives {what}, not float [N, classes, H, W] scores"
    return None


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The pixelwise metadata stored in an exported file (``{}`` for an ONNX file from elsewhere)."""
    try:
        import onnx  # optional dependency (the export extra)
    except ImportError:
        raise UserError("reading ONNX files needs onnx: pip install -e '.[export]'") from None
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise UserError(f"{path}: no such ONNX file" if problem == "file not found" else f"{path}: {problem}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__}); export one with "
                        "`pixelwise export --checkpoint CKPT --format onnx --out FILE`") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        return {}
    try:
        meta = json.loads(props[META_KEY])
    except ValueError as e:
        meta = e
    except RecursionError:  # nested deeper than Python's recursion limit
        meta = ValueError("nested too deeply")
    if not isinstance(meta, dict):
        raise UserError(f"{path}: its pixelwise metadata is not a JSON object ({meta}); the file is damaged: export "
                        "it again with `pixelwise export`")
    if not isinstance(meta.get("onnx", {}), dict):  # what the export recorded of itself: read by bench and predict
        raise UserError(f"{path}: its pixelwise metadata's onnx entry is {meta['onnx']!r}, not an object; the file "
                        "is damaged: export it again with `pixelwise export`")
    return meta


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> tuple[OnnxModel, dict]:
    """``(OnnxModel, metadata)`` of a file written by ``pixelwise export``. The metadata has the
    checkpoint's keys (``model task num_classes class_names palette input ...``) plus ``onnx``
    (opset, fp16, int8, what the export verified)."""
    meta = read_onnx_metadata(path)
    if not meta:
        raise UserError(f"{path} has no pixelwise metadata (input contract, classes); export it with "
                        "`pixelwise export`")
    if meta.get("task", "semantic") != "semantic":
        raise UserError(f"{path} holds part of an {meta.get('task')} model (Mask R-CNN); only semantic models run "
                        "with --onnx")
    problem = metadata_problem(meta)
    if problem is None and "input" not in meta:  # an older file's top-level mean and std, read as load_checkpoint
        try:
            input_spec_from_meta(meta)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    session = make_session(path, threads)
    graph = graph_problem(session)
    if graph:
        raise UserError(f"{path}: the {graph}; run only files written by `pixelwise export`")
    if problem is None:  # the stored contract and classes against the graph's own shapes
        _, channels, height, width = session.get_inputs()[0].shape
        classes = session.get_outputs()[0].shape[1]
        spec = InputSpec.from_dict(meta["input"]) if "input" in meta else None
        expected = spec.channels if spec else 3
        fixed = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        if isinstance(channels, int) and channels != expected:
            problem = f"input contract gives {expected} channel(s), and the graph takes {channels}"
        elif isinstance(classes, int) and classes != meta["num_classes"]:
            problem = f"num_classes is {meta['num_classes']}, and the graph gives {classes} class scores"
        elif spec and spec.resize and fixed and tuple(spec.resize) != fixed:  # every image would fail at its run
            problem = (f"input contract resizes images to {spec.resize[1]}x{spec.resize[0]}, and the graph takes only "
                       f"{width}x{height} inputs")
    if problem:
        raise UserError(f"{path}: the stored {problem}; the file is damaged: export it again with `pixelwise export`")
    return OnnxModel(session, *stored_geometry(path, meta), name=str(path)), meta


def exported_dropout(meta: dict) -> bool | None:
    """Whether the model an exported file was traced from had dropout layers (``onnx.dropout`` in
    its metadata): the file has none (export traces in eval mode), so it cannot give that model's
    Monte-Carlo dropout. None for a file exported before pixelwise recorded it."""
    value = (meta.get("onnx") or {}).get("dropout")
    return value if isinstance(value, bool) else None


def stored_geometry(path: str | os.PathLike, meta: dict) -> tuple[int, int]:
    """``(context, alignment)`` stored in an exported file's metadata; ``(0, 1)``, what a model
    that states neither gets, for a file exported before pixelwise stored them."""
    geometry = meta.get("geometry", {})
    stated = geometry if isinstance(geometry, dict) else {"context": None}
    context, alignment = stated.get("context", 0), stated.get("alignment", 1)
    if not (isinstance(context, int) and isinstance(alignment, int) and context >= 0 and alignment >= 1):
        raise UserError(f"{path}: its stored tiling geometry {geometry} is not a context >= 0 and an alignment >= 1 "
                        "(integers); the file is damaged: export it again with `pixelwise export`")
    return context, alignment
