"""Checkpoints: one ``.safetensors`` file, weights plus JSON metadata in its header.

``save_checkpoint`` writes atomically (temporary file, fsync, rename), so a crash never leaves
a half-written checkpoint. ``load_checkpoint`` rebuilds the model from the metadata alone.
Nothing here ever unpickles: foreign ``.pth``/``.pt`` weights are read only through
:func:`read_foreign_weights`, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pixelwise.errors import UserError

FORMAT = "pixelwise-checkpoint/1"
_PICKLE_SUFFIXES = {".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".bin"}


def _version() -> str:
    from pixelwise import __version__

    return __version__


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> None:
    """safetensors ``save_file`` to a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable; must hold ``model`` and
    ``num_classes``, usually also ``model_kwargs class_names palette mean std``)."""
    for key in ("model", "num_classes"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    meta = {"format": FORMAT, "pixelwise_version": _version(), **meta}
    atomic_save_tensors(model.state_dict(), path, {"pixelwise": json.dumps(meta)})


def _check_safetensors_file(path: Path) -> None:
    """Raise UserError unless ``path`` looks like a safetensors file (never unpickles)."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    looks_ok = len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8
    if looks_ok:
        return
    if path.suffix.lower() in _PICKLE_SUFFIXES or head[:1] == b"\x80" or head[:2] == b"PK":
        raise UserError(
            f"{path} is a pickle/PyTorch file, which pixelwise never loads as a checkpoint (it can run "
            "code); use a pixelwise .safetensors checkpoint, or import trusted weights with "
            "--pretrained PATH (read with torch.load(weights_only=True))")
    raise UserError(f"{path} is not a safetensors checkpoint (bad header); was it truncated?")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict, metadata) of a pixelwise checkpoint, validated."""
    path = Path(path)
    _check_safetensors_file(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} could not be read as safetensors ({e}); was it truncated?") from None
    if "pixelwise" not in header:
        raise UserError(f"{path} is a safetensors file but not a pixelwise checkpoint (no metadata); "
                        "load plain weights with --pretrained PATH instead")
    return state, json.loads(header["pixelwise"])


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint. Returns ``(model in eval mode, metadata)``."""
    from pixelwise.models import create_model

    state, meta = read_checkpoint(path)
    try:
        model = create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("model_kwargs", {}))
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot rebuild model {meta.get('model')!r} ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit model {meta['model']!r} "
                        f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model.to(device).eval(), meta


def read_foreign_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Plain weights from ``.safetensors`` or a trusted ``.pth``/``.pt`` (``weights_only=True``).

    A pixelwise checkpoint or a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} could not be read as safetensors ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise UserError(f"{path} is not a plain weights file torch can load safely "
                        f"(weights_only=True): {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return obj


def load_weights_into(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load foreign weights (see :func:`read_foreign_weights`) into ``model``."""
    state = read_foreign_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise UserError(f"{path}: weights do not fit the model (missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
