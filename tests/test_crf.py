"""The fully connected CRF (DeepLab, arXiv:1412.7062; Krähenbühl & Koltun, arXiv:1210.5644): equal to
Krähenbühl's densecrf library on stored cases, the lattice's filter close to the Gaussian sum, and
what the CRF does to a noisy prediction."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pixelwise.errors import UserError
from pixelwise.inference.crf import MAX_CRF_PIXELS, CRFSettings, PermutohedralLattice, check_crf_size, dense_crf

REFERENCE = Path(__file__).parent / "fixtures" / "crf" / "densecrf_reference.npz"


@pytest.mark.parametrize("case", range(5))
def test_equals_krahenbuhls_densecrf(case):
    """Outputs of densecrf (pydensecrf, the library DeepLab's CRF used) stored by
    tests/fixtures/crf/make_reference.py: 3 RGB cases of other sizes, classes and parameters, one
    grey (a 3-d bilateral lattice), one of sure probabilities (most below the unary's 1e-5 clip)."""
    ref = np.load(REFERENCE)
    it, bi_w, bi_xy, bi_rgb, pos_w, pos_xy = ref[f"settings{case}"]
    settings = CRFSettings(int(it), bi_w, bi_xy, bi_rgb, pos_w, pos_xy)
    probs = ref[f"probs{case}"]
    q = dense_crf(ref[f"image{case}"], torch.from_numpy(probs), settings).numpy()
    expected = ref[f"q{case}"]
    assert q.shape == expected.shape and q.dtype == np.float32
    np.testing.assert_allclose(q, expected, atol=1e-4)
    assert (q.argmax(0) == expected.argmax(0)).all()
    if case < 4:  # the CRF changed a good part of the labels (sure ones it leaves)
        assert (expected.argmax(0) != probs.argmax(0)).mean() > 0.1


def naive_gaussian_sum(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    d2 = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / 2) @ values


@pytest.mark.parametrize("d", [2, 3, 5])
def test_the_lattice_filter_approximates_the_gaussian_sum(d):
    rng = np.random.default_rng(d)
    features = rng.uniform(0, 4, (300, d)).astype(np.float32)
    lattice = PermutohedralLattice(features)
    a, b = rng.random((300, 1), dtype=np.float32), rng.random((300, 1), dtype=np.float32)
    # nearly symmetric, as the Gaussian (the blurs along the d + 1 axes commute where no vertex is missing)
    assert (a.T @ lattice.filter(b)).item() == pytest.approx((b.T @ lattice.filter(a)).item(), rel=0.03)
    # an approximation of the exact sum of exp(-|f_i - f_j|^2 / 2) v_j: the same shape; normalised by
    # the sum of the weights (as the CRF uses it), the same weighted means
    values = rng.random((300, 2), dtype=np.float32)
    exact, fast = naive_gaussian_sum(features, values), lattice.filter(values)
    assert np.corrcoef(exact.ravel(), fast.ravel())[0, 1] > 0.95
    ones = np.ones((300, 1), np.float32)
    means = fast / lattice.filter(ones)
    error = np.abs(means - exact / naive_gaussian_sum(features, ones))
    assert error.mean() < 0.03 and error.max() < 0.3, (error.mean(), error.max())
    # points far apart on the lattice do not see each other: each one's weighted mean is its own value
    for spacing in (100, 30_000):
        far = np.arange(4, dtype=np.float32)[:, None].repeat(d, 1) * spacing
        alone = PermutohedralLattice(far)
        own = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
        np.testing.assert_allclose(alone.filter(own) / alone.filter(np.ones((4, 1), np.float32)), own, rtol=1e-5)



def test_vertices_sorted_as_rows_give_the_same_filter(monkeypatch):
    features = np.random.default_rng(0).uniform(0, 6, (500, 5)).astype(np.float32)
    values = np.random.default_rng(1).random((500, 3), dtype=np.float32)
    coded = PermutohedralLattice(features)
    monkeypatch.setattr(PermutohedralLattice, "CODE_LIMIT", 0)
    rows = PermutohedralLattice(features)
    assert coded._radix is not None and rows._radix is None and rows.m == coded.m
    np.testing.assert_allclose(rows.filter(values), coded.filter(values), rtol=1e-6)


def test_vertices_coded_where_the_lattice_coordinates_spread_unequally_stay_distinct(monkeypatch):
    """The mixed-radix codes must keep vertices apart whatever each coordinate's range: here the
    first lattice coordinate (the sum of the scaled features) stays within a few units while the
    second spreads over ~70, so a radix too small for the second coordinate would merge vertices."""
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 20, 400)
    features = np.c_[t, 40 - np.sqrt(3) * t + rng.uniform(0, 1, 400)].astype(np.float32)
    values = rng.random((400, 2), dtype=np.float32)
    coded = PermutohedralLattice(features)
    monkeypatch.setattr(PermutohedralLattice, "CODE_LIMIT", 0)
    rows = PermutohedralLattice(features)
    assert coded._radix is not None and rows._radix is None and rows.m == coded.m
    np.testing.assert_allclose(coded.filter(values), rows.filter(values), rtol=1e-6)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_the_lattice_filter_has_the_scale_of_the_gaussian_sum(d):
    """Not only proportional: the filtered ones are the Gaussian sum of the weights itself, which the
    lattice approximates from below (densecrf's constant 1 / (1 + 2^-d) included); a point far from
    all others gets about its own weight, exp(0) = 1."""
    rng = np.random.default_rng(d)
    features = rng.uniform(0, 4, (300, d)).astype(np.float32)
    ones = np.ones((300, 1), np.float32)
    ratio = PermutohedralLattice(features).filter(ones) / naive_gaussian_sum(features, ones)
    assert 0.3 < ratio.mean() < 1.0 and ratio.max() < 1.0, (ratio.mean(), ratio.max())
    alone = PermutohedralLattice(np.zeros((1, d), np.float32)).filter(np.ones((1, 1), np.float32))
    assert 0.85 < alone.item() <= 1.0


def test_without_pairwise_terms_the_probabilities_come_back():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), (9, 11)).transpose(2, 0, 1).astype(np.float32)
    probs = np.clip(probs, 1e-3, None)
    probs /= probs.sum(0)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    q = dense_crf(image, torch.from_numpy(probs), CRFSettings(iterations=3, bi_w=0, pos_w=0))
    np.testing.assert_allclose(q.numpy(), probs, rtol=1e-5, atol=1e-6)


