"""read_image / read_mask / probe / write_mask on odd modes, EXIF rotation and broken files."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelwise.data.io import (
    damage,
    frame_count,
    palette_conflict,
    palette_known,
    pil_to_rgb,
    probe,
    probe_info,
    read_frames,
    read_image,
    read_mask,
    set_max_image_pixels,
    tiff_directory_cut,
    webp_lossy,
    write_mask,
)
from pixelwise.errors import UserError

RNG = np.random.default_rng(0)


def _rgb(h=5, w=7):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_and_jpeg_roundtrip(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, a)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    assert read_image(tmp_path / "a.jpg").shape == (5, 7, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK"])
def test_modes_become_rgb(tmp_path, mode):
    a = _rgb()
    img = Image.fromarray(a).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = read_image(path)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    if mode in ("L", "LA", "1"):  # gray: the three channels equal the gray values
        gray = np.asarray(img.convert("L"))
        for c in range(3):
            np.testing.assert_array_equal(out[:, :, c], gray)
    if mode == "RGBA":  # alpha dropped, colours kept
        np.testing.assert_array_equal(out, a)
    if mode == "P":  # palette expanded to the palette's colours
        np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_16bit_gray_scales_full_range(tmp_path):
    a = np.array([[0, 257, 65535], [32896, 1000, 128]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")  # saved as I;16
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    expected = np.rint(a.astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    np.testing.assert_array_equal(out[:, :, 2], expected)


def test_exif_orientation_applied_to_image_and_probe(tmp_path):
    a = _rgb(4, 6)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (6, 4, 3)
    ref = np.rot90(np.asarray(Image.open(tmp_path / "r.jpg").convert("RGB")), k=-1)
    np.testing.assert_array_equal(out, ref)
    assert probe(tmp_path / "r.jpg")[0] == (4, 6)  # (width, height) as displayed


def test_palette_mask_read_as_indices(tmp_path):
    m = RNG.integers(0, 21, (9, 11), dtype=np.uint8)
    m[0, 0] = 255
    write_mask(tmp_path / "m.png", m, [(i * 10, 0, 0) for i in range(21)])
    assert Image.open(tmp_path / "m.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), m)


def test_rgb_mask_needs_palette(tmp_path):
    pal = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    idx = RNG.integers(0, 3, (6, 6), dtype=np.uint8)
    rgb = np.array(pal, dtype=np.uint8)[idx]
    rgb[0, 0] = (1, 2, 3)  # unknown colour
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(UserError, match="c.png"):
        read_mask(tmp_path / "c.png")
    out = read_mask(tmp_path / "c.png", palette=pal)
    expected = idx.copy()
    expected[0, 0] = 255
    np.testing.assert_array_equal(out, expected)
    # gray stored as RGB is fine without a palette
    Image.fromarray(np.repeat(idx[:, :, None], 3, 2)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png"), idx)


def test_16bit_mask_values_checked(tmp_path):
    ok = np.array([[0, 3], [255, 7]], dtype=np.uint16)
    Image.fromarray(ok).save(tmp_path / "ok.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "ok.png"), ok.astype(np.uint8))
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(tmp_path / "bad.png")
    with pytest.raises(UserError, match="bad.png"):
        read_mask(tmp_path / "bad.png")


def test_truncated_and_missing_files_named(tmp_path):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    for fn in (read_image, read_mask, probe):
        with pytest.raises(UserError, match="t.png"):
            fn(tmp_path / "t.png")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match="t.jpg"):
        probe(tmp_path / "t.jpg")
    with pytest.raises(UserError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


def _every_frame(path):
    return [read_image(path, k) for k in range(frame_count(path))]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # a file left open
@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "WEBP", "PNG"])
def test_stacks_give_their_frames_and_cut_stacks_raise_user_error_only(tmp_path, fmt):
    """Every frame of a multi-frame file in order; a file cut anywhere gives UserError naming it
    (PIL raises TypeError for a TIFF cut in its page directories and IndexError for a GIF), and
    no file is left open."""
    rng = np.random.default_rng(0)
    pages = [rng.integers(0, 256, (12, 16), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / f"s.{fmt.lower()}"
    images = [Image.fromarray(page) for page in pages]
    images[0].save(path, fmt, save_all=True, append_images=images[1:], **({"lossless": True} if fmt == "WEBP" else {}))
    assert frame_count(path) == 3
    for k, page in enumerate(pages):
        np.testing.assert_array_equal(read_image(path, k)[..., 1], page)
    one_pass = list(read_frames(path))  # the same frames from one open file
    assert len(one_pass) == 3 and all((a[..., 1] == page).all() for a, page in zip(one_pass, pages))
    with pytest.raises(UserError, match="has no frame 3"):
        read_image(path, 3)
    data = path.read_bytes()
    for cut in range(1, len(data), max(1, len(data) // 60)):
        path.write_bytes(data[:cut])
        for fn in (read_image, read_mask, probe, frame_count, _every_frame, lambda p: list(read_frames(p))):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nor does PIL warn ("Corrupt EXIF data") on the way
                try:
                    fn(path)
                except UserError as e:
                    assert path.name in str(e)
        try:  # the frames read in one pass are those read one by one, up to the first damaged one
            every = _every_frame(path)
        except UserError:
            with pytest.raises(UserError):
                list(read_frames(path))
        else:
            assert [a.tobytes() for a in read_frames(path)] == [a.tobytes() for a in every]


def test_read_frames_of_a_still_image_and_of_a_missing_file(tmp_path):
    rgb = _rgb(5, 7)
    Image.fromarray(rgb).save(tmp_path / "still.png")
    (frame,) = read_frames(tmp_path / "still.png")
    np.testing.assert_array_equal(frame, rgb)
    with pytest.raises(UserError, match="missing.png: file not found"):
        next(read_frames(tmp_path / "missing.png"))


def test_probe_reads_size_and_mode(tmp_path):
    Image.fromarray(_rgb(3, 8)).save(tmp_path / "p.png")
    assert probe(tmp_path / "p.png") == ((8, 3), "RGB")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=300),
       prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]))
def test_random_bytes_raise_user_error_only(tmp_path, data, prefix):
    path = tmp_path / "rand.png"
    path.write_bytes(prefix + data)
    for fn in (read_image, read_mask, probe):
        try:
            out = fn(path)
        except UserError as e:
            assert "rand.png" in str(e)
        else:  # astronomically unlikely, but then it must be a valid result
            assert isinstance(out, (np.ndarray, tuple))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 9), w=st.integers(1, 9),
       mode=st.sampled_from(["RGB", "L", "LA", "RGBA", "P", "I;16", "I"]), seed=st.integers(0, 1000))
def test_any_mode_any_size_gives_hw3_uint8(tmp_path, h, w, mode, seed):
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        dtype = np.uint16 if mode == "I;16" else np.int32
        img = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(dtype))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "I" else "TIFF")
    path = tmp_path / ("m.png" if mode != "I" else "m.tif")
    path.write_bytes(buf.getvalue())
    out = read_image(path)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert probe(path)[0] == (w, h)


@pytest.mark.parametrize("fmt", ["tiff", "png", "webp"])
@pytest.mark.parametrize(("orientation", "turn"), [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                                   (8, lambda a: np.rot90(a, 1))])
def test_orientation_tags_turn_once_in_every_lossless_format(tmp_path, fmt, orientation, turn):
    """Pillow 10.0 turned an orientation-tagged TIFF at load() and still reported the tag, so the
    image was turned twice (the floor is now 10.1, which the floors suite runs this at)."""
    from pixelwise.serve.uploads import decode_image

    a = _rgb(5, 8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"r.{fmt}"
    Image.fromarray(a).save(path, exif=exif.tobytes(), **({"lossless": True} if fmt == "webp" else {}))
    expected = turn(a)
    np.testing.assert_array_equal(read_image(path), expected)
    assert probe(path)[0] == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(decode_image(path.read_bytes(), 10**6), expected)


def test_a_tiff_stack_upload_is_its_first_page(tmp_path):
    """At Pillow 10.0 serve answered a multi-page TIFF with a 500 (EXIF read after load())."""
    from pixelwise.serve.uploads import decode_image

    pages = [_rgb(6, 7) for _ in range(3)]
    rest = [Image.fromarray(p) for p in pages[1:]]
    Image.fromarray(pages[0]).save(tmp_path / "s.tif", save_all=True, append_images=rest)
    np.testing.assert_array_equal(decode_image((tmp_path / "s.tif").read_bytes(), 10**6), pages[0])


def _gray_tiff_pages(pages: list[tuple[np.ndarray, int]]) -> bytes:
    """An uncompressed gray TIFF of several pages, each ``(uint8[H, W], NewSubfileType)``, written
    by hand: Pillow before 11 writes no per-page tags."""
    import struct

    out = bytearray(b"II*\x00" + struct.pack("<I", 0))
    prev_next = 4  # where the offset of the next page directory goes
    for pixels, kind in pages:
        h, w = pixels.shape
        data_at = len(out)
        out += pixels.tobytes()
        if len(out) % 2:
            out += b"\x00"
        entries = [(254, kind), (256, w), (257, h), (258, 8), (259, 1), (262, 1), (273, data_at), (277, 1),
                   (278, h), (279, h * w)]
        ifd_at = len(out)
        out[prev_next:prev_next + 4] = struct.pack("<I", ifd_at)
        out += struct.pack("<H", len(entries))
        out += b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in entries)
        prev_next = len(out)
        out += struct.pack("<I", 0)
    return bytes(out)


def test_tiff_overview_and_mask_pages_are_not_frames(tmp_path):
    """A Cloud-Optimised GeoTIFF's overviews (NewSubfileType bit 0) and transparency-mask pages
    (bit 2) were predicted as frames of a stack, the full image renamed <stem>_00."""
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 255, (64, 96), dtype=np.uint8) for _ in range(2))
    overview, mask = first[::2, ::2].copy(), np.zeros((64, 96), np.uint8)
    (tmp_path / "cog.tif").write_bytes(_gray_tiff_pages([(first, 0), (overview, 1), (second, 0), (mask, 4)]))
    assert Image.open(tmp_path / "cog.tif").n_frames == 4
    assert frame_count(tmp_path / "cog.tif") == 2
    frames = list(read_frames(tmp_path / "cog.tif"))
    assert len(frames) == 2
    np.testing.assert_array_equal(frames[0][..., 0], first)
    np.testing.assert_array_equal(frames[1][..., 0], second)
    np.testing.assert_array_equal(read_image(tmp_path / "cog.tif", 1)[..., 0], second)


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "RGBA"])
@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_an_uncompressed_tiff_turned_by_exif_reads_as_displayed(tmp_path, mode, orientation):
    """Pillow memory-mapped such a page with the turned size and turned the scrambled rows:
    predict wrote a 64x40 mask for a 40x64 picture, a P/L mask came back scrambled."""
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 200, (3, 4) + ((4,) if mode == "RGBA" else ()), dtype=np.uint8)
    img = Image.fromarray(stored).convert(mode) if mode != "I;16" else Image.fromarray(stored.astype(np.uint16))
    exif = Image.Exif()
    exif[274] = orientation
    img.save(tmp_path / "t.tif", exif=exif.tobytes())
    img.save(tmp_path / "t_lzw.tif", exif=exif.tobytes(), compression="tiff_lzw")  # Pillow reads this one right
    img.save(tmp_path / "t.png", exif=exif.tobytes())
    assert read_image(tmp_path / "t.tif").shape[:2] == (4, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "t.tif"), read_image(tmp_path / "t_lzw.tif"))
    np.testing.assert_array_equal(read_image(tmp_path / "t.tif"), read_image(tmp_path / "t.png"))
    if mode in ("L", "P"):
        np.testing.assert_array_equal(read_mask(tmp_path / "t.tif"), read_mask(tmp_path / "t.png"))


def test_probe_reads_a_png_header_without_decoding_its_pixels(tmp_path, monkeypatch):
    """getexif() decoded every PNG without an early eXIf chunk (0.33 s for 12 MP) in the check that
    promises no decode; an eXIf after the pixels (valid PNG) must still turn the size."""
    import struct
    import zlib

    from PIL import ImageFile

    from pixelwise.data.io import probe_info

    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "plain.png")
    exif = Image.Exif()
    exif[274] = 6
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")  # a PNG eXIf chunk holds the TIFF data alone
    data = (tmp_path / "plain.png").read_bytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    end = data.rindex(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(data[:end] + chunk + data[end:])
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    assert probe_info(tmp_path / "plain.png").size == (40, 30)
    late = probe_info(tmp_path / "late.png")
    assert (late.size, late.orientation) == ((30, 40), 6)
    assert decoded == []
    assert read_image(tmp_path / "late.png").shape == (40, 30, 3)  # as the header said


def _gray_png(values: np.ndarray, depth: int) -> bytes:
    """A gray PNG of ``depth`` bits per sample holding ``values`` as stored (written by hand: PIL
    writes gray at 1 or 8 bits only)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = values.shape
    per_byte = 8 // depth
    rows = b""
    for row in values:
        padded = list(row) + [0] * (-w % per_byte)
        packed = bytes(sum(int(v) << (8 - depth * (k + 1)) for k, v in enumerate(padded[i:i + per_byte]))
                       for i in range(0, len(padded), per_byte))
        rows += b"\x00" + packed
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_a_low_bit_gray_png_mask_reads_as_stored(tmp_path, depth):
    """PIL scales 2- and 4-bit gray samples to 0..255: class 3 of a 2-bit mask became 255, ignore."""
    from pixelwise.serve.uploads import decode_mask

    stored = (np.arange(35).reshape(5, 7) % min(2 ** depth, 6)).astype(np.uint8)
    (tmp_path / "m.png").write_bytes(_gray_png(stored, depth))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), stored)
    np.testing.assert_array_equal(
        decode_mask((tmp_path / "m.png").read_bytes(), 10**6, [(k, k, k) for k in range(6)], 6, (5, 7)), stored)


