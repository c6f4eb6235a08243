"""YAML recipes, stages and precedence (probe6_config.md items 3, 4, 6-8, 10-15): flags against a
recipe's stages, a stage's augment merging into the run's, ``~`` in paths, ``none`` clearing an
optional value, YAML 1.1 readings, duplicate keys, ``--config NAME`` beside ./NAME.yaml, and
one-line errors that name the file, the key and the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pixelwise.cli import main
from pixelwise.engine.config import (
    RECIPES_DIR,
    TrainConfig,
    build_config,
    check_flags_against_stages,
    find_recipe,
    flag_values,
    load_yaml_config,
)
from pixelwise.engine.trainer import train_transform
from pixelwise.errors import UserError
from pixelwise.sample import Sample

BASE = ("model: unet\nmodel_kwargs: {base_channels: 4}\ndataset: shapes\n"
        "dataset_kwargs: {num_train: 8, num_val: 4, size: 32}\nbatch_size: 4\naugment: {scale: null, jitter: false}\n")
STAGES = BASE + "schedule: constant\nstages:\n  - {name: a, epochs: 1, lr: 0.01}\n  - {name: b, epochs: 1, lr: 0.001}\n"


def write(tmp_path: Path, text: str, name: str = "k.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(tmp_path: Path, capsys, args: list[str]) -> str:
    """``pixelwise train args --out tmp/out`` exits 2 with one line, writing nothing -> the line.
    (A time budget of 3 s keeps a run that is wrongly accepted short.)"""
    out = tmp_path / "out"
    assert main(["train", "--max-minutes", "0.05", *args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and "\n" not in err, err
    assert not out.exists()
    return err


def resolve(path: Path | str, **flags: str) -> TrainConfig:
    """The config cmd_train builds from ``--config path`` and ``flags`` (field -> flag text)."""
    path = Path(path)
    return build_config(load_yaml_config(path), flag_values(flags), path.stem, source=path)


def crop_size(transform) -> tuple[int, int]:
    """The size a training transform crops a 40x40 sample to."""
    sample = Sample(image=np.zeros((40, 40, 3), np.uint8), mask=np.zeros((40, 40), np.uint8))
    return transform(sample).image.shape[:2]


# --- item 3: flags against the stages -------------------------------------------------------------
def test_flag_for_a_key_the_stages_set_is_refused(tmp_path, capsys):
    config = write(tmp_path, STAGES)
    err = refused(tmp_path, capsys, ["--config", str(config), "--lr", "0.5"])
    assert err == (f"pixelwise: error: --lr: this recipe's stages set lr (a: 0.01, b: 0.001); change them in the "
                   f"recipe ({config}), or give the stages in your own --config")


@pytest.mark.parametrize(("flags", "message"), [
    (["--augment", '{"jitter": true}'], "--augment jitter: this recipe's stages set augment jitter (instances: false, "
                                        "whole-images: false)"),
    (["--no-instance-crops"], "--instance-crops: this recipe's stages set instance_crops (instances: true, "
                              "whole-images: false)"),
    (["--step-size", "5"], "--step-size: this recipe's stages set step_size (instances: 9000, whole-images: 10000)"),
    (["--crop", "100"], "--crop: this recipe's stages set the crop (instances: augment crop [224, 224]"),
])
def test_flags_against_the_bundled_deconvnet_stages(tmp_path, capsys, flags, message):
    # --pretrained none: a run wrongly accepted fails at once instead of fetching weights
    assert message in refused(tmp_path, capsys, ["--config", "deconvnet_voc", "--pretrained", "none", *flags])


def test_flag_for_a_stage_key_no_stage_sets_reaches_every_stage(tmp_path):
    cfg = resolve(write(tmp_path, STAGES), accumulate="2", batch_size="2", augment='{"flip": false}')
    stages = [stage for _, stage in cfg.stage_configs()]
    assert [(s.lr, s.accumulate, s.batch_size) for s in stages] == [(0.01, 2, 2), (0.001, 2, 2)]
    assert all(s.augment == {"scale": None, "jitter": False, "flip": False} for s in stages)


def test_a_stages_own_crop_wins_over_the_runs_crop(tmp_path):
    config = write(tmp_path, "crop: 24x24\nstages:\n  - {epochs: 1}\n  - {epochs: 1, augment: {crop: [16, 16]}}\n")
    (_, first), (_, second) = resolve(config).stage_configs()
    assert crop_size(train_transform(first)) == (24, 24)
    assert crop_size(train_transform(second)) == (16, 16)


def test_augment_crop_flag_beats_the_recipes_crop(tmp_path):
    config = write(tmp_path, "crop: 32x32\naugment: {scale: null}\n")
    cfg = resolve(config, augment='{"crop": [16, 16]}')
    assert cfg.crop is None and cfg.augment == {"scale": None, "crop": [16, 16]}
    assert crop_size(train_transform(cfg)) == (16, 16)
    assert crop_size(train_transform(resolve(config))) == (32, 32)  # without the flag: the recipe's crop


@pytest.mark.parametrize("text", ["augment: {crop: [32, 32], flip: true}\n", "crop: 32x32\naugment: {flip: true}\n"])
def test_crop_none_clears_the_recipes_crop_however_it_is_set(tmp_path, text):
    """--crop none left a recipe's augment: {crop: ...} (camvid_cpu_hour's way) in place: training
    still cropped, while config.yaml recorded crop: null."""
    cfg = resolve(write(tmp_path, text), crop="none")
    assert cfg.crop is None and cfg.augment == {"flip": True}
    assert crop_size(train_transform(cfg)) == (40, 40)
    assert crop_size(train_transform(resolve(write(tmp_path, text)))) == (32, 32)


# --- item 4: a stage's augment merges into the run's ------------------------------------------------
def test_stage_augment_merges_into_the_runs(tmp_path):
    stages = "stages:\n  - {name: a, epochs: 1, augment: {flip: false}}\n  - {name: b, epochs: 1}\n"
    config = write(tmp_path, BASE + stages)
    (_, a), (_, b) = resolve(config).stage_configs()
    assert a.augment == {"scale": None, "jitter": False, "flip": False}
    assert b.augment == {"scale": None, "jitter": False}
    assert "ColorJitter" not in repr(train_transform(a)) and "HorizontalFlip" not in repr(train_transform(a))
    assert "HorizontalFlip" in repr(train_transform(b))


def test_bundled_staged_recipes_keep_their_transforms():
    # deconvnet_voc copies the whole augment into each stage: merging gives the same transforms
    # (object windows go to the 250x250 resize, then 224 crops: the paper's one resampling)
    cfg = build_config(load_yaml_config(find_recipe("deconvnet_voc")), {})
    built = [repr(train_transform(stage)) for _, stage in cfg.stage_configs()]
    assert built == [
        "Compose([InstanceCrop(size=(250, 250), context=1.2), Augment(['PadIfNeeded', 'RandomCrop', "
        "'HorizontalFlip'], ignore_index=255, resize=(250, 250), elastic=None)])",
        "Augment(['PadIfNeeded', 'RandomCrop', 'HorizontalFlip'], ignore_index=255, resize=(250, 250), elastic=None)"]


# --- item 6: ~ in paths ---------------------------------------------------------------------------
def test_tilde_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = write(tmp_path, "out: ~/run\ndata: ~/data\nclass_weights: ~/cw.json\npretrained: ~/w.safetensors\n")
    cfg = resolve(config)
    assert (cfg.out, cfg.data, cfg.class_weights, cfg.pretrained) == (
        f"{tmp_path}/run", f"{tmp_path}/data", f"{tmp_path}/cw.json", f"{tmp_path}/w.safetensors")
    flagged = build_config({}, flag_values({"out": "~/x", "class_weights": "~/c.txt", "pretrained": "~/p.pth"}))
    assert (flagged.out, flagged.class_weights, flagged.pretrained) == (
        f"{tmp_path}/x", f"{tmp_path}/c.txt", f"{tmp_path}/p.pth")
    tags = build_config({"pretrained": "imagenet", "class_weights": "median-freq"}, {})
    assert (tags.pretrained, tags.class_weights) == ("imagenet", "median-freq")


def test_tilde_out_in_yaml_trains_into_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path, "out: ~/run\nepochs: 1\n" + BASE)
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    assert (tmp_path / "home" / "run" / "best.safetensors").is_file()
    assert not (tmp_path / "~").exists()


# --- item 7: none clears an optional value --------------------------------------------------------
def test_none_clears_the_recipes_optional_values():
    recipe = {"max_minutes": 60.0, "pretrained": "imagenet", "clip_grad_norm": 1.0, "crop": "32x32"}
    cfg = build_config(recipe, flag_values({"max_minutes": "none", "pretrained": "None", "clip_grad_norm": "NONE",
                                            "crop": "none"}))
    assert (cfg.max_minutes, cfg.pretrained, cfg.clip_grad_norm, cfg.crop) == (None, None, None, None)
    kept = build_config(recipe, flag_values({"max_minutes": "5"}))
    assert (kept.max_minutes, kept.pretrained, kept.clip_grad_norm) == (5.0, "imagenet", 1.0)


@pytest.mark.parametrize(("flag", "message"), [
    ("--max-minutes", "--max-minutes must be a number or none, got 'x'"),
    ("--clip-grad-norm", "--clip-grad-norm must be a number or none, got 'x'"),
])
def test_optional_number_error_offers_none_not_python(tmp_path, capsys, flag, message):
    err = refused(tmp_path, capsys, [flag, "x"])
    assert message in err and "None" not in err


# --- item 8: nested YAML numbers, --dataset, messages naming the file ----------------------------
def test_exponent_numbers_inside_nested_options(tmp_path):
    config = write(tmp_path, "model_kwargs: {dropout: 1e-1}\naugment: {scale: [5e-1, 2], crop: 16}\n"
                             "schedule: step\nmilestones: [1e1, 2]\nlr: 1e-3\n")
    cfg = resolve(config)
    assert cfg.model_kwargs == {"dropout": 0.1} and cfg.augment["scale"] == [0.5, 2]
    assert cfg.milestones == [10.0, 2] and cfg.lr == 0.001


def test_other_dataset_drops_the_recipes_dataset_kwargs(tmp_path):
    recipe = {"dataset": "camvid", "dataset_kwargs": {"val_sequences": ["0006R0"]}}
    assert build_config(recipe, {"dataset": "shapes"}).dataset_kwargs == {}
    assert build_config(recipe, {"dataset": "camvid"}).dataset_kwargs == {"val_sequences": ["0006R0"]}
    # a file without model: its model_kwargs are the default model's
    assert build_config({"model_kwargs": {"base_channels": 4}}, {"model": "segnet_basic"}).model_kwargs == {}
    assert build_config({"model_kwargs": {"base_channels": 4}}, {"model": "unet"}).model_kwargs == {
        "base_channels": 4}


@pytest.mark.parametrize(("text", "flags", "message"), [
    ("model_kwargs: {base_channels: 4, bogus: 1}\n", [], "k.yaml: model_kwargs: unet has no option 'bogus'"),
    ("model_kwargs: {dropout: yes}\n", [], "k.yaml: model_kwargs: unet option 'dropout' must be a number"),
    ("model_kwargs: {base_channels: 4}\ndataset_kwargs: {bogus: 1}\n", [],
     "k.yaml: dataset_kwargs: shapes has no option 'bogus'"),
    ("model_kwargs: {base_channels: 4}\ndataset_kwargs: {bogus: 1}\n", ["--dataset-kwargs", '{"size": 32}'],
     "dataset_kwargs (of {config}, with --dataset-kwargs): shapes has no option 'bogus'"),
    ("model_kwargs: {base_channels: 4}\n", ["--dataset-kwargs", '{"bogus": 1}'],
     "error: --dataset-kwargs: shapes has no option 'bogus'"),
])
def test_option_errors_name_the_file(tmp_path, capsys, text, flags, message):
    config = write(tmp_path, text)
    err = refused(tmp_path, capsys, ["--config", str(config), *flags])
    assert message.format(config=config) in err


def test_camvid_recipe_with_shapes_drops_its_reader_options(tmp_path, capsys):
    err = refused(tmp_path, capsys, ["--config", "camvid_cpu_hour", "--dataset", "shapes", "--epochs", "0"])
    assert "--epochs must be an integer >= 1, got 0" in err  # not: shapes has no option 'val_sequences'
    cfg = build_config(load_yaml_config(find_recipe("camvid_cpu_hour")), flag_values({"dataset": "shapes"}))
    assert cfg.dataset_kwargs == {}


# --- items 10-12: YAML errors, booleans and numbers for text, duplicates ---------------------------
@pytest.mark.parametrize(("text", "message"), [
    ("lr:\t0.1\n", "k.yaml line 1 column 4: a tab cannot start a token (indent with spaces)"),
    ("augment: {scale: [0.5, 2.0}\n", "k.yaml line 1 column 27: expected ',' or ']', but got '}' (while parsing a "
                                      "flow sequence)"),
    ("lr: 0.1\n  epochs: 2: 3\n", "k.yaml line 2 column 9: mapping values are not allowed here"),
    ("amp: off\n", 'k.yaml: amp must be text, got false (YAML reads an unquoted off, no, on or yes as false or true); '
                   'quote it, e.g. amp: "off"'),
    ("out: 1.10\n", 'k.yaml: out must be text, got 1.1 (YAML reads it as a number); quote it'),
    ("out: 2026-12-06\n", 'k.yaml: out must be text, got 2026-12-06 (YAML reads it as a date); quote it, e.g. '
                          'out: "2026-12-06"'),
    ("lr: 0.1\nlr: 0.01\n", "k.yaml line 2 column 1: key 'lr' is given twice (also on line 1); keep one"),
    ("model_kwargs: {base_channels: 4, base_channels: 8}\n", "key 'base_channels' is given twice"),
    ("stages:\n  - {epochs: 1, lr: 0.1, lr: 0.2}\n", "k.yaml line 2 column 26: key 'lr' is given twice"),
    ("max-minutes: 1\nmax_minutes: 2\n", "k.yaml: key 'max_minutes' is given twice (max-minutes and max_minutes)"),
    ("epochs: 50\nstages: [{epochs: 1}, {epochs: 1}]\n", "k.yaml: epochs 50: the run's length is its stages' epochs "
                                                          "(1 + 1 = 2)"),
    ("stages: [{epochs: 1}, {epochs: 1, crop: 0x5}]\n", "k.yaml: stage 2 crop '0x5' must look like 256x320"),
])
def test_yaml_problems_are_one_line(tmp_path, capsys, text, message):
    config = write(tmp_path, text)
    assert message in refused(tmp_path, capsys, ["--config", str(config)])


def test_yaml_numbers_that_stay_text_and_merge_keys(tmp_path):
    assert load_yaml_config(write(tmp_path, "out: 010\nseed: 010\n")) == {"out": "010", "seed": 10}
    assert load_yaml_config(write(tmp_path, "out: 0x1F\ncrop: 256\n")) == {"out": "0x1F", "crop": "256"}
    assert load_yaml_config(write(tmp_path, 'amp: "off"\n')) == {"amp": "off"}
    text = "stages:\n  - &a {name: a, epochs: 1, lr: 0.01}\n  - {<<: *a, name: b}\n"
    merged = load_yaml_config(write(tmp_path, text))
    assert merged["stages"] == [{"name": "a", "epochs": 1, "lr": 0.01}, {"name": "b", "epochs": 1, "lr": 0.01}]
    assert load_yaml_config(write(tmp_path, "epochs: 2\nstages: [{epochs: 1}, {epochs: 1}]\n"))["epochs"] == 2


# --- item 13: --config NAME beside ./NAME.yaml ------------------------------------------------------
def test_config_name_that_is_both_a_recipe_and_a_local_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unet_camvid_cpu.yaml").write_text("model: fcn8s\nepochs: 3\n")
    with pytest.raises(UserError) as e:
        find_recipe("unet_camvid_cpu")
    assert str(e.value) == (f"config 'unet_camvid_cpu' is both the bundled recipe unet_camvid_cpu and the file "
                            f"unet_camvid_cpu.yaml; give --config ./unet_camvid_cpu.yaml for the file, or --config "
                            f"{RECIPES_DIR / 'unet_camvid_cpu.yaml'} for the bundled recipe")
    assert find_recipe("./unet_camvid_cpu.yaml") == Path("unet_camvid_cpu.yaml")
    assert load_yaml_config(find_recipe(str(RECIPES_DIR / "unet_camvid_cpu.yaml")))["model"] == "unet"
    assert find_recipe("unet_isbi_cpu.yml") == RECIPES_DIR / "unet_isbi_cpu.yaml"
    (tmp_path / "mine.yml").write_text("model: fcn8s\n")
    with pytest.raises(UserError, match=r"config 'mine' is not a bundled recipe; for the file mine.yml, give --config "
                                        r"mine.yml$"):
        find_recipe("mine")
    assert find_recipe("mine.yml") == Path("mine.yml")


def test_config_name_that_is_both_a_recipe_and_a_local_file_without_a_suffix(tmp_path, monkeypatch):
    """./unet_camvid_cpu.yaml beside the bundled recipe was refused as ambiguous, but a file named
    unet_camvid_cpu with no suffix (saved from a browser, a copy to edit) was read instead of the bundled
    recipe without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unet_camvid_cpu").write_text("model: fcn8s\nepochs: 3\n")
    with pytest.raises(UserError, match=r"^config 'unet_camvid_cpu' is both the bundled recipe unet_camvid_cpu and "
                                        r"the file unet_camvid_cpu; give --config ./unet_camvid_cpu for the file"):
        find_recipe("unet_camvid_cpu")
    assert find_recipe("./unet_camvid_cpu") == Path("unet_camvid_cpu")  # a path: the file


