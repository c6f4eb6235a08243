"""Robust image and mask file I/O shared by every reader, ``predict`` and the web demo.

- :func:`read_image` -> ``uint8[H, W, 3]`` RGB for any common PIL mode (RGB, L, LA, RGBA, P,
  1, CMYK, I;16, I, F), EXIF orientation applied.
- :func:`read_mask` -> ``uint8[H, W]`` class indices. Palette ("P") PNGs are read as their
  indices and never converted to RGB; RGB colour masks need a palette to map colours to indices.
- :func:`probe` reads only the header (size, mode) and checks cheaply for truncation, for
  ``check()``.
- :func:`write_mask` writes a palette-indexed PNG.

Every unreadable, truncated or unsupported file raises :class:`~pixelwise.errors.UserError`
naming the file. So does an image of more than :func:`max_image_pixels` pixels (PIL's
decompression-bomb limit, 89,478,485 by default): a small file can declare a huge size and
exhaust memory when decoded. :func:`set_max_image_pixels` (``--max-pixels``) raises the limit
deliberately for large aerial or slide images.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixelwise.data.palette import palette_bytes
from pixelwise.errors import UserError

PathLike = str | os.PathLike

# What PIL raises for broken files: truncated data (OSError), bad headers (SyntaxError,
# UnidentifiedImageError), bad chunks (ValueError), absurd sizes (DecompressionBombError).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_ORIENTATION_TAG = 0x0112
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)  # PIL's own default
_max_pixels = DEFAULT_MAX_PIXELS


def max_image_pixels() -> int:
    """The largest width x height the readers accept."""
    return _max_pixels


def set_max_image_pixels(limit: int | None) -> None:
    """Accept images of up to ``limit`` pixels (``None``: back to the default). PIL's own limit is
    set to the same value, so that PIL neither warns nor refuses below it."""
    global _max_pixels
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"--max-pixels must be a positive number of pixels, got {limit!r}")
    _max_pixels = DEFAULT_MAX_PIXELS if limit is None else limit
    Image.MAX_IMAGE_PIXELS = _max_pixels


def _too_large(path: Path, pixels: int | None, size: tuple[int, int] | None = None) -> UserError:
    shape = f"{size[0]}x{size[1]} = " if size else ""
    count = f"{shape}{pixels:,} pixels" if pixels else "more pixels than allowed"
    fix = f"--max-pixels {pixels}" if pixels else "--max-pixels N"
    return UserError(f"{path}: {count} is above the limit of {_max_pixels:,} (a guard against decompression "
                     f"bombs); if you trust this file, pass {fix}")


def _open(path: Path) -> Image.Image:
    """``Image.open`` (header only) within the pixel limit; PIL's warning between its limit and
    twice that is not shown: the limit is this module's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(path, int(found.group(1)) if found else None) from None
    if img.size[0] * img.size[1] > _max_pixels:
        img.close()
        raise _too_large(path, img.size[0] * img.size[1], img.size)
    return img


