"""What real downloads and hand-made lists get wrong, said rather than trained on: split lists
that name a file twice or share files with the other split, a Notepad BOM, empty lists, options of
the wrong JSON type, files --skip-invalid leaves out, and splits whose labels are withheld."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import write_isbi_tree
from pixelwise.cli import main
from pixelwise.data import build_dataset, files
from pixelwise.data.files import identity_lut, make_lut, read_split_list, split_fingerprint, split_ref
from pixelwise.data.folder import val_stems
from pixelwise.data.inspect import inspect_dataset
from pixelwise.data.io import write_mask
from pixelwise.errors import UserError

RNG = np.random.default_rng(3)
TINY = ["--model-kwargs", '{"base_channels": 4}', "--epochs", "1", "--batch-size", "2", "--no-progress"]


def _folder(root, n=6, classes=3):
    for i in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        (root / "masks").mkdir(exist_ok=True)
        write_mask(root / "masks" / f"im{i}.png", RNG.integers(0, classes, (8, 10)).astype(np.uint8))


def _voc(root, stems=("2007_000001", "2007_000002", "2007_000003")):
    voc = root / "VOCdevkit" / "VOC2012"
    for stem in stems:
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        write_mask(voc / "SegmentationClass" / f"{stem}.png", RNG.integers(0, 21, (8, 10)).astype(np.uint8))
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    return voc, sets


def test_a_file_listed_twice_is_used_once_and_a_shared_file_is_named_at_train(tmp_path, capsys):
    _folder(tmp_path)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("im0\nim1\nim2\nim3\nim1\n")
    (tmp_path / "splits" / "val.txt").write_text("im3\nim4\nim4\n")
    val = build_dataset("folder", str(tmp_path), "val")
    assert [p.rsplit("/", 1)[-1] for p, _ in val.items] == ["im3.png", "im4.png"]
    assert val.notes() == ["the val split lists 1 image(s) more than once (first: im4.png); each is used once"]
    report = inspect_dataset(val, progress=False)
    assert report["num_images"] == 2 and report["notes"][0].startswith("the val split lists 1 image")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data", str(tmp_path), "--out", str(out), *TINY]) == 0
    said = capsys.readouterr().out
    assert "note: the train split lists 1 image(s) more than once (first: im1.png); each is used once" in said
    assert "note: 1 of the 2 val images are also in the train split (first: im3.png)" in said
    assert "4 train / 2 val images" in said


def test_a_val_image_that_is_a_link_to_a_train_image_is_named_as_shared(tmp_path):
    """The note compared path strings: val's im5.png, a link to train's im0.png (and its mask a link
    to im0's), was validated on without a word, flattering the checkpoint it selects."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import open_datasets

    _folder(tmp_path, n=5)
    for sub in ("images", "masks"):
        (tmp_path / sub / "im5.png").symlink_to("im0.png")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("im0\nim1\nim2\n")
    (tmp_path / "splits" / "val.txt").write_text("im3\nim5\n")
    said: list[str] = []
    open_datasets(TrainConfig(dataset="folder", data=str(tmp_path)), log=said.append)
    assert "note: 1 of the 2 val images are also in the train split (first: im5.png)" in " ".join(said), said


def test_voc_lists_with_a_bom_empty_or_missing(tmp_path):
    voc, sets = _voc(tmp_path)
    (sets / "train.txt").write_bytes("2007_000001\r\n2007_000002\r\n".encode("utf-8-sig"))  # Notepad
    ds = build_dataset("voc", str(tmp_path), "train")
    assert [ds.name_of(i) for i, _ in ds.items] == ["2007_000001", "2007_000002"] and ds.check() == []
    (sets / "val.txt").write_text("\n")
    with pytest.raises(UserError, match="val.txt: the split list is empty"):
        build_dataset("voc", str(tmp_path), "val")
    with pytest.raises(UserError, match=r"trainval.txt: split list not found \(lists there: train, val\)"):
        build_dataset("voc", str(tmp_path), "trainval")
    with pytest.raises(UserError, match="sbd_root .*nowhere: no such folder"):
        build_dataset("voc", str(tmp_path), "train", sbd_root=str(tmp_path / "nowhere"))


def test_an_empty_folder_list_a_val_split_with_nothing_left_and_a_lossless_webp_mask_are_named(tmp_path, capsys):
    """Three refusals that sent the user the wrong way: an empty splits/val.txt was 'no images found
    ... see the expected layout'; --skip-invalid with every val image bad said 'nothing to train';
    a lossless WebP mask was refused for 'lossy compression'."""
    _folder(tmp_path, n=6)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("im0\nim1\nim2\nim3\n")
    (tmp_path / "splits" / "val.txt").write_text("\n  \n")
    run = ["train", "--dataset", "folder", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *TINY]
    assert main(run) == 2
    assert f"{tmp_path / 'splits' / 'val.txt'}: lists no images; write the stems or file names of the val images" \
        in capsys.readouterr().err
    (tmp_path / "splits" / "val.txt").write_text("im4\nim5\n")
    for stem in ("im4", "im5"):
        (tmp_path / "images" / f"{stem}.png").write_bytes(b"")
    assert main([*run, "--skip-invalid"]) == 2
    err = capsys.readouterr().err
    assert "every item of the val split of FolderDataset has a problem" in err
    assert "nothing to validate on: fix them, or validate on another split (--val-split)" in err, err
    mask = np.asarray(Image.open(tmp_path / "masks" / "im0.png"))
    (tmp_path / "masks" / "im0.png").unlink()
    for lossless, why in ((True, "masks are read from"), (False, "lossy compression")):
        Image.fromarray(mask).save(tmp_path / "masks" / "im0.webp", lossless=lossless)
        problems = [str(p) for p in build_dataset("folder", str(tmp_path), "train").check()]
        assert any("im0.webp is there, but " + why in p for p in problems), problems


# MATLAB's ``save -v7.3`` writes HDF5, which scipy refuses with NotImplementedError
V73 = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\x00\x02IM"
       + b"\x89HDF\r\n\x1a\n" + bytes(64))


