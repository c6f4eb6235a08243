"""``pixelwise serve`` through the ASGI client: the API gives what ``pixelwise predict`` writes, refuses
bad input with the right status, stays within its limits and its queue, and never dies."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import io
import json
import re
import struct
import threading
import types
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, features

from conftest import wait_for
from pixelwise import Predictor, create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.data.shapes import CLASS_NAMES, PALETTE, ShapesDataset
from pixelwise.errors import UserError
from pixelwise.metrics import BoundaryIoUMeter

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) drives the ASGI app")

from pixelwise.inference import cancel  # noqa: E402
from pixelwise.inference.predictor import SemanticPredictor  # noqa: E402
from pixelwise.inference.writers import instance_colors  # noqa: E402
from pixelwise.serve import app as app_module  # noqa: E402
from pixelwise.serve import pool as pool_module  # noqa: E402
from pixelwise.serve.app import Wanted, create_app, with_options  # noqa: E402 - after the skips
from pixelwise.serve.config import ServeConfig, check_can_listen, host_warning  # noqa: E402
from pixelwise.serve.pool import InferencePool, PoolFull  # noqa: E402
from pixelwise.serve.results import class_shares, instance_result  # noqa: E402
from pixelwise.serve.samples import MAX_SAMPLES, folder_samples, shapes_samples  # noqa: E402
from pixelwise.serve.uploads import MAX_FIELD_BYTES, MAX_PARTS, Part, UploadError, read_multipart  # noqa: E402

KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}
CATEGORY_IDS = [0, 3, 7, 90]  # a COCO-style dataset's own ids of the classes (not 0..3)
MRCNN = {"min_size": 64, "max_size": 64, "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32}


def _unet_checkpoint(path, dropout=0.0):
    torch.manual_seed(0)
    kw = {**KW, "dropout": dropout}
    model = create_model("unet", num_classes=4, **kw).eval()
    save_checkpoint(path, model, {"model": "unet", "num_classes": 4, "model_kwargs": kw, "task": "semantic",
                                  "class_names": CLASS_NAMES, "palette": PALETTE, "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _unet_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet.safetensors")


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def instance_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("maskrcnn_resnet18_fpn", num_classes=4, **MRCNN).eval()
    path = tmp_path_factory.mktemp("mrcnn") / "mrcnn.safetensors"
    save_checkpoint(path, model, {"model": "maskrcnn_resnet18_fpn", "num_classes": 4, "model_kwargs": MRCNN,
                                  "task": "instance", "class_names": CLASS_NAMES, "palette": PALETTE,
                                  "category_ids": CATEGORY_IDS})
    return path


def request(app, method, url, **kw):
    """One request through the ASGI app (no network, no server)."""

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
            return await c.request(method, url, **kw)

    return asyncio.run(go())


def png_bytes(array, fmt="PNG", **save):
    buf = io.BytesIO()
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(buf, format=fmt, **save)
    return buf.getvalue()


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def post_image(app, data, name="a.png", ctype="image/png", fields=None, **kw):
    return request(app, "POST", "/api/predict", files={"image": (name, data, ctype)}, data=fields or {}, **kw)


def decode_png(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def without_record(path):
    """A mask `predict` wrote, less the tEXt chunk of its record (which the API's masks do not
    carry), checked to be there: byte for byte the rest of the file."""
    data, chunks, records, pos = path.read_bytes(), [], [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        (records if kind == b"tEXt" else chunks).append(data[pos : pos + 12 + length])
        pos += 12 + length
    assert [r[8:18] for r in records] == [b"pixelwise\0"]
    return data[:8] + b"".join(chunks)


def _odd_images(folder):
    """Files of the modes `predict` handles: RGB, gray, RGBA, 16-bit, palette, JPEG, EXIF-rotated JPEG."""
    rgb = noise(37, 53)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 65535, (29, 41)).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif.tobytes())
    return sorted(folder.iterdir())


# ---------------------------------------------------------------- the API gives what predict writes

def test_api_mask_and_overlay_equal_the_files_predict_writes(checkpoint, predictor, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = _odd_images(inputs)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(inputs), "--out", str(out), "--no-progress"]) == 0
    app = create_app(predictor, samples=[])
    for path in files:
        ctype = "image/jpeg" if path.suffix == ".jpg" else "image/png"
        r = post_image(app, path.read_bytes(), path.name, ctype)
        assert r.status_code == 200, (path.name, r.text)
        body = r.json()
        assert base64.b64decode(body["mask_png_base64"]) == without_record(out / f"{path.stem}.png"), path.name
        mask = decode_png(body["mask_png_base64"])
        assert mask.mode == "P" and (body["width"], body["height"]) == mask.size
        assert np.array_equal(np.asarray(decode_png(body["overlay_png_base64"])),
                              np.asarray(Image.open(out / f"{path.stem}_overlay.png"))), path.name
        shares = {c["name"]: c["pixels"] for c in body["classes"]}
        assert list(shares) == CLASS_NAMES and sum(shares.values()) == mask.size[0] * mask.size[1]
        for c in body["classes"]:
            assert c["pixels"] == int((np.asarray(mask) == c["id"]).sum())
            assert c["color"] == list(PALETTE[c["id"]])


def test_api_options_tile_tta_uncertainty_match_predict(checkpoint, predictor, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(noise(70, 90, seed=3)))
    out = tmp_path / "o"
    assert main(["predict", "--checkpoint", str(checkpoint), str(img), "--out", str(out), "--tile", "32",
                 "--tta", "d4", "--uncertainty", "--no-progress"]) == 0
    r = post_image(create_app(predictor, samples=[]), img.read_bytes(),
                   fields={"tile": "32", "tta": "d4", "uncertainty": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["options"]["tile"] == 32 and body["options"]["tta"] == "d4"
    assert base64.b64decode(body["mask_png_base64"]) == without_record(out / "a.png")
    assert base64.b64decode(body["uncertainty_png_base64"]) == (out / "a_uncertainty.png").read_bytes()
    # the server's own predictor is untouched by one request's options
    plain = post_image(create_app(predictor, samples=[]), img.read_bytes()).json()
    assert plain["options"]["tile"] is None and plain["options"]["tta"] is None
    assert body["options"]["overlap"] == predictor.overlap and plain["options"]["overlap"] is None  # none acted
    assert plain["uncertainty_png_base64"] is None


def test_api_instances_equal_the_files_predict_writes(instance_checkpoint, tmp_path):
    from pixelwise.data.shapes import ShapesDataset

    img = tmp_path / "scene.png"
    img.write_bytes(png_bytes(ShapesDataset(split="test", num_test=1, size=64).load(0).image))
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(instance_checkpoint), str(img), "--out", str(out),
                 "--score-thresh", "0", "--no-progress"]) == 0
    app = create_app(Predictor.from_checkpoint(instance_checkpoint, score_thresh=0.0), samples=[])
    r = post_image(app, img.read_bytes(), "scene.png")
    assert r.status_code == 200, r.text
    body = r.json()
    expected = json.loads((out / "scene.json").read_text())
    assert body["task"] == "instance" and len(expected["instances"]) > 0
    colors = [instance.pop("color") for instance in body["instances"]]  # the API adds each one's overlay colour
    assert body["instances"] == expected["instances"]
    assert all(i["category_id"] == CATEGORY_IDS[i["label"]] for i in expected["instances"])
    assert colors == [list(c) for c in instance_colors(len(colors))] and len(set(map(tuple, colors))) == len(colors)
    assert base64.b64decode(body["mask_png_base64"]) == without_record(out / "scene.png")
    assert np.array_equal(np.asarray(decode_png(body["overlay_png_base64"])),
                          np.asarray(Image.open(out / "scene_overlay.png")))
    # semantic-only options are refused by name
    for field, value in (("tile", "32"), ("tta", "flip"), ("uncertainty", "true")):
        bad = post_image(app, img.read_bytes(), fields={field: value})
        assert bad.status_code == 422 and field in bad.json()["detail"], (field, bad.text)


# ---------------------------------------------------------------- info, health, page, docs

def test_instance_result_draws_the_overlay_by_default_and_only_when_asked():
    """A library caller's instance_result: the overlay unless with_overlay=False (then null), the
    class mask the covered pixels' class, without a model."""
    image = np.zeros((6, 8, 3), np.uint8)
    masks = torch.zeros((1, 6, 8), dtype=torch.bool)  # as InstancePredictor gives them
    masks[0, 1:3, 2:5] = True
    det = {"masks": masks, "labels": torch.tensor([1]), "boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0]]),
           "scores": torch.tensor([0.9])}
    expected = np.zeros((6, 8), np.uint8)
    expected[1:3, 2:5] = 1
    out, classes = instance_result(image, det, ["bg", "thing"], [(0, 0, 0), (255, 0, 0)])
    np.testing.assert_array_equal(classes, expected)
    overlay = Image.open(io.BytesIO(base64.b64decode(out["overlay_png_base64"])))
    assert overlay.size == (8, 6) and np.asarray(overlay.convert("RGB")).any()  # drawn over a black image
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask_png_base64"])))),
                                  expected)
    bare, classes = instance_result(image, det, ["bg", "thing"], [(0, 0, 0), (255, 0, 0)], with_overlay=False)
    assert bare["overlay_png_base64"] is None and bare["image_png_base64"] is None
    assert [i["color"] for i in bare["instances"]] == [i["color"] for i in out["instances"]]
    np.testing.assert_array_equal(classes, expected)


def test_class_shares_count_pixels_and_colour_classes_past_the_palette_white():
    """Hand-counted 2 x 4 mask: 5 pixels of class 0, 2 of class 1, 1 of class 2 (of 8); the palette
    colours only classes 0 and 1, so class 2 is white, like the page's legend. Shares to 6 places."""
    mask = np.array([[0, 0, 1, 2], [0, 0, 0, 1]], np.uint8)
    got = class_shares(mask, ["bg", "cat", "dog"], [(0, 0, 0), (10, 20, 30)])
    assert got == [{"id": 0, "name": "bg", "color": [0, 0, 0], "pixels": 5, "share": 0.625},
                   {"id": 1, "name": "cat", "color": [10, 20, 30], "pixels": 2, "share": 0.25},
                   {"id": 2, "name": "dog", "color": [255, 255, 255], "pixels": 1, "share": 0.125}]
    third = class_shares(np.array([[0, 1, 1]], np.uint8), ["bg", "cat"], [(0, 0, 0), (1, 1, 1)])
    assert [c["share"] for c in third] == [0.333333, 0.666667]


def test_info_health_and_samples(predictor):
    app = create_app(predictor)
    info = request(app, "GET", "/api/info").json()
    assert info["model"] == "unet" and info["task"] == "semantic"
    assert [c["name"] for c in info["classes"]] == CLASS_NAMES
    assert [c["color"] for c in info["classes"]] == [list(c) for c in PALETTE]
    assert info["input"]["mean"] == [0.5] * 3 and info["input"]["normalize"] is True
    assert info["limits"] == {"max_upload_bytes": 20 * 2**20, "max_pixels": 40_000_000, "workers": 1, "queue": 64}
    assert info["uncertainty"] == "entropy"
    assert len(info["samples"]) == 3 and all(s["ground_truth_url"] for s in info["samples"])
    sample = request(app, "GET", info["samples"][0]["url"])
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
    truth = request(app, "GET", info["samples"][0]["ground_truth_url"])
    assert Image.open(io.BytesIO(truth.content)).mode == "P"
    assert request(app, "GET", "/api/samples/nope.png").status_code == 404
    health = request(app, "GET", "/api/health").json()
    assert health == {"status": "ok", "model": "unet", "pool": {"workers": 1, "queue": 64, "running": 0, "waiting": 0}}


