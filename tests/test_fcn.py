"""FCN: the paper's VGG-16 nets (sizes, alignment, parameters, VGG weight surgery) and
torchvision's fcn_resnet50 (fixture equivalence)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import check_segmenter_fixture
from pixelwise.backbones.vgg import forward_stages, make_features
from pixelwise.errors import UserError
from pixelwise.layers import bilinear_kernel
from pixelwise.models import create_model, list_models
from pixelwise.models._utils import pad_to_multiple
from pixelwise.models.fcn import (
    FCNVGG,
    fcn8s,
    fcn16s,
    fcn32s,
    fcn_resnet50,
    fcn_resnet101,
    load_coarser_fcn,
    vgg16_to_fcn,
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def fcn8(request):
    torch.manual_seed(0)
    return fcn8s(num_classes=5)


def test_registered():
    assert {"fcn32s", "fcn16s", "fcn8s", "fcn_resnet50", "fcn_resnet101"} <= set(list_models())


def test_parameter_counts_match_the_released_nets():
    with torch.device("meta"):
        # voc-fcn8s prototxt (arXiv:1411.4038), 21 classes: 134,489,759 with the fixed deconv weights,
        # 134,362,751 without the three upsampling kernels
        m = fcn8s(21)
        assert n_params(m) == 134_489_759
        assert n_params(m) - sum(n_params(getattr(m, k)) for k in ("upscore2", "upscore_pool4", "upscore8")) \
            == 134_362_751
        # torchvision weight metadata (aux classifier included)
        assert n_params(fcn_resnet50(21, aux_loss=True)) == 35_322_218
        assert n_params(fcn_resnet101(21, aux_loss=True)) == 54_314_346


def test_odd_input_size_and_state_dict_round_trip(fcn8):
    fcn8.eval()
    x = torch.randn(1, 3, 97, 131)
    for m in (fcn8.score_fr, fcn8.score_pool4, fcn8.score_pool3):
        nn.init.normal_(m.weight, std=0.01)
    with torch.no_grad():
        y = fcn8(x)
    assert y.shape == (1, 5, 97, 131)
    with torch.device("meta"):
        twin = fcn8s(num_classes=5).eval()
    twin.load_state_dict({k: v.clone() for k, v in fcn8.state_dict().items()}, strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y)


def assert_skip_alone_is_upsampled(model, skip: str, stage: int, factor: int) -> None:
    """With every coarser score layer at zero, the net must equal bilinear x``factor`` upsampling
    of the ``skip`` scores of VGG stage ``stage``: a crop offset or misaligned upsampler would
    shift it (the borders, where the upsampler sees the padding, left out)."""
    model.eval()
    for name in ("score_fr", "score_pool4"):
        if name != skip:
            nn.init.zeros_(getattr(model, name).weight)
            nn.init.zeros_(getattr(model, name).bias)
    nn.init.normal_(getattr(model, skip).weight, std=0.1)
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        y = model(x)
        pool = forward_stages(model.features, pad_to_multiple(x, 32)).stages[stage]
        ref = F.interpolate(getattr(model, skip)(pool), scale_factor=factor, mode="bilinear", align_corners=False)
    ref = ref[..., :75, :101]
    torch.testing.assert_close(y[..., factor:-factor, factor:-factor], ref[..., factor:-factor, factor:-factor],
                               atol=1e-5, rtol=1e-5)


def test_skips_are_aligned_without_offsets(fcn8):
    assert_skip_alone_is_upsampled(fcn8, "score_pool3", 2, 8)


def test_gradients_reach_every_trainable_parameter(fcn8):
    fcn8.train()
    for m in (fcn8.score_fr, fcn8.score_pool4, fcn8.score_pool3):  # zero-initialised in the paper
        nn.init.normal_(m.weight, std=0.01)
    fcn8.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    F.cross_entropy(fcn8(x), target).backward()
    for name, p in fcn8.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name == "upscore8.weight" and p.grad is None
    assert fcn8.upscore2.weight.requires_grad and fcn8.upscore_pool4.weight.requires_grad


def _fake_vgg16_state():
    g = torch.Generator().manual_seed(0)
    from pixelwise.backbones.vgg import VGG16_CFG, make_features

    state = {f"features.{k}": v for k, v in make_features(VGG16_CFG, False).state_dict().items()}
    state["classifier.0.weight"] = torch.randn(4096, 25088, generator=g) * 0.01
    state["classifier.0.bias"] = torch.randn(4096, generator=g)
    state["classifier.3.weight"] = torch.randn(4096, 4096, generator=g) * 0.01
    state["classifier.3.bias"] = torch.randn(4096, generator=g)
    state["classifier.6.weight"] = torch.randn(1000, 4096, generator=g)
    state["classifier.6.bias"] = torch.randn(1000, generator=g)
    return state


def test_fcn32s_imagenet_weights_become_fc6_fc7(monkeypatch):
    state = _fake_vgg16_state()
    urls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, **kw: urls.append((url, kw.get("weights_only"))) or state)
    model = fcn32s(num_classes=3, pretrained="imagenet").eval()
    assert urls == [("https://download.pytorch.org/models/vgg16-397923af.pth", True)]
    torch.testing.assert_close(model.features[28].weight, state["features.28.weight"])
    # fc6 at the centre of a 7x7 pool5 map is classifier.0 on the flattened map (C, H, W order)
    pool5 = torch.randn(1, 512, 7, 7)
    with torch.no_grad():
        conv = model.fc6(pool5)[0, :, 3, 3]
        lin = F.linear(pool5.flatten(1), state["classifier.0.weight"], state["classifier.0.bias"])[0]
        torch.testing.assert_close(conv, lin, atol=1e-4, rtol=1e-4)
        h = torch.randn(1, 4096, 1, 1)
        fc7 = F.linear(h.flatten(1), state["classifier.3.weight"], state["classifier.3.bias"])[0]
        torch.testing.assert_close(model.fc7(h).flatten(), fc7)
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 3, 33, 47)
    assert torch.equal(vgg16_to_fcn(state)["fc6.weight"].flatten(1), state["classifier.0.weight"])


def test_fcn16s_shape_missing_skip_modules_and_pool4_alignment():
    torch.manual_seed(0)
    model = fcn16s(num_classes=2).eval()
    assert not hasattr(model, "score_pool3") and not model.upscore16.weight.requires_grad
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 29)).shape == (1, 2, 50, 29)
    # the pool4 skip's crop and upsampler, which no fixture reaches
    assert_skip_alone_is_upsampled(model, "score_pool4", 3, 16)


def test_fcn_resnet50_matches_torchvision_fixture():
    check_segmenter_fixture(fcn_resnet50, "fcn_resnet50")


def test_fcn_resnet50_contract(tmp_path):
    # a whole-model checkpoint with the aux head (as torchvision publishes) loads without it
    full = fcn_resnet50(num_classes=4, aux_loss=True)
    torch.save(full.state_dict(), tmp_path / "fcn.pth")
    model = create_model("fcn_resnet50", num_classes=4, pretrained=str(tmp_path / "fcn.pth")).eval()
    np.testing.assert_array_equal(model.classifier[4].weight.detach(), full.classifier[4].weight.detach())
    assert model.aux_classifier is None and "layer3" in dict(model.backbone.named_children())
    with torch.no_grad():
        y = model(torch.randn(1, 3, 45, 61))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 4, 45, 61)


# --------------------------------------------------------------------------- staged training


def _middle_of_cells(n: int, cell: int, margin: int) -> np.ndarray:
    """bool[n]: output pixels in the middle half of a ``cell``-pixel coarse cell (coarse coordinate
    ``(o + 0.5) / cell - 0.5`` with fractional part in [1/4, 3/4]), ``margin`` pixels from the ends."""
    coord = (np.arange(n) + 0.5) / cell - 0.5
    frac = coord - np.floor(coord)
    keep = (frac >= 0.25 - 1e-9) & (frac <= 0.75 + 1e-9)
    keep[:margin] = keep[n - margin:] = False
    return keep


def _forward_with_scores(model, x, layer):
    """(model(x), the input of ``layer``): the stride-32 scores enter ``upscore`` (FCN-32s), the
    fused stride-16 scores ``upscore16`` (FCN-16s)."""
    seen = []
    handle = getattr(model, layer).register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        y = model(x)
    handle.remove()
    return y, seen[0]


@pytest.mark.slow  # three VGG16 FCNs (134M parameters each), two saved and loaded: ~22 s on 2 cores
def test_staged_initialisation_starts_from_the_coarser_nets_predictions(tmp_path):
    """CVPR Sec. 4.2: FCN-16s initialised from FCN-32s (new pool4 scorer zero), FCN-8s from FCN-16s.
    Shared layers are copied, new scorers are zero and new upsamplers bilinear, and the finer net's
    prediction is the coarser net's scores upsampled x2 then x16 (x2 then x8) instead of x32 (x16):
    identical on the middle half of every coarse cell, and mostly the same classes elsewhere."""
    from pixelwise import save_checkpoint
    from pixelwise.models.fcn import load_coarser_fcn

    def up(t, *factors):
        for f in factors:
            t = F.interpolate(t, scale_factor=f, mode="bilinear", align_corners=False)
        return t

    torch.manual_seed(0)
    f32 = fcn32s(num_classes=4).eval()
    nn.init.normal_(f32.score_fr.weight, std=0.02)
    nn.init.normal_(f32.score_fr.bias, std=0.5)
    save_checkpoint(tmp_path / "fcn32s.safetensors", f32, {"model": "fcn32s", "num_classes": 4})
    f16 = create_model("fcn16s", num_classes=4, pretrained=str(tmp_path / "fcn32s.safetensors")).eval()
    assert f16.pretrained_note.startswith("fcn16s: loaded 32 tensors of the fcn32s weights")
    assert "initialised score_pool4 (zero), upscore16 (bilinear, fixed), upscore2 (bilinear); not used: upscore" \
        in f16.pretrained_note
    for k, v in f32.state_dict().items():
        if k != "upscore.weight":
            assert torch.equal(f16.state_dict()[k], v), k
    assert not f16.score_pool4.weight.any() and not f16.score_pool4.bias.any()
    assert torch.equal(f16.upscore2.weight, bilinear_kernel(4, 4, 4)) and f16.upscore2.weight.requires_grad

    x = torch.randn(1, 3, 256, 256)
    inner = slice(48, -48)
    y32, s32 = _forward_with_scores(f32, x, "upscore")
    y16, _ = _forward_with_scores(f16, x, "upscore16")
    tol = 1e-4 * s32.abs().max().item()
    torch.testing.assert_close(y32[..., inner, inner], up(s32, 32)[..., inner, inner], atol=tol, rtol=0)
    torch.testing.assert_close(y16[..., inner, inner], up(s32, 2, 16)[..., inner, inner], atol=tol, rtol=0)
    keep = _middle_of_cells(256, 32, margin=48)
    mid = torch.from_numpy(keep[:, None] & keep[None, :])
    assert mid.sum() > 1000
    torch.testing.assert_close(y16[..., mid], y32[..., mid], atol=tol, rtol=0)
    assert (y16.argmax(1) == y32.argmax(1))[..., inner, inner].float().mean() > 0.95

    # FCN-8s from a trained FCN-16s: its pool4 scorer and learned upscore2 carry over
    nn.init.normal_(f16.score_pool4.weight, std=0.01)
    with torch.no_grad():
        f16.upscore2.weight.mul_(1.1)
    save_checkpoint(tmp_path / "fcn16s.safetensors", f16, {"model": "fcn16s", "num_classes": 4})
    f8 = fcn8s(num_classes=4, pretrained=str(tmp_path / "fcn16s.safetensors")).eval()
    assert "initialised score_pool3 (zero), upscore8 (bilinear, fixed), upscore_pool4 (bilinear); not used: " \
           "upscore16" in f8.pretrained_note
    assert torch.equal(f8.upscore2.weight, f16.upscore2.weight)
    assert torch.equal(f8.score_pool4.weight, f16.score_pool4.weight) and not f8.score_pool3.weight.any()
    y16, s16 = _forward_with_scores(f16, x, "upscore16")
    with torch.no_grad():
        y8 = f8(x)
    tol = 1e-4 * s16.abs().max().item()
    torch.testing.assert_close(y8[..., inner, inner], up(s16, 2, 8)[..., inner, inner], atol=tol, rtol=0)
    keep = _middle_of_cells(256, 16, margin=48)
    mid = torch.from_numpy(keep[:, None] & keep[None, :])
    torch.testing.assert_close(y8[..., mid], y16[..., mid], atol=tol, rtol=0)

    # only coarser-to-finer, with the same classes
    with pytest.raises(UserError, match="finer fcn8s; staged training goes fcn32s -> fcn16s -> fcn8s"):
        load_coarser_fcn(f16, f8.state_dict(), "fcn8s.safetensors")
    wrong = {**f32.state_dict(), "score_fr.bias": torch.zeros(5)}
    with pytest.raises(UserError, match=r"score_fr\.bias has shape \(5,\).* keeps the classes"):
        load_coarser_fcn(f16, wrong, "other.safetensors")


@pytest.mark.parametrize("source_at_once", [True, False])
def test_at_once_weights_load_into_the_other_variant_as_the_same_function(tmp_path, source_at_once):
    """The scale is no tensor: an at-once checkpoint loaded into a plain FCN-8s (the recipe's weights
    fine-tuned with --model fcn8s) put pool4 and pool3 in 100x and 10,000x too strong, and the note
    said all was loaded. The skip scorers are rescaled from the checkpoint's recorded at_once."""
    from pixelwise import save_checkpoint

    torch.manual_seed(0)
    source = create_model("fcn8s", num_classes=3, at_once=source_at_once).eval()
    for m in (source.score_fr, source.score_pool4, source.score_pool3):
        nn.init.normal_(m.weight, std=0.5 if source_at_once else 0.01)
        nn.init.normal_(m.bias, std=0.1)
    path = tmp_path / "fcn8s.safetensors"
    save_checkpoint(path, source, {"model": "fcn8s", "num_classes": 3, "model_kwargs": {"at_once": source_at_once}})
    loaded = create_model("fcn8s", num_classes=3, at_once=not source_at_once, pretrained=str(path)).eval()
    assert "rescaled score_pool4 x " in loaded.pretrained_note and "score_pool3 x " in loaded.pretrained_note
    x = torch.randn(1, 3, 64, 96)
    naive = create_model("fcn8s", num_classes=3, at_once=not source_at_once).eval()
    naive.load_state_dict(source.state_dict())  # the tensors as they are: what the load did before
    with torch.no_grad():
        expected, got, before = source(x), loaded(x), naive(x)
    assert (before - expected).abs().max() > 10 * (expected - expected.mean()).abs().max() * 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    same = create_model("fcn8s", num_classes=3, at_once=source_at_once, pretrained=str(path)).eval()
    assert "rescaled" not in same.pretrained_note


