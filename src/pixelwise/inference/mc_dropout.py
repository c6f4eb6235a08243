"""Monte-Carlo dropout (Gal & Ghahramani, ICML 2016; used by Bayesian SegNet, Kendall et al.,
BMVC 2017, arXiv:1511.02680) for any model with dropout layers.

A plain eval-mode forward is the deterministic "weight averaging" prediction; :func:`mc_dropout`
instead averages ``samples`` forward passes with only the dropout layers in train mode (BatchNorm
and everything else stay in eval mode) and reports an uncertainty.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from pixelwise.errors import UserError
from pixelwise.models import forward_logits


def dropout_layers(model: nn.Module) -> list[nn.modules.dropout._DropoutNd]:
    """The model's dropout modules with a non-zero rate (every ``nn.Dropout*`` and alpha dropout)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def has_dropout(model: nn.Module) -> bool:
    return bool(dropout_layers(model))


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_CHANNEL_DIMS = ((nn.Dropout1d, 1), (nn.Dropout2d, 2), (nn.Dropout3d, 3))  # whole channels dropped


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock of ``model`` (one per module object, kept beside it for as long as it lives, not
    on it: the model still copies and pickles): :func:`dropout_sampling` holds it, so predictors
    that share a model, in any thread, sample it one at a time."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def dropout_sampling(model: nn.Module, generator: torch.Generator | None = None) -> Iterator[None]:
    """Inside: the model in eval mode except its dropout layers, which sample: from ``generator``
    where one is given (:func:`drawing_from`), else from torch's global random state. Every
    module's mode is restored on exit, also on error. Holds :func:`model_lock` throughout, so that
    another thread sampling the same model neither sees nor restores these modes half-way (a plain
    forward of the model from another thread meanwhile would still see dropout on)."""
    with model_lock(model):
        modes = [(m, m.training) for m in model.modules()]
        layers = dropout_layers(model)
        drawn = [] if generator is None else [layer for layer in layers
                                              if not isinstance(layer, (nn.AlphaDropout, nn.FeatureAlphaDropout))]
        own = {id(layer): layer.__dict__["forward"] for layer in drawn if "forward" in layer.__dict__}
        model.eval()
        for layer in layers:
            layer.train()
        try:
            for layer in drawn:
                assert generator is not None  # drawn is empty without one
                layer.forward = drawing_from(layer, generator)  # an instance attribute: nn.Module calls it
            yield
        finally:
            for m, training in modes:
                m.training = training
            for layer in drawn:  # the class's forward again, or one the caller had put on the layer
                if id(layer) in own:
                    layer.forward = own[id(layer)]
                else:
                    layer.__dict__.pop("forward", None)


def drawing_from(layer: nn.modules.dropout._DropoutNd, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    """The forward of the dropout ``layer`` in training mode, its masks drawn from ``generator``
    (``F.dropout`` draws from torch's global random state, which other threads of the caller share):
    ``nn.Dropout`` drops elements, ``nn.Dropout1d/2d/3d`` whole channels, each kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``. (Alpha dropout, which no model of the zoo
    has, keeps its own forward: :func:`dropout_sampling` leaves it drawing from the global state.)"""
    p = float(layer.p)
    channel_dims = next((nd for kind, nd in _CHANNEL_DIMS if isinstance(layer, kind)), None)

    def forward(x: Tensor) -> Tensor:
        shape: tuple[int, ...] = tuple(x.shape)
        if channel_dims is not None:  # [N, C, *spatial], or an unbatched [C, *spatial]
            lead = 2 if x.ndim == channel_dims + 2 else 1
            shape = (*x.shape[:lead], *([1] * (x.ndim - lead)))
        keep = torch.empty(shape, device=x.device).bernoulli_(1 - p, generator=generator)
        return x * keep.to(x.dtype) * (0.0 if p == 1 else 1 / (1 - p))

    return forward


def predictive_entropy(probs: Tensor, dim: int = 1) -> Tensor:
    """``-sum_c p_c log p_c`` over ``dim`` (nats); 0 for a one-hot distribution."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=dim)


MAX_MC_SAMPLES = 1000  # Monte-Carlo dropout samples per image: Bayesian SegNet used 50


@torch.no_grad()
def mc_dropout(model: nn.Module, images: Tensor, samples: int = 8, measure: str = "variance",
               seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Average ``samples`` stochastic forward passes of a semantic model.

    ``images``: ``Tensor[N, C, H, W]`` (preprocessed). Returns ``mean_probs`` ``Tensor[N, K, H, W]``
    (mean of the per-sample softmax) and ``uncertainty`` ``Tensor[N, H, W]``:
    ``measure="variance"`` (Bayesian SegNet's): the per-class variance of the sampled softmax,
    averaged over classes; ``"entropy"``: :func:`predictive_entropy` of ``mean_probs``.
    ``seed``: draw the dropout masks from a generator of its own seeded with this (torch's global
    random state is neither read nor changed), so the same images give the same result run after
    run; None (default) draws from the global random state.
    Thread safety: the model is sampled by one thread at a time (:func:`model_lock`); seeded
    sampling draws from the call's own generator, so calls from several threads give exactly the
    sequential results whatever other threads draw meanwhile, and leave the caller's random state
    and the model's modes as they were.
    Raises :class:`UserError` if the model has no dropout (its samples would all be equal).
    """
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or not 1 <= samples <= MAX_MC_SAMPLES:
        raise ValueError(f"samples must be a whole number from 1 to {MAX_MC_SAMPLES:,}, got {samples!r}")
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = (f"{images.dtype} Tensor{list(images.shape)}" if isinstance(images, Tensor)
               else f"{type(images).__module__}.{type(images).__qualname__}")
        raise ValueError(f"images must be a float Tensor[N, C, H, W], preprocessed (pixelwise.preprocess(image, "
                         f"spec)[None] for one uint8[H, W, 3] image), got {got}")
    if measure not in ("variance", "entropy"):
        raise ValueError(f"measure must be 'variance' or 'entropy', got {measure!r}")
    if not has_dropout(model):
        raise UserError(f"{type(model).__name__} has no dropout layers, so Monte-Carlo dropout is undefined; "
                        "use a model with dropout such as bayesian_segnet")
    total = sq_total = torch.zeros(())
    generator = None if seed is None else torch.Generator(device=images.device).manual_seed(seed)
    with dropout_sampling(model, generator):
        for _ in range(samples):
            probs = forward_logits(model, images).float().softmax(dim=1)
            total = total + probs
            sq_total = sq_total + probs * probs
    mean = total / samples
    if measure == "variance":
        return mean, (sq_total / samples - mean * mean).clamp_min(0).mean(dim=1)
    return mean, predictive_entropy(mean, dim=1)
