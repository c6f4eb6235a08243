"""Typed training configuration. YAML keys and CLI long flags map onto these fields one to one
(``max_minutes`` <-> ``--max-minutes``). Defaults < YAML file < command line.

Each field is declared with :func:`opt`: its default, the help of its ``pixelwise train`` flag
and, for options with a fixed set of values, their choices. The CLI builds the flags from
these fields and :meth:`TrainConfig.validate` checks the choices, so the two cannot drift.

Nothing inherits from anything: a recipe is one flat mapping of these keys, plus an optional
``stages:`` list whose items override a few keys (:data:`STAGE_KEYS`) for a number of epochs.
Bundled recipes (``pixelwise/configs/*.yaml``) are found by name (:func:`find_recipe`); they
carry no machine paths: ``data`` comes from ``--data`` and ``out`` defaults to
``runs/<recipe name>``.

This module imports no torch, so that ``pixelwise train --help`` answers at once.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import json
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pixelwise.errors import UserError, brief, empty_path, expanded_home, finite_number
from pixelwise.sample import MAX_INPUT_PIXELS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("poly", "cosine", "step", "constant")
LOSSES = ("ce", "dice", "focal", "lovasz", "ce+dice", "ce+lovasz")
AMP_MODES = ("auto", "off", "bf16", "fp16")
WEIGHT_MAPS = ("none", "unet")
DEVICES = ("cpu", "cuda")
# validation metrics that can pick best.safetensors; auto: mIoU, or mask_AP. Higher is better except
# for the ISBI 2012 errors (LOWER_IS_BETTER), which only data with a rand_foreground class has.
LOWER_IS_BETTER = ("pixel_error", "pixel_error_best", "rand_error", "rand_error_best")
SEMANTIC_SELECT = ("pixel_acc", "mean_acc", "mIoU", "fwIoU", "dice", *LOWER_IS_BETTER)
INSTANCE_SELECT = ("mask_AP", "mask_AP50", "mask_AP75", "box_AP")
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"
# --seed: torch takes 64-bit seeds, and the trainer derives (seed * 100003 + epoch) * 1009 + rank per
# epoch (trainer.epoch_seed); 32 bits keep that far below 2**63 for any number of epochs.
MAX_SEED = 2**32 - 1
# what one command does with OUT, not a setting of the run: left out of its config.yaml (else a resume
# read back "overwrite: true" and was refused, and a run's config.yaml given as --config said "resume")
COMMAND_ONLY = ("resume", "overwrite")
# keys that hold a path: ``~`` is expanded in them, wherever they come from (a YAML file, a flag, Python)
PATH_KEYS = ("data", "out", "pretrained", "class_weights")


class _Cleared:
    """What :func:`flag_value` returns for ``--max-minutes none``: the flag clears the recipe's value."""

    def __repr__(self) -> str:
        return "none"


CLEARED: Any = _Cleared()


