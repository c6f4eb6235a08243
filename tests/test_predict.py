import glob
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from pixelwise import Predictor, SemanticPredictor, create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.data.io import read_image, write_mask
from pixelwise.data.palette import colorize, overlay, palette_bytes
from pixelwise.data.shapes import CLASS_NAMES, PALETTE
from pixelwise.errors import UserError
from pixelwise.inference import cancel, writers
from pixelwise.inference import predictor as predictor_module
from pixelwise.inference.predictor import UPSAMPLE_ROWS
from pixelwise.inference.writers import (
    _name_length,
    _name_max,
    check_predict,
    instance_colors,
    pattern_reaches,
    plan_images,
    predict_files,
)
from pixelwise.preprocess import InputSpec

KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    model = create_model("unet", num_classes=4, **KW).eval()
    save_checkpoint(path, model, {"model": "unet", "num_classes": 4, "model_kwargs": KW, "task": "semantic",
                                  "class_names": CLASS_NAMES, "palette": PALETTE,
                                  "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


def _write_odd_images(folder):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    paths = {}
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray((rng.integers(0, 65535, (29, 41))).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    # EXIF orientation 6 (rotate 90 CW on display): the displayed image is 53 x 37 (H x W)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif.tobytes())
    for name, expected in [("rgb.png", (37, 53)), ("gray.png", (37, 53)), ("rgba.png", (37, 53)),
                           ("deep16.png", (29, 41)), ("palette.png", (37, 53)), ("photo.jpg", (37, 53)),
                           ("rotated.jpg", (53, 37))]:
        paths[name] = expected
    return paths


def test_predict_cli_on_odd_image_modes(checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    expected = _write_odd_images(inputs)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(inputs), "--out", str(out), "--no-progress"]) == 0
    for name, (h, w) in expected.items():
        stem = name.rsplit(".", 1)[0]
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P", name
        assert mask.size == (w, h), name
        assert set(np.unique(np.array(mask))) <= set(range(4))
        assert Image.open(out / f"{stem}_overlay.png").size == (w, h)


def test_predict_cli_uncertainty_and_tiles(checkpoint, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "o"
    assert main(["predict", "--checkpoint", str(checkpoint), str(img), "--out", str(out), "--tile", "32",
                 "--tta", "--uncertainty", "--no-progress"]) == 0
    u = Image.open(out / "a_uncertainty.png")
    assert u.size == (90, 70) and u.mode == "L"


def test_bad_inputs_give_one_line_errors(checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buf, format="PNG")
    bad.write_bytes(buf.getvalue()[:40])
    assert main(["predict", "--checkpoint", str(checkpoint), str(bad), "--out", str(tmp_path / "o")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("pixelwise: error:") and "broken.png" in errors[0]
    assert main(["predict", "--checkpoint", str(tmp_path / "missing.safetensors"), str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


class _PixelModel(nn.Module):
    """A 1x1-conv model: each pixel's logits depend on that pixel only, so tiling must not change them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(x)


def test_tiled_prediction_equals_whole_image_for_pointwise_model():
    image = np.random.default_rng(2).integers(0, 255, (75, 101, 3), dtype=np.uint8)
    whole = SemanticPredictor(_PixelModel(), {"num_classes": 5}).predict_probs(image)
    tiled = SemanticPredictor(_PixelModel(), {"num_classes": 5}, tile=32, overlap=0.3).predict_probs(image)
    assert whole.shape == (5, 75, 101)
    assert torch.allclose(whole, tiled, atol=1e-6)
    for mode in ("flip", "d4"):  # a pointwise model is equivariant to flips and rotations
        averaged = SemanticPredictor(_PixelModel(), {"num_classes": 5}, tta=mode).predict_probs(image)
        assert torch.allclose(whole, averaged, atol=1e-6), mode


def test_tiled_probabilities_are_whole_when_the_class_count_equals_the_image_height():
    """The first tile row's band must not pass for the whole image because it has as many classes
    as the image has rows: the tiled probabilities of a pointwise model equal the whole image's."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 20, 1)
    image = np.random.default_rng(4).integers(0, 255, (20, 37, 3), dtype=np.uint8)
    whole = SemanticPredictor(model, {"num_classes": 20}).predict(image)
    tiled = SemanticPredictor(model, {"num_classes": 20}, tile=16, overlap=0.0).predict(image)
    assert tiled.probs.shape == (20, 20, 37)
    torch.testing.assert_close(tiled.probs, whole.probs, rtol=0, atol=1e-6)
    assert np.array_equal(tiled.mask, whole.mask)

def test_predictor_uses_checkpoint_normalisation(checkpoint):
    p = Predictor.from_checkpoint(checkpoint)
    assert p.input_spec.mean == (0.5, 0.5, 0.5) and p.input_spec.std == (0.25, 0.25, 0.25)
    assert p.predict(np.zeros((10, 12, 3), np.uint8)).mask.shape == (10, 12)


def test_uncertainty_uses_mc_dropout_for_bayesian_segnet():
    torch.manual_seed(0)
    model = create_model("bayesian_segnet", num_classes=3)
    p = SemanticPredictor(model, {"num_classes": 3}, mc_samples=3)
    image = np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    a = p.predict(image, uncertainty=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # the samples draw from their own seed
    torch.manual_seed(2)
    b = p.predict(image, uncertainty=True)
    p = SemanticPredictor(model, {"num_classes": 3})
    plain = p.predict(image)
    assert a.uncertainty.shape == (40, 56) and (a.uncertainty >= 0).all()
    assert not torch.allclose(a.probs, plain.probs)  # sampled with dropout on
    torch.testing.assert_close(a.probs, b.probs, atol=0, rtol=0)  # the same files run after run
    assert torch.allclose(plain.probs, p.predict(image).probs)  # deterministic otherwise
    assert not model.training and all(not m.training for m in model.modules())


# --- outputs never over inputs, unique names, every input checked first (issue 11) -----------------
def _image(path, value=100, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelwise: error: "), err
    return err[0]


def test_an_out_folder_that_holds_an_input_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    photos = tmp_path / "photos"
    _image(photos / "photo.png")
    before = _files(tmp_path)
    for argv in ([str(photos), "--out", str(photos)], [str(photos / "photo.png"), "--out", str(photos) + "/"]):
        assert main(["predict", "--checkpoint", str(checkpoint), *argv]) == 2
        assert "holds the input" in _one_error(capsys)
    monkeypatch.chdir(photos)  # the same folder, spelt differently
    assert main(["predict", "--checkpoint", str(checkpoint), "photo.png", "--out", "."]) == 2
    assert "holds the input photo.png" in _one_error(capsys)
    assert _files(tmp_path) == before  # the photo is unchanged and nothing was added
    assert main(["predict", "--checkpoint", str(checkpoint), str(photos), "--out", str(photos / "masks")]) == 0
    assert (photos / "masks" / "photo.png").is_file() and _files(photos)["photo.png"] == before["photos/photo.png"]


def test_an_output_that_links_to_an_input_is_refused(checkpoint, tmp_path, capsys):
    src = _image(tmp_path / "in" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_overlay.png").symlink_to(src)
    before = src.read_bytes()
    assert main(["predict", "--checkpoint", str(checkpoint), str(src), "--out", str(tmp_path / "out")]) == 2
    assert "is a link to one of the inputs" in _one_error(capsys)
    assert src.read_bytes() == before and not (tmp_path / "out" / "a.png").exists()


def test_colliding_stems_get_unique_names(checkpoint, tmp_path, capsys):
    _image(tmp_path / "in" / "c.png", 10)
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(tmp_path / "in" / "c.jpg")
    _image(tmp_path / "in" / "a.png", 30)
    _image(tmp_path / "in" / "a_overlay.png", 40)  # its mask would be a.png's overlay
    _image(tmp_path / "other" / "c.png", 50)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), str(tmp_path / "other"),
                 "--out", str(out), "--uncertainty"]) == 0
    assert "wrote 5 prediction(s)" in capsys.readouterr().out
    stems = ["a", "a_overlay_2", "c_jpg", "c_png", "c_png_2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suffix}.png" for s in stems for suffix in ("", "_overlay", "_uncertainty"))
    # the same input given twice (its folder and itself) is predicted once
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "other"),
                 str(tmp_path / "other" / "c.png"), "--out", str(tmp_path / "once")]) == 0
    assert sorted(p.name for p in (tmp_path / "once").iterdir()) == ["c.png", "c_overlay.png"]


def test_unique_stems_tell_apart_names_a_mac_sees_as_one():
    """café typed on a Mac (NFD) and copied from Linux (NFC) are one file name on APFS: both inputs
    wrote one mask, the second over the first with --overwrite."""
    import unicodedata

    from pixelwise.inference.writers import unique_stems

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    stems = unique_stems([Path(f"a/{nfc}.png"), Path(f"b/{nfd}.jpg")])
    assert len({unicodedata.normalize("NFC", s).casefold() for s in stems}) == 2


def test_unique_stems_rule():
    from pathlib import Path

    from pixelwise.inference.writers import output_names, unique_stems

    paths = [Path("x/c.png"), Path("x/c.JPG"), Path("y/c.png"), Path("x/d.png"), Path("x/D.tif")]
    assert unique_stems(paths) == ["c_png", "c_jpg", "c_png_2", "d_png", "D_tif"]
    assert unique_stems([Path("a.png"), Path("a_instances.png")], instance=True) == ["a", "a_instances_2"]
    # the frames of a stack: zero-padded to the width of the last index, at least 2; a stack's stem
    # collides with another file's as a still image's does
    stack = [Path("x/s.tif")] * 11 + [Path("y/s.png"), Path("x/t.gif"), Path("x/t.gif")]
    frames = [(k, 11) for k in range(11)] + [(0, 1), (0, 2), (1, 2)]
    assert unique_stems(stack, frames=frames) == [f"s_tif_{k:02d}" for k in range(11)] + ["s_png", "t_00", "t_01"]
    assert unique_stems([Path("v.tif")] * 101, frames=[(k, 101) for k in range(101)])[7] == "v_007"
    assert output_names("s", instance=True) == ["s.png", "s_instances.png", "s_overlay.png", "s.json"]
    # with --watershed, <stem>_cells.png is an output too
    assert output_names("s", cells=True) == ["s.png", "s_overlay.png", "s_cells.png"]
    assert unique_stems([Path("a.png"), Path("a_cells.png")], cells=True) == ["a", "a_cells_2"]
    assert unique_stems([Path("a.png"), Path("a_cells.png")]) == ["a", "a_cells"]
    # a name still taken gets _2, _3, ... in input order
    assert unique_stems([Path("x/c.png"), Path("y/c.png"), Path("z/c.png")]) == ["c_png", "c_png_2", "c_png_3"]


def _mixed_folder(root):
    _image(root / "good.png")
    cut = root / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    (root / "empty.jpg").write_bytes(b"")
    _image(root / "zz_last.png", 60)
    return root


def test_unreadable_inputs_are_all_named_and_nothing_is_written(checkpoint, tmp_path, capsys):
    folder = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(out)]) == 2
    line = _one_error(capsys)
    assert "2 of 4 input(s) cannot be read, nothing was written" in line
    assert "cut.png" in line and "empty.jpg" in line and "--skip-invalid" in line
    assert not out.exists()


def test_skip_invalid_predicts_the_rest_lists_the_skipped_and_exits_3(checkpoint, tmp_path, capsys):
    folder = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(out), "--skip-invalid"]) == 3
    captured = capsys.readouterr()
    assert "wrote 2 prediction(s)" in captured.out
    skipped = captured.err.strip().splitlines()
    assert len(skipped) == 3 and all(line.startswith("pixelwise: skipped ") for line in skipped), skipped
    assert "cut.png" in skipped[0] and "empty.jpg" in skipped[1] and "2 unreadable input(s) (exit 3)" in skipped[2]
    assert sorted(p.name for p in out.iterdir()) == ["good.png", "good_overlay.png", "zz_last.png",
                                                     "zz_last_overlay.png"]
    # nothing skipped: exit 0, nothing on stderr
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder / "good.png"), "--out", str(out),
                 "--skip-invalid", "--overwrite"]) == 0
    assert capsys.readouterr().err == ""
    # nothing readable: an error, not an empty success
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder / "empty.jpg"), "--out",
                 str(tmp_path / "none"), "--skip-invalid"]) == 2
    assert "none of the 1 input(s) can be read" in _one_error(capsys)


