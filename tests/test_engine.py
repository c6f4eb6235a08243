"""Training engine: optimiser groups, schedules, resume exactness, interruption, divergence,
class weights, accumulation, stages, precision."""

import copy
import csv
import dataclasses
import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pixelwise.checkpoint import read_checkpoint
from pixelwise.cli import main
from pixelwise.data.base import Sample
from pixelwise.engine import precision, trainer
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.optim import Schedule, apply_lr, build_optimizer, param_groups, set_peak_lr
from pixelwise.engine.precision import resolve_amp
from pixelwise.engine.trainer import class_weights_for, fit, read_class_weights
from pixelwise.engine.validate import eval_collate, to_device, validate_instances, validate_semantic
from pixelwise.errors import UserError
from pixelwise.sample import IGNORE_INDEX

TINY_MODEL = {"base_channels": 4, "batch_norm": True, "dropout": 0}
TINY_DATA = {"num_train": 8, "num_val": 4, "num_test": 4, "size": 32}


def tiny(out, **kw) -> TrainConfig:
    base = {"model": "unet", "dataset": "shapes", "out": None if out is None else str(out), "epochs": 2,
            "batch_size": 4, "lr": 0.01, "progress": False, "model_kwargs": dict(TINY_MODEL),
            "dataset_kwargs": dict(TINY_DATA)}
    return TrainConfig(**{**base, **kw})


def quiet(*_):
    pass


def weights_equal(a, b, tol=1e-5):
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k].double() - wb[k].double()).abs().max().item() <= tol, k


def interrupt_at(event, when):
    def cb(ev, state):
        if ev == event and when(state):
            raise KeyboardInterrupt

    return cb


# --- optimiser and schedule ---------------------------------------------------------------------
def test_weight_decay_skips_biases_and_norm_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    groups = param_groups(model, 1e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert len(groups[1]["params"]) == 4  # two conv biases, BN weight and bias
    assert len(param_groups(model, 1e-4, decay_norm_and_bias=True)) == 1
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = build_optimizer(TrainConfig(optimizer=name, weight_decay=0.1, nesterov=True), model)
        assert isinstance(opt, cls) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert build_optimizer(TrainConfig(optimizer="sgd", nesterov=True), model).param_groups[0]["nesterov"]


def test_lr_mult_gives_the_named_modules_their_own_rate():
    """DeepLab trains its classifier (fc8) at 10x the rate of the rest: {"fc8": 10}."""
    model = nn.Sequential()
    model.add_module("fc", nn.Conv2d(3, 4, 1))
    model.add_module("fc8", nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model.add_module("fc80", nn.Conv2d(4, 2, 1))  # fc8 is not a prefix of fc80's names
    groups = param_groups(model, 1e-4, lr_mult={"fc8": 10, "fc8.1": 2})  # the longest name wins
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert [g.get("lr_mult", 1.0) for g in groups] == [1.0, 1.0, 2.0, 10.0, 10.0]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 0.0, 1e-4, 0.0]
    assert ids[0] == {id(model.fc.weight), id(model.fc80.weight)}
    assert ids[2] == {id(model.fc8[1].weight), id(model.fc8[1].bias)}
    assert ids[3] == {id(model.fc8[0].weight)} and ids[4] == {id(model.fc8[0].bias)}
    assert "lr_mult" not in groups[0]  # runs without multipliers keep the state files of before
    opt = build_optimizer(TrainConfig(optimizer="sgd", lr=0.01, lr_mult={"fc8": 10}), model)
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01, 0.1, 0.1])
    assert apply_lr(opt, 0.5) == pytest.approx(0.005)  # the logged LR is the model's own
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.005, 0.05, 0.05])
    everything = build_optimizer(TrainConfig(optimizer="sgd", lr=0.01, lr_mult={"fc": 2, "fc8": 3, "fc80": 4}), model)
    assert apply_lr(everything, 0.5) == pytest.approx(0.005)  # no group at the run's own rate: still said as lr
    set_peak_lr(opt, 0.002)  # a stage's lr: the multipliers stay
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.002, 0.002, 0.02, 0.02])
    with pytest.raises(UserError, match=r"named 'fc9'.*such as fc, fc8, fc80 \(its last layer: fc80\)"):
        param_groups(model, 0.0, lr_mult={"fc9": 10})
    for bad in ({"fc8": 0}, {"fc8": -1}, {"fc8": True}, {"fc8": "10"}, {"": 2}, {"fc8": float("inf")}):
        with pytest.raises(UserError, match="must be a module name and a multiplier above 0"):
            TrainConfig(lr_mult=bad)


def test_lr_mult_unknown_name_lists_eight_trainable_top_modules_and_the_last_layer():
    model = nn.Sequential()
    for i in range(10):
        model.add_module(f"m{i}", nn.Linear(1, 1))
    model.add_module("frozen", nn.Linear(1, 1).requires_grad_(False))  # not trainable: neither listed nor last
    model.add_module("z", nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1, bias=False)))  # last parameter: z.1.weight
    model.add_module("zz", nn.Linear(1, 1).requires_grad_(False))
    listed = "m0, m1, m2, m3, m4, m5, m6, m7"  # sorted, the first 8 of 11 trainable top-level names
    with pytest.raises(UserError, match=rf"named 'frozen' or under it; .* such as {listed} \(its last layer: z\.1\)"):
        param_groups(model, 0.0, lr_mult={"m0": 2, "frozen": 10})


def test_lr_mult_trains_resumes_exactly_and_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    kw = {"optimizer": "sgd", "schedule": "step", "milestones": [1], "lr_mult": {"head": 10}}
    fit(tiny(tmp_path / "a", **kw), log=quiet)
    groups = state_header(tmp_path / "a")["param_groups"]
    assert [g.get("lr_mult", 1.0) for g in groups] == [1.0, 1.0, 10.0, 10.0]
    assert [g["lr"] for g in groups] == pytest.approx([0.001, 0.001, 0.01, 0.01])  # after the epoch-1 step
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "b", **kw), log=quiet, callbacks=[interrupt_at("epoch", lambda s: s.epoch == 1)])
    fit(tiny(tmp_path / "b", resume=True, **kw), log=quiet)
    weights_equal(tmp_path / "a", tmp_path / "b")
    fit(tiny(tmp_path / "c", **{**kw, "lr_mult": {}}), log=quiet)  # the multiplier changes the training
    with pytest.raises(AssertionError):
        weights_equal(tmp_path / "a", tmp_path / "c")
    said: list[str] = []
    fit(tiny(tmp_path / "a", epochs=3, resume=True, **{**kw, "lr_mult": {"head": 5}}), log=said.append)
    assert any("lr_mult 10.0 -> 5.0" in line for line in said)
    assert [g["lr"] for g in state_header(tmp_path / "a")["param_groups"]][2] == pytest.approx(0.005)
    read = []
    monkeypatch.setattr(trainer, "build_dataset", lambda *a, **k: read.append(a))
    with pytest.raises(UserError, match="no trainable parameter named 'fc8'.*such as"):
        fit(tiny(tmp_path / "d", lr_mult={"fc8": 10}), log=quiet)
    assert not (tmp_path / "d").exists() and not read  # refused before any data is read


