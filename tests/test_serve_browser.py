"""The page in a real browser: ``pixelwise serve`` in a subprocess, Debian's Chromium driven by
Playwright (``executable_path``; Playwright's own browser download is never used). Skips with the
reason where Playwright or Chromium is missing (``.ci/run`` installs Chromium when it can).

One semantic server and one browser serve most tests of the module; the tests that need an API
key, an instance model or a server that stops start their own.

The screenshot goes to ``$PIXELWISE_SCREENSHOT_DIR`` (default: the test's temporary folder)."""

from __future__ import annotations

import base64
import io
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
SLOW = 60_000  # ms: a request on a loaded 2-core machine
KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}
MRCNN = {"min_size": 64, "max_size": 64, "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32}


def chromium_path() -> str:
    path = os.environ.get("PIXELWISE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does so as root)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """``pixelwise serve`` on a free port, once it answers /api/health (any status: a key may be needed)."""
    port = free_port()
    with open(log, "w") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "pixelwise", "serve", "--checkpoint", str(ckpt),
                                 "--port", str(port), "--log-level", "warning", *flags],
                                stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):  # until it answers (torch's import takes a while on a loaded machine)
        if proc.poll() is not None:
            pytest.fail("pixelwise serve exited: " + log.read_text()[-2000:])
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2):
                return proc, url
        except urllib.error.HTTPError:
            return proc, url
        except OSError:
            time.sleep(0.1)
    stop(proc)
    pytest.fail("pixelwise serve never answered /api/health")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Test images: two shapes scenes and their ground truths, a non-square crop as TIFF, PNG and
    PPM, a very wide and a very tall image, a file that is not an image; and a samples folder."""
    d = tmp_path_factory.mktemp("images")
    ds = ShapesDataset(split="val", num_val=2, size=96)
    out: dict[str, Path] = {}
    for i in range(2):
        s = ds.load(i)
        out[f"scene{i}"] = d / f"scene{i}.png"
        Image.fromarray(s.image).save(out[f"scene{i}"])
        out[f"truth{i}"] = d / f"scene{i}_gt.png"
        Image.fromarray(s.mask.astype(np.uint8)).save(out[f"truth{i}"])
    odd = Image.fromarray(ds.load(1).image[:48, :80])  # 80x48
    for suffix in ("tif", "ppm", "png"):
        out[f"odd.{suffix}"] = d / f"odd.{suffix}"
        odd.save(out[f"odd.{suffix}"])
    rng = np.random.default_rng(0)
    out["wide"] = d / "wide.png"
    Image.fromarray(rng.integers(0, 255, (40, 1600, 3), dtype=np.uint8)).save(out["wide"])
    out["tall"] = d / "tall.png"
    Image.fromarray(rng.integers(0, 255, (2400, 48, 3), dtype=np.uint8)).save(out["tall"])
    out["text"] = d / "text.png"
    out["text"].write_bytes(b"not an image at all\n" * 10)
    samples = d / "samples"
    (samples / "masks").mkdir(parents=True)
    shutil.copy(out["scene0"], samples / "a_scene.png")
    shutil.copy(out["truth0"], samples / "masks" / "a_scene.png")
    shutil.copy(out["odd.tif"], samples / "b_odd.tif")
    out["samples"] = samples
    return out


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("unet") / "unet.safetensors"
    save_checkpoint(ckpt, create_model("unet", num_classes=4, **KW).eval(),
                    {"model": "unet", "num_classes": 4, "model_kwargs": KW, "task": "semantic",
                     "class_names": CLASS_NAMES, "palette": PALETTE, "mean": [0.5] * 3, "std": [0.25] * 3})
    return ckpt


@pytest.fixture(scope="module")
def server(unet_checkpoint, files, tmp_path_factory):
    """The module's semantic server, its samples: a scene with its ground truth, and a TIFF."""
    proc, url = start_server(unet_checkpoint, tmp_path_factory.mktemp("log") / "server.log",
                             "--samples", str(files["samples"]))
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    with playwright.sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except playwright.Error as e:
            pytest.skip(f"Chromium at {executable} does not start here: {str(e).splitlines()[0]}")
        yield b
        b.close()


class Page:
    """A fresh page (its own context) that records page errors and requests to other hosts."""

    def __init__(self, browser, url: str, width: int = 1200, height: int = 1000, init_script: str | None = None):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        if init_script:
            self.context.add_init_script(init_script)
        self.page = self.context.new_page()
        self.url = url
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: r.url.startswith((url, "data:", "blob:")) or self.outside.append(r.url))

    def open(self, state: str = "ready"):
        self.page.goto(self.url + "/")
        self.page.wait_for_selector(f"main[data-state={state}]", timeout=SLOW)
        return self.page

    def close(self):
        self.context.close()
        assert self.errors == [] and self.outside == [], (self.errors, self.outside)


@pytest.fixture
def open_page(browser):
    pages: list[Page] = []

    def make(url: str, **kw) -> Page:
        pages.append(Page(browser, url, **kw))
        return pages[-1]

    yield make
    for p in pages:
        p.close()


def settled(page, timeout: int = SLOW) -> tuple[str, str]:
    """Waits for the page to finish (done or error) -> (state, status text)."""
    page.wait_for_function("() => ['done', 'error'].includes(document.getElementById('main').dataset.state)",
                           timeout=timeout)
    return page.evaluate("() => [document.getElementById('main').dataset.state, "
                         "document.getElementById('status').textContent]")


def shown(page) -> dict:
    """What the result panel shows: the base image's and the layer's sizes, the download's mask size and name."""
    info = page.evaluate("""() => { const b = document.getElementById('base-img'), c = document.getElementById('layer');
        const d = document.getElementById('download');
        return {base: [b.naturalWidth, b.naturalHeight], layer: [c.width, c.height], href: d.href, name: d.download,
                title: document.getElementById('result-name').textContent,
                stale: document.getElementById('result').dataset.stale || null}; }""")
    mask = Image.open(io.BytesIO(base64.b64decode(info.pop("href").split(",", 1)[1])))
    info["mask"] = list(mask.size)
    info["mask_mode"] = mask.mode
    return info


def file_payload(path: Path, mime: str = "image/png") -> dict:
    return {"name": path.name, "mimeType": mime, "buffer": path.read_bytes()}


MAKE_DT = """([bytes, name, type]) => { const dt = new DataTransfer();
    dt.items.add(new File([new Uint8Array(bytes)], name, {type})); return dt; }"""


def test_page_segments_an_upload_and_a_sample_with_keyboard_and_mouse(server, files, open_page, tmp_path):
    shots = Path(os.environ.get("PIXELWISE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    p = open_page(server)
    page = p.open()
    assert "unet" in page.inner_text("#model-name")

    # an upload through the file input: overlay, legend, download link
    answers = []
    page.on("response", lambda r: r.url.endswith("/api/predict") and answers.append(r))
    page.set_input_files("#image-input", str(files["scene0"]))
    page.wait_for_selector("main[data-state=done]", timeout=SLOW)
    assert page.is_visible("#layer") and page.is_visible("#base-img")
    legend = page.locator("#legend tbody tr")
    assert legend.count() >= 1
    names = legend.all_inner_texts()
    assert all(any(n in row for n in CLASS_NAMES) and "%" in row for row in names), names
    href = page.get_attribute("#download", "href")
    assert href.startswith("data:image/png;base64,") and page.get_attribute("#download", "download") == \
        "scene0_mask.png"
    assert page.is_hidden("#metrics-panel")
    # a semantic model's overlay is drawn from the mask: the page does not ask for the server's
    assert answers[-1].json()["overlay_png_base64"] is None

    # keyboard only: a sample (it brings its ground truth), then the opacity slider and the views
    page.focus(".sample >> nth=0")
    page.keyboard.press("Enter")
    page.wait_for_selector("#metrics-panel:not([hidden])", timeout=SLOW)
    page.wait_for_selector("main[data-state=done]", timeout=SLOW)
    assert "mIoU" in page.inner_text("#metrics-summary") and "Boundary IoU" in page.inner_text("#metrics-summary")
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
    page.wait_for_selector("#view-uncertainty:not([disabled])", timeout=SLOW)
    page.wait_for_selector("main[data-state=done]", timeout=SLOW)
    page.check("#view-uncertainty")
    assert page.is_visible("#unc-img") and page.is_hidden("#layer")
    # the CRF: off as the server is, then asked for with its box (DeepLab's settings)
    assert answers[-1].json()["options"]["crf"] is None and not page.is_checked("#crf")
    page.check("#crf")
    with page.expect_response(lambda r: r.url.endswith("/api/predict"), timeout=SLOW) as refined:
        page.click("#run")
    assert refined.value.json()["options"]["crf"]["iterations"] == 10
    page.wait_for_selector("main[data-state=done]", timeout=SLOW)
    assert (shots / "serve_page.png").stat().st_size > 10_000
    assert np.asarray(Image.open(shots / "serve_page.png")).std() > 0


# the first /api/predict answer is held back until the page has shown a later one: the worst order
HOLD_FIRST_PREDICT = """
(() => {
  const fetch0 = window.fetch;
  let first = true;
  window.fetch = async (...args) => {
    const hold = String(args[0]).endsWith('/api/predict') && first;
    if (hold) first = false;
    const response = await fetch0(...args);
    if (hold) {
      await new Promise((resolve) => {
        const poll = () => (document.getElementById('main').dataset.state === 'done'
          ? resolve() : setTimeout(poll, 20));
        poll();
      });
      await new Promise((resolve) => setTimeout(resolve, 300));
    }
    return response;
  };
})();
"""


def test_a_newer_image_replaces_the_one_being_segmented(server, files, open_page):
    """Defect 1: the result shown (image, layer, download) is always the newest choice's."""
    p = open_page(server, init_script=HOLD_FIRST_PREDICT)
    page = p.open()
    predicts = []
    page.on("request", lambda r: r.url.endswith("/api/predict") and predicts.append(r))
    page.set_input_files("#image-input", str(files["wide"]))  # 1600x40, its answer held back
    page.wait_for_selector("main[data-state=busy]")
    page.set_input_files("#image-input", str(files["scene1"]))  # 96x96, chosen while busy
    assert settled(page)[0] == "done"
    page.wait_for_timeout(800)  # the held answer is released now: it must change nothing
    assert len(predicts) == 2
    assert page.get_attribute("main", "data-state") == "done"
    assert "scene1.png" in page.inner_text("#status")
    assert shown(page) == {"base": [96, 96], "layer": [96, 96], "name": "scene1_mask.png", "mask": [96, 96],
                           "mask_mode": "P", "title": "for scene1.png", "stale": None}

    # a sample clicked while an upload is segmented wins too
    page.set_input_files("#image-input", str(files["wide"]))
    page.click(".sample >> nth=1")  # the TIFF sample, 80x48
    page.wait_for_function("() => document.getElementById('result-name').textContent === 'for b_odd.tif'",
                           timeout=SLOW)
    assert settled(page)[0] == "done"
    assert shown(page)["mask"] == [80, 48] and shown(page)["base"] == [80, 48]


def test_formats_the_browser_cannot_show_are_shown_from_the_servers_png(server, files, open_page):
    """Defect 2: TIFF and PPM uploads (and a TIFF sample) show the decoded image, of the right size."""
    p = open_page(server)
    page = p.open()
    answers = []
    page.on("response", lambda r: r.url.endswith("/api/predict") and answers.append(r))
    page.set_input_files("#image-input", str(files["scene0"]))
    assert settled(page)[0] == "done"
    assert answers[-1].json()["image_png_base64"] is None  # a PNG the browser shows itself
    for name in ("odd.tif", "odd.ppm"):
        page.set_input_files("#image-input", str(files[name]))
        state, status = settled(page)
        assert state == "done", status
        assert shown(page) == {"base": [80, 48], "layer": [80, 48], "name": "odd_mask.png", "mask": [80, 48],
                               "mask_mode": "P", "title": f"for {name}", "stale": None}
        assert answers[-1].json()["image_png_base64"]
        assert page.is_visible("#base-img")
    # the TIFF sample: its thumbnail shows (the server sends it as PNG) and it segments
    assert page.evaluate("() => document.querySelectorAll('.sample img')[1].naturalWidth") == 80
    page.click(".sample >> nth=1")
    page.wait_for_function("() => document.getElementById('result-name').textContent === 'for b_odd.tif'",
                           timeout=SLOW)
    assert shown(page)["base"] == [80, 48]


def test_an_image_the_browser_turns_otherwise_is_shown_as_segmented(server, files, open_page, tmp_path):
    """A WebP with an EXIF orientation (browsers do not turn WebP by it; the server does) and a JPEG
    whose orientation is only in XMP were shown unturned, stretched under the turned mask."""
    odd = Image.open(files["odd.png"]).convert("RGB")  # 80x48 stored: 48x80 turned
    exif = Image.Exif()
    exif[274] = 6
    odd.save(tmp_path / "turned.webp", exif=exif.tobytes(), lossless=True)
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    odd.save(tmp_path / "xmp.jpg", xmp=xmp.encode())
    p = open_page(server)
    page = p.open()
    for name in ("turned.webp", "xmp.jpg"):
        page.set_input_files("#image-input", str(tmp_path / name))
        state, status = settled(page)
        assert state == "done", status
        got = shown(page)
        assert (got["base"], got["layer"], got["mask"]) == ([48, 80], [48, 80], [48, 80]), (name, got)
    # a WebP turned half round (its size unchanged) whose name says PNG, and one without an extension:
    # the page told WebP from the type the browser guesses from the name, and showed it upside down
    exif[274] = 3
    odd.save(tmp_path / "webp.png", format="WEBP", exif=exif.tobytes(), lossless=True)
    answers = []
    page.on("response", lambda r: r.url.endswith("/api/predict") and answers.append(r))
    frames = [Image.new("RGB", (80, 48), colour) for colour in ((200, 30, 30), (30, 200, 30))]
    frames[0].save(tmp_path / "moving.png", save_all=True, append_images=frames[1:])  # an APNG: the browser plays it
    for payload in (str(tmp_path / "webp.png"), {**file_payload(tmp_path / "webp.png", ""), "name": "webp"},
                    str(tmp_path / "moving.png")):
        page.set_input_files("#image-input", payload)
        state, status = settled(page)
        assert state == "done", status
        assert answers[-1].json()["image_png_base64"], "the server's turned image is what the page shows"


def test_ground_truth_before_the_image_is_used_and_one_added_later_reruns(server, files, open_page):
    """Defect 4: the order the form suggests works, and nothing is dropped without a word."""
    p = open_page(server)
    page = p.open()
    page.set_input_files("#truth-input", str(files["truth0"]))
    assert "scene0_gt.png" in page.inner_text("#truth-name")
    page.set_input_files("#image-input", str(files["scene0"]))
    assert settled(page)[0] == "done"
    assert page.is_visible("#metrics-panel") and "mIoU" in page.inner_text("#metrics-summary")

    # the next image: that ground truth was for scene0, so it is removed, and the page says so
    page.set_input_files("#image-input", str(files["scene1"]))
    state, status = settled(page)
    assert state == "done" and "scene0_gt.png" in status and "removed" in status
    assert "removed" in page.inner_text("#truth-name") and page.is_hidden("#metrics-panel")
    assert page.is_hidden("#truth-clear")

    # a ground truth added to the result shown: segmented again, with the metrics
    page.set_input_files("#truth-input", str(files["truth1"]))
    page.wait_for_selector("#metrics-panel:not([hidden])", timeout=SLOW)
    assert settled(page)[0] == "done" and "scene1.png" in page.inner_text("#status")
    # removed again: the metrics go with it
    page.click("#truth-clear")
    assert page.is_hidden("#metrics-panel")
    assert page.evaluate("() => document.activeElement.id") == "truth-input"


HOLD_PREDICTS = """
(() => {
  const fetch0 = window.fetch;
  window.fetch = async (...args) => {
    const response = await fetch0(...args);
    if (String(args[0]).endsWith('/api/predict')) {
      await new Promise((resolve) => {
        const poll = () => (window.releasePredicts ? resolve() : setTimeout(poll, 20));
        poll();
      });
    }
    return response;
  };
})();
"""


def test_a_samples_ground_truth_goes_with_the_sample_and_a_removed_one_gives_no_metrics(server, files, open_page):
    """A sample's ground truth stayed when the sample's request did not finish (refused, aborted)
    and was scored against the user's next image; a ground truth removed while its request ran
    still had its metrics shown."""
    p = open_page(server)
    page = p.open()
    page.route("**/api/predict", lambda route: route.fulfill(
        status=422, content_type="application/json", body='{"detail": "tile must be at least 16"}'))
    page.click(".sample >> nth=0")  # the scene with its ground truth: refused
    state, status = settled(page)
    assert state == "error" and "422" in status, status
    page.unroute("**/api/predict")
    sent: list[bytes] = []
    page.on("request", lambda r: r.url.endswith("/api/predict") and sent.append(r.post_data_buffer or b""))
    page.set_input_files("#image-input", str(files["scene1"]))
    state, status = settled(page)
    assert state == "done" and "removed" in status and "the sample" in status, status
    assert page.is_hidden("#metrics-panel") and b'name="ground_truth"' not in sent[-1]

    p = open_page(server, init_script=HOLD_PREDICTS)
    page = p.open()
    page.set_input_files("#truth-input", str(files["truth0"]))
    page.set_input_files("#image-input", str(files["scene0"]))
    page.wait_for_selector("main[data-state=busy]")
    page.click("#truth-clear")  # while the request (with that ground truth) runs
    page.evaluate("() => { window.releasePredicts = true; }")
    assert settled(page)[0] == "done"
    assert page.is_hidden("#metrics-panel") and page.inner_text("#truth-name") == ""

    # removed in the same moment the image is chosen (while the page reads the file): not sent at all
    page = open_page(server).open()
    page.set_input_files("#truth-input", str(files["truth0"]))
    sent = []
    page.on("request", lambda r: r.url.endswith("/api/predict") and sent.append(r.post_data_buffer or b""))
    page.evaluate("""(bytes) => { chooseImage(new File([new Uint8Array(bytes)], "scene0.png", {type: "image/png"}),
                                             "scene0.png");
                                 document.getElementById("truth-clear").click(); }""",
                  list(files["scene0"].read_bytes()))
    assert settled(page)[0] == "done"
    assert page.inner_text("#truth-name") == "" and b'name="ground_truth"' not in sent[-1]


def test_the_overlay_clears_the_background_class_by_its_exact_colour(server, open_page):
    """The page cleared every class whose colour was within 4 of the background's, which predict's
    overlay colours: a palette of [0, 0, 0] and [2, 1, 0] showed class 1 as background."""
    buf = io.BytesIO()
    mask = Image.fromarray(np.array([[0, 1, 2, 1]], dtype=np.uint8), mode="P")
    mask.putpalette([0, 0, 0, 2, 1, 0, 30, 60, 220])
    mask.save(buf, format="PNG")
    p = open_page(server)
    page = p.open()
    alpha = page.evaluate("""async (b64) => {
        state.info.classes = [{id: 0, name: "bg", color: [0, 0, 0], clear: true},
                              {id: 1, name: "dark", color: [2, 1, 0], clear: false},
                              {id: 2, name: "blue", color: [30, 60, 220], clear: false}];
        const view = await prepare({task: "semantic", width: 4, height: 1, mask_png_base64: b64},
                                   {showable: false, blob: null});
        return Array.from(view.layer.getContext("2d").getImageData(0, 0, 4, 1).data.filter((_, i) => i % 4 === 3));
    }""", base64.b64encode(buf.getvalue()).decode())
    assert alpha == [0, 255, 255, 255]


def test_a_failed_request_marks_the_old_result(server, files, open_page):
    """Defect 8: after a failure the earlier result is dimmed and says whose it is."""
    p = open_page(server)
    page = p.open()
    page.set_input_files("#image-input", str(files["scene0"]))
    assert settled(page)[0] == "done"
    page.set_input_files("#image-input", file_payload(files["text"]))
    state, status = settled(page)
    assert state == "error" and "Could not segment text.png: 415" in status
    info = shown(page)
    assert info["stale"] == "old" and info["title"] == "for scene0.png" and info["name"] == "scene0_mask.png"
    note = page.inner_text("#result-note")
    assert "text.png" in note and "scene0.png" in note and page.is_visible("#result-note")
    # a full queue (the server's 503, as pool.PoolFull words it): "retry in" once, not twice
    page.route("**/api/predict", lambda route: route.fulfill(
        status=503, headers={"Retry-After": "7"}, content_type="application/json",
        body='{"detail": "the server is busy (2 requests running or waiting); retry in 7 s"}'))
    page.set_input_files("#image-input", str(files["scene1"]))
    state, status = settled(page)
    assert state == "error" and status.count("retry in") == 1 and status.endswith("retry in 7 s"), status
    page.unroute("**/api/predict")
    # a bad option is caught by the page, with the field's own message
    page.fill("#tile", "16.5")
    page.click("#run")
    assert page.get_attribute("main", "data-state") == "error"
    assert page.inner_text("#status").startswith("Tile side")
    assert page.evaluate("() => document.activeElement.id") == "tile"
    page.fill("#tile", "1e3")  # a whole number to the browser and to the server
    page.set_input_files("#image-input", str(files["scene0"]))
    state, status = settled(page)
    assert state == "done", status


def test_very_tall_and_very_wide_images_fit_the_window(server, files, open_page):
    """Defect 14: the stage keeps the aspect, fits the window, and the rest stays in reach."""
    p = open_page(server)
    page = p.open()
    for name, size in (("tall", [48, 2400]), ("wide", [1600, 40])):
        page.set_input_files("#image-input", str(files[name]))
        assert settled(page)[0] == "done"
        assert shown(page)["base"] == size
        box = page.evaluate("""() => { const r = (id) => document.getElementById(id).getBoundingClientRect();
            const w = r('stage-wrap'), b = r('base-img'), c = r('layer');
            return {wrap: [w.width, w.height], base: [b.width, b.height], layer: [c.width, c.height],
                    download: r('download').top - r('result').top, inner: [innerWidth, innerHeight],
                    scroll: document.documentElement.scrollWidth}; }""")
        assert box["wrap"][1] <= 0.7 * box["inner"][1] + 1, box
        assert box["download"] < box["inner"][1], box  # the download link and the legend are near
        assert box["scroll"] <= box["inner"][0], box  # the page itself does not scroll sideways
        assert abs(box["base"][0] / box["base"][1] - size[0] / size[1]) < 0.01 * size[0] / size[1], box
        assert box["layer"] == box["base"], box  # the overlay lies on the image
        assert min(box["base"]) >= min(size), box  # the thin side is readable (at least its own size)


def test_phone_width_and_drops_outside_the_box(server, files, open_page):
    """Defects 15 and 16: nothing scrolls the page sideways on a phone; drops outside the box do
    not leave the page, and the highlight stays while over the box's own children."""
    p = open_page(server, width=360, height=740)
    page = p.open()
    page.click(".sample >> nth=0")  # with its ground truth: the IoU table and the confusion matrix
    page.wait_for_selector("#metrics-panel:not([hidden])", timeout=SLOW)
    assert settled(page)[0] == "done"
    assert page.evaluate("() => document.documentElement.scrollWidth <= innerWidth")

    dt = page.evaluate_handle(MAKE_DT, [list(files["scene1"].read_bytes()), "dropped.png", "image/png"])
    label = page.query_selector("#drop label")
    header = page.query_selector("header")
    page.dispatch_event("#drop", "dragenter", {"dataTransfer": dt})
    page.dispatch_event("#drop", "dragleave", {"dataTransfer": dt, "relatedTarget": label})  # onto its label
    assert "over" in page.get_attribute("#drop", "class")
    page.dispatch_event("#drop label", "dragleave", {"dataTransfer": dt, "relatedTarget": header, "bubbles": True})
    assert "over" not in page.get_attribute("#drop", "class")
    prevented = page.evaluate("""(dt) => {
        const e = new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true});
        document.querySelector('header').dispatchEvent(e); return e.defaultPrevented; }""", dt)
    assert prevented and page.url == server + "/"
    assert "drop it on" in page.inner_text("#status")
    page.dispatch_event("#drop", "drop", {"dataTransfer": dt})
    assert settled(page)[0] == "done"
    assert shown(page)["name"] == "dropped_mask.png"
    # a long file name without spaces wraps, in the result's heading too
    long_name = {**file_payload(files["scene1"]), "name": "a" * 180 + ".png"}
    page.set_input_files("#image-input", long_name)
    page.wait_for_function("() => document.getElementById('result-name').textContent.endsWith('a.png')",
                           timeout=SLOW)
    assert settled(page)[0] == "done"
    wide = page.evaluate("""() => {  // the page's width, the window's, and each text that ends past it
        const r = document.createRange(), out = [document.documentElement.scrollWidth, innerWidth];
        const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
        while (walk.nextNode()) {
          r.selectNodeContents(walk.currentNode);
          const right = r.getBoundingClientRect().right, parent = walk.currentNode.parentElement;
          if (right > innerWidth + 1) out.push([parent.id || parent.tagName, right]);
        }
        return out; }""")
    assert page.evaluate("() => document.documentElement.scrollWidth <= innerWidth"), wide


def test_key_errors_and_an_unreachable_server(unet_checkpoint, files, open_page, tmp_path):
    """Defects 5, 6, 9 and 10: before the model info loads nothing can be chosen and nothing throws;
    a rejected key, a key the browser cannot send and a stopped server each get their own words."""
    proc, url = start_server(unet_checkpoint, tmp_path / "server.log", "--api-key", "s3cret")
    try:
        p = open_page(url)
        page = p.open("error")
        status = page.inner_text("#status")
        assert "needs an API key" in status and page.is_visible("#key-panel")
        assert page.is_disabled("#image-input") and page.is_disabled("#run") and page.is_disabled("#tile")
        # pasted before the key: kept for later, no error thrown
        page.evaluate("(dt) => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}))",
                      page.evaluate_handle(MAKE_DT, [list(files["scene0"].read_bytes()), "p.png", "image/png"]))
        assert "once it has" in page.inner_text("#status")

        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        page.wait_for_function("() => /rejected/.test(document.getElementById('status').textContent)", timeout=SLOW)
        assert "rejected" in page.inner_text("#key-message")
        page.fill("#key-input", "k€y")
        page.press("#key-input", "Enter")
        assert "cannot send" in page.inner_text("#status") and "€" in page.inner_text("#key-message")

        page.fill("#key-input", "s3cret")
        page.press("#key-input", "Enter")
        page.wait_for_selector("main[data-state=done]", timeout=SLOW)  # the pasted image is segmented now
        assert "Segmented pasted.png" in page.inner_text("#status")
        # entering the key again keeps the options the user changed
        page.fill("#tile", "48")
        page.evaluate("() => document.getElementById('key-form').requestSubmit()")
        page.wait_for_selector("main[data-state=ready]", timeout=SLOW)
        assert page.input_value("#tile") == "48"

        stop(proc)
        page.click(".sample >> nth=0")  # its ground truth must be fetched: the server is gone
        page.wait_for_function("() => document.getElementById('main').dataset.state === 'error'", timeout=SLOW)
        assert "Could not load sample shapes_0.png: the server cannot be reached" in page.inner_text("#status")
        page.set_input_files("#image-input", str(files["scene1"]))
        state, status = settled(page)
        assert state == "error" and "Could not segment scene1.png: the server cannot be reached" in status, status
        assert "Failed to fetch" not in status
        assert shown(page)["stale"] == "old"
    finally:
        stop(proc)


def test_instance_models_show_each_instances_overlay_colour(files, open_page, tmp_path):
    """Defect 3 and the score threshold: the Instances table has each instance's overlay colour;
    the legend says its colours are the Mask view's."""
    torch.manual_seed(0)
    ckpt = tmp_path / "mrcnn.safetensors"
    save_checkpoint(ckpt, create_model("maskrcnn_resnet18_fpn", num_classes=4, **MRCNN).eval(),
                    {"model": "maskrcnn_resnet18_fpn", "num_classes": 4, "model_kwargs": MRCNN,
                     "task": "instance", "class_names": CLASS_NAMES, "palette": PALETTE})
    proc, url = start_server(ckpt, tmp_path / "server.log", "--score-thresh", "0.9")
    try:
        p = open_page(url)
        page = p.open()
        assert page.is_visible("#score-thresh") and page.is_hidden("#tile")
        assert page.input_value("#score-thresh") == "0.9"
        page.fill("#score-thresh", "0")
        answers = []
        page.on("response", lambda r: r.url.endswith("/api/predict") and answers.append(r))
        page.set_input_files("#image-input", str(files["scene0"]))
        state, status = settled(page, timeout=120_000)
        assert state == "done", status
        body = answers[-1].json()
        assert min(d["score"] for d in body["instances"] or [{"score": 0}]) < 0.9  # the page's threshold went
        assert body["instances"], "the random model found nothing at score 0"
        assert body["overlay_png_base64"]
        assert page.is_visible("#legend-note") and "Mask" in page.inner_text("#legend-note")
        colours = page.evaluate("() => [...document.querySelectorAll('#instances tbody tr')].map("
                                "(r) => r.querySelector('.swatch')?.style.backgroundColor)")
        assert colours == [f"rgb({r}, {g}, {b})" for r, g, b in (d["color"] for d in body["instances"])]
    finally:
        stop(proc)


def test_a_ground_truth_can_be_the_training_datasets_label_file(server, files, open_page, tmp_path):
    """The page read every ground truth as class ids: an ISBI label's cells (stored 255) were all
    'ignore'. Where the model's dataset stores labels its own way the page offers that reading."""
    p = open_page(server)
    assert p.open().is_hidden("#truth-format-box")  # shapes: its masks are class ids
    torch.manual_seed(0)
    ckpt = tmp_path / "isbi.safetensors"
    save_checkpoint(ckpt, create_model("unet", num_classes=2, **KW).eval(),
                    {"model": "unet", "num_classes": 2, "model_kwargs": KW, "task": "semantic",
                     "dataset": "isbi2012", "class_names": ["membrane", "cell"],
                     "palette": [[0, 0, 0], [255, 255, 255]], "mean": [0.5] * 3, "std": [0.25] * 3})
    label = np.zeros((48, 64), np.uint8)
    label[:, 24:] = 255  # 1920 cell pixels, 1152 membrane
    Image.fromarray(label).save(tmp_path / "label.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64), dtype=np.uint8)).save(tmp_path / "em.png")
    samples = tmp_path / "samples"  # a sample's ground truth holds class ids whatever the select says
    (samples / "masks").mkdir(parents=True)
    shutil.copy(tmp_path / "em.png", samples / "em.png")
    Image.fromarray((label // 255).astype(np.uint8)).save(samples / "masks" / "em.png")
    proc, url = start_server(ckpt, tmp_path / "server.log", "--samples", str(samples))
    try:
        page = open_page(url).open()
        assert page.is_visible("#truth-format-box")
        assert "white (>= 128) = cell" in page.inner_text("#truth-format-dataset")
        page.select_option("#truth-format", "dataset")
        answers = []
        page.on("response", lambda r: r.url.endswith("/api/predict") and answers.append(r))
        page.set_input_files("#truth-input", str(tmp_path / "label.png"))
        page.set_input_files("#image-input", str(tmp_path / "em.png"))
        state, status = settled(page)
        assert state == "done", status
        metrics = answers[-1].json()["metrics"]
        assert metrics["ignored_pixels"] == 0
        assert [c["pixels"] for c in metrics["per_class"]] == [1152, 1920]
        # with "dataset" still selected, the sample's class ids 0/1 were read as gray levels: all membrane
        page.click(".sample >> nth=0")
        for _ in range(SLOW // 100):  # until the sample's answer came
            if len(answers) > 1:
                break
            page.wait_for_timeout(100)
        state, status = settled(page)
        assert state == "done", status
        assert len(answers) == 2
        assert [c["pixels"] for c in answers[-1].json()["metrics"]["per_class"]] == [1152, 1920]
    finally:
        stop(proc)
