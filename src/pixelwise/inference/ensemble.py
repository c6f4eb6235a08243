"""Ensembles of checkpoints: the mean of their class probabilities, as EDeconvNet averages
DeconvNet's and FCN's (Noh et al., ICCV 2015, Sec. 4.3).

``pixelwise predict --checkpoint A --checkpoint B ...`` (and ``eval``) build an
:class:`EnsemblePredictor` with :func:`from_checkpoints`. Each member is a full
:class:`~pixelwise.inference.predictor.SemanticPredictor`: it keeps its own input contract
(normalisation, size), its own tiling geometry, TTA and Monte-Carlo dropout, and hands back
probabilities at the image's size; the ensemble averages those, row band by row band, so a tiled
large image stays streamed. The members must predict the same classes.
(:class:`pixelwise.models.ensemble.Ensemble` is the in-model counterpart, for models trained or
exported together.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pixelwise.errors import UserError
from pixelwise.inference.crf import CRFSettings
from pixelwise.inference.fast import MC_DROPOUT, eager_only, resolve_mode
from pixelwise.inference.mc_dropout import has_dropout
from pixelwise.inference.predictor import Bands, Predictor, SemanticPredictor, check_mc_samples


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} classes: {shown}"


def _take_rows(queue: list[torch.Tensor], n: int) -> torch.Tensor:
    """Remove the first ``n`` rows from a queue of bands Tensor[C, rows, W] and return them."""
    rows = queue[0] if len(queue) == 1 else torch.cat(queue, 1)
    queue[:] = [rows[:, n:]] if rows.shape[1] > n else []
    return rows[:, :n]


class EnsemblePredictor(SemanticPredictor):
    """The mean of the members' class probabilities Tensor[C, H, W] (equal weights). ``names``
    (e.g. the checkpoint paths) name the members in error messages. ``crf``: refine the mean with
    the fully connected CRF (the members' own predictions are not refined)."""

    def __init__(self, members: Sequence[SemanticPredictor], names: Sequence[str] | None = None,
                 crf: CRFSettings | dict | bool | None = None) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        names = list(names or [f"member {i + 1}" for i in range(len(members))])
        first = members[0]
        for member, name in zip(members[1:], names[1:]):
            if member.class_names != first.class_names:
                raise UserError(f"ensemble members must predict the same classes: {names[0]} has "
                                f"{_names(first.class_names)}; {name} has {_names(member.class_names)}")
        self.members = list(members)  # before the base class asks _model_classes
        super().__init__(nn.ModuleList(m.model for m in members), first.meta, first.device, first.input_spec,
                         tile=first.tile, overlap=first.overlap, tta=first.tta, batch_size=first.batch_size, crf=crf)
        self.names = names
        self.mode = first.mode  # the members run themselves, each in the mode it was built with

    def _model_classes(self) -> int | None:
        return len(self.members[0].class_names)  # the members' (equal) classes; a ModuleList has no forward

    def needs_tiles(self, image: np.ndarray) -> bool:
        return any(m.needs_tiles(image) for m in self.members)

    def _whole_probs(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        per_member = [m._whole_probs(images) for m in self.members]
        return [sum(probs) / len(probs) for probs in zip(*per_member)]

    def _whole_bands(self, images: Sequence[np.ndarray]) -> list[Bands]:
        return [iter([(0, probs)]) for probs in self._whole_probs(images)]

    def _bands(self, image: np.ndarray, progress: bool | None = False) -> Bands:
        """The members' bands averaged row by row: the member furthest behind runs next, and rows
        every member has delivered are averaged and handed on."""
        streams = [m._bands(image, progress) for m in self.members]
        queues: list[list[torch.Tensor]] = [[] for _ in streams]
        delivered = [0] * len(streams)
        top = 0
        while top < image.shape[0]:
            k = delivered.index(min(delivered))
            _, band = next(streams[k])
            queues[k].append(band)
            delivered[k] += band.shape[1]
            ready = min(delivered)
            if ready > top:
                rows = [_take_rows(q, ready - top) for q in queues]
                yield top, sum(rows) / len(rows)  # type: ignore[misc]
                top = ready


def from_checkpoints(paths: Sequence[str | Path], device: str | torch.device | None = "cpu",
                     **options: Any) -> Predictor:
    """:meth:`Predictor.from_checkpoint` for one path (a :class:`SemanticPredictor` or an
    :class:`InstancePredictor`); an :class:`EnsemblePredictor` of semantic checkpoints for several
    (``options`` apply to every member). Its ``predict`` is typed as :meth:`Predictor.predict`'s,
    ``Prediction | dict[str, Tensor]``: narrow it with ``isinstance(pred, Prediction)``."""
    if isinstance(paths, str | Path):
        raise TypeError(f"from_checkpoints takes a list of checkpoint paths, got one {type(paths).__name__}: "
                        f"[{str(paths)!r}] (or Predictor.from_checkpoint for one)")
    paths = list(paths)  # a generator had no len()
    if not paths:
        raise ValueError("from_checkpoints needs at least one checkpoint path")
    if len(paths) == 1:
        return Predictor.from_checkpoint(paths[0], device, **options)
    crf = options.pop("crf", None)  # the ensemble's mean is refined, not each member's
    if options.get("calib_data") is not None:  # every member calibrates on all of them: a generator, read once
        options["calib_data"] = list(options["calib_data"])
    mc_samples = options.pop("mc_samples", 0)  # None refused, as for one checkpoint
    check_mc_samples(mc_samples)  # the members with dropout take it below
    # Monte-Carlo dropout runs in eager only, refused below for another mode whether or not a member
    # has dropout: the members are then built in eager, only to tell which refusal (not quantised)
    refused = bool(mc_samples) and resolve_mode(options.get("mode")) != "eager"
    build = {k: v for k, v in options.items() if not k.startswith("calib_")} | {"mode": "eager"} if refused else options
    members = []
    for path in paths:
        member = Predictor.from_checkpoint(path, device, **build)
        if not isinstance(member, SemanticPredictor):
            raise UserError(f"{path} holds an instance model; an ensemble averages the class probabilities "
                            "of semantic models")
        if mc_samples and has_dropout(member.model):  # as predict --uncertainty samples an ensemble
            member.mc_samples = mc_samples
        members.append(member)
    if mc_samples and not any(m.mc_samples for m in members):
        raise UserError(f"--mc-samples needs a model with dropout layers (such as bayesian_segnet), and none of "
                        f"{', '.join(map(str, paths))} has any; leave it out")
    if mc_samples:  # as for one checkpoint, whose runner refuses it
        eager_only(MC_DROPOUT, options.get("mode"))
    return EnsemblePredictor(members, [str(p) for p in paths], crf=crf)