def _gray_tiff(values: np.ndarray, bits: int, photometric: int) -> bytes:
    """An uncompressed one-strip gray TIFF storing ``values`` (a row each) at ``bits`` per sample,
    written by hand: PIL writes neither 4-bit gray nor MinIsWhite."""
    import struct

    h, w = values.shape
    rows = b""
    for row in values:
        padded = list(row) + [0] * (-w % (8 // bits))
        rows += bytes(sum(int(v) << (8 - bits * (k + 1)) for k, v in enumerate(padded[i:i + 8 // bits]))
                      for i in range(0, len(padded), 8 // bits))
    entries = [(256, w), (257, h), (258, bits), (259, 1), (262, photometric), (273, 0), (277, 1), (278, h),
               (279, len(rows))]
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, 4, 1, offset if tag == 273 else value) for tag, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + rows


@pytest.mark.parametrize("name, data, stored", [
    ("bin.pgm", b"P5\n4 1\n1\n" + bytes([0, 1, 1, 0]), [0, 1, 1, 0]),
    ("c21.pgm", b"P5\n# a comment\n4 1\n20\n" + bytes([0, 1, 20, 7]), [0, 1, 20, 7]),
    ("plain.pgm", b"P2\n4 1\n3\n0 1 2 3\n", [0, 1, 2, 3]),
    ("g4.tif", _gray_tiff(np.array([[0, 1, 2, 11]]), 4, 1), [0, 1, 2, 11]),
    ("white8.tif", _gray_tiff(np.array([[0, 1, 2, 3]]), 8, 0), [0, 1, 2, 3]),
])
def test_gray_masks_read_as_the_values_they_store(tmp_path, name, data, stored):
    """PIL scales a PGM's 0..maxval and a TIFF's 4-bit samples to 0..255 and turns a MinIsWhite
    TIFF over: a 0/1 PGM's class 1 became 255 (ignore), a 21-class PGM's class 1 became 13."""
    from pixelwise.data import STORED_LABELS
    from pixelwise.serve.uploads import decode_mask

    (tmp_path / name).write_bytes(data)
    assert read_mask(tmp_path / name).ravel().tolist() == stored
    got = decode_mask(data, 10**6, [(k, k, k) for k in range(21)], 21, (1, 4))
    assert got.ravel().tolist() == stored
    if max(stored) <= 11:  # CamVid's own label file, as serve reads it with truth_format=dataset
        camvid = decode_mask(data, 10**6, [(k, k, k) for k in range(11)], 11, (1, 4), stored=STORED_LABELS["camvid"])
        assert camvid.ravel().tolist() == [v if v < 11 else 255 for v in stored]


def test_a_png_turned_only_by_its_xmp_has_the_turned_size_in_the_header_check(tmp_path):
    """The chunk walk that spares the decode saw only an eXIf chunk: an orientation in XMP (or
    ImageMagick's raw profile) gave the unturned size, while loading turned the image."""
    from pixelwise.data.io import probe_info

    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(tmp_path / "x.png", pnginfo=info)
    assert probe_info(tmp_path / "x.png").size == (40, 64)
    assert read_image(tmp_path / "x.png").shape == (64, 40, 3)


@pytest.mark.parametrize("bits", [1, 16])
def test_min_is_white_tiffs_of_other_depths_read_as_stored(tmp_path, bits):
    """PIL turns over 1-bit MinIsWhite samples (read inverted) and leaves 16-bit ones as stored
    (pixelwise turned those over: 0..3 became 65532..65535, refused)."""
    import struct

    from pixelwise.serve.uploads import decode_mask

    stored = [0, 1, 1, 0, 1, 0, 0, 1] if bits == 1 else [0, 1, 2, 3]
    if bits == 1:
        pixels = bytes([int("".join(map(str, stored)), 2)])
    else:
        pixels = b"".join(struct.pack("<H", v) for v in stored)
    w = len(stored)
    entries = [(256, w), (257, 1), (258, bits), (259, 1), (262, 0), (273, 0), (277, 1), (278, 1), (279, len(pixels))]
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, 4, 1, offset if tag == 273 else value) for tag, value in entries)
    data = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels
    (tmp_path / "m.tif").write_bytes(data)
    assert read_mask(tmp_path / "m.tif").ravel().tolist() == stored
    assert decode_mask(data, 10**6, [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)], 4, (1, w)).ravel().tolist() == stored


def test_serve_reads_a_pgm_of_maxval_above_255_as_the_readers_do():
    """read_mask read a maxval-1000 PGM as stored; serve refused it (PIL scales it to 0..65535)."""
    from pixelwise.serve.uploads import decode_mask

    data = b"P5\n4 1\n1000\n" + np.array([0, 1, 3, 2], ">u2").tobytes()
    assert decode_mask(data, 10**6, [(k, k, k) for k in range(4)], 4, (1, 4)).ravel().tolist() == [0, 1, 3, 2]


def test_a_lossy_webp_after_a_large_icc_profile_is_still_refused(tmp_path):
    """The chunk walk read only 64 KiB: an ICC profile larger than that hid the VP8 chunk."""
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "m.webp", lossless=False, icc_profile=bytes(70_000))
    with pytest.raises(UserError, match="lossy WebP mask"):
        read_mask(tmp_path / "m.webp", palette=[(0, 0, 0), (255, 255, 255)])


def test_a_later_frame_above_the_pixel_limit_is_refused(tmp_path):
    """The limit is checked at open on frame 0 only: a stack's larger page is checked when it is reached."""
    path = tmp_path / "s.tif"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(
        path, save_all=True, append_images=[Image.fromarray(np.full((10, 12), 7, np.uint8))])
    try:
        set_max_image_pixels(50)  # frame 0 (16 pixels) is within it, frame 1 (120) is not
        assert read_image(path).shape == (4, 4, 3)
        # counting and probing the pages do not trip on it (Pillow 10.1 refused the page as it sought it)
        assert frame_count(path) == 2 and probe_info(path).size == (4, 4)
        with pytest.raises(UserError, match=r"12x10 = 120 pixels is above the limit of 50"):
            read_image(path, 1)
        with pytest.raises(UserError, match=r"12x10 = 120 pixels is above the limit of 50"):
            list(read_frames(path))
    finally:
        set_max_image_pixels(None)
    assert read_image(path, 1).shape == (10, 12, 3)


def test_tiff_directory_cut_sizes_an_undefined_typed_pixel_tag():
    """JPEGTables (347) is of type UNDEFINED (7), one byte a value: 100 of them from byte 1000 of a
    26-byte file are past its end; 6 of them right after the directory are inside."""
    def one_entry_tiff(count: int, offset: int, tail: bytes = b"") -> bytes:
        return (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 347, 7, count, offset)
                + struct.pack("<I", 0) + tail)

    cut = one_entry_tiff(100, 1000)
    assert tiff_directory_cut(cut, len(cut)) == (
        "page 0's tag 347 holds 100 bytes from byte 1,000, past the end of the file (26 bytes)")
    whole = one_entry_tiff(6, 26, bytes(6))
    assert tiff_directory_cut(whole, len(whole)) is None


# TIFF 6.0 field types and their bytes per value (BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED,
# SSHORT, SLONG, SRATIONAL, FLOAT, DOUBLE, IFD), and BigTIFF's LONG8, SLONG8, IFD8
_TIFF_SPEC_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
                         16: 8, 17: 8, 18: 8}


