"""The training loop: ``fit`` = for each epoch ``train_one_epoch`` then ``evaluate``, writing
``last.safetensors``, ``best.safetensors`` (by validation mIoU, or mask AP for instance models),
``metrics.csv`` (one row per epoch), ``metrics.json`` and the resolved ``config.yaml``.

Determinism and resume: every epoch re-seeds all RNGs from ``(seed, epoch)``, and the training
state (optimizer, epoch, step, best score, elapsed time) is saved beside ``last.safetensors`` as
``last.state.safetensors`` at the end of each epoch, so ``--resume`` continues from the last
completed epoch exactly as an uninterrupted run would.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from pixelwise.data import SegmentationDataset, build_dataset, collate
from pixelwise.data.transforms import RandomCrop, RandomFlip
from pixelwise.engine.checkpoint import atomic_save_tensors, save_checkpoint
from pixelwise.engine.config import TrainConfig, parse_size
from pixelwise.errors import UserError
from pixelwise.losses import cross_entropy
from pixelwise.metrics import ConfusionMeter
from pixelwise.models import create_model, model_info


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def forward_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The main logits of a semantic model, whether it returns a tensor or ``{"out": ...}``."""
    out = model(images)
    return out["out"] if isinstance(out, dict) else out


def semantic_loss(model: nn.Module, batch: dict, class_weights: torch.Tensor | None,
                  aux_weight: float = 0.4) -> torch.Tensor:
    out = model(batch["image"])
    pixel_weights = batch.get("weight")
    if isinstance(out, dict):
        loss = cross_entropy(out["out"], batch["mask"], class_weights, pixel_weights)
        if "aux" in out:
            loss = loss + aux_weight * cross_entropy(out["aux"], batch["mask"], class_weights, pixel_weights)
        return loss
    return cross_entropy(out, batch["mask"], class_weights, pixel_weights)


