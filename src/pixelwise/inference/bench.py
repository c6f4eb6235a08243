"""Speed, memory and FLOP measurement (``pixelwise bench``, ``pixelwise models``)."""

from __future__ import annotations

import io
import sys
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from pixelwise.errors import UserError


def count_flops(builder, size: tuple[int, int] = (512, 512), task: str = "semantic") -> float | None:
    """FLOPs (multiply and add counted separately) of one forward pass on a ``1x3xHxW`` input.

    ``builder()`` must construct the model; it is built and run on the ``meta`` device, so no
    memory is allocated and nothing is computed. Returns None where the forward pass is
    data-dependent (e.g. NMS in detection models) and cannot run on meta tensors.
    """
    try:
        with torch.device("meta"):
            model: nn.Module = builder().eval()
            x = torch.empty(1, 3, *size)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x) if task == "semantic" else model([x[0]])
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    return float(counter.get_total_flops())


def gemm_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                     repeats: int = 5) -> float:
    """Measured peak of a large square matmul on ``device``: the ceiling a model could reach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = _best_seconds(lambda: a @ b, device, repeats)
    return 2 * n**3 / best / 1e9


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


def benchmark(model: nn.Module, size: tuple[int, int], batch: int = 1, mode: str = "eager",
              device: str = "cpu", repeats: int = 5, task: str = "semantic", flops: float | None = None) -> dict:
    """Inference speed of ``model`` on random ``batch x 3 x H x W`` inputs.

    mode: ``eager`` (float32, as trained), ``fast`` (channels-last, bf16 autocast where the device
    supports it, inference mode), ``onnx`` (onnxruntime on the CPU, needs the export extra).
    Returns ``img_per_s ms_per_img gflops_per_img achieved_gflops gemm_peak_gflops utilization
    peak_mem_mb`` plus the settings. ``flops``: FLOPs per image if already known.
    """
    dev = torch.device(device)
    model = model.eval().to(dev)
    x = torch.randn(batch, 3, *size, device=dev)
    if flops is None:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x[:1]) if task == "semantic" else model([x[0]])
        flops = float(counter.get_total_flops())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if mode == "eager":
        def run():
            with torch.no_grad():
                return model(x) if task == "semantic" else model(list(x))
    elif mode == "fast":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
        xf = x.contiguous(memory_format=torch.channels_last)
        use_bf16 = dev.type == "cuda" or _cpu_has_bf16()

        def run():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                return model(xf) if task == "semantic" else model(list(xf))
    elif mode == "onnx":
        run = _onnx_runner(model, x)
    else:
        raise ValueError(f"mode must be eager, fast or onnx, got {mode!r}")
    seconds = _best_seconds(run, dev, repeats)
    peak = gemm_peak_gflops(dev)
    achieved = flops * batch / seconds / 1e9
    peak_mem: float | None
    if dev.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mem = peak_rss_mb()
    return {"mode": mode, "device": str(dev), "size": list(size), "batch": batch,
            "img_per_s": batch / seconds, "ms_per_img": 1000 * seconds / batch,
            "gflops_per_img": flops / 1e9, "achieved_gflops": achieved, "gemm_peak_gflops": peak,
            "utilization": achieved / peak, "peak_mem_mb": peak_mem, "threads": torch.get_num_threads()}


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB (None where the platform does not say)."""
    try:
        import resource  # optional dependency: Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _onnx_runner(model: nn.Module, x: torch.Tensor):
    try:
        import onnxruntime as ort  # optional dependency (the export extra)
    except ImportError:
        raise UserError("--mode onnx needs onnxruntime: pip install -e '.[export]'") from None
    buf = io.BytesIO()
    torch.onnx.export(model.cpu(), (x.cpu(),), buf,  # type: ignore[arg-type]  # a file object works too input_names=["image"], output_names=["logits"],
                      dynamo=False, opset_version=17)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    feed = {"image": x.cpu().numpy()}
    return lambda: session.run(None, feed)
