"""Mask R-CNN specifics: anchors, resize rule, builder kwargs, weights, train/eval contract,
empty targets and overfitting one image. (Equivalence with torchvision: test_maskrcnn_fixture.py.)"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import pixelwise.models.maskrcnn as maskrcnn_module
from conftest import FIXTURES, require
from pixelwise.backbones import IntermediateLayerGetter, resnet18
from pixelwise.errors import UserError
from pixelwise.models.maskrcnn import (
    COCO_URL,
    LIGHT_HEADS,
    HeadWidths,
    freeze_backbone_layers,
    maskrcnn_resnet18_fpn,
    maskrcnn_resnet50_fpn,
    paste_masks_in_image,
    split_kwargs,
)
from pixelwise.models.maskrcnn.anchors import AnchorGenerator, cell_anchors
from pixelwise.models.maskrcnn.fpn import BackboneWithFPN, FeaturePyramidNetwork
from pixelwise.models.maskrcnn.model import check_targets
from pixelwise.models.maskrcnn.roi_heads import MaskRCNNHeads, fastrcnn_loss, match_proposals
from pixelwise.models.maskrcnn.rpn import RPNConfig, filter_image_proposals, rpn_loss
from pixelwise.models.maskrcnn.transform import RCNNTransform, TransformConfig
from pixelwise.models.registry import create_model, model_info
from pixelwise.ops import BalancedPositiveNegativeSampler, Matcher

SMALL = {
    "min_size": 64,
    "max_size": 96,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 8,
    "box_detections_per_img": 10,
}


def scene(h: int = 64, w: int = 80, seed: int = 0):
    """A dark image with two bright rectangles and their instance targets."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g) * 0.2
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 10:30, 8:40] = 1
    masks[1, 35:60, 45:75] = 1
    image[0][masks[0].bool()] = 0.9
    image[1][masks[1].bool()] = 0.9
    target = {
        "boxes": torch.tensor([[8.0, 10, 40, 30], [45, 35, 75, 60]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
    }
    return image, target


def empty_target(h: int = 64, w: int = 80):
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, h, w, dtype=torch.uint8),
    }


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return maskrcnn_resnet18_fpn(num_classes=3, **SMALL)


# ----------------------------------------------------------------------------- anchors and transform


def test_anchor_count_and_positions():
    gen = AnchorGenerator()
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    anchors = gen((64, 96), sizes)
    assert anchors.shape == (sum(h * w for h, w in sizes) * 3, 4)
    # level 0, location (y=2, x=5), stride 4: three anchors of size 32 centred on (20, 8)
    first = anchors[(2 * 24 + 5) * 3 : (2 * 24 + 5) * 3 + 3]
    for (x1, y1, x2, y2), ratio in zip(first.tolist(), (0.5, 1.0, 2.0)):
        w, h = 32 / math.sqrt(ratio), 32 * math.sqrt(ratio)
        assert (x1, y1, x2, y2) == (round(-w / 2) + 20, round(-h / 2) + 8, round(w / 2) + 20, round(h / 2) + 8)
    # last level: stride 64 // 1 = 64 vertically, 96 // 2 = 48 horizontally, size 512
    last = anchors[-3:]
    assert last[:, [0, 2]].mean().item() == 48 and last[:, [1, 3]].mean().item() == 0
    assert (last[1] == torch.tensor([-256.0, -256, 256, 256]) + torch.tensor([48.0, 0, 48, 0])).all()


def test_anchors_of_several_sizes_are_ordered_by_ratio_then_size():
    """Module docstring: anchors of one location by aspect ratio, then size (torchvision's order),
    width size / sqrt(ratio), height size * sqrt(ratio), rounded; levels checked for count."""
    base = cell_anchors((32, 64), (0.25, 1.0))
    # ratio 0.25: w = 2 * size, h = size / 2; ratio 1: square
    assert base.tolist() == [[-32.0, -8, 32, 8], [-64.0, -16, 64, 16], [-16.0, -16, 16, 16], [-32.0, -32, 32, 32]]
    gen = AnchorGenerator(((32, 64), (128,)), ((0.25, 1.0), (1.0, 4.0, 9.0)))
    assert gen.num_anchors_per_location() == [4, 3]
    anchors = gen((32, 32), [(2, 2), (1, 1)])
    assert anchors.shape == (2 * 2 * 4 + 3, 4)
    # level 0, stride 16: location (y=1, x=0) is the third, shifted by (x, y) = (0, 16)
    assert torch.equal(anchors[8:12], base + torch.tensor([0.0, 16, 0, 16]))
    assert anchors[-3:].tolist() == [[-64.0, -64, 64, 64], [-32.0, -128, 32, 128], [-21.0, -192, 21, 192]]


def test_anchor_generator_refuses_mismatched_levels():
    with pytest.raises(ValueError, match="2 anchor sizes but 1 aspect-ratio lists"):
        AnchorGenerator(((32,), (64,)), ((1.0,),))
    with pytest.raises(ValueError, match="1 feature levels but anchors for 5"):
        AnchorGenerator()((64, 64), [(16, 16)])


def test_fpn_initialisation_and_channel_check():
    """torchvision's FPN init: kaiming_uniform_(a=1), i.e. U(-sqrt(3 / fan_in), +sqrt(3 / fan_in)),
    and zero biases (PyTorch's default conv init is 1 / sqrt(fan_in) with random biases)."""
    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([64, 128], out_channels=32)
    convs = [b[0] for b in (*fpn.inner_blocks, *fpn.layer_blocks)]
    assert [c.weight.shape[1] * c.weight.shape[2] * c.weight.shape[3] for c in convs] == [64, 128, 288, 288]
    for conv in convs:
        bound = math.sqrt(3 / (conv.weight[0].numel()))
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.95 * bound  # thousands of draws reach the edge
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    with pytest.raises(ValueError, match="positive"):
        FeaturePyramidNetwork([64, 0])


