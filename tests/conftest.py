"""Shared test helpers: paths to ../shared data and torchvision fixtures, a tiny ISBI folder."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

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


def write_isbi_tree(root: Path, rng: np.random.Generator, count: int = 6, size: int = 48) -> None:
    """An isbi2012 folder of ``count`` noisy slices whose membranes are random full rows and columns."""
    (root / "train" / "image").mkdir(parents=True)
    (root / "train" / "label").mkdir(parents=True)
    for i in range(count):
        cells = np.ones((size, size), np.uint8) * 255
        cells[rng.integers(0, size, 4), :] = 0
        cells[:, rng.integers(0, size, 4)] = 0
        image = np.clip(cells.astype(float) * 0.7 + rng.normal(40, 30, cells.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image, mode="L").save(root / "train" / "image" / f"{i}.png")
        Image.fromarray(cells, mode="L").save(root / "train" / "label" / f"{i}.png")


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


def narrow(model: nn.Module, divisor: int = 8, keep: int = 16) -> nn.Module:
    """The same architecture with every channel count above ``keep`` divided by ``divisor``
    (input channels and class counts stay): convolutions and norms are rebuilt, randomly
    initialised; the FCN scorers (zero-initialised in the paper) become random too, and
    BatchNorm statistics non-trivial, so that the logits are not trivially equal. Models under a
    million parameters (ENet) are fast already and keep their widths (``divisor`` 1): ENet's
    downsampling blocks widen 16 channels to 64 and 128, which narrowing would invert."""
    if sum(p.numel() for p in model.parameters()) < 1_000_000:
        divisor = 1

    def n(c: int) -> int:
        return c // divisor if c > keep else c

    g = torch.Generator().manual_seed(0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if type(child) in (nn.Conv2d, nn.ConvTranspose2d):  # not BilinearUpsample (class channels)
                groups = child.groups if child.groups == 1 else n(child.groups)
                new = type(child)(n(child.in_channels), n(child.out_channels), child.kernel_size,  # type: ignore[arg-type]
                                  child.stride, child.padding, dilation=child.dilation, groups=groups,
                                  bias=child.bias is not None)
                if isinstance(child, nn.ConvTranspose2d):
                    new.output_padding = child.output_padding  # type: ignore[union-attr]
            elif isinstance(child, nn.InstanceNorm2d):  # U-Net's IBN: its halves narrow with it
                new = nn.InstanceNorm2d(n(child.num_features), child.eps, affine=child.affine)
            elif isinstance(child, nn.BatchNorm2d):
                new = nn.BatchNorm2d(n(child.num_features), child.eps, child.momentum)
                new.running_mean.uniform_(-0.1, 0.1, generator=g)  # type: ignore[union-attr]
                new.running_var.uniform_(0.5, 2.0, generator=g)  # type: ignore[union-attr]
                new.weight.data.uniform_(0.5, 1.5, generator=g)
            if new is not None:
                if not new.weight.abs().any():
                    new.weight.data.normal_(0, 0.1, generator=g)
                setattr(parent, name, new)
    return model.eval()


async def wait_for(condition, what: str) -> None:
    """Await until ``condition()`` is true (the serve tests' requests reaching a state)."""
    for _ in range(6000):  # a state to reach, not a time to measure: give up after a minute
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached: {what}")


def edit_safetensors(src: Path, dst: Path, key: str, meta_edit=None, tensor_edit=None) -> Path:
    """The pixelwise safetensors file ``src`` written to ``dst`` with its JSON metadata under ``key``
    and/or its tensors edited in place by the callables given (damage, or a hand edit)."""
    from safetensors import safe_open

    from pixelwise.checkpoint import atomic_save_tensors

    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()[key])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a handle, not a dict
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    atomic_save_tensors(tensors, dst, {key: json.dumps(meta)})
    return dst


def docs_mask(spec: dict, image: np.ndarray, run) -> np.ndarray:
    """predict's mask by docs/deploy.md's pre- and post-processing steps alone (OpenCV resizes,
    numpy), around ``run``: the exported model, float32[1, C, h, w] -> logits [classes, h, w]."""
    import cv2

    h, w = image.shape[:2]
    if spec["resize"]:
        image = cv2.resize(image, (spec["resize"][1], spec["resize"][0]), interpolation=cv2.INTER_LINEAR)
    x = image.astype(np.float32) / 255.0
    if spec["channels"] == 1:
        x = x @ np.array([[0.299], [0.587], [0.114]], np.float32)
    if spec["normalize"]:
        x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    logits = run(np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32))
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    probs = np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in probs])
    return probs.argmax(0).astype(np.uint8)


def docs_images(folder: Path) -> list[str]:
    """Four smooth noisy images (smaller, larger, mixed and the docs tests' contract size 37x53)
    saved as ``folder/i<k>.png``; their stems."""
    rng = np.random.default_rng(3)
    names = []
    for k, (h, w) in enumerate([(50, 71), (23, 31), (97, 133), (37, 53)]):
        coarse = rng.integers(0, 256, (max(h // 6, 2), max(w // 6, 2), 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"i{k}.png")
        names.append(f"i{k}")
    return names
