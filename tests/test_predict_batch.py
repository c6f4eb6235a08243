"""Batched prediction: images and tiles run stacked with the results of one at a time; folders
and glob patterns expand to their images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise import create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.data.io import read_mask
from pixelwise.errors import UserError
from pixelwise.inference.predictor import SemanticPredictor
from pixelwise.inference.writers import expand_inputs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("unet", num_classes=3, base_channels=4, batch_norm=True, dropout=0.0).eval()
    with torch.no_grad():
        m.head.weight.mul_(6.0)
    return m


def _batch_sizes(model):
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_predict_batch_stacks_equal_sizes_and_matches_one_at_a_time(model):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8)
              for shape in [(40, 48, 3), (33, 20, 3), (40, 48, 3), (40, 48, 3), (40, 48, 3), (40, 48, 3), (90, 80, 3)]]
    p = SemanticPredictor(model, {"num_classes": 3}, tile=64, batch_size=4)
    single = [p.predict(image) for image in images]
    sizes, handle = _batch_sizes(model)
    batched = p.predict_batch(images)
    handle.remove()
    # five 40 x 48 images: 4 + 1; the 33 x 20 alone; the 90 x 80 image in 4 tiles of 2 sizes
    assert sorted(sizes[:3]) == [1, 1, 4] and sum(sizes) == 7 - 1 + 4
    for a, b in zip(single, batched):
        np.testing.assert_array_equal(a.mask, b.mask)
        # a batch of 4 runs other oneDNN kernels (another summation order) than a batch of 1: float32
        # rounding, seen up to 1.0e-5 on one CI run; the masks above must be equal
        torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=1e-4)


def test_tiles_run_in_batches(model):
    image = np.random.default_rng(1).integers(0, 255, (130, 140, 3), dtype=np.uint8)
    one = SemanticPredictor(model, {"num_classes": 3}, tile=32, batch_size=1).predict(image)
    sizes, handle = _batch_sizes(model)
    four = SemanticPredictor(model, {"num_classes": 3}, tile=32, batch_size=4).predict(image)
    handle.remove()
    assert max(sizes) == 4
    np.testing.assert_array_equal(one.mask, four.mask)
    torch.testing.assert_close(one.probs, four.probs, rtol=0, atol=1e-4)  # kernels of batch 1 and 4: float32 rounding


@pytest.mark.parametrize("name", ["enet", "segnet_basic"])
def test_index_unpooling_models_run_one_input_at_a_time_so_batching_changes_nothing(name):
    """A stacked batch's float32 rounding moved the maxima of nearly tied pooling windows, and index
    unpooling put their values on other pixels: ENet's tiled probabilities moved by 1e-3 between
    --batch-size 1 and 4 (0.1 on a CamVid crop, 6 pixels of another class), far beyond rounding."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    rng = np.random.default_rng(0)
    blocky = [np.kron(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
              for _ in range(3)]  # flat 8x8 blocks: pooling windows of nearly equal values
    meta = {"model": name, "num_classes": 3}
    sizes, handle = _batch_sizes(model)
    one = [SemanticPredictor(model, meta, tile=48, batch_size=1).predict(image) for image in blocky]
    four = [SemanticPredictor(model, meta, tile=48, batch_size=4).predict(image) for image in blocky]
    stacked = SemanticPredictor(model, meta, batch_size=4).predict_batch(blocky)
    alone = [SemanticPredictor(model, meta).predict(image) for image in blocky]
    handle.remove()
    assert set(sizes) == {1}
    for a, b, c, d in zip(one, four, stacked, alone):
        assert torch.equal(a.probs, b.probs) and torch.equal(c.probs, d.probs)


def test_rows_stream_the_mask_of_predict(model):
    images = [np.random.default_rng(2).integers(0, 255, (120, 50, 3), dtype=np.uint8), np.zeros((20, 30, 3), np.uint8)]
    p = SemanticPredictor(model, {"num_classes": 3}, tile=32)
    for image, rows in zip(images, p.predict_rows(images, uncertainty=True)):
        bands = list(rows)
        want = p.predict(image, uncertainty=True)
        assert [y for y, _, _ in bands] == sorted({y for y, _, _ in bands}) and bands[0][0] == 0
        assert (len(bands) > 1) == p.needs_tiles(image)
        np.testing.assert_array_equal(np.concatenate([m for _, m, _ in bands]), want.mask)
        np.testing.assert_allclose(np.concatenate([e for _, _, e in bands]), want.uncertainty, atol=1e-6)


def test_folders_and_globs_expand_to_images(tmp_path):
    for name in ["b.png", "a.jpg", "c.txt", "sub/d.png", ".hidden.png", "sub/deeper/e.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    # a folder: its images, not its subfolders', and no hidden file, as a glob pattern leaves them out
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.jpg", "b.png"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.png"), str(tmp_path / "s*" / "*")])] == ["b.png", "d.png"]
    # ** spans folders (none, one or more), as in a shell with globstar
    assert [p.name for p in expand_inputs([str(tmp_path / "**" / "*.png")])] == ["b.png", "d.png", "e.png"]
    with pytest.raises(UserError, match="no images match"):
        expand_inputs([str(tmp_path / "*.tif")])


