"""The ``pixelwise`` command: one function per verb.

Exit status (README, "Guarantees"): 0 success; 2 bad input, reported as one line
``pixelwise: error: <what, which file or flag, the fix>`` on stderr (argparse's usage errors
included); 3 ``predict --skip-invalid`` finished but skipped inputs (listed on stderr); 130
Ctrl-C (SIGINT) and 143 SIGTERM, both after a training run has saved its current step; 1
``data inspect --strict`` found problems, otherwise a bug (a traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import signal
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from pixelwise._version import __version__
from pixelwise.engine import config as train_config  # no torch: --help stays fast
from pixelwise.errors import UserError, dangling_link, empty_path, expanded_home, shown

DEFAULT_MC_SAMPLES = 8
CALIB_IMAGES, CALIB_CROP = 64, 256  # --calib-images, --calib-crop defaults (int8 calibration)
EXIT_SKIPPED = 3  # predict --skip-invalid: done, but some inputs were skipped
TTA_CHOICES = ["flip", "d4", "ms"]  # pixelwise.inference.tta.TTA_MODES, named here so that --help needs no torch


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
    from pixelwise.engine.trainer import existing_run, fit

    recipe = train_config.find_recipe(args.config) if args.config else None
    run_dir = Path(args.out or train_config.default_out(args.model or train_config.TrainConfig().model)).expanduser()
    source = recipe
    if recipe is None and args.resume and (run_dir / "config.yaml").is_file():
        source = run_dir / "config.yaml"  # the run's own settings; older runs recorded resume and overwrite,
        file_values = train_config.load_yaml_config(source, run_record=True)  # which this command's flags decide
    else:
        file_values = train_config.load_yaml_config(recipe) if recipe else {}
    cli = train_config.flag_values(vars(args))
    cfg = train_config.build_config(file_values, cli, recipe.stem if recipe else None, source=source)
    deleted = existing_run(Path(cfg.out or train_config.default_out(cfg.model))) if cfg.overwrite else []
    if recipe and recipe.resolve() in {p.resolve() for p in deleted}:
        raise UserError(f"--overwrite would delete {recipe}, which is the --config this run reads; copy the recipe "
                        "out of --out, or give another --out")
    if source is not None:
        _check_stage_transforms(cfg, source)
    try:
        summary = fit(cfg)
    except UserError as e:  # the model's and the reader's checks name the flag; the values may be the file's
        raise _named_by_source(e, cfg, cli, source) from e
    if not env_info().is_main:
        return 0
    best, by = summary["best"] or {}, summary.get("selected_by")
    keys = dict.fromkeys([by, "mIoU", "pixel_acc", "mask_AP"])  # what picked it first, then the usual
    print(f"done in {summary['train_minutes']} min; best epoch {summary['best_epoch']} (by {by}): "
          + " ".join(f"{k}={best[k]:.4f}" for k in keys if isinstance(best.get(k), int | float)))
    if summary.get("epochs_trained", 1):
        names = [n for n in ("best.safetensors", "last.safetensors", "metrics.csv", "metrics.json")
                 if (Path(str(cfg.out)) / n).is_file()]  # a run without a validated epoch has no best
        print(f"wrote {cfg.out}/{', '.join(names)}")
    return 0


def _check_stage_transforms(cfg: train_config.TrainConfig, source: Path) -> None:
    """Build each stage's training transform (as the trainer will) so that a bad crop or augment
    value of a stage is named by its stage and file; the trainer's own check names neither."""
    from pixelwise.engine.trainer import train_transform  # start-up time: torch only where a stage is checked

    for i, (name, stage_cfg) in enumerate(cfg.stage_configs() if cfg.stages else []):
        stage = cfg.stages[i]
        if not {"augment", "crop", "instance_crops", "instance_context"} & set(stage):
            continue  # it trains with the run's own augmentation, checked by the trainer
        try:
            train_transform(stage_cfg)
        except UserError as e:
            raise UserError(f"{source}: stage {i + 1} ({name}): {e}") from e


def _named_by_source(error: UserError, cfg: train_config.TrainConfig, cli: dict, source: Path | None) -> UserError:
    """A ``--model-kwargs: ...`` / ``--dataset-kwargs: ...`` error about options that came from
    the --config file (or the run's config.yaml) names the file and key instead of a flag the
    user did not give; other errors are returned as they are."""
    text = str(error)
    for key in ("model_kwargs", "dataset_kwargs"):
        flag = f"--{key.replace('_', '-')}"
        given = cli.get(key) or {}
        from_file = set(getattr(cfg, key)) - set(given)
        if source is None or not from_file or not text.startswith(f"{flag}: "):
            continue
        label = f"{key} (of {source}, with {flag})" if given else f"{source}: {key}"
        return UserError(f"{label}: {text.removeprefix(f'{flag}: ')}")
    return error


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
    import torch

    from pixelwise.checkpoint import input_spec_from_meta, load_checkpoint
    from pixelwise.data.io import DEFAULT_MAX_PIXELS
    from pixelwise.inference.bench import benchmark, count_flops
    from pixelwise.inference.onnx_runner import read_onnx_metadata
    from pixelwise.models import create_model, list_models, model_info

    if sum(bool(a) for a in (args.model, args.checkpoint, args.onnx)) != 1:
        raise UserError("give exactly one of --model NAME, --checkpoint FILE or --onnx FILE")
    check_num_classes(args, "a --checkpoint or --onnx file")
    # bounded above too: a typed 1e9 ran for days without a word, and past 2**63 torch raised a traceback
    for flag, value, most in (("--batch", args.batch, 4096), ("--repeats", args.repeats, 10_000),
                              ("--threads", args.threads, 1024)):
        if value is not None and not 1 <= value <= most:
            raise UserError(f"{flag} must be from 1 to {most:,}, got {value}")
    if args.compile and args.mode != "fast":
        raise UserError("--compile goes with --mode fast (semantic models)")
    size = train_config.parse_size(args.size, "--size", limit=None)  # checked below, against --max-pixels
    if size is None:
        raise UserError("--size needs HxW, e.g. 512x512")
    if size[0] * size[1] > DEFAULT_MAX_PIXELS:
        raise UserError(f"--size {args.size}: {size[0] * size[1]:,} pixels per image is above the limit of "
                        f"{DEFAULT_MAX_PIXELS:,} pixels that pixelwise reads in one image; give a smaller size")
    check_output_file(args.json, "--json", [args.checkpoint, args.onnx], args.overwrite)
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, flops, mode, name = None, None, args.mode, args.model or ""
    if args.onnx:
        if mode not in (None, "onnx"):
            raise UserError(f"--onnx runs in onnxruntime: --mode {mode} does not apply")
        mode, meta = "onnx", read_onnx_metadata(args.onnx)
        task, name = "semantic", meta.get("model", "")
        channels = input_spec_from_meta(meta).channels  # the graph's input (export records the contract)
        # FLOPs of the architecture, counted on the meta device from the stored metadata: only where it
        # names a registered model and its options (a bare export_onnx of a Python model names its class,
        # and its options are unknown: the defaults' FLOPs were reported, 246x too many for a small U-Net)
        if name in list_models() and isinstance(meta.get("model_kwargs"), dict):
            flops = count_flops(lambda: create_model(name, num_classes=meta.get("num_classes", 21),
                                                     **meta.get("model_kwargs", {})), size, channels=channels)
    elif args.checkpoint:
        if looks_like_onnx(args.checkpoint):
            raise UserError(f"{args.checkpoint} is an ONNX file; give it as --onnx {args.checkpoint}")
        model, meta = load_checkpoint(args.checkpoint)
        task, name = meta.get("task", "semantic"), meta.get("model", "")
        channels = input_spec_from_meta(meta, model).channels
    else:
        task = model_info(args.model).task
        if args.compile and task != "semantic":
            raise UserError("--compile goes with --mode fast (semantic models)")
        model = create_model(args.model, num_classes=args.num_classes or 21)
        channels = 3
    result = benchmark(model, size, batch=args.batch, mode=mode or "eager", device=device,
                       repeats=args.repeats, task=task, flops=flops, model_name=name, onnx=args.onnx,
                       threads=args.threads, train=args.train, compile=args.compile, channels=channels)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                   if v is not None))
    if args.json:
        write_json(args.json, result, args.overwrite)
        print(f"wrote {args.json}")
    return 0


