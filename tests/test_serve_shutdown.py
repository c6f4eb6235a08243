"""``pixelwise serve`` when it is stopped: a request the server stops under gets a JSON 503 (not
uvicorn's plain-text 500 and a traceback), the exit status says which signal stopped it (130, 143),
the start-up banner names the port bound (``--port 0``), and stopped or timed-out jobs leave no
"Future exception was never retrieved" behind."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import wait_for
from pixelwise import Predictor, create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.data.shapes import CLASS_NAMES, PALETTE

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) drives the ASGI app")

from pixelwise.inference import cancel  # noqa: E402
from pixelwise.serve import config as serve_config  # noqa: E402 - after the skips
from pixelwise.serve.app import _stderr_logging, create_app  # noqa: E402
from pixelwise.serve.pool import InferencePool  # noqa: E402

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")

KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("unet", num_classes=4, **KW).eval()
    path = tmp_path_factory.mktemp("ckpt") / "unet.safetensors"
    save_checkpoint(path, model, {"model": "unet", "num_classes": 4, "model_kwargs": KW, "task": "semantic",
                                  "class_names": CLASS_NAMES, "palette": PALETTE, "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


def png(h, w):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class NeverRetrieved:
    """The loop's exception handler while it is installed: records what asyncio would log
    ("Future exception was never retrieved", with a traceback)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, loop, context) -> None:
        self.messages.append(context.get("message", ""))


def _settle(job_done: threading.Event):
    """Coroutine: until the stopped job's thread has ended, its outcome has reached the loop and
    any abandoned future has been collected (where asyncio logs an exception nobody retrieved)."""

    async def settle():
        await wait_for(job_done.is_set, "the stopped job's thread to end")
        for _ in range(5):
            await asyncio.sleep(0.02)
            gc.collect()

    return settle()


# ---------------------------------------------------------------- the server stops under a request

