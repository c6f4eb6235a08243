"""Regenerate the speed table of benchmarks/README.md: every model of ``pixelwise models`` at one
size in eager, fast and onnx modes on the CPU, torchvision's fcn_resnet50 and deeplabv3_resnet50
(eager and channels-last + bf16 autocast) interleaved beside them, and a top-operator profile of
fcn_resnet50 and U-Net.

    PYTHONPATH=src python benchmarks/bench_table.py [--size 512x512] [--threads 2] [--repeats 3]
        [--models a,b] [--rounds 1] [--refvenv VENV] [--out benchmarks/README.md]

Each (model, mode) is run ``--rounds`` times, the rounds interleaved (every configuration once per
round), and the median of the per-round best-of-``--repeats`` is reported, so that a slow phase of
a shared machine hits all configurations alike; ratios are taken within a round's medians. Random
weights, 21 classes (91 for Mask R-CNN), batch 1, a smooth random image; ``agree`` is the share
of pixels whose argmax equals fp32 eager's. torchvision runs with ``--refvenv``'s python
(``tools/torchvision_speed.py`` of the shared folder), skipped if it is absent. The table is
written between the ``<!-- table -->`` markers of ``--out`` (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pixelwise.inference.bench import benchmark, count_flops, gemm_peak_gflops
from pixelwise.models import create_model, list_models, model_info

TORCHVISION = ("fcn_resnet50", "deeplabv3_resnet50")
MODES = ("eager", "fast", "onnx")


def torchvision_ms(python: str, script: str, name: str, size: tuple[int, int], mode: str, threads: int) -> float | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        out = subprocess.run([python, script, name, str(size[0]), str(size[1]), mode], capture_output=True, text=True,
                             timeout=900, env=env, check=True).stdout
        return float(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def profile_top(name: str, size: tuple[int, int], mode: str, top: int = 8) -> list[tuple[str, float, float]]:
    """``(operator, self CPU ms, share)`` of the ``top`` operators of one forward pass."""
    from pixelwise.inference.fast import make_runner
    from pixelwise.models import forward_logits

    model = create_model(name, num_classes=21).eval()
    x = torch.randn(1, 3, *size)
    run = (lambda: forward_logits(model, x)) if mode == "eager" else make_runner(model, "fast", name)
    with torch.inference_mode():
        run(x) if mode != "eager" else run()  # type: ignore[call-arg]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(x) if mode != "eager" else run()  # type: ignore[call-arg]
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1000, e.self_cpu_time_total / total) for e in events[:top]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--models", default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--refvenv", default=None, help="a virtual environment with torchvision (see the shared tools)")
    shared = Path(__file__).resolve().parents[2] / "shared"
    ap.add_argument("--tv-script", default=str(shared / "tools" / "torchvision_speed.py"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None, help="the file whose table to replace (default: benchmarks/README.md; "
                    "with --models, none: a subset only prints its rows, it does not replace the whole table)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.split("x"))
    names = args.models.split(",") if args.models else list_models()
    modes = args.modes.split(",")
    tv_python = os.path.join(args.refvenv, "bin", "python") if args.refvenv else ""
    have_tv = bool(tv_python) and os.path.exists(tv_python) and os.path.exists(args.tv_script)
    if have_tv and args.threads != 2:  # the shared tool sets 2 threads itself: the two sides would differ
        print(f"torchvision columns left out: the shared timing tool runs at 2 threads, not --threads {args.threads}",
              file=sys.stderr)
        have_tv = False
    rows: dict[str, dict[str, list]] = {n: {} for n in names}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for rnd in range(args.rounds):
        for name in names:
            task = model_info(name).task
            torch.manual_seed(0)
            classes = 21 if task == "semantic" else 91
            model = create_model(name, num_classes=classes).eval()
            flops = count_flops(lambda: create_model(name, num_classes=classes), size, task)  # noqa: B023
            for mode in modes:
                if mode == "onnx" and task != "semantic":
                    continue
                try:
                    r = benchmark(model, size, mode=mode, repeats=args.repeats, task=task, model_name=name, flops=flops)
                except Exception as e:  # one failing configuration must not lose the table
                    print(f"{name} {mode}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    continue
                rows[name].setdefault(mode, []).append(r)
                print(f"round {rnd} {name} {mode}: {r['ms_per_img']:.0f} ms, {r['dtype']}, "
                      f"util {r['utilization'] or 0:.0%}, agree {r['agreement']}", flush=True)
            if have_tv and name in TORCHVISION:
                for mode in ("eager", "fast"):
                    ms = torchvision_ms(tv_python, args.tv_script, name, size, mode, args.threads)
                    if ms is not None:
                        rows[name].setdefault(f"tv_{mode}", []).append({"ms_per_img": ms})
                        print(f"round {rnd} {name} torchvision {mode}: {ms:.0f} ms", flush=True)
    peaks = {str(d).split(".")[-1]: gemm_peak_gflops(torch.device("cpu"), d) for d in (torch.float32, torch.bfloat16)}

    def med(name: str, mode: str, key: str = "ms_per_img") -> float | None:
        vals = [r[key] for r in rows[name].get(mode, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    cpu = platform.processor() or platform.machine()
    lines = [f"Measured {started} by `PYTHONPATH=src python benchmarks/bench_table.py --size {args.size} "
             f"--threads {args.threads} --repeats {args.repeats} --rounds {args.rounds}` on {cpu} "
             f"({os.cpu_count()} CPUs, {args.threads} threads; 1-minute load average {load:.1f} at the start; "
             "absolute times vary with the machine's load, the ratios, measured interleaved, "
             f"are what to compare). GEMM peak (1024^3 matmul): fp32 {peaks['float32']:.0f} GFLOP/s, "
             f"bf16 {peaks['bfloat16']:.0f} GFLOP/s.", "",
             "| model | GFLOPs | eager ms | fast ms | fast dtype | fast util | fast agree | onnx ms | eager/fast "
             "| eager/onnx | torchvision eager ms | torchvision ch-last+bf16 ms | tv-fast/fast |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        e, f, o = med(name, "eager"), med(name, "fast"), med(name, "onnx")
        fr = rows[name].get("fast", [{}])[-1] if rows[name].get("fast") else {}
        gf = (rows[name].get("eager") or [{}])[-1].get("gflops_per_img")
        tve, tvf = med(name, "tv_eager"), med(name, "tv_fast")

        def cell(v, fmt="{:.0f}"):
            return "-" if v is None else fmt.format(v)

        lines.append(" | ".join([
            f"| {name}", cell(gf, "{:.1f}"), cell(e), cell(f), fr.get("dtype", "-"),
            cell(med(name, "fast", "utilization"), "{:.0%}"), cell(med(name, "fast", "agreement"), "{:.2%}"), cell(o),
            cell(e / f if e and f else None, "x{:.2f}"), cell(e / o if e and o else None, "x{:.2f}"),
            cell(tve), cell(tvf), cell(tvf / f if tvf and f else None, "x{:.2f}")]) + " |")
    if not args.no_profile:
        for name in ("fcn_resnet50", "unet"):
            for mode in ("eager", "fast"):
                lines += ["", f"Top operators, {name} {mode} ({args.size}, self CPU time of one forward pass):", "",
                          "| operator | ms | share |", "|---|---|---|"]
                lines += [f"| `{k}` | {ms:.0f} | {share:.0%} |" for k, ms, share in profile_top(name, size, mode)]
    table = "\n".join(lines)
    print(table, flush=True)  # first: a write that fails loses nothing
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if args.out is None and args.models:
        return 0
    out = Path(args.out or Path(__file__).with_name("README.md"))
    text = out.read_text() if out.exists() else "# Benchmarks\n\n<!-- table -->\n<!-- /table -->\n"
    if "<!-- table -->" not in text:
        text += "\n<!-- table -->\n<!-- /table -->\n"
    head, rest = text.split("<!-- table -->", 1)
    tail = rest.split("<!-- /table -->", 1)[1] if "<!-- /table -->" in rest else "\n" + rest  # keep what follows
    out.write_text(f"{head}<!-- table -->\n{table}\n<!-- /table -->{tail}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
