"""The ``pixelwise`` command: one function per verb.

Every verb exits 0 on success, 2 with a one-line ``pixelwise: error: ...`` on bad input, and
130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

from pixelwise._version import __version__
from pixelwise.engine import config as train_config  # no torch: --help stays fast
from pixelwise.errors import UserError

DEFAULT_MC_SAMPLES = 8
TTA_CHOICES = ["flip", "d4"]  # pixelwise.inference.tta.TTA_MODES, named here so that --help needs no torch


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--max-minutes`` <-> ``max_minutes``), with the field's help,
    choices and default; booleans as ``--flag/--no-flag``. Every default is None here, so that
    only the flags given override the recipe; cmd_train converts and checks the values."""
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe: a file, or the name of a bundled recipe (see "
                   "`pixelwise recipes`); keys = long flag names with _ for - (plus stages:)")
    defaults = train_config.TrainConfig()
    for f in dataclasses.fields(defaults):
        if f.name in train_config.YAML_ONLY:
            continue
        meta, kind = f.metadata, train_config.field_kind(f.name)
        default = meta["default_text"] or _shown_default(getattr(defaults, f.name))
        choices = f"; one of: {', '.join(meta['choices'])}" if meta["choices"] and meta["metavar"] else ""
        help = f"{meta['help']}{choices} (default: {default})".replace("%", "%%")
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            continue
        metavar = meta["metavar"] or ("{" + ",".join(meta["choices"]) + "}" if meta["choices"] else
                                      {int: "N", float: "X", dict: "JSON", list: "LIST"}.get(kind, "TEXT"))
        p.add_argument(flag, metavar=metavar, help=help)