@pytest.mark.parametrize("content, words", [(b"", "unreadable SBD .mat file"),
                                             (V73, "a MATLAB v7.3 (HDF5) .mat file")])
def test_an_sbd_mat_file_that_scipy_cannot_read_is_named(tmp_path, content, words):
    voc, sets = _voc(tmp_path)
    (sets / "train.txt").write_text("2007_000001\n")
    (sets / "val.txt").write_text("2007_000003\n")
    sbd = tmp_path / "sbd"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "cls" / "2008_000009.mat").write_bytes(content)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(voc / "JPEGImages" / "2008_000009.jpg")
    (sbd / "train.txt").write_text("2008_000009\n")
    (sbd / "val.txt").write_text("2007_000001\n")
    ds = build_dataset("voc", str(tmp_path), "train_aug", sbd_root=str(sbd))
    with pytest.raises(UserError, match=re.escape(f"2008_000009.mat: {words}")):
        ds.load([ds.name_of(i) for i, _ in ds.items].index("2008_000009"))
    assert any(words in p.message for p in ds.check())


@pytest.mark.parametrize("kind, options, words", [
    ("camvid", {"val_sequences": ["0006R0"], "join_val": "no"}, "'join_val' must be true or false, got 'no'"),
    ("folder", {"skip_invalid": 1}, "'skip_invalid' must be true or false, got 1"),
    ("isbi2012", {"val_count": True}, "'val_count' must be a whole number, got True"),
    ("folder", {"num_classes": "3"}, "'num_classes' must be a whole number or null, got '3'"),
    ("voc", {"sbd_root": 5}, "'sbd_root' must be a string \\(a path\\) or null, got 5"),
    ("coco", {"skip_empty": "false"}, "'skip_empty' must be true or false, got 'false'"),
])
def test_options_of_the_wrong_json_type_are_named(tmp_path, kind, options, words):
    """"join_val": "no" is true to Python: it would have joined the val split it says not to."""
    with pytest.raises(UserError, match=f"--dataset-kwargs: {kind} option {words}"):
        build_dataset(kind, str(tmp_path), "train", **options)


