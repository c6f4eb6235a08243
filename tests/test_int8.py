"""``--mode int8`` (pixelwise.inference.int8): PyTorch graph-mode int8 quantisation of semantic
models, its calibration, its guards and its one-line errors, in the runner, predict, eval and bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pixelwise.inference.int8 as int8_module
import pixelwise.inference.predictor as predictor_module
from conftest import narrow
from pixelwise import SemanticPredictor, create_model, save_checkpoint
from pixelwise.cli import CALIB_CROP, main
from pixelwise.errors import UserError
from pixelwise.inference import fast
from pixelwise.inference.fast import make_runner
from pixelwise.inference.int8 import (
    INT8_MIN_AGREEMENT,
    Int8Segmenter,
    _untraceable,
    calibration_batches,
    clip_message,
    qconfig_mapping,
    quantize,
    quantized_engine,
)
from pixelwise.models import forward_logits
from pixelwise.preprocess import InputSpec, preprocess

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

pytestmark = pytest.mark.skipif(not torch.backends.quantized.supported_engines or
                                torch.backends.quantized.supported_engines == ["none"],
                                reason="this PyTorch build has no quantised engine")


def smooth(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random images in normalised units (as bench's): regions, not per-pixel noise."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, max(h // 8, 1), max(w // 8, 1), generator=g), size=(h, w),
                         mode="bilinear", align_corners=False)


def relative_error(model: nn.Module, int8: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(||int8 - fp32|| / ||fp32||, argmax agreement) of the logits on ``x``."""
    with torch.no_grad():
        ref = forward_logits(model, x)
    out = int8(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    return ((out - ref).norm() / ref.norm()).item(), (out.argmax(1) == ref.argmax(1)).float().mean().item()


def quantised_layers(module: nn.Module) -> int:
    return sum(type(m).__module__.startswith("torch.ao.nn.") and "quantized" in type(m).__module__
               for m in module.modules())


def test_resnet_model_is_quantised_whole_and_close_to_float32():
    torch.manual_seed(0)
    model = narrow(create_model("fcn_resnet50", num_classes=4)).eval()
    calibration = [smooth(2, 64, 80, seed) for seed in range(3)]
    int8 = Int8Segmenter(model, calibration)
    assert quantised_layers(int8) >= 50  # every convolution of the ResNet and the head
    # another image, another size than the calibration's: the traced graph keeps sizes symbolic
    err, agree = relative_error(model, int8, smooth(1, 72, 56, seed=10))
    assert err < 0.1 and agree > 0.9, (err, agree)
    assert 0.9 < int8.agreement(model, calibration[0]) <= 1.0


@pytest.mark.parametrize("kwargs", [{"padding": "same", "batch_norm": True}, {"padding": "valid"}])
def test_unet_core_is_quantised_its_padding_stays_float(kwargs):
    # U-Net's forward pads by an input-dependent rule torch.fx cannot trace: its forward_features
    # is quantised and the padding and cropping around it run as in float32
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=8, **kwargs).eval()
    int8 = Int8Segmenter(model, [smooth(2, 64, 64, 0), smooth(2, 48, 80, 1)])
    assert quantised_layers(int8) >= 18
    for h, w in ((64, 64), (37, 53)):  # 37 x 53: padded to the U-Net's multiple, cropped back
        err, agree = relative_error(model, int8, smooth(1, h, w, seed=h))
        assert err < 0.1 and agree > 0.85, (h, w, err, agree)


def test_the_callers_quantised_engine_is_given_back():
    """Quantising and every int8 forward set torch's process-wide engine to x86 and left it: a
    caller's own quantised models then ran on other kernels."""
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=4).eval()
    x = smooth(1, 32, 32, 0)
    want = Int8Segmenter(model, [x])(x)
    torch.backends.quantized.engine = "qnnpack"
    try:
        int8 = Int8Segmenter(model, [x], engine="x86")
        assert torch.backends.quantized.engine == "qnnpack"
        got = int8(x)
        assert torch.backends.quantized.engine == "qnnpack" and torch.equal(got, want)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:  # overlapping forwards: the last to end gives it back
            outs = list(pool.map(lambda _: int8(x), range(12)))
        assert torch.backends.quantized.engine == "qnnpack" and all(torch.equal(o, want) for o in outs)
        with pytest.raises(UserError, match="quantised engine 'X86' is not one this torch has"):
            quantize(model, [x], engine="X86")
        Int8Segmenter(model, [x], engine="x86")  # a refused engine left nothing behind that keeps x86 set
        assert torch.backends.quantized.engine == "qnnpack"
    finally:
        torch.backends.quantized.engine = quantized_engine()


