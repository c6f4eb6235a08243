"""Required: the metrics of ``pixelwise eval`` equal an independent numpy computation over the
PNG masks that ``pixelwise predict`` writes for the same images (no training; random weights)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_isbi_tree
from pixelwise import create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.coco_eval import coco_evaluate
from pixelwise.data import build_dataset, sample_target
from pixelwise.inference import evaluate as evaluate_module
from pixelwise.inference.evaluate import evaluate_checkpoint, evaluate_predictions
from pixelwise.inference.predictor import Predictor
from pixelwise.metrics import rand_error_over_thresholds

KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}
NAMES = ["sky", "road", "car", "tree"]
PALETTE = [[128, 128, 128], [128, 64, 128], [64, 0, 128], [128, 128, 0]]


def _checkpoint(path, num_classes, names, palette, seed):
    torch.manual_seed(seed)
    model = create_model("unet", num_classes=num_classes, **KW).eval()
    with torch.no_grad():  # a spread of classes rather than one class everywhere: sharpen the classifier
        model.head.weight.mul_(8.0)
    save_checkpoint(path, model, {"model": "unet", "num_classes": num_classes, "model_kwargs": KW,
                                  "task": "semantic", "class_names": names, "palette": palette,
                                  "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


def _blocky(rng, h, w, k, cell):
    small = rng.integers(0, k, (h // cell + 1, w // cell + 1))
    return np.kron(small, np.ones((cell, cell), dtype=np.int64))[:h, :w]


def _folder_tree(root, rng, sizes):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps({"names": NAMES, "palette": PALETTE}))
    for i, (h, w) in enumerate(sizes):
        mask = _blocky(rng, h, w, 4, 9).astype(np.uint8)
        mask[rng.random((h, w)) < 0.04] = 255  # some ignored pixels
        colours = np.array(PALETTE + [[0, 0, 0]] * 252, dtype=np.int64)[np.where(mask == 255, 4, mask)]
        image = np.clip(colours + rng.normal(0, 40, colours.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{i}.png")


# ---------------------------------------------------------------------------------------------
# independent reference: numpy over the written PNGs (no pixelwise.metrics)


def _np_boundary(m):
    p = np.pad(m, 1, mode="edge")
    inside = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inside


def _np_band(m, d):
    """The pixels of region m that d erosions by a 3x3 square (zeros beyond the image) take away."""
    e = m.copy()
    for _ in range(d):
        q = np.pad(e, 1)
        e = np.logical_and.reduce([q[1 + dy:q.shape[0] - 1 + dy, 1 + dx:q.shape[1] - 1 + dx]
                                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return m & ~e


def _np_boundary_iou(preds, gts, k):
    """Per-class Boundary IoU (Cheng et al.): band width round(2% of the diagonal), void out of both maps."""
    inter, union = np.zeros(k), np.zeros(k)
    for p, g in zip(preds, gts):
        d = max(1, int(round(0.02 * math.hypot(*g.shape))))
        for c in range(k):
            gb, pb = _np_band(g == c, d), _np_band((p == c) & (g != 255), d)
            inter[c] += (gb & pb).sum()
            union[c] += (gb | pb).sum()
    return [inter[c] / union[c] if union[c] else None for c in range(k)]


def _np_min_dist(src, dst):
    """For each pixel of src, the distance to the nearest pixel of dst (brute force)."""
    a, b = np.argwhere(src).astype(float), np.argwhere(dst).astype(float)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return d.min(1)


def _np_bf(pred, gt, k):
    tol = 0.0075 * math.hypot(*gt.shape)
    pred = np.where(gt == 255, 255, pred)
    scores = {}
    for c in range(k):
        if not (gt == c).any():
            continue
        bp, bg = _np_boundary(pred == c), _np_boundary(gt == c)
        if not bp.any() and not bg.any():
            scores[c] = 1.0
        elif not bp.any() or not bg.any():
            scores[c] = 0.0
        else:
            prec = float((_np_min_dist(bp, bg) <= tol).mean())
            rec = float((_np_min_dist(bg, bp) <= tol).mean())
            scores[c] = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return scores


def _reference(preds, gts, k):
    cm = np.zeros((k, k), np.int64)
    for p, g in zip(preds, gts):
        v = g != 255
        np.add.at(cm, (g[v].astype(np.int64), p[v].astype(np.int64)), 1)
    tp, gt_n, pr_n = np.diag(cm).astype(float), cm.sum(1).astype(float), cm.sum(0).astype(float)
    union = gt_n + pr_n - tp
    iou = [tp[c] / union[c] if union[c] else None for c in range(k)]
    acc = [tp[c] / gt_n[c] if gt_n[c] else None for c in range(k)]
    dice = [2 * tp[c] / (gt_n[c] + pr_n[c]) if union[c] else None for c in range(k)]
    bf_images, bf_class = [], {c: [] for c in range(k)}
    for p, g in zip(preds, gts):
        s = _np_bf(p, g, k)
        if s:
            bf_images.append(np.mean(list(s.values())))
        for c, v in s.items():
            bf_class[c].append(v)
    biou = _np_boundary_iou(preds, gts, k)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    return {
        "pixel_acc": tp.sum() / cm.sum(), "mean_acc": mean(acc), "mIoU": mean(iou),
        "fwIoU": sum(gt_n[c] / cm.sum() * (iou[c] or 0.0) for c in range(k)), "dice": mean(dice),
        "bf_score": float(np.mean(bf_images)), "boundary_iou": mean(biou),
        "per_class": [{"iou": iou[c], "acc": acc[c], "dice": dice[c], "pixels": int(gt_n[c]),
                       "bf": float(np.mean(bf_class[c])) if bf_class[c] else None, "boundary_iou": biou[c]}
                      for c in range(k)],
        "cm": cm,
    }


def _np_components(m):
    """4-connected labelling by repeated min-propagation (numpy only)."""
    lab = np.where(m, np.arange(1, m.size + 1).reshape(m.shape), 0)
    big = m.size + 1
    while True:
        p = np.pad(np.where(m, lab, big), 1, constant_values=big)
        nb = np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(m, nb, 0)
        if np.array_equal(new, lab):
            return lab
        lab = new


def _np_rand(preds, gts):
    ab = a = b = 0.0
    for p, g in zip(preds, gts):
        gs, ps = _np_components(g == 1), _np_components(p == 1)
        keep = gs > 0
        gk, pk = gs[keep], ps[keep]
        zero = float((pk == 0).sum())
        pairs = {}
        for x, y in zip(gk[pk > 0].tolist(), pk[pk > 0].tolist()):
            pairs[(x, y)] = pairs.get((x, y), 0) + 1
        ab += sum(v * v for v in pairs.values()) + zero
        a += sum(float(v) ** 2 for v in np.unique(gk, return_counts=True)[1])
        b += sum(float(v) ** 2 for v in np.unique(pk[pk > 0], return_counts=True)[1]) + zero
    prec, rec = ab / b, ab / a
    return 1 - 2 * prec * rec / (prec + rec)


def _assert_close(got, want):
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------


def test_eval_equals_numpy_over_predicted_pngs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    _folder_tree(root, rng, [(40, 56), (37, 61), (48, 48), (100, 130)])  # bands of 1 and 3 pixels
    ckpt = _checkpoint(tmp_path / "m.safetensors", 4, NAMES, PALETTE, seed=0)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), str(root / "images"), "--out", str(out),
                 "--no-progress"]) == 0
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "folder", "--data", str(root),
                 "--split", "all", "--json", str(report), "--no-progress"]) == 0
    got = json.loads(report.read_text())
    said = capsys.readouterr().out

    stems = sorted(p.stem for p in (root / "images").glob("*.png"))
    preds = [np.array(Image.open(out / f"{s}.png")) for s in stems]
    gts = [np.array(Image.open(root / "masks" / f"{s}.png")) for s in stems]
    want = _reference(preds, gts, 4)
    assert len(set(np.concatenate([p.ravel() for p in preds]).tolist())) >= 2, "degenerate prediction"
    assert got["num_images"] == 4
    assert got["confusion_matrix"] == want["cm"].tolist()  # rows ground truth, columns prediction
    # each image's own numbers, from its own confusion matrix
    assert sorted(row["name"] for row in got["per_image"]) == stems
    for row in got["per_image"]:
        k = stems.index(row["name"])
        alone = _reference([preds[k]], [gts[k]], 4)
        assert row["pixels"] == int(alone["cm"].sum())
        for key in ("pixel_acc", "mean_acc", "mIoU", "dice"):
            _assert_close(row[key], alone[key])
        _assert_close(row["bf"], alone["bf_score"])  # the image's BF and Boundary IoU, the split's rules on it
        _assert_close(row["boundary_iou"], alone["boundary_iou"])
    assert np.mean([row["bf"] for row in got["per_image"]]) == pytest.approx(got["bf_score"])  # BF: mean of images
    worst = sorted(got["per_image"], key=lambda row: row["mIoU"])[:3]
    assert "  lowest mIoU: " + ", ".join(f"{row['name']} {row['mIoU']:.4f}" for row in worst) + "\n" in said
    for key in ("pixel_acc", "mean_acc", "mIoU", "fwIoU", "dice", "bf_score", "boundary_iou"):
        _assert_close(got[key], want[key])
    assert [r["name"] for r in got["per_class"]] == NAMES
    for g_row, w_row in zip(got["per_class"], want["per_class"]):
        for key in ("iou", "acc", "dice", "bf", "boundary_iou"):
            _assert_close(g_row[key], w_row[key])
        assert g_row["pixels"] == w_row["pixels"]


def _isbi_predicted(tmp_path):
    """An ISBI tree, a two-class checkpoint, and predict's masks of the val split's images (the last 4 of 6)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "isbi"
    write_isbi_tree(root, rng)
    ckpt = _checkpoint(tmp_path / "isbi.safetensors", 2, ["membrane", "cell"], [[0, 0, 0], [255, 255, 255]], seed=3)
    out = tmp_path / "pred"
    images = [str(root / "train" / "image" / f"{i}.png") for i in (2, 3, 4, 5)]  # val split: the last 4 of 6
    assert main(["predict", "--checkpoint", str(ckpt), *images, "--out", str(out), "--no-progress"]) == 0
    return root, ckpt, out


