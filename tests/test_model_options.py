"""Model options are checked when the model is built (probe4_models.md sections 1-7): a value out
of range is a one-line ModelOptionError naming the option and its range, from ``create_model`` and
from ``pixelwise train --model-kwargs`` (exit 2), never a traceback at the first forward pass or
a silently useless model. And Mask R-CNN refuses images it would turn into garbage."""

from __future__ import annotations

import warnings

import pytest
import torch

from pixelwise import create_model
from pixelwise.cli import main
from pixelwise.models import list_models
from pixelwise.models._checks import dropout_rate, fraction, number_in, numbers_of, whole_number
from pixelwise.models.maskrcnn import RoIHeadsConfig, RPNConfig, TransformConfig, split_kwargs
from pixelwise.models.maskrcnn.transform import RCNNTransform, normalize_image
from pixelwise.models.registry import ModelOptionError, check_model_kwargs, model_options

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def refused(name: str, message: str, num_classes: int = 3, **kwargs) -> None:
    """``create_model(name, num_classes, **kwargs)`` (on the meta device: no memory, no weights)
    raises a one-line ModelOptionError holding ``message``, and so does ``check_model_kwargs``."""
    with pytest.raises(ModelOptionError) as caught, torch.device("meta"):
        create_model(name, num_classes, **kwargs)
    text = str(caught.value)
    assert "\n" not in text and message in text and text.startswith(f"model {name!r}: "), text
    if num_classes == 3:
        with pytest.raises(ModelOptionError, match="--model-kwargs: "):
            check_model_kwargs(name, kwargs, "--model-kwargs")


@pytest.fixture(scope="module")
def tiny_maskrcnn():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model("maskrcnn_resnet18_fpn", 3, min_size=64, max_size=96)


def one_target(h: int = 40, w: int = 40) -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, 5:30, 5:30] = 1
    return [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}]


# --- 1. Mask R-CNN images ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_maskrcnn_refuses_images_that_are_not_float(tiny_maskrcnn, dtype):
    """uint8 used to be normalised with a mean and std cast to uint8 (0 and 0): inf everywhere,
    NaN losses and no detections, without a word."""
    image = (torch.rand(3, 40, 40) * 255).to(dtype)
    for call in (lambda: tiny_maskrcnn([image]), lambda: tiny_maskrcnn([image], one_target())):
        with pytest.raises(ValueError, match=r"images\[0\] is torch\.\w+; Mask R-CNN takes float images with values "
                                             r"in \[0, 1\] \(e\.g\. image\.float\(\) / 255"):
            call()
    with pytest.raises(ValueError, match="float image"):
        normalize_image(image, MEAN, STD)


def test_maskrcnn_takes_float64_images_as_float32(tiny_maskrcnn):
    image, target = torch.rand(3, 40, 40), one_target()
    tiny_maskrcnn.eval()
    with torch.no_grad():
        single, double = tiny_maskrcnn([image])[0], tiny_maskrcnn([image.double()])[0]
    assert double["boxes"].dtype == torch.float32 and double["boxes"].shape == single["boxes"].shape
    torch.testing.assert_close(double["scores"], single["scores"], atol=1e-4, rtol=1e-4)
    losses = tiny_maskrcnn([image.double()], target)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_maskrcnn_refuses_no_images_and_empty_images(tiny_maskrcnn):
    with pytest.raises(ValueError, match="no images: Mask R-CNN takes a list of one or more Tensor"):
        tiny_maskrcnn([])
    with pytest.raises(ValueError, match="no images"):
        tiny_maskrcnn([], [])
    for shape, size in (((3, 0, 40), "0x40"), ((3, 40, 0), "40x0")):
        with pytest.raises(ValueError, match=rf"images\[1\] is empty \({size} pixels\)"):
            tiny_maskrcnn([torch.rand(3, 20, 20), torch.rand(*shape)])
    with pytest.raises(ValueError, match=r"images\[0\] is empty"):
        RCNNTransform(TransformConfig(min_size=(64,)))([torch.rand(3, 0, 0)])


