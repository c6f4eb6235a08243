import numpy as np
import pytest
import torch
import torch.nn as nn

from pixelwise.models.unet import (
    IBN,
    UNet,
    center_crop,
    mirror_pad,
    unet_weight_map,
    valid_input_size,
    valid_output_size,
    valid_tile,
)


def standardise(t, dims):
    """(t - mean) / sqrt(var + 1e-5) over ``dims``: instance norm over (2, 3), batch norm over (0, 2, 3)."""
    return (t - t.mean(dims, keepdim=True)) / torch.sqrt(t.var(dims, unbiased=False, keepdim=True) + 1e-5)


def test_paper_parameter_count():
    # U-Net (arXiv:1505.04597): 31,030,658 for the original network (1 input channel, 2 classes)
    model = UNet(2, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) == 31_030_658


def test_paper_tile_sizes():
    assert valid_output_size(572) == 388  # Fig. 1 of the paper
    assert valid_input_size(388) == 572
    assert valid_output_size(573) is None  # odd size before a pooling


def test_valid_tile_closed_form_is_the_smallest_valid_input():
    for size in range(1, 1200):
        i, o = valid_tile(size)
        assert valid_output_size(i) == o >= size
        assert all(valid_output_size(j) is None or valid_output_size(j) < size for j in range(size, i))


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("size", [(97, 131), (16, 16), (5, 9)])
def test_any_size(padding, size):
    model = UNet(3, base_channels=4, padding=padding).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, 3, *size)


def test_valid_padding_is_translation_consistent():
    # overlap-tile: predicting a crop equals cropping the prediction where context suffices
    torch.manual_seed(0)
    model = UNet(2, base_channels=4, padding="valid", dropout=0).eval()
    x = torch.randn(1, 3, 572, 572)
    with torch.no_grad():
        full = model.forward_features(x)  # 388 x 388, no padding involved
        # a 252 x 252 tile gives 68 x 68; its offsets lie on the 16-px pooling grid
        tile = model.forward_features(x[..., 96:96 + 252, 64:64 + 252])
    assert torch.allclose(full[..., 96:164, 64:132], tile, atol=1e-5)


def test_mirror_pad_matches_numpy_symmetric_reflection():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    got = mirror_pad(x, 5, 6, 7, 2)
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (5, 6), (7, 2)), mode="reflect")
    assert np.array_equal(got.numpy(), ref)
    big = mirror_pad(x, 9, 13, 11, 10)  # pads several times the image: reflection repeats
    assert np.array_equal(big.numpy(), _repeated_reflect(x.numpy(), 9, 13, 11, 10))
    one = torch.tensor([[[[5.0]]]])
    assert torch.equal(mirror_pad(one, 2, 1, 0, 3), torch.full((1, 1, 4, 4), 5.0))


def test_center_crop_takes_the_middle_of_each_side():
    x = torch.arange(8.0 * 9).reshape(1, 1, 8, 9)
    # 8 -> 4 rows drops 2 at each end; 9 -> 3 columns drops 3 at each end
    assert torch.equal(center_crop(x, 4, 3), x[..., 2:6, 3:6])
    assert torch.equal(center_crop(x, 8, 9), x)


def test_valid_forward_is_the_valid_network_on_the_image_mirror_padded_by_92_pixels():
    # overlap-tile (Fig. 2 of the paper): the output pixel (0, 0) sees 92 mirrored pixels above and left of it;
    # any larger valid tile on the same grid gives the same values where the image is
    torch.manual_seed(0)
    model = UNet(2, base_channels=2, padding="valid", dropout=0).eval()
    x = torch.randn(1, 3, 36, 37)
    assert valid_output_size(252) == 68
    with torch.no_grad():
        ref = model.forward_features(mirror_pad(x, 92, 252 - 36 - 92, 92, 252 - 37 - 92))[..., :36, :37]
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [140, 156, 172, 188, 190, 204])
def test_valid_output_size_is_what_the_valid_network_gives_or_none_where_it_cannot_run(size):
    """140-172 px leave a bottom map of 1-3 pixels, which vanishes on the way up: the function gave
    -44, -28, -12 where its docstring promised None and the network raises."""
    model = UNet(2, base_channels=2, padding="valid", dropout=0).eval()
    want = valid_output_size(size)
    with torch.no_grad():
        if want is None and size % 4 == 0:
            with pytest.raises(RuntimeError):
                model.forward_features(torch.zeros(1, 3, size, size))
        elif want is not None:
            assert model.forward_features(torch.zeros(1, 3, size, size)).shape[-2:] == (want, want)
    assert (want is None) == (size in (140, 156, 172, 190))  # 190: a pooling would see an odd side