def test_isbi_eval_equals_numpy_over_predicted_pngs(tmp_path):
    root, ckpt, out = _isbi_predicted(tmp_path)
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "isbi2012", "--data", str(root),
                 "--split", "val", "--json", str(report), "--no-progress"]) == 0
    got = json.loads(report.read_text())

    preds = [np.array(Image.open(out / f"{i}.png")) for i in (2, 3, 4, 5)]
    gts = [(np.array(Image.open(root / "train" / "label" / f"{i}.png")) >= 128).astype(np.uint8) for i in (2, 3, 4, 5)]
    assert len(set(np.concatenate([p.ravel() for p in preds]).tolist())) == 2, "degenerate prediction"
    want = _reference(preds, gts, 2)
    assert got["num_images"] == 4
    _assert_close(got["pixel_error"], 1 - want["pixel_acc"])
    _assert_close(got["rand_error"], _np_rand(preds, gts))
    # the challenge's form: best F over thresholds of the cell probability, from the probabilities
    # the predictor gives and the metrics module's own function
    predictor = Predictor.from_checkpoint(str(ckpt), "cpu")
    ds = build_dataset("isbi2012", str(root), "val")
    probs = [predictor.predict(ds.load(i).image).probs[1].numpy() for i in range(len(ds))]
    best = rand_error_over_thresholds(probs, [ds.load(i).mask for i in range(len(ds))])
    _assert_close(got["rand_error_best"], best["rand_error"])
    assert got["rand_best_threshold"] == best["threshold"]
    assert got["rand_error_best"] <= got["rand_error"] + 1e-12  # 0.5 is among the thresholds
    # the leaderboard's pixel error: 1 - the best F-score of cell pixels over the same thresholds
    cells = np.concatenate([ds.load(i).mask.ravel() == 1 for i in range(len(ds))])
    prob = np.concatenate([p.ravel() for p in probs])
    f = [2 * np.sum((prob > t) & cells) / (np.sum(prob > t) + np.sum(cells)) for t in np.arange(10) / 10]
    _assert_close(got["pixel_error_best"], 1 - max(f))
    assert got["pixel_best_threshold"] == pytest.approx(np.argmax(f) / 10)
    for key in ("pixel_acc", "mIoU", "bf_score"):
        _assert_close(got[key], want[key])