def test_what_skip_invalid_leaves_out_is_said_by_train_inspect_and_eval(tmp_path, capsys):
    _folder(tmp_path, n=8)
    (tmp_path / "masks" / "im1.png").unlink()
    (tmp_path / "images" / "im2.png").write_bytes(b"")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data", str(tmp_path), "--out", str(out), "--train-split", "all",
                 "--val-split", "all", "--skip-invalid", *TINY]) == 0
    said = capsys.readouterr().out
    assert "left out 2 file(s) of the all split with problems (--skip-invalid), e.g." in said
    assert said.count("left out") == 1  # the val split is the same split: said once
    # the reader's own option drops the same files: inspect and eval's provenance still name them
    ds = build_dataset("folder", str(tmp_path), "all", skip_invalid=True)
    problems = inspect_dataset(ds, progress=False)["problems"]
    assert len(problems) == 2 and all(p.endswith("(left out by skip_invalid)") for p in problems)
    assert any("im2.png: an empty file (0 bytes)" in p for p in problems)
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / "best.safetensors"), "--dataset", "folder", "--data", str(tmp_path),
                 "--split", "all", "--dataset-kwargs", '{"skip_invalid": true}', "--json", str(report)]) == 0
    assert len(json.loads(report.read_text())["provenance"]["dataset"]["skipped"]) == 2


def test_a_split_without_labelled_pixels_is_said_to_have_none(tmp_path, capsys):
    _folder(tmp_path, n=3)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data", str(tmp_path), "--out", str(out), "--val-split", "train",
                 *TINY]) == 0
    for i in range(3):
        write_mask(tmp_path / "masks" / f"im{i}.png", np.full((8, 10), 255, np.uint8))
    report = inspect_dataset(build_dataset("folder", str(tmp_path), "all", num_classes=3), progress=False)
    assert report["problems"] == []  # no advice about binary 0/255 masks: there is no class 0 pixel either
    assert report["notes"] == ["no labelled pixel in this split (every pixel is 255, ignore): eval can score "
                               "nothing on it"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "best.safetensors"), "--dataset", "folder", "--data", str(tmp_path),
                 "--split", "all", "--dataset-kwargs", '{"num_classes": 3}']) == 0
    assert "the all split has no labelled pixel" in capsys.readouterr().err


def test_isbi_empty_folder_and_natural_order_of_slice_names(tmp_path):
    (tmp_path / "e" / "train" / "image").mkdir(parents=True)
    (tmp_path / "e" / "train" / "label").mkdir(parents=True)
    with pytest.raises(UserError, match=r"train/image: no .png/.tif images in it"):
        build_dataset("isbi2012", str(tmp_path / "e"), "train")
    root = tmp_path / "s"
    write_isbi_tree(root, RNG, count=12, size=16)
    for p in sorted((root / "train").glob("*/*.png")):  # 0.png .. 11.png -> slice_0.png .. slice_11.png
        p.rename(p.with_name(f"slice_{p.name}"))
    val = build_dataset("isbi2012", str(root), "val")
    assert [p.rsplit("/", 1)[-1] for p, _ in val.items] == [f"slice_{k}.png" for k in (8, 9, 10, 11)]


def test_a_folder_of_one_image_says_its_val_split_is_empty(tmp_path):
    _folder(tmp_path, n=1)
    with pytest.raises(UserError, match="val split of a folder of one image is empty.*--val-split train"):
        build_dataset("folder", str(tmp_path), "val")