# --- 2. Mask R-CNN options -----------------------------------------------------------------------
MASKRCNN_REFUSED = [
    ({"min_size": 0}, "min_size must be a whole number >= 1 or a non-empty list of them, got 0"),
    ({"min_size": -5}, "min_size must be a whole number >= 1 or a non-empty list of them, got -5"),
    ({"min_size": []}, "min_size must be a whole number >= 1 or a non-empty list of them, got []"),
    ({"min_size": "abc"}, "min_size must be a whole number >= 1 or a non-empty list of them, got 'abc'"),
    ({"min_size": [64, 1.5]}, "min_size must be a whole number >= 1 or a non-empty list of them, got [64, 1.5]"),
    ({"min_size": True}, "min_size must be a whole number >= 1"),
    ({"max_size": 0}, "max_size must be a whole number >= 1, got 0"),
    ({"size_divisible": 0}, "size_divisible must be a whole number >= 1, got 0"),
    ({"size_divisible": 2.5}, "size_divisible must be a whole number >= 1, got 2.5"),
    ({"image_std": (0, 0, 0)}, "image_std must be 3 positive numbers, got (0, 0, 0)"),
    ({"image_std": (0.2, 0.2)}, "image_std must be 3 positive numbers"),
    ({"image_mean": "rgb"}, "image_mean must be 3 numbers, got 'rgb'"),
    ({"image_mean": [0.5, float("nan"), 0.5]}, "image_mean must be 3 numbers"),
    ({"normalize": "yes"}, "normalize must be true or false, got 'yes'"),
    ({"rpn_batch_size_per_image": 0}, "rpn_batch_size_per_image must be a whole number >= 1, got 0"),
    ({"rpn_pre_nms_top_n_train": 0}, "rpn_pre_nms_top_n_train must be a whole number >= 1, got 0"),
    ({"rpn_post_nms_top_n_test": -1}, "rpn_post_nms_top_n_test must be a whole number >= 1, got -1"),
    ({"rpn_nms_thresh": -1}, "rpn_nms_thresh must be a number in [0, 1], got -1"),
    ({"rpn_positive_fraction": 1.5}, "rpn_positive_fraction must be a number in [0, 1], got 1.5"),
    ({"rpn_score_thresh": "0.5"}, "rpn_score_thresh must be a number in [0, 1], got '0.5'"),
    ({"rpn_min_size": -1}, "rpn_min_size must be a number >= 0, got -1"),
    ({"rpn_fg_iou_thresh": 0.2}, "rpn_bg_iou_thresh (0.3) must not be above rpn_fg_iou_thresh (0.2)"),
    ({"box_positive_fraction": 1.5}, "box_positive_fraction must be a number in [0, 1], got 1.5"),
    ({"box_score_thresh": 2.0}, "box_score_thresh must be a number in [0, 1], got 2.0"),
    ({"box_nms_thresh": True}, "box_nms_thresh must be a number in [0, 1], got True"),
    ({"box_detections_per_img": 0}, "box_detections_per_img must be a whole number >= 1, got 0"),
    ({"box_batch_size_per_image": 0}, "box_batch_size_per_image must be a whole number >= 1, got 0"),
    ({"bbox_reg_weights": 5}, "bbox_reg_weights must be 4 positive numbers, got 5"),
    ({"bbox_reg_weights": (10, 10, 5, 0)}, "bbox_reg_weights must be 4 positive numbers, got (10, 10, 5, 0)"),
    ({"box_bg_iou_thresh": 0.6}, "box_bg_iou_thresh (0.6) must not be above box_fg_iou_thresh (0.5)"),
    ({"trainable_backbone_layers": 7}, "trainable_backbone_layers must be a whole number in 0..5, got 7"),
    ({"trainable_backbone_layers": "abc"}, "trainable_backbone_layers must be a whole number in 0..5, got 'abc'"),
    ({"frozen_bn_eps": -0.5}, "frozen_bn_eps must be a number >= 0 (the eps of a frozen BatchNorm), got -0.5"),
    ({"frozen_bn_eps": float("nan")}, "frozen_bn_eps must be a number >= 0 (the eps of a frozen BatchNorm), got nan"),
    ({"frozen_bn_eps": True}, "frozen_bn_eps must be a number >= 0 (the eps of a frozen BatchNorm), got True"),
    ({"frozen_bn_eps": "0"}, "frozen_bn_eps must be a number >= 0 (the eps of a frozen BatchNorm), got '0'"),
]


