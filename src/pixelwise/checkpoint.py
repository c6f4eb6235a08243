"""Checkpoints: one ``.safetensors`` file, weights plus JSON metadata in its header.

The metadata holds the model name and kwargs, the task, class names and palette, a training
summary, the pixelwise version and the **input contract** (``"input"``, an
:class:`~pixelwise.preprocess.InputSpec`: normalisation, whether the model normalises itself,
the size it was trained at, input channels). ``load_checkpoint`` rebuilds the model from the
file alone and every inference path reads the contract with :func:`input_spec_from_meta`.

Training state for resume (optimizer, grad scaler, RNG states, counters) is a second
safetensors file beside the checkpoint, written by :func:`save_train_state`.

Every write goes to a temporary file in the same folder, is fsynced and renamed, so a crash never
leaves a half-written file; the result gets the user's umask permissions. Nothing here ever
unpickles: foreign weights are read by :mod:`pixelwise.weights`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import socket
import struct
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pixelwise._version import __version__
from pixelwise.errors import UserError, brief, not_a_file
from pixelwise.models import create_model, model_info
from pixelwise.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from pixelwise.runtime import check_device
from pixelwise.weights import first_non_finite

FORMAT = "pixelwise-checkpoint/1"
_PICKLE_SUFFIXES = {".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".bin"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _here() -> str:
    """``h`` and 8 hex digits naming this host, boot and process-id namespace: a process id means
    something only where it was taken (another node on shared storage, another container) and
    until the machine restarts. The boot's id tells apart machines of one hostname (cloned VMs,
    ``localhost``), whose first process-id namespaces all have one inode number."""
    try:
        space = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        space = 0
    return "h" + hashlib.sha256(f"{socket.gethostname()}/{space}/{_boot_id()}".encode()).hexdigest()[:8]


def _boot_id() -> str:
    """Linux's random id of this boot of this machine; "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


HERE = _here()
# temporary_paths()' names: where and by which process, a random tag, the file's index (predict's
# of older versions wrote no place, or no place and no process id)
_TEMPORARY = re.compile(r"\.pixelwise-(?:(h[0-9a-f]{8})-)?(?:(\d+)-)?[0-9a-f]{12}-\d+\.\w+")
# a temporary file that no process here can be asked about is left until it has not been written
# for this long: a running writer keeps its file fresh (predict writes rows as they come)
STALE_SECONDS = 24 * 3600