def test_a_hash_in_the_data_path_is_part_of_the_path(tmp_path):
    """Mask refs were cut at the first '#' (meant for a stack's path#slice): under run#2/ every
    folder mask was "missing", and ISBI's PNG layout raised a ValueError traceback."""
    root = tmp_path / "run#2"
    _folder(root, n=3)
    ds = build_dataset("folder", str(root), "all")
    assert ds.check() == [] and len(ds) == 3
    isbi = tmp_path / "isbi#1"
    write_isbi_tree(isbi, RNG, count=6, size=16)
    ds = build_dataset("isbi2012", str(isbi), "train", val_count=2)
    assert ds.check() == [] and ds.name_of(ds.items[0][0]) == "0" and ds.load(0).mask.shape == (16, 16)
    stack = tmp_path / "stack#3"
    stack.mkdir()
    pages = [Image.fromarray(RNG.integers(0, 256, (16, 16), dtype=np.uint8)) for _ in range(4)]
    pages[0].save(stack / "train-volume.tif", save_all=True, append_images=pages[1:])
    labels = [Image.fromarray(((RNG.random((16, 16)) > 0.2) * 255).astype(np.uint8)) for _ in range(4)]
    labels[0].save(stack / "train-labels.tif", save_all=True, append_images=labels[1:])
    ds = build_dataset("isbi2012", str(stack), "train", val_count=1)
    assert ds.check() == [] and [ds.name_of(i) for i, _ in ds.items] == ["train-volume_00", "train-volume_01",
                                                                           "train-volume_02"]
    np.testing.assert_array_equal(ds.load(2).image[..., 0], np.asarray(pages[2]))


def test_inspect_names_a_broken_file_whose_stem_another_problem_shares(tmp_path):
    """A load error was hidden when any check() problem named a file of the same stem: a cut a.gif
    went unlisted beside a stray a.heic, while the same cut b.gif was listed. And a 1-class
    dataset with ignored pixels was told to 'store it as 1', outside its classes."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for k in ("a", "b"):
        Image.fromarray(RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}.gif")
        write_mask(tmp_path / "masks" / f"{k}.png", (RNG.random((32, 32)) > 0.5).astype(np.uint8))
        data = (tmp_path / "images" / f"{k}.gif").read_bytes()
        (tmp_path / "images" / f"{k}.gif").write_bytes(data[:-40])  # GIF: found cut only when decoded
    (tmp_path / "images" / "a.heic").write_bytes(b"x")
    report = inspect_dataset(build_dataset("folder", str(tmp_path), "all"))
    cut = [p for p in report["problems"] if "unreadable or truncated" in p]
    assert sorted(p.split(": ", 1)[0].rsplit("/", 1)[-1] for p in cut) == ["a.gif", "b.gif"], report["problems"]
    one = tmp_path / "one"
    _folder(one, n=2, classes=1)
    write_mask(one / "masks" / "im0.png", np.where(RNG.random((8, 10)) > 0.5, 255, 0).astype(np.uint8))
    report = inspect_dataset(build_dataset("folder", str(one), "all", num_classes=1))
    assert report["problems"] == [] and report["ignored_pixels"] > 0


@pytest.mark.skipif(os.name == "nt" or sys.platform == "darwin", reason="file names there are always Unicode")
def test_a_file_name_that_is_not_utf8_is_split_and_read(tmp_path):
    """Python gives such a name (Latin-1 from an old camera card) with surrogate escapes, which
    str.encode() refused: the folder split was a traceback in inspect, train and eval."""
    _folder(tmp_path, n=4)
    odd = os.fsdecode(b"caf\xe9")
    for sub in ("images", "masks"):
        (tmp_path / sub / "im0.png").rename(tmp_path / sub / f"{odd}.png")
    stems = {Path(i).stem for i, _ in build_dataset("folder", str(tmp_path), "train").items} | {
        Path(i).stem for i, _ in build_dataset("folder", str(tmp_path), "val").items}
    assert stems == {odd, "im1", "im2", "im3"}
    # the split of UTF-8 names is unchanged: the hash of their bytes, as before
    assert val_stems(["im1", "im2", "im3", "b\u00e9"]) == set(
        sorted(["im1", "im2", "im3", "b\u00e9"], key=lambda s: hashlib.sha1(s.encode()).hexdigest())[:1])
    assert main(["data", "inspect", "--dataset", "folder", "--data", str(tmp_path), "--split", "all"]) == 0


def test_a_damaged_isbi_stack_is_named_not_val_count(tmp_path):
    """A volume cut inside its page directories opened as one slice, and train said "val_count=4
    must be in 0..0", an option the user never set."""
    pages = [Image.fromarray(RNG.integers(0, 256, (16, 16), dtype=np.uint8)) for _ in range(6)]
    pages[0].save(tmp_path / "train-volume.tif", save_all=True, append_images=pages[1:])
    pages[0].save(tmp_path / "train-labels.tif", save_all=True, append_images=pages[1:])
    data = (tmp_path / "train-volume.tif").read_bytes()
    assert len(build_dataset("isbi2012", str(tmp_path), "train")) == 2  # 6 slices, val_count 4
    (tmp_path / "train-volume.tif").write_bytes(data[:100])  # inside page 0's directory
    with pytest.raises(UserError, match=r"train-volume\.tif: truncated TIFF \(page 0's directory"):
        build_dataset("isbi2012", str(tmp_path), "train")