@pytest.mark.parametrize(("kwargs", "message"), MASKRCNN_REFUSED, ids=[str(k) for k, _ in MASKRCNN_REFUSED])
def test_maskrcnn_refuses_options_out_of_range(kwargs, message):
    refused("maskrcnn_resnet18_fpn", message, **kwargs)


def test_maskrcnn_needs_a_class_besides_the_background():
    refused("maskrcnn_resnet50_fpn", "num_classes must be a whole number >= 2 for Mask R-CNN (class 0 is the "
            "background", num_classes=1)
    with torch.device("meta"):
        assert create_model("maskrcnn_resnet18_fpn", 2).roi_heads.box_predictor.cls_score.out_features == 2


def test_maskrcnn_options_keep_their_meaning_and_types():
    t, r, h = split_kwargs({"min_size": 800.0, "max_size": 1000, "image_std": [1, 1, 1], "size_divisible": 16,
                            "rpn_nms_thresh": 1, "rpn_bg_iou_thresh": 0.7, "box_score_thresh": 0,
                            "bbox_reg_weights": [1, 2, 3, 4], "box_detections_per_img": 3.0})
    assert t.min_size == (800,) and isinstance(t.min_size[0], int) and t.max_size == 1000
    assert t.image_std == (1.0, 1.0, 1.0) and t.size_divisible == 16
    assert r.nms_thresh == 1.0 and r.bg_iou_thresh == r.fg_iou_thresh == 0.7
    assert h.score_thresh == 0.0 and h.bbox_reg_weights == (1.0, 2.0, 3.0, 4.0) and h.detections_per_img == 3
    assert split_kwargs({"min_size": [64, 96]})[0].min_size == (64, 96)
    # the config classes check themselves, whoever builds them
    with pytest.raises(ValueError, match="size_divisible must be a whole number >= 1"):
        TransformConfig(size_divisible=0)
    with pytest.raises(ValueError, match="rpn_batch_size_per_image must be a whole number >= 1"):
        RPNConfig(batch_size_per_image=0)
    with pytest.raises(ValueError, match="box_detections_per_img must be a whole number >= 1"):
        RoIHeadsConfig(detections_per_img=0)
    assert TransformConfig() == TransformConfig(min_size=(800,), max_size=1333)


def test_rpn_and_box_configs_default_to_torchvisions_values():
    """The defaults are torchvision's ``MaskRCNN`` keyword defaults (``rpn_*`` and ``box_*``)."""
    r, h = RPNConfig(), RoIHeadsConfig()
    assert (r.pre_nms_top_n_train, r.pre_nms_top_n_test, r.post_nms_top_n_train, r.post_nms_top_n_test) == (
        2000, 1000, 2000, 1000)
    assert (r.nms_thresh, r.fg_iou_thresh, r.bg_iou_thresh, r.score_thresh) == (0.7, 0.7, 0.3, 0.0)
    assert (r.batch_size_per_image, r.positive_fraction) == (256, 0.5)
    assert (h.score_thresh, h.nms_thresh, h.detections_per_img) == (0.05, 0.5, 100)
    assert (h.fg_iou_thresh, h.bg_iou_thresh, h.batch_size_per_image, h.positive_fraction) == (0.5, 0.5, 512, 0.25)
    assert h.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)


def test_maskrcnn_settings_changed_after_building_are_checked(tiny_maskrcnn):
    heads = tiny_maskrcnn.roi_heads
    old = heads.score_thresh, heads.detections_per_img
    try:
        heads.score_thresh, heads.detections_per_img = 0.0, 10  # what torchvision users set
        assert (heads.config.score_thresh, heads.config.detections_per_img) == (0.0, 10)
        with pytest.raises(ValueError, match="score_thresh must be a number in"):
            heads.score_thresh = 2.0
        with pytest.raises(ValueError, match="detections_per_img must be a whole number >= 1"):
            heads.detections_per_img = 0
    finally:
        heads.score_thresh, heads.detections_per_img = old


