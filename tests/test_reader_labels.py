"""How readers map stored label values to classes where the file format can mislead: ISBI labels of
1 bit or with a palette, folder classes.json colours, palette masks in another colour order (folder,
VOC), SBD .mat labels that are not uint8, and the Cityscapes files found beside a missing mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from pixelwise.data import build_dataset
from pixelwise.data.isbi import ISBI2012, _natural_key
from pixelwise.data.palette import default_palette
from pixelwise.data.voc import read_sbd_mat
from pixelwise.errors import UserError

RNG = np.random.default_rng(0)


def _cells(size: int = 16) -> np.ndarray:
    """uint8 0/255 label: white cells, black membrane rows and columns every 4 pixels."""
    m = np.full((size, size), 255, np.uint8)
    m[::4, :] = 0
    m[:, ::4] = 0
    return m


def _bw_palette_image(cells: np.ndarray) -> Image.Image:
    """The label as a palette image: index 0 = black, index 1 = white (cells stored as index 1)."""
    img = Image.fromarray((cells == 255).astype(np.uint8), "P")
    img.putpalette([0, 0, 0, 255, 255, 255])
    return img


def _label_image(cells: np.ndarray, kind: str) -> Image.Image:
    if kind == "1bit":
        return Image.fromarray(cells).convert("1")  # white stored as 1
    if kind == "palette":
        return _bw_palette_image(cells)
    return Image.fromarray(cells)


def _isbi_png(root: Path, labels: list[Image.Image]) -> None:
    (root / "train" / "image").mkdir(parents=True)
    (root / "train" / "label").mkdir(parents=True)
    for k, label in enumerate(labels):
        image = Image.fromarray(RNG.integers(0, 255, label.size[::-1], dtype=np.uint8))
        image.save(root / "train" / "image" / f"{k}.png")
        label.save(root / "train" / "label" / f"{k}.png")


def _isbi_tif(root: Path, labels: list[Image.Image]) -> None:
    root.mkdir(parents=True)
    volume = [Image.fromarray(RNG.integers(0, 255, lab.size[::-1], dtype=np.uint8)) for lab in labels]
    volume[0].save(root / "train-volume.tif", save_all=True, append_images=volume[1:])
    labels[0].save(root / "train-labels.tif", save_all=True, append_images=labels[1:])


def test_isbi_slices_saved_as_single_tiffs_find_their_tiff_labels(tmp_path):
    """train/image/<n>.tif was read, but its label only looked for as label/<n>.png: every slice a
    "missing mask" that did not name the label/<n>.tif beside it."""
    cells = np.zeros((8, 10), np.uint8)
    cells[:, 5:] = 255
    root = tmp_path / "d"
    (root / "train" / "image").mkdir(parents=True)
    (root / "train" / "label").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(RNG.integers(0, 255, (8, 10), dtype=np.uint8)).save(root / "train" / "image" / f"{k}.tif")
        Image.fromarray(cells).save(root / "train" / "label" / f"{k}.{'png' if k == 0 else 'tif'}")
    ds = build_dataset("isbi2012", str(root), "all", val_count=1)
    assert ds.check() == [] and [Path(m).suffix for _, m in ds.items] == [".png", ".tif", ".tif"]
    np.testing.assert_array_equal(ds.load(2).mask, (cells > 0).astype(np.uint8))
    (root / "train" / "label" / "2.tif").unlink()  # still named as the PNG it looks for first
    problems = build_dataset("isbi2012", str(root), "all", val_count=1).check()
    assert len(problems) == 1 and problems[0].path.endswith("label/2.png")


@pytest.mark.parametrize("layout", ["png", "tif"])
@pytest.mark.parametrize("kind", ["1bit", "palette", "gray"])
def test_isbi_labels_are_read_by_their_gray_level(tmp_path, layout, kind):
    """A 1-bit label (white stored as 1) and a black/white palette label (white = index 1) give the
    same cells as the 0/255 gray label, in the PNG folders and the TIFF stack alike."""
    cells = _cells()
    label = _label_image(cells, kind)
    assert label.mode == {"1bit": "1", "palette": "P", "gray": "L"}[kind]
    (_isbi_png if layout == "png" else _isbi_tif)(tmp_path / "d", [label, label])
    ds = build_dataset("isbi2012", str(tmp_path / "d"), "all", val_count=1)
    mask = ds.load(1).mask
    np.testing.assert_array_equal(mask, (cells == 255).astype(np.uint8))
    assert int((mask == 1).sum()) == 144 and ds.check() == []


@pytest.mark.parametrize("layout", ["png", "tif"])
def test_isbi_labels_of_only_0_and_1_are_a_problem(tmp_path, layout):
    """An 8-bit label holding cells as 1 would be all membrane after the threshold at 128: check()
    names the file and says cells are stored as 255; a 0/255 label beside it is fine."""
    cells = _cells()
    bad = Image.fromarray((cells == 255).astype(np.uint8))  # L, values 0 and 1
    (_isbi_png if layout == "png" else _isbi_tif)(tmp_path / "d", [Image.fromarray(cells), bad])
    ds = build_dataset("isbi2012", str(tmp_path / "d"), "all", val_count=1)
    problems = ds.check()
    assert len(problems) == 1
    expected = (str(tmp_path / "d" / "train" / "label" / "1.png") if layout == "png"
                else f"{tmp_path / 'd' / 'train-labels.tif'}#1")
    assert problems[0].path == expected
    assert "only 0 and 1" in problems[0].message and "stored as 255 (white)" in problems[0].message
    with pytest.raises(UserError, match="only 0 and 1"):
        ds.check_or_refuse(skip_invalid=False, purpose="train")


def test_isbi_labels_too_dark_for_the_threshold_are_a_problem_and_train_says_store_255(tmp_path):
    """A 0/1 label saved at 4 bits reads as the gray levels 0/17: the 0/1 check missed it, and
    train's refusal then advised 'store it as 1', the opposite of ISBI's rule (cells are 255)."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import check_training_data

    cells = (_cells() == 255).astype(np.uint8) * 7  # a dark label: gray 7 for cells
    _isbi_png(tmp_path / "d", [Image.fromarray(cells)] * 3)
    ds = build_dataset("isbi2012", str(tmp_path / "d"), "all")
    problems = ds.check()
    assert len(problems) == 3 and "at most 7 of 255" in problems[0].message
    assert "stored as 255 (white)" in problems[0].message
    cfg = TrainConfig(model="unet", dataset="isbi2012", data=str(tmp_path / "d"), train_split="all",
                      val_split="all")
    with pytest.raises(UserError, match=r"store cells as 255 \(white\), membranes as 0; `pixelwise data"):
        check_training_data(cfg, ds, ds)