def test_at_once_scales_the_skips_like_the_reference_net():
    """voc-fcn8s-atonce multiplies pool4 by 0.01 and pool3 by 0.0001 before their 1x1 scorers: the
    same as scaling those scorers' weights (not their biases) in the plain net."""
    import copy

    torch.manual_seed(0)
    at_once = create_model("fcn8s", num_classes=3, at_once=True).eval()
    for m in (at_once.score_fr, at_once.score_pool4, at_once.score_pool3):
        nn.init.normal_(m.weight, std=0.05)
        nn.init.normal_(m.bias, std=0.1)
    plain = copy.deepcopy(at_once)
    plain.skip_scale = {"pool4": 1.0, "pool3": 1.0}
    with torch.no_grad():
        plain.score_pool4.weight.mul_(0.01)
        plain.score_pool3.weight.mul_(0.0001)
        x = torch.randn(1, 3, 64, 96)
        y = at_once(x)
        torch.testing.assert_close(y, plain(x), atol=1e-5, rtol=1e-4)
        unscaled = copy.deepcopy(at_once)
        unscaled.skip_scale = {"pool4": 1.0, "pool3": 1.0}
        assert (y - unscaled(x)).abs().max() > 1e-3  # the scaling does change the skips' share
    assert at_once.skip_scale == {"pool4": 0.01, "pool3": 0.0001} and not fcn8s(3).at_once


