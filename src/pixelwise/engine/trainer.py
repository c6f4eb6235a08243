"""The training loop, as a few named steps over a typed :class:`TrainState`::

    fit(cfg)
      run = setup_run(cfg)           datasets, model, optimizer, precision, input contract, class weights
      state = resume(run)            or a fresh TrainState
      for stage in plan_stages(run):
          run_stage(run, state, stage)
            train_one_epoch(...)     optimizer steps over one epoch (or the rest of it)
            evaluate(run)            validation through the input contract, at full resolution
            save_epoch(...)          best / last / training state / metrics.csv
      finish(run, state)             metrics.csv and metrics.json from the state

A :class:`Run` holds what the run is built from and does not change while it trains; the
:class:`TrainState` holds where it stands (counters, best score, metrics rows, RNG states) and
is what ``last.state.safetensors`` stores besides the weights, optimizer and grad scaler.

Never losing work:
- every file is written atomically (temporary file + rename), so ``kill -9`` at any moment leaves
  the previous complete files. The training state is the commit point of an epoch: ``best`` and
  ``last`` are written before it and ``metrics.csv`` (derived from its rows) after it, and a
  resumed run rewrites ``metrics.csv`` from the state, so a kill between the two cannot leave a
  stale table;
- Ctrl-C (SIGINT) writes ``last`` + state at the last finished optimizer step, mid-epoch
  included, and raises ``KeyboardInterrupt`` (the CLI exits 130). ``--resume`` then continues the
  epoch with the batches not yet seen, in the same order;
- a NaN/inf loss stops the run with one line naming the epoch and step; nothing is written, so
  the last good checkpoint stays.

Determinism: every epoch re-seeds all RNGs from ``(seed, epoch, rank)`` and the data order comes
from a generator seeded the same way, and each sample's augmentation is seeded from the epoch and
its index (:class:`SampleSeeded`), so a resumed run reproduces an uninterrupted one exactly, with
DataLoader workers or without (and a run gives the same weights with any ``num_workers``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import functools
import glob
import inspect
import json
import math
import operator
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset

from pixelwise.backbones import FrozenBatchNorm2d
from pixelwise.checkpoint import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    file_version,
    load_train_state,
    model_input_spec,
    read_checkpoint,
    save_checkpoint,
    save_train_state,
)
from pixelwise.data import SegmentationDataset, build_dataset, collate, scoring_kwargs
from pixelwise.data.augment import build_transform, resize_of
from pixelwise.data.base import Compose
from pixelwise.data.files import split_fingerprint, split_ref
from pixelwise.data.inspect import image_sizes, inspect_dataset, label_presence
from pixelwise.data.instance_crop import InstanceCrop
from pixelwise.data.io import set_max_image_pixels
from pixelwise.data.mix import class_mix
from pixelwise.data.weightmap import UNetWeightMap
from pixelwise.engine import distributed as dist
from pixelwise.engine.config import (
    COMMAND_ONLY,
    INSTANCE_SELECT,
    LOWER_IS_BETTER,
    SEMANTIC_SELECT,
    ConfigLoader,
    TrainConfig,
    default_out,
    dump_config,
    load_yaml_config,
    parse_size,
)
from pixelwise.engine.ema import WeightAverage
from pixelwise.engine.optim import Schedule, apply_lr, build_optimizer, param_groups, set_peak_lr
from pixelwise.engine.precision import autocast, resolve_amp
from pixelwise.engine.validate import ScoredInstances, eval_collate, to_device, validate_instances, validate_semantic
from pixelwise.errors import UserError, finite, finite_number, listed, shown
from pixelwise.losses import LossSpec, combined_loss
from pixelwise.models import create_model, model_info, model_outputs
from pixelwise.models.registry import check_model_kwargs, model_options
from pixelwise.preprocess import InputSpec
from pixelwise.runtime import HeldSignals, available_memory, check_can_create, progress, show_progress, signals_ignored
from pixelwise.sample import IGNORE_INDEX
from pixelwise.weights import saved_meta

RngState = tuple[dict[str, torch.Tensor], dict]  # (tensors, JSON-able values) of every RNG
PRETRAINED_TAGS = ("imagenet", "coco")  # published weights a builder downloads by name


# --- randomness -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int, max_pixels: int | None = None) -> None:
    if max_pixels is not None:
        set_max_image_pixels(max_pixels)  # a spawned worker does not inherit the parent's limit
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 100003 + epoch) * 1009 + rank if rank else seed * 100003 + epoch


def rng_snapshot() -> RngState:
    """Every RNG state as (tensors, JSON-able dict): torch CPU, CUDA, numpy, python."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [py[0], list(py[1]), py[2]]}


def rng_restore(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith("rng.cuda.")}
    if cuda and torch.cuda.is_available():  # by device number (rng.cuda.10 after .2), for the devices there are
        for index, value in cuda.items():
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(value, index)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))


# --- the state of a run -------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where a run stands. Counters count what is finished; everything but ``rng`` is JSON
    (:meth:`to_json`), saved with the weights in ``last.state.safetensors``."""

    selected_by: str = "mIoU"  # the validation metric that picks best.safetensors
    amp: str = "off"  # the precision the run trains in (kept on resume)
    epoch: int = 0  # epochs finished, over all stages
    step: int = 0  # optimizer steps finished, over all stages
    stage: int = 0  # index of the stage in progress
    stage_epoch: int = 0  # epochs finished in that stage
    stage_step: int = 0  # optimizer steps finished in that stage (its schedule's position)
    stage_start_s: float = 0.0  # elapsed seconds when that stage began (its share of the time budget)
    stage_stopped: bool = False  # that stage ended on its time budget: a resume moves on
    time_stopped: bool = False  # an earlier stage ended on its time budget (the run moved on past it)
    stage_epoch_steps: int = 0  # optimizer steps of one whole epoch of that stage (0: a state of before)
    batch: int = 0  # micro-batches finished in the epoch in progress (0 between epochs)
    processes: int = 1  # processes that trained it (torchrun's world size): they share out an epoch's images
    loss_sum: float = 0.0  # sum of loss x images over the finished steps of the epoch in progress
    images: int = 0  # images in loss_sum
    lr: float = 0.0  # learning rate of the latest step
    best_score: float = -math.inf  # best value of selected_by so far, negated if lower is better
    best_epoch: int | None = None  # the epoch of best.safetensors
    elapsed_s: float = 0.0  # training wall time, across resumes
    rows: list[dict] = field(default_factory=list)  # metrics.csv: one row per finished epoch
    rng: RngState | None = None  # every RNG state after the latest step or epoch

    def to_json(self) -> dict:
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "rng"}
        if values["best_score"] == -math.inf:  # JSON has no infinity
            values["best_score"] = None
        return values

    @classmethod
    def from_json(cls, values: dict) -> TrainState:
        """The inverse of :meth:`to_json`; keys it does not know (e.g. ``rng``) are left out and
        missing ones (state files of older versions) keep their defaults."""
        known = {f.name for f in fields(cls)} - {"rng"}
        state = cls(**{k: v for k, v in values.items() if k in known})
        if state.best_score is None:
            state.best_score = -math.inf
        if problem := state.problem():
            raise ValueError(problem)
        return state

    def problem(self) -> str | None:
        """The first field of a state read back that is not what this class writes (a damaged or
        edited file: it would fail halfway through training, after config.yaml was written), or None."""
        def count(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        checks = {**dict.fromkeys(("epoch", "step", "stage", "stage_epoch", "stage_step", "stage_epoch_steps",
                                   "batch", "images"), (count, "a whole number >= 0")),
                  "processes": (lambda v: count(v) and v >= 1, "a whole number >= 1"),
                  **dict.fromkeys(("stage_start_s", "loss_sum", "lr", "elapsed_s"), (finite_number, "a number")),
                  **dict.fromkeys(("stage_stopped", "time_stopped"), (lambda v: isinstance(v, bool), "true or false")),
                  "selected_by": (lambda v: isinstance(v, str), "a metric's name"),
                  "amp": (lambda v: v in ("off", "bf16", "fp16"), "off, bf16 or fp16"),
                  "best_score": (lambda v: v == -math.inf or finite_number(v), "a number or null"),
                  "best_epoch": (lambda v: v is None or (count(v) and v >= 1), "an epoch or null"),
                  "rows": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of rows")}
        for name, (ok, what) in checks.items():
            if not ok(getattr(self, name)):
                return f"{name} is {getattr(self, name)!r}, not {what}"
        return None


Callback = Callable[[str, TrainState], None]  # (event "step" | "epoch", state) -> None


# --- class weights ------------------------------------------------------------------------------
def read_class_weights(path: str | Path, num_classes: int) -> list[float]:
    """A ``.json`` list or a ``.txt`` of numbers (whitespace/comma separated) -> C floats."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class weights file {path} not found (use none, median-freq or a .json/.txt file)")
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(values, dict):
                values = values.get("weights")
        else:
            values = [float(v) for v in path.read_text(encoding="utf-8-sig").replace(",", " ").split()]
    except (ValueError, RecursionError) as e:  # RecursionError: [[[[... nested too deep
        raise UserError(f"{path}: cannot read class weights ({e})") from None
    if (not isinstance(values, list) or len(values) != num_classes
            or not all(isinstance(v, int | float) and finite(v) and v >= 0 for v in values)):
        raise UserError(f"{path}: expected {num_classes} non-negative numbers (one per class)")
    if not any(v > 0 for v in values):  # every pixel would weigh 0: a NaN loss, reported as divergence
        raise UserError(f"{path}: the class weights are all 0; at least one must be > 0")
    return [float(v) for v in values]


CLASS_WEIGHTS_FILE = "class_weights.json"


def class_weights_for(cfg: TrainConfig, train_ds: SegmentationDataset, out: Path,
                      log: Callable[[str], None] = print) -> tuple[list[float] | None, dict | None]:
    """:func:`plain_class_weights` raised to ``cfg.class_weight_power`` (0.5: their square root);
    the document to cache keeps the plain weights, so a new power needs no new pass."""
    weights, doc = plain_class_weights(cfg, train_ds, out, log)
    if weights is not None and cfg.class_weight_power != 1:
        weights = [w ** cfg.class_weight_power for w in weights]
        log(f"class weights ** {cfg.class_weight_power}: {', '.join(f'{w:.2f}' for w in weights)}")
    return weights, doc