def test_isbi_eval_with_watershed_scores_the_map_with_its_boundaries_drawn_in(tmp_path, capsys):
    """``eval --watershed T``: the ISBI errors are those of the cell probability with its watershed
    boundaries (seeded at T) drawn in, computed here with numpy Rand and F over that map; the
    confusion-matrix metrics stay the network's own."""
    from pixelwise.inference.cells import with_boundaries

    rng = np.random.default_rng(1)
    root = tmp_path / "isbi"
    write_isbi_tree(root, rng)
    ckpt = _checkpoint(tmp_path / "isbi.safetensors", 2, ["membrane", "cell"], [[0, 0, 0], [255, 255, 255]], seed=3)
    reports = {}
    for flag in ([], ["--watershed", "0.4"]):
        reports[bool(flag)] = tmp_path / f"eval{len(flag)}.json"
        assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "isbi2012", "--data", str(root), "--split",
                     "val", "--json", str(reports[bool(flag)]), "--no-progress", "--no-bf", *flag]) == 0
    plain, got = (json.loads(reports[k].read_text()) for k in (False, True))
    assert got["provenance"]["watershed"] == 0.4 and "watershed" not in plain["provenance"]
    assert not {"bf_score", "bf", "boundary_iou"} & (set(plain) | set(plain["per_class"][0])
                                                     | set(plain["per_image"][0]))  # --no-bf: neither
    for key in ("pixel_error", "mIoU", "pixel_acc"):
        assert got[key] == plain[key]
    predictor = Predictor.from_checkpoint(str(ckpt), "cpu")
    ds = build_dataset("isbi2012", str(root), "val")
    maps = [with_boundaries(predictor.predict(ds.load(i).image).probs[1].numpy(), 0.4) for i in range(len(ds))]
    gts = [ds.load(i).mask for i in range(len(ds))]
    _assert_close(got["rand_error"], _np_rand([(m > 0.5).astype(np.uint8) for m in maps], gts))
    errors = [_np_rand([(m > t).astype(np.uint8) for m in maps], gts) for t in np.arange(10) / 10]
    _assert_close(got["rand_error_best"], min(errors))
    assert got["rand_best_threshold"] == pytest.approx(np.argmin(errors) / 10)
    assert got["rand_error_best"] != plain["rand_error_best"]
    cells = np.concatenate([g.ravel() == 1 for g in gts])
    prob = np.concatenate([m.ravel() for m in maps])
    f = [2 * np.sum((prob > t) & cells) / (np.sum(prob > t) + np.sum(cells)) for t in np.arange(10) / 10]
    _assert_close(got["pixel_error_best"], 1 - max(f))
    # predict --watershed writes the masks eval scored (the network's with the boundaries drawn in as
    # membrane) and the cells
    from pixelwise.inference.cells import cell_map, watershed_cells

    out = tmp_path / "pred"
    images = [str(root / "train" / "image" / f"{i}.png") for i in (2, 3, 4, 5)]  # the val split
    assert main(["predict", "--checkpoint", str(ckpt), *images, "--out", str(out), "--watershed", "0.4",
                 "--no-progress"]) == 0
    masks = [np.array(Image.open(out / f"{i}.png")) for i in (2, 3, 4, 5)]
    _assert_close(got["rand_error"], _np_rand(masks, gts))
    for i, mask in zip((2, 3, 4, 5), masks):
        prediction = predictor.predict(ds.load(i - 2).image)
        cells = np.array(Image.open(out / f"{i}_cells.png"))
        assert cells.dtype == np.uint16 and cells.max() > 1
        np.testing.assert_array_equal(cells, watershed_cells(prediction.probs[1].numpy(), 0.4))
        np.testing.assert_array_equal(mask, np.where(cell_map(cells), prediction.mask, 0))
    # a dataset without cells to count refuses the flag, and so does a threshold outside [0, 1)
    folder = tmp_path / "data"
    _folder_tree(folder, rng, [(40, 56)])
    four = _checkpoint(tmp_path / "m.safetensors", 4, NAMES, PALETTE, seed=0)
    assert main(["eval", "--checkpoint", str(four), "--dataset", "folder", "--data", str(folder), "--split", "all",
                 "--watershed", "--no-progress"]) == 2
    assert "--watershed segments cells from a membrane map" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "isbi2012", "--data", str(root),
                 "--watershed", "1.5", "--no-progress"]) == 2
    assert "--watershed 1.5: the seed threshold is a cell probability in [0, 1)" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(four), images[0], "--out", str(tmp_path / "p4"), "--watershed"]) == 2
    assert "from a two-class boundary model" in capsys.readouterr().err and not (tmp_path / "p4").exists()
    assert main(["predict", "--checkpoint", str(ckpt), images[0], "--out", str(tmp_path / "p5"), "--watershed",
                 "nan"]) == 2
    assert "the seed threshold is a cell probability" in capsys.readouterr().err