def test_the_crf_takes_the_labels_of_the_colour_regions():
    """Two flat colour regions, a prediction right on 80% of the pixels (20% flipped, not sure):
    the CRF gives each region its majority label."""
    h, w = 40, 48
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    image = np.where(truth[..., None] == 1, [200, 60, 40], [30, 90, 220]).astype(np.uint8)
    rng = np.random.default_rng(1)
    noisy = np.where(rng.random((h, w)) < 0.2, 1 - truth, truth)
    probs = np.stack([np.where(noisy == 0, 0.65, 0.35), np.where(noisy == 1, 0.65, 0.35)]).astype(np.float32)
    q = dense_crf(image, torch.from_numpy(probs), CRFSettings(bi_xy_std=30, bi_rgb_std=10))
    assert (probs.argmax(0) == truth).mean() < 0.85
    assert (q.argmax(0).numpy() == truth).all()
    assert torch.allclose(q.sum(0), torch.ones(h, w), atol=1e-5)


def test_settings_parse_and_refuse():
    assert CRFSettings.parse("") == CRFSettings()
    assert CRFSettings.parse("bi_w=5, iterations=3") == CRFSettings(iterations=3, bi_w=5.0)
    assert CRFSettings.parse(" bi_w = 5 , iterations =3,") == CRFSettings(iterations=3, bi_w=5.0)  # spaces anywhere
    settings = CRFSettings(iterations=3, bi_w=5.5, pos_xy_std=2.0)
    assert settings.text() == "iterations=3,bi_w=5.5,bi_xy_std=121,bi_rgb_std=5,pos_w=3,pos_xy_std=2"
    assert CRFSettings.parse(settings.text()) == settings  # what predict prints, --crf takes back
    refused = [("bi_w", "is not NAME=VALUE"), ("colour=3", "is not NAME=VALUE"), ("bi_w=x", "bi_w must be a number"),
               ("iterations=0", "iterations must be a whole number from 1 to 100"),
               ("bi_xy_std=0", "bi_xy_std must be a number above 0"), ("pos_w=-1", "pos_w must be a number >= 0"),
               ("bi_w=nan", "bi_w must be a number >= 0"), ("iterations=2.5", "iterations must be a number"),
               ("bi_w=4,pos_w=1,bi_w=5", "bi_w is given twice")]
    for text, words in refused:
        with pytest.raises(UserError, match=f"^--crf: .*{words}"):
            CRFSettings.parse(text)


