"""``torch.export`` of semantic models (``pixelwise export --format pt2``), verified on export.

:func:`export_pt2` writes one ``.pt2`` archive (``torch.export.save``) of the model's
``ExportedProgram``: input the preprocessed image batch ``float32[N, C, H, W]`` (see
:mod:`pixelwise.preprocess`), output the logits ``float32[N, num_classes, H, W]``, with batch,
height and width dynamic (``Dim.AUTO``), and the same metadata as an ONNX export (model, classes,
palette, input contract, tiling geometry; ``pt2`` in place of ``onnx``) as the archive's extra
file ``pixelwise.json``. It is what a PyTorch program without pixelwise loads
(``torch.export.load(f).module()``) and what AOTInductor compiles for C++
(``torch._inductor.aoti_compile_and_package``); TorchScript, which ``torch.jit`` now deprecates in
favour of ``torch.export``, is not written.

Verified on export, as the ONNX file is: the archive is written to a temporary file, loaded back
and run at the two ONNX verification sizes plus a small odd one and a large one (:func:`pt2_sizes`:
a program that fixed a size of its example, or assumed a padding, fails there), compared with PyTorch eager
float32 (largest absolute logit difference, argmax agreement; below ``min_agreement`` nothing is
written). The archive must hold no pickled payload (``torch.export.load`` unpickles those, with
``weights_only=False``): every weight and constant is stored as raw bytes.

pixelwise never loads a ``.pt2`` it did not just write: ``torch.export.load`` of a file from
elsewhere can run code (a payload marked as pickled), so ``predict``, ``eval`` and ``serve`` take
checkpoints and ONNX files only.

Not exported: Mask R-CNN (its detections have data-dependent sizes; ``--format onnx`` exports its
two network parts) and models that ``torch.export`` cannot give one program for every size
(DeconvNet: one line with torch's reason; ``--format onnx`` exports it).
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from pixelwise.checkpoint import atomic_write, input_spec_from_meta
from pixelwise.errors import UserError
from pixelwise.inference.export import (
    MIN_AGREEMENT,
    ExportReport,
    onnx_metadata,
    refuse_non_finite,
    require_agreement,
    verification_sizes,
    verify,
)
from pixelwise.inference.mc_dropout import has_dropout
from pixelwise.models import Logits, kept_as_it_was
from pixelwise.models.maskrcnn import MaskRCNN

META_FILE = "pixelwise.json"  # the archive's extra file with the metadata
SMALL_SIZE = (1, 37, 53)  # a verification size: small and odd


def no_instance_export(name: str) -> UserError:
    """The refusal of an instance model (``name``), which the CLI gives before loading anything."""
    return UserError(f"no .pt2 export for the instance model {name}: its detections have data-dependent sizes; "
                     "--format onnx exports its two network parts")


def pt2_sizes(meta: dict | None) -> list[tuple[int, int, int]]:
    """``(batch, H, W)`` of the verification runs: :func:`verification_sizes`, :data:`SMALL_SIZE`
    and one about 3/2 of the first, at least 263 x 265: a program that holds only below or above
    some size (DeconvNet's is traced either side of 224) fails at one of the two."""
    sizes = verification_sizes(meta)
    _, h, w = sizes[0]
    return [*sizes, SMALL_SIZE, (1, max(3 * h // 2 + 7, 263), max(3 * w // 2 + 9, 265))]


def pickled_payloads(path: str | os.PathLike | io.BytesIO) -> list[str]:
    """The names of the payloads of a ``.pt2`` archive that ``torch.export.load`` would unpickle
    (``use_pickle`` in its weights and constants configs)."""
    found = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(".json") and ("weights_config" in name or "constants_config" in name):
                config = json.loads(archive.read(name)).get("config", {})
                found += [key for key, payload in config.items() if payload.get("use_pickle")]
    return found


def read_pt2_metadata(path: str | os.PathLike) -> dict:
    """The metadata :func:`export_pt2` stored (``pixelwise.json``), read from the archive without
    loading the program (nothing in the file is unpickled or run)."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"extra/{META_FILE}")]
        if not names:
            raise UserError(f"{path} holds no {META_FILE}: not a pixelwise export")
        return json.loads(archive.read(names[0]))


def _program_members(archive: str | os.PathLike | io.BytesIO) -> dict[str, bytes]:
    """Every member of a ``.pt2`` archive but the metadata and the archive's id (which each save
    draws anew): the program, its weights and constants, its sample inputs."""
    with zipfile.ZipFile(archive) as z:
        return {n: z.read(n) for n in z.namelist()
                if not n.endswith((f"extra/{META_FILE}", ".data/serialization_id"))}


def _export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    auto = torch.export.Dim.AUTO
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.export.export(Logits(model).eval(), (example,), dynamic_shapes=({0: auto, 2: auto, 3: auto},),
                                   strict=False)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def export_pt2(model: nn.Module, out: str | os.PathLike, meta: dict | None = None, *, model_name: str = "",
               sizes: Sequence[tuple[int, int, int]] | None = None, min_agreement: float = MIN_AGREEMENT,
               replace: bool = True) -> ExportReport:
    """Export a semantic ``model`` with ``torch.export`` to the ``.pt2`` archive ``out`` and verify
    it (module docstring).

    meta: the checkpoint's metadata, stored in the archive. sizes: ``(batch, H, W)`` of the
    verification runs (default :func:`pt2_sizes`). Raises UserError, and writes nothing, where
    ``torch.export`` cannot trace the model with dynamic sizes, where the program fails at a
    verification size, or where its argmax agrees with eager's on less than ``min_agreement`` of
    the pixels. ``replace``: as in :func:`~pixelwise.inference.export.export_onnx`. The model is
    exported on the CPU in eval mode and put back on its device, in its mode, afterwards.
    """
    name = model_name or (meta or {}).get("model") or type(model).__name__
    if not hasattr(getattr(torch.export, "Dim", None), "AUTO"):
        raise UserError(f"--format pt2 needs a newer torch: this one ({torch.__version__}) has no "
                        "torch.export.Dim.AUTO, which the export's dynamic sizes use; --format onnx works with it")
    if isinstance(model, MaskRCNN) or (meta or {}).get("task", "semantic") != "semantic":
        raise no_instance_export(name)
    if not 0 < min_agreement <= 1:  # nan too
        raise UserError(f"min_agreement must be a fraction in (0, 1], got {min_agreement}")
    out = Path(out)
    if out.suffix.lower() != ".pt2":
        raise UserError(f"--out {out}: a torch.export archive's name ends with .pt2")
    with kept_as_it_was(model):
        model = model.eval().cpu()
        refuse_non_finite(model)
        return _export_pt2(model, out, meta, name, list(sizes or pt2_sizes(meta)), min_agreement, replace)


def _export_pt2(model: nn.Module, out: Path, meta: dict | None, name: str, sizes: list[tuple[int, int, int]],
                min_agreement: float, replace: bool) -> ExportReport:
    start = time.perf_counter()
    channels = input_spec_from_meta(meta or {}, model).channels
    report = ExportReport(str(out), 0, "float32", 0.0, 0, runtime="torch.export")
    _, h, w = sizes[0]
    try:  # batch 2: torch.export fixes a dimension whose example is 1
        program = _export_program(model, torch.zeros(2, channels, h, w))
    except Exception as e:  # torch's own errors (guards, unsupported ops) name no file or fix
        raise UserError(f"torch.export cannot export {name} with dynamic batch, height and width ("
                        f"{type(e).__name__}: {_first_line(e)}); --format onnx exports it") from None

    def write(tmp: str) -> None:
        verified = io.BytesIO()  # the program's bytes as verified; the file then adds the verification to them
        torch.export.save(program, verified, extra_files={META_FILE: "{}"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runnable = torch.export.load(io.BytesIO(verified.getvalue())).module()

        def run(x: torch.Tensor) -> torch.Tensor:
            try:
                with torch.no_grad():
                    return runnable(x)
            except Exception as e:  # a guard of the example's sizes: the program does not serve every size
                raise UserError(f"export verification failed: the exported {name} does not run at "
                                f"{x.shape[2]}x{x.shape[3]} (batch {x.shape[0]}) ({type(e).__name__}: "
                                f"{_first_line(e)}); --format onnx exports it; nothing written") from None

        report.checks = verify(model, run, sizes, channels)
        require_agreement(report.checks, min_agreement, "the exported program's")
        info = {"torch": torch.__version__, "dynamic_axes": ["batch", "height", "width"],
                "min_agreement": min_agreement, "dropout": has_dropout(model),
                "verified": [asdict(c) for c in report.checks]}
        known = {"num_classes": report.checks[0].classes, **(meta or {})}
        final = io.BytesIO()
        torch.export.save(program, final, extra_files={META_FILE: json.dumps(onnx_metadata(known, name, info, model,
                                                                                             key="pt2"))})
        if _program_members(final) != _program_members(verified):
            raise UserError("torch.export wrote other program bytes the second time than those verified; nothing "
                            "written")
        pickled = pickled_payloads(final)
        if pickled:
            raise UserError(f"torch.export stored {', '.join(pickled[:3])} pickled, which loading would unpickle; "
                            "nothing written")
        Path(tmp).write_bytes(final.getvalue())

    atomic_write(out, write, replace=replace)
    report.seconds = time.perf_counter() - start
    report.bytes = out.stat().st_size
    return report
