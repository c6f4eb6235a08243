"""The one reader of weights that come from elsewhere, and the strict loader that fits them.

:func:`read_weights` takes either a tag naming published weights (``"imagenet"``, ``"coco"``;
downloaded once into the torch hub cache, hash-checked where the file name carries one) or a
path to a local file: ``.safetensors`` (a pixelwise checkpoint included: its tensors are the
weights), or a ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, which never
runs code. Nothing here unpickles anything else.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from pixelwise.errors import UserError
from pixelwise.runtime import network_timeout, show_progress

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's rule: name-<sha256 prefix>.ext


def url_has_hash(url: str) -> bool:
    """Whether the file name of ``url`` carries a SHA-256 prefix that torch.hub can check."""
    return bool(_HASH_IN_NAME.search(Path(urlparse(url).path).name))


def download_weights(url: str) -> dict[str, Tensor]:
    """The state dict at ``url``, downloaded once into the torch hub cache (hash-checked when the
    file name carries one; a failed or corrupt download leaves nothing behind)."""
    progress = show_progress()
    # torch.hub writes 'Downloading: URL to PATH' (on stdout in torch 2.x) before it tries: kept on a
    # terminal, where the progress bar follows it; elsewhere a failed download must leave one line, the error
    quiet = contextlib.ExitStack()
    if not progress:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    was_cached = cached.is_file()
    try:
        with quiet, network_timeout():
            return torch.hub.load_state_dict_from_url(url, progress=progress, map_location="cpu", weights_only=True,
                                                      check_hash=url_has_hash(url))
    except Exception as e:  # noqa: BLE001 - a damaged cached file raises EOFError, UnpicklingError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if was_cached:  # torch reads a cached file without checking it again: nothing was downloaded
            raise UserError(f"the cached weights file {cached} could not be read ({reason}); it is damaged (an "
                            "interrupted copy?): delete it to download it again, or give a good copy with "
                            "--pretrained PATH") from None
        raise UserError(f"could not download weights from {url} ({reason}); download the file yourself and "
                        "give its path: --pretrained PATH") from None


def saved_meta(source: str | Path) -> dict | None:
    """The metadata a pixelwise checkpoint records (the JSON ``pixelwise`` entry of its safetensors
    header, :mod:`pixelwise.checkpoint`), read without its tensors; None for other files, tags and
    unreadable headers."""
    path = Path(source)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("pixelwise", "{}"))
    except (SafetensorError, OSError, ValueError, AttributeError):
        return None
    return meta if isinstance(meta, dict) else None


def saved_model_kwargs(source: str | Path) -> dict | None:
    """The ``model_kwargs`` a pixelwise checkpoint records: options that have no tensor, which its
    weights alone do not tell; None for other files, tags and unreadable headers."""
    kwargs = (saved_meta(source) or {}).get("model_kwargs")
    return kwargs if isinstance(kwargs, dict) else None


def weights_not_found(source: str | Path, tags: Sequence[str] = (), name: str = "") -> UserError:
    """The one message for weights that are neither a file nor a tag the model takes: it names
    the model's tags (``tags``, in the order given) and the file types; ``name`` prefixes it."""
    said = f"{', '.join(tags[:-1])} or {tags[-1]}" if len(tags) > 1 else "".join(tags)
    offer = f"{said}, or the path" if said else "the path"
    return UserError(f"{name + ': ' if name else ''}weights {str(source)!r} not found: pass {offer} of a "
                     ".safetensors/.pth file")


