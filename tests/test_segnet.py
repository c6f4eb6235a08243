"""SegNet, SegNet-Basic and Bayesian SegNet: paper parameter counts, index unpooling, MC dropout."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.backbones.vgg import URLS, VGG16_CFG, make_features, mirror_channels
from pixelwise.errors import UserError
from pixelwise.inference.mc_dropout import dropout_layers, has_dropout, mc_dropout, predictive_entropy
from pixelwise.layers import UPSAMPLE_MODES, DecoderStage, decoder_stages
from pixelwise.models.registry import create_model
from pixelwise.models.segnet import SegNet, bayesian_segnet, segnet, segnet_basic


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- architecture


def test_parameter_counts_match_the_caffe_prototxts():
    # SegNet prototxts (arXiv:1511.00561): 29,449,355 (segnet_train.prototxt, 11 classes) and 1,416,587 (SegNet-Basic)
    assert n_params(segnet(11)) == 29_449_355
    assert n_params(bayesian_segnet(11)) == 29_449_355  # dropout adds no parameters
    assert n_params(segnet_basic(11)) == 1_416_587
    # one more class = one more 3x3x64 filter + bias in conv1_1_D
    assert n_params(segnet(12)) == 29_449_355 + 64 * 9 + 1


def test_segnet_layout_mirrors_vgg16_bn():
    model = segnet(11)
    enc = [(m.in_channels, m.out_channels) for m in model.features if isinstance(m, nn.Conv2d)]
    dec = [(m.in_channels, m.out_channels) for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(enc) == 13 and len(dec) == 12
    assert dec == [(o, i) for i, o in enc[::-1]][:-1]
    assert (model.classifier.in_channels, model.classifier.out_channels) == (64, 11)
    assert model.classifier.kernel_size == (3, 3)
    # state-dict keys of the encoder are torchvision's vgg16_bn "features.*" keys
    tv_keys = {f"features.{k}" for k in make_features(VGG16_CFG, batch_norm=True).state_dict()}
    assert tv_keys <= set(model.state_dict())


def test_segnet_basic_layout():
    model = segnet_basic(11)
    assert isinstance(model.features[0], nn.LocalResponseNorm)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size for m in convs] == [(7, 7)] * 8 + [(1, 1)]
    assert not any(isinstance(m, nn.ReLU) for m in model.decoder.modules())  # as in the prototxt
    assert sum(isinstance(m, nn.ReLU) for m in model.features) == 4
    assert not isinstance(segnet_basic(11, lrn=False).features[0], nn.LocalResponseNorm)


@pytest.mark.parametrize("size", [(97, 131), (32, 32), (17, 5)])
def test_segnet_basic_any_size(size):
    model = segnet_basic(7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 7, *size)
    assert torch.isfinite(out).all()


def test_segnet_odd_size():
    model = segnet(12).eval()
    seen = []
    model.classifier.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 97, 131))
        # the classifier is Caffe's conv1_1_D (3x3, pad 1) on the map padded to 128 x 160: each logit is the
        # filter centred on its own pixel, none shifted or zero-filled by the crop back to 97 x 131
        want = F.conv2d(seen[0], model.classifier.weight, model.classifier.bias, padding=1)[..., :97, :131]
    assert out.shape == (1, 12, 97, 131)
    assert torch.isfinite(out).all()
    assert seen[0].shape[-2:] == (128, 160)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_segnet_basic_lrn_is_the_prototxts_local_size_5_alpha_1e4_beta_075():
    # b_c = a_c / (1 + alpha / n * sum of a^2 over the n = 5 channels centred on c) ** beta, as Caffe's LRN
    lrn = segnet_basic(3).features[0]
    x = torch.rand(1, 8, 3, 4) * 30  # large enough that alpha matters
    sq = F.pad(x**2, (0, 0, 0, 0, 2, 2))
    want = x / (1.0 + 1e-4 / 5 * sum(sq[:, i : i + 8] for i in range(5))) ** 0.75
    torch.testing.assert_close(lrn(x), want, rtol=1e-5, atol=1e-6)
    assert (want - x).abs().max() > 0.1


def test_segnet_dropout_without_dropout_stages_adds_no_dropout():
    # dropout_stages defaults to 0: a rate alone puts no dropout anywhere
    features = make_features((8, "M", 16, "M"), batch_norm=True)
    model = SegNet(features, decoder_stages(mirror_channels(features), "indices"), nn.Conv2d(8, 3, 3, padding=1),
                   dropout=0.5)
    assert not has_dropout(model)


# --------------------------------------------------------------------------- unpooling


def test_segnet_routes_each_stage_through_its_own_indices():
    """Two pools and two identity decoder stages: the output must be the input kept only at the
    argmax of each 4x4 block (pool1's indices undo pool1, pool2's undo pool2)."""
    torch.manual_seed(0)
    empty = nn.Sequential()
    model = SegNet(nn.Sequential(nn.MaxPool2d(2, 2), nn.MaxPool2d(2, 2)),
                   [DecoderStage(empty), DecoderStage(empty)], nn.Identity())
    x = torch.rand(2, 3, 8, 12) + 0.1  # positive: the zero padding never wins a max
    out = model(x)
    expected = torch.zeros_like(x)
    for n in range(2):
        for c in range(3):
            for by in range(0, 8, 4):
                for bx in range(0, 12, 4):
                    block = x[n, c, by:by + 4, bx:bx + 4]
                    k = int(block.argmax())
                    expected[n, c, by + k // 4, bx + k % 4] = block.max()
    assert torch.equal(out, expected)
    # odd sizes: padded to a multiple of 4 and cropped back, argmax positions still exact
    out = model(x[..., :7, :11])
    assert out.shape == (2, 3, 7, 11)
    assert torch.equal(out.count_nonzero(dim=(-2, -1)), torch.full((2, 3), 6))


@pytest.mark.parametrize("mode", UPSAMPLE_MODES)
def test_decoder_upsample_variants(mode):
    torch.manual_seed(0)
    model = segnet_basic(5, decoder_upsample=mode).eval()
    assert all(stage.mode == mode for stage in model.decoder)
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        out = model(x)
        model.decoder[0].mode = "indices" if mode != "indices" else "nearest"
        other = model(x)
    assert out.shape == (1, 5, 37, 45)
    assert not torch.allclose(out, other)  # the upsampling really is in the forward path


def test_bad_decoder_upsample_raises():
    with pytest.raises(ValueError, match="unknown upsampling"):
        segnet_basic(5, decoder_upsample="transposed")


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("builder", [segnet, segnet_basic])  # bayesian_segnet: same parameters
def test_gradients_reach_every_parameter(builder):
    torch.manual_seed(0)
    model = builder(4).train()
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 4, (2, 32, 32))
    F.cross_entropy(model(x), target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# --------------------------------------------------------------------------- pretrained weights


def _fake_vgg16_bn_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    feats = make_features(VGG16_CFG, batch_norm=True)
    for p in feats.parameters():
        nn.init.normal_(p)
    return {f"features.{k}": v for k, v in feats.state_dict().items()}


def test_imagenet_weights_load_into_the_encoder(monkeypatch):
    state = _fake_vgg16_bn_state()
    calls = []

    def fake_download(url, **kwargs):
        calls.append(url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = segnet(11, pretrained="imagenet")
    assert calls == [URLS["vgg16_bn"]]
    for k, v in model.features.state_dict().items():
        assert torch.equal(v, state[f"features.{k}"]), k


def test_pretrained_file_of_the_wrong_architecture_is_a_user_error(tmp_path):
    plain = make_features(VGG16_CFG, batch_norm=False)  # vgg16 without BN: other keys
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in plain.state_dict().items()}, path)
    with pytest.raises(UserError):
        segnet(11, pretrained=str(path))
    with pytest.raises(UserError, match="no published weights to download"):
        segnet_basic(11, pretrained="imagenet")


def test_segnet_basic_fine_tunes_from_a_runs_checkpoint(tmp_path):
    """segnet_basic refused every pretrained path, so a run's last.safetensors (which train's
    messages suggest) could not start a fine-tune."""
    from pixelwise import save_checkpoint

    source = segnet_basic(5)
    save_checkpoint(tmp_path / "last.safetensors", source, {"model": "segnet_basic", "num_classes": 5})
    model = segnet_basic(5, pretrained=str(tmp_path / "last.safetensors"))
    for k, v in source.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


# --------------------------------------------------------------------------- MC dropout


@pytest.fixture(scope="module")
def bayes():
    """A small SegNet with BN and dropout (the real one is too slow to sample in a unit test)."""
    torch.manual_seed(0)
    features = make_features((8, "M", 16, "M", 16, "M"), batch_norm=True)
    decoder = decoder_stages(mirror_channels(features), "indices")
    model = SegNet(features, decoder, nn.Conv2d(8, 3, 3, padding=1), dropout=0.5, dropout_stages=2)
    with torch.no_grad():  # give BN some non-trivial running statistics
        model.train()
        model(torch.randn(4, 3, 32, 32))
    return model.eval()


def test_dropout_sits_where_the_bayesian_prototxt_puts_it():
    model = bayesian_segnet(3)
    enc = [isinstance(m, nn.Dropout) for m in model.encoder_dropout]
    dec = [isinstance(m, nn.Dropout) for m in model.decoder_dropout]
    assert enc == [False, False, True, True, True]  # encdrop3, encdrop4, encdrop5
    assert dec == [True, True, True, False, False]  # decdrop5, decdrop4, decdrop3
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, nn.Dropout) for m in segnet(3).modules())


def test_mc_predict_samples_while_eval_is_deterministic(bayes):
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(bayes(x), bayes(x))
    torch.manual_seed(1)
    mean1, unc1 = mc_dropout(bayes, x, samples=3)
    torch.manual_seed(2)
    mean2, unc2 = mc_dropout(bayes, x, samples=3)
    torch.manual_seed(1)
    mean1b, _ = mc_dropout(bayes, x, samples=3)
    assert mean1.shape == (2, 3, 32, 40) and unc1.shape == (2, 32, 40)
    assert not torch.allclose(mean1, mean2)
    assert torch.equal(mean1, mean1b)
    assert torch.allclose(mean1.sum(1), torch.ones(2, 32, 40), atol=1e-5)
    assert (unc1 >= 0).all() and unc1.max() > 0


@pytest.mark.parametrize("images, samples, words", [
    (None, 2.5, "samples must be a whole number from 1 to 1,000, got 2.5"),
    (None, 10**6, "samples must be a whole number from 1 to 1,000"),  # ran for days, where predict caps it
    (None, True, "got True"),
    ("numpy", 2, "images must be a float Tensor[N, C, H, W], preprocessed"),
    ("chw", 2, "got torch.float32 Tensor[3, 32, 40]"),
    ("uint8", 2, "got torch.uint8 Tensor[1, 3, 32, 40]"),
])
def test_mc_dropout_refuses_what_it_cannot_sample_in_its_own_words(bayes, images, samples, words):
    """Wrong input reached torch (AttributeError: 'str' object has no attribute 'type' for a numpy
    array, conv shape and dtype errors), and samples had no bound."""
    import numpy as np

    x = {None: torch.randn(1, 3, 32, 40), "numpy": np.zeros((1, 3, 32, 40), np.float32),
         "chw": torch.randn(3, 32, 40), "uint8": torch.zeros(1, 3, 32, 40, dtype=torch.uint8)}[images]
    with pytest.raises(ValueError, match=re.escape(words)):
        mc_dropout(bayes, x, samples=samples)


def test_mc_predict_matches_a_manual_sampling_loop_and_restores_modes(bayes):
    x = torch.randn(1, 3, 32, 32)
    bayes.train()
    bayes.decoder[1].eval()  # a mixed state that must come back exactly
    before = [m.training for m in bayes.modules()]
    bn = bayes.features[1]
    stats = bn.running_mean.clone()
    torch.manual_seed(5)
    mean, var_unc = mc_dropout(bayes, x, samples=4)
    assert [m.training for m in bayes.modules()] == before
    assert torch.equal(bn.running_mean, stats)  # BN ran in eval mode: statistics untouched

    bayes.eval()
    for m in bayes.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    torch.manual_seed(5)
    with torch.no_grad():
        probs = torch.stack([bayes(x).softmax(1) for _ in range(4)])
    bayes.eval()
    assert torch.allclose(mean, probs.mean(0), atol=1e-6)
    assert torch.allclose(var_unc, probs.var(0, unbiased=False).mean(1), atol=1e-6)

    torch.manual_seed(5)
    mean_e, entropy = mc_dropout(bayes, x, samples=4, measure="entropy")
    assert torch.allclose(entropy, -(mean_e * mean_e.log()).sum(1), atol=1e-5)
    assert (entropy <= torch.log(torch.tensor(3.0)) + 1e-5).all()


def test_mc_predict_restores_modes_on_error_and_rejects_models_without_dropout(bayes):
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            raise RuntimeError("boom")

    broken = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        mc_dropout(broken, torch.randn(1, 3, 4, 4))
    assert broken.training and broken.bn.training and broken.drop.training
    with pytest.raises(UserError, match="no dropout"):
        mc_dropout(segnet_basic(3), torch.randn(1, 3, 16, 16))


def test_mc_dropout_rejects_an_unknown_measure(bayes):
    with pytest.raises(ValueError, match=re.escape("measure must be 'variance' or 'entropy', got 'std'")):
        mc_dropout(bayes, torch.randn(1, 3, 16, 16), samples=1, measure="std")


def test_dropout_at_rate_zero_is_no_dropout_to_sample():
    # nn.Dropout(0.0) never drops: its samples would all be equal, so it does not count
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Dropout(0.0), nn.Dropout2d(0.0)).eval()
    assert dropout_layers(model) == [] and not has_dropout(model)
    with pytest.raises(UserError, match="no dropout"):
        mc_dropout(model, torch.randn(1, 3, 4, 4))
    kept = nn.Sequential(nn.Dropout(0.0), nn.Dropout(0.1))
    assert dropout_layers(kept) == [kept[1]]


def test_predictive_entropy_sums_over_the_class_dimension_by_default():
    # [N=1, K=4, H=2, W=3]: pixel (0, 0) uniform (log 4 nats), (1, 2) two classes at 1/2 (log 2), the rest one-hot (0)
    probs = torch.zeros(1, 4, 2, 3)
    probs[0, 0] = 1.0
    probs[0, :, 0, 0] = 0.25
    probs[0, :, 1, 2] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    want = torch.zeros(1, 2, 3)
    want[0, 0, 0], want[0, 1, 2] = torch.log(torch.tensor(4.0)), torch.log(torch.tensor(2.0))
    torch.testing.assert_close(predictive_entropy(probs), want)


def test_mc_predict_accepts_dict_outputs():
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return {"out": self.drop(self.conv(x)), "aux": x}

    mean, unc = mc_dropout(DictModel(), torch.randn(2, 3, 5, 6), samples=2)
    assert mean.shape == (2, 4, 5, 6) and unc.shape == (2, 5, 6)


# --------------------------------------------------------------------------- export


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_export_keeps_height_and_width_dynamic_and_trace_works_at_its_size():
    torch.manual_seed(0)
    features = make_features((4, "M", 8, "M", 8, "M"), batch_norm=True)
    model = SegNet(features, decoder_stages(mirror_channels(features), "indices"), nn.Conv2d(4, 3, 3, padding=1))
    model.eval()
    x = torch.randn(1, 3, 37, 45)
    dim = torch.export.Dim.AUTO
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {2: dim, 3: dim}}).module()
    with torch.no_grad():
        for size in [(37, 45), (64, 96), (25, 70)]:  # padded and unpadded sizes, one program
            y = torch.randn(1, 3, *size)
            assert torch.allclose(program(y), model(y), atol=1e-5)
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name, kwargs", [("segnet", {}), ("bayesian_segnet", {}), ("deconvnet", {"fc_channels": 16})])
def test_a_checkpoint_of_the_whole_net_loads_whole_as_pretrained(tmp_path, name, kwargs):
    """train suggests --pretrained <run>/last.safetensors to start anew from a run: SegNet took only
    the encoder of it (the decoder and classifier fresh: 21% of pixels as the source), DeconvNet
    refused it for lacking VGG's classifier. A file of the whole net loads whole."""
    from pixelwise import create_model, save_checkpoint

    torch.manual_seed(0)
    source = create_model(name, num_classes=3, **kwargs).eval()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, source, {"model": name, "num_classes": 3, "model_kwargs": kwargs})
    loaded = create_model(name, num_classes=3, pretrained=str(path), **kwargs).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_plain_vgg16_file_for_segnet_says_which_file_it_needs(tmp_path):
    """SegNet's encoder is VGG16-BN: torchvision's plain VGG-16 file gave 'weight 7.weight has shape
    (128, 128, 3, 3)', a key stripped of its prefix, with no word of BatchNorm."""
    from pixelwise.backbones.vgg import make_features

    plain = tmp_path / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in make_features(VGG16_CFG, batch_norm=False).state_dict().items()}, plain)
    with pytest.raises(UserError, match=r"holds VGG-16 without BatchNorm.*give vgg16_bn-6c64b313.pth"):
        segnet(3, pretrained=str(plain))


@pytest.mark.parametrize("name, convs", [("segnet", 12), ("deconvnet", 13)])
def test_every_decoder_convolution_is_followed_by_batchnorm_and_relu(name, convs):
    """SegNet's decoder convolutions (Badrinarayanan et al., Fig. 2) and DeconvNet's deconvolutions
    (Noh et al., Table 1) each have batch normalisation and a ReLU: counted on the meta device."""
    with torch.device("meta"):
        decoder = create_model(name, num_classes=5).decoder
    kinds = [type(m) for m in decoder.modules()]
    layers = sum(k in (nn.Conv2d, nn.ConvTranspose2d) for k in kinds)
    assert layers == convs and kinds.count(nn.BatchNorm2d) == convs and kinds.count(nn.ReLU) == convs