def test_isbi_all_split_does_not_check_val_count(tmp_path):
    """split all uses every slice and not val_count, so 3 slices open with the default val_count 4;
    train still needs a val_count that leaves slices to train on."""
    cells = Image.fromarray(_cells())
    _isbi_png(tmp_path / "d", [cells] * 3)
    assert len(build_dataset("isbi2012", str(tmp_path / "d"), "all")) == 3
    with pytest.raises(UserError, match="val_count=4 must be in 0..2"):
        build_dataset("isbi2012", str(tmp_path / "d"), "train")


def test_isbi_a_jpeg_label_is_refused_as_lossy(tmp_path):
    _isbi_png(tmp_path / "d", [Image.fromarray(_cells())] * 2)
    Image.fromarray(_cells()).save(tmp_path / "d" / "train" / "label" / "1.png", format="JPEG")  # JPEG bytes
    ds = build_dataset("isbi2012", str(tmp_path / "d"), "all")
    problems = ds.check()
    assert len(problems) == 1 and problems[0].path.endswith("1.png") and "lossy compression" in str(problems[0])
    with pytest.raises(UserError, match="lossy compression"):
        ds.load(1)


def test_isbi_slices_in_natural_order_numbers_before_words_and_classes_black_and_white():
    names = ["b", "10", "2", "a1", "a10", "a2", "0"]
    # digits sort before letters, as in a plain string sort; numbers by value
    order = sorted(names, key=lambda n: _natural_key(Path(f"{n}.png")))
    assert order == ["0", "2", "10", "a1", "a2", "a10", "b"]
    assert ISBI2012.class_names == ["membrane", "cell"] and ISBI2012.palette == [(0, 0, 0), (255, 255, 255)]