def opt(default: Any, help: str, *, choices: Sequence[str] | None = None, stage: bool = False,
        metavar: str | None = None, default_text: str | None = None, ge: float | None = None,
        gt: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """A :class:`TrainConfig` field: ``default`` (mappings and lists are copied per instance), the
    ``help`` of its flag, the allowed values (``choices``; numbers: ``ge`` >=, ``gt`` >, ``lt`` <, ``le`` <=),
    whether a stage may override it (``stage``), the flag's ``metavar`` and how ``--help`` shows
    the default (``default_text``). :func:`check_value` checks a value against all of it."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "stage": stage,
                "metavar": metavar, "default_text": default_text, "ge": ge, "gt": gt, "lt": lt, "le": le}
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # --- what to train, on what, where to write -------------------------------------------
    model: str = opt("unet", "model name (see `pixelwise models`)", metavar="NAME")
    dataset: str = opt("shapes", "dataset kind: shapes, camvid, voc, cityscapes, ade20k, isbi2012, coco, folder",
                       metavar="KIND")
    data: str | None = opt(None, "dataset root folder (none for shapes, which is generated)", metavar="PATH")
    out: str | None = opt(None, "output folder for checkpoints and metrics", metavar="DIR",
                          default_text="runs/<recipe name>, or runs/<model> without --config")
    model_kwargs: dict = opt({}, "model builder options as a JSON object, e.g. '{\"base_channels\": 32}'")
    dataset_kwargs: dict = opt({}, "dataset reader options as a JSON object, e.g. '{\"num_train\": 200}'")
    pretrained: str | None = opt(None, "imagenet, or a weights file (.safetensors, or .pth read with weights_only)",
                                 metavar="imagenet|PATH")
    train_split: str = opt("train", "split to train on", metavar="SPLIT")
    val_split: str = opt("val", "split to validate on after every epoch", metavar="SPLIT")
    skip_invalid: bool = opt(False, "drop files that fail the dataset check instead of refusing to train")
    max_pixels: int | None = opt(None, "read images of up to N pixels (larger files are refused as possible "
                                 "decompression bombs); raise it for large aerial or slide images", metavar="N",
                                 default_text="89478485, about 9459x9459", ge=1)
    # --- length ---------------------------------------------------------------------------
    epochs: int = opt(10, "passes over the training split (with stages: the sum of the stages' epochs)",
                      stage=True, ge=1)
    max_minutes: float | None = opt(None, "time budget in minutes; the schedule anneals by max(step, time) "
                                    "fraction and the run ends cleanly when it is spent", metavar="M", gt=0)
    batch_size: int = opt(8, "images per step per process (x accumulate x processes = effective batch)",
                          stage=True, ge=1, le=1_000_000)
    accumulate: int = opt(1, "gradient accumulation: micro-batches per optimizer step", stage=True, ge=1,
                          le=1_000_000)
    # --- optimiser and schedule -----------------------------------------------------------
    optimizer: str = opt("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = opt(1e-3, "peak learning rate", stage=True, gt=0)
    lr_mult: dict = opt({}, "learning-rate multipliers by module name as a JSON object, e.g. '{\"fc8\": 10}': the "
                            "parameters of that module train at lr x 10 (the longest name that holds a parameter wins)")
    momentum: float = opt(0.9, "SGD momentum (Adam/AdamW: beta1)", ge=0, lt=1)
    nesterov: bool = opt(False, "SGD with Nesterov momentum")
    weight_decay: float = opt(0.0, "L2 (SGD, Adam) or decoupled (AdamW) weight decay; not on biases and "
                              "norm weights unless --decay-norm-and-bias", ge=0)
    decay_norm_and_bias: bool = opt(False, "apply weight decay to biases and norm-layer weights too")
    schedule: str = opt("poly", "learning-rate schedule over the configured epochs", choices=SCHEDULES, stage=True)
    poly_power: float = opt(0.9, "poly schedule: lr * (1 - progress) ** power", ge=0)
    milestones: list[float] = opt([], "step schedule: comma-separated epochs at which the lr is multiplied by "
                                  "gamma, e.g. 30,60", metavar="E1,E2")
    gamma: float = opt(0.1, "step schedule: lr multiplier at each milestone", gt=0)
    step_size: int = opt(0, "step schedule: also multiply the lr by gamma every this many optimizer steps of the "
                         "stage (Caffe's `step` policy, gamma^floor(iter / stepsize)); 0: off", stage=True,
                         metavar="ITERS", ge=0)
    warmup_epochs: float = opt(0.0, "linear warm-up length in epochs (may be fractional)", stage=True, ge=0)
    warmup_iters: int = opt(0, "linear warm-up length in optimizer steps (the longer warm-up is used)",
                            stage=True, ge=0)
    warmup_factor: float = opt(0.001, "warm-up starts at lr x this", gt=0)
    ema: float = opt(0.0, "decay of an exponential moving average of the weights, updated after every optimizer "
                     "step (e.g. 0.999; warm-up: min(decay, (1+k)/(10+k)) at step k); validation, best and last "
                     "use the average; 0: off", metavar="DECAY", ge=0, lt=1)
    clip_grad_norm: float | None = opt(None, "clip the global gradient norm to this value", stage=True, gt=0)
    # --- loss -----------------------------------------------------------------------------
    loss: str = opt("ce", "loss (ignore index 255 everywhere)", choices=LOSSES, stage=True)
    class_weights: str = opt("none", "none | median-freq (from the training split) | FILE (.json list or .txt of "
                             "numbers, one per class)", metavar="none|median-freq|FILE")
    class_weight_power: float = opt(1.0, "train with class weights ** this: 0.5 = square root of the median-frequency "
                                    "weights (milder on rare classes), 0 = unweighted", metavar="P", ge=0)
    focal_gamma: float = opt(2.0, "focal loss exponent (0 = cross-entropy)", ge=0)
    aux_weight: float = opt(0.4, "weight of the auxiliary head's loss (models built with aux_loss=True)",
                            stage=True, ge=0)
    weight_map: str = opt("none", "unet: the U-Net paper's border-weighted loss (Eq. 2, w0=10, sigma=5) from the "
                          "connected components of --weight-map-class; --class-weights then give its class term "
                          "w_c (default: balanced per mask) instead of a second factor", choices=WEIGHT_MAPS)
    weight_map_class: int = opt(1, "weight map: the class whose connected components are the objects", ge=0)
    # --- data -----------------------------------------------------------------------------
    classmix: float = opt(0.0, "probability that a training image gets the pixels (and labels) of a random half of "
                          "the classes of the next image in its batch (ClassMix, arXiv:2007.07936); 0: off",
                          metavar="P", stage=True, ge=0, le=1)
    crop: str | None = opt(None, "random training crop HxW (sets augment's crop)", metavar="HxW", stage=True)
    augment: dict = opt({}, "augmentation keys as a JSON object (crop scale flip jitter ignore_index resize elastic "
                        "rotate90), e.g. '{\"scale\": [0.5, 2.0], \"jitter\": false}'", stage=True)
    instance_crops: bool = opt(False, "train on crops centred on object instances (DeconvNet stage 1)", stage=True)
    instance_context: float = opt(1.2, "instance crop = object box scaled by this around its centre", stage=True,
                                    gt=0)
    stages: list[dict] = opt([], "YAML only: [{epochs: 5, lr: 0.01, instance_crops: true}, ...]")
    num_workers: int = opt(0, "DataLoader worker processes", ge=0, le=256)
    # --- machine --------------------------------------------------------------------------
    device: str = opt("cpu", "device (under torchrun: cuda:LOCAL_RANK)", choices=DEVICES)
    amp: str = opt("auto", "mixed precision (fp16: CUDA only, with a gradient scaler)", choices=AMP_MODES)
    channels_last: bool = opt(False, "NHWC memory format for model and inputs")
    sync_bn: bool = opt(False, "SyncBatchNorm under torchrun (CUDA only)")
    seed: int = opt(0, "seed of every random number generator", ge=0, le=MAX_SEED)
    resume: bool = opt(False, "continue the run in OUT from its last.state.safetensors")
    overwrite: bool = opt(False, "train into an OUT that already holds a run, deleting that run's files first "
                          "(without it, or --resume, such an OUT is refused)")
    select_by: str = opt("auto", "validation metric that picks best.safetensors (auto: mIoU; mask_AP for "
                         "instance models; the ISBI errors, lowest wins, need data such as isbi2012)",
                         choices=("auto", *SEMANTIC_SELECT, *INSTANCE_SELECT),
                         metavar="METRIC")
    val_every: int = opt(1, "validate after every N-th epoch (and after the last epoch of each stage and the one "
                         "the time budget ends); best.safetensors is chosen among the validated epochs", ge=1,
                         metavar="N")
    patience: int | None = opt(None, "early stopping: end the run (with stages: the stage) after a validated epoch "
                               "when its last N epochs brought no better --select-by value (none: off); "
                               "best.safetensors stays the best epoch's", metavar="N", stage=True, ge=1)
    # --- logging --------------------------------------------------------------------------
    progress: bool | None = opt(None, "progress bars (--no-progress: never)",
                                default_text="only when stderr is a terminal")
    tensorboard: bool = opt(False, "also log to OUT/tensorboard (needs the tensorboard package)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field by type, range and choice (:func:`check_value`; numbers given as
        text, as YAML reads ``1e-3``, become numbers), then the stages; raise UserError naming
        the first bad value."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f.name, getattr(self, f.name)))
        parse_size(self.crop, "crop")
        check_stages(self.stages)
        if self.stages:
            self.epochs = sum(s["epochs"] for s in self.stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage_configs(self) -> list[tuple[str, TrainConfig]]:
        """[(name, config of that stage)]; a run without ``stages`` is one stage. A stage's keys
        replace the run's, except ``augment``, which merges key by key into the run's (as
        ``--augment`` merges into a recipe's); a stage's own ``augment.crop`` wins over the run's
        ``crop`` (which otherwise sets the crop of every stage)."""
        if not self.stages:
            return [("train", self)]
        out = []
        for i, stage in enumerate(self.stages):
            over = {k: copy.deepcopy(v) for k, v in stage.items() if k != "name"}
            if "augment" in over:
                over["augment"] = {**copy.deepcopy(self.augment), **over["augment"]}
                if "crop" in stage["augment"] and "crop" not in stage:
                    over["crop"] = None
            out.append((stage_name(stage, i), dataclasses.replace(self, stages=[], **over)))
        return out


def stage_name(stage: Mapping[str, Any], index: int) -> str:
    """The name of stage ``index`` (0-based): its ``name``, else ``stage<index + 1>``."""
    return str(stage.get("name", f"stage{index + 1}"))


def check_stages(stages: list, source: str | Path | None = None) -> None:
    """Check the ``stages`` list in place (values checked and converted by :func:`check_value`,
    a stage's ``crop``, its ``name``: text, unique); errors name the stage (and ``source``, the
    file, when given)."""
    prefix = f"{source}: " if source else ""
    if not isinstance(stages, list):
        raise UserError(f"{prefix}stages must be a list, got {stages!r}")
    names: dict[str, int] = {}
    for i, stage in enumerate(stages):
        where = f"{prefix}stage {i + 1}"
        if not isinstance(stage, dict):
            raise UserError(f"{where} must be a mapping, got {stage!r}")
        if "name" in stage:
            if not isinstance(stage["name"], str) or not stage["name"].strip():
                raise UserError(f"{where}: name must be text, got {stage['name']!r}; quote it, e.g. name: \"first\"")
            where = f"{where} ({stage['name']})"
        bad = sorted(set(stage) - set(STAGE_KEYS), key=str)
        if bad:
            raise UserError(f"{where}: key {bad[0]!r} cannot change per stage{did_you_mean(bad[0], STAGE_KEYS)}; "
                            f"stage keys: {', '.join(STAGE_KEYS)}")
        if "epochs" not in stage:
            raise UserError(f"{where} needs a positive integer 'epochs'")
        for key, value in stage.items():
            if key != "name":
                stage[key] = check_value(key, value, f"{where} {key}")
        parse_size(stage.get("crop"), f"{where} crop")
        name = stage_name(stage, i)
        if name in names:
            raise UserError(f"{where}: the name {name!r} is also stage {names[name] + 1}'s; give each stage its own "
                            "name")
        names[name] = i


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``"; did you mean 'epochs'?"`` for the closest of ``options`` to ``word`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _bounds_text(meta: Mapping[str, Any]) -> str:
    bounds = (("ge", ">="), ("gt", ">"), ("lt", "<"), ("le", "<="))
    parts = [f"{op} {meta[key] if isinstance(meta[key], int) else format(meta[key], 'g')}"
             for key, op in bounds if meta.get(key) is not None]
    return " and ".join(parts)


def check_value(name: str, value: Any, where: str | None = None) -> Any:
    """``value`` for field ``name``, checked by the field's type, choices and range -> the value
    (an integral float becomes an int, a number written as text a number). A bad value is a
    UserError ``"<where> must be ..., got ..."`` (``where``: the flag, the file and key, or the
    field name)."""
    f = config_fields()[name]
    where = where or name
    kind, meta = field_kind(name), f.metadata
    optional = type(None) in typing.get_args(_type_hints()[name])
    if name in PATH_KEYS and isinstance(value, os.PathLike):
        value = os.fspath(value)  # a pathlib.Path, as a notebook gives it
    if isinstance(value, str) and not value.strip():  # as a blank flag is: only the word none clears a value
        raise empty_path(where) if name in PATH_KEYS else UserError(
            f"{where} is empty; give a value{' (or none)' if optional else ''}")
    if optional and isinstance(value, str) and value.strip().lower() == "none":
        value = None  # the word --help shows for "not set"
    if value is None:
        if optional:
            return None
        choices = meta["choices"]  # weight_map: null (YAML's none) for weight_map: none
        raise UserError(f"{where} needs a value" + (f": one of {', '.join(map(str, choices))}" if choices else ""))
    bounds = _bounds_text(meta)
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {brief(value)}")
    elif kind in (int, float):
        what = (("an integer" if kind is int else "a number") + (f" {bounds}" if bounds else "")
                + (" or none" if optional else ""))
        number = value
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as text
            try:
                number = float(value) if kind is float else int(value)
            except ValueError:
                raise UserError(f"{where} must be {what}, got {brief(value)}") from None
        if not finite_number(number):
            too_large = isinstance(number, int) and not isinstance(number, bool)  # past a float's 1.8e308
            raise UserError(f"{where} must be {what}, got {brief(value)}" + (", too large a number" if too_large
                                                                              else ""))
        if kind is int:
            if number != int(number):
                raise UserError(f"{where} must be {what}, got {brief(value)}")
            number = int(number)
        else:
            number = float(number)
        ge, gt, lt, le = meta["ge"], meta["gt"], meta["lt"], meta["le"]
        if (ge is not None and not number >= ge) or (gt is not None and not number > gt) or (
                lt is not None and not number < lt) or (le is not None and not number <= le):
            raise UserError(f"{where} must be {what}, got {brief(value)}")
        value = number
    elif kind is str:
        if name == "crop" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # crop: 256 in YAML: 256x256
        if name == "crop" and isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = f"{value[0]}x{value[1]}"  # crop: [256, 320], the form of augment's crop: 256x320
        elif name == "crop" and isinstance(value, list):
            raise UserError(f"{where} must be HxW, one side N or [h, w] (whole numbers), got {brief(value)}")
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted off, no, on, yes as false / true
            example = "off" if value is False and "off" in (meta["choices"] or ()) else "..."
            raise UserError(f"{where} must be text, got {str(value).lower()} (YAML reads an unquoted off, no, on or "
                            f"yes as false or true); quote it, e.g. {name}: \"{example}\"")
        if isinstance(value, datetime.date):  # YAML reads 2026-12-06 as a date
            raise UserError(f"{where} must be text, got {value} (YAML reads it as a date); quote it, e.g. "
                            f"{name}: \"{value}\"")
        if isinstance(value, int | float):  # the text is lost: 1.10 is read as 1.1, 1e-3 as 0.001
            raise UserError(f"{where} must be text, got {value} (YAML reads it as a number); quote it as you wrote "
                            f"it: {name}: \"...\" (unquoted, YAML reads 1.10 as 1.1 and 1e-3 as 0.001)")
        if not isinstance(value, str):
            raise UserError(f"{where} must be text, got {brief(value)}")
        if name in PATH_KEYS:
            value = expanded_home(value, where)
    elif kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, e.g. {{\"key\": 1}}, got {brief(value)}")
        named = [k for k in value if not isinstance(k, str)]  # YAML: 1: 2, on: true, null: 3
        if named:
            raise UserError(f"{where}: key {named[0]!r} is not a name (YAML reads an unquoted on, off, yes, no, "
                            "null or number as a value); quote it or use the option's name")
    elif kind is list and not isinstance(value, list):
        raise UserError(f"{where} must be a list, got {brief(value)}")
    if name == "lr_mult":
        bad = next(((k, v) for k, v in value.items() if not k or not finite_number(v) or v <= 0), None)
        if bad is not None:
            raise UserError(f"{where}: {bad[0]!r}: {bad[1]!r} must be a module name and a multiplier above 0, e.g. "
                            "{\"fc8\": 10}")
        value = {k: float(v) for k, v in value.items()}
    if name == "milestones" and not all(finite_number(m) and m >= 0 for m in value):
        raise UserError(f"{where} must be a list of epochs (numbers >= 0), got {brief(value)}")
    choices = meta["choices"]
    if choices and value not in choices:
        raise UserError(f"{where} {brief(value)} is not one of: {', '.join(choices)}{did_you_mean(value, choices)}")
    return value


# Keys a stage may override (fields declared with stage=True); everything else is fixed for the run.
STAGE_KEYS = ("name", *(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["stage"]))
YAML_ONLY = ("stages",)  # fields without a command-line flag


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def field_kind(name: str) -> type:
    """The value type of field ``name`` without ``None``: bool, int, float, str, dict or list."""
    hint = _type_hints()[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) is not list else hint
    return typing.get_origin(base) or base


def flag_value(name: str, text: str) -> Any:
    """The text of flag ``--name`` -> the field's value: numbers, a JSON object for mappings,
    comma-separated numbers for ``milestones``. A bad value is a UserError naming the flag."""
    flag, kind = f"--{name.replace('_', '-')}", field_kind(name)
    optional = type(None) in typing.get_args(_type_hints()[name])
    if not text.strip():  # an unset shell variable, never "none": --max-pixels ' ' dropped the pixel limit
        raise UserError(f"{flag} is empty; give a value{' (or none)' if optional else ''}")
    if optional and text.strip().lower() == "none":
        return CLEARED  # --max-minutes none: no time budget, whatever the recipe says
    if kind is list and text.strip().lower() == "none":
        return []  # --milestones none: --help shows the empty default so, and a recipe's list is cleared
    if kind is dict:
        return parse_json_dict(text, flag)
    try:
        if kind is list:
            return [_flag_number(m) for m in text.split(",") if m.strip()]
        if kind in (int, float):  # a whole number written 1e9 or 10.0 is an integer, as in YAML (check_value)
            return _flag_number(text)
    except ValueError:
        what = {list: "comma-separated numbers like 30,60", int: "an integer", float: "a number"}[kind]
        raise UserError(f"{flag} must be {what}{' or none' if optional else ''}, got {text!r}") from None
    return text


def _flag_number(text: str) -> int | float:
    """A flag's number: an integer where the text is one, else a float (ValueError if neither)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def flag_values(args: Mapping[str, Any]) -> dict[str, Any]:
    """The train flags given (``None``: not given), converted and checked: field -> value
    (:data:`CLEARED` for ``none`` given to an optional value: it clears the recipe's)."""
    values = {}
    for name in config_fields():
        value = args.get(name)
        if isinstance(value, str):
            value = flag_value(name, value)
        flag = f"--{name.replace('_', '-')}"
        values[name] = value if value is None or value is CLEARED else check_value(name, value, flag)
        if name == "crop" and isinstance(values[name], str):
            parse_size(values[name], flag)
    return values


def default_out(model: str, recipe: str | None = None) -> str:
    """Where a run writes when no ``out`` is given: ``runs/<recipe name>``, else ``runs/<model>``."""
    return f"runs/{recipe or model}"


def bundled_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a bundled recipe (``unet_camvid_cpu``,
    with or without ``.yaml``)."""
    text = str(name_or_path)
    path = Path(name_or_path).expanduser()
    local = [p for p in (path.with_name(path.name + ".yaml"), path.with_name(path.name + ".yml"))
             if path.suffix not in (".yaml", ".yml") and p.is_file()]
    bundled = RECIPES_DIR / f"{path.name.removesuffix('.yaml').removesuffix('.yml')}.yaml"
    bare = path.parent == Path(".") and "/" not in text and os.sep not in text
    if bare and bundled.is_file() and path.is_file() and path.suffix not in (".yaml", ".yml"):
        local = [path]  # ./NAME with no suffix beside the bundled NAME: which one was meant cannot be told
    elif path.is_file():
        return path
    if bare and bundled.is_file():
        if local:  # ./NAME.yaml beside the user (a copy of the recipe to edit?) and the bundled NAME
            raise UserError(f"config {text!r} is both the bundled recipe {bundled.stem} and the file {local[0]}; give "
                            f"--config ./{local[0]} for the file, or --config {bundled} for the bundled recipe")
        return bundled
    if local:
        raise UserError(f"config {text!r} is not a bundled recipe; for the file {local[0]}, give --config "
                        f"{local[0]}")
    names = ", ".join(p.stem for p in bundled_recipes())
    raise UserError(f"config {text!r} is neither a file nor a bundled recipe; bundled: {names}")


def recipe_summary(path: Path) -> dict:
    """``name model dataset description`` of a recipe; the description is its first comment line."""
    values = load_yaml_config(path)
    first = next((line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.startswith("#")), "")
    return {"name": path.stem, "model": values.get("model", "-"), "dataset": values.get("dataset", "-"),
            "description": first.lstrip("#").strip()}


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader for config files, with three changes: a key given twice in one mapping
    is an error (PyYAML keeps the last silently; keys merged in with ``<<:`` may be overridden);
    a number with an exponent but no dot (``1e-3``, which YAML 1.1 reads as text) is a number, as
    in JSON and YAML 1.2; and only decimal digits are an integer (``010``, ``0x1F``, ``1_000``
    and ``1:30`` stay text, where YAML 1.1 reads 8, 31, 1000 and 90)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own construct_mapping refuses it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (also on line {first + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
ConfigLoader.add_implicit_resolver(FLOAT_TAG, re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                   list("-+0123456789."))


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes the text :class:`ConfigLoader` would read as a number
    (``1e-3``, which YAML 1.1 and so ``safe_dump`` leave plain), so that a run's config.yaml
    reads back as it was written (``--out 1e-3`` of a learning-rate sweep)."""


for _first, _resolvers in ConfigLoader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        if _tag in (INT_TAG, FLOAT_TAG) and (_tag, _regexp) not in ConfigDumper.yaml_implicit_resolvers.get(_first, []):
            ConfigDumper.add_implicit_resolver(_tag, _regexp, [_first])


def dump_config(settings: dict) -> str:
    """``settings`` as YAML that :class:`ConfigLoader` reads back equal."""
    return yaml.dump(settings, Dumper=ConfigDumper, sort_keys=False)


def yaml_error_text(path: str | Path, error: yaml.YAMLError) -> str:
    """PyYAML's error -> one line ``FILE line L column C: <problem> (<context>)``."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None)
    if not problem:
        return f"{path} is not valid YAML: {str(error).splitlines()[0]}"
    context = getattr(error, "context", None)
    if "'\\t'" in problem:
        problem, context = "a tab cannot start a token (indent with spaces)", None
    elif "tab" in problem:
        problem += " (indent with spaces)"
    where = f"{path} line {mark.line + 1} column {mark.column + 1}" if mark else f"{path}"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def load_yaml_config(path: str | Path, run_record: bool = False) -> dict:
    """Read a YAML recipe: a mapping whose keys are TrainConfig fields (unknown keys are errors).
    ``overwrite``/``resume`` are choices of the command, refused as keys (a false value, as older
    runs recorded, is dropped); ``run_record``: the file is a run's own config.yaml (read by a
    resume), whose recorded ones are dropped whatever their value."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=ConfigLoader) or {}  # noqa: S506
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(yaml_error_text(path, e)) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    for key in data:
        if not isinstance(key, str):  # YAML 1.1 reads on/off/yes/no as booleans, 1 as a number, null as None
            raise UserError(f"{path}: config key {key!r} is not a name (YAML reads an unquoted on, off, yes, no, "
                            "null or number as a value); the keys are the train flags' names, e.g. epochs, lr")
    folded: dict[str, str] = {}
    for key in data:
        other = folded.setdefault(key.replace("-", "_"), key)
        if other != key:
            raise UserError(f"{path}: key {key.replace('-', '_')!r} is given twice ({other} and {key}); keep one")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(config_fields()))
    if unknown:
        hint = did_you_mean(unknown[0], config_fields()) or f"; valid keys: {', '.join(config_fields())}"
        raise UserError(f"{path}: unknown config key {unknown[0]!r}{hint}")
    for key in COMMAND_ONLY:
        if key in data and data[key] is not False and not run_record:
            raise UserError(f"{path}: {key} is a choice of the command, not a setting of the run: remove it, and "
                            f"pass --{key} when you mean it")
        data.pop(key, None)
    for key, value in data.items():
        if key != "stages":
            data[key] = check_value(key, value, f"{path}: {key}")
    parse_size(data.get("crop"), f"{path}: crop")
    if "stages" in data:
        data["stages"] = check_value("stages", data["stages"], f"{path}: stages")
        check_stages(data["stages"], path)
        total = sum(s["epochs"] for s in data["stages"])
        if data["stages"] and data.get("epochs", total) != total:
            parts = " + ".join(str(s["epochs"]) for s in data["stages"])
            raise UserError(f"{path}: epochs {data['epochs']}: the run's length is its stages' epochs ({parts} = "
                            f"{total}); remove epochs, or change a stage's epochs")
    return data