def _stack(path, pages):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(page) for page in pages]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def test_a_multi_frame_file_is_predicted_frame_by_frame(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(3)
    pages = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(3)]
    pages.append(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8))  # a last page of another size
    _stack(tmp_path / "in" / "vol.tif", pages)
    _image(tmp_path / "in" / "vol_01.png")  # the name of the stack's second frame
    (tmp_path / "pages").mkdir()
    for k, page in enumerate(pages):
        Image.fromarray(page).save(tmp_path / "pages" / f"page{k}.png")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 prediction(s)" in printed and "1 multi-frame file(s) predicted frame by frame" in printed
    assert sorted(p.name for p in out.iterdir() if not p.stem.endswith("_overlay")) == [
        "vol_00.png", "vol_01.png", "vol_01_2.png", "vol_02.png", "vol_03.png"]
    # each frame's mask is the prediction of that page saved as an image of its own
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "pages"), "--out",
                 str(tmp_path / "single"), "--no-progress"]) == 0
    masks = [np.array(Image.open(out / f"vol_{k:02d}.png")) for k in range(len(pages))]
    for k, (mask, page) in enumerate(zip(masks, pages)):
        assert mask.shape == page.shape[:2]
        np.testing.assert_array_equal(mask, np.array(Image.open(tmp_path / "single" / f"page{k}.png")))
    assert any((masks[0] != m).any() for m in masks[1:3])  # the pages' masks differ: frame 0 thrice would fail