def test_settings_that_overflow_the_lattice_or_float32_are_refused():
    """A std far below a pixel or a gray level overflowed the lattice's int32 coordinates (`predict
    --crf bi_rgb_std=1e-9`: an IndexError traceback, exit 1; the server: 500); a weight beyond float32
    made every probability NaN (`--crf bi_w=1e39`: an all-class-0 mask, exit 0)."""
    for text, words in [("bi_xy_std=1e-8", "bi_xy_std must be at least"), ("bi_rgb_std=1e-9", "bi_rgb_std must be at"),
                        ("pos_xy_std=1e-12", "pos_xy_std must be at least"), ("bi_w=1e39", "bi_w must be at most"),
                        ("pos_w=1e30", "pos_w must be at most")]:
        with pytest.raises(UserError, match=f"^--crf: {words}"):
            CRFSettings.parse(text)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(3, 12, 16)).astype(np.float32)), 0)
    for settings in (CRFSettings(bi_rgb_std=0.01, bi_xy_std=0.01, pos_xy_std=0.01), CRFSettings(bi_w=1e6, pos_w=1e6)):
        refined = np.asarray(dense_crf(image, probs, settings))  # the bounds themselves still work
        assert np.isfinite(refined).all()
    # a long image at the smallest std: 5000 / 0.01 * 6^2 positions is past float32's exact integers (the
    # position kernel's 3^2: at 20000 pixels)
    long = np.zeros((1, 5000, 3), np.uint8)
    with pytest.raises(UserError, match=r"^the CRF setting bi_xy_std=0.01 spreads this 5000x1 image .* least 0.0107"):
        dense_crf(long, torch.full((2, 1, 5000), 0.5), CRFSettings(bi_xy_std=0.01))
    with pytest.raises(UserError, match=r"^the CRF setting pos_xy_std=0.01 spreads this 20000x1 image .* 0.0107"):
        dense_crf(np.zeros((1, 20000, 3), np.uint8), torch.full((2, 1, 20000), 0.5), CRFSettings(pos_xy_std=0.01))
    assert np.isfinite(np.asarray(dense_crf(long, torch.full((2, 1, 5000), 0.5), CRFSettings(bi_w=0, pos_xy_std=0.01,
                                                                                            bi_xy_std=0.01)))).all()


def test_sizes_that_do_not_fit_are_named():
    with pytest.raises(UserError, match="needs the image as uint8.*got float32"):
        dense_crf(np.zeros((5, 6, 3), np.float32), torch.full((2, 5, 6), 0.5))
    with pytest.raises(UserError, match="same H, W"):
        dense_crf(np.zeros((5, 6, 3), np.uint8), torch.full((2, 5, 7), 0.5))
    side = int(MAX_CRF_PIXELS ** 0.5) + 1
    with pytest.raises(UserError, match=f"^the CRF refines images of up to {MAX_CRF_PIXELS:,} pixels"):
        dense_crf(np.zeros((side, side, 3), np.uint8), torch.full((2, 1, 1), 0.5).expand(2, side, side))


def test_the_size_and_settings_bounds_are_inclusive_where_documented():
    """At most MAX_CRF_PIXELS pixels (2000 x 2000 = 4,000,000 passes, one more column does not);
    1 to 100 iterations; lattice coordinates below 2^24: a 2^20-pixel-long image at pos_xy_std
    0.5625 reaches 2^20 / 0.5625 * 3^2 = 2^24 exactly (refused), a hair above that std does not."""
    check_crf_size(2000, 2000)
    with pytest.raises(UserError, match="refines images of up to"):
        check_crf_size(2000, 2001)
    assert CRFSettings(iterations=100).iterations == 100 and CRFSettings(iterations=1).iterations == 1
    for bad in (101, True):
        with pytest.raises(UserError, match="iterations must be a whole number from 1 to 100"):
            CRFSettings(iterations=bad)
    with pytest.raises(UserError, match="pos_xy_std=0.5625 spreads this 1048576x1 image"):
        check_crf_size(1, 2 ** 20, settings=CRFSettings(bi_w=0, pos_xy_std=0.5625))
    check_crf_size(1, 2 ** 20, settings=CRFSettings(bi_w=0, pos_xy_std=0.5626))