def _writable_out(path: str, overwrite: bool, checkpoint: str | None) -> Path:
    """``--out FILE`` checked before any work as :func:`check_output_file` checks ``--json``, and
    an existing file replaced only with ``--overwrite``. Its folder is made when the file is
    written (``checkpoint.atomic_write``), so a refused export leaves none behind."""
    check_output_file(path, "--out", [checkpoint], overwrite)
    return Path(path)


def cmd_export(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.checkpoint import load_checkpoint
    from pixelwise.inference.export import (
        DEFAULT_OPSET,
        MIN_AGREEMENT,
        check_maskrcnn_outputs,
        check_opset,
        export_maskrcnn_parts,
        export_onnx,
    )
    from pixelwise.inference.onnx_runner import require_export_extra
    from pixelwise.models import model_info
    from pixelwise.models.maskrcnn import MaskRCNN

    fmt = export_format(args.format, args.out)
    if bool(args.model) == bool(args.checkpoint):
        raise UserError("give exactly one of --checkpoint FILE or --model NAME")
    if args.checkpoint and Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise UserError(f"--out {args.out} is the --checkpoint {args.checkpoint} (the same file, by a link or another "
                        "name); give another file name")
    if args.checkpoint and looks_like_onnx(args.checkpoint):
        raise UserError(f"{args.checkpoint} is an ONNX file (already exported); export takes a .safetensors "
                        "checkpoint")
    check_num_classes(args, "a --checkpoint")
    if args.min_agreement is not None and not 0 < args.min_agreement <= 1:  # nan too
        raise UserError(f"--min-agreement must be a fraction in (0, 1], got {args.min_agreement}")
    if fmt == "pt2":
        return _export_pt2(args)
    if args.fp16 and args.int8:
        raise UserError("choose one of --fp16 and --int8")
    if not args.int8:
        check_no_calibration(args, "--int8")
    args.opset = DEFAULT_OPSET if args.opset is None else args.opset
    check_opset(args.opset, "int8" if args.int8 else "float16" if args.fp16 else "float32")
    require_export_extra()  # before the checkpoint is read
    out = _writable_out(args.out, args.overwrite, args.checkpoint)
    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint)
        task = meta.get("task", "semantic")
    else:
        model, meta, task = None, {}, model_info(args.model).task
    if task != "semantic":  # a Mask R-CNN: checked before any work, as a semantic export is below
        for flag, given in (("--fp16", args.fp16), ("--int8", args.int8)):
            if given:
                raise UserError(f"{flag} applies to semantic models only")
        check_maskrcnn_outputs(out, args.overwrite, [args.checkpoint])
    if model is None:
        model, meta = _random_weights(args, task)
    if task != "semantic":
        if not isinstance(model, MaskRCNN):
            raise UserError(f"no ONNX export for the {task} model {meta.get('model')}")
        min_agreement = MIN_AGREEMENT if args.min_agreement is None else args.min_agreement
        written = export_maskrcnn_parts(model, out, meta, opset=args.opset, min_agreement=min_agreement,
                                        replace=args.overwrite)
        for report in written:
            print(report.summary())
        print("not exported (runs in PyTorch): anchors, proposal decoding + NMS, RoI Align, detection "
              "post-processing and mask pasting; see docs/deploy.md")
        return 0
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.checkpoint import input_spec_from_meta
    from pixelwise.inference.int8 import INT8_MIN_AGREEMENT, calibration_batches

    calibration = None
    if args.int8:
        calibration = calibration_batches(calibration_images(args, "--int8"), input_spec_from_meta(meta, model),
                                          crop=calibration_sizes(args)[1])
    min_agreement = args.min_agreement
    if min_agreement is None:
        min_agreement = INT8_MIN_AGREEMENT if args.int8 else MIN_AGREEMENT
    report = export_onnx(model, out, meta, model_name=meta.get("model", ""), opset=args.opset, fp16=args.fp16,
                         calibration=calibration, min_agreement=min_agreement, replace=args.overwrite)
    print(report.summary())
    return 0


EXPORT_FORMATS = {".onnx": "onnx", ".pt2": "pt2"}


def export_format(given: str | None, out: str) -> str:
    """``--format`` (onnx, pt2), or without it the format ``--out``'s suffix names; the two must agree."""
    suffix = Path(out).suffix.lower()
    if given is not None and given not in EXPORT_FORMATS.values():
        raise UserError(f"--format {given!r} is not supported: give onnx or pt2 (a torch.export archive)")
    named = EXPORT_FORMATS.get(suffix)
    if given is None and named is None:
        raise UserError(f"--out {out}: name an .onnx or a .pt2 file (or give --format onnx|pt2 and that suffix)")
    if named != (given or named):
        raise UserError(f"--out {out}: a --format {given} file's name ends with .{given}")
    return given or str(named)


def _export_pt2(args: argparse.Namespace) -> int:
    """``export --format pt2``: a torch.export archive (:func:`pixelwise.inference.export_pt2.export_pt2`)."""
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.checkpoint import load_checkpoint
    from pixelwise.inference.export import MIN_AGREEMENT
    from pixelwise.inference.export_pt2 import export_pt2, no_instance_export
    from pixelwise.models import model_info

    onnx_only = [flag for flag, given in (("--opset", args.opset is not None), ("--fp16", args.fp16),
                                          ("--int8", args.int8)) if given] + calibration_flags(args)
    if onnx_only:
        raise UserError(f"{'/'.join(onnx_only)} appl{'ies' if len(onnx_only) == 1 else 'y'} to --format onnx; a .pt2 "
                        "is float32 (drop it, or export to .onnx)")
    if args.model and model_info(args.model).task != "semantic":  # before any work; a checkpoint's: once read
        raise no_instance_export(args.model)
    out = _writable_out(args.out, args.overwrite, args.checkpoint)
    model, meta = load_checkpoint(args.checkpoint) if args.checkpoint else _random_weights(args, "semantic")
    min_agreement = MIN_AGREEMENT if args.min_agreement is None else args.min_agreement
    report = export_pt2(model, out, meta, model_name=meta.get("model", ""), min_agreement=min_agreement,
                        replace=args.overwrite)
    print(report.summary())
    return 0


def _random_weights(args: argparse.Namespace, task: str) -> tuple[typing.Any, dict]:
    """``export --model M``: the model with random weights, and the metadata an export records of it."""
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.models import create_model

    num_classes = args.num_classes or (21 if task == "semantic" else 91)
    print(f"pixelwise: note: --model {args.model} exports randomly initialised weights (give --checkpoint "
          "for a trained model)", file=sys.stderr)
    return create_model(args.model, num_classes=num_classes), {"model": args.model, "num_classes": num_classes,
                                                                "task": task}


def check_num_classes(args: argparse.Namespace, files: str) -> None:
    """``--num-classes`` (bench, export): only with ``--model`` (``files``, what else a model comes
    from, have their own classes), and at least 1."""
    if args.num_classes is None:
        return
    if not args.model:
        raise UserError(f"--num-classes goes with --model (random weights); {files} has its own classes")
    if args.num_classes < 1:
        raise UserError(f"--num-classes must be at least 1, got {args.num_classes}")


