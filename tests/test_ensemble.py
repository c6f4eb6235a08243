"""Ensemble: log of the weighted mean of member probabilities."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pixelwise.models.ensemble as ensemble_module
from pixelwise.models.ensemble import Ensemble, edeconvnet


class DictOut(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"out": self.inner(x), "aux": torch.zeros(1)}


@pytest.fixture
def members():
    torch.manual_seed(0)
    return [nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)]


def test_equals_a_manual_weighted_average(members):
    x = torch.randn(2, 3, 5, 7)
    weights = [1.0, 2.0, 5.0]
    ens = Ensemble([members[0], DictOut(members[1]), members[2]], weights)
    out = ens(x)
    with torch.no_grad():
        manual = sum(w * m(x).softmax(1) for w, m in zip(weights, members)) / sum(weights)
    assert out.shape == (2, 4, 5, 7)
    assert torch.allclose(out.exp(), manual, atol=1e-6)
    assert torch.allclose(out.softmax(1), manual, atol=1e-6)  # already normalised log-probabilities
    assert torch.equal(out.argmax(1), manual.argmax(1))
    target = torch.randint(0, 4, (2, 5, 7))
    nll = -manual.gather(1, target[:, None]).log().mean()
    assert torch.allclose(F.cross_entropy(out, target), nll, atol=1e-5)


def test_default_weights_are_equal_and_gradients_reach_members(members):
    x = torch.randn(1, 3, 4, 4)
    ens = Ensemble(members[:2])
    manual = (members[0](x).softmax(1) + members[1](x).softmax(1)) / 2
    assert torch.allclose(ens(x).exp(), manual, atol=1e-6)
    F.cross_entropy(ens(x), torch.zeros(1, 4, 4, dtype=torch.long)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ens.parameters())
    assert "log_weights" not in ens.state_dict()  # weights are configuration, not checkpoint data


def test_single_member_is_log_softmax(members):
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(Ensemble([members[0]])(x), members[0](x).log_softmax(1), atol=1e-6)


def _stating(context, alignment):
    model = nn.Conv2d(3, 4, 1)
    model.context, model.alignment = context, alignment
    return model


def test_geometry_is_the_widest_context_on_the_least_common_grid():
    # by hand: contexts 10 and 30 -> 30; grids 8 and 12 -> lcm 24; a member stating no context
    # (a plain conv) makes it 0 (the whole image), and stating no grid is the grid of 1
    plain = nn.Conv2d(3, 4, 1)
    assert (Ensemble([plain]).context, Ensemble([plain]).alignment) == (0, 1)
    both = Ensemble([_stating(10, 8), _stating(30, 12)])
    assert (both.context, both.alignment) == (30, 24)
    mixed = Ensemble([_stating(10, 8), plain])
    assert (mixed.context, mixed.alignment) == (0, 8)


def test_public_names_resolve():
    assert all(callable(getattr(ensemble_module, name)) for name in ensemble_module.__all__)


@pytest.mark.parametrize("weights", [[1.0], [1.0, 0.0], [1.0, -1.0]])
def test_bad_weights_raise(members, weights):
    with pytest.raises(ValueError, match="positive weight"):
        Ensemble(members[:2], weights)


def test_empty_ensemble_raises():
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])


def test_edeconvnet_averages_deconvnet_then_fcn8s_with_the_given_weights(monkeypatch):
    # the wiring of edeconvnet without building its 386M parameters: each member a stand-in recording its call
    calls = []

    def stand_in(name, out):
        def build(num_classes, pretrained=None):
            calls.append((name, num_classes, pretrained))
            return out
        return build

    torch.manual_seed(0)
    a, b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
    monkeypatch.setattr(ensemble_module, "deconvnet", stand_in("deconvnet", a))
    monkeypatch.setattr(ensemble_module, "fcn8s", stand_in("fcn8s", b))
    model = edeconvnet(4, pretrained="imagenet", weights=[1.0, 3.0])
    assert calls == [("deconvnet", 4, "imagenet"), ("fcn8s", 4, "imagenet")]
    assert model.members[0] is a and model.members[1] is b
    x = torch.randn(1, 3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).exp(), (a(x).softmax(1) + 3 * b(x).softmax(1)) / 4, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_edeconvnet_builds_deconvnet_plus_fcn8s():
    if importlib.util.find_spec("pixelwise.models.fcn") is None:
        pytest.skip("pixelwise.models.fcn (FCN-8s) not available")
    model = edeconvnet(21).eval()
    assert [type(m).__name__ for m in model.members][0] == "DeconvNet"
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 80))
    assert out.shape == (1, 21, 64, 80)
    assert torch.allclose(out.exp().sum(1), torch.ones(1, 64, 80), atol=1e-4)
