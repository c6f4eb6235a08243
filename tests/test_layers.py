"""layers.py against naive references."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pixelwise.layers as layers_module
from pixelwise.layers import (
    UPSAMPLE_MODES,
    BilinearUpsample,
    DecoderStage,
    bilinear_kernel,
    conv_bn,
    conv_bn_relu,
    conv_relu,
    decoder_stages,
    max_unpool,
    standardize_image,
    unpool,
    unpools_by_index,
    upsample_nearest,
    upsample_zeros,
)


def test_bilinear_kernel_matches_caffe_upsample_filt():
    # surgery.upsample_filt(4): factor 2, center 1.5 -> 1D weights [0.25, 0.75, 0.75, 0.25]
    w = bilinear_kernel(3, 2, 4)
    assert w.shape == (3, 2, 4, 4)
    one_d = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[0, 0], one_d[:, None] * one_d[None, :])
    torch.testing.assert_close(w[1, 1], w[0, 0])
    assert w[0, 1].abs().sum() == 0 and w[1, 0].abs().sum() == 0 and w[2].abs().sum() == 0
    # odd size 3: factor 2, center 1 -> [0.5, 1, 0.5]
    odd = bilinear_kernel(1, 1, 3)[0, 0]
    torch.testing.assert_close(odd[1], torch.tensor([0.5, 1.0, 0.5]))


@pytest.mark.parametrize("factor", [2, 3, 4, 8, 32])
def test_bilinear_upsample_equals_interpolate_in_interior(factor):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    up = BilinearUpsample(3, factor)
    y = up(x)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert y.shape == (2, 3, 5 * factor, 7 * factor)
    m = factor  # one input pixel of margin: there interpolate clamps, the transposed conv sees zeros
    torch.testing.assert_close(y[..., m:-m, m:-m], ref[..., m:-m, m:-m], atol=1e-5, rtol=0)
    # and the border does differ (zero padding), so the interior check is not vacuous
    assert (y[..., 0, :] - ref[..., 0, :]).abs().max() > 1e-3


def test_bilinear_upsample_learnable_flag_and_state_dict():
    fixed, learned = BilinearUpsample(4, 2, learnable=False), BilinearUpsample(4, 2)
    assert not fixed.weight.requires_grad and learned.weight.requires_grad
    assert list(fixed.state_dict()) == ["weight"]
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    fixed(x).sum().backward()
    assert fixed.weight.grad is None and x.grad is not None


def test_conv_bn_relu_shapes_and_keys():
    block = conv_bn_relu(3, 8, kernel_size=3, dilation=2)
    assert set(block.state_dict()) >= {"0.weight", "1.weight", "1.running_mean"}
    assert block(torch.randn(2, 3, 9, 11)).shape == (2, 8, 9, 11)
    assert conv_bn_relu(3, 8, stride=2)(torch.randn(1, 3, 10, 10)).shape == (1, 8, 5, 5)


def _naive_unpool(x, idx, size):
    n, c, h, w = x.shape
    out = torch.zeros(n, c, size[0] * size[1])
    for a in range(n):
        for b in range(c):
            for i in range(h):
                for j in range(w):
                    out[a, b, idx[a, b, i, j]] = x[a, b, i, j]
    return out.view(n, c, *size)


@pytest.mark.parametrize("size", [(6, 8), (7, 9)])
def test_max_unpool_puts_values_back_at_argmax(size):
    torch.manual_seed(1)
    pre = torch.randn(2, 3, *size)
    pooled, idx = F.max_pool2d(pre, 2, 2, return_indices=True)
    y = max_unpool(pooled, idx, size)
    assert y.shape == (2, 3, *size)
    torch.testing.assert_close(y, _naive_unpool(pooled, idx, size))
    # every nonzero of the unpooled map equals the pre-pool value there
    nz = y != 0
    torch.testing.assert_close(y[nz], pre[nz])
    with pytest.raises(ValueError):
        max_unpool(pooled, idx[..., :-1], size)


def test_upsample_nearest_and_zeros_against_loops():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4) + 1
    near, zero = upsample_nearest(x, 2), upsample_zeros(x, 2)
    assert near.shape == zero.shape == (1, 2, 6, 8)
    for c in range(2):
        for i in range(6):
            for j in range(8):
                assert near[0, c, i, j] == x[0, c, i // 2, j // 2]
                expect = x[0, c, i // 2, j // 2] if i % 2 == 0 and j % 2 == 0 else 0
                assert zero[0, c, i, j] == expect
    assert upsample_zeros(x, 2, output_size=(5, 7)).shape == (1, 2, 5, 7)
    torch.testing.assert_close(upsample_nearest(x, 3), F.interpolate(x, scale_factor=3, mode="nearest"))
    with pytest.raises(ValueError):
        upsample_zeros(x, 2, output_size=(7, 8))


# --------------------------------------------------------------------------- decoder stages


def test_unpool_puts_values_at_argmax_positions():
    x = torch.tensor([[1.0, 5.0, 2.0, 0.0],
                      [3.0, 4.0, 9.0, 1.0],
                      [8.0, 0.0, 0.0, 6.0],
                      [2.0, 7.0, 3.0, 1.0]])[None, None]
    pooled, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    assert pooled.flatten().tolist() == [5.0, 9.0, 8.0, 6.0]
    expected = torch.tensor([[0.0, 5.0, 0.0, 0.0],
                             [0.0, 0.0, 9.0, 0.0],
                             [8.0, 0.0, 0.0, 6.0],
                             [0.0, 0.0, 0.0, 0.0]])[None, None]
    assert torch.equal(unpool(pooled, idx, (4, 4), "indices"), expected)
    zeros = torch.zeros(4, 4)
    zeros[0::2, 0::2] = pooled[0, 0]
    assert torch.equal(unpool(pooled, idx, (4, 4), "zeros")[0, 0], zeros)
    nearest = pooled[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(unpool(pooled, idx, (4, 4), "nearest")[0, 0], nearest)
    assert torch.allclose(unpool(pooled, idx, (4, 4), "bilinear"),
                          F.interpolate(pooled, size=(4, 4), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="unknown upsampling"):
        unpool(pooled, idx, (4, 4), "cubic")


def test_conv_bn_keys_shapes_and_options():
    block = conv_bn(3, 8, 5)
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert block[0].bias is not None  # the Caffe blocks keep the conv bias
    assert set(block.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                       "1.running_var", "1.num_batches_tracked"}
    assert block(torch.randn(2, 3, 9, 11)).shape == (2, 8, 9, 11)
    assert len(conv_bn(3, 8, relu=False)) == 2
    valid = conv_bn(3, 8, 7, padding=0)
    assert valid(torch.randn(1, 3, 9, 9)).shape == (1, 8, 3, 3)
    back = conv_bn(8, 3, 7, transposed=True, padding=0)
    assert isinstance(back[0], nn.ConvTranspose2d)
    assert back(torch.randn(1, 8, 3, 3)).shape == (1, 3, 9, 9)


def test_decoder_stage_unpools_to_the_pre_pool_size_then_runs_its_blocks():
    torch.manual_seed(0)
    blocks = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    for size, modes in [((8, 10), UPSAMPLE_MODES), ((7, 9), ("indices", "bilinear"))]:  # odd: see unpool
        pre = torch.randn(2, 4, *size)
        pooled, idx = F.max_pool2d(pre, 2, 2, return_indices=True)
        for mode in modes:
            out = DecoderStage(blocks, mode)(pooled, idx, pre.shape[-2:])
            assert out.shape == (2, 6, *size)
            torch.testing.assert_close(out, blocks(unpool(pooled, idx, size, mode)))
    assert set(DecoderStage(blocks).state_dict()) == {"blocks.0.weight", "blocks.0.bias"}
    with pytest.raises(ValueError, match="unknown upsampling"):
        DecoderStage(blocks, "cubic")


def test_decoder_stages_follow_the_layout():
    layout = [[(8, 8, 3), (8, 4, 3)], [(4, 4, 5)]]
    stages = decoder_stages(layout, "zeros", relu=False, transposed=True)
    assert [s.mode for s in stages] == ["zeros", "zeros"]
    convs = [[(b[0].in_channels, b[0].out_channels, b[0].kernel_size[0]) for b in s.blocks] for s in stages]
    assert convs == layout
    assert all(isinstance(b[0], nn.ConvTranspose2d) and len(b) == 2 for s in stages for b in s.blocks)


def test_decoder_stages_default_to_indices_relu_and_plain_convs():
    (stage,) = decoder_stages([[(3, 2, 3)]])
    assert stage.mode == "indices"
    assert [type(m) for m in stage.blocks[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_upsample_nearest_defaults_to_a_factor_of_2():
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    ref = torch.tensor([[0.0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])
    assert torch.equal(upsample_nearest(x)[0, 0], ref)


def test_bilinear_kernel_of_size_1_is_the_identity_and_size_0_is_refused():
    assert torch.equal(bilinear_kernel(2, 2, 1), torch.eye(2).reshape(2, 2, 1, 1))
    up = BilinearUpsample(3, 1)  # factor 1: a 1x1 kernel, the identity
    x = torch.randn(1, 3, 4, 5)
    assert torch.equal(up(x), x)
    with pytest.raises(ValueError, match="kernel_size"):
        bilinear_kernel(2, 2, 0)


def test_every_name_in_all_exists():
    assert set(layers_module.__all__) <= set(dir(layers_module))  # else `from pixelwise.layers import *` raises


def test_standardize_image_is_instance_norm_per_image_and_channel():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 4 + 3
    got = standardize_image(x)
    torch.testing.assert_close(got, F.instance_norm(x, eps=1e-5), rtol=1e-5, atol=1e-5)
    # by hand for one plane: (v - mean) / sqrt(biased var + eps)
    plane = x[1, 2].double()
    want = (plane - plane.mean()) / torch.sqrt(((plane - plane.mean()) ** 2).mean() + 1e-5)
    torch.testing.assert_close(got[1, 2].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(standardize_image(torch.full((1, 3, 1, 1), 7.0)), torch.zeros(1, 3, 1, 1))  # one pixel


def test_conv_relu_keeps_the_size_with_bias_and_dilation():
    for k, d in ((3, 1), (3, 2), (1, 1), (5, 3)):
        block = conv_relu(2, 4, kernel_size=k, dilation=d)
        conv = block[0]
        assert isinstance(conv, nn.Conv2d) and isinstance(block[1], nn.ReLU)
        assert conv.dilation == (d, d) and conv.padding == (d * (k - 1) // 2,) * 2 and conv.bias is not None
        assert block(torch.randn(1, 2, 9, 11)).shape == (1, 4, 9, 11)
    assert conv_relu(2, 4)[0].dilation == (1, 1)  # the default


def test_default_kernels_are_3x3_and_keep_the_size():
    for block in (conv_bn_relu(2, 4), conv_bn(2, 4), conv_relu(2, 4)):
        assert block[0].kernel_size == (3, 3) and block[0].padding == (1, 1)
        assert block(torch.randn(1, 2, 6, 7)).shape == (1, 4, 6, 7)


def test_bilinear_upsample_reset_parameters_restores_the_bilinear_kernel():
    up = BilinearUpsample(2, 4)  # kernel 2*4 - 0 = 8
    assert torch.equal(up.weight, bilinear_kernel(2, 2, 8))
    with torch.no_grad():
        up.weight.normal_()
    up.reset_parameters()  # what a re-initialisation of the whole model calls
    assert torch.equal(up.weight, bilinear_kernel(2, 2, 8))


def test_unpools_by_index_finds_an_index_unpooling_stage_anywhere_in_a_model():
    blocks = nn.Sequential(nn.Conv2d(2, 2, 1))
    assert unpools_by_index(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(DecoderStage(blocks))))
    assert DecoderStage(blocks).unpools_by_index is True
    for mode in ("nearest", "zeros", "bilinear"):
        assert DecoderStage(blocks, mode).unpools_by_index is False
        assert not unpools_by_index(nn.Sequential(nn.Conv2d(2, 2, 1), DecoderStage(blocks, mode)))

    class Flagged(nn.Module):  # ENet's unpooling marks itself with a class attribute
        unpools_by_index = True

    assert unpools_by_index(nn.Sequential(nn.ReLU(), Flagged()))
    assert not unpools_by_index(nn.Conv2d(2, 2, 1))



@pytest.mark.parametrize("mode, fan", [("fan_in", 64 * 9), ("fan_out", 32 * 9)])
def test_init_msra_draws_he_normal_weights_and_zeroes_biases(mode, fan):
    """He et al., "Delving Deep into Rectifiers" (arXiv:1502.01852): std sqrt(2 / fan), for SegNet's
    and DeconvNet's convolutions (fan in) and torchvision's VGG (fan out); PyTorch's own default would
    give std 1 / sqrt(3 * fan_in), less than half of either."""
    from pixelwise.models._utils import init_msra

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 32, 3), nn.BatchNorm2d(32), nn.ConvTranspose2d(32, 64, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)  # whatever was there before
    init_msra(model, mode)
    conv = model[0].weight
    assert conv.std().item() == pytest.approx((2 / fan) ** 0.5, rel=0.05)
    assert abs(conv.mean().item()) < 0.01
    assert not model[0].bias.any() and not model[2].bias.any()
    assert (model[1].weight == 1).all() and not model[1].bias.any()
    # a transposed convolution's fans are its own: weight [in, out, k, k], fan in = out * k * k
    expected = (2 / (64 * 9 if mode == "fan_in" else 32 * 9)) ** 0.5
    assert model[2].weight.std().item() == pytest.approx(expected, rel=0.05)
