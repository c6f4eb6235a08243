"""The training loop: ``fit`` = for each stage, for each epoch ``train_one_epoch`` then
``evaluate``, writing ``last.safetensors``, ``best.safetensors`` (by validation mIoU, or mask AP
for instance models), ``last.state.safetensors`` (everything needed to resume), ``metrics.csv``
(one row per epoch), ``metrics.json`` and the resolved ``config.yaml``.

Never losing work:
- every file is written atomically (temporary file + rename), so ``kill -9`` at any moment leaves
  the previous complete files;
- ``last.state.safetensors`` holds the weights *and* the optimizer, grad-scaler, schedule
  position (epoch, step, batch within the epoch), every RNG state and the elapsed time, in one
  file, so weights and state can never disagree;
- Ctrl-C (SIGINT) writes ``last`` + state at the last finished optimizer step, mid-epoch
  included, and raises ``KeyboardInterrupt`` (the CLI exits 130). ``--resume`` then continues the
  epoch with the batches not yet seen, in the same order;
- a NaN/inf loss stops the run with one line naming the epoch and step; nothing is written, so
  the last good checkpoint stays.

Determinism: every epoch re-seeds all RNGs from ``(seed, epoch, rank)`` and the data order comes
from a generator seeded the same way, so a resumed run reproduces an uninterrupted one (exactly
with ``num_workers=0``; with workers no sample is repeated or lost, but a mid-epoch resume draws
different augmentations).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from pixelwise.checkpoint import load_train_state as read_train_state
from pixelwise.checkpoint import model_input_spec, save_checkpoint
from pixelwise.checkpoint import save_train_state as write_train_state
from pixelwise.data import SegmentationDataset, build_dataset, collate
from pixelwise.data.augment import build_transform, resize_of
from pixelwise.data.base import Compose
from pixelwise.data.inspect import inspect_dataset
from pixelwise.data.instance_crop import InstanceCrop
from pixelwise.data.weightmap import UNetWeightMap
from pixelwise.engine import distributed as dist
from pixelwise.engine.config import INSTANCE_SELECT, SEMANTIC_SELECT, TrainConfig, parse_size
from pixelwise.engine.optim import Schedule, apply_lr, build_optimizer, set_peak_lr
from pixelwise.engine.precision import autocast, resolve_amp
from pixelwise.engine.validate import eval_collate, to_device, validate_instances, validate_semantic
from pixelwise.errors import UserError
from pixelwise.losses import segmentation_loss
from pixelwise.models import create_model, model_info, model_outputs
from pixelwise.preprocess import InputSpec

Callback = Callable[[str, dict], None]  # (event "step" | "epoch", state) -> None


# --- randomness -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 100003 + epoch) * 1009 + rank if rank else seed * 100003 + epoch


def rng_snapshot() -> tuple[dict[str, torch.Tensor], dict]:
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
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))


# --- losses -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    kind: str = "ce"  # ce | dice | focal | lovasz | ce+dice
    class_weights: torch.Tensor | None = None  # Tensor[C]
    focal_gamma: float = 2.0
    aux_weight: float = 0.4


def semantic_loss(model: nn.Module, batch: dict, spec: LossSpec) -> torch.Tensor:
    """``spec.kind`` on the main logits (+ ``aux_weight`` x the same on ``out["aux"]``)."""
    outputs = model_outputs(model, batch["image"])
    loss = 0.0
    for key, w in (("out", 1.0), ("aux", spec.aux_weight)):
        if key in outputs:
            loss = loss + w * segmentation_loss(outputs[key], batch["mask"], spec.kind, spec.class_weights,
                                                batch.get("weight"), spec.focal_gamma)
    return loss


def instance_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    losses = model(list(batch["image"]), batch["target"])
    return sum(losses.values())


def read_class_weights(path: str | Path, num_classes: int) -> list[float]:
    """A ``.json`` list or a ``.txt`` of numbers (whitespace/comma separated) -> C floats."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class weights file {path} not found (use none, median-freq or a .json/.txt file)")
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text())
            if isinstance(values, dict):
                values = values.get("weights")
        else:
            values = [float(v) for v in path.read_text().replace(",", " ").split()]
    except (ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read class weights ({e})") from None
    if (not isinstance(values, list) or len(values) != num_classes
            or not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values)):
        raise UserError(f"{path}: expected {num_classes} non-negative numbers (one per class)")
    return [float(v) for v in values]


