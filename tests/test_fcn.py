"""FCN: the paper's VGG-16 nets (sizes, alignment, parameters, VGG weight surgery) and
torchvision's fcn_resnet50 (fixture equivalence)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import check_segmenter_fixture
from pixelwise.backbones.vgg import forward_stages
from pixelwise.models import create_model, list_models
from pixelwise.models._utils import pad_to_multiple
from pixelwise.models.fcn import fcn8s, fcn16s, fcn32s, fcn_resnet50, fcn_resnet101, vgg16_to_fcn


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


def test_skips_are_aligned_without_offsets(fcn8):
    """With score_fr and score_pool4 at zero, FCN-8s must equal bilinear x8 upsampling of the
    pool3 scores: a crop offset or misaligned upsampler would shift it."""
    fcn8.eval()
    nn.init.zeros_(fcn8.score_fr.weight)
    nn.init.zeros_(fcn8.score_fr.bias)
    nn.init.zeros_(fcn8.score_pool4.weight)
    nn.init.zeros_(fcn8.score_pool4.bias)
    nn.init.normal_(fcn8.score_pool3.weight, std=0.1)
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        y = fcn8(x)
        pool3 = forward_stages(fcn8.features, pad_to_multiple(x, 32)).stages[2]
        ref = F.interpolate(fcn8.score_pool3(pool3), scale_factor=8, mode="bilinear", align_corners=False)
    ref = ref[..., :75, :101]
    torch.testing.assert_close(y[..., 8:-8, 8:-8], ref[..., 8:-8, 8:-8], atol=1e-5, rtol=1e-5)


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


def test_fcn16s_shape_and_missing_skip_modules():
    model = fcn16s(num_classes=2).eval()
    assert not hasattr(model, "score_pool3") and not model.upscore16.weight.requires_grad
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 29)).shape == (1, 2, 50, 29)


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