def _open_loaded(path: PathLike) -> Image.Image:
    """Open and fully decode the first frame, with EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        img: Image.Image = _open(path)
        img.load()
        if img.getexif().get(_ORIENTATION_TAG, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image file; re-export it or remove it") from None
    except _PIL_ERRORS as e:
        raise UserError(f"{path}: unreadable or truncated image ({e}); re-export it or remove it") from None
    return img


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale a single-channel integer/float array to uint8.

    16-bit data maps its full range 0..65535 onto 0..255 (``round(v / 257)``); float data in
    [0, 1] is scaled by 255, other floats are clipped to 0..255; wider integers whose values
    fit in 16 bits are treated as 16-bit, larger ones are min-max scaled.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64))
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo >= 0 and hi <= 65535:
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    span = max(hi - lo, 1)
    return ((a - lo) * 255 // span).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image of any mode -> uint8[H, W, 3] RGB (alpha dropped)."""
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("L", "P", "RGBA", "LA", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La", "RGBa"):
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        arr = np.asarray(img.convert("RGB"))
    else:  # I;16, I;16B, I;16L, I, F and friends: single channel, wider than 8 bits
        arr = _to_uint8(np.asarray(img))
        if arr.ndim != 2:
            raise ValueError(f"unsupported image mode {mode}")
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as RGB. -> uint8[H, W, 3].

    Handles RGB, L, LA, RGBA, P (palette expanded to colours), 1, CMYK and 16/32-bit
    grayscale (see :func:`_to_uint8`); multi-frame files give their first frame; the EXIF
    orientation tag is applied. Raises UserError naming the file if it cannot be decoded.
    """
    img = _open_loaded(path)
    try:
        return pil_to_rgb(img)
    except _PIL_ERRORS as e:
        raise UserError(f"{path}: cannot convert image mode {img.mode} to RGB ({e})") from None


def read_mask(path: PathLike, palette: Sequence[Sequence[int] | None] | None = None,
              unknown: int = 255) -> np.ndarray:
    """Read a label mask file as class indices. -> uint8[H, W].

    - "P" (palette) and "L" masks: the stored indices, as they are (never converted to RGB).
    - "1": 0/1. "LA"/"PA": the first channel. 16/32-bit integer masks: the values, which must
      fit in 0..255.
    - RGB/RGBA colour masks: with ``palette`` (list of (r, g, b), index = class id) each colour
      becomes its index and colours not in the palette become ``unknown``; without a palette
      a gray mask stored as RGB (R == G == B) gives its gray values, anything else is an error.
    """
    img = _open_loaded(path)
    mode = img.mode
    if mode in ("P", "L"):
        return np.ascontiguousarray(np.asarray(img), dtype=np.uint8)
    if mode == "1":
        return np.asarray(img).astype(np.uint8)
    if mode in ("LA", "PA"):
        return np.ascontiguousarray(np.asarray(img)[:, :, 0], dtype=np.uint8)
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(img)[:, :, :3]
        if palette is not None:
            return colors_to_index(rgb, palette, unknown)
        if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
            return np.ascontiguousarray(rgb[:, :, 0])
        raise UserError(f"{path}: RGB colour mask but no palette is known; save it as a palette/index PNG "
                        "or describe the colours in classes.json")
    arr = np.asarray(img)
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(f"{path}: {mode} mask has values {int(arr.min())}..{int(arr.max())}, "
                            "which do not fit 0..255; store class ids as 8-bit")
        return arr.astype(np.uint8)
    raise UserError(f"{path}: unsupported mask mode {mode}; save masks as 8-bit index PNGs")


def colors_to_index(rgb: np.ndarray, palette: Sequence[Sequence[int] | None],
                    unknown: int = 255) -> np.ndarray:
    """uint8[H, W, 3] colours -> uint8[H, W] palette indices; colours not in ``palette`` -> ``unknown``.
    ``None`` entries in ``palette`` match nothing (to reserve an index)."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    out = np.full(code.shape, unknown, dtype=np.uint8)
    for i, colour in enumerate(palette):
        if colour is not None:  # None entries keep an index free
            r, g, b = colour
            out[code == ((int(r) << 16) | (int(g) << 8) | int(b))] = i
    return out


def probe(path: PathLike) -> tuple[tuple[int, int], str]:
    """Header-only check of an image file. -> ((width, height) as displayed, PIL mode).

    Does not decode pixels. Size accounts for EXIF rotation (90/270 degrees swap W and H).
    Truncation is detected cheaply: PNG chunk CRCs are verified (no decompression) and JPEG
    files must end with the EOI marker. Raises UserError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with _open(path) as img:
            size, mode, fmt = img.size, img.mode, img.format
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        if fmt == "PNG":  # verify() checks every chunk's CRC and the end marker without inflating
            with Image.open(path) as img:
                img.verify()
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image file; re-export it or remove it") from None
    except _PIL_ERRORS as e:
        raise UserError(f"{path}: unreadable or truncated image ({e}); re-export it or remove it") from None
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            if b"\xff\xd9" not in f.read():
                raise UserError(f"{path}: truncated JPEG (no end-of-image marker); re-export it or remove it")
    if orientation in (5, 6, 7, 8):
        size = (size[1], size[0])
    return size, mode


def write_mask(path: PathLike, mask: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> None:
    """Write uint8[H, W] class ids as a palette-indexed PNG (indices stay the pixel values)."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"write_mask expects uint8[H, W], got shape {list(mask.shape)}")
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    img.putpalette(palette_bytes(palette or []))  # index 255 (ignore) is white
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
