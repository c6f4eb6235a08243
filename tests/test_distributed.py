"""DistributedDataParallel on the CPU (gloo): torchrun with 2 processes on a tiny shapes run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.nn as nn
from safetensors import safe_open
from torch.utils.data import DataLoader

from conftest import write_isbi_tree
from pixelwise.checkpoint import load_checkpoint
from pixelwise.data import build_dataset
from pixelwise.engine import distributed
from pixelwise.engine.validate import eval_collate, validate_semantic
from pixelwise.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"base_channels": 4, "batch_norm": True, "dropout": 0}
TINY_DATA = {"num_train": 16, "num_val": 7, "size": 32}  # 7 val images: uneven shards (4 + 3)


def torchrun_train(args: list[str], timeout: int, tmp: Path, entry: tuple[str, ...] = ("-m", "pixelwise")):
    """``pixelwise train ARGS`` in 2 CPU processes under torchrun (``entry``: what each process runs);
    torchrun's own log folder goes into ``tmp``, not the machine's /tmp, where it would stay."""
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m",
                                                                             "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    return subprocess.run([*launcher, "--standalone", "--nproc_per_node", "2", *entry, "train", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_torchrun_two_cpu_processes_match_single_process_evaluation(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun_train(["--model", "unet", "--dataset", "shapes", "--epochs", "2", "--batch-size", "4",
                           "--no-progress", "--amp", "off", "--out", str(out), "--model-kwargs", json.dumps(TINY_MODEL),
                           "--dataset-kwargs", json.dumps(TINY_DATA)], timeout=300, tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done in") == 1  # rank 0 only prints
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 2
    assert summary["steps"] == 4  # 16 images / 2 ranks / batch 4 = 2 steps per epoch
    for name in ("best.safetensors", "last.safetensors", "last.state.safetensors", "metrics.csv"):
        assert (out / name).is_file(), name
    with safe_open(out / "last.state.safetensors", "pt") as f:  # a resume inside an epoch needs as many
        assert json.loads(f.metadata()["pixelwise_train_state"])["processes"] == 2

    model, _ = load_checkpoint(out / "last.safetensors")
    val = build_dataset("shapes", None, "val", **TINY_DATA)
    m = validate_semantic(model, DataLoader(val, batch_size=4, collate_fn=eval_collate), val.num_classes,
                 torch.device("cpu"), list(val.class_names), show=False)
    final = summary["final"]
    assert m["num_images"] == final["num_images"] == 7
    for key in ("pixel_acc", "mIoU", "mean_acc", "fwIoU"):
        assert final[key] == pytest.approx(m[key], abs=1e-9), key
    assert final["val_loss"] == pytest.approx(m["loss"], rel=1e-5)


@pytest.mark.slow  # a torchrun of two processes, 8-18 s on 2 cores
def test_torchrun_validation_sums_the_isbi_errors_over_ranks(tmp_path):
    """On ISBI data every rank scores its shard of the validation slices (2 + 1 here); the pair and
    pixel counts behind the Rand and leaderboard pixel errors are summed over ranks, so the errors
    equal one process's over all slices."""
    root = tmp_path / "isbi"
    write_isbi_tree(root, np.random.default_rng(0), count=9, size=40)
    out = tmp_path / "ddp"
    kwargs = {"val_count": 3}
    proc = torchrun_train(["--model", "unet", "--dataset", "isbi2012", "--data", str(root), "--epochs", "1",
                           "--batch-size", "1", "--no-progress", "--amp", "off", "--out", str(out),
                           "--model-kwargs", json.dumps(TINY_MODEL), "--dataset-kwargs", json.dumps(kwargs),
                           "--augment", '{"flip": false, "jitter": false}'], timeout=300, tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "metrics.json").read_text())["final"]

    model, _ = load_checkpoint(out / "last.safetensors")
    val = build_dataset("isbi2012", str(root), "val", **kwargs)
    m = validate_semantic(model, DataLoader(val, batch_size=1, collate_fn=eval_collate), val.num_classes,
                          torch.device("cpu"), list(val.class_names), show=False,
                          rand_foreground=val.rand_foreground)
    assert m["num_images"] == final["num_images"] == 3
    for key in ("pixel_error", "pixel_error_best", "rand_error", "rand_error_best"):
        assert final[key] == pytest.approx(m[key], abs=1e-9), key


SKEWED_CLOCK = """
import os, sys, time
import pixelwise.engine.trainer as trainer
if os.environ["RANK"] == "0":  # rank 0's clock jumps an hour ahead after its first calls
    class Clock:
        calls = 0
        def __getattr__(self, name):
            return getattr(time, name)
        def monotonic(self):
            Clock.calls += 1
            return time.monotonic() + (3600.0 if Clock.calls > 6 else 0.0)
    trainer.time = Clock()
from pixelwise.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a torchrun of two processes, 8-18 s on 2 cores
def test_torchrun_ranks_stop_together_when_one_clock_passes_the_time_budget(tmp_path):
    # rank 0 sees the 10-minute budget spent within the first epoch, rank 1 does not: every rank
    # must stop after the same step (a rank that stops alone leaves the other waiting in a
    # collective, and the run hangs or fails)
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED_CLOCK)
    out = tmp_path / "ddp"
    proc = torchrun_train(["--model", "unet", "--dataset", "shapes", "--epochs", "3", "--batch-size", "2",
                           "--max-minutes", "10", "--no-progress", "--amp", "off", "--out", str(out),
                           "--model-kwargs", json.dumps(TINY_MODEL), "--dataset-kwargs", json.dumps(TINY_DATA)],
                          timeout=240, tmp=tmp_path, entry=(str(script),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["stopped_by_time_budget"] and summary["epochs_completed"] == 1
    assert 1 <= summary["steps"] < 4  # 16 images / 2 ranks / batch 2 = 4 steps per epoch


SETTLE_SPY = """
import os, sys
from pathlib import Path
import pixelwise.engine.trainer as trainer
real = trainer.settle_pending_best
def settle(run, state):  # which ranks touch best.pending.safetensors
    Path(run.out, f"settled.rank{os.environ['RANK']}").touch()
    return real(run, state)
