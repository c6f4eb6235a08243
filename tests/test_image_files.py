"""Image and mask files across the verbs: JPEG trailers, truncated BMP/TIFF found by the header
check, one list of image formats, lossy masks, 1-pixel images in augmentation, links, odd TIFFs."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from pixelwise.data import STORED_LABELS
from pixelwise.data.augment import build_transform
from pixelwise.data.folder import FolderDataset
from pixelwise.data.inspect import inspect_dataset
from pixelwise.data.io import IMAGE_SUFFIXES, jpeg_complete, probe, read_image, read_mask, tiff_layout
from pixelwise.errors import UserError
from pixelwise.inference.writers import expand_inputs
from pixelwise.sample import Sample
from pixelwise.serve.uploads import FORMATS, UploadError, decode_image, decode_mask, image_kind

RNG = np.random.default_rng(0)
H, W = 24, 40


def _photo(h: int = H, w: int = W) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _labels(h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[: h // 2, : w // 2] = 1
    m[h // 2 :, w // 2 :] = 2
    return m


def _dataset(root: Path, images: dict[str, bytes | np.ndarray], masks: dict[str, np.ndarray] | None = None) -> Path:
    """root/images + root/masks + classes.json (3 classes); an L mask for every image unless ``masks``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps({"names": ["bg", "a", "b"]}))
    for name, data in images.items():
        if isinstance(data, bytes):
            (root / "images" / name).write_bytes(data)
        else:
            Image.fromarray(data).save(root / "images" / name)
    for stem, m in (masks if masks is not None else {Path(n).stem: _labels() for n in images}).items():
        Image.fromarray(m).save(root / "masks" / f"{stem}.png")
    return root