def temporary_paths(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Names in ``folder`` for temporary files, one per suffix (each keeps its suffix, so PIL knows
    the format), which say the host and the process that writes them, so that
    :func:`remove_stale_temporaries` can tell those a killed process left."""
    tag = uuid.uuid4().hex[:12]  # a short name, whatever the length of the output's own
    return [folder / f".pixelwise-{HERE}-{os.getpid()}-{tag}-{k}{suffix}" for k, suffix in enumerate(suffixes)]


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of :func:`temporary_paths` that a killed writer (SIGKILL, power
    loss: nothing of its own cleanup ran) left in ``folder``: those written here (this host, this
    process-id namespace) by processes no longer running, and the others (another host or
    container on the same storage, an older version's, and every one on Windows, where a process
    cannot be asked without a signal) once unwritten for :data:`STALE_SECONDS`. -> the files
    deleted."""
    gone = []
    now = time.time()
    for path in folder.glob(".pixelwise-*"):
        found = _TEMPORARY.fullmatch(path.name)
        if found is None:
            continue
        here, pid = found.group(1), found.group(2)
        if here == HERE and pid is not None and os.name != "nt":  # Windows' os.kill(pid, 0) sends Ctrl+C
            if _running(int(pid)):
                continue
        elif not _unwritten_for_a_day(path, now):
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError:  # another user's in a shared (sticky) folder, a folder of that name: not this write's failure
            continue
        gone.append(path)
    return gone


def _unwritten_for_a_day(path: Path, now: float) -> bool:
    try:
        return now - path.stat().st_mtime >= STALE_SECONDS
    except OSError:  # gone meanwhile, or not ours to ask
        return False


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or a platform that cannot tell: keep its files
        return True
    return True


def file_version(path: str | Path) -> tuple[int, ...] | None:
    """(device, inode, size, modification time in ns) of ``path``, which a write or a replacement
    changes (a file a training run or a copy writes over while it is read); None where it cannot be
    read (the reader says why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def atomic_write(path: str | Path, write, replace: bool = True) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path`` (:func:`temporary_paths`), fsync,
    give it the permissions a plain ``open()`` would (0666 minus the umask), then rename it over
    ``path``. The folders of ``path`` that do not exist are made first; when the write fails,
    those it made (only those, and only while empty) are removed again, so a refused write leaves
    no new folder behind. What a killed writer left in the folder goes first
    (:func:`remove_stale_temporaries`, and the ``.NAME.<random>.tmp`` of ``path`` that versions
    before 2026-12-07 named their temporaries, once a day old). ``replace=False``: a ``path``
    that exists by then (another process wrote it since the caller checked) is left as it is, a
    UserError (:func:`place`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the name of a file to write")
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    (tmp,) = temporary_paths(path.parent, [".tmp"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except BaseException:
        _remove_empty(made)
        raise
    done = False
    try:
        if not made:
            _remove_left_temporaries(path)
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        place(tmp, path, replace)
        done = True
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write to an open file (a full disk) names none
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
        if not done:
            _remove_empty(made)


def _remove_left_temporaries(path: Path) -> None:
    """What killed writers left beside ``path`` (:func:`atomic_write`); never raises: a folder that
    cannot be listed or a file that cannot be removed is not this write's failure."""
    try:
        remove_stale_temporaries(path.parent)
        old = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
        now = time.time()
        for left in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if old.fullmatch(left.name) and _unwritten_for_a_day(left, now):
                left.unlink(missing_ok=True)
    except OSError:
        pass


class NameTaken(UserError):
    """A file of the name a command writes appeared after its check (another process wrote it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(f"{path} appeared while this command ran (another pixelwise writing there?) and was left as "
                         "it is; give another path, or pass --overwrite")


def place(tmp: str | Path, path: str | Path, replace: bool = True) -> None:
    """Rename the finished ``tmp`` to ``path``; without ``replace`` only if ``path`` does not exist
    at that moment (a hard link, which fails on an existing name, then the temporary name removed),
    else a UserError: two commands started at once into one folder would otherwise each replace
    the other's files, though each checked there were none."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
        taken = False
    except FileExistsError:
        taken = True
    except OSError:  # a file system without hard links: the check and the rename, as close as they can be
        taken = os.path.lexists(path)
        if not taken:
            os.replace(tmp, path)
            return
    if taken:
        raise NameTaken(path)
    os.unlink(tmp)


def _remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that exists and is empty; never raises."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there meanwhile), gone, or not ours to remove
            break


def atomic_write_text(path: str | Path, text: str, replace: bool = True) -> None:
    """``text`` at ``path``, atomically (see :func:`atomic_write`): run files, metrics, ``--json``."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), replace)


def atomic_write_json(path: str | Path, value: object, replace: bool = True) -> None:
    """``value`` as indented JSON at ``path``, atomically, with every NaN or infinity as null: JSON
    has no such numbers, and strict readers refuse Python's ``NaN`` (COCO leaves the APs of absent
    object sizes undefined). ``replace``: as :func:`atomic_write`."""
    atomic_write_text(path, json.dumps(_json_safe(value), indent=2), replace)


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> None:
    """safetensors ``save_file``, atomically (see :func:`atomic_write`)."""
    cpu = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(cpu, tmp, metadata=metadata)
        except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors: the CLI's one line wants one
            raise OSError(f"cannot write {path}: {e}") from None

    atomic_write(path, write)


def model_input_spec(model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     resize: tuple[int, int] | None = None) -> InputSpec:
    """The input contract of ``model`` as built: a model that normalises its own input
    (``model.normalizes_input``, Mask R-CNN) gets values in [0, 1] and states its own mean/std;
    ``model.in_channels`` (default 3) sets the channels."""
    if getattr(model, "normalizes_input", False):
        mean, std = getattr(model, "input_mean_std")  # noqa: B009 - read like normalizes_input, off any model
        return InputSpec(mean=tuple(mean), std=tuple(std), normalize=False, resize=resize)
    return InputSpec.for_channels(int(getattr(model, "in_channels", 3)), tuple(mean), tuple(std), resize=resize)


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable; must hold ``model`` and
    ``num_classes``, usually also ``model_kwargs class_names palette``). Without an ``input``
    contract one is derived from the model (and ``meta``'s ``mean``/``std`` if given). numpy
    scalars and arrays and an :class:`InputSpec` are stored as the JSON they stand for."""
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint metadata must be a dict, got {type(meta).__name__}")
    if not isinstance(model, nn.Module):  # a state dict gave "'OrderedDict' object has no attribute 'state_dict'"
        hint = (" (a state dict: load it into the model it came from, model.load_state_dict(sd), and save the model)"
                if isinstance(model, dict) else "")
        raise TypeError(f"save_checkpoint saves a model (torch.nn.Module, such as pixelwise.create_model(...)), "
                        f"got {type(model).__name__}{hint}")
    try:
        meta = json.loads(json.dumps(meta, default=_plain))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable ({e})") from None
    for key in ("model", "num_classes"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    model = unwrap(model)
    _check_rebuilds(model, meta)
    # the writer's format and version, whatever a loaded checkpoint's metadata passed back said
    meta = {**meta, "format": FORMAT, "pixelwise_version": __version__, "task": model_info(meta["model"]).task}
    if "input" not in meta:
        spec = model_input_spec(model, meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD))
        meta["input"] = spec.to_dict()
    atomic_save_tensors(model.state_dict(), path, {"pixelwise": json.dumps(meta)})