def test_a_model_trained_at_a_smaller_size_predicts_evaluates_and_validates_alike(tmp_path):
    """The input contract: a model trained with ``augment.resize`` records that size; ``predict``
    runs it there and brings the probabilities back to each image's size, ``eval`` scores those
    masks exactly (numpy over predict's PNGs), and training validation gave the same numbers."""
    import cv2
    import yaml

    from pixelwise import load_checkpoint

    rng = np.random.default_rng(5)
    root = tmp_path / "data"
    _folder_tree(root, rng, [(40, 56), (37, 61), (48, 48), (45, 60)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "unet", "dataset": "folder", "data": str(root), "out": str(tmp_path / "run"), "epochs": 2,
        "batch_size": 2, "lr": 0.01, "amp": "off", "train_split": "all", "val_split": "all", "progress": False,
        "model_kwargs": KW, "augment": {"resize": [24, 32], "flip": False, "jitter": False}}))
    assert main(["train", "--config", str(recipe)]) == 0
    ckpt = tmp_path / "run" / "last.safetensors"
    model, meta = load_checkpoint(ckpt)
    assert meta["input"]["resize"] == [24, 32]

    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), str(root / "images"), "--out", str(out), "--no-progress"]) == 0
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "folder", "--data", str(root), "--split", "all",
                 "--json", str(report), "--no-progress"]) == 0
    got = json.loads(report.read_text())
    assert got["input"]["resize"] == [24, 32]

    stems = sorted(p.stem for p in (root / "images").glob("*.png"))
    mean, std = np.array(meta["input"]["mean"]), np.array(meta["input"]["std"])
    differs = 0
    for s in stems:  # predict's masks, recomputed by hand: resize, normalise, model, upsample, argmax
        image = np.array(Image.open(root / "images" / f"{s}.png").convert("RGB"))
        h, w = image.shape[:2]

        def by_hand(img, size=(h, w)):
            x = torch.from_numpy(((img / 255.0 - mean) / std).transpose(2, 0, 1)).float()[None]
            with torch.no_grad():
                p = torch.softmax(model(x), 1)
            return torch.nn.functional.interpolate(p, size=size, mode="bilinear", align_corners=False)[0].argmax(0)

        small = cv2.resize(image, (32, 24), interpolation=cv2.INTER_LINEAR)
        mask = np.array(Image.open(out / f"{s}.png"))
        assert mask.shape == (h, w)
        np.testing.assert_array_equal(mask, by_hand(small).numpy())
        differs += int((by_hand(image).numpy() != mask).sum())  # at full size the model answers otherwise
    assert differs > 0

    preds = [np.array(Image.open(out / f"{s}.png")) for s in stems]
    gts = [np.array(Image.open(root / "masks" / f"{s}.png")) for s in stems]
    want = _reference(preds, gts, 4)
    for key in ("pixel_acc", "mean_acc", "mIoU", "fwIoU", "dice", "bf_score"):
        _assert_close(got[key], want[key])
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]  # validation of the last epoch
    for key in ("pixel_acc", "mean_acc", "mIoU", "fwIoU"):
        assert final[key] == pytest.approx(got[key], abs=1e-9), key


