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

* ``--fit-heads N`` (default 0, off): a second, sparser and more realistic detector. The fixture's
  random heads leave no margin between competing boxes (hundreds of detections with near-equal
  scores, chains of near-equal neighbouring anchors in NMS): even sub-gray-level input noise
  (+-0.5/255) changes 3-4% of their detections. With this option the RPN's objectness and delta
  1x1 convs and the box predictor (class scores and per-class deltas) are refitted by ridge
  regression on N CamVid *training* frames (ground truth: connected components of Car,
  Pedestrian, Bicyclist and SignSymbol, as COCO car, person, bicycle, stop sign), on top of the
  fixture backbone, FPN, RPN conv and box head, which stay as they are (:func:`fit_heads`). On
  the validation frames this detector returns about 1-15 detections per frame, a few above 0.5.

Detection agreement (the accuracy guard of the fast path): of the reference's detections with
score > 0.5, how many the other output has with the same label at box IoU >= 0.9
(:func:`pixelwise.models.maskrcnn.fast.detection_agreement`), over ``--agreement-images`` frames.
Also timed and compared: the fast path with ``dtype=torch.float32`` (folding and the other
savings, no bfloat16), and, as a measure of how much margin these untrained weights leave between
competing boxes, eager on the frame against eager on the frame plus uniform noise of +-0.5/255.

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
import tempfile
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


# ----------------------------------------------------------------------------- fitted heads (--fit-heads)

# CamVid classes that come as separate objects -> the COCO category id used for them
CAMVID_INSTANCES = {8: 3, 9: 1, 10: 2, 6: 13}  # Car -> car, Pedestrian -> person, Bicyclist -> bicycle, SignSymbol


def camvid_instances(annotation: Path, min_area: int = 150) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``Tensor[K, 4]`` and COCO labels of the connected components of CamVid's object classes."""
    from PIL import Image
    from scipy import ndimage

    label_map = np.array(Image.open(annotation))
    boxes, labels = [], []
    for camvid_id, coco_id in CAMVID_INSTANCES.items():
        components, _ = ndimage.label(label_map == camvid_id)
        for k, window in enumerate(ndimage.find_objects(components), start=1):
            if window is not None and int((components[window] == k).sum()) >= min_area:
                ys, xs = window
                boxes.append([xs.start, ys.start, xs.stop, ys.stop])
                labels.append(coco_id)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)


def ridge(x: torch.Tensor, y: torch.Tensor, strength: float = 1e-2) -> torch.Tensor:
    """Least squares with an L2 penalty (relative to the mean feature energy) and a bias:
    ``x: [M, D]``, ``y: [M, T]`` -> ``[D + 1, T]`` (last row the bias), in float64."""
    x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    gram = x.T @ x
    penalty = strength * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    penalty[-1, -1] = 0
    return torch.linalg.solve(gram + penalty, x.T @ y.double())