def _encoded(a: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def _problems(ds: FolderDataset) -> dict[str, str]:
    return {Path(p.path).name: p.message for p in ds.check()}


# -- defect 1: JPEG data after the end-of-image marker -------------------------------------------------
def test_jpeg_with_data_after_its_end_marker_is_accepted_by_the_check(tmp_path):
    jpeg = _encoded(_photo(), "JPEG", quality=90)
    motion = jpeg + b"\0\0\0\x18ftypmp42" + bytes(range(256)) * 8  # a Motion Photo: an MP4 after the JPEG
    root = _dataset(tmp_path / "ds", {"motion.jpg": motion, "plain.jpg": jpeg})
    assert probe(root / "images" / "motion.jpg")[0] == (W, H)
    ds = FolderDataset(root, "all", skip_invalid=True)
    assert ds.check() == [] and len(ds) == 2
    assert inspect_dataset(ds, progress=False)["problems"] == []
    np.testing.assert_array_equal(read_image(root / "images" / "motion.jpg"), read_image(root / "images" / "plain.jpg"))


def test_truncated_jpeg_is_still_reported_even_with_an_end_marker_in_a_thumbnail(tmp_path):
    jpeg = _encoded(_photo(64, 64), "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    with pytest.raises(UserError, match=r"cut.jpg: truncated JPEG"):
        probe(tmp_path / "cut.jpg")
    # an application segment holding a whole small JPEG (as an EXIF thumbnail does, with its own FFD9)
    thumb = _encoded(_photo(8, 8), "JPEG")
    segment = b"\xff\xe5" + struct.pack(">H", len(thumb) + 2) + thumb
    whole = jpeg[:2] + segment + jpeg[2:]
    assert jpeg_complete(whole)
    (tmp_path / "thumb.jpg").write_bytes(whole)
    assert probe(tmp_path / "thumb.jpg")[0] == (64, 64)
    cut = whole[: len(whole) - 200]
    assert not jpeg_complete(cut) and b"\xff\xd9" in cut  # the thumbnail's end marker is no end
    (tmp_path / "thumb_cut.jpg").write_bytes(cut)
    with pytest.raises(UserError, match="thumb_cut.jpg: truncated JPEG"):
        probe(tmp_path / "thumb_cut.jpg")
    assert jpeg_complete(_encoded(_photo(64, 64), "JPEG", progressive=True))
    assert not jpeg_complete(b"") and not jpeg_complete(b"\xff\xd8")


# -- defect 2: truncated BMP and TIFF found by the header check ----------------------------------------
def _tiff_stack(pages: int = 3) -> bytes:
    frames = [Image.fromarray(_photo()) for _ in range(pages)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("name, data", [
    ("t.bmp", _encoded(_photo(), "BMP")),
    ("t16.tif", _encoded(_labels().astype(np.uint16) * 1000, "TIFF")),
    ("tlzw.tif", _encoded(_photo(), "TIFF", compression="tiff_lzw")),
    ("t.ppm", _encoded(_photo(), "PPM")),
    ("t.tga", _encoded(_photo(), "TGA")),
])
def test_truncated_bmp_tiff_pnm_tga_are_found_without_decoding(tmp_path, name, data):
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match=rf"{name}: truncated"):
        probe(tmp_path / name)
    (tmp_path / f"whole_{name}").write_bytes(data)
    assert probe(tmp_path / f"whole_{name}")[0] == (W, H)


def test_tiff_stack_with_a_cut_page_and_skip_invalid_agree_with_inspect(tmp_path):
    stack = _tiff_stack()
    bmp = _encoded(_photo(), "BMP")
    root = _dataset(tmp_path / "ds", {"a.png": _photo(), "b.png": _photo(), "stack.tif": stack[: len(stack) // 2],
                                      "pic.bmp": bmp[: len(bmp) // 2], "ok.tif": stack})
    found = _problems(FolderDataset(root, "all"))
    assert set(found) == {"stack.tif", "pic.bmp"}
    assert "truncated TIFF" in found["stack.tif"] and "truncated BMP" in found["pic.bmp"]
    ds = FolderDataset(root, "all", skip_invalid=True)
    assert sorted(Path(i).name for i, _ in ds.items) == ["a.png", "b.png", "ok.tif"]
    report = inspect_dataset(FolderDataset(root, "all"), progress=False)
    assert report["num_images"] == 3 and len(report["problems"]) == 2  # named once, by the check


# -- defect 3: one list of image formats --------------------------------------------------------------
def test_folder_dataset_reads_the_formats_predict_reads_and_names_the_others(tmp_path):
    images = {"p.png": _photo(), "q.ppm": _photo(), "g.pgm": _photo()[:, :, 0], "t.tga": _photo(),
              "x.pcx": _photo()}
    root = _dataset(tmp_path / "ds", images)
    Image.fromarray(_photo()).save(root / "images" / "anim.gif")
    Image.fromarray(_labels()).save(root / "masks" / "anim.png")
    Image.fromarray(_photo()).save(root / "images" / "icon.ico")
    Image.fromarray(_labels()).save(root / "masks" / "icon.png")
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "images" / "dir.png").mkdir()  # skipped without a word without splits/ (camvid names it)
    Image.fromarray(_labels()).save(root / "masks" / "dir.png")
    ds = FolderDataset(root, "all")
    assert sorted(Path(i).name for i, _ in ds.items) == ["anim.gif", "g.pgm", "p.png", "q.ppm", "t.tga", "x.pcx"]
    problems = sorted(str(p) for p in ds.check())
    assert len(problems) == 2 and "images/dir.png: not a file (a folder" in problems[0]
    problems = problems[1:]
    assert len(problems) == 1 and "images/icon.ico: .ico images are not read by folder datasets" in problems[0]
    assert "PNG" in problems[0] and "mask without an image" not in " ".join(problems)
    assert sorted(p.name for p in expand_inputs([str(root / "images")])) == sorted(
        ["anim.gif", *images])  # predict DIR: the same files
    assert {".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".jfif", ".tga", ".pcx", ".dib"} <= IMAGE_SUFFIXES
    assert {"TGA", "PCX", "PPM", "GIF", "DIB"} <= set(FORMATS)  # serve accepts them too


@pytest.mark.parametrize("fmt, kind", [("PNG", "PNG"), ("JPEG", "JPEG"), ("GIF", "GIF"), ("BMP", "BMP"),
                                       ("TIFF", "TIFF"), ("WEBP", "WebP"), ("PPM", "PPM"), ("PCX", "PCX"),
                                       ("AVIF", "AVIF")])
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # the cut TIFF's directory
def test_the_server_knows_each_format_it_opens_by_how_its_files_begin(fmt, kind):
    """A file of a format the server opens, cut to its first bytes: image_kind names the format from
    them, and a damaged file so begun is 400 naming it (415 is for files of no such format)."""
    if fmt in ("WEBP", "AVIF") and not features.check(fmt.lower()):
        pytest.skip(f"Pillow without {fmt}")
    buf = io.BytesIO()
    Image.fromarray(_photo(6, 5)).save(buf, format=fmt)
    head = buf.getvalue()[:16]
    assert image_kind(head) == kind
    assert image_kind(b"not an image at all") is None
    if fmt in ("GIF", "TIFF", "PCX", "AVIF"):  # PIL cannot identify these cut heads: the server names the kind
        with pytest.raises(UploadError) as e:
            decode_image(head + bytes(2), 10_000)
        article = "an" if kind == "AVIF" else "a"
        assert e.value.status == 400 and f"begins as {article} {kind} file" in e.value.detail, e.value.detail


# -- defect 4: lossy masks ----------------------------------------------------------------------------
def test_jpeg_coded_mask_is_a_problem_whatever_its_name(tmp_path):
    root = _dataset(tmp_path / "ds", {"a.png": _photo(), "b.png": _photo()})
    Image.fromarray(_labels()).save(root / "masks" / "a.png", format="JPEG", quality=75)
    found = _problems(FolderDataset(root, "all"))
    assert list(found) == ["a.png"] and found["a.png"].startswith("JPEG-compressed mask: lossy compression")
    assert "save masks as PNG" in found["a.png"]
    with pytest.raises(UserError, match="a.png: JPEG-compressed mask"):
        read_mask(root / "masks" / "a.png")
    assert len(FolderDataset(root, "all", skip_invalid=True)) == 1


@pytest.mark.parametrize("name, save, kind", [
    ("a.tif", {"compression": "jpeg", "quality": 90}, "JPEG-compressed TIFF"),
    ("a.webp", {"lossless": False, "exif": True}, "lossy WebP"),
    ("a.avif", {}, "AVIF/HEIF")])
def test_a_lossy_tiff_webp_or_avif_mask_is_refused(tmp_path, name, save, kind):
    """A JPEG-compressed TIFF mask (157 of 4096 labels changed, a phantom class), a lossy WebP in
    the extended container (its EXIF makes one) and a lossy AVIF were read, and scored by serve."""
    if name.endswith(".avif") and not features.check("avif"):
        pytest.skip("this Pillow writes no AVIF")
    exif = Image.Exif()
    exif[0x0131] = "a camera"  # Software: any EXIF puts a WebP in the extended (VP8X) container
    save = {**save, "exif": exif.tobytes()} if save.get("exif") else save
    labels = _labels()
    colours = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0)], np.uint8)
    Image.fromarray(labels if name.endswith(".tif") else colours[labels]).save(tmp_path / name, **save)
    with pytest.raises(UserError, match=f"{name}: {kind} mask: lossy compression"):
        read_mask(tmp_path / name, palette=colours.tolist())
    with pytest.raises(UploadError, match=f"{kind} mask"):
        decode_mask((tmp_path / name).read_bytes(), 10**6, colours.tolist(), 3, (H, W))
    Image.fromarray(labels).save(tmp_path / "b.tif", compression="tiff_lzw")  # lossless: read as it is
    np.testing.assert_array_equal(read_mask(tmp_path / "b.tif"), labels)
    Image.fromarray(colours[labels]).save(tmp_path / "b.webp", lossless=True, exif=save.get("exif", b""))
    np.testing.assert_array_equal(read_mask(tmp_path / "b.webp", palette=colours.tolist()), labels)


def test_every_unread_mask_file_of_a_stem_is_named_in_missing_mask(tmp_path):
    """Two files of one stem in masks/ that are not read (a.jpeg, a.jpg): both named, comma-separated."""
    root = _dataset(tmp_path / "ds", {"a.png": _photo(), "b.png": _photo()}, masks={"b": _labels()})
    for name in ("a.jpg", "a.jpeg"):
        Image.fromarray(_labels()).save(root / "masks" / name)
    found = _problems(FolderDataset(root, "all"))
    masks = root / "masks"
    assert f"({masks / 'a.jpeg'}, {masks / 'a.jpg'} is there, but lossy compression" in found["a.png"]

def test_mask_with_a_suffix_that_is_not_read_is_named_in_missing_mask(tmp_path):
    root = _dataset(tmp_path / "ds", {"a.png": _photo(), "b.png": _photo()}, masks={"b": _labels()})
    Image.fromarray(_labels()).save(root / "masks" / "a.jpg")
    Image.fromarray(_labels()).save(root / "masks" / "b.gif")  # a lossless GIF mask is read ...
    found = _problems(FolderDataset(root, "all"))
    assert list(found) == ["a.png"]
    assert f"missing mask for image {root / 'images' / 'a.png'} ({root / 'masks' / 'a.jpg'} is there" in found["a.png"]
    assert "lossy" in found["a.png"]
    (root / "masks" / "b.png").unlink()  # ... and taken when it is the only one
    ds = FolderDataset(root, "all")
    assert dict(ds.items)[str(root / "images" / "b.png")] == str(root / "masks" / "b.gif")


def test_serve_refuses_a_jpeg_ground_truth_mask():
    jpeg = _encoded(_labels(), "JPEG", quality=75)
    with pytest.raises(UploadError) as e:
        decode_mask(jpeg, 10**6, [(0, 0, 0), (255, 0, 0), (0, 255, 0)], 3, (H, W), "image/png")
    assert e.value.status == 422 and "JPEG-compressed mask" in e.value.detail and "PNG" in e.value.detail
    png = _encoded(_labels(), "PNG")
    np.testing.assert_array_equal(decode_mask(png, 10**6, [(0, 0, 0)] * 3, 3, (H, W)), _labels())


# -- defect 6: 1-pixel images in the random scale of the train preset ---------------------------------
@pytest.mark.parametrize("h, w", [(1, 640), (384, 1), (1, 1), (3, 64)])
def test_one_pixel_high_or_wide_images_survive_random_scale(h, w):
    aug = build_transform({"crop": [32, 32], "scale": [0.5, 2.0]}, train=True)
    sample = Sample(image=_photo(h, w), mask=np.ones((h, w), np.uint8), name="thin")
    np.random.seed(0)
    for _ in range(20):
        out = aug(sample)
        assert out.image.shape == (32, 32, 3) and out.mask.shape == (32, 32)
        assert set(np.unique(out.mask)) <= {1, 255}


# -- section 11: links, unsupported TIFF, EXIF size note ----------------------------------------------
def test_link_and_target_each_predicted_and_broken_link_named(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_photo()).save(folder / "rgb.png")
    os.symlink(folder / "rgb.png", folder / "link.png")
    assert [p.name for p in expand_inputs([str(folder)])] == ["link.png", "rgb.png"]
    assert [p.name for p in expand_inputs([str(folder), str(folder / "rgb.png")])] == ["link.png", "rgb.png"]
    os.symlink(tmp_path / "gone.png", folder / "broken.png")
    assert "broken.png" in [p.name for p in expand_inputs([str(folder)])]
    with pytest.raises(UserError, match=r"broken.png: broken symbolic link \(it points to .*gone.png"):
        read_image(folder / "broken.png")


def test_a_link_to_a_folder_with_an_image_name_is_not_an_input(tmp_path):
    """Only files and broken links are a folder's inputs: a link to a folder is neither, whatever its name."""
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(_photo()).save(folder / "rgb.png")
    os.symlink(tmp_path / "elsewhere", folder / "dir.png")
    assert [p.name for p in expand_inputs([str(folder)])] == ["rgb.png"]


def _float_rgb_tiff(h: int = 4, w: int = 5) -> bytes:
    """A 3-channel 32-bit float TIFF, as tifffile and OpenCV write it (Pillow cannot decode it)."""
    pixels = np.zeros((h, w, 3), "<f4").tobytes()
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, None), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(pixels)), (339, 3, 3, None)]
    ifd_size = 2 + 12 * len(entries) + 4
    extra_at = 8 + ifd_size
    bits_at, format_at, data_at = extra_at, extra_at + 6, extra_at + 12
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bits_at, 273: data_at, 339: format_at}.get(tag, value)
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    out += b"\0\0\0\0" + struct.pack("<3H", 32, 32, 32) + struct.pack("<3H", 3, 3, 3)
    return out + pixels


