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
from collections.abc import Iterator

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
# the process-wide random state that seeded sampling borrows for layers it cannot draw itself
_GLOBAL_RNG = threading.RLock()
_DRAWABLE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # torch's own, by exact class


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
    where one is given and every layer is one of torch's own (:func:`drawable`), else from torch's
    global random state. Every module's mode (and forward) is restored on exit, also on error.
    Holds :func:`model_lock` throughout, so that another thread sampling the same model neither
    sees nor restores these modes half-way (a plain forward of the model from another thread
    meanwhile would still see dropout on)."""
    with model_lock(model):
        modes = [(m, m.training) for m in model.modules()]
        layers = dropout_layers(model)
        drawn = layers if generator is not None and drawable(model) else []
        model.eval()
        for layer in layers:
            layer.train()
        try:
            for layer in drawn:
                assert generator is not None  # drawn is empty without one
                layer.forward = _Drawing(layer, generator)  # an instance attribute: nn.Module calls it
            yield
        finally:
            for m, training in modes:
                m.training = training
            for layer in drawn:
                layer.__dict__.pop("forward", None)


def drawable(model: nn.Module) -> bool:
    """Whether :func:`dropout_sampling` can draw every dropout layer of ``model`` from a generator of
    its own: each is exactly ``nn.Dropout`` or ``nn.Dropout1d/2d/3d`` with the class's forward (a
    subclass, alpha dropout or a forward put on the layer computes something else)."""
    return all(type(layer) in _DRAWABLE and "forward" not in layer.__dict__ for layer in dropout_layers(model))


class _Drawing:
    """The training-mode forward of one of torch's dropout layers, its masks drawn from ``generator``
    (``F.dropout`` draws from torch's global random state, which the caller's other threads share):
    each element (``nn.Dropout``) or each channel (``nn.Dropout1d/2d/3d``, over the dimensions torch
    drops together: 2d always from the third on, 1d and 3d from the third on when batched, from the
    second on unbatched) kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``. In eval mode
    (a copy of the layer taken meanwhile, switched back by ``.eval()``) it is the class's forward."""

    def __init__(self, layer: nn.modules.dropout._DropoutNd, generator: torch.Generator) -> None:
        self.layer, self.generator = layer, generator

    def __call__(self, x: Tensor) -> Tensor:
        layer = self.layer
        kind = type(layer)
        if not layer.training or (kind is nn.Dropout1d and x.ndim not in (2, 3)) or (kind is not nn.Dropout
                                                                                     and x.ndim < 2):
            return kind.forward(layer, x)  # identity; or torch's own refusal of that rank
        batched = {nn.Dropout1d: x.ndim == 3, nn.Dropout2d: True, nn.Dropout3d: x.ndim == 5}.get(kind)
        lead = x.ndim if batched is None else min(2 if batched else 1, x.ndim)
        shape = (*x.shape[:lead], *([1] * (x.ndim - lead)))
        p = float(layer.p)
        keep = torch.empty(shape, device=x.device).bernoulli_(1 - p, generator=self.generator)
        return x * keep.to(x.dtype) * (0.0 if p == 1 else 1 / (1 - p))


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
    ``seed``: draw the dropout masks from this seed, so the same images give the same result run
    after run; None (default) draws from the global random state.
    Thread safety: the model is sampled by one thread at a time (:func:`model_lock`). Seeded
    sampling of torch's own dropout layers (:func:`drawable`; every model of the zoo) draws from a
    generator of the call's own: torch's global random state is neither read nor changed, and
    calls from several threads give exactly the sequential results whatever other threads draw
    meanwhile. A model with other dropout layers (a subclass, alpha dropout) borrows the global
    state instead, seeded for the call and restored afterwards, one call at a time: random
    numbers another thread draws during such a call come from (and are undone with) the borrowed
    state, and change the call's masks.
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
    borrow = seed is not None and not drawable(model)  # layers of other kinds draw from torch's global state
    cuda = images.device.type == "cuda"
    with dropout_sampling(model, generator), _GLOBAL_RNG if borrow else contextlib.nullcontext(), \
            torch.random.fork_rng(devices=[images.device] if cuda else [], enabled=borrow):
        if borrow:  # the generator the layers draw from, and only it (torch.manual_seed seeds every GPU's)
            if cuda:
                with torch.cuda.device(images.device):
                    torch.cuda.manual_seed(int(seed))  # borrow: a seed was given
            else:
                torch.random.default_generator.manual_seed(int(seed))
        for _ in range(samples):
            probs = forward_logits(model, images).float().softmax(dim=1)
            total = total + probs
            sq_total = sq_total + probs * probs
    mean = total / samples
    if measure == "variance":
        return mean, (sq_total / samples - mean * mean).clamp_min(0).mean(dim=1)
    return mean, predictive_entropy(mean, dim=1)