def _plain(value: object) -> object:
    """``json.dumps``' fallback for the values a caller's metadata naturally holds."""
    if isinstance(value, InputSpec):
        return value.to_dict()
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, whose state-dict keys carry the wrapper's prefix."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


def _check_rebuilds(model: nn.Module, meta: dict) -> None:
    """``meta`` describes ``model`` as :func:`load_checkpoint` will rebuild it (built on the meta
    device: no memory, no weights), with class names, palette and input contract that fit; else
    a ValueError now, rather than a file that cannot be loaded."""
    problem = palette_problem(meta.get("palette")) or task_problem(meta)
    if problem:
        raise ValueError(f"checkpoint metadata: {problem}")
    num_classes, names = meta["num_classes"], meta.get("class_names")
    problem = class_names_problem(names, num_classes)
    if problem is None and names is not None:
        problem = distinct_names_problem(names)
    if problem:
        raise ValueError(f"checkpoint metadata: {problem}")
    if meta.get("palette") is not None and len(meta["palette"]) < num_classes:
        raise ValueError(f"checkpoint metadata: the palette has {len(meta['palette'])} colours for {num_classes} "
                         "classes")
    problem = category_ids_problem(meta.get("category_ids"), num_classes)
    if problem:
        raise ValueError(f"checkpoint metadata: {problem}")
    if "input" in meta:
        try:
            InputSpec.from_dict(meta["input"])
        except (UserError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint metadata: input is not an input contract ({e})") from None
    try:
        with torch.device("meta"):
            rebuilt = create_model(meta["model"], num_classes=num_classes, **meta.get("model_kwargs", {}))
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise ValueError(f"checkpoint metadata: cannot rebuild model {meta['model']!r} from it ({e})") from None
    mismatch = weights_mismatch(rebuilt, model.state_dict())
    if mismatch:
        raise ValueError(f"checkpoint metadata: model {meta['model']!r} with num_classes {num_classes} and "
                         f"model_kwargs {meta.get('model_kwargs', {})} is not the model given ({mismatch})")
    problem = contract_problem(meta, rebuilt)
    if problem:
        raise ValueError(f"checkpoint metadata: {problem}")


def contract_problem(meta: dict, model: nn.Module) -> str | None:
    """Where the input contract and ``model`` as built disagree: on the input's channels (every
    prediction failed inside torch), or on who normalises the input (the contract's ``normalize``
    false means the model does, as Mask R-CNN built with its default ``normalize``): the input would
    be normalised twice, or by neither (mask AP 0.28 -> 0.001)."""
    if "input" not in meta:  # an older file: the contract is read off the model
        return None
    spec = InputSpec.from_dict(meta["input"])
    takes = int(getattr(model, "in_channels", 3))
    if spec.channels != takes:  # a 1-channel contract fed to a 3-channel first convolution failed inside torch
        return (f"input contract has {spec.channels} channel(s), and {meta.get('model')} built with model_kwargs "
                f"{meta.get('model_kwargs', {})} takes {takes}: every prediction would fail")
    here, itself = bool(spec.normalize), bool(getattr(model, "normalizes_input", False))
    if here != itself:
        return None
    does = "normalises" if itself else "does not normalise"
    return (f"input contract says {'normalise here' if here else 'the model normalises'}, and {meta.get('model')} "
            f"built with model_kwargs {meta.get('model_kwargs', {})} {does} its input itself: it would be "
            f"normalised {'twice' if here else 'by neither'}")


def input_spec_from_meta(meta: dict, model: nn.Module | None = None) -> InputSpec:
    """The checkpoint's input contract. Checkpoints written before it existed carry only ``mean``
    and ``std``; whether their model normalises itself is then read off the ``model``."""
    if "input" in meta:
        return InputSpec.from_dict(meta["input"])
    mean, std = (_channel_values(meta, "mean", IMAGENET_MEAN), _channel_values(meta, "std", IMAGENET_STD))
    return model_input_spec(model, mean, std) if model is not None else InputSpec(mean=mean, std=std)


def _channel_values(meta: dict, key: str, default: tuple[float, ...]) -> tuple:
    """An older checkpoint's top-level ``mean`` or ``std``: a list, one value per channel (checked
    as numbers by :class:`InputSpec`); a null or a bare number was a TypeError traceback."""
    values = meta.get(key, default)
    if not isinstance(values, list | tuple):
        raise UserError(f"the file's {key} is {values!r}, not a list of one number per channel; fix its metadata")
    return tuple(values)


def is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes whose first bytes are ``head`` starts as a safetensors file
    does: an 8-byte header length that fits the file, then the JSON header's ``{``."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8


# the first bytes of the image files most likely to be given as a checkpoint by mistake
_IMAGE_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"),
                (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def _check_safetensors_file(path: Path, what: str = "checkpoint") -> None:
    """Raise UserError unless ``path`` looks like a safetensors file (never unpickles)."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors") if not p.name.endswith(".state.safetensors"))
        hint = f" such as {path / inside[0]}" if inside else ""
        raise UserError(f"{what} {path} is a folder: give a checkpoint file in it{hint}")
    problem = not_a_file(path, "a checkpoint file")
    if problem == "file not found":
        raise UserError(f"{what} {path} not found; check the path (a run writes runs/NAME/best.safetensors and "
                        "last.safetensors)")
    if problem:
        raise UserError(f"{what} {path}: {problem}")
    with open(path, "rb") as f:
        head = f.read(9)
    if is_safetensors(head, path.stat().st_size):
        return
    if path.suffix.lower() == ".pt2" and head[:2] == b"PK":  # a zip, as torch.export.save writes them
        raise UserError(f"{path} is a torch.export archive (`pixelwise export --format pt2` writes them), not a "
                        f"{what}; pixelwise never loads one (torch.export.load can unpickle what it holds): give the "
                        ".safetensors checkpoint it was exported from, or load it in PyTorch as docs/deploy.md shows")
    if path.suffix.lower() in _PICKLE_SUFFIXES or head[:1] == b"\x80" or head[:2] == b"PK":
        raise UserError(
            f"{path} is a pickle/PyTorch file, which pixelwise never loads as a checkpoint (it can run "
            "code); use a pixelwise .safetensors checkpoint, or import trusted weights with "
            "--pretrained PATH (read with torch.load(weights_only=True))")
    if path.suffix.lower() == ".onnx" and head[:1] == b"\x08":  # an ONNX protobuf begins with ir_version, field 1
        raise UserError(f"{path} is an ONNX file (pixelwise export writes them), not a {what}: run it with "
                        "Predictor.from_checkpoint, or give it to predict, eval and bench as --onnx")
    image = next((kind for magic, kind in _IMAGE_MAGIC if head.startswith(magic)), None)
    if image:
        raise UserError(f"{path} is a {image} image, not a {what}: give the .safetensors file `pixelwise train` "
                        "writes (runs/NAME/best.safetensors), and the image as an input")
    raise UserError(f"{path} is not a safetensors {what} (bad header); was it truncated? (a {what} is the "
                    ".safetensors file `pixelwise train` writes)")


def _read(path: Path, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON metadata under ``key``) of a safetensors file, every failure one UserError."""
    _check_safetensors_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:  # one open file: metadata and weights of one version
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - a handle, not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} could not be read as safetensors ({e}); was it truncated?") from None
    if key not in header:
        raise UserError(f"{path} is a safetensors file but not a pixelwise {what} (no {key!r} metadata)")
    try:
        meta = json.loads(header[key])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: its {what} metadata is not valid JSON ({e}); the file is damaged") from None
    except RecursionError:  # nested deeper than Python's recursion limit: no pixelwise file is
        raise UserError(f"{path}: its {what} metadata is nested too deeply to be pixelwise's; the file is "
                        "damaged") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: its {what} metadata is not a JSON object; the file is damaged")
    return tensors, meta


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict, metadata) of a pixelwise checkpoint, validated."""
    path = Path(path)
    state, meta = _read(path, "pixelwise", "checkpoint")
    for key in ("model", "num_classes"):
        if key not in meta:
            raise UserError(f"{path}: checkpoint metadata lacks {key!r}; the file is damaged")
    form = meta.get("format", FORMAT)  # absent in files older than the format field
    major = form.rpartition("/")[2] if isinstance(form, str) and form.startswith("pixelwise-checkpoint/") else None
    # ASCII digits only (str.isdigit takes '\u0661' too), and few of them: int() refuses over 4300
    if major is None or not (major.isascii() and major.isdigit()) or len(major) > 9:
        raise UserError(f"{path}: checkpoint format {brief(form)} is not pixelwise's; the file is damaged")
    if int(major) > int(FORMAT.rpartition("/")[2]):
        raise UserError(f"{path}: checkpoint format {form} was written by a newer pixelwise than this one "
                        f"({__version__}, which reads {FORMAT}); upgrade pixelwise")
    problem = metadata_problem(meta)
    if problem:  # it colours every mask written: found now, not halfway through writing one
        raise UserError(f"{path}: the checkpoint's {problem}; fix its metadata or save it again with a valid one")
    bad = first_non_finite(state)
    if bad is not None:  # NaN logits argmax to class 0 everywhere: confident, plausible, wrong numbers
        raise UserError(f"{path}: weight {bad} holds NaN or infinite values, so every prediction would be "
                        "meaningless; the training that wrote it diverged: use an earlier checkpoint, or retrain "
                        "(lower --lr)")
    return state, meta


def metadata_problem(meta: dict) -> str | None:
    """What is wrong with the metadata a checkpoint or an exported file carries: ``num_classes``, the
    ``class_names`` (one per class), the ``palette``, the ``category_ids``, the input contract; or None."""
    n = meta.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"num_classes must be a whole number >= 1, and is {n!r}"
    options = meta.get("model_kwargs", {})
    if not isinstance(options, dict) or {"num_classes", "pretrained"} & set(options):
        return (f"model_kwargs must be an object of the model's options (num_classes and pretrained are not "
                f"among them), and is {options!r}")
    names_problem = class_names_problem(meta.get("class_names"), n)
    if names_problem:
        return names_problem
    problem = (palette_problem(meta.get("palette"), n) or category_ids_problem(meta.get("category_ids"), n)
               or task_problem(meta))
    if problem:
        return problem
    if "input" in meta:
        contract = meta["input"]
        try:
            if not isinstance(contract, dict):
                raise UserError(f"{contract!r} is not an object")
            InputSpec.from_dict(contract)
        except UserError as e:
            return f"input contract must be an object of mean, std, normalize, resize and channels ({e})"
    return None


def class_names_problem(names: object, n: int) -> str | None:
    """What is wrong with ``class_names`` (None: not given) for ``n`` classes, or None."""
    if names is not None and (not isinstance(names, list | tuple) or len(names) != n
                              or not all(isinstance(name, str) for name in names)):
        return f"class_names must list a name (text) for each of the {n} classes, and holds {names!r}"
    return None


def distinct_names_problem(names: Sequence[str]) -> str | None:
    """An empty class name, or one that two classes share, or None. Reports, the legend and the
    server's answers name the classes, where two of one name could not be told apart. Checked where
    names are made (a checkpoint saved, a dataset read), not where a checkpoint is read."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name.strip():
            return f"class {i} has an empty name; give every class a name"
        if name in first:
            return f"classes {first[name]} and {i} are both named {name!r}; give each class its own name"
        first[name] = i
    return None


