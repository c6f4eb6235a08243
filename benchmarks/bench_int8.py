"""The int8 table of benchmarks/README.md: ``--mode int8`` (PyTorch, x86 engine) against the fast
path (bf16 where the CPU has fast bf16 kernels, else float32: its column says) and fp32 eager,
for the models torch.fx can quantise, at one size on the CPU.

    PYTHONPATH=src python benchmarks/bench_int8.py [--size 512x512] [--threads 2] [--repeats 2]
        [--rounds 2] [--models a,b] [--out benchmarks/README.md]

Each round times every (model, mode) once, the rounds interleaved, and the median of the rounds'
best-of-``--repeats`` is reported, so that a slow phase of a shared machine hits all modes alike.
Random weights (21 classes), batch 1, bench's smooth random image; int8 is calibrated on 4 other
smooth random images (its ``agree`` on random weights is a check of the kernels, not of accuracy:
docs/deploy.md has the trained checkpoints). The table is written between the
``<!-- int8 -->`` markers of ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pixelwise.inference.bench import benchmark, gemm_peak_gflops
from pixelwise.inference.fast import plan_for
from pixelwise.models import create_model

MODELS = ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3plus_resnet50", "fcn_resnet101", "deeplabv3_resnet101",
          "unet")
MODES = ("eager", "fast", "int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(Path(__file__).with_name("README.md")))
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    refused = {name: plan_for(name).int8 for name in names if not plan_for(name).traceable}
    if refused:  # before an hour of measuring, not after it
        raise SystemExit(f"bench_int8.py: --mode int8 is not offered for {', '.join(refused)} "
                         f"({next(iter(refused.values()))}); drop them from --models")
    out = Path(args.out)
    if out.parent and not out.parent.is_dir():
        raise SystemExit(f"bench_int8.py: --out {out}: no folder {out.parent}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    peaks = {str(d).split(".")[-1]: gemm_peak_gflops(torch.device("cpu"), d)
             for d in (torch.float32, torch.bfloat16, torch.int8)}
    models = {name: create_model(name, num_classes=21).eval() for name in names}
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for name in names:
            for mode in MODES:
                res = benchmark(models[name], (h, w), mode=mode, repeats=args.repeats, model_name=name,
                                threads=args.threads)
                results.setdefault((name, mode), []).append(res)
                print(f"round {r + 1} {name} {mode}: {res['ms_per_img']:.0f} ms", flush=True)
    rows = ["| model | eager ms | fast ms | fast dtype | int8 ms | fast/int8 | eager/int8 | int8 util | int8 agree "
            "| fast agree | calibration s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        ms = {mode: statistics.median(x["ms_per_img"] for x in results[(name, mode)]) for mode in MODES}
        last = results[(name, "int8")][-1]
        # bench's own utilisation (None where the measured peak is no ceiling: int8 without VNNI), the
        # median over the rounds as the ms beside it
        utils = [x["utilization"] for x in results[(name, "int8")] if x.get("utilization") is not None]
        util = f"{statistics.median(utils):.0%}" if len(utils) == len(results[(name, "int8")]) else "-"
        rows.append(f"| {name} | {ms['eager']:.0f} | {ms['fast']:.0f} | {results[(name, 'fast')][-1]['dtype']} | "
                    f"{ms['int8']:.0f} | x{ms['fast'] / ms['int8']:.2f} | x{ms['eager'] / ms['int8']:.2f} | "
                    f"{util} | {last['agreement']:.2%} | {results[(name, 'fast')][-1]['agreement']:.2%} | "
                    f"{last['calibrate_s']:.1f} |")
    text = "\n".join([
        f"Measured {started} by `PYTHONPATH=src python benchmarks/bench_int8.py --size {args.size} --threads "
        f"{args.threads} --repeats {args.repeats} --rounds {args.rounds}` on {platform.machine()} "
        f"({os.cpu_count()} CPUs, 1-minute load average {load:.1f} at the start; medians of {args.rounds} "
        f"interleaved rounds). GEMM peaks (1024^3): fp32 {peaks['float32']:.0f} GFLOP/s, bf16 "
        f"{peaks['bfloat16']:.0f} GFLOP/s, int8 {peaks['int8']:.0f} GOP/s (`torch._int_mm`).", "", *rows])
    print(text, flush=True)  # first: a write that fails loses nothing
    doc = out.read_text() if out.exists() else "# Benchmarks\n"
    start, end = "<!-- int8 -->", "<!-- /int8 -->"
    if start in doc and end in doc:
        doc = doc[:doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end):]
    else:
        doc += f"\n{start}\n{text}\n{end}\n"
    out.write_text(doc)


if __name__ == "__main__":
    main()