def plain_class_weights(cfg: TrainConfig, train_ds: SegmentationDataset, out: Path,
                        log: Callable[[str], None] = print) -> tuple[list[float] | None, dict | None]:
    """``cfg.class_weights`` -> (per-class weights, the ``out/class_weights.json`` document to
    write, or None). ``median-freq`` is computed once from the raw training split
    (``data.inspect``) and cached in that file, which :func:`start_writing` writes; nothing is
    written here."""
    if cfg.class_weights in ("none", "", None):
        return None, None
    if cfg.class_weights != "median-freq":
        return read_class_weights(cfg.class_weights, train_ds.num_classes), None
    cache = out / CLASS_WEIGHTS_FILE
    key = {"dataset": cfg.dataset, "data": cfg.data, "split": cfg.train_split, "dataset_kwargs": cfg.dataset_kwargs}
    if cache.is_file() and not cfg.overwrite:
        try:
            cached = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = {}
        if cached.get("source") == key and len(cached.get("weights", [])) == train_ds.num_classes:
            return [float(w) for w in cached["weights"]], None
    log(f"computing median-frequency class weights over {len(train_ds)} training images")
    report = inspect_dataset(train_ds, progress=show_progress(cfg.progress) and dist.env_info().is_main)
    weights = [1.0 if w is None else float(w) for w in report["median_freq_weights"]]
    return weights, {"source": key, "class_names": list(train_ds.class_names), "weights": weights}


# --- data -------------------------------------------------------------------------------------
def train_transform(cfg: TrainConfig, class_weights: Sequence[float] | None = None) -> Callable:
    """``cfg.augment`` (with ``crop`` overriding ``augment.crop``) -> the train preset, preceded
    by an instance-centred crop to the crop size (the resize where one is set) when
    ``instance_crops``, and by the U-Net weight map when ``weight_map: unet`` (``class_weights``,
    if any, are its class term w_c; without them w_c balances the classes of each mask)."""
    aug = dict(cfg.augment)
    crop = parse_size(cfg.crop)
    if crop:
        aug["crop"] = list(crop)
    steps: list[Callable] = [build_transform(aug, train=True)]
    if cfg.instance_crops:
        if aug.get("crop") is None:
            raise UserError("instance_crops needs a crop size: set crop: HxW (or augment: {crop: [h, w]})")
        c = aug["crop"]  # to the augment resize where there is one (the train preset's resize then has nothing to do)
        size = resize_of(aug) or ((int(c[0]), int(c[1])) if isinstance(c, list | tuple) else (int(c), int(c)))
        steps.insert(0, InstanceCrop(size, cfg.instance_context))
    if cfg.weight_map == "unet":  # computed on the whole raw mask (cached per image), then cropped and
        # augmented with it: computed after a random crop, the cache would hand one crop another's map
        steps.insert(0, UNetWeightMap(foreground=cfg.weight_map_class,
                                      class_weights=None if class_weights is None else list(class_weights)))
    return steps[0] if len(steps) == 1 else Compose(steps)


def open_datasets(cfg: TrainConfig, log: Callable[[str], None] = print
                  ) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The training and validation splits, checked (:meth:`SegmentationDataset.check_or_refuse`).
    ``log`` hears what the user should know before trying: the files ``--skip-invalid`` left out,
    the readers' notes (a file listed twice), and validation images that are also training images."""
    if cfg.max_pixels is not None:
        set_max_image_pixels(cfg.max_pixels)
    train = build_dataset(cfg.dataset, cfg.data, cfg.train_split, **cfg.dataset_kwargs)
    val_kwargs, training_only = scoring_kwargs(cfg.dataset, cfg.dataset_kwargs)
    val = build_dataset(cfg.dataset, cfg.data, cfg.val_split, **val_kwargs)
    if training_only:
        log(f"note: {', '.join(training_only)} applies to the training split; validation scores every image "
            f"of {cfg.val_split}")
    found = train.check(), val.check()
    if all(found) and not cfg.skip_invalid and cfg.val_split != cfg.train_split:  # both named at once, not by turns
        parts = [f"{len(p)} in {ds.where()}, e.g. {p[0]}" for ds, p in zip((train, val), found)]
        raise UserError(f"problems in both splits: {'; '.join(parts)}; fix them or pass --skip-invalid to train "
                        "without those files (`pixelwise data inspect --split NAME` lists them all)")
    train.check_or_refuse(cfg.skip_invalid, "train", problems=found[0])
    val.check_or_refuse(cfg.skip_invalid, "train", empty="nothing to validate on: fix them, or validate on "
                        "another split (--val-split)", problems=found[1])
    check_same_split_classes(cfg, train, val)
    same = cfg.val_split == cfg.train_split  # validating on the training split, as asked: said once
    for split, ds in [(cfg.train_split, train)] + ([] if same else [(cfg.val_split, val)]):
        dropped = getattr(ds, "dropped", [])  # also those the reader's own skip_invalid option dropped
        if dropped:
            log(f"left out {len(dropped)} file(s) of the {split} split with problems (--skip-invalid), e.g. "
                f"{shown(dropped[0])}" + ("" if len(dropped) == 1 else "; `pixelwise data inspect` lists them all"))
        for note in ds.notes():
            log(f"note: {shown(note)}")
    if not same:
        # by the file, not its path: a val image that is a link to a train image (or the train folder
        # reached through another path) is the same image
        images = {_file_key(image) for image, _ in getattr(train, "items", [])}
        shared = [image for image, _ in getattr(val, "items", []) if _file_key(image) in images]
        if shared:
            log(f"note: {len(shared)} of the {len(val)} {cfg.val_split} images are also in the {cfg.train_split} "
                f"split (first: {Path(shared[0]).name}): validation on them flatters the model and the checkpoint "
                "it selects")
    return train, val


def _file_key(ref: object) -> object:
    """A dataset item's image as one file: its real path (links followed); the ref itself where it is
    not a path (a COCO image id, a TIFF page ``path#3`` keeps its page)."""
    if not isinstance(ref, str):
        return ref
    path, number = split_ref(ref)
    return os.path.realpath(path), number


def check_same_split_classes(cfg: TrainConfig, train: SegmentationDataset, val: SegmentationDataset) -> None:
    """The validation split has the training split's classes (names, and COCO category ids where the
    reader has them): labels are positions in the class list, so a val annotation file that lacks a
    category would score the model's class k against another class's objects."""
    for what, a, b in (("classes", list(train.class_names), list(val.class_names)),
                       ("COCO category ids", getattr(train, "category_ids", None), getattr(val, "category_ids", None))):
        if a is not None and b is not None and list(a) != list(b):
            raise UserError(f"the {cfg.val_split} split's {what} ({listed(b)}) are not the {cfg.train_split} split's "
                            f"({listed(a)}): validation would score each class against another's; give both splits "
                            "the same category list")


def input_contract(cfg: TrainConfig, model: nn.Module, train_ds: SegmentationDataset) -> InputSpec:
    """The model's input contract: the dataset's normalisation (or the model's own), the size
    ``augment.resize`` trains it at (with stages: the last stage's, the size the final weights are
    trained at: a last stage's ``resize: null`` trains, and so predicts, at the images' own size),
    its input channels. Saved in every checkpoint."""
    last = cfg.stage_configs()[-1][1]
    return model_input_spec(model, train_ds.mean, train_ds.std, resize_of(last.augment))


def apply_contract(spec: InputSpec, train_ds: SegmentationDataset, val_ds: SegmentationDataset) -> None:
    """Training images are resized by the augmentation (before its random crops) and then only
    normalised; validation images go through the whole contract, labels stay at full size."""
    train_ds.input_spec = InputSpec(mean=spec.mean, std=spec.std, normalize=spec.normalize, resize=None,
                                    channels=spec.channels)
    val_ds.input_spec = spec
    val_ds.transform = None