def _tree(root: Path, sizes=(6000, 100, 20000)) -> list[Path]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = []
    for k, n in enumerate(sizes):
        p = root / f"im{k}.png"
        p.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        out.append(p)
    return out


def fp(paths, attr="items"):
    return split_fingerprint(SimpleNamespace(**{attr: [(str(p), None) for p in paths]}))


def test_fingerprint_is_a_sha256_hex_and_invariant_to_order_copy_and_move(tmp_path):
    a = _tree(tmp_path / "a")
    d = fp(a)
    assert isinstance(d, str) and len(d) == 64 and int(d, 16) >= 0
    assert fp(list(reversed(a))) == d
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert fp(sorted((tmp_path / "b").iterdir())) == d
    assert split_fingerprint(SimpleNamespace(listed_items=[(str(p), None) for p in a], items=[])) == d


def test_fingerprint_changes_with_a_name_a_size_a_head_or_a_tail_but_not_the_middle(tmp_path):
    a = _tree(tmp_path / "a")
    d = fp(a)
    big = a[2]  # 20000 bytes: 4096..15904 is neither head nor tail
    data = bytearray(big.read_bytes())
    for where, changes in ((10000, False), (100, True), (19990, True), (19999, True), (0, True)):
        mutated = bytearray(data)
        mutated[where] ^= 0xFF
        big.write_bytes(bytes(mutated))
        assert (fp(a) != d) is changes, where
    big.write_bytes(bytes(data))
    mid = bytearray(a[0].read_bytes())  # 6000 bytes: the tail read starts at 4096, after the head
    mid[5000] ^= 0xFF
    a[0].write_bytes(bytes(mid))
    assert fp(a) != d
    a[0].write_bytes(bytes(mid[:5999]))  # one byte shorter: the size is part of the key
    shorter = fp(a)
    assert shorter != d
    renamed = a[1].with_name("other.png")  # same bytes, another name
    a[1].rename(renamed)
    assert fp([a[0], renamed, a[2]]) != shorter


def test_fingerprint_none_without_items_or_with_an_unreadable_file(tmp_path, monkeypatch):
    a = _tree(tmp_path / "a")
    gone = tmp_path / "a" / "gone.png"
    assert fp([gone] + a) is None
    monkeypatch.setattr(files, "FINGERPRINT_CONTENT_FILES", 0)  # names and sizes only: the stat says it
    assert fp(a + [gone]) is None and fp(a) is not None
    monkeypatch.undo()
    assert split_fingerprint(SimpleNamespace(items=[])) is None
    assert split_fingerprint(SimpleNamespace()) is None
    assert fp(a + [tmp_path / "a" / "gone.png"]) is None


