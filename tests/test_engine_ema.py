"""The weight average (``--ema``): the update against a float64 hand computation, what a run
saves and validates, and exact resume."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from tests.test_engine import interrupt_at, quiet, tiny, weights_equal

from pixelwise.engine import ema as ema_mod
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.ema import WeightAverage, ema_decay
from pixelwise.engine.trainer import fit
from pixelwise.errors import UserError


def hand_average(snapshots: list[dict], start: dict, decay: float) -> dict:
    """The average after each snapshot, in float64, written out from the definition."""
    avg = {k: v.double().clone() for k, v in start.items()}
    for step, snap in enumerate(snapshots, start=1):
        d = min(decay, (1 + step) / (10 + step))
        for k, v in snap.items():
            avg[k] = d * avg[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    return avg


def test_decay_warms_up_then_holds():
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.9, 10**6) == 0.9


def test_update_matches_the_definition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    avg = WeightAverage(model, 0.8)
    snapshots = []
    for step in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 8, 8))  # moves the BatchNorm statistics, counts a batch
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        avg.update(model, step)
    expect = hand_average(snapshots, start, 0.8)
    for k, v in avg.module.state_dict().items():
        torch.testing.assert_close(v.double(), expect[k], rtol=1e-5, atol=1e-6)
    assert avg.module.state_dict()["1.num_batches_tracked"].item() == 29
    assert not any(p.requires_grad for p in avg.module.parameters()) and not avg.module.training


def test_run_saves_and_validates_the_average(tmp_path, monkeypatch):
    start, seen = {}, []
    init, update = WeightAverage.__init__, WeightAverage.update

    def recording_init(self, model, decay):
        start.update({k: v.clone() for k, v in model.state_dict().items()})
        init(self, model, decay)

    def recording_update(self, model, step):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        update(self, model, step)

    monkeypatch.setattr(ema_mod.WeightAverage, "__init__", recording_init)
    monkeypatch.setattr(ema_mod.WeightAverage, "update", recording_update)
    plain = fit(tiny(tmp_path / "plain"), log=quiet)
    averaged = fit(tiny(tmp_path / "ema", ema=0.9), log=quiet)
    assert len(seen) == averaged["steps"] == plain["steps"] == 4
    # averaging does not change training: the live weights in the state file are the plain run's
    state = load_file(tmp_path / "ema" / "last.state.safetensors")
    last_plain = load_file(tmp_path / "plain" / "last.safetensors")
    for k, v in last_plain.items():
        torch.testing.assert_close(state[f"model.{k}"], v)
    # last.safetensors (and the state's ema.*) hold the average of the live weights after each step
    expect = hand_average(seen, start, 0.9)
    last_ema = load_file(tmp_path / "ema" / "last.safetensors")
    assert last_ema.keys() == expect.keys()
    for k, v in last_ema.items():
        torch.testing.assert_close(v.double(), expect[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[f"ema.{k}"], v)
    # and validation scored the average, not the live weights
    assert averaged["final"]["val_loss"] != pytest.approx(plain["final"]["val_loss"], rel=1e-6)


def test_mid_epoch_interrupt_resumes_the_average_exactly(tmp_path):
    kw = {"batch_size": 2, "ema": 0.8, "schedule": "cosine"}
    fit(tiny(tmp_path / "a", **kw), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "b", **kw), log=quiet, callbacks=[interrupt_at("step", lambda s: s.step == 3)])
    fit(tiny(tmp_path / "b", resume=True, **kw), log=quiet)
    weights_equal(tmp_path / "a", tmp_path / "b")
    a = load_file(tmp_path / "a" / "best.safetensors")
    b = load_file(tmp_path / "b" / "best.safetensors")
    assert all(torch.allclose(a[k].double(), b[k].double(), atol=1e-5) for k in a)


def test_resuming_a_plain_run_with_ema_starts_the_average_there(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path), log=quiet, callbacks=[interrupt_at("epoch", lambda s: s.epoch == 1)])
    logged = []
    summary = fit(tiny(tmp_path, resume=True, ema=0.5), log=logged.append)
    assert summary["epochs_completed"] == 2
    assert any("starts averaging" in line for line in logged)
    assert any(k.startswith("ema.") for k in load_file(tmp_path / "last.state.safetensors"))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_decay_outside_0_1_is_refused(bad):
    with pytest.raises(UserError, match="ema"):
        TrainConfig(ema=bad)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_weight_average_itself_refuses_a_decay_outside_0_1(bad):
    """The library class checks its decay too (the config's check does not cover a direct caller)."""
    with pytest.raises(ValueError, match="EMA decay must be in"):
        WeightAverage(nn.Linear(2, 2), bad)


def test_weight_average_accepts_decays_just_inside_0_1():
    for decay in (1e-6, 0.5, 1 - 1e-6):
        assert WeightAverage(nn.Linear(2, 2), decay).decay == decay


def test_state_tensors_round_trip_under_their_prefix_and_a_file_without_them_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(model, 1000)  # d = 0.5: halfway to the live weights
    saved = avg.state_tensors()
    assert sorted(saved) == sorted("ema." + k for k in model.state_dict())
    fresh = WeightAverage(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), 0.5)
    assert fresh.load_state_tensors({"model.0.weight": torch.zeros(2, 3), **saved}) is True
    for k, v in avg.module.state_dict().items():
        assert torch.equal(fresh.module.state_dict()[k], v)
    assert fresh.load_state_tensors({"model.0.weight": torch.zeros(2, 3)}) is False
    other = avg.state_tensors(prefix="avg/")
    assert sorted(other) == sorted("avg/" + k for k in model.state_dict())
    assert WeightAverage(model, 0.5).load_state_tensors(other, prefix="avg/") is True
