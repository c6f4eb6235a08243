"""Bad configs, seeds, ``shapes`` options, class weights and weight-map classes: one line
``pixelwise: error: ...``, exit status 2, and nothing written into ``--out`` (probe_train.md
sections 1-5, 13, 14; probe_pred.md section 7)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise import create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.data import build_dataset
from pixelwise.engine.config import (
    LOWER_IS_BETTER,
    MAX_SEED,
    STAGE_KEYS,
    TrainConfig,
    flag_values,
    load_yaml_config,
    parse_json_dict,
)
from pixelwise.engine.trainer import check_used, epoch_seed, seed_everything
from pixelwise.errors import UserError, expanded_home, finite_number, listed, not_a_file

TINY = ["--model-kwargs", '{"base_channels": 4}', "--dataset-kwargs", '{"num_train": 8, "num_val": 4, "size": 32}',
        "--epochs", "1", "--batch-size", "4", "--no-progress"]


def train_refused(tmp_path: Path, capsys, args: list[str], message: str) -> str:
    """``pixelwise train TINY args --out tmp/out`` exits 2 with one line holding ``message``, writing
    nothing; -> the line."""
    out = tmp_path / "out"
    assert main(["train", *TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and "\n" not in err, err
    assert message in err, err
    assert not out.exists()
    return err


# --- config files -------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "key"), [("epochs: 1\non: true\n", "True"), ("1: 2\n", "1"), ("null: 3\n", "None")])
def test_yaml_key_that_is_not_text(tmp_path, capsys, text, key):
    config = tmp_path / "k.yaml"
    config.write_text(text)
    train_refused(tmp_path, capsys, ["--config", str(config)], f"k.yaml: config key {key} is not a name")


@pytest.mark.parametrize(("text", "message"), [
    ("dataset_kwargs: {1: 2}\n", "k.yaml: dataset_kwargs: key 1 is not a name"),
    ("model_kwargs: {on: 4}\n", "k.yaml: model_kwargs: key True is not a name"),
    ("stages: [{epochs: 1, 1: 2, null: 3}]\n", "stage 1: key 1 cannot change per stage"),
])
def test_yaml_nested_key_that_is_not_text(tmp_path, capsys, text, message):
    config = tmp_path / "k.yaml"
    config.write_text(text)
    train_refused(tmp_path, capsys, ["--config", str(config)], message)


def test_config_not_utf8(tmp_path, capsys):
    config = tmp_path / "u16.yaml"
    config.write_bytes("epochs: 1\n".encode("utf-16"))
    train_refused(tmp_path, capsys, ["--config", str(config)], "u16.yaml is not UTF-8 text; save it as UTF-8")


def test_config_with_bom_is_read(tmp_path):
    config = tmp_path / "bom.yaml"
    config.write_bytes("epochs: 3\n".encode("utf-8-sig"))
    assert load_yaml_config(config) == {"epochs": 3}


# --- seed ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["99999999999999999999", "200000000000000", "-1", str(MAX_SEED + 1)])
def test_seed_out_of_range(tmp_path, capsys, seed):
    train_refused(tmp_path, capsys, ["--seed", seed], f"--seed must be an integer >= 0 and <= {MAX_SEED}, got {seed}")


def test_largest_seed_never_overflows():
    assert TrainConfig(seed=MAX_SEED).seed == MAX_SEED
    with pytest.raises(UserError, match="seed must be an integer"):
        TrainConfig(seed=MAX_SEED + 1)
    for epoch in (0, 1, 10**6):
        for rank in (0, 1, 255):
            s = epoch_seed(MAX_SEED, epoch, rank)
            assert s < 2**63
            torch.Generator().manual_seed(s)
            seed_everything(s)


# --- shapes options -----------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ('{"num_train": "8"}', "shapes num_train must be a whole number >= 0, got '8'"),
    ('{"num_train": -3}', "shapes num_train must be a whole number >= 0, got -3"),
    ('{"num_train": 2.5}', "shapes num_train must be a whole number >= 0, got 2.5"),
    ('{"num_train": null}', "shapes num_train must be a whole number >= 0, got None"),
    ('{"num_val": true}', "shapes num_val must be a whole number >= 0, got True"),
    ('{"size": 10}', "--dataset-kwargs: shapes size must be a whole number >= 16, got 10"),
    ('{"size": 32.5}', "shapes size must be a whole number >= 16, got 32.5"),
    ('{"max_objects": -1}', "shapes max_objects must be a whole number >= 1, got -1"),
    ('{"max_objects": 0}', "shapes max_objects must be a whole number >= 1, got 0"),
    ('{"noise": -1}', "shapes noise must be a number >= 0, got -1"),
    ('{"noise": "lots"}', "shapes noise must be a number >= 0, got 'lots'"),
    ('{"seed": "x"}', "shapes seed must be a whole number >= 0, got 'x'"),
    ('{"seed": -1}', "shapes seed must be a whole number >= 0, got -1"),
    ('{"num_train": 0}', "shapes num_train is 0, so split 'train' has no images; give num_train >= 1"),
    ('{"num_val": 0}', "shapes num_val is 0, so split 'val' has no images; give num_val >= 1"),
    ('{"mean": "abc"}', "shapes mean must be three numbers"),
    ('{"std": [1, 0, 1]}', "shapes std must be three numbers"),
    ('{"transform": "x"}', "shapes transform must be a Python callable"),
])
def test_train_refuses_bad_shapes_option(tmp_path, capsys, kwargs, message):
    train_refused(tmp_path, capsys, ["--dataset-kwargs", kwargs], message)


@pytest.mark.parametrize("flag", ["--train-split", "--val-split"])
def test_train_refuses_unknown_shapes_split(tmp_path, capsys, flag):
    train_refused(tmp_path, capsys, [flag, "bogus"], "shapes has no split 'bogus'; choose one of: train, val, test")


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "bogus"], "shapes has no split 'bogus'"),
    (["--dataset-kwargs", '{"size": 8}'], "shapes size must be a whole number >= 16, got 8"),
    (["--dataset-kwargs", '{"num_train": -1}'], "shapes num_train must be a whole number >= 0, got -1"),
])
def test_data_inspect_refuses_bad_shapes(capsys, args, message):
    assert main(["data", "inspect", "--dataset", "shapes", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and "\n" not in err and message in err, err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny4.safetensors"
    kw = {"base_channels": 4}
    save_checkpoint(path, create_model("unet", num_classes=4, **kw), {"model": "unet", "num_classes": 4,
                                                                       "model_kwargs": kw})
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "bogus", "--dataset-kwargs", '{"num_val": 2, "size": 32}'], "shapes has no split 'bogus'"),
    (["--dataset-kwargs", '{"num_val": 0, "size": 32}'], "shapes num_val is 0, so split 'val' has no images"),
    (["--dataset-kwargs", '{"num_val": 2, "size": 32, "noise": "lots"}'], "shapes noise must be a number >= 0"),
])
def test_eval_refuses_bad_shapes(tmp_path, capsys, tiny_checkpoint, args, message):
    report = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--dataset", "shapes", "--no-progress",
                 "--json", str(report), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and "\n" not in err and message in err, err
    assert not report.exists()


def test_shapes_options_are_checked_where_the_reader_is_built():
    with pytest.raises(UserError, match="shapes num_test is 0"):
        build_dataset("shapes", None, "test", num_test=0)
    ds = build_dataset("shapes", None, "val", num_val=2, num_test=0, size=32.0)  # only the split's own count
    assert len(ds) == 2 and ds.size == 32 and isinstance(ds.size, int)


# --- class weights and the weight map's class ---------------------------------------------------
def test_all_zero_class_weights(tmp_path, capsys):
    weights = tmp_path / "cw0.json"
    weights.write_text(json.dumps([0, 0, 0, 0]))
    train_refused(tmp_path, capsys, ["--class-weights", str(weights)],
                  "cw0.json: the class weights are all 0; at least one must be > 0")


@pytest.mark.parametrize("cls", ["4", "99"])
def test_weight_map_class_beyond_the_classes(tmp_path, capsys, cls):
    train_refused(tmp_path, capsys, ["--weight-map", "unet", "--weight-map-class", cls],
                  f"--weight-map-class {cls}: the data has classes 0..3")


def _folder(root: Path, names: list[str] | None) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"i{i}.png")
        Image.fromarray(rng.integers(0, 3, (16, 16), dtype=np.uint8)).save(root / "masks" / f"i{i}.png")
    if names is not None:
        (root / "classes.json").write_text(json.dumps({"names": names}))
    return root


def test_semantic_eval_refuses_data_whose_classes_have_other_names(tmp_path, capsys):
    """A model of classes a, b, c scored on data of c, b, a reported the model's 'a' as 'c'; instance
    eval already refused such a pairing. Generic names (a folder without classes.json) still pair."""
    ckpt = tmp_path / "abc.safetensors"
    kw = {"base_channels": 4}
    save_checkpoint(ckpt, create_model("unet", num_classes=3, **kw),
                    {"model": "unet", "num_classes": 3, "model_kwargs": kw, "class_names": ["a", "b", "c"]})
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "folder", "--split", "all", "--no-progress", "--data"]
    assert main([*args, str(_folder(tmp_path / "cba", ["c", "b", "a"]))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: the checkpoint's classes are a, b, c but the data's are c, b, a "
                          "(the first that differs: class 0)") and "\n" not in err, err
    assert main([*args, str(_folder(tmp_path / "abc", ["a", "b", "c"]))]) == 0
    assert main([*args, str(_folder(tmp_path / "plain", None))]) == 0  # class_0, class_1, class_2


@pytest.mark.parametrize(("change", "message"), [
    ({"loss": "dice"}, "loss 'dice' applies to semantic models"),
    ({"weight_map": "unet"}, "weight_map 'unet' applies to semantic models"),
    ({"aux_weight": 0.7}, "aux_weight 0.7 applies to semantic models"),
    ({"class_weight_power": 0.5}, "class_weight_power 0.5 applies to semantic models"),
    ({"class_weights": "median-freq"}, "class_weights 'median-freq' applies to semantic models"),
    ({"classmix": 0.5}, "classmix 0.5 applies to semantic models"),
    ({"stages": [{"epochs": 1}, {"epochs": 1, "loss": "focal"}]}, "loss 'focal' applies to semantic models"),
    ({"augment": {"resize": [64, 64]}}, "Mask R-CNN resizes each image itself"),
])
def test_instance_runs_refuse_the_semantic_loss_settings(change, message):
    """--loss dice, --weight-map unet, --aux-weight were taken for Mask R-CNN and recorded in
    config.yaml as if they had acted; its loss is its own."""
    from pixelwise.engine.trainer import check_settings

    assert check_settings(TrainConfig(model="maskrcnn_resnet18_fpn")) == "instance"
    with pytest.raises(UserError, match=message):
        check_settings(TrainConfig(model="maskrcnn_resnet18_fpn", **change))
    with_weights = {"class_weights": "median-freq"} if "class_weight_power" in change else {}  # what it acts on
    check_settings(TrainConfig(model="unet", **change, **with_weights))  # all of them act for a semantic model


@pytest.mark.parametrize("args, words", [
    (["--augment", '{"resize": 100000}'], "augment key 'resize': 100000x100000 is 10,000,000,000 pixels"),
    (["--augment", '{"crop": [100000, 100000]}'], "augment key 'crop': 100000x100000 is 10,000,000,000 pixels"),
    (["--crop", "100000000000000000000x8"], "--crop '100000000000000000000x8' is 800,000,000,000,000,000,000 pixels"),
    (["--batch-size", "100000000000000000000"], "--batch-size must be an integer >= 1 and <= 1000000"),
    (["--augment", '{"crop": 1, "crop": 2}'], "--augment: key 'crop' is given twice"),
    (["--model-kwargs", '{"base_channels": 4, "base_channels": 8}'], "--model-kwargs: key 'base_channels' is given"),
])
def test_sizes_past_memory_and_keys_given_twice_are_refused_before_anything_is_written(tmp_path, capsys, args, words):
    """These sizes reached OpenCV (an out-of-memory cv2.error, or a C long overflow) or islice: a
    traceback after config.yaml was written; a key given twice took the last (YAML refuses it)."""
    train_refused(tmp_path, capsys, args, words)


def test_opencv_out_of_memory_is_the_one_line_out_of_memory_error(tmp_path, capsys, monkeypatch):
    import cv2

    import pixelwise.preprocess as preprocess

    def fail(*args, **kwargs):
        raise cv2.error("OpenCV(5.1.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 30000000000 "
                        "bytes in function 'OutOfMemoryError'")

    monkeypatch.setattr(preprocess.cv2, "resize", fail)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    model = create_model("unet", num_classes=2, base_channels=4)
    save_checkpoint(tmp_path / "m.safetensors", model, {"model": "unet", "num_classes": 2,
                                                        "model_kwargs": {"base_channels": 4}})
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), str(image), "--out", str(tmp_path / "o"),
                 "--resize", "16x16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: out of memory in main memory") and len(err.splitlines()) == 1, err


def test_class_weight_power_without_class_weights_is_refused():
    from pixelwise.engine.trainer import check_used

    with pytest.raises(UserError, match="class_weight_power 0.5 acts only with class_weights"):
        check_used(TrainConfig(class_weights="none", class_weight_power=0.5))
    with pytest.raises(UserError, match="class_weights is empty; give a path"):  # as --class-weights "" is
        TrainConfig(class_weights="", class_weight_power=0.5)
    check_used(TrainConfig(class_weights="median-freq", class_weight_power=0.5))


def test_milestones_none_clears_a_recipes_list(tmp_path):
    """--help shows --milestones' default as none, and the word was refused: a YAML with a step
    schedule could not be switched to another schedule from the command line."""
    from pixelwise.engine.config import build_config, flag_values

    (tmp_path / "step.yaml").write_text("schedule: step\nmilestones: [1, 2]\n", encoding="utf-8")
    flags = flag_values({"schedule": "poly", "milestones": "none"})
    cfg = build_config(load_yaml_config(tmp_path / "step.yaml"), flags)
    assert cfg.milestones == [] and cfg.schedule == "poly"
    assert flag_values({"milestones": "30, 60"})["milestones"] == [30, 60]


def test_a_top_level_crop_takes_the_list_form_of_augments_crop(tmp_path):
    """crop: [20, 24] was refused ("crop must be text") while augment: {crop: [20, 24]}, the form of
    every recipe, was taken."""
    (tmp_path / "c.yaml").write_text("crop: [20, 24]\n", encoding="utf-8")
    assert load_yaml_config(tmp_path / "c.yaml")["crop"] == "20x24"
    (tmp_path / "bad.yaml").write_text("crop: [20, true]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"crop must be HxW, one side N or \[h, w\] \(whole numbers\)"):
        load_yaml_config(tmp_path / "bad.yaml")


def test_augments_crop_takes_the_text_form_of_crop_and_a_null_choice_names_the_choices(tmp_path):
    """augment: {crop: 20x24} was refused as not two numbers (the form --crop and crop take), and
    weight_map: null said only "needs a value"."""
    from pixelwise.data.augment import _pair

    assert _pair({"crop": "20x24"}, "crop", int) == _pair({"crop": [20, 24]}, "crop", int) == (20, 24)
    with pytest.raises(UserError, match="expected two numbers like"):
        _pair({"scale": "1x2"}, "scale", float)  # only sizes are written HxW
    (tmp_path / "w.yaml").write_text("weight_map: null\n", encoding="utf-8")
    with pytest.raises(UserError, match="weight_map needs a value: one of none, unet"):
        load_yaml_config(tmp_path / "w.yaml")


# --- the documented defaults and ranges of the numbers --------------------------------------------
# docs/training.md, "Configuration reference", and the flags' help: written out here, not read back from the fields
DOCUMENTED_DEFAULTS = {
    "model": "unet", "dataset": "shapes", "train_split": "train", "val_split": "val", "skip_invalid": False,
    "max_pixels": None, "epochs": 10, "max_minutes": None, "batch_size": 8, "accumulate": 1, "optimizer": "adam",
    "lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "decay_norm_and_bias": False,
    "schedule": "poly", "poly_power": 0.9, "milestones": [], "gamma": 0.1, "step_size": 0, "warmup_epochs": 0.0,
    "warmup_iters": 0, "warmup_factor": 0.001, "clip_grad_norm": None, "ema": 0.0, "loss": "ce",
    "class_weights": "none", "class_weight_power": 1.0, "weight_map": "none", "weight_map_class": 1,
    "focal_gamma": 2.0, "aux_weight": 0.4, "crop": None, "augment": {}, "classmix": 0.0, "instance_crops": False,
    "instance_context": 1.2, "stages": [], "num_workers": 0, "device": "cpu", "amp": "auto", "channels_last": False,
    "sync_bn": False, "seed": 0, "resume": False, "overwrite": False, "select_by": "auto", "val_every": 1,
    "progress": None, "tensorboard": False,
}


def test_defaults_are_the_documented_ones():
    values = TrainConfig().to_dict()
    assert {k: values[k] for k in DOCUMENTED_DEFAULTS} == DOCUMENTED_DEFAULTS


@pytest.mark.parametrize(("key", "accepted", "refused"), [
    ("epochs", 1, 0), ("batch_size", 1_000_000, 1_000_001), ("batch_size", 1, 0), ("accumulate", 1, 0),
    ("accumulate", 1_000_000, 1_000_001), ("max_pixels", 1, 0), ("max_minutes", 1e-6, 0),
    ("lr", 1e-9, 0), ("momentum", 0, -0.1), ("momentum", 0.999, 1), ("weight_decay", 0, -1e-9),
    ("poly_power", 0, -0.1), ("gamma", 1e-9, 0), ("step_size", 0, -1), ("warmup_epochs", 0, -0.5),
    ("warmup_iters", 0, -1), ("warmup_factor", 1e-9, 0), ("ema", 0, -0.1), ("ema", 0.9999, 1),
    ("clip_grad_norm", 1e-9, 0), ("class_weight_power", 0, -0.5), ("focal_gamma", 0, -0.5), ("aux_weight", 0, -0.1),
    ("weight_map_class", 0, -1), ("classmix", 0, -0.01), ("classmix", 1, 1.01), ("instance_context", 1e-9, 0),
    ("num_workers", 0, -1), ("num_workers", 256, 257), ("val_every", 1, 0),
])
def test_number_ranges_are_the_documented_ones(key, accepted, refused):
    """lr > 0, 0 <= momentum < 1, focal_gamma 0 (= cross-entropy) allowed, 0 <= classmix <= 1, ...: the
    boundary value inside the range is taken, the nearest one outside it refused in one line."""
    assert getattr(TrainConfig(**{key: accepted}), key) == accepted
    with pytest.raises(UserError, match=rf"^{key} must be (an integer|a number) .*, got {refused}$"):
        TrainConfig(**{key: refused})


# docs/training.md, "Stages": what a stage may override
DOCUMENTED_STAGE_KEYS = {"name", "epochs", "lr", "batch_size", "crop", "augment", "classmix", "instance_crops",
                         "instance_context", "schedule", "step_size", "warmup_epochs", "warmup_iters", "loss",
                         "aux_weight", "accumulate", "clip_grad_norm", "patience"}


def test_the_stage_keys_are_the_documented_ones():
    assert set(STAGE_KEYS) == DOCUMENTED_STAGE_KEYS


@pytest.mark.parametrize("key", ["optimizer", "momentum", "model", "seed", "device", "ema"])
def test_a_stage_cannot_change_a_key_of_the_whole_run(key):
    """Only the keys documented as stage keys may change per stage (docs/training.md: epochs, lr, schedule,
    ...); the optimizer, the model, the seed are the run's."""
    value = TrainConfig().to_dict()[key]
    with pytest.raises(UserError, match=f"stage 1: key '{key}' cannot change per stage"):
        TrainConfig(stages=[{"epochs": 1, key: value}])