# --- the CRF in prediction, evaluation, the command line and the server ------------------------------
KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}


def unet_checkpoint(path: Path, seed: int = 0) -> Path:
    from pixelwise import create_model, save_checkpoint

    torch.manual_seed(seed)
    model = create_model("unet", num_classes=4, **KW).eval()  # the shapes dataset's 4 classes
    save_checkpoint(path, model, {"model": "unet", "num_classes": 4, "model_kwargs": KW, "task": "semantic",
                                  "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("crf")
    return unet_checkpoint(root / "a.safetensors", 0), unet_checkpoint(root / "b.safetensors", 1)


def blocks(h: int = 36, w: int = 44, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = [220, 40, 40]
    image[h // 2:, w // 2:] = [40, 200, 60]
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def test_a_predictor_refines_what_it_would_predict_without_the_crf(checkpoints):
    from pixelwise import Predictor

    image = blocks()
    plain = Predictor.from_checkpoint(checkpoints[0], tta="flip")
    refined = Predictor.from_checkpoint(checkpoints[0], tta="flip", crf=CRFSettings(iterations=4, bi_xy_std=20))
    expected = dense_crf(image, plain.predict(image).probs, CRFSettings(iterations=4, bi_xy_std=20))
    got = refined.predict(image, uncertainty=True)
    torch.testing.assert_close(got.probs, expected)
    assert np.array_equal(got.mask, expected.argmax(0).numpy())
    assert not np.array_equal(got.mask, plain.predict(image).mask)  # it did something
    # batches, row streams and tiles go through it too
    assert np.array_equal(refined.predict_batch([image, image])[1].mask, got.mask)
    assert np.array_equal(np.concatenate([mask for _, mask, _ in refined.predict_rows([image])[0]]), got.mask)
    tiled = Predictor.from_checkpoint(checkpoints[0], tile=16, crf=True)
    expected = dense_crf(image, Predictor.from_checkpoint(checkpoints[0], tile=16).predict(image).probs)
    torch.testing.assert_close(tiled.predict(image).probs, expected)
    grey = image[..., 0]  # a grey image: one colour feature
    assert refined.predict(np.dstack([grey] * 3)).mask.shape == grey.shape


def test_an_ensemble_refines_its_mean_once(checkpoints):
    from pixelwise.inference.ensemble import from_checkpoints

    image = blocks(seed=2)
    ensemble = from_checkpoints(list(checkpoints), crf=True)
    assert all(m.crf is None for m in ensemble.members) and ensemble.crf == CRFSettings()
    mean = sum(from_checkpoints([c]).predict(image).probs for c in checkpoints) / 2
    torch.testing.assert_close(ensemble.predict(image).probs, dense_crf(image, mean), atol=1e-5, rtol=1e-5)


def test_crf_options_are_checked_by_the_predictor(checkpoints):
    from pixelwise import SemanticPredictor, load_checkpoint

    model, meta = load_checkpoint(checkpoints[0])
    assert SemanticPredictor(model, meta, crf={"bi_w": 2}).crf == CRFSettings(bi_w=2)
    assert SemanticPredictor(model, meta, crf=False).crf is None
    with pytest.raises(UserError, match="crf must be None, True"):
        SemanticPredictor(model, meta, crf={"colour": 2})
    big = SemanticPredictor(model, meta, crf=True)
    calls = []
    big.runner = lambda x: calls.append(x) or torch.zeros(1)
    with pytest.raises(UserError, match="the CRF refines images of up to 4,000,000 pixels"):
        big.predict(np.zeros((2001, 2000, 3), np.uint8))
    assert not calls  # refused before the model ran


def test_predict_and_eval_take_crf_on_the_command_line(checkpoints, tmp_path, capsys):
    import json

    from PIL import Image

    from pixelwise import Predictor
    from pixelwise.cli import main
    from pixelwise.data.io import read_image

    inputs = tmp_path / "in"
    inputs.mkdir()
    image = blocks()
    Image.fromarray(image).save(inputs / "a.png")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoints[0]), str(inputs), "--out", str(out), "--crf",
                 "iterations=3", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "refined by the fully connected CRF (iterations=3,bi_w=4,bi_xy_std=121,bi_rgb_std=5,pos_w=3," in said
    written = np.asarray(Image.open(out / "a.png"))
    refined = Predictor.from_checkpoint(checkpoints[0], crf=CRFSettings(iterations=3))
    expected = refined.predict(read_image(inputs / "a.png"))
    assert np.array_equal(written, expected.mask)
    assert main(["predict", "--checkpoint", str(checkpoints[0]), str(inputs), "--out", str(tmp_path / "x"),
                 "--crf", "colour=3"]) == 2
    assert "pixelwise: error: --crf: 'colour=3' is not NAME=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    report = tmp_path / "eval.json"
    shapes = ["--dataset", "shapes", "--split", "val", "--dataset-kwargs", '{"num_val": 2, "size": 32}']
    assert main(["eval", "--checkpoint", str(checkpoints[0]), *shapes, "--crf", "--no-progress", "--json",
                 str(report)]) == 0
    provenance = json.loads(report.read_text())["provenance"]["prediction"]
    assert provenance["crf"] == {"iterations": 10, "bi_w": 4.0, "bi_xy_std": 121.0, "bi_rgb_std": 5.0, "pos_w": 3.0,
                                 "pos_xy_std": 3.0}


def test_predict_checks_every_input_against_the_crfs_size_before_writing(checkpoints, tmp_path, capsys,
                                                                          monkeypatch):
    from PIL import Image

    import pixelwise.inference.crf
    from pixelwise.cli import EXIT_SKIPPED, main

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(blocks(20, 20)).save(inputs / "a_small.png")
    Image.fromarray(blocks(36, 44)).save(inputs / "b_large.png")
    monkeypatch.setattr(pixelwise.inference.crf, "MAX_CRF_PIXELS", 1000)  # 20x20 within, 44x36 above
    out = tmp_path / "out"
    command = ["predict", "--checkpoint", str(checkpoints[0]), str(inputs), "--out", str(out), "--crf", "--no-progress"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{inputs / 'b_large.png'}: the CRF refines images of up to 1,000 pixels" in err and "(44x36)" in err
    assert "nothing was written" in err and not out.exists()  # the small one was not predicted first
    assert main([*command, "--skip-invalid"]) == EXIT_SKIPPED
    assert sorted(p.name for p in out.iterdir()) == ["a_small.png", "a_small_overlay.png"]
    assert main(["predict", "--checkpoint", str(checkpoints[0]), str(inputs / "b_large.png"), "--out",
                 str(tmp_path / "plain"), "--no-progress"]) == 0  # without --crf, no limit of the CRF's
    # settings that overflow the lattice's coordinates for an image are refused with the size, up front
    monkeypatch.undo()
    capsys.readouterr()
    Image.fromarray(blocks(1, 5000)).save(inputs / "c_long.png")
    two = [str(inputs / "a_small.png"), str(inputs / "c_long.png")]
    assert main(["predict", "--checkpoint", str(checkpoints[0]), *two, "--out", str(tmp_path / "out2"), "--crf",
                 "bi_xy_std=0.01", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{inputs / 'c_long.png'}: the CRF setting bi_xy_std=0.01 spreads this 5000x1 image" in err, err
    assert "nothing was written" in err and not (tmp_path / "out2").exists()


def test_eval_checks_every_image_against_the_crfs_size_before_the_first_is_predicted(checkpoints, tmp_path,
                                                                                     capsys, monkeypatch):
    from PIL import Image

    import pixelwise.inference.crf
    import pixelwise.inference.predictor
    from pixelwise.cli import main

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, (h, w) in (("a", (20, 20)), ("b", (36, 44))):
        Image.fromarray(blocks(h, w)).save(root / "images" / f"{name}.png")
        Image.fromarray(np.arange(h * w, dtype=np.uint8).reshape(h, w) % 4).save(root / "masks" / f"{name}.png")
    command = ["eval", "--checkpoint", str(checkpoints[0]), "--dataset", "folder", "--data", str(root), "--split",
               "all", "--crf", "--no-progress", "--no-bf"]
    assert main(command) == 0
    capsys.readouterr()
    monkeypatch.setattr(pixelwise.inference.crf, "MAX_CRF_PIXELS", 1000)  # 20x20 within, 44x36 above
    ran = []
    monkeypatch.setattr(pixelwise.inference.predictor.SemanticPredictor, "predict",
                        lambda self, *a, **k: ran.append(1))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{root / 'images' / 'b.png'}: the CRF refines images of up to 1,000 pixels" in err and not ran
    # and against the lattice for the settings given, from the headers too
    monkeypatch.setattr(pixelwise.inference.crf, "MAX_CRF_PIXELS", 4_000_000)
    Image.fromarray(blocks(1, 5000)).save(root / "images" / "c.png")
    Image.fromarray(np.zeros((1, 5000), np.uint8)).save(root / "masks" / "c.png")
    assert main([*command[:-2], "bi_xy_std=0.01", "--no-progress", "--no-bf"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'images' / 'c.png'}: the CRF setting bi_xy_std=0.01 spreads this 5000x1 image" in err, err
    assert not ran


def post_image(predictor, image: np.ndarray, fields: dict):
    """The server's answer (an httpx response) to ``image`` sent as a PNG with the form ``fields``."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[dev]'")
    httpx = pytest.importorskip("httpx", reason="httpx (dev extra) drives the ASGI app")
    import asyncio
    import io

    from PIL import Image

    from pixelwise.serve.app import create_app

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")

    async def go():
        app = create_app(predictor, samples=[])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
            return await c.post("/api/predict", files={"image": ("a.png", buf.getvalue(), "image/png")}, data=fields)
    return asyncio.run(go())


def mask_of(body: dict) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"]))))


def test_the_server_refines_with_the_crf_it_was_started_with(checkpoints):
    from pixelwise import Predictor

    image = blocks(seed=3)
    predictor = Predictor.from_checkpoint(checkpoints[0], crf=CRFSettings(iterations=2))
    for fields in ({}, {"tta": "flip"}):  # a request's own options keep the server's CRF
        body = post_image(predictor, image, fields).json()
        assert body["options"]["crf"] == {**vars(CRFSettings(iterations=2))}
        expected = Predictor.from_checkpoint(checkpoints[0], crf=CRFSettings(iterations=2), tta=fields.get("tta"))
        assert np.array_equal(mask_of(body), expected.predict(image).mask)


def test_a_request_turns_the_crf_on_off_or_sets_it(checkpoints, tmp_path, monkeypatch):
    app_module = pytest.importorskip("pixelwise.serve.app", reason="the serve extra is not installed")
    from pixelwise import Predictor, create_model, save_checkpoint

    image = blocks(seed=4)

    def post(predictor, fields):
        return post_image(predictor, image, fields)

    plain = Predictor.from_checkpoint(checkpoints[0])
    started_with = Predictor.from_checkpoint(checkpoints[0], crf=CRFSettings(iterations=2, bi_w=6))
    cases = [(plain, "true", CRFSettings()), (plain, "ON", CRFSettings()), (plain, "false", None),
             (plain, "iterations=3, pos_w=1", CRFSettings(iterations=3, pos_w=1)),
             (started_with, "yes", CRFSettings(iterations=2, bi_w=6)),  # the server's own settings
             (started_with, "0", None), (started_with, "bi_w=2", CRFSettings(bi_w=2))]
    for predictor, field, settings in cases:
        answer = post(predictor, {"crf": field})
        assert answer.status_code == 200, (field, answer.text)
        body = answer.json()
        assert body["options"]["crf"] == (None if settings is None else vars(settings)), field
        expected = Predictor.from_checkpoint(checkpoints[0], crf=settings).predict(image).mask
        assert np.array_equal(mask_of(body), expected), field
    assert not np.array_equal(mask_of(post(plain, {"crf": "true"}).json()), plain.predict(image).mask)

    answer = post(plain, {"crf": "colour=3"})
    assert answer.status_code == 422 and answer.json()["detail"].startswith("crf: 'colour=3' is not NAME=VALUE")
    answer = post(plain, {"crf": "maybe"})
    assert answer.status_code == 422 and answer.json()["detail"].startswith("crf must be true, false or settings")
    answer = post(plain, {"crf": "iterations=0"})
    assert answer.status_code == 422 and "crf: iterations must be a whole number from 1 to 100" in answer.text
    # named by the setting, as the field takes it, not as the command line's --crf (the model does not run)
    answer = post_image(plain, blocks(1, 5000), {"crf": "bi_xy_std=0.01"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith("the CRF setting bi_xy_std=0.01 spreads this 5000x1 image")
    # an image above the CRF's size is refused before the model runs, as too large (the limit made small)
    monkeypatch.setattr(app_module, "MAX_CRF_PIXELS", image.shape[0] * image.shape[1] - 1)
    ran = []
    monkeypatch.setattr(plain, "runner", lambda x: ran.append(x))
    answer = post(plain, {"crf": "true"})
    assert answer.status_code == 413 and "send it with crf=false, or a smaller copy" in answer.json()["detail"]
    assert not ran
    kw = {"min_size": 64, "max_size": 64}
    model = create_model("maskrcnn_resnet18_fpn", num_classes=3, **kw).eval()
    save_checkpoint(tmp_path / "m.safetensors", model, {"model": "maskrcnn_resnet18_fpn", "num_classes": 3,
                                                       "model_kwargs": kw, "task": "instance"})
    answer = post(Predictor.from_checkpoint(tmp_path / "m.safetensors"), {"crf": "true"})
    assert answer.status_code == 422 and answer.json()["detail"] == "crf does not apply to instance models"


def test_instance_models_refuse_the_crf(tmp_path):
    from pixelwise import Predictor, create_model, save_checkpoint

    kw = {"min_size": 64, "max_size": 64}
    model = create_model("maskrcnn_resnet18_fpn", num_classes=3, **kw).eval()
    save_checkpoint(tmp_path / "m.safetensors", model, {"model": "maskrcnn_resnet18_fpn", "num_classes": 3,
                                                       "model_kwargs": kw, "task": "instance"})
    with pytest.raises(UserError, match="--crf does not apply to instance models"):
        Predictor.from_checkpoint(tmp_path / "m.safetensors", crf=True)


def test_a_grey_image_is_refined_alike_as_a_grey_array_and_as_the_rgb_image_its_file_reads_as(tmp_path):
    """A one-channel contract takes a grey uint8[H, W] "exactly as np.repeat(img[..., None], 3, -1)"
    (preprocess.to_tensor), and predict, eval and serve read a grey PNG (an ISBI slice) as that RGB
    image. Without the CRF both give the same probabilities; with it the grey array was refined on
    one colour feature and the RGB image on three equal ones (a colour distance sqrt(3) larger, and
    another lattice): on a noisy ramp, 12 of the 2,304 pixels of the Python API's mask differed from
    the mask `pixelwise predict --crf` wrote for the same file, probabilities by up to 0.3.
    docs/inference.md: a grey image uses its one channel."""
    from pixelwise.inference.predictor import SemanticPredictor

    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 3, padding=1).eval()  # undecided probabilities: the CRF decides
    meta = {"num_classes": 2, "mean": [0.5], "std": [0.25]}
    rng = np.random.default_rng(0)
    grey = (np.tile(np.linspace(0, 255, 48), (48, 1)) + rng.normal(0, 12, (48, 48))).clip(0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, -1)
    plain = SemanticPredictor(model, meta)
    torch.testing.assert_close(plain.predict(grey).probs, plain.predict(rgb).probs, rtol=0, atol=0)
    refined = SemanticPredictor(model, meta, crf={"iterations": 5, "bi_xy_std": 20, "bi_rgb_std": 20})
    a, b = refined.predict(grey), refined.predict(rgb)
    assert np.array_equal(a.mask, b.mask), f"{(a.mask != b.mask).sum()} of {a.mask.size} pixels differ"
    torch.testing.assert_close(a.probs, b.probs)


@pytest.mark.parametrize("name", ["bi_w", "pos_w"])
def test_a_weight_just_above_the_maximum_is_refused(name):
    """1e6 is the largest weight taken (float32 messages); the next representable amount above it is not."""
    CRFSettings(**{name: 1e6})
    with pytest.raises(UserError, match=f"crf {name} must be at most 1e\\+06"):
        CRFSettings(**{name: 1e6 + 0.5})
