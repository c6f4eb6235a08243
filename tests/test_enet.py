"""ENet (arXiv:1606.02147): Table 1's layout and parameter count, the downsampling and upsampling
bottlenecks against naive pooling/unpooling, input normalisation, bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise import create_model
from pixelwise.models.enet import Bottleneck, ENet, Upsample, enet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def table1_count(classes: int) -> int:
    """ENet's parameters counted by hand from the paper's Table 1 and block description: convs
    without bias before BatchNorm (2 parameters a channel), PReLU (1 a channel), inner width a
    quarter of a block's input; the 2x2 fullconv has a bias."""
    def conv(cin, cout, kh, kw=None):
        return cin * cout * kh * (kh if kw is None else kw)

    def bn_prelu(c, prelu=True):
        return 2 * c + (c if prelu else 0)

    def bottleneck(c, kind="regular", cout=None):
        cout, i = cout or c, c // 4
        k = 2 if kind == "down" else 1
        middle = conv(i, i, 5, 1) + conv(i, i, 1, 5) if kind == "asym" else conv(i, i, 3)
        return (conv(c, i, k) + bn_prelu(i) + middle + bn_prelu(i) + conv(i, cout, 1) + bn_prelu(cout, False)
                + cout)  # the block's closing PReLU

    def upsample(c, cout):
        i = c // 4
        return (conv(c, cout, 1) + bn_prelu(cout, False) + conv(c, i, 1) + bn_prelu(i) + conv(i, i, 3)
                + bn_prelu(i) + conv(i, cout, 1) + bn_prelu(cout, False) + cout)

    initial = conv(3, 13, 3) + bn_prelu(16)
    stage1 = bottleneck(16, "down", 64) + 4 * bottleneck(64)
    stage23 = 2 * (6 * bottleneck(128) + 2 * bottleneck(128, "asym"))
    decoder = upsample(128, 64) + 2 * bottleneck(64) + upsample(64, 16) + bottleneck(16)
    fullconv = conv(16, classes, 2) + classes
    return initial + stage1 + bottleneck(64, "down", 128) + stage23 + decoder + fullconv


def test_parameter_count_is_table1s():
    assert n_params(enet(11)) == table1_count(11) == 359_786
    assert n_params(enet(19)) == table1_count(19)
    assert abs(n_params(enet(19)) - 0.37e6) / 0.37e6 < 0.03  # the paper's Table 3 rounds ENet to 0.37M
    assert n_params(enet(11, input_norm=True, dropout=0.3)) == 359_786  # neither adds parameters


def test_layout_strides_and_channels():
    model = enet(5).eval()
    shapes = {}
    for name in ("initial", "stage1", "stage3", "stage4", "stage5"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5, 64, 96)
    assert shapes == {"initial": (2, 16, 32, 48), "stage1": (2, 64, 16, 24), "stage3": (2, 128, 8, 12),
                      "stage4": (2, 64, 16, 24), "stage5": (2, 16, 32, 48)}
    dilations = [b.conv[0].dilation[0] for b in model.stage2 if isinstance(b.conv[0], nn.Conv2d)
                 and b.conv[0].kernel_size == (3, 3)]
    assert dilations == [1, 2, 4, 1, 8, 16]  # Table 1: 2.1, 2.2 (dil 2), 2.4 (4), 2.5, 2.6 (8), 2.8 (16)
    assert [b.conv[0].kernel_size for b in model.stage3][2] == (5, 1)  # 3.3 asymmetric 5
    assert model.alignment == 8


def silence_branch(block: nn.Module) -> None:
    """Zero the last BatchNorm of the convolutional branch and make the closing PReLU the identity."""
    nn.init.zeros_(block.expand[1].weight)
    nn.init.zeros_(block.expand[1].bias)
    nn.init.ones_(block.act.weight)


def test_downsampling_bottleneck_main_branch_is_max_pool_padded_with_zero_channels():
    torch.manual_seed(0)
    block = Bottleneck(8, "downsample", cout=20).eval()
    silence_branch(block)
    x = torch.randn(2, 8, 6, 10)
    with torch.no_grad():
        out, indices = block.forward_down(x)
    pooled, ref_indices = F.max_pool2d(x, 2, return_indices=True)
    assert out.shape == (2, 20, 3, 5)
    torch.testing.assert_close(out[:, :8], pooled)
    assert out[:, 8:].abs().max() == 0
    assert torch.equal(indices, ref_indices)


def test_upsampling_bottleneck_puts_values_back_where_the_max_came_from():
    torch.manual_seed(0)
    block = Upsample(8, 8).eval()
    silence_branch(block)
    with torch.no_grad():
        block.main[0].weight.copy_(torch.eye(8).view(8, 8, 1, 1))  # main branch: identity 1x1, BN at its init
    x = torch.randn(1, 8, 6, 10)
    pooled, indices = F.max_pool2d(x, 2, return_indices=True)
    with torch.no_grad():
        out = block(pooled, indices, x.shape[-2:])
    expected = torch.zeros_like(x).flatten(2)
    expected.scatter_(2, indices.flatten(2), pooled.flatten(2))  # naive unpooling
    torch.testing.assert_close(out, expected.view_as(x) / (1 + 1e-5) ** 0.5)  # BN eval: x / sqrt(1 + eps)


def test_input_norm_standardises_each_image_and_ignores_its_channel_offsets():
    # gains are removed too, but only up to instance_norm's eps (1e-5 of the variance), and with index
    # unpooling a 1e-5 change can move a max, and with it a value, by a pixel: offsets are exact
    torch.manual_seed(0)
    model = enet(3, input_norm=True).double().eval()  # float64: no max-pool argmax flips on rounding
    x = torch.randn(2, 3, 40, 44, dtype=torch.float64)
    offset = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x + offset), model(x), atol=1e-9, rtol=1e-9)
        plain = enet(3).double().eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(x + offset) - plain(x)).abs().max() > 1e-2
        mean, std = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True).add(1e-5).sqrt()
        torch.testing.assert_close(model(x), plain((x - mean) / std), atol=1e-6, rtol=1e-6)


def test_spatial_dropout_rates_and_train_mode_randomness():
    model = enet(4, dropout=0.2)
    assert model.stage1[0].dropout.p == pytest.approx(0.02) and model.stage2[0].dropout.p == 0.2
    assert model.stage5.dropout.p == 0.2
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(1)
    a = model.train()(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_in_channels():
    model = create_model("enet", num_classes=2, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 24, 40)).shape == (1, 2, 24, 40)


@pytest.mark.parametrize("kwargs, match", [
    ({"in_channels": 16}, "1-15 input channels"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ENet(3, **kwargs)


def test_bad_block_kinds():
    with pytest.raises(ValueError, match="kind"):
        Bottleneck(16, "dilated")
    with pytest.raises(ValueError, match="downsampling"):
        Bottleneck(16, cout=32)
