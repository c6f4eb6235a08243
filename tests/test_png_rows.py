"""PngRowWriter: a PNG written a band of rows at a time reads back as the array it was given;
encode_png is the same encoder in one shot."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pixelwise.data.io import PngRowWriter, encode_png, png_text, read_mask, write_mask
from pixelwise.data.shapes import PALETTE


@pytest.mark.parametrize("mode, shape", [("P", (67, 45)), ("L", (67, 45)), ("RGB", (67, 45, 3))])
def test_bands_read_back_exactly(tmp_path, mode, shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4 if mode == "P" else 256, shape, dtype=np.uint8)
    pixels[:, :20] = pixels[:, :1]  # runs of equal bytes, where the Sub filter gives zeros
    with open(tmp_path / "a.png", "wb") as f, PngRowWriter(f, shape[1], shape[0], mode, PALETTE) as png:
        for y, n in [(0, 1), (1, 30), (31, 0), (31, 36)]:  # uneven bands, one of them empty
            png.write(pixels[y : y + n])
    img = Image.open(tmp_path / "a.png")
    assert img.mode == mode and img.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.array(img), pixels)
    assert encode_png(pixels, mode, PALETTE) == (tmp_path / "a.png").read_bytes()


def test_mask_matches_write_mask(tmp_path):
    """write_mask writes the same PNG (indices, palette with 255 white): one encoder for every mask."""
    mask = np.random.default_rng(1).integers(0, 4, (20, 33), dtype=np.uint8)
    mask[0, :5] = 255
    write_mask(tmp_path / "whole.png", mask, PALETTE)
    with open(tmp_path / "rows.png", "wb") as f, PngRowWriter(f, 33, 20, "P", PALETTE) as png:
        png.write(mask[:7])
        png.write(mask[7:])
    whole, rows = Image.open(tmp_path / "whole.png"), Image.open(tmp_path / "rows.png")
    assert rows.getpalette()[: 3 * 4] == whole.getpalette()[: 3 * 4]
    assert rows.getpalette()[765:768] == [255, 255, 255]
    np.testing.assert_array_equal(read_mask(tmp_path / "rows.png"), mask)
    assert (tmp_path / "rows.png").read_bytes() == (tmp_path / "whole.png").read_bytes()


def test_wrong_rows_are_refused():
    png = PngRowWriter(io.BytesIO(), 10, 4, "L")
    with pytest.raises(ValueError, match="uint8"):
        png.write(np.zeros((2, 11), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        png.write(np.zeros((2, 10), np.float32))
    png.write(np.zeros((3, 10), np.uint8))
    with pytest.raises(ValueError, match="5 rows written to a PNG of height 4"):
        png.write(np.zeros((2, 10), np.uint8))
    with pytest.raises(ValueError, match="after 3 of its 4 rows"):
        png.finish()
    with pytest.raises(ValueError, match="after 3 of its 4 rows"), PngRowWriter(io.BytesIO(), 10, 4, "L") as short:
        short.write(np.zeros((3, 10), np.uint8))


def test_a_png_ends_in_one_iend_chunk_and_a_second_finish_adds_nothing():
    """The PNG spec's end chunk (length 0, "IEND", its CRC AE 42 60 82) closes the file, once: an
    explicit finish() inside the block and the one on leaving it write the same bytes as one."""
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    buf = io.BytesIO()
    with PngRowWriter(buf, 4, 3, "L") as png:
        png.write(pixels)
        png.finish()
        png.finish()
    data = buf.getvalue()
    assert data.endswith(b"\x00\x00\x00\x00IEND\xaeB`\x82") and data.count(b"IEND") == 1
    assert data == encode_png(pixels, "L")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)


def test_png_text_reads_a_text_chunk_of_up_to_one_mib_and_steps_over_a_longer_one(tmp_path):
    pixels = np.zeros((2, 3), np.uint8)
    fits = "x" * ((1 << 20) - len("pixelwise\0"))  # keyword, NUL and text: 1 MiB exactly
    path = tmp_path / "fits.png"
    path.write_bytes(encode_png(pixels, "P", PALETTE, {"pixelwise": fits}))
    assert png_text(path, "pixelwise") == fits
    path = tmp_path / "long.png"
    path.write_bytes(encode_png(pixels, "P", PALETTE, {"pixelwise": fits + "x", "after": "y"}))
    assert png_text(path, "pixelwise") is None and png_text(path, "after") == "y"  # not read, stepped over
