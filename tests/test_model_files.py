"""How the model files are put together: one index-carrying encoder, DeconvNet on its own feet
(function-level imports are checked package-wide in test_architecture.py)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pixelwise"
MODEL_FILES = sorted([*SRC.glob("models/**/*.py"), *SRC.glob("backbones/*.py"), SRC / "layers.py"])


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_deconvnet_does_not_import_segnet():
    imported = _imported_modules(_tree(SRC / "models" / "deconvnet.py"))
    assert not any(name.startswith("pixelwise.models.segnet") for name in imported), imported
    assert {"pixelwise.layers", "pixelwise.backbones.vgg", "pixelwise.models._utils"} <= imported


def test_only_the_vgg_encoder_and_enets_downsampling_keep_pooling_indices():
    """``max_pool2d(..., return_indices=True)`` is called in two places: backbones/vgg.py (the
    encoder SegNet and DeconvNet share) and ENet's downsampling bottleneck, whose main branch is that
    pool; both unpool with :func:`pixelwise.layers.unpool`."""
    callers = []
    for path in MODEL_FILES:
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if "max_pool" in name and any(k.arg == "return_indices" for k in node.keywords):
                callers.append(path.relative_to(SRC).as_posix())
    assert callers == ["backbones/vgg.py", "models/enet.py"]
    for decoder in ("models/segnet.py", "models/deconvnet.py", "models/enet.py"):
        assert "pixelwise.layers" in _imported_modules(_tree(SRC / decoder)), decoder