def test_float_rgb_tiff_is_called_unsupported_not_damaged(tmp_path):
    (tmp_path / "f.tif").write_bytes(_float_rgb_tiff())
    for read in (read_image, probe):
        with pytest.raises(UserError, match=r"f.tif: unsupported TIFF: 3 channel\(s\) of 32-bit float") as e:
            read(tmp_path / "f.tif")
        assert "damaged" not in str(e.value)
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + bytes(4))
    with pytest.raises(UserError, match="junk.tif: starts like a TIFF file but cannot be read"):
        probe(tmp_path / "junk.tif")
    with pytest.raises(UploadError) as e:  # the server says the same: 415, not "damaged"
        decode_image(_float_rgb_tiff(), 10_000, "image/tiff")
    assert e.value.status == 415 and "unsupported TIFF: 3 channel(s) of 32-bit float" in e.value.detail


def _tiff_head(order: str, entries: list[tuple[int, int, int, int]]) -> bytes:
    """A TIFF's first bytes in byte order ``order`` ("<" or ">"): one directory of SHORT/LONG
    ``(tag, type, count, value)`` entries, each value held in the entry itself."""
    out = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    out += struct.pack(order + "H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack(order + "HH", value, 0) if kind == 3 else struct.pack(order + "I", value)
        out += struct.pack(order + "HHI", tag, kind, count) + packed
    return out + bytes(4)


@pytest.mark.parametrize("order", ["<", ">"])
def test_tiff_layout_reads_either_byte_order_and_a_missing_channel_count_as_one(order):
    """The directory's entry count is its first 2 bytes, in the file's byte order; a page without
    SamplesPerPixel (277) has one channel, as TIFF 6.0 says, and one without BitsPerSample one bit."""
    rgb_float = [(256, 3, 1, 5), (258, 3, 1, 32), (277, 3, 1, 3), (339, 3, 1, 3)]
    assert tiff_layout(_tiff_head(order, rgb_float)) == "3 channel(s) of 32-bit float"
    gray_float = [(258, 3, 1, 32), (339, 3, 1, 3)]  # the first tag is not ImageWidth (256)
    assert tiff_layout(_tiff_head(order, gray_float)) == "1 channel(s) of 32-bit float"
    # no SampleFormat (339): unsigned integer; no BitsPerSample (258): 1 bit
    assert tiff_layout(_tiff_head(order, [(277, 4, 1, 2)])) == "2 channel(s) of 1-bit integer"
    assert tiff_layout(_tiff_head(order, [(277, 4, 1, 2), (339, 3, 1, 2)])) == "2 channel(s) of 1-bit signed integer"
    assert tiff_layout(_tiff_head(order, [(256, 3, 1, 5)])) is None


def test_a_gray_tiff_with_premultiplied_alpha_is_read_unpremultiplied_by_read_image_and_the_server(tmp_path):
    """Pillow opens a gray+alpha TIFF whose ExtraSamples says associated alpha as mode "La" (gray
    premultiplied by alpha), which it cannot convert to RGB directly: both readers give the gray
    divided by alpha, as an RGBa image's colours are."""
    buf = io.BytesIO()
    Image.new("LA", (4, 3), (50, 200)).save(buf, format="TIFF")
    unassociated = struct.pack("<HHII", 338, 3, 1, 2)  # ExtraSamples = 2 as Pillow writes LA
    assert buf.getvalue().count(unassociated) == 1
    data = buf.getvalue().replace(unassociated, struct.pack("<HHII", 338, 3, 1, 1))  # 1: associated alpha
    assert Image.open(io.BytesIO(data)).mode == "La"
    (tmp_path / "la.tif").write_bytes(data)
    want = np.full((3, 4, 3), 50 * 255 // 200, np.uint8)  # the gray over alpha 200/255, rounded down as for RGBa
    np.testing.assert_array_equal(read_image(tmp_path / "la.tif"), want)
    np.testing.assert_array_equal(decode_image(data, 10_000, "image/tiff"), want)


def test_an_image_the_server_cannot_convert_is_415_naming_its_mode(monkeypatch):
    import pixelwise.serve.uploads as uploads

    def cannot(img):
        raise ValueError(f"conversion from {img.mode} to RGB not supported")

    monkeypatch.setattr(uploads, "pil_to_rgb", cannot)
    buf = io.BytesIO()
    Image.new("LA", (4, 3)).save(buf, format="PNG")
    with pytest.raises(UploadError) as e:
        decode_image(buf.getvalue(), 10_000, "image/png")
    assert e.value.status == 415 and "cannot convert an image of mode LA to RGB" in e.value.detail


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])  # every EXIF orientation that turns a quarter
def test_size_mismatch_of_an_exif_rotated_image_says_so(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(_photo()).save(buf, "JPEG", exif=exif)  # stored W x H, displayed H x W
    root = _dataset(tmp_path / "ds", {"r.jpg": buf.getvalue(), "s.png": _photo()})
    found = _problems(FolderDataset(root, "all"))
    assert list(found) == ["r.png"]
    assert f"mask is {W}x{H} but image" in found["r.png"]
    assert f"is {H}x{W} after its EXIF orientation {orientation} (a quarter turn)" in found["r.png"]
    assert f"stores {W}x{H} pixels (the mask matches the stored pixels)" in found["r.png"]


# -- a TIFF cut inside a page directory ----------------------------------------------------------------
@pytest.mark.parametrize("big", [False, True])
def test_a_tiff_cut_inside_a_page_directory_is_truncated_not_short(tmp_path, big):
    """PIL reads a directory cut in its entries in part, without an error: the strip byte counts
    after the cut are lost (so the strips could not be checked) and so are the pages after it, and a
    6-page stack cut there opened as a 1-page one."""
    pages = [Image.fromarray(_photo()[:, :, 0]) for _ in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:], **({"big_tiff": True} if big else {}))
    data = buf.getvalue()
    if big and data[2:4] != b"+\x00":
        pytest.skip("this Pillow writes no BigTIFF")
    first = struct.unpack("<Q" if big else "<I", data[8:16] if big else data[4:8])[0]  # page 0's directory
    whole = tmp_path / "whole.tif"
    whole.write_bytes(data)
    assert probe(whole)[0] == (W, H)
    entry, start = (20, first + 8) if big else (12, first + 2)
    tags = [struct.unpack("<H", data[start + i * entry:start + i * entry + 2])[0] for i in range(8)]
    cut = start + tags.index(279) * entry + 6  # in StripByteCounts' entry: the tags PIL needs to open it are read
    path = tmp_path / "cut.tif"
    path.write_bytes(data[:cut])
    with pytest.raises(UserError, match=r"cut\.tif: truncated TIFF \(page 0's directory at byte .* runs past the end"):
        probe(path)


