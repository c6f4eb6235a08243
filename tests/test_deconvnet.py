"""DeconvNet: the deploy prototxt's parameter count, fc6/fc7 from VGG's classifier, input padding,
and instance-wise inference against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.backbones.vgg import VGG16_CFG, make_features, mirror_channels
from pixelwise.errors import UserError
from pixelwise.layers import decoder_stages
from pixelwise.models.deconvnet import DeconvNet, crop_boxes, deconvnet, instance_wise_predict


@pytest.fixture(scope="module")
def big() -> DeconvNet:
    """The real 251.8M-parameter model, built once (about 1 GB of float32 weights)."""
    torch.manual_seed(0)
    return deconvnet(21).eval()


def tiny(num_classes: int = 3) -> DeconvNet:
    """Same class, two stages of 4/8 channels, fc6 7x7 -> minimum input 28x28."""
    features = make_features((4, "M", 8, "M"), batch_norm=True)
    layout = mirror_channels(features)
    layout[-1].append((4, 4, 3))
    decoder = decoder_stages(layout, "indices", transposed=True)
    return DeconvNet(features, decoder, nn.Conv2d(4, num_classes, 1), fc_channels=6)


# --------------------------------------------------------------------------- architecture


def test_parameter_count_matches_the_deploy_prototxt(big):
    # DeconvNet (arXiv:1505.04366): 251,805,653 computed from DeconvNet_inference_deploy.prototxt (21 classes)
    assert sum(p.numel() for p in big.parameters()) == 251_805_653


def test_layout(big):
    fc6, fc7, dfc6 = big.fc6[0], big.fc7[0], big.deconv_fc6[0]
    assert (fc6.in_channels, fc6.out_channels, fc6.kernel_size, fc6.padding) == (512, 4096, (7, 7), (0, 0))
    assert (fc7.out_channels, fc7.kernel_size) == (4096, (1, 1))
    assert isinstance(dfc6, nn.ConvTranspose2d) and dfc6.kernel_size == (7, 7) and dfc6.out_channels == 512
    deconvs = [m for m in big.decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(deconvs) == 13 and all(isinstance(m, nn.ConvTranspose2d) for m in deconvs)
    assert [m.out_channels for m in deconvs] == [512] * 5 + [256] * 3 + [128] * 2 + [64] * 3
    assert all(stage.mode == "indices" for stage in big.decoder)
    assert big.classifier.kernel_size == (1, 1) and big.classifier.out_channels == 21
    assert big.min_size == 224


def test_weights_start_from_he_initialisation(big):
    # init_msra: He normal (fan-in) on every (transposed) conv, zero biases; PyTorch's default would be
    # uniform with a third of the variance and nonzero biases. deconv_fc6's weight is [4096, 512, 7, 7]:
    # fan-in 512 * 7 * 7 as torch counts it for a transposed conv
    std = big.deconv_fc6[0].weight.std().item()
    assert abs(std - math.sqrt(2 / (512 * 49))) < 0.01 * math.sqrt(2 / (512 * 49))
    biases = [m.bias for m in big.decoder.modules() if isinstance(m, nn.ConvTranspose2d) and m.bias is not None]
    assert not any(b.any() for b in biases + [big.classifier.bias])


def test_any_input_size(big):
    with torch.no_grad():
        out = big(torch.randn(1, 3, 97, 131))
    assert out.shape == (1, 21, 97, 131)
    assert torch.isfinite(out).all()


def test_input_is_zero_padded_to_the_minimum_and_cropped_back():
    torch.manual_seed(0)
    model = tiny().eval()
    assert model.min_size == 28 and model.size_divisor == 4
    x = torch.randn(2, 3, 20, 13)
    with torch.no_grad():
        out = model(x)
        ref = model(F.pad(x, (0, 28 - 13, 0, 28 - 20)))[..., :20, :13]
        wide = model(torch.randn(1, 3, 30, 45))  # pool2 8x12: fc6 slides, deconv_fc6 sums back
    assert out.shape == (2, 3, 20, 13)
    assert torch.allclose(out, ref, atol=1e-6)
    assert wide.shape == (1, 3, 30, 45)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the size checks trace as constants, as said
def test_traced_model_pads_small_inputs_as_the_eager_one():
    # under torch.jit.trace (ONNX export) pad_to_min takes its traced-size path
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(1, 3, 20, 13)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = tiny(4).train()
    x = torch.randn(2, 3, 30, 33)
    F.cross_entropy(model(x), torch.randint(0, 4, (2, 30, 33))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# --------------------------------------------------------------------------- pretrained weights


def test_imagenet_classifier_becomes_fc6_fc7(big, monkeypatch):
    torch.manual_seed(2)
    feats = make_features(VGG16_CFG, batch_norm=True)
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    state["classifier.0.weight"] = torch.randn(4096, 512 * 7 * 7) * 0.01
    state["classifier.0.bias"] = torch.randn(4096)
    state["classifier.3.weight"] = torch.randn(4096, 4096) * 0.01
    state["classifier.3.bias"] = torch.randn(4096)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: state)
    from pixelwise.models.deconvnet import load_pretrained

    load_pretrained(big, "imagenet")
    assert torch.equal(big.features[0].weight, state["features.0.weight"])
    # fc6 as a 7x7 conv on pool5 == VGG's Linear on the flattened pool5
    pool5 = torch.randn(2, 512, 7, 7)
    fc6, fc7 = big.fc6[0], big.fc7[0]
    with torch.no_grad():
        conv = fc6(pool5).flatten(1)
        linear = F.linear(pool5.flatten(1), state["classifier.0.weight"], state["classifier.0.bias"])
        assert torch.allclose(conv, linear, atol=1e-4)
        h = torch.randn(2, 4096)
        linear7 = F.linear(h, state["classifier.3.weight"], state["classifier.3.bias"])
        assert torch.allclose(fc7(h[..., None, None]).flatten(1), linear7, atol=1e-4)

    del state["classifier.3.weight"]
    with pytest.raises(UserError, match="classifier"):
        load_pretrained(big, "imagenet")


# --------------------------------------------------------------------------- instance-wise inference


def test_crop_boxes_enlarges_about_the_centre():
    crops = crop_boxes(torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 4.0, 4.0]]), 1.2, 50, 40)
    # box 1: centre (20, 40), 20x40 -> 24x48: x 8..32, y 16..64 (past the 50-pixel image: kept)
    # box 2: centre (2, 2), 4x4 -> 4.8x4.8: floor(-0.4) = -1, ceil(4.4) = 5
    assert crops.tolist() == [[8, 16, 32, 64], [-1, -1, 5, 5]]


def test_crop_boxes_small_and_outside_boxes():
    boxes = torch.tensor([[10.0, 10.0, 11.0, 11.0],   # 1x1 at scale 1: itself
                          [5.0, 5.0, 5.0, 5.0],       # empty: counted as 1x1, x 1.2 -> 4.4 .. 5.6
                          [60.0, 70.0, 80.0, 90.0],   # past the bottom-right: starts on the last pixel
                          [-30.0, -20.0, -10.0, -5.0]])  # past the top-left: ends after the first
    assert crop_boxes(boxes[:1], 1.0, 50, 40).tolist() == [[10, 10, 11, 11]]
    assert crop_boxes(boxes[1:2], 1.2, 50, 40).tolist() == [[4, 4, 6, 6]]
    assert crop_boxes(boxes[2:], 1.0, 50, 40).tolist() == [[39, 49, 80, 90], [-30, -20, 1, 1]]


def _naive_instance_wise(model, image, boxes, scale, size, background):
    """Per proposal: a full-image score map G_i, zero outside its crop; P = max_i G_i; softmax;
    pixels outside every crop -> background."""
    _, h, w = image.shape
    maps, cover = [], torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale, (y1 - y0) * scale
        a, b = math.floor(cx - bw / 2), math.floor(cy - bh / 2)
        c, d = math.ceil(cx + bw / 2), math.ceil(cy + bh / 2)
        pad = max(0, -a, -b, c - w, d - h)
        padded = F.pad(image, (pad, pad, pad, pad))
        crop = padded[:, b + pad:d + pad, a + pad:c + pad]
        logits = model(F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False))
        g = F.interpolate(logits, size=(d - b, c - a), mode="bilinear", align_corners=False)[0]
        canvas = torch.zeros(g.shape[0], h + 2 * pad, w + 2 * pad)
        canvas[:, b + pad:d + pad, a + pad:c + pad] = g
        maps.append(canvas[:, pad:pad + h, pad:pad + w])
        for yy in range(max(b, 0), min(d, h)):
            for xx in range(max(a, 0), min(c, w)):
                cover[yy, xx] = True
    probs = torch.stack(maps).max(dim=0).values.softmax(dim=0)
    probs[:, ~cover] = 0
    probs[background, ~cover] = 1
    return probs


def test_instance_wise_predict_matches_naive_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    image = torch.randn(3, 40, 60)
    boxes = torch.tensor([[5.0, 4.0, 25.0, 20.0],    # inside
                          [40.0, 25.0, 62.0, 41.0],  # crosses the bottom-right border
                          [10.0, 10.0, 30.0, 30.0]])  # overlaps the first
    with torch.no_grad():
        ref = _naive_instance_wise(model, image, boxes, 1.2, 32, background=0)
    got = instance_wise_predict(model, image, boxes, crop_scale=1.2, input_size=32, batch_size=2)
    assert got.shape == (5, 40, 60)
    assert torch.allclose(got, ref, atol=1e-5)
    uncovered = torch.tensor([0, 59])  # (row 0, col 59) is outside every crop
    assert got[:, uncovered[0], uncovered[1]].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # chunking does not change the result; background index is honoured; dict outputs work
    assert torch.allclose(instance_wise_predict(model, image, boxes, input_size=32, batch_size=8), got)
    assert instance_wise_predict(model, image, boxes, input_size=32, background=3)[3, 0, 59] == 1.0

    class DictModel(nn.Module):
        def forward(self, x):
            return {"out": model(x)}

    assert torch.allclose(instance_wise_predict(DictModel(), image, boxes, input_size=32), got)


def test_instance_wise_predict_rejects_bad_input():
    model = nn.Conv2d(3, 2, 1)
    with pytest.raises(ValueError, match="at least one"):
        instance_wise_predict(model, torch.zeros(3, 8, 8), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="expected image"):
        instance_wise_predict(model, torch.zeros(1, 3, 8, 8), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="crop_scale"):
        instance_wise_predict(model, torch.zeros(3, 8, 8), torch.tensor([[0.0, 0, 4, 4]]), crop_scale=0)
    box = torch.tensor([[0.0, 0, 4, 4]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        instance_wise_predict(model, torch.zeros(3, 8, 8), torch.tensor([[0.0, float("nan"), 4, 4]]))
    with pytest.raises(ValueError, match="reversed"):
        instance_wise_predict(model, torch.zeros(3, 8, 8), torch.tensor([[4.0, 0, 0, 4]]))
    with pytest.raises(ValueError, match="reversed"):  # y1 < y0 only
        instance_wise_predict(model, torch.zeros(3, 8, 8), torch.tensor([[1.0, 4, 5, 2]]))
    with pytest.raises(ValueError, match="background=5 is not a class"):
        instance_wise_predict(model.eval(), torch.zeros(3, 8, 8), box, input_size=8, background=5)
    with pytest.raises(ValueError, match="background=2 is not a class"):  # classes are 0 and 1
        instance_wise_predict(model.eval(), torch.zeros(3, 8, 8), box, input_size=8, background=2)
    with pytest.raises(ValueError, match="background=-1 is not a class"):
        instance_wise_predict(model.eval(), torch.zeros(3, 8, 8), box, input_size=8, background=-1)
