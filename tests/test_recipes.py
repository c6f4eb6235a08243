"""Every YAML recipe in pixelwise/configs loads into TrainConfig (no unknown keys), its augment
mappings are valid, and its model builds (on the meta device, without downloading weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import pixelwise
from pixelwise.data.augment import build_transform
from pixelwise.engine.config import TrainConfig, build_config, load_yaml_config
from pixelwise.errors import UserError
from pixelwise.models import create_model, model_info

CONFIGS = Path(pixelwise.__file__).parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
NUM_CLASSES = {"camvid": 11, "voc": 21, "cityscapes": 19, "isbi2012": 2, "shapes": 4, "coco": 91}
EXPECTED = {"fcn8s_voc", "segnet_camvid", "segnet_basic_camvid", "unet_isbi", "deconvnet_voc",
            "deeplabv3plus_cityscapes", "segnet_basic_camvid_cpu", "unet_camvid_cpu", "unet_isbi_cpu"}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


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
    assert len(comments) >= 4 and "papers.md" in text, "each recipe explains the paper's setup and its differences"
    assert "Differences here" in text or "CPU" in text
    if DOCS.exists():
        assert path.name in DOCS.read_text(), f"{path.name} is not described in docs/recipes.md"


@pytest.mark.parametrize("name", ["segnet_basic_camvid_cpu", "unet_camvid_cpu", "unet_isbi_cpu"])
def test_results_recipes_have_a_budget_and_write_outside_the_repo(name):
    cfg = build_config(load_yaml_config(CONFIGS / f"{name}.yaml"), {})
    assert cfg.out.startswith("/tmp/pixelwise_runs/") and cfg.max_minutes is not None


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "unet", "learning_rate": 0.1}))
    with pytest.raises(UserError, match="learning_rate"):
        load_yaml_config(bad)