def epoch_indices(n: int, cfg: TrainConfig, epoch: int, info: dist.DistInfo) -> list[int]:
    """This rank's shuffled sample order for ``epoch`` (a DistributedSampler under torchrun)."""
    if info.enabled:
        sampler: DistributedSampler = DistributedSampler(range(n), info.world_size,  # type: ignore[arg-type]
                                                         info.rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    g = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    return torch.randperm(n, generator=g).tolist()


# --- losses -------------------------------------------------------------------------------------
def semantic_loss(model: nn.Module, batch: dict, spec: LossSpec) -> torch.Tensor:
    """The loss of a semantic model's main (and auxiliary) outputs on ``batch``."""
    return combined_loss(model_outputs(model, batch["image"]), batch["mask"], spec, batch.get("weight"))


def mixed_sizes(images: Sequence[torch.Tensor]) -> str:
    """The refusal of a semantic training batch whose images differ in size (which
    :func:`check_training_data` finds before training where the reader has image files)."""
    sizes = sorted({f"{t.shape[-2]}x{t.shape[-1]}" for t in images})
    return (f"the training images differ in size (HxW {', '.join(sizes[:4])}{' ...' if len(sizes) > 4 else ''}) "
            "and a batch must stack images of one size: give --crop HxW (random crops of one size), an augment "
            "resize, or --batch-size 1; a run that saved epochs continues with --resume --crop HxW")


def check_instance_data(cfg: TrainConfig, train: SegmentationDataset, val: SegmentationDataset) -> None:
    """An instance run's counterpart of :func:`check_training_data`: a training split without an
    object (none annotated, or only crowd regions) teaches nothing, and a validation split without
    one gives COCO's AP no ground truth, so no epoch is scored and best.safetensors never chosen."""
    if not label_presence(train)[1]:
        raise UserError(f"the {cfg.train_split} split has no object to train on (no annotation that is not a crowd "
                        "region): the model could learn nothing; check the annotations (`pixelwise data inspect`)")
    if cfg.val_split != cfg.train_split and not label_presence(val)[1]:
        raise UserError(f"the {cfg.val_split} split has no object (no annotation that is not a crowd region), so "
                        "COCO's AP is undefined for every epoch and best.safetensors never chosen; validate on a "
                        "split with objects (--val-split)")


def check_training_data(cfg: TrainConfig, train: SegmentationDataset, val: SegmentationDataset) -> None:
    """What makes a semantic run pointless or stop later, found before anything is written: a training
    split with no labelled pixel, or none of a class other than 0 (binary masks stored as 0/255,
    whose foreground is 'ignore'); a validation split with no labelled pixel (best.safetensors
    could never be chosen); training images of several sizes that a batch would have to stack."""
    labelled, foreground = label_presence(train)
    if not labelled:
        raise UserError(f"the {cfg.train_split} split has no labelled pixel (every mask pixel is 255, ignore): "
                        "nothing can be learnt from it; check the masks (`pixelwise data inspect`)")
    if train.num_classes > 1 and not foreground:
        raise UserError(f"every labelled pixel of the {cfg.train_split} split is class 0 ({train.class_names[0]}): "
                        f"the model could learn nothing else. {train.all_background_hint}; `pixelwise data inspect` "
                        "shows the counts")
    if cfg.val_split != cfg.train_split and not label_presence(val)[0]:
        raise UserError(f"the {cfg.val_split} split has no labelled pixel (every mask pixel is 255), so no epoch "
                        "could be scored and best.safetensors never chosen; validate on a labelled split "
                        "(--val-split)")
    uncropped = [s for _, s in cfg.stage_configs() if s.batch_size > 1 and not parse_size(s.crop)
                 and not s.augment.get("crop")]
    sizes = image_sizes(train) if uncropped else []
    stacked = [s for s in uncropped if not resize_of(s.augment)]
    if stacked and len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise UserError(f"the {cfg.train_split} images differ in size (HxW {shown}, ...) and a batch of "
                        f"{stacked[0].batch_size} must stack images of one size: give --crop HxW (random crops of "
                        "one size), an augment resize, or --batch-size 1")
    for s in uncropped:  # a quarter turn makes an HxW image WxH, after any resize, before the crop
        h, w = resize_of(s.augment) or (sizes[0] if sizes else (1, 1))
        if s.augment.get("rotate90") and h != w:
            raise UserError(f"augment rotate90 turns the {h}x{w} training images into {w}x{h} at random, and a batch "
                            f"of {s.batch_size} must stack images of one size: give --crop HxW (crops come after the "
                            "turn), or --batch-size 1")


@contextlib.contextmanager
def _one_value_per_channel(cfg: TrainConfig, batch: dict) -> Iterator[None]:
    """BatchNorm's refusal of a batch whose deepest feature map holds one value per channel (batch
    size 1 on a crop or image so small that it pools down to 1x1), as one line with the fix."""
    try:
        yield
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        image = batch["image"]
        size = "x".join(map(str, image.shape[-2:])) if isinstance(image, torch.Tensor) else "these images"
        raise UserError(f"{cfg.model}'s BatchNorm got one value per channel: at batch size {len(image)} an input of "
                        f"{size} pools down to 1x1 in its deepest layers; train with a larger --crop (or images), "
                        "or --batch-size 2 or more") from None


def instance_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mask R-CNN computes its losses itself: their sum."""
    losses = model(list(batch["image"]), batch["target"])
    return functools.reduce(operator.add, losses.values())


# --- setting a run up ---------------------------------------------------------------------------
@dataclass
class Run:
    """What a run is built from (:func:`setup_run`). Only :func:`resume` changes it: a resumed run
    keeps the precision it started with."""

    cfg: TrainConfig  # the run's own copy, ``out`` resolved
    out: Path
    info: dist.DistInfo
    device: torch.device
    task: str  # semantic | instance
    select: str  # the validation metric that picks best.safetensors
    train_ds: SegmentationDataset
    val_ds: SegmentationDataset
    val_shard: Dataset  # this process's share of val_ds
    module: nn.Module  # the model whose weights the optimizer changes
    model: nn.Module  # what trains: ``module``, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    amp: str  # off | bf16 | fp16
    amp_why: str
    scaler: torch.amp.GradScaler
    contract: InputSpec
    class_weights: torch.Tensor | None
    log: Callable[[str], None]
    callbacks: list[Callback]
    clock: float = 0.0  # time.monotonic() at which the run would have started had it never stopped
    class_weights_doc: dict | None = None  # OUT/class_weights.json to write (freshly computed weights)
    ema: WeightAverage | None = None  # the average of ``module``'s weights (``ema`` > 0)
    lock: IO[str] | None = None  # held on OUT while the run writes there (rank 0)
    resume_command: str = "pixelwise train --resume"  # what continues it (the demo has its own)
    said_on_writing: list[str] = field(default_factory=list)  # a resume's lines, said once OUT is locked
    resumed_state: tuple[int, ...] | None = None  # file_version() of the state file a resume read
    train_fingerprint: str | None = None  # the training split's files (data.files.split_fingerprint)

    @property
    def saved(self) -> nn.Module:
        """What is validated and written to best/last: the weight average, or the model itself."""
        return self.ema.module if self.ema is not None else self.module

    @property
    def show(self) -> bool:
        return show_progress(self.cfg.progress) and self.info.is_main

    def elapsed(self) -> float:
        return time.monotonic() - self.clock


# An epoch's new best checkpoint until the training state that records it is saved (save_epoch)
PENDING_BEST = "best.pending.safetensors"
# What a run writes into OUT; any of them there means OUT holds a run. The state comes first: it is
# what --overwrite deletes first, so a kill while it deletes leaves a run that cannot be resumed
# rather than a state without its checkpoints.
RUN_FILES = ("last.state.safetensors", "best.safetensors", "last.safetensors", PENDING_BEST, "metrics.csv",
             "metrics.json", "config.yaml", CLASS_WEIGHTS_FILE, "tensorboard")


STARTUP_FILES = ("config.yaml", CLASS_WEIGHTS_FILE, "tensorboard")  # written before the first epoch
LOCK_FILE = ".pixelwise.lock"


def lock_out(out: Path) -> IO[str] | None:
    """An exclusive lock on ``out`` for this process's run (released when the file is closed or
    the process ends); a second ``train`` into the same folder is refused. None where the
    platform has no ``fcntl`` (Windows); unlocked where the file system has no locks (a flock
    that fails with another error than "held": Lustre mounted without flock, SMB, NFS without
    lockd), so that training runs there rather than being told the folder is in use."""
    try:
        import fcntl  # optional dependency: POSIX only
    except ImportError:
        return None
    handle = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a file system without locks
            return handle  # (Lustre without flock, SMB, NFS without lockd): run unlocked, as on Windows
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise UserError(f"--out {out} is in use by another pixelwise train (process {holder}); wait for it to end, "
                        "or give another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def existing_run(out: Path, names: Sequence[str] = RUN_FILES) -> list[Path]:
    """The files of a run already in ``out`` (see :data:`RUN_FILES`; ``names``: a command's own list)."""
    return [out / name for name in names if (out / name).exists()] if out.is_dir() else []


def check_out(cfg: TrainConfig, can_resume: bool = True, writes: Sequence[str] = RUN_FILES) -> None:
    """``out`` may hold a run only to continue it (``resume``, which needs its training state) or to
    replace it (``overwrite``, which never deletes a file the run reads: its class weights); it
    must be a folder this user can create or write in. Runs before anything is read or written.
    ``can_resume=False``: the command has no ``--resume`` (``demo``), so the message does not offer
    it. ``writes``: the names the command writes in ``out`` (default: a training run's)."""
    out = Path(cfg.out or default_out(cfg.model))
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; give only one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    saved = (out / "last.state.safetensors").is_file()
    # a run killed in its first epoch (kill -9, power loss) before its state was saved: what it writes
    # at its start, and maybe checkpoints of that epoch, but no metrics (written after the state)
    unsaved = (out / "config.yaml").is_file() and not saved and not existing_run(out, ("metrics.csv", "metrics.json"))
    if cfg.resume:
        if unsaved:
            raise UserError(f"cannot resume: the run in {out} saved nothing to resume from (it stopped before the end "
                            "of its first epoch); start it again with --overwrite")
        if not saved and (out / "config.yaml").is_file():
            raise UserError(f"cannot resume: the run in {out} has no last.state.safetensors (deleted, or an "
                            "--overwrite was stopped while it deleted the run); start it again with --overwrite, or "
                            "train into another --out")
        if not saved and (found := existing_run(out, writes)):  # a demo killed before training wrote its config
            raise UserError(f"cannot resume: {out} holds a run's files ({found[0].name}) but nothing to resume from "
                            "(it stopped before the end of its first epoch); start it again with --overwrite, or give "
                            "another --out")
        if not saved:
            raise UserError(f"cannot resume: {out / 'last.state.safetensors'} not found (is {out} the --out of the "
                            "run?); drop --resume to start a new run")
    else:
        found = existing_run(out, writes)
        if found and not cfg.overwrite:
            if can_resume and unsaved:
                raise UserError(f"--out {out} holds a run that saved nothing yet ({found[0].name}; it stopped before "
                                "the end of its first epoch): start it again with --overwrite, or give another --out")
            resume = "continue it with --resume, " if can_resume and saved else ""
            raise UserError(f"--out {out} already holds a run ({found[0].name}); {resume}replace it with --overwrite, "
                            "or give another --out")
        weights = cfg.class_weights not in ("none", "median-freq", "", None) and Path(cfg.class_weights).resolve()
        for path in existing_run(out) if cfg.overwrite else ():  # what start_writing deletes
            if path.resolve() == weights:
                raise UserError(f"--overwrite would delete {path}, which is the --class-weights file this run reads; "
                                "move it out of --out, or give another --out")
    check_can_create(out, f"--out {out}")


def check_fits(cfg: TrainConfig, parameters: int, device: torch.device | None) -> None:
    """Refuse a model whose float32 weights, gradients and two Adam moments (16 bytes a parameter;
    on a GPU the host holds the weights once, 4 bytes) are more than the memory the machine has
    free, before it is built: a width such as ``base_channels: 512`` (2.0G parameters) otherwise
    fills the memory until the kernel kills the process, without a word. Activations come on top,
    so a model that passes may still not fit."""
    per_parameter = 4 if device is not None and device.type != "cpu" else 16
    available = available_memory()
    if available is None or parameters * per_parameter <= available:
        return
    options = f" with --model-kwargs '{json.dumps(cfg.model_kwargs)}'" if cfg.model_kwargs else ""
    raise UserError(f"{cfg.model}{options} has {parameters / 1e6:,.1f}M parameters, which need "
                    f"{parameters * per_parameter / 2**30:.1f} GiB to train (weights, gradients and the optimizer's "
                    f"state), more than the {available / 2**30:.1f} GiB of memory free; give a smaller width (such as "
                    "base_channels) or a smaller model")


def resumed_weights(cfg: TrainConfig) -> Path | None:
    """On resume of a run that started from ``pretrained`` weights, the run's own last.safetensors,
    which the model is built from instead: its training state replaces the weights anyway, so the
    ``--pretrained`` file (moved since, or a download) is not read again, and the model is the one
    the run trained (a Mask R-CNN's frozen BatchNorm). None otherwise."""
    last = Path(cfg.out or default_out(cfg.model)) / "last.safetensors"
    return last if cfg.resume and cfg.pretrained and last.is_file() else None


def check_settings(cfg: TrainConfig, device: torch.device | None = None) -> str:
    """Settings that can be checked without data, before any is read: the model and its options
    (and that it fits in memory), the weights to start from, the class-weights file, TensorBoard.
    -> the model's task."""
    task = model_info(cfg.model).task
    check_fits(cfg, check_model_kwargs(cfg.model, cfg.model_kwargs, "--model-kwargs"), device)
    if cfg.lr_mult:  # the layers it names, on a model that holds no memory
        with torch.device("meta"):
            param_groups(create_model(cfg.model, 2, **cfg.model_kwargs), 0.0, lr_mult=cfg.lr_mult)
    if (cfg.pretrained and cfg.pretrained not in PRETRAINED_TAGS and not Path(cfg.pretrained).expanduser().is_file()
            and resumed_weights(cfg) is None):
        if Path(cfg.pretrained).name in ("best.safetensors", "last.safetensors"):  # e.g. a staged FCN recipe's
            raise UserError(f"--pretrained {cfg.pretrained!r} (given, or the recipe's): no such file; it is another "
                            "run's checkpoint: train that run first (a relative path is from the current folder, as "
                            "is the run's --out), or give the path of its checkpoint with --pretrained")
        raise UserError(f"--pretrained {cfg.pretrained!r}: no such file; give imagenet (or coco for Mask R-CNN) or "
                        "the path of a weights file")
    for aug in (cfg.augment, *(st.get("augment") or {} for st in cfg.stages)):
        if aug.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:  # padding labelled otherwise would be learnt
            raise UserError(f"augment ignore_index {aug['ignore_index']}: training ignores label {IGNORE_INDEX}, "
                            "which the datasets give to void pixels; remove the key")
    for _, stage_cfg in cfg.stage_configs():  # built again per stage; a bad key must not wait for its stage
        train_transform(stage_cfg)
    if task == "instance":
        check_semantic_only(cfg)
    if cfg.class_weights not in ("none", "median-freq", "", None) and not Path(cfg.class_weights).is_file():
        raise UserError(f"class weights file {cfg.class_weights} not found (use none, median-freq or a .json/.txt "
                        "file)")
    if cfg.tensorboard:
        TensorBoardLogger.check_available()
    check_aux_weight(cfg)
    if cfg.warmup_factor > 1:
        raise UserError(f"warmup_factor {cfg.warmup_factor:g}: the warm-up starts at lr x this and rises to the lr, so "
                        "it must be at most 1")
    # on resume, only what this command changes: a run recorded before the check was added still resumes
    check_used(cfg, recorded_settings(Path(cfg.out or default_out(cfg.model))) if cfg.resume else None)
    return task


# settings of the semantic loss and its data: Mask R-CNN trains on its own five-term loss
SEMANTIC_ONLY = ("loss", "class_weights", "class_weight_power", "focal_gamma", "aux_weight", "weight_map",
                 "weight_map_class", "classmix")


def check_semantic_only(cfg: TrainConfig) -> None:
    """An instance model's run refuses the settings of the semantic loss (a ``--loss dice`` would be
    recorded in config.yaml as if it had acted) and an augment resize (the model resizes itself)."""
    defaults = TrainConfig()
    for _, stage in cfg.stage_configs():
        for key in SEMANTIC_ONLY:
            if getattr(stage, key) not in (getattr(defaults, key), "", None):
                raise UserError(f"{key} {getattr(stage, key)!r} applies to semantic models: Mask R-CNN trains on its "
                                "own loss (RPN, box and mask terms); remove it for instance models")
        if resize_of(stage.augment):
            raise UserError("augment resize: Mask R-CNN resizes each image itself (model options min_size and "
                            "max_size, e.g. --model-kwargs '{\"min_size\": 512}'); remove the resize")


# settings that only act together with another: (key, what uses it, does this stage's config use it)
DEPENDENT_SETTINGS: tuple[tuple[str, str, Callable[[TrainConfig], bool]], ...] = (
    ("milestones", "schedule step", lambda c: c.schedule == "step"),
    ("gamma", "schedule step", lambda c: c.schedule == "step"),
    ("poly_power", "schedule poly", lambda c: c.schedule == "poly"),
    ("focal_gamma", "loss focal", lambda c: c.loss == "focal"),
    ("weight_map_class", "weight_map unet", lambda c: c.weight_map == "unet"),
    ("instance_context", "instance_crops", lambda c: c.instance_crops),
    ("step_size", "schedule step", lambda c: c.schedule == "step"),
    ("warmup_factor", "warmup_epochs or warmup_iters", lambda c: c.warmup_epochs > 0 or c.warmup_iters > 0),
    ("nesterov", "optimizer sgd", lambda c: c.optimizer == "sgd"),
    ("class_weight_power", "class_weights", lambda c: c.class_weights not in ("none", "", None)),
    ("decay_norm_and_bias", "weight_decay above 0", lambda c: c.weight_decay > 0),
)


def check_used(cfg: TrainConfig, recorded: dict | None = None) -> None:
    """A setting given (other than its default) that nothing in the run uses is a UserError: the
    run would record it in config.yaml as if it had acted (``--gamma 0.5`` with a poly schedule).
    ``recorded``: a resumed run's config.yaml, whose own values are not held against it."""
    defaults = TrainConfig()
    stages = [scfg for _, scfg in cfg.stage_configs()]
    for key, needs, uses in DEPENDENT_SETTINGS:
        given = [s for s in stages if getattr(s, key) != getattr(defaults, key)
                 and (recorded is None or getattr(s, key) != recorded.get(key, getattr(defaults, key)))]
        if given and not any(uses(s) for s in given):
            raise UserError(f"{key} {getattr(given[0], key)!r} acts only with {needs}, which this run does not "
                            f"use; remove it (or set {needs})")


def check_aux_weight(cfg: TrainConfig, module: nn.Module | None = None) -> None:
    """``aux_weight`` given to a model without an auxiliary head (a module named ``aux_classifier``)
    is a UserError, as the settings of DEPENDENT_SETTINGS are; a resumed run's recorded value stands.
    Without ``module`` (before anything is read or downloaded): told from the options of a zoo model
    that takes ``aux_loss``; others are checked once built."""
    if module is None:
        if "aux_loss" not in (model_options(cfg.model) or {}) or cfg.model_kwargs.get("aux_loss"):
            return
    elif any(name.rsplit(".", 1)[-1] == "aux_classifier" for name, _ in module.named_modules()):
        return
    default = TrainConfig().aux_weight
    recorded = (recorded_settings(Path(cfg.out or default_out(cfg.model))) or {}) if cfg.resume else {}
    for _, stage in cfg.stage_configs():
        if stage.aux_weight != default and stage.aux_weight != recorded.get("aux_weight", default):
            raise UserError(f"aux_weight {stage.aux_weight!r} acts only with an auxiliary head, which {cfg.model} "
                            "is not built with; remove it (the FCN-ResNet and DeepLab models take one with "
                            "--model-kwargs '{\"aux_loss\": true}')")


def note_other_options(cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """A pixelwise checkpoint given as --pretrained records its model's options; those without
    tensors (U-Net's input_norm, padding) load into a model built otherwise without an error, which
    then computes another function: said, option by option (the builder's default where unset)."""
    meta = saved_meta(cfg.pretrained) if cfg.pretrained else None
    saved = (meta or {}).get("model_kwargs")
    if not isinstance(saved, dict) or (meta or {}).get("model") != cfg.model:  # another model: its builder's rules
        return
    # options that change only training (dropout, the auxiliary head) or that the loader converts
    # (FCN-VGG's at_once: it rescales the scorers, the same function) are not named
    options = {k: p for k, p in (model_options(cfg.model) or {}).items() if k not in ("dropout", "aux_loss", "at_once")}
    default = {k: p.default for k, p in options.items() if p.default is not inspect.Parameter.empty}
    differ = [f"{k}={saved.get(k, default.get(k))!r} (this model: {cfg.model_kwargs.get(k, default.get(k))!r})"
              for k in sorted(set(saved) | set(cfg.model_kwargs)) if k in options
              and saved.get(k, default.get(k)) != cfg.model_kwargs.get(k, default.get(k))]
    if differ:
        log(f"note: {cfg.pretrained} was trained with {', '.join(differ)}; its weights are loaded as they are, "
            "but the model built here computes otherwise: give --model-kwargs with the checkpoint's options to "
            "continue its function")


def setup_run(cfg: TrainConfig, info: dist.DistInfo, device: torch.device, log: Callable[[str], None],
              callbacks: Sequence[Callback] = ()) -> Run:
    """Datasets, model, optimizer, precision, input contract, class weights, DDP. Every check runs
    here, and nothing is written: bad settings, an ``out`` holding another run and missing or bad
    data fail before ``out`` is created (:func:`start_writing` writes)."""
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg.out = cfg.out or default_out(cfg.model)
    check_out(cfg)
    task = check_settings(cfg, device)
    select = select_key(cfg.select_by, task)
    seed_everything(cfg.seed)
    train_ds, val_ds = open_datasets(cfg, log)
    if task == "semantic":
        check_training_data(cfg, train_ds, val_ds)
    if task == "instance" and not train_ds.has_instances():
        raise UserError(f"{cfg.model} is an instance model, and {cfg.dataset} data has no instance annotations to "
                        "train it on; train it on shapes or coco, or choose a semantic model")
    if task == "instance":
        check_instance_data(cfg, train_ds, val_ds)
    if select in LOWER_IS_BETTER and val_ds.rand_foreground is None:
        raise UserError(f"select_by {select} is an ISBI 2012 error, which {cfg.dataset} validation does not "
                        "compute (it needs a dataset with cells to count, such as isbi2012); choose another")
    if cfg.weight_map == "unet" and cfg.weight_map_class >= train_ds.num_classes:
        raise UserError(f"--weight-map-class {cfg.weight_map_class}: the data has classes "
                        f"0..{train_ds.num_classes - 1}; give the class whose objects the weight map separates")
    out = Path(cfg.out)
    resumed = resumed_weights(cfg)  # the state replaces the weights: the --pretrained file is not needed
    module = create_model(cfg.model, num_classes=train_ds.num_classes,
                          pretrained=cfg.pretrained if resumed is None else str(resumed), **cfg.model_kwargs).to(device)
    check_aux_weight(cfg, module)
    if resumed is None and cfg.pretrained not in (None, *PRETRAINED_TAGS):
        note_other_options(cfg, log)
    need = getattr(module, "min_train_batch", 1)
    per_rank = math.ceil(len(train_ds) / info.world_size)  # a process's share (DistributedSampler)
    smallest = min(per_rank, *(scfg.batch_size for _, scfg in cfg.stage_configs()))
    if smallest < need:  # BatchNorm over one value per channel: a ValueError at the first step
        shared = f" ({len(train_ds)} images over {info.world_size} processes)" if info.enabled else ""
        raise UserError(f"{cfg.model} trains on at least {need} images per batch (the BatchNorm of its image "
                        f"pooling sees one value per image), and this run has {smallest}{shared}; give --batch-size "
                        f"{need} or more" + (" and more training images" if per_rank < need else "")
                        + (" (or fewer processes)" if per_rank < need and info.enabled else ""))
    contract = input_contract(cfg, module, train_ds)
    apply_contract(contract, train_ds, val_ds)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = build_optimizer(cfg, module)
    amp, why = resolve_amp(cfg.amp, device)
    weights, weights_doc = class_weights_for(cfg, train_ds, out, log) if task == "semantic" else (None, None)
    if cfg.sync_bn and not info.enabled:
        log("note: sync_bn does nothing in one process: it synchronises BatchNorm across the GPU processes of "
            "torchrun")
    model = dist.wrap_model(module, info, device, cfg.sync_bn, find_unused_parameters=task == "instance")
    return Run(cfg=cfg, out=out, info=info, device=device, task=task, select=select, train_ds=train_ds,
               val_ds=val_ds, val_shard=Subset(val_ds, dist.shard(len(val_ds), info)) if info.enabled else val_ds,
               module=module, model=model, optimizer=optimizer, amp=amp, amp_why=why,
               scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"), contract=contract,
               class_weights=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
               log=log, callbacks=list(callbacks), class_weights_doc=weights_doc,
               ema=WeightAverage(module, cfg.ema) if cfg.ema else None,
               train_fingerprint=split_fingerprint(train_ds) if info.is_main else None)


def start_writing(run: Run, state: TrainState) -> None:
    """After every check (and a resume) has passed, on every process: the first writes. Rank 0
    deletes the earlier run's files with ``overwrite``, creates ``out`` and writes
    ``config.yaml``, freshly computed class weights and, on resume, ``metrics.csv`` from the
    state (it follows the state, even if a kill came between the two); TensorBoard starts."""
    dist.barrier()  # every process has passed its checks before anything is written
    if not run.info.is_main:
        return
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    run.lock = lock_out(out)
    # what check_out and resume read may have changed since: another train may have run (and ended)
    # while this one checked its data and built its model, before it held the lock
    found = existing_run(out) if not (run.cfg.resume or run.cfg.overwrite) else []
    if found:
        raise UserError(f"--out {out}: another pixelwise train wrote a run there ({found[0].name}) while this one was "
                        "starting, and nothing was written over it; give another --out, or pass --overwrite to "
                        "replace that run")
    if run.cfg.resume and file_version(out / "last.state.safetensors") != run.resumed_state:
        raise UserError(f"cannot resume: {out / 'last.state.safetensors'} was replaced while this command read it "
                        "(another pixelwise train writing there?), and nothing was written; run the command again")
    for line in run.said_on_writing:  # the resume is accepted: no other process holds the run
        run.log(line)
    earlier = existing_run(out) if run.cfg.overwrite else []
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if earlier:
        run.log(f"--overwrite: deleted the earlier run's files in {out} ({', '.join(p.name for p in earlier)})")
    for name in RUN_FILES:  # what a kill -9 left half-written (atomic_write's temporaries): nobody else writes here
        for tmp in out.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
    settings = {k: v for k, v in run.cfg.to_dict().items() if k not in COMMAND_ONLY}
    atomic_write_text(out / "config.yaml", dump_config(settings))
    if run.class_weights_doc is not None:
        atomic_write_text(out / CLASS_WEIGHTS_FILE, json.dumps(run.class_weights_doc, indent=2))
    if run.cfg.resume:
        _write_csv(out / "metrics.csv", state.rows)
    if run.cfg.tensorboard:
        run.callbacks.append(TensorBoardLogger(out / "tensorboard"))


def select_key(select_by: str, task: str) -> str:
    """The validation metric that picks ``best.safetensors`` (higher is better)."""
    if select_by == "auto":
        return "mask_AP" if task == "instance" else "mIoU"
    if (select_by in SEMANTIC_SELECT) != (task == "semantic"):
        valid = SEMANTIC_SELECT if task == "semantic" else INSTANCE_SELECT
        raise UserError(f"select_by {select_by!r} is not a metric of {task} validation; "
                        f"choose auto or one of: {', '.join(valid)}")
    return select_by


# --- the training state file --------------------------------------------------------------------
def save_state(run: Run, state: TrainState) -> None:
    """``last.state.safetensors``: weights, optimizer, grad scaler, RNG states, the weight average
    (``ema.*``) and the state's counters (:func:`pixelwise.checkpoint.save_train_state`)."""
    rng_tensors, rng_meta = state.rng or rng_snapshot()
    state.processes = run.info.world_size
    tensors = {**rng_tensors, **(run.ema.state_tensors() if run.ema is not None else {})}
    save_train_state(run.out / "last.state.safetensors", run.module, run.optimizer, run.scaler, tensors,
                     {**state.to_json(), "rng": rng_meta})


def load_state(run: Run) -> TrainState:
    """Restore ``last.state.safetensors`` into the run's model, optimizer, scaler and weight
    average; -> its state. A run that starts averaging on resume starts from the restored weights."""
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                  for g in run.optimizer.param_groups]
    tensors, meta = load_train_state(run.out / "last.state.safetensors", run.module, run.optimizer, run.scaler)
    changes: dict[str, str] = {}
    for group, settings in zip(run.optimizer.param_groups, configured):  # weight decay, momentum: the config's
        for key, value in settings.items():
            saved = group.get(key)
            same = (list(saved) == list(value) if isinstance(saved, list | tuple) and isinstance(value, list | tuple)
                    else saved == value)  # betas come back from the state's JSON as a list
            if not same:
                changes[key] = f"{key} {saved} -> {value}"
            group[key] = value
    if changes:
        run.log(f"resume: the optimizer takes the settings given: {', '.join(changes.values())}")
    if run.ema is not None and not run.ema.load_state_tensors(tensors):
        run.ema = WeightAverage(run.module, run.ema.decay)
        run.log("the resumed run kept no weight average: --ema starts averaging from its weights")
    meta.setdefault("selected_by", run.select)  # state files of older versions
    meta.setdefault("amp", run.amp)
    try:
        state = TrainState.from_json(meta)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot resume: {run.out / 'last.state.safetensors'} is damaged ({e}); resume from a copy "
                        "of the run, or train into a new --out") from None
    rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    state.rng = (rng_tensors, meta["rng"]) if rng_tensors and meta.get("rng") else None
    return state