def test_info_names_the_files_it_serves_as_read_when_it_started(checkpoint, tmp_path):
    """Nothing said which model a running server predicts with: a checkpoint written over since
    (a training run's best.safetensors) is not it. /api/info gives each file's name and SHA-256 as
    read at start, as the masks predict writes record them; a model in memory has no file."""
    import hashlib
    import shutil

    served = shutil.copy(checkpoint, tmp_path / "best.safetensors")
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    app = create_app(Predictor.from_checkpoint(served), samples=[])
    _unet_checkpoint(tmp_path / "new.safetensors", dropout=0.5).replace(served)  # a training run lands a new best
    info = request(app, "GET", "/api/info").json()
    assert info["model_files"] == [{"file": "best.safetensors", "sha256": sha}]
    assert sha != hashlib.sha256(served.read_bytes()).hexdigest()
    in_memory = SemanticPredictor(create_model("unet", 4, base_channels=4).eval())
    assert request(create_app(in_memory, samples=[]), "GET", "/api/info").json()["model_files"] == [None]


def test_info_gives_white_to_classes_the_palette_does_not_colour(predictor):
    short = copy.copy(predictor)
    short.palette = list(predictor.palette[:2])  # a checkpoint whose palette lists fewer colours than classes
    info = request(create_app(short, samples=[]), "GET", "/api/info").json()
    assert [c["color"] for c in info["classes"]] == [list(PALETTE[0]), list(PALETTE[1]), [255, 255, 255],
                                                       [255, 255, 255]]


def test_samples_from_a_folder(predictor, tmp_path):
    (tmp_path / "masks").mkdir()
    Image.fromarray(noise(20, 30)).save(tmp_path / "street.png")
    Image.fromarray(np.full((20, 30), 2, np.uint8)).save(tmp_path / "masks" / "street.png")
    (tmp_path / "notes.txt").write_text("not an image")
    scan = np.random.default_rng(1).integers(0, 65535, (24, 36), dtype=np.uint16)
    Image.fromarray(scan).save(tmp_path / "scan.tif")  # 16-bit TIFF: no browser shows it
    app = create_app(predictor, ServeConfig(samples_dir=tmp_path))
    samples = request(app, "GET", "/api/info").json()["samples"]
    assert [s["name"] for s in samples] == ["scan.tif", "street.png"] and samples[1]["ground_truth_url"]
    tif = request(app, "GET", samples[0]["url"])
    assert tif.headers["content-type"] == "image/png"  # offered as a PNG of the same decoded pixels
    direct = post_image(app, (tmp_path / "scan.tif").read_bytes(), "scan.tif", "image/tiff").json()
    via_sample = post_image(app, tif.content, "scan.tif").json()
    assert direct["mask_png_base64"] == via_sample["mask_png_base64"]


def test_folder_samples_keep_the_bytes_of_formats_browsers_show_and_convert_the_rest(tmp_path):
    """Hand-listed: WebP, JPEG, GIF, BMP and PNG files are offered byte for byte; a PPM (no browser
    shows it) as a PNG of the same pixels; a mask of another size is a problem, not ground truth."""
    (tmp_path / "masks").mkdir()
    pixels = noise(12, 16)
    formats = {"a.bmp": "BMP", "b.gif": "GIF", "c.jpg": "JPEG", "d.png": "PNG", "e.ppm": "PPM"}
    if features.check("webp"):
        formats["f.webp"] = "WEBP"
    for name, fmt in formats.items():
        Image.fromarray(pixels).save(tmp_path / name, format=fmt)
    Image.fromarray(np.full((12, 16), 1, np.uint8)).save(tmp_path / "masks" / "d.png")
    Image.fromarray(np.full((5, 5), 1, np.uint8)).save(tmp_path / "masks" / "a.png")
    samples, problems = folder_samples(tmp_path, 10_000, PALETTE, len(CLASS_NAMES))
    assert [s.name for s in samples] == sorted(formats)
    for s in samples:
        if s.name == "e.ppm":
            assert s.image[:8] == b"\x89PNG\r\n\x1a\n"
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(s.image))), pixels)
        else:
            assert s.image == (tmp_path / s.name).read_bytes(), s.name
    truths = {s.name: s.ground_truth for s in samples}
    assert np.asarray(Image.open(io.BytesIO(truths.pop("d.png")))).tolist() == np.full((12, 16), 1).tolist()
    assert set(truths.values()) == {None}
    assert len(problems) == 1 and "a.png" in problems[0] and "ground truth skipped" in problems[0]


def test_shapes_samples_are_the_held_out_128_px_scenes_with_truth_only_for_the_shapes_classes():
    """Module docstring: the default samples are held-out ``shapes`` scenes (128 px, the server's
    choice), with ground truth only when the model has the shapes classes. Only the count and that
    a truth exists were checked, so another scene size passed. Reference: the test split itself."""
    scenes = ShapesDataset(split="test", num_test=2, size=128)
    samples = shapes_samples(CLASS_NAMES, count=2)
    assert [s.name for s in samples] == ["shapes_0.png", "shapes_1.png"]
    for i, s in enumerate(samples):
        want = scenes.load(i)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")), want.image)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s.ground_truth))), want.mask)
    assert [s.ground_truth for s in shapes_samples(["background", "cell"], count=2)] == [None, None]


def test_folder_samples_pass_over_files_that_are_not_images_without_a_problem(tmp_path):
    """Docstring: the *images* directly in the folder are offered; a README or a .json beside them
    is neither offered nor reported (no suffix test passed them on to the decoder before)."""
    Image.fromarray(noise(4, 4)).save(tmp_path / "a.png")
    (tmp_path / "README.txt").write_text("scans from the clinic")
    (tmp_path / "labels.json").write_text("{}")
    (tmp_path / "masks").mkdir()
    samples, problems = folder_samples(tmp_path, 10_000, PALETTE, len(CLASS_NAMES))
    assert [s.name for s in samples] == ["a.png"] and problems == []


def test_folder_samples_offer_at_most_max_samples_and_say_when_there_are_none(tmp_path):
    for i in range(MAX_SAMPLES + 2):
        Image.fromarray(noise(4, 4, seed=i)).save(tmp_path / f"{i:02d}.png")
    samples, problems = folder_samples(tmp_path, 10_000, PALETTE, len(CLASS_NAMES))
    assert [s.name for s in samples] == [f"{i:02d}.png" for i in range(MAX_SAMPLES)]
    assert problems == [f"{tmp_path}: only the first {MAX_SAMPLES} images are offered"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"not a png")
    samples, problems = folder_samples(empty, 10_000, PALETTE, len(CLASS_NAMES))
    assert samples == [] and len(problems) == 2 and problems[-1] == f"{empty}: no readable images"


def test_sample_urls_are_percent_encoded(predictor, tmp_path):
    """A sample named 'scan #3.png' was offered as /api/samples/scan #3.png: 404 "no sample named
    'scan '" ('#' starts a fragment, '?' a query, '%20' decodes to a space)."""
    (tmp_path / "masks").mkdir()
    names = ["scan #3.png", "a?b.png", "50%20off.png"]
    for name in names:
        Image.fromarray(noise(20, 30)).save(tmp_path / name)
        Image.fromarray(np.full((20, 30), 1, np.uint8)).save(tmp_path / "masks" / name)
    app = create_app(predictor, ServeConfig(samples_dir=tmp_path))
    samples = request(app, "GET", "/api/info").json()["samples"]
    assert sorted(s["name"] for s in samples) == sorted(names)
    for s in samples:
        image, truth = request(app, "GET", s["url"]), request(app, "GET", s["ground_truth_url"])
        assert image.status_code == 200 and image.content == (tmp_path / s["name"]).read_bytes(), s
        assert truth.status_code == 200 and np.asarray(Image.open(io.BytesIO(truth.content))).max() == 1, s


def test_page_and_docs_load_nothing_from_other_hosts(predictor):
    app = create_app(predictor, samples=[])
    page = request(app, "GET", "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    import re

    refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert "/static/app.js" in refs and "/static/style.css" in refs
    for ref in refs:
        assert ref.startswith(("/", "#", "data:")), ref
        if ref.startswith("/static/"):
            asset = request(app, "GET", ref)
            assert asset.status_code == 200 and "http://" not in asset.text and "https://" not in asset.text, ref
            assert asset.headers["cache-control"] == "no-cache", ref  # an upgrade's page never runs an old script
    assert "http://" not in page.text and "https://" not in page.text
    docs = request(app, "GET", "/docs")
    assert docs.status_code == 200 and "POST /api/predict" in docs.text and "ground_truth" in docs.text
    assert "<script" not in docs.text and "cdn" not in docs.text.lower()


def test_openapi_schema_describes_the_api(predictor):
    schema = request(create_app(predictor, samples=[]), "GET", "/openapi.json").json()
    assert {"/api/predict", "/api/info", "/api/health"} <= set(schema["paths"])
    op = schema["paths"]["/api/predict"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and {"image", "tile", "tta", "ground_truth"} <= set(form["properties"])
    assert {"200", "400", "413", "415", "422", "503"} <= set(op["responses"])
    fields = schema["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"width", "height", "classes", "mask_png_base64", "overlay_png_base64", "ms"} <= set(fields)


def test_openapi_schema_documents_the_401_of_every_api_route(predictor):
    schema = request(create_app(predictor, samples=[]), "GET", "/openapi.json").json()
    routes = [(path, method, op) for path, methods in schema["paths"].items() if path.startswith("/api/")
              for method, op in methods.items()]
    assert {(path, method) for path, method, _ in routes} == {
        ("/api/predict", "post"), ("/api/info", "get"), ("/api/health", "get"), ("/api/samples/{name}", "get"),
        ("/api/samples/{name}/ground_truth", "get")}
    for path, _, op in routes:
        assert op["responses"]["401"]["description"] == "missing or wrong API key (when the server has one)", path
        assert ("404" in op["responses"]) == path.startswith("/api/samples/"), path


def test_docs_page_lists_the_answers_fields_and_closes_what_it_opens(predictor):
    docs = request(create_app(predictor, samples=[]), "GET", "/docs").text
    for tag in ("section", "table", "ul", "h2", "h3", "p"):
        assert docs.count(f"<{tag}>") + docs.count(f"<{tag} ") == docs.count(f"</{tag}>"), tag
    metrics = docs.split("<h2>Metrics</h2>")[1].split("</section>")[0]
    assert "<tr><td><code>boundary_iou</code></td><td>mean Boundary IoU over the classes" in metrics
    assert "<td><code>queue_ms</code></td>" in docs and docs.endswith("</main></body></html>")


def test_an_icon_is_read_as_predict_reads_it_given_by_name(checkpoint, predictor, tmp_path):
    """serve opens data.io.UPLOAD_FORMATS: an ICO, which a folder passes over but predict reads by
    name, gets predict's mask; a format outside that list (SGI) is a 415 here, while predict reads the
    user's own file by name in any format PIL reads."""
    icon = tmp_path / "icon.ico"
    Image.fromarray(noise(48, 48)).save(icon, sizes=[(48, 48), (16, 16)])
    sgi = tmp_path / "photo.sgi"
    Image.fromarray(noise(24, 24)).save(sgi)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(icon), "--out", str(out), "--no-progress"]) == 0
    app = create_app(predictor, samples=[])
    r = post_image(app, icon.read_bytes(), icon.name, "image/x-icon")
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (48, 48)  # the largest size, as predict reads it
    assert base64.b64decode(r.json()["mask_png_base64"]) == without_record(out / "icon.png")
    refused = post_image(app, sgi.read_bytes(), sgi.name, "image/sgi")
    assert refused.status_code == 415 and "SGI" in refused.json()["detail"], refused.text
    assert main(["predict", "--checkpoint", str(checkpoint), str(sgi), "--out", str(out / "sgi"),
                 "--no-progress"]) == 0
    assert Image.open(out / "sgi" / "photo.png").size == (24, 24)


# ---------------------------------------------------------------- bad input

def _truncated(fmt):
    data = png_bytes(noise(64, 64), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize("data, ctype, fields, status, words", [
    (lambda: _truncated("PNG"), "image/png", {}, 400, "truncated"),
    (lambda: _truncated("JPEG"), "image/jpeg", {}, 400, "truncated"),
    (lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "image/png", {}, 400, "cannot be decoded"),
    (lambda: b"", "image/png", {}, 400, "empty"),
    (lambda: b"hello, this is text\n" * 50, "text/plain", {}, 415, "supported format"),
    (lambda: b"%PDF-1.4\n" + bytes(500), "application/pdf", {}, 415, "supported format"),
    (lambda: png_bytes(noise(32, 32), "SGI"), "image/sgi", {}, 415, "SGI images are not accepted"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"tile": "abc"}, 422, "tile"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"tile": "8"}, 422, "tile"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"overlap": "1.5", "tile": "32"}, 422, "overlap must be"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"overlap": "0.5"}, 422, "overlap 0.5 goes with tile"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"overlap": "0.5", "tile": "0"}, 422, "overlap 0.5 goes with"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"tta": "sideways"}, 422, "tta"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"uncertainty": "maybe"}, 422, "uncertainty"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"overlay": "maybe"}, 422, "overlay"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"return_image": "2"}, 422, "return_image"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"tile": "16.5"}, 422, "whole number"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"overlap": "nan"}, 422, "overlap must be a number"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"tt": "flip"}, 422, "unknown form field 'tt'"),
    (lambda: png_bytes(noise(32, 32)), "image/png", {"TTA": "flip"}, 422, "unknown form field 'TTA'"),
])
def test_bad_uploads_get_clear_json_errors(predictor, data, ctype, fields, status, words):
    app = create_app(predictor, samples=[])
    r = post_image(app, data(), "x", ctype, fields)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and words in r.json()["detail"]
    assert "--" not in r.json()["detail"]  # options are named as the form's fields, not as command-line flags
    assert request(app, "GET", "/api/health").json()["pool"]["waiting"] == 0  # its place was given back


