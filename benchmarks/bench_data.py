"""Samples/s of the CamVid training input pipeline: PNG decode + train_preset (random scale,
pad, crop, flip, colour jitter) + preprocess + collate through a DataLoader.

    PYTHONPATH=src python benchmarks/bench_data.py --data ../shared/data/camvid --workers 0 1 2

Prints one line per worker count and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from pixelwise.data import build_dataset, collate
from pixelwise.data.augment import train_preset


def _seed_worker(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


def bench(data: str, workers: int, crop: tuple[int, int], batch: int, samples: int) -> dict:
    ds = build_dataset("camvid", data, "train", transform=train_preset(crop=crop))
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        worker_init_fn=_seed_worker, persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # warm-up: worker start and first batch are not counted
    n, t0 = 0, time.perf_counter()
    while n < samples:
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += b["image"].shape[0]
    dt = time.perf_counter() - t0
    return {"workers": workers, "crop": f"{crop[0]}x{crop[1]}", "batch": batch, "samples": n,
            "seconds": round(dt, 3), "samples_per_s": round(n / dt, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "camvid")
    p.add_argument("--data", default=default, help="CamVid root (SegNet layout)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--crop", default="360x480")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    crop = tuple(int(v) for v in args.crop.lower().split("x"))
    rows = []
    for w in args.workers:
        row = bench(args.data, w, crop, args.batch, args.samples)
        rows.append(row)
        print(f"workers={row['workers']} crop={row['crop']} batch={row['batch']}: "
              f"{row['samples_per_s']:.1f} samples/s ({row['samples']} in {row['seconds']:.2f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "torch_threads": 1, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
