"""The way docs/deploy.md runs a ``pixelwise export --format pt2`` archive without pixelwise
(torch.export.load, the metadata in pixelwise.json, the ONNX section's pre- and post-processing)
gives ``pixelwise predict``'s masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import docs_images, docs_mask
from pixelwise import create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.inference.export_pt2 import META_FILE


def docs_program_predictor(path, image):
    """predict's mask from a .pt2 as docs/deploy.md runs one: torch.export.load, the metadata in
    pixelwise.json, and the ONNX section's pre- and post-processing, no pixelwise."""
    extra = {META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra).module()

    def run(x):
        with torch.no_grad():
            return program(torch.from_numpy(x))[0].numpy()

    return docs_mask(json.loads(extra[META_FILE])["input"], image, run)


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
    names = docs_images(tmp_path)
    assert main(["predict", *[str(tmp_path / f"{n}.png") for n in names], "--out", str(tmp_path / "pred"),
                 "--no-progress", "--checkpoint", str(checkpoint)]) == 0
    for name in names:
        image = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))
        mask = np.asarray(Image.open(tmp_path / "pred" / f"{name}.png"))
        assert len(np.unique(mask)) >= 2, "degenerate prediction"
        np.testing.assert_array_equal(docs_program_predictor(out, image), mask)