def test_a_long_animation_is_read_in_one_pass(checkpoint, tmp_path, monkeypatch, capsys):
    """Frame k of a GIF read afresh seeks through frames 0..k-1 again: predict opens the file once to
    check it and once to predict it (and once for its header), not once per frame (which was quadratic
    in the frame count)."""
    import pixelwise.data.io as io_module

    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 255, (16, 20), dtype=np.uint8)) for _ in range(40)]
    (tmp_path / "in").mkdir()
    frames[0].save(tmp_path / "in" / "clip.gif", save_all=True, append_images=frames[1:])
    opened = []
    real_open = io_module._open
    monkeypatch.setattr(io_module, "_open", lambda path: opened.append(path) or real_open(path))
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert "wrote 40 prediction(s)" in capsys.readouterr().out
    assert len(opened) == 3  # its header checked, its frames decoded to check them, then predicted: not 40+
    monkeypatch.undo()
    # and the frames given to the model are those read one by one
    plan = check_predict([str(tmp_path / "in" / "clip.gif")], tmp_path / "again")
    assert [stem for stem, _ in plan_images(plan)] == [f"clip_{k:02d}" for k in range(40)]
    for k, (_, image) in enumerate(plan_images(plan)):
        np.testing.assert_array_equal(image, read_image(tmp_path / "in" / "clip.gif", k))


def test_a_damaged_frame_is_named_and_nothing_is_written(checkpoint, tmp_path, capsys):
    from pixelwise.errors import UserError

    rng = np.random.default_rng(4)
    whole = _stack(tmp_path / "whole.tif", [rng.integers(0, 255, (30, 40), dtype=np.uint8) for _ in range(3)])
    with pytest.raises(UserError, match="has no frame 3 \\(3 frame\\(s\\)"):
        read_image(whole, 3)
    data = whole.read_bytes()
    _stack(tmp_path / "in" / "good.tif", [rng.integers(0, 255, (30, 40), dtype=np.uint8) for _ in range(2)])
    # cut into the last page's pixels, then into the page directories (PIL: TypeError while counting)
    for cut in (100, 1500):
        (tmp_path / "in" / "damaged.tif").write_bytes(data[:len(data) - cut])
        out = tmp_path / f"out{cut}"
        assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(out)]) == 2
        line = _one_error(capsys)
        assert "1 of 2 input(s) cannot be read" in line and "damaged.tif" in line and not out.exists()
        assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(out),
                     "--skip-invalid", "--no-progress"]) == 3
        assert "wrote 2 prediction(s)" in capsys.readouterr().out
        assert sorted(p.name for p in out.iterdir()) == ["good_00.png", "good_00_overlay.png", "good_01.png",
                                                         "good_01_overlay.png"]


# ---------------------------------------------------------------- outputs are whole or untouched

def _predict(checkpoint, inputs, out, *extra):
    return main(["predict", "--checkpoint", str(checkpoint), *map(str, inputs), "--out", str(out), "--no-progress",
                 *extra])


