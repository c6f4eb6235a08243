"""Mixed precision: which autocast dtype a run uses, and the context that applies it."""

from __future__ import annotations

import contextlib

import torch

from pixelwise.errors import UserError
from pixelwise.runtime import BF16_CPU_FLAGS, cpu_flags, cuda_has_native_bf16


def resolve_amp(mode: str, device: torch.device) -> tuple[str, str]:
    """``--amp`` -> (off | bf16 | fp16, why). ``auto``: CUDA -> bf16 where the GPU supports it,
    else fp16 (with a gradient scaler); CPU -> bf16 where it has bf16 instructions (AMX or
    AVX512-BF16, :data:`~pixelwise.runtime.BF16_CPU_FLAGS`), where oneDNN's bf16 convolutions are
    faster (docs/training.md measures both), else off. ``bf16`` on a CPU whose flags show no bf16
    instructions is kept, with a why that says it will be slow."""
    if mode == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; on the CPU use --amp bf16 or --amp off")
    if mode == "bf16" and device.type == "cpu" and (flags := cpu_flags()) and not flags & BF16_CPU_FLAGS:
        return mode, ("as asked, but this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 is emulated "
                      "here, a U-Net step ran 11-14x slower than in float32; --amp auto or off trains in float32")
    if mode != "auto":
        return mode, "as asked"
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return "bf16", "auto: CUDA with bf16 in hardware"
        return "fp16", "auto: CUDA without bf16 in hardware (before Ampere), fp16 with gradient scaling"
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "bf16", "auto: CPU with AMX bf16"
    if flags & BF16_CPU_FLAGS:
        return "bf16", "auto: CPU with AVX512-BF16"
    return "off", "auto: CPU without bf16 instructions (AVX512-BF16 or AMX), float32 is faster"


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)
