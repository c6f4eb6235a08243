"""Tiled prediction: real context from the image, the tile plan, the streamed blend, and memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pixelwise.inference.tiling as tiling_module
from pixelwise import create_model
from pixelwise.inference.predictor import SemanticPredictor, upsample_probs, upsample_rows
from pixelwise.inference.tiling import axis_spans, blend_rows, model_geometry, plan_tiles, tile_margin, tile_weight


class Float64(nn.Module):
    """Runs ``inner`` in float64, so that the float32 probabilities do not depend on how the
    convolution sums for a given input size; states the inner model's context and alignment."""

    def __init__(self, inner: nn.Module, context: int | None = None) -> None:
        super().__init__()
        self.inner = inner.double()
        self.context = inner.context if context is None else context
        self.alignment = inner.alignment

    def forward(self, x):
        return self.inner(x.double())


@pytest.fixture(scope="module")
def valid_unet():
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=4, padding="valid", batch_norm=True).eval()
    with torch.no_grad():  # a spread of classes rather than one class everywhere
        model.head.weight.mul_(8.0)
    return model


def test_unet_states_its_context_and_pooling_grid():
    assert model_geometry(create_model("unet", num_classes=2, base_channels=4, padding="valid")) == (92, 16)
    assert model_geometry(create_model("unet", num_classes=2, base_channels=4)) == (0, 16)
    assert model_geometry(nn.Conv2d(3, 2, 1)) == (0, 1)


@pytest.mark.parametrize("option", [{"input_norm": True}, {"global_context": True}, {"ibn_levels": 1}])
def test_a_valid_unet_with_image_wide_statistics_states_no_context(option):
    """Per-image standardisation, IBN's instance norm and the global context make every output
    pixel depend on the whole image: a tile cannot reproduce the whole-image output from 92 pixels
    around it, so the model states none, and tiles get the blended default instead of abutting."""
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=4, padding="valid", batch_norm=True, **option).eval()
    assert model_geometry(model) == (0, 16)
    assert SemanticPredictor(model, {"num_classes": 3}, tile=64).overlap > 0
    image = np.random.default_rng(1).integers(0, 255, (200, 60, 3), dtype=np.uint8)
    image[:100] //= 4  # a darker half: each tile's own statistics differ from the image's
    # what the context claimed: 92 pixels around each core, cores abutting, no blending
    local = Float64(model, context=92)
    whole = SemanticPredictor(local, {"num_classes": 3}).predict(image).probs
    claimed = SemanticPredictor(local, {"num_classes": 3}, tile=64, overlap=0).predict(image).probs
    assert (claimed - whole).abs().max() > 1e-3  # the claim was false: tiles are not the whole image


def test_an_ensemble_states_the_geometry_its_members_need(valid_unet):
    """An in-model ensemble tiles as exactly as its members: the widest context (none if a member
    has none) on a grid that is every member's."""
    from pixelwise.models.ensemble import Ensemble

    same = create_model("unet", num_classes=3, base_channels=4)
    assert model_geometry(Ensemble([valid_unet, valid_unet])) == (92, 16)
    assert model_geometry(Ensemble([valid_unet, same])) == (0, 16)
    assert model_geometry(Ensemble([nn.Conv2d(3, 3, 1), create_model("segnet_basic", num_classes=3)])) == (0, 16)
    image = np.random.default_rng(3).integers(0, 255, (200, 60, 3), dtype=np.uint8)
    ensemble = Ensemble([valid_unet]).eval()  # one member: the member's probabilities
    whole = SemanticPredictor(valid_unet, {"num_classes": 3}).predict(image)
    tiled = SemanticPredictor(ensemble, {"num_classes": 3}, tile=64).predict(image)
    np.testing.assert_array_equal(tiled.mask, whole.mask)
    torch.testing.assert_close(tiled.probs, whole.probs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size, tile, overlap, tta", [
    ((300, 60), 64, 0.0, None), ((70, 350), 80, 0.0, None), ((301, 250), 100, 0.0, None),
    ((300, 60), 64, 0.5, None), ((200, 200), 32, 0.0, "flip"),
    pytest.param((150, 230), 48, 0.25, "d4", marks=pytest.mark.slow)])  # 8 rotations of every tile: ~9 s
