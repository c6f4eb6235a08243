"""DeepLab-LargeFOV (Chen et al., ICLR 2015, arXiv:1412.7062): the paper's parameter count, the
stride-8 grid against Caffe's pooling arithmetic, the exact placement of the upsampled scores,
and ImageNet VGG-16 weights decimated into fc6 / fc7."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise import create_model, load_checkpoint, save_checkpoint
from pixelwise.backbones.vgg import vgg16, vgg16_bn
from pixelwise.errors import UserError
from pixelwise.models.largefov import DeepLabLargeFOV, largefov_features, vgg16_to_largefov


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def caffe_pool(size: int, kernel: int = 3, stride: int = 2, pad: int = 1) -> int:
    """Caffe's PoolingLayer output size: ceil rounding, then the last window must start inside
    the image or its left padding (pooling_layer.cpp)."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


def test_parameter_count_is_the_papers():
    # Table 2 of the paper: DeepLab-LargeFOV, 20.5M parameters (21 VOC classes). By hand: VGG-16's
    # convs 14,714,688 + fc6 3x3x512x1024 + 1024 + fc7 1024x1024 + 1024 + fc8 1024x21 + 21.
    model = create_model("deeplab_largefov", 21)
    assert n_params(model) == 14_714_688 + (9 * 512 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 21 + 21)
    assert n_params(model) == 20_505_429
    # BatchNorm (SegNet's comparison) adds scale and shift after the 13 convs, fc6 and fc7
    bn = create_model("deeplab_largefov", 21, batch_norm=True)
    widths = 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512 + 2 * 1024
    assert n_params(bn) == 20_505_429 + 2 * widths
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 15


def test_the_network_is_vgg16_made_stride_8():
    model = create_model("deeplab_largefov", 3)
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding, p.ceil_mode) for p in pools] == \
        [(3, 2, 1, True)] * 3 + [(3, 1, 1, True)] * 2
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.dilation for c in convs] == [(1, 1)] * 10 + [(2, 2)] * 3
    assert (model.fc6.kernel_size, model.fc6.dilation, model.fc6.out_channels) == ((3, 3), (12, 12), 1024)
    # torchvision's VGG-16 keys, so its ImageNet file loads by name
    assert set(model.features.state_dict()) == set(vgg16().features.state_dict())


@pytest.mark.parametrize("size", [(321, 321), (360, 480), (45, 61), (65, 66), (1, 1), (2, 3), (16, 17), (8, 9)])
def test_scores_sit_on_caffes_grid_and_upsample_onto_their_pixels(size):
    torch.manual_seed(0)
    model = create_model("deeplab_largefov", 4).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        scores, logits = model.scores(x), model(x)
    expected = [caffe_pool(caffe_pool(caffe_pool(n))) for n in size]
    assert list(scores.shape[-2:]) == expected  # 321 -> 41, as the released net's crops
    assert logits.shape == (1, 4, *size)
    h, w = expected
    assert (h - 1) * 8 >= size[0] - 1 and (w - 1) * 8 >= size[1] - 1  # the grid covers every pixel
    # cell (i, j) is centred on pixel (8i, 8j): the logits there are the cell's scores exactly,
    # and half-way between two cells their mean (bilinear, corners aligned)
    rows = [i for i in range(h) if 8 * i < size[0]]
    cols = [j for j in range(w) if 8 * j < size[1]]
    torch.testing.assert_close(logits[..., 8 * torch.tensor(rows)[:, None], 8 * torch.tensor(cols)],
                               scores[..., torch.tensor(rows)[:, None], torch.tensor(cols)], rtol=1e-5, atol=1e-5)
    if size[0] > 4 and h > 1:
        torch.testing.assert_close(logits[..., 4, 0], (scores[..., 0, 0] + scores[..., 1, 0]) / 2,
                                   rtol=1e-5, atol=1e-5)


def test_decimation_of_vgg16_fully_connected_layers():
    torch.manual_seed(0)
    state = vgg16().state_dict()
    out = vgg16_to_largefov(state)
    fc6, fc6_src = out["fc6.weight"], state["classifier.0.weight"]
    assert fc6.shape == (1024, 512, 3, 3)
    for o, c, a, b in [(0, 0, 0, 0), (5, 7, 1, 2), (1023, 511, 2, 2), (300, 100, 2, 0)]:
        # torch flattens fc6's input as (channel, row, column) of the 7x7 pool5 map
        assert fc6[o, c, a, b] == fc6_src[4 * o, c * 49 + (3 * a) * 7 + 3 * b]
    assert torch.equal(out["fc6.bias"], state["classifier.0.bias"][::4])
    fc7, fc7_src = out["fc7.weight"], state["classifier.3.weight"]
    assert fc7.shape == (1024, 1024, 1, 1)
    assert fc7[10, 20, 0, 0] == fc7_src[40, 80] and fc7[1023, 0, 0, 0] == fc7_src[4092, 0]
    assert torch.equal(out["fc7.bias"], state["classifier.3.bias"][::4])
    assert not any(k.startswith("classifier.") for k in out)