def _one_entry_tiff(tag: int, kind: int, count: int, offset: int) -> bytes:
    return (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", tag, kind, count, offset)
            + struct.pack("<I", 0))


@pytest.mark.parametrize("kind", sorted(_TIFF_SPEC_TYPE_BYTES))
def test_tiff_directory_cut_sizes_a_pixel_tag_of_every_field_type(kind):
    """5 values of any type are more than the 4 bytes a directory entry holds: stored from byte
    1000 of a 26-byte file, they are past its end, and their size is 5 x the type's size."""
    cut = _one_entry_tiff(273, kind, 5, 1000)
    assert tiff_directory_cut(cut, len(cut)) == (
        f"page 0's tag 273 holds {5 * _TIFF_SPEC_TYPE_BYTES[kind]} bytes from byte 1,000, "
        "past the end of the file (26 bytes)")


@pytest.mark.parametrize("tag", [256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 317, 320, 322, 323,
                                 324, 325, 338, 339, 347, 530, 531, 532])
def test_tiff_directory_cut_checks_each_tag_that_describes_the_pixels(tag):
    """Size, samples, compression, colour, strips and tiles (TileWidth 322, TileLength 323, ...),
    colour map, sample format, predictor, JPEG tables, YCbCr layout: two LONGs past the end of the
    file are a cut; the same of a tag about something else (Software, 305) are not looked at."""
    cut = _one_entry_tiff(tag, 4, 2, 1000)
    assert tiff_directory_cut(cut, len(cut)) == (
        f"page 0's tag {tag} holds 8 bytes from byte 1,000, past the end of the file (26 bytes)")
    other = _one_entry_tiff(305, 4, 2, 1000)
    assert tiff_directory_cut(other, len(other)) is None