# the tags that may follow ModelProto's ir_version (fields are written in number order): producer_name,
# producer_version, domain (strings), model_version (a varint), doc_string, graph, opset_import
ONNX_SECOND_FIELDS = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)


def looks_like_onnx(path: str) -> bool:
    """Whether ``path`` is an ONNX file rather than a checkpoint (known by its contents, whatever
    its name): its first bytes are no safetensors header (a length that fits the file, then
    ``{``), and its name ends with .onnx or it starts as an ONNX protobuf does (field 1,
    ``ir_version``, a small number, then the tag of another field of ModelProto)."""
    # start-up time: torch is loaded only by the verbs that use it
    from pixelwise.checkpoint import is_safetensors

    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False  # loading it gives the reason
    if is_safetensors(head, size):
        return False
    onnx = len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 64 and head[2] in ONNX_SECOND_FIELDS
    return onnx or path.lower().endswith(".onnx")


def calibration_images(args: argparse.Namespace, what: str) -> list:
    """``--calib-images`` training images (uint8[H, W, 3]) of ``--calib-dataset``, picked at random
    (seed 0), to calibrate ``what`` (``--int8`` or ``--mode int8``)."""
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    import numpy as np

    from pixelwise.data import build_dataset

    if not args.calib_dataset:
        raise UserError(f"{what} needs --calib-dataset KIND (and --calib-data PATH): training images to calibrate "
                        "activation ranges on")
    count, crop = calibration_sizes(args)
    if count < 1 or crop < 16:
        raise UserError(f"--calib-images must be >= 1 and --calib-crop >= 16, got {count} and {crop}")
    ds = build_dataset(args.calib_dataset, args.calib_data, "train")
    if len(ds) == 0:
        raise UserError(f"--calib-dataset {args.calib_dataset}: no training images found in {args.calib_data}")
    rng = np.random.default_rng(0)
    picks = rng.permutation(len(ds))[:count]
    return [ds.load(int(i)).image for i in picks]


def calibration_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """(``--calib-images``, ``--calib-crop``), their defaults where not given."""
    return (CALIB_IMAGES if args.calib_images is None else args.calib_images,
            CALIB_CROP if args.calib_crop is None else args.calib_crop)


def calibration_flags(args: argparse.Namespace) -> list[str]:
    """The --calib-* flags given."""
    return [flag for flag, value in (("--calib-dataset", args.calib_dataset), ("--calib-data", args.calib_data),
                                     ("--calib-images", args.calib_images), ("--calib-crop", args.calib_crop))
            if value is not None]


def check_no_calibration(args: argparse.Namespace, what: str) -> None:
    """The --calib-* flags calibrate ``what`` (``--int8``, ``--mode int8``); without it they are an error,
    not ignored."""
    given = calibration_flags(args)
    if given:
        raise UserError(f"{'/'.join(given)} calibrate{'s' if len(given) == 1 else ''} {what}; add {what}")