def test_isbi_validation_scores_the_challenge_errors_as_eval_and_can_select_on_them(tmp_path):
    """Training validation on ISBI data reports pixel_error, rand_error and rand_error_best as
    ``pixelwise eval`` computes them, and ``--select-by rand_error_best`` keeps the epoch with the
    lowest one; data without cells to count refuses that choice."""
    root = tmp_path / "isbi"
    write_isbi_tree(root, np.random.default_rng(2), count=8, size=40)
    run = tmp_path / "run"
    assert main(["train", "--model", "unet", "--dataset", "isbi2012", "--data", str(root), "--out", str(run),
                 "--epochs", "4", "--batch-size", "2", "--lr", "0.02", "--amp", "off", "--no-progress",
                 "--model-kwargs", json.dumps(KW), "--select-by", "rand_error_best",
                 "--augment", '{"crop": null, "scale": null, "flip": false, "jitter": false}']) == 0
    summary = json.loads((run / "metrics.json").read_text())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    errors = [float(r["rand_error_best"]) for r in rows]
    assert len(errors) == 4 and len(set(errors)) > 1, "the errors must move for the choice to mean anything"
    assert summary["selected_by"] == "rand_error_best"
    assert summary["best_epoch"] == 1 + int(np.argmin(errors))
    for name in ("best", "last"):
        report = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(run / f"{name}.safetensors"), "--dataset", "isbi2012",
                     "--data", str(root), "--split", "val", "--json", str(report), "--no-progress"]) == 0
        got = json.loads(report.read_text())
        row = summary["best" if name == "best" else "final"]
        for key in ("pixel_error", "pixel_error_best", "rand_error", "rand_error_best"):
            assert row[key] == pytest.approx(got[key], abs=1e-9), (name, key)

    shapes = ["train", "--model", "unet", "--dataset", "shapes", "--out", str(tmp_path / "s"), "--epochs", "1",
              "--model-kwargs", json.dumps(KW), "--select-by", "rand_error", "--no-progress"]
    assert main(shapes) == 2
    assert not (tmp_path / "s").exists()


