"""Typed training configuration. YAML keys and CLI long flags map onto these fields one to one."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pixelwise.errors import UserError


@dataclass
class TrainConfig:
    model: str = "unet"  # registry name, see `pixelwise models`
    dataset: str = "shapes"  # dataset kind (shapes, camvid, voc, ...)
    data: str | None = None  # dataset root folder (unused for shapes)
    out: str = "runs/train"  # output folder for checkpoints and metrics
    epochs: int = 10  # number of passes over the training split
    max_minutes: float | None = None  # time budget; ends cleanly with evaluation and checkpoints
    batch_size: int = 8
    lr: float = 1e-3  # peak learning rate
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0
    schedule: str = "poly"  # poly (power 0.9) | constant
    crop: str | None = None  # "HxW" random training crop; None = whole images
    pretrained: str | None = None  # imagenet | path to weights
    resume: bool = False  # continue from out/last.safetensors and its training state
    seed: int = 0
    device: str = "cpu"  # cpu | cuda
    num_workers: int = 0  # DataLoader worker processes
    train_split: str = "train"
    val_split: str = "val"
    skip_invalid: bool = False  # drop invalid files instead of refusing to train
    progress: bool = True  # show progress bars
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments, e.g. base_channels
    dataset_kwargs: dict = field(default_factory=dict)  # extra reader arguments, e.g. num_train

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    """Defaults < YAML file < command line (only flags actually given)."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    for key in ("model_kwargs", "dataset_kwargs"):
        if key in file_values and key in cli_values and cli_values[key] is not None:
            merged[key] = {**file_values[key], **cli_values[key]}
    try:
        return TrainConfig(**merged)
    except TypeError as e:
        raise UserError(f"bad training config: {e}") from None


def parse_size(text: str | None) -> tuple[int, int] | None:
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