@pytest.mark.slow  # two VGG-16s (138M parameters each) saved and read back: 12.6 s
def test_imagenet_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = vgg16()
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    model = create_model("deeplab_largefov", 5, pretrained=str(path))
    assert torch.equal(model.features[28].weight, source.features[28].weight)  # conv5_3, now dilated
    expected = vgg16_to_largefov(source.state_dict())
    assert torch.equal(model.fc6.weight, expected["fc6.weight"]) and torch.equal(model.fc7.bias, expected["fc7.bias"])
    assert model.fc8.weight.shape == (5, 1024) + (1, 1)
    assert 0.008 < model.fc8.weight.std().item() < 0.012 and not model.fc8.bias.any()  # fresh, N(0, 0.01)
    # VGG-16 without BatchNorm into the BatchNorm variant: named, not a list of missing keys
    with pytest.raises(UserError, match="vgg16_bn"):
        create_model("deeplab_largefov", 5, pretrained=str(path), batch_norm=True)
    bn_path = tmp_path / "vgg16_bn.pth"
    torch.save(vgg16_bn().state_dict(), bn_path)
    bn_model = create_model("deeplab_largefov", 5, pretrained=str(bn_path), batch_norm=True)
    assert isinstance(bn_model.bn6, nn.BatchNorm2d) and bn_model.pretrained_note is None


def test_a_file_of_the_convolutions_alone_says_that_fc6_and_fc7_start_fresh(tmp_path):
    source = vgg16()
    path = tmp_path / "features.pth"
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("features.")}, path)
    model = create_model("deeplab_largefov", 3, pretrained=str(path))
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    assert "fc6 and fc7 start fresh" in model.pretrained_note


def test_a_runs_checkpoint_loads_whole(tmp_path):
    torch.manual_seed(0)
    model = create_model("deeplab_largefov", 3).eval()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, {"model": "deeplab_largefov", "num_classes": 3})
    again = create_model("deeplab_largefov", 3, pretrained=str(path)).eval()
    x = torch.randn(1, 3, 33, 40)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, DeepLabLargeFOV) and meta["model"] == "deeplab_largefov"


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = create_model("deeplab_largefov", 3)
    x = torch.randn(1, 3, 40, 40)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    none = create_model("deeplab_largefov", 3, dropout=0.0).train()
    assert torch.equal(none(x), none(x))


def test_defaults_and_initialisation():
    torch.manual_seed(0)
    model = DeepLabLargeFOV(3)
    assert model.drop.p == 0.5 and not model.batch_norm and isinstance(model.bn6, nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in largefov_features())  # plain VGG-16 unless asked
    # fc8: the released net's Gaussian filler (std 0.01), zero bias; fc6 / fc7 He fan-out, zero biases
    assert 0.009 < model.fc8.weight.std().item() < 0.011 and not model.fc8.bias.any()
    fc6_std = math.sqrt(2 / (1024 * 3 * 3))  # fan-out: 1024 outputs x 3x3 taps
    assert abs(model.fc6.weight.std().item() - fc6_std) < 0.01 * fc6_std
    assert abs(model.fc7.weight.std().item() - math.sqrt(2 / 1024)) < 0.02 * math.sqrt(2 / 1024)
    assert not model.fc6.bias.any() and not model.fc7.bias.any() and not model.features[0].bias.any()


def test_scores_are_fc8_of_relu_fc7_of_relu_fc6_in_eval():
    torch.manual_seed(0)
    model = DeepLabLargeFOV(3, batch_norm=True).eval()
    for bn in (model.bn6, model.bn7):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        f = model.features(x)
        h = F.relu(model.bn6(F.conv2d(f, model.fc6.weight, model.fc6.bias, padding=12, dilation=12)))
        h = F.relu(model.bn7(F.conv2d(h, model.fc7.weight, model.fc7.bias)))
        torch.testing.assert_close(model.scores(x), F.conv2d(h, model.fc8.weight, model.fc8.bias))
