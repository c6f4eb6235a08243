"""maskrcnn_resnet50_fpn against torchvision 0.28's fixture (see the fixture README).

The model is built once per module; every stage is run once with the plain fixture weights
and once with the tempered ones (``backbone.fpn.layer_blocks.*`` times 2**-10), and the tests
compare the stored results stage by stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_matches, load_fixture
from pixelwise.models.maskrcnn import maskrcnn_resnet50_fpn

NAME = "maskrcnn_resnet50_fpn"
LEVELS = ["0", "1", "2", "3", "pool"]


def tempered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v * 2.0**-10 if k.startswith("backbone.fpn.layer_blocks.") else v for k, v in state.items()}


def run_stages(model, ref) -> dict:
    """Every intermediate the fixture stores, computed the way make_fixtures.py describes."""
    out: dict = {}
    images = [torch.from_numpy(ref["image0"]), torch.from_numpy(ref["image1"])]
    fixed = [torch.from_numpy(ref["fixed_proposals.0"]), torch.from_numpy(ref["fixed_proposals.1"])]
    with torch.no_grad():
        batch, _ = model.transform(images)
        out["batch"] = batch
        out["resize"] = model.transform([torch.from_numpy(ref["transform_resize.image"])])[0]
        features = model.backbone(batch.tensors)
        out["features"] = features
        out["rpn_head"] = model.rpn.head(list(features.values()))
        out["anchors"] = model.rpn.anchors(batch, list(features.values()))
        out["proposals"] = model.rpn(batch, features)[0]
        heads = model.roi_heads
        out["box_roi_pool"] = heads.box_roi_pool(features, fixed, batch.image_sizes)
        out["box_head"] = heads.box_head(out["box_roi_pool"])
        out["class_logits"], out["box_regression"] = heads.box_predictor(out["box_head"])
        out["mask_roi_pool"] = heads.mask_roi_pool(features, fixed, batch.image_sizes)
        out["mask_head"] = heads.mask_head(out["mask_roi_pool"])
        out["mask_logits"] = heads.mask_predictor(out["mask_head"])
        out["fixed_detections"] = heads(features, fixed, batch.image_sizes)
        out["detections"] = model(images)
    return out


@pytest.fixture(scope="module")
def fx():
    meta, ref, state = load_fixture(NAME)
    kwargs = {k: v for k, v in meta["constructor_kwargs"].items() if not k.startswith("weights")}
    model = maskrcnn_resnet50_fpn(**kwargs)  # num_classes=91, min_size=128, max_size=256
    model.eval()
    model.load_state_dict(state, strict=True)
    for key, value in meta["attributes_set_after_construction"].items():
        setattr(model.roi_heads, key.split(".", 1)[1], value)
    plain = run_stages(model, ref)
    model.load_state_dict(tempered(state), strict=True)
    warm = run_stages(model, ref)
    plain["model"] = model
    return meta, ref, plain, warm


def check_reduced(full: torch.Tensor, ref, key: str) -> None:
    """Compare a tensor with its stored ``.sel`` / ``.chmean`` reductions."""
    full = full.double()
    assert_matches(full[:, torch.from_numpy(ref[key + ".sel_idx"])], ref[key + ".sel"])
    assert_matches(full.flatten(2).mean(-1), ref[key + ".chmean"])


def test_state_dict_schema_matches_torchvision(fx):
    meta, _, plain, _ = fx
    model = plain["model"]  # built without weights: BatchNorm2d, as torchvision's
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert ours == meta["schema"]  # same keys, shapes, dtypes and order
    # torchvision's documented count (FrozenBatchNorm2d has buffers, not parameters)
    norm = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) - norm == 44_401_393


def test_transform_batch_and_sizes(fx):
    _, ref, plain, _ = fx
    assert_matches(plain["batch"].tensors, ref["transform.batch"])
    assert plain["batch"].image_sizes == [tuple(s) for s in ref["transform.image_sizes"].tolist()]


def test_transform_resize(fx):
    _, ref, plain, _ = fx
    batch = plain["resize"]
    assert tuple(batch.tensors.shape) == (1, 3, 128, 192)
    assert batch.image_sizes == [tuple(s) for s in ref["transform_resize.image_sizes"].tolist()]
    rows, cols = (
        torch.from_numpy(ref["transform_resize.batch.grid_rows"]),
        torch.from_numpy(ref["transform_resize.batch.grid_cols"]),
    )
    assert_matches(batch.tensors[..., rows, :][..., cols], ref["transform_resize.batch.grid"])
    assert_matches(batch.tensors.double().mean((-2, -1)), ref["transform_resize.batch.chmean"])


@pytest.mark.parametrize("level", LEVELS)
def test_fpn_levels(fx, level):
    _, ref, plain, warm = fx
    check_reduced(plain["features"][level], ref, f"fpn.{level}")
    assert_matches(warm["features"][level].double().mean((-2, -1)), ref[f"tempered.fpn.{level}.chmean"])


@pytest.mark.parametrize("variant", ["", "tempered."])
def test_rpn_head(fx, variant):
    _, ref, plain, warm = fx
    logits, deltas = (warm if variant else plain)["rpn_head"]
    for i in range(5):
        assert_matches(logits[i], ref[f"{variant}rpn.objectness.{i}"])
        assert_matches(deltas[i], ref[f"{variant}rpn.bbox_deltas.{i}"])


def test_anchors(fx):
    _, ref, plain, _ = fx
    assert plain["anchors"].shape == (6402, 4)
    assert_matches(plain["anchors"], ref["rpn.anchors"])


@pytest.mark.parametrize("variant", ["", "tempered."])
def test_proposals(fx, variant):
    _, ref, plain, warm = fx
    proposals = (warm if variant else plain)["proposals"]
    for i in range(2):
        expected = ref[f"{variant}rpn.proposals.{i}"]
        assert proposals[i].shape[0] == expected.shape[0]
        assert_matches(proposals[i], expected)


def test_fixed_proposal_pooling_and_heads(fx):
    meta, ref, plain, warm = fx
    check_reduced(plain["box_roi_pool"], ref, "fixed.box_roi_pool")
    check_reduced(plain["mask_roi_pool"], ref, "fixed.mask_roi_pool")
    check_reduced(plain["mask_head"], ref, "fixed.mask_head")
    check_reduced(plain["mask_logits"], ref, "fixed.mask_logits")
    for key in ("box_head", "class_logits", "box_regression"):
        assert_matches(plain[key], ref[f"fixed.{key}"])
        assert_matches(warm[key], ref[f"tempered.fixed.{key}"])
    check_reduced(warm["mask_head"], ref, "tempered.fixed.mask_head")
    check_reduced(warm["mask_logits"], ref, "tempered.fixed.mask_logits")
    # tempered pooling is exactly the plain pooling times 2**-10 (README)
    assert torch.equal(warm["box_roi_pool"], plain["box_roi_pool"] * 2.0**-10)


@pytest.mark.parametrize("variant", ["", "tempered."])
def test_fixed_proposal_detections(fx, variant):
    _, ref, plain, warm = fx
    detections = (warm if variant else plain)["fixed_detections"]
    for i, det in enumerate(detections):
        key = f"{variant}fixed.detections.{i}"
        assert det["scores"].shape[0] == ref[f"{key}.scores"].shape[0]
        assert torch.equal(det["labels"], torch.from_numpy(ref[f"{key}.labels"]))
        for field in ("boxes", "scores", "masks"):
            assert_matches(det[field], ref[f"{key}.{field}"])


@pytest.mark.parametrize("variant", ["", "tempered."])
def test_full_model_detections(fx, variant):
    _, ref, plain, warm = fx
    detections = (warm if variant else plain)["detections"]
    for i, det in enumerate(detections):
        key = f"{variant}detections.{i}"
        assert det["scores"].shape[0] == ref[f"{key}.scores"].shape[0]
        assert torch.equal(det["labels"], torch.from_numpy(ref[f"{key}.labels"]))
        assert_matches(det["boxes"], ref[f"{key}.boxes"])
        assert_matches(det["scores"], ref[f"{key}.scores"])
        masks = det["masks"]
        assert masks.shape[1:] == (1, *ref[f"image{i}"].shape[1:])
        rows = torch.from_numpy(ref[f"{key}.masks.grid_rows"])
        cols = torch.from_numpy(ref[f"{key}.masks.grid_cols"])
        assert_matches(masks[..., rows, :][..., cols], ref[f"{key}.masks.grid"])
        assert_matches(masks.double().mean((-2, -1)), ref[f"{key}.masks.chmean"])
        assert_matches(masks.double().sum((-3, -2, -1)), ref[f"{key}.masks.sum"])


def test_tempered_detections_are_meaningful(fx):
    """Guards the test itself: the tempered reference has 20 detections per image."""
    _, ref, _, warm = fx
    assert [d["scores"].shape[0] for d in warm["detections"]] == [20, 20]
    assert np.unique(ref["tempered.detections.0.scores"]).size == 20
