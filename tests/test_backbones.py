"""Backbones: torchvision equivalence (fixtures), encoder contract, weight loading."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_matches, load_fixture
from pixelwise.backbones import (
    FrozenBatchNorm2d,
    IntermediateLayerGetter,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    vgg16,
    vgg16_bn,
)
from pixelwise.backbones.features import FeatureInfo
from pixelwise.backbones.resnet import BasicBlock, Bottleneck, ResNet
from pixelwise.backbones.vgg import VGG, features_info, forward_stages, make_features, mirror_channels
from pixelwise.errors import UserError
from pixelwise.layers import max_unpool

BUILDERS = {"vgg16": vgg16, "vgg16_bn": vgg16_bn, "resnet18": resnet18, "resnet50": resnet50}


def _layout(model):
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_matches_torchvision_fixture(name):
    meta, arrays, state = load_fixture(name)
    with torch.device("meta"):  # skip the random init: every tensor comes from the fixture
        model = BUILDERS[name]().eval()
    assert _layout(model) == [tuple(e) for e in meta["schema"]]
    model.load_state_dict(state, strict=True, assign=True)
    x = torch.from_numpy(arrays["input"])
    with torch.no_grad():
        if name.startswith("vgg"):
            assert_matches(model.features(x), arrays["features"])
            assert_matches(model.forward_features(x).stages[-1], arrays["features"])
        else:
            body = IntermediateLayerGetter(model, {"layer4": "layer4"})
            assert_matches(body(x)["layer4"], arrays["layer4"])
        assert_matches(model(x), arrays["logits"])


def test_parameter_counts_match_torchvision():
    # torchvision's documented num_params for the ImageNet weights
    with torch.device("meta"):
        counts = {f.__name__: sum(p.numel() for p in f().parameters())
                  for f in (vgg16, vgg16_bn, resnet18, resnet34, resnet50, resnet101)}
    assert counts == {"vgg16": 138357544, "vgg16_bn": 138365992, "resnet18": 11689512,
                      "resnet34": 21797672, "resnet50": 25557032, "resnet101": 44549160}


def test_vgg_forward_features_contract_and_indices():
    model = vgg16_bn().eval()
    x = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        plain = model.forward_features(x)
        feats = model.forward_features(x, return_indices=True)
    assert plain.indices == [] and len(feats.indices) == 5
    h, w = 45, 70
    for info, out, idx, size, ref in zip(model.feature_info, feats.stages, feats.indices, feats.sizes,
                                         plain.stages):
        assert tuple(size) == (h, w)
        h, w = h // 2, w // 2
        assert out.shape == (1, info.channels, h, w) and idx.shape == out.shape
        torch.testing.assert_close(out, ref)
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]
    # the indices point at the maxima of the pre-pool map of the last stage
    with torch.no_grad():
        pre = model.features[:-1](x)
    up = max_unpool(feats.stages[-1], feats.indices[-1], feats.sizes[-1])
    assert up.shape == pre.shape
    nz = up != 0
    torch.testing.assert_close(up[nz], pre[nz])


def _mixed_encoder() -> nn.Sequential:
    """Three stages whose pools differ: 2x2/2, 3x3/2 with padding 1, 2x2/2 with ceil_mode."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(6, 5, 1), nn.MaxPool2d(2, 2, ceil_mode=True),
    ).eval()


def _flip(t: torch.Tensor) -> torch.Tensor:
    return t.flip(-1)