# the examples of the fields' help, for the message about a flag whose value is not JSON
JSON_EXAMPLES = {"model_kwargs": '{"base_channels": 32}', "dataset_kwargs": '{"num_train": 200}',
                 "lr_mult": '{"fc8": 10}', "augment": '{"scale": [0.5, 2.0], "jitter": false}'}


def parse_json_dict(text: str | None, flag: str) -> dict:
    if text is None:
        return {}
    if not text.strip():  # an unset shell variable: not "no options" without a word
        example = JSON_EXAMPLES.get(flag.lstrip("-").replace("-", "_"), '{"key": 1}')
        raise UserError(f"{flag} is empty; give a JSON object such as '{example}', or leave the flag out")

    def once(pairs: list[tuple[str, Any]]) -> dict:  # the last of two would win without a word (YAML refuses it)
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise UserError(f"{flag}: key {twice!r} is given twice; give it once")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=once)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[... nested too deep
        example = JSON_EXAMPLES.get(flag.lstrip("-").replace("-", "_"), '{"key": 1}')
        raise UserError(f"{flag} must be a JSON object, e.g. '{example}' ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def build_config(file_values: dict, cli_values: dict, recipe: str | None = None,
                 source: str | Path | None = None) -> TrainConfig:
    """Defaults < YAML file < command line (only flags actually given; :data:`CLEARED`, from
    ``--max-minutes none``, clears the file's value). The dict-valued keys (``model_kwargs lr_mult
    dataset_kwargs augment``) merge key by key, except that a ``--model`` other than the file's
    (or the default model, where the file names none) drops the file's ``model_kwargs`` and
    ``lr_mult`` (they name options and layers of the other model), and a ``--dataset`` other than
    the file's its ``dataset_kwargs``. A flag for a key that a stage of the file sets itself is refused (the
    stage's value would win; :func:`check_flags_against_stages`). Without ``out`` the run writes
    to :func:`default_out` (``runs/<recipe>``, or ``runs/<model>``). ``source``: the file, for
    the messages."""
    for key, kwargs in (("model", "model_kwargs"), ("model", "lr_mult"), ("dataset", "dataset_kwargs")):
        given = cli_values.get(key)
        if given is not None and kwargs in file_values and given != file_values.get(key, getattr(TrainConfig, key)):
            file_values = {k: v for k, v in file_values.items() if k != kwargs}
    check_flags_against_stages(file_values.get("stages") or [], cli_values, source)
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    merged = {k: None if v is CLEARED else v for k, v in merged.items()}
    for key in ("model_kwargs", "lr_mult", "dataset_kwargs", "augment"):
        if isinstance(file_values.get(key), dict) and cli_values.get(key) is not None:
            merged[key] = {**file_values[key], **cli_values[key]}
    if "crop" in (cli_values.get("augment") or {}) and cli_values.get("crop") is None:
        merged.pop("crop", None)  # --augment '{"crop": ...}' beats the file's crop (which sets augment's crop)
    if cli_values.get("crop") is CLEARED and isinstance(merged.get("augment"), dict) and "crop" in merged["augment"]:
        # --crop none clears the crop however the file set it (most recipes: augment: {crop: ...})
        merged["augment"] = {k: v for k, v in merged["augment"].items() if k != "crop"}
    if merged.get("out") is None:
        merged["out"] = default_out(merged.get("model", TrainConfig.model), recipe)
    unknown = sorted(set(merged) - set(config_fields()))
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r}{did_you_mean(unknown[0], config_fields())}")
    cfg = TrainConfig(**merged)
    asked = None if cli_values.get("epochs") is CLEARED else cli_values.get("epochs")
    if cfg.stages and asked is not None and asked != cfg.epochs:  # the stages' epochs are the run's length
        parts = " + ".join(str(s["epochs"]) for s in cfg.stages)
        raise UserError(f"--epochs {asked}: this run has stages, and its length is their epochs ({parts} = "
                        f"{cfg.epochs}); change a stage's epochs in the recipe (stages: [{{epochs: N, ...}}, ...]) "
                        "instead")
    return cfg