def test_predict_cli_runs_a_glob_one_image_at_a_time(model, tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", model, {"model": "unet", "num_classes": 3, "task": "semantic",
                                                        "model_kwargs": {"base_channels": 4, "batch_norm": True,
                                                                         "dropout": 0.0}})
    rng = np.random.default_rng(3)
    images = {f"im{i}": rng.integers(0, 255, (24, 40, 3), dtype=np.uint8) for i in range(5)}
    for stem, image in images.items():
        Image.fromarray(image).save(tmp_path / f"{stem}.png")
    calls = []  # the CLI loads its own model from the file: count its forward passes through the class
    original = type(model).forward

    def counting(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    type(model).forward = counting
    try:
        assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), str(tmp_path / "im*.png"),
                     "--out", str(tmp_path / "out"), "--batch-size", "3", "--no-progress"]) == 0
    finally:
        type(model).forward = original
    assert calls == [1] * 5  # one image per pass, as eval and serve run them: the masks are theirs, bit for bit
    p = SemanticPredictor(model, {"num_classes": 3})
    for stem, image in images.items():
        np.testing.assert_array_equal(read_mask(tmp_path / "out" / f"{stem}.png"), p.predict(image).mask)
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), str(tmp_path / "im0.png"),
                 "--out", str(tmp_path / "o2"), "--batch-size", "0"]) == 2


def test_monte_carlo_dropout_does_not_depend_on_batching():
    """Each input draws its own seeded dropout masks: stacking images (predict_batch) or tiles
    (--batch-size) gives what one at a time gives, not other masks for other neighbours."""
    torch.manual_seed(0)
    m = create_model("unet", num_classes=3, base_channels=4, batch_norm=True, dropout=0.5).eval()
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for _ in range(3)]
    p = SemanticPredictor(m, {"num_classes": 3}, mc_samples=3, batch_size=4)
    for a, b in zip([p.predict(i, uncertainty=True) for i in images], p.predict_batch(images, uncertainty=True)):
        np.testing.assert_array_equal(a.mask, b.mask)
        torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=1e-5)
    big = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    one = SemanticPredictor(m, {"num_classes": 3}, mc_samples=3, tile=16, batch_size=1).predict(big)
    four = SemanticPredictor(m, {"num_classes": 3}, mc_samples=3, tile=16, batch_size=4).predict(big)
    np.testing.assert_array_equal(one.mask, four.mask)
    torch.testing.assert_close(one.probs, four.probs, rtol=0, atol=1e-5)


def test_expand_inputs_says_not_found_and_hints_at_subfolders_only_where_they_hold_images(tmp_path):
    # a missing file without wildcards is not taken for a pattern that matches nothing
    with pytest.raises(UserError, match=r"input \S*none\.png not found; check the path"):
        expand_inputs([str(tmp_path / "none.png")])
    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.txt").write_text("no image")
    with pytest.raises(UserError, match="no images found in") as caught:
        expand_inputs([str(folder)])
    assert "holds none directly" not in str(caught.value)  # no hint: its subfolder holds no image either
    (folder / "sub" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="holds none directly but its subfolders do"):
        expand_inputs([str(folder)])