def test_valid_unet_tiles_equal_the_whole_image(valid_unet, size, tile, overlap, tta):
    """Every tile sees its real surroundings, so the tiled mask is the whole-image mask (sizes that
    are not multiples of the tile, a tile that is not a multiple of the pooling grid; cores that
    overlap and blend change nothing either). Mirrored and rotated windows (``flip``, ``d4``) see
    the pooling grid where the mirrored and rotated image does, so test-time augmentation keeps it."""
    image = np.random.default_rng(sum(size)).integers(0, 255, (*size, 3), dtype=np.uint8)
    whole = SemanticPredictor(valid_unet, {"num_classes": 3}, tta=tta).predict(image)
    predictor = SemanticPredictor(valid_unet, {"num_classes": 3}, tile=tile, overlap=overlap, tta=tta)
    assert predictor.needs_tiles(image)
    tiled = predictor.predict(image)
    # (d4's average of eight rotations of this random net is one class everywhere: the probabilities carry it)
    assert len(np.unique(whole.mask)) >= 2 or tta == "d4", "degenerate prediction"
    np.testing.assert_array_equal(tiled.mask, whole.mask)
    # float32 convolutions sum in an order that depends on the input size
    torch.testing.assert_close(tiled.probs, whole.probs, rtol=0, atol=1e-4)


def test_valid_unet_tiles_equal_the_whole_image_to_the_last_bit(valid_unet):
    """In float64 the convolutions' summation order no longer shows: the float32 probabilities are
    those of the whole image to within one unit in the last place. With only the default margin
    instead of the stated context (the model hiding it), tiles differ."""
    image = np.random.default_rng(7).integers(0, 255, (400, 60, 3), dtype=np.uint8)
    model = Float64(valid_unet)
    predictor = SemanticPredictor(model, {"num_classes": 3}, tile=64)
    assert predictor.overlap == 0  # the default for a model that states its context
    rows = plan_tiles(400, 60, 64, 0.0, 92, 16).rows
    assert any(r.window_start > 0 and r.window_stop < 400 for r in rows), "no tile sees context on both sides"
    whole = SemanticPredictor(model, {"num_classes": 3}).predict(image)
    tiled = predictor.predict(image)
    np.testing.assert_array_equal(tiled.mask, whole.mask)
    torch.testing.assert_close(tiled.probs, whole.probs, rtol=0, atol=1.2e-7)
    blind = SemanticPredictor(Float64(valid_unet, context=0), {"num_classes": 3}, tile=64, overlap=0)
    assert (blind.predict(image).mask != whole.mask).any()


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 700), tile=st.integers(16, 300), overlap=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
       context=st.sampled_from([0, 92]), alignment=st.sampled_from([1, 8, 16, 32]))
def test_axis_spans_cover_the_axis_with_aligned_windows(size, tile, overlap, context, alignment):
    margin = context + alignment - 1 if context else tile // 8
    spans = axis_spans(size, tile, overlap, margin, alignment)
    covered = np.zeros(size, int)
    for s in spans:
        covered[s.start : s.stop] += 1
        assert 0 <= s.window_start <= s.start < s.stop <= s.window_stop <= size
        assert s.window_start % alignment == 0 and (size - s.window_stop) % alignment == 0  # both ends on the grid
        assert s.window_start == 0 or s.start - s.window_start >= margin  # real context, or the border
        assert s.window_stop == size or s.window_stop - s.stop >= margin
        assert s.stop - s.start == min(tile, size)
    assert covered.min() >= 1
    assert [s.start for s in spans] == sorted({s.start for s in spans})


