"""Mask R-CNN speed at torchvision's 800-px setting, and an NMS micro-benchmark, as ratios measured in one run.

Run with pixelwise's python (torchvision runs in a subprocess with the reference python, see
``../shared/tools/reference-venv.sh``)::

    PYTHONPATH=src python benchmarks/bench_maskrcnn.py [--runs 7] [--threads 2] [--json FILE]

Mask R-CNN: ``maskrcnn_resnet50_fpn`` (91 classes) with identical weights in three forms: pixelwise
eager (float32), pixelwise fast (:func:`pixelwise.models.maskrcnn.fast.optimize_for_inference`)
and torchvision 0.28 eager (float32), on one CamVid frame (360 x 480, resized by the model's
transform to 800 x 1066, padded to 800 x 1088). The three are timed interleaved (one run of each
per round, ``--runs`` rounds, median reported) with the same thread count, so that the noise of a
shared machine hits all of them alike; report the ratios, not the absolute times.

Weights: no COCO weights can be downloaded here, so both implementations get the torchvision
fixture weights (``../shared/fixtures/torchvision/weights.py``, the ``maskrcnn_resnet50_fpn``
schema, seed 0) with documented adjustments, applied identically to both state dicts:

* ``--tempered`` (default on): ``backbone.fpn.layer_blocks.*`` times ``2**-10``, the fixture's own
  "tempered" variant; without it the random ResNet-50 activations (~1e3) saturate every head and
  the model returns no detection at all.
* ``--score-temperature T`` (default 2): ``roi_heads.box_predictor.cls_score.{weight,bias}`` times
  ``T``, i.e. the class softmax at temperature ``1/T``. With ``T = 1`` the best score on a CamVid frame
  is about 0.34 (so nothing passes 0.5); with ``T = 2`` every returned detection (100) is above 0.5.
* ``--rpn-delta-scale S`` (default 0.1): ``rpn.head.bbox_pred.{weight,bias}`` times ``S``. The random
  RPN head predicts box deltas of about +-1 (up to 4.7, i.e. boxes stretched e^4.7 = 110 times),
  which makes the proposals and detections hair-thin (median detection 46 x 2.4 px); a trained
  RPN refines anchors by small deltas, and 0.1 gives anchor-like proposals (median detection
  36 x 14 px).

Detection agreement (the accuracy guard of the fast path): of the reference's detections with
score > 0.5, how many the other output has with the same label at box IoU >= 0.9
(:func:`pixelwise.models.maskrcnn.fast.detection_agreement`), over ``--agreement-images`` frames.

NMS: random boxes (x, y uniform in [0, 1000], sides uniform in [10, 210]), thresholds 0.5 and 0.7,
1000 and 5000 boxes, and the two ``batched_nms`` calls of one eager Mask R-CNN forward on the frame
(the RPN's, per pyramid level, and the detections', per class), timed interleaved: pixelwise before this work
(the N x N numpy matrix + Python greedy loop, copied below as ``old_nms``), pixelwise now, and
torchvision's C++ kernel (in the subprocess).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIXELWISE_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "torchvision"
CAMVID_VAL = SHARED / "data" / "camvid" / "val"
REF_PYTHON = os.environ.get("PIXELWISE_REF_PYTHON", str(ROOT.parent / "refvenv" / "bin" / "python"))


# ----------------------------------------------------------------------------- shared by both sides


def fixture_weights(tempered: bool, score_temperature: float, rpn_delta_scale: float) -> dict[str, torch.Tensor]:
    """The fixture state dict with the adjustments described in the module docstring."""
    meta = json.loads((FIXTURES / "maskrcnn_resnet50_fpn.json").read_text())
    spec = importlib.util.spec_from_file_location("fixture_weights", FIXTURES / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in module.fixture_state_dict(meta["schema"], 0).items()}
    for key in state:
        if tempered and key.startswith("backbone.fpn.layer_blocks."):
            state[key] = state[key] * 2.0**-10
        if key.startswith("roi_heads.box_predictor.cls_score."):
            state[key] = state[key] * score_temperature
        if key.startswith("rpn.head.bbox_pred."):
            state[key] = state[key] * rpn_delta_scale
    return state


def load_image(path: str) -> torch.Tensor:
    from PIL import Image

    array = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def random_boxes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 1000
    wh = torch.rand(n, 2, generator=gen) * 200 + 10
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=gen)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# ----------------------------------------------------------------------------- torchvision worker


def worker(args: argparse.Namespace) -> None:
    """Runs under the reference python: answers one JSON command per stdin line."""
    import torchvision

    torch.set_num_threads(args.threads)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    model.eval().load_state_dict(fixture_weights(args.tempered, args.score_temperature, args.rpn_delta_scale))
    images: dict[str, torch.Tensor] = {}
    print(json.dumps({"ready": torchvision.__version__}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "maskrcnn":
            image = images.setdefault(cmd["image"], load_image(cmd["image"]))
            with torch.inference_mode():
                start = time.perf_counter()
                det = model([image])[0]
                ms = (time.perf_counter() - start) * 1e3
            out = {k: det[k].tolist() for k in ("boxes", "labels", "scores")}
            print(json.dumps({"ms": ms, "det": out}), flush=True)
        elif cmd["op"] == "nms":
            boxes, scores, idxs = (torch.tensor(cmd[k]) for k in ("boxes", "scores", "idxs"))
            t = cmd["t"]
            if cmd["batched"]:
                ms = timed(lambda b=boxes, s=scores, i=idxs, t=t: torchvision.ops.batched_nms(b, s, i, t))
            else:
                ms = timed(lambda b=boxes, s=scores, t=t: torchvision.ops.nms(b, s, t))
            print(json.dumps({"ms": ms}), flush=True)
        elif cmd["op"] == "quit":
            return


class Reference:
    """The torchvision worker subprocess."""

    def __init__(self, args: argparse.Namespace) -> None:
        flags = [
            "--threads", str(args.threads), "--score-temperature", str(args.score_temperature),
            "--rpn-delta-scale", str(args.rpn_delta_scale), "--tempered" if args.tempered else "--no-tempered",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [args.ref_python, __file__, "--worker", *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
        self.version = self.ask(None)["ready"]

    def ask(self, cmd: dict | None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the torchvision worker died; is the reference python complete?")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- the old NMS


def old_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """pixelwise.ops.nms before the rewrite: float32 upper-triangle IoU blocks copied into an N x N
    numpy matrix, then a Python loop over the sorted boxes (exact, as the fixture tests showed)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].t().contiguous()
    x1, y1, x2, y2 = b
    areas = (x2 - x1) * (y2 - y1)
    t32 = np.float32(iou_threshold)
    if float(t32) > iou_threshold:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    n = b.shape[1]
    over = np.zeros((n, n), dtype=bool)
    for start in range(0, n, 512):
        r, c = slice(start, min(n, start + 512)), slice(start, n)
        w = (torch.min(x2[r, None], x2[c]) - torch.max(x1[r, None], x1[c])).clamp(min=0)
        h = (torch.min(y2[r, None], y2[c]) - torch.max(y1[r, None], y1[c])).clamp(min=0)
        inter = w * h
        over[r, c] = (inter / (areas[r, None] + areas[c] - inter) > float(t32)).numpy()
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if not suppressed[i]:
            keep.append(i)
            suppressed[i + 1 :] |= over[i, i + 1 :]
    return order[torch.as_tensor(keep, dtype=torch.int64)]