def test_a_mask_in_a_mode_that_holds_no_class_ids_is_refused(tmp_path):
    """A float ("F") or CMYK mask is not read as labels: read_mask names the file and the mode
    rather than returning nothing."""
    for mode in ("F", "CMYK"):
        path = tmp_path / f"{mode}.tif"
        Image.new(mode, (3, 2)).save(path)
        with pytest.raises(UserError, match=rf"{mode}.tif: unsupported mask mode {mode}; save masks as 8-bit"):
            read_mask(path)


def test_a_later_tall_narrow_frame_above_the_pixel_limit_is_refused(tmp_path):
    """The limit is on width x height: a page 2 pixels wide and 30 high (60 pixels) is above a limit
    of 50 though its width squared (4) is not."""
    path = tmp_path / "s.tif"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(
        path, save_all=True, append_images=[Image.fromarray(np.full((30, 2), 7, np.uint8))])
    try:
        set_max_image_pixels(50)
        assert read_image(path).shape == (4, 4, 3)
        with pytest.raises(UserError, match=r"2x30 = 60 pixels is above the limit of 50"):
            read_image(path, 1)
    finally:
        set_max_image_pixels(None)
    assert read_image(path, 1).shape == (30, 2, 3)


def test_pil_to_rgb_turns_a_callers_image_by_its_exif_orientation(tmp_path):
    """An image opened by the caller (not through read_image) is turned as read_image turns its file:
    orientation 6 is a quarter turn clockwise for display."""
    a = (np.arange(2 * 3 * 3, dtype=np.uint8) * 10).reshape(2, 3, 3)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    with Image.open(tmp_path / "r.png") as img:
        out = pil_to_rgb(img)
    np.testing.assert_array_equal(out, np.rot90(a, k=-1))
    np.testing.assert_array_equal(pil_to_rgb(Image.fromarray(a)), a)  # no orientation: as stored