def test_a_flag_that_is_not_a_number_says_which_kind_of_number():
    with pytest.raises(UserError, match=r"^--epochs must be an integer, got 'ten'$"):
        flag_values({"epochs": "ten"})
    with pytest.raises(UserError, match=r"^--lr must be a number, got 'fast'$"):
        flag_values({"lr": "fast"})
    with pytest.raises(UserError, match=r"^--milestones must be comma-separated numbers like 30,60, got '1,x'$"):
        flag_values({"milestones": "1,x"})


@pytest.mark.parametrize("metric", ["pixel_error", "pixel_error_best", "rand_error", "rand_error_best"])
def test_the_isbi_errors_can_pick_the_best_epoch_and_the_lowest_wins(metric):
    """docs/training.md, select_by: the ISBI errors, lowest wins; the other metrics, highest."""
    assert TrainConfig(select_by=metric).select_by == metric
    assert metric in LOWER_IS_BETTER and "mIoU" not in LOWER_IS_BETTER and "mask_AP" not in LOWER_IS_BETTER


@pytest.mark.parametrize("text", ["", "  "])
def test_an_empty_json_option_of_eval_or_data_inspect_says_it_is_empty(text):
    """`pixelwise eval/data inspect --dataset-kwargs "$UNSET"` reach parse_json_dict without flag_value's check."""
    message = "--dataset-kwargs is empty; give a JSON object such as '{\"num_train\": 200}'"
    with pytest.raises(UserError, match="^" + re.escape(message)):
        parse_json_dict(text, "--dataset-kwargs")