@pytest.mark.parametrize("hooked", [False, True])
def test_forward_stages_indices_equal_max_pool_per_stage(hooked):
    """The one index-carrying encoder: per stage, the output and indices are what
    ``F.max_pool2d(..., return_indices=True)`` gives with that pool's own kernel/stride/padding,
    and a hook's output (not the pool's) is what the next stage sees."""
    torch.manual_seed(0)
    enc = _mixed_encoder()
    hooks = [_flip, nn.Identity(), _flip] if hooked else []
    x = torch.randn(2, 3, 23, 30)
    with torch.no_grad():
        got = forward_stages(enc, x, return_indices=True, hooks=hooks)
        plain = forward_stages(enc, x, hooks=hooks)
        # the reference, written out stage by stage
        h0 = enc[0:3](x)
        p1, i1 = F.max_pool2d(h0, 2, 2, return_indices=True)
        s1 = _flip(p1) if hooked else p1
        h1 = enc[4:6](s1)
        p2, i2 = F.max_pool2d(h1, 3, 2, padding=1, return_indices=True)
        s2 = p2
        h2 = enc[7](s2)
        p3, i3 = F.max_pool2d(h2, 2, 2, ceil_mode=True, return_indices=True)
        s3 = _flip(p3) if hooked else p3
    for a, b in zip(got.stages, [s1, s2, s3]):
        assert torch.equal(a, b)
    for a, b in zip(got.indices, [i1, i2, i3]):
        assert a.dtype == torch.int64 and torch.equal(a, b)
    assert [tuple(s) for s in got.sizes] == [(23, 30), (11, 15), (6, 8)]
    assert plain.indices == [] and all(torch.equal(a, b) for a, b in zip(plain.stages, got.stages))
    assert [tuple(s.shape) for s in got.stages] == [(2, 4, 11, 15), (2, 6, 6, 8), (2, 5, 3, 4)]
    # the contract as data: channels and strides of every stage
    info = features_info(enc)
    assert [(f.name, f.channels, f.stride) for f in info] == [("pool1", 4, 2), ("pool2", 6, 4), ("pool3", 5, 8)]


def test_forward_stages_hooks_need_one_per_pool_and_dropout_hooks_act_in_train_mode():
    torch.manual_seed(0)
    enc = make_features((4, "M", 4, "M"), batch_norm=False)
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="2 pools"):
        forward_stages(enc, x, hooks=[nn.Identity()])
    drop = nn.ModuleList([nn.Identity(), nn.Dropout(0.5)])  # a ModuleList works as the hooks
    with torch.no_grad():
        ref = forward_stages(enc, x).stages[-1]
        assert ref.abs().sum() > 0
        assert torch.equal(forward_stages(enc, x, hooks=drop.eval()).stages[-1], ref)
        out = forward_stages(enc, x, hooks=drop.train()).stages[-1]
    # dropout after the last pool: every value is dropped or scaled by 1 / (1 - p)
    assert not torch.equal(out, ref)
    assert ((out == 0) | torch.isclose(out, 2 * ref)).all()