def fit_heads(model, frames: list[Path], logit_scale: float = 4.0) -> dict[str, torch.Tensor]:
    """Fit the RPN's 1x1 objectness/delta convs and the box predictor by ridge regression on CamVid
    *training* frames (instances = connected components of Car, Pedestrian, Bicyclist, SignSymbol),
    on top of the fixture backbone, FPN, RPN conv and box head, which stay as they are. Returns
    the new state dict. A stand-in for trained heads: it gives the detector score margins that a
    trained one has and random heads lack (see the module docstring)."""
    from pixelwise import ops
    from pixelwise.models.maskrcnn.transform import resize_boxes

    gen = torch.Generator().manual_seed(0)
    rpn, heads = model.rpn, model.roi_heads
    cached = []
    anchor_x, anchor_y, anchor_type, anchor_codes = [], [], [], []
    with torch.inference_mode():
        for path in frames:
            image = load_image(str(path))
            gt, gt_labels = camvid_instances(path.parent.parent / "trainannot" / path.name)
            if gt.shape[0] == 0:
                continue
            batch, _ = model.transform([image])
            gt = resize_boxes(gt, tuple(image.shape[1:]), batch.image_sizes[0])
            features = model.backbone(batch.tensors)
            levels = list(features.values())
            anchors = rpn.anchors(batch, levels)
            rows = []
            for level in levels:
                t = rpn.head.conv(level)[0]  # [C, H, W]
                rows.append(t.permute(1, 2, 0).reshape(-1, t.shape[0]).repeat_interleave(3, 0))
            feats = torch.cat(rows)  # one row per anchor, (level, y, x, anchor) order
            iou = ops.box_iou(gt, anchors)
            best, match = iou.max(0)
            pos = torch.where(best >= 0.5)[0]
            neg = torch.where(best < 0.3)[0]
            neg = neg[torch.randperm(neg.numel(), generator=gen)[: max(40 * pos.numel(), 2000)]]
            chosen = torch.cat([pos, neg])
            anchor_x.append(feats[chosen])
            anchor_y.append(torch.cat([torch.ones(pos.numel()), -torch.ones(neg.numel())]))
            anchor_type.append(chosen % 3)
            codes = rpn.box_coder.encode_single(gt[match[chosen]], anchors[chosen])
            anchor_codes.append(torch.where((best[chosen] >= 0.5)[:, None], codes, torch.nan))
            cached.append((batch, features, gt, gt_labels))
    x, y, kind, codes = (torch.cat(v) for v in (anchor_x, anchor_y, anchor_type, anchor_codes))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls_w, cls_b = state["rpn.head.cls_logits.weight"], state["rpn.head.cls_logits.bias"]
    box_w, box_b = state["rpn.head.bbox_pred.weight"], state["rpn.head.bbox_pred.bias"]
    for a in range(3):
        sel = kind == a
        w = ridge(x[sel], y[sel, None])[:, 0] * logit_scale
        cls_w[a, :, 0, 0], cls_b[a] = w[:-1].float(), w[-1].float()
        fg = sel & ~torch.isnan(codes[:, 0])
        if int(fg.sum()) > 20:
            w = ridge(x[fg], codes[fg], strength=1e-1)
            box_w[4 * a : 4 * a + 4, :, 0, 0], box_b[4 * a : 4 * a + 4] = w[:-1].T.float(), w[-1].float()
    model.load_state_dict(state)
    # box predictor on the fitted RPN's proposals
    box_x, box_label, box_codes = [], [], []
    with torch.inference_mode():
        for batch, features, gt, gt_labels in cached:
            proposals = rpn(batch, features)[0]
            fc7 = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
            best, match = ops.box_iou(gt, proposals[0]).max(0)
            label = torch.where(best >= 0.5, gt_labels[match], 0)
            fg = torch.where(label > 0)[0]
            bg = torch.where(best < 0.4)[0]
            bg = bg[torch.randperm(bg.numel(), generator=gen)[: max(3 * fg.numel(), 200)]]
            chosen = torch.cat([fg, bg])
            box_x.append(fc7[chosen])
            box_label.append(label[chosen])
            box_codes.append(heads.box_coder.encode_single(gt[match[chosen]], proposals[0][chosen]))
    x, label, codes = torch.cat(box_x), torch.cat(box_label), torch.cat(box_codes)
    classes = torch.unique(label)
    onehot = (label[:, None] == classes[None, :]).double() * 2 - 1
    w = ridge(x, onehot) * logit_scale
    score_w = torch.zeros_like(state["roi_heads.box_predictor.cls_score.weight"])
    score_b = torch.full_like(state["roi_heads.box_predictor.cls_score.bias"], -20.0)  # classes never seen
    score_w[classes], score_b[classes] = w[:-1].T.float(), w[-1].float()
    state["roi_heads.box_predictor.cls_score.weight"] = score_w
    state["roi_heads.box_predictor.cls_score.bias"] = score_b
    reg_w = torch.zeros_like(state["roi_heads.box_predictor.bbox_pred.weight"])
    reg_b = torch.zeros_like(state["roi_heads.box_predictor.bbox_pred.bias"])
    for c in classes[classes > 0].tolist():
        sel = label == c
        if int(sel.sum()) > 20:
            w = ridge(x[sel], codes[sel], strength=1e-1)
            reg_w[4 * c : 4 * c + 4], reg_b[4 * c : 4 * c + 4] = w[:-1].T.float(), w[-1].float()
    state["roi_heads.box_predictor.bbox_pred.weight"] = reg_w
    state["roi_heads.box_predictor.bbox_pred.bias"] = reg_b
    model.load_state_dict(state)
    return state


# ----------------------------------------------------------------------------- torchvision worker


