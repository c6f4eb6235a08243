import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pixelwise.data.io
import pixelwise.inference.export
import pixelwise.inference.onnx_runner
from pixelwise import cli, create_model, save_checkpoint
from pixelwise.cli import looks_like_onnx, main, parse_resize
from pixelwise.errors import UserError

TINY = ["--model", "unet", "--dataset", "shapes", "--epochs", "1", "--batch-size", "8", "--no-progress",
        "--model-kwargs", '{"base_channels": 4, "batch_norm": true, "dropout": 0}',
        "--dataset-kwargs", '{"num_train": 16, "num_val": 8, "num_test": 8, "size": 32}']


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_contract_files(trained):
    for name in ("best.safetensors", "last.safetensors", "last.state.safetensors", "metrics.csv",
                 "metrics.json", "config.yaml"):
        assert (trained / name).is_file(), name
    header = (trained / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "val_loss", "mIoU", "pixel_acc"} <= set(header)
    summary = json.loads((trained / "metrics.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["best_epoch"] == 1


def test_eval_json_keys(trained, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(trained / "best.safetensors"), "--dataset", "shapes",
                 "--split", "test", "--json", str(out), "--no-progress",
                 "--dataset-kwargs", '{"num_test": 4, "size": 32}']) == 0
    m = json.loads(out.read_text())
    assert {"pixel_acc", "mean_acc", "mIoU", "fwIoU", "dice", "per_class", "num_images"} <= set(m)
    assert m["num_images"] == 4 and len(m["per_class"]) == 4


def test_config_file_and_cli_override(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model: unet\ndataset: shapes\nepochs: 3\nbatch_size: 8\nlr: 0.01\n"
                   "model_kwargs: {base_channels: 4, batch_norm: true}\n"
                   "dataset_kwargs: {num_train: 8, num_val: 4, size: 32}\n")
    out = tmp_path / "o"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--out", str(out), "--no-progress",
                 "--model-kwargs", '{"dropout": 0}']) == 0
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["epochs"] == 1 and resolved["lr"] == 0.01  # flag beats file, file beats default
    assert resolved["model_kwargs"] == {"base_channels": 4, "batch_norm": True, "dropout": 0}


def test_bad_config_key_and_bad_json_are_one_line_errors(tmp_path, capsys):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("modle: unet\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'modle'" in err and "r.yaml" in err
    assert main(["train", *TINY[:-2], "--dataset-kwargs", "{num_train: 3}", "--out", str(tmp_path / "o")]) == 2
    assert "--dataset-kwargs must be a JSON object" in capsys.readouterr().err
    assert main(["train", "--model", "nope", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_resume_continues_to_the_same_weights(tmp_path):
    # A constant schedule: with poly, a 1-epoch run anneals to 0 in its epoch, so extending it
    # cannot match a run planned for 2 epochs.
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    args = [a for a in TINY if a not in ("--epochs", "1")] + ["--schedule", "constant"]
    assert main(["train", *args, "--epochs", "2", "--out", str(a)]) == 0
    assert main(["train", *args, "--epochs", "1", "--out", str(b)]) == 0
    assert main(["train", *args, "--epochs", "2", "--out", str(b), "--resume"]) == 0
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k].float() - wb[k].float()).abs().max() <= 1e-5, k


def test_models_verb_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "pixelwise", "models"], capture_output=True, text=True, check=True)
    assert "unet" in proc.stdout and "Ronneberger" in proc.stdout
    assert "pixelwise recipes" in proc.stdout.splitlines()[-1]  # the footer points at the recipes


def test_data_inspect_json(tmp_path):
    out = tmp_path / "r.json"
    assert main(["data", "inspect", "--dataset", "shapes", "--split", "val", "--json", str(out), "--no-progress",
                 "--dataset-kwargs", '{"num_val": 5, "size": 32}']) == 0
    r = json.loads(out.read_text())
    assert {"num_images", "class_names", "class_pixels", "ignored_pixels", "image_sizes", "median_freq_weights",
            "problems"} <= set(r)
    assert r["num_images"] == 5 and sum(r["class_pixels"]) == 5 * 32 * 32