def test_a_failed_write_leaves_the_earlier_predictions_whole(checkpoint, tmp_path, monkeypatch):
    import pixelwise.data.io as io_module

    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert _predict(checkpoint, [image], out, "--uncertainty") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"street.png", "street_overlay.png", "street_uncertainty.png"}
    real_write = io_module.PngRowWriter.write
    bands = []

    def fail_in_the_middle(self, rows):  # the third band of rows: the files are half written
        bands.append(len(rows))
        if len(bands) == 3:
            raise KeyboardInterrupt  # what Ctrl-C (or pixelwise's SIGTERM handler) raises
        return real_write(self, rows)

    monkeypatch.setattr(io_module.PngRowWriter, "write", fail_in_the_middle)
    assert _predict(checkpoint, [image], out, "--uncertainty", "--tile", "32", "--overwrite") == 130  # interrupted
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial file, nothing lost
    monkeypatch.setattr(io_module.PngRowWriter, "write", real_write)
    assert _predict(checkpoint, [image], out, "--uncertainty", "--tile", "32", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    Image.open(out / "street.png").load()


def test_an_output_name_that_is_a_link_is_replaced_not_written_through(checkpoint, tmp_path):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    precious = tmp_path / "precious.txt"
    precious.write_text("not a prediction")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").symlink_to(precious)
    assert _predict(checkpoint, [image], out) == 2  # a file of that name is there: refused without --overwrite
    assert _predict(checkpoint, [image], out, "--overwrite") == 0
    assert precious.read_text() == "not a prediction"
    assert not (out / "a.png").is_symlink() and Image.open(out / "a.png").size == (30, 20)


def test_an_output_name_too_long_for_the_file_system_is_refused_before_any_write(checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    long = inputs / f"{'a' * 245}.png"  # 249 bytes: a valid name, but its _overlay.png is 257
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(long)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(inputs / "b.png")
    out = tmp_path / "out"
    assert _predict(checkpoint, [inputs], out) == 2
    err = capsys.readouterr().err
    assert "_overlay.png would be longer than the 255 bytes" in err and "rename the input" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_a_folder_named_like_an_image_is_not_an_input(checkpoint, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "album.png").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(inputs / "a.png")
    assert _predict(checkpoint, [inputs], tmp_path / "out1") == 0
    assert _predict(checkpoint, [f"{inputs}/*"], tmp_path / "out2") == 0
    for out in ("out1", "out2"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["a.png", "a_overlay.png"]


@pytest.mark.parametrize("image", [np.zeros((0, 53, 3), np.uint8), np.zeros((5, 0, 3), np.uint8),
                                   np.zeros((5, 5), np.uint8), np.zeros((5, 5, 3), np.float32)])
def test_every_predict_entry_names_an_image_it_cannot_take(checkpoint, image):
    predictor = Predictor.from_checkpoint(checkpoint)
    for call in (predictor.predict, predictor.predict_probs, lambda x: predictor.predict_batch([x]),
                 lambda x: list(predictor.predict_rows([x])[0])):
        with pytest.raises(ValueError, match=r"expects uint8\[H, W, 3\] with H, W >= 1"):
            call(image)


@pytest.mark.parametrize("options, words", [({"tile": 20.5}, "--tile must be a whole number, got 20.5"),
                                            ({"batch_size": "4"}, "--batch-size must be a whole number"),
                                            ({"overlap": "a", "tile": 32}, "--overlap must be a number"),
                                            ({"resize": 16}, r"resize must be \(height, width\)")])
def test_python_options_of_the_wrong_type_are_named(checkpoint, options, words):
    from pixelwise.errors import UserError

    with pytest.raises(UserError, match=words):
        Predictor.from_checkpoint(checkpoint, **options)


def test_from_checkpoint_resize_and_native_size_set_the_size_the_model_sees(checkpoint):
    image = np.random.default_rng(5).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    resized = Predictor.from_checkpoint(checkpoint, resize=(8, 12))
    assert resized.input_spec.resize == (8, 12) and resized.preprocess(image).shape == (1, 3, 8, 12)
    assert resized.predict(image).mask.shape == (20, 30)  # back at the image's size
    native = Predictor.from_checkpoint(checkpoint, native_size=True)
    assert native.input_spec.resize is None and native.preprocess(image).shape == (1, 3, 20, 30)
    with pytest.raises(UserError, match=r"resize must be \(height, width\), two whole numbers > 0, got \(0, 12\)"):
        Predictor.from_checkpoint(checkpoint, resize=(0, 12))

def test_the_python_api_names_what_it_takes(checkpoint):
    """The API's bad inputs are errors that say what to pass, not AttributeErrors from deep inside."""
    p = Predictor.from_checkpoint(checkpoint)
    img = np.zeros((9, 11, 3), np.uint8)
    with pytest.raises(ValueError, match=r"numpy uint8\[H, W, 3\] array.*PIL.*pil_to_rgb\(image\)"):
        p.predict(Image.fromarray(img))
    with pytest.raises(ValueError, match="got builtins.list"):
        p.predict(img.tolist())
    with pytest.raises(ValueError, match=r"expect a sequence .* got one array uint8\[9, 11, 3\]; use predict"):
        p.predict_batch(img)
    assert len(p.predict_batch([img, img])) == 2
    with pytest.raises(UserError, match="'gpu' is not a device"):
        Predictor.from_checkpoint(checkpoint, device="gpu")
    with pytest.raises(UserError, match=r"uncertainty is an argument of predict\(image, uncertainty=True\)"):
        Predictor.from_checkpoint(checkpoint, uncertainty=True)  # was: 'does not apply to semantic models'
    assert p.predict(img, uncertainty=True).uncertainty.shape == (9, 11)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="has no CUDA|no CUDA GPU"):
            SemanticPredictor(create_model("unet", num_classes=4, **KW), device="cuda")


def test_files_of_the_outputs_names_already_in_out_are_replaced_only_with_overwrite(checkpoint, tmp_path, capsys):
    """A user's own x.png in --out, or an earlier prediction, is not replaced without being told."""
    image = tmp_path / "in" / "x.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").write_text("my notes")
    (out / "unrelated.png").write_text("also mine")
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(out)]) == 2
    err = _one_error(capsys)
    assert "already holds x.png" in err and "pass --overwrite to replace them" in err
    assert (out / "x.png").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == ["unrelated.png",
                                                                                                   "x.png"]
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out / "x.png").size == (30, 20) and (out / "unrelated.png").read_text() == "also mine"