def test_fcn_vgg_init_zeroes_conv_biases_and_draws_kaiming_fan_out_weights():
    """FCNVGG's own init of the VGG convs and fc6/fc7: Kaiming normal (fan_out, ReLU gain), bias 0.
    Run on small stand-ins for features/fc6/fc7, so that no 134M-weight net is built."""
    stand_in = SimpleNamespace(features=make_features((8, "M"), batch_norm=False),
                               fc6=nn.Conv2d(8, 16, 7, padding=3), fc7=nn.Conv2d(16, 24, 1))
    convs = (stand_in.features[0], stand_in.fc6, stand_in.fc7)
    with torch.no_grad():
        for p in (p for conv in convs for p in conv.parameters()):
            p.fill_(5.0)  # whatever the init leaves alone stays 5
    torch.manual_seed(0)
    FCNVGG._init_weights(stand_in)
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert not conv.bias.any(), conv
        assert abs(conv.weight.mean().item()) < 0.1 and 0.8 < conv.weight.std().item() / (2.0 / fan_out) ** 0.5 < 1.2


def _small_fcn(stride: int) -> nn.Module:
    """A stand-in with an FCN-VGG's layer names and initialisation at a few channels (the real ones
    hold 134M parameters): what load_coarser_fcn reads and writes."""
    net = nn.Module()
    net.output_stride = stride
    net.features, net.fc6, net.fc7 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    net.score_fr = nn.Conv2d(4, 3, 1)
    ups = {32: [("upscore", 64, 32)], 16: [("upscore2", 4, 2), ("upscore16", 32, 16)]}[stride]
    for name, k, s in ups:
        up = nn.ConvTranspose2d(3, 3, k, s, bias=False)
        up.weight.data.copy_(bilinear_kernel(3, 3, k))
        up.weight.requires_grad_(name == "upscore2")  # FCN's last upsampler is fixed, upscore2 learned
        setattr(net, name, up)
    if stride == 16:
        net.score_pool4 = nn.Conv2d(4, 3, 1)
        nn.init.zeros_(net.score_pool4.weight), nn.init.zeros_(net.score_pool4.bias)
    return net


