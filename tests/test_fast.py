"""The semantic fast path (pixelwise.inference.fast): BatchNorm folding keeps the outputs of
every semantic model (float32, within tolerance), the bfloat16 path keeps nearly every argmax,
and the mode flags fail with one line where they do not apply. No timing here (see
``pixelwise bench`` and benchmarks/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import narrow
from pixelwise import create_model, list_models
from pixelwise.errors import UserError
from pixelwise.inference import fast
from pixelwise.inference.export import sample_batch
from pixelwise.inference.fast import FastSegmenter, TapConv2d, fold_model, make_runner
from pixelwise.models import forward_logits
from pixelwise.models.maskrcnn.fast import fold_batchnorm


@pytest.mark.parametrize("name", list_models("semantic"))
def test_folding_batchnorm_keeps_every_models_outputs(name):
    torch.manual_seed(0)
    model = narrow(create_model(name, num_classes=5))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_model(model)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # every BatchNorm of the semantic models follows a convolution, but ENet's of its max-pooled input
    assert left == (1 if name == "enet" else 0), f"{left} BatchNorm layers left unfolded"
    x = sample_batch(2, 3, 45, 61)
    with torch.no_grad():
        ref, got = forward_logits(model, x), forward_logits(folded, x)
    torch.testing.assert_close(got, ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (norms > 0)  # the original is untouched


def test_a_batchnorm_before_its_namesake_conv_is_not_folded():
    """A pre-activation block names its layers bn1 / conv1 but runs bn1 *before* conv1: folding by
    name alone gave 44% of the pixels eager's class. Only modules that say bn<k> follows conv<k>
    fold by name; this one keeps its BatchNorm and the fast path equals eager."""
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv1(torch.relu(self.bn1(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PreAct(), nn.Conv2d(8, 4, 1)).eval()
    bn = model[1].bn1
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.2, 3), bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 24, 32)
    ref = model(x)
    assert fold_batchnorm(model) == 0 and isinstance(model[1].bn1, nn.BatchNorm2d)
    torch.testing.assert_close(model(x), ref)
    resnet_block = create_model("fcn_resnet50", num_classes=3).backbone.layer1[0].eval()
    assert fold_batchnorm(resnet_block) == 4  # bn1-3 after conv1-3, and the downsample's


def test_folding_a_transposed_convolution():
    torch.manual_seed(0)
    block = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, 2), nn.BatchNorm2d(6)).eval()
    block[1].running_mean.uniform_(-1, 1)
    block[1].running_var.uniform_(0.5, 2)
    block[1].weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 5, 7)
    ref = block(x)
    assert fold_batchnorm(block) == 1 and isinstance(block[1], nn.Identity)
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_fast_segmenter_float32_matches_and_bf16_keeps_argmax():
    torch.manual_seed(0)
    model = narrow(create_model("fcn_resnet50", num_classes=5))
    x = sample_batch(1, 3, 64, 80)
    with torch.no_grad():
        ref = forward_logits(model, x)
    fp32 = FastSegmenter(model, torch.float32)(x)
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
    bf16 = FastSegmenter(model, torch.bfloat16)(x)
    assert bf16.dtype == torch.float32 and (bf16.argmax(1) == ref.argmax(1)).float().mean() > 0.95


def test_runner_modes_and_their_errors():
    model = create_model("segnet_basic", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 48)
    assert make_runner(model, "eager")(x).shape == (1, 3, 32, 48)
    assert isinstance(make_runner(model, "fast", compile=False), FastSegmenter)
    with pytest.raises(UserError, match="--mode 'turbo'"):
        make_runner(model, "turbo")
    with pytest.raises(UserError, match="int8"):
        make_runner(model, "int8")
    with pytest.raises(UserError, match="mc-samples"):
        make_runner(model, "fast", mc_samples=4)


def test_predict_mode_fast_agrees_with_eager(tmp_path, capsys):
    from PIL import Image

    from pixelwise import save_checkpoint
    from pixelwise.cli import main

    torch.manual_seed(0)
    model = create_model("unet", num_classes=4, base_channels=8).eval()
    ckpt = tmp_path / "u.safetensors"
    save_checkpoint(ckpt, model, {"model": "unet", "model_kwargs": {"base_channels": 8}, "num_classes": 4})
    image = (torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "a.png")
    masks = {}
    for mode in ("eager", "fast"):
        out = tmp_path / mode
        assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "a.png"), "--out", str(out),
                     "--mode", mode, "--no-progress"]) == 0
        masks[mode] = torch.from_numpy(np.asarray(Image.open(out / "a.png")).copy())
        said = capsys.readouterr().out
        assert ("--mode fast ran " + fast.fast_precision("unet") in said) == (mode == "fast"), said  # which precision
    assert (masks["fast"] == masks["eager"]).float().mean() >= 0.95
    # --uncertainty of a model with dropout samples it in eager float32: said so, not "--mode fast ran"
    dropped = tmp_path / "d.safetensors"
    save_checkpoint(dropped, create_model("unet", num_classes=4, base_channels=8, dropout=0.5).eval(),
                    {"model": "unet", "model_kwargs": {"base_channels": 8, "dropout": 0.5}, "num_classes": 4})
    assert main(["predict", "--checkpoint", str(dropped), str(tmp_path / "a.png"), "--out", str(tmp_path / "u"),
                 "--mode", "fast", "--uncertainty", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "Monte-Carlo dropout (--uncertainty) ran in eager float32, not --mode fast" in said
    assert "--mode fast ran" not in said


def test_bf16_fast_path_runs_layers_without_bf16_kernels_in_float32():
    model = create_model("segnet_basic", num_classes=3).eval()  # LocalResponseNorm: no bf16 avg_pool3d on CPU
    out = FastSegmenter(model, torch.bfloat16)(torch.randn(1, 3, 32, 48))
    assert out.shape == (1, 3, 32, 48) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_layers_kept_in_float32_keep_float32_weights(monkeypatch):
    # a kept layer with weights (a transposed convolution here) must not be cast to bf16 with its parent
    monkeypatch.setattr(fast, "FLOAT32_ONLY", (nn.ConvTranspose2d,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)).eval()
    runner = FastSegmenter(model, torch.bfloat16)
    kept = [m for m in runner.model.modules() if isinstance(m, fast.Float32)]
    assert len(kept) == 1 and kept[0].module.weight.dtype == torch.float32
    assert runner.model[0].weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(runner(x), model(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kernel,dilation,bias,channels_last", [(3, 12, True, False), (3, 36, False, True),
                                                                 (5, 9, True, True), (3, 70, True, False)])
def test_tap_convolution_equals_the_dilated_convolution(kernel, dilation, bias, channels_last):
    """TapConv2d against PyTorch's own dilated convolution in float64 (rates larger than the image
    included: those taps see only padding)."""
    from pixelwise.inference.fast import TapConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=bias).double()
    x = torch.randn(2, 6, 23, 41, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert TapConv2d.applies(conv, min_dilation=8)
    torch.testing.assert_close(TapConv2d(conv)(x), conv(x), rtol=1e-12, atol=1e-12)


def test_tap_convolution_only_replaces_what_it_computes_exactly():
    from pixelwise.inference.fast import TapConv2d, split_dilated

    assert not TapConv2d.applies(nn.Conv2d(4, 4, 3, padding=1, dilation=1), 8)  # small dilation: oneDNN is fast
    assert not TapConv2d.applies(nn.Conv2d(4, 4, 3, padding=12, dilation=12, stride=2), 8)
    assert not TapConv2d.applies(nn.Conv2d(4, 4, 3, padding=12, dilation=12, groups=2), 8)
    assert not TapConv2d.applies(nn.Conv2d(4, 4, 3, padding=0, dilation=12), 8)  # not "same"
    assert not TapConv2d.applies(nn.Conv2d(4, 4, 3, padding=12, dilation=12, padding_mode="reflect"), 8)
    model = create_model("deeplabv3_resnet50", num_classes=3)
    assert split_dilated(model) == 3  # the ASPP's three atrous branches (rates 12, 24, 36)


def test_compiled_fast_segmenter_leaves_the_inductor_config_alone():
    # weight freezing is an option of FastSegmenter's own compile, not a process-wide setting that
    # would freeze the weights of every later torch.compile of the user's (e.g. a training model)
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    before = inductor_config.freezing
    runner = FastSegmenter(model, torch.float32, compile=True)
    assert inductor_config.freezing == before
    x = torch.randn(1, 3, 8, 8)
    out = runner(x)  # compiles
    assert inductor_config.freezing == before
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-4, atol=1e-4)


def test_no_mode_means_the_default_and_eager_only_work_accepts_it():
    # mode=None (the Python API's default) and "" are the default mode, not a mode named 'None'
    assert fast.resolve_mode(None) == "eager" and fast.resolve_mode("") == "eager"
    assert fast.resolve_mode(None, default="fast") == "fast"
    assert fast.resolve_mode("int8", default="fast") == "int8"
    fast.eager_only(fast.MC_DROPOUT, None)  # eager by default: nothing to refuse
    with pytest.raises(UserError, match=r"^--mode fast \(mode='fast'\) does not apply to an ONNX file"):
        fast.eager_only("an ONNX file", "fast")


def test_instance_runner_refuses_int8_and_a_fast_path_it_does_not_have():
    model = nn.Conv2d(3, 2, 1)
    assert fast.instance_runner(model, "eager") is model and fast.instance_runner(model, None) is model
    with pytest.raises(UserError, match=r"^--mode int8 is not offered for instance models like maskrcnn: Mask R-CNN"):
        fast.instance_runner(model, "int8", "maskrcnn")
    with pytest.raises(UserError, match=r"^--mode fast has no fast path for Conv2d$"):
        fast.instance_runner(model, "fast")


def test_fast_runs_bf16_only_for_models_whose_bf16_accuracy_was_measured(monkeypatch):
    # on a CPU with bf16 kernels (the capability check patched): unet (in PLANS, measured) gets
    # bfloat16, a model never measured in bf16 (segnet_basic, an unnamed one) keeps float32
    from pixelwise.models.maskrcnn import fast as maskrcnn_fast

    monkeypatch.setattr(maskrcnn_fast, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    cpu = torch.device("cpu")
    assert fast.fast_dtype("unet", cpu) == torch.bfloat16
    assert "bfloat16 weights" in fast.fast_precision("unet", cpu)
    for name in ("segnet_basic", "enet", ""):
        assert fast.fast_dtype(name, cpu) == torch.float32, name
    runner = make_runner(create_model("segnet_basic", num_classes=3).eval(), "fast", "segnet_basic")
    assert isinstance(runner, FastSegmenter) and runner.dtype == torch.float32
    assert runner.precision == "float32 weights (bfloat16 not measured for segnet_basic)"
    assert all(p.dtype == torch.float32 for p in runner.model.parameters())


def test_fast_runner_of_a_measured_model_runs_bf16_where_the_device_has_fast_kernels(monkeypatch):
    # the runner itself (not only fast_dtype) takes the plan's bf16 for unet, and a segmenter
    # built directly names its weights' dtype without the "torch." prefix
    from pixelwise.models.maskrcnn import fast as maskrcnn_fast

    monkeypatch.setattr(maskrcnn_fast, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    model = create_model("unet", num_classes=3, base_channels=4).eval()
    runner = make_runner(model, "fast", "unet")
    assert isinstance(runner, FastSegmenter) and runner.dtype == torch.bfloat16
    assert runner.precision == "bfloat16 weights (bf16 accuracy measured for unet)"
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    assert FastSegmenter(model, torch.float32).precision == "float32 weights"
    assert FastSegmenter(model, torch.bfloat16).precision == "bfloat16 weights"

def test_fast_runner_runs_the_weights_it_was_built_with():
    # documented (SemanticPredictor, docs/deploy.md): the fast path runs a copy taken when it is
    # built; weights changed afterwards are seen only by a runner built again
    torch.manual_seed(0)
    model = create_model("segnet_basic", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 48)
    runner = make_runner(model, "fast", "segnet_basic")
    before = runner(x)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    torch.testing.assert_close(runner(x), before)
    assert not torch.allclose(make_runner(model, "fast", "segnet_basic")(x), before)


def test_every_plan_offered_was_measured_within_its_cost():
    """A model gets bf16 (or int8) only with a measurement on a trained checkpoint that costs at most
    FAST_MAX_COST (INT8_MAX_COST) mIoU points: the plans' numbers are eager / fast / int8."""
    import re

    offered = 0
    for name, plan in fast.PLANS.items():
        if not (plan.bf16 or plan.int8 is None):
            continue
        eager, quick, int8 = (float(v) for v in re.findall(r"(\d+\.\d+) / (\d+\.\d+) / (\d+\.\d+)",
                                                              plan.measured)[0])
        assert not plan.bf16 or eager - quick <= fast.FAST_MAX_COST, name
        assert plan.int8 is not None or eager - int8 <= fast.INT8_MAX_COST, name
        offered += 1
    assert offered >= 3


def test_eager_runner_is_the_model_itself_not_a_copy():
    # eager runs the model as it is (later weight changes seen), unlike the fast path's copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)).eval()
    x = torch.randn(1, 3, 8, 10)
    runner = make_runner(model, "eager")
    assert not isinstance(runner, FastSegmenter)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
        torch.testing.assert_close(runner(x), forward_logits(model, x), rtol=0, atol=0)


def test_tap_convolution_applies_from_min_dilation_on_either_axis_to_odd_kernels_only():
    assert TapConv2d.applies(nn.Conv2d(4, 4, 3, padding=8, dilation=8), 8)  # at least min_dilation
    assert not TapConv2d.applies(nn.Conv2d(4, 4, 3, padding=7, dilation=7), 8)
    assert not TapConv2d.applies(nn.Conv2d(4, 4, 2, padding=6, dilation=12), 8)  # even: "same" needs uneven padding
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, padding=(1, 12), dilation=(1, 12)).double()  # only the width is dilated
    assert TapConv2d.applies(conv, 8)
    x = torch.randn(1, 3, 9, 30, dtype=torch.float64)
    torch.testing.assert_close(TapConv2d(conv)(x), conv(x), rtol=1e-12, atol=1e-12)
