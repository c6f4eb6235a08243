"""Ensembles of checkpoints (``--checkpoint A --checkpoint B``): the mean of the members'
probabilities, whole-image and tiled, against averages computed by hand."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise import create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.data.io import read_mask
from pixelwise.errors import UserError
from pixelwise.inference.ensemble import EnsemblePredictor, _take_rows, from_checkpoints
from pixelwise.inference.evaluate import evaluate_checkpoint
from pixelwise.inference.predictor import Predictor, SemanticPredictor


def _save(path, seed, num_classes=3, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"base_channels": 4, "batch_norm": True, "dropout": 0.0, **kwargs}
    model = create_model("unet", num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():
        model.head.weight.mul_(6.0)  # confident, varied members
    save_checkpoint(path, model, {"model": "unet", "num_classes": num_classes, "model_kwargs": kwargs,
                                  "task": "semantic", "mean": [0.4 + 0.1 * seed] * 3, "std": [0.25] * 3})
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ens")
    return [_save(d / "a.safetensors", 0), _save(d / "b.safetensors", 1, padding="valid"),
            _save(d / "c.safetensors", 2)]


@pytest.mark.parametrize("tile", [None, 48])
def test_ensemble_is_the_mean_of_its_members(checkpoints, tile):
    """Three members with their own normalisation and geometry (a valid U-Net among same ones,
    so tiled members stream bands of different heights): the ensemble's probabilities are the
    hand-computed mean of each member's own."""
    image = np.random.default_rng(0).integers(0, 255, (100, 83, 3), dtype=np.uint8)
    ensemble = from_checkpoints(checkpoints, tile=tile)
    assert isinstance(ensemble, EnsemblePredictor) and len(ensemble.members) == 3
    members = [Predictor.from_checkpoint(c, tile=tile).predict_probs(image) for c in checkpoints]
    want = (members[0] + members[1] + members[2]) / 3
    pred = ensemble.predict(image, uncertainty=True)
    torch.testing.assert_close(pred.probs, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pred.mask, want.argmax(0).numpy())
    assert len(np.unique(pred.mask)) > 1
    assert not all(np.array_equal(pred.mask, m.argmax(0).numpy()) for m in members)  # the mean decided somewhere
    np.testing.assert_allclose(pred.uncertainty, -(want * want.clamp_min(1e-12).log()).sum(0).numpy(), atol=1e-5)


def test_predict_cli_writes_the_ensemble_mask(checkpoints, tmp_path):
    image = np.random.default_rng(1).integers(0, 255, (64, 70, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    args = ["predict", "--checkpoint", checkpoints[0], "--checkpoint", checkpoints[2], str(tmp_path / "x.png"),
            "--out", str(tmp_path / "out"), "--no-progress", "--tile", "32"]
    assert main(args) == 0
    probs = [Predictor.from_checkpoint(c, tile=32).predict_probs(image) for c in (checkpoints[0], checkpoints[2])]
    np.testing.assert_array_equal(read_mask(tmp_path / "out" / "x.png"), ((probs[0] + probs[1]) / 2).argmax(0).numpy())


def test_members_must_predict_the_same_classes(checkpoints, tmp_path):
    other = _save(tmp_path / "four.safetensors", 3, num_classes=4)
    with pytest.raises(UserError, match="same classes"):
        from_checkpoints([checkpoints[0], other])


def test_eval_scores_the_ensemble(checkpoints, tmp_path):
    """``eval --checkpoint A --checkpoint B``: pixel accuracy of the mean's masks, computed by hand."""
    import json

    from pixelwise.data.io import read_image

    rng = np.random.default_rng(4)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    gts = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(tmp_path / "images" / f"i{i}.png")
        gts.append(rng.integers(0, 3, (40, 52), dtype=np.uint8))
        Image.fromarray(gts[-1], mode="L").save(tmp_path / "masks" / f"i{i}.png")
    pair = [checkpoints[0], checkpoints[2]]
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", pair[0], "--checkpoint", pair[1], "--dataset", "folder", "--data",
                 str(tmp_path), "--split", "all", "--json", str(out), "--no-progress", "--no-bf"]) == 0
    metrics = json.loads(out.read_text())
    members = [Predictor.from_checkpoint(c) for c in pair]
    correct = 0
    for i, gt in enumerate(gts):
        image = read_image(tmp_path / "images" / f"i{i}.png")
        mean = (members[0].predict_probs(image) + members[1].predict_probs(image)) / 2
        correct += int((mean.argmax(0).numpy() == gt).sum())
    assert metrics["num_images"] == 2
    assert metrics["pixel_acc"] == pytest.approx(correct / (2 * 40 * 52), abs=1e-9)