def test_schedule_formulas():
    poly = Schedule("poly", total_steps=100, power=0.9)
    assert poly.factor(0) == 1.0 and poly.factor(50) == pytest.approx(0.5**0.9) and poly.factor(100) == 0.0
    assert Schedule("cosine", 100).factor(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    step = Schedule("step", total_steps=100, epochs=10, milestones=(3, 6), gamma=0.1)
    assert [step.factor(s) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert Schedule("constant", 10).factor(9) == 1.0
    warm = Schedule("cosine", 100, warmup_steps=10, warmup_factor=0.0)
    assert warm.factor(0) == 0.0 and warm.factor(5) == pytest.approx(0.5 * Schedule("cosine", 100).factor(5))
    assert warm.factor(10) == Schedule("cosine", 100).factor(10)
    # time budget: progress = max(step fraction, time fraction)
    assert poly.factor(10, time_fraction=0.5) == pytest.approx(0.5**0.9)
    assert poly.factor(60, time_fraction=0.5) == pytest.approx(0.4**0.9)
    assert Schedule.from_config(TrainConfig(epochs=3, warmup_epochs=0.5), 8).warmup_steps == 4


def test_schedule_defaults_and_a_milestone_reached_by_a_rounded_progress():
    # the documented defaults: poly power 0.9 (DeepLab's), step gamma 0.1
    assert Schedule("poly", 100).factor(50) == pytest.approx(0.5**0.9)
    # step 15 of 22 one-step epochs is epoch 15, though 15 / 22 * 22 rounds to 14.999999999999998
    assert 15 / 22 * 22 < 15
    step = Schedule("step", total_steps=22, epochs=22, milestones=(15,))
    assert [step.factor(s) for s in (14, 15, 21)] == pytest.approx([1, 0.1, 0.1])


def test_step_size_is_caffes_repeating_step_policy():
    # Caffe "step": lr = base_lr * gamma ^ floor(iter / stepsize), iter counted from 0
    s = Schedule("step", total_steps=100, gamma=0.5, step_size=7)
    assert [s.factor(i) for i in range(30)] == pytest.approx([0.5 ** (i // 7) for i in range(30)])
    both = Schedule("step", total_steps=100, epochs=10, milestones=(5,), gamma=0.1, step_size=40)
    assert [both.factor(i) for i in (39, 40, 49, 50, 80)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.001])
    with pytest.raises(UserError, match="step_size must be an integer >= 0"):
        TrainConfig(step_size=-1)


def test_deconvnet_recipe_follows_the_official_solvers():
    # HyeonwooNoh/DeconvNet training/00{1,2}_stage_*/solver.prototxt: base_lr 0.01, gamma 0.1,
    # stepsize 9000 for 20k iterations, then a fresh 0.01 with stepsize 10000 for 40k iterations
    from pixelwise.engine.config import build_config, find_recipe, load_yaml_config

    cfg = build_config(load_yaml_config(find_recipe("deconvnet_voc")), {})
    steps_per_epoch = math.ceil((10582 // cfg.batch_size) / cfg.accumulate)  # 1322 batches of 8 -> 166 steps
    assert steps_per_epoch == 166
    (_, one), (_, two) = cfg.stage_configs()
    first, second = Schedule.from_config(one, steps_per_epoch), Schedule.from_config(two, steps_per_epoch)
    assert abs(first.total_steps - 20_000) < steps_per_epoch and abs(second.total_steps - 40_000) < steps_per_epoch

    def lr(schedule, step):
        return cfg.lr * schedule.factor(step)

    expected_one = {0: 0.01, 8999: 0.01, 9000: 1e-3, 17999: 1e-3, 18000: 1e-4, 19999: 1e-4}
    expected_two = {0: 0.01, 9999: 0.01, 10000: 1e-3, 19999: 1e-3, 20000: 1e-4, 30000: 1e-5, 39999: 1e-5}
    assert {k: lr(first, k) for k in expected_one} == pytest.approx(expected_one)
    assert {k: lr(second, k) for k in expected_two} == pytest.approx(expected_two)


def test_deeplab_largefov_recipe_follows_the_paper():
    """ICLR 2015 Sec. 4: batch 20, lr 0.001 with 0.01 for the final classifier, x0.1 every 2,000
    iterations, momentum 0.9, weight decay 5e-4; about 6,000 iterations of train_aug."""
    from pixelwise.engine.config import build_config, find_recipe, load_yaml_config
    from pixelwise.models import create_model

    cfg = build_config(load_yaml_config(find_recipe("deeplab_largefov_voc")), {}, recipe="deeplab_largefov_voc")
    assert (cfg.model, cfg.pretrained, cfg.batch_size, cfg.optimizer) == ("deeplab_largefov", "imagenet", 20, "sgd")
    assert (cfg.lr, cfg.lr_mult, cfg.momentum, cfg.weight_decay) == (1e-3, {"fc8": 10.0}, 0.9, 5e-4)
    steps_per_epoch = 10_582 // 20  # the last smaller batch is dropped
    schedule = Schedule.from_config(cfg, steps_per_epoch)
    assert schedule.total_steps == 5_819
    assert [schedule.factor(s) for s in (0, 1_999, 2_000, 3_999, 4_000, 5_818)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    with torch.device("meta"):
        model = create_model(cfg.model, 21, **cfg.model_kwargs)
    opt = build_optimizer(cfg, model)
    fc8 = {id(p) for p in model.fc8.parameters()}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert group["initial_lr"] == pytest.approx(0.01 if ids <= fc8 else 0.001) and (ids <= fc8 or not ids & fc8)


def test_step_size_counts_the_steps_of_each_stage(tmp_path):
    # 8 images in batches of 4 = 2 steps per epoch; step_size 3 drops the lr after 3 steps of a
    # stage, and the second stage starts its count (and its lr) afresh
    seen = []
    cfg = tiny(tmp_path, optimizer="sgd", schedule="step", gamma=0.1,
               stages=[{"epochs": 2, "lr": 0.01, "step_size": 3}, {"epochs": 2, "lr": 0.02, "step_size": 2}])
    fit(cfg, log=quiet, callbacks=[lambda ev, st: seen.append(st.lr) if ev == "step" else None])
    assert seen == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.02, 0.02, 0.002, 0.002])


def test_config_validation():
    with pytest.raises(UserError, match="schedule 'linear'"):
        TrainConfig(schedule="linear")
    with pytest.raises(UserError, match="stage 1: key 'model'"):
        TrainConfig(stages=[{"epochs": 1, "model": "fcn8s"}])
    with pytest.raises(UserError, match="stage 2 needs"):
        TrainConfig(stages=[{"epochs": 1}, {"lr": 0.1}])
    assert TrainConfig(stages=[{"epochs": 2}, {"epochs": 3, "lr": 0.1}]).epochs == 5
    with pytest.raises(UserError, match="select_by 'val_loss' is not one of"):
        TrainConfig(select_by="val_loss")


@pytest.mark.parametrize("select_by", ["pixel_acc", "mean_acc"])
def test_select_by_picks_the_best_epoch_of_that_metric(tmp_path, select_by):
    s = fit(tiny(tmp_path, epochs=4, lr=0.05, select_by=select_by), log=quiet)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    values = [float(r[select_by]) for r in rows]
    assert s["selected_by"] == select_by
    assert s["best_epoch"] == 1 + values.index(max(values))  # the first epoch reaching the maximum
    assert s["best"][select_by] == pytest.approx(max(values))
    _, meta = read_checkpoint(tmp_path / "best.safetensors")
    assert meta["training"]["epoch"] == s["best_epoch"]


def test_select_by_must_suit_the_task(tmp_path):
    with pytest.raises(UserError, match="select_by 'mask_AP' is not a metric of semantic validation"):
        fit(tiny(tmp_path / "run", select_by="mask_AP"), log=quiet)
    assert not (tmp_path / "run").exists()  # refused before any work
    assert trainer.select_key("auto", "instance") == "mask_AP" and trainer.select_key("auto", "semantic") == "mIoU"


@pytest.mark.parametrize("kw, words", [
    ({"augment": {"crop": [10]}}, "augment key 'crop': expected two numbers"),
    ({"augment": {"flip": True, "flipp": True}}, "unknown augment key 'flipp'"),
    ({"crop": "0x5"}, "crop"),
    ({"stages": [{"epochs": 1}, {"epochs": 1, "augment": {"scale": [2.0, 1.0], "crop": [16, 16]}}]},
     "augment scale"),
    ({"stages": [{"epochs": 1}, {"epochs": 1, "instance_crops": True}]}, "instance_crops needs a crop size"),
])
def test_augmentation_errors_come_before_anything_is_written(tmp_path, kw, words):
    """Transforms are built per stage; a bad key, even in a later stage's augment, is refused
    with the other settings, not after ``out`` and config.yaml exist (or after hours of stage 1)."""
    with pytest.raises(UserError, match=words):
        fit(tiny(tmp_path / "run", **kw), log=quiet)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_select_by(tmp_path):
    fit(tiny(tmp_path, epochs=1, select_by="pixel_acc"), log=quiet)
    with pytest.raises(UserError, match="picked best.safetensors by pixel_acc; resume with --select-by pixel_acc"):
        fit(tiny(tmp_path, epochs=2, resume=True), log=quiet)
    assert fit(tiny(tmp_path, epochs=2, resume=True, select_by="pixel_acc"), log=quiet)["epochs_completed"] == 2


# --- resume ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["poly", "cosine", "step"])
def test_killed_after_epoch_1_and_resumed_is_exact(tmp_path, schedule):
    kw = {"schedule": schedule, "warmup_iters": 1, "optimizer": "sgd", "nesterov": True, "weight_decay": 1e-3,
          **({"milestones": [1]} if schedule == "step" else {})}  # milestones act only in a step schedule
    fit(tiny(tmp_path / "a", **kw), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "b", **kw), log=quiet, callbacks=[interrupt_at("epoch", lambda s: s.epoch == 1)])
    assert len((tmp_path / "b" / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 1
    summary = fit(tiny(tmp_path / "b", resume=True, **kw), log=quiet)
    assert summary["epochs_completed"] == 2 and summary["steps"] == 4
    weights_equal(tmp_path / "a", tmp_path / "b")
    rows_a = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 3


def test_mid_epoch_interrupt_resumes_exactly_with_accumulation_and_dropout(tmp_path):
    # augmentation (flip + jitter), ClassMix and dropout use every RNG; 4 micro-batches of 2 per epoch,
    # 2 optimizer steps per epoch; interrupted after step 3 = half-way through epoch 2
    kw = {"batch_size": 2, "accumulate": 2, "schedule": "cosine", "optimizer": "adamw", "weight_decay": 0.01,
          "model_kwargs": {**TINY_MODEL, "dropout": 0.3}, "clip_grad_norm": 1.0, "classmix": 0.5}
    fit(tiny(tmp_path / "a", **kw), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "b", **kw), log=quiet, callbacks=[interrupt_at("step", lambda s: s.step == 3)])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / "last.state.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["pixelwise_train_state"])
    assert (meta["epoch"], meta["step"], meta["batch"]) == (1, 3, 2)
    fit(tiny(tmp_path / "b", resume=True, **kw), log=quiet)
    weights_equal(tmp_path / "a", tmp_path / "b")


def test_accumulation_equals_the_large_batch(tmp_path):
    common = {"epochs": 1, "optimizer": "sgd", "schedule": "constant", "augment": {"flip": False, "jitter": False},
              "model_kwargs": {**TINY_MODEL, "batch_norm": False}}
    fit(tiny(tmp_path / "a", batch_size=8, **common), log=quiet)
    fit(tiny(tmp_path / "b", batch_size=4, accumulate=2, **common), log=quiet)
    weights_equal(tmp_path / "a", tmp_path / "b")


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    calls = {"n": 0}
    real = trainer.semantic_loss

    def poisoned(model, batch, spec):
        calls["n"] += 1
        loss = real(model, batch, spec)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer, "semantic_loss", poisoned)
    args = ["train", "--model", "unet", "--dataset", "shapes", "--epochs", "2", "--batch-size", "4",
            "--no-progress", "--out", str(out), "--model-kwargs", json.dumps(TINY_MODEL),
            "--dataset-kwargs", json.dumps(TINY_DATA), "--lr", "0.01"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at epoch 2 step 3" in err[0] and "last good checkpoint is kept" in err[0]
    calls["n"] = 1  # in epoch 1 there is no checkpoint to keep, and the message does not claim one
    assert main([*args, "--out", str(tmp_path / "early")]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss is nan at epoch 1 step 2" in err and "no checkpoint was written" in err
    # epoch 1's checkpoint is kept, consistent with its training state; no summary is written
    from safetensors import safe_open

    with safe_open(str(out / "last.state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["pixelwise_train_state"])["epoch"] == 1
        saved = {k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}  # noqa: SIM118
    last = load_file(out / "last.safetensors")
    assert saved.keys() == last.keys() and all(torch.equal(saved[k], last[k]) for k in last)
    assert not (out / "metrics.json").exists()


# --- losses, class weights, precision ---------------------------------------------------------------
def test_median_freq_weights_cached_and_files(tmp_path):
    from pixelwise.data import build_dataset
    from pixelwise.data.inspect import inspect_dataset

    cfg = tiny(tmp_path, class_weights="median-freq")
    ds = build_dataset("shapes", None, "train", **TINY_DATA)
    w, doc = class_weights_for(cfg, ds, tmp_path, log=quiet)
    expected = [1.0 if v is None else v for v in inspect_dataset(ds, progress=False)["median_freq_weights"]]
    assert w == pytest.approx(expected) and doc["weights"] == pytest.approx(expected)
    assert not (tmp_path / "class_weights.json").exists()  # written by start_writing, after every check
    (tmp_path / "class_weights.json").write_text(json.dumps(doc))
    assert class_weights_for(cfg, ds, tmp_path, log=lambda m: 1 / 0) == (w, None)  # read from the cache
    (tmp_path / "w.txt").write_text("1 2.5, 3\n0.5\n")
    assert read_class_weights(tmp_path / "w.txt", 4) == [1.0, 2.5, 3.0, 0.5]
    (tmp_path / "w.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected 4 non-negative numbers"):
        read_class_weights(tmp_path / "w.json", 4)


def test_class_weight_power(tmp_path):
    """``class_weight_power`` raises median-frequency (and file) weights to a power; the document
    to cache keeps the plain median-frequency weights, so a new power needs no new pass."""
    from pixelwise.data import build_dataset

    ds = build_dataset("shapes", None, "train", **TINY_DATA)
    plain, _ = class_weights_for(tiny(tmp_path, class_weights="median-freq"), ds, tmp_path, log=quiet)
    root, doc = class_weights_for(tiny(tmp_path, class_weights="median-freq", class_weight_power=0.5), ds, tmp_path,
                                  log=quiet)
    assert plain is not None and root == pytest.approx([w ** 0.5 for w in plain])
    assert doc is not None and doc["weights"] == pytest.approx(plain)
    (tmp_path / "w.txt").write_text("1 4 9 0.25")
    assert class_weights_for(tiny(tmp_path, class_weights=str(tmp_path / "w.txt"), class_weight_power=0.5), ds,
                             tmp_path, log=quiet) == (pytest.approx([1, 2, 3, 0.5]), None)
    assert class_weights_for(tiny(tmp_path, class_weights=str(tmp_path / "w.txt"), class_weight_power=0), ds,
                             tmp_path, log=quiet) == ([1, 1, 1, 1], None)
    for bad in (-1, "x", True):
        with pytest.raises(UserError, match="class_weight_power"):
            tiny(tmp_path, class_weight_power=bad)


def test_every_loss_and_options_train(tmp_path):
    for i, loss in enumerate(["focal", "lovasz", "ce+dice", "dice"]):
        s = fit(tiny(tmp_path / loss, epochs=1, loss=loss, class_weights="median-freq" if i % 2 else "none",
                     optimizer="adamw", weight_decay=0.01, warmup_epochs=0.5, clip_grad_norm=1.0,
                     channels_last=i == 0, amp="bf16" if i == 1 else "off"), log=quiet)
        assert math.isfinite(s["final"]["train_loss"]) and s["amp"] == ("bf16" if i == 1 else "off")


def test_auto_precision_on_a_gpu_asks_that_gpu_for_bf16_in_hardware(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4, where bf16 is emulated (no bf16
    convolutions), and asks the current GPU: auto trained and the fast path predicted in slow bf16."""
    from pixelwise import runtime
    from pixelwise.models.maskrcnn.fast import reduced_precision_dtype

    asked = []
    capability = {0: (7, 0), 1: (8, 0)}  # cuda:0 a V100, cuda:1 an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability[d.index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)
    v100, a100 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert resolve_amp("auto", v100)[0] == "fp16" and resolve_amp("auto", a100)[0] == "bf16"
    assert reduced_precision_dtype(v100) == torch.float32 and reduced_precision_dtype(a100) == torch.bfloat16
    assert asked == [v100, a100, v100, a100]  # the GPU asked about, not the current one
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert runtime.cuda_has_native_bf16(v100)  # every ROCm GPU does bf16


def test_amp_choices(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        resolve_amp("fp16", cpu)
    # bf16 instructions, AVX512-BF16 (x1.47-1.48 on two AMD EPYCs without AMX) or AMX: bf16
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert resolve_amp("auto", cpu) == ("bf16", "auto: CPU with AVX512-BF16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_vnni"})  # AVX-512, no bf16
    assert resolve_amp("auto", cpu)[0] == "off"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert resolve_amp("auto", cpu) == ("bf16", "auto: CPU with AMX bf16")
    assert resolve_amp("off", cpu)[0] == "off"
    assert resolve_amp("bf16", cpu) == ("bf16", "as asked")
    # an AVX2-only CPU (no bf16 instructions): bf16 is honoured, with a warning of the emulation's cost
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    mode, why = resolve_amp("bf16", cpu)
    assert mode == "bf16" and "no bf16 instructions" in why and "--amp auto" in why
    assert resolve_amp("auto", cpu)[0] == "off"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    assert resolve_amp("bf16", cpu) == ("bf16", "as asked")
    monkeypatch.setattr(precision, "cpu_flags", set)  # flags unknown (not Linux): no claim either way
    assert resolve_amp("bf16", cpu) == ("bf16", "as asked")


def test_fp16_is_kept_on_cuda_and_every_explicit_mode_is_as_asked_there(monkeypatch):
    """Only device.type is read, so no GPU is needed: fp16 is refused on the CPU alone, and an
    explicit mode on a CUDA device is returned unchanged (auto is the only one that asks the GPU)."""
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device: pytest.fail("asked the GPU"))
    gpu = torch.device("cuda", 0)
    for mode in ("fp16", "bf16", "off"):
        assert resolve_amp(mode, gpu) == (mode, "as asked")


def test_autocast_context_per_mode():
    """off: float32 throughout (no autocast); bf16: CPU autocast to bfloat16, for a matmul inside it."""
    x = torch.ones(2, 3)
    w = torch.ones(4, 3)
    with precision.autocast("off", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
    with precision.autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_autocast_fp16_mode_casts_to_float16_not_bfloat16():
    """fp16 (the pre-Ampere CUDA choice) autocasts to float16; the context is device-generic, so the
    CPU's autocast, which also knows float16, shows the dtype without a GPU."""
    x = torch.ones(2, 3)
    w = torch.ones(4, 3)
    with precision.autocast("fp16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        assert torch.nn.functional.linear(x, w).dtype == torch.float16
    assert not torch.is_autocast_enabled("cpu")


def test_tensorboard_without_package_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    args = ["train", "--model", "unet", "--dataset", "shapes", "--epochs", "1", "--no-progress",
            "--out", str(tmp_path), "--model-kwargs", json.dumps(TINY_MODEL),
            "--dataset-kwargs", json.dumps(TINY_DATA), "--tensorboard"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the tensorboard package" in err[0]


# --- augment, instance crops, stages -------------------------------------------------------------
def test_instance_crop_centres_on_an_object():
    from pixelwise.data.instance_crop import InstanceCrop, object_boxes

    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:40] = 2  # one 10x10 object
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0] = np.arange(60)[None, :]  # column index in red
    s = Sample(image=img, mask=mask)
    assert object_boxes(s).tolist() == [[30, 10, 40, 20]]
    out = InstanceCrop((20, 20), context=2.0)(s)  # window 20x20 around centre (15, 35)
    assert out.image.shape == (20, 20, 3) and out.mask.shape == (20, 20)
    assert (out.mask == 2).sum() == 100 and out.mask[5:15, 5:15].min() == 2
    assert out.image[0, :, 0].tolist() == list(range(25, 45))
    # instance masks win over components; off-image parts are padded with ignore
    inst = np.zeros((1, 40, 60), bool)
    inst[0, 0:4, 0:4] = True
    s2 = Sample(image=img, mask=mask, instance_masks=inst, instance_labels=np.array([1]),
                boxes=np.zeros((1, 4), np.float32))
    out2 = InstanceCrop((8, 8), context=2.0)(s2)
    assert (out2.mask[:2] == 255).all() and out2.instance_masks.shape == (1, 8, 8)
    assert out2.boxes.tolist() == [[2, 2, 6, 6]]


def test_instance_crops_go_to_the_augment_resize_so_the_window_is_resampled_once():
    from pixelwise.data.instance_crop import InstanceCrop

    t = trainer.train_transform(TrainConfig(crop="16x16", instance_crops=True,
                                            augment={"resize": [20, 20], "scale": None}))
    assert isinstance(t.steps[0], InstanceCrop) and t.steps[0].size == (20, 20)
    from pixelwise.data.shapes import ShapesDataset

    assert t(ShapesDataset(size=32, num_train=1).load(0)).image.shape == (16, 16, 3)


def test_rotate90_on_images_that_are_not_square_needs_a_crop_to_batch(tmp_path, capsys):
    """Quarter turns make 24x40 images 40x24 at random, which no batch stacks: refused before
    anything is written (it stopped at a batch, blaming the files' sizes)."""
    from PIL import Image

    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(root / "images" / f"p{i}.png")
        Image.fromarray(np.full((24, 40), i % 2, np.uint8)).save(root / "masks" / f"p{i}.png")
    args = ["train", "--model", "unet", "--dataset", "folder", "--data", str(root), "--train-split", "all",
            "--val-split", "all", "--epochs", "1", "--batch-size", "2", "--no-progress",
            "--model-kwargs", '{"base_channels": 4}', "--augment", '{"rotate90": true}']
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: augment rotate90 turns the 24x40 training images into 40x24")
    assert "--crop" in err
    assert not (tmp_path / "r").exists()
    resized = [*args[:-1], '{"rotate90": true, "resize": [16, 32]}', "--out", str(tmp_path / "s")]
    assert main(resized) == 2 and "turns the 16x32 training images" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c"), "--crop", "16x16"]) == 0  # crops of one size: it trains
    square = [*args[:-1], '{"rotate90": true, "resize": [32, 32]}', "--out", str(tmp_path / "q")]
    assert main(square) == 0


def test_stages_from_yaml_with_instance_crops(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        "model: unet\ndataset: shapes\nbatch_size: 4\noptimizer: sgd\nlr: 0.01\n"
        f"model_kwargs: {json.dumps(TINY_MODEL)}\ndataset_kwargs: {json.dumps(TINY_DATA)}\n"
        "augment: {scale: null}\n"
        "stages:\n  - {name: objects, epochs: 1, crop: 16x16, instance_crops: true}\n"
        "  - {name: whole, epochs: 1, lr: 0.001}\n")
    out = tmp_path / "o"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "stage"]
    assert [r.split(",")[1] for r in rows[1:]] == ["objects", "whole"]
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 2
    # the instance-crop transform of stage 1 yields 16x16 crops
    t = trainer.train_transform(TrainConfig(crop="16x16", instance_crops=True, augment={"scale": None}))
    from pixelwise.data.shapes import ShapesDataset

    assert t(ShapesDataset(size=32, num_train=1).load(0)).image.shape == (16, 16, 3)


def test_time_budget_stops_and_anneals(tmp_path):
    # a budget far shorter than one epoch: the first epoch stops after its first optimizer step,
    # whose LR is already annealed by the time fraction (poly: 0 once the budget is spent)
    s = fit(tiny(tmp_path, epochs=5, batch_size=2, max_minutes=1e-4), log=quiet)
    assert s["stopped_by_time_budget"] and s["epochs_completed"] == 1 and s["steps"] == 1
    assert s["final"]["lr"] < 0.01 * 0.5
    assert (tmp_path / "best.safetensors").is_file()


def test_val_every_skips_validation_without_changing_training(tmp_path):
    # every 2nd epoch and the last (5) are validated; the training itself (losses, validated
    # metrics, the weights) is the same as with validation after every epoch, and best is the
    # best of the validated epochs
    every = fit(tiny(tmp_path / "every", epochs=5, select_by="pixel_acc"), log=quiet)
    some = fit(tiny(tmp_path / "some", epochs=5, select_by="pixel_acc", val_every=2), log=quiet)
    rows = {name: list(csv.DictReader((tmp_path / name / "metrics.csv").read_text().splitlines()))
            for name in ("every", "some")}
    assert [r["epoch"] for r in rows["some"]] == ["1", "2", "3", "4", "5"]
    assert list(rows["some"][0])[-3:] == ["lr", "img_per_s", "elapsed_s"]  # metrics columns first
    validated = [int(r["epoch"]) for r in rows["some"] if r["pixel_acc"]]
    assert validated == [2, 4, 5]
    for a, b in zip(rows["every"], rows["some"], strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-6)
        if b["pixel_acc"]:
            assert float(a["pixel_acc"]) == pytest.approx(float(b["pixel_acc"]), abs=1e-6)
            assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), abs=1e-5)
        else:
            assert b["val_loss"] == "" and b["mIoU"] == ""
    weights_equal(tmp_path / "every", tmp_path / "some")
    values = {int(r["epoch"]): float(r["pixel_acc"]) for r in rows["every"] if int(r["epoch"]) in validated}
    best = max(values.values())
    assert some["best_epoch"] == min(e for e, v in values.items() if v == best)
    _, meta = read_checkpoint(tmp_path / "some" / "best.safetensors")
    assert meta["training"]["epoch"] == some["best_epoch"] and "val" in meta["training"]
    assert every["epochs_completed"] == some["epochs_completed"] == 5


def test_channels_last_trains_the_same_network(tmp_path):
    # NHWC is a speed-up (x1.4 per U-Net step on a 2-core CPU), not another training: the same
    # losses, validation and weights up to float rounding, and checkpoints that load as usual.
    # SGD, because Adam's first steps are about sign(gradient), which turns rounding in the
    # near-zero gradients into differences of a whole step (1e-4 in the loss after 3 epochs here).
    # float32 throughout: --amp auto is bf16 on a CPU with AMX, whose rounding (1e-2) differs between
    # the two layouts' kernels
    plain = fit(tiny(tmp_path / "plain", epochs=3, optimizer="sgd", ema=0.9, amp="off"), log=quiet)
    nhwc = fit(tiny(tmp_path / "nhwc", epochs=3, optimizer="sgd", ema=0.9, amp="off", channels_last=True), log=quiet)
    # The two layouts' kernels round differently and 3 epochs of SGD amplify it: with one thread at
    # the dependency floors, 3.2e-5 (relative) in the training loss and one validation pixel of
    # 4096 changing class (2.4e-4 in pixel accuracy), weights 1.6e-4 apart; under 1e-5, none and
    # under 1e-4 with two threads. A wrong layout anywhere would differ by 1e-2 or more.
    for key in ("train_loss", "val_loss"):
        assert nhwc["final"][key] == pytest.approx(plain["final"][key], rel=2e-4), key
    for key in ("pixel_acc", "mIoU"):  # a few of the 4096 validation pixels may flip
        assert nhwc["final"][key] == pytest.approx(plain["final"][key], abs=2e-3), key
    weights_equal(tmp_path / "plain", tmp_path / "nhwc", tol=1e-3)  # weights ~0.1-0.4
    weights, _ = read_checkpoint(tmp_path / "nhwc" / "last.safetensors")
    assert all(t.is_contiguous() for t in weights.values())


def test_val_every_still_validates_the_epoch_the_time_budget_ends(tmp_path):
    s = fit(tiny(tmp_path, epochs=5, batch_size=2, max_minutes=1e-4, val_every=3), log=quiet)
    assert s["stopped_by_time_budget"] and s["epochs_completed"] == 1
    assert s["best_epoch"] == 1 and s["final"]["pixel_acc"] is not None
    assert (tmp_path / "best.safetensors").is_file()
    with pytest.raises(UserError, match="val_every"):
        TrainConfig(val_every=0)


def test_eval_collate_stacks_equal_sizes_and_splits_mixed_sizes():
    def item(h, w):
        return {"image": torch.zeros(3, h, w), "mask": torch.zeros(h, w, dtype=torch.long), "name": f"{h}x{w}"}

    same = trainer.eval_collate([item(8, 8), item(8, 8)])
    assert len(same) == 1 and same[0]["image"].shape == (2, 3, 8, 8)
    mixed = trainer.eval_collate([item(8, 8), item(8, 6)])
    assert [b["image"].shape for b in mixed] == [(1, 3, 8, 8), (1, 3, 8, 6)]


# --- steps over a typed state -----------------------------------------------------------------------
STAGES = [{"name": "objects", "epochs": 1, "crop": "16x16", "instance_crops": True, "augment": {"scale": None}},
          {"name": "whole", "epochs": 1, "lr": 0.001}]
MRCNN = {"model": "maskrcnn_resnet18_fpn", "optimizer": "adamw", "lr": 1e-4, "batch_size": 2,
         "model_kwargs": {"min_size": 64, "max_size": 64, "rpn_batch_size_per_image": 32,
                          "box_batch_size_per_image": 16},
         "dataset_kwargs": {"num_train": 4, "num_val": 2, "size": 64, "max_objects": 2}}


@pytest.mark.parametrize("kind", ["semantic", "staged", "instance"])
def test_fit_leaves_the_callers_config_unchanged(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    extra = {"semantic": {"epochs": 1, "class_weights": "median-freq"},
             "staged": {"stages": copy.deepcopy(STAGES)}, "instance": {**MRCNN, "epochs": 1}}[kind]
    cfg = tiny(None if kind == "semantic" else tmp_path / kind, **extra)
    before = copy.deepcopy(cfg.to_dict())
    summary = fit(cfg, log=quiet)
    assert cfg.to_dict() == before
    assert summary["epochs_completed"] == cfg.epochs
    if kind == "semantic":  # no out: runs/<model>, recorded in the saved config
        import yaml

        assert yaml.safe_load((tmp_path / "runs" / "unet" / "config.yaml").read_text())["out"] == "runs/unet"


def test_train_state_json_round_trip():
    state = trainer.TrainState(selected_by="pixel_acc", amp="bf16", epoch=3, step=17, stage=1, stage_epoch=1,
                               stage_step=5, stage_start_s=12.5, stage_stopped=True, batch=2, loss_sum=1.25,
                               images=8, lr=0.01, best_score=0.75, best_epoch=2, elapsed_s=30.0,
                               rows=[{"epoch": 1, "mIoU": 0.5}], rng=trainer.rng_snapshot())
    again = trainer.TrainState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == trainer.TrainState(**{**state.__dict__, "rng": None})
    fresh = trainer.TrainState()
    assert fresh.to_json()["best_score"] is None  # JSON has no infinity
    assert trainer.TrainState.from_json(fresh.to_json()).best_score == -math.inf
    assert trainer.TrainState.from_json({"epoch": 2, "rng": {"python": []}}).epoch == 2  # unknown keys left out


class Killed(BaseException):
    """What SIGKILL does to the process: no handler runs."""


def test_a_kill_between_the_state_and_metrics_csv_is_caught_up_by_resume(tmp_path, monkeypatch):
    # the SIGKILL test once found metrics.csv with rows [1, 2] after a resumed run had completed 3
    # epochs: the kill came after last.state.safetensors of the final epoch and before its
    # metrics.csv, so the resumed run had no epoch left to run and never rewrote the table
    real = trainer._write_csv

    def killed_at_epoch_2(path, rows):
        if len(rows) == 2:
            raise Killed
        real(path, rows)

    monkeypatch.setattr(trainer, "_write_csv", killed_at_epoch_2)
    with pytest.raises(Killed):
        fit(tiny(tmp_path), log=quiet)
    monkeypatch.setattr(trainer, "_write_csv", real)

    def csv_epochs():
        return [int(r["epoch"]) for r in csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines())]

    from safetensors import safe_open

    with safe_open(str(tmp_path / "last.state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["pixelwise_train_state"])["epoch"] == 2
    assert csv_epochs() == [1] and not (tmp_path / "metrics.json").exists()
    summary = fit(tiny(tmp_path, resume=True), log=quiet)
    assert summary["epochs_completed"] == 2 and csv_epochs() == [1, 2]
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs_completed"] == 2


def test_one_answer_to_native_bf16_for_training_and_inference(monkeypatch, tmp_path):
    """engine.precision (training's --amp) and the fast inference paths read the same CPU flags."""
    from pixelwise import runtime
    from pixelwise.models.maskrcnn.fast import reduced_precision_dtype

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    real_path = runtime.Path
    monkeypatch.setattr(runtime, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    assert runtime.cpu_flags() == {"fpu", "sse", "avx2", "amx_bf16", "amx_tile"}
    cpu = torch.device("cpu")
    for flags, native in [({"avx2", "fma"}, False), ({"avx512f", "avx512bw"}, False), ({"avx512_bf16"}, True),
                          ({"amx_bf16"}, True)]:
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        assert runtime.cpu_has_native_bf16() is native
        if torch.backends.mkldnn.is_available():
            assert reduced_precision_dtype(cpu) == (torch.bfloat16 if native else torch.float32)


def test_a_run_stopped_by_its_time_budget_trains_on_when_resumed_with_more_time(tmp_path):
    s = fit(tiny(tmp_path, epochs=3, batch_size=2, max_minutes=1e-4), log=quiet)
    assert s["stopped_by_time_budget"] and s["epochs_completed"] == 1
    said: list[str] = []
    same = fit(tiny(tmp_path, epochs=3, batch_size=2, max_minutes=1e-4, resume=True), log=said.append)
    assert same["epochs_completed"] == 1  # the budget is still spent: nothing trained, and it says why
    assert any("nothing to train" in line and "--max-minutes" in line for line in said)
    more = fit(tiny(tmp_path, epochs=3, batch_size=2, max_minutes=10, resume=True), log=quiet)
    assert more["epochs_completed"] == 3 and not more["stopped_by_time_budget"]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_a_run_cut_by_its_time_budget_then_interrupted_still_resumes(tmp_path):
    """The epoch the budget cut short took fewer steps than a whole one, so steps / epochs is no
    longer the steps of an epoch: the check of unchanged settings must not take it for one."""
    first = fit(tiny(tmp_path, epochs=3, batch_size=2, max_minutes=1e-4), log=quiet)
    assert first["stopped_by_time_budget"] and first["epochs_completed"] == 1

    def ctrl_c_after_epoch_2(event, state):
        if event == "epoch" and state.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path, epochs=3, batch_size=2, max_minutes=10, resume=True), log=quiet,
            callbacks=[ctrl_c_after_epoch_2])
    done = fit(tiny(tmp_path, epochs=3, batch_size=2, max_minutes=10, resume=True), log=quiet)
    assert done["epochs_completed"] == 3
    with pytest.raises(UserError, match="optimizer steps per epoch and these settings take"):  # still guarded
        fit(tiny(tmp_path, epochs=4, batch_size=4, max_minutes=10, resume=True), log=quiet)


def test_semantic_training_on_images_of_different_sizes_is_one_line(tmp_path, capsys):
    from PIL import Image

    from pixelwise.cli import main

    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate([(24, 40), (40, 24)] * 2):  # portrait and landscape photos
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "images" / f"p{i}.png")
        Image.fromarray(np.ones((h, w), np.uint8)).save(root / "masks" / f"p{i}.png")
    args = ["train", "--model", "unet", "--dataset", "folder", "--data", str(root), "--train-split", "all",
            "--val-split", "all", "--epochs", "1", "--batch-size", "4", "--no-progress",
            "--model-kwargs", '{"base_channels": 4}']
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    # found from the headers before anything is trained or written (it came when a batch stacked them)
    assert err.startswith("pixelwise: error: the all images differ in size (HxW 24x40, 40x24, ...)") and "--crop" in err
    assert not (tmp_path / "r").exists()
    assert main([*args, "--out", str(tmp_path / "c"), "--crop", "16x16"]) == 0  # one size: it trains


# --- resume: what a probe of interrupted runs found (2026-12-05) ----------------------------------------
def state_header(out) -> dict:
    """The JSON header of OUT/last.state.safetensors: the TrainState, optimizer name and param groups."""
    from safetensors import safe_open

    with safe_open(out / "last.state.safetensors", "pt") as f:
        return json.loads(f.metadata()["pixelwise_train_state"])


def test_a_signal_while_best_is_written_waits_so_best_is_the_epoch_the_state_names(tmp_path, monkeypatch):
    import signal

    real = trainer.save_checkpoint

    def save(path, model, meta):
        if path.name == trainer.PENDING_BEST and meta["training"]["epoch"] == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of writing epoch 1's best
        return real(path, model, meta)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's Ctrl-C, whatever ran before
    said: list[str] = []
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(tiny(tmp_path, epochs=3, select_by="pixel_acc", lr=0.05), log=said.append)
    finally:
        signal.signal(signal.SIGINT, before)
    state = trainer.TrainState.from_json(state_header(tmp_path))
    assert state.epoch == 1 and state.best_epoch == 1  # (best.safetensors did not exist at all before)
    # the saved epoch's line is logged before the held Ctrl-C goes through (a resume would never print it)
    assert any(line.startswith("epoch 1: ") for line in said), said
    assert read_checkpoint(tmp_path / "best.safetensors")[1]["training"]["epoch"] == state.best_epoch


def test_resume_refuses_a_batch_size_that_would_move_the_schedule_and_applies_new_weight_decay(tmp_path):
    fit(tiny(tmp_path, epochs=1, optimizer="sgd", weight_decay=0.0), log=quiet)  # 8 images: 2 steps of 4
    with pytest.raises(UserError, match="took 2 optimizer steps per epoch and these settings take 1"):
        fit(tiny(tmp_path, epochs=2, batch_size=8, optimizer="sgd", resume=True), log=quiet)
    said: list[str] = []
    fit(tiny(tmp_path, epochs=2, optimizer="sgd", weight_decay=0.5, momentum=0.5, resume=True), log=said.append)
    groups = state_header(tmp_path)["param_groups"]
    assert groups[0]["weight_decay"] == 0.5 and all(g["momentum"] == 0.5 for g in groups)  # the flags given apply
    assert any("weight_decay 0.0 -> 0.5" in line for line in said)


def test_resume_inside_an_epoch_or_after_a_time_stop_refuses_another_step_count(tmp_path):
    """Ctrl-C states are saved inside an epoch and a time-budget stop is resumed with more minutes:
    another --accumulate there rebuilt the schedule over fewer steps per epoch while the stage's
    step count stayed, so the rest of the run trained at lr 0 (or took a step at the peak lr)."""
    with pytest.raises(KeyboardInterrupt):  # 8 images in batches of 2: 4 steps per epoch; stopped at step 6
        fit(tiny(tmp_path / "c", batch_size=2), log=quiet, callbacks=[interrupt_at("step", lambda s: s.step == 6)])
    assert trainer.TrainState.from_json(state_header(tmp_path / "c")).batch == 2
    with pytest.raises(UserError, match="took 4 optimizer steps per epoch and these settings take 2"):
        fit(tiny(tmp_path / "c", batch_size=2, accumulate=2, resume=True), log=quiet)
    # 10 images in batches of 2: 5 micro-batches, 2 steps per epoch with --accumulate 3 and with 4
    data = {**TINY_DATA, "num_train": 10}
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "g", batch_size=2, accumulate=3, dataset_kwargs=data), log=quiet,
            callbacks=[interrupt_at("step", lambda s: s.step == 3)])
    with pytest.raises(UserError, match="after 3 micro-batches, which --accumulate 4 does not divide"):
        fit(tiny(tmp_path / "g", batch_size=2, accumulate=4, dataset_kwargs=data, resume=True), log=quiet)
    first = fit(tiny(tmp_path / "t", epochs=3, batch_size=2, max_minutes=1e-4), log=quiet)
    assert first["stopped_by_time_budget"]
    with pytest.raises(UserError, match="took 4 optimizer steps per epoch and these settings take 1"):
        fit(tiny(tmp_path / "t", epochs=3, batch_size=2, accumulate=4, max_minutes=10, resume=True), log=quiet)
    done = fit(tiny(tmp_path / "t", epochs=3, batch_size=2, max_minutes=10, resume=True), log=quiet)
    assert done["epochs_completed"] == 3 and done["steps"] == first["steps"] + 2 * 4  # the last two whole


def test_a_stop_after_an_epochs_last_smaller_group_resumes_exactly(tmp_path):
    """5 micro-batches with --accumulate 3 take steps of 3 and 2: a Ctrl-C after the second (while
    the epoch is validated) saved 'batch 5', which every resume refused as a cut group, though the
    run was resumed with its own --accumulate: the run could only be started over."""
    kw = {"batch_size": 2, "accumulate": 3, "optimizer": "sgd", "dataset_kwargs": {**TINY_DATA, "num_train": 10}}
    fit(tiny(tmp_path / "whole", **kw), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "cut", **kw), log=quiet, callbacks=[interrupt_at("step", lambda s: s.step == 2)])
    assert trainer.TrainState.from_json(state_header(tmp_path / "cut")).batch == 5
    fit(tiny(tmp_path / "cut", **kw, resume=True), log=quiet)
    weights_equal(tmp_path / "whole", tmp_path / "cut", tol=0)
    whole, cut = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    for metrics in (whole, cut):
        metrics["final"].pop("img_per_s"), metrics["final"].pop("elapsed_s")  # timings
    assert whole["final"] == cut["final"] and whole["steps"] == cut["steps"] == 4


def test_resume_keeps_the_runs_data_and_only_notes_a_moved_folder(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / "here" / sub).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "here/images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8)).save(tmp_path / "here/masks" / f"{i}.png")
    run = tmp_path / "run"
    folder = {"dataset": "folder", "dataset_kwargs": {}, "train_split": "all", "val_split": "all"}
    fit(tiny(run, epochs=1, data=str(tmp_path / "here"), **folder), log=quiet)
    with pytest.raises(UserError, match="trained on dataset_kwargs .* this resume gives --dataset-kwargs"):
        fit(tiny(run, epochs=2, resume=True, data=str(tmp_path / "here"),
                 **{**folder, "dataset_kwargs": {"num_classes": 4}}), log=quiet)
    # each for its own reason: other training data moves the schedule, another validation split the best
    with pytest.raises(UserError, match="trained on train_split 'all', .* other training data than its epochs"):
        fit(tiny(run, epochs=2, resume=True, data=str(tmp_path / "here"), **{**folder, "train_split": "train"}),
            log=quiet)
    with pytest.raises(UserError, match="trained on val_split 'all', .* compare scores of two validation sets"):
        fit(tiny(run, epochs=2, resume=True, data=str(tmp_path / "here"), **{**folder, "val_split": "val"}),
            log=quiet)
    (tmp_path / "here").rename(tmp_path / "elsewhere")
    said: list[str] = []
    fit(tiny(run, epochs=2, resume=True, data=str(tmp_path / "elsewhere"), **folder), log=said.append)
    assert any(f"the data is now read from {tmp_path / 'elsewhere'}" in line for line in said)


def test_a_validation_interrupted_epoch_records_the_scheduled_lr_after_resume(tmp_path, monkeypatch):
    fit(tiny(tmp_path / "a", epochs=2), log=quiet)
    real, calls = trainer.evaluate, []

    def evaluate(run):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while epoch 2 is validated
        return real(run)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "b", epochs=2), log=quiet)
    monkeypatch.setattr(trainer, "evaluate", real)
    fit(tiny(tmp_path / "b", epochs=2, resume=True), log=quiet)
    rows = {r: list(csv.DictReader((tmp_path / r / "metrics.csv").read_text().splitlines())) for r in "ab"}
    assert [row["lr"] for row in rows["b"]] == [row["lr"] for row in rows["a"]]  # not the peak LR for epoch 2


def test_a_second_training_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    held = trainer.lock_out(tmp_path)
    try:
        with pytest.raises(UserError, match="is in use by another pixelwise train"):
            fit(tiny(tmp_path, epochs=1), log=quiet)
        assert not (tmp_path / "config.yaml").exists()
    finally:
        held.close()
    (tmp_path / ".last.safetensors.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # what a kill -9 leaves
    fit(tiny(tmp_path, epochs=1), log=quiet)
    assert not list(tmp_path.glob(".*.tmp"))


def test_config_yaml_leaves_out_the_commands_flags_so_an_overwritten_run_resumes(tmp_path, capsys):
    args = ["train", "--model", "unet", "--dataset", "shapes", "--epochs", "1", "--batch-size", "4", "--no-progress",
            "--model-kwargs", json.dumps(TINY_MODEL), "--dataset-kwargs", json.dumps(TINY_DATA), "--lr", "0.02"]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    assert main([*args, "--out", str(tmp_path / "r"), "--overwrite"]) == 0
    saved = yaml_load(tmp_path / "r" / "config.yaml")
    assert "overwrite" not in saved and "resume" not in saved
    assert main(["train", "--resume", "--out", str(tmp_path / "r"), "--epochs", "2"]) == 0
    assert yaml_load(tmp_path / "r" / "config.yaml")["lr"] == 0.02


def test_resume_without_out_reads_the_default_runs_own_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", "unet", "--dataset", "shapes", "--epochs", "1", "--batch-size", "4", "--no-progress",
            "--model-kwargs", json.dumps(TINY_MODEL), "--dataset-kwargs", json.dumps(TINY_DATA), "--lr", "0.02"]
    assert main(args) == 0  # runs/unet
    assert main(["train", "--resume", "--epochs", "2"]) == 0
    saved = yaml_load(tmp_path / "runs" / "unet" / "config.yaml")
    assert (saved["epochs"], saved["lr"], saved["dataset_kwargs"]) == (2, 0.02, TINY_DATA)


def test_a_run_killed_before_its_first_checkpoint_is_told_to_start_again_with_overwrite(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: unet\n")  # all that a kill -9 in epoch 1 leaves
    base = ["train", "--dataset", "shapes", "--out", str(tmp_path), "--no-progress"]
    for args in (base, [*base, "--resume"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "saved nothing" in err and "--overwrite" in err and err.count("\n") == 1


def test_epochs_given_for_a_run_with_stages_is_refused_not_ignored(tmp_path, capsys):
    recipe = tmp_path / "staged.yaml"
    recipe.write_text("stages:\n  - {epochs: 1}\n  - {epochs: 1, lr: 0.001}\n")
    assert main(["train", "--config", str(recipe), "--epochs", "6", "--out", str(tmp_path / "r")]) == 2
    assert "this run has stages, and its length is their epochs (1 + 1 = 2)" in capsys.readouterr().err


def test_a_full_disk_while_writing_a_checkpoint_is_an_oserror(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from pixelwise import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.atomic_save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_augmentation_depends_on_the_sample_not_the_worker_so_resume_with_workers_is_exact(tmp_path):
    """Each sample's augmentation is seeded from the epoch and its index: two worker processes
    give the weights of none, and a run interrupted inside an epoch resumes exactly with them."""
    kw = {"batch_size": 2, "epochs": 2, "augment": {"crop": [24, 24], "scale": [0.5, 1.5]}}
    fit(tiny(tmp_path / "none", **kw), log=quiet)
    fit(tiny(tmp_path / "two", num_workers=2, **kw), log=quiet)
    weights_equal(tmp_path / "none", tmp_path / "two")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "cut", num_workers=2, **kw), log=quiet,
            callbacks=[interrupt_at("step", lambda s: s.step == 5)])  # inside epoch 2
    fit(tiny(tmp_path / "cut", num_workers=2, resume=True, **kw), log=quiet)
    weights_equal(tmp_path / "none", tmp_path / "cut")


def test_overwrite_says_what_it_deleted_and_a_resume_with_nothing_to_train_writes_no_checkpoint(tmp_path, capsys):
    args = ["train", "--model", "unet", "--dataset", "shapes", "--epochs", "1", "--batch-size", "4", "--no-progress",
            "--model-kwargs", json.dumps(TINY_MODEL), "--dataset-kwargs", json.dumps(TINY_DATA)]
    assert main([*args, "--out", str(tmp_path / "new"), "--overwrite"]) == 0
    assert "deleted" not in capsys.readouterr().out  # a new folder: nothing was there to delete
    assert main([*args, "--out", str(tmp_path / "new"), "--overwrite"]) == 0
    assert "deleted the earlier run's files" in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(tmp_path / "new")]) == 0  # its one epoch is done
    said = capsys.readouterr().out
    assert "wrote" not in said and "done in" in said


def test_val_loss_is_the_mean_over_labelled_pixels_whatever_the_batches():
    """An all-ignored image adds nothing, and a mostly-ignored one weighs by its labelled pixels:
    val_loss is the split's pixel mean of the cross-entropy, computed here by hand."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from pixelwise.engine.validate import eval_collate, validate_semantic

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1).eval()
    images = [torch.randn(3, 6, 8) for _ in range(3)]
    masks = [torch.randint(0, 4, (6, 8)), torch.full((6, 8), 255), torch.randint(0, 4, (6, 8))]
    masks[2][:5] = 255  # 8 labelled pixels against the first image's 48
    items = [{"image": i, "mask": m, "name": str(k)} for k, (i, m) in enumerate(zip(images, masks))]
    logp = [F.log_softmax(model(i[None]), 1)[0] for i in images]
    nll = [-lp.gather(0, m.clamp(max=3)[None])[0][m != 255] for lp, m in zip(logp, masks)]
    expected = torch.cat(nll).mean().item()
    for batch_size in (1, 3):
        got = validate_semantic(model, DataLoader(items, batch_size=batch_size, collate_fn=eval_collate), 4,
                                torch.device("cpu"), show=False)
        assert got["loss"] == pytest.approx(expected, rel=1e-5) and got["num_images"] == 3


def test_the_last_stage_anneals_over_the_time_it_has():
    """With --max-minutes the last stage runs to the end of the run's budget; an earlier stage that
    finished before its share hands it the rest, and its poly rate reaches 0 when the budget does
    (annealed over its own share, it trained its last steps at rate 0 with time left)."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.optim import Schedule
    from pixelwise.engine.trainer import Stage, TrainState

    cfg = TrainConfig(schedule="poly", poly_power=1.0, epochs=1, warmup_epochs=0, warmup_iters=0)
    schedule = Schedule.from_config(cfg, 1000)  # many steps: the time fraction decides
    state = TrainState(stage=1, stage_step=0, stage_start_s=2.0)  # stage 1 of 2 began 2 s into a 6 s budget
    last = Stage(1, "b", cfg, None, schedule, False, budget_s=3.0, last=True, run_budget_s=6.0)
    for elapsed, want in ((2.0, 1.0), (4.0, 0.5), (5.0, 0.25), (6.0, 0.0)):  # (elapsed - 2) / (6 - 2) done
        assert last.lr_factor(state, elapsed) == pytest.approx(want)
    first = Stage(0, "a", cfg, None, schedule, False, budget_s=3.0, last=False, run_budget_s=6.0)
    assert first.lr_factor(TrainState(stage_step=0), 1.5) == pytest.approx(0.5)  # an earlier stage: its share


def _scored(monkeypatch, scores):
    """Validation reports these mIoUs, epoch after epoch (also for an epoch repeated after a kill)."""
    real, given = trainer.evaluate, iter(scores)

    def evaluate(run):
        return {**real(run), "mIoU": next(given)}

    monkeypatch.setattr(trainer, "evaluate", evaluate)


def _kill_at_state(monkeypatch, epoch, after):
    real = trainer.save_state

    def save_state(run, state):
        if state.epoch == epoch and not after:
            raise Killed
        real(run, state)
        if state.epoch == epoch:
            raise Killed

    monkeypatch.setattr(trainer, "save_state", save_state)
    return real


def _best_epoch(out):
    return read_checkpoint(out / "best.safetensors")[1]["training"]["epoch"]


def test_a_best_written_before_a_kill_does_not_outlive_its_lost_epoch(tmp_path, monkeypatch):
    """best.safetensors was written before the state: after a kill between them the resume repeated
    the epoch, and when the repeat scored lower, best kept the lost epoch's weights while
    metrics.json named another epoch. A best now waits under PENDING_BEST until its state is saved."""
    _scored(monkeypatch, [0.2, 0.5, 0.3, 0.1])  # epoch 2 scores 0.5, is lost, and scores 0.3 when repeated
    real = _kill_at_state(monkeypatch, epoch=2, after=False)
    with pytest.raises(Killed):
        fit(tiny(tmp_path, epochs=3), log=quiet)
    assert (tmp_path / trainer.PENDING_BEST).exists() and _best_epoch(tmp_path) == 1
    monkeypatch.setattr(trainer, "save_state", real)
    fit(tiny(tmp_path, epochs=3, resume=True), log=quiet)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["best_epoch"] == 2 and summary["best"]["mIoU"] == 0.3 and _best_epoch(tmp_path) == 2
    best = read_checkpoint(tmp_path / "best.safetensors")[1]["training"]["val"]["mIoU"]
    assert best == 0.3 and not (tmp_path / trainer.PENDING_BEST).exists()


def test_a_best_whose_state_was_saved_before_the_kill_becomes_best(tmp_path, monkeypatch):
    _scored(monkeypatch, [0.2, 0.5, 0.1])
    real = _kill_at_state(monkeypatch, epoch=2, after=True)  # the state of epoch 2 saved, best not renamed
    with pytest.raises(Killed):
        fit(tiny(tmp_path, epochs=3), log=quiet)
    assert (tmp_path / trainer.PENDING_BEST).exists() and _best_epoch(tmp_path) == 1
    monkeypatch.setattr(trainer, "save_state", real)
    fit(tiny(tmp_path, epochs=3, resume=True), log=quiet)
    assert json.loads((tmp_path / "metrics.json").read_text())["best_epoch"] == 2 and _best_epoch(tmp_path) == 2


def test_a_run_killed_before_its_first_state_says_start_again(tmp_path, monkeypatch):
    """A kill in epoch 1 after its checkpoints but before its state: --resume said 'drop --resume',
    which was then refused as 'already holds a run'."""
    _scored(monkeypatch, [0.2, 0.2])
    real = _kill_at_state(monkeypatch, epoch=1, after=False)
    with pytest.raises(Killed):
        fit(tiny(tmp_path, epochs=1), log=quiet)
    assert (tmp_path / "last.safetensors").exists() and not (tmp_path / "last.state.safetensors").exists()
    monkeypatch.setattr(trainer, "save_state", real)
    with pytest.raises(UserError, match="saved nothing to resume from .* start it again with --overwrite"):
        fit(tiny(tmp_path, epochs=1, resume=True), log=quiet)
    fit(tiny(tmp_path, epochs=1, overwrite=True), log=quiet)
    assert not (tmp_path / trainer.PENDING_BEST).exists() and _best_epoch(tmp_path) == 1


def test_a_demo_killed_before_training_wrote_anything_is_told_to_start_again(tmp_path):
    """A demo killed after its class weights but before training wrote config.yaml: --resume said
    'drop --resume to start a new run', and without it the folder was refused as holding a run."""
    from pixelwise.demo import DEMO_FILES

    (tmp_path / "demo_class_weights.json").write_text("[1, 1]")
    cfg = tiny(tmp_path, epochs=1)
    with pytest.raises(UserError, match="already holds a run .*replace it with --overwrite"):
        trainer.check_out(cfg, can_resume=False, writes=DEMO_FILES)
    with pytest.raises(UserError, match=r"cannot resume: .* holds a run's files \(demo_class_weights.json\) but "
                                        "nothing to resume from .*start it again with --overwrite"):
        trainer.check_out(dataclasses.replace(cfg, resume=True), can_resume=False, writes=DEMO_FILES)
    trainer.check_out(dataclasses.replace(cfg, overwrite=True), can_resume=False, writes=DEMO_FILES)
    with pytest.raises(UserError, match="drop --resume to start a new run"):  # an empty folder
        trainer.check_out(dataclasses.replace(cfg, out=str(tmp_path / "empty"), resume=True))


def test_overwrite_deletes_the_state_first(tmp_path, monkeypatch):
    """A kill while --overwrite deleted the earlier run could leave its state without best and last,
    and a resume then said 'done' with no checkpoint in the folder."""
    fit(tiny(tmp_path, epochs=1), log=quiet)
    real, deleted = Path.unlink, []

    def unlink(self, *args, **kwargs):
        deleted.append(self.name)
        real(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(Killed):
        fit(tiny(tmp_path, epochs=1, overwrite=True), log=quiet)
    monkeypatch.setattr(Path, "unlink", real)
    assert deleted == ["last.state.safetensors"] and (tmp_path / "best.safetensors").exists()
    with pytest.raises(UserError, match="has no last.state.safetensors .* start it again with --overwrite"):
        fit(tiny(tmp_path, epochs=1, resume=True), log=quiet)


def test_aux_weight_needs_an_auxiliary_head(tmp_path):
    """aux_weight on a model without an auxiliary head was recorded in config.yaml as if it had acted
    (nothing read it: the loss adds the aux term only for a model that returns one)."""
    from pixelwise.engine.trainer import check_aux_weight

    plain, with_aux = torch.nn.Module(), torch.nn.Module()
    with_aux.aux_classifier = torch.nn.Conv2d(1, 2, 1)
    check_aux_weight(tiny(tmp_path), plain)  # the default: nothing given
    check_aux_weight(tiny(tmp_path, aux_weight=0.7), with_aux)
    with pytest.raises(UserError, match="aux_weight 0.7 acts only with an auxiliary head, which unet is not"):
        check_aux_weight(tiny(tmp_path, aux_weight=0.7), plain)
    staged = tiny(tmp_path, stages=[{"name": "a", "epochs": 1}, {"name": "b", "epochs": 1, "aux_weight": 0.2}])
    with pytest.raises(UserError, match="aux_weight 0.2 acts only"):
        check_aux_weight(staged, plain)
    wrapped = torch.nn.Module()  # a user model whose head sits deeper (it returns "aux" all the same)
    wrapped.net = with_aux
    check_aux_weight(tiny(tmp_path, aux_weight=0.7), wrapped)
    # before any weights are read: a zoo model that takes aux_loss, not given it
    with pytest.raises(UserError, match="aux_weight 0.7 acts only with an auxiliary head, which deeplabv3_resnet50"):
        check_aux_weight(tiny(tmp_path, model="deeplabv3_resnet50", model_kwargs={}, aux_weight=0.7))
    check_aux_weight(tiny(tmp_path, model="deeplabv3_resnet50", model_kwargs={"aux_loss": True}, aux_weight=0.7))
    check_aux_weight(tiny(tmp_path, aux_weight=0.7))  # unet takes no aux_loss: checked once built
    # a resumed run that recorded it (before this check) is not refused for it
    (tmp_path / "config.yaml").write_text("aux_weight: 0.7\n", encoding="utf-8")
    check_aux_weight(tiny(tmp_path, aux_weight=0.7, resume=True), plain)


def test_resume_checks_what_it_changes(tmp_path):
    """On --resume the settings checks were skipped: --warmup-factor 50 trained at 19x the peak rate,
    and --milestones on a poly schedule was recorded in config.yaml (which then could not be re-run)."""
    fit(tiny(tmp_path / "poly", epochs=1), log=quiet)
    with pytest.raises(UserError, match="warmup_factor 50: .* must be at most 1"):
        fit(tiny(tmp_path / "poly", epochs=2, resume=True, warmup_factor=50.0, warmup_epochs=1.0), log=quiet)
    with pytest.raises(UserError, match="milestones \\[5.0\\] acts only with schedule step"):
        fit(tiny(tmp_path / "poly", epochs=2, resume=True, milestones=[5.0]), log=quiet)
    said: list[str] = []
    fit(tiny(tmp_path / "poly", epochs=2, resume=True, lr=0.02, loss="focal"), log=said.append)
    changed = [line for line in said if line.startswith("resume: settings changed")]
    assert len(changed) == 1 and "lr 0.01 -> 0.02" in changed[0] and "loss 'ce' -> 'focal'" in changed[0]


def test_resume_refuses_what_it_would_not_use_and_says_changes_only_once_accepted(tmp_path):
    """--amp and --pretrained on a resume were ignored (the state's precision and weights were kept)
    and recorded in config.yaml as changes: fed back as --config, that file trained in bf16; a refused
    resume said "settings changed ... which now records the new ones" before its error; a hand-edited
    lr: 1e-3 (the same number) was told as a change."""
    run = tmp_path / "r"
    fit(tiny(run, epochs=1), log=quiet)
    before = (run / "config.yaml").read_bytes()
    for kw, words in (({"amp": "bf16"}, "trained with amp auto, and a resumed run keeps its precision"),
                      ({"pretrained": "imagenet"}, "trained with pretrained none, and a resumed run keeps its own"),
                      ({"pretrained": str(tmp_path / "missing.safetensors")}, "--pretrained is read only when"),
                      ({"optimizer": "sgd", "lr": 0.02}, "trains with Adam, these settings with SGD")):
        said: list[str] = []
        with pytest.raises(UserError, match=words):
            fit(tiny(run, epochs=2, resume=True, **kw), log=said.append)
        assert not any("settings changed" in line for line in said), said
        assert (run / "config.yaml").read_bytes() == before
    # a refusal that comes later (OUT locked by another process) does not say them either
    from pixelwise.engine.trainer import lock_out

    lock = lock_out(run)
    said = []
    with pytest.raises(UserError, match="in use by another pixelwise train"):
        fit(tiny(run, epochs=2, resume=True, lr=0.02), log=said.append)
    assert lock is not None
    lock.close()
    assert not any("settings changed" in line or "resumed from" in line for line in said), said
    # the same values written otherwise by hand are no change, and no refusal
    assert b"\nlr: 0.01\n" in before and b"\npretrained: null\n" in before
    edited = before.decode().replace("\nlr: 0.01\n", "\nlr: 1e-2\n").replace("\npretrained: null\n",
                                                                            "\npretrained: none\n")
    (run / "config.yaml").write_text(edited, encoding="utf-8")
    said = []
    fit(tiny(run, epochs=2, resume=True), log=said.append)
    assert not any("settings changed" in line for line in said), said


def test_a_run_written_while_this_one_started_is_not_written_over(tmp_path, monkeypatch):
    """check_out ran before the data check and the model build, the lock was taken after: a run
    that started and ended in that window was overwritten without --overwrite (both exited 0), and
    a resume read a state that an --overwrite run then replaced."""
    import os

    import pixelwise.engine.trainer as trainer

    real = trainer.lock_out
    run = tmp_path / "r"

    def another_run_ends_first(out):
        (out / "config.yaml").write_text("model: unet\n", encoding="utf-8")
        (out / "best.safetensors").write_bytes(b"theirs")
        return real(out)

    monkeypatch.setattr(trainer, "lock_out", another_run_ends_first)
    with pytest.raises(UserError, match="another pixelwise train wrote a run there .* nothing was written over it"):
        fit(tiny(run, epochs=1), log=quiet)
    assert (run / "best.safetensors").read_bytes() == b"theirs" and not (run / "metrics.csv").exists()

    monkeypatch.setattr(trainer, "lock_out", real)
    fit(tiny(tmp_path / "s", epochs=1), log=quiet)
    state = tmp_path / "s" / "last.state.safetensors"

    def state_replaced_first(out):
        data = state.read_bytes()
        state.unlink()
        state.write_bytes(data)  # another run's state in its place: another file
        os.utime(state, ns=(1, 1))
        return real(out)

    monkeypatch.setattr(trainer, "lock_out", state_replaced_first)
    said: list[str] = []
    with pytest.raises(UserError, match="last.state.safetensors was replaced while this command read it"):
        fit(tiny(tmp_path / "s", epochs=2, resume=True), log=said.append)
    assert not any("resumed from" in line for line in said)


def test_resume_keeps_the_stages_it_went_through(tmp_path):
    """A resume with fewer stages than the run had was an IndexError; one with stages where the run had
    none trained past its epochs."""
    staged = [{"name": "a", "epochs": 1, "lr": 0.01}, {"name": "b", "epochs": 1, "lr": 0.001}]
    run = tmp_path / "staged"
    def stop_in_stage_b(event, state):
        if event == "step" and state.stage == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny(run, epochs=2, stages=staged, schedule="constant"), log=quiet, callbacks=[stop_in_stage_b])
    for other, words in (({"stages": []}, "trains in stages a (1 epochs), b (1 epochs), and is in stage 2; these "
                                          "settings train without stages"),
                         ({"stages": staged[:1]}, "is in stage 2"),
                         ({"stages": [{**staged[0], "name": "first"}, staged[1]]}, "these settings train in stages "
                                                                                  "first (1 epochs)")):
        with pytest.raises(UserError, match=re.escape(words)):
            fit(tiny(run, epochs=2, schedule="constant", resume=True, **other), log=quiet)
    fit(tiny(run, epochs=3, schedule="constant", resume=True, stages=[*staged, {"name": "c", "epochs": 1}]), log=quiet)
    plain = tmp_path / "plain"
    fit(tiny(plain, epochs=1), log=quiet)
    with pytest.raises(UserError, match="trains without stages, and is in stage 1; these settings train in stages"):
        fit(tiny(plain, epochs=2, schedule="constant", resume=True, stages=staged), log=quiet)


def test_the_input_contract_has_the_last_stages_resize(tmp_path):
    """A resize set only in the stages was left out of the contract: trained at 16x16, validated and
    predicted at the data's 32x32."""
    fit(tiny(tmp_path, epochs=2, stages=[{"epochs": 1, "augment": {"resize": [24, 24]}},
                                         {"epochs": 1, "augment": {"resize": [16, 16]}}]), log=quiet)
    assert read_checkpoint(tmp_path / "best.safetensors")[1]["input"]["resize"] == [16, 16]


def test_a_last_stage_that_clears_the_resize_predicts_at_full_size(tmp_path):
    """Low resolution first, then full: the contract kept the run's 16x16, so the weights last
    trained at the data's 32x32 were validated, and would predict, at 16x16."""
    fit(tiny(tmp_path, epochs=2, augment={"resize": [16, 16]},
             stages=[{"epochs": 1}, {"epochs": 1, "augment": {"resize": None}}]), log=quiet)
    assert read_checkpoint(tmp_path / "best.safetensors")[1]["input"]["resize"] is None


def test_fit_checks_log_and_callbacks_before_writing(tmp_path):
    """log=None failed at the first line, after the run folder was made, so the corrected call needed overwrite."""
    with pytest.raises(TypeError, match="callbacks functions of"):
        fit(tiny(tmp_path / "r", epochs=1), callbacks=["x"])
    assert not (tmp_path / "r").exists()
    fit(tiny(tmp_path / "r", epochs=1), log=None)  # quiet
    assert (tmp_path / "r" / "best.safetensors").is_file()


def _folder_run(root, train_masks, val_masks):
    from PIL import Image

    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, masks in (("train", train_masks), ("val", val_masks)):
        names = []
        for i, mask in enumerate(masks):
            name = f"{split}{i}"
            Image.fromarray(np.full((*mask.shape, 3), 90, np.uint8)).save(root / "images" / f"{name}.png")
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
            names.append(name)
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return TrainConfig(model="unet", model_kwargs=dict(TINY_MODEL), dataset="folder", data=str(root),
                       dataset_kwargs={"num_classes": 2}, epochs=1, batch_size=2, progress=False,
                       out=str(root / "run"))


@pytest.mark.parametrize(("train", "val", "words"), [
    ("ignore", "stripes", "the train split has no labelled pixel"),
    ("binary_255", "stripes", "every labelled pixel of the train split is class 0 (class_0)"),
    ("stripes", "ignore", "the val split has no labelled pixel"),
])
def test_data_that_cannot_teach_or_score_is_refused_before_training(tmp_path, train, val, words):
    """0/255 binary masks trained a background-only model (rc 0); an all-ignore training split trained
    with loss 0 and never changed the weights; an all-ignore val split 'succeeded' with val_loss 0 and
    said it wrote a best.safetensors it never wrote."""
    stripes = np.tile(np.arange(16) % 2, (16, 1)).astype(np.uint8)
    masks = {"ignore": np.full((16, 16), 255, np.uint8), "stripes": stripes, "binary_255": stripes * 255}
    cfg = _folder_run(tmp_path, [masks[train]] * 2, [masks[val]])
    with pytest.raises(UserError, match=re.escape(words)):
        fit(cfg, log=quiet)
    assert not (tmp_path / "run").exists()


def test_batchnorm_pooled_to_one_value_per_channel_is_one_line(tmp_path):
    """U-Net with BatchNorm at batch size 1 on a 16x16 crop was a torch ValueError traceback."""
    cfg = tiny(tmp_path, epochs=1, batch_size=1, crop="16x16",
               model_kwargs={"base_channels": 4, "batch_norm": True, "dropout": 0})
    with pytest.raises(UserError, match=r"unet's BatchNorm got one value per channel: at batch size 1 an input of "
                                        r"16x16 pools down to 1x1 .* or --batch-size 2 or more"):
        fit(cfg, log=quiet)


def test_a_folder_runs_ignore_colour_is_recorded_for_serve(tmp_path):
    from PIL import Image

    root = tmp_path / "d"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    palette = [[255, 255, 255], [200, 30, 30]]
    (root / "classes.json").write_text(json.dumps({"names": ["snow", "brick"], "palette": palette,
                                                   "ignore_color": [0, 0, 0]}))
    for i in range(3):
        mask = np.zeros((16, 16, 3), np.uint8)
        mask[:, 4:10], mask[:, 10:] = palette[0], palette[1]
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    fit(TrainConfig(model="unet", model_kwargs=dict(TINY_MODEL), dataset="folder", data=str(root), epochs=1,
                    batch_size=2, train_split="all", val_split="all", progress=False, out=str(tmp_path / "r")),
        log=quiet)
    assert read_checkpoint(tmp_path / "r" / "best.safetensors")[1]["ignore_color"] == [0, 0, 0]


def test_validation_workers_get_the_max_pixels_limit_and_cuda_states_go_to_their_devices(tmp_path, monkeypatch):
    """A spawned worker (macOS, Windows) does not inherit --max-pixels: training's loader passed it,
    validation's did not. And the saved CUDA generator states are restored by device number, only to
    devices that exist (sorted as strings, rng.cuda.10 came before .2; with fewer GPUs, an IndexError)."""
    inits = []
    real = trainer.DataLoader

    def loader(*args, **kwargs):
        inits.append(kwargs.get("worker_init_fn"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "DataLoader", loader)
    fit(tiny(tmp_path, epochs=1, max_pixels=123_456), log=quiet)
    assert len(inits) >= 2 and all(i is not None and i.keywords["max_pixels"] == 123_456 for i in inits)

    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, int(state[0])))
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.zeros(624, dtype=torch.int64),
               **{f"rng.cuda.{i}": torch.tensor([i], dtype=torch.uint8) for i in (0, 1, 2, 10)}}
    meta = {"numpy": ["MT19937", 0, 0, 0.0], "python": list(random.getstate())}
    trainer.rng_restore(tensors, meta)
    assert restored == {0: 0, 1: 1, 2: 2}  # device 10 is not here