DATA_KEYS = ("dataset", "dataset_kwargs", "train_split", "val_split")  # what a resumed run must keep


def recorded_settings(out: Path) -> dict | None:
    """The settings a run in ``out`` recorded (its config.yaml), or None where there are none to read
    (read again, and refused with its reason, where the CLI takes the run's settings)."""
    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:  # as --config reads it: 1e-3 a number, `none` None, ~ expanded, crop: 16 the text 16
        return load_yaml_config(path, run_record=True)
    except UserError:  # a value --config refuses: compared as written (the CLI refuses it with its reason)
        pass
    try:
        before = yaml.load(path.read_text(encoding="utf-8"), Loader=ConfigLoader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return before if isinstance(before, dict) else None


# settings a resume may change without a word: where the run is and how it is shown
_UNSAID = {"data", "out", "progress", "resume", "overwrite", "num_workers", "tensorboard", "epochs", "max_minutes"}


# settings a resume cannot change: the run keeps its precision (its scaler's state is of it) and
# its own weights (--pretrained is read when a run starts); config.yaml would record them unused
_KEPT = {"amp": "its precision (the state's gradient scaler is of it)",
         "pretrained": "its own weights: --pretrained is read only when a run starts"}


def check_same_data(run: Run) -> list[str]:
    """A resumed run trains and validates on the data it began with (per its ``config.yaml``):
    otherwise ``best.safetensors`` would compare scores of two validation sets. A moved data
    folder (another ``--data``) is allowed, and said. Returns the other settings this resume
    changes (config.yaml then records the new values), for :func:`resume` to say once the
    resume is accepted."""
    before = recorded_settings(run.out)
    if before is None:
        return []
    now = run.cfg.to_dict()
    for key, kept in _KEPT.items():
        if key in before and before[key] != now[key]:
            flag, was = f"--{key}", "none" if before[key] is None else before[key]
            raise UserError(f"{run.out} trained with {key} {was}, and a resumed run keeps {kept}; resume with "
                            f"{flag} {was} (or with neither {flag} nor --config: the run's config.yaml is read), "
                            f"or train into a new --out (--pretrained {run.out / 'last.safetensors'} starts from its "
                            "weights)")
    for key in DATA_KEYS:
        if key in before and before[key] != now[key]:
            flag = f"--{key.replace('_', '-')}"
            why = {"train_split": "the run would go on with other training data than its epochs and schedule were "
                                  "counted on",
                   "val_split": "its best.safetensors would compare scores of two validation sets"}.get(
                key, "the run would go on with other data: other training images than its schedule was counted on, "
                     "and its best.safetensors would compare scores of two validation sets")
            raise UserError(f"{run.out} trained on {key} {before[key]!r}, and this resume gives {flag} {now[key]!r}; "
                            f"{why}. Resume without "
                            f"{flag}, or train into a new --out (--pretrained {run.out / 'last.safetensors'} starts "
                            "from its weights)")
    if before.get("data") not in (None, now["data"]):
        run.log(f"resume: the data is now read from {now['data']} (the run began with {before['data']})")
    return [f"{key} {before[key]!r} -> {now[key]!r}" for key in now
            if key in before and key not in _UNSAID and before[key] != now[key]]


def check_same_stages(run: Run, state: TrainState) -> None:
    """A resume keeps the stages the run has gone through (per its config.yaml): the finished ones
    as they were, the one it is in by name (its epochs may change, as --epochs may for a run
    without stages); stages after it may be added or changed. A run without stages stays without."""
    before = recorded_settings(run.out) or {}
    had, has = before.get("stages") or [], run.cfg.stages

    def described(stages: list) -> str:
        return "in stages " + ", ".join(f"{s.get('name', f'stage{i + 1}')} ({s.get('epochs')} epochs)"
                                        for i, s in enumerate(stages)) if stages else "without stages"

    same_kind = bool(had) == bool(has) or "stages" not in before
    finished = [(a.get("name"), a.get("epochs")) for a in had[: state.stage]]
    kept = [(b.get("name"), b.get("epochs")) for b in has[: state.stage]]
    current = (had[state.stage].get("name") if state.stage < len(had) else None,
               has[state.stage].get("name") if state.stage < len(has) else None)
    if (not same_kind or state.stage >= len(run.cfg.stage_configs())
            or (had and (finished != kept or current[0] != current[1]))):
        raise UserError(f"cannot resume: the run in {run.out} trains {described(had)}, and is in stage "
                        f"{state.stage + 1}; these settings train {described(has)}. Resume with the run's own "
                        "stages (its config.yaml), or train into another --out")


def resume(run: Run) -> TrainState:
    """The state of the run in ``run.out``, its weights, optimizer and scaler restored. It must
    pick ``best`` by the same metric, and keeps the precision it started with."""
    path = run.out / "last.state.safetensors"
    run.resumed_state = file_version(path)  # before it is read: start_writing finds it unchanged, or refuses
    changed = check_same_data(run)
    state = load_state(run)
    if state.epoch > run.cfg.epochs:  # it would train nothing, and config.yaml record fewer epochs than it has
        raise UserError(f"cannot resume with {run.cfg.epochs} epochs: the run in {run.out} has trained "
                        f"{state.epoch} already; give --epochs above {state.epoch} to train on, or leave --epochs out")
    check_same_stages(run, state)
    if run.info.is_main:  # one rank renames or deletes it (every rank did, and the slower one found no file)
        settle_pending_best(run, state)
    dist.barrier()
    if state.best_epoch is not None:
        try:
            read_checkpoint(run.out / "best.safetensors")
        except UserError as e:  # removed or damaged since: the next validated epoch becomes the best
            run.log(f"resume: the run's best.safetensors (epoch {state.best_epoch}) cannot be read ({e}); the best "
                    "is picked again from the next validated epoch")
            state.best_score, state.best_epoch = -math.inf, None
    if state.selected_by != run.select:  # best_score and best.safetensors belong to the other metric
        raise UserError(f"{run.out} picked best.safetensors by {state.selected_by}; resume with "
                        f"--select-by {state.selected_by}, or train into a new --out")
    if state.batch and state.processes != run.info.world_size:  # the epoch's images are shared out by process
        ran, now = (f"{n} process{'es' if n > 1 else ''}" for n in (state.processes, run.info.world_size))
        raise UserError(f"{run.out} stopped inside epoch {state.epoch + 1} in {ran}, and this run has {now}: each "
                        "process has its own share of that epoch's images, so others would skip or repeat some; "
                        f"resume it in {ran}" + (f" (torchrun --nproc-per-node {state.processes})"
                                                 if state.processes > 1 else " (without torchrun)")
                        + ", or train into a new --out")
    if state.batch:  # inside an epoch: its remaining batches are counted in the batch size it began with
        size = run.cfg.stage_configs()[state.stage][1].batch_size
        if state.images != state.batch * size:
            began = state.images // state.batch
            raise UserError(f"{run.out} stopped inside epoch {state.epoch + 1} after {state.batch} batches of {began} "
                            f"images; resume with --batch-size {began} (this one, {size}, would skip or repeat "
                            "images of that epoch), or train into a new --out")
    if state.stage_step:  # the stage's LR schedule counts its optimizer steps: it would jump, or stop at 0
        scfg = run.cfg.stage_configs()[state.stage][1]
        batches = epoch_batches(run, scfg)[0]
        steps = math.ceil(batches / scfg.accumulate)
        # recorded as the stage began; states of before had only the ratio, which holds between whole
        # epochs that the time budget did not cut short
        whole = state.stage_epoch and not state.batch and not state.stage_stopped
        taken = state.stage_epoch_steps or (state.stage_step / state.stage_epoch if whole else steps)
        if steps != taken:
            procs = f" in {run.info.world_size} processes" if run.info.enabled else " in one process"
            raise UserError(f"{run.out} took {taken:g} optimizer steps per epoch and these settings take {steps}"
                            f"{procs} (another --batch-size, --accumulate, number of processes or amount of training "
                            "data), which would move its learning-rate schedule; resume with the run's own settings "
                            "and processes (or, with another number of processes, a --batch-size that gives the "
                            "run's steps per epoch), or "
                            "train into a new --out")
        # the next optimizer step would begin inside a group (an epoch's last, smaller group is whole: a
        # stop after it, e.g. while the epoch is validated, has all the epoch's batches)
        if state.batch % scfg.accumulate and state.batch != batches:
            raise UserError(f"{run.out} stopped inside epoch {state.epoch + 1} after {state.batch} micro-batches, "
                            f"which --accumulate {scfg.accumulate} does not divide; resume with the run's own "
                            "--accumulate, or train into a new --out")
    if state.amp != run.amp:
        run.amp, run.amp_why = state.amp, "kept from the resumed run"
        run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == "fp16")
        if run.scaler.is_enabled():  # its saved state was skipped by the disabled scaler
            load_state(run)
    if changed:
        run.said_on_writing.append(f"resume: settings changed from the run's config.yaml, which now records the new "
                                   f"ones: {', '.join(changed)}")
    where = f"epoch {state.epoch}" + (f" + {state.batch} batches" if state.batch else "")
    run.said_on_writing.append(f"resumed from {path} after {where}")
    return state