def test_instance_eval_scores_every_detection_whatever_its_score(tmp_path, monkeypatch):
    """docs (evaluate_instances): COCO AP of the predictor's detections, all scores. The reference
    is computed independently: a predictor asked for score_thresh=0.0, each image predicted, and
    coco_evaluate over those detections and the data's targets."""
    torch.manual_seed(0)
    kwargs = {"min_size": 32, "max_size": 32}
    model = create_model("maskrcnn_resnet18_fpn", num_classes=3, **kwargs)
    checkpoint = tmp_path / "m.safetensors"
    save_checkpoint(checkpoint, model, {"model": "maskrcnn_resnet18_fpn", "num_classes": 3, "model_kwargs": kwargs,
                                        "class_names": ["background", "cup", "fork"]})
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        root / "val2017" / "1.png")
    ann = {"id": 1, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 64.0,
           "bbox": [4, 4, 8, 8], "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "1.png", "width": 32, "height": 32}], "annotations": [ann],
         "categories": [{"id": 2, "name": "cup"}, {"id": 3, "name": "fork"}]}))

    scored: list = []

    def spy(predictions, targets, **kw):
        scored.extend(predictions)
        return coco_evaluate(predictions, targets, **kw)

    monkeypatch.setattr(evaluate_module, "coco_evaluate", spy)
    got = evaluate_checkpoint(str(checkpoint), "coco", str(root), progress=False)

    predictor = Predictor.from_checkpoint(checkpoint, score_thresh=0.0)
    ds = build_dataset("coco", str(root), "val")
    preds = [predictor.predict(ds.load(i).image) for i in range(len(ds))]
    assert sum(len(p["scores"]) for p in preds) > 0 and max(float(p["scores"].max()) for p in preds) < 1.0
    want = coco_evaluate(preds, [sample_target(ds.load(i)) for i in range(len(ds))], class_ids=range(1, 3),
                         boundary=True)
    # the detections scored are all of them (an untrained model's scores are far below 0.5)
    assert [len(p["scores"]) for p in scored] == [len(p["scores"]) for p in preds]
    for key in ("mask_AP", "box_AP", "mask_AP50", "boundary_AP"):
        assert got[key] == want[key] or (np.isnan(got[key]) and np.isnan(want[key])), key


# ---------------------------------------------------------------------------------------------
# eval --predictions: the masks predict wrote (or another tool's), scored without the model


def _eval_json(tmp_path, name, *args):
    report = tmp_path / f"{name}.json"
    assert main(["eval", *map(str, args), "--json", str(report), "--no-progress"]) == 0
    return json.loads(report.read_text())