def test_fpn_top_down_sums_and_pool_level_by_hand():
    """Output names are the input names plus ``"pool"`` (what the module docstring promises);
    each level is layer_block(lateral + nearest x2 upsampling of the coarser sum), recomputed
    here from the same convs; ``"pool"`` is the coarsest output sampled every second pixel.
    Defaults: 256 output channels, for the FPN and for ``BackboneWithFPN``."""
    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([3, 5], out_channels=4)
    fine, coarse = torch.randn(1, 3, 8, 6), torch.randn(1, 5, 4, 3)
    out = fpn({"a": fine, "b": coarse})
    assert list(out) == ["a", "b", "pool"]
    inner, layer = [b[0] for b in fpn.inner_blocks], [b[0] for b in fpn.layer_blocks]
    top = inner[1](coarse)
    summed = inner[0](fine) + top.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(out["b"], layer[1](top))
    torch.testing.assert_close(out["a"], layer[0](summed))
    torch.testing.assert_close(out["pool"], layer[1](top)[..., ::2, ::2])
    assert FeaturePyramidNetwork([3]).layer_blocks[0][0].out_channels == 256
    body = IntermediateLayerGetter(resnet18(), {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
    backbone = BackboneWithFPN(body)
    assert backbone.out_channels == 256 and backbone.fpn.layer_blocks[0][0].out_channels == 256
    assert list(backbone(torch.zeros(1, 3, 64, 64))) == ["0", "1", "2", "3", "pool"]


def test_resize_rule_table_from_fixture():
    meta = json.loads((require(FIXTURES, "torchvision fixtures") / "maskrcnn_resnet50_fpn.json").read_text())
    for setting, rows in meta["config"]["transform"]["size_rule_examples"].items():
        lo, hi = (int(v.split("=")[1]) for v in setting.split(","))
        transform = RCNNTransform(TransformConfig(min_size=(lo,), max_size=hi)).eval()
        for row in rows:
            image = torch.zeros(3, *row["input_hw"])
            batch, _ = transform([image])
            assert batch.image_sizes == [tuple(row["resized_hw"])], row
            assert tuple(batch.tensors.shape[-2:]) == tuple(row["batch_hw"]), row


def test_transform_resizes_targets_and_does_not_modify_them():
    image, target = scene()
    transform = RCNNTransform(TransformConfig(min_size=(128,), max_size=256)).eval()
    before = {k: v.clone() for k, v in target.items()}
    batch, (out,) = transform([image], [target])
    assert batch.image_sizes == [(128, 160)]
    assert torch.equal(out["boxes"], before["boxes"] * 2)
    assert out["masks"].shape == (2, 128, 160) and out["masks"].dtype == torch.uint8
    assert out["masks"].sum().item() == 4 * before["masks"].sum().item()  # nearest, exact factor 2
    assert all(torch.equal(target[k], before[k]) for k in before)


def test_normalize_false_equals_prenormalised_input():
    image, _ = scene()
    cfg = TransformConfig(min_size=(96,), max_size=200)
    mean, std = torch.tensor(cfg.image_mean)[:, None, None], torch.tensor(cfg.image_std)[:, None, None]
    a = RCNNTransform(cfg)([image])[0].tensors
    b = RCNNTransform(TransformConfig(min_size=(96,), max_size=200, normalize=False))([(image - mean) / std])
    torch.testing.assert_close(a, b[0].tensors, atol=1e-5, rtol=1e-5)


def test_paste_masks_fills_the_box():
    masks = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[10.0, 20, 30, 40], [-5, -5, 8, 6]])
    pasted = paste_masks_in_image(masks, boxes, (50, 60))
    assert pasted.shape == (2, 1, 50, 60)
    inside = pasted[0, 0, 21:40, 11:30]
    assert (inside > 0.99).all()  # interior of the box
    assert pasted[0, 0, :18].sum() == 0 and pasted[0, 0, :, 33:].sum() == 0  # outside (+1px padding)
    assert pasted[1, 0, :5, :6].min() > 0.99  # clipped box at the corner
    assert paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (5, 7)).shape == (0, 1, 5, 7)


def paste_one_by_one(masks, boxes, height, width, padding=1):
    """torchvision's CPU ``paste_masks_in_image``: a loop over boxes, ``F.interpolate`` each mask to its box."""
    m = masks.shape[-1]
    padded = torch.nn.functional.pad(masks, (padding,) * 4)
    scale = (m + 2 * padding) / m
    w_half, h_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale, (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c, y_c = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    int_boxes = torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), 1).to(torch.int64)
    out = torch.zeros(len(masks), 1, height, width)
    for k, (x1, y1, x2, y2) in enumerate(int_boxes.tolist()):
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        resized = torch.nn.functional.interpolate(padded[k : k + 1], size=(h, w), mode="bilinear")[0, 0]
        xa, xb, ya, yb = max(x1, 0), min(x2 + 1, width), max(y1, 0), min(y2 + 1, height)
        if xb > xa and yb > ya:
            out[k, 0, ya:yb, xa:xb] = resized[ya - y1 : yb - y1, xa - x1 : xb - x1]
    return out


def test_paste_masks_equals_per_box_interpolate():
    gen = torch.Generator().manual_seed(4)
    masks = torch.rand(40, 1, 28, 28, generator=gen)
    xy = torch.rand(40, 2, generator=gen) * 90 - 15
    wh = torch.rand(40, 2, generator=gen) ** 2 * 80
    boxes = torch.cat((xy, xy + wh), 1)
    boxes[0] = torch.tensor([10.0, 10.0, 10.0, 10.0])  # empty box: a 1-2 px paste
    boxes[1] = torch.tensor([5.0, 5.0, 3.0, 2.0])  # x2 < x1: nothing pasted
    boxes[2] = torch.tensor([-50.0, -40.0, 150.0, 120.0])  # larger than the image on every side
    boxes[3] = torch.tensor([200.0, 200.0, 230.0, 240.0])  # outside the image
    boxes[4] = torch.tensor([1.0, 2.0, 28.0, 29.0])  # resized to 30 x 30 = the padded size: a plain copy
    pasted = paste_masks_in_image(masks, boxes, (70, 90))
    expected = paste_one_by_one(masks, boxes, 70, 90)
    assert pasted.shape == (40, 1, 70, 90)
    torch.testing.assert_close(pasted, expected, rtol=0, atol=2e-6)
    assert torch.equal(pasted == 0, expected == 0)  # the same pixels are outside every box
    assert pasted[3].sum() == 0 and pasted[1].sum() == 0 and pasted[2].min() > 0