# --- 3. deconvnet, unet, dropout, multi_grid -----------------------------------------------------
@pytest.mark.parametrize("value", [0, -5, 2.5])
def test_deconvnet_refuses_fc_channels_below_one(value):
    message = f"fc_channels must be a whole number >= 1, got {value!r}"
    if isinstance(value, float):  # caught by the option's type first
        message = "deconvnet option 'fc_channels' must be an integer"
    refused("deconvnet", message, fc_channels=value)


def test_unet_ibn_needs_two_channels_in_the_first_level():
    """IBN splits the first level's channels in two halves: with base_channels=1 the instance half
    had 0 channels and the first forward pass crashed (IndexError)."""
    refused("unet", "ibn_levels splits the channels of the first level (base_channels=1) into an "
            "instance-normalised and a batch-normalised half: it needs base_channels >= 2",
            base_channels=1, batch_norm=True, ibn_levels=1)
    model = create_model("unet", 3, base_channels=2, batch_norm=True, ibn_levels=1, dropout=0.0).train()
    assert model.down[0][1].instance.num_features == 1
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("value", [-1, 6, 1.5, True])
def test_unet_ibn_levels_range_comes_first(value):
    """ibn_levels=-1 without batch_norm used to say "it needs batch_norm=True"."""
    message = "ibn_levels must be a whole number in 0..5 (levels of the contracting path)"
    if isinstance(value, bool) or not isinstance(value, int):  # caught by the option's type first
        message = "unet option 'ibn_levels' must be an integer"
    refused("unet", message, base_channels=4, ibn_levels=value)
    from pixelwise.models.unet import UNet

    with pytest.raises(ValueError, match=r"ibn_levels must be a whole number in 0\.\.5"):
        UNet(3, base_channels=4, ibn_levels=value)


DROPOUT_MODELS = ["unet", "enet", "fcn32s", "fcn16s", "fcn8s", "deeplab_largefov"]


@pytest.mark.parametrize("name", DROPOUT_MODELS)
@pytest.mark.parametrize("value", [1.0, -0.5, 1.5])
def test_one_dropout_rule_for_every_model(name, value):
    refused(name, f"dropout must be a number in [0, 1), got {value}", dropout=value)


def test_every_model_with_a_dropout_option_is_covered():
    with_dropout = {n for n in list_models("semantic") if "dropout" in (model_options(n) or {})}
    assert with_dropout == {*DROPOUT_MODELS, "bayesian_segnet"}
    refused("bayesian_segnet", "dropout must be a number in (0, 1), got 1.0", dropout=1.0)
    with torch.device("meta"):
        for name in DROPOUT_MODELS:
            create_model(name, 3, dropout=0.0)  # 0: no dropout, accepted by all
            create_model(name, 3, dropout=0.99)


def test_the_shared_option_checks_hold_their_ends_and_name_the_range():
    """_checks by hand: which ends are in, what is returned, and the range each message names."""
    assert whole_number("n", 800.0) == 800 and type(whole_number("n", 800.0)) is int
    assert whole_number("n", 0, minimum=0, maximum=5) == 0 and whole_number("n", 5, minimum=0, maximum=5) == 5
    for value, allowed in [(0, ">= 1"), (1.5, ">= 1"), (True, ">= 1"), (float("inf"), ">= 1"), ("3", ">= 1")]:
        with pytest.raises(ValueError, match=f"^n must be a whole number {allowed}, got "):
            whole_number("n", value)
    with pytest.raises(ValueError, match=r"^n must be a whole number in 0\.\.5, got 6$"):
        whole_number("n", 6, minimum=0, maximum=5)
    assert fraction("f", 0) == 0.0 and fraction("f", 1) == 1.0
    for value in (-0.01, 1.01, float("nan"), False):
        with pytest.raises(ValueError, match=r"^f must be a number in \[0, 1\], got "):
            fraction("f", value)
    assert dropout_rate(0.0) == 0.0 and dropout_rate(0.999) == 0.999
    with pytest.raises(ValueError, match=r"^dropout must be a number in \[0, 1\), got 1\.0$"):
        dropout_rate(1.0)
    assert number_in("p", 0.5, 0.0, 1.0, low_open=True, high_open=True) == 0.5
    for value, ends in [(0.0, r"\(0, 1\)"), (1.0, r"\(0, 1\)")]:
        with pytest.raises(ValueError, match=f"^p must be a number in {ends}, got "):
            number_in("p", value, 0.0, 1.0, low_open=True, high_open=True)
    assert number_in("s", 7, 2.0) == 7.0
    with pytest.raises(ValueError, match="^s must be a number > 2, got 2$"):
        number_in("s", 2, 2.0, low_open=True)
    with pytest.raises(ValueError, match="^s must be a number >= 2, got 1$"):
        number_in("s", 1, 2.0)
    assert numbers_of("m", [1, 2, 3], 3) == (1.0, 2.0, 3.0) and numbers_of("m", (0, -1, 2), 3) == (0.0, -1.0, 2.0)
    assert numbers_of("m", (0.5, 1, 2), 3, positive=True) == (0.5, 1.0, 2.0)
    for value, what in [((0, 1, 1), "positive numbers"), ((1, 1), "positive numbers"), ("abc", "positive numbers"),
                        ((1, float("inf"), 1), "positive numbers")]:
        with pytest.raises(ValueError, match=f"^m must be 3 {what}, got "):
            numbers_of("m", value, 3, positive=True)
    with pytest.raises(ValueError, match="^m must be 3 numbers, got 'abc'$"):
        numbers_of("m", "abc", 3)
    # the one open lower end in use: a Bayesian SegNet without dropout has nothing to sample
    refused("bayesian_segnet", "dropout must be a number in (0, 1), got 0.0", dropout=0.0)