trainer.settle_pending_best = settle
from pixelwise.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a torchrun of two processes, 8-18 s on 2 cores
def test_torchrun_resume_settles_a_pending_best_on_rank_0_only(tmp_path):
    """A kill between best.pending and the state leaves the pending file; on resume every rank
    renamed or deleted it, and the slower rank's os.replace found no file (FileNotFoundError)."""
    script = tmp_path / "spy.py"
    script.write_text(SETTLE_SPY)
    out = tmp_path / "ddp"
    common = ["--model", "unet", "--dataset", "shapes", "--batch-size", "4", "--no-progress", "--amp", "off",
              "--out", str(out), "--model-kwargs", json.dumps(TINY_MODEL), "--dataset-kwargs", json.dumps(TINY_DATA)]
    proc = torchrun_train([*common, "--epochs", "1"], timeout=300, tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copy(out / "last.safetensors", out / "best.pending.safetensors")  # what a kill there leaves
    proc = torchrun_train([*common, "--epochs", "2", "--resume"], timeout=300, tmp=tmp_path, entry=(str(script),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("settled.rank*")) == ["settled.rank0"]
    assert not (out / "best.pending.safetensors").exists()


@pytest.mark.slow  # a torchrun of two processes, 8-18 s on 2 cores
def test_torchrun_a_batch_of_one_per_process_is_refused_up_front_and_each_rank_says_it_on_its_own_line(tmp_path):
    """2 images over 2 processes gave each a batch of 1, which the check of the whole set passed: the
    run wrote config.yaml and stopped mid-epoch with a fix that did not help; the two ranks' error
    lines could run together on one line."""
    out = tmp_path / "dl"
    proc = torchrun_train(["--model", "deeplabv3plus_resnet18", "--dataset", "shapes", "--epochs", "1",
                           "--batch-size", "2", "--no-progress", "--out", str(out),
                           "--dataset-kwargs", json.dumps({"num_train": 2, "num_val": 2, "size": 64})],
                          timeout=300, tmp=tmp_path)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "pixelwise: " in line]
    words = "trains on at least 2 images per batch (the BatchNorm of its image pooling sees one value per image), " \
            "and this run has 1 (2 images over 2 processes)"
    assert all(line.count("pixelwise: ") == 1 for line in said), said  # no two processes' lines run together
    assert any(line.startswith("pixelwise: error: ") and words in line for line in said), said  # rank 0's
    # rank 1 says the same marked as its own, or, stopped by torchrun once rank 0 has ended, that it was
    assert all(line.startswith("pixelwise: error: ") or line.startswith("[rank 1] pixelwise: ") for line in said), said
    assert not out.exists()


# --- the helpers in one process: the CUDA branches checked on any machine ----------------------------


def test_in_one_process_the_default_info_is_the_environments(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.env_info() == distributed.DistInfo() == distributed.DistInfo(0, 1, 0)
    assert distributed.DistInfo().is_main and not distributed.DistInfo().enabled


def test_setup_refuses_cuda_without_it_and_picks_the_local_gpu_and_nccl_for_several_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        distributed.setup("cuda")
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: seen.append(("set_device", dev)))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: seen.append((backend, kw["device_id"])))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    gpu1 = torch.device("cuda", 1)
    assert distributed.setup("cuda") == (distributed.DistInfo(3, 4, 1), gpu1)
    assert seen == [("set_device", gpu1), ("nccl", gpu1)]
    seen.clear()
    assert distributed.setup("cpu") == (distributed.DistInfo(3, 4, 1), torch.device("cpu"))
    assert seen == [("gloo", None)]


def test_wrap_model_converts_to_sync_batchnorm_and_names_the_gpu(monkeypatch):
    class Recorded(nn.Module):  # stands in for DistributedDataParallel, which needs a process group
        def __init__(self, module, device_ids, find_unused_parameters):
            super().__init__()
            self.module, self.device_ids, self.find_unused = module, device_ids, find_unused_parameters

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", Recorded)
    info = distributed.DistInfo(1, 2, 1)
    wrapped = distributed.wrap_model(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), info,
                                     torch.device("cuda", 1), sync_bn=True, find_unused_parameters=True)
    assert [type(m) for m in wrapped.module] == [nn.Conv2d, nn.SyncBatchNorm]
    assert (wrapped.device_ids, wrapped.find_unused) == ([1], True)
    plain = distributed.wrap_model(nn.Sequential(nn.BatchNorm2d(2)), info, torch.device("cpu"), sync_bn=False)
    assert [type(m) for m in plain.module] == [nn.BatchNorm2d]
    assert (plain.device_ids, plain.find_unused) == (None, False)


def test_a_process_group_of_one_is_not_active(monkeypatch):
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(tdist, "all_reduce", lambda *a, **kw: pytest.fail("a collective in a group of one"))
        assert not distributed.active()
        t = torch.tensor([2.0])
        assert distributed.all_reduce_sum(t) is t and t.item() == 2.0
    finally:
        distributed.cleanup()
    assert not tdist.is_initialized()