def test_paste_masks_of_a_one_column_box_and_of_boxes_off_the_top_left():
    masks = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    # a zero-width box: enlarged by 30/28 it is still one column (x1 = x2 = 10) and rows 9..20; it
    # alone sets the widest visible box, one column: it is pasted, not dropped
    line = torch.tensor([[10.0, 10, 10, 20]])
    pasted = paste_masks_in_image(masks[:1], line, (30, 40))
    torch.testing.assert_close(pasted, paste_one_by_one(masks[:1], line, 30, 40), rtol=0, atol=2e-6)
    assert (pasted[0, 0, 9:21, 10] > 0).all() and pasted[0, 0, :, :10].sum() == 0 and pasted[0, 0, :, 11:].sum() == 0
    # a box wholly above and left of the image (nothing visible) beside a visible one: zero, no error
    boxes = torch.tensor([[-20.0, -20, -10, -10], [10, 10, 30, 25]])
    pasted = paste_masks_in_image(masks, boxes, (30, 40))
    torch.testing.assert_close(pasted, paste_one_by_one(masks, boxes, 30, 40), rtol=0, atol=2e-6)
    assert pasted[0].sum() == 0 and pasted[1].sum() > 0
    # boxes whose enlarged top row is the image's last row (y1 = 29) or left column its last (x1 = 39): one
    # visible row / column, pasted there
    edge = torch.tensor([[10.0, 29.5, 20, 35], [39.5, 10, 45, 20]])
    pasted = paste_masks_in_image(masks, edge, (30, 40))
    torch.testing.assert_close(pasted, paste_one_by_one(masks, edge, 30, 40), rtol=0, atol=2e-6)
    assert pasted[0, 0, 29].sum() > 0 and pasted[0, 0, :29].sum() == 0
    assert pasted[1, 0, :, 39].sum() > 0 and pasted[1, 0, :, :39].sum() == 0


def test_a_min_size_is_drawn_only_when_training_with_targets():
    # min_size (32, 48, 64) on a 16 x 20 image: the short side becomes the size used, the long one
    # 20 / 16 of it; with targets in train mode one is drawn (multi-scale), otherwise the last
    transform = RCNNTransform(TransformConfig(min_size=(32, 48, 64), max_size=1000))
    image = torch.rand(3, 16, 20)
    target = {"boxes": torch.tensor([[2.0, 2, 10, 8]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 16, 20, dtype=torch.uint8)}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        drawn = {transform.train()([image], [target])[0].image_sizes[0] for _ in range(12)}
        fixed = {transform.train()([image])[0].image_sizes[0] for _ in range(12)}
        fixed |= {transform.eval()([image], [target])[0].image_sizes[0] for _ in range(12)}
    assert drawn == {(32, 40), (48, 60), (64, 80)}
    assert fixed == {(64, 80)}


def test_a_tall_strip_keeps_one_pixel_width():
    # 400 x 1 at min 64 / max 96: scale = min(64 / 1, 96 / 400) = 0.24, the width floor(0.24) = 0
    # is kept at one pixel: 96 x 1, and its mask likewise
    transform = RCNNTransform(TransformConfig(min_size=(64,), max_size=96)).eval()
    target = {"boxes": torch.tensor([[0.0, 100, 1, 300]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 400, 1, dtype=torch.uint8)}
    batch, (out,) = transform([torch.rand(3, 400, 1)], [target])
    assert batch.image_sizes == [(96, 1)]
    assert out["masks"].shape == (1, 96, 1) and out["masks"].all()
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 24, 1, 72]]))


# ----------------------------------------------------------------------------- builders and weights


def test_registered_as_instance_model():
    for name in ("maskrcnn_resnet50_fpn", "maskrcnn_resnet18_fpn"):
        info = model_info(name)
        assert info.task == "instance" and "He et al., ICCV 2017" in info.paper


def _head_widths(model) -> HeadWidths:
    """The widths a built model actually has, read from its layers."""
    return HeadWidths(fpn=model.backbone.out_channels, representation=model.roi_heads.box_head.fc6.out_features,
                      mask=model.roi_heads.mask_predictor.conv5_mask.out_channels)


def test_each_builder_states_its_backbone_and_head_widths():
    with torch.device("meta"):
        light, full = maskrcnn_resnet18_fpn(num_classes=3), maskrcnn_resnet50_fpn(num_classes=3)
    assert _head_widths(light) == LIGHT_HEADS == HeadWidths(fpn=128, representation=512, mask=128)
    assert _head_widths(full) == HeadWidths() == HeadWidths(fpn=256, representation=1024, mask=256)
    # the FPN reads its input channels from the backbone's feature_info
    assert [m[0].in_channels for m in light.backbone.fpn.inner_blocks] == [64, 128, 256, 512]
    assert [m[0].in_channels for m in full.backbone.fpn.inner_blocks] == [256, 512, 1024, 2048]


def test_kwargs_reach_their_config():
    t, r, h = split_kwargs(
        {
            "min_size": 320,
            "max_size": 512,
            "image_mean": [0.5, 0.5, 0.5],
            "box_score_thresh": 0.3,
            "box_nms_thresh": 0.4,
            "box_detections_per_img": 7,
            "rpn_pre_nms_top_n_test": 50,
            "rpn_post_nms_top_n_test": 40,
            "rpn_pre_nms_top_n_train": 60,
            "rpn_post_nms_top_n_train": 30,
        }
    )
    assert t.min_size == (320,) and t.max_size == 512 and t.image_mean == (0.5, 0.5, 0.5)
    assert (h.score_thresh, h.nms_thresh, h.detections_per_img) == (0.3, 0.4, 7)
    assert (r.pre_nms_top_n_test, r.post_nms_top_n_test, r.pre_nms_top_n_train, r.post_nms_top_n_train) == (
        50,
        40,
        60,
        30,
    )
    with pytest.raises(UserError, match="box_scor_thresh"):
        split_kwargs({"box_scor_thresh": 0.1})