class _SlowValidation:
    """``trainer.time`` whose monotonic clock jumps ``seconds`` at each of the first ``times``
    validations: a validation that is long next to an epoch, without waiting for it."""

    def __init__(self, monkeypatch, seconds: float, times: int = 10**9):
        import time as real_time

        self.real, self.offset, self.calls = real_time, 0.0, 0
        evaluate = trainer.evaluate

        def slow(run):
            metrics = evaluate(run)
            self.calls += 1
            if self.calls <= times:
                self.offset += seconds
            return metrics

        monkeypatch.setattr(trainer, "evaluate", slow)
        monkeypatch.setattr(trainer, "time", self)

    def monotonic(self) -> float:
        return self.real.monotonic() + self.offset

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_no_epoch_starts_after_the_budget_ran_out_while_validating(tmp_path, monkeypatch):
    """The deadline passed during epoch 1's validation, and epoch 2 still began: one step after
    the deadline (at full lr with a constant schedule), a second validation, counted as an epoch."""
    _SlowValidation(monkeypatch, seconds=120)
    s = fit(tiny(tmp_path, epochs=5, schedule="constant", max_minutes=1), log=quiet)
    assert s["epochs_completed"] == 1 and s["stopped_by_time_budget"]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["mIoU"] != ""


def test_a_stage_cut_by_its_share_is_said_in_metrics_json(tmp_path, monkeypatch):
    """stopped_by_time_budget was false when an earlier stage was stopped by its share of the
    budget and the last stage finished: the summary read as a complete run."""
    _SlowValidation(monkeypatch, seconds=50, times=2)  # stage a: 2 x 50 s of a 90 s share
    s = fit(tiny(tmp_path, epochs=4, max_minutes=2, stages=[{"name": "a", "epochs": 3}, {"name": "b", "epochs": 1}]),
            log=quiet)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [r["stage"] for r in rows] == ["a", "a", "b"] and s["stopped_by_time_budget"]