def worker(args: argparse.Namespace) -> None:
    """Runs under the reference python: answers one JSON command per stdin line."""
    import torchvision

    torch.set_num_threads(args.threads)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    model.eval().load_state_dict(torch.load(args.weights, weights_only=True))
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

    def __init__(self, args: argparse.Namespace, weights: str) -> None:
        self.proc = subprocess.Popen(
            [args.ref_python, __file__, "--worker", "--threads", str(args.threads), "--weights", weights],
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
    parser.add_argument("--fit-heads", type=int, default=0, metavar="N",
                        help="fit the RPN 1x1 convs and the box predictor on N CamVid training frames (see above)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from pixelwise.models.maskrcnn import maskrcnn_resnet50_fpn
    from pixelwise.models.maskrcnn.fast import optimize_for_inference

    torch.set_num_threads(args.threads)
    if not os.path.exists(args.ref_python):  # before the weights are built and written (178 MB)
        raise SystemExit(f"bench_maskrcnn.py: no reference python at {args.ref_python}: build the torchvision "
                         "environment with the shared tools' reference-venv.sh and give its python (--ref-python)")
    frames = sorted(glob.glob(str(CAMVID_VAL / "*.png")))
    image_path = args.image or frames[0]
    eager = maskrcnn_resnet50_fpn(num_classes=91).eval()
    eager.load_state_dict(fixture_weights(args.tempered, args.score_temperature, args.rpn_delta_scale))
    if args.fit_heads:
        train = sorted((CAMVID_VAL.parent / "train").glob("*.png"))
        fit_heads(eager, train[:: max(len(train) // args.fit_heads, 1)][: args.fit_heads])
    fast = optimize_for_inference(eager)
    fast32 = optimize_for_inference(eager, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as folder:  # the weights file goes, whatever happens
        weights = os.path.join(folder, "maskrcnn_weights.pt")
        torch.save(eager.state_dict(), weights)  # the torchvision worker loads exactly these weights
        ref = Reference(args, weights)
        try:
            measure(args, ref, eager, fast, fast32, frames, image_path)
        finally:
            ref.close()


def measure(args: argparse.Namespace, ref: Reference, eager: torch.nn.Module, fast: torch.nn.Module,
            fast32: torch.nn.Module, frames: list[str], image_path: str) -> None:
    """The timings and the agreement (:func:`main` set the three models and the reference up)."""
    from pixelwise.models.maskrcnn.fast import detection_agreement  # start-up time: after the argument checks
    image = load_image(image_path)
    print(f"torch {torch.__version__}, torchvision {ref.version} (subprocess), {args.threads} threads, "
          f"image {image_path} {tuple(image.shape[1:])}, fast dtype {fast.dtype}", flush=True)
    adjust = {"tempered": args.tempered, "score_temperature": args.score_temperature}
    adjust.update(rpn_delta_scale=args.rpn_delta_scale, fit_heads=args.fit_heads)
    result: dict = {"threads": args.threads, "image": image_path, "fast_dtype": str(fast.dtype), "weights": adjust}

    # warm-up, then interleaved rounds
    with torch.inference_mode():
        eager([image])
        fast([image])
        fast32([image])
    ref.ask({"op": "maskrcnn", "image": image_path})
    times: dict[str, list[float]] = {"torchvision_eager": [], "pixelwise_eager": [], "pixelwise_fast": []}
    times["pixelwise_fast_fp32"] = []
    for r in range(args.runs):
        with torch.inference_mode():
            times["pixelwise_eager"].append(timed(lambda: eager([image])))
            times["pixelwise_fast"].append(timed(lambda: fast([image])))
            times["pixelwise_fast_fp32"].append(timed(lambda: fast32([image])))
        times["torchvision_eager"].append(ref.ask({"op": "maskrcnn", "image": image_path})["ms"])
        print(f"  round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()), flush=True)
    ms = {k: median(v) for k, v in times.items()}
    result["ms_per_image"] = ms
    result["ratios"] = {
        "torchvision_eager/pixelwise_fast": ms["torchvision_eager"] / ms["pixelwise_fast"],
        "torchvision_eager/pixelwise_eager": ms["torchvision_eager"] / ms["pixelwise_eager"],
        "pixelwise_eager/pixelwise_fast": ms["pixelwise_eager"] / ms["pixelwise_fast"],
        "torchvision_eager/pixelwise_fast_fp32": ms["torchvision_eager"] / ms["pixelwise_fast_fp32"],
    }
    print("Mask R-CNN, 800 px, median ms per image: " + ", ".join(f"{k} {v:.0f}" for k, v in ms.items()))
    print("ratios: " + ", ".join(f"{k} x{v:.2f}" for k, v in result["ratios"].items()), flush=True)

    # detection agreement on several frames
    others = [p for p in frames if p != image_path]  # spread over the val sequences, not neighbouring frames
    step = max(len(others) // max(args.agreement_images - 1, 1), 1)
    paths = [image_path] + others[::step][: args.agreement_images - 1]
    pairs = {"fast vs torchvision": [0, 0], "fast vs pixelwise eager": [0, 0], "pixelwise eager vs torchvision": [0, 0]}
    pairs["fast_fp32 vs torchvision"] = [0, 0]
    pairs["eager vs eager on input + U(+-0.5/255) noise"] = [0, 0]  # how sensitive these weights are
    per_image = []
    noise = torch.Generator().manual_seed(0)
    for path in paths:
        img = load_image(path)
        noisy = img + (torch.rand(img.shape, generator=noise) - 0.5) / 255
        with torch.inference_mode():
            d_eager, d_fast, d_fast32, d_noisy = eager([img])[0], fast([img])[0], fast32([img])[0], eager([noisy])[0]
        tv = ref.ask({"op": "maskrcnn", "image": path})["det"]
        d_tv = {"boxes": torch.tensor(tv["boxes"]).reshape(-1, 4), "scores": torch.tensor(tv["scores"])}
        d_tv["labels"] = torch.tensor(tv["labels"], dtype=torch.int64)
        row = {"image": Path(path).name, "detections_above_0.5": {
            "torchvision": int((d_tv["scores"] > 0.5).sum()), "pixelwise_eager": int((d_eager["scores"] > 0.5).sum()),
            "pixelwise_fast": int((d_fast["scores"] > 0.5).sum())}}
        compared = [(d_tv, d_fast), (d_eager, d_fast), (d_tv, d_eager), (d_tv, d_fast32), (d_eager, d_noisy)]
        for key, (ref_det, cand) in zip(pairs, compared):
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
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