def test_unknown_kwarg_lists_torchvisions_bbox_reg_weights_name():
    # docs/maskrcnn.md names the keyword bbox_reg_weights (torchvision's); the refusal's list of
    # known names must offer that name, not the doubled box_bbox_reg_weights
    with pytest.raises(UserError) as err:
        split_kwargs({"bbox_reg_weight": (10, 10, 5, 5)})
    known = str(err.value).split("known: ", 1)[1].split(", ")
    assert "bbox_reg_weights" in known and "box_bbox_reg_weights" not in known
    with pytest.raises(UserError, match="unknown argument 'box_bbox_reg_weights'"):  # one name, not two aliases
        split_kwargs({"box_bbox_reg_weights": (10, 10, 5, 5), "bbox_reg_weights": (1, 1, 1, 1)})
    assert split_kwargs({"bbox_reg_weights": (10, 10, 5, 5)})[2].bbox_reg_weights == (10, 10, 5, 5)


def test_rpn_top_n_limits_proposals(tiny):
    tiny.eval()
    image, target = scene()
    old = tiny.rpn.config.post_nms_top_n_test
    tiny.rpn.config.post_nms_top_n_test = 5
    try:
        batch, _ = tiny.transform([image])
        proposals, losses = tiny.rpn(batch, tiny.backbone(batch.tensors))
    finally:
        tiny.rpn.config.post_nms_top_n_test = old
    assert proposals[0].shape[0] <= 5 and losses == {}


def test_trainable_backbone_layers_and_frozen_bn(monkeypatch):
    sd = maskrcnn_resnet18_fpn(num_classes=3).backbone.body.state_dict()
    resnet_sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: dict(resnet_sd) | fc_weights())
    model = maskrcnn_resnet18_fpn(num_classes=3, pretrained="imagenet", trainable_backbone_layers=2)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())  # frozen
    for key, value in resnet_sd.items():
        assert torch.equal(model.backbone.body.state_dict()[key], value)
    assert all(p.requires_grad for p in maskrcnn_resnet18_fpn(num_classes=3).parameters())


def test_a_local_copy_of_the_imagenet_resnet_fills_the_body(tmp_path):
    """``pretrained=PATH`` is a whole Mask R-CNN file, but a hand-downloaded ImageNet ResNet
    (what the download failure tells the user to fetch) fills the backbone's body, frozen BN and
    3 trainable layers as with ``"imagenet"``, and the FPN and heads stay as built."""
    torch.manual_seed(0)
    resnet_sd = {k: torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in maskrcnn_resnet18_fpn(num_classes=3).backbone.body.state_dict().items()
                 if not k.endswith("num_batches_tracked")}
    torch.save(resnet_sd | fc_weights(), tmp_path / "resnet18.pth")
    torch.manual_seed(1)
    model = maskrcnn_resnet18_fpn(num_classes=3, pretrained=str(tmp_path / "resnet18.pth"))
    torch.manual_seed(1)
    fresh = maskrcnn_resnet18_fpn(num_classes=3).state_dict()
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in resnet_sd.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad} == \
        {"layer2", "layer3", "layer4"}
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.body.")}
    assert any(k.startswith("backbone.fpn.") for k in rest)
    assert all(torch.equal(v, fresh[k]) for k, v in rest.items())


def fc_weights():
    return {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}


@pytest.fixture(scope="module")
def published_state():
    """A state dict in the layout of torchvision's COCO checkpoint (FrozenBatchNorm2d: no
    num_batches_tracked), with random values."""
    torch.manual_seed(1)
    model = maskrcnn_resnet50_fpn(num_classes=91)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def test_pretrained_coco_loads_published_layout(monkeypatch, published_state):
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return dict(published_state)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = maskrcnn_resnet50_fpn(pretrained="coco")
    assert calls[0][0] == COCO_URL == "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    assert calls[0][1]["weights_only"] is True
    state = model.state_dict()
    assert set(state) == set(published_state)
    assert all(torch.equal(state[k], v) for k, v in published_state.items())
    eps = {m.eps for m in model.backbone.body.modules() if hasattr(m, "running_var")}
    assert eps == {0.0}  # torchvision's overwrite_eps after loading COCO_V1
    assert model.pretrained_note is None  # every layer came from the file
    # fine-tuning to another number of classes keeps everything but the class-specific layers,
    # and says so (pixelwise train prints the note)
    model = maskrcnn_resnet50_fpn(num_classes=4, pretrained="coco")
    assert model.roi_heads.box_predictor.cls_score.weight.shape == (4, 1024)
    assert torch.equal(model.roi_heads.box_head.fc6.weight, published_state["roi_heads.box_head.fc6.weight"])
    assert model.pretrained_note == (
        "maskrcnn: loaded the weights coco but roi_heads.box_predictor.bbox_pred, roi_heads.box_predictor.cls_score, "
        "roi_heads.mask_predictor.mask_fcn_logits, which score 91 classes in the file: initialised for this model's 4 "
        "classes (fine-tuning)")
    # a file without its predictors loaded them fresh without a word
    headless = {k: v for k, v in published_state.items() if not k.startswith("roi_heads.box_predictor.")}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: dict(headless))
    assert maskrcnn_resnet50_fpn(num_classes=4, pretrained="coco").pretrained_note == (
        "maskrcnn: loaded the weights coco but roi_heads.mask_predictor.mask_fcn_logits, which score 91 classes in "
        "the file and roi_heads.box_predictor.bbox_pred, roi_heads.box_predictor.cls_score, which the file lacks: "
        "initialised for this model's 4 classes (fine-tuning)")
    # a file of the model's own class count that lacks its box predictor: not a class count's doing
    own = {k: v for k, v in maskrcnn_resnet50_fpn(num_classes=4).state_dict().items()
           if not k.startswith("roi_heads.box_predictor.") and not k.endswith("num_batches_tracked")}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: dict(own))
    assert maskrcnn_resnet50_fpn(num_classes=4, pretrained="coco").pretrained_note.endswith(
        "but roi_heads.box_predictor.bbox_pred, roi_heads.box_predictor.cls_score, which the file lacks: initialised "
        "for this model's 4 classes (fine-tuning)")
    biasless = {k: v for k, v in maskrcnn_resnet50_fpn(num_classes=4).state_dict().items()
                if k != "roi_heads.box_predictor.cls_score.bias" and not k.endswith("num_batches_tracked")}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: dict(biasless))
    assert maskrcnn_resnet50_fpn(num_classes=4, pretrained="coco").pretrained_note.endswith(  # not 'scores 4'
        "but roi_heads.box_predictor.cls_score, which the file lacks: initialised for this model's 4 classes "
        "(fine-tuning)")
    # the same layout also loads into a model built without weights (trainable BatchNorm2d)
    fresh = maskrcnn_resnet50_fpn(num_classes=91)
    fresh.load_state_dict(published_state, strict=True)
    assert torch.equal(fresh.backbone.body.bn1.running_var, published_state["backbone.body.bn1.running_var"])


