"""DeepLabV3 (torchvision fixture equivalence, output stride option) and DeepLabV3+."""

import pytest
import torch
import torch.nn.functional as F

from conftest import check_segmenter_fixture
from pixelwise.errors import UserError
from pixelwise.models import create_model, list_models
from pixelwise.models.deeplab import (
    DeepLabHead,
    DeepLabV3PlusHead,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
    deeplabv3plus_resnet18,
    deeplabv3plus_resnet50,
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registered():
    assert {"deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3plus_resnet18",
            "deeplabv3plus_resnet50"} <= set(list_models())


def test_deeplabv3_resnet50_matches_torchvision_fixture():
    check_segmenter_fixture(deeplabv3_resnet50, "deeplabv3_resnet50")


def test_parameter_counts():
    with torch.device("meta"):
        # torchvision weight metadata (aux classifier included)
        assert n_params(deeplabv3_resnet50(21, aux_loss=True)) == 42_004_074
        assert n_params(deeplabv3_resnet101(21, aux_loss=True)) == 60_996_202
        v3 = deeplabv3_resnet50(21)
        plus = deeplabv3plus_resnet50(21)
    # V3+ = V3's backbone and ASPP, plus the decoder: 1x1 256->48 (+BN) and a first 3x3 conv
    # over 256+48 channels (+BN) in place of V3's 3x3 conv over 256 (the rest is identical)
    decoder_extra = (256 * 48 + 2 * 48) + (304 * 256 * 9 + 2 * 256)
    assert n_params(plus) == n_params(v3) + decoder_extra == 40_352_181


@pytest.mark.parametrize("output_stride,rates,layer4_stride", [(8, (12, 24, 36), 8), (16, (6, 12, 18), 16)])
def test_output_stride_option(output_stride, rates, layer4_stride):
    with torch.device("meta"):
        model = deeplabv3_resnet50(3, output_stride=output_stride)
    assert model.backbone.feature_info["out"].stride == layer4_stride
    aspp = model.classifier[0]
    assert tuple(branch[0].dilation[0] for branch in aspp.convs[1:4]) == rates
    assert tuple(branch[0].padding[0] for branch in aspp.convs[1:4]) == rates
    with pytest.raises(ValueError, match="output_stride"):
        deeplabv3_resnet50(3, output_stride=32)


def test_deeplabv3_odd_size_os16_and_round_trip():
    model = create_model("deeplabv3_resnet50", num_classes=4, output_stride=16).eval()
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 4, 97, 131)
    with torch.device("meta"):
        twin = deeplabv3_resnet50(num_classes=4, output_stride=16).eval()
    twin.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y)


def test_deeplabv3plus_shapes_and_decoder_wiring():
    model = deeplabv3plus_resnet50(num_classes=3).eval()
    info = model.backbone.feature_info
    assert (info["out"].stride, info["low"].stride, info["low"].channels) == (16, 4, 256)
    seen = {}
    model.classifier.register_forward_hook(lambda m, i, o: seen.update(inputs=i, out=o))
    with torch.no_grad():
        y = model(torch.randn(1, 3, 97, 131))
    assert y.shape == (1, 3, 97, 131)
    deep, low = seen["inputs"]
    assert deep.shape == (1, 2048, 7, 9) and low.shape == (1, 256, 25, 33)
    assert seen["out"].shape == (1, 3, 25, 33)  # logits at stride 4, then upsampled
    torch.testing.assert_close(y, F.interpolate(seen["out"], size=(97, 131), mode="bilinear",
                                                align_corners=False))


def test_deeplabv3plus_head_reads_channels_from_arguments():
    head = DeepLabV3PlusHead(in_channels=64, low_channels=16, num_classes=2).eval()
    with torch.no_grad():
        assert head(torch.randn(1, 64, 4, 5), torch.randn(1, 16, 16, 20)).shape == (1, 2, 16, 20)


