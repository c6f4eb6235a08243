"""Mask R-CNN's fast path on a *trained* detector: detections kept, AP, and time, per precision.

    PYTHONPATH=src python benchmarks/maskrcnn_agreement.py --checkpoint CKPT [--dataset shapes]
        [--data DIR] [--split test] [--dataset-kwargs JSON] [--images N] [--min-size S]
        [--threads 2] [--json FILE]

For each image of the split, one interleaved run of: pixelwise eager (float32, the reference),
the fast path in float32 (``optimize_for_inference(model, dtype=torch.float32)``, ``--mode fast``
on devices without fast bf16 kernels), the fast path in bfloat16 (``--mode fast`` where the device
has them), and, as a
measure of the margins the detector leaves, eager on the image plus uniform noise of +-0.5 gray
levels. Reported per variant: detection agreement with the reference (of its detections above
score 0.5, the share found with the same label at box IoU >= 0.9:
:func:`pixelwise.models.maskrcnn.fast.detection_agreement`, the issue's criterion), COCO mask and
box AP against the ground truth (:func:`pixelwise.coco_eval.coco_evaluate`), and the median time
per image. ``--min-size S`` sets the model's resize (shorter side to S, longer side at most
S * 1333 / 800, torchvision's ratio), e.g. 800 to run a detector trained on small images at
torchvision's setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from pixelwise.checkpoint import load_checkpoint
from pixelwise.coco_eval import coco_evaluate
from pixelwise.data import build_dataset
from pixelwise.inference.evaluate import sample_target
from pixelwise.inference.predictor import InstancePredictor
from pixelwise.models.maskrcnn.fast import detection_agreement, optimize_for_inference

VARIANTS = ("eager", "fast_fp32", "fast_bf16", "eager_noise")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--data", default=None)
    ap.add_argument("--split", default="test")
    ap.add_argument("--dataset-kwargs", default="{}")
    ap.add_argument("--images", type=int, default=0, help="first N images of the split (0: all)")
    ap.add_argument("--min-size", type=int, default=0, help="the model's resize (0: as trained)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    if args.min_size:
        model.transform.config.min_size = (args.min_size,)
        model.transform.config.max_size = round(args.min_size * 1333 / 800)
    ds = build_dataset(args.dataset, args.data, args.split, **json.loads(args.dataset_kwargs))
    count = min(len(ds), args.images) if args.images else len(ds)
    predictors = {v: InstancePredictor(model, meta, score_thresh=0.0) for v in VARIANTS}
    predictors["fast_fp32"].runner = optimize_for_inference(model, dtype=torch.float32)
    predictors["fast_bf16"].runner = optimize_for_inference(model, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)

    def noisy(images: list[torch.Tensor]) -> list[dict]:  # Mask R-CNN reads [0, 1] images, normalises itself
        return model([im + (torch.rand(im.shape, generator=generator) - 0.5) / 255 for im in images])

    predictors["eager_noise"].runner = noisy
    outputs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    targets = []
    for i in range(count):
        sample = ds.load(i)
        targets.append(sample_target(sample))
        for v in VARIANTS:
            start = time.perf_counter()
            outputs[v].append(predictors[v].predict(sample.image))
            times[v].append(time.perf_counter() - start)
        print(f"{i + 1}/{count}", end="\r", flush=True)
    report: dict = {"checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split, "images": count,
                    "min_size": list(model.transform.config.min_size), "threads": args.threads,
                    "started_load": os.getloadavg()[0], "variants": {}}
    for v in VARIANTS:
        matched = total = 0
        for ref, out in zip(outputs["eager"], outputs[v]):
            m, t = detection_agreement(ref, out)
            matched, total = matched + m, total + t
        ap_ = coco_evaluate(outputs[v], targets, class_ids=range(1, ds.num_classes))
        report["variants"][v] = {"matched": matched, "reference_detections": total,
                                 "agreement": matched / total if total else float("nan"),
                                 "mask_AP": ap_["mask_AP"], "mask_AP50": ap_["mask_AP50"], "box_AP": ap_["box_AP"],
                                 "ms_per_img": 1000 * statistics.median(times[v])}
    print()
    print("| variant | kept detections (score > 0.5, IoU >= 0.9) | mask AP | mask AP50 | box AP | ms/img |")
    print("|---|---|---|---|---|---|")
    for v, r in report["variants"].items():
        print(f"| {v} | {r['matched']}/{r['reference_detections']} = {r['agreement']:.1%} | {100 * r['mask_AP']:.1f} "
              f"| {100 * r['mask_AP50']:.1f} | {100 * r['box_AP']:.1f} | {r['ms_per_img']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