@pytest.mark.parametrize("top, dark", [(127, True), (128, False)])
def test_isbi_a_label_whose_brightest_gray_is_under_128_is_a_problem(tmp_path, top, dark):
    cells = (_cells() == 255).astype(np.uint8) * top  # 127 reads as membrane everywhere, 128 as cell
    _isbi_png(tmp_path / "d", [Image.fromarray(cells)] * 2)
    ds = build_dataset("isbi2012", str(tmp_path / "d"), "all")
    assert [f"at most {top} of 255" in p.message for p in ds.check()] == ([True, True] if dark else [])
    assert (ds.load(0).mask == 1).any() != dark


def _folder(root: Path, spec: dict | None, masks: list[Image.Image]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if spec is not None:
        (root / "classes.json").write_text(json.dumps(spec))
    for i, m in enumerate(masks):
        w, h = m.size
        Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        m.save(root / "masks" / f"im{i}.png")
    return root


def _rgb_mask(colours: list[tuple[int, int, int]]) -> Image.Image:
    """4x(4*n) RGB mask: a 4-pixel band of each colour."""
    m = np.zeros((4, 4 * len(colours), 3), np.uint8)
    for k, c in enumerate(colours):
        m[:, 4 * k:4 * k + 4] = c
    return Image.fromarray(m)


BAD_SPECS = [
    ({"names": ["bg", "snow"], "palette": [[0, 0, 0], [255, 255, 255]]},
     ["class 1 'snow'", "[255, 255, 255]", "set ignore_color to a colour no class uses",
      "which is the ignore colour (ignore_color, white [255, 255, 255] unless set), so"]),
    ({"names": ["bg", "red"], "palette": [[0, 0, 0], [255, 0, 0]], "ignore_color": [255, 0, 0]},
     ["class 1 'red'", "which is ignore_color, so its pixels would be ignored",
      "set ignore_color to a colour no class uses"]),
    ({"names": ["bg", "car", "truck"], "palette": [[0, 0, 0], [255, 0, 0], [255, 0, 0]]},
     ["classes 1 'car' and 2 'truck'", "same colour [255, 0, 0]", "give each class its own colour"]),
    ({"names": ["bg", "grey"], "palette": [[0, 0, 0], [0.5, 0.5, 0.5]]},
     ["palette[1] is [0.5, 0.5, 0.5]", "whole numbers 0..255", "times 255"]),
    ({"names": ["bg", "red"], "palette": [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]},
     ["palette[0] is [0.0, 0.0, 0.0]", "whole numbers 0..255"]),
    ({"names": ["bg", "red"], "palette": [[0, 0, 0], [256, 0, 0]]}, ["palette[1] is [256, 0, 0]", "256 is outside"]),
    ({"names": ["bg", "red"], "palette": [[0, 0, 0], [True, 0, 0]]},
     ["palette[1] is [true, 0, 0]", "true and false are not numbers"]),
    ({"names": ["bg", "red"], "palette": [[0, 0, 0], [9, 9, 9]], "ignore_color": [-1, 0, 0]},
     ["ignore_color is [-1, 0, 0]", "-1 is outside"]),
    ({"names": ["a", "b"], "palette": [[1, 1, 1], [10, 20, 30]], "ignore_colour": [0, 0, 0]},
     ["unknown key 'ignore_colour' (did you mean 'ignore_color'?)", "rename or remove it"]),
    ({"names": ["bg", "red"], "colors": [[0, 0, 0], [255, 0, 0]]}, ["unknown key 'colors' (did you mean 'palette'?)"]),
    ({"names": ["bg", "fg"], "ignore_index": 0, "colour_palette": [[0, 0, 0], [9, 9, 9]]},
     ["unknown keys 'ignore_index'", "255 in index masks", "'colour_palette' (did you mean 'palette'?)"]),
    # a misspelling no alias lists: the closest key pixelwise reads (difflib)
    ({"names": ["bg", "red"], "palete": [[0, 0, 0], [255, 0, 0]]},
     ["unknown key 'palete' (did you mean 'palette'?)", "rename or remove it"]),
    # other tools' spellings: each is named with the key pixelwise reads
    ({**{k: [] for k in ("colors", "colours", "color", "colour", "colour_palette", "color_palette", "colormap",
                         "colourmap", "cmap")}, "classes": [], "class_names": [], "labels": [], "ignore_colour": []},
     [f"'{k}' (did you mean 'palette'?)" for k in ("colors", "colours", "color", "colour", "colour_palette",
                                                    "color_palette", "colormap", "colourmap", "cmap")]
     + [f"'{k}' (did you mean 'names'?)" for k in ("classes", "class_names", "labels")]
     + ["'ignore_colour' (did you mean 'ignore_color'?)", "rename or remove them"]),
    # a palette that does not give every name its colour (nor a name to every colour)
    ({"names": ["bg", "red", "blue"], "palette": [[0, 0, 0], [255, 0, 0]]}, ["3 names but 2 palette colours"]),
    # the number named is the first one outside 0..255, not 255 itself (the largest allowed)
    ({"names": ["bg", "red"], "palette": [[0, 0, 0], [255, 300, 0]]},
     ["palette[1] is [255, 300, 0]", "(300 is outside"]),
    # two numbers in range, not three: the same one line, with no number said to be outside 0..255
    ({"names": ["bg", "red"], "palette": [[0, 0, 0], [255, 0]]},
     ["palette[1] is [255, 0]: colours are [r, g, b] with whole numbers 0..255"]),
]


@pytest.mark.parametrize(("spec", "wanted"), BAD_SPECS, ids=[str(i) for i in range(len(BAD_SPECS))])
def test_folder_classes_json_is_refused_in_one_line(tmp_path, spec, wanted):
    """A class that would lose its pixels (the ignore colour, a colour shared with another class), a
    colour that is not three whole numbers 0..255 (not truncated) and an unknown key are refused,
    naming classes.json and the fix."""
    root = _folder(tmp_path / "f", spec, [_rgb_mask([(0, 0, 0), (255, 0, 0)])] * 2)
    with pytest.raises(UserError) as err:
        build_dataset("folder", str(root), "all")
    msg = str(err.value)
    assert msg.startswith(f"{root / 'classes.json'}: ") and "\n" not in msg
    for part in wanted:
        assert part in msg


@pytest.mark.parametrize("count", [0, 255])
def test_folder_classes_json_with_no_names_or_more_than_254_is_refused(tmp_path, count):
    """1..254 classes: 255 is ignore, so a 255th class could not be stored in a mask."""
    spec = {"names": [f"c{i}" for i in range(count)]}
    root = _folder(tmp_path / "f", spec, [Image.fromarray(np.zeros((4, 4), np.uint8))] * 2)
    with pytest.raises(UserError, match=rf"{count} classes; between 1 and 254 are supported"):
        build_dataset("folder", str(root), "all")


def test_folder_unknown_colour_with_254_palette_classes_is_a_problem(tmp_path):
    """The most classes a palette may give (254, ids 0..253): a colour outside it is still reported,
    not read as the last class."""
    palette = [[i, 0, 0] for i in range(254)]
    spec = {"names": [f"c{i}" for i in range(254)], "palette": palette}
    root = _folder(tmp_path / "f", spec, [_rgb_mask([(0, 0, 0), (253, 0, 0), (0, 200, 0)])] * 2)
    ds = build_dataset("folder", str(root), "all")
    assert ds.load(0).mask[0].tolist() == [0] * 4 + [253] * 4 + [255] * 4
    problems = ds.check()
    assert len(problems) == 2 and all("colours that are not in the palette" in p.message for p in problems)


def test_folder_white_class_with_another_ignore_color_is_read(tmp_path):
    """The fix the refusal gives: with ignore_color set to a colour no class uses, white is a class."""
    spec = {"names": ["bg", "snow"], "palette": [[0, 0, 0], [255, 255, 255]], "ignore_color": [255, 0, 255]}
    root = _folder(tmp_path / "f", spec, [_rgb_mask([(0, 0, 0), (255, 255, 255), (255, 0, 255)])] * 2)
    ds = build_dataset("folder", str(root), "all")
    assert ds.load(0).mask[0].tolist() == [0] * 4 + [1] * 4 + [255] * 4 and ds.check() == []


PAL3 = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


def _palette_mask(indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    img = Image.fromarray(indices.astype(np.uint8), "P")
    img.putpalette([v for c in colours for v in c])
    return img


def test_folder_palette_mask_in_another_colour_order_is_a_problem(tmp_path):
    """A palette mask whose own palette puts the classes' colours at other indices (as a PNG optimiser
    or an editor's indexed mode saves it) looks right and is read by index: check() names the file,
    the index, its colour and the class of that colour. Masks in the dataset's order, and masks whose
    palette colours are not the classes' (a gray palette), are accepted."""
    cls = np.zeros((4, 12), np.uint8)
    cls[:, 4:8], cls[:, 8:] = 1, 2
    order = [2, 1, 0]  # index k of the saved mask holds class order[k]'s colour
    inverse = np.argsort(order).astype(np.uint8)
    permuted = _palette_mask(inverse[cls], [PAL3[c] for c in order])
    assert np.array_equal(np.asarray(permuted.convert("RGB")), np.array(PAL3, np.uint8)[cls])  # looks the same
    gray = _palette_mask(cls, [(v, v, v) for v in range(256)])
    ordered = _palette_mask(cls, PAL3)
    root = _folder(tmp_path / "f", {"names": ["bg", "red", "green"], "palette": [list(c) for c in PAL3]},
                   [permuted, gray, ordered])
    ds = build_dataset("folder", str(root), "all")
    problems = ds.check()
    assert [p.path for p in problems] == [str(root / "masks" / "im0.png")]
    msg = problems[0].message
    assert "index 0 has the colour [0, 255, 0]" in msg and "class 2 'green'" in msg and "class 0 'bg'" in msg
    assert "re-save the mask with the dataset's palette order, or as class indices" in msg
    assert ds.load(1).mask[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4  # gray palette: indices, as documented


def _voc(root: Path, masks: dict[str, Image.Image], split: str = "val") -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for stem, m in masks.items():
        w, h = m.size
        Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        m.save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{s}\n" for s in masks))
    return voc


def test_voc_mask_with_a_compacted_palette_is_a_problem(tmp_path):
    """A VOC mask re-saved with its used colours at indices 0, 1, 2 (person's colour at index 1) is
    read as aeroplane: check() says so; the mask with VOC's own colour map is clean."""
    cls = np.zeros((8, 16), np.uint8)
    cls[:, 6:12], cls[:, 5], cls[:, 12] = 15, 255, 255
    voc_colours = default_palette(256)
    assert voc_colours[255] == (224, 224, 192)
    official = _palette_mask(cls, voc_colours)
    used = [0, 15, 255]
    index = np.zeros(256, np.uint8)
    index[used] = [0, 1, 2]
    compact = _palette_mask(index[cls], [voc_colours[u] for u in used])
    assert np.array_equal(np.asarray(compact.convert("RGB")), np.asarray(official.convert("RGB")))
    voc = _voc(tmp_path / "v", {"2007_000032": compact, "2007_000033": official})
    ds = build_dataset("voc", str(tmp_path / "v"), "val")
    problems = ds.check()
    assert [p.path for p in problems] == [str(voc / "SegmentationClass" / "2007_000032.png")]
    assert "index 1 has the colour [192, 128, 128]" in problems[0].message
    assert "class 15 'person' in the VOC colour map" in problems[0].message
    assert "read as class 1 'aeroplane'" in problems[0].message
    assert sorted(set(ds.load(1).mask.ravel().tolist())) == [0, 15, 255]


def test_sbd_mat_values_are_not_wrapped_or_truncated(tmp_path):
    """A re-exported SBD label (double, int16) holding non-whole values or values outside 0..255 is
    a problem saying what it holds; uint8 and whole doubles 0..255 read as they are."""
    sbd = tmp_path / "sbd"
    (sbd / "cls").mkdir(parents=True)
    seg = np.zeros((8, 16))
    seg[:, 4:8], seg[:, 8:] = 15, 255
    savemat(sbd / "cls" / "whole.mat", {"GTcls": {"Segmentation": seg}})
    np.testing.assert_array_equal(read_sbd_mat(sbd / "cls" / "whole.mat"), seg.astype(np.uint8))
    frac = seg.copy()
    frac[0, 0] = 2.7
    savemat(sbd / "cls" / "frac.mat", {"GTcls": {"Segmentation": frac}})
    with pytest.raises(UserError, match=r"frac\.mat: .* not whole numbers, e\.g\. 2\.7"):
        read_sbd_mat(sbd / "cls" / "frac.mat")
    wide = seg.astype(np.int16)
    wide[0, 0], wide[0, 1] = -1, 300
    savemat(sbd / "cls" / "wide.mat", {"GTcls": {"Segmentation": wide}})
    with pytest.raises(UserError, match=r"wide\.mat: .*values -1\.\.300, outside 0\.\.255"):
        read_sbd_mat(sbd / "cls" / "wide.mat")
    # through the reader: check() names the file and what it holds
    voc = _voc(tmp_path / "v", {}, split="train")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    (sbd / "img").mkdir()
    for stem in ("frac", "wide", "whole"):
        Image.fromarray(RNG.integers(0, 255, (8, 16, 3), dtype=np.uint8)).save(sbd / "img" / f"{stem}.jpg")
    (sbd / "train.txt").write_text("frac\nwide\nwhole\n")
    (sbd / "val.txt").write_text("")
    ds = build_dataset("voc", str(tmp_path / "v"), "train_aug", sbd_root=str(sbd))
    found = {Path(p.path).name: p.message for p in ds.check()}
    assert sorted(found) == ["frac.mat", "wide.mat"]
    assert "not whole numbers" in found["frac.mat"] and "-1..300" in found["wide.mat"]


def _cityscapes(root: Path, split: str, label: str | None) -> Path:
    name = "aachen_000000_000019"
    img_dir = root / "leftImg8bit" / split / "aachen"
    img_dir.mkdir(parents=True)
    Image.fromarray(RNG.integers(0, 255, (8, 16, 3), dtype=np.uint8)).save(img_dir / f"{name}_leftImg8bit.png")
    if label is not None:
        (root / label).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 16), np.uint8)).save(root / label)
    return root / "gtFine" / split / "aachen" / f"{name}_gtFine_labelIds.png"