def instance_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    losses = model(list(batch["image"]), batch["target"])
    return sum(losses.values())


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif k == "target":
            out[k] = [{kk: vv.to(device) for kk, vv in t.items()} for t in v]
        else:
            out[k] = v
    return out


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the peak LR at ``progress`` in [0, 1]."""
    if schedule == "constant":
        return 1.0
    if schedule == "poly":
        return max(0.0, 1.0 - progress) ** 0.9
    raise UserError(f"unknown schedule {schedule!r}; choose poly or constant")


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    loss_fn, device: torch.device, progress_fn, *, desc: str = "",
                    show: bool = True, deadline: float | None = None) -> tuple[float, bool]:
    """One pass over ``loader``. ``progress_fn()`` -> progress in [0, 1] for the LR schedule.
    Returns (mean loss, stopped early because the deadline passed)."""
    model.train()
    total, count, stopped = 0.0, 0, False
    bar = tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True)
    for batch in bar:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * progress_fn()
        batch = to_device(batch, device)
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise UserError(f"training diverged: loss is {loss.item()} at {desc} batch {count + 1}; "
                            "lower --lr (the last good checkpoint is kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        count += 1
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if deadline is not None and time.monotonic() > deadline:
            stopped = True
            break
    return total / max(count, 1), stopped


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, device: torch.device,
             class_names: list[str] | None = None, show: bool = True) -> dict:
    """Validation loss and the confusion-matrix metrics of a semantic model."""
    model.eval()
    meter = ConfusionMeter(num_classes)
    loss_sum, n = 0.0, 0
    for batch in tqdm(loader, desc="eval", leave=False, disable=not show, dynamic_ncols=True):
        batch = to_device(batch, device)
        logits = forward_logits(model, batch["image"])
        loss_sum += cross_entropy(logits, batch["mask"]).item() * len(logits)
        n += len(logits)
        meter.update(logits.argmax(1), batch["mask"])
    metrics = meter.compute(class_names)
    metrics["loss"] = loss_sum / max(n, 1)
    metrics["num_images"] = n
    return metrics


def build_train_transform(cfg: TrainConfig):
    crop = parse_size(cfg.crop)
    steps = [RandomFlip()] + ([RandomCrop(crop)] if crop else [])
    return lambda s: _chain(steps, s)


def _chain(steps, sample):
    for step in steps:
        sample = step(sample)
    return sample


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
    train.transform = build_train_transform(cfg)
    return train, val


def checkpoint_meta(cfg: TrainConfig, ds: SegmentationDataset, summary: dict | None = None) -> dict:
    return {
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "num_classes": ds.num_classes,
        "task": model_info(cfg.model).task, "class_names": list(ds.class_names),
        "palette": [list(c) for c in ds.palette], "mean": list(ds.mean), "std": list(ds.std),
        "dataset": cfg.dataset, "training": summary or {},
    }


def save_train_state(path: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Optimizer tensors + JSON (param groups, epoch, step, best score, elapsed) in safetensors."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    meta = {**state, "param_groups": opt["param_groups"], "optim_scalars": scalars}
    atomic_save_tensors(tensors, path, {"pixelwise_train_state": json.dumps(meta)})


def load_train_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"cannot resume: {path} not found (was this run started with this --out?)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["pixelwise_train_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.pop("optim_scalars").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose adam or sgd")
    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
    return opt


def _score(metrics: dict) -> float:
    for key in ("mIoU", "mask_AP"):
        if metrics.get(key) is not None:
            return float(metrics[key])
    return -math.inf


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


def fit(cfg: TrainConfig, log=print) -> dict:
    """Train per ``cfg``; returns the summary that is also written to ``out/metrics.json``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    seed_everything(cfg.seed)
    train_ds, val_ds = open_datasets(cfg)
    task = model_info(cfg.model).task
    model = create_model(cfg.model, num_classes=train_ds.num_classes, pretrained=cfg.pretrained,
                         **cfg.model_kwargs).to(device)
    optimizer = make_optimizer(cfg, model)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    state = {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": None, "elapsed_s": 0.0,
             "rows": []}
    if cfg.resume:
        from pixelwise.engine.checkpoint import read_checkpoint

        weights, _ = read_checkpoint(out / "last.safetensors")
        model.load_state_dict(weights)
        state.update(load_train_state(out / "last.state.safetensors", optimizer))
        log(f"resumed from {out / 'last.safetensors'} after epoch {state['epoch']}")

    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    start = time.monotonic() - state["elapsed_s"]

    def progress() -> float:
        p = state["step"] / total_steps
        if budget_s:
            p = max(p, (time.monotonic() - start) / budget_s)
        state["step"] += 1
        return lr_factor(cfg.schedule, min(p, 1.0))

    if task == "instance":
        from pixelwise.engine.instance import evaluate_instances as eval_fn

        def loss_fn(m, b):
            return instance_loss(m, b)
    else:
        eval_fn = None

        def loss_fn(m, b):
            return semantic_loss(m, b, None)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {cfg.model} ({n_params / 1e6:.2f}M parameters) on {cfg.dataset}: "
        f"{len(train_ds)} train / {len(val_ds)} val images, {cfg.epochs} epochs, device {device}")
    stopped = False
    while state["epoch"] < cfg.epochs and not stopped:
        epoch = state["epoch"] + 1
        seed_everything(cfg.seed * 100003 + epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
                            num_workers=cfg.num_workers, collate_fn=collate, generator=generator,
                            worker_init_fn=_worker_init, persistent_workers=False)
        deadline = start + budget_s if budget_s else None
        train_loss, stopped = train_one_epoch(model, loader, optimizer, loss_fn, device, progress,
                                              desc=f"epoch {epoch}/{cfg.epochs}", show=cfg.progress,
                                              deadline=deadline)
        val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                collate_fn=collate)
        if eval_fn is None:
            metrics = evaluate(model, val_loader, val_ds.num_classes, device, val_ds.class_names, cfg.progress)
        else:
            metrics = eval_fn(model, val_loader, val_ds, device, show=cfg.progress)
        state["epoch"] = epoch
        state["elapsed_s"] = time.monotonic() - start
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": metrics.get("loss"),
               **{k: v for k, v in metrics.items() if isinstance(v, float | int) and k != "loss"},
               "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(state["elapsed_s"], 1)}
        state["rows"].append(row)
        score = _score(metrics)
        summary = {"epoch": epoch, "val": metrics}
        if score > state["best_score"]:
            state["best_score"], state["best_epoch"] = score, epoch
            save_checkpoint(out / "best.safetensors", model, checkpoint_meta(cfg, train_ds, summary))
        save_checkpoint(out / "last.safetensors", model, checkpoint_meta(cfg, train_ds, summary))
        save_train_state(out / "last.state.safetensors", optimizer, state)
        _write_csv(out / "metrics.csv", state["rows"])
        shown = " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "lr")
        log(f"epoch {epoch}: {shown}" + (" (time budget reached)" if stopped else ""))

    best_row = next((r for r in state["rows"] if r["epoch"] == state["best_epoch"]), None)
    result = {"model": cfg.model, "dataset": cfg.dataset, "epochs_completed": state["epoch"],
              "best_epoch": state["best_epoch"], "best": best_row,
              "final": state["rows"][-1] if state["rows"] else None,
              "train_minutes": round(state["elapsed_s"] / 60, 2), "stopped_by_time_budget": stopped,
              "checkpoints": {"best": str(out / "best.safetensors"), "last": str(out / "last.safetensors")}}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
