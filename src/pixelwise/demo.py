"""``pixelwise demo``: the built-in end-to-end run on synthetic scenes, no downloads.

Generates the ``shapes`` dataset, trains a U-Net on the CPU, evaluates the best checkpoint on
held-out test scenes (never used for training or model selection), writes predicted masks and
overlays, a training curve and an HTML report.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image

from pixelwise.checkpoint import atomic_write, atomic_write_json, atomic_write_text
from pixelwise.data.io import write_mask
from pixelwise.data.palette import clear_class, colorize, overlay
from pixelwise.data.shapes import ShapesDataset
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.trainer import RUN_FILES, check_out, fit
from pixelwise.inference.evaluate import evaluate_checkpoint
from pixelwise.inference.predictor import SemanticPredictor
from pixelwise.report import render_report, svg_line_chart

# The recipe: a quarter-width U-Net with BatchNorm, Adam (lr 3e-3, batch 8) with a poly schedule,
# class weights against the background's 84% share, 64 x 64 scenes of up to 5 objects. The full
# run is bounded by time (4.4 minutes of training, about 2400 steps on 2 idle cores; the schedule
# anneals with the elapsed fraction of the budget), so the whole demo ends within 5 minutes.
# The quick run (tests) is bounded by steps, so its result does not depend on the machine's
# load: 4 epochs of 100 steps.
FULL: dict[str, Any] = {"epochs": 30, "max_minutes": 4.4, "dataset_kwargs": {"num_train": 1600, "num_val": 100,
                                                              "num_test": 200, "size": 64, "max_objects": 5}}
QUICK: dict[str, Any] = {"epochs": 4, "max_minutes": None, "dataset_kwargs": {"num_train": 800, "num_val": 40,
                                                               "num_test": 40, "size": 64, "max_objects": 5}}
CLASS_WEIGHTS = [0.3, 1.0, 1.5, 2.5]  # background, circle, rectangle, triangle
MODEL_KWARGS = {"base_channels": 16, "batch_norm": True, "dropout": 0.0}
NUM_EXAMPLES = 6


# what the demo writes in its --out: a training run's files and its own
DEMO_FILES = (*RUN_FILES, "demo_class_weights.json", "report.html", "training_curve.svg", "predictions")


def demo_config(out: Path, quick: bool, progress: bool | None, overwrite: bool = False,
                resume: bool = False) -> TrainConfig:
    """The demo's training config (its class weights file is written by :func:`run_demo`)."""
    recipe = QUICK if quick else FULL
    weights_file = out / "demo_class_weights.json"
    return TrainConfig(model="unet", dataset="shapes", out=str(out), epochs=recipe["epochs"],
                       class_weights=str(weights_file), max_minutes=recipe["max_minutes"], batch_size=8,
                       lr=3e-3, optimizer="adam",
                       schedule="poly", seed=0, model_kwargs=dict(MODEL_KWARGS),
                       augment={"flip": True, "jitter": False, "scale": None},
                       dataset_kwargs=dict(recipe["dataset_kwargs"]), progress=progress, overwrite=overwrite,
                       resume=resume)


def run_demo(out: str | Path, quick: bool = False, progress: bool | None = None, log=print,
             overwrite: bool = False, resume: bool = False) -> Path:
    """The whole demo into ``out``; an ``out`` that holds an earlier run is refused unless
    ``overwrite`` (start afresh) or ``resume`` (continue an interrupted demo's training, with the
    same ``quick``, then evaluate and report). -> the report's path."""
    out = Path(out)
    t0 = time.monotonic()
    cfg = demo_config(out, quick, progress, overwrite, resume)
    check_out(cfg, writes=DEMO_FILES)  # before the first file is written
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo_class_weights.json", json.dumps(CLASS_WEIGHTS))
    budget = f" / {cfg.max_minutes} min" if cfg.max_minutes else ""
    log(f"[1/4] training U-Net on synthetic scenes ({cfg.dataset_kwargs['num_train']} train, "
        f"{cfg.dataset_kwargs['num_val']} val), at most {cfg.epochs} epochs{budget}")
    summary = fit(cfg, log=log, resume_command=f"pixelwise demo{' --quick' if quick else ''} --resume")

    log("[2/4] evaluating best.safetensors on held-out test scenes")
    best = out / "best.safetensors"
    metrics = evaluate_checkpoint(str(best), "shapes", None, "test", dataset_kwargs=cfg.dataset_kwargs,
                                  progress=progress)
    metrics["training"] = summary
    atomic_write_json(out / "metrics.json", metrics)  # over the trainer's: a cut write would lose both

    log("[3/4] writing predictions and overlays")
    examples = write_examples(best, out / "predictions", cfg.dataset_kwargs)

    log("[4/4] writing the report")
    rows = summary_rows(out)
    curve = svg_line_chart({"train loss": [(r["epoch"], r["train_loss"]) for r in rows],
                            "val loss": [(r["epoch"], r["val_loss"]) for r in rows],
                            "val mIoU": [(r["epoch"], r.get("mIoU")) for r in rows]}, "Training curve")
    atomic_write_text(out / "training_curve.svg", curve)
    minutes = (time.monotonic() - t0) / 60
    notes = [f"U-Net ({MODEL_KWARGS}) trained for {summary['epochs_completed']} epochs "
             f"({summary['train_minutes']} min) on the CPU; best epoch {summary['best_epoch']} by validation mIoU; "
             f"metrics on {metrics['num_images']} held-out test scenes. Whole demo: {minutes:.1f} min."]
    atomic_write_text(out / "report.html", render_report("pixelwise demo: U-Net on synthetic scenes", metrics, curve,
                                                         examples, notes))
    log(f"held-out test: mIoU={metrics['mIoU']:.4f} pixel_acc={metrics['pixel_acc']:.4f} "
        f"({minutes:.1f} min in all)")
    return out / "report.html"


def summary_rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]


def write_examples(checkpoint: Path, folder: Path, dataset_kwargs: dict) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    predictor = SemanticPredictor.from_checkpoint(checkpoint)
    ds = ShapesDataset(split="test", **dataset_kwargs)
    examples = []
    for i in range(min(NUM_EXAMPLES, len(ds))):
        s = ds.load(i)
        pred = predictor.predict(s.image)
        shown = overlay(s.image, pred.mask, ds.palette, clear=clear_class(ds.class_names))
        for name, pixels in ((f"{s.name}_image.png", s.image), (f"{s.name}_truth.png", colorize(s.mask, ds.palette)),
                             (f"{s.name}_overlay.png", shown)):
            atomic_write(folder / name, lambda tmp, pixels=pixels: Image.fromarray(pixels).save(tmp, format="PNG"))
        atomic_write(folder / f"{s.name}.png", lambda tmp, mask=pred.mask: write_mask(tmp, mask, ds.palette))
        rel = f"predictions/{s.name}"
        examples.append({"name": s.name, "image": f"{rel}_image.png", "truth": f"{rel}_truth.png",
                         "pred": f"{rel}.png", "overlay": f"{rel}_overlay.png"})
    return examples
