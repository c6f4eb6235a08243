"""A real ``pixelwise train`` process killed with SIGKILL or interrupted with SIGINT (Ctrl-C)
leaves readable checkpoints, and ``--resume`` finishes the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pixelwise.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "unet", "--dataset", "shapes", "--batch-size", "4", "--no-progress",
        "--model-kwargs", '{"base_channels": 4, "batch_norm": true, "dropout": 0}',
        "--dataset-kwargs", '{"num_train": 48, "num_val": 4, "size": 32}']


def _default_sigint() -> None:
    # A shell starts a background job (`pytest ... &`) with SIGINT ignored, the child inherits that,
    # and Python then installs no KeyboardInterrupt handler: give the child Ctrl-C's usual meaning
    # whatever way the tests were started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(out: Path, epochs: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pixelwise", "train", *TINY, "--epochs", str(epochs),
                             "--out", str(out), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.05)


def test_sigkill_leaves_readable_checkpoints_and_resume_completes(tmp_path):
    out = tmp_path / "run"
    proc = start(out, 3)
    wait_for(out / "last.state.safetensors", proc)
    time.sleep(0.3)  # somewhere inside epoch 2 (or inside a checkpoint write)
    still_running = proc.poll() is None
    proc.kill()
    proc.communicate()
    assert still_running
    load_checkpoint(out / "last.safetensors")  # complete and loadable
    done = start(out, 3, "--resume")
    stdout, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr[-2000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["epochs_completed"] == 3
    assert [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]] == [1, 2, 3]


def test_sigint_saves_state_and_exits_130(tmp_path):
    out = tmp_path / "run"
    # long enough that it cannot finish before the signal even when this process is starved
    # of CPU (send_signal does nothing to a process that has already exited)
    proc = start(out, 5000)
    wait_for(out / "last.state.safetensors", proc)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted: saved" in stdout and f"pixelwise train --resume --out {out}` continues" in stdout
    load_checkpoint(out / "last.safetensors")
    from safetensors import safe_open

    with safe_open(str(out / "last.state.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["pixelwise_train_state"])
    assert meta["epoch"] >= 1 and meta["step"] == meta["epoch"] * 12 + meta["batch"]
