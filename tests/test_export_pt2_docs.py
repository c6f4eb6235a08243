"""The way docs/deploy.md runs a ``pixelwise export --format pt2`` archive without pixelwise
(torch.export.load, the metadata in pixelwise.json, the ONNX section's pre- and post-processing)
gives ``pixelwise predict``'s masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pixelwise import create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.inference.export_pt2 import META_FILE


def docs_program_predictor(path, image):
    """predict's mask from a .pt2 as docs/deploy.md runs one: torch.export.load, the metadata in
    pixelwise.json, and the ONNX section's pre- and post-processing (OpenCV resizes, numpy), no
    pixelwise."""
    import cv2

    extra = {META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra).module()
    spec = json.loads(extra[META_FILE])["input"]
    h, w = image.shape[:2]
    if spec["resize"]:
        image = cv2.resize(image, (spec["resize"][1], spec["resize"][0]), interpolation=cv2.INTER_LINEAR)
    x = image.astype(np.float32) / 255.0
    if spec["channels"] == 1:
        x = x @ np.array([[0.299], [0.587], [0.114]], np.float32)
    if spec["normalize"]:
        x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    with torch.no_grad():
        logits = program(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])))[0].numpy()
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    probs = np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in probs])
    return probs.argmax(0).astype(np.uint8)


@pytest.mark.parametrize("channels", [3, 1])
def test_a_predictor_written_from_the_docs_equals_predict(tmp_path, channels):
    """The documented way of running a .pt2 gives `pixelwise predict --checkpoint`'s masks, pixel for
    pixel, on images smaller, larger and of the contract's size, RGB and one-channel."""
    from PIL import Image

    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "in_channels": channels}
    model = create_model("unet", num_classes=4, **kwargs)
    with torch.no_grad():  # a spread of classes, with edges between them
        model.head.weight.mul_(8.0)
    mean, std = ([0.45, 0.4, 0.35], [0.2, 0.25, 0.3]) if channels == 3 else ([0.3], [0.2])
    checkpoint, out = tmp_path / "u.safetensors", tmp_path / "u.pt2"
    save_checkpoint(checkpoint, model, {"model": "unet", "num_classes": 4, "model_kwargs": kwargs, "input": {
        "mean": mean, "std": std, "normalize": True, "resize": [37, 53], "channels": channels}})
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    rng = np.random.default_rng(3)
    names = []
    for k, (h, w) in enumerate([(50, 71), (23, 31), (97, 133), (37, 53)]):
        coarse = rng.integers(0, 256, (max(h // 6, 2), max(w // 6, 2), 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"i{k}.png")
        names.append(f"i{k}")
    assert main(["predict", *[str(tmp_path / f"{n}.png") for n in names], "--out", str(tmp_path / "pred"),
                 "--no-progress", "--checkpoint", str(checkpoint)]) == 0
    for name in names:
        image = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))
        mask = np.asarray(Image.open(tmp_path / "pred" / f"{name}.png"))
        assert len(np.unique(mask)) >= 2, "degenerate prediction"
        np.testing.assert_array_equal(docs_program_predictor(out, image), mask)