def class_weights_for(cfg: TrainConfig, train_ds: SegmentationDataset, out: Path, log=print) -> list[float] | None:
    """``cfg.class_weights`` -> per-class weights. ``median-freq`` is computed once from the raw
    training split (``data.inspect``) and cached in ``out/class_weights.json``."""
    if cfg.class_weights in ("none", "", None):
        return None
    if cfg.class_weights != "median-freq":
        return read_class_weights(cfg.class_weights, train_ds.num_classes)
    cache = out / "class_weights.json"
    key = {"dataset": cfg.dataset, "data": cfg.data, "split": cfg.train_split, "dataset_kwargs": cfg.dataset_kwargs}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("source") == key and len(cached.get("weights", [])) == train_ds.num_classes:
            return [float(w) for w in cached["weights"]]
    log(f"computing median-frequency class weights over {len(train_ds)} training images")
    report = inspect_dataset(train_ds, progress=cfg.progress)
    weights = [1.0 if w is None else float(w) for w in report["median_freq_weights"]]
    if dist.env_info().is_main:
        tmp = cache.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"source": key, "class_names": list(train_ds.class_names),
                                   "weights": weights}, indent=2))
        tmp.replace(cache)
    return weights


# --- data -------------------------------------------------------------------------------------
def train_transform(cfg: TrainConfig) -> Callable:
    """``cfg.augment`` (with ``crop`` overriding ``augment.crop``) -> the train preset, preceded
    by an instance-centred crop to the crop size when ``instance_crops``."""
    aug = dict(cfg.augment)
    crop = parse_size(cfg.crop)
    if crop:
        aug["crop"] = list(crop)
    preset = build_transform(aug, train=True)
    if cfg.weight_map == "unet":  # computed on the whole raw mask, then augmented with it
        preset = Compose([UNetWeightMap(foreground=cfg.weight_map_class), preset])
    if not cfg.instance_crops:
        return preset
    if aug.get("crop") is None:
        raise UserError("instance_crops needs a crop size: set crop: HxW (or augment: {crop: [h, w]})")
    size = aug["crop"] if isinstance(aug["crop"], list | tuple) else (aug["crop"], aug["crop"])
    return Compose([InstanceCrop(size, cfg.instance_context), preset])


def open_datasets(cfg: TrainConfig) -> tuple[SegmentationDataset, SegmentationDataset]:
    train = build_dataset(cfg.dataset, cfg.data, cfg.train_split, **cfg.dataset_kwargs)
    val = build_dataset(cfg.dataset, cfg.data, cfg.val_split, **cfg.dataset_kwargs)
    for ds in (train, val):
        problems = ds.check()
        if problems and not cfg.skip_invalid:
            shown = "; ".join(str(p) for p in problems[:2])
            raise UserError(f"{len(problems)} problem(s) in the {cfg.dataset} data, e.g. {shown}; "
                            "fix them or pass --skip-invalid to train without those files")
        if problems:
            ds.drop(problems)
    return train, val


