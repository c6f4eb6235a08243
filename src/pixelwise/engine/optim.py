"""Optimisers and learning-rate schedules.

``build_optimizer`` makes SGD (momentum, Nesterov), Adam or AdamW with two parameter groups:
weights that get weight decay, and biases plus normalisation-layer weights (every parameter
with fewer than 2 dimensions) that do not; ``lr_mult`` (``{"fc8": 10}``, DeepLab's classifier at
ten times the rate) splits off the parameters it names into groups of their own rate.

A :class:`Schedule` is a pure function of the optimizer step (and, with a time budget, of the
elapsed fraction of it) -> LR multiplier. It has no state of its own beyond the step counter the
trainer saves, so a resumed run recomputes exactly the LR an uninterrupted run would use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from pixelwise.engine.config import TrainConfig
from pixelwise.errors import UserError


def lr_mult_of(name: str, lr_mult: Mapping[str, float]) -> float:
    """The LR multiplier of parameter ``name``: the value of the longest key of ``lr_mult`` that is
    ``name`` or a module above it (``fc8`` holds ``fc8.weight``, not ``fc80.weight``); else 1."""
    keys = [k for k in lr_mult if name == k or name.startswith(k + ".")]
    return float(lr_mult[max(keys, key=len)]) if keys else 1.0


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False,
                 lr_mult: Mapping[str, float] | None = None) -> list[dict]:
    """Trainable parameters split into ``[{"params": decayed, "weight_decay": wd},
    {"params": biases and norm weights, "weight_decay": 0}]`` (empty groups left out), and each of
    those by :func:`lr_mult_of`: the groups at the model's own rate first, then each other rate's
    (ascending), which carry ``"lr_mult"``. A key of ``lr_mult`` that names no trainable parameter
    is a :class:`UserError`."""
    lr_mult = dict(lr_mult or {})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unused = [k for k in lr_mult if not any(n == k or n.startswith(k + ".") for n, _ in named)]
    if unused:
        tops = sorted({n.split(".")[0] for n, _ in named})
        last = named[-1][0].rsplit(".", 1)[0] if named else "-"
        raise UserError(f"lr_mult: the model has no trainable parameter named {unused[0]!r} or under it; give a "
                        f"module's name as the model names it, such as {', '.join(tops[:8])} (its last layer: "
                        f"{last})")
    mults = sorted({lr_mult_of(n, lr_mult) for n, _ in named}, key=lambda m: (m != 1.0, m))
    groups = []
    for mult in mults:
        decay = [p for n, p in named if lr_mult_of(n, lr_mult) == mult and (decay_norm_and_bias or p.ndim > 1)]
        no_decay = [p for n, p in named if lr_mult_of(n, lr_mult) == mult and not (decay_norm_and_bias or p.ndim > 1)]
        extra = {} if mult == 1.0 else {"lr_mult": mult}  # runs without it keep the state files of before
        groups += [{"params": decay, "weight_decay": weight_decay, **extra},
                   {"params": no_decay, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (sgd | adam | adamw) over :func:`param_groups`; every group remembers its
    peak LR as ``initial_lr`` (``lr`` times its ``lr_mult``)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias, cfg.lr_mult)
    if not groups:
        raise UserError(f"model {cfg.model!r} has no trainable parameters")
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                     nesterov=cfg.nesterov and cfg.momentum > 0)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    else:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose sgd, adam or adamw")
    set_peak_lr(opt, cfg.lr)
    return opt


def set_peak_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's peak (and current) LR: ``lr`` times the group's ``lr_mult`` (1 if none)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr * group.get("lr_mult", 1.0)
        group["lr"] = group["initial_lr"]


@dataclass(frozen=True)
class Schedule:
    """LR multiplier over ``total_steps`` optimizer steps (= configured epochs x steps per epoch).

    kind: poly ``(1 - p) ** power`` | cosine ``(1 + cos(pi p)) / 2`` | step ``gamma ** (#{milestones
    <= p * epochs} + floor(step / step_size))`` | constant; ``p`` = progress in [0, 1]. The
    ``step_size`` term (0: none) is Caffe's ``step`` policy, counted in optimizer steps of the
    schedule (a stage's own steps), independent of any time budget. A linear warm-up from
    ``warmup_factor`` to 1 over the first ``warmup_steps`` steps multiplies it.
    """

    kind: str
    total_steps: int
    epochs: float = 1.0
    power: float = 0.9
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    step_size: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
        warmup = max(int(round(cfg.warmup_epochs * steps_per_epoch)), int(cfg.warmup_iters))
        return cls(cfg.schedule, max(1, steps_per_epoch * cfg.epochs), float(cfg.epochs), cfg.poly_power,
                   tuple(float(m) for m in cfg.milestones), cfg.gamma, warmup, cfg.warmup_factor, cfg.step_size)

    def progress(self, step: int, time_fraction: float = 0.0) -> float:
        """max(step fraction, time fraction), clipped to [0, 1]."""
        return min(1.0, max(step / self.total_steps, time_fraction, 0.0))

    def factor(self, step: int, time_fraction: float = 0.0) -> float:
        """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
        p = self.progress(step, time_fraction)
        if self.kind == "constant":
            f = 1.0
        elif self.kind == "poly":
            f = (1.0 - p) ** self.power
        elif self.kind == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * p))
        elif self.kind == "step":
            drops = sum(1 for m in self.milestones if p * self.epochs >= m - 1e-9)
            f = self.gamma ** (drops + (step // self.step_size if self.step_size else 0))
        else:
            raise UserError(f"unknown schedule {self.kind!r}; choose poly, cosine, step or constant")
        if step < self.warmup_steps:
            f *= self.warmup_factor + (1.0 - self.warmup_factor) * step / self.warmup_steps
        return f


def apply_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's LR to ``initial_lr * factor``; -> the run's LR, that of a group without
    ``lr_mult`` (the first group's divided by its multiplier, should every group have one)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    first = optimizer.param_groups[0]
    return first["lr"] / first.get("lr_mult", 1.0)