def test_palette_known_maps_each_colour_and_the_ignore_colour():
    assert palette_known([(10, 20, 30), (1, 2, 3)], (255, 255, 255)) == {
        (10, 20, 30): 0, (1, 2, 3): 1, (255, 255, 255): 255}
    # a class of the ignore colour stays that class
    assert palette_known([(10, 20, 30), (255, 255, 255)], (255, 255, 255)) == {(10, 20, 30): 0, (255, 255, 255): 1}


def test_a_float_image_in_0_1_is_scaled_to_0_255_including_1():
    """Float pixels in [0, 1] (max exactly 1.0 included) are scaled by 255, others clipped."""
    in_unit = Image.fromarray(np.array([[0.0, 0.2, 1.0]], np.float32))
    assert pil_to_rgb(in_unit)[0, :, 0].tolist() == [0, 51, 255]
    beyond = Image.fromarray(np.array([[0.0, 1.5, 300.0]], np.float32))
    assert pil_to_rgb(beyond)[0, :, 0].tolist() == [0, 2, 255]
    # the range is judged by the finite pixels: one infinite pixel turned a [0, 1] image black
    odd = Image.fromarray(np.array([[0.2, np.inf, -np.inf, np.nan, 1.0]], np.float32))
    assert pil_to_rgb(odd)[0, :, 0].tolist() == [51, 255, 0, 0, 255]
    assert pil_to_rgb(Image.fromarray(np.array([[1.5, np.inf, np.nan]], np.float32)))[0, :, 0].tolist() == [2, 255, 0]