def _gray_tiff(pixels: np.ndarray, extra: list[tuple[int, int, int, int]] = (), link: bool = True) -> bytes:
    """An uncompressed 8-bit gray TIFF written by hand: header, pixels, then its one directory (with
    ``extra`` entries (tag, type, count, value) and, if ``link``, the 0 link that ends the chain)."""
    h, w = pixels.shape
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
               (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, h * w), *extra]
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in sorted(entries))
    return b"II*\0" + struct.pack("<I", 8 + h * w) + pixels.tobytes() + directory + (b"\0" * 4 if link else b"")


def test_a_bad_offset_in_a_tag_that_is_not_about_pixels_or_no_last_link_is_not_truncation(tmp_path):
    """PIL passes over a Software or private tag whose value lies past the end, and readers take a
    missing link after the last directory as the chain's end: both decode in full, and were called
    truncated."""
    pixels = _photo()[:, :, 0]
    cases = {"plain.tif": _gray_tiff(pixels), "no_link.tif": _gray_tiff(pixels, link=False),
             "private.tif": _gray_tiff(pixels, [(65000, 7, 100, 10_000_000)]),
             "software.tif": _gray_tiff(pixels, [(305, 2, 40, 10_000_000)])}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert probe(tmp_path / name)[0] == (W, H), name
        assert (read_image(tmp_path / name)[:, :, 0] == pixels).all(), name
    (tmp_path / "bits.tif").write_bytes(_gray_tiff(pixels)[:-4].replace(  # BitsPerSample stored far out
        struct.pack("<HHII", 258, 3, 1, 8), struct.pack("<HHII", 258, 3, 3, 10_000_000)))
    with pytest.raises(UserError, match="bits.tif: "):  # a tag about the pixels, past the end: never read as 1-bit
        probe(tmp_path / "bits.tif")