def test_a_resume_with_fewer_epochs_than_trained_is_refused(tmp_path):
    """It trained nothing, said nothing, and config.yaml then recorded the smaller --epochs."""
    fit(tiny(tmp_path, epochs=3), log=quiet)
    with pytest.raises(UserError, match="cannot resume with 2 epochs: the run in .* has trained 3 already"):
        fit(tiny(tmp_path, epochs=2, resume=True), log=quiet)
    said = []
    fit(tiny(tmp_path, epochs=3, resume=True), log=said.append)
    assert any("nothing to train: the run has trained all its 3 epochs" in line for line in said)


def test_a_pretrained_checkpoint_of_other_tensorless_options_is_said(tmp_path):
    """A U-Net trained with input_norm loaded silently into one built without it (the same tensors,
    another function: 82% of pixels of the same class)."""
    fit(tiny(tmp_path / "a", epochs=1, model_kwargs={**TINY_MODEL, "input_norm": True}), log=quiet)
    said: list[str] = []
    fit(tiny(tmp_path / "b", epochs=1, pretrained=str(tmp_path / "a" / "last.safetensors")), log=said.append)
    notes = [line for line in said if line.startswith("note:") and "input_norm=True (this model: False)" in line]
    assert len(notes) == 1, said
    said.clear()
    fit(tiny(tmp_path / "c", epochs=1, pretrained=str(tmp_path / "a" / "last.safetensors"),
             model_kwargs={**TINY_MODEL, "input_norm": True}), log=said.append)
    assert not any("was trained with" in line for line in said), said


