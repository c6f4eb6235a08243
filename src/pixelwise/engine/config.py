"""Typed training configuration. YAML keys and CLI long flags map onto these fields one to one
(``max_minutes`` <-> ``--max-minutes``). Defaults < YAML file < command line.

Nothing inherits from anything: a recipe is one flat mapping of these keys, plus an optional
``stages:`` list whose items override a few keys (:data:`STAGE_KEYS`) for a number of epochs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pixelwise.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("poly", "cosine", "step", "constant")
LOSSES = ("ce", "dice", "focal", "lovasz", "ce+dice")
AMP_MODES = ("auto", "off", "bf16", "fp16")
# validation metrics that can pick best.safetensors (higher is better); auto: mIoU, or mask_AP
SEMANTIC_SELECT = ("pixel_acc", "mean_acc", "mIoU", "fwIoU", "dice")
INSTANCE_SELECT = ("mask_AP", "mask_AP50", "mask_AP75", "box_AP")
# Keys a stage may override; everything else is fixed for the whole run.
STAGE_KEYS = ("name", "epochs", "lr", "batch_size", "crop", "augment", "instance_crops", "instance_context",
              "schedule", "warmup_epochs", "warmup_iters", "loss", "aux_weight", "accumulate", "clip_grad_norm")


@dataclass
class TrainConfig:
    # --- what to train, on what, where to write -------------------------------------------
    model: str = "unet"  # registry name, see `pixelwise models`
    dataset: str = "shapes"  # dataset kind (shapes, camvid, voc, ...)
    data: str | None = None  # dataset root folder (unused for shapes)
    out: str = "runs/train"  # output folder for checkpoints and metrics
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments, e.g. base_channels
    dataset_kwargs: dict = field(default_factory=dict)  # extra reader arguments, e.g. num_train
    pretrained: str | None = None  # imagenet | path to weights
    train_split: str = "train"
    val_split: str = "val"
    skip_invalid: bool = False  # drop invalid files instead of refusing to train
    # --- length ---------------------------------------------------------------------------
    epochs: int = 10  # passes over the training split (with stages: the sum of the stages' epochs)
    max_minutes: float | None = None  # time budget; the schedule anneals by max(step, time) fraction
    batch_size: int = 8  # images per step per process (x accumulate x processes = effective batch)
    accumulate: int = 1  # gradient accumulation: micro-batches per optimizer step
    # --- optimiser and schedule -----------------------------------------------------------
    optimizer: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # SGD momentum (Adam/AdamW: beta1)
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: float = 0.0  # L2 (SGD, Adam) or decoupled (AdamW) decay
    decay_norm_and_bias: bool = False  # false: no weight decay on biases and norm-layer weights
    schedule: str = "poly"  # poly | cosine | step | constant, over the configured epochs
    poly_power: float = 0.9  # poly: lr * (1 - progress) ** power
    milestones: list = field(default_factory=list)  # step: epochs at which lr is multiplied by gamma
    gamma: float = 0.1  # step: multiplier at each milestone
    warmup_epochs: float = 0.0  # linear warm-up length in epochs (may be fractional) ...
    warmup_iters: int = 0  # ... or in optimizer steps (the longer of the two is used)
    warmup_factor: float = 0.001  # warm-up starts at lr * warmup_factor
    clip_grad_norm: float | None = None  # clip the global gradient norm to this value
    # --- loss -----------------------------------------------------------------------------
    loss: str = "ce"  # ce | dice | focal | lovasz | ce+dice (ignore index 255 everywhere)
    class_weights: str = "none"  # none | median-freq (from the training split) | FILE (.json list or .txt)
    focal_gamma: float = 2.0  # focal loss exponent (0 = cross-entropy)
    aux_weight: float = 0.4  # weight of the auxiliary head's loss (models built with aux_loss=True)
    weight_map: str = "none"  # none | unet: the U-Net paper's per-pixel weights (Eq. 2, w0=10, sigma=5)
    weight_map_class: int = 1  # weight_map: the class whose connected components are the objects
    # --- data -----------------------------------------------------------------------------
    crop: str | None = None  # "HxW" random training crop; sets augment.crop
    augment: dict = field(default_factory=dict)  # keys of data.augment.build_transform (crop, scale, ...)
    instance_crops: bool = False  # train on crops centred on object instances (DeconvNet stage 1)
    instance_context: float = 1.2  # instance crop = object box scaled by this around its centre
    stages: list = field(default_factory=list)  # [{epochs: 5, lr: 0.01, instance_crops: true}, ...]
    num_workers: int = 0  # DataLoader worker processes
    # --- machine --------------------------------------------------------------------------
    device: str = "cpu"  # cpu | cuda (under torchrun: cuda:LOCAL_RANK)
    amp: str = "auto"  # auto | off | bf16 | fp16 (fp16: CUDA only, with a gradient scaler)
    channels_last: bool = False  # NHWC memory format for model and inputs
    sync_bn: bool = False  # under torchrun: convert BatchNorm to SyncBatchNorm
    seed: int = 0
    resume: bool = False  # continue from out/last.state.safetensors
    select_by: str = "auto"  # validation metric that picks best.safetensors: auto (mIoU; mask_AP for
    # instance models) | pixel_acc | mean_acc | mIoU | fwIoU | dice | mask_AP | mask_AP50 | mask_AP75 | box_AP
    # --- logging --------------------------------------------------------------------------
    progress: bool = True  # show progress bars
    tensorboard: bool = False  # also log to out/tensorboard (needs the tensorboard package)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first bad value."""
        for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES),
                             ("amp", AMP_MODES), ("weight_map", ("none", "unet")),
                             ("select_by", ("auto", *SEMANTIC_SELECT, *INSTANCE_SELECT))):
            if getattr(self, key) not in choices:
                raise UserError(f"{key} {getattr(self, key)!r} is not one of: {', '.join(choices)}")
        for key in ("epochs", "batch_size", "accumulate"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{key} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise UserError(f"clip_grad_norm must be positive, got {self.clip_grad_norm}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"max_minutes must be positive, got {self.max_minutes}")
        if not isinstance(self.milestones, list) or not all(isinstance(m, int | float) for m in self.milestones):
            raise UserError(f"milestones must be a list of epochs, got {self.milestones!r}")
        if not isinstance(self.augment, dict):
            raise UserError(f"augment must be a mapping of augmentation keys, got {self.augment!r}")
        if not isinstance(self.stages, list):
            raise UserError("stages must be a list of mappings, e.g. [{epochs: 5, instance_crops: true}]")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, dict):
                raise UserError(f"stage {i + 1} must be a mapping, got {stage!r}")
            bad = sorted(set(stage) - set(STAGE_KEYS))
            if bad:
                raise UserError(f"stage {i + 1}: key {bad[0]!r} cannot change per stage; "
                                f"stage keys: {', '.join(STAGE_KEYS)}")
            if not isinstance(stage.get("epochs"), int) or stage["epochs"] < 1:
                raise UserError(f"stage {i + 1} needs a positive integer 'epochs'")
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
            over = {k: v for k, v in stage.items() if k != "name"}
            out.append((str(stage.get("name", f"stage{i + 1}")), dataclasses.replace(self, stages=[], **over)))
        return out


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_yaml_config(path: str | Path) -> dict:
    """Read a YAML recipe: a mapping whose keys are TrainConfig fields (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(config_fields()))
    if unknown:
        raise UserError(f"{path}: unknown config key {unknown[0]!r}; valid keys: {', '.join(config_fields())}")
    return data


def parse_json_dict(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} must be a JSON object, e.g. '{{\"base_channels\": 32}}' ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def build_config(file_values: dict, cli_values: dict) -> TrainConfig:
    """Defaults < YAML file < command line (only flags actually given). The dict-valued keys
    (``model_kwargs dataset_kwargs augment``) merge key by key."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    for key in ("model_kwargs", "dataset_kwargs", "augment"):
        if isinstance(file_values.get(key), dict) and cli_values.get(key) is not None:
            merged[key] = {**file_values[key], **cli_values[key]}
    try:
        return TrainConfig(**merged)
    except TypeError as e:
        raise UserError(f"bad training config: {e}") from None


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """ "HxW" (or a single N for NxN) -> (H, W)."""
    if text in (None, ""):
        return None
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        raise UserError(f"size {text!r} must look like 256x320 or 256") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UserError(f"size {text!r} must look like 256x320 or 256")
    return parts[0], parts[1]