@pytest.mark.parametrize(("names", "class0_coloured"), [
    (["background", "car", "person"], False),
    (["class_0", "class_1", "class_2"], False),  # a folder dataset without classes.json: binary masks' 0
    (["road", "car", "person"], True),  # Cityscapes' road, CamVid's sky: class 0 is a thing to see
])
def test_overlay_leaves_only_a_background_class_clear(tmp_path, names, class0_coloured):
    """The overlay left class 0 clear for every model, so Cityscapes' road and CamVid's sky never showed."""
    from pixelwise.inference.writers import write_semantic

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (12, 10), dtype=np.uint8)
    palette = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    write_semantic(tmp_path, "x", image, [(0, mask, None)], palette, names)
    over = np.asarray(Image.open(tmp_path / "x_overlay.png").convert("RGB")).astype(float)
    expected = (image * 0.5 + np.array(palette, float)[mask] * 0.5).round()
    if not class0_coloured:
        expected[mask == 0] = image[mask == 0]
    np.testing.assert_array_equal(over, expected)
    assert (mask == 0).any() and (mask > 0).any()


def test_link_loops_and_fifos_are_named_inputs(checkpoint, tmp_path, capsys):
    """A symbolic link to itself among the inputs was a 40-line traceback (exit 1), even with
    --skip-invalid; a FIFO given by name was 'not found'."""
    import os

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(inputs / "ok.png")
    (inputs / "loop.png").symlink_to("loop.png")
    os.mkfifo(tmp_path / "pipe.png")
    args = ["predict", "--checkpoint", str(checkpoint), "--no-progress", "--out"]
    for given in ([str(inputs)], [str(inputs / "loop.png")], [str(inputs / "*.png")]):
        assert main([*args, str(tmp_path / "o1"), *given]) == 2
        err = capsys.readouterr().err.strip()
        assert "loop.png: symbolic link loop (it points to loop.png, which leads back to it)" in err, err
        assert "\n" not in err and not (tmp_path / "o1").exists()
    assert main([*args, str(tmp_path / "o2"), str(inputs), "--skip-invalid"]) == 3
    assert (tmp_path / "o2" / "ok.png").is_file() and "symbolic link loop" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "o3"), str(tmp_path / "pipe.png")]) == 2
    assert "pipe.png: not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_an_input_lost_after_the_check(checkpoint, tmp_path, skip_invalid):
    """An input removed while predict ran stopped it with 'file not found', also with
    --skip-invalid, without saying that earlier predictions were written and later ones not made."""
    from pixelwise.inference.writers import predict_files

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(inputs / f"r{i}.png")
    plan = check_predict([str(inputs)], tmp_path / "out", skip_invalid=skip_invalid, progress=False)
    (inputs / "r2.png").unlink()
    predictor = Predictor.from_checkpoint(checkpoint)
    if not skip_invalid:
        with pytest.raises(UserError, match=r"r2.png: file not found \(it changed after the inputs were checked\); "
                                            r"2 of the 4 predictions were written to .*out, the rest were not made"):
            predict_files(predictor, plan, progress=False)
        assert sorted(p.name for p in (tmp_path / "out").glob("r?.png")) == ["r0.png", "r1.png"]
    else:
        written = predict_files(predictor, plan, progress=False)
        assert [p.name for p in written] == ["r0.png", "r1.png", "r3.png"]
        assert len(plan.skipped) == 1 and "r2.png: file not found" in plan.skipped[0]


def test_predict_removes_what_a_killed_predict_left(checkpoint, tmp_path):
    """A SIGKILLed predict left hidden .pixelwise-*.png temporaries (as large as the outputs) that no
    later run removed; those of a running process are kept, and so are those written in another
    process-id namespace (a container, another host on shared storage), whose process ids mean
    nothing here: they were deleted under a running predict, which then failed."""
    import os
    import subprocess
    import time

    from pixelwise.checkpoint import HERE, STALE_SECONDS, remove_stale_temporaries

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(inputs / "a.png")
    dead = subprocess.Popen(["true"])
    dead.wait()
    elsewhere = f"h{int(HERE[1:], 16) ^ 1:08x}"
    long_ago = time.time() - STALE_SECONDS - 60
    stale = [out / f".pixelwise-{HERE}-{dead.pid}-0123456789ab-0.png",
             out / f".pixelwise-{elsewhere}-{dead.pid}-0123456789ab-0.png",  # unwritten for a day
             out / ".pixelwise-0123456789ab-1.png"]  # an older version's, unwritten for a day
    kept = [out / f".pixelwise-{HERE}-{os.getppid()}-0123456789ab-0.png",  # a process that runs
            out / f".pixelwise-{elsewhere}-{dead.pid}-0123456789ab-1.png",  # may run, there
            out / f".pixelwise-{dead.pid}-0123456789ab-2.png",  # an older version's, written just now
            out / ".pixelwise-probe-x"]  # not a staged name
    for path in (*stale, *kept):
        path.write_bytes(b"partial")
    for path in stale[1:]:
        os.utime(path, (long_ago, long_ago))
    assert main(["predict", "--checkpoint", str(checkpoint), str(inputs), "--out", str(out), "--no-progress"]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (out / "a.png").is_file() and remove_stale_temporaries(out) == []


def test_a_full_disk_names_the_file_being_written(tmp_path):
    """predict and export said 'No space left on device' without a file: the write to an open file
    that fails carries no name."""
    import errno

    from pixelwise.checkpoint import atomic_write
    from pixelwise.inference.writers import staged

    def full(_tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "m.onnx", full)
    assert caught.value.filename == str(tmp_path / "m.onnx") and caught.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as caught, staged(tmp_path, ["a.png", "a_overlay.png"]):
        full(None)
    assert caught.value.filename == str(tmp_path / "a.png") and not list(tmp_path.glob(".pixelwise-*"))


def test_a_folder_of_subfolders_gets_the_pattern_that_reaches_them(checkpoint, tmp_path, capsys):
    """Cityscapes' leftImg8bit/val holds its images in city subfolders: 'no images found' alone."""
    city = tmp_path / "val" / "aachen"
    city.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(city / "a_leftImg8bit.png")
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "val"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds none directly but its subfolders do" in err and f"'{tmp_path / 'val' / '*' / '*'}'" in err
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "val" / "*" / "*"), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 0