def test_requests_that_are_not_an_image_form(predictor):
    app = create_app(predictor, samples=[])
    r = request(app, "POST", "/api/predict", json={"image": "a.png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = request(app, "POST", "/api/predict", data={"tile": "32"}, files={"other": ("a.png", b"x", "image/png")})
    assert r.status_code == 422 and "'image'" in r.json()["detail"]
    r = request(app, "POST", "/api/predict", content=b"--xyz\r\nnonsense", headers={
        "content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code in (400, 422)
    # options in the query string were ignored (200 with the defaults)
    r = request(app, "POST", "/api/predict?tt=flip&overlay=false", files={"image": ("a.png", png_bytes(noise(16, 16)),
                                                                                    "image/png")})
    assert r.status_code == 422 and "not in the query string (got overlay, tt)" in r.json()["detail"], r.text
    assert request(app, "GET", "/api/health").json()["pool"]["waiting"] == 0


def test_a_boundary_the_form_parser_refuses_is_400_not_500(predictor):
    """A boundary over python-multipart's 256 bytes (RFC 2046 allows 70) raised in the parser's
    constructor, outside the malformed-body handling: 500 'the prediction failed on the server'."""
    app = create_app(predictor, samples=[])
    for length, status in ((256, 200), (300, 400)):  # the same at the dependency floor, whose parser has no limit
        boundary = "b" * length
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
                .encode() + png_bytes(noise(16, 16)) + f"\r\n--{boundary}--\r\n".encode())
        r = request(app, "POST", "/api/predict", content=body,
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == status, r.text
    assert "malformed multipart/form-data" in r.json()["detail"] and "300 bytes" in r.json()["detail"], r.text
    assert request(app, "GET", "/api/health").json()["pool"]["waiting"] == 0


def test_ground_truth_that_does_not_fit_is_422(predictor):
    app = create_app(predictor, samples=[])
    image = png_bytes(noise(20, 30))
    # a photo of another size sent as the ground truth is told its size, not its thousands of colours
    for truth, words in ((np.zeros((10, 30), np.uint8), "30x10"), (np.full((20, 30), 9, np.uint8), "[9]"),
                         (noise(12, 16, seed=1), "the ground-truth mask is 16x12 but the image is 30x20")):
        r = request(app, "POST", "/api/predict", files={"image": ("a.png", image, "image/png"),
                                                        "ground_truth": ("t.png", png_bytes(truth), "image/png")})
        assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_ground_truth_colours_are_read_by_the_models_palette_first():
    """As the folder reader reads them: a palette PNG whose own palette orders the model's colours
    otherwise is 422 (read by index its classes were swapped); a colour mask whose colours are all
    gray is read by the palette when they are its colours (a white class was 'ignore', VOC's gray
    car a 422), and by its gray values when they are not (class ids saved as RGB)."""
    from pixelwise.serve.uploads import UploadError, decode_mask

    binary = [(0, 0, 0), (255, 255, 255)]  # ISBI's membrane and cell; white is also the ignore colour
    left_right = np.zeros((4, 6), np.uint8)
    left_right[:, 3:] = 1
    indexed = Image.fromarray(left_right, "P")
    indexed.putpalette([255, 255, 255, 0, 0, 0])  # an editor's order: index 0 white, 1 black
    with pytest.raises(UploadError) as e:
        decode_mask(png_bytes(indexed), 10**6, binary, 2, (4, 6))
    assert e.value.status == 422 and "index 0 has the colour [255, 255, 255], the colour of class 1" in e.value.detail
    indexed.putpalette([0, 0, 0, 255, 255, 255])  # the model's order: read by index
    np.testing.assert_array_equal(decode_mask(png_bytes(indexed), 10**6, binary, 2, (4, 6)), left_right)
    rgb = np.stack([left_right * 255] * 3, axis=-1)
    np.testing.assert_array_equal(decode_mask(png_bytes(rgb), 10**6, binary, 2, (4, 6)), left_right)
    voc = [(0, 0, 0), *[(i, 0, 0) for i in range(1, 7)], (128, 128, 128)]  # class 7 gray, as VOC's car
    car = np.where(left_right[..., None] == 1, 128, 0).astype(np.uint8).repeat(3, axis=-1)
    np.testing.assert_array_equal(decode_mask(png_bytes(car), 10**6, voc, 8, (4, 6)), left_right * 7)
    ids = np.stack([left_right * 5] * 3, axis=-1)  # gray (5, 5, 5) is no colour of the palette: class ids
    np.testing.assert_array_equal(decode_mask(png_bytes(ids), 10**6, voc, 8, (4, 6)), left_right * 5)


# ---------------------------------------------------------------- limits

def test_uploads_over_the_size_limit_are_413(predictor):
    app = create_app(predictor, ServeConfig(max_upload_bytes=50_000), samples=[])
    big = png_bytes(noise(150, 150))  # ~67 KB of noise
    assert len(big) > 50_000
    r = post_image(app, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    async def chunks():  # no Content-Length: the limit is enforced while the body streams in
        boundary = b"b0undary"
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
        yield b"\r\n--" + boundary + b"--\r\n"

    r = request(app, "POST", "/api/predict", content=chunks(),
                headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 413
    assert post_image(app, png_bytes(noise(40, 40))).status_code == 200  # and under the limit all is well


def test_an_upload_that_never_ends_is_408_and_gives_its_place_back(predictor):
    app = create_app(predictor, ServeConfig(upload_timeout=0.5, workers=1, queue=0), samples=[])

    async def stalled():
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG'
        await asyncio.Event().wait()  # and nothing more, ever

    r = request(app, "POST", "/api/predict", content=stalled(),
                headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 408 and "took longer" in r.json()["detail"]
    assert post_image(app, png_bytes(noise(20, 20))).status_code == 200  # the only place is free again


def _png_header_only(width, height):
    """A PNG that declares width x height but holds almost nothing: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_client_that_goes_away_mid_upload_is_logged_400_and_gives_its_place_back(predictor):
    app = create_app(predictor, samples=[])
    body = b"--b\r\nContent-Disposition: form-data; name=image; filename=a.png\r\n\r\n" + png_bytes(noise(16, 16))
    messages = [{"type": "http.request", "body": body[:40], "more_body": True}, {"type": "http.disconnect"}]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/predict", "raw_path": b"/api/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"host", b"t")],
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert b"went away before its upload ended" in b"".join(m.get("body", b"") for m in sent[1:])
    assert app.state.service.pool.stats()["waiting"] == 0


def test_images_over_the_pixel_limit_are_413_before_decoding(predictor):
    app = create_app(predictor, samples=[])
    for w, h in ((100_000, 100_000), (8_000, 6_000)):  # PIL's own bomb check, then the server's 40 MP limit
        r = post_image(app, _png_header_only(w, h))
        assert r.status_code == 413 and "pixels" in r.json()["detail"], r.text
    small = create_app(predictor, ServeConfig(max_pixels=1000), samples=[])
    r = post_image(small, png_bytes(noise(40, 50)))
    assert r.status_code == 413 and "2,000 pixels" in r.json()["detail"]


def test_a_pixel_limit_above_pils_own_is_the_one_applied(predictor):
    from pixelwise.data.io import set_max_image_pixels

    try:
        app = create_app(predictor, ServeConfig(max_pixels=500_000_000), samples=[])
        r = post_image(app, _png_header_only(20_000, 10_000))  # 200 MP: above twice PIL's default guard
        assert r.status_code == 400 and "truncated" in r.json()["detail"], r.text  # decoded, not refused by size
        r = post_image(app, _png_header_only(30_000, 20_000))
        assert r.status_code == 413 and "600,000,000 pixels" in r.json()["detail"] and "500,000,000" in r.text
    finally:
        set_max_image_pixels(None)
    r = post_image(create_app(predictor, samples=[]), _png_header_only(100_000, 100_000))  # PIL's guard fires
    assert r.status_code == 413 and "limit of 40,000,000 (pixelwise serve --max-pixels" in r.json()["detail"]


def test_overlay_and_the_decoded_image_are_returned_as_asked(predictor, tmp_path):
    from pixelwise.data.io import read_image

    photo = noise(30, 44, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 44 high, 30 wide
    path = tmp_path / "turned.jpg"
    Image.fromarray(photo).save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    app = create_app(predictor, samples=[])
    default = post_image(app, path.read_bytes(), "turned.jpg", "image/jpeg").json()
    assert default["overlay_png_base64"] and default["image_png_base64"] is None
    lean = post_image(app, path.read_bytes(), "turned.jpg", "image/jpeg",
                      fields={"overlay": "false", "return_image": "true"}).json()
    assert lean["overlay_png_base64"] is None and lean["mask_png_base64"] == default["mask_png_base64"]
    shown = np.asarray(decode_png(lean["image_png_base64"]))
    assert shown.shape == (44, 30, 3) == (lean["height"], lean["width"], 3)
    assert np.array_equal(shown, read_image(path))  # the pixels predict reads, orientation applied


def test_tta_takes_a_mode_in_any_case_or_a_yes_or_no(predictor):
    image = png_bytes(noise(16, 16))
    app = create_app(predictor, samples=[])  # the server's own tta: none
    flipping = create_app(with_options(predictor, {"tta": "flip"}), samples=[])
    for server, sent, used in ((app, "D4", "d4"), (app, "yes", "flip"), (app, "On", "flip"), (flipping, "off", None),
                               (flipping, "none", None), (flipping, "", "flip")):
        answer = post_image(server, image, fields={"tta": sent})
        assert answer.status_code == 200 and answer.json()["options"]["tta"] == used, (sent, answer.text)


def test_an_option_the_predictor_refuses_is_named_as_its_form_field(predictor):
    app = create_app(predictor, samples=[])
    for fields, detail in (({"tile": "8"}, "tile must be at least 16 pixels, got 8"),
                           ({"tile": "32", "overlap": "1.5"}, "overlap must be a fraction in [0, 1), got 1.5")):
        answer = post_image(app, png_bytes(noise(16, 16)), fields=fields)
        assert answer.status_code == 422 and answer.json()["detail"] == detail, answer.text


def test_whole_number_fields_take_what_a_browser_number_field_sends(predictor):
    r = post_image(create_app(predictor, samples=[]), png_bytes(noise(40, 40)), fields={"tile": "3.2e1"})
    assert r.status_code == 200 and r.json()["options"]["tile"] == 32, r.text


def test_uploads_are_never_written_to_disk_unless_asked(predictor, tmp_path, monkeypatch):
    import builtins
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.chdir(scratch)
    big = png_bytes(noise(700, 700))  # over the 1 MB where form parsers usually spill to a temporary file
    assert len(big) > 1_100_000
    app = create_app(predictor, samples=[])
    writes = []
    real_open = builtins.open

    def no_files(*args, **kwargs):  # any temporary file (even unlinked at once) or file opened to write
        writes.append(args)
        raise AssertionError(f"the server wrote a file: {args}")

    def open_for_reading(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            no_files(file, mode)
        return real_open(file, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp", "mkdtemp"):
            m.setattr(tempfile, name, no_files)
        m.setattr(builtins, "open", open_for_reading)
        assert post_image(app, big).status_code == 200
    assert writes == [] and list(scratch.iterdir()) == []
    kept = tmp_path / "kept"
    app = create_app(predictor, ServeConfig(keep_uploads=kept), samples=[])
    assert post_image(app, big, "photo.png").status_code == 200
    (saved,) = kept.iterdir()
    assert saved.read_bytes() == big and saved.name.endswith("-image.png")
    assert list(scratch.iterdir()) == []


# ---------------------------------------------------------------- the pool under load

class Gate:
    """Wraps a predictor's predict so that every call waits for ``open()``; counts the calls."""

    def __init__(self, predictor):
        self.event = threading.Event()
        self.calls = 0
        original = predictor.predict

        def held(*args, **kwargs):
            self.calls += 1
            assert self.event.wait(60), "the test never opened the gate"
            return original(*args, **kwargs)

        predictor.predict = held

    def open(self):
        self.event.set()


def test_full_queue_answers_503_with_retry_after_and_every_admitted_request_is_answered(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    gate = Gate(predictor)
    app = create_app(predictor, ServeConfig(workers=1, queue=1), samples=[])
    pool = app.state.service.pool
    image = png_bytes(noise(24, 24))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            def post():
                return c.post("/api/predict", files={"image": ("a.png", image, "image/png")})

            first, second = asyncio.create_task(post()), asyncio.create_task(post())
            await wait_for(lambda: pool.stats()["running"] == 1 and pool.stats()["waiting"] == 1,
                           "one request running and one waiting")
            refused = await post()
            health = (await c.get("/api/health")).json()
            gate.open()
            answered = [await first, await second]
            after = await post()
            return refused, health, answered, after

    refused, health, answered, after = asyncio.run(scenario())
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "busy" in refused.json()["detail"]
    assert health["pool"] == {"workers": 1, "queue": 1, "running": 1, "waiting": 1}
    assert [r.status_code for r in answered] == [200, 200]
    assert after.status_code == 200 and gate.calls == 3
    assert pool.stats() == {"workers": 1, "queue": 1, "running": 0, "waiting": 0}


def test_32_concurrent_clients_are_all_answered_with_the_default_queue(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    gate = Gate(predictor)
    app = create_app(predictor, samples=[])  # defaults: 1 worker, room for 64 waiting
    pool = app.state.service.pool
    image = png_bytes(noise(16, 16))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            tasks = [asyncio.create_task(c.post("/api/predict", files={"image": ("a.png", image, "image/png")}))
                     for _ in range(32)]
            await wait_for(lambda: pool.stats()["running"] + pool.stats()["waiting"] == 32, "all 32 admitted at once")
            gate.open()
            return await asyncio.gather(*tasks)

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 32
    assert len({base64.b64decode(r.json()["mask_png_base64"]) for r in responses}) == 1


def test_pool_admits_up_to_workers_plus_queue():
    pool = InferencePool(workers=2, queue=3)
    tickets = [pool.admit() for _ in range(5)]
    with pytest.raises(PoolFull) as full:
        pool.admit()
    assert full.value.retry_after >= 1
    tickets[0].release()
    tickets[0].release()  # once only
    assert pool.stats()["waiting"] == 4
    again = pool.admit()

    def boom():
        raise ValueError("no")

    with pytest.raises(ValueError):
        asyncio.run(pool.run(again, boom))  # a failing job gives its place back too
    assert pool.stats() == {"workers": 2, "queue": 3, "running": 0, "waiting": 4}
    pool.close()


@pytest.mark.parametrize("workers, queue", [(0, 4), (1, -1), (-2, 0)])
def test_a_pool_of_no_worker_or_a_negative_queue_is_refused_naming_both(workers, queue):
    with pytest.raises(ValueError, match=rf"^need workers >= 1 and queue >= 0, got {workers} and {queue}$"):
        InferencePool(workers=workers, queue=queue)


def test_retry_after_is_the_work_ahead_at_the_mean_job_time(monkeypatch):
    """Retry-After = ceil(mean job seconds x admitted / workers): the plain mean of the first 20
    jobs, then an average that moves 1/20 of the way to each new job's time."""
    clock = iter([0.0, 0.4, 10.0, 10.1])  # two jobs of 0.4 s and 0.1 s (start, end each)
    monkeypatch.setattr(pool_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    pool = InferencePool(workers=2, queue=98)

    def retry_after():
        tickets = [pool.admit() for _ in range(100)]
        with pytest.raises(PoolFull) as full:
            pool.admit()
        for t in tickets:
            t.release()
        return full.value.retry_after

    assert retry_after() == 50  # no job yet: 1 s each, 100 ahead, 2 workers
    for _ in range(2):
        asyncio.run(pool.run(pool.admit(), lambda: None))
    assert retry_after() == 13  # mean 0.25 s: 0.25 * 100 / 2 = 12.5 -> 13
    # past 20 jobs each moves the mean 1/20 of the way: 18 more of 0.25 s, then one of 20.25 s
    clock = iter([t for i in range(18) for t in (i, i + 0.25)] + [100.0, 120.25])
    for _ in range(19):
        asyncio.run(pool.run(pool.admit(), lambda: None))
    assert retry_after() == 63  # 0.25 + (20.25 - 0.25) / 20 = 1.25 s: 1.25 * 100 / 2 = 62.5 -> 63
    pool.close()


def test_a_failing_prediction_is_answered_500_and_the_server_goes_on(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    original = predictor.predict
    failures = [RuntimeError("out of cheese"), MemoryError()]

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop(0)
        return original(*args, **kwargs)

    predictor.predict = flaky
    app = create_app(predictor, samples=[])
    image = png_bytes(noise(20, 20))
    first, second, third = (post_image(app, image) for _ in range(3))
    assert first.status_code == 500 and "RuntimeError: out of cheese" in first.json()["detail"]
    assert second.status_code == 500 and "MemoryError" in second.json()["detail"]
    assert third.status_code == 200
    assert request(app, "GET", "/api/health").json()["pool"]["waiting"] == 0


# ---------------------------------------------------------------- who may call, from where

def test_api_key_guards_every_api_route(predictor):
    app = create_app(predictor, ServeConfig(api_key="s3cret"), samples=[])
    assert request(app, "GET", "/").status_code == 200  # the page itself asks for the key
    for method, url in (("GET", "/api/info"), ("GET", "/api/health"), ("POST", "/api/predict")):
        r = request(app, method, url)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", url
        assert request(app, method, url, headers={"X-API-Key": "wrong"}).status_code == 401
    assert request(app, "GET", "/api/info", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert request(app, "GET", "/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    image = png_bytes(noise(20, 20))
    assert post_image(app, image).status_code == 401
    assert post_image(app, image, headers={"X-API-Key": "s3cret"}).status_code == 200
    schemes = request(app, "GET", "/openapi.json").json()["components"]["securitySchemes"]
    assert {"APIKeyHeader", "HTTPBearer"} <= set(schemes)


def test_no_cors_unless_an_origin_is_given(predictor):
    origin = {"Origin": "http://elsewhere.example"}
    plain = create_app(predictor, samples=[])
    r = request(plain, "GET", "/api/info", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = request(plain, "OPTIONS", "/api/predict", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    app = create_app(predictor, ServeConfig(cors_origins=("http://elsewhere.example",)), samples=[])
    r = request(app, "GET", "/api/info", headers=origin)
    assert r.headers["access-control-allow-origin"] == "http://elsewhere.example"
    # a page allowed in can read a busy server's Retry-After and a 401's WWW-Authenticate
    assert set(r.headers["access-control-expose-headers"].lower().split(", ")) == {"retry-after", "www-authenticate"}
    pre = request(app, "OPTIONS", "/api/predict", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://elsewhere.example"
    other = request(app, "GET", "/api/info", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_cli_serve_defaults_env_key_and_host_warning(checkpoint, monkeypatch, capsys):
    import uvicorn

    import pixelwise.serve.config

    monkeypatch.setattr(pixelwise.serve.config, "check_can_listen", lambda host, port: None)  # 8000 may be taken
    started = {}

    def fake_run(server, sockets=None):  # records what it would serve, and serves nothing
        started.update(host=server.config.host, port=server.config.port, app=server.config.app)

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    monkeypatch.setenv("PIXELWISE_API_KEY", "from-env")
    assert main(["serve", "--checkpoint", str(checkpoint), "--log-level", "warning"]) == 0
    assert started["host"] == "127.0.0.1" and started["port"] == 8000
    config = started["app"].state.service.config
    assert config.api_key == "from-env" and config.queue == 64 and config.max_upload_bytes == 20 * 2**20
    assert config.cors_origins == () and config.keep_uploads is None
    assert "warning" not in capsys.readouterr().err
    monkeypatch.delenv("PIXELWISE_API_KEY")
    assert main(["serve", "--checkpoint", str(checkpoint), "--host", "0.0.0.0", "--port", "9001",
                 "--max-upload-mb", "2", "--queue", "8", "--cors", "http://a.example"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "--api-key" in err
    config = started["app"].state.service.config
    assert started["port"] == 9001 and config.api_key is None and config.queue == 8
    assert config.max_upload_bytes == 2 * 2**20 and config.cors_origins == ("http://a.example",)
    assert host_warning("127.0.0.1", None) is None and host_warning("::1", None) is None
    assert main(["serve", "--checkpoint", str(checkpoint), "--tile", "4"]) == 2  # bad options: one-line error
    assert "--tile must be at least" in capsys.readouterr().err


# ---------------------------------------------------------------- ground truth and uncertainty

def test_ground_truth_gives_per_class_iou_and_confusion(predictor):
    app = create_app(predictor, samples=[])
    image = png_bytes(noise(30, 40, seed=5))
    first = post_image(app, image).json()
    predicted = np.asarray(decode_png(first["mask_png_base64"]))
    truth = predicted.copy()
    truth[:5] = 255  # ignored rows
    for name, data in (("index.png", png_bytes(truth)),
                       ("colour.png", png_bytes(np.array([*PALETTE, *[(255, 255, 255)] * 252], np.uint8)[truth]))):
        r = request(app, "POST", "/api/predict", files={"image": ("a.png", image, "image/png"),
                                                        "ground_truth": (name, data, "image/png")})
        assert r.status_code == 200, r.text
        m = r.json()["metrics"]
        assert m["pixel_acc"] == 1.0 and m["mIoU"] == 1.0 and m["ignored_pixels"] == 5 * 40
        cm = np.array(m["confusion"])
        assert cm.shape == (4, 4) and (cm == np.diag(np.diag(cm))).all() and cm.sum() == 25 * 40
        present = {c["name"] for c in m["per_class"] if c["iou"] is not None}
        assert present == {CLASS_NAMES[i] for i in np.unique(predicted[5:])}
        assert m["boundary_iou"] == 1.0 and all(c["boundary_iou"] == (None if c["iou"] is None else 1.0)
                                                for c in m["per_class"])
    # a ground truth moved by 3 pixels: the bands' IoU, as eval's meter gives it for the same pair
    moved = np.roll(predicted, 3, axis=1)
    r = request(app, "POST", "/api/predict", files={"image": ("a.png", image, "image/png"),
                                                    "ground_truth": ("m.png", png_bytes(moved), "image/png")})
    meter = BoundaryIoUMeter(4)
    meter.update(predicted, moved)
    want = meter.compute()
    m = r.json()["metrics"]
    assert m["boundary_iou"] == pytest.approx(want["boundary_iou"]) and m["boundary_iou"] < m["mIoU"] < 1.0
    assert [c["boundary_iou"] for c in m["per_class"]] == pytest.approx(want["per_class_boundary_iou"])


def test_uncertainty_of_a_model_with_dropout_uses_monte_carlo_dropout(tmp_path):
    predictor = Predictor.from_checkpoint(_unet_checkpoint(tmp_path / "bayes.safetensors", dropout=0.5))
    app = create_app(predictor, samples=[])
    info = request(app, "GET", "/api/info").json()
    assert info["uncertainty"] == "mc_dropout" and info["uncertainty_samples"] == 8
    body = post_image(app, png_bytes(noise(24, 32)), fields={"uncertainty": "true"}).json()
    assert body["options"]["mc_samples"] == 8
    unc = decode_png(body["uncertainty_png_base64"])
    assert unc.mode == "L" and unc.size == (32, 24)
    assert predictor.mc_samples == 0  # the shared predictor is unchanged
    # a fast server samples in eager mode too (its runner is a frozen copy): the same answer, not a 422
    fast = Predictor.from_checkpoint(tmp_path / "bayes.safetensors", mode="fast")
    quick = post_image(create_app(fast, samples=[]), png_bytes(noise(24, 32)), fields={"uncertainty": "true"})
    assert quick.status_code == 200, quick.text
    assert quick.json()["uncertainty_png_base64"] == body["uncertainty_png_base64"]
    assert quick.json()["mask_png_base64"] == body["mask_png_base64"]


def test_serve_mc_samples_0_answers_the_unsampled_uncertainty_predict_mc_samples_0_writes(tmp_path, monkeypatch):
    """serve --mc-samples 0 took it as unset (`or 8`): uncertainty requests to a model with dropout
    were sampled 8 times, their masks and maps not those of predict --mc-samples 0 --uncertainty."""
    import uvicorn

    import pixelwise.serve.config

    checkpoint = _unet_checkpoint(tmp_path / "bayes.safetensors", dropout=0.5)
    image = noise(24, 32, seed=3)
    Image.fromarray(image).save(tmp_path / "x.png")
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "x.png"), "--out", str(tmp_path / "p"),
                 "--mc-samples", "0", "--uncertainty", "--no-progress"]) == 0
    monkeypatch.setattr(pixelwise.serve.config, "check_can_listen", lambda host, port: None)
    started = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: started.update(app=server.config.app))
    for samples, sampled in (("0", False), (None, True)):
        assert main(["serve", "--checkpoint", str(checkpoint), "--log-level", "warning",
                     *(["--mc-samples", samples] if samples else [])]) == 0
        app = started["app"]
        info = request(app, "GET", "/api/info").json()
        assert (info["uncertainty"], info["uncertainty_samples"]) == (("mc_dropout", 8) if sampled else ("entropy", 0))
        body = post_image(app, png_bytes(image), fields={"uncertainty": "true"}).json()
        assert body["options"]["mc_samples"] == (8 if sampled else 0)
        same = [np.array_equal(np.asarray(decode_png(body[f"{key}_png_base64"])),
                               np.asarray(Image.open(tmp_path / "p" / f"x{suffix}.png")))
                for key, suffix in (("mask", ""), ("uncertainty", "_uncertainty"))]
        assert all(same) != sampled  # the sampled answer is not the unsampled files


# ---------------------------------------------------------------- work that nobody waits for

def test_a_cancelled_job_stops_at_its_next_batch_and_a_waiting_one_never_runs():
    pool = InferencePool(workers=1, queue=4)
    batches, started, finished = [], threading.Event(), threading.Event()

    def long_job():  # a prediction of many batches, checking between them as SemanticPredictor does
        started.set()
        try:
            for i in range(10_000):
                cancel.check()
                batches.append(i)
                threading.Event().wait(0.005)
        finally:
            finished.set()

    async def scenario():
        running = asyncio.ensure_future(pool.run(pool.admit(), long_job))
        waiting = asyncio.ensure_future(pool.run(pool.admit(), batches.append, "never"))
        await wait_for(started.is_set, "the first job running")
        assert pool.stats()["waiting"] == 1
        waiting.cancel()
        running.cancel()
        await wait_for(finished.is_set, "the cancelled job stopping")
        await wait_for(lambda: pool.stats()["running"] + pool.stats()["waiting"] == 0, "every place given back")

    asyncio.run(scenario())
    assert "never" not in batches and 0 < len(batches) < 10_000
    pool.close()


def test_the_time_limit_answers_at_once_even_inside_one_long_model_batch():
    """A whole image is one model batch, which cannot be stopped midway: the request is answered
    when its time is up, and the job keeps its place until its thread is free again."""
    import time

    pool = InferencePool(workers=1, queue=4, timeout=0.3)
    release = threading.Event()

    async def scenario():
        t0 = time.monotonic()
        with pytest.raises(cancel.TimedOut, match="limit of 0.3 s"):
            await pool.run(pool.admit(), release.wait, 30)  # one long call that never checks
        waited = time.monotonic() - t0
        assert pool.stats()["running"] == 1  # still in its thread: its place is not given away
        release.set()
        await wait_for(lambda: pool.stats()["running"] + pool.stats()["waiting"] == 0, "the place given back")
        # time spent waiting for a worker does not count against a job's limit
        first = asyncio.ensure_future(pool.run(pool.admit(), time.sleep, 0.25))
        second = await pool.run(pool.admit(), lambda: "ran")
        await first
        return waited, second

    waited, second = asyncio.run(scenario())
    assert waited < 2.0 and second == "ran"
    pool.close()


def test_a_prediction_over_the_time_limit_is_504_and_the_next_one_runs(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    app = create_app(predictor, ServeConfig(predict_timeout=0.05), samples=[])
    image = png_bytes(noise(200, 200))
    slow = post_image(app, image, fields={"tile": "16", "overlap": "0.9"})  # 17956 tiles: minutes on a CPU
    assert slow.status_code == 504, slow.text
    assert "limit of 0.05 s" in slow.json()["detail"] and "--timeout" in slow.json()["detail"]
    assert post_image(app, png_bytes(noise(20, 20))).status_code == 200
    assert request(app, "GET", "/api/health").json()["pool"] == {"workers": 1, "queue": 64, "running": 0,
                                                                  "waiting": 0}
    with pytest.raises(Exception, match="positive number of seconds"):
        ServeConfig(predict_timeout=float("nan"))


def test_request_options_reuse_the_servers_int8_runner(checkpoint):
    base = Predictor.from_checkpoint(checkpoint)
    calibration = [noise(64, 64, seed) for seed in range(2)]
    int8 = SemanticPredictor(base.model, base.meta, mode="int8", calib_data=calibration, calib_crop=32,
                             measuring=True)
    flipped = with_options(int8, {"tta": "flip", "tile": 32})  # the constructor alone would ask for calibration
    assert flipped.runner is int8.runner and flipped.mode == "int8"
    assert (flipped.tta, flipped.tile) == ("flip", 32) and int8.tta is None
    image = noise(40, 56)
    mirrored = int8.predict_probs(image[:, ::-1].copy()).flip(-1)
    expected = (int8.predict_probs(image) + mirrored) / 2  # flip TTA by hand, through the int8 runner
    untiled = with_options(int8, {"tta": "flip"})
    torch.testing.assert_close(untiled.predict_probs(image), expected, atol=1e-5, rtol=0)
    app = create_app(int8, samples=[])
    assert post_image(app, png_bytes(image), fields={"tta": "flip", "tile": "32"}).status_code == 200


def test_a_camera_jpeg_with_a_multi_picture_segment_is_a_jpeg(predictor, tmp_path):
    from pixelwise.data.io import frame_count, read_frames

    rgb = noise(30, 40)
    path = tmp_path / "camera.jpg"
    Image.fromarray(rgb).save(path, format="MPO", save_all=True, append_images=[Image.fromarray(rgb[::-1].copy())])
    assert Image.open(path).format == "MPO"
    Image.fromarray(rgb).save(tmp_path / "plain.jpg", quality=75)
    assert frame_count(path) == 1 and len(list(read_frames(path))) == 1  # the preview is no second image
    app = create_app(predictor, samples=[])
    mpo = post_image(app, path.read_bytes(), "camera.jpg", "image/jpeg")
    assert mpo.status_code == 200, mpo.text
    plain = post_image(app, (tmp_path / "plain.jpg").read_bytes(), "plain.jpg", "image/jpeg")
    assert mpo.json()["mask_png_base64"] == plain.json()["mask_png_base64"]  # the first picture, as a JPEG


def test_serve_refuses_a_taken_port_and_a_host_that_is_not_here():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match=f"--port {port} is in use"):
            check_can_listen("127.0.0.1", port)
    check_can_listen("127.0.0.1", port)  # free again
    with pytest.raises(Exception, match="--host 192.0.2.1 is not an address of this machine"):
        check_can_listen("192.0.2.1", 0)  # TEST-NET-1: never assigned to a host
    with pytest.raises(Exception, match="--host is empty"):
        check_can_listen(" ", 8000)


def test_a_ground_truth_that_is_empty_or_holds_no_class_is_refused(predictor):
    app = create_app(predictor, samples=[])
    image = png_bytes(noise(20, 30))

    def post(truth, name="truth.png"):
        return request(app, "POST", "/api/predict", files={"image": ("a.png", image, "image/png"),
                                                           "ground_truth": (name, truth, "image/png")})

    empty = post(b"")
    assert empty.status_code == 400 and "ground-truth mask is empty" in empty.json()["detail"]
    assert post(b"", name="").status_code == 200  # the page's file input with nothing chosen
    photo = post(image)  # a photo sent as the mask: none of its colours is in the palette
    assert photo.status_code == 422 and "not in the model's palette" in photo.json()["detail"]
    ignored = post(png_bytes(np.full((20, 30), 255, np.uint8)))
    assert ignored.status_code == 422 and "no pixel of any class" in ignored.json()["detail"]
    colours = np.array(PALETTE, np.uint8)[np.full((20, 30), 2)]
    colours[:, :3] = 255  # white: ignored
    colours[5:10, 20:25] = (123, 45, 67)  # a colour of no class: once silently "ignore" too
    stray = post(png_bytes(colours))
    assert stray.status_code == 422 and "25 pixels of 1 colour(s)" in stray.json()["detail"], stray.text
    assert "[123, 45, 67]" in stray.json()["detail"]
    colours[5:10, 20:25] = PALETTE[1]
    assert post(png_bytes(colours)).json()["metrics"]["ignored_pixels"] == 60
    good = post(png_bytes(np.full((20, 30), 1, np.uint8)))
    assert good.status_code == 200 and good.json()["metrics"]["per_class"][1]["pixels"] == 600


def test_an_image_sent_as_a_text_value_gets_told_to_send_a_file(predictor):
    app = create_app(predictor, samples=[])
    image = png_bytes(noise(60, 60))
    assert len(image) > 4096
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n" + image + b"\r\n--b--\r\n")
    r = request(app, "POST", "/api/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 422 and "as a file in the field 'image'" in r.json()["detail"]
    named = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename*=UTF-8''%E5%9B%BE.png\r\n"
             b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b--\r\n")  # RFC 5987 name only
    r = request(app, "POST", "/api/predict", content=named, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("key", ["ключ", "clé", "tab\tkey"])
def test_an_api_key_a_header_cannot_carry_is_refused_at_start(key):
    with pytest.raises(Exception, match="must be printable ASCII"):
        ServeConfig(api_key=key)


# ---------------------------------------------------------------- status codes as docs/serve.md's table says

def _multipart(*parts):
    """A multipart/form-data body of (name, filename or None, content type or None, bytes) parts."""
    body = b""
    for name, filename, ctype, data in parts:
        body += b'--b\r\nContent-Disposition: form-data; name="' + name.encode() + b'"'
        body += (b'; filename="' + filename.encode() + b'"') if filename is not None else b""
        body += b"\r\n" + (b"Content-Type: " + ctype.encode() + b"\r\n" if ctype else b"") + b"\r\n" + data + b"\r\n"
    return {"content": body + b"--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}}


def test_status_codes_follow_the_docs_table(predictor):
    """Not an image at all is 415 whatever type the client declared (curl declares image/png for any
    x.png); bytes that begin as an image and do not decode are 400; an image sent as a short text
    value is 422 like a long one; a field given twice is 422 naming it, not the first copy taken."""
    app = create_app(predictor, samples=[])
    image = png_bytes(noise(24, 24))
    text = post_image(app, b"not an image at all\n" * 10, "text.png", "image/png")
    assert text.status_code == 415, text.text
    assert "not an image in a supported format (declared image/png" in text.json()["detail"]
    damaged = post_image(app, b"\x89PNG\r\n\x1a\n" + bytes(300), "x.bin", "application/octet-stream")
    assert damaged.status_code == 400 and "begins as a PNG file" in damaged.json()["detail"], damaged.text
    truncated_jpeg = png_bytes(noise(64, 64), "JPEG")[:200]
    assert post_image(app, truncated_jpeg, "x.jpg", "text/plain").status_code == 400
    if features.check("avif"):  # a damaged AVIF was "not an image in a supported format", 415
        cut = post_image(app, png_bytes(noise(64, 64), "AVIF")[:40], "x.avif", "image/avif")
        assert cut.status_code == 400 and "begins as an AVIF file" in cut.json()["detail"], cut.text
    for name, value in (("image", b"hello"), ("ground_truth", b"mask.png")):
        parts = [("image", "a.png", "image/png", image)] if name != "image" else []
        r = request(app, "POST", "/api/predict", **_multipart(*parts, (name, None, None, value)))
        assert r.status_code == 422 and f"as a file in the field {name!r}" in r.json()["detail"], (name, r.text)
    twice = post_image(app, image, fields={"tile": ["16", "abc"]})
    assert twice.status_code == 422 and "'tile' is given 2 times" in twice.json()["detail"], twice.text
    two_images = request(app, "POST", "/api/predict", **_multipart(("image", "a.png", "image/png", image),
                                                                   ("image", "b.png", "image/png", image)))
    assert two_images.status_code == 422 and "'image' is given 2 times" in two_images.json()["detail"]
    assert post_image(app, image, fields={"tile": "16"}).status_code == 200
    assert request(app, "GET", "/api/health").json()["pool"]["waiting"] == 0


def test_queue_ms_does_not_count_the_upload(predictor):
    """queue_ms ("waiting for a worker") began before the body was read: an idle server answered
    queue_ms 2008 to a client that took 2 s to send its image."""
    app = create_app(predictor, samples=[])
    sent = httpx.Request("POST", "http://t/api/predict", files={"image": ("a.png", png_bytes(noise(24, 24)),
                                                                          "image/png")})
    body, headers = sent.read(), {"content-type": sent.headers["content-type"]}

    async def slowly():
        for i in range(0, len(body), len(body) // 3 + 1):
            await asyncio.sleep(0.25)
            yield body[i:i + len(body) // 3 + 1]

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/api/predict", content=slowly(), headers=headers)

    answer = asyncio.run(scenario())
    assert answer.status_code == 200, answer.text
    assert answer.json()["queue_ms"] < 400, answer.json()["queue_ms"]  # the upload took 750 ms, the hand-off ms


# ---------------------------------------------------------------- a model with dropout and --workers 2

def test_a_model_with_dropout_waits_for_the_model_in_the_queue_not_against_the_timeout(predictor, tmp_path):
    """Such a model predicts one request at a time; waiting for it is queue time (queue_ms), not
    prediction time: it does not count against --timeout, and health counts one running."""
    import time

    bayes = Predictor.from_checkpoint(_unet_checkpoint(tmp_path / "bayes.safetensors", dropout=0.5))
    app = create_app(bayes, ServeConfig(workers=2, predict_timeout=1.0), samples=[])
    pool = app.state.service.pool
    original, seen = bayes.predict, []

    def slow(*args, **kwargs):  # 0.6 s alone, under the 1 s limit; two in a row would be 1.2 s
        time.sleep(0.3)
        seen.append(pool.stats())
        time.sleep(0.3)
        return original(*args, **kwargs)

    bayes.predict = slow
    image = png_bytes(noise(24, 24))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/api/predict", files={"image": ("a.png", image, "image/png")})
                                          for _ in range(2)))

    first, second = asyncio.run(scenario())
    assert [first.status_code, second.status_code] == [200, 200], (first.text, second.text)
    later = max((first.json(), second.json()), key=lambda body: body["queue_ms"])
    assert later["queue_ms"] >= 500 and later["ms"] < 1000, later  # its wait for the model is queue time
    assert seen[0]["running"] == 1 and seen[0]["waiting"] == 1, seen
    assert request(app, "GET", "/api/info").json()["limits"]["workers"] == 1
    assert request(app, "GET", "/api/health").json()["pool"] == {"workers": 1, "queue": 64, "running": 0,
                                                                  "waiting": 0}
    no_dropout = create_app(predictor, ServeConfig(workers=2), samples=[])
    assert no_dropout.state.service.pool.workers == 2  # --workers holds for a model without dropout


def _dataset_checkpoint(path, dataset, names, palette):
    kw = {"base_channels": 4, "dropout": 0.0}
    save_checkpoint(path, create_model("unet", num_classes=len(names), **kw),
                    {"model": "unet", "num_classes": len(names), "model_kwargs": kw, "task": "semantic",
                     "dataset": dataset, "class_names": names, "palette": palette})
    return Predictor.from_checkpoint(path)


def _truth_counts(app, image, truth, fmt=None):
    fields = {} if fmt is None else {"truth_format": fmt}
    r = request(app, "POST", "/api/predict", data=fields, files={
        "image": ("a.png", png_bytes(image), "image/png"), "ground_truth": ("t.png", truth, "image/png")})
    if r.status_code != 200:
        return r.status_code, r.json()["detail"]
    m = r.json()["metrics"]
    return {row["name"]: row["pixels"] for row in m["per_class"] if row["pixels"]}, m["ignored_pixels"]


def test_a_datasets_own_label_file_is_read_with_its_mapping(tmp_path):
    """A dataset's annotation sent as the ground truth was read as class ids: an ADE20K annotation was
    scored one class off, an ISBI label's cells (stored 255) were all 'ignore'."""
    from pixelwise.data import ade20k, cityscapes

    image = noise(8, 10)
    isbi = create_app(_dataset_checkpoint(tmp_path / "i.safetensors", "isbi2012", ["membrane", "cell"],
                                          [(0, 0, 0), (255, 255, 255)]), samples=[])
    info = request(isbi, "GET", "/api/info").json()["truth_formats"]
    assert set(info) == {"classes", "dataset"} and "white (>= 128) = cell" in info["dataset"]
    label = np.zeros((8, 10), np.uint8)
    label[:, 4:] = 255  # 48 cell pixels, 32 membrane
    assert _truth_counts(isbi, image, png_bytes(label)) == ({"membrane": 32}, 48)  # class ids: 255 is ignore
    # empty, as a form's unset select sends it, is the default (it was a 422)
    assert _truth_counts(isbi, image, png_bytes(label), "") == ({"membrane": 32}, 48)
    assert _truth_counts(isbi, image, png_bytes(label), "dataset") == ({"membrane": 32, "cell": 48}, 0)
    one_bit = io.BytesIO()
    Image.fromarray(label).convert("1").save(one_bit, "PNG")
    assert _truth_counts(isbi, image, one_bit.getvalue(), "dataset") == ({"membrane": 32, "cell": 48}, 0)

    ade = create_app(_dataset_checkpoint(tmp_path / "a.safetensors", "ade20k", ade20k.CLASS_NAMES,
                                         ade20k.PALETTE), samples=[])
    annotation = np.zeros((8, 10), np.uint8)
    annotation[:, 2:5], annotation[:, 5:] = 1, 3  # 16 other, 24 wall (1), 40 sky (3)
    assert _truth_counts(ade, image, png_bytes(annotation), "dataset") == ({"wall": 24, "sky": 40}, 16)
    assert _truth_counts(ade, image, png_bytes(annotation)) == ({"wall": 16, "building": 24, "floor": 40}, 0)

    city = create_app(_dataset_checkpoint(tmp_path / "c.safetensors", "cityscapes", cityscapes.CLASS_NAMES,
                                          cityscapes.PALETTE), samples=[])
    ids = np.full((8, 10), 7, np.uint8)  # road
    ids[0], ids[1] = 26, 1  # car, ego vehicle (ignored)
    assert _truth_counts(city, image, png_bytes(ids), "dataset") == ({"road": 60, "car": 10}, 10)
    ids[2, 0] = 40
    status, detail = _truth_counts(city, image, png_bytes(ids), "dataset")
    assert status == 422 and "values [40] that are not labels of Cityscapes" in detail
    status, detail = _truth_counts(city, image, png_bytes(np.full((8, 10), 26, np.uint8)))
    assert status == 422 and "is read with truth_format=dataset" in detail


def test_truth_format_dataset_is_refused_where_the_data_stores_class_ids(predictor):
    app = create_app(predictor, samples=[])  # trained on shapes: its masks are class ids
    assert request(app, "GET", "/api/info").json()["truth_formats"].keys() == {"classes"}
    status, detail = _truth_counts(app, noise(8, 8), png_bytes(np.zeros((8, 8), np.uint8)), "dataset")
    assert status == 422 and "stores class ids (or its palette's colours)" in detail
    status, detail = _truth_counts(app, noise(8, 8), png_bytes(np.zeros((8, 8), np.uint8)), "labelids")
    assert status == 422 and "truth_format must be classes or dataset" in detail


def test_a_folder_models_own_ignore_colour_reads_its_colour_masks(tmp_path):
    """A folder dataset whose classes.json sets ignore_color black (white a class) had its own colour
    masks refused by serve ('white is ignore')."""
    palette = [[255, 255, 255], [200, 30, 30], [30, 200, 30]]
    kw = {"base_channels": 4, "dropout": 0.0}
    save_checkpoint(tmp_path / "f.safetensors", create_model("unet", num_classes=3, **kw),
                    {"model": "unet", "num_classes": 3, "model_kwargs": kw, "dataset": "folder",
                     "class_names": ["snow", "brick", "grass"], "palette": palette, "ignore_color": [0, 0, 0]})
    app = create_app(Predictor.from_checkpoint(tmp_path / "f.safetensors"), samples=[])
    truth = np.zeros((8, 10, 3), np.uint8)  # black: ignore
    truth[:, 2:6] = palette[0]  # 32 snow
    truth[:, 6:] = palette[2]  # 32 grass
    assert _truth_counts(app, noise(8, 10), png_bytes(truth)) == ({"snow": 32, "grass": 32}, 16)


def test_dataset_label_files_that_would_be_misread_are_422(tmp_path):
    """truth_format=dataset scored an ISBI label stored 0/1 as all membrane, and a Cityscapes
    *_labelTrainIds.png as label ids (pixel accuracy 0), silently."""
    from pixelwise.data import cityscapes

    isbi = create_app(_dataset_checkpoint(tmp_path / "i.safetensors", "isbi2012", ["membrane", "cell"],
                                          [(0, 0, 0), (255, 255, 255)]), samples=[])
    zero_one = np.zeros((8, 10), np.uint8)
    zero_one[:, 5:] = 1
    status, detail = _truth_counts(isbi, noise(8, 10), png_bytes(zero_one), "dataset")
    assert status == 422 and "values are only 0 and 1" in detail
    city = create_app(_dataset_checkpoint(tmp_path / "c.safetensors", "cityscapes", cityscapes.CLASS_NAMES,
                                          cityscapes.PALETTE), samples=[])
    r = request(city, "POST", "/api/predict", data={"truth_format": "dataset"}, files={
        "image": ("a.png", png_bytes(noise(8, 10)), "image/png"),
        "ground_truth": ("x_gtFine_labelTrainIds.png", png_bytes(np.zeros((8, 10), np.uint8)), "image/png")})
    assert r.status_code == 422 and "holds train ids, which are class ids" in r.json()["detail"]


def test_samples_may_be_the_training_datasets_label_files(tmp_path):
    """--samples read DIR/masks as class ids only: an ISBI label's cells were all 'ignore'."""
    from pixelwise.serve.config import ServeConfig

    predictor = _dataset_checkpoint(tmp_path / "i.safetensors", "isbi2012", ["membrane", "cell"],
                                    [(0, 0, 0), (255, 255, 255)])
    samples = tmp_path / "samples"
    (samples / "masks").mkdir(parents=True)
    Image.fromarray(noise(8, 10)).save(samples / "em.png")
    label = np.zeros((8, 10), np.uint8)
    label[:, 4:] = 255
    Image.fromarray(label).save(samples / "masks" / "em.png")
    for fmt, cells in (("classes", 0), ("dataset", 48)):
        app = create_app(predictor, ServeConfig(samples_dir=samples, samples_truth_format=fmt))
        truth = request(app, "GET", "/api/samples/em.png/ground_truth")
        values = np.asarray(Image.open(io.BytesIO(truth.content)))
        assert int((values == 1).sum()) == cells and int((values == 0).sum()) == 32
    with pytest.raises(UserError, match="--samples-truth-format dataset: .* stores class ids"):
        create_app(Predictor.from_checkpoint(_unet_checkpoint(tmp_path / "s.safetensors")),
                   ServeConfig(samples_dir=samples, samples_truth_format="dataset"))


def test_serve_and_eval_keep_no_probabilities_they_do_not_read(predictor, monkeypatch):
    """serve kept every request's C x H x W probabilities (never read; 3.3x predict's memory), and
    eval every image's (read only by the ISBI meter)."""
    from pixelwise.data import build_dataset
    from pixelwise.inference.evaluate import evaluate_semantic

    asked = []
    real = SemanticPredictor.predict

    def spy(self, image, uncertainty=False, **kw):
        asked.append(kw.get("probs", True))
        return real(self, image, uncertainty, **kw)

    monkeypatch.setattr(SemanticPredictor, "predict", spy)
    app = create_app(predictor, samples=[])
    assert post_image(app, png_bytes(noise(24, 24))).status_code == 200
    evaluate_semantic(predictor, build_dataset("shapes", None, "val", num_val=2, size=32), progress=False, bf=False)
    assert asked == [False, False, False]


def _tiff_with_its_second_page_cut():
    buf = io.BytesIO()
    pages = [Image.fromarray(noise(24, 24)) for _ in range(2)]
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()[:-100]  # page 1's strip: its first page decodes, predict refuses the file


def test_uploads_cut_short_are_refused_as_predict_refuses_them(predictor):
    """serve decoded what predict and the dataset check refuse (a PNG without its end marker, a TIFF
    stack whose second page is cut), and a TIFF whose directory was damaged, which PIL misread (a
    16-bit page as 1-bit: 1957 of 1961 pixels wrong)."""
    app = create_app(predictor, samples=[])
    good = png_bytes(noise(24, 24))
    for data, words in ((good[:-12], "truncated PNG"), (_tiff_with_its_second_page_cut(), "truncated TIFF (page 1's")):
        r = post_image(app, data, "x", "image/png")
        assert r.status_code == 400 and words in r.json()["detail"], r.text
        truth = request(app, "POST", "/api/predict", files={"image": ("a.png", good, "image/png"),
                                                            "ground_truth": ("t.png", data, "image/png")})
        assert truth.status_code == 400 and words in truth.json()["detail"], truth.text
    assert post_image(app, good, "x.png", "image/png").status_code == 200


def test_a_form_part_without_a_name_says_so(predictor):
    app = create_app(predictor, samples=[])
    body = _multipart(("image", "a.png", "image/png", png_bytes(noise(16, 16))))
    header = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n'
    body["content"] = body["content"].replace(header, b"")
    r = request(app, "POST", "/api/predict", **body)
    assert r.status_code == 400 and "a part of the form has no name" in r.json()["detail"], r.text


def _body(n):
    parts = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i for i in range(n))
    return parts + b"--b--\r\n"


async def _chunks(data):
    yield data


def _read(n):
    data = _body(n)
    return asyncio.run(read_multipart("multipart/form-data; boundary=b", str(len(data)), _chunks(data), 10**6))


def test_a_form_of_more_than_max_parts_fields_is_400():
    assert MAX_PARTS == 16  # as the docs' limit
    assert sorted(_read(16)) == sorted(f"f{i}" for i in range(16))
    with pytest.raises(UploadError) as e:
        _read(17)
    assert e.value.status == 400 and "at most 16" in e.value.detail


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary="])
def test_a_form_content_type_without_a_boundary_is_400(content_type):
    data = _body(1)
    with pytest.raises(UploadError) as e:
        asyncio.run(read_multipart(content_type, str(len(data)), _chunks(data), 10**6))
    assert e.value.status == 400 and "has no boundary" in e.value.detail


@pytest.mark.parametrize("content_length", ["12x", "", "1e3"])
def test_a_content_length_that_is_not_a_number_is_400(content_length):
    data = _body(1)
    with pytest.raises(UploadError) as e:
        asyncio.run(read_multipart("multipart/form-data; boundary=b", content_length, _chunks(data), 10**6))
    assert e.value.status == 400 and e.value.detail == f"bad Content-Length {content_length!r}"


@pytest.mark.parametrize("data", [b"xx--b\r\n", b"--b\r\nbad header\r\n\r\nv\r\n--b--\r\n"])
def test_a_body_the_form_parser_cannot_read_is_400_naming_it(data):
    """Bytes before the first boundary, a header line without a colon: 400 'malformed ... body', not a
    form read as if the part were not there."""
    with pytest.raises(UploadError) as e:
        asyncio.run(read_multipart("multipart/form-data; boundary=b", str(len(data)), _chunks(data), 10**6))
    assert e.value.status == 400 and e.value.detail.startswith("malformed multipart/form-data body ("), e.value.detail


def test_a_text_field_of_max_field_bytes_is_read_and_one_byte_more_is_400():
    def form(value):
        data = b'--b\r\nContent-Disposition: form-data; name="tile"\r\n\r\n' + value + b"\r\n--b--\r\n"
        return asyncio.run(read_multipart("multipart/form-data; boundary=b", str(len(data)), _chunks(data), 10**6))

    assert bytes(form(b"7" * MAX_FIELD_BYTES)["tile"].data) == b"7" * MAX_FIELD_BYTES
    with pytest.raises(UploadError) as e:
        form(b"7" * (MAX_FIELD_BYTES + 1))
    assert e.value.status == 400 and e.value.detail == f"form field 'tile' is longer than {MAX_FIELD_BYTES} bytes"


# ---------------------------------------------------------------- ServeConfig: defaults and refusals
def test_serve_config_defaults_are_the_documented_ones():
    """docs/serve.md's flag table: 1 worker, a queue of 64, 20 MB uploads, 40,000,000 pixels, a 300 s timeout,
    no key, no CORS, uploads kept in memory."""
    cfg = ServeConfig()
    assert (cfg.workers, cfg.queue, cfg.max_upload_bytes, cfg.max_pixels, cfg.predict_timeout) == (
        1, 64, 20 * 1024 * 1024, 40_000_000, 300.0)
    assert (cfg.api_key, cfg.cors_origins, cfg.keep_uploads, cfg.samples_dir) == (None, (), None, None)


def test_serve_config_cannot_change_once_made():
    """One config is shared by every request and worker thread: it is frozen."""
    cfg = ServeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 4  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"queue": -1}, "--queue must be 0 or more, got -1"),
    ({"workers": 0}, "--workers must be at least 1, got 0"),
    ({"api_key": ""}, "the API key is empty"),
    ({"api_key": "   "}, "the API key is empty"),
    ({"uncertainty_samples": -1}, "uncertainty samples must be 0 or more, got -1"),
    ({"upload_timeout": 0.0}, "the upload timeout must be positive, got 0.0"),
])
def test_serve_config_refuses_values_out_of_range(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        ServeConfig(**kwargs)
    assert ServeConfig(queue=0).queue == 0 and ServeConfig(uncertainty_samples=0).uncertainty_samples == 0


def test_keep_uploads_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "uploads"
    file.write_text("not a folder")
    with pytest.raises(UserError, match="--keep-uploads .*uploads is a file; give a folder"):
        ServeConfig(keep_uploads=file)
    assert ServeConfig(keep_uploads=tmp_path / "new").keep_uploads == tmp_path / "new"  # made at start, later


@pytest.mark.parametrize("origin", ["https://example.org/", "example.org", "", "https://example.org/app"])
def test_a_cors_origin_no_browser_sends_is_refused(origin):
    """Browsers send Origin as scheme://host[:port]; one with a trailing / (copied from the address bar),
    a path or no scheme never matches, so CORS would silently never be allowed."""
    with pytest.raises(UserError, match="--cors .* is not an origin"):
        ServeConfig(cors_origins=(origin,))
    assert ServeConfig(cors_origins=("https://example.org", "http://localhost:3000", "*")).cors_origins[0] == \
        "https://example.org"


@pytest.mark.parametrize("keep", [".", "masks"])
def test_keep_uploads_into_the_samples_folder_is_refused(tmp_path, keep):
    """An upload kept in the --samples folder (or its masks/) is offered to every visitor of the page as a
    sample at the next start: one user's image shown to all."""
    samples = tmp_path / "samples"
    (samples / "masks").mkdir(parents=True)
    with pytest.raises(UserError, match="--keep-uploads .* --samples"):
        ServeConfig(samples_dir=samples, keep_uploads=samples / keep)
    assert ServeConfig(samples_dir=samples, keep_uploads=tmp_path / "uploads").keep_uploads == tmp_path / "uploads"


@pytest.mark.parametrize("port", [-1, 65536])
def test_a_port_outside_0_to_65535_is_refused(port):
    with pytest.raises(UserError, match=f"--port must be between 0 and 65535, got {port}"):
        check_can_listen("127.0.0.1", port)


def test_the_highest_port_is_a_port():
    try:
        check_can_listen("127.0.0.1", 65535)
    except UserError as e:  # taken by something else on this machine: still not a range error
        assert "is in use" in str(e), e


def test_a_refused_start_makes_no_keep_uploads_folder(tmp_path, capsys):
    """The folder for kept uploads is made once every other check has passed: a start refused for a
    missing checkpoint or a bad CORS origin leaves nothing behind."""
    kept = tmp_path / "kept" / "uploads"
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.safetensors"), "--keep-uploads", str(kept)]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "kept").exists()
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.safetensors"), "--keep-uploads", str(kept),
                 "--cors", "https://example.org/"]) == 2
    assert "is not an origin" in capsys.readouterr().err and not (tmp_path / "kept").exists()


# ---------------------------------------------------------------- timing, headers, schema and docs (round 26)

def test_ms_and_queue_ms_are_milliseconds_rounded_to_two_places(predictor, monkeypatch):
    """ms: from the worker's start to the answer; queue_ms: from the upload's end (queued) to the
    worker's start; both in milliseconds, two decimals (a clock that reads 10.0 and then 10.0123456
    is 12.35 ms; queued at 9.75 is 250 ms in the queue)."""
    service = create_app(predictor, samples=[]).state.service
    clock = iter([10.0, 10.0123456])
    monkeypatch.setattr(app_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    image = Part("image", "a.png", "image/png", bytearray(png_bytes(noise(16, 16))))
    out = service.predict(image, None, {}, Wanted(), 9.75)
    assert (out["ms"], out["queue_ms"]) == (12.35, 250.0)


def test_openapi_gives_the_tile_minimum_and_the_sample_routes_image_answers(predictor):
    """/api/samples/{name} answers an image of its own type, .../ground_truth a PNG: the schema
    says so (not FastAPI's default JSON)."""
    paths = request(create_app(predictor, samples=[]), "GET", "/openapi.json").json()["paths"]
    form = paths["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["tile"]["minimum"] == 0  # 0: whole image; negative tiles are refused
    assert "image/*" in paths["/api/samples/{name}"]["get"]["responses"]["200"]["content"]
    assert "image/png" in paths["/api/samples/{name}/ground_truth"]["get"]["responses"]["200"]["content"]


def test_keep_uploads_keeps_the_ground_truth_beside_the_image(predictor, tmp_path):
    """--keep-uploads saves both files of a scored request as received, each named by its role."""
    kept = tmp_path / "kept"
    app = create_app(predictor, ServeConfig(keep_uploads=kept), samples=[])
    image, truth = png_bytes(noise(24, 24)), png_bytes(np.zeros((24, 24), np.uint8))
    r = request(app, "POST", "/api/predict", files={"image": ("a.png", image, "image/png"),
                                                    "ground_truth": ("t.png", truth, "image/png")})
    assert r.status_code == 200, r.text
    saved = {p.name.rsplit("-", 1)[1]: p.read_bytes() for p in kept.iterdir()}
    assert saved == {"image.png": image, "ground_truth.png": truth}


def test_cors_preflight_allows_the_api_key_headers(predictor):
    """A page on an allowed origin may send the key as X-API-Key or Authorization: Bearer: the
    preflight lets both headers through."""
    app = create_app(predictor, ServeConfig(cors_origins=("http://elsewhere.example",), api_key="k"), samples=[])
    for header in ("X-API-Key", "Authorization"):
        pre = request(app, "OPTIONS", "/api/predict", headers={
            "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": header})
        assert pre.status_code == 200, (header, pre.text)
        assert header.lower() in pre.headers["access-control-allow-headers"].lower(), header


def test_every_answer_says_nosniff(predictor):
    """The page, its script, the JSON routes, their errors and a sample image all carry
    X-Content-Type-Options: nosniff (a sample or an error is never sniffed into HTML)."""
    app = create_app(predictor)
    sample = request(app, "GET", "/api/info").json()["samples"][0]["url"]
    answers = [request(app, "GET", url) for url in ("/", "/static/app.js", "/docs", "/api/health", sample,
                                                    "/api/samples/nope.png")]
    answers.append(post_image(app, b"not an image\n" * 10))
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 404, 415]
    assert all(r.headers.get("x-content-type-options") == "nosniff" for r in answers), [
        (r.url.path, dict(r.headers)) for r in answers]


def test_docs_page_tables_the_predict_forms_fields(predictor):
    """/docs renders the form of POST /api/predict as a table: each field, its type (format for
    files), required for the image, and its description; then the route's responses."""
    docs = request(create_app(predictor, samples=[]), "GET", "/docs").text
    predict = docs.split("<h2><code>POST /api/predict</code></h2>")[1].split("</section>")[0]
    assert "<h3>Body: <code>multipart/form-data</code></h3>" in predict
    assert "<tr><td><code>image</code></td><td>binary (required)</td><td>PNG, JPEG," in predict
    assert ("<tr><td><code>tile</code></td><td>integer</td><td>semantic: predict in tiles of this side (&gt;= 16)"
            in predict)
    assert ("<tr><td><code>tta</code></td><td>string</td><td>semantic: test-time augmentation (flip: image + mirror"
            in predict and "One of: none, flip, d4, ms.</td></tr>" in predict)
    assert "</table>\n<h3>Responses</h3>" in predict


def test_openapi_schemas_name_the_fields_the_answer_has(predictor):
    """PredictResponse, Metrics and ClassScore in /openapi.json list exactly the keys of a real
    answer with a ground truth (the schema documents; the route answers its own JSON)."""
    app = create_app(predictor, samples=[])
    schema = request(app, "GET", "/openapi.json").json()
    schemas = schema["components"]["schemas"]
    image = png_bytes(noise(24, 24))
    truth = png_bytes(np.zeros((24, 24), np.uint8))
    answer = request(app, "POST", "/api/predict", files={"image": ("a.png", image, "image/png"),
                                                         "ground_truth": ("t.png", truth, "image/png")}).json()
    fields = {name: set(schemas[name]["properties"]) for name in ("PredictResponse", "Metrics", "ClassScore",
                                                                  "ClassShare")}
    assert set(answer) <= fields["PredictResponse"] and set(answer["metrics"]) == fields["Metrics"]
    assert set(answer["metrics"]["per_class"][0]) == fields["ClassScore"]
    assert set(answer["classes"][0]) == fields["ClassShare"]
    form = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {name: p["type"] for name, p in form["properties"].items()} == {
        "image": "string", "tile": "integer", "overlap": "number", "tta": "string", "uncertainty": "boolean",
        "crf": "string", "score_thresh": "number", "overlay": "boolean", "return_image": "boolean",
        "ground_truth": "string", "truth_format": "string"}


def test_uploads_that_pil_warns_about_are_refused_without_a_python_warning_in_the_log(predictor):
    """A PNG declaring 96 MP (between PIL's limit and twice it) and a TIFF whose page directory lies
    past its end were refused (413, 400), but each wrote PIL's DecompressionBombWarning or 'Corrupt
    EXIF data' warnings, with Pillow's source path, to the server's stderr: lines any client could
    add to the log; predict's reader does not show them."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 8000, 1, 0, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
    tiff = bytearray(png_bytes(noise(8, 8), fmt="TIFF"))
    tiff[4:8] = struct.pack("<I", 2**31)  # the first page directory past the end
    app = create_app(predictor, samples=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        big = post_image(app, bomb)
        cut = post_image(app, bytes(tiff), name="a.tif", ctype="image/tiff")
    assert big.status_code == 413 and "12000x8000" in big.json()["detail"]
    assert cut.status_code == 400 and "TIFF" in cut.json()["detail"]
    assert [str(w.message) for w in caught] == []


def test_reload_serves_a_checkpoint_written_over_and_keeps_the_old_model_for_one_it_cannot_serve(
        tmp_path, monkeypatch, caplog):
    """serve --reload: a checkpoint written over (a training run's new best) answers from the next
    request on, with the options given at start, and /api/info names its SHA-256; a file that cannot
    be loaded, or a model the running pool cannot serve (dropout where there was none), is logged
    once and reported, and the model before it goes on answering. Without --reload the model loaded
    at start answers throughout."""
    import hashlib

    import uvicorn

    import pixelwise.serve.config

    path = _unet_checkpoint(tmp_path / "best.safetensors")
    image = noise(40, 56, seed=5)
    monkeypatch.setattr(pixelwise.serve.config, "check_can_listen", lambda host, port: None)
    started = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: started.update(app=server.config.app))

    def mask(app):
        body = post_image(app, png_bytes(image)).json()
        return np.asarray(decode_png(body["mask_png_base64"])), body["options"]

    def expected(**options):
        return Predictor.from_checkpoint(path, **options).predict(image).mask

    def write_other(seed, dropout=0.0):
        torch.manual_seed(seed)
        kw = {**KW, "dropout": dropout}
        save_checkpoint(path, create_model("unet", num_classes=4, **kw).eval(), {
            "model": "unet", "num_classes": 4, "model_kwargs": kw, "task": "semantic", "class_names": CLASS_NAMES,
            "palette": PALETTE, "mean": [0.5] * 3, "std": [0.25] * 3})

    assert main(["serve", "--checkpoint", str(path), "--log-level", "warning", "--tile", "32"]) == 0
    plain = started["app"]
    assert main(["serve", "--checkpoint", str(path), "--log-level", "warning", "--tile", "32", "--reload"]) == 0
    app = started["app"]
    first = expected(tile=32)
    assert np.array_equal(mask(app)[0], first)
    info = request(app, "GET", "/api/info").json()
    assert info["reload"] == {"enabled": True, "error": None}
    assert request(plain, "GET", "/api/info").json()["reload"] == {"enabled": False, "error": None}

    write_other(1)
    second = expected(tile=32)
    assert not np.array_equal(first, second)  # other weights, another mask
    got, options = mask(app)
    assert np.array_equal(got, second) and options["tile"] == 32  # the options given at start, kept
    assert np.array_equal(mask(plain)[0], first)  # without --reload: the model loaded at start
    info = request(app, "GET", "/api/info").json()
    assert info["model_files"] == [{"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]

    for bad, reason in ((lambda: path.write_bytes(png_bytes(noise(8, 8))), "is a PNG image"),
                        (lambda: write_other(2, dropout=0.5), "has dropout")):
        bad()
        caplog.clear()
        with caplog.at_level("WARNING", logger="pixelwise.serve"):
            assert np.array_equal(mask(app)[0], second)  # the model before it goes on answering
            assert np.array_equal(mask(app)[0], second)
        warnings_logged = [r.getMessage() for r in caplog.records  # (python-multipart's floor logs its own too)
                           if r.levelname == "WARNING" and r.name == "pixelwise.serve"]
        assert len(warnings_logged) == 1 and "was written over and not loaded" in warnings_logged[0]
        error = request(app, "GET", "/api/info").json()["reload"]["error"]
        assert reason in error and str(path) in error and "\n" not in error

    write_other(3)  # a file it can serve again: loaded, and the error is gone
    assert np.array_equal(mask(app)[0], expected(tile=32))
    assert request(app, "GET", "/api/info").json()["reload"] == {"enabled": True, "error": None}