def test_staged_loading_copies_the_shared_layers_and_keeps_the_new_ones_initialised():
    """The default suite's check of staged loading (the slow test above runs the real FCN-16s from
    FCN-32s and compares their predictions): shared tensors copied, new scorer zero, upsamplers
    bilinear, the coarser net's final upsampler unused, and the note saying each."""
    torch.manual_seed(0)
    coarse, fine = _small_fcn(32), _small_fcn(16)
    state = {k: v.clone() for k, v in coarse.state_dict().items()}
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    note = load_coarser_fcn(fine, state, "c.safetensors")
    assert note == ("fcn16s: loaded 8 tensors of the fcn32s weights c.safetensors; initialised score_pool4 (zero), "
                    "upscore16 (bilinear, fixed), upscore2 (bilinear); not used: upscore")
    own = fine.state_dict()
    for k in ("features.weight", "fc6.bias", "fc7.weight", "score_fr.weight", "score_fr.bias"):
        assert torch.equal(own[k], state[k]), k
    for k in ("score_pool4.weight", "score_pool4.bias", "upscore2.weight", "upscore16.weight"):
        assert torch.equal(own[k], before[k]), k
    with pytest.raises(UserError, match="the weights are of a finer fcn16s"):
        load_coarser_fcn(_small_fcn(32), fine.state_dict(), "f.safetensors")
