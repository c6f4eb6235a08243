"""ONNX export of semantic models (``pixelwise export``), verified on export.

:func:`export_onnx` writes one ONNX file whose input ``image`` (``float32[N, C, H, W]``, the
preprocessed image, see :mod:`pixelwise.preprocess`) and output ``logits`` (``float32[N,
num_classes, H, W]``) have dynamic batch, height and width, with the checkpoint's metadata (model
name and kwargs, class names, palette, the input contract, the tiling geometry) in the file's
``metadata_props`` (:func:`pixelwise.inference.onnx_runner.read_onnx_metadata` reads it back).
The geometry (``{"context": ..., "alignment": ...}``, what the model states for tiled inference,
see :func:`pixelwise.inference.tiling.model_geometry`) is what lets ``predict --onnx --tile`` cut
the same tiles as the checkpoint does.

How: the model is traced by ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter: a
few seconds, and every size computation inside the models is written as arithmetic on the traced
sizes, so one graph serves every input size). Index unpooling (SegNet, DeconvNet) has no ONNX
exporter of its own in torch; :func:`_max_unpool2d_symbolic` maps it to ONNX ``MaxUnpool``.

Verified on export: onnxruntime runs the written file on two input sizes (the contract's size,
or 256 x 320, and a second one with other batch, height and width, so that at least one of the
two needs the models' padding) and
compares with PyTorch eager float32: the largest absolute logit difference and the share of
pixels whose argmax agrees are reported, and below ``min_agreement`` (99.9%) the export fails
with a :class:`~pixelwise.errors.UserError` and no file is left behind (written to a temporary
file, renamed only once verified).

Every file written (float32, float16, int8, the Mask R-CNN parts) passes ``onnx.checker`` before
it is renamed into place; a file onnxruntime cannot load fails with a message that names the
opset (:func:`load_for_verification`). The metadata records whether the model had dropout
(``onnx.dropout``): the file never has (it is traced in eval mode).

``fp16=True`` stores weights and activations in float16 (inputs and outputs stay float32), via
onnxruntime's ``float16`` converter, the graph sorted again after it (:func:`sort_graph`);
``int8`` calibration data gives a statically quantised file
(:func:`quantize_int8`: QDQ, per-channel int8 weights, uint8 activations).

Mask R-CNN: :func:`export_maskrcnn_parts` (see ``docs/deploy.md`` for what does not export and why).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise._version import __version__
from pixelwise.checkpoint import atomic_write, input_spec_from_meta
from pixelwise.errors import UserError
from pixelwise.inference.mc_dropout import has_dropout
from pixelwise.inference.onnx_runner import META_KEY, make_session, require_export_extra
from pixelwise.inference.tiling import model_geometry
from pixelwise.models import Logits, forward_logits, kept_as_it_was
from pixelwise.models.maskrcnn import MaskRCNN
from pixelwise.weights import first_non_finite

DEFAULT_OPSET = 17
# The oldest opset each precision exports at (found by exporting the zoo): float32 needs 11
# (bilinear resizing with align_corners, max-unpooling), the float16 conversion 12, int8's
# per-channel quantisation 13. The newest is the newest torch's TorchScript-based exporter writes
# (23 for torch 2.13).
MIN_OPSET = {"float32": 11, "float16": 12, "int8": 13}
MAX_OPSET = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 20)
MIN_AGREEMENT = 0.999
DEFAULT_SIZE = (256, 320)
META_KEYS = ("model", "model_kwargs", "task", "num_classes", "class_names", "palette", "ignore_color", "input",
             "dataset", "data")  # data: the split it trained on, for eval's overlap note


@dataclass
class SizeCheck:
    """onnxruntime against PyTorch eager float32 on one random batch of ``shape`` (N, C, H, W)."""

    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_logit: float
    agreement: float  # share of pixels whose argmax class is the same
    classes: int = 0  # the class scores per pixel, PyTorch's


@dataclass
class ExportReport:
    path: str
    opset: int
    precision: str  # "float32", "float16" or "int8"
    seconds: float  # export + verification
    bytes: int
    checks: list[SizeCheck] = field(default_factory=list)
    agreement_of: str = "argmax"  # Mask R-CNN's parts: "objectness sign" and "class argmax"
    runtime: str = "onnxruntime"  # what ran the written file: "torch.export" for a .pt2 (opset 0)

    def summary(self) -> str:
        parts = [f"{'x'.join(map(str, c.shape[2:]))} (batch {c.shape[0]}): max |logit diff| "
                 f"{c.max_abs_diff:.3g} (of |logits| up to {c.max_abs_logit:.3g}), {self.agreement_of} agreement "
                 f"{100 * c.agreement:.3f}%" for c in self.checks]
        opset = f"opset {self.opset}, " if self.opset else ""
        return (f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB, {opset}{self.precision}, "
                f"{self.seconds:.1f} s); {self.runtime} vs PyTorch eager: " + "; ".join(parts))


# --------------------------------------------------------------------------- max unpooling


def _max_unpool2d_symbolic(g, x, indices, output_size):
    """ONNX for ``aten::max_unpool2d`` (2x2 / stride 2, SegNet's and DeconvNet's unpooling).

    PyTorch's indices are flat positions within each H*W plane; ONNX ``MaxUnpool`` wants them flat
    over the whole N*C*H*W tensor, which is what ONNX ``MaxPool`` returns: torch's exporter turns
    those into per-plane indices by subtracting each plane's first index (``Sub``), so the ONNX
    indices are taken from before that subtraction. Without ``output_shape`` the output is 2h x 2w:
    SegNet and DeconvNet pad their input to a multiple of their deepest stride, so the pre-pool
    sizes are always even (``pixelwise.layers.unpool`` checks it while tracing). Computing the
    offsets from traced sizes instead is not safe: where onnx shape inference gives up (after
    DeconvNet's computed padding) the exporter freezes sizes at their traced values."""
    node = indices.node()
    if node.kind() != "onnx::Sub" or next(node.inputs()).node().kind() != "onnx::MaxPool":
        raise UserError("ONNX export of max unpooling needs the indices of a max pool of the same graph")
    flat = next(node.inputs())
    return g.op("MaxUnpool", x, flat, kernel_shape_i=[2, 2], strides_i=[2, 2])


def _register_symbolics(opset: int) -> None:
    torch.onnx.register_custom_op_symbolic("aten::max_unpool2d", _max_unpool2d_symbolic, opset)


# --------------------------------------------------------------------------- export


def verification_sizes(meta: dict | None) -> list[tuple[int, int, int]]:
    """``(batch, H, W)`` of the two verification runs: the contract's size (else 256 x 320) with
    batch 1, and about 3/4 x 5/4 of it plus an odd offset with batch 2."""
    spec = input_spec_from_meta(meta) if meta else None
    h, w = spec.resize if spec is not None and spec.resize else DEFAULT_SIZE
    return [(1, h, w), (2, max(3 * h // 4 + 5, 33), 5 * w // 4 + 3)]


def sample_batch(n: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random batch in normalised units (noise at 1/8 resolution, upsampled, plus fine
    noise): closer to image statistics than white noise, so argmax agreement is measured on
    regions and edges rather than on per-pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, max(h // 8, 1), max(w // 8, 1), generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return x + 0.2 * torch.randn(n, channels, h, w, generator=g)


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    """Logits of an onnxruntime session on one batch (float32)."""
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float()


def compare(reference: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    """``(max |difference|, max |reference|, argmax agreement)`` of two logit batches."""
    if got.shape != reference.shape:
        raise UserError(f"the exported model returned {tuple(got.shape)} for logits of shape "
                        f"{tuple(reference.shape)}")
    diff = (got - reference).abs().max().item()
    agree = (got.argmax(1) == reference.argmax(1)).float().mean().item()
    return diff, reference.abs().max().item(), agree


def refuse_non_finite(model: nn.Module) -> None:
    """A model whose weights hold NaN or infinite values is not exported: its outputs, NaN on both
    sides, would verify as agreeing."""
    bad = first_non_finite(model.state_dict())
    if bad is not None:
        raise UserError(f"the model's weight {bad} holds NaN or infinite values (its training diverged?); nothing "
                        "written")


def verify(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], sizes: Sequence[tuple[int, int, int]],
           channels: int = 3) -> list[SizeCheck]:
    """Run the exported model (``run``: a batch to its logits) and PyTorch eager on a random batch of
    every ``(batch, H, W)``."""
    checks = []
    for i, (n, h, w) in enumerate(sizes):
        x = sample_batch(n, channels, h, w, seed=i)
        with torch.no_grad():
            reference = forward_logits(model, x).float()
        if not bool(torch.isfinite(reference).all()):  # NaN logits argmax alike on both sides: "100%"
            raise UserError(f"export verification failed: the model's own logits hold NaN or infinite values at "
                            f"{h}x{w} (its weights?); nothing written")
        diff, scale, agree = compare(reference, run(x))
        checks.append(SizeCheck((n, channels, h, w), diff, scale, agree, int(reference.shape[1])))
    return checks


def require_agreement(checks: Sequence[SizeCheck], min_agreement: float, whose: str) -> None:
    """A UserError (nothing is written) where the argmax of ``whose`` (``"onnxruntime's"``) agrees
    with PyTorch's on less than ``min_agreement`` of the pixels at some verification size."""
    worst = min(checks, key=lambda c: c.agreement)
    if worst.agreement < min_agreement:
        raise UserError(f"export verification failed: {whose} argmax agrees with PyTorch on "
                        f"{100 * worst.agreement:.3f}% of pixels at {worst.shape[2]}x{worst.shape[3]} (needs "
                        f"{100 * min_agreement:.15g}%; max |logit diff| {worst.max_abs_diff:.3g}); nothing written")


def onnx_metadata(meta: dict | None, model_name: str, extra: dict, model: nn.Module | None = None,
                  key: str = "onnx") -> dict:
    """The JSON stored under ``metadata_props["pixelwise"]`` (and a ``.pt2``'s ``pixelwise.json``):
    the checkpoint's metadata keys that describe how to run the model, plus ``extra`` under ``key``
    (``onnx``, or ``pt2``) and, given the ``model``,
    ``geometry``: ``{"context": ..., "alignment": ...}`` (:func:`model_geometry`), which
    :func:`pixelwise.inference.onnx_runner.load_onnx` gives the ONNX model so that it tiles as
    the model does."""
    meta = dict(meta or {})
    out = {k: meta[k] for k in META_KEYS if k in meta}
    out.setdefault("model", model_name)
    out.setdefault("task", "semantic")
    out["input"] = input_spec_from_meta(meta, model).to_dict()  # without a checkpoint's: the model's own
    if model is not None:
        context, alignment = model_geometry(model)
        out["geometry"] = {"context": context, "alignment": alignment}
    out["pixelwise_version"] = __version__
    out[key] = extra
    return out


def _write_metadata(path: str, info: dict, classes: int | None = None) -> None:
    """Write ``info`` into the ONNX file's metadata; with ``classes``, the output's class axis
    (axis 1) is that number in the graph, where the tracer can leave a symbol (a crop or a resize
    as the last node: ENet, SegNet-Basic, DeepLabV3+), which shape-checking runtimes read."""
    import onnx  # optional dependency (the export extra)

    model = onnx.load(path)
    if classes is not None:
        dims = model.graph.output[0].type.tensor_type.shape.dim
        dims[1].dim_value = classes  # replaces a dim_param (one of the two is set)
    del model.metadata_props[:]
    entries = {META_KEY: json.dumps(info)}
    entries.update({f"{META_KEY}.{k}": json.dumps(info[k])
                    for k in ("model", "input", "geometry", "class_names", "palette") if k in info})
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    model.producer_name, model.producer_version = "pixelwise", __version__
    onnx.save(model, path)


def _trace_to_onnx(model: nn.Module, path: str, shape: tuple[int, ...], opset: int) -> None:
    _register_symbolics(opset)
    wrapped = Logits(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about sizes: the verification below is what counts
        torch.onnx.export(wrapped, (torch.zeros(shape),), path, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "logits": {0: "batch", 2: "height", 3: "width"}})


def _to_fp16(path: str) -> None:
    """float16 weights and activations, float32 inputs and outputs. The converter appends the Cast
    of each kept-float32 input after the nodes that read it; the graph is sorted again, since
    the ONNX spec (the checker, the reference runtime, strict converters) wants producers first."""
    import onnx  # optional dependency (the export extra)
    from onnxruntime.transformers.float16 import convert_float_to_float16  # optional dependency (the export extra)

    model = convert_float_to_float16(onnx.load(path), keep_io_types=True)
    sort_graph(model.graph)
    onnx.save(model, path)


def _subgraphs(node) -> list:
    """The graphs held by a node's attributes (If, Loop, Scan bodies)."""
    out = []
    for attr in node.attribute:
        if attr.HasField("g"):
            out.append(attr.g)
        out.extend(attr.graphs)
    return out


def _names_read(node) -> set[str]:
    """Every value a node reads: its inputs and, for a node with subgraphs, the outer values its
    subgraphs read (what a subgraph produces or takes as input is its own)."""
    names = {i for i in node.input if i}
    for graph in _subgraphs(node):
        own = {i.name for i in graph.input} | {i.name for i in graph.initializer}
        own |= {o for n in graph.node for o in n.output}
        for n in graph.node:
            names |= _names_read(n) - own
    return names


def sort_graph(graph) -> None:
    """Sort ``graph``'s nodes (an ``onnx.GraphProto``, in place; its subgraphs too) topologically:
    every node after the nodes that produce its inputs, the original order kept wherever it
    already is one (a stable Kahn sort). Values produced by no node of the graph (inputs,
    initializers, a subgraph's outer values) are ready from the start. A cycle raises UserError."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    needs = [{producer[x] for x in _names_read(n) if x in producer} - {k} for k, n in enumerate(nodes)]
    readers: list[list[int]] = [[] for _ in nodes]
    for k, deps in enumerate(needs):
        for d in deps:
            readers[d].append(k)
    waiting = [len(deps) for deps in needs]
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers[k]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise UserError("the exported ONNX graph has a cycle; nothing written")
    for node in nodes:
        for sub in _subgraphs(node):
            sort_graph(sub)
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[k] for k in order)


def check_onnx_file(path: str, opset: int, what: str = "the export") -> None:
    """``onnx.checker.check_model`` on a file about to be written (each export checks every file
    it writes before renaming it into place): a UserError naming the opset when it fails."""
    import onnx  # optional dependency (the export extra)

    try:
        onnx.checker.check_model(path)
    except Exception as e:  # onnx.checker.ValidationError and the C++ checker's own
        raise UserError(f"{what} at opset {opset} is not valid ONNX ({str(e).strip().splitlines()[0]}); nothing "
                        f"written{_newer_opset_hint(opset)}") from None


def _newer_opset_hint(opset: int) -> str:
    """What may get a file that onnx or onnxruntime refuse at ``opset`` written: a newer opset
    (an operator the old one cannot express), or, above the default, an older one or a newer onnx
    and onnxruntime (a file of a newer opset or IR version than the installed ones read)."""
    hint = f"; a newer --opset (up to {MAX_OPSET}) may express it" if opset < MAX_OPSET else ""
    if opset > DEFAULT_OPSET:
        hint += (f"; or the installed onnx and onnxruntime may not read opset {opset} yet: give an older --opset "
                 f"(the default is {DEFAULT_OPSET}) or upgrade them (pip install -U onnx onnxruntime)")
    return hint


def load_for_verification(path: str, opset: int, what: str = "the export"):
    """An onnxruntime session on the file being exported; a UserError that names the opset (not
    the temporary file) when onnxruntime cannot load it."""
    try:
        return make_session(path, name=f"{what} at opset {opset}")
    except UserError as e:
        raise UserError(f"{e}; nothing written{_newer_opset_hint(opset)}") from None


def check_opset(opset: int, precision: str = "float32") -> None:
    """A one-line UserError unless this torch can export the zoo at ``opset`` in ``precision``
    (float32, float16 or int8)."""
    low = MIN_OPSET[precision]
    if not low <= opset <= MAX_OPSET:
        which = "" if precision == "float32" else f" with {precision}"
        raise UserError(f"--opset {opset} is not supported{which}: give {low} to {MAX_OPSET} (default {DEFAULT_OPSET})")


def export_onnx(model: nn.Module, out: str | os.PathLike, meta: dict | None = None, *, model_name: str = "",
                opset: int = DEFAULT_OPSET, fp16: bool = False,
                calibration: Iterable[torch.Tensor] | None = None,
                sizes: Sequence[tuple[int, int, int]] | None = None,
                min_agreement: float = MIN_AGREEMENT, replace: bool = True) -> ExportReport:
    """Export a semantic ``model`` to ONNX at ``out`` and verify it (module docstring).

    meta: the checkpoint's metadata (input contract, classes, palette, model name), stored in the
    file. calibration: preprocessed batches ``Tensor[N, C, H, W]`` to calibrate an int8 file
    (:func:`quantize_int8`); its verification threshold is the caller's ``min_agreement``.
    sizes: ``(batch, H, W)`` of the verification runs (default :func:`verification_sizes`).
    Raises UserError (and writes nothing) if onnxruntime's argmax agrees with PyTorch's on less
    than ``min_agreement`` of the pixels at any size. ``replace=False``: a file at ``out`` by the
    time the export is done (another process wrote it since the caller's check) is left as it is, a
    UserError. The model is traced on the CPU in eval mode and put back on its own device, in its
    own mode, afterwards.
    """
    require_export_extra()
    with kept_as_it_was(model):
        return _export_onnx(model, out, meta, model_name=model_name, opset=opset, fp16=fp16,
                            calibration=calibration, sizes=sizes, min_agreement=min_agreement, replace=replace)


def _export_onnx(model: nn.Module, out: str | os.PathLike, meta: dict | None, *, model_name: str, opset: int,
                 fp16: bool, calibration: Iterable[torch.Tensor] | None,
                 sizes: Sequence[tuple[int, int, int]] | None, min_agreement: float, replace: bool) -> ExportReport:
    if meta and meta.get("task", "semantic") != "semantic":
        raise UserError(f"{meta.get('model')} is an instance model: use export_maskrcnn_parts")
    if fp16 and calibration is not None:
        raise UserError("choose one of fp16 and int8")
    if math.isnan(min_agreement):
        raise UserError("min_agreement must be a number, got nan")
    if calibration is not None:
        calibration = list(calibration)
        if not calibration:  # onnxruntime's "No data is collected" traceback otherwise
            raise UserError("an int8 export needs calibration batches (preprocessed images), and none were given")
    start = time.perf_counter()
    model = model.eval().cpu()
    refuse_non_finite(model)
    spec = input_spec_from_meta(meta or {}, model)
    sizes = list(sizes or verification_sizes(meta))
    precision = "int8" if calibration is not None else "float16" if fp16 else "float32"
    report = ExportReport(str(out), opset, precision, 0.0, 0)

    def write(tmp: str) -> None:
        n, h, w = sizes[0]
        _trace_to_onnx(model, tmp, (n, spec.channels, h, w), opset)
        if fp16:
            _to_fp16(tmp)
        if calibration is not None:
            quantize_int8(tmp, tmp, calibration)
        check_onnx_file(tmp, opset, f"the {precision} export")
        session = load_for_verification(tmp, opset, f"the {precision} export")
        report.checks = verify(model, lambda x: run_onnx(session, x), sizes, spec.channels)
        require_agreement(report.checks, min_agreement, "onnxruntime's")
        info = {"opset": opset, "precision": precision, "dynamic_axes": ["batch", "height", "width"],
                "input_name": "image", "output_name": "logits", "min_agreement": min_agreement,
                # the model had dropout layers; the file has none (traced in eval): no Monte-Carlo dropout
                "dropout": has_dropout(model),
                "verified": [asdict(c) for c in report.checks]}
        # a bare model (no checkpoint's metadata) records the class count its outputs have
        known = {"num_classes": report.checks[0].classes, **(meta or {})}
        _write_metadata(tmp, onnx_metadata(known, model_name or type(model).__name__, info, model),
                        report.checks[0].classes)

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: an ONNX file name ends with .onnx")
    atomic_write(out, write, replace=replace)
    report.seconds = time.perf_counter() - start
    report.bytes = out.stat().st_size
    return report


# --------------------------------------------------------------------------- int8


def quantize_int8(src: str, dst: str, calibration: Iterable[torch.Tensor], per_channel: bool = True) -> None:
    """Static int8 quantisation of the float ONNX file ``src`` into ``dst`` with onnxruntime:
    QDQ format, int8 weights (per output channel), uint8 activations whose ranges are calibrated
    (min/max) on ``calibration``, batches of preprocessed images. The x86 kernels use VNNI/AMX
    int8 dot products where the CPU has them."""
    from onnxruntime.quantization import (  # optional dependency (the export extra)
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process  # optional dependency (export extra)

    batches = iter(calibration)

    class Reader(CalibrationDataReader):
        def get_next(self):
            x = next(batches, None)
            return None if x is None else {"image": np.ascontiguousarray(x.float().numpy())}

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its "Axis 1 is out-of-range" warnings (rank-1 norm scales: per-tensor, fine)
        try:
            quantize_static(pre, os.path.join(tmp, "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        os.replace(os.path.join(tmp, "q.onnx"), dst)


# --------------------------------------------------------------------------- Mask R-CNN


class MaskRCNNBackboneRPN(nn.Module):
    """Mask R-CNN's dense part: ``Tensor[N, 3, H, W]`` (normalised, padded to a multiple of 32, i.e.
    ``model.transform``'s batch) -> the five FPN levels, then per level the RPN objectness
    ``Tensor[N, A, h, w]`` and box deltas ``Tensor[N, 4A, h, w]`` (15 outputs)."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.backbone, self.head = model.backbone, model.rpn.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = list(self.backbone(x).values())
        logits, deltas = self.head(levels)
        return (*levels, *logits, *deltas)


class MaskRCNNHeads(nn.Module):
    """Mask R-CNN's per-RoI part: RoI-aligned features ``Tensor[K, C, 7, 7]`` (boxes) and
    ``Tensor[K, C, 14, 14]`` (masks) -> class logits ``Tensor[K, classes]``, per-class box deltas
    ``Tensor[K, 4 classes]`` and mask logits ``Tensor[K, classes, 28, 28]``."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        heads = model.roi_heads
        self.box_head, self.box_predictor = heads.box_head, heads.box_predictor
        self.mask_head, self.mask_predictor = heads.mask_head, heads.mask_predictor

    def forward(self, box_features: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, deltas = self.box_predictor(self.box_head(box_features))
        return scores, deltas, self.mask_predictor(self.mask_head(mask_features))


def backbone_input(model: MaskRCNN, meta: dict | None) -> dict:
    """The ``input`` metadata of both Mask R-CNN parts: what :class:`MaskRCNNBackboneRPN`'s
    ``image`` holds (the heads take features of that image). Not the checkpoint's contract, whose
    ``normalize: false`` says that the *whole* model normalises its [0, 1] input: the part is the
    backbone without ``model.transform``, so its image is normalised (``normalize: true``:
    ``(x - mean) / std`` on RGB in [0, 1]), after the contract's ``resize`` if any, then resized
    bilinearly (``align_corners=False``) by ``min(min_size / min(h, w), max_size / max(h, w))``
    to ``floor(h * scale) x floor(w * scale)`` and zero-padded at the bottom and right to
    multiples of ``size_divisible`` (docs/deploy.md)."""
    spec = input_spec_from_meta(meta or {}, model)
    config = model.transform.config
    mean, std = model.input_mean_std if model.normalizes_input else (spec.mean, spec.std)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "normalize": True,
            "resize": list(spec.resize) if spec.resize else None, "channels": 3,
            "min_size": int(config.min_size[-1]), "max_size": int(config.max_size),
            "size_divisible": int(config.size_divisible)}


def _check_parts(module: nn.Module, session, inputs: list[torch.Tensor], sign: bool) -> SizeCheck:
    """onnxruntime against eager on one set of inputs. agreement: the share of RPN objectness
    logits of the same sign (``sign``), or of RoIs whose argmax class agrees."""
    with torch.no_grad():
        reference = [r.float() for r in module(*inputs)]
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = [torch.from_numpy(a).float() for a in session.run(None, feed)]
    diff = max((g - r).abs().max().item() for g, r in zip(got, reference))
    scale = max(r.abs().max().item() for r in reference)
    if sign:
        first = len(reference) // 3  # outputs: 5 levels, 5 objectness, 5 deltas
        pairs = list(zip(got[first:2 * first], reference[first:2 * first]))
        agree = sum(((g > 0) == (r > 0)).sum().item() for g, r in pairs) / sum(r.numel() for _, r in pairs)
    else:
        agree = (got[0].argmax(1) == reference[0].argmax(1)).float().mean().item()
    return SizeCheck(tuple(inputs[0].shape), diff, scale, agree)


def maskrcnn_part_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The two files :func:`export_maskrcnn_parts` writes for ``out``: ``out`` itself and
    ``<out stem>_heads.onnx`` beside it."""
    out = Path(out)
    return out, out.with_name(out.stem + "_heads.onnx")


def check_maskrcnn_outputs(out: str | os.PathLike, overwrite: bool = False, inputs: Sequence[str | None] = ()
                           ) -> None:
    """Before any work: the second file a Mask R-CNN export of ``--out out`` writes (the heads)
    must not be a folder, nor one of the ``inputs`` (the checkpoint), nor an existing file unless
    ``overwrite``. ``out`` itself is checked by the caller like every other export's."""
    heads = maskrcnn_part_paths(out)[1]
    also = f"--out {out} would also write {heads}"
    if heads.is_dir():
        raise UserError(f"{also}, which is a folder; give another --out")
    for item in inputs:
        if item and heads.resolve() == Path(item).resolve():
            raise UserError(f"{also}, over the input {item}; give another --out")
    if heads.exists() and not overwrite:
        raise UserError(f"{also}, which exists; pass --overwrite to replace it")


def export_maskrcnn_parts(model: MaskRCNN, out: str | os.PathLike, meta: dict | None = None, *,
                          opset: int = DEFAULT_OPSET, min_agreement: float = MIN_AGREEMENT,
                          sizes: Sequence[tuple[int, int, int]] = ((1, 320, 416), (2, 256, 352)),
                          rois: Sequence[int] = (7, 13), replace: bool = True) -> list[ExportReport]:
    """Export what of a Mask R-CNN ONNX can express without custom operators, as two files:
    ``out`` (:class:`MaskRCNNBackboneRPN`: dynamic batch, H, W) and ``<out stem>_heads.onnx``
    (:class:`MaskRCNNHeads`: a dynamic number of RoIs; :func:`maskrcnn_part_paths`). Each is
    verified by onnxruntime against eager (``sizes``: ``(batch, H, W)``, multiples of 32; ``rois``:
    RoI counts) and fails when the agreement (see :func:`_check_parts`) is below ``min_agreement``
    or the largest difference exceeds 1e-3 of the largest output. Both are written to temporary
    files and renamed only once both are verified: a failure writes neither. What stays in PyTorch
    between and after them (resize and normalisation, anchors, proposal decoding and NMS,
    multi-scale RoI Align, detection post-processing, mask pasting) and why: docs/deploy.md. The
    model is put back on its own device, in its own mode, afterwards."""
    require_export_extra()
    with kept_as_it_was(model):
        return _export_maskrcnn_parts(model, out, meta, opset=opset, min_agreement=min_agreement, sizes=sizes,
                                      rois=rois, replace=replace)


def _export_maskrcnn_parts(model: MaskRCNN, out: str | os.PathLike, meta: dict | None, *, opset: int,
                           min_agreement: float, sizes: Sequence[tuple[int, int, int]], rois: Sequence[int],
                           replace: bool) -> list[ExportReport]:
    model = model.eval().cpu()
    refuse_non_finite(model)
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: an ONNX file name ends with .onnx")
    if math.isnan(min_agreement):
        raise UserError("min_agreement must be a number, got nan")
    channels = model.backbone.out_channels
    box_size = tuple(model.roi_heads.box_roi_pool.output_size)
    mask_size = tuple(model.roi_heads.mask_roi_pool.output_size)
    g = torch.Generator().manual_seed(0)
    paths = maskrcnn_part_paths(out)
    rpn_outputs = [f"{name}_{i}" for name in ("fpn", "objectness", "rpn_deltas") for i in range(5)]
    parts = [  # (part, module, input batches, input names, dynamic axes, sign agreement, output names)
        ("backbone_rpn", MaskRCNNBackboneRPN(model).eval(),
         [[sample_batch(n, 3, h, w, seed=i)] for i, (n, h, w) in enumerate(sizes)],
         ["image"], {"image": {0: "batch", 2: "height", 3: "width"}}, True, rpn_outputs),
        ("roi_heads", MaskRCNNHeads(model).eval(),
         [[torch.randn(k, channels, *box_size, generator=g), torch.randn(k, channels, *mask_size, generator=g)]
          for k in rois], ["box_features", "mask_features"],
         {"box_features": {0: "rois"}, "mask_features": {0: "rois"}}, False,
         ["class_logits", "box_deltas", "mask_logits"]),
    ]
    image_input = backbone_input(model, meta)
    reports = [ExportReport(str(path), opset, "float32", 0.0, 0,
                            agreement_of="RPN objectness sign" if part[5] else "RoI class argmax")
               for path, part in zip(paths, parts)]

    def write(k: int, tmp: str) -> None:
        """Part ``k`` into ``tmp``, verified; then the next part (atomically) before ``tmp`` is renamed."""
        part, module, inputs, names, axes, sign, out_names = parts[k]
        report, start = reports[k], time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(inputs[0]), tmp, dynamo=False, opset_version=opset,
                              input_names=names, output_names=out_names, dynamic_axes=axes)
        check_onnx_file(tmp, opset, f"Mask R-CNN's {part}")
        session = load_for_verification(tmp, opset, f"Mask R-CNN's {part}")
        report.checks = [_check_parts(module, session, x, sign) for x in inputs]
        for c in report.checks:
            if c.agreement < min_agreement or c.max_abs_diff > 1e-3 * max(1.0, c.max_abs_logit):
                raise UserError(f"export verification failed for Mask R-CNN's {part} at {c.shape}: agreement "
                                f"{100 * c.agreement:.3f}%, max |diff| {c.max_abs_diff:.3g}; nothing written")
        info = {"opset": opset, "precision": "float32", "part": part, "inputs": names, "outputs": out_names,
                "verified": [asdict(c) for c in report.checks]}
        stored = onnx_metadata({**(meta or {}), "task": "instance"}, (meta or {}).get("model", type(model).__name__),
                               info)
        stored["input"] = image_input
        _write_metadata(tmp, stored)
        report.seconds = time.perf_counter() - start
        if k + 1 < len(parts):
            atomic_write(paths[k + 1], lambda tmp_next: write(k + 1, tmp_next), replace=replace)

    atomic_write(paths[0], lambda tmp: write(0, tmp), replace=replace)
    for path, report in zip(paths, reports):
        report.bytes = path.stat().st_size
    return reports