def old_batched_nms(boxes, scores, idxs, iou_threshold) -> torch.Tensor:
    """The old batched_nms: the offset trick up to 4000 coordinates, else one old_nms per category."""
    if boxes.numel() <= 4000:
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return old_nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        members = torch.where(idxs == class_id)[0]
        keep_mask[members[old_nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


# ----------------------------------------------------------------------------- the benchmark


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def bench_nms(args: argparse.Namespace, ref: Reference, model_calls: list[tuple]) -> list[dict]:
    from pixelwise import ops

    cases = []
    for n in (1000, 5000):
        boxes, scores = random_boxes(n)
        for t in (0.5, 0.7):
            cases.append((f"nms {n} random boxes, t={t}", boxes, scores, None, t))
    for i, (boxes, scores, idxs, t) in enumerate(model_calls):
        stage = "RPN" if i == 0 else "detections"
        name = f"batched_nms {stage}: {len(boxes)} boxes, {len(torch.unique(idxs))} groups, t={t}"
        cases.append((name, boxes, scores, idxs, t))
    rows = []
    for name, boxes, scores, idxs, t in cases:
        if idxs is None:
            old = lambda b=boxes, s=scores, t=t: old_nms(b, s, t)  # noqa: E731
            new = lambda b=boxes, s=scores, t=t: ops.nms(b, s, t)  # noqa: E731
        else:
            old = lambda b=boxes, s=scores, i=idxs, t=t: old_batched_nms(b, s, i, t)  # noqa: E731
            new = lambda b=boxes, s=scores, i=idxs, t=t: ops.batched_nms(b, s, i, t)  # noqa: E731
        assert torch.equal(old(), new()), name
        cmd = {"op": "nms", "boxes": boxes.tolist(), "scores": scores.tolist(), "t": t, "batched": idxs is not None}
        cmd["idxs"] = idxs.tolist() if idxs is not None else [0] * len(scores)
        times: dict[str, list[float]] = {"old": [], "new": [], "torchvision": []}
        for _ in range(args.nms_runs):
            times["old"].append(timed(old))
            times["new"].append(timed(new))
            times["torchvision"].append(ref.ask(cmd)["ms"])
        row = {"case": name, **{f"{k}_ms": median(v) for k, v in times.items()}}
        row["old_over_new"] = row["old_ms"] / row["new_ms"]
        row["new_over_torchvision"] = row["new_ms"] / row["torchvision_ms"]
        rows.append(row)
        print(
            f"  {name:55s} old {row['old_ms']:8.1f}  new {row['new_ms']:7.1f}  "
            f"torchvision {row['torchvision_ms']:7.1f} ms  old/new x{row['old_over_new']:.1f}  "
            f"new/torchvision x{row['new_over_torchvision']:.2f}",
            flush=True,
        )
    return rows


def capture_nms_calls(model, image) -> list[tuple]:
    """The (boxes, scores, idxs, threshold) of every batched_nms call in one eager forward."""
    from pixelwise import ops

    calls, original = [], ops.batched_nms

    def spy(boxes, scores, idxs, t):
        calls.append((boxes.clone(), scores.clone(), idxs.clone(), t))
        return original(boxes, scores, idxs, t)

    ops.batched_nms = spy
    try:
        with torch.inference_mode():
            model([image])
    finally:
        ops.batched_nms = original
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=None, help="default: the first CamVid val frame")
    parser.add_argument("--runs", type=int, default=7, help="interleaved rounds for the Mask R-CNN timing")
    parser.add_argument("--nms-runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--agreement-images", type=int, default=4, help="CamVid val frames for detection agreement")
    parser.add_argument("--score-temperature", type=float, default=2.0)
    parser.add_argument("--rpn-delta-scale", type=float, default=0.1)
    parser.add_argument("--tempered", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ref-python", default=REF_PYTHON)
    parser.add_argument("--skip-nms", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from pixelwise.models.maskrcnn import maskrcnn_resnet50_fpn
    from pixelwise.models.maskrcnn.fast import detection_agreement, optimize_for_inference

    torch.set_num_threads(args.threads)
    frames = sorted(glob.glob(str(CAMVID_VAL / "*.png")))
    image_path = args.image or frames[0]
    eager = maskrcnn_resnet50_fpn(num_classes=91).eval()
    eager.load_state_dict(fixture_weights(args.tempered, args.score_temperature, args.rpn_delta_scale))
    fast = optimize_for_inference(eager)
    ref = Reference(args)
    image = load_image(image_path)
    print(f"torch {torch.__version__}, torchvision {ref.version} (subprocess), {args.threads} threads, "
          f"image {image_path} {tuple(image.shape[1:])}, fast dtype {fast.dtype}", flush=True)
    weights = {"tempered": args.tempered, "score_temperature": args.score_temperature}
    weights["rpn_delta_scale"] = args.rpn_delta_scale
    result: dict = {"threads": args.threads, "image": image_path, "fast_dtype": str(fast.dtype), "weights": weights}

    # warm-up, then interleaved rounds
    with torch.inference_mode():
        eager([image])
        fast([image])
    ref.ask({"op": "maskrcnn", "image": image_path})
    times: dict[str, list[float]] = {"torchvision_eager": [], "pixelwise_eager": [], "pixelwise_fast": []}
    for r in range(args.runs):
        with torch.inference_mode():
            times["pixelwise_eager"].append(timed(lambda: eager([image])))
            times["pixelwise_fast"].append(timed(lambda: fast([image])))
        times["torchvision_eager"].append(ref.ask({"op": "maskrcnn", "image": image_path})["ms"])
        print(f"  round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()), flush=True)
    ms = {k: median(v) for k, v in times.items()}
    result["ms_per_image"] = ms
    result["ratios"] = {
        "torchvision_eager/pixelwise_fast": ms["torchvision_eager"] / ms["pixelwise_fast"],
        "torchvision_eager/pixelwise_eager": ms["torchvision_eager"] / ms["pixelwise_eager"],
        "pixelwise_eager/pixelwise_fast": ms["pixelwise_eager"] / ms["pixelwise_fast"],
    }
    print("Mask R-CNN, 800 px, median ms per image: " + ", ".join(f"{k} {v:.0f}" for k, v in ms.items()))
    print("ratios: " + ", ".join(f"{k} x{v:.2f}" for k, v in result["ratios"].items()), flush=True)

    # detection agreement on several frames
    paths = [image_path] + [p for p in frames if p != image_path][: max(args.agreement_images - 1, 0)]
    pairs = {"fast vs torchvision": [0, 0], "fast vs pixelwise eager": [0, 0], "pixelwise eager vs torchvision": [0, 0]}
    per_image = []
    for path in paths:
        img = load_image(path)
        with torch.inference_mode():
            d_eager, d_fast = eager([img])[0], fast([img])[0]
        tv = ref.ask({"op": "maskrcnn", "image": path})["det"]
        d_tv = {"boxes": torch.tensor(tv["boxes"]).reshape(-1, 4), "scores": torch.tensor(tv["scores"])}
        d_tv["labels"] = torch.tensor(tv["labels"], dtype=torch.int64)
        row = {"image": Path(path).name, "detections_above_0.5": {
            "torchvision": int((d_tv["scores"] > 0.5).sum()), "pixelwise_eager": int((d_eager["scores"] > 0.5).sum()),
            "pixelwise_fast": int((d_fast["scores"] > 0.5).sum())}}
        for key, (ref_det, cand) in zip(pairs, [(d_tv, d_fast), (d_eager, d_fast), (d_tv, d_eager)]):
            matched, total = detection_agreement(ref_det, cand)
            pairs[key][0] += matched
            pairs[key][1] += total
            row[key] = [matched, total]
        per_image.append(row)
        print(f"  {row['image']}: " + ", ".join(f"{k} {row[k][0]}/{row[k][1]}" for k in pairs), flush=True)
    result["agreement"] = {k: {"matched": m, "total": t, "fraction": m / max(t, 1)} for k, (m, t) in pairs.items()}
    result["agreement_per_image"] = per_image
    print("detection agreement (score > 0.5, same label, IoU >= 0.9): "
          + ", ".join(f"{k} {m}/{t} = {m / max(t, 1):.1%}" for k, (m, t) in pairs.items()), flush=True)

    if not args.skip_nms:
        print("NMS (median ms, interleaved):", flush=True)
        result["nms"] = bench_nms(args, ref, capture_nms_calls(eager, image))
    ref.close()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