def test_frozen_parameters_are_left_out_and_a_fully_frozen_model_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    model[0].requires_grad_(False)  # e.g. a frozen backbone
    groups = param_groups(model, 1e-4)
    got = {id(p) for g in groups for p in g["params"]}
    assert got == {id(model[1].weight), id(model[1].bias)}  # only what trains, by hand
    model.requires_grad_(False)
    assert param_groups(model, 1e-4) == []
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer(TrainConfig(), model)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_betas_are_momentum_and_0999(name):
    # docs/training.md: momentum is "Adam/AdamW beta1"; beta2 is torch's and Adam's paper's 0.999
    model = nn.Conv2d(3, 2, 1)
    opt = build_optimizer(TrainConfig(optimizer=name, momentum=0.8), model)
    assert all(tuple(g["betas"]) == (0.8, 0.999) for g in opt.param_groups)


def test_schedule_from_config_counts_total_steps_exactly():
    # total_steps = epochs x steps per epoch (docs/training.md), also for a one-step run
    assert Schedule.from_config(TrainConfig(epochs=1), 1).total_steps == 1
    assert Schedule.from_config(TrainConfig(epochs=3), 5).total_steps == 15


def test_apply_lr_sets_every_group_and_returns_the_first_groups_lr():
    one = torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))], lr=0.1)  # a single group
    set_peak_lr(one, 0.1)
    assert apply_lr(one, 0.5) == pytest.approx(0.05)
    two = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(2, 2))]},
                           {"params": [nn.Parameter(torch.zeros(2))]}], lr=0.1)
    two.param_groups[0]["initial_lr"], two.param_groups[1]["initial_lr"] = 0.2, 0.4
    assert apply_lr(two, 0.5) == pytest.approx(0.1)
    assert [g["lr"] for g in two.param_groups] == pytest.approx([0.1, 0.2])