# --- stages and epochs --------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage of a run (a run without ``stages`` is one): its config, loss, schedule and share
    of the time budget."""

    index: int
    name: str
    cfg: TrainConfig  # the run's config with the stage's overrides
    loss: LossSpec | None  # None: the model computes its own losses (instance models)
    schedule: Schedule
    drop_last: bool
    budget_s: float | None  # this stage's share of the time budget
    last: bool
    run_budget_s: float | None = None  # the whole run's time budget

    def lr_factor(self, state: TrainState, elapsed_s: float) -> float:
        """The schedule at the stage's step, or at its share of the time budget if further. The last
        stage runs to the end of the run's budget, so it anneals over the time it has from its
        start: earlier stages that finished before their share hand it their time, and its rate
        reaches 0 when the budget does, not before."""
        budget = self.budget_s
        if budget and self.last and self.run_budget_s:
            budget = max(self.run_budget_s - state.stage_start_s, 1e-9)
        frac = (elapsed_s - state.stage_start_s) / budget if budget else 0.0
        return self.schedule.factor(state.stage_step, frac)

    def deadline(self, run: Run, state: TrainState) -> float | None:
        """``time.monotonic()`` at which this stage stops: the last stage at the end of the run's
        budget, the others at the end of their share."""
        if not self.budget_s or not run.cfg.max_minutes:
            return None
        return run.clock + (run.cfg.max_minutes * 60 if self.last else state.stage_start_s + self.budget_s)


def past(deadline: float | None) -> bool:
    """Whether ``deadline`` (``time.monotonic()``) has passed, as rank 0's clock says: under
    torchrun every rank gets the same answer, so they all stop after the same step."""
    return deadline is not None and bool(dist.broadcast_object(time.monotonic() > deadline))


def epoch_batches(run: Run, scfg: TrainConfig) -> tuple[int, bool]:
    """(micro-batches per epoch on this rank, whether the last partial batch is dropped)."""
    per_rank = len(epoch_indices(len(run.train_ds), scfg, 1, run.info))
    drop_last = per_rank > scfg.batch_size
    return (per_rank // scfg.batch_size if drop_last else math.ceil(per_rank / scfg.batch_size)), drop_last


def plan_stages(run: Run) -> list[Stage]:
    """The run's stages; the time budget is shared among them in proportion to their epochs."""
    configs = run.cfg.stage_configs()
    budget_s = run.cfg.max_minutes * 60 if run.cfg.max_minutes else None
    stages = []
    for i, (name, scfg) in enumerate(configs):
        batches, drop_last = epoch_batches(run, scfg)
        # with the U-Net weight map the class weights are its w_c term (Eq. 2), not a second factor
        class_weights = None if run.cfg.weight_map == "unet" else run.class_weights
        loss = None if run.task == "instance" else LossSpec(scfg.loss, class_weights, scfg.focal_gamma,
                                                             scfg.aux_weight)
        stages.append(Stage(i, name, scfg, loss, Schedule.from_config(scfg, math.ceil(batches / scfg.accumulate)),
                            drop_last, budget_s * scfg.epochs / run.cfg.epochs if budget_s else None,
                            i == len(configs) - 1, budget_s))
    return stages