def test_eval_of_predicts_masks_equals_eval_of_the_model(tmp_path, capsys):
    """Predicting exactly as eval scores: every number of ``eval --predictions`` over the masks
    ``predict`` wrote is ``eval --checkpoint``'s, per class and per image; and a mask changed by
    hand changes them as the numpy reference says."""
    rng = np.random.default_rng(4)
    root = tmp_path / "data"
    _folder_tree(root, rng, [(40, 56), (37, 61), (48, 48)])
    ckpt = _checkpoint(tmp_path / "m.safetensors", 4, NAMES, PALETTE, seed=2)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), str(root / "images"), "--out", str(out), "--tta", "flip",
                 "--no-progress"]) == 0
    data = ["--dataset", "folder", "--data", root, "--split", "all"]
    model = _eval_json(tmp_path, "model", "--checkpoint", ckpt, "--tta", "flip", *data)
    masks = _eval_json(tmp_path, "masks", "--predictions", out, *data)
    for key in ("pixel_acc", "mean_acc", "mIoU", "fwIoU", "dice", "bf_score", "boundary_iou", "per_class",
                "per_image", "confusion_matrix", "num_images"):
        assert masks[key] == model[key], key
    record = masks["provenance"]["predictions"]["records"]
    assert len(record) == 1 and record[0]["prediction"][0]["tta"] == "flip"
    assert record[0]["models"][0]["sha256"] == model["provenance"]["checkpoint_sha256"]
    # another tool's masks: gray PNGs of class ids, without a record; one image's mask all class 2
    other = tmp_path / "other"
    other.mkdir()
    stems = sorted(p.stem for p in (root / "images").glob("*.png"))
    preds = [np.array(Image.open(out / f"{s}.png")) for s in stems]
    preds[1] = np.full_like(preds[1], 2)
    for stem, pred in zip(stems, preds):
        Image.fromarray(pred, mode="L").save(other / f"{stem}.png")
    got = _eval_json(tmp_path, "other", "--predictions", other, *data, "--no-bf")
    want = _reference(preds, [np.array(Image.open(root / "masks" / f"{s}.png")) for s in stems], 4)
    assert got["confusion_matrix"] == want["cm"].tolist()
    for key in ("pixel_acc", "mean_acc", "mIoU", "fwIoU", "dice"):
        _assert_close(got[key], want[key])
    assert "bf_score" not in got and got["provenance"]["predictions"]["records"] == [None]


def test_eval_predictions_on_isbi_gives_the_errors_at_the_argmax(tmp_path):
    root, ckpt, out = _isbi_predicted(tmp_path)
    data = ["--dataset", "isbi2012", "--data", root, "--split", "val", "--no-bf"]
    model = _eval_json(tmp_path, "model", "--checkpoint", ckpt, *data)
    masks = _eval_json(tmp_path, "masks", "--predictions", out, *data)
    for key in ("pixel_error", "rand_error", "rand_precision", "rand_recall", "mIoU"):
        assert masks[key] == model[key], key
    assert "rand_error_best" in model and "rand_error_best" not in masks  # needs the cell probability