def test_to_device_makes_only_4d_images_channels_last_and_only_when_asked():
    """--channels-last converts the image batch (and nothing else); without it nothing is converted.
    No test looked at the memory format, so dropping the conversion (or converting the mask, or
    converting without the flag) passed."""
    image = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    weight = torch.ones(2, 4, 5)
    batch = {"image": image, "mask": torch.zeros(2, 4, 5, dtype=torch.long), "weight": weight, "name": ["a", "b"]}
    on = to_device(batch, torch.device("cpu"), channels_last=True)
    assert on["image"].is_contiguous(memory_format=torch.channels_last) and not on["image"].is_contiguous()
    assert torch.equal(on["image"], image) and on["name"] == ["a", "b"]
    assert on["weight"].is_contiguous() and on["mask"].is_contiguous()
    off = to_device(batch, torch.device("cpu"), channels_last=False)
    assert off["image"].is_contiguous() and not off["image"].is_contiguous(memory_format=torch.channels_last)


def test_to_device_moves_lists_of_differently_sized_images_and_masks():
    """Batches whose images differ in size are kept as lists (collate); each element is moved.
    The list branch was never reached by the validation tests."""
    images = [torch.zeros(3, 4, 5), torch.ones(3, 6, 2)]
    masks = [torch.zeros(4, 5, dtype=torch.long), torch.ones(6, 2, dtype=torch.long)]
    out = to_device({"image": images, "mask": masks}, torch.device("cpu"))
    assert isinstance(out["image"], list) and [tuple(t.shape) for t in out["image"]] == [(3, 4, 5), (3, 6, 2)]
    assert torch.equal(out["mask"][1], masks[1])


