"""Speed, memory and FLOP measurement (``pixelwise bench``, ``pixelwise models``)."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from pixelwise.errors import UserError
from pixelwise.inference.export import export_onnx, sample_batch
from pixelwise.inference.fast import fast_precision, instance_runner, make_runner
from pixelwise.inference.int8 import cpu_has_vnni
from pixelwise.inference.onnx_runner import load_onnx
from pixelwise.models import forward_logits, kept_as_it_was


def count_flops(builder, size: tuple[int, int] = (512, 512), task: str = "semantic", channels: int = 3
                ) -> float | None:
    """FLOPs (multiply and add counted separately) of one forward pass on a ``1 x channels x H x W`` input.

    ``builder()`` must construct the model; it is built and run on the ``meta`` device, so no
    memory is allocated and nothing is computed. Returns None where the forward pass is
    data-dependent (e.g. NMS in detection models) and cannot run on meta tensors.
    """
    try:
        with torch.device("meta"):
            model: nn.Module = builder().eval()
            x = torch.empty(1, channels, *size)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                forward_logits(model, x) if task == "semantic" else model([x[0]])
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    return float(counter.get_total_flops())


def gemm_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                     repeats: int = 5) -> float:
    """Measured rate of a large square matmul on ``device``, the ceiling a model could reach
    (int8: ``torch._int_mm``, int8 x int8 -> int32, in GOP/s; NaN where this torch lacks it on the
    device: its CPU kernel came with torch 2.3). On CPUs without VNNI ``torch._int_mm`` is a slow
    reference kernel, far below what the quantised convolutions reach: :func:`benchmark` then
    reports no peak (:func:`peak_and_note`), and it is timed at ``n`` 256: at 1024 one call takes
    2 s (six calls, 12 s of a bench), for a rate (1-2.4 GOP/s at either size on a 2-core AVX2 EPYC)
    far below the quantised convolutions' 20-70 at any size."""
    if dtype == torch.int8:
        if device.type == "cpu" and not cpu_has_vnni():
            n = min(n, 256)
        ai = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8)
        bi = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8)
        try:
            best = _best_seconds(lambda: torch._int_mm(ai, bi), device, repeats)
        except (RuntimeError, AttributeError, NotImplementedError):
            return float("nan")
        return 2 * n**3 / best / 1e9
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    tf32 = convolutions_in_tf32(device, dtype)  # the peak of the math the convolutions use
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 or before
    try:
        best = _best_seconds(lambda: a @ b, device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return 2 * n**3 / best / 1e9


def convolutions_in_tf32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether float32 convolutions on ``device`` run in TF32: cuDNN does so on Ampere and later
    GPUs unless ``torch.backends.cudnn.allow_tf32`` is off (torch's default is on; pixelwise
    leaves it), about 7x the strict float32 rate of an H100's matmuls."""
    return (device.type == "cuda" and dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32)
            and torch.cuda.get_device_capability(device)[0] >= 8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def benchmark(model: nn.Module | None, size: tuple[int, int], batch: int = 1, mode: str = "eager",
              device: str = "cpu", repeats: int = 5, task: str = "semantic", flops: float | None = None,
              *, model_name: str = "", onnx: str | None = None, threads: int | None = None,
              train: bool = False, compile: bool = False, channels: int = 3) -> dict:
    """Inference speed of ``model`` (or of the ONNX file ``onnx``) on a ``batch x channels x H x W``
    input (``channels``: the input contract's, 1 for a gray model).

    mode: ``eager`` (float32, as trained), ``fast`` (:mod:`pixelwise.inference.fast`: BatchNorm
    folded, channels-last, bfloat16 for the models whose bf16 accuracy was measured where the device
    has bf16 kernels, else float32; ``compile`` (semantic models only) adds torch.compile, its first
    call timed as ``compile_s``; Mask R-CNN: ``optimize_for_inference``, in bfloat16 where the
    device has fast bf16 kernels), ``onnx`` (onnxruntime on the CPU: the file ``onnx``, or ``model`` exported and
    verified to a temporary file first), ``int8``
    (:mod:`pixelwise.inference.int8`, calibrated on :data:`INT8_CALIBRATION` smooth random images
    other than the timed one; ``calibrate_s`` reports how long that took).
    Returns ``img_per_s ms_per_img gflops_per_img achieved_gflops gemm_peak_gflops utilization
    peak_mem_mb`` plus the settings: ``dtype`` (of the convolutions), against whose GEMM peak the
    utilisation is taken (the bf16 peak for a bf16 run); ``gemm_peak_gflops`` and ``utilization``
    are None, with the reason in ``peak_note``, where no GEMM peak of that dtype can be measured
    or the measured one is below the rate the model achieved (int8 without VNNI: not a ceiling);
    ``agreement`` (semantic models, fast, int8 and onnx modes; None for an ONNX file given without
    its checkpoint, which has no float32 reference): the share of pixels whose argmax equals fp32
    eager's on a smooth random image; ``train_img_per_s`` with ``train`` (one SGD
    step of cross-entropy on random labels, float32 eager). ``threads``: torch's (and
    onnxruntime's) intra-op threads. ``flops``: FLOPs per image if already known.

    ``peak_mem_mb`` is the mode's own peak: the peak resident memory (CPU: of the process, reset
    before the mode is prepared where Linux allows it, ``/proc/self/clear_refs``; CUDA: tensors
    allocated on the device) from preparing the mode (folding, exporting, calibrating; the model's
    own weights are resident throughout) through the timed runs. It is read before the FLOPs are
    counted and before the float32 eager reference of ``agreement`` runs, so those passes do not
    count. Without the reset (other systems) it is the process's peak up to then.

    The caller's model is put back as it was (training mode, device), and so are torch's threads.
    """
    with contextlib.ExitStack() as restore:
        restore.callback(torch.set_num_threads, torch.get_num_threads())
        if model is not None:
            restore.enter_context(kept_as_it_was(model))
        if threads:
            torch.set_num_threads(threads)
        return _measure(model, size, batch, mode, device, repeats, task, flops, model_name=model_name,
                        onnx=onnx, threads=threads, train=train, compile=compile, channels=channels)


def _measure(model: nn.Module | None, size: tuple[int, int], batch: int = 1, mode: str = "eager",
             device: str = "cpu", repeats: int = 5, task: str = "semantic", flops: float | None = None,
             *, model_name: str = "", onnx: str | None = None, threads: int | None = None,
             train: bool = False, compile: bool = False, channels: int = 3) -> dict:
    """One benchmark run (:func:`benchmark`)."""
    if train and (model is None or task != "semantic"):
        raise UserError("--train measures semantic models given by --model or --checkpoint")
    if mode not in ("eager", "fast", "int8", "onnx"):
        raise UserError(f"--mode must be eager, fast, int8 or onnx, got {mode!r}")
    if mode == "int8" and task != "semantic":
        raise UserError("--mode int8 measures semantic models (Mask R-CNN: docs/deploy.md)")
    if compile and (mode != "fast" or task != "semantic"):
        raise UserError("--compile goes with --mode fast (semantic models)")
    dev = torch.device(device)
    if mode == "onnx" and (task != "semantic" or dev.type != "cpu"):
        raise UserError("--mode onnx runs semantic models on the CPU only (Mask R-CNN: docs/deploy.md)")
    x = sample_batch(batch, channels, *size).to(dev)
    if model is not None:
        model = model.eval().to(dev)
    reset_peak_memory(dev)
    run, dtype, extra = _runner(model, x, mode, dev, task, model_name, onnx, compile)
    compile_s = None
    if compile:
        t = time.perf_counter()
        run()  # the first call compiles
        _sync(dev)  # and its kernels have run
        compile_s = time.perf_counter() - t
    seconds = _best_seconds(run, dev, repeats)
    peak_mem = peak_memory_mb(dev)  # the mode's own: no float32 reference pass has run yet
    if flops is None and model is not None:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward_logits(model, x[:1]) if task == "semantic" else model([x[0]])
        flops = float(counter.get_total_flops())
    agreement = None
    if task == "semantic" and mode != "eager" and model is not None:
        with torch.no_grad():
            reference = forward_logits(model, x).float()
        logits = run()
        assert isinstance(logits, torch.Tensor)
        agreement = (logits.float().argmax(1) == reference.argmax(1)).float().mean().item()
    achieved = flops * batch / seconds / 1e9 if flops else None
    peak, peak_note = peak_and_note(gemm_peak_gflops(dev, dtype), achieved, dtype, dev)
    shown_dtype = "tfloat32" if convolutions_in_tf32(dev, dtype) else dtype_name(dtype)
    result = {"mode": mode, "device": str(dev), "size": list(size), "batch": batch, "dtype": shown_dtype,
              "img_per_s": batch / seconds, "ms_per_img": 1000 * seconds / batch,
              "gflops_per_img": flops / 1e9 if flops else None, "achieved_gflops": achieved,
              "gemm_peak_gflops": peak, "utilization": achieved / peak if achieved and peak else None,
              "peak_note": peak_note, "peak_mem_mb": peak_mem, "threads": torch.get_num_threads(),
              "agreement": agreement, **extra}
    if compile_s is not None:
        result["compile_s"] = compile_s
    if train:
        assert model is not None
        result["train_img_per_s"] = train_step_speed(model, x, task, repeats=max(1, min(repeats, 3)))
    return result


def peak_and_note(measured: float, achieved: float | None, dtype: torch.dtype, dev: torch.device
                  ) -> tuple[float | None, str | None]:
    """``(gemm_peak_gflops, peak_note)`` of a run: the measured GEMM peak, or None with the reason
    where none could be measured (NaN) or it is below the ``achieved`` rate (then it is no ceiling,
    and a utilisation above 1 would be reported)."""
    name = dtype_name(dtype)
    kernel = "torch._int_mm" if dtype == torch.int8 else "matmul"
    if not math.isfinite(measured):
        return None, f"no {name} GEMM ({kernel}) on {dev.type} in this torch: no peak to compare with"
    if achieved is not None and achieved > measured:
        why = (": without VNNI it is a slow reference kernel, the quantised convolutions are not"
               if dtype == torch.int8 and dev.type == "cpu" and not cpu_has_vnni() else "")
        return None, (f"the measured {name} GEMM rate ({kernel}, {measured:.4g} G/s) is below the achieved "
                      f"{achieved:.4g} G/s, so it is no ceiling{why}; no utilization reported")
    return measured, None


def _runner(model: nn.Module | None, x: torch.Tensor, mode: str, dev: torch.device, task: str,
            model_name: str, onnx: str | None, compile: bool) -> tuple[Callable[[], object], torch.dtype, dict]:
    """``(run, dtype of the convolutions, extra result keys)`` of one benchmark mode."""
    if mode == "onnx":
        path = onnx or _export_temporary(model, x)
        try:
            session_model, meta = load_onnx(path, threads=torch.get_num_threads())
        finally:  # also when Ctrl-C lands while the session loads
            if onnx is None:
                os.unlink(path)
        precision = meta.get("onnx", {}).get("precision", "float32")
        dtype = {"float16": torch.float16, "int8": torch.int8}.get(precision, torch.float32)
        return (lambda: session_model(x)), (torch.float32 if dtype == torch.int8 else dtype), {"precision": precision}
    assert model is not None
    if mode == "eager":
        def run():
            with torch.no_grad():
                return forward_logits(model, x) if task == "semantic" else model(list(x))
        return run, torch.float32, {}
    if mode == "int8":
        t = time.perf_counter()
        calibration = [sample_batch(1, x.shape[1], x.shape[2], x.shape[3], seed=1 + i) for i in range(INT8_CALIBRATION)]
        int8 = make_runner(model, "int8", model_name, dev, calibration=calibration, measuring=True)
        return (lambda: int8(x)), torch.int8, {"calibrate_s": time.perf_counter() - t}
    if task == "semantic":
        fast = make_runner(model, "fast", model_name, dev, compile=compile)
        dtype = getattr(fast, "dtype", torch.float32)
        return (lambda: fast(x)), dtype, {"fast_path": describe_fast(fast_precision(model_name, dev), compile)}
    fast_instance = instance_runner(model, "fast", model_name)
    xs = list(x)

    def run_instance():
        with torch.inference_mode():
            return fast_instance(xs)
    dtype = getattr(fast_instance, "dtype", torch.float32)
    return run_instance, dtype, {"fast_path": "optimize_for_inference (BN folded, channels-last, vectorised "
                                              f"NMS/RoI), {dtype_name(dtype)} convolutions and linears, "
                                              "float32 decisions"}


INT8_CALIBRATION = 4  # smooth random images that calibrate bench's int8 model


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).split(".")[-1]