# --- numbers beyond a float's range, JSON nested past Python's recursion limit -------------------
HUGE = str(10**400)  # an int Python holds, but math.isfinite() raises OverflowError on


@pytest.mark.parametrize(("write", "args", "message"), [
    (None, ["--epochs", HUGE], "--epochs must be an integer >= 1, got 1000"),
    (None, ["--batch-size", HUGE], "(401 characters), too large a number"),
    (None, ["--lr", HUGE], "--lr must be"),
    ("epochs: " + HUGE + "\n", ["--config", "{file}"], "h.yaml: epochs must be an integer >= 1"),
    ("milestones: [" + HUGE + "]\n", ["--config", "{file}"], "h.yaml: milestones must be a list of epochs"),
    (None, ["--dataset-kwargs", '{"mean": [' + HUGE + ', 0, 0]}'], "--dataset-kwargs: shapes mean must be"),
    (None, ["--model-kwargs", '{"dropout": ' + HUGE + "}"], "--model-kwargs: unet: dropout must be"),
])
def test_a_number_beyond_a_floats_range_is_refused_not_an_overflow_traceback(tmp_path, capsys, write, args, message):
    if write is not None:
        (tmp_path / "h.yaml").write_text(write)
        args = [a.replace("{file}", str(tmp_path / "h.yaml")) for a in args]
    err = train_refused(tmp_path, capsys, args, message)
    assert len(err) < 300 and "401 characters" in err or HUGE not in err, err  # named, not printed in full