def _folder(root, count=2, size=(40, 44)):
    rng = np.random.default_rng(3)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"i{i}.png")
        Image.fromarray(rng.integers(0, 3, size, dtype=np.uint8)).save(root / "masks" / f"i{i}.png")
    return root


def test_mc_samples_on_an_ensemble_samples_the_members_with_dropout(tmp_path):
    """predict --uncertainty sampled the dropout member of an ensemble, and eval --mc-samples 8, which
    the README names as its equivalent, refused the ensemble ('unet has none'): no eval could score
    those masks. --mc-samples now samples the members that have dropout."""
    dropout = _save(tmp_path / "d.safetensors", 0, dropout=0.5)
    plain = _save(tmp_path / "p.safetensors", 1)
    data = _folder(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", dropout, "--checkpoint", plain, str(data / "images"), "--out", str(out),
                 "--uncertainty", "--no-progress"]) == 0
    ensemble = from_checkpoints([dropout, plain], mc_samples=8)
    assert [m.mc_samples for m in ensemble.members] == [8, 0]
    for i in range(2):
        image = np.asarray(Image.open(data / "images" / f"i{i}.png"))
        np.testing.assert_array_equal(read_mask(out / f"i{i}.png"), ensemble.predict(image).mask)
    with pytest.raises(UserError, match=r"none of .*p.safetensors, .*q.safetensors has any"):
        from_checkpoints([plain, _save(tmp_path / "q.safetensors", 2)], mc_samples=8)


@pytest.mark.parametrize("options, words", [({"mc_samples": -1}, "--mc-samples must be from 0 to 1,000, got -1"),
                                            ({"mc_samples": 2_000_000_000}, "--mc-samples must be from 0 to 1,000"),
                                            ({"mc_samples": 2.5}, "--mc-samples must be a whole number"),
                                            ({"mc_samples": 2, "mode": "fast"}, "does not apply to Monte-Carlo"),
                                            ({"overlap": 0.5}, "overlap=0.5 goes with tile=N")])
def test_an_ensemble_refuses_the_options_its_members_refuse(tmp_path, capsys, options, words):
    """An ensemble set mc_samples on its members after building them, past every check: -1 or 2e9
    was a ValueError traceback (exit 1) from the sampling, and --mode fast with --mc-samples ran for
    two checkpoints while one was refused; overlap without tile was taken by the Python API."""
    dropout, plain = _save(tmp_path / "d.safetensors", 0, dropout=0.5), _save(tmp_path / "p.safetensors", 1)
    for paths in ([dropout], [dropout, plain]):
        with pytest.raises(UserError, match=words):
            from_checkpoints(paths, **options)
    if options == {"mc_samples": 2.5}:
        return  # the CLI's flag takes whole numbers only (argparse)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    capsys.readouterr()
    assert main(["predict", "--checkpoint", dropout, "--checkpoint", plain, str(_folder(tmp_path / "data") / "images"),
                 "--out", str(tmp_path / "out"), "--no-progress", *flags]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("pixelwise: error: --")


def test_an_ensemble_refuses_monte_carlo_dropout_in_int8_before_quantising(tmp_path, monkeypatch):
    """It quantised each member, refused one as below the int8 guard ('use --mode fast'), which was
    then refused in turn: three refusals for one reason."""
    import pixelwise.inference.fast

    def quantised(*args, **kwargs):
        raise AssertionError("a member was quantised")

    monkeypatch.setattr(pixelwise.inference.fast, "Int8Segmenter", quantised)
    dropout, plain = _save(tmp_path / "d.safetensors", 0, dropout=0.5), _save(tmp_path / "p.safetensors", 1)
    calib = [np.zeros((32, 32, 3), np.uint8)] * 2
    for paths, words in (([dropout, plain], "does not apply to Monte-Carlo dropout"), ([plain, plain], "has any")):
        with pytest.raises(UserError, match=words):
            from_checkpoints(paths, mc_samples=2, mode="int8", calib_data=calib)


def test_eval_records_each_members_contract_and_options(tmp_path):
    """eval --json of an ensemble recorded the first member's resize for all and mc_samples 0 even when
    Monte-Carlo dropout ran."""
    from pixelwise.checkpoint import load_checkpoint
    from pixelwise.inference.evaluate import evaluate_checkpoint

    resized = _save(tmp_path / "r.safetensors", 0, dropout=0.5)
    meta_path = tmp_path / "r.safetensors"
    model, meta = load_checkpoint(meta_path)
    save_checkpoint(meta_path, model, {**meta, "input": {"mean": [0.4] * 3, "std": [0.25] * 3, "normalize": True,
                                                         "resize": [32, 32], "channels": 3}})
    native = _save(tmp_path / "n.safetensors", 1)
    metrics = evaluate_checkpoint([resized, native], "folder", str(_folder(tmp_path / "data")), "all",
                                  progress=False, mc_samples=2)
    assert isinstance(metrics["input"], list) and [m["resize"] for m in metrics["input"]] == [[32, 32], None]
    seen = metrics["provenance"]["prediction"]
    assert seen["resize"] == "per member" and seen["mc_samples"] == "per member" and seen["tta"] is None
    members = metrics["provenance"]["ensemble"]
    assert [m["prediction"]["resize"] for m in members] == [[32, 32], "native"]
    assert [m["prediction"]["mc_samples"] for m in members] == [2, 0]


def test_eval_of_an_ensemble_records_the_first_members_file_and_every_members_file_in_order(tmp_path):
    """provenance["checkpoint"] of an ensemble is its first member's (path and SHA-256); ``ensemble``
    lists each member's file and hash in the order given."""
    first = _save(tmp_path / "first.safetensors", 0)
    second = _save(tmp_path / "second.safetensors", 1)
    metrics = evaluate_checkpoint([first, second], "folder", str(_folder(tmp_path / "data", count=1, size=(8, 8))),
                                  "all", progress=False, bf=False)
    sha = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (first, second)}
    assert sha[first] != sha[second]
    got = metrics["provenance"]
    assert got["checkpoint"] == str(Path(first).resolve()) and got["checkpoint_sha256"] == sha[first]
    assert [(m["checkpoint"], m["checkpoint_sha256"]) for m in got["ensemble"]] == [
        (str(Path(p).resolve()), sha[p]) for p in (first, second)]


