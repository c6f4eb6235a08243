"""Multi-process training under ``torchrun``: process-group set-up and the few collectives the
trainer needs. Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) every function is a no-op for a
single process, so the training loop has one code path.

Backends: NCCL when training on CUDA, gloo on the CPU. Each process trains on its own shard of
the data (``DistributedSampler``), gradients are averaged by ``DistributedDataParallel``, and
only rank 0 writes files and logs. Validation runs on disjoint shards and the confusion
matrices are summed over ranks, so the metrics equal a single-process evaluation.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from pixelwise.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from the variables ``torchrun`` sets."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (are you using torchrun?)") from None


def setup(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when started by ``torchrun``; -> (info, this process's device).

    ``device="cuda"`` becomes ``cuda:LOCAL_RANK`` with the NCCL backend; ``cpu`` uses gloo."""
    info = env_info()
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    dev = torch.device(f"cuda:{info.local_rank}" if device == "cuda" and info.enabled else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return info, dev


def cleanup() -> None:
    """Destroy the process group, after collecting what still holds its work (a DDP wrapper in a
    reference cycle): a rank tearing the group down under live gloo work aborted now and then at
    exit ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place; returned). No-op in a single process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (picklable builtins only: numbers, strings, lists)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers (e.g. BatchNorm running stats) to all ranks."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def shard(n: int, info: DistInfo) -> list[int]:
    """Indices ``0..n-1`` of this rank for evaluation: disjoint, no padding, union = all."""
    return list(range(info.rank, n, info.world_size))


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, sync_bn: bool,
               find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel (optionally with SyncBatchNorm) under torchrun; else ``model``.
    ``find_unused_parameters`` for models whose loss skips some heads on some batches (Mask R-CNN
    with an image without objects)."""
    if not info.enabled:
        return model
    if sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it for CPU runs")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
