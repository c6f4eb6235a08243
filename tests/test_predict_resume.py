"""``predict --resume``: an interrupted predict goes on where it stopped, keeping only what a run with
the same model and options wrote (the record in each mask), and gives the files an uninterrupted run gives."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import pixelwise.inference.writers as writers
from pixelwise import SemanticPredictor, create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.data.io import encode_png, png_text
from pixelwise.data.shapes import CLASS_NAMES, PALETTE
from pixelwise.errors import UserError

KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    model = create_model("unet", num_classes=4, **KW).eval()
    save_checkpoint(path, model, {"model": "unet", "num_classes": 4, "model_kwargs": KW, "task": "semantic",
                                  "class_names": CLASS_NAMES, "palette": PALETTE,
                                  "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", 0)


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (20 + 4 * k, 28, 3), dtype=np.uint8)).save(folder / f"f{k}.png")
    return folder


def _predict(checkpoint, inputs, out, *extra):
    return main(["predict", "--checkpoint", str(checkpoint), str(inputs), "--out", str(out), "--no-progress", *extra])


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _one_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelwise: error: "), err
    return err[0]


def _interrupt_at(monkeypatch, call):
    """Ctrl-C (a KeyboardInterrupt, as pixelwise's SIGTERM handler raises too) while the ``call``-th
    image's files are being written."""
    real, calls = writers.write_semantic, []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writers, "write_semantic", write)


def test_a_checkpoint_replaced_after_loading_is_not_recorded_as_the_masks_model(tmp_path):
    """prediction_record hashed whatever was at the checkpoint's path when the masks were written: a
    train --overwrite (or a cp) landing after the predictor loaded the file recorded the new file's
    SHA-256 with the old weights' masks, and --resume with the new file kept them."""
    import os

    from pixelwise import Predictor

    path = _checkpoint(tmp_path / "m.safetensors", 0)
    predictor = Predictor.from_checkpoint(path)
    record = writers.prediction_record(predictor)
    assert record["models"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    os.replace(_checkpoint(tmp_path / "new.safetensors", 1), path)  # a train --overwrite lands
    with pytest.raises(UserError, match="m.safetensors was replaced after it was loaded"):
        writers.prediction_record(predictor)
    again = Predictor.from_checkpoint(path)
    path.write_bytes(path.read_bytes())  # cp onto it: the same bytes, written again
    with pytest.raises(UserError, match="was replaced after it was loaded"):
        writers.prediction_record(again)


def test_a_checkpoint_replaced_while_it_is_read_is_refused(tmp_path, monkeypatch):
    import os

    import pixelwise.inference.predictor as predictor_module
    from pixelwise import Predictor

    path = _checkpoint(tmp_path / "m.safetensors", 0)
    real = predictor_module.load_checkpoint

    def load_then_replaced(*args, **kwargs):
        loaded = real(*args, **kwargs)
        os.replace(_checkpoint(tmp_path / "new.safetensors", 1), path)
        return loaded

    monkeypatch.setattr(predictor_module, "load_checkpoint", load_then_replaced)
    with pytest.raises(UserError, match="m.safetensors was replaced while it was read .*; try again once it is"):
        Predictor.from_checkpoint(path)


def test_an_interrupted_predict_resumes_to_the_files_of_an_uninterrupted_one(checkpoint, inputs, tmp_path,
                                                                              monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert _predict(checkpoint, inputs, whole, "--tta", "flip") == 0
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 3)
    assert _predict(checkpoint, inputs, out, "--tta", "flip") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "2 of the 4 predictions were written" in err and "--resume" in err
    assert sorted(_files(out)) == ["f0.png", "f0_overlay.png", "f1.png", "f1_overlay.png"]
    monkeypatch.undo()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert _predict(checkpoint, inputs, out, "--tta", "flip") == 2  # without --resume: refused, and told of it
    error = _one_error(capsys)
    assert "already holds f0.png" in error and "2 of these inputs were predicted there" in error
    assert "--resume" in error

    assert _predict(checkpoint, inputs, out, "--tta", "flip", "--resume") == 0
    said = capsys.readouterr().out
    assert "wrote 2 prediction(s)" in said and "kept 2" in said
    assert _files(out) == _files(whole)
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in kept.items())  # left as they were
    assert _predict(checkpoint, inputs, out, "--tta", "flip", "--resume") == 0  # all done: nothing to predict
    assert "wrote 0 prediction(s)" in capsys.readouterr().out and _files(out) == _files(whole)


