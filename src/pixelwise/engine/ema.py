"""An exponential moving average of a model's weights (Polyak averaging), as in Polyak and
Juditsky, Acceleration of Stochastic Approximation by Averaging, SIAM J. Control Optim. 1992,
and the "EMA of weights" of modern training recipes.

After every optimizer step ``k`` (counted from 1) each floating-point entry of the state dict
(weights and BatchNorm running statistics) moves towards the live model's:
``avg <- d * avg + (1 - d) * live`` with ``d = min(decay, (1 + k) / (10 + k))``, so the first
steps, whose weights are far from anything worth keeping, are forgotten quickly; integer buffers
(``num_batches_tracked``) are copied. The average is what a run validates and saves.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(decay: float, step: int) -> float:
    """The decay used after optimizer step ``step`` (1, 2, ...): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """The averaged copy of ``model`` (``.module``, in eval mode, without gradients)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards ``model`` after optimizer step ``step``."""
        d = ema_decay(self.decay, step)
        live = model.state_dict()
        for name, avg in self.module.state_dict().items():
            if avg.is_floating_point():
                avg.lerp_(live[name].to(avg.dtype), 1 - d)
            else:
                avg.copy_(live[name])

    def state_tensors(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        """The average's tensors, keyed ``prefix + name``, for the training state file."""
        return {prefix + k: v for k, v in self.module.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "ema.") -> bool:
        """Restore what :meth:`state_tensors` gave; False when ``tensors`` holds no average."""
        found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not found:
            return False
        self.module.load_state_dict(found)
        return True
