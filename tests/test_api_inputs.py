"""The Python API's answers to what a Python user passes by mistake: errors that say what to
pass, rather than a result that is silently wrong or an exception from deep inside."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

import pixelwise
from conftest import write_isbi_tree
from pixelwise.data import build_dataset
from pixelwise.errors import UserError
from pixelwise.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec, check_image, preprocess
from pixelwise.sample import MAX_INPUT_PIXELS


def test_list_models_refuses_an_unknown_task():
    assert set(pixelwise.list_models("semantic")).isdisjoint(pixelwise.list_models("instance"))
    assert sorted(pixelwise.list_models("semantic") + pixelwise.list_models("instance")) == pixelwise.list_models()
    with pytest.raises(ValueError, match="task must be 'semantic' or 'instance'"):
        pixelwise.list_models("bogus")


def test_preprocess_as_exported_takes_the_default_contract():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    torch.testing.assert_close(pixelwise.preprocess(img), pixelwise.preprocess(img, pixelwise.InputSpec()))
    assert pixelwise.preprocess(img).shape == (3, 5, 7)


def test_datasets_index_like_sequences():
    ds = build_dataset("shapes", None, "val", num_train=2, num_val=3)
    assert torch.equal(ds[-1]["mask"], ds[2]["mask"]) and torch.equal(ds[np.int64(1)]["mask"], ds[1]["mask"])
    for bad in (3, -4):
        with pytest.raises(IndexError, match=f"index {bad} out of range for 3"):
            ds[bad]
    with pytest.raises(TypeError, match="indexed by one whole number, got slice"):
        ds[0:2]


def test_isbi_val_count_zero_says_the_val_split_is_empty(tmp_path):
    write_isbi_tree(tmp_path, np.random.default_rng(0), count=4)
    assert len(build_dataset("isbi2012", str(tmp_path), "train", val_count=0)) == 4
    with pytest.raises(UserError, match="val_count=0 leaves the val split empty"):
        build_dataset("isbi2012", str(tmp_path), "val", val_count=0)


def test_pretrained_names_what_a_model_without_published_weights_can_take(tmp_path):
    with pytest.raises(UserError, match="has no published weights to download.*train it from scratch"):
        pixelwise.create_model("unet", 3, base_channels=4, pretrained="imagenet")
    with pytest.raises(UserError, match="is a folder: pass the path of a .safetensors/.pth file in it"):
        pixelwise.create_model("unet", 3, base_channels=4, pretrained=str(tmp_path))
    with pytest.raises(UserError, match="not found: pass the path"):
        pixelwise.create_model("unet", 3, base_channels=4, pretrained=str(tmp_path / "w.safetensors"))


def test_a_meta_of_another_class_count_than_the_model_is_refused_at_predict():
    """SemanticPredictor(model, meta) named and coloured a 3-class model's masks with a 5-class meta."""
    import pixelwise

    model = pixelwise.create_model("unet", 3, base_channels=4).eval()
    image = np.zeros((20, 24, 3), np.uint8)
    wrong = pixelwise.SemanticPredictor(model, {"num_classes": 5, "class_names": list("abcde")})
    for call in (lambda: wrong.predict(image), lambda: wrong.predict_batch([image]),
                 lambda: [list(rows) for rows in wrong.predict_rows([image])]):
        with pytest.raises(UserError, match="the model predicts 3 classes and the metadata names 5"):
            call()
    assert pixelwise.SemanticPredictor(model, {"num_classes": 3}).predict(image).mask.shape == (20, 24)


def test_a_predictor_without_meta_of_a_model_it_cannot_probe_still_predicts():
    """The class-count check refused every image ("the metadata names 0") where the model could not
    be probed with a blank input: such a predictor has no names to check against."""
    import torch.nn as nn

    import pixelwise

    class OneSize(nn.Module):  # takes 20x24 inputs only
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            if tuple(x.shape[-2:]) != (20, 24):
                raise RuntimeError("this model takes 20x24 inputs")
            return self.conv(x)

    predictor = pixelwise.SemanticPredictor(OneSize().eval())
    assert predictor.class_names == []
    assert predictor.palette == [(0, 0, 0)]  # default_palette(1): a colour even without named classes
    assert predictor.predict(np.zeros((20, 24, 3), np.uint8)).mask.shape == (20, 24)


@pytest.mark.parametrize("fields", [
    {"mean": (0.5,)},                      # one mean for a three-channel contract
    {"std": (0.2, 0.2)},
    {"channels": 1},                       # ImageNet's three statistics for one channel
])
def test_input_spec_refuses_statistics_of_another_channel_count(fields):
    with pytest.raises(UserError, match="value\\(s\\) each"):
        InputSpec(**fields)


def test_from_dict_refuses_a_resize_above_the_pixel_cap():
    side = int(MAX_INPUT_PIXELS ** 0.5) + 1  # a square just above the cap: side * side > MAX_INPUT_PIXELS
    contract = {**InputSpec().to_dict(), "resize": [side, side]}
    with pytest.raises(UserError, match="above"):
        InputSpec.from_dict(contract)
    ok = {**InputSpec().to_dict(), "resize": [side - 1, side - 1]}  # (side-1)^2 <= cap
    assert InputSpec.from_dict(ok).resize == (side - 1, side - 1)