def input_contract(cfg: TrainConfig, model: nn.Module, train_ds: SegmentationDataset) -> InputSpec:
    """The model's input contract: the dataset's normalisation (or the model's own), the size
    ``augment.resize`` trains it at, its input channels. Saved in every checkpoint."""
    return model_input_spec(model, train_ds.mean, train_ds.std, resize_of(cfg.augment))


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
        sampler = DistributedSampler(range(n), info.world_size, info.rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    g = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    return torch.randperm(n, generator=g).tolist()


# --- one epoch ----------------------------------------------------------------------------------
class Diverged(UserError):
    """A NaN or infinite loss."""


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                    device: torch.device, lr_factor: Callable[[], float], state: dict, *, amp: str = "off",
                    scaler: torch.amp.GradScaler | None = None, accumulate: int = 1,
                    clip_grad_norm: float | None = None, channels_last: bool = False,
                    desc: str = "", show: bool = True, deadline: float | None = None,
                    callbacks: Sequence[Callback] = ()) -> bool:
    """Train over ``loader`` (whose first ``state["batch"]`` batches were already done).

    Every ``accumulate`` micro-batches (or fewer at the end) make one optimizer step at LR
    ``initial_lr * lr_factor()``; the loss of each micro-batch is divided by the group's size,
    so the step uses the mean gradient. After each step ``state`` gets ``step``, ``stage_step``,
    ``batch``, running ``loss_sum``/``images`` and ``rng`` (the RNG states), and the callbacks
    run with ``("step", state)``. Returns True when ``deadline`` (``time.monotonic()``) passed.
    """
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = len(loader) + state["batch"]  # micro-batches in the whole epoch
    bar = tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True)
    t0, seen, lr = time.monotonic(), 0, optimizer.param_groups[0]["lr"]
    for i, batch in enumerate(bar, start=state["batch"]):
        group_start = i - i % accumulate
        group_size = min(accumulate, total - group_start)
        last_in_group = i + 1 == group_start + group_size
        if i == group_start:
            lr = apply_lr(optimizer, lr_factor())
        batch = to_device(batch, device, channels_last)
        sync = contextlib.nullcontext() if last_in_group or not is_ddp else model.no_sync()
        with sync:
            with autocast(amp, device):
                loss = loss_fn(model, batch)
            value = loss.detach().float().reshape(1)
            if dist.active():  # every rank stops together on a NaN anywhere
                value = dist.all_reduce_sum(value) / dist.env_info().world_size
            value = value.item()
            if not math.isfinite(value):
                raise Diverged(f"training diverged: loss is {value} at epoch {state['epoch'] + 1} step "
                               f"{state['step'] + 1} (batch {i + 1}); the last good checkpoint is kept; "
                               "lower --lr or set --clip-grad-norm")
            scaler.scale(loss / group_size).backward()
        n = len(batch["image"])
        state["pending_loss"] = state.get("pending_loss", 0.0) + value * n
        state["pending_images"] = state.get("pending_images", 0) + n
        seen += n
        if last_in_group:
            if clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["stage_step"] += 1
            state["batch"] = i + 1
            state["loss_sum"] += state.pop("pending_loss")
            state["images"] += state.pop("pending_images")
            state["rng"] = rng_snapshot()
            for cb in callbacks:
                cb("step", state)
        speed = seen * dist.env_info().world_size / max(time.monotonic() - t0, 1e-9)
        bar.set_postfix(loss=f"{state['loss_sum'] / max(state['images'], 1):.4f}", lr=f"{lr:.2e}",
                        img_s=f"{speed:.1f}")
        if deadline is not None and last_in_group and time.monotonic() > deadline:
            return True
    return False


# --- checkpoints and state ------------------------------------------------------------------
def checkpoint_meta(cfg: TrainConfig, ds: SegmentationDataset, spec: InputSpec, summary: dict | None = None) -> dict:
    return {
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "num_classes": ds.num_classes,
        "task": model_info(cfg.model).task, "class_names": list(ds.class_names),
        "palette": [list(c) for c in ds.palette], "input": spec.to_dict(),
        "dataset": cfg.dataset, "training": summary or {},
    }


STATE_KEYS = ("epoch", "step", "stage", "stage_epoch", "stage_step", "stage_start_s", "stage_stopped", "batch",
              "loss_sum",
              "images", "best_score", "best_epoch", "selected_by", "elapsed_s", "rows", "amp")


def save_train_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, state: dict) -> None:
    """The counters of ``state`` (:data:`STATE_KEYS`) and its RNG snapshot, with the weights,
    optimizer and scaler (:func:`pixelwise.checkpoint.save_train_state`)."""
    rng_tensors, rng_meta = state["rng"] if state.get("rng") else rng_snapshot()
    meta = {**{k: state[k] for k in STATE_KEYS if k in state}, "rng": rng_meta}
    if meta.get("best_score") == -math.inf:
        meta["best_score"] = None
    write_train_state(path, model, optimizer, scaler, rng_tensors, meta)


def load_train_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None) -> dict:
    """Restore what :func:`save_train_state` wrote; -> the counters (``rng`` = (tensors, meta))."""
    tensors, meta = read_train_state(path, model, optimizer, scaler)
    if meta.get("best_score") is None:
        meta["best_score"] = -math.inf
    rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    meta["rng"] = (rng_tensors, meta["rng"]) if rng_tensors and meta.get("rng") else None
    return meta