# -- 16-bit PNGs Pillow reduces without a word ----------------------------------------------------------
def _png16(samples: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of ``samples`` (uint16[H, W, channels]) written by hand: Pillow writes none of these."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = samples.shape[:2]
    rows = b"".join(b"\0" + samples[i].astype(">u2").tobytes() for i in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_colour_png_mask_is_a_problem_not_all_class_0(tmp_path):
    """A 16-bit RGB mask of class ids (what cv2.imwrite makes of a uint16 three-channel array) was read
    as Pillow's high bytes: every pixel class 0, 'problems: none', and a training on one class."""
    labels = _labels()
    root = _dataset(tmp_path / "ds", {"a.png": _photo(), "b.png": _photo()})
    (root / "masks" / "a.png").write_bytes(_png16(np.repeat(labels[:, :, None], 3, axis=2), 2))
    found = _problems(FolderDataset(root, "all"))
    assert list(found) == ["a.png"] and found["a.png"].startswith("16-bit colour PNG mask"), found
    with pytest.raises(UserError, match="a.png: 16-bit colour PNG mask"):
        read_mask(root / "masks" / "a.png")
    with pytest.raises(UploadError, match="16-bit colour PNG mask"):
        decode_mask((root / "masks" / "a.png").read_bytes(), 10**6, [(0, 0, 0)] * 3, 3, (H, W))
    (root / "masks" / "a.png").write_bytes(_png16(labels[:, :, None], 0))  # 16-bit gray: its values, as read
    np.testing.assert_array_equal(read_mask(root / "masks" / "a.png"), labels)


def test_a_png_refused_at_open_leaves_no_file_open(tmp_path, monkeypatch):
    """A 16-bit gray-and-alpha PNG is refused from its header: the file PIL opened for it is closed
    before the error, as it is for an image above the pixel limit."""
    gray = np.zeros((2, 3), np.uint16)
    path = tmp_path / "la16.png"
    path.write_bytes(_png16(np.stack([gray, gray], axis=2), 4))
    opened = []
    real_open = Image.open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(Image, "open", spy)
    with pytest.raises(UserError, match="la16.png: a 16-bit gray-and-alpha PNG"):
        read_image(path)
    assert opened and all(img.fp is None for img in opened)


def test_a_16_bit_gray_and_alpha_png_is_refused_not_read_as_its_low_bytes(tmp_path):
    """Pillow decodes a 16-bit LA PNG to the low byte of each sample (1000 -> 232, 256 -> 0): an image
    of noise was predicted, trained on and served without a word."""
    gray = np.array([[0, 256, 1000, 30000, 65535, 300]] * 4, np.uint16)
    path = tmp_path / "la16.png"
    path.write_bytes(_png16(np.stack([gray, np.full_like(gray, 65535)], axis=2), 4))
    with pytest.raises(UserError, match="la16.png: a 16-bit gray-and-alpha PNG"):
        probe(path)
    with pytest.raises(UserError, match="la16.png: a 16-bit gray-and-alpha PNG"):
        read_image(path)
    from pixelwise.data.io import damage

    assert "16-bit gray-and-alpha PNG" in (damage(path.read_bytes()) or "")
    (tmp_path / "l16.png").write_bytes(_png16(gray[:, :, None], 0))  # without alpha: round(v / 257)
    np.testing.assert_array_equal(read_image(tmp_path / "l16.png")[0, :, 0], [0, 1, 4, 117, 255, 1])


def test_an_rgb_mask_whose_blue_alone_differs_is_read_as_colours_not_as_gray_values():
    """Only a mask whose three channels are equal is gray: (1, 1, 200) is no palette colour (422),
    not class 1 read from its red channel; a truly gray mask of values not in the palette is read by value."""
    palette = [(0, 0, 0), (128, 0, 0)]
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (1, 1, 200)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    with pytest.raises(UploadError) as e:
        decode_mask(buf.getvalue(), 10**6, palette, 2, (2, 3))
    assert e.value.status == 422 and "1 pixels of 1 colour(s) not in the model's palette" in e.value.detail
    assert "[1, 1, 200]" in e.value.detail
    rgb[0, 0] = (1, 1, 1)  # gray, and (1, 1, 1) is no palette colour: read as its value, class 1
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    expected = np.zeros((2, 3), np.uint8)
    expected[0, 0] = 1
    np.testing.assert_array_equal(decode_mask(buf.getvalue(), 10**6, palette, 2, (2, 3)), expected)


def test_an_upload_with_no_declared_type_names_none_in_its_415():
    """The 415's "(declared image/png: a file of another kind renamed?)" is only for a declared type."""
    with pytest.raises(UploadError) as e:
        decode_image(b"not an image at all", 10_000)
    assert e.value.status == 415 and "declared" not in e.value.detail
    assert e.value.detail.startswith("the image is not an image in a supported format; send one of ")
    with pytest.raises(UploadError) as e:
        decode_image(b"not an image at all", 10_000, "image/png")
    assert e.value.status == 415 and "(declared image/png: a file of another kind renamed?)" in e.value.detail


def _png(arr: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> bytes:
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    if palette is not None:
        img.putpalette(palette + [0] * (768 - len(palette)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_a_palette_mask_whose_index_has_the_ignore_colour_is_422_naming_ignore():
    """Index 0 coloured white (the ignore colour) would read as class 0: refused, naming "ignore (255)"."""
    data = _png(np.array([[0, 1], [1, 0]], np.uint8), "P", [255, 255, 255, 0, 0, 0])
    with pytest.raises(UploadError) as e:
        decode_mask(data, 10**6, [(0, 0, 0), (128, 0, 0)], 2, (2, 2))
    assert e.value.status == 422
    assert "index 0 has the colour [255, 255, 255], the colour of ignore (255) in the model's palette" in e.value.detail


def test_an_rgb_ground_truth_sent_as_a_dataset_label_file_is_422():
    """CamVid's label files are 8-bit index PNGs: an RGB one is no such file (422), not read by colour."""
    data = _png(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(UploadError) as e:
        decode_mask(data, 10**6, [(k, k, k) for k in range(11)], 11, (2, 3), stored=STORED_LABELS["camvid"])
    assert e.value.status == 422
    assert e.value.detail.startswith("a RGB ground truth is not a label file of this kind (CamVid label PNGs")