@pytest.mark.parametrize("grid", [[1.5, 2, 4], [True, 2, 4], "abc", 5, [1, 2], [0, 2, 4], [1, 2, float("inf")]])
def test_multi_grid_is_whole_positive_rates_never_truncated(grid):
    """[1.5, 2, 4] and [True, 2, 4] used to become (1, 2, 4) without a word."""
    refused("deeplabv3_resnet50", "multi_grid needs 3 positive unit rates (whole numbers >= 1, one per layer4 block, "
            f"e.g. [1, 2, 4]), got {grid!r}", multi_grid=grid)


def test_multi_grid_takes_lists_tuples_and_integral_floats():
    with torch.device("meta"):
        for grid in ([1, 2, 4], (1, 2, 4), [1.0, 2.0, 4.0]):
            model = create_model("deeplabv3_resnet50", 3, multi_grid=grid)
            assert [b.conv2.dilation for b in model.backbone.layer4] == [(4, 4), (8, 8), (16, 16)]


# --- 4. FCN-VGG options --------------------------------------------------------------------------
def test_fcn_vgg_options_are_their_own():
    """output_stride was offered for fcn8s/16s/32s and always failed ("_fcn_vgg() got multiple
    values"); at_once on fcn32s was accepted and did nothing (no skips to scale): now refused."""
    assert list(model_options("fcn32s") or {}) == ["dropout"]
    assert list(model_options("fcn16s") or {}) == list(model_options("fcn8s") or {}) == ["dropout", "at_once"]
    for name in ("fcn8s", "fcn16s", "fcn32s"):
        refused(name, f"{name} has no option 'output_stride'", output_stride=int(name[3:-1]))
    refused("fcn32s", "fcn32s has no option 'at_once'; options: dropout", at_once=True)
    from pixelwise.models.fcn import FCNVGG

    with pytest.raises(ValueError, match="at_once scales the pool4 and pool3 skips, and FCN-32s has none"):
        FCNVGG(3, 32, at_once=True)
    with torch.device("meta"):
        assert create_model("fcn16s", 3, at_once=True).skip_scale["pool4"] == 0.01
        assert create_model("fcn8s", 3, dropout=0.1).drop.p == 0.1


