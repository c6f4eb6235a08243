"""Export every semantic model of ``pixelwise models`` to ONNX and record the verification.

    PYTHONPATH=src python benchmarks/export_all.py [--out DIR] [--json FILE] [--models a,b]

Each model (21 classes, random weights; the zero-initialised FCN scorers and BatchNorm statistics
are randomised so that the logits are not trivially equal) is exported by
:func:`pixelwise.inference.export.export_onnx` and verified by onnxruntime against PyTorch eager
at 256 x 320 (batch 1) and 197 x 403 (batch 2): max |logit difference|, argmax agreement, export
seconds and file size. The files are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from pixelwise.inference.export import export_onnx
from pixelwise.models import create_model, list_models, model_info

EXTRA = {"unet_valid": ("unet", {"padding": "valid"})}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.abs().any():
            m.weight.data.normal_(0, 0.01, generator=g)
            if m.bias is not None:
                m.bias.data.normal_(0, 0.1, generator=g)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--models", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in list_models() if model_info(n).task == "semantic"] + list(EXTRA)
    if args.models:
        names = [n for n in names if n in args.models.split(",")]
    out = args.out or tempfile.mkdtemp(prefix="pixelwise-export-")
    rows = []
    for name in names:
        base, kwargs = EXTRA.get(name, (name, {}))
        torch.manual_seed(0)
        model = randomise(create_model(base, num_classes=21, **kwargs))
        path = os.path.join(out, f"{name}.onnx")
        report = export_onnx(model, path, {"model": base, "model_kwargs": kwargs, "num_classes": 21},
                             model_name=base)
        print(name, report.summary(), flush=True)
        rows.append({"model": name, "seconds": report.seconds, "mib": report.bytes / 2**20,
                     "checks": [c.__dict__ for c in report.checks]})
        if not args.keep:
            os.unlink(path)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