def test_each_expanding_step_takes_the_cropped_skip_first_then_the_upsampled_map():
    """The paper's Fig. 1 concatenates the cropped feature map of the contracting path with the
    up-convolution's output (the Caffe net's concat: skip first); with equal channel counts a swap
    keeps every shape."""
    torch.manual_seed(0)
    model = UNet(2, base_channels=2, padding="valid", dropout=0).eval()
    seen = {}
    model.down[3].register_forward_hook(lambda m, i, o: seen.update(skip=o))
    model.upconv[0].register_forward_hook(lambda m, i, o: seen.update(up=o))
    model.up[0].register_forward_pre_hook(lambda m, i: seen.update(joined=i[0]))
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 188, 188))
    up = seen["up"]
    assert torch.equal(seen["joined"], torch.cat([center_crop(seen["skip"], *up.shape[-2:]), up], 1))


def _repeated_reflect(a, top, bottom, left, right):
    while top or bottom or left or right:
        h, w = a.shape[-2:]
        t, b, le, r = min(top, h - 1), min(bottom, h - 1), min(left, w - 1), min(right, w - 1)
        a = np.pad(a, ((0, 0), (0, 0), (t, b), (le, r)), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - le, right - r
    return a


def test_gradients_reach_every_parameter():
    model = UNet(3, base_channels=4, batch_norm=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_weight_map_matches_naive_distances():
    h, w = 20, 24
    masks = np.zeros((3, h, w), bool)
    masks[0, 2:8, 2:8] = True
    masks[1, 2:8, 10:16] = True
    masks[2, 12:18, 4:20] = True
    got = unet_weight_map(masks, w0=10, sigma=5, class_weights=np.array([1.0, 2.0]))
    pts = [np.argwhere(m) for m in masks]
    for y in range(h):
        for x in range(w):
            if masks[:, y, x].any():
                assert got[y, x] == pytest.approx(2.0)
                continue
            d = sorted(np.sqrt(((p - [y, x]) ** 2).sum(1)).min() for p in pts)
            assert got[y, x] == pytest.approx(1.0 + 10 * np.exp(-((d[0] + d[1]) ** 2) / 50), rel=1e-5)
    # the gap between two cells is weighted far above the open background
    assert got[4, 9] > 5 and got[19, 0] < 2


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_input_norm_makes_the_output_blind_to_each_images_channel_gains_and_offsets(padding):
    torch.manual_seed(0)
    model = UNet(3, base_channels=4, padding=padding, batch_norm=True, input_norm=True).eval()
    x = torch.randn(2, 3, 40, 44)
    gain, offset = torch.tensor([0.4, 1.7, 3.0]).view(1, 3, 1, 1), torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)
    darker = x * gain + offset
    darker[1] = x[1]  # the second image unchanged: statistics are per image, not per batch
    with torch.no_grad():
        torch.testing.assert_close(model(darker), model(x), atol=1e-3, rtol=1e-3)  # eps 1e-5 of the variance
        plain = UNet(3, base_channels=4, padding=padding, batch_norm=True).eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(darker)[0] - plain(x)[0]).abs().max() > 1e-2  # without it the gains change the logits
        torch.testing.assert_close(model(x), plain(standardise(x, (2, 3))), atol=1e-4, rtol=1e-4)


def test_global_context_lets_every_pixel_see_the_whole_image():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 256)
    far = x.clone()
    far[..., -16:] += 3.0  # a change 240 columns away from the first 16, beyond the receptive field
    with torch.no_grad():
        plain = UNet(3, base_channels=4, batch_norm=True, dropout=0.0).eval()
        assert torch.equal(plain(x)[..., :16], plain(far)[..., :16])
        model = UNet(3, base_channels=4, batch_norm=True, dropout=0.0, global_context=True).eval()
        assert (model(x)[..., :16] - model(far)[..., :16]).abs().max() > 1e-4