def plateaued(stage: Stage, state: TrainState, select: str) -> bool:
    """Whether ``stage``, in progress with epochs left, ends early on its ``patience``: its latest
    epoch was validated and none of its last ``patience`` epochs scored a new best (a stage's epochs
    count from its start, so a later stage has that long to beat the run's best). A function of
    the saved state, so a resume decides as the interrupted run would have."""
    patience = stage.cfg.patience
    if (not patience or not state.stage_epoch or state.stage != stage.index or state.stage_epoch >= stage.cfg.epochs
            or select not in state.rows[-1]):
        return False
    return min(state.epoch - (state.best_epoch or 0), state.stage_epoch) >= patience


def run_stage(run: Run, state: TrainState, stage: Stage) -> None:
    """Train ``stage`` from where ``state`` stands until its epochs or its time are used up."""
    multi = len(run.cfg.stages) > 1  # metrics.csv gets a stage column
    if stage.index > state.stage:
        state.time_stopped = state.time_stopped or state.stage_stopped  # that cut stays: the run moves on
        state.stage, state.stage_epoch, state.stage_step = stage.index, 0, 0
        state.stage_start_s, state.stage_stopped = run.elapsed(), False
    deadline = stage.deadline(run, state)
    if state.stage_stopped:  # resumed after its time ran out (a new stage starts unstopped)
        if past(deadline):  # rank 0's clock, as the loop reads it: every rank returns, or none
            return  # its time is still up: the run moves on to the next stage
        state.stage_stopped = False  # the resume gave it more time (a larger or no --max-minutes)
    state.stage_epoch_steps = stage.schedule.total_steps // stage.cfg.epochs  # what a resume must match
    set_peak_lr(run.optimizer, stage.cfg.lr)
    if multi:
        run.log(f"stage {stage.index + 1}/{len(run.cfg.stages)} ({stage.name}): {stage.cfg.epochs} epochs, "
                f"lr {stage.cfg.lr}" + (", instance-centred crops" if stage.cfg.instance_crops else ""))
    weights = None if run.class_weights is None else run.class_weights.tolist()
    run.train_ds.transform = train_transform(stage.cfg, weights)
    # stopped: by the time budget; plateaued: by --patience
    while state.stage_epoch < stage.cfg.epochs and not state.stage_stopped and not plateaued(stage, state, run.select):
        stats = train_one_epoch(run, stage, state)
        # the epoch whose training ran out of time is the stopped one (checked at steps, and here),
        # where the stage had epochs left: one that trained them all is finished, not stopped
        more = state.stage_epoch + 1 < stage.cfg.epochs
        late = stats.stopped_by_time or (more and past(deadline))
        validated = ((state.epoch + 1) % run.cfg.val_every == 0 or late
                     or state.stage_epoch + 1 == stage.cfg.epochs)
        metrics = evaluate(run) if validated else {}
        if isinstance(loss := metrics.get("loss"), float) and not math.isfinite(loss):  # NaN: class 0 everywhere
            raise Diverged(f"training diverged: the validation loss is {loss} after epoch {state.epoch + 1} "
                           "(the weights hold NaN or infinite values; nothing of this epoch was saved): lower --lr "
                           "or set --clip-grad-norm")
        stopped = late or (more and validated and past(deadline))  # ran out while validating: no epoch after it
        row = {"epoch": state.epoch + 1, **({"stage": stage.name} if multi else {}),
               "train_loss": stats.train_loss,
               **({"val_loss": metrics.get("loss")} if validated else {}),
               **{k: v for k, v in metrics.items() if isinstance(v, float | int) and k != "loss"},
               "lr": state.lr, "img_per_s": None if stats.img_per_s is None else round(stats.img_per_s, 2)}
        held = HeldSignals()  # Ctrl-C waits for the epoch's files: best, last and the state name one epoch
        held.hold()
        try:
            state.epoch, state.stage_epoch, state.batch = state.epoch + 1, state.stage_epoch + 1, 0
            state.elapsed_s = run.elapsed()
            state.rows.append({**row, "elapsed_s": round(state.elapsed_s, 1)})
            state.stage_stopped = stopped
            state.rng = rng_snapshot()
            save_epoch(run, state, metrics)
            # logged before a held Ctrl-C goes through: a saved epoch (a row of metrics.csv) is never
            # missing from the log, where no resume would print it
            shown = " ".join(f"{k}={v:.4f}" for k, v in row.items()
                             if isinstance(v, float) and k not in ("lr", "img_per_s"))
            speed = "-" if stats.img_per_s is None else f"{stats.img_per_s:.1f}"  # not timed (resumed at its end)
            run.log(f"epoch {state.epoch}: {shown} lr={row['lr']:.2e} {speed} img/s"
                    + (" (time budget reached)" if stopped else ""))
        finally:
            held.release()
        if not stopped and plateaued(stage, state, run.select):
            run.log(f"early stop: no better {run.select} in the last {stage.cfg.patience} epochs (--patience); "
                    f"best.safetensors is epoch {state.best_epoch}"
                    + (f", {stage.cfg.epochs - state.stage_epoch} epochs of stage {stage.name} left untrained"
                       if multi else ""))
        dist.barrier()
        for cb in run.callbacks:
            cb("epoch", state)