def _shown_default(value: object) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def cmd_train(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.engine.distributed import env_info
    from pixelwise.engine.trainer import fit

    recipe = train_config.find_recipe(args.config) if args.config else None
    file_values = train_config.load_yaml_config(recipe) if recipe else {}
    cli = {}
    for name in train_config.config_fields():
        value = getattr(args, name, None)
        cli[name] = train_config.flag_value(name, value) if isinstance(value, str) else value
    cfg = train_config.build_config(file_values, cli, recipe.stem if recipe else None)
    summary = fit(cfg)
    if not env_info().is_main:
        return 0
    best = summary["best"] or {}
    print(f"done in {summary['train_minutes']} min; best epoch {summary['best_epoch']}: "
          + " ".join(f"{k}={best[k]:.4f}" for k in ("mIoU", "pixel_acc", "mask_AP") if best.get(k) is not None))
    print(f"wrote {cfg.out}/best.safetensors, last.safetensors, metrics.csv, metrics.json")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    rows = [train_config.recipe_summary(path) for path in train_config.bundled_recipes()]
    header = {"name": "recipe", "model": "model", "dataset": "dataset", "description": "description"}
    widths = {k: max(len(str(r[k])) for r in [header, *rows]) for k in ("name", "model", "dataset")}
    for r in [header, *rows]:
        print("  ".join(str(r[k]).ljust(w) for k, w in widths.items()) + "  " + r["description"])
    print("(train one with `pixelwise train --config NAME --data PATH`; it writes to runs/NAME unless --out; "
          "docs/recipes.md has each recipe's paper and measured results)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    import torch

    from pixelwise.inference.bench import count_flops
    from pixelwise.models import create_model, list_models, model_info

    header = ("model", "task", "params", "GFLOPs@512", "paper")
    rows = []
    for name in list_models():
        info = model_info(name)
        build = functools.partial(create_model, name, num_classes=21 if info.task == "semantic" else 91)
        with torch.device("meta"):
            params = sum(p.numel() for p in build().parameters()) / 1e6
        flops = count_flops(build, (512, 512), info.task)
        rows.append((name, info.task, f"{params:.2f}M", "-" if flops is None else f"{flops / 1e9:.1f}", info.paper))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("(21 classes for semantic models, 91 for instance models; GFLOPs = 2 x multiply-adds of one "
          "forward pass on a 1x3x512x512 input, counted with torch.utils.flop_counter)")
    print("training recipes for these models: `pixelwise recipes`")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.checkpoint import load_checkpoint
    from pixelwise.inference.bench import benchmark
    from pixelwise.models import create_model, model_info

    if bool(args.model) == bool(args.checkpoint):
        raise UserError("give exactly one of --model NAME or --checkpoint FILE")
    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint)
        task = meta.get("task", "semantic")
    else:
        task = model_info(args.model).task
        model = create_model(args.model, num_classes=args.num_classes)
    size = train_config.parse_size(args.size)
    if size is None:
        raise UserError("--size needs HxW, e.g. 512x512")
    result = benchmark(model, size, batch=args.batch, mode=args.mode, device=args.device,
                       repeats=args.repeats, task=task)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.data import build_dataset
    from pixelwise.data.inspect import format_report, inspect_dataset

    ds = build_dataset(args.dataset, args.data, args.split,
                       **train_config.parse_json_dict(args.dataset_kwargs, "--dataset-kwargs"))
    report = inspect_dataset(ds, progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 1 if report["problems"] and args.strict else 0


def parse_resize(text: str | None) -> tuple[tuple[int, int] | None, bool]:
    """``--resize``: "HxW" (override the checkpoint's input size) or "native" (each image's own
    size) -> (resize, native_size); None keeps the checkpoint's."""
    if text is None:
        return None, False
    if text.lower() in ("native", "none", "off"):
        return None, True
    return train_config.parse_size(text), False


def predictor_options(args: argparse.Namespace) -> dict:
    """The prediction flags the user gave (None for the rest), for Predictor.from_checkpoint."""
    resize, native = parse_resize(args.resize)
    return {"resize": resize, "native_size": native, "tile": args.tile, "overlap": args.overlap,
            "tta": args.tta, "mc_samples": args.mc_samples}


def cmd_eval(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.inference.evaluate import evaluate_checkpoint

    options = {k: v for k, v in predictor_options(args).items() if v is not None}
    metrics = evaluate_checkpoint(args.checkpoint, args.dataset, args.data, args.split, device=args.device,
                                  dataset_kwargs=train_config.parse_json_dict(args.dataset_kwargs, "--dataset-kwargs"),
                                  progress=not args.no_progress, bf=not args.no_bf, **options)
    shown = {k: v for k, v in metrics.items() if k not in ("per_class", "input")}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    for row in metrics.get("per_class", []):
        cells = [f"{key} {'null' if row.get(key) is None else format(row[key], '.4f')}"
                 for key in ("iou", "acc", "bf") if key in row]
        print(f"  {row['name']:<16} " + "  ".join(cells))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.inference.mc_dropout import has_dropout
    from pixelwise.inference.predictor import Predictor, SemanticPredictor
    from pixelwise.inference.writers import predict_files

    options = {k: v for k, v in predictor_options(args).items() if v is not None}
    if args.score_thresh is not None:
        options["score_thresh"] = args.score_thresh
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device, **options)
    if args.uncertainty and not isinstance(predictor, SemanticPredictor):
        raise UserError("--uncertainty applies to semantic models only")
    if (isinstance(predictor, SemanticPredictor) and args.uncertainty and args.mc_samples is None
            and has_dropout(predictor.model)):
        predictor.mc_samples = DEFAULT_MC_SAMPLES  # a model with dropout: uncertainty from Monte-Carlo dropout
    written = predict_files(predictor, args.inputs, args.out, uncertainty=args.uncertainty,
                            progress=not args.no_progress)
    print(f"wrote {len(written)} prediction(s) to {args.out} (input: {predictor.input_spec.describe()})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    import os

    from pixelwise.inference.predictor import Predictor
    from pixelwise.serve.config import API_KEY_ENV, MB, ServeConfig

    try:  # optional dependency: fastapi, uvicorn and python-multipart (the serve extra)
        from pixelwise.serve.app import run
    except ModuleNotFoundError as e:
        raise UserError(f"pixelwise serve needs the serve extra ({e.name} is not installed): "
                        "pip install 'pixelwise[serve]'") from None

    config = ServeConfig(max_upload_bytes=int(args.max_upload_mb * MB), max_pixels=args.max_pixels,
                         workers=args.workers, queue=args.queue,
                         api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV),
                         cors_origins=tuple(args.cors or ()),
                         keep_uploads=Path(args.keep_uploads) if args.keep_uploads else None,
                         samples_dir=Path(args.samples) if args.samples else None,
                         uncertainty_samples=args.mc_samples or DEFAULT_MC_SAMPLES)
    options = {k: v for k, v in predictor_options(args).items() if v is not None}
    if args.score_thresh is not None:
        options["score_thresh"] = args.score_thresh
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device, **options)
    run(predictor, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.demo import run_demo

    report = run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    print(f"report: {report}")
    return 0


def _add_prediction_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by eval and predict: how the model sees each image."""
    p.add_argument("--resize", help="predict at HxW instead of the size recorded in the checkpoint (its input "
                   "contract), or 'native' for each image's own size; results come back at the image's size")
    p.add_argument("--tile", type=int, help="predict in overlapping tiles of this side (pixels, >= 16)")
    p.add_argument("--overlap", type=float, help="tile overlap as a fraction of the tile (default 0.25)")
    p.add_argument("--tta", nargs="?", const="flip", choices=TTA_CHOICES,
                   help="test-time augmentation: flip (default: the image and its mirror) or d4 (the 8 rotations "
                        "and flips)")
    p.add_argument("--mc-samples", type=int, help="average this many Monte-Carlo dropout samples (models with "
                   "dropout, e.g. bayesian_segnet; the paper used 50)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelwise", description="Semantic and instance segmentation in PyTorch.")
    parser.add_argument("--version", action="version", version=f"pixelwise {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("models", help="list models with task, parameters and paper")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="end-to-end run on synthetic scenes: train, evaluate, predict, report")
    p.add_argument("--out", default="pixelwise-demo", help="output folder (default: pixelwise-demo)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="list the bundled training recipes (pixelwise train --config NAME)")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data")
    p.add_argument("--split", default="val")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    _add_prediction_args(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dataset-kwargs", help="JSON object of dataset options")
    p.add_argument("--no-bf", action="store_true", help="skip the boundary F1 score (the slowest metric)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment image files")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", required=True)
    _add_prediction_args(p)
    p.add_argument("--uncertainty", action="store_true",
                   help="also write DIR/<stem>_uncertainty.png (predictive entropy; with Monte-Carlo dropout, "
                        f"{DEFAULT_MC_SAMPLES} samples unless --mc-samples, for models with dropout)")
    p.add_argument("--score-thresh", type=float, help="instance models: keep detections with this score or more "
                   "(default 0.5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="web page and HTTP API for a checkpoint (needs the serve extra)",
                       description="Serve a checkpoint: a page at / (upload, overlay, legend, scores against a "
                       "ground truth), POST /api/predict, GET /api/info, GET /api/health, the API reference at /docs.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 listens on every interface and prints a warning)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    _add_prediction_args(p)
    p.add_argument("--score-thresh", type=float, help="instance models: keep detections with this score or more "
                   "(default 0.5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workers", type=int, default=1, help="predictions running at once (default 1; torch uses "
                   "every core for each)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a worker; beyond that the "
                   "server answers 503 with Retry-After (default 64)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default 20; "
                   "larger: 413)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels, checked in its "
                   "header before decoding (default 40000000; larger: 413)")
    p.add_argument("--api-key", help="require this key on every /api/ route (X-API-Key or Authorization: Bearer; "
                   "default: the PIXELWISE_API_KEY environment variable, which keeps it out of the process list)")
    p.add_argument("--cors", action="append", metavar="ORIGIN", help="allow pages from ORIGIN (e.g. "
                   "https://example.org) to call the API; repeatable (default: no CORS)")
    p.add_argument("--keep-uploads", metavar="DIR", help="save every upload, as received, in DIR (default: "
                   "uploads stay in memory and are never written to disk)")
    p.add_argument("--samples", metavar="DIR", help="offer the images in DIR (and DIR/masks/<stem>.png ground "
                   "truths) as samples on the page instead of the bundled synthetic scenes")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="inference speed, FLOP utilisation and peak memory")
    p.add_argument("--model")
    p.add_argument("--checkpoint")
    p.add_argument("--num-classes", type=int, default=21, help="with --model (default 21)")
    p.add_argument("--size", required=True, help="input HxW")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", choices=["eager", "fast", "onnx"], default="eager")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    q = data_sub.add_parser("inspect", help="counts, sizes, class frequencies, median-frequency weights, problems")
    q.add_argument("--dataset", required=True)
    q.add_argument("--data")
    q.add_argument("--split", default="train")
    q.add_argument("--json", help="also write the report to this JSON file")
    q.add_argument("--dataset-kwargs", help="JSON object of dataset options")
    q.add_argument("--strict", action="store_true", help="exit 1 when problems are found")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_data_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"pixelwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pixelwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