def select_key(select_by: str, task: str) -> str:
    """The validation metric that picks ``best.safetensors`` (higher is better)."""
    if select_by == "auto":
        return "mask_AP" if task == "instance" else "mIoU"
    if (select_by in SEMANTIC_SELECT) != (task == "semantic"):
        valid = SEMANTIC_SELECT if task == "semantic" else INSTANCE_SELECT
        raise UserError(f"select_by {select_by!r} is not a metric of {task} validation; "
                        f"choose auto or one of: {', '.join(valid)}")
    return select_by


def _score(metrics: dict, key: str) -> float:
    value = metrics.get(key)
    return -math.inf if value is None else float(value)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


class TensorBoardLogger:
    """Callback writing per-step loss/LR and per-epoch metrics to ``out/tensorboard``."""

    def __init__(self, logdir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(str(logdir))

    def __call__(self, event: str, state: dict) -> None:
        if event == "step":
            self.writer.add_scalar("train/loss_running", state["loss_sum"] / max(state["images"], 1), state["step"])
            self.writer.add_scalar("train/lr", state["lr"], state["step"])
        elif event == "epoch":
            row = state["rows"][-1]
            for k, v in row.items():
                if isinstance(v, float | int) and k != "epoch":
                    self.writer.add_scalar(f"epoch/{k}", v, row["epoch"])
            self.writer.flush()


# --- fit ----------------------------------------------------------------------------------------
def fit(cfg: TrainConfig, log: Callable[[str], None] = print, callbacks: Sequence[Callback] = ()) -> dict:
    """Train per ``cfg``; returns the summary also written to ``out/metrics.json``.

    ``callbacks`` are called as ``cb("step", state)`` after every optimizer step and
    ``cb("epoch", state)`` after every epoch's checkpoint (``state["rows"][-1]`` is its row).
    """
    info, device = dist.setup(cfg.device)
    try:
        return _fit(cfg, info, device, log if info.is_main else (lambda *_: None), list(callbacks))
    finally:
        dist.cleanup()


def _fit(cfg: TrainConfig, info: dist.DistInfo, device: torch.device, log: Callable, callbacks: list) -> dict:
    task = model_info(cfg.model).task
    select = select_key(cfg.select_by, task)  # a bad choice fails here, before any work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    show = cfg.progress and info.is_main
    seed_everything(cfg.seed)
    train_ds, val_ds = open_datasets(cfg)
    model = create_model(cfg.model, num_classes=train_ds.num_classes, pretrained=cfg.pretrained,
                         **cfg.model_kwargs).to(device)
    contract = input_contract(cfg, model, train_ds)
    apply_contract(contract, train_ds, val_ds)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    amp, why = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if info.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    state: dict = {"epoch": 0, "step": 0, "stage": 0, "stage_epoch": 0, "stage_step": 0, "stage_start_s": 0.0,
                   "batch": 0, "loss_sum": 0.0, "images": 0, "best_score": -math.inf, "best_epoch": None,
                   "elapsed_s": 0.0, "rows": [], "amp": amp, "rng": None, "selected_by": select}
    if cfg.resume:
        state.update(load_train_state(out / "last.state.safetensors", model, optimizer, scaler))
        if state["selected_by"] != select:  # best_score and best.safetensors belong to the other metric
            raise UserError(f"{out} picked best.safetensors by {state['selected_by']}; resume with "
                            f"--select-by {state['selected_by']}, or train into a new --out")
        where = f"epoch {state['epoch']}" + (f" + {state['batch']} batches" if state["batch"] else "")
        log(f"resumed from {out / 'last.state.safetensors'} after {where}")
        if state["amp"] != amp:
            amp, why = state["amp"], "kept from the resumed run"
            scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    log(f"precision: {amp} ({why})")

    cw = None
    if task == "instance":
        if cfg.class_weights not in ("none", "", None):
            raise UserError("class_weights applies to semantic models only; remove it for instance models")
        eval_instances = validate_instances
    else:
        eval_instances = None
        weights = class_weights_for(cfg, train_ds, out, log)
        cw = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None

    module = model
    model = dist.wrap_model(model, info, device, cfg.sync_bn, find_unused_parameters=task == "instance")
    if cfg.tensorboard and info.is_main:
        callbacks.append(TensorBoardLogger(out / "tensorboard"))

    n_params = sum(p.numel() for p in module.parameters())
    log(f"training {cfg.model} ({n_params / 1e6:.2f}M parameters) on {cfg.dataset}: "
        f"{len(train_ds)} train / {len(val_ds)} val images, {cfg.epochs} epochs, device {device}"
        + (f", {info.world_size} processes" if info.enabled else ""))
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    start = time.monotonic() - state["elapsed_s"]
    stages = cfg.stage_configs()
    stopped = False
    val_ds_eval = Subset(val_ds, dist.shard(len(val_ds), info)) if info.enabled else val_ds
    try:
        for si, (stage_name, scfg) in enumerate(stages):
            if si < state["stage"] or (si == state["stage"] and state.get("stage_stopped")):
                continue
            if si > state["stage"]:
                state.update(stage=si, stage_epoch=0, stage_step=0, stage_start_s=time.monotonic() - start,
                             stage_stopped=False)
            set_peak_lr(optimizer, scfg.lr)
            if len(stages) > 1:
                log(f"stage {si + 1}/{len(stages)} ({stage_name}): {scfg.epochs} epochs, lr {scfg.lr}"
                    + (", instance-centred crops" if scfg.instance_crops else ""))
            train_ds.transform = train_transform(scfg)
            spec = None if task == "instance" else LossSpec(scfg.loss, cw, scfg.focal_gamma, scfg.aux_weight)
            per_rank = len(epoch_indices(len(train_ds), scfg, 1, info))
            drop_last = per_rank > scfg.batch_size
            batches = per_rank // scfg.batch_size if drop_last else math.ceil(per_rank / scfg.batch_size)
            schedule = Schedule.from_config(scfg, math.ceil(batches / scfg.accumulate))
            # the time budget is shared among stages in proportion to their epochs
            stage_budget = budget_s * scfg.epochs / cfg.epochs if budget_s else None

            def lr_factor(schedule=schedule, stage_budget=stage_budget, peak=scfg.lr) -> float:
                frac = 0.0
                if stage_budget:
                    frac = (time.monotonic() - start - state["stage_start_s"]) / stage_budget
                f = schedule.factor(state["stage_step"], frac)
                state["lr"] = peak * f
                return f

            def loss_fn(m, b, spec=spec):
                return instance_loss(m, b) if spec is None else semantic_loss(m, b, spec)

            while state["stage_epoch"] < scfg.epochs:
                epoch = state["epoch"] + 1
                seed_everything(epoch_seed(cfg.seed, epoch, info.rank))
                indices = epoch_indices(len(train_ds), scfg, epoch, info)
                if state["batch"]:  # resuming inside this epoch: same order, skip what was done
                    indices = indices[state["batch"] * scfg.batch_size:]
                    if state.get("rng"):
                        rng_restore(*state["rng"])
                else:
                    state.update(loss_sum=0.0, images=0)
                loader = DataLoader(train_ds, batch_sampler=BatchSampler(indices, scfg.batch_size, drop_last),
                                    num_workers=cfg.num_workers, collate_fn=collate, worker_init_fn=_worker_init,
                                    generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, info.rank)))
                deadline = None
                if budget_s:
                    deadline = start + (budget_s if si == len(stages) - 1
                                        else state["stage_start_s"] + stage_budget)
                t_epoch = time.monotonic()
                images_before = state["images"]
                stopped = train_one_epoch(
                    model, loader, optimizer, loss_fn, device, lr_factor, state, amp=amp, scaler=scaler,
                    accumulate=scfg.accumulate, clip_grad_norm=scfg.clip_grad_norm,
                    channels_last=cfg.channels_last, desc=f"epoch {epoch}/{cfg.epochs}", show=show,
                    deadline=deadline, callbacks=callbacks)
                speed = ((state["images"] - images_before) * info.world_size
                         / max(time.monotonic() - t_epoch, 1e-9))
                sums = dist.all_reduce_sum(torch.tensor([state["loss_sum"], float(state["images"])],
                                                        dtype=torch.float64, device=device))
                train_loss = (sums[0] / sums[1].clamp_min(1)).item()
                metrics = run_validation(model, module, val_ds, val_ds_eval, eval_instances, cfg, device, info,
                                         amp, show)
                state["epoch"], state["stage_epoch"], state["batch"] = epoch, state["stage_epoch"] + 1, 0
                state["elapsed_s"] = time.monotonic() - start
                row = {"epoch": epoch, **({"stage": stage_name} if len(stages) > 1 else {}),
                       "train_loss": train_loss, "val_loss": metrics.get("loss"),
                       **{k: v for k, v in metrics.items() if isinstance(v, float | int) and k != "loss"},
                       "lr": optimizer.param_groups[0]["lr"], "img_per_s": round(speed, 2),
                       "elapsed_s": round(state["elapsed_s"], 1)}
                state["rows"].append(row)
                state["stage_stopped"] = stopped  # by the time budget: a resume moves on to the next stage
                state["rng"] = rng_snapshot()
                save_epoch(out, cfg, train_ds, contract, module, optimizer, scaler, state, metrics, select,
                           info.is_main)
                shown = " ".join(f"{k}={v:.4f}" for k, v in row.items()
                                 if isinstance(v, float) and k not in ("lr", "img_per_s", "elapsed_s"))
                log(f"epoch {epoch}: {shown} lr={row['lr']:.2e} {row['img_per_s']:.1f} img/s"
                    + (" (time budget reached)" if stopped else ""))
                dist.barrier()
                for cb in callbacks:
                    cb("epoch", state)
                if stopped:
                    break
            if stopped and si == len(stages) - 1:
                break
    except KeyboardInterrupt:
        if info.is_main:
            state["elapsed_s"] = time.monotonic() - start
            summary = {"epoch": state["epoch"], "interrupted_after_batches": state["batch"]}
            save_checkpoint(out / "last.safetensors", module, checkpoint_meta(cfg, train_ds, contract, summary))
            save_train_state(out / "last.state.safetensors", module, optimizer, scaler, state)
            where = f"epoch {state['epoch'] + 1} batch {state['batch']}" if state["batch"] else \
                f"the end of epoch {state['epoch']}"
            log(f"interrupted: saved {out / 'last.safetensors'} and its training state at {where}; "
                "--resume continues from there")
        raise

    best_row = next((r for r in state["rows"] if r["epoch"] == state["best_epoch"]), None)
    result = {"model": cfg.model, "dataset": cfg.dataset, "epochs_completed": state["epoch"],
              "best_epoch": state["best_epoch"], "selected_by": select, "best": best_row,
              "final": state["rows"][-1] if state["rows"] else None, "steps": state["step"],
              "train_minutes": round(state["elapsed_s"] / 60, 2),
              "stopped_by_time_budget": bool(stopped or state.get("stage_stopped")),
              "amp": amp, "world_size": info.world_size,
              "checkpoints": {"best": str(out / "best.safetensors"), "last": str(out / "last.safetensors")}}
    if info.is_main:
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out / "metrics.json")
    return result


