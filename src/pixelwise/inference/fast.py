"""The inference fast path: ``--mode fast`` (and ``int8``) in predict, eval and bench.

:func:`make_runner` turns a model into the callable a predictor runs on each batch
(``Tensor[N, C, H, W]`` preprocessed -> float32 logits ``Tensor[N, K, H, W]``):

* ``eager``: the model as trained (float32), ``forward_logits(model, x)``.
* ``fast``: :class:`FastSegmenter`, a copy of the model with
  1. BatchNorm folded into the convolution (or transposed convolution) before it
     (:func:`pixelwise.models.maskrcnn.fast.fold_batchnorm`, in float64): ResNet, U-Net, SegNet,
     DeconvNet, DeepLab and the FCN heads become convolutions, ReLUs and adds;
  2. in bfloat16, convolutions with dilation >= 8 (DeepLab's ASPP) as one 1 x 1 GEMM plus shifted
     adds (:class:`TapConv2d`), where oneDNN's dilated bf16 kernel is slow;
  3. weights stored once in the model's plan dtype (bfloat16 only for the models whose bf16
     accuracy was measured, ``FastPlan.bf16`` in :data:`PLANS`, and only on devices with fast bf16
     kernels; every other model, and every model on other CPUs, float32), channels-last, the input
     cast once, no autocast (which re-casts every weight on every call);
  4. optionally (``compile=True``, ``bench --compile``) ``torch.compile`` (inductor, with weight
     freezing for this compiled function only: the process's ``torch._inductor.config`` is left
     as it was): it fuses the ReLUs, adds and biases into oneDNN convolution epilogues and
     prepacks the weights, at a compile cost per model and input size (bench reports it).
  Output logits are float32. The copy is taken when the runner is built: weights changed
  afterwards in the original model are not seen (build the runner again).
* ``int8``: :class:`pixelwise.inference.int8.Int8Segmenter`, the model quantised to int8 in
  PyTorch (torch.fx graph mode, x86 engine) with activation ranges calibrated on training images;
  offered only for the models in :data:`PLANS` whose measured mIoU cost is within
  :data:`INT8_MAX_COST` (eval and bench run it for any model, to measure that cost).

Per-model plans and the accuracy they were measured to cost: :data:`PLANS`, docs/deploy.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from pixelwise.errors import UserError
from pixelwise.inference.int8 import INT8_MIN_AGREEMENT, Int8Segmenter
from pixelwise.inference.onnx_runner import OnnxModel
from pixelwise.models import forward_logits
from pixelwise.models.maskrcnn import MaskRCNN, optimize_for_inference
from pixelwise.models.maskrcnn.fast import fold_batchnorm, reduced_precision_dtype

MODES = ("eager", "fast", "int8")
FAST_MAX_COST = 0.2  # mIoU points the fast path may cost (CamVid val, trained checkpoint)
INT8_MAX_COST = 1.0


@dataclass(frozen=True)
class FastPlan:
    """How ``--mode fast`` / ``int8`` run one model, with the measurement behind it.

    bf16: run the folded model in bfloat16 where the device has fast bf16 kernels (else float32:
    folding and channels-last only, as exact as folding is: docs/deploy.md); True only where its
    bf16 accuracy was measured on a trained checkpoint. int8: None if offered, else why not (the one-line error
    ``--mode int8`` gives). measured: what was measured (docs/deploy.md has the commands)."""

    bf16: bool = False
    int8: str | None = "its int8 accuracy on a trained checkpoint has not been measured"
    measured: str = ("argmax agreement with fp32 eager on random images (bench); mIoU on a trained checkpoint "
                     "not measured")
    traceable: bool = True  # False: torch.fx cannot trace it, so int8 is refused in eval and bench too


# max-unpooling with the encoder's pooling indices: torch.fx cannot iterate over them
_UNTRACEABLE = FastPlan(int8="torch.fx cannot trace it for quantisation (its decoder unpools with the encoder's "
                             "pooling indices); use --mode fast", traceable=False)


# CamVid, held-out sequence 0006R0 at 360x480 (docs/deploy.md): fp32 eager / fast / int8 mIoU
PLANS: dict[str, FastPlan] = {
    "unet": FastPlan(bf16=True, int8=None, measured="camvid_cpu_hour U-Net (base 16 + BN): 41.90 / 41.95 / 42.02"),
    "fcn_resnet50": FastPlan(bf16=True, int8=None, measured="35 minutes from scratch: 32.46 / 32.46 / 32.40"),
    "deeplabv3_resnet50": FastPlan(bf16=True, int8=None,
                                   measured="35 minutes from scratch: 32.09 / 32.09 / 32.08"),
    **{name: _UNTRACEABLE for name in ("segnet", "segnet_basic", "bayesian_segnet", "deconvnet", "enet")},
}


def plan_for(model_name: str) -> FastPlan:
    return PLANS.get(model_name, FastPlan())


def fold_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the convolution before it."""
    model = copy.deepcopy(model).eval().requires_grad_(False)
    fold_batchnorm(model)
    return model


