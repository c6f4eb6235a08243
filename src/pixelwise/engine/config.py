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
import difflib
import functools
import json
import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pixelwise.errors import UserError

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
                          stage=True, ge=1)
    accumulate: int = opt(1, "gradient accumulation: micro-batches per optimizer step", stage=True, ge=1)
    # --- optimiser and schedule -----------------------------------------------------------
    optimizer: str = opt("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = opt(1e-3, "peak learning rate", stage=True, gt=0)
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
    num_workers: int = opt(0, "DataLoader worker processes", ge=0)
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
        if not all(isinstance(m, int | float) and not isinstance(m, bool) and m >= 0 for m in self.milestones):
            raise UserError(f"milestones must be a list of epochs (numbers >= 0), got {self.milestones!r}")
        parse_size(self.crop, "crop")
        for i, stage in enumerate(self.stages):
            where = f"stage {i + 1}"
            if not isinstance(stage, dict):
                raise UserError(f"{where} must be a mapping, got {stage!r}")
            bad = sorted(set(stage) - set(STAGE_KEYS), key=str)
            if bad:
                raise UserError(f"{where}: key {bad[0]!r} cannot change per stage{did_you_mean(bad[0], STAGE_KEYS)}; "
                                f"stage keys: {', '.join(STAGE_KEYS)}")
            if "epochs" not in stage:
                raise UserError(f"{where} needs a positive integer 'epochs'")
            for key, value in stage.items():
                if key != "name":
                    stage[key] = check_value(key, value, f"{where} {key}")
        if self.stages:
            self.epochs = sum(s["epochs"] for s in self.stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage_configs(self) -> list[tuple[str, TrainConfig]]:
        """[(name, config of that stage)]; a run without ``stages`` is one stage."""
        if not self.stages:
            return [("train", self)]
        out = []
        for i, stage in enumerate(self.stages):
            over = {k: copy.deepcopy(v) for k, v in stage.items() if k != "name"}
            out.append((str(stage.get("name", f"stage{i + 1}")), dataclasses.replace(self, stages=[], **over)))
        return out


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
    hint = _type_hints()[name]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise UserError(f"{where} needs a value")
    bounds = _bounds_text(meta)
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
    elif kind in (int, float):
        what = ("an integer" if kind is int else "a number") + (f" {bounds}" if bounds else "")
        number = value
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as text
            try:
                number = float(value) if kind is float else int(value)
            except ValueError:
                raise UserError(f"{where} must be {what}, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise UserError(f"{where} must be {what}, got {value!r}")
        if kind is int:
            if number != int(number):
                raise UserError(f"{where} must be {what}, got {value!r}")
            number = int(number)
        else:
            number = float(number)
        ge, gt, lt, le = meta["ge"], meta["gt"], meta["lt"], meta["le"]
        if (ge is not None and not number >= ge) or (gt is not None and not number > gt) or (
                lt is not None and not number < lt) or (le is not None and not number <= le):
            raise UserError(f"{where} must be {what}, got {value!r}")
        value = number
    elif kind is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # e.g. crop: 256 in YAML
        if not isinstance(value, str):
            raise UserError(f"{where} must be text, got {value!r}")
    elif kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, e.g. {{\"key\": 1}}, got {value!r}")
        named = [k for k in value if not isinstance(k, str)]  # YAML: 1: 2, on: true, null: 3
        if named:
            raise UserError(f"{where}: key {named[0]!r} is not a name (YAML reads an unquoted on, off, yes, no, "
                            "null or number as a value); quote it or use the option's name")
    elif kind is list and not isinstance(value, list):
        raise UserError(f"{where} must be a list, got {value!r}")
    choices = meta["choices"]
    if choices and value not in choices:
        raise UserError(f"{where} {value!r} is not one of: {', '.join(choices)}{did_you_mean(value, choices)}")
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
    if kind is dict:
        return parse_json_dict(text, flag)
    try:
        if kind is list:
            return [float(m) if "." in m else int(m) for m in text.split(",") if m.strip()]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        what = {list: "comma-separated numbers like 30,60", int: "an integer", float: "a number"}[kind]
        raise UserError(f"{flag} must be {what}, got {text!r}") from None
    return text


def flag_values(args: Mapping[str, Any]) -> dict[str, Any]:
    """The train flags given (``None``: not given), converted and checked: field -> value."""
    values = {}
    for name in config_fields():
        value = args.get(name)
        if isinstance(value, str):
            value = flag_value(name, value)
        values[name] = None if value is None else check_value(name, value, f"--{name.replace('_', '-')}")
    return values


def default_out(model: str, recipe: str | None = None) -> str:
    """Where a run writes when no ``out`` is given: ``runs/<recipe name>``, else ``runs/<model>``."""
    return f"runs/{recipe or model}"


def bundled_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a bundled recipe (``unet_camvid_cpu``,
    with or without ``.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    names = ", ".join(p.stem for p in bundled_recipes())
    raise UserError(f"config {str(name_or_path)!r} is neither a file nor a bundled recipe; bundled: {names}")


def recipe_summary(path: Path) -> dict:
    """``name model dataset description`` of a recipe; the description is its first comment line."""
    values = load_yaml_config(path)
    first = next((line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.startswith("#")), "")
    return {"name": path.stem, "model": values.get("model", "-"), "dataset": values.get("dataset", "-"),
            "description": first.lstrip("#").strip()}


def load_yaml_config(path: str | Path) -> dict:
    """Read a YAML recipe: a mapping whose keys are TrainConfig fields (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    for key in data:
        if not isinstance(key, str):  # YAML 1.1 reads on/off/yes/no as booleans, 1 as a number, null as None
            raise UserError(f"{path}: config key {key!r} is not a name (YAML reads an unquoted on, off, yes, no, "
                            "null or number as a value); the keys are the train flags' names, e.g. epochs, lr")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(config_fields()))
    if unknown:
        hint = did_you_mean(unknown[0], config_fields()) or f"; valid keys: {', '.join(config_fields())}"
        raise UserError(f"{path}: unknown config key {unknown[0]!r}{hint}")
    for key, value in data.items():
        if key != "stages":  # checked with the whole config, where each stage is named
            data[key] = check_value(key, value, f"{path}: {key}")
    return data


# the examples of the fields' help, for the message about a flag whose value is not JSON
JSON_EXAMPLES = {"model_kwargs": '{"base_channels": 32}', "dataset_kwargs": '{"num_train": 200}',
                 "augment": '{"scale": [0.5, 2.0], "jitter": false}'}


def parse_json_dict(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        example = JSON_EXAMPLES.get(flag.lstrip("-").replace("-", "_"), '{"key": 1}')
        raise UserError(f"{flag} must be a JSON object, e.g. '{example}' ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def build_config(file_values: dict, cli_values: dict, recipe: str | None = None) -> TrainConfig:
    """Defaults < YAML file < command line (only flags actually given). The dict-valued keys
    (``model_kwargs dataset_kwargs augment``) merge key by key, except that a ``--model`` other
    than the file's drops the file's ``model_kwargs`` (they are options of the other model).
    Without ``out`` the run writes to :func:`default_out` (``runs/<recipe>``, or ``runs/<model>``)."""
    model = cli_values.get("model")
    if model is not None and "model" in file_values and model != file_values["model"]:
        file_values = {k: v for k, v in file_values.items() if k != "model_kwargs"}
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    for key in ("model_kwargs", "dataset_kwargs", "augment"):
        if isinstance(file_values.get(key), dict) and cli_values.get(key) is not None:
            merged[key] = {**file_values[key], **cli_values[key]}
    if merged.get("out") is None:
        merged["out"] = default_out(merged.get("model", TrainConfig.model), recipe)
    unknown = sorted(set(merged) - set(config_fields()))
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r}{did_you_mean(unknown[0], config_fields())}")
    cfg = TrainConfig(**merged)
    asked = cli_values.get("epochs")
    if cfg.stages and asked is not None and asked != cfg.epochs:  # the stages' epochs are the run's length
        parts = " + ".join(str(s["epochs"]) for s in cfg.stages)
        raise UserError(f"--epochs {asked}: this run has stages, and its length is their epochs ({parts} = "
                        f"{cfg.epochs}); change a stage's epochs in the recipe (stages: [{{epochs: N, ...}}, ...]) "
                        "instead")
    return cfg


def parse_size(text: str | int | None, what: str = "size") -> tuple[int, int] | None:
    """ "HxW" (or a single N for NxN) -> (H, W); ``what`` names the value in the error."""
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
    return parts[0], parts[1]
