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


def test_a_second_ctrl_c_cannot_cut_the_interrupt_save_short(tmp_path, monkeypatch):
    """The save after a first Ctrl-C runs with SIGINT and SIGTERM ignored: a second Ctrl-C (or a
    burst) lands nowhere, the weights and their training state are both written, and the
    handlers in place before come back afterwards."""
    from pixelwise.engine import trainer
    from pixelwise.engine.trainer import fit
    from pixelwise.runtime import signals_ignored

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with signals_ignored():
            os.kill(os.getpid(), signal.SIGINT)  # ignored: nothing raised here
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is handler
        real_save = trainer.save_state
        calls = []

        def save_under_fire(run, state):  # Ctrl-C pressed again while the interrupt's state is written
            calls.append(state.epoch)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            real_save(run, state)

        def ctrl_c(event, state):
            if event == "step":
                monkeypatch.setattr(trainer, "save_state", save_under_fire)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)

        from pixelwise.engine.config import TrainConfig

        cfg = TrainConfig(model="unet", dataset="shapes", out=str(tmp_path / "run"), epochs=1, batch_size=4,
                          progress=False, model_kwargs={"base_channels": 4},
                          dataset_kwargs={"num_train": 8, "num_val": 2, "size": 32})
        try:
            fit(cfg, log=lambda _: None, callbacks=[ctrl_c])
            raise AssertionError("the first Ctrl-C did not stop training")
        except KeyboardInterrupt as stop:
            assert "continues from there" in stop.args[0]
        assert calls and (tmp_path / "run" / "last.state.safetensors").is_file()
    finally:
        signal.signal(signal.SIGINT, previous)