def describe_fast(precision: str, compiled: bool) -> str:
    """bench's ``fast_path``; ``precision``: :func:`pixelwise.inference.fast.fast_precision`."""
    parts = ["BN folded", "channels-last", precision]
    return ", ".join(parts + (["torch.compile"] if compiled else []))


def _export_temporary(model: nn.Module | None, x: torch.Tensor) -> str:
    """``model`` exported (and verified at the benchmark's size) to a temporary ONNX file."""
    assert model is not None
    fd, path = tempfile.mkstemp(suffix=".onnx", prefix="pixelwise-bench-")
    os.close(fd)
    try:
        export_onnx(model.cpu(), path, sizes=[(x.shape[0], x.shape[2], x.shape[3])])
    except BaseException:  # Ctrl-C, SIGTERM or a failed export: no file left in the temporary folder
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return path


def train_step_speed(model: nn.Module, x: torch.Tensor, task: str, repeats: int = 3) -> float:
    """Images per second of a float32 training step (forward, cross-entropy on random labels,
    backward, SGD update) on a copy of ``model`` in train mode."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    with torch.no_grad():
        classes = forward_logits(model.eval(), x[:1]).shape[1]
    model.train()
    target = torch.randint(0, classes, (x.shape[0], *x.shape[2:]), device=x.device)
    if x.shape[0] == 1 and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        x = x.repeat(2, 1, 1, 1)  # BatchNorm needs more than one value per channel in its 1x1 pools
        target = target.repeat(2, 1, 1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(forward_logits(model, x), target)
        loss.backward()
        opt.step()

    return x.shape[0] / _best_seconds(step, x.device, repeats)


def reset_peak_memory(dev: torch.device) -> bool:
    """Start a new peak-memory measurement on ``dev`` (CUDA: its peak allocation statistics; CPU on
    Linux: this process's peak resident set, ``/proc/self/clear_refs``); False where it cannot
    (then :func:`peak_memory_mb` is the process's peak since it started)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM, which peak_rss_mb reads) to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


def peak_memory_mb(dev: torch.device) -> float | None:
    """Peak memory in MiB since :func:`reset_peak_memory`: CUDA tensors allocated on ``dev``, or
    this process's peak resident set."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB (None where the platform does not say). On Linux
    its VmHWM: getrusage's ru_maxrss keeps the peak of the process it was started from (across
    exec: a bench run from a 1.5 GiB Python script said 1.5 GiB) and is not reset by clear_refs."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # optional dependency: Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
