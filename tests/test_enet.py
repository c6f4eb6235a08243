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


def test_every_spatial_dropout_follows_the_dropout_argument():
    # stage 1 (bottleneck 1.0 and 1.x) at a tenth of the rate, every later block at the rate itself
    model = enet(4, dropout=0.3)
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout2d)}
    assert len(rates) == 1 + 4 + 1 + 8 + 8 + 1 + 2 + 1 + 1  # one per bottleneck of Table 1
    for name, p in rates.items():
        assert p == pytest.approx(0.03 if name.startswith(("down1.", "stage1.")) else 0.3), name
    assert Bottleneck(64).dropout.p == 0.1 and Upsample(64, 16).dropout.p == 0.1  # the paper's rate by default


def randomise(module: nn.Module) -> None:
    """Random BatchNorm statistics and affine parameters and PReLU slopes, so that each shows."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
        elif isinstance(m, nn.PReLU):
            nn.init.uniform_(m.weight, 0.1, 0.4)


def bn_ref(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    def v(t):
        return t.view(1, -1, 1, 1)
    return (x - v(bn.running_mean)) / (v(bn.running_var) + bn.eps).sqrt() * v(bn.weight) + v(bn.bias)


def prelu_ref(x: torch.Tensor, act: nn.PReLU) -> torch.Tensor:
    return torch.where(x >= 0, x, act.weight.view(1, -1, 1, 1) * x)


def test_bottlenecks_against_a_functional_reference():
    # the paper's Fig. 2b in eval mode: PReLU(main + BN(1x1(PReLU(BN(conv(PReLU(BN(projection(x)))))))))
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 12)

    def project_conv(block, x, stride, conv):
        y = prelu_ref(bn_ref(F.conv2d(x, block.project[0].weight, stride=stride), block.project[1]), block.project[2])
        return conv(y)

    def expand(block, y):
        return bn_ref(F.conv2d(y, block.expand[0].weight), block.expand[1])

    with torch.no_grad():
        for kind, dilation in [("regular", 1), ("regular", 2), ("asymmetric", 1)]:
            block = Bottleneck(16, kind, dilation=dilation).eval()
            randomise(block)
            c = block.conv
            if kind == "asymmetric":  # 5x1 then 1x5, a single BN + PReLU after the pair
                def conv(y, c=c):
                    y = F.conv2d(F.conv2d(y, c[0].weight, padding=(2, 0)), c[1].weight, padding=(0, 2))
                    return prelu_ref(bn_ref(y, c[2]), c[3])
            else:
                def conv(y, c=c, d=dilation):
                    return prelu_ref(bn_ref(F.conv2d(y, c[0].weight, padding=d, dilation=d), c[1]), c[2])
            ref = prelu_ref(x + expand(block, project_conv(block, x, 1, conv)), block.act)
            torch.testing.assert_close(block(x), ref, msg=f"{kind} dilation {dilation}")

        down = Bottleneck(16, "downsample", cout=24).eval()
        randomise(down)
        c = down.conv
        branch = expand(down, project_conv(down, x, 2, lambda y: prelu_ref(bn_ref(F.conv2d(y, c[0].weight, padding=1),
                                                                                 c[1]), c[2])))
        main = torch.cat([F.max_pool2d(x, 2), torch.zeros(2, 8, 4, 6)], dim=1)
        out, _ = down.forward_down(x)
        torch.testing.assert_close(out, prelu_ref(main + branch, down.act))

        up = Upsample(16, 8).eval()
        randomise(up)
        small = torch.randn(2, 16, 4, 6)
        _, indices = F.max_pool2d(torch.randn(2, 8, 8, 12), 2, return_indices=True)
        m = bn_ref(F.conv2d(small, up.main[0].weight), up.main[1])
        unpooled = torch.zeros(2, 8, 8 * 12).scatter_(2, indices.flatten(2), m.flatten(2)).view(2, 8, 8, 12)
        y = prelu_ref(bn_ref(F.conv2d(small, up.project[0].weight), up.project[1]), up.project[2])
        y = F.conv_transpose2d(y, up.conv[0].weight, stride=2, padding=1, output_padding=1)
        y = expand(up, prelu_ref(bn_ref(y, up.conv[1]), up.conv[2]))
        torch.testing.assert_close(up(small, indices, (8, 12)), prelu_ref(unpooled + y, up.act))


def test_forward_is_table1s_chain_of_blocks():
    # initial -> 1.0 -> 1.x -> 2.0 -> 2.x -> 3.x -> 4.0 (unpooling 2.0's indices) -> 4.x -> 5.0 (1.0's) -> 5.1
    # -> fullconv; stages 2 and 3 have the same layout, so only different weights tell their order
    torch.manual_seed(0)
    model = enet(3).eval()
    randomise(model)
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        a = model.initial(x)
        b, i1 = model.down1.forward_down(a)
        c, i2 = model.down2.forward_down(model.stage1(b))
        d = model.stage3(model.stage2(c))
        e = model.stage4(model.up4(d, i2, (8, 10)))
        f = model.stage5(model.up5(e, i1, (16, 20)))
        torch.testing.assert_close(model(x), model.fullconv(f))


def test_prelu_slopes_start_at_a_quarter():
    slopes = [m.weight for m in enet(3).modules() if isinstance(m, nn.PReLU)]
    assert len(slopes) == 1 + 27 * 3  # the initial block's; each bottleneck's projection, middle conv and output
    assert all(torch.all(s == 0.25) for s in slopes)
