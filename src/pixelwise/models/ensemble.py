"""Ensembles of semantic segmentation models, e.g. EDeconvNet = DeconvNet + FCN-8s (Noh et al., ICCV 2015).

:class:`Ensemble` averages the members' class probabilities and returns the *log* of that average:
``softmax`` of the output gives back the averaged probabilities exactly, ``argmax`` is the
ensemble's prediction, and ``cross_entropy`` on the output is the negative log-likelihood of the
averaged distribution (``log_softmax`` of log-probabilities that already sum to one is the identity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from pixelwise.models._utils import forward_logits
from pixelwise.models.deconvnet import deconvnet
from pixelwise.models.fcn import fcn8s

__all__ = ["Ensemble", "edeconvnet"]


class Ensemble(nn.Module):
    """``Tensor[N, 3, H, W]`` -> ``Tensor[N, C, H, W]`` = ``log(sum_m w_m softmax(f_m(x)))``.

    ``models``: semantic models with the same classes (a member returning a dict contributes its
    ``"out"``, read by :func:`pixelwise.models.forward_logits`); ``weights``: positive, one per
    model, normalised to sum to 1 (default: equal).
    """

    log_weights: Tensor  # non-persistent buffer: configuration, not checkpoint data

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(models) == 0:
            raise ValueError("an ensemble needs at least one model")
        w = [1.0] * len(models) if weights is None else [float(v) for v in weights]
        if len(w) != len(models) or any(not v > 0 for v in w):
            raise ValueError(f"need one positive weight per model ({len(models)}), got {weights}")
        self.members = nn.ModuleList(models)
        # what tiled inference reads (pixelwise.inference.tiling): the widest context of the members
        # (none if one states none: it sees the whole image) and a grid every member's grid divides
        contexts = [int(getattr(m, "context", 0)) for m in models]
        self.context = max(contexts) if all(contexts) else 0
        self.alignment = math.lcm(*(max(1, int(getattr(m, "alignment", 1))) for m in models))
        total = sum(w)
        self.register_buffer("log_weights", torch.tensor([v / total for v in w]).log(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        logs = []
        for model, log_w in zip(self.members, self.log_weights):
            logits = forward_logits(model, x)
            logs.append(torch.log_softmax(logits.float(), dim=1) + log_w)
        return torch.logsumexp(torch.stack(logs), dim=0)


def edeconvnet(num_classes: int, pretrained: str | None = None, weights: Sequence[float] | None = None
               ) -> Ensemble:
    """EDeconvNet: ``Ensemble([deconvnet, fcn8s])`` (DeconvNet paper, Sec. 4.3), about 386M
    parameters, so it is not registered; build it directly. ``pretrained`` goes to both members, so
    it is ``"imagenet"`` (each downloads its own VGG: DeconvNet VGG16-BN, FCN-8s plain VGG-16); no
    one file is both, so for local copies build the two members with their files and
    ``Ensemble([...])`` them.

    The paper combines DeconvNet run *instance-wise* (on proposals) with FCN-8s on the whole image;
    :class:`Ensemble` runs both on the whole image. For the paper's combination, average
    :func:`pixelwise.models.deconvnet.instance_wise_predict` with FCN-8s's softmax (see
    ``docs/models.md``).
    """
    members = [deconvnet(num_classes, pretrained=pretrained), fcn8s(num_classes, pretrained=pretrained)]
    return Ensemble(members, weights)