def test_mirror_channels_is_the_encoder_reversed():
    enc = make_features((8, 8, "M", 16, "M", 32, 32, "M"), batch_norm=True)
    assert mirror_channels(enc) == [[(32, 32, 3), (32, 16, 3)], [(16, 8, 3)], [(8, 8, 3)]]
    with pytest.raises(ValueError):
        mirror_channels(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_resnet_dilation_feature_info_matches_outputs():
    for dil, strides in [(None, [2, 4, 8, 16, 32]), ([False, True, True], [2, 4, 8, 8, 8]),
                         ([False, False, True], [2, 4, 8, 16, 16])]:
        model = resnet50(replace_stride_with_dilation=dil).eval()
        assert [f.stride for f in model.feature_info] == strides
        names = {f.name: f.name for f in model.feature_info}
        body = IntermediateLayerGetter(model, names)
        assert "fc" not in body and "avgpool" not in body
        with torch.no_grad():
            out = body(torch.randn(1, 3, 64, 32))
        for f in model.feature_info:
            assert out[f.name].shape == (1, f.channels, 64 // f.stride, -(-32 // f.stride)), f
        assert body.feature_info["layer4"].channels == 2048


def test_feature_info_is_immutable_data():
    """The encoder contract is shared data: a decoder cannot change a backbone's stride or
    channels by assigning to it, and equal infos hash alike (usable as keys, in sets)."""
    info = FeatureInfo("layer4", 512, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.stride = 16
    assert info == FeatureInfo("layer4", 512, 32) and len({info, FeatureInfo("layer4", 512, 32)}) == 1
    assert (info.name, info.channels, info.stride) == ("layer4", 512, 32)


@pytest.mark.parametrize("make", [resnet18, resnet50])
@pytest.mark.parametrize("dilate", [[False, False, True], [False, True, True]])
def test_dilated_resnet_computes_the_undilated_one_on_a_finer_grid(make, dilate):
    """Trading a stride for dilation: with the same weights, the dilated network's stage outputs
    sampled every 2 (or 4) pixels are the undilated network's, to float64 rounding. This holds
    only if every 3x3 conv after the removed stride samples at the new rate and the conv that
    carried the stride at the old one, so it checks where the rates go in both block types
    (torchvision refuses dilation for BasicBlock; ours dilates both of its convs)."""
    torch.manual_seed(0)
    plain = make().double().eval()
    for m in plain.modules():  # statistics away from the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    dilated = make(replace_stride_with_dilation=dilate).double().eval()
    dilated.load_state_dict(plain.state_dict())
    names = {name: name for name in ("layer2", "layer3", "layer4")}
    x = torch.randn(1, 3, 100, 68, dtype=torch.float64)  # odd sizes on the way down
    with torch.no_grad():
        a = IntermediateLayerGetter(plain, names)(x)
        b = IntermediateLayerGetter(dilated, names)(x)
    for before, after in zip(plain.feature_info[2:], dilated.feature_info[2:], strict=True):
        step = before.stride // after.stride
        torch.testing.assert_close(b[after.name][..., ::step, ::step], a[before.name], rtol=1e-9, atol=1e-9)
    stride = dilated.feature_info[4].stride
    assert b["layer4"].shape[-2:] == (-(-100 // stride), -(-68 // stride))
    if make is resnet18:
        rate = 2 if dilate == [False, False, True] else 4
        assert [block.conv2.dilation[0] for block in dilated.layer4] == [rate, rate]
        assert [block.conv1.dilation[0] for block in dilated.layer4] == [rate // 2, rate]
        with pytest.raises(ValueError, match="multi_grid .* Bottleneck"):
            ResNet(BasicBlock, (2, 2, 2, 2), multi_grid=(1, 2))


def test_blocks_built_alone_default_to_stride_one_and_rate_one():
    """torchvision's defaults for a block built directly (the classes are public): stride 1, every
    3x3 conv at rate 1 with padding 1, so a block keeps the size and computes a plain 3x3 conv."""
    torch.manual_seed(0)
    bottleneck, basic = Bottleneck(16, 4).eval(), BasicBlock(8, 8).eval()
    for conv in (bottleneck.conv2, basic.conv1, basic.conv2):
        assert (conv.stride, conv.dilation, conv.padding) == ((1, 1), (1, 1), (1, 1))
    x = torch.randn(1, 16, 7, 9)
    with torch.no_grad():
        h = bottleneck.relu(bottleneck.bn1(bottleneck.conv1(x)))
        ref = F.conv2d(h, bottleneck.conv2.weight, padding=1)  # an undilated 3x3 conv, written out
        torch.testing.assert_close(bottleneck.conv2(h), ref)
        assert bottleneck(x).shape == x.shape


def test_vgg_init_is_torchvisions():
    """VGG's own initialisation (torchvision's): Linear weights N(0, 0.01), convs Kaiming normal
    (fan_out, ReLU gain), every bias 0, BatchNorm the identity. Built on the meta device and given
    small layers, so that no 100M-weight classifier is drawn."""
    with torch.device("meta"):
        model = VGG(make_features((32, "M"), batch_norm=True), num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
    model.to_empty(device="cpu")
    for t in model.state_dict().values():
        t.fill_(5.0)  # whatever the init leaves alone stays 5
    torch.manual_seed(0)
    model._init_weights()
    for linear in (model.classifier[0], model.classifier[2]):
        w = linear.weight
        assert abs(w.mean().item()) < 2e-3 and 0.0095 < w.std().item() < 0.0105
        assert not linear.bias.any()
    conv, bn = model.features[0], model.features[1]
    fan_out_std = (2.0 / (32 * 3 * 3)) ** 0.5
    assert abs(conv.weight.mean().item()) < 0.02 and 0.9 < conv.weight.std().item() / fan_out_std < 1.1
    assert not conv.bias.any()
    assert torch.equal(bn.weight, torch.ones(32)) and not bn.bias.any()

def test_vgg_built_directly_defaults_to_imagenets_1000_classes():
    """``VGG(features)`` without ``num_classes`` is torchvision's ImageNet classifier (the builders
    pass the count, so only a direct build reads the default). On the meta device: no weights drawn."""
    with torch.device("meta"):
        model = VGG(make_features((8, "M"), batch_norm=False))
    assert [m.out_features for m in model.classifier if isinstance(m, nn.Linear)] == [4096, 4096, 1000]


def test_intermediate_layer_getter_keys_and_order():
    model = resnet18()
    body = IntermediateLayerGetter(model, {"layer3": "aux", "layer1": "low"})
    assert list(body) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    assert set(body.state_dict()) == {k for k in model.state_dict() if k.startswith(tuple(body))}
    out = body(torch.randn(1, 3, 32, 32))
    assert list(out) == ["low", "aux"]
    with pytest.raises(ValueError):
        IntermediateLayerGetter(model, {"layer9": "x"})


def test_frozen_batchnorm_equals_eval_batchnorm_and_ignores_num_batches_tracked():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(6)
    assert frozen.load_state_dict(bn.state_dict(), strict=True)  # has num_batches_tracked
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(frozen(x), bn.eval()(x))

    ref = resnet50().state_dict()
    model = resnet50(norm_layer=FrozenBatchNorm2d)
    model.load_state_dict(ref, strict=True)  # with num_batches_tracked
    no_nbt = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(no_nbt, strict=True)  # without
    resnet50().load_state_dict(no_nbt, strict=True)  # plain BatchNorm tolerates it too


def test_imagenet_download_path_uses_torch_hub(monkeypatch, tmp_path):
    ref = resnet18()
    calls = []

    def fake_download(url, progress=True, map_location=None, weights_only=False, **kw):
        calls.append((url, weights_only))
        return ref.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = resnet18(pretrained="imagenet")
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", True)]
    torch.testing.assert_close(model.state_dict(), ref.state_dict())
    # another number of classes keeps everything but the classifier
    model10 = resnet18(num_classes=10, pretrained="imagenet")
    torch.testing.assert_close(model10.layer4.state_dict(), ref.layer4.state_dict())
    assert model10.fc.weight.shape == (10, 512)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_files(tmp_path, suffix):
    ref = resnet18()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": ref.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = resnet18(pretrained=str(path))
    torch.testing.assert_close(model.state_dict(), ref.state_dict())


def test_bad_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resnet18(pretrained=str(tmp_path / "missing.pth"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match="format"):
        resnet18(pretrained=str(tmp_path / "w.txt"))
    torch.save(resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match="do not fit"):
        resnet18(pretrained=str(tmp_path / "r34.pth"))
    bad = resnet18().state_dict()
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="conv1.weight has shape"):
        resnet18(pretrained=str(tmp_path / "bad.pth"))


def test_a_damaged_cached_weights_file_is_named_and_nothing_is_printed(tmp_path, monkeypatch, capsys):
    """torch.hub reads a cached file without checking it again: an empty one was a raw EOFError, a
    truncated one 'could not download' (nothing was downloaded) on every later run. The cached file
    is named, with the fix; and torch's 'Downloading:' line (on stdout) no longer goes out."""
    from pixelwise.errors import UserError
    from pixelwise.weights import download_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    for damage in (b"", b"<html>not found</html>", b"PK\x03\x04" + bytes(100)):
        cached.write_bytes(damage)
        with pytest.raises(UserError, match=rf"the cached weights file {cached} could not be read .* delete it"):
            download_weights("https://download.pytorch.org/models/resnet18-f37072fd.pth")
    cached.unlink()  # not cached: an unreachable server is a failed download, in one line on stderr only
    with pytest.raises(UserError, match="could not download weights from http://127.0.0.1:9/"):
        download_weights("http://127.0.0.1:9/models/resnet18-f37072fd.pth")
    assert capsys.readouterr().out == ""