def save_epoch(out: Path, cfg: TrainConfig, train_ds: SegmentationDataset, spec: InputSpec, module: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, state: dict, metrics: dict,
               select: str, write: bool) -> None:
    """After an epoch: ``best`` (if ``metrics[select]`` improved), ``last``, the training state and
    ``metrics.csv``, in that order, each atomically (only where ``write``: rank 0)."""
    score, epoch = _score(metrics, select), state["epoch"]
    improved = score > state["best_score"]
    if improved:
        state["best_score"], state["best_epoch"] = score, epoch
    if not write:
        return
    meta = checkpoint_meta(cfg, train_ds, spec, {"epoch": epoch, "val": metrics})
    if improved:
        save_checkpoint(out / "best.safetensors", module, meta)
    save_checkpoint(out / "last.safetensors", module, meta)
    save_train_state(out / "last.state.safetensors", module, optimizer, scaler, state)
    _write_csv(out / "metrics.csv", state["rows"])


def run_validation(model: nn.Module, module: nn.Module, val_ds: SegmentationDataset, val_shard,
                   eval_instances, cfg: TrainConfig, device: torch.device, info: dist.DistInfo,
                   amp: str, show: bool) -> dict:
    """Semantic: every rank evaluates its shard, metrics reduced over ranks. Instance: rank 0
    evaluates the whole split with ``validate_instances`` and shares the result."""
    dist.broadcast_module_state(module)  # BatchNorm statistics of rank 0, i.e. of the saved weights
    if eval_instances is None:
        loader = DataLoader(val_shard, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            collate_fn=eval_collate)
        return validate_semantic(module, loader, val_ds.num_classes, device, list(val_ds.class_names), show, amp,
                        cfg.channels_last)
    metrics = None
    if info.is_main:
        loader = DataLoader(val_ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate)
        metrics = eval_instances(module, loader, val_ds, device, show=show)
    return dist.broadcast_object(metrics)