def test_the_record_names_the_checkpoints_sha256_and_the_options(checkpoint, inputs, tmp_path):
    out = tmp_path / "out"
    assert _predict(checkpoint, inputs, out, "--tta", "flip", "--resize", "32x40") == 0
    record = json.loads(Image.open(out / "f0.png").info["pixelwise"])  # PIL reads the text chunk too
    assert record == json.loads(png_text(out / "f0.png", "pixelwise"))
    assert record["models"] == [{"file": "m.safetensors",
                                 "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}]
    assert record["prediction"][0]["tta"] == "flip" and record["input"][0]["resize"] == [32, 40]
    assert record["uncertainty"] is False and record["crf"] is None
    assert png_text(out / "f0_overlay.png", "pixelwise") is None  # the mask holds it, once


@pytest.mark.parametrize(("extra", "words"), [
    (["--tta", "d4"], 'prediction options {"tta": "flip"} there, {"tta": "d4"} now'),
    (["--tta", "flip", "--resize", "24x24"], "input contract"),
    (["--tta", "flip", "--uncertainty"], "uncertainty"),
])
def test_resume_refuses_outputs_of_other_options(checkpoint, inputs, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert _predict(checkpoint, inputs, out, "--tta", "flip") == 0
    before = _files(out)
    capsys.readouterr()
    assert _predict(checkpoint, inputs, out, "--resume", *extra) == 2
    error = _one_error(capsys)
    assert "--resume:" in error and words in error and "--overwrite" in error
    assert _files(out) == before


def test_resume_refuses_another_models_outputs_and_keeps_a_renamed_checkpoints(checkpoint, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(checkpoint, inputs, out) == 0
    before = _files(out)
    other = _checkpoint(tmp_path / "other.safetensors", 1)
    capsys.readouterr()
    assert _predict(other, inputs, out, "--resume") == 2
    assert "another model" in _one_error(capsys) and _files(out) == before
    renamed = tmp_path / "renamed.safetensors"
    shutil.copyfile(checkpoint, renamed)  # the same weights under another name: the same model
    assert _predict(renamed, inputs, out, "--resume") == 0 and "kept 4" in capsys.readouterr().out
    assert _files(out) == before


def test_resume_never_replaces_a_file_without_the_record(checkpoint, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "f1.png").write_text("my notes")  # a user's file with an output's name
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(out / "f2.png")  # a PNG, but not a prediction
    (out / "f3_overlay.png").write_text("mine too")  # an overlay without its mask
    for name in ("f1.png", "f2.png", "f3_overlay.png"):  # each the first refused, then removed
        keep = {p.name: p.read_bytes() for p in out.iterdir()}
        assert _predict(checkpoint, inputs, out, "--resume") == 2
        error = _one_error(capsys)
        assert f"{out / name}" in error and "is not known to be this prediction's" in error
        assert {p.name: p.read_bytes() for p in out.iterdir()} == keep
        if name == "f1.png":
            assert "no record" in error
        if name == "f3_overlay.png":
            assert "its mask f3.png, which holds the record, is not there" in error
        out.joinpath(name).unlink()


def test_resume_predicts_again_an_image_whose_files_were_not_all_renamed(checkpoint, inputs, tmp_path, capsys):
    """The mask is renamed into place first: a run stopped before the overlay's rename left the mask
    alone, which resume replaces with the image's whole set."""
    whole = tmp_path / "whole"
    assert _predict(checkpoint, inputs, whole, "--uncertainty") == 0
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(whole / "f0.png", out / "f0.png")
    shutil.copyfile(whole / "f1.png", out / "f1.png")
    shutil.copyfile(whole / "f1_overlay.png", out / "f1_overlay.png")
    assert _predict(checkpoint, inputs, out, "--uncertainty", "--resume") == 0
    assert "wrote 4 prediction(s)" in capsys.readouterr().out
    assert _files(out) == _files(whole)


def test_resume_refuses_the_mask_of_an_input_that_changed_since_it_was_written(checkpoint, inputs, tmp_path,
                                                                             capsys):
    """The record names the models and options, not the image: an input edited since (or another
    folder's image of the same name, predicted into the same --out) must not keep the mask of the
    image that was there before, nor be counted in the hint as 'predicted there'; its mask is
    refused as another model's is (it may be another run's output: not replaced without --overwrite)."""
    out = tmp_path / "out"
    assert _predict(checkpoint, inputs, out) == 0
    then = hashlib.sha256((inputs / "f1.png").read_bytes()).hexdigest()
    Image.fromarray(np.random.default_rng(11).integers(0, 255, (24, 28, 3), dtype=np.uint8)).save(inputs / "f1.png")
    now = hashlib.sha256((inputs / "f1.png").read_bytes()).hexdigest()
    fresh = tmp_path / "fresh"
    assert _predict(checkpoint, inputs, fresh) == 0
    assert (out / "f1.png").read_bytes() != (fresh / "f1.png").read_bytes()  # another image, another mask
    capsys.readouterr()
    assert _predict(checkpoint, inputs, out) == 2  # the hint counts 3 inputs, not 4, as predicted there
    assert "3 of these inputs were predicted there" in _one_error(capsys)
    before = _files(out)
    assert _predict(checkpoint, inputs, out, "--resume") == 2  # refused, as another model's mask is: nothing lost
    error = _one_error(capsys)
    assert f"{out / 'f1.png'}" in error and "predicted from another image" in error and "--overwrite" in error
    assert f"(SHA-256 {then[:12]}, now {now[:12]}: the input changed since" in error, error  # 12 digits each
    assert _files(out) == before
    (out / "f1.png").unlink()
    (out / "f1_overlay.png").unlink()
    assert _predict(checkpoint, inputs, out, "--resume") == 0
    said = capsys.readouterr().out
    assert "wrote 1 prediction(s)" in said and "kept 3" in said
    assert _files(out) == _files(fresh)


def test_resume_and_overwrite_together_are_refused(checkpoint, inputs, tmp_path, capsys):
    assert _predict(checkpoint, inputs, tmp_path / "out", "--resume", "--overwrite") == 2
    assert "give one of the two" in _one_error(capsys) and not (tmp_path / "out").exists()


def test_resume_needs_a_predictor_loaded_from_a_file(inputs, tmp_path):
    predictor = SemanticPredictor(create_model("unet", num_classes=4, **KW).eval(),
                                  {"class_names": CLASS_NAMES, "palette": PALETTE})
    written = writers.predict_files(predictor, [str(inputs)], tmp_path / "a", progress=False)
    assert len(written) == 4 and json.loads(png_text(written[0], "pixelwise"))["models"] == [None]
    with pytest.raises(UserError, match="loaded from files"):
        writers.predict_files(predictor, [str(inputs)], tmp_path / "a", progress=False, resume=True)


def test_png_text_reads_the_chunk_before_the_pixels_only(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "m.png"
    path.write_bytes(encode_png(pixels, "P", PALETTE, {"other": "x", "pixelwise": '{"a": 1}'}))
    assert png_text(path, "pixelwise") == '{"a": 1}' and png_text(path, "other") == "x"
    assert png_text(path, "absent") is None
    with Image.open(path) as im:  # an independent reader finds the same chunks and the same pixels
        assert im.info["pixelwise"] == '{"a": 1}' and np.array_equal(np.asarray(im), pixels)
    after = tmp_path / "after.png"  # a tEXt chunk after the pixels (PIL writes none before them) is not looked for
    Image.fromarray(pixels).save(after)
    data = after.read_bytes()
    end = data.rindex(b"IEND") - 4
    chunk = b"pixelwise\0late"
    data = data[:end] + struct.pack(">I", len(chunk)) + b"tEXt" + chunk + struct.pack(
        ">I", zlib.crc32(chunk, zlib.crc32(b"tEXt"))) + data[end:]
    after.write_bytes(data)
    assert Image.open(after).text["pixelwise"] == "late" and png_text(after, "pixelwise") is None
    (tmp_path / "n.png").write_text("not a png")
    assert png_text(tmp_path / "n.png", "pixelwise") is None and png_text(tmp_path / "absent.png", "x") is None
    with pytest.raises(ValueError, match="keyword"):
        encode_png(pixels, "P", PALETTE, {"": "x"})


def test_a_stack_interrupted_between_its_frames_resumes_from_the_frame_not_written(checkpoint, tmp_path,
                                                                                   monkeypatch, capsys):
    rng = np.random.default_rng(8)
    folder = tmp_path / "in"
    folder.mkdir()
    pages = [Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for _ in range(4)]
    pages[0].save(folder / "vol.tif", save_all=True, append_images=pages[1:])
    whole = tmp_path / "whole"
    assert _predict(checkpoint, folder, whole) == 0
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 2)  # frames 1-3 not written: resume reads them without frame 0
    assert _predict(checkpoint, folder, out) == 130
    monkeypatch.undo()
    assert sorted(_files(out)) == ["vol_00.png", "vol_00_overlay.png"]
    assert _predict(checkpoint, folder, out, "--resume") == 0
    assert "wrote 3 prediction(s)" in capsys.readouterr().out and _files(out) == _files(whole)


def test_record_difference_names_both_models_hashes_and_ignores_the_version_and_file_name():
    wanted = {"pixelwise_version": "1", "models": [{"file": "m.safetensors", "sha256": "b" * 64}],
              "input": [{"resize": None}], "prediction": [{"tta": None}], "crf": None, "score_thresh": None,
              "uncertainty": False, "watershed": None}
    other = json.dumps({**wanted, "models": [{"file": "m.safetensors", "sha256": "a" * 64}]})
    assert writers.record_difference(other, wanted) == (
        "it was predicted by another model (SHA-256 aaaaaaaaaaaa; now bbbbbbbbbbbb)")
    assert writers.record_difference(json.dumps({}), wanted) == (
        "it was predicted by another model (SHA-256 none; now bbbbbbbbbbbb)")
    same = json.dumps({**wanted, "pixelwise_version": "0", "models": [{"file": "renamed", "sha256": "b" * 64}]})
    assert writers.record_difference(same, wanted) is None


def test_prediction_record_of_a_model_in_memory_defaults_to_no_uncertainty_and_no_watershed():
    predictor = SemanticPredictor(create_model("unet", num_classes=4, **KW).eval(),
                                  {"class_names": CLASS_NAMES, "palette": PALETTE})
    record = writers.prediction_record(predictor)
    assert record["models"] == [None] and record["uncertainty"] is False and record["watershed"] is None
    assert writers.prediction_record(predictor, uncertainty=True)["uncertainty"] is True


def test_a_refusal_counts_the_other_output_names_taken(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "f1.png").write_text("mine")
    with pytest.raises(UserError) as one:
        writers.check_predict([str(inputs)], out)
    assert "already holds f1.png (an earlier" in str(one.value)  # one file: no "and N more"
    for name in ("f1_overlay.png", "f2_overlay.png"):
        (out / name).write_text("mine")
    with pytest.raises(UserError) as three:
        writers.check_predict([str(inputs)], out)
    assert "already holds f1.png and 2 more of this prediction's output names (an earlier" in str(three.value)
    record = {"models": [{"file": "m.safetensors", "sha256": "b" * 64}]}
    with pytest.raises(UserError) as resumed:
        writers.check_predict([str(inputs)], out, resume=True, record=record)
    assert f"--resume: {out / 'f1.png'} (and 2 more output names there) is not known" in str(resumed.value)
    (out / "f1.png").unlink()
    (out / "f1_overlay.png").unlink()
    with pytest.raises(UserError) as alone:
        writers.check_predict([str(inputs)], out, resume=True, record=record)
    assert f"--resume: {out / 'f2_overlay.png'} is not known to be this prediction's (its image, model and " \
           "options): its mask f2.png, which holds the record, is not there; " in str(alone.value)


def test_a_record_that_is_not_a_json_object_is_no_record():
    """A mask's text chunk is anyone's to write: text nested past the recursion limit was a RecursionError
    through predict --resume and eval --predictions; now it is a mask without a record, as bad JSON is."""
    from pixelwise.inference.evaluate import parse_record

    assert parse_record('{"version": "1"}') == {"version": "1"}
    for text in (None, "not json", "[1, 2]", "[" * 5000 + "]" * 5000, '{"a": ' + "[" * 5000 + "]" * 5000 + "}"):
        assert parse_record(text) is None