def test_a_32_bit_image_beyond_16_bits_is_min_max_scaled():
    """Integer pixels outside 0..65535 are scaled from their own min..max: (v - min) * 255 // (max - min)."""
    wide = Image.fromarray(np.array([[-1000, 0, 99_000, 49_000]], np.int32))
    assert pil_to_rgb(wide)[0, :, 0].tolist() == [0, 2, 255, 127]


def test_palette_conflict_names_the_first_used_index_whose_colour_is_another_class(tmp_path):
    known = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2}  # the dataset's colours
    for name, pixels, expected in [("uses.png", [[0, 1], [1, 0]], (1, (0, 255, 0), 2)), ("unused.png", [[0, 0]], None)]:
        img = Image.fromarray(np.array(pixels, np.uint8), "P")
        img.putpalette([0, 0, 0, 0, 255, 0])  # index 1 is drawn in class 2's colour
        img.save(tmp_path / name)
        assert palette_conflict(tmp_path / name, known) == expected


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_lossy_looks_inside_an_animations_first_frame(lossless):
    """An animated WebP's image chunk follows its ANMF frame header (16 bytes of frame fields)."""
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=lossless, duration=100)
    data = buf.getvalue()
    assert data[12:16] == b"VP8X" and b"ANMF" in data
    assert webp_lossy(data) is (not lossless)