def test_val_loss_stays_finite_when_a_probability_underflows_to_zero():
    """A confidently wrong pixel (logit gap 200: softmax gives exactly 0.0 in float32) costs
    -log(1e-12) = 27.631..., the documented floor, not inf; unchecked before (clamp 0.0 survived).
    Hand-computed: 2 pixels, one right with p = 1 (cost 0), one wrong -> mean 27.631 / 2."""
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros_like(x[:, 0]), 200 * torch.ones_like(x[:, 0])], 1)

    items = [{"image": torch.zeros(3, 1, 2), "mask": torch.tensor([[1, 0]]), "name": "a"}]
    got = validate_semantic(Fixed(), DataLoader(items, batch_size=1, collate_fn=eval_collate), 2,
                            torch.device("cpu"), show=False)
    assert math.isfinite(got["loss"])
    assert abs(got["loss"] - (-math.log(1e-12)) / 2) < 1e-4


def test_val_loss_of_a_split_with_a_single_labelled_pixel_is_that_pixels_cost():
    """The mean is over labelled pixels even when there is one: -log p of that pixel (p = 3/4 from
    logits 0, log 3), the ignored pixel and an all-ignored image adding nothing."""
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros_like(x[:, 0]), math.log(3) * torch.ones_like(x[:, 0])], 1)

    items = [{"image": torch.zeros(3, 1, 2), "mask": torch.tensor([[1, IGNORE_INDEX]]), "name": "a"},
             {"image": torch.zeros(3, 1, 2), "mask": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX]]), "name": "b"}]
    got = validate_semantic(Fixed(), DataLoader(items, batch_size=1, collate_fn=eval_collate), 2,
                            torch.device("cpu"), show=False)
    assert got["num_images"] == 2
    assert abs(got["loss"] - (-math.log(0.75))) < 1e-6