@pytest.mark.parametrize(("damage", "words"), [
    ("missing", "has no mask for 2 of the 3 images"),
    ("size", "is 20x10 but its image img0 is 56x40"),
    ("class", "holds class id 7, but folder has 4 classes"),
    ("overlay", "RGB colour mask"),
])
def test_eval_predictions_names_a_bad_mask_folder(tmp_path, capsys, damage, words):
    rng = np.random.default_rng(6)
    root = tmp_path / "data"
    _folder_tree(root, rng, [(40, 56), (37, 61), (48, 48)])
    out = tmp_path / "pred"
    out.mkdir()
    for i, (h, w) in enumerate([(40, 56), (37, 61), (48, 48)]):
        Image.fromarray(_blocky(rng, h, w, 4, 5).astype(np.uint8), mode="L").save(out / f"img{i}.png")
    if damage == "missing":
        (out / "img1.png").unlink()
        (out / "img2.png").unlink()
    elif damage == "size":
        Image.fromarray(np.zeros((10, 20), np.uint8), mode="L").save(out / "img0.png")
    elif damage == "class":
        Image.fromarray(np.full((37, 61), 7, np.uint8), mode="L").save(out / "img1.png")
    else:
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(out / "img2.png")
    report = tmp_path / "r.json"
    assert main(["eval", "--predictions", str(out), "--dataset", "folder", "--data", str(root), "--split", "all",
                 "--json", str(report), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelwise: error: ") and words in err[0], err
    assert not report.exists()


@pytest.mark.parametrize("missing", [3, 4])
def test_eval_predictions_lists_up_to_three_missing_masks_and_marks_more(tmp_path, capsys, missing):
    """Three missing masks are all named; a fourth is ", ..." (not the other way round at three)."""
    root = tmp_path / "data"
    _folder_tree(root, np.random.default_rng(7), [(8, 8)] * 5)
    out = tmp_path / "pred"
    out.mkdir()
    for i in range(missing, 5):
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(out / f"img{i}.png")
    assert main(["eval", "--predictions", str(out), "--dataset", "folder", "--data", str(root), "--split", "all",
                 "--no-progress"]) == 2
    named = ", ".join(f"img{i}.png" for i in range(3)) + (", ..." if missing > 3 else "")
    assert f"has no mask for {missing} of the 5 images of folder/all ({named}); predict" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "words"), [
    (["--tta", "flip"], "--tta (how a model predicts) does not apply"),
    (["--checkpoint", "m.safetensors"], "--checkpoint (how a model predicts) does not apply"),
    (["--resize", "32"], "--resize"),
])
def test_eval_predictions_refuses_the_flags_of_a_model(tmp_path, capsys, extra, words):
    (tmp_path / "pred").mkdir()
    assert main(["eval", "--predictions", str(tmp_path / "pred"), "--dataset", "shapes", *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_eval_without_a_model_or_predictions_says_what_to_give(tmp_path, capsys):
    assert main(["eval", "--dataset", "shapes"]) == 2
    assert "--predictions DIR" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(tmp_path / "none"), "--dataset", "shapes"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_eval_predictions_finds_a_mask_named_by_its_images_file_stem(tmp_path):
    """Cityscapes names a sample without ``_leftImg8bit``, but predict names its mask by the file's
    stem: eval --predictions finds it by either name."""
    raw = np.array([[7, 8, 26, 7], [7, 8, 8, 26], [0, 7, 7, 8]], dtype=np.uint8)  # road, sidewalk, car, void
    name = "lindau_000000_000019"
    image = tmp_path / "data" / "leftImg8bit" / "val" / "lindau" / f"{name}_leftImg8bit.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(image)
    labels = tmp_path / "data" / "gtFine" / "val" / "lindau" / f"{name}_gtFine_labelIds.png"
    labels.parent.mkdir(parents=True)
    Image.fromarray(raw, mode="L").save(labels)
    pred = np.array([[0, 1, 13, 1], [0, 1, 1, 0], [5, 0, 0, 1]], dtype=np.uint8)
    out = tmp_path / "pred"
    out.mkdir()
    Image.fromarray(pred, mode="L").save(out / f"{name}_leftImg8bit.png")  # predict's name for it
    got = evaluate_predictions(out, "cityscapes", str(tmp_path / "data"), "val", bf=False, progress=False)
    truth = np.array([[0, 1, 13, 0], [0, 1, 1, 13], [255, 0, 0, 1]])
    want = np.zeros((19, 19), np.int64)
    for t, p in zip(truth.ravel(), pred.ravel()):
        if t != 255:
            want[t, p] += 1
    assert got["confusion_matrix"] == want.tolist() and got["per_image"][0]["name"] == name


def test_eval_predictions_provenance_names_the_data_and_the_images_its_reader_dropped(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    _folder_tree(root, rng, [(20, 24), (18, 22), (16, 16)])
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(root / "masks" / "img2.png")  # not its image's size
    out = tmp_path / "pred"
    out.mkdir()
    for i, (h, w) in enumerate([(20, 24), (18, 22)]):
        Image.fromarray(np.zeros((h, w), np.uint8), mode="L").save(out / f"img{i}.png")
    got = evaluate_predictions(out, "folder", str(root), "all", dataset_kwargs={"skip_invalid": True}, bf=False,
                               progress=False)
    data = got["provenance"]["dataset"]
    assert got["num_images"] == 2 and len(data["skipped"]) == 1 and "img2.png" in data["skipped"][0]
    assert {k: v for k, v in data.items() if k != "skipped"} == {
        "kind": "folder", "root": str(root.resolve()), "split": "all", "options": {"skip_invalid": True}}
    assert got["provenance"]["predictions"] == {"folder": str(out.resolve()), "records": [None]}