@pytest.mark.parametrize("blend", [True, False])
def test_streamed_blend_is_bitwise_the_full_size_accumulator(blend):
    """The streamed rows are exactly what a full C x H x W accumulator gives (so is its argmax)."""
    h, w, k = 203, 151, 5
    plan = plan_tiles(h, w, 48, 0.4 if blend else 0.0, context=0, alignment=8)
    rng = torch.Generator().manual_seed(0)
    outputs = [torch.rand(k, rows.stop - rows.start, cols.stop - cols.start, generator=rng)
               for rows, cols in plan.windows()]
    acc, norm = torch.zeros(k, h, w), torch.zeros(1, h, w)  # the reference: one full-size accumulator
    tiles = [(r, c) for r in plan.rows for c in plan.cols]
    for (r, c), out in zip(tiles, outputs):
        core = out[:, r.start - r.window_start : r.stop - r.window_start,
                   c.start - c.window_start : c.stop - c.window_start]
        weight = tile_weight(*core.shape[-2:]) if blend else torch.ones(core.shape[-2:])
        acc[:, r.start : r.stop, c.start : c.stop] += core * weight
        norm[:, r.start : r.stop, c.start : c.stop] += weight
    bands = list(blend_rows(plan, iter(outputs)))
    assert [y for y, _ in bands] == [0] + [r.start for r in plan.rows[1:]]
    assert max(b.shape[1] for _, b in bands) <= 48
    assert torch.equal(torch.cat([b for _, b in bands], 1), acc / norm)


@pytest.mark.parametrize("src, dst", [((24, 32), (37, 61)), ((60, 50), (31, 77)), ((7, 9), (7, 40)),
                                      ((360, 480), (1000, 1333))])
def test_upsample_rows_matches_interpolate(src, dst):
    probs = torch.rand(3, *src, generator=torch.Generator().manual_seed(1))
    want = upsample_probs(probs[None], dst)[0]
    got = torch.cat([upsample_rows(probs, dst, y, min(y + 100, dst[0])) for y in range(0, dst[0], 100)], 1)
    # float32 source coordinates near 360 are exact to 3e-5 px
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_tiles_with_a_resize_contract_stream_back_to_the_image_size():
    """A checkpoint trained at 48 x 64: the image is resized, tiled there, and the streamed
    probabilities come back at its own size like the untiled ones."""
    from pixelwise.preprocess import InputSpec

    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)  # pointwise: tiling cannot change its probabilities
    spec = InputSpec(resize=(48, 64))
    image = np.random.default_rng(3).integers(0, 255, (150, 110, 3), dtype=np.uint8)
    whole = SemanticPredictor(model, {"num_classes": 4}, input_spec=spec).predict(image)
    tiled = SemanticPredictor(model, {"num_classes": 4}, input_spec=spec, tile=16).predict(image)
    torch.testing.assert_close(tiled.probs, whole.probs, rtol=0, atol=1e-6)


CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from pixelwise.cli import main

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

    torch.set_num_threads(1)
    before = status("VmRSS")
    assert main(sys.argv[1:]) == 0
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