def test_bench_reports_contract_keys(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "segnet_basic", "--size", "32x48", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("img_per_s", "ms_per_img", "gflops_per_img", "achieved_gflops", "peak_mem_mb"):
        assert r[key] > 0, key
    # on a loaded machine the GEMM peak can measure below the model's rate: then no ceiling, and a note says so
    if r["peak_note"] is None:
        assert r["gemm_peak_gflops"] > 0 and r["utilization"] == pytest.approx(
            r["achieved_gflops"] / r["gemm_peak_gflops"])
    else:
        assert r["utilization"] is None and r["gemm_peak_gflops"] is None and r["peak_note"]
    # FLOPs of SegNet-Basic scale with the pixels: 512x512 (see `pixelwise models`) vs 32x48
    from pixelwise.inference.bench import count_flops
    from pixelwise.models import create_model

    big = count_flops(lambda: create_model("segnet_basic", num_classes=21), (512, 512))
    assert r["gflops_per_img"] * 1e9 == pytest.approx(big * (32 * 48) / (512 * 512), rel=0.02)


# --- train flags come from TrainConfig; recipes by name ----------------------------------------------
def test_every_config_field_is_a_train_flag_defaulting_to_none():
    import dataclasses

    from pixelwise.cli import build_parser
    from pixelwise.engine.config import TrainConfig

    args = build_parser().parse_args(["train"])
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stages":  # YAML only
            assert not hasattr(args, f.name)
            continue
        assert getattr(args, f.name) is None, f.name  # only flags given override the recipe
    flags = build_parser().parse_args(["train", "--no-progress", "--resume", "--batch-size", "3",
                                       "--model-kwargs", '{"a": 1}', "--milestones", "3,6.5"])
    assert (flags.progress, flags.resume, flags.batch_size) == (False, True, "3")


def test_train_help_shows_each_default_without_importing_torch(monkeypatch):
    import dataclasses

    from pixelwise.engine.config import TrainConfig

    code = ("import sys\nfrom pixelwise.cli import main\ntry:\n    main(['train', '--help'])\n"
            "except SystemExit:\n    pass\nprint('cv2 loaded:', 'cv2' in sys.modules)\n"
            "print('torch loaded:', 'torch' in sys.modules)")
    env = {**__import__("os").environ, "COLUMNS": "400"}  # no wrapped help text
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert proc.stdout.strip().endswith("cv2 loaded: False\ntorch loaded: False")  # --help exits through main
    lines: dict[str, str] = {}  # flag -> its whole entry (a long flag's help starts on the next line)
    for line in proc.stdout.split("options:")[1].splitlines():
        if line.startswith("  --"):
            flag = line.split()[0].rstrip(",")
            lines[flag] = line
        elif line.startswith("   ") and lines:
            lines[flag] += " " + line.strip()
    for f in dataclasses.fields(TrainConfig):
        if f.name != "stages":
            line = lines[f"--{f.name.replace('_', '-')}"]
            assert "(default: " in line and f.metadata["help"].split()[0] in line, line
    assert lines["--batch-size"].endswith("(default: 8)")
    assert lines["--optimizer"].split()[1] == "{sgd,adam,adamw}" and lines["--optimizer"].endswith("(default: adam)")
    assert lines["--progress"].endswith("(default: only when stderr is a terminal)")
    assert "--no-progress" in lines["--progress"]
    assert "(default: runs/<recipe name>, or runs/<model> without --config)" in lines["--out"]


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "rmsprop"], "optimizer 'rmsprop' is not one of: sgd, adam, adamw"),
    (["--select-by", "val_loss"], "--select-by 'val_loss' is not one of: auto, pixel_acc"),
    (["--epochs", "two"], "--epochs must be an integer, got 'two'"),
    (["--milestones", "3,x"], "--milestones must be comma-separated numbers like 30,60"),
    (["--config", "unet_camvid"], "is neither a file nor a bundled recipe; bundled: "),
    (["--config", "unet_camvid_cpu"], "needs --data PATH"),
])
def test_bad_train_values_are_one_line_errors_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    assert main(["train", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelwise: error: ") and message in err[0], err
    assert not out.exists()


def test_bundled_recipe_by_name_writes_to_runs_recipe(monkeypatch, capsys, tmp_path):
    from pixelwise.engine import trainer

    seen = {}
    monkeypatch.chdir(tmp_path)

    def fake_fit(cfg):
        seen["cfg"] = cfg
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        for name in ("best.safetensors", "last.safetensors"):  # the summary names the files that are there
            (Path(cfg.out) / name).touch()
        return {"train_minutes": 0.0, "best_epoch": 1, "best": {"mIoU": 0.5}}

    monkeypatch.setattr(trainer, "fit", fake_fit)
    assert main(["train", "--config", "unet_camvid_cpu", "--data", "camvid-folder", "--lr", "0.01",
                 "--no-progress", "--model-kwargs", '{"base_channels": 8}']) == 0
    cfg = seen["cfg"]
    assert (cfg.out, cfg.data, cfg.model, cfg.max_minutes) == ("runs/unet_camvid_cpu", "camvid-folder", "unet", 35)
    assert cfg.lr == 0.01 and cfg.model_kwargs["base_channels"] == 8 and cfg.model_kwargs["batch_norm"]
    assert "wrote runs/unet_camvid_cpu/best.safetensors, last.safetensors\n" in capsys.readouterr().out
    assert main(["train", "--model", "fcn8s", "--no-progress"]) == 0
    assert seen["cfg"].out == "runs/fcn8s"  # without a recipe: runs/<model>


def test_a_resume_by_model_reads_the_runs_own_config_in_runs_model(monkeypatch, tmp_path):
    """--resume without --out (nor --config) continues runs/<--model>: that run's config.yaml gives
    the settings not given as flags, not the default model's folder's (which does not exist)."""
    from pixelwise.engine import trainer
    from pixelwise.engine.config import dump_config

    seen = {}
    monkeypatch.chdir(tmp_path)

    def fake_fit(cfg):
        seen["cfg"] = cfg
        return {"train_minutes": 0.0, "best_epoch": None, "best": {}, "epochs_trained": 0}

    monkeypatch.setattr(trainer, "fit", fake_fit)
    (tmp_path / "runs" / "fcn8s").mkdir(parents=True)
    (tmp_path / "runs" / "fcn8s" / "config.yaml").write_text(dump_config({"model": "fcn8s", "lr": 0.0123}))
    assert main(["train", "--model", "fcn8s", "--resume", "--no-progress"]) == 0
    assert (seen["cfg"].out, seen["cfg"].lr, seen["cfg"].resume) == ("runs/fcn8s", 0.0123, True)


def test_recipes_verb_lists_every_bundled_recipe(capsys):
    from pixelwise.engine.config import bundled_recipes

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["recipe", "model", "dataset"]
    rows = {line.split()[0]: line for line in out[1:] if line and not line.startswith("(")}
    assert set(rows) == {p.stem for p in bundled_recipes()}
    assert rows["unet_camvid_cpu"].split()[1:3] == ["unet", "camvid"] and "CamVid" in rows["unet_camvid_cpu"]
    assert rows["deconvnet_voc"].split()[1:3] == ["deconvnet", "voc"]


def test_json_files_hold_null_where_a_metric_is_undefined(tmp_path):
    import json
    import math

    from pixelwise.cli import write_json

    write_json(str(tmp_path / "m.json"), {"mask_APl": math.nan, "box": [1.0, math.inf], "ok": 0.5})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # not JSON: strict readers refuse them
    assert json.loads(text) == {"mask_APl": None, "box": [1.0, None], "ok": 0.5}


def test_a_reader_that_closes_stdout_stops_nothing(tmp_path):
    """`pixelwise train ... | head -1`: once head has its line, further output is dropped; the
    training runs to its end and exits 0 (a BrokenPipeError stopped it before its first step and
    was reported as 'check the path, its permissions and the free space')."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    train = subprocess.Popen([sys.executable, "-m", "pixelwise", "train", "--model-kwargs", '{"base_channels": 4}',
                              "--dataset-kwargs", '{"num_train": 8, "num_val": 2, "size": 32}', "--epochs", "2",
                              "--batch-size", "4", "--no-progress", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert train.stdout is not None
    first = train.stdout.readline()  # what `head -1` reads, before it closes the pipe
    train.stdout.close()
    _, err = train.communicate(timeout=300)
    assert first and train.returncode == 0, err.decode()[-2000:]
    assert err == b"" and (out / "last.safetensors").is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # header + both epochs


def test_the_train_summary_names_the_metric_that_picked_best(tmp_path, capsys):
    """With --select-by dice (or an ISBI recipe's rand_error_best) the line showed mIoU and pixel
    accuracy only, as if mIoU had picked the best epoch."""
    assert main(["train", *TINY, "--select-by", "dice", "--out", str(tmp_path / "r")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("done in")][0]
    best = json.loads((tmp_path / "r" / "metrics.json").read_text())["best"]
    assert f"; best epoch 1 (by dice): dice={best['dice']:.4f} mIoU={best['mIoU']:.4f} " in line, line


def test_a_missing_run_checkpoint_as_pretrained_says_to_train_that_run_first():
    """fcn16s_voc's recipe starts from runs/fcn32s_voc/best.safetensors: the message said 'give imagenet'."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import check_settings
    from pixelwise.errors import UserError

    with pytest.raises(UserError, match="no such file; it is another run's checkpoint: train that run first"):
        check_settings(TrainConfig(model="fcn16s", pretrained="runs/fcn32s_voc/best.safetensors"))
    with pytest.raises(UserError, match="no such file; give imagenet"):
        check_settings(TrainConfig(model="fcn16s", pretrained="vgg.pth"))


def test_an_input_named_like_a_flag_gets_the_way_to_pass_it(tmp_path, monkeypatch, capsys):
    """predict -dash.png said only 'the following arguments are required: INPUT'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-dash.png").write_bytes(b"not read")
    assert main(["predict", "--checkpoint", "m.safetensors", "-dash.png", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "arguments are required: INPUT" in err and "write ./-dash.png, or put the inputs after --" in err
    assert main(["predict", "--checkpoint", "m.safetensors", "a.png", "-dash.png", "--out", "o"]) == 2
    assert "unrecognized argument '-dash.png'; -dash.png is a file" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", "m.safetensors", "--out", "o", "-x"]) == 2
    assert "is a file" not in capsys.readouterr().err  # -x names no file: no such hint


@pytest.mark.parametrize("flag, said", [("--crf", "arguments are required: INPUT"),
                                         ("--tta", "invalid choice: 'photo.png'"),
                                         ("--watershed", "invalid float value: 'photo.png'")])
def test_an_input_taken_as_the_value_of_a_flag_that_may_go_without_one_is_named(tmp_path, monkeypatch, capsys,
                                                                                 flag, said):
    """predict ... --crf photo.png said only 'the following arguments are required: INPUT'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(b"not read")
    assert main(["predict", "--checkpoint", "m.safetensors", "--out", "o", flag, "photo.png"]) == 2
    err = capsys.readouterr().err
    assert said in err and f"{flag} took photo.png as its value" in err and f"put {flag} after the inputs" in err
    assert main(["predict", "--checkpoint", "m.safetensors", "--out", "o", flag, "other.png"]) == 2
    assert "took" not in capsys.readouterr().err  # no such file: no such hint
    assert not (tmp_path / "o").exists()


def test_eval_says_when_the_split_holds_images_the_checkpoint_trained_on(tmp_path, capsys):
    """A run trained with ISBI val_count 2 (or CamVid val_sequences + join_val) and evaluated without
    those options scored some of its training images as 'val', without a word."""
    import numpy as np

    from conftest import write_isbi_tree

    write_isbi_tree(tmp_path / "isbi", np.random.default_rng(0), count=6, size=32)
    run = tmp_path / "run"
    assert main(["train", "--model", "unet", "--model-kwargs", '{"base_channels": 4}', "--dataset", "isbi2012",
                 "--data", str(tmp_path / "isbi"), "--dataset-kwargs", '{"val_count": 2}', "--epochs", "1",
                 "--batch-size", "2", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    base = ["eval", "--checkpoint", str(run / "best.safetensors"), "--dataset", "isbi2012", "--data",
            str(tmp_path / "isbi"), "--no-progress", "--json"]
    assert main([*base, str(tmp_path / "a.json")]) == 0  # val_count 4 by default: slices 2..5, of which 2, 3 trained
    err = capsys.readouterr().err
    assert "note: 2 of the 4 images of the val split are images the checkpoint trained on" in err, err
    assert "--dataset-kwargs '{\"val_count\": 2}'" in err
    assert json.loads((tmp_path / "a.json").read_text())["provenance"]["dataset"]["training_images"] == 2
    assert main([*base, str(tmp_path / "b.json"), "--dataset-kwargs", '{"val_count": 2}']) == 0
    assert "trained on" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b.json").read_text())["provenance"]["dataset"]["training_images"] == 0


def test_eval_of_a_held_out_folder_of_ones_own_does_not_count_its_train_split_as_trained_on(tmp_path, capsys):
    """A folder dataset has no fixed split: eval rebuilt the checkpoint's training split (train, the
    hash rule's 90%) from the folder it scored, so a separate test folder was said to be 9 of 10
    images the model trained on, 'so these numbers flatter it'. Counted now only where the training
    split's files are the ones it trained on (names and sizes): in its folder, or a copy of it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in (("mine", 6), ("test", 10), ("alike", 6)):  # alike: named as mine, other images
        for sub in ("images", "masks"):
            (tmp_path / name / sub).mkdir(parents=True)
        for i in range(count):
            root = tmp_path / name
            h = 16  # random pixels compress to files of one size: "alike" is named and sized as "mine"
            Image.fromarray(rng.integers(0, 255, (h, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
            Image.fromarray((np.arange(16 * h).reshape(h, 16) % 3).astype(np.uint8)).save(root / "masks" / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--model", "unet", "--model-kwargs", '{"base_channels": 4}', "--dataset", "folder",
                 "--data", str(tmp_path / "mine"), "--epochs", "1", "--batch-size", "2", "--no-progress",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    base = ["eval", "--checkpoint", str(run / "best.safetensors"), "--dataset", "folder", "--split", "all",
            "--no-progress", "--json"]
    for other in ("test", "alike"):
        assert main([*base, str(tmp_path / f"{other}.json"), "--data", str(tmp_path / other)]) == 0
        assert "trained on" not in capsys.readouterr().err
        assert "training_images" not in json.loads((tmp_path / f"{other}.json").read_text())["provenance"]["dataset"]
    # its own folder, all of it, or a copy of it: the images of its train split are counted
    import shutil

    from pixelwise.data import build_dataset

    shutil.copytree(tmp_path / "mine", tmp_path / "copy")
    trained = len(build_dataset("folder", str(tmp_path / "mine"), "train"))
    for folder in (tmp_path / "run" / ".." / "mine", tmp_path / "copy"):
        assert main([*base, str(tmp_path / "mine.json"), "--data", str(folder), "--overwrite"]) == 0
        assert f"note: {trained} of the 6 images of the all split are images the checkpoint trained on" in \
            capsys.readouterr().err
        assert json.loads((tmp_path / "mine.json").read_text())["provenance"]["dataset"]["training_images"] == trained
    # an ensemble whose first member trained elsewhere: the member that trained on these images says it
    assert main(["train", "--model", "unet", "--model-kwargs", '{"base_channels": 4}', "--dataset", "folder",
                 "--data", str(tmp_path / "alike"), "--epochs", "1", "--batch-size", "2", "--no-progress",
                 "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "other" / "best.safetensors"), *base[1:],
                 str(tmp_path / "mine.json"), "--data", str(tmp_path / "mine"), "--overwrite"]) == 0
    assert f"note: {trained} of the 6 images" in capsys.readouterr().err
    # a test folder whose masks lack the last class counts fewer classes (no classes.json): the refusal
    # names the way out, which works, where it said "evaluate on the dataset it was trained for"
    for path in (tmp_path / "test" / "masks").iterdir():
        Image.fromarray((np.arange(256).reshape(16, 16) % 2).astype(np.uint8)).save(path)
    assert main([*base, str(tmp_path / "few.json"), "--data", str(tmp_path / "test")]) == 2
    assert ("the checkpoint predicts 3 classes but the data's masks were read as 2 (a folder without classes.json "
            "takes its class count from the labels its masks hold, and these lack the last); pass --dataset-kwargs "
            "'{\"num_classes\": 3}'" in capsys.readouterr().err)
    assert main([*base, str(tmp_path / "few.json"), "--data", str(tmp_path / "test"), "--dataset-kwargs",
                 '{"num_classes": 3}']) == 0


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full"])
def test_a_closed_or_full_stdout_stops_nothing(tmp_path, redirect):
    """`>&-` was an AttributeError traceback (rc 1) in every verb; `>/dev/full` stopped training
    before its first step with 'No space left on device' and no file named."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if redirect == ">/dev/full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    command = (f"{sys.executable} -m pixelwise train --model-kwargs '{{\"base_channels\": 4}}' --dataset shapes "
               f"--dataset-kwargs '{{\"num_train\": 8, \"num_val\": 2, \"size\": 32}}' --epochs 1 --batch-size 4 "
               f"--no-progress --out {out} {redirect}")
    done = subprocess.run(["bash", "-c", command], capture_output=False, stderr=subprocess.PIPE, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert (out / "last.safetensors").is_file()
    err = done.stderr.decode()
    assert ("standard output cannot be written (No space left on device)" in err) == (redirect == ">/dev/full")


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt, 130), (cli.Terminated, 143)])
def test_a_stop_that_escapes_the_verb_is_its_exit_status(monkeypatch, stop, status):
    # a second Ctrl-C (SIGTERM) while the first one's line is printed escapes _main: still 130 (143)
    def stopped(argv):
        raise stop()

    monkeypatch.setattr(cli, "_main", stopped)
    assert main(["models"]) == status


def test_sigterm_raises_once_then_is_ignored_until_the_verb_ends():
    # the first SIGTERM raises Terminated; the save that follows must not be interrupted by another
    before = signal.getsignal(signal.SIGTERM)
    with cli._sigterm_raises():
        assert signal.getsignal(signal.SIGTERM) is cli._on_sigterm
        with pytest.raises(cli.Terminated):
            cli._on_sigterm(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_while_the_command_starts_is_one_line(monkeypatch, capsys):
    """A Ctrl-C in the first ~0.3 s (the import of pixelwise.cli) was a Python traceback."""
    import builtins
    import sys

    from pixelwise import launch

    real = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "pixelwise.cli":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pixelwise.cli", raising=False)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert launch.main() == 130
    assert capsys.readouterr().err == "pixelwise: interrupted\n"


def test_the_servers_log_is_coloured_only_on_a_terminal_that_wants_it(monkeypatch):
    """uvicorn looked at stdout and wrote to stderr: colour codes in `2>serve.log`; NO_COLOR ignored."""
    pytest.importorskip("fastapi")
    import sys

    from pixelwise.serve.app import log_colours

    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stderr", Tty(True))
    assert log_colours()
    monkeypatch.setattr(sys, "stderr", Tty(False))
    assert not log_colours()
    monkeypatch.setattr(sys, "stderr", Tty(True))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not log_colours()
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not log_colours()


def test_a_run_named_like_a_number_resumes_from_its_own_config(tmp_path, monkeypatch, capsys):
    """--out 1e-3 (an lr sweep's folder): config.yaml wrote 1e-3 unquoted, which the config reader
    takes as the number 0.001, so --resume and --config 1e-3/config.yaml were refused (and the
    hint named another folder, "0.001")."""
    import yaml

    from pixelwise.engine.config import ConfigLoader, dump_config

    settings = {"out": "1e-3", "data": "5e+2", "lr": 0.001, "tiny": 1e-05, "name": "010", "flag": "true"}
    assert yaml.load(dump_config(settings), Loader=ConfigLoader) == settings
    monkeypatch.chdir(tmp_path)
    args = [a for a in TINY if a not in ("--epochs", "1")] + ["--schedule", "constant"]
    assert main(["train", *args, "--epochs", "1", "--out", "1e-3"]) == 0
    assert main(["train", "--resume", "--epochs", "2", "--out", "1e-3", "--no-progress"]) == 0
    assert main(["train", "--config", "1e-3/config.yaml", "--epochs", "1", "--out", "again"]) == 0
    (tmp_path / "bad.yaml").write_text("out: 1.10\n")
    assert main(["train", "--config", "bad.yaml"]) == 2
    assert 'quote it as you wrote it: out: "..." (unquoted, YAML reads 1.10 as 1.1' in capsys.readouterr().err


def test_a_resume_does_not_need_the_pretrained_file_again(tmp_path):
    """The run's --pretrained file was read (and required) on every resume, although the training
    state replaces the weights: moved away, the resume failed with advice to train that run."""
    import shutil

    import yaml

    args = [a for a in TINY if a not in ("--epochs", "1")] + ["--schedule", "constant"]
    src, run = tmp_path / "src", tmp_path / "run"
    assert main(["train", *args, "--epochs", "1", "--out", str(src)]) == 0
    assert main(["train", *args, "--epochs", "1", "--pretrained", str(src / "last.safetensors"),
                 "--out", str(run)]) == 0
    shutil.rmtree(src)
    assert main(["train", "--resume", "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["pretrained"] == str(src / "last.safetensors")


def test_names_from_data_and_checkpoints_cannot_drive_the_terminal(tmp_path, capsys):
    """Class names (a classes.json, a shared checkpoint) and file names went to the terminal raw:
    an escape sequence set the window title or hid the rest of a report, a newline in a file name
    split a line in two."""
    import numpy as np
    from PIL import Image

    from pixelwise.data import build_dataset
    from pixelwise.data.inspect import format_report, inspect_dataset
    from pixelwise.errors import shown

    assert shown("a\x1b[31mb\nc\x9bd é") == "a\\x1b[31mb\\nc\\x9bd é"
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    names = ["background", "\x1b]0;pwned\x07red", "\x1b[8mhidden"]
    (root / "classes.json").write_text(json.dumps({"names": names}))
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 3, (8, 8)).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    (root / "images" / "x\x1b[8m.png").write_bytes(b"not an image")
    report = format_report(inspect_dataset(build_dataset("folder", str(root), "all")))
    assert "\x1b" not in report and "\\x1b]0;pwned\\x07red" in report and "x\\x1b[8m.png" in report
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a\nb.png").write_bytes(b"not an image")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(inputs / "ok.png")
    capsys.readouterr()
    from pixelwise import create_model, save_checkpoint

    model = create_model("unet", num_classes=3, base_channels=4)
    save_checkpoint(tmp_path / "c.safetensors", model, {"model": "unet", "num_classes": 3, "class_names": names,
                                                         "model_kwargs": {"base_channels": 4}})
    assert main(["predict", "--checkpoint", str(tmp_path / "c.safetensors"), str(inputs), "--out",
                 str(tmp_path / "out"), "--skip-invalid", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "a\\nb.png: not a readable image" in err and "\x1b" not in err
    assert main(["eval", "--checkpoint", str(tmp_path / "c.safetensors"), "--dataset", "folder", "--data", str(root),
                 "--split", "all", "--skip-invalid", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b]0;pwned\\x07red" in out


@pytest.mark.parametrize("argv, flag", [
    (["data", "inspect", "--dataset", "shapes", "--json", ""], "--json"),
    (["train", "--dataset", "shapes", "--epochs", "1", "--model-kwargs", '{"base_channels": 4}', "--dataset-kwargs",
      '{"num_train": 2, "num_val": 2, "size": 32}', "--no-progress", "--out", ""], "--out"),
    (["predict", "--checkpoint", "m.safetensors", "a.png", "--out", ""], "--out"),
    (["eval", "--checkpoint", "a.safetensors", "--checkpoint", "", "--dataset", "shapes"], "--checkpoint"),
])
def test_an_empty_path_is_refused_not_taken_as_not_given(argv, flag, capsys, tmp_path, monkeypatch):
    """--json "$UNSET" wrote no file and said nothing; --out '' predicted into the current folder
    and trained into runs/unet."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pixelwise: error: {flag} is empty; give a path (an unset shell variable?)"
    assert not any(tmp_path.iterdir())


TINY_TRAIN = ["train", "--dataset", "shapes", "--epochs", "1", "--model-kwargs", '{"base_channels": 4}',
              "--dataset-kwargs", '{"num_train": 2, "num_val": 2, "size": 32}', "--no-progress"]


@pytest.mark.parametrize("argv, words", [
    ([*TINY_TRAIN, "--max-pixels", " "], "--max-pixels is empty; give a value (or none)"),
    ([*TINY_TRAIN, "--pretrained", " "], "--pretrained is empty"),
    ([*TINY_TRAIN, "--out", " "], "--out is empty"),
    ([*TINY_TRAIN, "--model-kwargs", ""], "--model-kwargs is empty"),
    ([*TINY_TRAIN, "--nesterov"], "nesterov True acts only with optimizer sgd"),
    ([*TINY_TRAIN, "--step-size", "5"], "step_size 5 acts only with schedule step"),
    ([*TINY_TRAIN, "--warmup-factor", "0.1"], "warmup_factor 0.1 acts only with warmup_epochs or warmup_iters"),
    ([*TINY_TRAIN, "--class-weight-power", "0.5"], "class_weight_power 0.5 acts only with class_weights"),
    ([*TINY_TRAIN, "--decay-norm-and-bias"], "decay_norm_and_bias True acts only with weight_decay above 0"),
    ([*TINY_TRAIN, "--aux-weight", "0.7"], "aux_weight 0.7 acts only with an auxiliary head, which unet is not"),
    (["bench", "--model", "unet", "--size", "32", "--repeats", "10001"], "--repeats must be from 1 to 10,000"),
    (["bench", "--model", "unet", "--size", "32", "--threads", str(2**64)], "--threads must be from 1 to 1,024"),
    (["bench", "--model", "unet", "--size", "32", "--batch", str(2**64)], "--batch must be from 1 to 4,096"),
    (["predict", "--checkpoint", "m.safetensors", "", "--out", "o"], "an INPUT is empty"),
    (["serve", "--checkpoint", "m.safetensors", "--samples", ""], "--samples is empty"),
])
def test_values_that_would_run_for_days_or_mean_nothing_are_refused(argv, words, capsys, tmp_path, monkeypatch):
    """--repeats 1e9 ran silently for days; a blank --max-pixels dropped the decompression-bomb
    limit and a blank INPUT predicted the current folder; settings that act only with another were
    recorded in config.yaml as if they had."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and words in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_mc_samples_and_overlap_are_bounded_and_need_what_they_act_on(tmp_path, capsys):
    from pixelwise import create_model, save_checkpoint

    save_checkpoint(tmp_path / "m.safetensors", create_model("unet", num_classes=2, base_channels=4),
                    {"model": "unet", "num_classes": 2, "model_kwargs": {"base_channels": 4}})
    base = ["predict", "--checkpoint", str(tmp_path / "m.safetensors"), str(tmp_path / "m.safetensors"),
            "--out", str(tmp_path / "o")]
    for extra, words in ((["--mc-samples", "1001"], "--mc-samples must be from 0 to 1,000"),
                         (["--overlap", "0.5"], "--overlap 0.5 goes with --tile N")):
        assert main([*base, *extra]) == 2
        assert words in capsys.readouterr().err


def test_num_workers_is_bounded():
    """--num-workers 1e30 went to the DataLoader, which forked until the machine ran out of memory."""
    from pixelwise.engine.config import check_value
    from pixelwise.errors import UserError

    assert check_value("num_workers", 256, "--num-workers") == 256
    with pytest.raises(UserError, match="--num-workers must be an integer >= 0 and <= 256, got 1e"):
        check_value("num_workers", 1e30, "--num-workers")


def test_an_error_is_said_where_stderr_is_none(tmp_path, monkeypatch, capsys):
    """Under pythonw or a windowed app sys.stderr is None: print() fell back to stdout, the one-write
    line of torchrun's processes raised AttributeError."""
    import sys

    monkeypatch.setattr(sys, "stderr", None)
    assert main(["predict", "--checkpoint", str(tmp_path / "none.safetensors"), str(tmp_path / "x.png"),
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().out.startswith("pixelwise: error: ")


@pytest.mark.parametrize("images, listed", [(1, False), (2, True)])
def test_eval_lists_the_lowest_scored_images_only_when_there_are_several(trained, capsys, images, listed):
    assert main(["eval", "--checkpoint", str(trained / "best.safetensors"), "--dataset", "shapes", "--split", "test",
                 "--no-progress", "--dataset-kwargs", f'{{"num_test": {images}, "size": 32}}']) == 0
    assert ("  lowest mIoU: " in capsys.readouterr().out) == listed


def test_eval_notes_files_left_out_and_a_split_without_labels_only_when_so(trained, tmp_path, capsys):
    """The two notes of eval on stderr: files --skip-invalid left out, and a split whose every pixel
    is 255 (every metric null); neither on a labelled split with nothing left out."""
    import numpy as np
    from PIL import Image

    checkpoint = str(trained / "best.safetensors")
    classes = 4  # the shapes dataset's, which the model trained on
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, classes, (32, 32), dtype=np.uint8)).save(root / "masks" / f"{i}.png")
    command = ["eval", "--checkpoint", checkpoint, "--dataset", "folder", "--data", str(root), "--split", "all",
               "--no-progress", "--no-bf", "--dataset-kwargs", f'{{"num_classes": {classes}}}']
    assert main(command) == 0
    assert "pixelwise: note:" not in capsys.readouterr().err
    (root / "images" / "2.png").write_bytes(b"")  # an image that cannot be read
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "2.png")
    assert main([*command, "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert "pixelwise: note: left out 1 file(s) with problems (--skip-invalid)" in err and "labelled" not in err, err
    (root / "images" / "2.png").unlink()
    (root / "masks" / "2.png").unlink()
    for i in range(2):
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "masks" / f"{i}.png")
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "split has no labelled pixel (every pixel is 255, ignore), so every metric is null" in err, err
    assert "left out" not in err


def test_calibration_takes_one_image_and_refuses_none(monkeypatch):
    import argparse

    args = argparse.Namespace(calib_dataset="shapes", calib_data=None, calib_images=1, calib_crop=None)
    images = cli.calibration_images(args, "--mode int8")
    assert len(images) == 1 and str(images[0].dtype) == "uint8" and images[0].ndim == 3 and images[0].shape[2] == 3
    with pytest.raises(UserError, match="--calib-images must be >= 1 and --calib-crop >= 16, got 0 and 256"):
        cli.calibration_images(argparse.Namespace(**{**vars(args), "calib_images": 0}), "--mode int8")


@pytest.mark.parametrize(("message", "said"), [("Insufficient memory to allocate 9 GB", True),
                                               ("Assertion failed: size > 0", False)])
def test_an_opencv_out_of_memory_is_one_line_and_other_opencv_errors_are_not_hidden(monkeypatch, capsys, message,
                                                                                    said):
    """cv2.error (matched by its module, as cv2 is not imported here): its out of memory is the usual
    one line and exit 2; any other stays a traceback, not called out of memory."""
    error = type("error", (Exception,), {"__module__": "cv2"})

    def fail(args):
        raise error(message)

    monkeypatch.setattr(cli, "check_no_empty_paths", fail)
    if said:
        assert main(["predict", "x.png", "--out", "o"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pixelwise: error: out of memory in main memory (Insufficient memory") and \
            "--batch-size, --tile or image size" in err, err
    else:
        with pytest.raises(error, match="Assertion failed"):
            main(["predict", "x.png", "--out", "o"])


def test_the_resize_limit_counts_height_times_width():
    # neither size is a square: the limit is on H*W, not on W*W or H*H
    with pytest.raises(UserError, match="--resize 40x30: 1,200 pixels per model input is above the limit of 1,000"):
        parse_resize("40x30", max_pixels=1000)
    assert parse_resize("30x33", max_pixels=1000) == ((30, 33), False)  # 990 pixels
    assert parse_resize("1000x1", max_pixels=1000) == ((1000, 1), False)  # exactly at the limit


def test_the_bench_size_limit_counts_height_times_width(monkeypatch, capsys):
    monkeypatch.setattr(pixelwise.data.io, "DEFAULT_MAX_PIXELS", 1000)  # read by bench when it runs
    assert main(["bench", "--model", "segnet_basic", "--size", "40x30", "--repeats", "1"]) == 2  # 1,200 pixels
    assert "--size 40x30: 1,200 pixels per image is above the limit of 1,000" in capsys.readouterr().err


@pytest.mark.parametrize("fields", [{}, {"producer_name": "p"}, {"domain": "d"}, {"model_version": 3},
                                    {"doc_string": "a model"}])
def test_an_onnx_file_is_known_by_its_first_bytes_whatever_its_name(tmp_path, fields):
    """Files onnx itself writes, with each field that can follow ir_version (a model without a producer
    name, given a doc string or a model version, was taken for a pickle); bytes that are no ModelProto
    are not."""
    onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, **fields)
    onnx.checker.check_model(model)
    path = tmp_path / "model.bin"
    path.write_bytes(model.SerializeToString())
    assert looks_like_onnx(str(path))
    field = path.read_bytes()[2]  # the tag after ir_version
    path.write_bytes(bytes([0x08, 0x00, field, 0x03]) + b"abc")  # ir_version 0
    assert not looks_like_onnx(str(path))
    path.write_bytes(bytes([0x10, 0x07, field, 0x03]) + b"abc")  # field 2 first, not ir_version
    assert not looks_like_onnx(str(path))
    path.write_bytes(bytes([0x08, 0x07, 0x2A, 0x03]) + b"abc")  # model_version as a string: no ModelProto
    assert not looks_like_onnx(str(path))


def test_serve_passes_the_score_threshold_to_an_instance_model(tmp_path, monkeypatch):
    app = pytest.importorskip("pixelwise.serve.app", reason="serve needs the serve extra")
    kw = {"min_size": 64, "max_size": 64}
    ckpt = tmp_path / "mrcnn.safetensors"
    torch.manual_seed(0)
    save_checkpoint(ckpt, create_model("maskrcnn_resnet18_fpn", num_classes=4, **kw),
                    {"model": "maskrcnn_resnet18_fpn", "num_classes": 4, "model_kwargs": kw})
    served = []
    monkeypatch.setattr(app, "run", lambda predictor, config, **k: served.append(predictor) or 0)
    assert main(["serve", "--checkpoint", str(ckpt), "--port", "0", "--score-thresh", "0.9"]) == 0
    assert main(["serve", "--checkpoint", str(ckpt), "--port", "0"]) == 0
    assert [p.score_thresh for p in served] == [0.9, 0.5]  # given, then the default


@pytest.mark.parametrize("text", ["native", "NATIVE", "none", "None", "off"])
def test_resize_native_and_its_spellings_keep_each_images_own_size(text):
    # "native" (or none/off, any case): no resize, each image at its own size; not given: the checkpoint's
    assert parse_resize(text) == (None, True)
    assert parse_resize(None) == (None, False)


def test_a_three_byte_onnx_start_is_known_whatever_its_name(tmp_path):
    # the shortest start that is checked: ir_version's tag, a small version, the next field's tag
    path = tmp_path / "model.bin"
    path.write_bytes(bytes([0x08, 0x07, 0x3A]))
    assert looks_like_onnx(str(path))
    path.write_bytes(bytes([0x08, 0x07]))  # too short to tell: by its name only
    assert not looks_like_onnx(str(path))


@pytest.mark.parametrize("tag", [0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42])
def test_each_modelproto_field_that_may_follow_ir_version_marks_onnx(tmp_path, tag):
    # ModelProto fields 2..8 in number order: producer_name, producer_version, domain (strings, wire
    # type 2), model_version (varint, type 0), doc_string, graph, opset_import (type 2): tag = field
    # << 3 | type. Field 9 or the wrong wire type of field 5 is no ModelProto start.
    path = tmp_path / "model.bin"
    path.write_bytes(bytes([0x08, 0x07, tag]))
    assert looks_like_onnx(str(path))
    path.write_bytes(bytes([0x08, 0x07, 0x4A]))
    assert not looks_like_onnx(str(path))


def test_export_of_a_mask_rcnn_by_name_scores_the_91_coco_classes_unless_told(tmp_path, monkeypatch):
    exported = []
    monkeypatch.setattr(pixelwise.inference.onnx_runner, "require_export_extra", lambda: None)
    monkeypatch.setattr(pixelwise.inference.export, "export_maskrcnn_parts",
                        lambda model, out, meta, **kw: exported.append((model, meta)) or [])
    for extra, classes in (([], 91), (["--num-classes", "5"], 5)):
        assert main(["export", "--model", "maskrcnn_resnet18_fpn", "--out", str(tmp_path / f"m{classes}.onnx"),
                     *extra]) == 0
        model, meta = exported[-1]
        assert meta == {"model": "maskrcnn_resnet18_fpn", "num_classes": classes, "task": "instance"}
        assert model.roi_heads.box_predictor.cls_score.out_features == classes


def test_a_bare_watershed_flag_is_the_documented_threshold_half():
    """`--watershed` without T seeds the cells above 0.5 (docs/inference.md), for predict and eval alike."""
    parser = cli.build_parser()
    for argv in (["predict", "--checkpoint", "m.safetensors", "a.png", "--out", "o", "--watershed"],
                 ["eval", "--checkpoint", "m.safetensors", "--dataset", "isbi2012", "--watershed"]):
        assert parser.parse_args(argv).watershed == 0.5
    plain = ["eval", "--checkpoint", "m.safetensors", "--dataset", "isbi2012"]
    assert parser.parse_args([*plain, "--watershed", "0.4"]).watershed == 0.4
    assert parser.parse_args(plain).watershed is None


def test_a_memory_error_is_one_line_and_exit_2(monkeypatch, capsys):
    """Python's MemoryError (a numpy allocation, say) is the usual one line, not a silent exit 2."""
    def fail(args):
        raise MemoryError()

    monkeypatch.setattr(cli, "check_no_empty_paths", fail)
    assert main(["predict", "x.png", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err == "pixelwise: error: out of memory; use a smaller --batch-size, --tile or image size\n", err


def test_running_out_of_device_memory_is_one_line(monkeypatch, capsys):
    """torch's OutOfMemoryError (the GPU's) is one line naming the device, and exit 2."""
    import torch

    def fail(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")

    monkeypatch.setattr(cli, "check_no_empty_paths", fail)
    assert main(["predict", "x.png", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err == ("pixelwise: error: out of memory on the device (CUDA out of memory. Tried to allocate 2.00 GiB "
                   "more text); use a smaller --batch-size, --tile or image size\n"), err