def test_predicts_bar_is_closed_before_an_error_is_said(checkpoint, tmp_path, monkeypatch):
    """On Ctrl-C or an error the bar was closed by the garbage collector after the CLI printed its line,
    so it was drawn again under the message."""
    from pixelwise.inference import writers

    closed = []
    real = writers.progress_bar

    def recording(*args, **kwargs):
        bar = real(*args, **kwargs)
        close = bar.close
        bar.close = lambda: (closed.append(args[1]), close())[1]
        return bar

    monkeypatch.setattr(writers, "progress_bar", recording)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(inputs / f"r{i}.png")
    plan = check_predict([str(inputs)], tmp_path / "out", progress=False)
    (inputs / "r1.png").unlink()
    with pytest.raises(UserError, match="r1.png: file not found"):
        writers.predict_files(Predictor.from_checkpoint(checkpoint), plan, progress=False)
    assert "predict" in closed


def test_outputs_written_by_another_process_since_the_check_are_not_replaced(checkpoint, tmp_path):
    """Two predicts started at once into one --out both passed the check and each replaced the
    other's files without --overwrite; a name taken since the check is now left as it is."""
    from pixelwise.checkpoint import atomic_write
    from pixelwise.inference.writers import predict_files

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(inputs / "a.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(inputs / "b.png")
    predictor = Predictor.from_checkpoint(checkpoint)
    plan = check_predict([str(inputs)], tmp_path / "out", progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.png").write_bytes(b"the other run's")
    # the line says what is done: a.png's prediction is written, b.png's not made
    with pytest.raises(UserError, match="b.png appeared while this command ran .* 1 of the 2 predictions were "
                                        "written, the rest were not made: predict into another --out"):
        predict_files(predictor, plan, progress=False)
    assert (tmp_path / "out" / "b.png").read_bytes() == b"the other run's"
    assert Image.open(tmp_path / "out" / "a.png").size == (16, 16)
    assert not list((tmp_path / "out").glob(".pixelwise-*"))
    plan = check_predict([str(inputs)], tmp_path / "out2", progress=False, overwrite=True)
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "a.png").write_bytes(b"old")
    predict_files(predictor, plan, progress=False)  # --overwrite: replaced
    assert Image.open(tmp_path / "out2" / "a.png").size == (16, 16)

    target = tmp_path / "report.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text("1"), replace=False)
    with pytest.raises(UserError, match="report.json appeared while this command ran"):
        atomic_write(target, lambda tmp: Path(tmp).write_text("2"), replace=False)
    assert target.read_text() == "1" and [p.name for p in tmp_path.glob(".report.json*")] == []


@pytest.mark.parametrize("classes", [2, 8, 19, 150])
def test_uncertainty_png_writes_the_nearest_level_and_255_at_log_c(classes):
    """Levels were truncated: the uniform distribution's entropy (log C, a hair below in float32)
    came out 254 for 8, 19 (Cityscapes) and more classes, and every level half a level low."""
    from pixelwise.inference.mc_dropout import predictive_entropy
    from pixelwise.inference.writers import entropy_to_gray

    uniform = predictive_entropy(torch.full((classes, 1, 1), 1 / classes), 0).numpy()
    assert entropy_to_gray(uniform, classes).item() == 255
    levels = np.log(classes) * np.array([0.0, 0.4 / 255, 0.6 / 255, 100.4 / 255, 100.6 / 255, 1.0])
    assert entropy_to_gray(levels, classes).tolist() == [0, 0, 1, 100, 101, 255]


def test_a_png_without_its_end_is_refused_by_predict_as_by_inspect(checkpoint, tmp_path, capsys):
    """A PNG whose IEND chunk is cut off decodes; the readers' header check calls it truncated, and
    predict wrote outputs for it: one file, two answers."""
    from pixelwise.data.folder import FolderDataset

    root = tmp_path / "ds"
    _image(root / "images" / "a.png")
    _image(root / "images" / "b.png")
    for stem in ("a", "b"):
        write_mask(root / "masks" / f"{stem}.png", np.zeros((20, 24), np.uint8))
    path = root / "images" / "a.png"
    path.write_bytes(path.read_bytes()[:-12])  # the IEND chunk
    problems = [str(p) for p in FolderDataset(root, "all").check()]
    assert len(problems) == 1 and "a.png" in problems[0] and "truncated" in problems[0]
    assert _predict(checkpoint, [path], tmp_path / "out") == 2
    assert "a.png" in _one_error(capsys) and not (tmp_path / "out" / "a.png").exists()
    assert _predict(checkpoint, [root / "images"], tmp_path / "out", "--skip-invalid") == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.png", "b_overlay.png"]


def test_palette_bytes_pads_with_black_and_ends_with_white():
    """Hand-written expectation: the given colours, then zeros up to index 254, then white at 255.
    The zero padding was unchecked (a fill of 1 survived): ids past the palette colour black."""
    flat = palette_bytes([(10, 20, 30), (40, 50, 60)])
    assert len(flat) == 768
    assert flat[:6] == [10, 20, 30, 40, 50, 60]
    assert flat[6:765] == [0] * 759 and flat[765:] == [255, 255, 255]
    out = colorize(np.array([[0, 1, 7, 255]], np.uint8), [(10, 20, 30), (40, 50, 60)])
    assert out[0].tolist() == [[10, 20, 30], [40, 50, 60], [0, 0, 0], [255, 255, 255]]


def test_overlay_leaves_ignore_pixels_and_black_pixels_exactly_as_they_are():
    """Hand-computed: alpha 0.5 blends class 1 (200, 100, 0) over a black image to (100, 50, 0);
    ignore (255) and the clear class 0 keep the image's pixel exactly, here black (0, 0, 0) and
    grey (7, 7, 7). The suite's overlay test had no 255 in its mask and no black pixel."""
    image = np.zeros((1, 4, 3), np.uint8)
    image[0, 3] = 7
    mask = np.array([[1, 255, 0, 255]], np.uint8)
    out = overlay(image, mask, [(50, 50, 50), (200, 100, 0)], alpha=0.5, clear=0)
    assert out.dtype == np.uint8
    assert out[0].tolist() == [[100, 50, 0], [0, 0, 0], [0, 0, 0], [7, 7, 7]]


def _bands_for_budget(monkeypatch, budget):
    torch.manual_seed(0)
    model = create_model("unet", num_classes=4, base_channels=4).eval()
    p = SemanticPredictor(model, {"num_classes": 4}, input_spec=InputSpec(resize=(24, 32)))
    image = np.random.default_rng(0).integers(0, 255, (UPSAMPLE_ROWS + 10, 40, 3), dtype=np.uint8)
    monkeypatch.setattr(predictor_module, "WHOLE_UPSAMPLE_BYTES", budget)
    return [y for y, _ in p._bands(image)], image


def test_whole_upsample_budget_is_classes_times_pixels_times_four_bytes(monkeypatch):
    """docstring of _at_size / WHOLE_UPSAMPLE_BYTES: one F.interpolate where C x H x W float32
    (C * H * W * 4 bytes, written out by hand here) fits the budget, else bands of UPSAMPLE_ROWS rows.
    Checked on both sides of the boundary, so a budget formula that divides instead of multiplies
    (a 12-MP photo then upsampled whole: GBs) is caught."""
    need = 4 * (UPSAMPLE_ROWS + 10) * 40 * 4  # C * H * W * sizeof(float32)
    ys, _ = _bands_for_budget(monkeypatch, need)
    assert ys == [0]  # fits exactly: one band, the whole image
    ys, _ = _bands_for_budget(monkeypatch, need - 1)
    assert ys == [0, UPSAMPLE_ROWS]  # one byte short: row bands


def test_index_unpooling_model_with_a_one_channel_contract_runs_one_input_at_a_time():
    """SemanticPredictor's docstring: models that unpool by pooling indices (ENet here) run one
    input at a time, whatever the batch. The existing test covers RGB only; with a gray contract
    the check must still look at the batch dimension (x.shape[0]), not the channels."""
    torch.manual_seed(0)
    model = create_model("enet", num_classes=2, in_channels=1).eval()
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    spec = InputSpec(channels=1, mean=(0.5,), std=(0.25,))
    p = SemanticPredictor(model, {"model": "enet", "num_classes": 2}, input_spec=spec, batch_size=4)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 48), dtype=np.uint8) for _ in range(3)]
    sizes.clear()
    p.predict_batch(images, probs=False)
    handle.remove()
    assert sizes == [1, 1, 1]