def test_tiled_memory_grows_with_the_image_by_a_few_bytes_per_pixel(tmp_path):
    """Peak RSS of ``pixelwise predict --tile 256 --uncertainty`` (each image in a fresh process)
    on two images of one width, 512 x 512 and 4608 x 512, grows by at most 24 bytes per added
    pixel. What is held per pixel is the uint8 image (3 bytes); reading it briefly takes about 7
    more (PIL's 4-byte RGBX decoding and the bytes numpy wraps), and the allocator keeps some
    slack (14-17 bytes per pixel measured in all on idle machines, once 20.1 during a full test
    run, hence the bound of 24, not 20); the probabilities, mask, uncertainty and
    overlay stream in row bands whose size depends on the width only. The 3 GB goal for an
    8192 x 8192 image allows about 40 bytes per pixel beyond the ~0.3 GB that Python, torch and
    the model take; the full float32 accumulator and float input that tiled prediction used
    before took about 100 (6.6 GB at 8192 x 8192), and holding even the 4-class probabilities
    whole would add 16."""
    from PIL import Image

    from pixelwise import save_checkpoint

    torch.manual_seed(0)
    kwargs = {"base_channels": 2, "batch_norm": True, "dropout": 0.0}
    save_checkpoint(tmp_path / "m.safetensors", create_model("unet", num_classes=4, **kwargs).eval(),
                    {"model": "unet", "num_classes": 4, "model_kwargs": kwargs, "task": "semantic"})
    growth = {}
    width = 512
    for height in (512, 4608):
        yy, xx = np.mgrid[:height, :width].astype(np.float32)
        image = np.stack([127 + 120 * np.sin(xx / 37 + yy / 23), 127 + 120 * np.cos(yy / 19), xx % 256], -1)
        Image.fromarray(image.astype(np.uint8)).save(tmp_path / f"{height}.png")
        proc = subprocess.run([sys.executable, "-c", CHILD, "predict", "--checkpoint", str(tmp_path / "m.safetensors"),
                               str(tmp_path / f"{height}.png"), "--out", str(tmp_path / "out"), "--tile", "256",
                               "--uncertainty", "--no-progress"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        growth[height] = r["peak"] - r["before"]
        assert Image.open(tmp_path / "out" / f"{height}_uncertainty.png").size == (width, height)
    per_pixel = (growth[4608] - growth[512]) / (width * (4608 - 512))
    assert per_pixel < 24, f"{per_pixel:.1f} bytes per pixel"


def test_tile_progress_bar_counts_tiles(monkeypatch):
    """A bar over the tiles, from the one progress helper (None: on a terminal; off by default)."""
    import pixelwise.inference.predictor as predictor_module

    seen = {}

    def fake_bar(iterable, desc, show=None, **kwargs):
        seen.update(desc=desc, show=show, total=kwargs.get("total"))
        return iterable

    monkeypatch.setattr(predictor_module, "progress_bar", fake_bar)
    image = np.zeros((100, 70, 3), np.uint8)
    p = SemanticPredictor(nn.Conv2d(3, 2, 1), {"num_classes": 2}, tile=32, overlap=0)
    p.predict(image, progress=None)
    assert seen == {"desc": "tiles", "total": len(plan_tiles(100, 70, 32, 0.0)), "show": None}
    p.predict(image)
    assert seen["show"] is False


def test_tiled_uncertainty_is_the_entropy_of_the_blended_probabilities():
    torch.manual_seed(0)
    image = np.random.default_rng(4).integers(0, 255, (90, 75, 3), dtype=np.uint8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    pred = SemanticPredictor(model, {"num_classes": 4}, tile=32, tta="flip").predict(image, uncertainty=True)
    probs = pred.probs
    want = -(probs * probs.clamp_min(1e-12).log()).sum(0)
    np.testing.assert_allclose(pred.uncertainty, want.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pred.mask, probs.argmax(0).numpy())
    lean = SemanticPredictor(model, {"num_classes": 4}, tile=32, tta="flip").predict(image, uncertainty=True,
                                                                                    probs=False)
    assert lean.probs is None
    np.testing.assert_array_equal(lean.mask, pred.mask)
    np.testing.assert_array_equal(lean.uncertainty, pred.uncertainty)


def test_whole_image_path_is_unchanged_for_a_pointwise_model():
    """Without tiles, a pointwise model's probabilities are softmax(conv(preprocess(image)))."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    image = np.random.default_rng(5).integers(0, 255, (21, 34, 3), dtype=np.uint8)
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        want = F.softmax(model(x[None]), 1)[0]
    torch.testing.assert_close(SemanticPredictor(model, {"num_classes": 4}).predict_probs(image), want)


def test_a_resize_contract_streams_its_way_back_to_the_image_size(monkeypatch):
    """A model with a small resize contract (camvid_cpu_hour's 270x360) was predicted whole and
    brought back to a photo's size in one F.interpolate: 1.06 GB of probabilities for a 12-MP
    image (2.1 GB with --uncertainty), --tile notwithstanding. Now in row bands, the same values."""
    from pixelwise.inference import predictor as predictor_module
    from pixelwise.inference.predictor import UPSAMPLE_ROWS
    from pixelwise.preprocess import InputSpec, preprocess

    # the image here is small: the band-by-band path is what a 12-MP photo takes
    monkeypatch.setattr(predictor_module, "WHOLE_UPSAMPLE_BYTES", 1)
    torch.manual_seed(0)
    model = create_model("unet", num_classes=4, base_channels=4).eval()
    spec = InputSpec(resize=(24, 32))
    p = SemanticPredictor(model, {"num_classes": 4}, input_spec=spec, tile=512)
    image = np.random.default_rng(0).integers(0, 255, (UPSAMPLE_ROWS * 2 + 37, 301, 3), dtype=np.uint8)
    bands = list(p._bands(image))
    assert len(bands) == 3 and max(b.shape[1] for _, b in bands) <= UPSAMPLE_ROWS
    with torch.no_grad():
        small = torch.softmax(model(preprocess(image, spec)[None]), 1)
    want = upsample_probs(small, image.shape[:2])[0]
    got = torch.cat([b for _, b in bands], 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    pred = p.predict(image, probs=False)
    assert pred.probs is None and np.array_equal(pred.mask, p.predict(image).mask)
    both = p.predict_batch([image, image[:50]])  # the batch path streams the same way
    assert np.array_equal(both[0].mask, pred.mask)


@pytest.mark.parametrize("h, w", [(1, 1), (5, 9), (16, 7), (32, 1)])
def test_tile_weight_is_the_outer_product_of_hann_windows_floored_at_0_1(h, w):
    """The blending window written out independently: the interior of a symmetric Hann window of
    n + 2 points, sin^2(pi i / (n + 1)) for i = 1..n, each floored at 0.1, row times column (for
    n = 32 the ends, sin^2(pi / 33) = 0.009, sit on the floor)."""
    def hann(n):
        return [max(0.1, math.sin(math.pi * i / (n + 1)) ** 2) for i in range(1, n + 1)]
    want = torch.tensor([[a * b for b in hann(w)] for a in hann(h)], dtype=torch.float32)
    torch.testing.assert_close(tile_weight(h, w), want, rtol=0, atol=1e-6)


def test_margins_are_the_documented_ones():
    """docs/inference.md: ``context + alignment - 1`` for a model stating its context, ``tile // 8``
    otherwise; the windows of a context-free plan, worked out by hand."""
    assert tile_margin(64, 92, 16) == 107 and tile_margin(64, 92, 1) == 92
    assert tile_margin(64, 0, 1) == 8 and tile_margin(71, 0, 16) == 8 and tile_margin(7, 0, 1) == 0
    rows = plan_tiles(200, 200, 64, 0.0).rows
    # cores at 0, 64, 128 and 136 (the last flush with the end), each widened by 8, clipped to [0, 200)
    assert [(r.start, r.stop, r.window_start, r.window_stop) for r in rows] == [
        (0, 64, 0, 72), (64, 128, 56, 136), (128, 192, 120, 200), (136, 200, 128, 200)]


def test_a_step_below_one_pixel_steps_by_one():
    """tile * (1 - overlap) below 1 (tile 16, overlap 0.99: 0.16) steps by one pixel, not zero:
    every start from 0 to size - tile, each window its core widened by the margin, clipped."""
    spans = axis_spans(40, 16, 0.99, 2, 1)
    assert [s.start for s in spans] == list(range(25))
    assert all((s.stop, s.window_start, s.window_stop) == (s.start + 16, max(0, s.start - 2), min(40, s.start + 18))
               for s in spans)


def test_the_streamed_accumulator_never_holds_more_than_a_tile_of_rows(monkeypatch):
    """The module's promise: the accumulator holds at most ``tile`` rows of the full width (each
    new row of tiles grows it by what its cores reach below it, no more), whatever the overlap."""
    rows = []

    class Spy:  # torch as tiling sees it, recording the rows of every accumulator it builds
        def __getattr__(self, name):
            return getattr(torch, name)

        def zeros(self, *shape):
            rows.append(shape[1] if len(shape) > 1 else 0)
            return torch.zeros(*shape)

        def cat(self, tensors, dim):
            out = torch.cat(tensors, dim)
            rows.append(out.shape[1])
            return out

    monkeypatch.setattr(tiling_module, "torch", Spy())
    for overlap in (0.0, 0.25, 0.5):
        plan = plan_tiles(400, 9, 48, overlap, context=0, alignment=8)
        outputs = [torch.rand(2, r.stop - r.start, c.stop - c.start) for r, c in plan.windows()]
        assert sum(b.shape[1] for _, b in blend_rows(plan, outputs)) == 400
    assert max(rows) == 48