def _shown(value: Any) -> str:
    """A value as YAML writes it: true, null, 0.01, [16, 16]."""
    return json.dumps(value) if isinstance(value, bool | None | list | dict) else str(value)


def check_flags_against_stages(stages: Sequence[Mapping[str, Any]], cli_values: Mapping[str, Any],
                               source: str | Path | None = None) -> None:
    """A flag for a stage key (``--lr``) that a stage sets itself is a UserError naming the stages
    and their values: the stage's value would win, and config.yaml record the flag as if it had
    acted. A flag for a key no stage sets applies to every stage (through the run's value). The
    ``--augment`` keys count one by one; ``--crop`` and ``--augment '{"crop": ...}'`` both set a
    stage's crop. (``--epochs`` has its own check: it must equal the stages' sum.)"""
    if not stages:
        return
    where = f"in the recipe ({source})" if source else "in the recipe"
    refusals: list[tuple[str, str, list[str]]] = []  # (flag, what, ["stage: value"])
    for key, value in cli_values.items():
        if value is None or key in ("epochs", "name", "augment") or key not in STAGE_KEYS:
            continue
        if key == "crop":
            found = [f"{stage_name(s, i)}: {_shown(s['crop'])}" if "crop" in s else
                     f"{stage_name(s, i)}: augment crop {_shown(s['augment']['crop'])}"
                     for i, s in enumerate(stages)
                     if "crop" in s or (isinstance(s.get("augment"), dict) and "crop" in s["augment"])]
            refusals.append(("--crop", "the crop", found))
        else:
            found = [f"{stage_name(s, i)}: {_shown(s[key])}" for i, s in enumerate(stages) if key in s]
            refusals.append((f"--{key.replace('_', '-')}", key, found))
    for sub in cli_values.get("augment") or {}:
        found = [f"{stage_name(s, i)}: {_shown(s['augment'][sub])}" for i, s in enumerate(stages)
                 if isinstance(s.get("augment"), dict) and sub in s["augment"]]
        if sub == "crop":
            found += [f"{stage_name(s, i)}: crop {_shown(s['crop'])}" for i, s in enumerate(stages) if "crop" in s]
        refusals.append((f"--augment {sub}", f"augment {sub}", found))
    for flag, what, found in refusals:
        if found:
            raise UserError(f"{flag}: this recipe's stages set {what} ({', '.join(found)}); change them {where}, or "
                            "give the stages in your own --config")


def parse_size(text: str | int | None, what: str = "size", limit: int | None = MAX_INPUT_PIXELS
               ) -> tuple[int, int] | None:
    """ "HxW" (or a single N for NxN) -> (H, W) of at most ``limit`` pixels; ``what`` names the
    value in the error."""
    if text in (None, ""):
        return None
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        raise UserError(f"{what} {text!r} must look like 256x320 or 256") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UserError(f"{what} {text!r} must look like 256x320 or 256 (positive sides)")
    if limit is not None and parts[0] * parts[1] > limit:  # it would fail inside OpenCV: out of memory, past a C long
        raise UserError(f"{what} {text!r} is {parts[0] * parts[1]:,} pixels, above {limit:,}; give a size in pixels "
                        "of the images")
    return parts[0], parts[1]