def test_predict_rows_shows_no_progress_bar_unless_asked(capsys):
    """predict_rows(progress=False) by default, like predict and predict_batch: a library call
    writes nothing to stderr (a bar over tiles only with progress=True, or None on a terminal)."""
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=4).eval()
    p = SemanticPredictor(model, {"num_classes": 3}, tile=32)
    image = np.random.default_rng(0).integers(0, 255, (70, 50, 3), dtype=np.uint8)
    assert p.needs_tiles(image)
    for rows in p.predict_rows([image]):
        list(rows)
    assert capsys.readouterr().err == ""


def _pointwise(classes=3):
    return nn.Conv2d(3, classes, 1)


def test_an_unknown_tta_mode_is_refused_when_the_predictor_is_built():
    """tta is one of TTA_MODES (docs/inference.md); anything else is a UserError at construction
    naming the modes, not a KeyError at the first predict."""
    with pytest.raises(UserError, match=r"--tta 'bogus' is not one of: .*flip"):
        SemanticPredictor(_pointwise(), {"num_classes": 3}, tta="bogus")
    for mode in ("flip", "d4", "ms", None):
        assert SemanticPredictor(_pointwise(), {"num_classes": 3}, tta=mode).tta == mode


def test_too_many_classes_names_the_model_in_the_error():
    """The refusal of > 255 classes names the checkpoint's model (meta['model']): a model built
    otherwise than by create_model, which refuses 256 classes itself."""
    model = torch.nn.Conv2d(3, 256, 1)
    with pytest.raises(UserError, match=r"^unet has 256 classes"):
        SemanticPredictor(model, {"model": "unet", "num_classes": 256})


def test_name_max_asks_the_out_folder_or_its_nearest_existing_ancestor(tmp_path, monkeypatch):
    """The name limit is the file system's of --out itself (it may be a mount of another file system
    than its parents'), or of its nearest existing folder when --out is made later."""
    monkeypatch.setattr(writers.os, "pathconf", lambda path, name: 100 if Path(path) == tmp_path else 255)
    assert _name_max(tmp_path) == 100
    assert _name_max(tmp_path / "new" / "deeper") == 100


def test_name_length_counts_utf16_units_on_windows_and_bytes_elsewhere(monkeypatch):
    name = "a\N{MUSICAL SYMBOL G CLEF}.png"  # 'a', one character outside the BMP, '.png'
    monkeypatch.setattr(writers.os, "name", "posix")
    assert _name_length(name) == 1 + 4 + 4  # UTF-8 bytes
    monkeypatch.setattr(writers.os, "name", "nt")  # os.name is global: put back before anything else runs
    on_windows = _name_length(name)
    monkeypatch.undo()
    assert on_windows == 1 + 2 + 4  # UTF-16 code units: a surrogate pair for the clef


def test_instance_colors_one_colour_per_instance():
    """Each instance gets a colour of its own (draw_instances indexes one per detection)."""
    for count in range(1, 6):
        colours = instance_colors(count)
        assert len(colours) == count and len({tuple(c) for c in colours}) == count


