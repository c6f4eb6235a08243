"""Shared test helpers: paths to ../shared data and torchvision fixtures."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIXELWISE_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "torchvision"
CAMVID = SHARED / "data" / "camvid"
ISBI = SHARED / "data" / "isbi2012"

torch.set_num_threads(min(2, torch.get_num_threads()))


def require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (expected ../shared beside the checkout)")
    return path


def load_fixture(name: str):
    """-> (meta dict, arrays dict-like, state_dict of torch tensors or None)."""
    require(FIXTURES, "torchvision fixtures")
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    arrays = np.load(FIXTURES / f"{name}.npz")
    state = None
    if "schema" in meta:
        spec = importlib.util.spec_from_file_location("fixture_weights", FIXTURES / "weights.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sd = mod.fixture_state_dict(meta["schema"], seed=meta["weights"]["seed"])
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    return meta, arrays, state


def assert_matches(actual, expected, rtol: float = 1e-4, scaled_atol: float = 1e-4) -> None:
    """The fixture README's tolerance: |a-e| <= rtol*|e| + scaled_atol*max(1, max|e|)."""
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().cpu().numpy()
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    atol = scaled_atol * max(1.0, float(np.abs(e).max(initial=0.0)))
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def check_segmenter_fixture(builder, name: str) -> None:
    """A torchvision segmenter fixture (fcn_resnet50, deeplabv3_resnet50): strict load, then the
    backbone features, both heads and both upsampled outputs against the stored arrays."""
    meta, arrays, state = load_fixture(name)
    with torch.device("meta"):  # skip the random init: every tensor comes from the fixture
        model = builder(num_classes=21, aux_loss=True).eval()
    model.load_state_dict(state, strict=True, assign=True)
    x = torch.from_numpy(arrays["input"])
    seen = {}  # one forward pass; hooks record the backbone and head outputs on the way
    for part in ("backbone", "classifier", "aux_classifier"):
        getattr(model, part).register_forward_hook(lambda m, i, o, part=part: seen.__setitem__(part, o))
    with torch.no_grad():
        result = model(x)
    for key in ("out", "aux"):
        full = seen["backbone"][key].double()
        assert_matches(full[:, arrays[f"backbone.{key}.sel_idx"]], arrays[f"backbone.{key}.sel"])
        assert_matches(full.mean(dim=(2, 3)), arrays[f"backbone.{key}.chmean"])
    assert_matches(seen["classifier"], arrays["head.out"])
    assert_matches(seen["aux_classifier"], arrays["head.aux"])
    assert set(result) == {"out", "aux"}
    for key in ("out", "aux"):
        full = result[key]
        rows, cols = arrays[f"{key}.grid_rows"], arrays[f"{key}.grid_cols"]
        assert_matches(full[..., rows, :][..., cols], arrays[f"{key}.grid"])
        assert_matches(full.double().mean(dim=(2, 3)), arrays[f"{key}.chmean"])
