"""``--mode int8``: a semantic model statically quantised to int8 in PyTorch.

:class:`Int8Segmenter` traces the model with ``torch.fx`` and quantises it with PyTorch's graph-mode
post-training quantisation (``torch.ao.quantization.quantize_fx``) for the ``x86`` engine (oneDNN
and FBGEMM kernels, which use AVX512-VNNI / AMX where the CPU has them):

1. BatchNorm is fused into the convolution before it, and ReLU into the convolution or the
   residual add before it (the engine's fused ``conv_relu`` / ``add_relu`` kernels);
2. weights are int8, per output channel (symmetric); activations uint8, per tensor, their ranges
   observed (histogram observer; 8 bits on CPUs with VNNI, else PyTorch's 7) on ``calibration``,
   batches of preprocessed images, before the conversion (:func:`qconfig_mapping`);
3. the tensors stay quantised from the first convolution to the last, except around transposed
   convolutions (float32: the engine's quantised ones are wrong); bilinear upsampling, pooling
   and concatenation run on the quantised tensors; the logits come back as float32
   ``Tensor[N, K, H, W]``.

A model whose forward does not trace but has a traceable ``forward_features`` (U-Net, whose
padding depends on the input size) has that core quantised and its padding and cropping kept in
float32. Models that trace neither (SegNet's and DeconvNet's pooling indices) are refused with a
one-line error; so are PyTorch builds without a quantised engine.

On the 2-core AVX512-VNNI CPU measured, one quantised convolution ran 1.8-2.1x faster than the
same convolution in bfloat16 (docs/deploy.md and benchmarks/README.md have the models' figures).
Independent of :func:`pixelwise.inference.export.quantize_int8` (an ONNX file quantised by
onnxruntime, which runs wherever onnxruntime does but was slower than the bf16 fast path).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from pixelwise.errors import UserError
from pixelwise.models import Logits, forward_logits
from pixelwise.preprocess import InputSpec, preprocess
from pixelwise.runtime import VNNI_CPU_FLAGS, cpu_flags

# int8 below this argmax agreement with float32 is refused: an int8 ONNX export (on its verification
# images) and --mode int8 in predict (on its calibration pixels); eval and bench only report it
INT8_MIN_AGREEMENT = 0.97
ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")  # preference order; the first the CPU build supports


def quantized_engine() -> str:
    """The quantised engine int8 runs on (:data:`ENGINES`); UserError where torch has none."""
    for engine in ENGINES:
        if engine in torch.backends.quantized.supported_engines:
            return engine
    raise UserError("--mode int8: this PyTorch build has no quantised CPU engine (x86, fbgemm or qnnpack); "
                    "use --mode fast")


def calibration_batches(images: Iterable[np.ndarray], spec: InputSpec, crop: int = 256, batch: int = 4, seed: int = 0
                        ) -> list[torch.Tensor]:
    """Random ``crop`` x ``crop`` crops of ``images`` (uint8[H, W, 3]) preprocessed with ``spec``
    (after its resize, if any), in batches of ``batch``: the int8 calibration set (of :func:`quantize`
    and of the ONNX export's int8 file)."""
    g = np.random.default_rng(seed)
    crops = []
    for image in images:
        x = preprocess(image, spec)
        h, w = x.shape[-2:]
        ch, cw = min(crop, h), min(crop, w)
        top, left = int(g.integers(0, h - ch + 1)), int(g.integers(0, w - cw + 1))
        crops.append(x[:, top:top + ch, left:left + cw])
    if len({tuple(c.shape) for c in crops}) > 1:  # images smaller than the crop: one per batch
        return [c[None] for c in crops]
    return [torch.stack(crops[i:i + batch]) for i in range(0, len(crops), batch)]


def quantize(model: nn.Module, calibration: Iterable[torch.Tensor], engine: str | None = None) -> nn.Module:
    """An int8 copy of the semantic ``model`` (module docstring): ``Tensor[N, C, H, W] -> float32
    logits``, its activation ranges calibrated on ``calibration`` (preprocessed batches)."""
    # start-up time: the quantisation toolkit is only needed here
    try:
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as e:  # removed from a future PyTorch
        raise UserError(f"--mode int8 needs torch.ao.quantization, which this PyTorch lacks ({e}); "
                        "use --mode fast or an int8 ONNX export") from None
    engine = engine or quantized_engine()
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise UserError("--mode int8 needs calibration images (--calib-dataset and --calib-data)")
    with quantizing_on(engine):
        net = copy.deepcopy(model).cpu().eval().requires_grad_(False)
        with warnings.catch_warnings():
            # torch.ao.quantization warns on every call that it is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            try:
                prepared = prepare_fx(Logits(net), qconfig_mapping(engine), (first,))
                core = None
            except Exception as whole:  # torch.fx raises many kinds for code it cannot trace
                # a model whose forward pads and crops around a traceable forward_features (U-Net):
                # quantise that core, keep the padding and cropping in float
                if not hasattr(net, "forward_features"):
                    raise _untraceable(model, whole) from None
                core = _Core(net)
                try:
                    prepared = prepare_fx(core, qconfig_mapping(engine), (first,))
                except Exception as e:
                    raise _untraceable(model, e) from None
                _set_core(net, prepared)  # calibrated through net's own forward: padded as it pads
            with torch.no_grad():
                for x in (first, *batches):
                    (prepared if core is None else net)(x)
            quantized = convert_fx(prepared)
        quantized.graph.eliminate_dead_code()  # outputs other than the main logits (auxiliary heads)
        quantized.recompile()
        if core is None:
            return quantized
        _set_core(net, quantized)
        return Logits(net)


_ENGINE_GUARD = threading.Lock()  # one quantisation at a time sets the process-wide engine


@contextlib.contextmanager
def quantizing_on(engine: str) -> Iterator[None]:
    """torch's quantised engine set to ``engine`` inside (a process-wide setting, which chooses the
    kernels prepare/convert pack the weights for), one block at a time, and the caller's given back
    after: it chose the kernels of the caller's own quantised models. A quantised model runs the
    kernels its weights were packed for whatever the engine is then (measured: equal outputs under
    x86, fbgemm, onednn and qnnpack), so its forwards leave the setting alone."""
    if engine not in torch.backends.quantized.supported_engines:
        raise UserError(f"quantised engine {engine!r} is not one this torch has: "
                        f"{', '.join(e for e in torch.backends.quantized.supported_engines if e != 'none')}")
    with _ENGINE_GUARD:
        callers = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = engine
            yield
        finally:
            torch.backends.quantized.engine = callers


def _set_core(net: nn.Module, core: nn.Module) -> None:
    """Make ``net.forward_features`` call ``core``: an instance attribute (which, unlike a
    registered submodule, is found before the class's method), also registered as ``int8_core``
    so that it belongs to the module tree."""
    net.add_module("int8_core", core)
    object.__setattr__(net, "forward_features", core)


def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 with 32-bit accumulation (AVX512-VNNI, AVX-VNNI or AMX
    int8), read from ``/proc/cpuinfo``; False where that cannot be read (other systems)."""
    return bool(cpu_flags() & VNNI_CPU_FLAGS)


def qconfig_mapping(engine: str):
    """PyTorch's default post-training mapping for ``engine``, with two changes.

    Activations use the full 8 bits where the CPU has VNNI (the default's 7-bit ``reduce_range``
    avoids the 16-bit overflow of ``vpmaddubsw`` on CPUs without it): on a small U-Net fitted to
    shapes scenes the share of pixels agreeing with float32 went from 95.0% to 97.3%, on the
    CamVid checkpoints of docs/deploy.md mIoU moved by at most 0.04 points.
    Transposed convolutions stay in float32: their quantised kernels give wrong results in the x86
    and fbgemm engines of torch 2.13 whenever input and output channels differ (relative error
    1.3-4.3 against float32; qnnpack's are right; tests/test_int8.py)."""
    # start-up time: the quantisation toolkit is only needed here (quantize() says it may be absent)
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver

    mapping = get_default_qconfig_mapping(engine)
    if engine in ("x86", "fbgemm", "onednn") and cpu_has_vnni():
        default = mapping.global_qconfig
        assert default is not None
        full_range = QConfig(activation=HistogramObserver.with_args(reduce_range=False), weight=default.weight)
        mapping.set_global(full_range)
    F = torch.nn.functional
    for kind in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, F.conv_transpose1d, F.conv_transpose2d,
                 F.conv_transpose3d):
        mapping.set_object_type(kind, None)
    return mapping


def _untraceable(model: nn.Module, e: Exception) -> UserError:
    said = f": {clip_message(str(e).splitlines()[0])}" if str(e).strip() else ""  # an error without text: its type
    return UserError(f"--mode int8: {type(model).__name__} cannot be traced by torch.fx for quantisation "
                     f"({type(e).__name__}{said}); use --mode fast")


def clip_message(text: str, limit: int = 160) -> str:
    """``text`` cut to at most ``limit`` characters at a boundary: after its last full sentence
    that fits, else after its last whole word that fits, marked ``...`` (only a single word
    longer than ``limit`` is cut inside itself)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[:limit + 1]  # one more: a sentence may end exactly at the limit
    end = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if end > 0:
        return text[:end + 1]
    words = text[:limit - 3].rsplit(" ", 1)[0] if " " in text[:limit - 3] else text[:limit - 3]
    return words.rstrip(" ,;:") + "..."


class _Core(nn.Module):
    """``model.forward_features`` as a module of its own (what :func:`quantize` traces when the
    model's forward cannot be)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.model).forward_features(self.model, x)  # type: ignore[attr-defined]


class Int8Segmenter(nn.Module):
    """The int8 path of a semantic model: ``Tensor[N, C, H, W] -> float32 logits Tensor[N, K, H, W]``
    on the CPU (:func:`quantize`)."""

    def __init__(self, model: nn.Module, calibration: Iterable[torch.Tensor], engine: str | None = None) -> None:
        super().__init__()
        self.engine = engine or quantized_engine()
        self.model = quantize(model, calibration, self.engine)
        self.dtype = torch.int8

    def agreement(self, model: nn.Module, x: torch.Tensor) -> float:
        """The share of pixels of ``x`` whose argmax equals the float32 ``model``'s: on a calibration
        batch, a check of the quantised kernels (optimistic as a measure of accuracy: those pixels
        calibrated the ranges)."""
        with torch.no_grad():
            reference = forward_logits(model.cpu().eval(), x).argmax(1)
        return (self(x).argmax(1) == reference).float().mean().item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.model(x.cpu().float()).float().to(x.device)