def test_predict_files_checks_a_list_of_inputs_itself(checkpoint, tmp_path):
    """The library call with files rather than a plan: checked, predicted, and each mask the predictor's."""
    image = np.random.default_rng(1).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    predictor = Predictor.from_checkpoint(checkpoint)
    with pytest.raises(TypeError, match="give out"):
        predict_files(predictor, [str(tmp_path / "a.png")])
    written = predict_files(predictor, [str(tmp_path / "a.png")], tmp_path / "out", progress=False)
    assert written == [tmp_path / "out" / "a.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(written[0])), np.asarray(predictor.predict(image).mask))


def test_cancel_check_raises_only_inside_a_cancellable_block_and_restores_the_outer_one():
    outer, inner = threading.Event(), threading.Event()
    cancel.check()  # no block: nothing to stop
    with cancel.cancellable(outer):
        cancel.check()  # not set, no time limit
        outer.set()
        with pytest.raises(cancel.Cancelled) as stopped:
            cancel.check()
        assert type(stopped.value) is cancel.Cancelled and str(stopped.value) == "the prediction was cancelled"
        with cancel.cancellable(inner, seconds=60):
            cancel.check()  # the inner job's event, not the outer one's
        with pytest.raises(cancel.Cancelled):
            cancel.check()  # the outer job is back once the inner block ends
    cancel.check()  # and nothing once the outer block ends
    seen = []
    with cancel.cancellable(outer):  # another thread has no job of this one's
        worker = threading.Thread(target=lambda: seen.append(cancel.check()))
        worker.start()
        worker.join()
    assert seen == [None]


def test_cancel_check_times_out_after_the_seconds_given_from_the_blocks_start():
    event = threading.Event()
    with cancel.cancellable(event, seconds=0.05):
        cancel.check()  # within its time
        time.sleep(0.1)
        with pytest.raises(cancel.TimedOut, match=r"^the prediction ran longer than the server's limit of 0.05 s$"):
            cancel.check()
        event.set()
        with pytest.raises(cancel.Cancelled) as stopped:
            cancel.check()  # a cancelled job says so, even past its time
        assert type(stopped.value) is cancel.Cancelled
    with cancel.cancellable(event, seconds=None):
        event.clear()
        time.sleep(0.01)
        cancel.check()  # no limit: never timed out


def test_a_semantic_predictor_stops_between_batches_once_its_job_is_cancelled(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    image = np.zeros((16, 16, 3), np.uint8)
    event = threading.Event()
    with cancel.cancellable(event):
        assert predictor.predict(image).mask.shape == (16, 16)
        event.set()
        with pytest.raises(cancel.Cancelled):
            predictor.predict(image)


def test_an_out_folder_a_recursive_pattern_reaches_is_refused_before_its_outputs_become_inputs(checkpoint, tmp_path,
                                                                                               capsys):
    """``predict 'g/**/*.png' --out g/pred`` wrote 4 predictions; the same command again was refused
    with the hint ``e.g. --out g/pred/predictions``, which the pattern reaches too: following it
    predicted the earlier masks and overlays as images (12 predictions of 4 images, no word)."""
    g = tmp_path / "g"
    (g / "s").mkdir(parents=True)
    _image(g / "a.png")
    _image(g / "s" / "b.png")
    pattern = str(g / "**" / "*.png")
    assert main(["predict", "--checkpoint", str(checkpoint), pattern, "--out", str(g / "pred"), "--no-progress"]) == 2
    assert "--out" in _one_error(capsys) and not (g / "pred").exists()
    # a plain folder input does not read subfolders: an --out inside it stays allowed
    assert main(["predict", "--checkpoint", str(checkpoint), str(g), "--out", str(g / "pred"), "--no-progress"]) == 0
    # ... and --out g, which holds the input, is refused with a hint the pattern does not reach
    assert main(["predict", "--checkpoint", str(checkpoint), pattern, "--out", str(g), "--no-progress"]) == 2
    err = _one_error(capsys)
    assert "holds the input" in err and f"e.g. --out {g.parent / 'g-predictions'}" in err, err
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone")
    assert main(["predict", "--checkpoint", str(checkpoint), str(g), "--out", str(link), "--no-progress"]) == 2
    assert "is a broken symbolic link" in _one_error(capsys) and not (tmp_path / "gone").exists()


def test_an_out_folder_reached_through_a_link_is_refused_as_the_pattern_reaches_it(checkpoint, tmp_path, capsys):
    """``predict 'g/**/*.png' --out elsewhere/lnk/pred``, ``elsewhere/lnk`` a link to ``g/s``: the
    masks land in ``g/s/pred``, where the pattern reads; the run was allowed (the check compared
    the unresolved path), and its rerun refused with the hint ``--out elsewhere/lnk/pred/predictions``,
    which the pattern reaches too."""
    g = tmp_path / "g"
    (g / "s").mkdir(parents=True)
    _image(g / "a.png")
    _image(g / "s" / "b.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "lnk").symlink_to(g / "s")
    out = tmp_path / "elsewhere" / "lnk" / "pred"
    pattern = str(g / "**" / "*.png")
    assert main(["predict", "--checkpoint", str(checkpoint), pattern, "--out", str(out), "--no-progress"]) == 2
    assert "--out" in _one_error(capsys) and not (g / "s" / "pred").exists()


@pytest.mark.parametrize("pattern", ["g/**/*.png", "g/*/*.png", "g/*.png", "g/**", "g/s*/**/a?.png", "g/[ab]*/*.png",
                                     "g/.h/*.png", "g/**/.*.png", "*/s/*", "g/s/t/a1.png"])
def test_pattern_reaches_lists_what_glob_lists(tmp_path, monkeypatch, pattern):
    """The --out check asks whether a pattern would list an output once it is written; the reference
    is glob itself, on a tree with hidden folders and files, nested folders and near misses."""
    monkeypatch.chdir(tmp_path)
    files = ["g/a.png", "g/b.jpg", "g/s/a1.png", "g/s/t/a1.png", "g/s/t/b.png", "g/.h/a.png", "g/.a.png",
             "g/s/.b.png", "g/x/ab.png", "g/u/v/w/a2.png", "h/s/a.png"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    listed = {os.path.normpath(p) for p in glob.glob(pattern, recursive=True)}
    for name in files:
        assert pattern_reaches(pattern, Path(name)) == (name in listed), name
        assert pattern_reaches(pattern, tmp_path / name) == (name in listed), name  # absolute and relative alike
