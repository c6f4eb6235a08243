"""A semantic model's `pixelwise export --format pt2` archive: export time and size, then
milliseconds per image of eager float32, of the loaded program (`torch.export.load(f).module()`)
and of its AOTInductor build (`torch._inductor.aoti_compile_and_package`, needs a C++ compiler),
timed interleaved, round by round (the machine is noisy), with AOTInductor's agreement with eager
(max |logit difference|, argmax agreement) at the timed size and at another size and batch.

    PYTHONPATH=src python benchmarks/bench_pt2.py --config camvid_cpu_hour --classes 12 --size 360x480

--config takes a recipe's model and its kwargs; --model and --model-kwargs give them directly. The
weights are random (seeded). Prints one line per runtime; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

import pixelwise
from pixelwise.engine.config import ConfigLoader, find_recipe
from pixelwise.inference.export_pt2 import export_pt2
from pixelwise.models import forward_logits


def median_ms(run, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        run(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a recipe name or YAML file: its model and model_kwargs")
    p.add_argument("--model", default="unet")
    p.add_argument("--model-kwargs", type=json.loads, default={})
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--size", default="360x480", help="HxW of the timed image (batch 1)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per round (median)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    name, kwargs = args.model, args.model_kwargs
    if args.config:
        recipe = yaml.load(find_recipe(args.config).read_text(), Loader=ConfigLoader)
        name, kwargs = recipe["model"], dict(recipe.get("model_kwargs") or {})
    torch.manual_seed(0)
    model = pixelwise.create_model(name, num_classes=args.classes, **kwargs).eval()
    h, w = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt2"
        report = export_pt2(model, path, {"model": name, "model_kwargs": kwargs, "num_classes": args.classes})
        print(report.summary())
        program = torch.export.load(str(path))
        start = time.perf_counter()
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(folder) / "aoti.pt2"))
        compile_s = time.perf_counter() - start
        compiled = torch._inductor.aoti_load_package(package)
        runtimes = {"eager": lambda x: forward_logits(model, x), "pt2_module": program.module(), "aoti": compiled}
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
        timings: dict[str, list[float]] = {k: [] for k in runtimes}
        for _ in range(args.rounds):
            for key, run in runtimes.items():
                timings[key].append(median_ms(run, x, args.repeats))
        agreement = []
        with torch.no_grad():
            for shape in [(1, 3, h, w), (2, 3, 3 * h // 5 + 7, 2 * w // 3 + 13)]:
                batch = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
                ref, got = forward_logits(model, batch), compiled(batch)
                agreement.append({"shape": list(shape), "max_abs_diff": float((ref - got).abs().max()),
                                  "argmax_agreement": float((ref.argmax(1) == got.argmax(1)).float().mean())})
    result = {"model": name, "model_kwargs": kwargs, "size": [h, w], "export_s": report.seconds,
              "mib": report.bytes / 2**20, "aoti_compile_s": compile_s, "ms_per_img": timings,
              "aoti_vs_eager": agreement}
    for key, values in timings.items():
        ratio = statistics.median(timings["eager"]) / statistics.median(values)
        print(f"{key}: {' / '.join(f'{v:.1f}' for v in values)} ms per {h}x{w} image (x{ratio:.2f} eager)")
    print(f"AOTInductor compile {compile_s:.1f} s; against eager: " + "; ".join(
        f"{'x'.join(map(str, a['shape']))} max |diff| {a['max_abs_diff']:.2g}, "
        f"argmax {100 * a['argmax_agreement']:.3f}%"
        for a in agreement))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