# --- 5. create_model and a layer's RuntimeError --------------------------------------------------
def test_a_layer_refusing_an_option_is_an_option_error(monkeypatch):
    """A size the builder does not check itself reaches torch, whose layer raises a RuntimeError:
    create_model names the model and the options, in one line."""
    import torch.nn as nn

    from pixelwise.models import registry

    def builder(num_classes: int, pretrained: str | None = None, width: int = 4) -> nn.Module:
        return nn.Conv2d(3, width, 1)

    def buggy(num_classes: int, pretrained: str | None = None, width: int = 4) -> nn.Module:
        raise RuntimeError("a bug of ours")

    for name, fn in (("probe_layer", builder), ("probe_bug", buggy)):
        monkeypatch.setitem(registry._MODELS, name, registry.ModelInfo(name, fn, "semantic", "test"))
    with pytest.raises(ModelOptionError, match=r"^model 'probe_layer': a layer refused the options \{'width': -5\}: "
                                               r"Trying to create tensor with negative dimension"):
        create_model("probe_layer", 2, width=-5)
    with pytest.raises(RuntimeError, match="a bug of ours") as caught:  # not from a layer: keeps its traceback
        create_model("probe_bug", 2, width=3)
    assert not isinstance(caught.value, ModelOptionError)


# --- through the CLI: exit 2 and one line, before any data is read -------------------------------
@pytest.mark.parametrize(("model", "kwargs", "message"), [
    ("deconvnet", '{"fc_channels": 0}', "deconvnet: fc_channels must be a whole number >= 1, got 0"),
    ("unet", '{"base_channels": 1, "batch_norm": true, "ibn_levels": 1}', "it needs base_channels >= 2"),
    ("maskrcnn_resnet18_fpn", '{"size_divisible": 0}', "size_divisible must be a whole number >= 1, got 0"),
    ("maskrcnn_resnet18_fpn", '{"min_size": 0}', "min_size must be a whole number >= 1"),
    ("fcn8s", '{"output_stride": 8}', "fcn8s has no option 'output_stride'"),
    ("deeplabv3_resnet50", '{"multi_grid": [1.5, 2, 4]}', "multi_grid needs 3 positive unit rates"),
])
def test_train_refuses_bad_model_options_in_one_line(tmp_path, capsys, model, kwargs, message):
    out = tmp_path / "out"
    code = main(["train", "--model", model, "--model-kwargs", kwargs, "--dataset", "shapes", "--epochs", "1",
                 "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("pixelwise: error: --model-kwargs: ") and "\n" not in err, err
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize("name, tags", [("deeplabv3plus_resnet18", "imagenet"), ("fcn_resnet50", "imagenet"),
                                        ("fcn8s", "imagenet"), ("segnet", "imagenet"),
                                        ("maskrcnn_resnet18_fpn", "imagenet"),
                                        ("maskrcnn_resnet50_fpn", "imagenet or coco")])
def test_a_mistyped_weights_tag_names_the_models_own_tags(name, tags):
    """'imagnet' for DeepLab said the model had no published weights; Mask R-CNN offered only coco,
    also to the ResNet-18 one, which refuses it."""
    from pixelwise.errors import UserError
    from pixelwise.models import create_model

    with pytest.raises(UserError, match=rf"weights 'imagnet' not found: pass {tags}, or the path"):
        create_model(name, num_classes=3, pretrained="imagnet")


def test_numpy_scalars_are_the_numbers_they_hold():
    """num_classes took np.int64 and an option refused it: "must be an integer, got np.int64(4)"."""
    import numpy as np

    from pixelwise.models.registry import check_model_kwargs

    model = create_model("unet", np.int64(3), base_channels=np.int64(4), batch_norm=np.bool_(False),
                         dropout=np.float32(0.25))
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in create_model("unet", 3, base_channels=4, batch_norm=False, dropout=0.25).parameters())
    check_model_kwargs("unet", {"base_channels": np.int32(4)})
    with pytest.raises(ModelOptionError, match="must be an integer"):
        create_model("unet", 3, base_channels=np.float64(4.5))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_norm": "yes"}, "unet option 'batch_norm' must be true or false (default False), got 'yes'"),
    ({"batch_norm": 1}, "unet option 'batch_norm' must be true or false (default False), got 1"),
    ({"base_channels": 2.5}, "unet option 'base_channels' must be an integer (default 64), got 2.5"),
    ({"base_channels": True}, "unet option 'base_channels' must be an integer (default 64), got True"),
    ({"dropout": "0.5"}, "unet option 'dropout' must be a number (default 0.5), got '0.5'"),
    ({"padding": 1}, "unet option 'padding' must be text (default 'same'), got 1"),
])
def test_a_wrongly_typed_option_names_the_type_it_takes_and_its_default(kwargs, message):
    refused("unet", message, **kwargs)
