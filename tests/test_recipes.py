"""Every YAML recipe in pixelwise/configs loads into TrainConfig (no unknown keys), its augment
mappings are valid, and its model builds (on the meta device, without downloading weights)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import pixelwise
from pixelwise.data.augment import build_transform
from pixelwise.engine.config import TrainConfig, build_config, find_recipe, load_yaml_config, recipe_summary
from pixelwise.errors import UserError
from pixelwise.models import create_model, model_info

CONFIGS = Path(pixelwise.__file__).parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
NUM_CLASSES = {"camvid": 11, "voc": 21, "cityscapes": 19, "isbi2012": 2, "shapes": 4, "coco": 91}
EXPECTED = {"fcn8s_voc", "segnet_camvid", "segnet_basic_camvid", "unet_isbi", "deconvnet_voc",
            "deeplabv3plus_cityscapes", "segnet_basic_camvid_cpu", "unet_camvid_cpu", "unet_isbi_cpu",
            "fcn32s_voc", "fcn16s_voc", "fcn8s_staged_voc", "deeplab_largefov_voc"}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
PAPERS = {  # arXiv id -> title
    "1411.4038": "Fully Convolutional Networks for Semantic Segmentation",
    "1511.00561": "SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image Segmentation",
    "1505.04366": "Learning Deconvolution Network for Semantic Segmentation",
    "1505.04597": "U-Net: Convolutional Networks for Biomedical Image Segmentation",
    "1703.06870": "Mask R-CNN",
    "1706.05587": "Rethinking Atrous Convolution for Semantic Image Segmentation",
    "1802.02611": "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation",
    "1412.7062": "Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs",
}


def test_all_expected_recipes_exist():
    assert {p.stem for p in RECIPES} >= EXPECTED


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_builds(path):
    values = load_yaml_config(path)  # raises on unknown keys
    cfg = build_config(values, {})
    assert isinstance(cfg, TrainConfig)
    assert set(values) <= set(cfg.to_dict())
    for key, value in values.items():
        if key != "epochs" or not cfg.stages:
            assert getattr(cfg, key) == value, key
    for _, stage in cfg.stage_configs():
        build_transform(stage.augment, train=True)
        build_transform({k: v for k, v in stage.augment.items() if k == "resize"}, train=False)
    assert model_info(cfg.model).task in ("semantic", "instance")
    with torch.device("meta"):
        model = create_model(cfg.model, num_classes=NUM_CLASSES[cfg.dataset], **cfg.model_kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_cites_its_paper_and_is_documented(path):
    text = path.read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) >= 4, "each recipe explains the paper's setup and its differences"
    prose = " ".join(" ".join(line.lstrip("#").split()) for line in comments)
    cited = {arxiv for arxiv, title in PAPERS.items() if f"{title}" in prose and f"arXiv:{arxiv}" in prose}
    assert cited, "each recipe cites its paper by title and arXiv id"
    assert "papers.md" not in text, "cite papers, not files outside the repository"
    assert "Differences here" in text or "CPU" in text
    if DOCS.exists():
        assert path.name in DOCS.read_text(), f"{path.name} is not described in docs/recipes.md"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_holds_no_machine_paths(path):
    values = load_yaml_config(path)
    assert "data" not in values and "out" not in values, "data comes from --data, out defaults to runs/<recipe>"
    assert not re.search(r"(^|[\s'\"])(/tmp|/work|/home|/Users|~)/", path.read_text(), re.M)
    cfg = build_config(values, {}, recipe=path.stem)
    assert cfg.out == f"runs/{path.stem}" and cfg.data is None


def test_docs_hold_no_machine_paths_and_cite_papers():
    text = DOCS.read_text()
    assert not re.search(r"(/tmp/|/work/|/home/|/Users/)", text)
    assert "papers.md" not in text
    for arxiv in ("1411.4038", "1511.00561", "1505.04366", "1505.04597", "1703.06870", "1802.02611"):
        assert f"arXiv:{arxiv}" in text, arxiv
    commands = [line for line in text.splitlines() if line.startswith("pixelwise train")]
    assert commands and all("--config " in c and ".yaml" not in c for c in commands), commands


@pytest.mark.parametrize("name", ["segnet_basic_camvid_cpu", "unet_camvid_cpu", "unet_isbi_cpu"])
def test_results_recipes_have_a_budget(name):
    cfg = build_config(load_yaml_config(find_recipe(name)), {}, recipe=name)
    assert cfg.max_minutes is not None and cfg.out == f"runs/{name}"


def test_recipes_are_found_by_name_or_path(tmp_path):
    assert find_recipe("unet_camvid_cpu") == CONFIGS / "unet_camvid_cpu.yaml"
    assert find_recipe("unet_camvid_cpu.yaml") == CONFIGS / "unet_camvid_cpu.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("model: unet\n")
    assert find_recipe(str(own)) == own
    with pytest.raises(UserError, match="neither a file nor a bundled recipe; bundled: .*unet_camvid_cpu"):
        find_recipe("unet_camvid")
    with pytest.raises(UserError, match="bundled: "):
        find_recipe(str(tmp_path / "missing.yaml"))
    assert build_config({"model": "fcn8s"}, {}).out == "runs/fcn8s"
    assert build_config({"model": "fcn8s"}, {"out": "elsewhere"}, recipe="fcn8s_voc").out == "elsewhere"


def test_model_kwargs_merge_for_the_recipes_model_only():
    recipe = {"model": "unet", "model_kwargs": {"base_channels": 16, "batch_norm": True}}
    same = build_config(recipe, {"model_kwargs": {"base_channels": 32}})
    assert same.model_kwargs == {"base_channels": 32, "batch_norm": True}
    assert build_config(recipe, {"model": "unet"}).model_kwargs == recipe["model_kwargs"]
    # another --model: the recipe's U-Net options are not passed to it
    other = build_config(recipe, {"model": "segnet_basic"})
    assert other.model == "segnet_basic" and other.model_kwargs == {}
    given = build_config(recipe, {"model": "segnet_basic", "model_kwargs": {"lrn": False}})
    assert given.model_kwargs == {"lrn": False}
    assert recipe["model_kwargs"] == {"base_channels": 16, "batch_norm": True}  # the caller's values untouched


def test_lr_mult_merges_key_by_key_and_stays_with_the_recipes_model():
    recipe = {"model": "deeplab_largefov", "lr_mult": {"fc8": 10}}
    assert build_config(recipe, {"lr_mult": {"fc7": 2}}).lr_mult == {"fc8": 10.0, "fc7": 2.0}
    assert build_config(recipe, {"lr_mult": {"fc8": 5}}).lr_mult == {"fc8": 5.0}
    assert build_config(recipe, {"model": "unet"}).lr_mult == {}  # names layers of the recipe's model
    assert build_config(recipe, {"model": "unet", "lr_mult": {"head": 3}}).lr_mult == {"head": 3.0}


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "unet", "learning_rate": 0.1}))
    with pytest.raises(UserError, match="learning_rate"):
        load_yaml_config(bad)


def test_fcn_staged_recipes_chain_32s_16s_8s():
    """Each stage starts from the best checkpoint the previous recipe writes to its default folder,
    at a 100x lower learning rate (CVPR Sec. 4.2; the reference solvers 1e-10, 1e-12, 1e-14)."""
    names = ["fcn32s_voc", "fcn16s_voc", "fcn8s_staged_voc"]
    cfgs = [build_config(load_yaml_config(find_recipe(n)), {}, recipe=n) for n in names]
    assert [c.model for c in cfgs] == ["fcn32s", "fcn16s", "fcn8s"]
    assert cfgs[0].pretrained == "imagenet"
    for prev, cfg in zip(cfgs, cfgs[1:]):
        assert cfg.pretrained == f"{prev.out}/best.safetensors"
        assert cfg.lr == pytest.approx(prev.lr / 100)
    assert all(not c.model_kwargs.get("at_once") for c in cfgs)
    at_once = build_config(load_yaml_config(find_recipe("fcn8s_voc")), {})
    assert at_once.model_kwargs == {"at_once": True} and at_once.pretrained == "imagenet"


def test_recipe_summary_names_the_file_its_model_dataset_and_first_comment(tmp_path):
    path = tmp_path / "my_run.yaml"
    path.write_text("model: fcn8s\n#  FCN-8s, my own run  \ndataset: voc\n# second comment\n")
    assert recipe_summary(path) == {"name": "my_run", "model": "fcn8s", "dataset": "voc",
                                    "description": "FCN-8s, my own run"}
    (tmp_path / "bare.yaml").write_text("epochs: 2\n")
    assert recipe_summary(tmp_path / "bare.yaml") == {"name": "bare", "model": "-", "dataset": "-", "description": ""}
