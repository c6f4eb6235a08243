"""Peak memory of tiled prediction: ``pixelwise predict --tile N`` on one large RGB image.

Each configuration runs in a fresh Python process, which runs the ``predict`` command in-process
and then reports its own peak resident set size (``VmHWM`` in ``/proc/self/status``, which is
also ``getrusage(RUSAGE_SELF).ru_maxrss``) and its resident size just before prediction started
(after imports), so that ``peak - before`` is what predicting the image cost. A random-weight
U-Net checkpoint (the model's weights do not change the memory) and a smooth synthetic image are
written to a temporary folder first.

    python benchmarks/tile_memory.py --size 8192 --tile 512                 # U-Net base 16, same padding
    python benchmarks/tile_memory.py --size 8192 --tile 512 --padding valid
    python benchmarks/tile_memory.py --size 8192 --tile 512 --src /tmp/pixelwise-main/src   # another checkout

``--src DIR`` runs the predict command of another pixelwise source tree (``DIR`` is put first on
``PYTHONPATH``), e.g. an earlier commit exported with ``git archive <commit> src | tar -x -C DIR/..``.
Prints one JSON object per configuration (``--json FILE`` also writes the list).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB -> bytes

import torch
from pixelwise.cli import main

torch.set_num_threads(int(sys.argv[1]))
before = status("VmRSS")
start = time.perf_counter()
code = main(sys.argv[2:])
seconds = time.perf_counter() - start
print(json.dumps({"exit": code, "rss_before": before, "peak_rss": status("VmHWM"), "seconds": seconds,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_image(path: Path, size: int) -> None:
    """A smooth RGB scene (gradients and blocks) of ``size`` x ``size``, written as PNG row band
    by row band so that generating it needs little memory beyond the image itself."""
    import numpy as np
    from PIL import Image

    image = np.empty((size, size, 3), np.uint8)
    x = np.arange(size, dtype=np.float32)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, (size // 256 + 1, size // 256 + 1, 3), dtype=np.uint8)
    for y in range(0, size, 256):
        rows = np.arange(y, min(y + 256, size), dtype=np.float32)[:, None]
        image[y : y + len(rows), :, 0] = (127 + 120 * np.sin(x / 97 + rows / 131)).astype(np.uint8)
        image[y : y + len(rows), :, 1] = (127 + 120 * np.cos(x / 53 - rows / 71)).astype(np.uint8)
        image[y : y + len(rows), :, 2] = np.repeat(blocks[y // 256, : size // 256 + 1, 2], 256)[:size]
    Image.fromarray(image).save(path, compress_level=1)


def make_checkpoint(path: Path, padding: str, base: int, classes: int) -> None:
    import torch

    from pixelwise import create_model, save_checkpoint

    torch.manual_seed(0)
    kwargs = {"base_channels": base, "batch_norm": True, "padding": padding, "dropout": 0.0}
    model = create_model("unet", num_classes=classes, **kwargs).eval()
    save_checkpoint(path, model, {"model": "unet", "num_classes": classes, "model_kwargs": kwargs,
                                  "task": "semantic"})


def measure(image: Path, checkpoint: Path, out: Path, tile: int, threads: int, src: str | None,
            extra: list[str]) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    args = ["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(out), "--tile", str(tile),
            "--no-progress", *extra]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads), *args], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"predict failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8192, help="image side in pixels (default 8192)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--padding", choices=["same", "valid"], default="same", help="U-Net padding (default same)")
    p.add_argument("--base", type=int, default=16, help="U-Net base channels (default 16)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the measured process (default 1)")
    p.add_argument("--src", help="run the predict command of this pixelwise source tree instead")
    p.add_argument("--extra", default="", help="more predict flags, e.g. '--uncertainty --batch-size 1'")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="tile_memory_") as tmp:
        tmp_path = Path(tmp)
        image, checkpoint = tmp_path / f"scene_{args.size}.png", tmp_path / "unet.safetensors"
        t = time.perf_counter()
        make_image(image, args.size)
        make_checkpoint(checkpoint, args.padding, args.base, args.classes)
        print(f"# wrote a {args.size}x{args.size} image ({image.stat().st_size / 2**20:.0f} MiB PNG) and the "
              f"checkpoint in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        r = measure(image, checkpoint, tmp_path / "out", args.tile, args.threads, args.src, args.extra.split())
    gib = 2**30
    result = {"size": args.size, "tile": args.tile, "model": f"unet base {args.base} padding {args.padding}",
              "classes": args.classes, "extra": args.extra, "src": args.src or "this checkout",
              "peak_rss_gib": round(r["peak_rss"] / gib, 3), "rss_before_gib": round(r["rss_before"] / gib, 3),
              "growth_bytes_per_pixel": round((r["peak_rss"] - r["rss_before"]) / args.size**2, 1),
              "seconds": round(r["seconds"], 1), "threads": args.threads}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps([result], indent=2))


if __name__ == "__main__":
    main()