@pytest.mark.parametrize("chunk, lossy", [(b"VP8 ", True), (b"VP8L", False)])
def test_webp_lossy_reads_only_the_image_chunks_header(chunk, lossy):
    """The first image chunk's 8-byte header (its kind and size) decides, even where the file ends
    right after it."""
    data = b"RIFF" + struct.pack("<I", 1000) + b"WEBP" + chunk + struct.pack("<I", 980)
    assert webp_lossy(data) is lossy


def _tga(image_type, depth, width, height, pixels, descriptor=0):
    """An uncompressed TGA: 18-byte header (no id, no colour map), then ``pixels``, no footer."""
    return struct.pack("<BBBHHBHHHHBB", 0, 0, image_type, 0, 0, 0, 0, 0, width, height, depth, descriptor) + pixels


@pytest.mark.parametrize("descriptor", [0x00, 0x20])  # rows bottom-up (TGA's default) and top-down
def test_a_gray_and_alpha_tga_reads_its_gray_and_is_checked_for_its_16_bits_a_pixel(tmp_path, descriptor):
    """PIL's raw LA decoder (a 16-bit gray TGA: gray, then alpha, for each pixel) reads the gray values
    written, the alpha dropped; the header check sizes its pixel data at 2 bytes a pixel, so a file one
    byte short of that is truncated and one of exactly that size is not."""
    h, w = 5, 9  # 9 wide: 15 or 17 bits a pixel would give another row size than 16
    gray = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    alpha = 255 - gray  # never equal to the gray: a channel mix-up shows
    rows = gray if descriptor & 0x20 else gray[::-1]
    pixels = np.dstack([rows, alpha if descriptor & 0x20 else alpha[::-1]]).tobytes()
    path = tmp_path / "la.tga"
    path.write_bytes(_tga(3, 16, w, h, pixels, descriptor))
    with Image.open(path) as img:
        assert img.mode == "LA" and img.tile[0][0] == "raw"
    assert probe_info(path)[:3] == ((w, h), "LA", "TGA")
    assert np.array_equal(read_image(path), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(read_mask(path), gray)
    assert damage(path.read_bytes()) is None
    path.write_bytes(_tga(3, 16, w, h, pixels[:-1], descriptor))
    with pytest.raises(UserError, match=f"la.tga: truncated TGA .*declares {18 + 2 * w * h:,} bytes"):
        probe_info(path)
    assert "truncated TGA" in damage(path.read_bytes())


def test_a_cut_16_bit_colour_tga_is_found_from_its_header(tmp_path):
    """A 16-bit (5 bits a channel) colour TGA, which PIL decodes with its BGR;5 / BGRA;15(Z) raw
    modes: the header check sizes its pixel data too, as for the other raw formats."""
    h, w = 4, 9
    pixels = RNG.integers(0, 256, 2 * w * h, dtype=np.uint8).tobytes()
    path = tmp_path / "c16.tga"
    path.write_bytes(_tga(2, 16, w, h, pixels))
    assert probe_info(path)[0] == (w, h) and damage(path.read_bytes()) is None
    path.write_bytes(_tga(2, 16, w, h, pixels[:-1]))
    with pytest.raises(UserError, match=f"c16.tga: truncated TGA .*declares {18 + 2 * w * h:,} bytes"):
        probe_info(path)
    assert "truncated TGA" in damage(path.read_bytes())