@pytest.mark.parametrize(("label", "wanted"), [
    ("gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
     ["aachen_000000_000019_gtFine_labelTrainIds.png is there", "createTrainIdLabelImgs",
      "keep or restore the labelIds files"]),
    ("gtCoarse/val/aachen/aachen_000000_000019_gtCoarse_labelIds.png",
     ["aachen_000000_000019_gtCoarse_labelIds.png is there", "gtCoarse) are not supported"]),
])
def test_cityscapes_missing_label_ids_names_the_file_found_instead(tmp_path, label, wanted):
    """Where *_gtFine_labelIds.png is missing but a labelTrainIds or a gtCoarse file of the image is
    there, the missing-mask problem names it and says what pixelwise reads; with neither, it stays
    the plain problem."""
    expected = _cityscapes(tmp_path / "c", "val", label)
    problems = build_dataset("cityscapes", str(tmp_path / "c"), "val").check()
    assert [p.path for p in problems] == [str(expected)]
    assert problems[0].message.startswith("missing mask for image ")
    for part in wanted:
        assert part in problems[0].message
    _cityscapes(tmp_path / "plain", "val", None)
    plain = build_dataset("cityscapes", str(tmp_path / "plain"), "val").check()
    assert len(plain) == 1 and plain[0].message.endswith("_leftImg8bit.png")