# layers whose CPU kernels lack bfloat16 (LocalResponseNorm's avg_pool3d, SegNet-Basic): run in float32
FLOAT32_ONLY = (nn.LocalResponseNorm,)


class Float32(nn.Module):
    """Runs ``module`` in float32 inside a reduced-precision model (input cast up, output back)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(x.dtype)


def replace_layers(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace, in place, every submodule for which ``replacement`` returns a module; the count."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
    return replaced


def keep_float32(model: nn.Module) -> int:
    """Wrap every :data:`FLOAT32_ONLY` layer of ``model`` in :class:`Float32` (its weights and
    buffers cast to float32), in place; the count."""
    return replace_layers(model, lambda m: Float32(m.float()) if isinstance(m, FLOAT32_ONLY) else None)


class TapConv2d(nn.Module):
    """A dilated ``k x k`` convolution (stride 1, one group, zero "same" padding) computed as one
    ``1 x 1`` convolution to ``k * k * out`` channels whose outputs are added at their taps'
    offsets: the same sums (in another order) with the same FLOPs; exact in float32 and float64, in
    bf16 each tap's sum is rounded and the taps added in bf16 (docs/deploy.md has the error).
    oneDNN's bf16 kernel for large dilations runs far below the GEMM peak (DeepLab's ASPP 2048 ->
    256 at rate 36 on 64 x 64: 368 ms against 70 ms this way, docs/deploy.md); one GEMM of the
    whole weight does not."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        out_ch, in_ch, kh, kw = conv.weight.shape
        self.kernel = (kh, kw)
        self.dilation = (int(conv.dilation[0]), int(conv.dilation[1]))
        self.out_channels = out_ch
        # [O, I, kh, kw] -> [kh * kw * O, I, 1, 1], tap-major so that a tap's outputs are contiguous
        self.weight = nn.Parameter(conv.weight.detach().permute(2, 3, 0, 1).reshape(kh * kw * out_ch, in_ch, 1, 1),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    @staticmethod
    def applies(conv: nn.Module, min_dilation: int) -> bool:
        """Whether :class:`TapConv2d` computes ``conv`` exactly (and its dilation is large enough to pay)."""
        if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros":
            return False
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        same = conv.padding == (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        return (conv.stride == (1, 1) and kh % 2 == 1 and kw % 2 == 1 and same and isinstance(conv.padding, tuple)
                and max(dh, dw) >= min_dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        kh, kw = self.kernel
        dh, dw = self.dilation
        taps = nn.functional.conv2d(x, self.weight)  # [N, kh * kw * O, H, W]
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = x.new_zeros((n, self.out_channels, h, w)).contiguous(memory_format=layout)
        for i in range(kh):
            dy = (i - kh // 2) * dh  # output row r reads input row r + dy
            r0, r1 = max(0, -dy), min(h, h - dy)
            for j in range(kw):
                dx = (j - kw // 2) * dw
                c0, c1 = max(0, -dx), min(w, w - dx)
                if r1 <= r0 or c1 <= c0:
                    continue  # this tap sees only padding
                t = (i * kw + j) * self.out_channels
                out[:, :, r0:r1, c0:c1] += taps[:, t:t + self.out_channels, r0 + dy:r1 + dy, c0 + dx:c1 + dx]
        if self.bias is not None:
            out += self.bias.view(1, -1, 1, 1)
        return out


def split_dilated(model: nn.Module, min_dilation: int = 8) -> int:
    """Replace, in place, every convolution :class:`TapConv2d` computes exactly whose dilation is at
    least ``min_dilation`` (smaller dilations run well in oneDNN); the count."""
    return replace_layers(model, lambda m: TapConv2d(m) if isinstance(m, nn.Conv2d)
                          and TapConv2d.applies(m, min_dilation) else None)


class FastSegmenter(nn.Module):
    """The fast path of a semantic model (module docstring): ``Tensor[N, C, H, W] -> float32
    logits Tensor[N, K, H, W]``. ``dtype``: bfloat16 or float32; ``compile``: torch.compile the
    folded model (compiles at the first call of each input size), with inductor's weight freezing
    passed as an option of this compile only (``torch._inductor.config`` is not changed).
    ``model`` is copied when this is built: later changes to its weights are not seen."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 compile: bool = False) -> None:
        super().__init__()
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        folded = fold_model(model)
        if dtype != torch.float32:
            split_dilated(folded)  # measured in bf16 only (docs/deploy.md)
        folded.to(dtype=dtype, memory_format=self.memory_format)  # type: ignore[call-overload]  # stubs lack memory_format
        if dtype != torch.float32:
            keep_float32(folded)  # after the cast, which would otherwise cast the kept layers' weights too
        self.model = folded
        self.precision = str(dtype).split(".")[-1] + " weights"  # make_runner adds why (fast_precision)
        self._run: Callable[[torch.Tensor], torch.Tensor] = self._logits
        self.compiled = compile
        if compile:
            # constant-fold and prepack the (frozen) weights: an option of this compiled function,
            # applied whenever it (re)compiles, not a change of the process-wide inductor config
            self._run = torch.compile(self._logits, options={"freezing": True})

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(dtype=self.dtype).contiguous(memory_format=self.memory_format)
            return self._run(x).float()


def fast_dtype(model_name: str, device: torch.device) -> torch.dtype:
    """bfloat16 where the model's plan allows it (its bf16 accuracy was measured) and the device
    has fast bf16 kernels, else float32."""
    return reduced_precision_dtype(device) if plan_for(model_name).bf16 else torch.float32


def fast_precision(model_name: str, device: str | torch.device = "cpu") -> str:
    """Which precision ``--mode fast`` runs ``model_name`` in on ``device``, and why, in a few words
    (bench's ``fast_path``): e.g. ``"float32 weights (bfloat16 not measured for enet)"``."""
    dev = torch.device(device)
    dtype = fast_dtype(model_name, dev)
    if dtype != torch.float32:
        return f"{str(dtype).split('.')[-1]} weights (bf16 accuracy measured for {model_name})"
    if not plan_for(model_name).bf16:
        return f"float32 weights (bfloat16 not measured for {model_name or 'this model'})"
    return f"float32 weights (no fast bfloat16 kernels on this {dev.type})"


def resolve_mode(mode: str | None, default: str = "eager") -> str:
    mode = mode or default
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is not one of: {', '.join(MODES)}")
    return mode


MC_DROPOUT = "Monte-Carlo dropout (--mc-samples, mc_samples=)"


def eager_only(what: str, mode: str | None) -> None:
    """A UserError where ``what`` (an ONNX file, :data:`MC_DROPOUT`), which runs only in eager,
    is asked to run in ``mode`` fast or int8."""
    mode = resolve_mode(mode)
    if mode in ("fast", "int8"):  # in the words of both the CLI and the Python API
        raise UserError(f"--mode {mode} (mode={mode!r}) does not apply to {what}; use --mode eager (mode='eager')")


def make_runner(model: nn.Module, mode: str, model_name: str = "", device: str | torch.device = "cpu",
                compile: bool = False, mc_samples: int = 0, calibration: Iterable[torch.Tensor] | None = None,
                measuring: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable a semantic predictor runs on each batch for ``mode`` (module docstring).
    ``compile``: also torch.compile the folded model. ``calibration``: preprocessed batches that
    calibrate ``int8``. ``measuring`` (eval, bench): run ``int8`` also for a model whose plan does
    not offer it, to measure what it costs. An :class:`OnnxModel` and Monte-Carlo dropout
    (``mc_samples``) run only in ``eager``."""
    mode = resolve_mode(mode)
    what = "an ONNX file" if isinstance(model, OnnxModel) else MC_DROPOUT if mc_samples else ""
    if what:
        eager_only(what, mode)
    if mode == "eager" or what:
        return lambda x: forward_logits(model, x)
    dev = torch.device(device)
    if mode == "int8":
        refusal = int8_refusal(model_name)
        if refusal and not plan_for(model_name).traceable:
            raise UserError(refusal)
        if refusal and not measuring:
            raise UserError(f"{refusal}; measure it with `pixelwise eval --mode int8`, or export an int8 ONNX file "
                            "(`pixelwise export --int8`)")
        if dev.type != "cpu":
            raise UserError(f"--mode int8 runs on the CPU (--device cpu), not {dev.type}")
        if calibration is None:
            raise UserError("--mode int8 needs calibration images: add --calib-dataset KIND --calib-data PATH "
                            "(training images)")
        batches = list(calibration)
        int8 = Int8Segmenter(model, batches)
        if not measuring:  # eval and bench measure the int8 model themselves
            agreement = int8.agreement(model, batches[0])
            if agreement < INT8_MIN_AGREEMENT:
                raise UserError(f"--mode int8: the quantised {model_name or 'model'} agrees with float32 on only "
                                f"{agreement:.1%} of the calibration pixels (< {INT8_MIN_AGREEMENT:.0%}); "
                                "use --mode fast")
        return int8
    segmenter = FastSegmenter(model, fast_dtype(model_name, dev), compile=compile)
    segmenter.precision = fast_precision(model_name, dev)
    return segmenter


def instance_runner(model: nn.Module, mode: str, model_name: str = "") -> Callable:
    """What an instance predictor calls on a list of images: the model (``eager``) or its
    :func:`~pixelwise.models.maskrcnn.optimize_for_inference` copy (``fast``), in bfloat16 where the
    device has fast bf16 kernels (:func:`reduced_precision_dtype`), else float32.

    bfloat16 is the default because on a trained detector it keeps the detections: 98.8-99.0% of
    float32's above score 0.5 at box IoU >= 0.9, as many as half a gray level of input noise keeps
    (99.0-99.3%), with COCO AP within 0.2 (docs/maskrcnn.md, benchmarks/maskrcnn_agreement.py). Only
    untrained weights, whose competing boxes have no margin, lose more (78%)."""
    mode = resolve_mode(mode)
    if mode == "int8":
        raise UserError(f"--mode int8 is not offered for instance models like {model_name or 'this one'}: "
                        "Mask R-CNN does not export whole to ONNX (docs/deploy.md)")
    if mode != "fast":
        return model
    if not isinstance(model, MaskRCNN):
        raise UserError(f"--mode fast has no fast path for {type(model).__name__}")
    return optimize_for_inference(model)


def int8_refusal(model_name: str) -> str | None:
    """The one-line reason why int8 is not offered for ``model_name`` (None if it is)."""
    reason = plan_for(model_name).int8
    return None if reason is None else f"--mode int8 is not offered for {model_name or 'this model'}: {reason}"