class Diverged(UserError):
    """A NaN or infinite loss."""


class EpochStats(NamedTuple):
    train_loss: float  # mean over the epoch's images, all processes
    img_per_s: float | None  # all processes; None when no step of the epoch ran in this process
    stopped_by_time: bool


class SampleSeeded(Dataset):
    """``dataset[i]`` with numpy's global RNG (which every augmentation step draws from) seeded
    from the epoch's seed and ``i``: a sample's augmentation depends on nothing else, not on which
    DataLoader worker loads it nor on what that worker loaded before, so a run resumed inside an
    epoch draws the same augmentations with worker processes as without."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        np.random.seed([self.seed % 2**32, self.seed // 2**32 % 2**32, index])
        return self.dataset[index]


def epoch_loader(run: Run, stage: Stage, state: TrainState) -> DataLoader:
    """The next epoch's batches, or what is left of them when resuming inside it (same order,
    the RNG states of the last finished step restored). Re-seeds every RNG for the epoch."""
    epoch, rank = state.epoch + 1, run.info.rank
    seed_everything(epoch_seed(run.cfg.seed, epoch, rank))
    indices = epoch_indices(len(run.train_ds), stage.cfg, epoch, run.info)
    if state.batch:
        indices = indices[state.batch * stage.cfg.batch_size:]
        if state.rng:
            rng_restore(*state.rng)
    else:
        state.loss_sum, state.images = 0.0, 0
    samples = SampleSeeded(run.train_ds, epoch_seed(run.cfg.seed, epoch, rank))
    return DataLoader(samples, batch_sampler=BatchSampler(indices, stage.cfg.batch_size, stage.drop_last),
                      num_workers=run.cfg.num_workers, collate_fn=collate,
                      worker_init_fn=functools.partial(_worker_init, max_pixels=run.cfg.max_pixels),
                      generator=torch.Generator().manual_seed(epoch_seed(run.cfg.seed, epoch, rank)))


def train_one_epoch(run: Run, stage: Stage, state: TrainState) -> EpochStats:
    """Train over one epoch (whose first ``state.batch`` batches may be done already).

    Every ``accumulate`` micro-batches (or fewer at the end) make one optimizer step at the
    stage's scheduled LR; the loss of each micro-batch is divided by the group's size, so the
    step uses the mean gradient. After each step the state's counters, running loss and RNG
    states are updated and the callbacks run with ``("step", state)``. The epoch ends early at
    the first step after the stage's deadline (the time budget). Under torchrun the LR's time
    fraction and that deadline are read from rank 0's clock, so the ranks cannot disagree.
    """
    cfg, model, optimizer, scaler = stage.cfg, run.model, run.optimizer, run.scaler
    loader = epoch_loader(run, stage, state)
    deadline = stage.deadline(run, state)
    model.train()
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = len(loader) + state.batch  # micro-batches in the whole epoch
    bar = progress(loader, f"epoch {state.epoch + 1}/{run.cfg.epochs}", run.show, leave=False)
    t0, seen, images_before, stopped = time.monotonic(), 0, state.images, False
    pending_loss, pending_images = 0.0, 0  # micro-batches of the optimizer step in progress
    # Ctrl-C and SIGTERM wait from an optimizer step's first forward pass (BatchNorm statistics
    # change) to its end (the weights change tensor by tensor), so the state they save is a step's.
    held = HeldSignals()
    try:
        for i, batch in enumerate(bar, start=state.batch):
            group_start = i - i % cfg.accumulate
            group_size = min(cfg.accumulate, total - group_start)
            last_in_group = i + 1 == group_start + group_size
            if i == group_start:
                held.hold()
                now = dist.broadcast_object(run.elapsed())  # rank 0's clock: every rank sets the same LR
                state.lr = apply_lr(optimizer, stage.lr_factor(state, now))
            if stage.loss and not isinstance(batch["image"], torch.Tensor):
                raise UserError(mixed_sizes(batch["image"]))
            if cfg.classmix:  # semantic models only: check_settings refuses it for instance models
                batch = class_mix(batch, cfg.classmix, IGNORE_INDEX)
            batch = to_device(batch, run.device, run.cfg.channels_last)
            sync = contextlib.nullcontext() if last_in_group or not is_ddp else model.no_sync()  # type: ignore[operator]
            with sync:
                with autocast(run.amp, run.device), _one_value_per_channel(cfg, batch):
                    loss = semantic_loss(model, batch, stage.loss) if stage.loss else instance_loss(model, batch)
                value = loss.detach().float().reshape(1)
                if dist.active():  # every rank stops together on a NaN anywhere
                    value = dist.all_reduce_sum(value) / run.info.world_size
                if not math.isfinite(value.item()):
                    kept = "the last good checkpoint is kept" if state.epoch else "no checkpoint was written"
                    raise Diverged(f"training diverged: loss is {value.item()} at epoch {state.epoch + 1} step "
                                   f"{state.step + 1} (batch {i + 1}); {kept}; lower --lr or set --clip-grad-norm")
                scaler.scale(loss / group_size).backward()
            n = len(batch["image"])
            pending_loss, pending_images, seen = pending_loss + value.item() * n, pending_images + n, seen + n
            if last_in_group:
                if cfg.clip_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step, state.stage_step, state.batch = state.step + 1, state.stage_step + 1, i + 1
                state.loss_sum, state.images = state.loss_sum + pending_loss, state.images + pending_images
                pending_loss, pending_images = 0.0, 0
                state.rng = rng_snapshot()
                if run.ema is not None:
                    run.ema.update(run.module, state.step)
                held.release()  # a signal that came meanwhile is raised here, the step complete
                for cb in run.callbacks:
                    cb("step", state)
            speed = seen * run.info.world_size / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix(loss=f"{state.loss_sum / max(state.images, 1):.4f}", lr=f"{state.lr:.2e}",
                            img_s=f"{speed:.1f}")
            # rank 0 decides, so that every rank stops after the same step (no rank left waiting)
            if last_in_group and past(deadline):
                stopped = True
                break
    finally:
        held.release()
    trained = state.images - images_before  # 0: resumed after the epoch's last step, so nothing was timed
    epoch_speed = trained * run.info.world_size / max(time.monotonic() - t0, 1e-9) if trained else None
    sums = dist.all_reduce_sum(torch.tensor([state.loss_sum, float(state.images)], dtype=torch.float64,
                                            device=run.device))
    return EpochStats((sums[0] / sums[1].clamp_min(1)).item(), epoch_speed, stopped)


def evaluate(run: Run) -> dict:
    """Validation metrics of ``run.saved``. Semantic: every rank scores its shard and the sums
    are reduced over ranks. Instance: rank 0 scores the whole split and shares the result."""
    dist.broadcast_module_state(run.saved)  # BatchNorm statistics of rank 0, i.e. of the saved weights
    cfg = run.cfg
    # a spawned worker (macOS, Windows) does not inherit the parent's --max-pixels: given, as to training's
    init = functools.partial(_worker_init, max_pixels=cfg.max_pixels)
    if run.task == "semantic":
        loader = DataLoader(run.val_shard, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            collate_fn=eval_collate, worker_init_fn=init)
        return validate_semantic(run.saved, loader, run.val_ds.num_classes, run.device,
                                 list(run.val_ds.class_names), run.show, run.amp, cfg.channels_last,
                                 rand_foreground=run.val_ds.rand_foreground)
    metrics = None
    if run.info.is_main:
        loader = DataLoader(ScoredInstances(run.val_ds), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            collate_fn=collate, worker_init_fn=init)
        metrics = validate_instances(run.saved, loader, run.val_ds, run.device, show=run.show)
    return dist.broadcast_object(metrics)


# --- writing ------------------------------------------------------------------------------------
def rebuild_kwargs(run: Run) -> dict:
    """The run's model options, with what rebuilds the model it trained that the options do not say:
    a Mask R-CNN started from pretrained weights has frozen BatchNorm (eps 0 under COCO's weights),
    which ``frozen_bn_eps`` rebuilds (built from the options alone it had BatchNorm2d, and the
    checkpoint could be neither written nor read)."""
    kwargs = dict(run.cfg.model_kwargs)
    frozen = [m.eps for m in run.module.modules() if isinstance(m, FrozenBatchNorm2d)]
    if frozen and run.task == "instance":
        kwargs.setdefault("frozen_bn_eps", float(frozen[0]))
    return kwargs


def checkpoint_meta(run: Run, summary: dict | None = None) -> dict:
    cfg, ds = run.cfg, run.train_ds
    return {
        "model": cfg.model, "model_kwargs": rebuild_kwargs(run), "num_classes": ds.num_classes,
        "task": run.task, "class_names": list(ds.class_names),
        "palette": [list(c) for c in ds.palette], "input": run.contract.to_dict(),
        "dataset": cfg.dataset, "training": summary or {},
        # how the data was split, and which files: eval says when the split it scores holds images this
        # model trained on (another folder of files named alike is other images)
        "data": {"dataset_kwargs": cfg.dataset_kwargs, "train_split": cfg.train_split, "val_split": cfg.val_split,
                 "train_fingerprint": run.train_fingerprint},
        # the dataset's own id of each class (COCO's category ids), written into instance predictions
        **({"category_ids": [int(i) for i in ids]} if (ids := getattr(ds, "category_ids", None)) else {}),
        # a folder dataset's colour masks: the colour of ignored pixels, which serve reads them with
        **({"ignore_color": [int(v) for v in ignore]}
           if getattr(ds, "colour_palette", None) is not None and (ignore := getattr(ds, "ignore_colour", None))
           else {}),
    }


def run_folder_lost(run: Run, state: TrainState) -> str | None:
    """Before rank 0 saves: why it must not, when the run folder no longer holds its ``config.yaml``.
    A folder removed (or emptied) while training was made again by the first save, without it, so
    the run ended with exit 0 in a folder that ``--resume`` cannot read."""
    if (run.out / "config.yaml").is_file():
        return None
    steps = f"{state.step} optimizer step{'s' if state.step != 1 else ''}"
    return (f"{run.out} lost its config.yaml while training (the folder was removed or emptied); the run stopped "
            f"after {steps} without saving, as a folder without it cannot be resumed: train again")


def save_epoch(run: Run, state: TrainState, metrics: dict) -> None:
    """After an epoch: ``best`` (if ``metrics[select]`` improved, as :data:`PENDING_BEST`), ``last``,
    the training state, then the pending best renamed to ``best`` and ``metrics.csv``, each atomically
    (only rank 0 writes). The state is the commit point: a kill before it repeats the epoch on resume
    (which deletes the pending best: a repeated epoch that scores lower must not leave its weights in
    ``best``), a kill after it is caught up by resume (:func:`settle_pending_best`)."""
    value = metrics.get(run.select)
    score = -math.inf if value is None else -float(value) if run.select in LOWER_IS_BETTER else float(value)
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch = score, state.epoch
    if not run.info.is_main:
        return
    lost = run_folder_lost(run, state)
    if lost:
        raise UserError(lost)
    meta = checkpoint_meta(run, {"epoch": state.epoch, **({"val": metrics} if metrics else {})})
    if improved:
        save_checkpoint(run.out / PENDING_BEST, run.saved, meta)
    save_checkpoint(run.out / "last.safetensors", run.saved, meta)
    save_state(run, state)
    if improved:
        os.replace(run.out / PENDING_BEST, run.out / "best.safetensors")
    _write_csv(run.out / "metrics.csv", state.rows)


def settle_pending_best(run: Run, state: TrainState) -> None:
    """A best checkpoint written before a kill: ``best`` if the saved state recorded its epoch as the
    best (the kill came between the state and the rename), else deleted (the state does not have
    its epoch, which the resume repeats)."""
    pending = run.out / PENDING_BEST
    if not pending.exists():
        return
    try:
        epoch = read_checkpoint(pending)[1].get("training", {}).get("epoch")
    except UserError:  # cut short by the kill
        epoch = None
    if epoch is not None and epoch == state.best_epoch == state.epoch:
        os.replace(pending, run.out / "best.safetensors")
    else:
        pending.unlink()


def save_interrupted(run: Run, state: TrainState) -> str:
    """Ctrl-C: ``last`` and the training state as of the last finished optimizer step; -> what was
    saved and the command that continues (also logged), or, where the run folder was removed, why
    nothing was (the exit stays an interruption's, 130 or 143)."""
    if not run.info.is_main:
        return ""
    state.elapsed_s = run.elapsed()
    lost = run_folder_lost(run, state)
    if lost:  # still an interruption (exit 130/143), which saved nothing
        run.log(f"interrupted: {lost}")
        return lost
    summary = {"epoch": state.epoch, "interrupted_after_batches": state.batch}
    save_checkpoint(run.out / "last.safetensors", run.saved, checkpoint_meta(run, summary))
    save_state(run, state)
    where = f"epoch {state.epoch + 1} batch {state.batch}" if state.batch else f"the end of epoch {state.epoch}"
    said = (f"saved {run.out / 'last.safetensors'} and its training state at {where}; "
            f"`{run.resume_command} --out {run.out}` continues from there"
            + (f" (under torchrun with {run.info.world_size} processes, as it ran)" if run.info.enabled else ""))
    run.log(f"interrupted: {said}")
    return said


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    tail = ("lr", "img_per_s", "elapsed_s")  # after the metrics, also when the first rows had none (val_every)
    keys = [k for k in keys if k not in tail] + [k for k in tail if k in keys]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def finish(run: Run, state: TrainState, stopped_early: bool = False) -> dict:
    """The run's summary, written with ``metrics.csv`` (both from the state) by rank 0.
    ``stopped_early``: the run's last stage ended on its ``patience``."""
    out = run.out
    best_row = next((r for r in state.rows if r["epoch"] == state.best_epoch), None)
    result = {"model": run.cfg.model, "dataset": run.cfg.dataset, "epochs_completed": state.epoch,
              "best_epoch": state.best_epoch, "selected_by": run.select, "best": best_row,
              "final": state.rows[-1] if state.rows else None, "steps": state.step,
              "train_minutes": round(state.elapsed_s / 60, 2),
              "stopped_by_time_budget": state.time_stopped or state.stage_stopped, "stopped_early": stopped_early,
              "amp": run.amp, "world_size": run.info.world_size,
              "checkpoints": {"best": str(out / "best.safetensors"), "last": str(out / "last.safetensors")}}
    if run.info.is_main:
        _write_csv(out / "metrics.csv", state.rows)
        atomic_write_json(out / "metrics.json", result)
    return result


class TensorBoardLogger:
    """Callback writing per-step loss/LR and per-epoch metrics to ``out/tensorboard``."""

    def __init__(self, logdir: Path):
        self.check_available()
        # optional dependency: the tensorboard package (checked above)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    @staticmethod
    def check_available() -> None:
        try:  # optional dependency: the tensorboard package
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None

    def __call__(self, event: str, state: TrainState) -> None:
        if event == "step":
            self.writer.add_scalar("train/loss_running", state.loss_sum / max(state.images, 1), state.step)
            self.writer.add_scalar("train/lr", state.lr, state.step)
        elif event == "epoch":
            row = state.rows[-1]
            for k, v in row.items():
                if isinstance(v, float | int) and k != "epoch":
                    self.writer.add_scalar(f"epoch/{k}", v, row["epoch"])
            self.writer.flush()


# --- fit ----------------------------------------------------------------------------------------
def _quiet(_: str) -> None:
    pass


def fit(cfg: TrainConfig, log: Callable[[str], None] | None = print, callbacks: Sequence[Callback] = (),
        resume_command: str = "pixelwise train --resume") -> dict[str, Any]:
    """Train per ``cfg`` (which is left unchanged); returns the summary also written to
    ``out/metrics.json``, plus ``epochs_trained``: the epochs this call trained (0 for a resume
    that found nothing left to train). ``resume_command``: what the message of an interrupted run tells the
    user to run (with ``--out``) to continue it.

    ``callbacks`` are called as ``cb("step", state)`` after every optimizer step and
    ``cb("epoch", state)`` after every epoch's checkpoints (``state.rows[-1]`` is its row), with
    the :class:`TrainState`; raising ``KeyboardInterrupt`` in one behaves like Ctrl-C.
    """
    if not isinstance(cfg, TrainConfig):  # a dict gave "'dict' object has no attribute 'device'"
        raise TypeError(f"fit takes a TrainConfig, got {type(cfg).__name__}"
                        + (": fit(TrainConfig(**cfg))" if isinstance(cfg, dict) else ""))
    log = log or _quiet  # None: quiet, as a notebook user may pass it
    if callable(callbacks):  # one function was "'function' object is not iterable"
        raise TypeError("fit: callbacks must be a list of functions of (event, state); for one, callbacks=[cb]")
    callbacks = list(callbacks)  # a generator was used up by the check below: no callback was ever called
    if not callable(log) or not all(callable(cb) for cb in callbacks):  # found before anything is written
        raise TypeError("fit: log must be a function of one str (or None) and callbacks functions of (event, state)")
    info, device = dist.setup(cfg.device)
    try:
        return _train(cfg, info, device, log, callbacks, resume_command)
    finally:
        dist.cleanup()  # the run (its DDP wrapper) is released with _train's frame, before the group goes


def _train(cfg: TrainConfig, info: dist.DistInfo, device: torch.device, log: Callable[[str], None],
           callbacks: Sequence[Callback], resume_command: str) -> dict[str, Any]:
    run = setup_run(cfg, info, device, log if info.is_main else _quiet, callbacks)
    run.resume_command = resume_command
    state = resume(run) if run.cfg.resume else TrainState(selected_by=run.select, amp=run.amp)
    try:
        start_writing(run, state)
        return _train_stages(run, state, info, device)
    finally:
        if run.lock is not None:
            run.lock.close()


def _train_stages(run: Run, state: TrainState, info: dist.DistInfo, device: torch.device) -> dict[str, Any]:
    run.clock = time.monotonic() - state.elapsed_s
    run.log(f"precision: {run.amp} ({run.amp_why})")
    n_params = sum(p.numel() for p in run.module.parameters())
    run.log(f"training {run.cfg.model} ({n_params / 1e6:.2f}M parameters) on {run.cfg.dataset}: "
            f"{len(run.train_ds)} train / {len(run.val_ds)} val images, {run.cfg.epochs} "
            f"epoch{'s' if run.cfg.epochs != 1 else ''}, device {device}"
            + (f", {info.world_size} processes" if info.enabled else ""))
    note = getattr(run.module, "pretrained_note", None)  # e.g. what a staged FCN took from the coarser net
    if note and not run.cfg.resume:
        run.log(note)
    stages = plan_stages(run)
    epochs_before = state.epoch
    try:
        for stage in stages[state.stage:]:
            run_stage(run, state, stage)
    except KeyboardInterrupt as stop:
        with signals_ignored():  # a second Ctrl-C must not cut the save short
            said = save_interrupted(run, state)
        stop.args = (said,) if said else stop.args  # the CLI repeats it on stderr when stdout is not a terminal
        raise
    stopped_early = plateaued(stages[state.stage], state, run.select)
    if run.cfg.resume and state.epoch == epochs_before and state.stage_stopped:
        run.log(f"nothing to train: the run ended on its time budget ({run.cfg.max_minutes:g} min, "
                f"{state.elapsed_s / 60:.1f} min used); pass a larger --max-minutes to train on")
    elif run.cfg.resume and state.epoch == epochs_before and stopped_early:
        run.log(f"nothing to train: the run stopped early, no better {run.select} in its last "
                f"{stages[state.stage].cfg.patience} epochs; pass a larger --patience (or leave it out) to train on")
    elif run.cfg.resume and state.epoch == epochs_before and not state.batch:
        run.log(f"nothing to train: the run has trained all its {state.epoch} epochs; pass a larger --epochs to "
                "train on")
    summary = finish(run, state, stopped_early)
    dist.barrier()  # every rank is done with the group (rank 0 has written) before any destroys it
    return {**summary, "epochs_trained": state.epoch - epochs_before}