def task_problem(meta: dict) -> str | None:
    """What is wrong with ``meta``'s ``task``: not the task of the model it names (a U-Net said to
    be an instance model is given to the instance predictor, and fails there), or None."""
    task = meta.get("task")
    if task is None:
        return None
    name = meta.get("model")
    try:
        own = model_info(name).task if isinstance(name, str) else None
    except (KeyError, UserError):  # a model this version does not know (an ONNX file's class name)
        own = None
    if own is not None and task != own:
        return f"task {task!r}, but {name} is a {own} model"
    if task not in ("semantic", "instance"):
        return f"task must be semantic or instance, and is {task!r}"
    return None


def category_ids_problem(ids: object, num_classes: object) -> str | None:
    """What is wrong with a checkpoint's ``category_ids`` (the dataset's own id of each class,
    e.g. COCO's, written into predictions as ``category_id``; optional), or None."""
    if ids is None:
        return None
    if (not isinstance(ids, list | tuple) or len(ids) != num_classes
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        return f"category_ids must list one whole-number id for each of the {num_classes} classes, got {ids!r}"
    objects = list(ids[1:])  # the first is the background's, which no detection carries
    if min(ids, default=0) < 0 or len(set(objects)) != len(objects):  # two classes' detections under one id
        return f"category_ids must be distinct ids >= 0 (one per class), got {ids!r}"
    return None


def palette_problem(palette: object, n: int | None = None) -> str | None:
    """What is wrong with a checkpoint's ``palette`` (a list of ``[r, g, b]``, each 0..255, and with
    ``n``, at least one per class), or None."""
    def colour(c: object) -> bool:
        return (isinstance(c, list | tuple) and len(c) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c))

    if palette is None:
        return None
    if isinstance(palette, list | tuple) and all(colour(c) for c in palette):
        return (f"palette must hold a colour for each of the {n} classes, and holds {len(palette)}"
                if n is not None and len(palette) < n else None)
    bad = next((c for c in palette if not colour(c)), palette) if isinstance(palette, list | tuple) else palette
    return f"palette must be a list of [r, g, b] colours with values 0 to 255, and holds {brief(bad)}"