# ----------------------------------------------------------------------------- train/eval contract


def test_outputs_depend_on_arguments_not_mode(tiny):
    image, target = scene()
    for train in (True, False):
        tiny.train(train)
        losses = tiny([image], [target])
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
        assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
        with torch.no_grad():
            (det,) = tiny([image])
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        d = det["boxes"].shape[0]
        assert det["masks"].shape == (d, 1, 64, 80) and det["labels"].dtype == torch.int64


def test_eval_predictions_are_deterministic(tiny):
    tiny.eval()
    tiny.roi_heads.score_thresh, tiny.roi_heads.detections_per_img = 0.0, 10
    images = [scene(seed=1)[0], scene(48, 72, seed=2)[0]]
    with torch.no_grad():
        a, b = tiny(images), tiny(images)
    tiny.roi_heads.score_thresh, tiny.roi_heads.detections_per_img = 0.05, 10
    assert a[0]["boxes"].shape[0] > 0
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a[1]["masks"].shape[-2:] == (48, 72)


def test_image_without_instances_trains(tiny):
    tiny.train()
    image, target = scene()
    losses = tiny([image, image.flip(-1)], [empty_target(), target])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert tiny.rpn.head.cls_logits.weight.grad.abs().sum() > 0
    tiny.zero_grad()
    losses = tiny([image], [empty_target()])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    assert losses["loss_classifier"].item() > 0 and losses["loss_objectness"].item() > 0
    sum(losses.values()).backward()
    tiny.zero_grad()


def test_bad_targets_raise(tiny):
    image, target = scene()
    with pytest.raises(ValueError, match="no area"):
        tiny([image], [target | {"boxes": torch.tensor([[5.0, 5, 5, 9], [1, 1, 4, 4]])}])
    with pytest.raises(ValueError, match="lacks"):
        tiny([image], [{"boxes": target["boxes"], "labels": target["labels"]}])
    h, w = image.shape[-2:]
    k = len(target["labels"])
    for bad, words in (({"masks": target["masks"][:, : h // 2]}, f"but image 0 is {h}x{w}"),
                       ({"labels": torch.full((k,), -1)}, "= -1 is not a class: labels are 1..2"),
                       ({"labels": torch.zeros(k, dtype=torch.int64)}, "= 0 is not a class"),
                       ({"labels": torch.full((k,), 3)}, "= 3 is not a class"),
                       ({"boxes": target["boxes"].clone().index_fill_(1, torch.tensor([0]), float("nan"))},
                        "is not finite")):
        with pytest.raises(ValueError, match=words):  # each was silent (a wrong mask loss, a dropped object) or deep
            tiny([image], [target | bad])


def test_an_image_thinner_than_a_pixel_after_resizing_is_predicted(tiny):
    """The transform's scale can take a strip's short side below one pixel (1 x 2000 at the default
    800/1333; here 1 x 400 at 64/96, scale 0.24): it is kept at one pixel, and detections come back
    at the image's size (it was a RuntimeError in F.interpolate)."""
    with torch.no_grad():
        (out,) = tiny.eval()([torch.rand(3, 1, 400)])
    assert out["masks"].shape[-2:] == (1, 400) and out["boxes"].shape[1] == 4


def test_overfits_one_image():
    torch.manual_seed(0)
    model = maskrcnn_resnet18_fpn(num_classes=3, **SMALL).train()
    image, target = scene()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-4)
    total, mask = [], []
    for _ in range(30):
        losses = model([image], [target])
        loss = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        total.append(loss.item())
        mask.append(losses["loss_mask"].item())
    assert sum(total[-5:]) / 5 < 0.35 * sum(total[:3]) / 3, total
    assert sum(mask[-5:]) / 5 < 0.25 * mask[0], mask
    model.eval()
    with torch.no_grad():
        (det,) = model([image])
    from pixelwise.ops import box_iou

    iou = box_iou(target["boxes"], det["boxes"])  # [2 gt, D]
    same_class = target["labels"][:, None] == det["labels"][None, :]
    assert ((iou > 0.5) & same_class).any(dim=1).all(), det  # each object found with its class


def test_trains_and_evaluates_on_collated_dataset_batches():
    """The trainer's path: ShapesDataset samples (preprocess-normalised) -> collate -> model
    built with normalize=False -> losses; then detections -> coco_evaluate."""
    from pixelwise.coco_eval import coco_evaluate
    from pixelwise.data.base import collate
    from pixelwise.data.shapes import ShapesDataset

    torch.manual_seed(0)
    ds = ShapesDataset(num_train=2, size=64, max_objects=3)
    model = maskrcnn_resnet18_fpn(num_classes=ds.num_classes, normalize=False, **SMALL).train()
    batch = collate([ds[0], ds[1]])
    losses = model(list(batch["image"]), batch["target"])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        predictions = model(list(batch["image"]))
    assert [p["masks"].shape[-2:] for p in predictions] == [(64, 64), (64, 64)]
    metrics = coco_evaluate(predictions, batch["target"], class_ids=range(1, ds.num_classes))
    assert 0.0 <= metrics["mask_AP"] <= 1.0 and metrics["num_images"] == 2


def test_resnet18_has_no_coco_weights_and_warns_on_ignored_layers():
    with pytest.raises(UserError, match="no COCO weights"):
        maskrcnn_resnet18_fpn(num_classes=3, pretrained="coco")
    with pytest.warns(UserWarning, match="trainable_backbone_layers"):
        maskrcnn_resnet18_fpn(num_classes=3, trainable_backbone_layers=2)


# ----------------------------------------------------------------------------- loss pieces vs hand computation


def test_anchor_labels_thresholds_and_low_quality_matches():
    from pixelwise import ops
    from pixelwise.models.maskrcnn.rpn import anchor_labels

    gt = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110]])
    anchors = torch.tensor(
        [
            [0.0, 0, 10, 10],  # IoU 1 with gt 0 -> fg
            [0.0, 0, 10, 20],  # IoU 0.5 -> between 0.3 and 0.7 -> ignored
            [50.0, 50, 60, 60],  # IoU 0 -> bg
            [100.0, 100, 110, 130],  # IoU 1/3 with gt 1, but its best anchor -> fg (low-quality match)
        ]
    )
    labels, matched = anchor_labels(anchors, gt, ops.Matcher(0.7, 0.3, allow_low_quality_matches=True))
    assert labels.tolist() == [1.0, -1.0, 0.0, 1.0]
    assert torch.equal(matched[[0, 3]], gt)
    labels, matched = anchor_labels(anchors, torch.zeros(0, 4), ops.Matcher(0.7, 0.3, True))
    assert labels.tolist() == [0.0] * 4 and matched.abs().sum() == 0