def test_one_pixel_images_are_taken_and_empty_ones_refused():
    spec = InputSpec(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    img = np.array([[[255, 0, 51]]], np.uint8)  # 1x1
    assert torch.allclose(preprocess(img, spec), torch.tensor([1.0, 0.0, 0.2]).view(3, 1, 1))
    check_image(np.zeros((1, 5, 3), np.uint8))
    for shape in ((0, 5, 3), (5, 0, 3)):
        with pytest.raises(ValueError, match="H, W >= 1"):
            check_image(np.zeros(shape, np.uint8))


def test_a_float_image_reaching_exactly_one_is_told_to_scale_by_255():
    img = np.linspace(0, 1, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)  # max is exactly 1.0
    with pytest.raises(ValueError, match=r"\(img \* 255\)\.round\(\)\.astype\(np\.uint8\) \(floats in \[0, 1\]\)"):
        check_image(img)


def test_a_one_channel_contract_is_the_itu_601_luminance_and_takes_gray_images():
    """InputSpec(channels=1): the luminance 0.299 R + 0.587 G + 0.114 B (PIL's convert("L")), and a
    gray uint8[H, W] or [H, W, 1] image is the RGB image whose three channels it fills."""
    spec = InputSpec(channels=1, mean=(0.0,), std=(1.0,), normalize=False)
    pure = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)  # 1x4
    got = preprocess(pure, spec)
    assert got.shape == (1, 1, 4)
    torch.testing.assert_close(got[0, 0], torch.tensor([0.299, 0.587, 0.114, 1.0]))
    rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255  # PIL rounds to whole levels
    assert np.abs(preprocess(rgb, spec)[0].numpy() - pil).max() <= 0.5 / 255 + 1e-6
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every level
    want = preprocess(np.repeat(gray[..., None], 3, -1), spec)
    assert torch.equal(preprocess(gray, spec), want) and torch.equal(preprocess(gray[..., None], spec), want)  # exactly
    torch.testing.assert_close(want[0], torch.from_numpy(gray).float() / 255)  # the weights sum to 1


def test_preprocess_with_a_resize_checks_the_image_before_resizing():
    """With a resize, a wrong image is refused by check_image, not resized first: an empty image got
    OpenCV's assertion, a uint8 HWC tensor was taken through numpy without a word."""
    spec = InputSpec(resize=(4, 4))
    with pytest.raises(ValueError, match="H, W >= 1"):
        preprocess(np.zeros((0, 5, 3), np.uint8), spec)
    with pytest.raises(ValueError, match="a tensor"):
        preprocess(torch.zeros((6, 5, 3), dtype=torch.uint8), spec)
    assert preprocess(np.zeros((6, 5, 3), np.uint8), spec).shape == (3, 4, 4)


def test_from_dict_defaults_are_those_of_input_spec():
    """A contract dict without normalize, resize or channels: InputSpec's defaults (3 channels,
    normalised here, native size)."""
    spec = InputSpec.from_dict({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    assert spec == InputSpec()
    assert (spec.channels, spec.normalize, spec.resize) == (3, True, None)


def test_from_dict_pixel_cap_counts_height_times_width_of_a_wide_or_tall_resize():
    """The cap is h * w, not the square of one side (the test above uses squares)."""
    for resize in ([MAX_INPUT_PIXELS // 2 + 1, 2], [2, MAX_INPUT_PIXELS // 2 + 1]):
        with pytest.raises(UserError, match="above"):
            InputSpec.from_dict({**InputSpec().to_dict(), "resize": resize})
    assert InputSpec.from_dict({**InputSpec().to_dict(), "resize": [MAX_INPUT_PIXELS // 2, 2]}).resize == \
        (MAX_INPUT_PIXELS // 2, 2)


def test_a_one_channel_contracts_refusal_names_the_gray_form_it_also_takes():
    with pytest.raises(ValueError, match=re.escape("expects uint8[H, W, 3] (or gray uint8[H, W]) with")):
        check_image(np.zeros((4, 5, 3), np.float32), channels=1)
    with pytest.raises(ValueError, match=re.escape("expects uint8[H, W, 3] with")):
        check_image(np.zeros((4, 5, 3), np.float32))


@pytest.mark.parametrize("fields, words", [
    ({"normalize": "no"}, "input normalize must be True or False, got 'no'"),
    ({"normalize": "false"}, "input normalize must be True or False, got 'false'"),
    ({"normalize": None}, "input normalize must be True or False, got None"),
    ({"channels": True}, "input channels must be 1 or 3, got True"),
])
def test_input_spec_reads_its_fields_as_written_as_from_dict_does(fields, words):
    """InputSpec(normalize="no") normalised the image (a truthy string), as from_dict refuses for a
    file; channels=True made a one-channel contract."""
    with pytest.raises(UserError, match=re.escape(words)):
        InputSpec(**fields)
    assert InputSpec(normalize=np.False_).normalize is False  # numpy's booleans are read as bools