def test_transposed_convolutions_run_in_float32():
    # x86/fbgemm's quantised transposed convolution is wrong when in != out channels (torch 2.13):
    # quantize() leaves them in float32; the result stays within quantisation error
    torch.manual_seed(0)

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(F.relu(self.up(F.relu(self.conv(x)))))

    model = Up().eval()
    int8 = quantize(model, [smooth(2, 32, 32, 0)])
    assert type(int8.model.up) is nn.ConvTranspose2d
    err, _ = relative_error(model, lambda x: int8(x), smooth(1, 32, 32, 1))
    assert err < 0.05, err


def test_untraceable_models_and_missing_calibration_are_one_line_errors():
    model = create_model("segnet_basic", num_classes=3).eval()  # pooling indices: not traceable
    with pytest.raises(UserError, match="cannot be traced by torch.fx.*--mode fast"):
        quantize(model, [smooth(1, 32, 32, 0)])
    resnet = narrow(create_model("fcn_resnet50", num_classes=3)).eval()
    with pytest.raises(UserError, match="calibration"):
        quantize(resnet, [])


def test_untraceable_refusal_ends_at_a_sentence_or_word_boundary():
    # torch.fx's message (torch 2.13, SegNet) is longer than the one line has room for: the refusal
    # keeps its whole first sentences, not its first 160 characters ("... the torch.fx docs on py")
    from pixelwise.inference.int8 import _untraceable

    fx = ("Proxy object cannot be iterated. This can be attempted when the Proxy is used in a loop or as a *args "
          "or **kwargs function argument. See the torch.fx docs on pytorch.org for a more detailed explanation of "
          "what types of control flow can be traced, and check out the Proxy docstring for help troubleshooting "
          "Proxy iteration errors")
    message = str(_untraceable(create_model("segnet_basic", num_classes=3), RuntimeError(fx)))
    assert message.endswith("(RuntimeError: Proxy object cannot be iterated. This can be attempted when the Proxy "
                            "is used in a loop or as a *args or **kwargs function argument.); use --mode fast")


def test_clip_message_cuts_at_sentences_then_words():
    assert clip_message("short.") == "short."
    long = "First sentence here. " + "second sentence goes on and on " * 10
    assert clip_message(long) == "First sentence here."
    words = "abcdefg " * 40  # no sentence end: the last whole word that fits, then ...
    clipped = clip_message(words)
    assert len(clipped) <= 160 and clipped.endswith("abcdefg...") and clipped.count("abcdefg") == 19


def test_runner_offers_int8_only_where_measured_and_on_the_cpu():
    model = narrow(create_model("deeplabv3plus_resnet50", num_classes=3)).eval()
    batches = [smooth(1, 48, 48, 0)]
    with pytest.raises(UserError, match="not offered for deeplabv3plus_resnet50.*eval --mode int8"):
        make_runner(model, "int8", "deeplabv3plus_resnet50", calibration=batches)
    model = narrow(create_model("fcn_resnet50", num_classes=3)).eval()  # measured: offered
    with pytest.raises(UserError, match="calibration images"):
        make_runner(model, "int8", "fcn_resnet50", measuring=True)
    with pytest.raises(UserError, match="on the CPU"):
        make_runner(model, "int8", "fcn_resnet50", device="cuda", calibration=batches, measuring=True)
    runner = make_runner(model, "int8", "fcn_resnet50", calibration=batches)
    assert isinstance(runner, Int8Segmenter) and runner(smooth(1, 40, 40, 3)).shape == (1, 3, 40, 40)