def test_fastrcnn_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    logits, regression = torch.randn(5, 3, generator=g), torch.randn(5, 12, generator=g)
    labels = torch.tensor([0, 2, 1, 0, 2])
    targets = torch.randn(5, 4, generator=g)
    cls, box = fastrcnn_loss(logits, regression, labels, targets)
    expected_cls = sum(-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(5)) / 5

    def smooth_l1(x, beta=1 / 9):
        return torch.where(x.abs() < beta, 0.5 * x**2 / beta, x.abs() - 0.5 * beta).sum()

    expected_box = sum(smooth_l1(regression[i, 4 * labels[i] : 4 * labels[i] + 4] - targets[i]) for i in (1, 2, 4)) / 5
    torch.testing.assert_close(cls, expected_cls)
    torch.testing.assert_close(box, expected_box)


def test_mask_targets_are_gt_masks_cropped_to_the_proposal():
    from pixelwise.models.maskrcnn.roi_heads import maskrcnn_loss, project_masks_on_boxes

    gt = torch.zeros(2, 40, 40, dtype=torch.uint8)
    gt[0, 8:24, 4:36] = 1  # 32 wide, 16 high
    gt[1, 20:40, 20:40] = 1
    boxes = torch.tensor([[4.0, 8, 36, 24], [4.0, 8, 20, 24]])  # gt 0 exactly; left half of gt 0
    targets = project_masks_on_boxes(gt, boxes, torch.tensor([0, 0]), 28)
    assert targets.shape == (2, 28, 28)
    # the box is the mask: foreground everywhere except the last rows/columns, where torchvision's
    # unaligned RoIAlign (pixel centres at integers) interpolates with the pixel past the edge
    assert targets[:, :-2, :-2].min() > 0.99 and targets.mean() > 0.9
    # the matched index picks the mask: over gt 1's square, mask 1 fills it, mask 0 only 4 x 16 of 20 x 20
    targets = project_masks_on_boxes(gt, torch.tensor([[20.0, 20, 40, 40]] * 2), torch.tensor([1, 0]), 28)
    assert targets[0, :-2, :-2].min() > 0.99
    assert targets[1].mean().item() == pytest.approx(4 * 16 / 400, abs=0.03)
    logits = torch.zeros(2, 3, 28, 28)
    assert maskrcnn_loss(logits, torch.tensor([1, 2]), torch.ones(2, 28, 28)).item() == pytest.approx(math.log(2))