def test_folder_messages_for_a_missing_root_and_a_label_of_254(tmp_path):
    """A missing --data folder was reported as a wrong layout; label 254 got the advice num_classes=255,
    which is then refused (254 classes at most)."""
    import numpy as np
    from PIL import Image

    from pixelwise.data import build_dataset
    from pixelwise.errors import UserError

    with pytest.raises(UserError, match="no such folder; give the folder that holds images/ and masks/"):
        build_dataset("folder", str(tmp_path / "nowhere"), "all")
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 1
    mask[0, 0] = 254
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    problems = [str(p) for p in build_dataset("folder", str(tmp_path), "all").check()]
    assert len(problems) == 1 and "label 254 cannot be a class: 0..253 are classes, 255 is ignore" in problems[0]
    assert "num_classes=255" not in problems[0]


def test_an_index_mask_holding_254_is_not_said_to_hold_colours(tmp_path):
    """With a classes.json palette, an index mask storing 254 was told it had 'colours that are
    not in the palette'; only RGB masks are read through the palette."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"],
                                                       "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]]}))
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
    Image.fromarray(np.array([[0, 1, 254], [0, 1, 2]], np.uint8)).save(tmp_path / "masks" / "a.png")
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1] = (1, 2, 3)  # a colour of no class
    Image.fromarray(rgb).save(tmp_path / "masks" / "b.png")
    found = {Path(p.path).name: p.message for p in build_dataset("folder", str(tmp_path), "all").check()}
    assert found["a.png"].startswith("label values 254 outside the 3 classes")
    assert found["b.png"].startswith("colours that are not in the palette")


@pytest.mark.parametrize("seg", [np.zeros((4, 5, 3), np.uint8), np.array(["a", "b"], dtype=object)],
                         ids=["3-D", "strings"])
def test_sbd_mat_that_is_not_a_2d_array_of_numbers_is_one_user_error(tmp_path, seg):
    """read_sbd_mat's docstring: a label that is not a 2-D array of class ids (a stacked 3-D label, a cell of
    strings) is a UserError naming what it holds, not a 3-D "mask" or a numpy TypeError later."""
    savemat(tmp_path / "odd.mat", {"GTcls": {"Segmentation": seg}})
    with pytest.raises(UserError, match=r"odd\.mat: GTcls\.Segmentation is a .* array of shape .*not a 2-D array"):
        read_sbd_mat(tmp_path / "odd.mat")


def test_isbi_an_image_folder_without_slices_names_the_folder_whatever_the_split(tmp_path):
    """train/image/ holding no .png/.tif (only a note) is one error naming it for every split, not a
    val_count message about a range 0..-1 or an empty dataset."""
    (tmp_path / "train" / "image").mkdir(parents=True)
    (tmp_path / "train" / "label").mkdir()
    (tmp_path / "train" / "image" / "readme.txt").write_text("slices go here")
    for split in ("train", "val", "all"):
        with pytest.raises(UserError, match=r"image: no \.png/\.tif images in it"):
            build_dataset("isbi2012", str(tmp_path), split)