def test_validation_with_rand_foreground_scores_the_isbi_errors_of_the_foreground_probability():
    """One row, target [1, 1, 0, 1], foreground probability [0.9, 0.4, 0.2, 0.8] (logits 0 and
    log(p / (1 - p))). By hand: the argmax [1, 0, 0, 1] misses one pixel of four (pixel_error 0.25)
    and cuts the first cell (rand_error > 0); thresholding the probability at 0.3 gives the target
    exactly (pixel_error_best and rand_error_best 0)."""
    p = torch.tensor([0.9, 0.4, 0.2, 0.8])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            fg = torch.log(p / (1 - p)).expand(x.shape[0], 1, 4)
            return torch.stack([torch.zeros_like(fg), fg], 1)

    items = [{"image": torch.zeros(3, 1, 4), "mask": torch.tensor([[1, 1, 0, 1]]), "name": "a"}]
    got = validate_semantic(Fixed(), DataLoader(items, batch_size=1, collate_fn=eval_collate), 2,
                            torch.device("cpu"), show=False, rand_foreground=1)
    assert got["pixel_error"] == pytest.approx(0.25)
    assert got["pixel_error_best"] == pytest.approx(0.0, abs=1e-12)
    assert got["rand_error"] > 0.05
    assert got["rand_error_best"] == pytest.approx(0.0, abs=1e-12)

# --- early stopping (--patience) -------------------------------------------------------------------
def scripted_validation(monkeypatch, scores):
    """Validation that scores the k-th validated epoch ``scores[k]`` (mIoU), whatever the weights."""
    calls = []

    def evaluate(run):
        calls.append(1)
        return {"loss": 0.5, "mIoU": scores[len(calls) - 1], "pixel_acc": 0.5}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    return calls


def test_patience_ends_the_run_after_n_epochs_without_a_better_score(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.5, 0.6])
    said: list[str] = []
    s = fit(tiny(tmp_path, epochs=6, patience=2), log=said.append)
    # best at epoch 2; epochs 3 and 4 are no better: the run ends after epoch 4
    assert s["epochs_completed"] == 4 and s["best_epoch"] == 2 and s["stopped_early"]
    assert any(line.startswith("early stop: no better mIoU in the last 2 epochs") and "epoch 2" in line
               for line in said)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [r["mIoU"] for r in rows] == ["0.1", "0.3", "0.2", "0.25"]
    assert read_checkpoint(tmp_path / "best.safetensors")[1]["training"]["epoch"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["stopped_early"] is True


def test_patience_is_counted_in_epochs_and_checked_only_after_validated_ones(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.3, 0.2, 0.4])  # validations after epochs 2, 4, 6
    s = fit(tiny(tmp_path, epochs=6, patience=1, val_every=2), log=quiet)
    # epoch 3 is past the patience since the best (epoch 2) but was not validated: the run goes on to 4
    assert s["epochs_completed"] == 4 and s["best_epoch"] == 2 and s["stopped_early"]


def test_a_run_that_improves_or_ends_its_epochs_is_not_stopped_early(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.1, 0.2, 0.3, 0.3])  # an equal score is no better
    s = fit(tiny(tmp_path / "a", epochs=4, patience=1), log=quiet)
    assert s["epochs_completed"] == 4 and s["best_epoch"] == 3 and not s["stopped_early"]
    scripted_validation(monkeypatch, [0.1, 0.2, 0.1])
    s = fit(tiny(tmp_path / "b", epochs=3), log=quiet)  # no patience: off
    assert s["epochs_completed"] == 3 and not s["stopped_early"]


def test_an_early_stopped_run_resumes_to_nothing_or_with_more_patience_trains_on(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.5, 0.6])
    fit(tiny(tmp_path, epochs=6, patience=2), log=quiet)
    said: list[str] = []
    again = fit(tiny(tmp_path, epochs=6, patience=2, resume=True), log=said.append)
    assert again["epochs_completed"] == 4 and again["stopped_early"]
    assert any("nothing to train: the run stopped early" in line and "--patience" in line for line in said)
    scripted_validation(monkeypatch, [0.5, 0.6])  # epochs 5 and 6
    said.clear()
    more = fit(tiny(tmp_path, epochs=6, patience=5, resume=True), log=said.append)
    assert more["epochs_completed"] == 6 and more["best_epoch"] == 6 and not more["stopped_early"]
    assert any("patience 2 -> 5" in line for line in said)  # a changed setting is said, as others are


def test_an_interrupted_run_with_patience_stops_where_the_uninterrupted_one_did(tmp_path, monkeypatch):
    scores = [0.1, 0.3, 0.2, 0.25, 0.5]
    scripted_validation(monkeypatch, scores)
    fit(tiny(tmp_path / "a", epochs=5, patience=2), log=quiet)
    scripted_validation(monkeypatch, scores)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path / "b", epochs=5, patience=2), log=quiet,
            callbacks=[interrupt_at("epoch", lambda s: s.epoch == 3)])
    scripted_validation(monkeypatch, scores[3:])
    s = fit(tiny(tmp_path / "b", epochs=5, patience=2, resume=True), log=quiet)
    assert s["epochs_completed"] == 4 and s["stopped_early"]
    weights_equal(tmp_path / "a", tmp_path / "b")


def test_patience_ends_a_stage_and_the_next_stage_gets_its_own_epochs(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.4, 0.3, 0.45, 0.6, 0.1])
    staged = [{"name": "a", "epochs": 3}, {"name": "b", "epochs": 3, "patience": 3}]
    said: list[str] = []
    s = fit(tiny(tmp_path, epochs=6, stages=staged, patience=1, schedule="constant"), log=said.append)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    # stage a (patience 1) ends after its 2nd epoch; stage b (patience 3) beats the best at its 3rd
    assert [(r["stage"], r["mIoU"]) for r in rows] == [("a", "0.5"), ("a", "0.4"), ("b", "0.3"), ("b", "0.45"),
                                                        ("b", "0.6")]
    assert any("1 epochs of stage a left untrained" in line for line in said)
    assert s["best_epoch"] == 5 and not s["stopped_early"]  # the last stage ran all its epochs


def test_patience_must_be_a_whole_number_of_at_least_one():
    for bad in (0, -1, 1.5, "x"):
        with pytest.raises(UserError, match="patience"):
            tiny(None, patience=bad)
    assert tiny(None, patience="none").patience is None


def test_sample_seeding_uses_both_words_of_a_seed_beyond_32_bits():
    """epoch_seed(seed, epoch) passes 2**32 from --seed 42950 on (--seed goes to 2**32 - 1): each
    sample's numpy seed is the epoch seed's low and high 32-bit words, then its index."""
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return np.random.rand()

    big = trainer.epoch_seed(50000, 1)
    assert big >= 2**32
    for s in (7, big, big + 2**32):
        expected = []
        for i in range(3):
            np.random.seed([s % 2**32, s // 2**32 % 2**32, i])
            expected.append(np.random.rand())
        assert [trainer.SampleSeeded(Draws(), s)[i] for i in range(3)] == expected
    # the high word counts: seeds 2**32 apart draw otherwise
    assert trainer.SampleSeeded(Draws(), big)[0] != trainer.SampleSeeded(Draws(), big + 2**32)[0]


def test_channels_last_puts_the_models_weights_in_nhwc(tmp_path):
    """channels_last converts the model itself, not only its input batches (to_device)."""
    run = trainer.setup_run(tiny(tmp_path, channels_last=True), trainer.dist.env_info(), torch.device("cpu"), quiet)
    convs = [m.weight for m in run.module.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # NHWC, not NCHW


def test_tensorboard_logger_writes_the_running_loss_lr_and_each_numeric_metric_of_the_epoch():
    class Writer:
        def __init__(self):
            self.scalars, self.flushed = [], 0

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            self.flushed += 1

    logger = trainer.TensorBoardLogger.__new__(trainer.TensorBoardLogger)  # without the optional package
    logger.writer = Writer()
    state = trainer.TrainState(step=5, loss_sum=3.0, images=12, lr=0.01)
    logger("step", state)
    assert logger.writer.scalars == [("train/loss_running", 0.25, 5), ("train/lr", 0.01, 5)]
    logger.writer.scalars.clear()
    state.rows = [{"epoch": 1, "mIoU": 0.1},
                  {"epoch": 2, "stage": "b", "train_loss": 0.5, "mIoU": 0.3, "img_per_s": None}]
    logger("epoch", state)
    assert logger.writer.scalars == [("epoch/train_loss", 0.5, 2), ("epoch/mIoU", 0.3, 2)]
    assert logger.writer.flushed == 1


def test_a_fresh_train_state_has_finished_nothing():
    """The counters count what is finished: a new run's state holds zeros, no best and no rows (a
    state of an older version that lacks a counter reads it as this)."""
    values = trainer.TrainState().to_json()
    counters = ("epoch", "step", "stage", "stage_epoch", "stage_step", "stage_start_s", "stage_epoch_steps", "batch",
                "loss_sum", "images", "lr", "elapsed_s")
    assert {k: values[k] for k in counters} == dict.fromkeys(counters, 0)
    assert values["processes"] == 1 and values["best_epoch"] is None and values["rows"] == []
    assert trainer.TrainState.from_json({"epoch": 2}).loss_sum == 0.0


def test_instance_validation_of_an_empty_loader_has_loss_zero_not_a_division_by_zero():
    """No batches (an empty split or shard): no images, loss 0 (divided by at least one), and
    every AP undefined."""

    class Unused(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("no batch, no call")

    class Empty:
        num_classes = 3

    got = validate_instances(Unused(), [], Empty(), torch.device("cpu"), show=False)
    assert got["loss"] == 0.0 and got["num_images"] == 0
    assert math.isnan(got["mask_AP"]) and math.isnan(got["box_AP"])


def test_semantic_validation_feeds_the_model_channels_last_when_asked():
    """--channels-last reaches validation too: the model sees a channels-last image (to_device), and the
    scores are those of the plain layout."""
    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return torch.stack([torch.zeros_like(x[:, 0]), x[:, 0]], 1)

    items = [{"image": torch.rand(3, 2, 3), "mask": torch.ones(2, 3, dtype=torch.long), "name": "a"}]
    loader = DataLoader(items, batch_size=1, collate_fn=eval_collate)
    model, plain_model = Record(), Record()
    got = validate_semantic(model, loader, 2, torch.device("cpu"), show=False, channels_last=True)
    plain = validate_semantic(plain_model, loader, 2, torch.device("cpu"), show=False)
    assert model.seen == [True] and plain_model.seen == [False] and got["loss"] == pytest.approx(plain["loss"])