@pytest.mark.parametrize("agreement, offered", [(INT8_MIN_AGREEMENT, True), (INT8_MIN_AGREEMENT - 0.001, False)])
def test_runner_offers_int8_from_exactly_the_minimum_agreement(monkeypatch, agreement, offered):
    # the quantisation itself stubbed: only the runner's threshold (agreement >= INT8_MIN_AGREEMENT) is tested
    class Stub:
        def __init__(self, model, batches):
            pass

        def agreement(self, model, x):
            return agreement

    monkeypatch.setattr(fast, "Int8Segmenter", Stub)
    model = nn.Conv2d(3, 2, 1)
    if offered:
        assert isinstance(make_runner(model, "int8", "fcn_resnet50", calibration=[torch.zeros(1, 3, 4, 4)]), Stub)
    else:
        with pytest.raises(UserError, match="agrees with float32 on only"):
            make_runner(model, "int8", "fcn_resnet50", calibration=[torch.zeros(1, 3, 4, 4)])


def test_calibration_batches_are_preprocessed_random_crops():
    spec = InputSpec(mean=MEAN, std=STD)
    images = [np.full((40, 50, 3), 10 * i, np.uint8) for i in range(5)]
    batches = calibration_batches(images, spec, crop=32, batch=2)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    expected = (torch.tensor([0, 10, 20, 30, 40]) / 255 - 0.5) / 0.25  # uniform images: every pixel
    torch.testing.assert_close(torch.cat(batches)[:, 0, 0, 0], expected.float())


def small_checkpoint(tmp_path, name: str, **kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **kwargs)
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(path, model, {"model": name, "model_kwargs": kwargs, "num_classes": 4})
    return path