def test_heads_default_rates_and_the_decoders_upsampling():
    """DeepLabHead defaults to torchvision's rates (12, 24, 36), the V3+ head to the paper's
    (6, 12, 18). The decoder upsamples the ASPP output to the low-level size with half-pixel
    bilinear (align_corners=False, as every other resize here) and puts it first in the
    concatenation, the 48 reduced low-level channels last."""
    torch.manual_seed(0)
    v3 = DeepLabHead(8, 2)
    assert [branch[0].dilation[0] for branch in v3[0].convs[1:4]] == [12, 24, 36]
    head = DeepLabV3PlusHead(in_channels=8, low_channels=4, num_classes=2).eval()
    assert [branch[0].dilation[0] for branch in head.aspp.convs[1:4]] == [6, 12, 18]
    seen = {}
    head.fuse.register_forward_hook(lambda m, i, o: seen.update(fused=i[0]))
    x, low = torch.randn(1, 8, 3, 4), torch.randn(1, 4, 11, 15)
    with torch.no_grad():
        head(x, low)
        deep = F.interpolate(head.aspp(x), size=(11, 15), mode="bilinear", align_corners=False)
        ref = torch.cat([deep, head.reduce(low)], dim=1)
    assert seen["fused"].shape == (1, 256 + 48, 11, 15)
    torch.testing.assert_close(seen["fused"], ref)