def cmd_data_inspect(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.data import build_dataset
    from pixelwise.data.inspect import format_report, inspect_dataset

    dataset_kwargs = train_config.parse_json_dict(args.dataset_kwargs, "--dataset-kwargs")
    check_output_file(args.json, "--json", [args.data, *option_files(args.data, args.split, dataset_kwargs)],
                      args.overwrite)
    set_max_pixels(args.max_pixels)
    ds = build_dataset(args.dataset, args.data, args.split, **dataset_kwargs)
    report = inspect_dataset(ds, progress=args.progress)
    print(format_report(report))
    if args.json:
        write_json(args.json, report, args.overwrite)
        print(f"wrote {args.json}")
    return 1 if report["problems"] and args.strict else 0


def option_files(data: str | None, split: str, dataset_kwargs: dict) -> list[str]:
    """The files that ``--dataset-kwargs`` names and that exist (a COCO-format set's ``ann_file``,
    ``{split}`` filled in), each as a reader finds it: under ``data`` or as given. They are inputs
    too, though not inside an input folder: one directly in ``data`` is where a report may go."""
    found = []
    for value in dataset_kwargs.values():
        if isinstance(value, str) and value:
            named = Path(value.replace("{split}", split)).expanduser()
            found += [str(p) for p in ((Path(data).expanduser() / named) if data else None, named)
                      if p is not None and p.is_file()]
    return found


def check_output_file(path: str | None, flag: str, inputs: list[str | None], overwrite: bool = False) -> None:
    """Before any work, a file a verb is asked to write (``--json``, export's ``--out``): it must
    not be a folder, and must be writable (its folder exists or can be created, and may be written
    in), so that a long evaluation is not lost at its end; it must not be one of the verb's inputs
    nor lie inside an input folder (a dataset, which a new file there would change), and an
    existing file is replaced only with ``--overwrite``: no verb writes over what it reads, nor
    over a file of the user's without being told."""
    if not path:
        return
    # start-up time: runtime loads torch, which the verbs that call this load anyway
    from pixelwise.runtime import check_can_create

    given = Path(path).expanduser()
    link = dangling_link(given)
    if link and not overwrite:
        # the resolved target does not exist, so the check passed and the final rename refused the
        # link only after all the work, as a file that "appeared while this command ran"
        raise UserError(f"{flag} {path} is a {link}; remove the link, give another file name, or pass "
                        "--overwrite to replace the link")
    out = given.resolve()
    if out.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the name of a file to write")
    if out.exists() and not out.is_file():  # /dev/stdout, a named pipe: the rename would replace it by a file
        raise UserError(f"{flag} {path} is not a regular file (a pipe or device, such as /dev/stdout); give the "
                        "name of a file to write")
    check_can_create(out.parent, f"{flag} {path}")  # write_json creates the missing folders
    for item in inputs:
        if not item:
            continue
        source = Path(item).expanduser().resolve()
        # the same file by another name too: another case of its name on a case-insensitive file system
        # (macOS, Windows), a bind mount
        if out == source or (out.is_file() and source.is_file() and os.path.samefile(out, source)):
            raise UserError(f"{flag} {path} would write over the input {item}; give another file name")
        # a dataset's readers read its subfolders, files of image suffixes and classes.json, never
        # another .json beside them: that is the one place inside the data a report may go
        beside = out.parent == source and out.suffix.lower() == ".json" and out.name.lower() != "classes.json"
        if source.is_dir() and out.is_relative_to(source) and not beside:
            raise UserError(f"{flag} {path} is inside the input folder {item}, where a new file could become part "
                            f"of the data; write it elsewhere (or as a .json file directly in {item})")
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; pass --overwrite to replace it, or give another file name")


def write_json(path: str, value: object, overwrite: bool = False) -> None:
    """``value`` as JSON at ``path`` (folders created), atomically, NaN and infinity as null; a file
    another process wrote at ``path`` since the check is replaced only with ``overwrite``."""
    # start-up time: only the verbs that write --json load the checkpoint layer (and torch)
    from pixelwise.checkpoint import atomic_write_json

    atomic_write_json(path, value, replace=overwrite)


def check_device(name: str) -> str:
    """``--device``: one that exists here (a one-line error otherwise)."""
    # start-up time: torch is loaded only by the verbs that use it
    from pixelwise.runtime import check_device as check

    return str(check(name))


def set_max_pixels(limit: int | None) -> None:
    """``--max-pixels``: the decompression-bomb limit of image reading (None: the default)."""
    # start-up time: PIL is loaded only by the verbs that read images
    from pixelwise.data.io import set_max_image_pixels

    set_max_image_pixels(limit)


def parse_resize(text: str | None, max_pixels: int | None = None) -> tuple[tuple[int, int] | None, bool]:
    """``--resize``: "HxW" (override the checkpoint's input size, at most ``max_pixels``, default
    the image readers' limit) or "native" (each image's own size) -> (resize, native_size); None
    keeps the checkpoint's."""
    from pixelwise.data.io import DEFAULT_MAX_PIXELS  # start-up time: only the verbs that predict load it

    if text is None:
        return None, False
    if text.lower() in ("native", "none", "off"):
        return None, True
    if not text.strip():
        raise UserError("--resize is empty; give HxW (e.g. 512x512) or native")
    size = train_config.parse_size(text, "--resize", limit=None)  # checked just below, against --max-pixels
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if size is not None and size[0] * size[1] > limit:
        raise UserError(f"--resize {text}: {size[0] * size[1]:,} pixels per model input is above the limit of "
                        f"{limit:,} (--max-pixels); give a smaller size, or --tile to predict large images in parts")
    return size, False


def model_files(args: argparse.Namespace) -> list[str]:
    """``--checkpoint CKPT`` (repeated: an ensemble) or ``--onnx FILE`` (one of the two) of eval and predict."""
    if bool(args.checkpoint) == bool(args.onnx):
        raise UserError("give exactly one of --checkpoint FILE or --onnx FILE (--checkpoint may repeat: an ensemble)")
    if args.onnx and not args.onnx.lower().endswith(".onnx"):
        raise UserError(f"--onnx {args.onnx}: an ONNX file name ends with .onnx")
    return [args.onnx] if args.onnx else list(args.checkpoint)


def checkpoint_header(path: str) -> dict:
    """A checkpoint's metadata read from its header alone ({} when it cannot be read: loading it
    later gives the reason)."""
    # start-up time: safetensors is loaded only by the verbs that read checkpoints
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("pixelwise", "{}"))
    except (OSError, SafetensorError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def predictor_options(args: argparse.Namespace) -> dict:
    """The prediction flags the user gave (None for the rest), for Predictor.from_checkpoint;
    with ``--mode int8`` its calibration images, loaded here."""
    resize, native = parse_resize(args.resize, getattr(args, "max_pixels", None))
    if args.overlap is not None and args.tile is None:  # it would be recorded as if it had acted
        raise UserError(f"--overlap {args.overlap} goes with --tile N (how much tiles overlap); give --tile, or "
                        "leave --overlap out")
    options = {"resize": resize, "native_size": native, "tile": args.tile, "overlap": args.overlap,
               "tta": args.tta, "mc_samples": args.mc_samples, "batch_size": args.batch_size, "mode": args.mode}
    if args.crf is not None:
        # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
        from pixelwise.inference.crf import CRFSettings

        options["crf"] = CRFSettings.parse(args.crf)
    if args.mode == "int8":  # refused for what the model is, before calibration data is asked for (and read)
        # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
        from pixelwise.inference.onnx_runner import is_onnx

        # predict and eval repeat --checkpoint (a list), serve takes one (a string)
        paths = [args.checkpoint] if isinstance(args.checkpoint, str) else list(args.checkpoint or ())
        onnx = next((p for p in (getattr(args, "onnx", None), *paths) if p and is_onnx(p)), None)  # as from_checkpoint
        if onnx:
            raise UserError(f"--mode int8 does not apply to an ONNX file ({onnx}); use --mode eager, or export an "
                            "int8 file with `pixelwise export --int8`")
        if args.mc_samples:  # Monte-Carlo dropout: with dropout, eager only; without, not at all
            raise UserError("--mc-samples runs Monte-Carlo dropout, in --mode eager only; leave out --mc-samples "
                            "(or --mode int8)")
        for path in paths:
            if checkpoint_header(path).get("task") == "instance":
                raise UserError(f"--mode int8 is not offered for instance models like {path}'s Mask R-CNN; use "
                                "--mode fast")
        options.update(calib_data=calibration_images(args, "--mode int8"), calib_crop=calibration_sizes(args)[1])
    else:
        check_no_calibration(args, "--mode int8")
    return options


# the flags of eval that say how a model predicts: none applies to --predictions, masks already made
MODEL_FLAGS = ("checkpoint", "onnx", "resize", "tile", "overlap", "tta", "mc_samples", "batch_size", "mode", "crf",
               "watershed", "calib_dataset", "calib_data", "calib_images", "calib_crop")


def cmd_eval(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.inference.cells import check_seed_threshold
    from pixelwise.inference.evaluate import evaluate_checkpoint, evaluate_predictions

    dataset_kwargs = train_config.parse_json_dict(args.dataset_kwargs, "--dataset-kwargs")
    if args.predictions is not None:
        given = [flag for flag in MODEL_FLAGS if getattr(args, flag) is not None]
        if given:
            raise UserError(f"--predictions scores masks already made, so --{given[0].replace('_', '-')} (how a "
                            "model predicts) does not apply; leave it out, or evaluate the --checkpoint instead")
        check_output_file(args.json, "--json", [args.predictions, args.data,
                                                *option_files(args.data, args.split, dataset_kwargs)], args.overwrite)
        set_max_pixels(args.max_pixels)
        metrics = evaluate_predictions(args.predictions, args.dataset, args.data, args.split,
                                       dataset_kwargs=dataset_kwargs, progress=args.progress, bf=not args.no_bf,
                                       skip_invalid=args.skip_invalid)
        return report_eval(args, metrics)
    check_output_file(args.json, "--json", [*(args.checkpoint or []), args.onnx, args.data,
                                            *option_files(args.data, args.split, dataset_kwargs)], args.overwrite)
    options = {k: v for k, v in predictor_options(args).items() if v is not None}
    if options.get("mode") == "int8":
        options["measuring"] = True  # eval measures what int8 costs, also for models it is not yet offered for
    if args.watershed is not None:
        check_seed_threshold(args.watershed)
    set_max_pixels(args.max_pixels)
    device = check_device(args.device)
    if not args.checkpoint and not args.onnx:
        raise UserError("give the model to evaluate, --checkpoint FILE (repeated: an ensemble) or --onnx FILE, or "
                        "--predictions DIR to score masks already made")
    files = model_files(args)
    metrics = evaluate_checkpoint(files[0] if len(files) == 1 else files, args.dataset, args.data, args.split,
                                  device=device, dataset_kwargs=dataset_kwargs,
                                  progress=args.progress, bf=not args.no_bf, skip_invalid=args.skip_invalid,
                                  watershed=args.watershed, **options)
    return report_eval(args, metrics)


def report_eval(args: argparse.Namespace, metrics: dict) -> int:
    """Print eval's summary, per-class table, notes, and write ``--json``."""
    summary = {k: v for k, v in metrics.items()
               if k not in ("per_class", "confusion_matrix", "per_image", "input", "provenance")}  # those: --json
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    for row in metrics.get("per_class", []):
        cells = [f"{key} {'null' if row.get(key) is None else format(row[key], '.4f')}"
                 for key in ("iou", "acc", "bf", "boundary_iou") if key in row]
        print(f"  {shown(row['name']):<16} " + "  ".join(cells))
    scored = [row for row in metrics.get("per_image", []) if row["mIoU"] is not None]
    if len(scored) > 1:  # where to look first
        worst = sorted(scored, key=lambda row: row["mIoU"])[:3]
        print("  lowest mIoU: " + ", ".join(f"{shown(row['name'])} {row['mIoU']:.4f}" for row in worst)
              + ("" if args.json else " (per_image in --json has every image's)"))
    trained = metrics["provenance"]["dataset"].get("training_images")
    if trained:  # e.g. CamVid's official val under a run that held out other sequences and joined val to train
        kwargs = metrics["provenance"]["dataset"].get("trained_with") or {}
        held_out = metrics["provenance"]["dataset"]["held_out_split"]  # set with training_images
        print(f"pixelwise: note: {trained} of the {metrics.get('num_images', '?')} images of the {args.split} split "
              f"are images the checkpoint trained on (it was trained with --dataset-kwargs '{json.dumps(kwargs)}'), "
              f"so these numbers flatter it; score its held-out split with --split {held_out} "
              f"--dataset-kwargs '{json.dumps(kwargs)}'", file=sys.stderr)
    skipped = metrics["provenance"]["dataset"].get("skipped") or []
    if skipped:
        print(f"pixelwise: note: left out {len(skipped)} file(s) with problems (--skip-invalid), e.g. "
              f"{shown(skipped[0])}", file=sys.stderr)
    if metrics.get("per_class") and not any(row["pixels"] for row in metrics["per_class"]):
        print(f"pixelwise: note: the {args.split} split has no labelled pixel (every pixel is 255, ignore), so "
              "every metric is null; its labels may be withheld (Cityscapes' test split): score a split with labels",
              file=sys.stderr)
    if args.json:
        write_json(args.json, metrics, args.overwrite)
        print(f"wrote {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.inference.ensemble import EnsemblePredictor, from_checkpoints
    from pixelwise.inference.mc_dropout import has_dropout
    from pixelwise.inference.onnx_runner import exported_dropout
    from pixelwise.inference.predictor import InstancePredictor, SemanticPredictor
    from pixelwise.inference.writers import check_predict, check_watershed, predict_files, prediction_record

    options = {k: v for k, v in predictor_options(args).items() if v is not None}
    if args.score_thresh is not None:
        options["score_thresh"] = args.score_thresh
    set_max_pixels(args.max_pixels)
    device = check_device(args.device)
    predictor = from_checkpoints(model_files(args), device, **options)
    if args.uncertainty and not isinstance(predictor, SemanticPredictor):
        raise UserError("--uncertainty applies to semantic models only")
    if args.onnx and args.uncertainty and exported_dropout(predictor.meta):
        raise UserError(f"--uncertainty: {args.onnx} was exported from a model with dropout "
                        f"({predictor.meta.get('model', 'its model')}), but an ONNX file has no Monte-Carlo dropout "
                        "(traced without it), so its mask and uncertainty would not be that model's; give the "
                        "--checkpoint for --uncertainty")
    check_watershed(predictor, args.watershed)
    members = predictor.members if isinstance(predictor, EnsemblePredictor) else [predictor]
    for member in members:  # models with dropout: uncertainty from Monte-Carlo dropout
        if isinstance(member, SemanticPredictor) and args.uncertainty and args.mc_samples is None \
                and has_dropout(member.model):
            member.mc_samples = DEFAULT_MC_SAMPLES
    plan = check_predict(args.inputs, args.out, instance=isinstance(predictor, InstancePredictor),
                         uncertainty=args.uncertainty, skip_invalid=args.skip_invalid, progress=args.progress,
                         cells=args.watershed is not None, overwrite=args.overwrite,
                         crf=getattr(predictor, "crf", None), resume=args.resume,
                         record=prediction_record(predictor, uncertainty=args.uncertainty, watershed=args.watershed))
    written = predict_files(predictor, plan, uncertainty=args.uncertainty, progress=args.progress,
                            watershed=args.watershed)
    stacks = {path for path, frame in zip(plan.paths, plan.frames) if frame > 0}
    renamed = sum(  # a frame's own name is <stem>_<frame>; any other name was given to avoid a collision
        not (re.fullmatch(re.escape(path.stem) + r"_\d+", stem) if path in stacks else stem == path.stem)
        for path, stem in zip(plan.paths, plan.stems))
    inputs = "; ".join(m.input_spec.describe() for m in members)
    # a model with dropout under --uncertainty samples Monte-Carlo dropout, which runs in eager float32
    sampled = sorted({m.mode for m in members if isinstance(m, SemanticPredictor) and m.mc_samples
                      and m.mode != "eager"})
    fast = sorted({str(m.runner.precision) for m in members  # bf16 or float32, and why
                   if isinstance(m, SemanticPredictor) and m.mode == "fast" and not m.mc_samples
                   and hasattr(m.runner, "precision")})
    print(f"wrote {len(written)} prediction(s) to {args.out} (input: {inputs})"
          + (f"; kept {plan.kept} an earlier run of this prediction wrote (--resume)" if plan.kept else "")
          + (f"; --mode fast ran {', '.join(fast)}" if fast else "")
          + (f"; Monte-Carlo dropout (--uncertainty) ran in eager float32, not --mode {', '.join(sampled)}"
             if sampled else "")
          + (f"; {len(stacks)} multi-frame file(s) predicted frame by frame as <stem>_<frame>" if stacks else "")
          + (f"; refined by the fully connected CRF ({crf.text()})" if (crf := getattr(predictor, "crf", None))
             else "")
          + (f"; {renamed} output name(s) given <stem>_<ext> or a number because input stems collide"
             if renamed else ""))
    for reason in plan.skipped:
        print(f"pixelwise: skipped {shown(reason)}", file=sys.stderr)
    if plan.skipped:
        print(f"pixelwise: skipped {len(plan.skipped)} unreadable input(s) (exit {EXIT_SKIPPED})", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.inference.predictor import Predictor
    from pixelwise.runtime import check_can_create
    from pixelwise.serve.config import API_KEY_ENV, MB, ServeConfig, check_can_listen

    try:  # optional dependency: fastapi, uvicorn and python-multipart (the serve extra)
        from pixelwise.serve.app import run
    except ModuleNotFoundError as e:
        raise UserError(f"pixelwise serve needs the serve extra ({e.name} is not installed): "
                        "pip install -e '.[serve]'") from None

    check_can_listen(args.host, args.port)
    if not 0 < args.max_upload_mb < math.inf:
        raise UserError(f"--max-upload-mb must be a positive number of MB, got {args.max_upload_mb}")
    keep_uploads = Path(args.keep_uploads) if args.keep_uploads else None
    if keep_uploads is not None:  # a folder that cannot be made would fail every request
        check_can_create(keep_uploads, f"--keep-uploads {keep_uploads}")
    config = ServeConfig(max_upload_bytes=int(args.max_upload_mb * MB), max_pixels=args.max_pixels,
                         workers=args.workers, queue=args.queue, predict_timeout=args.timeout or None,
                         api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV),
                         cors_origins=tuple(args.cors or ()),
                         keep_uploads=keep_uploads,
                         samples_dir=Path(args.samples) if args.samples else None,
                         samples_truth_format=args.samples_truth_format,
                         uncertainty_samples=DEFAULT_MC_SAMPLES if args.mc_samples is None else args.mc_samples)
    options = {k: v for k, v in predictor_options(args).items() if v is not None}
    if args.score_thresh is not None:
        options["score_thresh"] = args.score_thresh
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device, **options)
    if keep_uploads is not None:  # made once every other check has passed: a refused start leaves nothing
        try:
            keep_uploads.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--keep-uploads {keep_uploads}: cannot create it ({e.strerror}); give another "
                            "folder") from None

    def reload() -> Predictor:  # the same checkpoint path, device and options as at start
        return Predictor.from_checkpoint(args.checkpoint, args.device, **options)

    return run(predictor, config, host=args.host, port=args.port, log_level=args.log_level,
               reload=reload if args.reload else None)


def cmd_demo(args: argparse.Namespace) -> int:
    # start-up time: each verb loads only what it uses (`pixelwise --help` needs no torch)
    from pixelwise.demo import run_demo

    report = run_demo(args.out, quick=args.quick, progress=args.progress, overwrite=args.overwrite,
                      resume=args.resume)
    print(f"report: {report}")
    return 0


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: only when stderr is a terminal, so logs stay readable)")


