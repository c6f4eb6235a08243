"""The page in a real browser: ``pixelwise serve`` in a subprocess, Debian's Chromium driven by
Playwright (``executable_path``; Playwright's own browser download is never used). Skips with the
reason where Playwright or Chromium is missing (``.ci/run`` installs Chromium when it can).

The screenshot goes to ``$PIXELWISE_SCREENSHOT_DIR`` (default: the test's temporary folder)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise import create_model, save_checkpoint
from pixelwise.data.shapes import CLASS_NAMES, PALETTE, ShapesDataset

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[dev]'")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = os.environ.get("PIXELWISE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does so as root)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    torch.manual_seed(0)
    kw = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}
    ckpt = tmp_path / "unet.safetensors"
    save_checkpoint(ckpt, create_model("unet", num_classes=4, **kw).eval(),
                    {"model": "unet", "num_classes": 4, "model_kwargs": kw, "task": "semantic",
                     "class_names": CLASS_NAMES, "palette": PALETTE, "mean": [0.5] * 3, "std": [0.25] * 3})
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "pixelwise", "serve", "--checkpoint", str(ckpt),
                                 "--port", str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # until it answers (torch's import takes a while on a loaded machine)
            if proc.poll() is not None:
                pytest.fail("pixelwise serve exited: " + (tmp_path / "server.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("pixelwise serve never answered /api/health")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_page_segments_an_upload_and_a_sample_with_keyboard_and_mouse(server, tmp_path):
    executable = chromium_path()
    image = tmp_path / "scene.png"
    Image.fromarray(ShapesDataset(split="val", num_val=1, size=96).load(0).image).save(image)
    shots = Path(os.environ.get("PIXELWISE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except playwright.Error as e:
            pytest.skip(f"Chromium at {executable} does not start here: {str(e).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            outside: list[str] = []
            page.on("request", lambda r: r.url.startswith((server, "data:", "blob:")) or outside.append(r.url))
            page.goto(server + "/")
            page.wait_for_selector("main[data-state=ready]", timeout=60_000)
            assert "unet" in page.inner_text("#model-name")

            # an upload through the file input: overlay, legend, download link
            page.set_input_files("#image-input", str(image))
            page.wait_for_selector("main[data-state=done]", timeout=60_000)
            assert page.is_visible("#layer") and page.is_visible("#base-img")
            legend = page.locator("#legend tbody tr")
            assert legend.count() >= 1
            names = legend.all_inner_texts()
            assert all(any(n in row for n in CLASS_NAMES) and "%" in row for row in names), names
            href = page.get_attribute("#download", "href")
            assert href.startswith("data:image/png;base64,") and page.get_attribute("#download", "download") == \
                "scene_mask.png"
            assert page.is_hidden("#metrics-panel")

            # keyboard only: a sample (it brings its ground truth), then the opacity slider and the views
            page.focus(".sample >> nth=0")
            page.keyboard.press("Enter")
            page.wait_for_selector("#metrics-panel:not([hidden])", timeout=60_000)
            page.wait_for_selector("main[data-state=done]", timeout=60_000)
            assert "mIoU" in page.inner_text("#metrics-summary")
            assert page.locator("#confusion tbody tr").count() >= 1
            page.focus("#opacity")
            page.keyboard.press("ArrowRight")
            assert page.inner_text("#opacity-value") == "55%"
            page.focus("#view-overlay")
            page.keyboard.press("ArrowRight")  # radio group: to "Mask"
            assert page.is_visible("#mask-img") and page.is_hidden("#layer")
            page.keyboard.press("ArrowLeft")
            assert page.is_visible("#layer")
            page.screenshot(path=str(shots / "serve_page.png"), full_page=True)
            print(f"screenshot: {shots / 'serve_page.png'}")

            # the uncertainty map, asked for with the keyboard
            assert page.is_disabled("#view-uncertainty")
            page.focus("#uncertainty")
            page.keyboard.press("Space")
            page.focus("#run")
            page.keyboard.press("Enter")
            page.wait_for_selector("#view-uncertainty:not([disabled])", timeout=60_000)
            page.wait_for_selector("main[data-state=done]", timeout=60_000)
            page.check("#view-uncertainty")
            assert page.is_visible("#unc-img") and page.is_hidden("#layer")
            assert errors == [] and outside == []
        finally:
            browser.close()
    assert (shots / "serve_page.png").stat().st_size > 10_000
    assert np.asarray(Image.open(shots / "serve_page.png")).std() > 0
