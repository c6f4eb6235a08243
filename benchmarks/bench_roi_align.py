"""Time pixelwise.ops.roi_align against a naive loop implementation.

Default problem: a 1 x 256 x 64 x 64 feature map at stride 4 (a 256 x 256 image), 512 random boxes
(16 to 160 pixels a side), 14 x 14 output, sampling_ratio 2, aligned=False: the Mask R-CNN mask
pooler's shape. The naive version (Python loops over boxes, bins and samples, each sample one
bilinear read vectorised over channels) is timed on the first ``--naive-boxes`` boxes only and
extrapolated linearly to all boxes; its cost is exactly linear in the number of boxes.

    PYTHONPATH=src python benchmarks/bench_roi_align.py [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pixelwise.ops import roi_align


def naive_roi_align(feat, rois, out_hw, scale, sampling_ratio, aligned=False):
    """Reference RoIAlign: loops over boxes, bins and samples (torchvision's rules)."""
    _, c, h, w = feat.shape
    out = feat.new_zeros(len(rois), c, *out_hw)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (v * scale - offset for v in (x1, y1, x2, y2))
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / out_hw[0], rw / out_hw[1]
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bh)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bw)
        fmap = feat[int(b)]
        for ph in range(out_hw[0]):
            for pw in range(out_hw[1]):
                acc = feat.new_zeros(c)
                for iy in range(gh):
                    y = y1 + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = x1 + pw * bw + (ix + 0.5) * bw / gw
                        if y < -1 or y > h or x < -1 or x > w:
                            continue
                        y, x = max(y, 0.0), max(x, 0.0)
                        y0, x0 = int(y), int(x)
                        y0, y1_, y = (h - 1, h - 1, float(h - 1)) if y0 >= h - 1 else (y0, y0 + 1, y)
                        x0, x1_, x = (w - 1, w - 1, float(w - 1)) if x0 >= w - 1 else (x0, x0 + 1, x)
                        ly, lx = y - y0, x - x0
                        acc += (
                            (1 - ly) * (1 - lx) * fmap[:, y0, x0]
                            + (1 - ly) * lx * fmap[:, y0, x1_]
                            + ly * (1 - lx) * fmap[:, y1_, x0]
                            + ly * lx * fmap[:, y1_, x1_]
                        )
                out[k, :, ph, pw] = acc / max(gh * gw, 1)
    return out


def make_rois(n: int, image: int, gen: torch.Generator) -> torch.Tensor:
    side = 16 + torch.rand(n, 2, generator=gen) * 144
    xy = torch.rand(n, 2, generator=gen) * (image - side)
    return torch.cat((torch.zeros(n, 1), xy, xy + side), 1)


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=512)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--size", type=int, default=64, help="feature map height = width")
    ap.add_argument("--out", type=int, default=14, help="output height = width")
    ap.add_argument("--sampling-ratio", type=int, default=2)
    ap.add_argument("--naive-boxes", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(1, args.channels, args.size, args.size, generator=gen).to(device)
    rois = make_rois(args.boxes, args.size * 4, gen).to(device)
    out_hw = (args.out, args.out)
    kw = {"output_size": out_hw, "spatial_scale": 0.25, "sampling_ratio": args.sampling_ratio}

    fast_ms = timed(lambda: roi_align(feat, rois, **kw), args.repeats, sync)
    leaf = feat.clone().requires_grad_(True)
    grad = torch.randn(args.boxes, args.channels, *out_hw, generator=gen).to(device)
    fwd_bwd_ms = timed(lambda: roi_align(leaf, rois, **kw).backward(grad), args.repeats, sync)

    sub = rois[: args.naive_boxes]
    t0 = time.perf_counter()
    ref = naive_roi_align(feat.cpu(), sub.cpu(), out_hw, 0.25, args.sampling_ratio)
    naive_sub_ms = (time.perf_counter() - t0) * 1000.0
    naive_ms = naive_sub_ms * args.boxes / len(sub)
    err = (roi_align(feat, sub, **kw).cpu() - ref).abs().max().item()

    print(
        f"roi_align {args.boxes} boxes x {args.channels} ch, {args.size}x{args.size} map -> "
        f"{args.out}x{args.out}, sampling_ratio {args.sampling_ratio}, device {device}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"  pixelwise roi_align forward      : {fast_ms:9.1f} ms (best of {args.repeats})")
    print(f"  pixelwise roi_align fwd+backward : {fwd_bwd_ms:9.1f} ms")
    print(
        f"  naive loops (CPU)                : {naive_ms:9.1f} ms "
        f"(measured {naive_sub_ms:.1f} ms on {len(sub)} boxes, extrapolated x{args.boxes / len(sub):.0f})"
    )
    print(f"  speed-up                         : {naive_ms / fast_ms:9.1f} x")
    print(f"  max |pixelwise - naive| on the subset: {err:.2e}")


if __name__ == "__main__":
    main()