def test_one_checkpoint_is_its_own_predictor_not_an_ensemble_of_one(checkpoints):
    one = from_checkpoints([checkpoints[0]])
    assert type(one) is SemanticPredictor  # Predictor.from_checkpoint's, not EnsemblePredictor
    image = np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    torch.testing.assert_close(one.predict_probs(image),
                               Predictor.from_checkpoint(checkpoints[0]).predict_probs(image), rtol=0, atol=0)


def test_members_built_without_names_are_named_by_their_place(checkpoints):
    a = Predictor.from_checkpoint(checkpoints[0])
    b = Predictor.from_checkpoint(checkpoints[1])
    assert EnsemblePredictor([a, b]).names == ["member 1", "member 2"]
    b.class_names = ["x", "y", "z"]
    with pytest.raises(UserError, match="member 1 has 3 classes: .*; member 2 has 3 classes: x, y, z"):
        EnsemblePredictor([a, b])


def test_an_ensemble_of_no_members_is_refused():
    with pytest.raises(ValueError, match="at least one member"):
        EnsemblePredictor([])


def test_an_ensemble_runs_in_the_mode_its_members_were_built_with(checkpoints):
    members = [Predictor.from_checkpoint(c, mode="fast") for c in checkpoints[:2]]
    assert [m.mode for m in members] == ["fast", "fast"]
    assert EnsemblePredictor(members).mode == "fast"  # not the base class's default, eager


def test_a_class_mismatch_names_the_first_four_classes_of_each_member(checkpoints):
    """The refusal shows up to four class names of each member, then '...' for the rest."""
    a = Predictor.from_checkpoint(checkpoints[0])
    b = Predictor.from_checkpoint(checkpoints[1])
    a.class_names = ["sky", "road", "car", "tree"]
    b.class_names = ["sky", "road", "car", "tree", "bike"]
    with pytest.raises(UserError) as info:
        EnsemblePredictor([a, b])
    assert str(info.value).endswith("member 1 has 4 classes: sky, road, car, tree; "
                                    "member 2 has 5 classes: sky, road, car, tree, ...")


def test_every_member_sees_every_calibration_image_of_a_generator(checkpoints):
    """calib_data may be a generator, read once: each member's calibration record counts (and
    hashes) all of its images, not the first member's leftovers."""
    images = [np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8) for i in range(2)]
    ensemble = from_checkpoints(checkpoints[:2], calib_data=(im for im in images), calib_crop=16)
    want = Predictor.from_checkpoint(checkpoints[0], calib_data=images, calib_crop=16).calibration
    assert want["images"] == 2
    assert [m.calibration for m in ensemble.members] == [want, want]


def test_take_rows_joins_queued_bands_and_keeps_the_rest_in_order():
    """A member whose bands are shorter than what the others delivered queues several: the rows
    taken span them, in order, and the rows left over stay queued as one band."""
    rows = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    queue = [rows[:, :2], rows[:, 2:5], rows[:, 5:]]
    torch.testing.assert_close(_take_rows(queue, 4), rows[:, :4], rtol=0, atol=0)
    assert len(queue) == 1
    torch.testing.assert_close(queue[0], rows[:, 4:], rtol=0, atol=0)
    torch.testing.assert_close(_take_rows(queue, 3), rows[:, 4:], rtol=0, atol=0)
    assert queue == []