def test_a_maskrcnn_trained_from_pretrained_weights_saves_and_reloads_as_itself(tmp_path):
    """Pretrained weights freeze the backbone's BatchNorm; the checkpoint was checked (and read)
    by rebuilding the model from its options alone, with BatchNorm2d: the first save raised after a
    whole epoch. The checkpoint records frozen_bn_eps, and rebuilds with frozen BatchNorm."""
    import torch.nn as nn

    from pixelwise import load_checkpoint
    from pixelwise.backbones import FrozenBatchNorm2d, resnet18
    from pixelwise.cli import main

    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)  # a local copy of ImageNet-style ResNet-18 weights
    out = tmp_path / "run"
    assert main(["train", "--model", "maskrcnn_resnet18_fpn", "--pretrained", str(weights), "--dataset", "shapes",
                 "--dataset-kwargs", '{"num_train": 4, "num_val": 2, "size": 64}',
                 "--model-kwargs", '{"min_size": 64, "max_size": 64}', "--epochs", "1", "--batch-size", "2",
                 "--out", str(out), "--no-progress"]) == 0
    model, meta = load_checkpoint(out / "best.safetensors")
    assert meta["model_kwargs"]["frozen_bn_eps"] == pytest.approx(1e-5)
    norms = [m for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d | nn.BatchNorm2d)]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) and m.eps == pytest.approx(1e-5) for m in norms)
    with pytest.raises(ValueError, match="frozen_bn_eps must be a number >= 0"):
        model_info("maskrcnn_resnet18_fpn").builder(num_classes=3, frozen_bn_eps=-1.0)
    # the --pretrained file moved away: the resume does not need it (the state replaces the weights)
    weights.unlink()
    assert main(["train", "--resume", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    model, meta = load_checkpoint(out / "last.safetensors")
    assert all(m.eps == pytest.approx(1e-5) for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d))


def test_a_pixelwise_maskrcnn_checkpoint_as_pretrained_keeps_its_frozen_bn_eps(tmp_path):
    """A checkpoint of a run started from COCO records frozen_bn_eps 0; given as --pretrained (to
    fine-tune on), it was rebuilt with eps 1e-5."""
    from pixelwise import save_checkpoint
    from pixelwise.backbones import FrozenBatchNorm2d

    source = create_model("maskrcnn_resnet18_fpn", num_classes=3, frozen_bn_eps=0.0)
    save_checkpoint(tmp_path / "coco_run.safetensors", source,
                    {"model": "maskrcnn_resnet18_fpn", "num_classes": 3, "task": "instance",
                     "model_kwargs": {"frozen_bn_eps": 0.0}})
    model = create_model("maskrcnn_resnet18_fpn", num_classes=3, pretrained=str(tmp_path / "coco_run.safetensors"))
    eps = {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert eps == {0.0}


def test_a_hand_downloaded_coco_file_gives_the_model_the_coco_tag_gives(tmp_path):
    """The download error says to fetch the file by hand and pass its path; that copy kept the
    frozen BatchNorm's eps 1e-5 where "coco" sets torchvision's 0.0 (another model)."""
    from pixelwise.backbones import FrozenBatchNorm2d
    from pixelwise.models import create_model

    torch.manual_seed(0)
    copy = tmp_path / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    torch.save(create_model("maskrcnn_resnet50_fpn", 91).state_dict(), copy)
    renamed = tmp_path / "mine.pth"
    renamed.write_bytes(copy.read_bytes())
    for path, eps in ((copy, 0.0), (renamed, 1e-5)):  # another name: not taken for the COCO file
        model = create_model("maskrcnn_resnet50_fpn", 91, pretrained=str(path))
        assert {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)} == {eps}


# --- losses, matching and the mask head worked by hand ---------------------------------------------
def test_rpn_loss_by_hand():
    """Objectness: mean BCE of the logits against the 1 / 0 labels of the sampled anchors (ignored
    -1 left out); boxes: smooth-L1 (beta 1/9) of the positives, summed, over the number sampled.
    The sampler takes every anchor here (2 positives, 3 negatives, batch 100), so it is exact."""
    g = torch.Generator().manual_seed(0)
    objectness = torch.randn(1, 6, generator=g)
    labels = torch.tensor([[1.0, 0, -1, 1, 0, 0]])
    deltas, targets = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    obj, box = rpn_loss(objectness, deltas, labels, targets, BalancedPositiveNegativeSampler(100, 0.5))
    x, y = objectness[0], labels[0]
    bce = [-math.log(torch.sigmoid(x[i]).item()) if y[i] == 1 else -math.log(1 - torch.sigmoid(x[i]).item())
           for i in (0, 1, 3, 4, 5)]
    assert obj.item() == pytest.approx(sum(bce) / 5, rel=1e-5)
    d = (deltas[0] - targets[0]).abs()
    smooth = torch.where(d < 1 / 9, 0.5 * d**2 * 9, d - 0.5 / 9)
    assert box.item() == pytest.approx((smooth[0].sum() + smooth[3].sum()).item() / 5, rel=1e-5)


def test_rpn_score_thresh_drops_proposals_below_it():
    """rpn_score_thresh: a proposal whose objectness probability is below it is dropped, one exactly
    at it is kept (>=); the rest come back best first. Three disjoint boxes, so NMS keeps them all."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 40, 10, 50]])
    scores = torch.tensor([0.9, 0.3, 0.5, 0.7])
    levels = torch.zeros(4, dtype=torch.int64)
    kept, kept_scores = filter_image_proposals(boxes, scores, levels, (64, 64), RPNConfig(score_thresh=0.5), 10)
    assert kept_scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert kept.tolist() == [[0.0, 0, 10, 10], [0, 40, 10, 50], [40, 40, 50, 50]]
    everything = filter_image_proposals(boxes, scores, levels, (64, 64), RPNConfig(), 10)[1]
    assert everything.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.3])  # the default 0.0 keeps every proposal


def test_match_proposals_labels_by_hand():
    """A proposal takes its matched box's class; below the low threshold it is background (0), between
    the thresholds ignored (-1); the index is clamped to >= 0; no ground truth -> all background."""
    gt = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110]])
    gt_labels = torch.tensor([2, 3])
    proposals = torch.tensor(
        [
            [100.0, 100, 110, 110],  # IoU 1 with gt 1 -> class 3
            [50.0, 50, 60, 60],  # IoU 0 -> background
            [0.0, 0, 10, 20],  # IoU 0.5 with gt 0 -> between 0.3 and 0.7 -> ignored
            [0.0, 0, 10, 10],  # IoU 1 with gt 0 -> class 2
        ]
    )
    matched, labels = match_proposals(proposals, gt, gt_labels, Matcher(0.7, 0.3))
    assert labels.tolist() == [3, 0, -1, 2]
    assert matched.tolist() == [1, 0, 0, 0]
    no_gt = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    matched, labels = match_proposals(proposals, *no_gt, Matcher(0.5, 0.5))
    assert labels.tolist() == [0] * 4 and matched.tolist() == [0] * 4


def test_mask_head_default_layers_are_four_256_channel_convs():
    """torchvision's mask head: four 3x3 convs of 256 channels (``mask_head.<i>.0``)."""
    head = MaskRCNNHeads(8)
    shapes = [tuple(v.shape) for k, v in head.state_dict().items() if k.endswith("weight")]
    assert shapes == [(256, 8, 3, 3)] + [(256, 256, 3, 3)] * 3


def test_fastrcnn_loss_without_any_roi_is_zero_and_in_the_graph():
    """S = 0 (no proposal and no ground truth): both losses exactly 0, finite, and backward works."""
    logits = torch.zeros(0, 3, requires_grad=True)
    regression = torch.zeros(0, 12, requires_grad=True)
    cls, box = fastrcnn_loss(logits, regression, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert cls.item() == 0.0 and box.item() == 0.0
    (cls + box).backward()
    assert logits.grad is not None and regression.grad is not None


# ----------------------------------------------------------------------------- target checks, exports


def test_check_targets_names_each_malformed_target():
    """Each malformed target raises ValueError naming it: the count, the boxes', labels' and
    masks' dtypes and shapes (each was a deep error or a wrong loss)."""
    _, target = scene()  # 2 objects in a 64 x 80 image; labels 1, 2 of 3 classes
    sizes = [(64, 80)]
    check_targets([target], sizes, 3)  # a well-formed target passes
    with pytest.raises(ValueError, match="got 2 images but 1 targets"):
        check_targets([target], sizes * 2, 3)
    for bad, words in (
        ({"boxes": target["boxes"].long()}, r"\['boxes'\] must be float Tensor\[K, 4\], got torch.int64\[2, 4\]"),
        ({"boxes": target["boxes"].flatten()}, r"\['boxes'\] must be float Tensor\[K, 4\]"),
        ({"boxes": torch.zeros(2, 5)}, r"\['boxes'\] must be float Tensor\[K, 4\], got torch.float32\[2, 5\]"),
        ({"labels": target["labels"].int()}, r"\['labels'\] must be int64 Tensor\[2\], got torch.int32\[2\]"),
        ({"labels": torch.tensor([1, 2, 1])}, r"\['labels'\] must be int64 Tensor\[2\], got torch.int64\[3\]"),
        ({"masks": target["masks"][0]}, r"\['masks'\] must be Tensor\[2, H, W\], got \[64, 80\]"),
        ({"masks": target["masks"][:1]}, r"\['masks'\] must be Tensor\[2, H, W\], got \[1, 64, 80\]"),
        ({"masks": target["masks"][:, :, :40]}, "are 64x40 \\(H x W\\) but image 0 is 64x80"),
        # the second box is the bad one: the message names it, not the first
        ({"boxes": torch.tensor([[8.0, 10, 40, 30], [45, 35, 75, 35]])}, r"\['boxes'\]\[1\] = .* has no area"),
        # ... also when its bad side is x (column 0), not a y matching its index
        ({"boxes": torch.tensor([[8.0, 10, 40, 30], [45, 35, 45, 60]])}, r"\['boxes'\]\[1\] = .* has no area"),
        ({"boxes": torch.tensor([[8.0, 10, 40, 30], [45, 35, float("inf"), 60]])}, r"\['boxes'\]\[1\] = .* not finite"),
        # of two bad boxes (and two bad labels) the first is named
        ({"boxes": torch.tensor([[8.0, float("nan"), 40, 30], [45, 35, float("inf"), 60]])},
         r"\['boxes'\]\[0\] = .* not finite"),
        ({"labels": torch.tensor([1, 3])}, r"\['labels'\]\[1\] = 3 is not a class"),
    ):
        with pytest.raises(ValueError, match=words):
            check_targets([target | bad], sizes, 3)
    # the second target of two is named as such
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must be int64"):
        check_targets([target, target | {"labels": target["labels"].int()}], sizes * 2, 3)
    # an image without objects: its (empty) masks need no size
    check_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                    "masks": torch.zeros(0, 1, 1, dtype=torch.uint8)}], sizes, 3)