# --- item 14: values inside a stage are named by the stage and file ---------------------------------
@pytest.mark.parametrize(("stage", "message"), [
    ("{name: b, epochs: 1, augment: {resize: [0, 5]}}",
     "k.yaml: stage 2 (b): augment key 'resize': expected two positive integers, got [0, 5]"),
    ("{epochs: 1, crop: 5x0}", "k.yaml: stage 2 crop '5x0' must look like 256x320 or 256 (positive sides)"),
    ("{name: [x, y], epochs: 1}", 'k.yaml: stage 2: name must be text, got [\'x\', \'y\']; quote it'),
    ("{name: null, epochs: 1}", "k.yaml: stage 2: name must be text, got None"),
    ("{name: stage1, epochs: 1}", "k.yaml: stage 2 (stage1): the name 'stage1' is also stage 1's"),
])
def test_bad_stage_values_name_the_stage(tmp_path, capsys, stage, message):
    config = write(tmp_path, f"model_kwargs: {{base_channels: 4}}\nstages:\n  - {{epochs: 1}}\n  - {stage}\n")
    assert message in refused(tmp_path, capsys, ["--config", str(config)])


def test_top_level_crop_error_names_the_file(tmp_path, capsys):
    config = write(tmp_path, "crop: 5x0\n")
    assert "k.yaml: crop '5x0' must look like" in refused(tmp_path, capsys, ["--config", str(config)])
    assert "--crop '5x0' must look like" in refused(tmp_path, capsys, ["--crop", "5x0"])