def _kind(t: torch.Tensor) -> str:
    return ("complex" if t.is_complex() else "float" if t.is_floating_point() else "bool" if t.dtype == torch.bool
            else "integer")


def weights_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot load into ``model``, in a few words (load_state_dict's RuntimeError lists
    every key), or None when it fits."""
    own = model.state_dict()
    misshapen = [f"{k} {tuple(v.shape)} where the model has {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    # a float weight of any width loads as the model's float32; an int, bool or complex one was cast
    # silently (fractions cut to 0, the imaginary part dropped)
    mistyped = [f"{k} {str(v.dtype).removeprefix('torch.')} where the model has "
                f"{str(own[k].dtype).removeprefix('torch.')}"
                for k, v in state.items() if k in own and _kind(v) != _kind(own[k])]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = [f"{len(keys)} {what}, e.g. {'; '.join(keys[:2])}"
             for keys, what in ((misshapen, "of other shapes"), (mistyped, "of other types"), (missing, "missing"),
                                (unexpected, "unexpected"))
             if keys]
    return "; ".join(parts) or None


def load_checkpoint(path: str | Path, device: str | torch.device | None = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint. Returns ``(model in eval mode, metadata)``; the
    metadata's ``input`` is the input contract (filled in for older checkpoints). A ``device``
    that does not exist here (``cuda`` without CUDA) is a UserError; None is the CPU, as for
    ``Predictor.from_checkpoint``."""
    device = check_device(str("cpu" if device is None else device))
    state, meta = read_checkpoint(path)
    try:
        model = create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("model_kwargs", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: cannot rebuild model {meta.get('model')!r} ({e})") from None
    mismatch = weights_mismatch(model, state)
    if mismatch:
        wrote = meta.get("pixelwise_version", "?")
        fix = ("the file's model, num_classes or model_kwargs do not describe its weights: fix its metadata, or "
               "retrain" if wrote == __version__  # same version: the pixelwise that wrote it builds it so too
               else f"written by pixelwise {wrote}, this is {__version__}: load it with the pixelwise that wrote it, "
               "or retrain")
        raise UserError(f"{path}: weights do not fit model {meta['model']!r} as this pixelwise builds it "
                        f"({mismatch}); {fix}")
    problem = contract_problem(meta, model)
    if problem:
        raise UserError(f"{path}: the checkpoint's {problem}; fix its metadata")
    # built in the caller's default dtype (float64 in some scientific code, or float16): float32 before
    # the weights are copied in, which a float16 model would round
    model.float().load_state_dict(state)
    if meta.get("task") is None:  # absent in older files (a null, hand-written, reads the same)
        meta["task"] = model_info(meta["model"]).task
    try:
        meta["input"] = input_spec_from_meta(meta, model).to_dict()
    except UserError as e:  # the file's contract cannot be read: name the file
        raise UserError(f"{path}: {e}") from None
    return model.to(device).eval(), meta


# --- training state -------------------------------------------------------------------------------
def _optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict, params: list[torch.Tensor]) -> dict:
    """The optimizer's per-parameter state from a state file's ``optim.<index>.<name>`` tensors and
    ``<index>.<name>`` scalars; ValueError where it cannot be the state of ``params`` (an index out
    of range, a tensor of another shape than its parameter, parameters with different sets of
    entries): the optimizer would take it and fail at its first step, halfway into the run."""
    state: dict[int, dict] = {}
    items = [(k[len("optim."):], v) for k, v in tensors.items() if k.startswith("optim.")] + list(scalars.items())
    for key, value in items:
        idx, name = key.split(".", 1)
        if not idx.isdigit() or int(idx) >= len(params):
            raise ValueError(f"an entry {key!r} for no parameter of the model")
        param = params[int(idx)]
        if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
            raise ValueError(f"{name} of parameter {idx} is {tuple(value.shape)}, the parameter {tuple(param.shape)}")
        state.setdefault(int(idx), {})[name] = value
    names = {frozenset(entries) for entries in state.values()}
    if len(names) > 1:
        raise ValueError(f"parameters with different entries: {sorted(sorted(n) for n in names)[:2]}")
    return state