def test_gradients_reach_every_parameter_with_aux():
    torch.manual_seed(0)
    model = deeplabv3plus_resnet50(num_classes=3, aux_loss=True).train()
    x = torch.randn(2, 3, 48, 48)
    target = torch.randint(0, 3, (2, 48, 48))
    out = model(x)
    assert set(out) == {"out", "aux"} and out["aux"].shape == (2, 3, 48, 48)
    (F.cross_entropy(out["out"], target) + 0.5 * F.cross_entropy(out["aux"], target)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("builder, resnet, url", [
    (deeplabv3plus_resnet50, "resnet50", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    (deeplabv3plus_resnet18, "resnet18", "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
])
def test_imagenet_pretrained_loads_the_resnet_backbone(monkeypatch, builder, resnet, url):
    from pixelwise import backbones

    ref = getattr(backbones, resnet)().state_dict()
    urls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: urls.append(url) or ref)
    model = builder(num_classes=2, pretrained="imagenet")
    assert urls == [url]
    body = model.backbone.state_dict()
    assert all(torch.equal(body[k], ref[k]) for k in body)
    assert "fc.weight" not in body


def _conv2_dilations(layer):
    return [block.conv2.dilation[0] for block in layer]


@pytest.mark.parametrize("output_stride, rate", [(16, 2), (8, 4)])
def test_multi_grid_rates_of_every_conv(output_stride, rate):
    """DeepLabV3 Sec. 3.2: Multi_Grid = (1, 2, 4) gives layer4's three 3x3 convs the unit rates
    times the stage's rate, e.g. 2 x (1, 2, 4) = (2, 4, 8) at output stride 16."""
    with torch.device("meta"):
        plain = deeplabv3_resnet50(3, output_stride=output_stride)
        grid = create_model("deeplabv3_resnet50", num_classes=3, output_stride=output_stride, multi_grid=[1, 2, 4])
        plus = deeplabv3plus_resnet50(3, output_stride=output_stride, multi_grid=(1, 2, 4))
    body, base = grid.backbone, plain.backbone
    assert _conv2_dilations(base.layer4) == [rate // 2, rate, rate]  # torchvision's: previous rate first
    for model in (grid, plus):
        assert _conv2_dilations(model.backbone.layer4) == [rate, 2 * rate, 4 * rate]
        for block in model.backbone.layer4:
            assert block.conv2.padding == block.conv2.dilation  # "same" size
            assert block.conv1.dilation == block.conv3.dilation == (1, 1)
    for name in ("layer1", "layer2", "layer3"):  # only layer4 changes
        assert _conv2_dilations(getattr(body, name)) == _conv2_dilations(getattr(base, name))
    assert [k for k, _ in grid.state_dict().items()] == [k for k, _ in plain.state_dict().items()]
    with pytest.raises(ValueError, match="multi_grid needs 3 positive unit rates"):
        deeplabv3_resnet50(3, multi_grid=(1, 2))


def test_multi_grid_convs_sample_at_their_rate():
    """An impulse through each of layer4's 3x3 convs lands exactly on the 3x3 taps spaced by its
    rate (2, 4, 8 at output stride 16), and the map keeps its size."""
    from pixelwise.backbones.resnet import resnet50

    torch.manual_seed(0)
    layer4 = resnet50(replace_stride_with_dilation=[False, False, True], multi_grid=(1, 2, 4)).layer4
    for block, rate in zip(layer4, (2, 4, 8)):
        conv = block.conv2
        x = torch.zeros(1, conv.in_channels, 21, 21)
        x[0, 0, 10, 10] = 1.0
        with torch.no_grad():
            y = conv(x)[0].abs().sum(0)
        assert y.shape == (21, 21)
        taps = {(10 + dy * rate, 10 + dx * rate) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        assert {tuple(p) for p in y.nonzero().tolist()} == taps
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert deeplabv3_resnet50(3, output_stride=16, multi_grid=(1, 2, 4)).eval()(x).shape == (1, 3, 64, 80)


def test_deeplabv3plus_resnet18_parameter_count_by_hand():
    """ResNet-18 without fc (torchvision's 11,689,512 less 512 x 1000 + 1000), ASPP over 512
    channels, the decoder over layer1's 64, all convs without bias except the scorer."""
    with torch.device("meta"):
        model = deeplabv3plus_resnet18(11)
    body = 11_689_512 - (512 * 1000 + 1000)
    bn = 2 * 256
    aspp = (512 * 256 + bn) + 3 * (512 * 256 * 9 + bn) + (512 * 256 + bn) + (5 * 256 * 256 + bn)
    decoder = (64 * 48 + 2 * 48) + (304 * 256 * 9 + bn) + (256 * 256 * 9 + bn) + (256 * 11 + 11)
    assert n_params(model) == body + aspp + decoder == 16_605_611


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deeplabv3plus_resnet18_strides_and_shapes(output_stride):
    model = create_model("deeplabv3plus_resnet18", num_classes=3, output_stride=output_stride).eval()
    info = model.backbone.feature_info
    assert (info["out"].stride, info["out"].channels, info["low"].stride, info["low"].channels) == \
        (output_stride, 512, 4, 64)
    seen = {}
    model.classifier.register_forward_hook(lambda m, i, o: seen.update(inputs=i))
    with torch.no_grad():
        y = model(torch.randn(1, 3, 97, 131))
    assert y.shape == (1, 3, 97, 131) and torch.isfinite(y).all()
    deep, low = seen["inputs"]
    assert deep.shape[-2:] == (-(-97 // output_stride), -(-131 // output_stride))
    assert low.shape == (1, 64, 25, 33)
    with pytest.raises(ValueError, match="output_stride"):
        deeplabv3plus_resnet18(3, output_stride=32)


def test_input_norm_makes_the_prediction_blind_to_each_images_light():
    """With input_norm, an image and the same image under a per-channel gain and offset give the
    same logits (a new street's light), up to the norm's eps; without it they do not."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 80)
    gain, offset = torch.tensor([1.7, 0.6, 1.2]).view(1, 3, 1, 1), torch.tensor([0.1, -0.3, 0.25]).view(1, 3, 1, 1)
    for input_norm in (True, False):
        torch.manual_seed(1)
        model = deeplabv3plus_resnet18(num_classes=4, input_norm=input_norm).double().eval()
        with torch.no_grad():
            a, b = model(x.double()), model((x * gain + offset).double())
        change = ((a - b).abs().max() / a.abs().max()).item()  # relative; eps of the norm aside
        assert change < 1e-3 if input_norm else change > 0.05


def test_a_local_copy_of_the_imagenet_resnet_fills_the_backbone(tmp_path):
    """The download failure says "download the file yourself and pass its path": for the ResNet
    models a path is a whole-model file, so a backbone-only file (torchvision's ImageNet keys,
    fc included) must fill the backbone and leave the heads as built."""
    from pixelwise.backbones import resnet18
    from pixelwise.errors import UserError

    torch.manual_seed(0)
    ref = resnet18().state_dict()
    torch.save(ref, tmp_path / "resnet18-f37072fd.pth")
    torch.manual_seed(1)
    fresh = deeplabv3plus_resnet18(num_classes=2)
    torch.manual_seed(1)
    model = create_model("deeplabv3plus_resnet18", num_classes=2, pretrained=str(tmp_path / "resnet18-f37072fd.pth"))
    body = model.backbone.state_dict()
    assert all(torch.equal(body[k], ref[k]) for k in body)
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert heads and all(torch.equal(v, fresh.state_dict()[k]) for k, v in heads.items())
    torch.save({k: v for k, v in ref.items() if not k.startswith("layer4.")}, tmp_path / "cut.pth")
    with pytest.raises(UserError, match="weights do not fit .*missing .*layer4"):
        deeplabv3plus_resnet18(num_classes=2, pretrained=str(tmp_path / "cut.pth"))


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_a_21_class_torchvision_file_fine_tunes_to_another_class_count(tmp_path, name):
    """torchvision's COCO FCN / DeepLab files score 21 classes; a model of 5 refused them (a shape
    error on classifier.4). Everything loads but the scorers, which stay fresh, and the note says so."""
    from pixelwise.models import create_model

    torch.manual_seed(0)
    source = create_model(name, num_classes=21, aux_loss=True)
    path = tmp_path / "coco.pth"
    torch.save(source.state_dict(), path)
    model = create_model(name, num_classes=5, aux_loss=True, pretrained=str(path))
    assert model.pretrained_note.endswith("aux_classifier.4, classifier.4, which score 21 classes in the file: "
                                          "initialised for this model's classes (fine-tuning)")
    own = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith(("classifier.4.", "aux_classifier.4.")):
            assert torch.equal(own[key], value), key
    assert own["classifier.4.weight"].shape[0] == 5
    same = create_model(name, num_classes=21, aux_loss=True, pretrained=str(path))  # nothing to fine-tune
    assert getattr(same, "pretrained_note", None) is None


def test_deeplabv3plus_fine_tunes_to_another_class_count_and_a_half_scorer_is_refused(tmp_path):
    """DeepLabV3+ scores in classifier.score, which the fine-tuning rule (Sequential heads only) never
    found: its own 3-class file was refused for a 5-class model. A scorer that differs in more than its
    class count (FCN's with 128 input channels), or of which only the weight differs, was left half
    random under a note that called it another class count."""
    from pixelwise.models import create_model

    torch.manual_seed(0)
    source = create_model("deeplabv3plus_resnet18", num_classes=3)
    torch.save(source.state_dict(), tmp_path / "v3p.pth")
    model = create_model("deeplabv3plus_resnet18", num_classes=5, pretrained=str(tmp_path / "v3p.pth"))
    assert "classifier.score, which score 3 classes in the file" in model.pretrained_note
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items() if not k.startswith("classifier.score."))

    fcn = create_model("fcn_resnet50", num_classes=21).state_dict()
    narrow = {**fcn, "classifier.4.weight": torch.zeros(21, 128, 1, 1)}
    torch.save(narrow, tmp_path / "narrow.pth")
    with pytest.raises(UserError, match=r"classifier.4.weight has shape \(21, 128, 1, 1\), the model needs"):
        create_model("fcn_resnet50", num_classes=21, pretrained=str(tmp_path / "narrow.pth"))
    half = {**fcn, "classifier.4.weight": torch.zeros(5, 512, 1, 1), "classifier.4.bias": torch.full((21,), 7.0)}
    torch.save(half, tmp_path / "half.pth")
    model = create_model("fcn_resnet50", num_classes=21, pretrained=str(tmp_path / "half.pth"))
    assert "classifier.4, which score 5 classes in the file" in model.pretrained_note
    assert not torch.equal(model.state_dict()["classifier.4.bias"], half["classifier.4.bias"])  # the whole layer fresh