def test_fingerprint_slices_of_one_stack_count_by_number(tmp_path):
    a = _tree(tmp_path / "a")
    stack = str(a[0])
    one = split_fingerprint(SimpleNamespace(items=[(f"{stack}#0", None), (f"{stack}#1", None)]))
    two = split_fingerprint(SimpleNamespace(items=[(f"{stack}#0", None), (f"{stack}#2", None)]))
    assert one is not None and one != two


def test_fingerprint_reads_content_of_the_first_1000_files_by_name_only(tmp_path, monkeypatch):
    a = _tree(tmp_path / "a")
    monkeypatch.setattr(files, "FINGERPRINT_CONTENT_FILES", 1)
    d = fp(a)  # content of im0 only
    data = bytearray(a[1].read_bytes())
    data[0] ^= 0xFF
    a[1].write_bytes(bytes(data))
    assert fp(a) == d  # im1 is past the first file: name and size only
    data = bytearray(a[0].read_bytes())
    data[0] ^= 0xFF
    a[0].write_bytes(bytes(data))
    assert fp(a) != d


@pytest.mark.parametrize("ref, expected", [
    ("a/b.tif#3", ("a/b.tif", 3)), ("a/b.tif#0", ("a/b.tif", 0)), ("run#2/a.png", ("run#2/a.png", None)),
    ("a.png", ("a.png", None)), ("a#x#12", ("a#x", 12)), ("a.png#", ("a.png#", None)),
])
def test_split_ref(ref, expected):
    assert split_ref(ref) == expected


def test_make_lut_and_identity_lut_by_hand():
    lut = make_lut({0: 0, 5: 1, 11: 255})
    assert lut.dtype == np.int16 and lut.shape == (256,)
    assert lut[0] == 0 and lut[5] == 1 and lut[11] == 255 and (np.delete(lut, [0, 5, 11]) == -1).all()
    assert (make_lut({}, invalid=7) == 7).all()
    lut = identity_lut(3)
    assert lut[:3].tolist() == [0, 1, 2] and lut[255] == 255 and (lut[3:255] == -1).all()
    lut = identity_lut(2, ignore=(9, 254))
    assert lut[:2].tolist() == [0, 1] and lut[9] == 255 and lut[254] == 255 and lut[255] == -1


def test_read_split_list_bom_missing_and_not_utf8(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbfa\nb\n")
    assert read_split_list(tmp_path / "train.txt") == "a\nb\n"
    with pytest.raises(UserError, match=r"split list not found \(lists there: train\)"):
        read_split_list(tmp_path / "val.txt")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_split_list(tmp_path / "bad.txt")


def test_label_values_outside_the_classes_are_shown_eight_at_most(tmp_path):
    """check() names the first 8 values outside the classes, then ', ...' when there are more."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem, top in (("eight", 9), ("nine", 10), ("ten", 11)):  # 2 classes: values 2..top are outside
        Image.fromarray(np.zeros((2, 12, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        write_mask(tmp_path / "masks" / f"{stem}.png", np.tile(np.arange(12, dtype=np.uint8).clip(0, top), (2, 1)))
    ds = build_dataset("folder", str(tmp_path), "all", num_classes=2)
    found = {Path(p.path).stem: p.message for p in ds.check()}
    valid = " outside the 2 classes (valid stored values: 0..1, 255)"
    assert found == {"eight": "label values 2, 3, 4, 5, 6, 7, 8, 9" + valid,
                     "nine": "label values 2, 3, 4, 5, 6, 7, 8, 9, ..." + valid,
                     "ten": "label values 2, 3, 4, 5, 6, 7, 8, 9, ..." + valid}