SCORE_THRESH_HELP = ("instance models: keep detections with this score or more (default 0.5). The model itself "
                     "gives none below its box_score_thresh (default 0.05) and at most box_detections_per_img "
                     "(default 100) per image, after NMS at box_nms_thresh (default 0.5): model options set at "
                     "training (--model-kwargs) and kept in the checkpoint")


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="read images of up to N pixels (default 89478485, about 9459x9459: larger files are "
                        "refused as possible decompression bombs); raise it for large aerial or slide images")


def _add_prediction_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by eval and predict: how the model sees each image."""
    p.add_argument("--resize", help="predict at HxW (or N: N x N) instead of the size recorded in the checkpoint "
                   "(its input contract), or 'native' for each image's own size; results come back at the image's size")
    p.add_argument("--tile", type=int, help="predict in tiles that each predict this many pixels square (>= 16), "
                   "seeing their real surroundings from the image (bounded memory for large images)")
    p.add_argument("--overlap", type=float, help="how much tiles overlap and blend, as a fraction of the tile "
                   "(default 0 for models that state their context, such as unet with padding valid, else 0.25)")
    p.add_argument("--tta", nargs="?", const="flip", choices=TTA_CHOICES,
                   help="test-time augmentation: flip (default: the image and its mirror), d4 (the 8 rotations "
                        "and flips) or ms (scales 0.5-1.75, each with its mirror); applied to each tile")
    p.add_argument("--mc-samples", type=int, help="average this many Monte-Carlo dropout samples (models with "
                   "dropout, e.g. bayesian_segnet; the paper used 50)")
    p.add_argument("--batch-size", type=int, help="model inputs per forward pass: the equal-size tiles of one "
                   "image (default 4; each test-time variant runs as its own pass over them); images run one at a "
                   "time, so that each mask is the one eval scores")
    p.add_argument("--mode", choices=["eager", "fast", "int8"], help="eager (default: float32 as trained), fast "
                   "(BatchNorm folded, channels-last; bf16 where the CPU has it, for the models whose bf16 accuracy "
                   "was measured (docs/deploy.md), else float32; Mask R-CNN: "
                   "optimize_for_inference, also in bf16 where the device has fast bf16 kernels) or int8 "
                   "(quantised in PyTorch, calibrated with --calib-*; CPU, models whose int8 cost was measured); "
                   "docs/deploy.md")
    _add_calibration_args(p, "--mode int8")
    p.add_argument("--crf", nargs="?", const="", metavar="NAME=VALUE,...",
                   help="semantic models: refine each image's probabilities with DeepLab's fully connected CRF "
                        "(mean field over all pixel pairs; images up to 4 MP; ~1 s for a 360x480 frame); defaults "
                        "DeepLab-LargeFOV's: iterations=10,bi_w=4,bi_xy_std=121,bi_rgb_std=5,pos_w=3,pos_xy_std=3, "
                        "any of them given override those")


def _add_watershed(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--watershed", nargs="?", const=0.5, type=float, metavar="T", help=help)


def _add_calibration_args(p: argparse.ArgumentParser, what: str) -> None:
    """Where int8 calibration images come from (export --int8, --mode int8)."""
    p.add_argument("--calib-dataset", metavar="KIND", help=f"with {what}: the dataset kind to calibrate on (its "
                   "train split)")
    p.add_argument("--calib-data", metavar="PATH", help=f"with {what}: the dataset's folder")
    p.add_argument("--calib-images", type=int, help=f"with {what}: images to calibrate on (default {CALIB_IMAGES})")
    p.add_argument("--calib-crop", type=int, help=f"with {what}: random crop side (default {CALIB_CROP})")


class Once(argparse.Action):
    """A flag that takes one value: given twice, a one-line error rather than the last one silently
    (``--checkpoint`` repeated makes an ensemble in predict and eval, not in the verbs that use this)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: typing.Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, f"given twice; {parser.prog} takes one (predict and eval take "
                                               "several --checkpoint, an ensemble)")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pixelwise", description="Semantic and instance segmentation in PyTorch.")
    parser.add_argument("--version", action="version", version=f"pixelwise {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("models", help="list models with task, parameters and paper")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="end-to-end run on synthetic scenes: train, evaluate, predict, report")
    p.add_argument("--out", default="pixelwise-demo", help="output folder (default: pixelwise-demo)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    p.add_argument("--overwrite", action="store_true", help="run into an --out that holds an earlier demo, "
                   "replacing it (default: refuse)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out (give --quick "
                   "again if it had it): its training goes on, then the evaluation and the report")
    _add_progress(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="list the bundled training recipes (pixelwise train --config NAME)")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("eval", help="evaluate a checkpoint (or masks already made) on a dataset split")
    p.add_argument("--checkpoint", action="append",
                   help="the checkpoint; repeat it to evaluate an ensemble (the mean of their probabilities)")
    p.add_argument("--onnx", metavar="FILE", action=Once,
                   help="evaluate a file written by `pixelwise export` instead (onnxruntime)")
    p.add_argument("--predictions", metavar="DIR", action=Once,
                   help="score the masks already in DIR instead of a model: DIR/<image stem>.png for each image, "
                        "class ids as pixel values (the --out of `pixelwise predict`, or another tool's masks); on "
                        "instance data, an instance model's DIR/<image stem>.json detections")
    p.add_argument("--dataset", required=True, help="dataset kind: shapes, camvid, voc, cityscapes, ade20k, "
                   "isbi2012, coco, folder")
    p.add_argument("--data", help="the dataset's folder (none for shapes, which is generated)")
    p.add_argument("--split", default="val", help="the split to score (default: val)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _add_prediction_args(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument("--dataset-kwargs", help="JSON object of dataset options")
    p.add_argument("--no-bf", action="store_true", help="skip the boundary metrics, the slowest: BF score and "
                   "Boundary IoU (semantic), Boundary AP (instance)")
    _add_watershed(p, "isbi2012: score the Rand errors and pixel_error_best on the cell probability with the "
                      "one-pixel boundaries of its watershed cells (seeded where it exceeds T, default 0.5) drawn in "
                      "as membrane; pixel_error and the other metrics stay those of the network's masks; "
                      "docs/metrics.md")
    p.add_argument("--skip-invalid", action="store_true", help="leave out the files the dataset check finds bad "
                   "(default: refuse to evaluate, naming them)")
    _add_max_pixels(p)
    _add_progress(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment image files")
    p.add_argument("--checkpoint", action="append",
                   help="the checkpoint; repeat it to predict with an ensemble (the mean of their probabilities)")
    p.add_argument("--onnx", metavar="FILE", action=Once,
                   help="run a file written by `pixelwise export` instead (onnxruntime)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (their image files, not "
                   "subfolders) or quoted glob patterns ('photos/*.jpg', 'photos/**/*.jpg' through subfolders)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the predictions; never one that holds "
                   "an input or that a pattern of the inputs reaches (inputs whose names differ only in extension "
                   "get <stem>_<ext>)")
    p.add_argument("--overwrite", action="store_true", help="replace files of the outputs' names already in --out "
                   "(an earlier prediction); without it such a file is refused before any work")
    p.add_argument("--resume", action="store_true", help="go on with an interrupted predict into --out: keep the "
                   "predictions there whose masks record this model and these options, predict the rest")
    _add_prediction_args(p)
    _add_watershed(p, "two-class boundary models (isbi2012's membrane / cell): also write DIR/<stem>_cells.png, "
                      "16-bit ids of the watershed cells seeded where the cell probability exceeds T (default 0.5), "
                      "with their one-pixel boundaries drawn into the mask; docs/inference.md")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write DIR/<stem>_uncertainty.png (predictive entropy). A model with dropout (such as "
                        f"bayesian_segnet, or unet with its default dropout) then predicts with Monte-Carlo dropout, "
                        f"{DEFAULT_MC_SAMPLES} seeded samples unless --mc-samples: its mask is the samples' mean, "
                        "the mask eval --mc-samples scores, not plain eval's")
    p.add_argument("--score-thresh", type=float, help=SCORE_THRESH_HELP)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument("--skip-invalid", action="store_true", help="predict the readable inputs, list the others and "
                   f"exit {EXIT_SKIPPED} (default: name every unreadable input and write nothing)")
    _add_max_pixels(p)
    _add_progress(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a model to ONNX or torch.export (.pt2), verified against PyTorch")
    p.add_argument("--checkpoint", action=Once, help="the .safetensors checkpoint")
    p.add_argument("--model", help="export this model with random weights instead of a checkpoint")
    p.add_argument("--num-classes", type=int, help="with --model, at least 1 (default 21, or 91 for instance "
                   "models)")
    p.add_argument("--format", help="onnx (onnxruntime; the export extra) or pt2 (a torch.export archive); default: "
                   "what --out's suffix names")
    p.add_argument("--out", required=True, help="the .onnx or .pt2 file to write (Mask R-CNN, ONNX only: FILE and "
                   "<stem>_heads.onnx)")
    p.add_argument("--opset", type=int,
                   help="ONNX opset: 11 (12 with --fp16, 13 with --int8) up to the newest the installed torch "
                   "writes (23 for torch 2.13); default 17")
    p.add_argument("--fp16", action="store_true", help="float16 weights and activations (inputs and outputs stay "
                   "float32)")
    p.add_argument("--int8", action="store_true", help="static int8 quantisation by onnxruntime (QDQ, per-channel "
                   "int8 weights, uint8 activations calibrated on training crops)")
    _add_calibration_args(p, "--int8")
    p.add_argument("--min-agreement", type=float, help="fail below this argmax agreement with PyTorch eager, a "
                   "fraction in (0, 1] (default 0.999; with --int8 the int8 guard of docs/deploy.md, 0.97)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (Mask R-CNN: and "
                   "<stem>_heads.onnx)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="web page and HTTP API for a checkpoint (needs the serve extra)",
                       description="Serve a checkpoint: a page at / (upload, overlay, legend, scores against a "
                       "ground truth), POST /api/predict, GET /api/info, GET /api/health, the API reference at /docs.")
    p.add_argument("--checkpoint", required=True, action=Once, help="the checkpoint (or an .onnx export) to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 listens on every interface and prints a warning)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    _add_prediction_args(p)
    p.add_argument("--score-thresh", type=float, help=SCORE_THRESH_HELP)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument("--reload", action="store_true", help="when the checkpoint is written over (a training run's new "
                   "best), load it and answer with it from the next request on (/api/info names the file's SHA-256; "
                   "one that cannot be loaded is logged and the old model goes on answering)")
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
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="stop a prediction that runs "
                   "longer than this and answer 504 (default 300; 0: no limit)")
    p.add_argument("--keep-uploads", metavar="DIR", help="save every upload, as received, in DIR (default: "
                   "uploads stay in memory and are never written to disk)")
    p.add_argument("--samples", metavar="DIR", help="offer the images in DIR (and DIR/masks/<stem>.png ground "
                   "truths) as samples on the page instead of the bundled synthetic scenes")
    p.add_argument("--samples-truth-format", choices=["classes", "dataset"], default="classes",
                   help="how the --samples masks store classes: classes (class ids or the palette's colours, default) "
                        "or dataset (the training dataset's own label files: ADE20K annotations, Cityscapes labelIds, "
                        "ISBI's 0/255 labels, CamVid's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="inference speed, FLOP utilisation and peak memory")
    p.add_argument("--model", help="a model of the zoo (`pixelwise models`), random weights")
    p.add_argument("--checkpoint", action=Once, help="the .safetensors checkpoint")
    p.add_argument("--num-classes", type=int, help="with --model only (default 21)")
    p.add_argument("--size", required=True, help="input HxW (or N: N x N)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--onnx", metavar="FILE", action=Once,
                   help="time a file written by `pixelwise export` (onnxruntime)")
    p.add_argument("--mode", choices=["eager", "fast", "int8", "onnx"], help="eager (default), fast (BatchNorm "
                   "folded, channels-last; bf16 where the CPU has bf16 kernels, for the models whose bf16 accuracy "
                   "was measured; fast_path says which), int8 (quantised in PyTorch, calibrated on smooth random "
                   "images) or onnx (export, verify, time onnxruntime)")
    p.add_argument("--compile", action="store_true", help="only with --mode fast on a semantic model: also "
                   "torch.compile (compile time is reported as compile_s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes after a warm-up; the fastest "
                   "counts (default 5)")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and onnxruntime (default: torch's)")
    p.add_argument("--train", action="store_true", help="also time a float32 training step (train_img_per_s)")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    q = data_sub.add_parser("inspect", help="counts, sizes, class frequencies, median-frequency weights, problems")
    q.add_argument("--dataset", required=True, help="dataset kind: shapes, camvid, voc, cityscapes, ade20k, "
                   "isbi2012, coco, folder")
    q.add_argument("--data", help="the dataset's folder (none for shapes, which is generated)")
    q.add_argument("--split", default="train", help="the split to inspect (default: train)")
    q.add_argument("--json", help="also write the report to this JSON file")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    q.add_argument("--dataset-kwargs", help="JSON object of dataset options")
    q.add_argument("--strict", action="store_true", help="exit 1 when problems are found")
    _add_max_pixels(q)
    _add_progress(q)
    q.set_defaults(func=cmd_data_inspect)
    return parser


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is the one-line ``pixelwise: error: ...`` of every
    other bad input (argparse would print the usage block first)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{_verb_name(self)}{message} (see `{self.prog} --help`)")


def _verb_name(parser: argparse.ArgumentParser) -> str:
    """``"eval: "`` for the parser of ``pixelwise eval``, ``""`` for the top one."""
    verb = parser.prog.removeprefix("pixelwise").strip()
    return f"{verb}: " if verb else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, SLURM, Kubernetes), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so that training saves its current step the same way."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the save that follows is not interrupted again
    raise Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _default_pixel_limit_after() -> Iterator[None]:
    """``--max-pixels`` holds for one verb (main() may be called again in the same process)."""
    try:
        yield
    finally:
        io = sys.modules.get("pixelwise.data.io")
        if io is not None:
            io.set_max_image_pixels(None)


def _verb_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the verb that ``args`` were parsed for, e.g. that of ``data inspect``."""
    for dest in ("verb", "data_verb"):
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, dest, None)
        if not actions or name is None:
            break
        parser = actions[0].choices[name]
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    try:
        args, extra = parser.parse_known_args(argv)
    except UserError as e:  # e.g. "the following arguments are required: INPUT" for predict -x.png
        given = sys.argv[1:] if argv is None else argv
        raise UserError(f"{e}{_dash_file_hint(given)}{_taken_path_hint(given, _optional_value_flags(parser))}"
                        ) from None
    if extra:
        verb = _verb_parser(parser, args)
        word = next((a for a in extra if a.startswith("-")), extra[0])
        flags = [s for a in verb._actions for s in a.option_strings]
        hint = train_config.did_you_mean(word.split("=")[0], flags) if word.startswith("-") else ""
        raise UserError(f"{_verb_name(verb)}unrecognized argument {word!r}{hint or _dash_file_hint([word])} "
                        f"(see `{verb.prog} --help`)")
    return args


def _dash_file_hint(argv: list[str]) -> str:
    """'; -x.png is a file: ...' where an argument that begins with '-' names an existing file,
    which argparse takes for a flag."""
    named = next((a for a in argv if a.startswith("-") and a != "--" and os.path.isfile(a)), None)
    return (f"; {named} is a file, read as a flag for its leading '-': write ./{named}, or put the inputs after --"
            if named else "")


def _optional_value_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The flags of ``parser`` and of its verbs whose value may be left out (``nargs="?"``, such
    as --tta, --crf, --watershed): argparse gives them a path that follows them."""
    flags: set[str] = set()
    for action in parser._actions:
        if action.nargs == "?" and action.option_strings:
            flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for verb in action.choices.values():
                flags |= _optional_value_flags(verb)
    return flags


def _taken_path_hint(argv: list[str], flags: set[str]) -> str:
    """'; --crf took photo.png as its value ...' where one of ``flags`` (whose value may be left
    out) is followed by an existing path (an input the user meant), which argparse gives the flag."""
    for flag, value in zip(argv, argv[1:]):
        if flag in flags and os.path.exists(value):
            return (f"; {flag} took {value} as its value (a value it may go without): put {flag} after the inputs, "
                    f"or give its value with = ({flag}=VALUE)")
    return ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _StdoutThatMayClose:
    """``sys.stdout`` for one verb: once its reader has gone (``pixelwise train | head``, or the
    ``tee`` a Ctrl-C stopped first) or it cannot be written (``>/dev/full``, a log on a full disk),
    further output is dropped instead of raising into the verb, which stopped a training run or
    reported a closed pipe as a full disk of the run's --out. A failure other than a closed pipe is
    said once on stderr."""

    def __init__(self, stream: typing.TextIO) -> None:
        self.stream, self.closed_by_reader = stream, False

    def _failed(self, e: OSError) -> None:
        self.closed_by_reader = True
        if not isinstance(e, BrokenPipeError):
            print(f"pixelwise: note: standard output cannot be written ({e.strerror or e}); what the command prints "
                  "there is dropped, and it goes on", file=sys.stderr)

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                return self.stream.write(text)
            except OSError as e:
                self._failed(e)
        return len(text)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                self.stream.flush()
            except OSError as e:
                self._failed(e)

    def __getattr__(self, name: str) -> typing.Any:  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


@contextmanager
def _stdout_may_close() -> Iterator[None]:
    real = sys.stdout
    if real is None:  # started with stdout closed (>&-): print() writes nowhere, as Python does then
        yield
        return
    # a class name its encoding lacks (a Windows console or file in cp1252, a "C" locale) is written
    # as an escape, not a UnicodeEncodeError traceback that loses the rest (eval's --json included)
    strict = getattr(real, "errors", None) == "strict" and hasattr(real, "reconfigure")
    if strict:
        with suppress(ValueError, OSError):
            real.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    sys.stdout = wrapper = _StdoutThatMayClose(real)
    try:
        yield
    finally:
        sys.stdout = real
        if strict:
            with suppress(ValueError, OSError):
                real.reconfigure(errors="strict")  # type: ignore[union-attr]
        if wrapper.closed_by_reader:  # what is still buffered would fail again at exit: point it at nothing
            with suppress(OSError, ValueError, AttributeError):  # not a real file (a test's capture)
                os.dup2(os.open(os.devnull, os.O_WRONLY), real.fileno())


def _stopped(e: KeyboardInterrupt) -> str:
    """The one line of an interrupted verb; what it saved and how to go on (training) is repeated
    here when stdout, where it was logged, is not the terminal (a log file, a pipe)."""
    said = e.args[0] if e.args and isinstance(e.args[0], str) else ""
    head = "pixelwise: terminated (SIGTERM)" if isinstance(e, Terminated) else "pixelwise: interrupted"
    return f"{head}; {said}" if said and not sys.stdout.isatty() else head


# the flags that name a file or folder: an empty value (an unset shell variable, `--json "$OUT"`) is
# never what was meant, and read as "not given" it wrote nothing, or wrote into the current folder
PATH_FLAGS = ("out", "json", "data", "config", "checkpoint", "onnx", "predictions", "calib_data", "pretrained",
              "class_weights", "inputs", "keep_uploads", "samples")


def check_no_empty_paths(args: argparse.Namespace) -> None:
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
            what = "an INPUT" if name == "inputs" else f"--{name.replace('_', '-')}"
            raise empty_path(what)


def expand_home(args: argparse.Namespace) -> None:
    """A ``~`` the shell left (quoted, or after ``--out=``) is expanded in every path flag, as ``train``
    expanded its own: ``predict --out '~/p'`` made a folder named ``~`` in the current one, and a
    ``~user`` of no such user (or ``~`` without a home, as in a container run under a bare user id)
    was pathlib's RuntimeError, a traceback."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        if not any(isinstance(v, str) and v.startswith("~") for v in values):
            continue
        what = "an INPUT" if name == "inputs" else f"--{name.replace('_', '-')}"
        expanded = [expanded_home(v, f"{what} {v}") if isinstance(v, str) else v for v in values]
        setattr(args, name, expanded if isinstance(value, list) else expanded[0])


def main(argv: list[str] | None = None) -> int:
    """Run one verb; -> the exit status (module docstring). Every foreseeable bad input ends
    here as one line on stderr."""
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # a second Ctrl-C while the first one's line was printed or unwound
        return 143 if isinstance(e, Terminated) else 130


def _say(line: str) -> None:
    """One line on stderr in one write (under torchrun every process says its error, and print's two
    writes, text then newline, could run two processes' lines together), marked with the process's
    rank where it is not rank 0."""
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
    stream = sys.stderr or sys.stdout  # None under pythonw or a windowed app: print() fell back so too
    if stream is not None:
        stream.write(("" if rank == "0" else f"[rank {rank}] ") + line + "\n")
        stream.flush()


def _main(argv: list[str] | None) -> int:
    with _sigterm_raises(), _default_pixel_limit_after(), _stdout_may_close():
        try:
            args = _parse(build_parser(), argv)
            check_no_empty_paths(args)
            expand_home(args)
            return args.func(args)
        except UserError as e:
            _say(f"pixelwise: error: {_one_line(shown(e))}")
            return 2
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
            _say(_stopped(e))
            return 143 if isinstance(e, Terminated) else 130
        except OSError as e:  # the machine's answer to a path given: permissions, a full disk, ...
            where = f"{e.filename}: " if e.filename else ""
            _say(f"pixelwise: error: {where}{_one_line(e.strerror or str(e))}; check the path, its permissions "
                 "and the free space")
            return 2
        except MemoryError:
            _say("pixelwise: error: out of memory; use a smaller --batch-size, --tile or image size")
            return 2
        except RuntimeError as e:
            cpu = "can't allocate memory" in str(e)  # torch's CPU allocator raises a plain RuntimeError
            if type(e).__name__ != "OutOfMemoryError" and not cpu:  # torch's, on the GPU
                raise
            where = "in main memory" if cpu else "on the device"
            _say(f"pixelwise: error: out of memory {where} ({_one_line(str(e))[:200]}); use a smaller "
                 "--batch-size, --tile or image size")
            return 2
        except Exception as e:  # OpenCV's out of memory (torch's is the RuntimeError above); others: a traceback
            if type(e).__module__ != "cv2" or "Insufficient memory" not in str(e):  # cv2.error, not imported here
                raise
            _say(f"pixelwise: error: out of memory in main memory ({_one_line(str(e))[-120:]}); use a smaller "
                 "--batch-size, --tile or image size")
            return 2


if __name__ == "__main__":
    raise SystemExit(main())
