"""How pixelwise meets the machine it runs on: progress bars, the device asked for, signals.

Progress bars (:func:`progress`) are drawn only on a terminal: a tqdm bar redraws itself with
carriage returns, which in a log file (``pixelwise train ... > log``, SLURM, docker logs) become
one unreadable line of frames. ``show=None`` (the default of every verb) means "when stderr is a
terminal"; ``--progress`` forces them on and ``--no-progress`` off. Every bar in pixelwise comes
from here.

:func:`check_device` turns ``--device cuda`` on a machine or build without CUDA into a one-line
error instead of torch's assertion, and :func:`check_can_create` a path this user cannot create
(under a file, in a folder without write permission) into one before any work.

:func:`cpu_flags` reads what the CPU can do (``/proc/cpuinfo``), once for every caller: whether it
has bf16 arithmetic in hardware (:func:`cpu_has_native_bf16`; without it oneDNN emulates bf16, far
slower than float32) decides mixed-precision training and the fast inference paths, and its int8
dot-product instructions decide the quantised kernels.

:class:`HeldSignals` holds Ctrl-C (SIGINT) and SIGTERM back while a unit of work that must not be
cut in half runs, and delivers them as soon as it is done: a training step's forward passes change
BatchNorm statistics and its optimizer step changes the weights one tensor at a time, so an
interrupt inside it would save a state no uninterrupted run ever had.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from tqdm import tqdm

from pixelwise.errors import UserError, dangling_link

T = TypeVar("T")


def show_progress(show: bool | None = None, stream: IO[str] | None = None) -> bool:
    """Whether to draw progress bars: ``show`` when given (``--progress`` / ``--no-progress``),
    otherwise only when ``stream`` (default: stderr, where the bars go) is a terminal."""
    if show is not None:
        return bool(show)
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress(iterable: Iterable[T], desc: str, show: bool | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable)`` drawn only per :func:`show_progress`; when hidden it is a plain pass-through
    whose ``set_postfix`` does nothing."""
    return tqdm(iterable, desc=desc, disable=not show_progress(show), dynamic_ncols=True, **kwargs)


def check_can_create(folder: Path, what: str) -> None:
    """Before any work: ``folder`` (existing, or to be created with any missing folders above it)
    is somewhere this user may write: the nearest of it and its ancestors that exists is a folder
    with write permission. Otherwise a one-line UserError that starts with ``what`` (the flag and
    the path the user gave)."""
    nearest = folder
    while not nearest.exists() and nearest.parent != nearest:  # a drive or share root is its own parent
        link = dangling_link(nearest)
        if link:  # mkdir would say "File exists"
            raise UserError(f"{what}: {nearest} is a {link}; fix the link, remove it, or give another path")
        nearest = nearest.parent
    if not nearest.exists():
        raise UserError(f"{what}: {nearest} does not exist (a drive or share that is not there); give another path")
    if not nearest.is_dir():
        raise UserError(f"{what}: {nearest} is a file, not a folder; give another path")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{what}: no permission to write in {nearest}; give another path")
    try:  # os.access trusts the mode bits: root, read-only mounts and sysfs need a real try
        fd, probe = tempfile.mkstemp(prefix=".pixelwise-probe-", dir=nearest)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {nearest} ({e.strerror or e}); give another path") from None
    os.close(fd)
    os.unlink(probe)


def check_device(name: str) -> torch.device:
    """``--device NAME`` -> a torch device that exists here, or a one-line UserError that says why
    not and what to use instead."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {name}: {build} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: pixelwise runs on cpu or cuda")
    return device


def available_memory() -> int | None:
    """Bytes of memory the machine can give without swapping (Linux's ``MemAvailable``), or None
    where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx2``, ``amx_bf16``, ...) from ``/proc/cpuinfo``; empty where
    that cannot be read (systems other than Linux), which callers take as "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# the flags of native bf16 arithmetic (AVX512-BF16, AMX) and of u8 x s8 dot products with 32-bit sums
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
VNNI_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` (not the current one) does bf16 in hardware: compute capability 8.0
    (Ampere) or newer, or any ROCm GPU. ``torch.cuda.is_bf16_supported()`` also says yes where bf16
    is only emulated (V100, T4: no bf16 convolution kernels, slower than fp16)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_native_bf16() -> bool:
    """Whether the CPU does bf16 arithmetic in hardware (:data:`BF16_CPU_FLAGS`). Where the flags
    cannot be read, oneDNN's own answer, which is only the fallback: it says yes for every AVX-512
    CPU (AVX512-BW/VL/DQ), where bf16 is emulated and slower than float32."""
    flags = cpu_flags()
    if flags:
        return bool(flags & BF16_CPU_FLAGS)
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside the block (in the main thread; elsewhere Python cannot set
    handlers): the save that follows a first Ctrl-C is not cut short by a second one, which would
    leave the weights without their training state."""
    previous: dict[signal.Signals, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class HeldSignals:
    """``hold()`` ... ``release()``: SIGINT and SIGTERM arriving in between are recorded instead of
    handled, and delivered to the handlers in place before (e.g. the CLI's, which raise
    KeyboardInterrupt) at ``release()``. Outside the main thread, where Python cannot set
    handlers, nothing is held."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: list[int] = []

    def _record(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def hold(self) -> None:
        if self.previous:
            return
        try:
            for sig in self.SIGNALS:
                before = signal.getsignal(sig)
                signal.signal(sig, self._record)
                self.previous[sig] = signal.SIG_DFL if before is None else before
        except ValueError:  # not the main thread
            self.release()

    def release(self) -> None:
        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        pending, self.pending = self.pending, []
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


NETWORK_TIMEOUT_S = 60.0  # seconds a download's connection may stay silent before it fails


@contextmanager
def network_timeout(seconds: float = NETWORK_TIMEOUT_S) -> Iterator[None]:
    """Sockets opened inside fail after ``seconds`` of silence (urllib and torch.hub set none: a
    stalled connection waited forever) with an OSError the callers report as a failed download."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)