def test_global_context_is_parsenets_pooled_feature_concatenated_and_fused():
    torch.manual_seed(0)
    block = UNet(3, base_channels=4, batch_norm=False, dropout=0.0, global_context=True).global_context
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        w_pool, b_pool = block.pool_conv.weight[..., 0, 0], block.pool_conv.bias
        w_fuse, b_fuse = block.fuse[0].weight[..., 0, 0], block.fuse[0].bias
        g = torch.relu(x.mean((2, 3)) @ w_pool.T + b_pool)  # [N, C], one vector per image
        cat = torch.cat([x, g[:, :, None, None].expand(-1, -1, 5, 7)], 1)
        want = torch.relu(torch.einsum("oc,nchw->nohw", w_fuse, cat) + b_fuse[:, None, None])
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)
    assert block(x).shape == x.shape


def test_ibn_instance_normalises_half_the_channels_and_batch_normalises_the_rest():
    torch.manual_seed(0)
    layer = IBN(6).train()
    x = torch.randn(3, 6, 5, 7) * 4 + 2
    y = layer(x)
    per_image, per_batch = standardise(x[:, :3], (2, 3)), standardise(x[:, 3:], (0, 2, 3))
    torch.testing.assert_close(y, torch.cat([per_image, per_batch], 1), atol=1e-5, rtol=1e-5)


def test_ibn_takes_two_channels_one_per_half():
    # the documented minimum: base_channels >= 2, one instance- and one batch-normalised channel
    layer = IBN(2).train()
    x = torch.randn(3, 2, 4, 5) * 3 + 1
    want = torch.cat([standardise(x[:, :1], (2, 3)), standardise(x[:, 1:], (0, 2, 3))], 1)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    model = UNet(3, base_channels=2, batch_norm=True, ibn_levels=1)
    assert isinstance(model.down[0][1], IBN)


def test_ibn_levels_puts_ibn_in_the_first_norm_of_the_first_levels_only():
    model = UNet(3, base_channels=4, batch_norm=True, ibn_levels=2)
    kinds = [[type(m).__name__ for m in block if not isinstance(m, nn.Conv2d | nn.ReLU)] for block in model.down]
    assert kinds[:3] == [["IBN", "BatchNorm2d"], ["IBN", "BatchNorm2d"], ["BatchNorm2d", "BatchNorm2d"]]
    assert not any(isinstance(m, IBN) for m in model.up.modules())
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 3, 32, 48)
    with pytest.raises(ValueError, match="batch_norm"):
        UNet(3, base_channels=4, ibn_levels=1)
    with pytest.raises(ValueError, match="ibn_levels"):
        UNet(3, base_channels=4, batch_norm=True, ibn_levels=6)


@pytest.mark.parametrize("model, kwargs", [("unet", {"base_channels": 4}), ("enet", {})])
def test_a_one_channel_model_trains_and_predicts_on_luminance(model, kwargs, tmp_path):
    import json

    from pixelwise import Predictor
    from pixelwise.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", model, "--model-kwargs", json.dumps({**kwargs, "in_channels": 1}), "--epochs", "1",
            "--dataset-kwargs", '{"num_train": 8, "num_val": 4, "size": 32}', "--batch-size", "4", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0  # the model's first convolution takes one channel: so must the data
    predictor = Predictor.from_checkpoint(out / "best.safetensors")
    assert predictor.input_spec.channels == 1 and predictor.model.in_channels == 1
    rgb = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    assert predictor.predict(rgb).mask.shape == (24, 40)
    # it sees the image's luminance (ITU-R 601, as PIL's "L"), normalised with the contract's one mean/std
    luma = torch.from_numpy(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255
    x = (luma - predictor.input_spec.mean[0]) / predictor.input_spec.std[0]
    with torch.no_grad():
        expected = torch.softmax(predictor.model(x[None, None]), 1)[0]
    torch.testing.assert_close(predictor.predict_probs(rgb), expected, atol=1e-4, rtol=0)


def test_input_norm_is_instance_norm_and_takes_a_one_pixel_image():
    import torch.nn.functional as F

    from pixelwise import create_model
    from pixelwise.layers import standardize_image

    x = torch.randn(2, 3, 17, 9) * 5 + 3
    torch.testing.assert_close(standardize_image(x), F.instance_norm(x), atol=1e-5, rtol=0)
    assert torch.equal(standardize_image(torch.rand(1, 3, 1, 1)), torch.zeros(1, 3, 1, 1))  # instance_norm raises
    for name, kw in (("unet", {"base_channels": 4, "batch_norm": True}), ("enet", {}),
                     ("deeplabv3plus_resnet18", {})):
        model = create_model(name, num_classes=3, input_norm=True, **kw).eval()
        with torch.no_grad():
            assert model(torch.rand(1, 3, 1, 1)).shape == (1, 3, 1, 1), name