def test_a_request_the_server_stops_under_gets_a_json_503_and_the_log_one_line(checkpoint, caplog):
    """uvicorn cancels a request's task when it outlives the graceful-shutdown time (Ctrl-C,
    SIGTERM); here the test cancels it while its prediction runs."""
    predictor = Predictor.from_checkpoint(checkpoint)
    gate, ended = threading.Event(), threading.Event()
    original = predictor.predict

    def held(*args, **kwargs):
        try:
            assert gate.wait(60), "the test never opened the gate"
            return original(*args, **kwargs)  # checks the job's cancel event between model batches
        finally:
            ended.set()

    predictor.predict = held
    app = create_app(predictor, samples=[])
    pool = app.state.service.pool
    caplog.set_level(logging.INFO, logger="pixelwise.serve")
    never = NeverRetrieved()

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(never)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            post = asyncio.ensure_future(c.post("/api/predict", files={"image": ("a.png", png(24, 24), "image/png")}))
            await wait_for(lambda: pool.stats()["running"] == 1, "the prediction running")
            post.cancel()  # what uvicorn does once the graceful shutdown's time is up
            response = await post
            gate.set()
            await _settle(ended)
            return response

    response = asyncio.run(scenario())
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert "shutting down" in response.json()["detail"] and int(response.headers["retry-after"]) >= 1
    lines = [r for r in caplog.records if r.name == "pixelwise.serve"]
    assert len(lines) == 1 and "shutting down" in lines[0].getMessage(), [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.INFO and lines[0].exc_info is None
    assert pool.stats()["running"] + pool.stats()["waiting"] == 0
    assert never.messages == []
    pool.close()


# ---------------------------------------------------------------- no "Future exception was never retrieved"

@pytest.mark.parametrize("how", ["cancelled", "timed out"])
def test_a_stopped_job_leaves_no_exception_nobody_retrieved(how):
    """A job stopped after its request was answered (the client went away; its time ran out) ends
    in Cancelled or TimedOut in its thread; nobody awaits it any more, and asyncio must not log it
    with a traceback."""
    pool = InferencePool(workers=1, queue=1, timeout=0.2 if how == "timed out" else None)
    started, ended = threading.Event(), threading.Event()

    def long_job():  # many model batches, checking between them as SemanticPredictor does
        started.set()
        try:
            if how == "timed out":
                time.sleep(0.6)  # a first long batch: the request is answered 504 before the job can stop
            for _ in range(60_000):
                cancel.check()
                time.sleep(0.001)
        finally:
            ended.set()

    never = NeverRetrieved()

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(never)
        job = asyncio.ensure_future(pool.run(pool.admit(), long_job))
        if how == "cancelled":
            await wait_for(started.is_set, "the job running")
            job.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await job
        else:
            with pytest.raises(cancel.TimedOut):
                await job
        del job  # its exception's traceback holds the job's frames, and with them the job's outcome
        await _settle(ended)

    asyncio.run(scenario())
    assert never.messages == []
    assert pool.stats()["running"] + pool.stats()["waiting"] == 0
    pool.close()


# ---------------------------------------------------------------- the exit status

@pytest.mark.parametrize("signum, status", [(None, 0), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_run_returns_the_exit_status_of_the_signal_that_stopped_it(checkpoint, monkeypatch, capsys, signum, status):
    import uvicorn

    def fake_run(server, sockets=None):  # a server that stops at once: on its own, or on the signal
        if signum is not None:
            server.handle_exit(signum, None)

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    monkeypatch.setattr(serve_config, "check_can_listen", lambda host, port: None)  # 8000 may be taken
    assert main(["serve", "--checkpoint", str(checkpoint), "--log-level", "warning"]) == status
    err = capsys.readouterr().err
    said = f"stopped by {signal.Signals(signum).name} (exit status {status})" if signum else "stopped by"
    assert (said in err) == (signum is not None), err


def test_running_requests_get_5_seconds_to_finish_when_the_server_stops(checkpoint, monkeypatch):
    graces = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: graces.append(
        server.config.timeout_graceful_shutdown))
    monkeypatch.setattr(serve_config, "check_can_listen", lambda host, port: None)  # 8000 may be taken
    assert main(["serve", "--checkpoint", str(checkpoint), "--log-level", "warning"]) == 0
    assert graces == [5]  # the grace the docs and the 503's log line speak of


def test_the_servers_log_lines_say_whose_they_are_and_only_while_it_runs(capsys):
    log = logging.getLogger("pixelwise.serve")
    with _stderr_logging():
        log.info("a request was stopped")
    log.warning("after the server")
    err = capsys.readouterr().err
    assert "pixelwise serve: INFO: a request was stopped\n" in err, err
    assert "pixelwise serve: WARNING: after the server" not in err, err


def _serve(checkpoint, *flags):
    """``pixelwise serve --port 0`` in a subprocess -> (process, its URL read from the banner)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pixelwise", "serve", "--checkpoint", str(checkpoint),
                             "--port", "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    banner = proc.stdout.readline()  # printed once the server listens
    found = re.search(r"on (http://127\.0\.0\.1:(\d+)/)", banner)
    if not found or found[2] == "0":
        proc.kill()
        raise AssertionError(f"no bound port in the banner {banner!r}; stderr: {proc.communicate()[1]}")
    return proc, found[1]


def test_sigterm_during_a_prediction_answers_503_and_exits_143(checkpoint, tmp_path):
    """The real thing: ``pixelwise serve`` (port 0: the banner names the port bound), a prediction
    of thousands of tiles, SIGTERM; after the 5 s grace the client gets the JSON 503 and the
    process exits 143 with no traceback in its log. An idle server stopped by Ctrl-C exits 130."""
    proc, url = _serve(checkpoint)
    answer = {}

    def slow():  # 17956 tiles: minutes on a CPU
        r = httpx.post(url + "api/predict", files={"image": ("a.png", png(200, 200), "image/png")},
                       data={"tile": "16", "overlap": "0.9"}, timeout=120)
        answer.update(status=r.status_code, type=r.headers.get("content-type"),
                      retry=r.headers.get("retry-after"), body=r.text)

    client = threading.Thread(target=slow)
    try:
        client.start()
        for _ in range(600):
            if httpx.get(url + "api/health", timeout=30).json()["pool"]["running"] == 1:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the prediction never started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        client.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read()
    assert answer["status"] == 503 and answer["type"] == "application/json", (answer, log)
    assert "shutting down" in json.loads(answer["body"])["detail"] and int(answer["retry"]) >= 1
    assert "Traceback" not in log and "never retrieved" not in log, log
    assert "the server is shutting down; its prediction was stopped" in log
    assert "stopped by SIGTERM (exit status 143)" in log

    proc, url = _serve(checkpoint, "--log-level", "warning")
    try:
        assert httpx.get(url + "api/health", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()
