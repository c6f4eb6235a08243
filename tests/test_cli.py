import json
import subprocess
import sys

import pytest

from pixelwise.cli import main

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
    for key in ("img_per_s", "ms_per_img", "gflops_per_img", "achieved_gflops", "gemm_peak_gflops",
                "utilization", "peak_mem_mb"):
        assert r[key] > 0, key
    # FLOPs of SegNet-Basic scale with the pixels: 512x512 (see `pixelwise models`) vs 32x48
    from pixelwise.inference.bench import count_flops
    from pixelwise.models import create_model

    big = count_flops(lambda: create_model("segnet_basic", num_classes=21), (512, 512))
    assert r["gflops_per_img"] * 1e9 == pytest.approx(big * (32 * 48) / (512 * 512), rel=0.02)
