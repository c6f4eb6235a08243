"""How the model files are put together (issue 10): one index-carrying encoder, DeconvNet on its
own feet, no function-level imports without a reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


def test_only_the_vgg_encoder_keeps_pooling_indices():
    """``max_pool2d(..., return_indices=True)`` is called in one place: backbones/vgg.py."""
    callers = []
    for path in MODEL_FILES:
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if "max_pool" in name and any(k.arg == "return_indices" for k in node.keywords):
                callers.append(path.relative_to(SRC).as_posix())
    assert callers == ["backbones/vgg.py"]


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.relative_to(SRC).as_posix())
def test_function_level_imports_say_why(path):
    """Imports inside functions only for optional dependencies or start-up time, with a comment."""
    lines = path.read_text().splitlines()
    for func in ast.walk(_tree(path)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import | ast.ImportFrom):
                here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                assert "#" in here or above.strip().startswith("#"), f"{path.name}:{node.lineno} {here.strip()}"