def read_weights(source: str | Path, urls: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """A state dict from a tag in ``urls`` (downloaded) or from a local file.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped. Raises UserError for a
    missing, unreadable or non-tensor file, naming it."""
    urls = urls or {}
    if isinstance(source, str) and source in urls:
        return download_weights(urls[source])
    path = Path(source)
    if path.is_dir():
        raise UserError(f"weights {str(source)!r} is a folder: pass the path of a .safetensors/.pth file in it")
    if not path.is_file():
        if not urls and isinstance(source, str) and not path.suffix and len(path.parts) == 1:  # a tag, not a path
            raise UserError(f"weights {source!r}: this model has no published weights to download (no tag "
                            "applies to it); train it from scratch or pass the path of a .safetensors/.pth file")
        raise weights_not_found(source, sorted(urls))
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} could not be read as safetensors ({e}); was it truncated?") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise UserError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors, .pth, .pt or .bin")
    try:
        with warnings.catch_warnings():  # a plain pickle of protocol 4+ warns before it is refused: one line, not three
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad or unsafe files
        text = str(e)
        first = text.splitlines()[0][:200] if text else ""
        said = f"{type(e).__name__}: {first}" if first else type(e).__name__
        reason = ("it holds Python objects besides tensors, which pixelwise never unpickles"
                  if "Weights only load failed" in text
                  else f"it is not a file torch.save wrote, or it is damaged ({said})")
        raise UserError(f"{path} is not a plain weights file torch can load safely (weights_only=True): "
                        f"{reason}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def non_finite(t: Tensor) -> bool:
    """Whether the floating tensor ``t`` holds a NaN or infinite value. Its sum is looked at first
    (NaN and inf carry into it; ten times faster than a look at each value), its values only where
    the sum is not finite (a float16 sum may overflow)."""
    if not t.is_floating_point():
        return False
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # float8: no sum, no isfinite
        t = t.float()
    return not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all())


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first tensor in ``tensors`` that is :func:`non_finite`, or None."""
    return next((name for name, t in tensors.items() if non_finite(t)), None)


def check_values(state: Mapping[str, Tensor], own: Mapping[str, Tensor], where: str) -> None:
    """A UserError for a tensor of ``state`` that the model (``own``, its state dict) takes and that
    holds NaN or infinite values (:func:`non_finite`), or integers where the model has floats (a
    quantised export)."""
    for k, v in state.items():
        if k in own and own[k].is_floating_point() and not (v.is_floating_point() or v.is_complex()):
            raise UserError(f"{where}: weight {k} holds {str(v.dtype).removeprefix('torch.')} values where the model "
                            "has floats (a quantised export?); give the float weights")
        if k in own and non_finite(v):
            raise UserError(f"{where}: weight {k} holds NaN or infinite values (it would predict nothing); give "
                            "weights of a run that did not diverge")


def load_matching(model: torch.nn.Module, state: Mapping[str, Tensor], where: str,
                  optional: tuple[str, ...] = ()) -> list[str]:
    """``model.load_state_dict(state, strict=True)`` except that keys starting with a prefix in
    ``optional`` may be absent from ``state`` or have another shape (a classifier with another
    number of classes); those keep their fresh initialisation, and the names of their layers are
    returned (sorted), for the caller to say so. Mismatches raise :class:`UserError`."""
    own = model.state_dict()
    state = dict(state)
    for key in list(state):
        if key.startswith(optional) and key in own and own[key].shape != state[key].shape:
            del state[key]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        have, need = tuple(state[k].shape), tuple(own[k].shape)
        classes = (f"; if it is the class layer, the file scores {have[0]} classes and this model {need[0]}: "
                   f"{type(model).__name__} loads its class layer as it is in the file, so build it with "
                   f"{have[0]} classes (FCN, DeepLab and Mask R-CNN files fine-tune to another class count)"
                   if have[1:] == need[1:] and k.rsplit(".", 1)[0] == list(own)[-1].rsplit(".", 1)[0] else "")
        raise UserError(f"{where}: weight {k} has shape {have}, the model needs {need}{classes}; check the model "
                        "name and its arguments")
    check_values(state, own, where)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(optional)]
    if missing or unexpected:
        prefix = next((p for p in ("module.", "model.", "backbone.", "encoder.", "net.")
                       if unexpected and all(k.startswith(p) and k[len(p):] in own for k in unexpected)), None)
        fix = (f"; the file's keys begin with {prefix!r} (a DataParallel/DDP or wrapper save): save it without "
               "that prefix" if prefix else "")
        raise UserError(f"{where}: weights do not fit {type(model).__name__}: missing {missing[:3]}"
                        f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                        f"{'...' if len(unexpected) > 3 else ''}{fix}")
    return sorted({k.rsplit(".", 1)[0] for k in own if k.startswith(optional) and k not in state}) if optional else []


def backbone_file(state: Mapping[str, Tensor], body: torch.nn.Module) -> dict[str, Tensor] | None:
    """``state`` without its classifier (``fc.*``) when it is a file of ``body``'s own keys (a
    local copy of torchvision's ImageNet ResNet given where a whole-model file is expected), so
    that it can fill ``body`` as ``pretrained="imagenet"`` would; None for a whole-model file."""
    own = body.state_dict()
    if any(k.startswith("backbone.") for k in state) or not any(k in own for k in state):
        return None
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