def test_input_contract_and_a_state_dict_without_num_batches_tracked():
    """``normalizes_input`` / ``input_mean_std`` state the transform's config (what a checkpoint's
    input contract is built from), and a model with trainable BatchNorm2d loads its own
    ``state_dict()`` (PyTorch metadata kept) with every ``num_batches_tracked`` removed, strictly:
    the missing counters start at 0 (PyTorch alone would report them missing)."""
    model = maskrcnn_resnet18_fpn(num_classes=3, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    assert model.normalizes_input is True and model.input_mean_std == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert model.transform.config.normalize is True
    model.transform.config.normalize = False
    assert model.normalizes_input is False
    state = model.state_dict()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and hasattr(state, "_metadata")
    model.backbone.body.bn1.num_batches_tracked.fill_(7)
    for key in counters:
        del state[key]
    model.load_state_dict(state, strict=True)
    assert model.backbone.body.bn1.num_batches_tracked.item() == 0


def test_every_name_maskrcnn_exports_is_there():
    assert set(maskrcnn_module.__all__) <= set(dir(maskrcnn_module))  # else `from ... import *` raises


def test_freeze_backbone_layers_keeps_the_last_stages():
    """torchvision's rule, 0..5: the last n of conv1, layer1..layer4 train (5 also bn1); fc and the
    rest are frozen; outside 0..5 a UserError."""
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"]
    body = resnet18()
    for n in range(6):
        body.requires_grad_(True)
        freeze_backbone_layers(body, n)
        trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
        assert trainable == set(stages[:n]) | ({"bn1"} if n == 5 else set()), n
    for n in (-1, 6):
        with pytest.raises(UserError, match="trainable_backbone_layers must be in 0..5"):
            freeze_backbone_layers(body, n)


def test_trainable_backbone_layers_warns_only_when_ignored_at_the_callers_line():
    with pytest.warns(UserWarning, match="trainable_backbone_layers=2 has no effect") as record:
        maskrcnn_resnet18_fpn(num_classes=3, trainable_backbone_layers=2)
    assert [w.filename for w in record] == [__file__]  # the line that passed it, not the builder's
    with pytest.warns(UserWarning, match="trainable_backbone_layers=2 has no effect") as record:
        create_model("maskrcnn_resnet18_fpn", 3, trainable_backbone_layers=2)
    assert [w.filename for w in record] == [__file__]  # ... nor the registry's (it was)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maskrcnn_resnet18_fpn(num_classes=3)  # nothing ignored, nothing said


def test_the_note_counts_classes_from_a_box_regressor_of_4_values_a_class(tmp_path):
    """A file whose first layer of another class count is bbox_pred (cls_score missing): 364 rows
    are 4 box values for each of 91 classes, and the note says 91."""
    torch.manual_seed(0)
    state = {k: v for k, v in maskrcnn_resnet18_fpn(num_classes=91).state_dict().items()
             if not k.startswith("roi_heads.box_predictor.cls_score.")}
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 364
    torch.save(state, tmp_path / "detector.pth")
    model = maskrcnn_resnet18_fpn(num_classes=4, pretrained=str(tmp_path / "detector.pth"))
    assert model.pretrained_note.startswith(
        f"maskrcnn: loaded the weights {tmp_path / 'detector.pth'} but roi_heads.box_predictor.bbox_pred, "
        "roi_heads.mask_predictor.mask_fcn_logits, which score 91 classes in the file and "
        "roi_heads.box_predictor.cls_score, which the file lacks: initialised for this model's 4 classes"), \
        model.pretrained_note
    assert torch.equal(model.roi_heads.box_head.fc6.weight, state["roi_heads.box_head.fc6.weight"])