# --- item 15: overwrite and resume are the command's ------------------------------------------------
@pytest.mark.parametrize("key", ["overwrite", "resume"])
def test_overwrite_and_resume_are_refused_as_keys(tmp_path, capsys, key):
    config = write(tmp_path, f"{key}: true\n")
    err = refused(tmp_path, capsys, ["--config", str(config)])
    assert err == (f"pixelwise: error: {config}: {key} is a choice of the command, not a setting of the run: remove "
                   f"it, and pass --{key} when you mean it")
    record = write(tmp_path, f"{key}: true\nepochs: 2\n", "config.yaml")  # a run's own, as older runs wrote it
    assert load_yaml_config(record, run_record=True) == {"epochs": 2}
    assert load_yaml_config(write(tmp_path, f"{key}: false\nepochs: 2\n")) == {"epochs": 2}


def test_staged_run_trains_and_resumes_from_its_config(tmp_path, capsys):
    config, out = write(tmp_path, STAGES), tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pixelwise: error: --lr: this recipe's stages set lr (a: 0.01, b: 0.001); change them in the "
                   f"recipe ({out / 'config.yaml'}), or give the stages in your own --config")


def test_flags_take_the_number_spellings_yaml_takes():
    """--max-pixels 1e9 and --epochs 10.0 were refused, while max_pixels: 1e9 and epochs: 10.0 in
    YAML are read as the integers they are; a fraction is still refused."""
    values = flag_values({"max_pixels": "1e9", "epochs": "10.0", "lr": "1e-3"})
    assert (values["max_pixels"], values["epochs"], values["lr"]) == (10**9, 10, 0.001)
    assert isinstance(values["epochs"], int)
    with pytest.raises(UserError, match="--epochs must be an integer >= 1, got 10.5"):
        flag_values({"epochs": "10.5"})


def test_crop_flag_against_a_stage_that_sets_crop_itself_is_refused():
    """A stage's own crop: key (not augment's crop) wins over --crop as much as augment's does."""
    stages = [{"epochs": 1, "name": "a", "crop": "64x64"}, {"epochs": 1, "name": "b"}]
    with pytest.raises(UserError, match=r"^--crop: this recipe's stages set the crop \(a: 64x64\)"):
        check_flags_against_stages(stages, {"crop": "32x32"})
    check_flags_against_stages([{"epochs": 1, "name": "b"}], {"crop": "32x32"})  # no stage sets it: the run's