def test_cli_predict_refuses_unmeasured_int8_and_stray_calibration_flags(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    checkpoint = small_checkpoint(tmp_path, "segnet_basic")
    base = ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]
    assert main([*base, "--mode", "int8", "--calib-dataset", "shapes", "--calib-images", "2"]) == 2
    err = capsys.readouterr().err
    # it sent the user to eval --mode int8, which cannot trace it either (nor ENet, SegNet, DeconvNet)
    assert "not offered for segnet_basic: torch.fx cannot trace it" in err and "pixelwise eval" not in err
    assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "shapes", "--mode", "int8",
                 "--calib-dataset", "shapes", "--calib-images", "2", "--no-progress"]) == 2
    assert "not offered for segnet_basic: torch.fx cannot trace it" in capsys.readouterr().err
    assert main([*base, "--mode", "int8"]) == 2
    assert "--calib-dataset" in capsys.readouterr().err
    assert main([*base, "--calib-dataset", "shapes"]) == 2
    assert "add --mode int8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def fitted_unet_checkpoint(tmp_path, steps: int = 150):
    """A U-Net (base 8, BN) fitted for a few steps to shapes scenes: decisive logits, unlike random
    weights, whose near-ties int8 rightly refuses (the guard)."""
    from pixelwise.data import build_dataset

    torch.manual_seed(0)
    model = create_model("unet", num_classes=4, base_channels=8, batch_norm=True)
    ds = build_dataset("shapes", None, "train", num_train=8, size=48)
    samples = [ds.load(i) for i in range(8)]
    x = torch.stack([preprocess(s.image, InputSpec(mean=MEAN, std=STD)) for s in samples])  # the checkpoint's
    y = torch.stack([torch.from_numpy(s.mask.astype(np.int64)) for s in samples]).clamp(max=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(forward_logits(model, x), y).backward()
        opt.step()
    path = tmp_path / "fitted.safetensors"
    save_checkpoint(path, model.eval(), {"model": "unet", "num_classes": 4, "mean": MEAN, "std": STD,
                                         "model_kwargs": {"base_channels": 8, "batch_norm": True}})
    return path, [s.image for s in samples]


def test_cli_predict_int8_writes_the_masks_eager_would_and_refuses_near_ties(tmp_path, capsys):
    from PIL import Image

    checkpoint, images = fitted_unet_checkpoint(tmp_path)
    paths = []
    for i, image in enumerate(images[:2]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    calib = ["--calib-dataset", "shapes", "--calib-images", "8", "--calib-crop", "48"]
    masks = {}
    for mode in ("eager", "int8"):
        assert main(["predict", "--checkpoint", str(checkpoint), *paths, "--out", str(tmp_path / mode),
                     "--mode", mode, *(calib if mode == "int8" else []), "--no-progress"]) == 0
        masks[mode] = np.stack([np.asarray(Image.open(tmp_path / mode / f"{i}.png")) for i in range(2)])
    assert masks["int8"].shape == (2, 48, 48)
    assert (masks["int8"] == masks["eager"]).mean() > 0.99
    random = small_checkpoint(tmp_path, "unet", base_channels=8, batch_norm=True)  # near-ties everywhere
    assert main(["predict", "--checkpoint", str(random), *paths, "--out", str(tmp_path / "r"), "--mode", "int8",
                 *calib, "--no-progress"]) == 2
    assert "agrees with float32 on only" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_cli_eval_measures_int8_and_bench_times_it(tmp_path):
    import json

    checkpoint = small_checkpoint(tmp_path, "unet", base_channels=8, batch_norm=True)
    args = ["--checkpoint", str(checkpoint), "--dataset", "shapes", "--split", "val",
            "--dataset-kwargs", '{"num_val": 4, "size": 64}', "--no-progress"]
    scores = {}
    for mode in ("eager", "int8"):
        out = tmp_path / f"{mode}.json"
        extra = ["--calib-dataset", "shapes", "--calib-images", "4", "--calib-crop", "48"] if mode == "int8" else []
        assert main(["eval", *args, "--mode", mode, *extra, "--json", str(out)]) == 0
        scores[mode] = json.loads(out.read_text())
    assert abs(scores["int8"]["pixel_acc"] - scores["eager"]["pixel_acc"]) < 0.1
    out = tmp_path / "bench.json"
    assert main(["bench", "--checkpoint", str(checkpoint), "--size", "48x64", "--mode", "int8",
                 "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "int8" and result["calibrate_s"] > 0 and 0 <= result["agreement"] <= 1
    # the int8 GEMM peak (torch._int_mm) where it is a ceiling; else none, and why (no VNNI: a slow
    # reference kernel below what the quantised convolutions achieve)
    if result.get("gemm_peak_gflops") is not None:
        assert 0 < result["utilization"] <= 1
    else:
        assert result.get("utilization") is None and result["peak_note"]
    assert quantized_engine() in torch.backends.quantized.supported_engines


def test_clip_message_cuts_a_single_long_word_to_the_limit():
    assert clip_message("x" * 200) == "x" * 157 + "..."  # 160 characters: the word cut inside itself
    assert clip_message("x" * 160) == "x" * 160  # exactly the limit: kept whole


def test_an_exception_without_a_message_names_only_its_type():
    message = str(_untraceable(nn.Identity(), RuntimeError()))
    assert message.endswith("(RuntimeError); use --mode fast")


def test_calibration_batches_default_to_four_images_a_batch():
    images = [np.zeros((20, 20, 3), np.uint8)] * 5
    batches = calibration_batches(images, InputSpec(mean=MEAN, std=STD), crop=16)
    assert [b.shape[0] for b in batches] == [4, 1]


def test_a_predictors_int8_calibration_defaults_to_the_clis_256_pixel_crops(monkeypatch):
    """SemanticPredictor(mode="int8", calib_data=...) without calib_crop calibrates on the crops
    ``--calib-crop`` takes by default (256 pixels): the batches its runner gets are those of
    calibration_batches(images, spec, crop=256) (a wide image shows the crop's side)."""
    seen = {}

    def runner(model, mode, name, device, **kwargs):  # records the calibration instead of quantising
        seen.update(mode=mode, calibration=kwargs["calibration"])
        return lambda x: model(x)

    monkeypatch.setattr(predictor_module, "make_runner", runner)
    images = [np.random.default_rng(0).integers(0, 256, (20, 300, 3), dtype=np.uint8)]
    spec = InputSpec(mean=MEAN, std=STD)
    SemanticPredictor(nn.Conv2d(3, 2, 1), {"num_classes": 2}, input_spec=spec, mode="int8", calib_data=images)
    want = calibration_batches(images, spec, crop=CALIB_CROP)
    assert CALIB_CROP == 256 and seen["mode"] == "int8"
    assert [b.shape for b in seen["calibration"]] == [b.shape for b in want] == [(1, 3, 20, 256)]
    assert all(torch.equal(a, b) for a, b in zip(seen["calibration"], want))


class _BranchOnData(nn.Module):
    """A forward that branches on a value (torch.fx cannot trace it) and no forward_features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


def test_a_model_without_forward_features_names_the_trace_error_of_its_forward():
    with pytest.raises(UserError, match=r"_BranchOnData cannot be traced .*\(TraceError: symbolically traced"):
        quantize(_BranchOnData(), [torch.ones(1, 3, 4, 4)])


def test_activations_use_the_full_8_bits_only_on_a_cpu_with_vnni(monkeypatch):
    monkeypatch.setattr(int8_module, "cpu_has_vnni", lambda: True)
    assert qconfig_mapping("x86").global_qconfig.activation().reduce_range is False
    monkeypatch.setattr(int8_module, "cpu_has_vnni", lambda: False)
    assert qconfig_mapping("x86").global_qconfig.activation().reduce_range is True


def test_quantized_engine_is_the_first_supported_in_preference_order(monkeypatch):
    # ENGINES' order (x86, fbgemm, onednn, qnnpack), not the order torch lists its engines in
    engines = type(torch.backends.quantized)
    for supported, want in ((["qnnpack", "onednn", "x86", "fbgemm"], "x86"), (["qnnpack", "fbgemm", "none"], "fbgemm"),
                            (["none", "qnnpack", "onednn"], "onednn"), (["none", "qnnpack"], "qnnpack")):
        monkeypatch.setattr(engines, "supported_engines", supported)
        assert quantized_engine() == want, supported
    monkeypatch.setattr(engines, "supported_engines", ["none"])
    with pytest.raises(UserError, match="no quantised CPU engine"):
        quantized_engine()


def test_calibration_crops_start_at_every_offset_and_keep_an_image_of_the_crop_size_whole():
    spec = InputSpec(mean=MEAN, std=STD)
    rows, cols = np.meshgrid(np.arange(36), np.arange(35), indexing="ij")
    image = np.stack([rows * 5, cols * 5, np.zeros_like(rows)], -1).astype(np.uint8)  # a pixel says where it is
    batches = calibration_batches([image] * 60, spec, crop=32, batch=60)
    assert [tuple(b.shape) for b in batches] == [(60, 3, 32, 32)]
    corner = torch.round((batches[0][:, :2, 0, 0] * 0.25 + 0.5) * 255 / 5).long()  # (top, left) of each crop
    assert set(corner[:, 0].tolist()) == {0, 1, 2, 3, 4} and set(corner[:, 1].tolist()) == {0, 1, 2, 3}
    exact = calibration_batches([image[:32, :32]], spec, crop=32)  # no room to move: the whole image
    torch.testing.assert_close(torch.round((exact[0][0, 0] * 0.25 + 0.5) * 255 / 5),
                               torch.arange(32.0)[:, None].expand(32, 32))


def test_calibration_crops_default_to_256_pixels():
    batches = calibration_batches([np.zeros((300, 270, 3), np.uint8)], InputSpec(mean=MEAN, std=STD))
    assert [tuple(b.shape) for b in batches] == [(1, 3, 256, 256)]


def test_clip_message_never_keeps_a_sentence_ending_past_the_limit():
    # a full stop at index 160 (the 161st character) is past the limit: the word is cut instead
    assert clip_message("x" * 160 + ". Next.") == "x" * 157 + "..."
    assert clip_message("x" * 159 + ". Next.") == "x" * 159 + "."  # ends exactly at the limit: kept


class _BranchingCore(_BranchOnData):
    """Neither forward nor forward_features traces (both branch on a value)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x) if x.mean() > 0 else -self.forward_features(x)


def test_an_untraceable_core_names_the_model_and_the_trace_error():
    with pytest.raises(UserError, match=r"_BranchingCore cannot be traced by torch.fx .*\(TraceError: symbolically "):
        quantize(_BranchingCore(), [torch.ones(1, 3, 4, 4)])


def test_predictions_of_another_calibration_are_not_kept_by_resume(monkeypatch):
    """int8 masks depend on the calibration (a fitted shapes U-Net: 60 of 2,304 pixels of one
    image differ between --calib-images 8 --calib-crop 48 and --calib-images 1 --calib-crop 16),
    yet the mask's record held only ``mode: int8``: ``predict --resume`` with another calibration
    kept the earlier masks (``kept 3``) as if this prediction had made them, and eval's provenance
    could not tell the two runs apart. The record must say which calibration quantised the model."""
    from pixelwise.inference.writers import prediction_record, record_difference

    monkeypatch.setattr(predictor_module, "make_runner", lambda *a, **k: None)  # the record, not the quantising
    model = create_model("unet", num_classes=4, base_channels=4, batch_norm=True).eval()
    meta = {"model": "unet", "num_classes": 4, "mean": MEAN, "std": STD}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    records = [prediction_record(SemanticPredictor(model, meta, mode="int8", calib_data=data, calib_crop=crop,
                                                   measuring=True))
               for data, crop in ((images, 32), (images[:1], 16))]
    assert record_difference(json.dumps(records[0]), records[0]) is None
    assert record_difference(json.dumps(records[0]), records[1]) is not None


def test_every_member_of_an_int8_ensemble_calibrates_on_all_the_images_of_a_generator(tmp_path, monkeypatch):
    """``from_checkpoints([a, b], mode="int8", calib_data=<generator>)``: the first member read the
    generator to its end and the second calibrated on nothing (refused as having no images)."""
    from pixelwise.inference.ensemble import from_checkpoints

    monkeypatch.setattr(predictor_module, "make_runner", lambda *a, **k: None)  # the images, not the quantising
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = create_model("unet", num_classes=4, base_channels=4, batch_norm=True).eval()
        paths.append(tmp_path / f"{seed}.safetensors")
        save_checkpoint(paths[-1], model, {"model": "unet", "num_classes": 4, "model_kwargs": {"base_channels": 4,
                                                                                             "batch_norm": True},
                                           "mean": list(MEAN), "std": list(STD)})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    ensemble = from_checkpoints(paths, mode="int8", calib_data=(image for image in images), calib_crop=16,
                                measuring=True)
    records = [member.calibration for member in ensemble.members]
    assert records[0] == records[1] and records[0]["images"] == 3, records


def test_clip_message_does_not_take_a_leading_full_stop_for_a_sentence():
    # ". " at index 0 ends no sentence: the text is cut after its last whole word that fits, not to "."
    text = ". " + "abcd " * 40
    assert clip_message(text) == ". " + "abcd " * 30 + "abcd..."  # 2 + 150 + 4 + 3 = 159 characters


def test_clip_message_keeps_the_last_word_that_fits_before_the_dots():
    # the space after the b-word is at index 156: "a"*10 + " " + "b"*145 (156 characters) + "..." fits in 160
    text = "a" * 10 + " " + "b" * 145 + " " + "c" * 10
    assert clip_message(text) == "a" * 10 + " " + "b" * 145 + "..."


def test_an_int8_segmenter_quantises_for_the_engine_it_is_given():
    """Int8Segmenter(engine=E) quantises for E and records it (qnnpack's mapping: per-tensor weights,
    x86's and fbgemm's: per output channel); without one it takes quantized_engine()'s."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    x = smooth(1, 16, 16, 0)

    def weight_schemes(int8: Int8Segmenter) -> set:
        return {m.weight().qscheme() for m in int8.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
                and hasattr(m, "weight") and callable(m.weight)}

    default = Int8Segmenter(model, [x])
    assert default.engine == quantized_engine()
    if "qnnpack" in torch.backends.quantized.supported_engines:
        int8 = Int8Segmenter(model, [x], engine="qnnpack")
        assert int8.engine == "qnnpack" and weight_schemes(int8) == {torch.per_tensor_affine}
        if default.engine in ("x86", "fbgemm"):
            assert weight_schemes(default) == {torch.per_channel_affine}