def test_brief_leaves_out_the_middle_of_a_long_value_only():
    from pixelwise.errors import brief

    assert brief("a" * 58) == repr("a" * 58) and brief(1.5) == "1.5"  # 60 characters or fewer: as repr gives it
    text = brief(10**400)
    assert text == "1" + "0" * 29 + "..." + "0" * 15 + " (401 characters)"


def test_listed_gives_the_first_k_values_then_an_ellipsis_only_when_some_are_left_out():
    assert listed(range(6)) == "0, 1, 2, 3, 4, 5"  # six, the default k: all of them
    assert listed(range(7)) == "0, 1, 2, 3, 4, 5, ..."
    assert listed("abc", k=2) == "a, b, ..." and listed([], k=0) == "" and listed([1], k=0) == ", ..."


def test_finite_number_takes_finite_ints_and_floats_but_not_bools_strings_or_huge_ints():
    assert finite_number(1) and finite_number(-2.5) and finite_number(0)
    assert not any(finite_number(v) for v in (True, False, "1", None, math.inf, math.nan, 10**400))


def test_not_a_file_says_what_the_path_is_and_what_to_give(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    assert not_a_file(tmp_path / "f.txt") is None
    assert not_a_file(tmp_path / "missing.txt") == "file not found"
    assert not_a_file(tmp_path) == "not a regular file (a folder, pipe or device)"  # no "; give" without wanted
    assert not_a_file(tmp_path, "an image") == "not a regular file (a folder, pipe or device); give an image"
    assert not_a_file(tmp_path / "broken") == (f"broken symbolic link (it points to {tmp_path / 'nowhere'}, which does "
                                               "not exist); fix the link or remove it")


def test_expanded_home_expands_a_tilde_and_names_the_user_it_cannot_expand(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expanded_home("~/data", "--out") == f"{tmp_path}/data" and expanded_home("a/~b", "--out") == "a/~b"
    for given in ("~pixelwise-no-such-user-27/data/x", "~pixelwise-no-such-user-27"):
        with pytest.raises(UserError, match=r"^--out: cannot expand ~pixelwise-no-such-user-27 \(no such user"):
            expanded_home(given, "--out")


def test_class_weights_beyond_a_floats_range_are_refused(tmp_path, capsys):
    (tmp_path / "w.json").write_text(f"[1, {HUGE}, 1, 1]")
    train_refused(tmp_path, capsys, ["--class-weights", str(tmp_path / "w.json")], "expected 4 non-negative numbers")


def test_json_nested_past_the_recursion_limit_is_refused(tmp_path, capsys):
    nested = "[" * 5000 + "]" * 5000
    (tmp_path / "w.json").write_text(nested)
    train_refused(tmp_path, capsys, ["--class-weights", str(tmp_path / "w.json")], "cannot read class weights")
    train_refused(tmp_path, capsys, ["--dataset-kwargs", nested], "--dataset-kwargs must be a JSON object")


def test_a_model_too_wide_for_the_free_memory_is_refused_before_it_is_built(monkeypatch, tmp_path):
    """base_channels 512 (2.0G parameters, 30 GiB to train with Adam) filled the memory until the
    kernel killed the process. The need is counted on the meta device: 16 bytes a parameter."""
    import pixelwise.engine.trainer as trainer
    from pixelwise.models.registry import check_model_kwargs
    from pixelwise.runtime import available_memory

    if Path("/proc/meminfo").is_file():
        assert available_memory() > 0
    params = check_model_kwargs("unet", {"base_channels": 8})
    assert params == sum(p.numel() for p in create_model("unet", 2, base_channels=8).parameters())
    cfg = TrainConfig(model="unet", dataset="shapes", model_kwargs={"base_channels": 8}, out=str(tmp_path / "run"))
    monkeypatch.setattr(trainer, "available_memory", lambda: 16 * params)  # just enough
    trainer.check_settings(cfg, torch.device("cpu"))
    monkeypatch.setattr(trainer, "available_memory", lambda: 16 * params - 1)
    with pytest.raises(UserError, match=re.escape(f"has {params / 1e6:,.1f}M parameters, which need")):
        trainer.check_settings(cfg, torch.device("cpu"))
    trainer.check_settings(cfg, torch.device("meta"))  # on an accelerator the host holds the weights once
    monkeypatch.setattr(trainer, "available_memory", lambda: None)  # not Linux: nothing to compare with
    trainer.check_settings(cfg, torch.device("cpu"))
    monkeypatch.setattr(trainer, "available_memory", lambda: 1)
    assert main(["train", "--model", "unet", "--dataset", "shapes", "--out", str(tmp_path / "run"),
                 "--model-kwargs", '{"base_channels": 8}']) == 2
    assert not (tmp_path / "run").exists()


def test_stages_has_no_flag_it_is_a_key_of_the_yaml_only(tmp_path, capsys):
    assert main(["train", "--stages", "[]", "--out", str(tmp_path / "out")]) == 2
    assert "unrecognized argument '--stages'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, value", [("model", ["unet"]), ("dataset", {"kind": "shapes"}),
                                         ("train_split", ("train",))])
def test_a_text_field_given_a_list_or_mapping_is_refused(name, value):
    with pytest.raises(UserError, match=f"^{name} must be text, got "):
        TrainConfig(**{name: value})


# --- mutation-testing gaps (engine/config.py): a choice and a JSON value that is no object -------
def test_a_schedule_outside_its_choices_is_refused_naming_them():
    """TrainConfig.validate checks schedule's choices (without them 'bogus' was accepted)."""
    with pytest.raises(UserError, match="^schedule 'bogus' is not one of: poly, cosine, step, constant$"):
        TrainConfig(schedule="bogus").validate()


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ("3", "int"), ('"a"', "str"), ("null", "NoneType")])
def test_a_json_option_that_is_valid_json_but_no_object_is_refused(text, kind):
    """parse_json_dict refuses JSON that parses but is not an object (it was returned as it was)."""
    with pytest.raises(UserError, match=f"^--model-kwargs must be a JSON object, got {kind}$"):
        parse_json_dict(text, "--model-kwargs")


@pytest.mark.parametrize("warmup", [{"warmup_iters": 5}, {"warmup_epochs": 1.0}])
def test_warmup_factor_is_used_with_either_warmup_epochs_or_warmup_iters(warmup):
    """check_used accepts warmup_factor with one of the two warm-up lengths (not only with both),
    and refuses it with neither."""
    check_used(TrainConfig(warmup_factor=0.1, **warmup))
    with pytest.raises(UserError, match="^warmup_factor 0.1 acts only with warmup_epochs or warmup_iters"):
        check_used(TrainConfig(warmup_factor=0.1))