def save_train_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """One safetensors file with everything a resume needs: the weights (``model.*``), the
    optimizer's tensors (``optim.<param>.<name>``) and its other values and param groups, the
    grad scaler, plus the caller's ``tensors`` (e.g. RNG states) and JSON ``meta`` (counters)."""
    opt = optimizer.state_dict()
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    scalars = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    out.update(tensors)
    header = {**meta, "optimizer": type(optimizer).__name__, "param_groups": opt["param_groups"],
              "optim_scalars": scalars,
              "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    atomic_save_tensors(out, path, {"pixelwise_train_state": json.dumps(header)})


def load_train_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore what :func:`save_train_state` wrote into ``model``, ``optimizer`` and ``scaler``;
    -> (the caller's tensors, the caller's meta)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot resume: {path} not found (was this run started with this --out?)")
    tensors, meta = _read(path, "pixelwise_train_state", "training state")
    # copies: safetensors maps the file, and tensors the optimizer keeps as they are would hold the
    # map for the whole run, and Windows refuses to replace a mapped file (the first save failed)
    tensors = {k: v.clone() for k, v in tensors.items()}
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if not weights:  # older runs kept the weights only in last.safetensors
        weights = read_checkpoint(path.parent / "last.safetensors")[0]
    settings = (f"resume with the run's own settings (`pixelwise train --resume --out {path.parent}` reads them "
                f"from {path.parent / 'config.yaml'}), or train into a new --out")
    mismatch = weights_mismatch(model, weights)  # another model, its options, or another number of classes
    if mismatch:
        raise UserError(f"cannot resume: the weights in {path} do not fit the model these settings build "
                        f"({mismatch}); {settings}")
    model.load_state_dict(weights)
    saved = meta.pop("optimizer", None)  # states written before it was recorded: not checked
    if saved is not None and saved != type(optimizer).__name__:
        raise UserError(f"cannot resume: the run in {path.parent} trains with {saved}, these settings with "
                        f"{type(optimizer).__name__}; {settings}")
    groups = meta.get("param_groups")
    groups = groups if isinstance(groups, list) else []
    sizes = [len(g["params"]) for g in groups if isinstance(g, dict) and isinstance(g.get("params"), list)]
    readable = bool(groups) and len(sizes) == len(groups)
    if readable and sizes != [len(g["params"]) for g in optimizer.param_groups]:
        # another grouping of the parameters (--decay-norm-and-bias, --weight-decay 0 or not, another model)
        raise UserError(f"cannot resume: the optimizer state in {path} groups the parameters {sizes}, these settings "
                        f"{[len(g['params']) for g in optimizer.param_groups]}; {settings}")
    try:
        if not readable:
            raise ValueError(f"param_groups is {meta.get('param_groups')!r}")
        opt_state = _optimizer_state(tensors, meta.pop("optim_scalars"),
                                     [p for g in optimizer.param_groups for p in g["params"]])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"cannot resume: the optimizer state in {path} is damaged ({type(e).__name__}: {e}); "
                        "resume from a copy of the run, or train into a new --out") from None
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
    except (ValueError, KeyError, TypeError) as e:  # groups of these sizes that torch cannot map: a hand edit
        raise UserError(f"cannot resume: the optimizer state in {path} is damaged or does not fit these settings "
                        f"({type(e).__name__}: {e}); resume from a copy of the run, or {settings}") from None
    scaler_state = meta.pop("scaler", None)
    if scaler is not None and scaler.is_enabled() and scaler_state:
        scaler.load_state_dict(scaler_state)
    rest = {k: v for k, v in tensors.items() if not k.startswith(("model.", "optim."))}
    return rest, meta
