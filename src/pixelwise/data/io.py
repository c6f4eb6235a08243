"""Robust image and mask file I/O shared by every reader, ``predict`` and the web demo.

- :func:`read_image` -> ``uint8[H, W, 3]`` RGB for any common PIL mode (RGB, L, LA, RGBA, P,
  1, CMYK, I;16, I, F), EXIF orientation applied.
- :func:`read_mask` -> ``uint8[H, W]`` class indices. Palette ("P") PNGs are read as their
  indices and never converted to RGB; RGB colour masks need a palette to map colours to indices.
- :func:`probe` reads only the header (size, mode) and checks cheaply for truncation, for
  ``check()``.
- :func:`write_mask` writes a palette-indexed PNG; :class:`PngRowWriter` encodes a PNG a band of
  rows at a time into a stream (large predictions never hold the whole image to write it), and
  :func:`encode_png` is its one-shot form (the web API's PNGs, byte for byte ``predict``'s files).

Every unreadable, truncated or unsupported file raises :class:`~pixelwise.errors.UserError`
naming the file. So does an image of more than :func:`max_image_pixels` pixels (PIL's
decompression-bomb limit, 89,478,485 by default): a small file can declare a huge size and
exhaust memory when decoded. :func:`set_max_image_pixels` (``--max-pixels``) raises the limit
deliberately for large aerial or slide images.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from pixelwise.data.palette import palette_bytes
from pixelwise.errors import UserError, not_a_file

PathLike = str | os.PathLike

# What PIL raises for broken files: truncated data (OSError), bad headers (SyntaxError,
# UnidentifiedImageError), bad chunks (ValueError), absurd sizes (DecompressionBombError).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# ... and where it counts or seeks the frames of a cut file: TypeError ("Missing dimensions", after
# warning "Corrupt EXIF data") for a TIFF stack cut in its page directories, IndexError for a GIF.
_PIL_FRAME_ERRORS = (*_PIL_ERRORS, TypeError, IndexError)
_ORIENTATION_TAG = 0x0112
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)  # PIL's own default
_max_pixels = DEFAULT_MAX_PIXELS

# The image files pixelwise takes from a folder (folder datasets, ``predict DIR``, the web demo's samples):
# suffix -> PIL's format name. One list for every verb; a file given by name is read whatever its suffix.
IMAGE_FORMATS: dict[str, str] = {
    ".png": "PNG", ".apng": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".mpo": "JPEG",
    ".bmp": "BMP", ".dib": "DIB", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".gif": "GIF",
    ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM", ".pnm": "PPM", ".tga": "TGA", ".pcx": "PCX",
}


def _pil_reads(module: str) -> bool:
    """Whether this Pillow has the optional decoder ``module`` (older ones do not know the name)."""
    try:
        return bool(features.check_module(module))
    except ValueError:
        return False


if _pil_reads("avif"):  # Pillow 11.3+ built with libavif
    IMAGE_FORMATS[".avif"] = "AVIF"
IMAGE_SUFFIXES = frozenset(IMAGE_FORMATS)
# The formats `serve` opens from an upload: those of the folder list, a camera JPEG with a multi-picture
# segment (MPO: its first picture) and icons (ICO: the largest size), which a folder passes over. An upload
# from the network reaches none of PIL's other decoders (EPS through Ghostscript, PSD, ...); a file given by
# name (`predict FILE`) is the user's own, and is read in any format PIL reads (JPEG 2000, SGI, QOI too).
UPLOAD_FORMATS = frozenset({*IMAGE_FORMATS.values(), "MPO", "ICO"})
# Suffixes of image files that are not in that list (PIL cannot read them, or they are not pictures of a
# scene: icons, documents): a folder dataset names such a file in images/ instead of passing over it.
OTHER_IMAGE_SUFFIXES = frozenset({
    ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jpx", ".ico", ".cur", ".icns", ".psd", ".xcf", ".svg",
    ".dds", ".qoi", ".sgi", ".ras", ".xbm", ".xpm", ".exr", ".hdr", ".pfm", ".raw",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".fits", ".dcm",
}) - IMAGE_SUFFIXES


def format_names(suffixes: frozenset[str] | set[str] = IMAGE_SUFFIXES) -> str:
    """'BMP, GIF, JPEG, ...': the formats of ``suffixes`` (or of PIL format names, such as
    :data:`UPLOAD_FORMATS`), as messages name them."""
    names = {IMAGE_FORMATS.get(s, s.lstrip(".").upper()) for s in suffixes}
    return ", ".join(sorted(names - {"DIB", "MPO"}))  # a DIB is a BMP without its file header, an MPO a JPEG


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


@contextmanager
def quiet_pil() -> Iterator[None]:
    """PIL's UserWarnings about a damaged file ("Corrupt EXIF data", ...) and its
    DecompressionBombWarning (pixelwise's own pixel limit applies) are not shown: the file either
    decodes or becomes one error naming it (a UserError here, serve's UploadError)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


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
    if img.format == "PNG":
        with open(path, "rb") as f:
            why = png_misread(f.read(26))
        if why:
            img.close()
            raise UserError(f"{path}: {why}")
    return img


def png_misread(head: bytes | bytearray | memoryview) -> str | None:
    """Why Pillow would decode the PNG whose first 26 bytes are ``head`` to other pixels than it
    stores, without an error: a 16-bit gray-and-alpha PNG comes out as the low byte of each sample
    (1000 -> 232, 256 -> 0), noise where round(v / 257) is meant; None for the others."""
    head = bytes(head[:26])
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24:26] == b"\x10\x04":
        return ("a 16-bit gray-and-alpha PNG, which Pillow decodes wrongly (the low byte of each sample); "
                "save it as 16-bit gray without alpha, or as 8-bit")
    return None


def _open_loaded(path: PathLike, frame: int = 0) -> Image.Image:
    """Open and fully decode one frame (the first by default), with EXIF orientation applied; the
    image returned holds no open file."""
    path = _existing(path)
    opened: Image.Image | None = None
    try:
        with quiet_pil():
            opened = _open(path)
            img = _load_frame(path, opened, frame)
    except BaseException as e:
        if opened is not None:
            opened.close()  # a file that fails is not left open
        _raise_named(path, frame, e)
        raise
    if img is not opened:
        opened.close()
    return img


def _existing(path: PathLike) -> Path:
    path = Path(path)
    problem = not_a_file(path, "an image file")
    if problem:
        raise UserError(f"{path}: {problem}")
    return path


def _load_frame(path: Path, img: Image.Image, frame: int) -> Image.Image:
    """Frame ``frame`` of the open ``img``, decoded, EXIF orientation applied, as an image that
    holds no file (``img`` itself for a still image, whose file PIL closes at ``load()``)."""
    if frame:
        count = _frames(img)  # of the file already open, not a second open
        if not 0 <= frame < count:
            raise UserError(f"{path}: has no frame {frame} ({count} frame(s), counted from 0)")
        _seek(img, _frame_pages(img)[frame])
        if img.size[0] * img.size[1] > _max_pixels:
            raise _too_large(path, img.size[0] * img.size[1], img.size)
    # the orientation is read before load(): Pillow 10.0 drops a TIFF page's file at load() and
    # would then fail reading the page's EXIF from it (AttributeError on None.seek)
    rotated = img.getexif().get(_ORIENTATION_TAG, 1) != 1
    if rotated and img.format == "TIFF":
        # Pillow memory-maps a one-strip uncompressed TIFF page (L, P, I;16, RGBA, ...) by its
        # name with the size already turned for orientations 5-8, and turns those scrambled rows:
        # without the name it reads the file as for a compressed page, right
        img.filename = ""  # type: ignore[attr-defined]  # an ImageFile attribute
    img.load()
    if rotated:
        out = ImageOps.exif_transpose(img)
    else:
        out = img.copy() if _holds_file(img) else img  # a multi-frame file stays open after load(), for seek()
    out.format = img.format  # kept for the caller (a transposed or copied image has none)
    return out


def _raise_named(path: Path, frame: int, e: BaseException) -> None:
    """Raise PIL's error ``e`` for a damaged file as the UserError naming it; other errors are left
    to the caller to re-raise."""
    if isinstance(e, UnidentifiedImageError):
        raise _unidentified(path) from None
    if isinstance(e, _PIL_FRAME_ERRORS):
        where = f" (frame {frame})" if frame else ""
        raise UserError(f"{path}: unreadable or truncated image{where} ({e}); re-export it or remove it") from None


def _frames(img: Image.Image) -> int:
    """The frames of an open image: a TIFF stack's pages, an animation's frames; 1 for a still
    image, and for a camera JPEG with a multi-picture (MPF) segment, which PIL opens as ``MPO``:
    its other pictures are a preview or a second view of the same scene, not more images."""
    return 1 if img.format == "MPO" else len(_frame_pages(img))


# TIFF NewSubfileType (tag 254) bits of a page that is not an image of its own: bit 0, a
# reduced-resolution copy of another page (a Cloud-Optimised GeoTIFF's overviews), bit 2, a
# transparency mask (TIFF 6.0, section 8)
_NOT_A_FRAME = 0b101


def _frame_pages(img: Image.Image) -> list[int]:
    """The page (PIL frame) index of each frame of an open image: every frame, but for a TIFF only
    the full-resolution pages (an overview or a mask page describes another page). Kept on the
    image, so that each frame's seek does not walk the pages again."""
    pages = getattr(img, "_pixelwise_pages", None)
    if pages is None:
        n = int(getattr(img, "n_frames", 1))
        pages = list(range(n))
        if img.format == "TIFF" and n > 1:
            here = img.tell()
            kinds = []
            for page in range(n):
                _seek(img, page)
                kinds.append(int(img.tag_v2.get(254, 0) or 0))  # type: ignore[attr-defined]
            _seek(img, here)
            pages = [p for p in pages if not kinds[p] & _NOT_A_FRAME] or pages
        img._pixelwise_pages = pages  # type: ignore[attr-defined]
    return pages


def _seek(img: Image.Image, page: int) -> None:
    """``img.seek(page)``. Older Pillows (10.1, our floor) refuse a TIFF page above their pixel limit
    as they seek, having read its directory and size by then; newer ones leave the size to the
    reader, as here: a frame is checked against pixelwise's own limit (below PIL's) where it is
    read, and counting the pages of a stack must not fail on a large one."""
    try:
        img.seek(page)
    except Image.DecompressionBombError:
        if img.tell() != page:  # the page was not reached: a damaged file, named by the caller
            raise


def _holds_file(img: Image.Image) -> bool:
    """Whether PIL still holds the image's file open after ``load()`` (it does for the formats
    that can hold several frames: TIFF, GIF, WebP, APNG), in ``_fp`` or, in older Pillows, ``fp``."""
    held = getattr(img, "_fp", None) or getattr(img, "fp", None)
    return held is not None and not getattr(held, "closed", True)


def frame_count(path: PathLike) -> int:
    """How many frames (pages of a TIFF stack, frames of an animation) an image file holds; 1 for
    a still image. Reads the header only (and, for GIF, PIL's scan of the frame markers)."""
    path = Path(path)
    try:
        with quiet_pil(), _open(path) as img:
            return _frames(img)
    except BaseException as e:
        _raise_named(path, 0, e)
        raise


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale a single-channel integer/float array to uint8.

    16-bit data maps its full range 0..65535 onto 0..255 (``round(v / 257)``); float data in
    [0, 1] is scaled by 255, other floats are clipped to 0..255 (the range judged by the finite
    pixels; NaN reads as 0, an infinity as the range's end); wider integers whose values fit in 16
    bits are treated as 16-bit, larger ones are min-max scaled.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]  # the range is the finite pixels': one infinite pixel darkened the whole image
        unit = bool(finite.size) and finite.min() >= 0.0 and finite.max() <= 1.0
        a = np.nan_to_num(a, nan=0.0, posinf=1.0 if unit else 255.0, neginf=0.0)
        if unit:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo >= 0 and hi <= 65535:
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    span = max(hi - lo, 1)
    return ((a - lo) * 255 // span).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8[H, W, 3] RGB (alpha dropped), as :func:`read_image` reads
    its file: the EXIF orientation applied (an image that :func:`read_image`'s decoding turned
    already carries no orientation tag)."""
    img = _oriented(img)
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("L", "P", "RGBA", "LA", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La", "RGBa"):
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        elif mode == "La":  # gray premultiplied by its alpha (a TIFF's associated alpha): Pillow goes to RGB via LA
            img = img.convert("LA")
        arr = np.asarray(img.convert("RGB"))
    else:  # I;16, I;16B, I;16L, I, F and friends: single channel, wider than 8 bits
        arr = _to_uint8(np.asarray(img))
        if arr.ndim != 2:
            raise ValueError(f"unsupported image mode {mode}")
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _oriented(img: Image.Image) -> Image.Image:
    """A caller's image (a photo as a camera stored it) turned by its EXIF orientation; as it is where
    the EXIF block cannot be read (its pixels still decode: the orientation is taken as none). A
    TIFF page not loaded yet is loaded as :func:`_load_frame` loads it (Pillow's memory-mapped read of
    a one-strip page scrambles the rows of a turned one), its file name given back after."""
    try:
        rotated = img.getexif().get(_ORIENTATION_TAG, 1) != 1
    except (*_PIL_FRAME_ERRORS, struct.error):  # a damaged EXIF block: 'not a TIFF file'
        return img
    if not rotated:
        return img
    if img.format == "TIFF" and getattr(img, "tile", None):  # not loaded yet
        name = img.filename  # type: ignore[attr-defined]  # an ImageFile attribute
        img.filename = ""  # type: ignore[attr-defined]
        try:
            img.load()
        finally:
            img.filename = name  # type: ignore[attr-defined]
    return ImageOps.exif_transpose(img)


def read_image(path: PathLike, frame: int = 0) -> np.ndarray:
    """Read an image file as RGB. -> uint8[H, W, 3].

    Handles RGB, L, LA, RGBA, P (palette expanded to colours), 1, CMYK and 16/32-bit
    grayscale (see :func:`_to_uint8`); a multi-frame file (TIFF stack, animation) gives the frame
    ``frame``, counted from 0 (:func:`frame_count` says how many there are); the EXIF
    orientation tag is applied. Raises UserError naming the file if it cannot be decoded; a file
    cut short after its last pixel (a PNG without its end chunk) decodes and is read, where
    ``pixelwise predict``, serve and the dataset readers, which check the file's structure first
    (:func:`probe_info`), refuse it as truncated.
    """
    return _to_rgb(path, _open_loaded(path, frame))


def read_frames(path: PathLike) -> Generator[np.ndarray, None, None]:
    """Every frame of an image file in order (one for a still image), each as
    ``read_image(path, k)`` gives it, from one open file: PIL seeks a GIF (and walks a TIFF's page
    directories) from the start, so reading frame ``k`` afresh for each ``k`` costs time quadratic
    in the frame count. A damaged frame raises the UserError naming it when it is reached."""
    path = _existing(path)
    try:
        with quiet_pil():
            opened = _open(path)
    except BaseException as e:
        _raise_named(path, 0, e)
        raise
    with opened:
        frame, count = 0, 1
        while frame < count:
            try:
                with quiet_pil():  # not across the yield: the caller's own warnings stay on
                    count = _frames(opened) if frame == 0 else count
                    rgb = _to_rgb(path, _load_frame(path, opened, frame))
            except BaseException as e:
                _raise_named(path, frame, e)
                raise
            yield rgb
            frame += 1


def _to_rgb(path: PathLike, img: Image.Image) -> np.ndarray:
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
    refuse_lossy_mask(path, img.format, img.info.get("compression"))
    mode = img.mode
    if mode in ("P", "L"):
        indices = np.ascontiguousarray(np.asarray(img), dtype=np.uint8)
        return stored_gray(indices, path) if mode == "L" else indices
    if mode == "1":
        return stored_bits(np.asarray(img).astype(np.uint8), path)
    if mode in ("LA", "PA"):
        return np.ascontiguousarray(np.asarray(img)[:, :, 0], dtype=np.uint8)
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(img)[:, :, :3]
        if palette is not None:
            return colors_to_index(rgb, palette, unknown)
        if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
            return np.ascontiguousarray(rgb[:, :, 0])
        raise UserError(f"{path}: RGB colour mask but no palette is known; save it as a palette/index PNG "
                        "(pixel value = class id), or, for a folder dataset, describe the colours in classes.json")
    arr = np.asarray(img)
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
        arr = stored_gray(arr, path)  # a PGM of maxval 300, a MinIsWhite 16-bit TIFF
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(f"{path}: {mode} mask has values {int(arr.min())}..{int(arr.max())}, "
                            "which do not fit 0..255; store class ids as 8-bit")
        return arr.astype(np.uint8)
    raise UserError(f"{path}: unsupported mask mode {mode}; save masks as 8-bit index PNGs")


def stored_bits(values: np.ndarray, source: PathLike | bytes | bytearray | memoryview) -> np.ndarray:
    """A 1-bit mask's 0/1 as stored: PIL turns a MinIsWhite TIFF's bits over (the usual layout of
    bilevel and CCITT files), as it does its gray samples."""
    return 1 - values if _gray_storage(source)[1] else values


def _gray_storage(source: PathLike | bytes | bytearray | memoryview) -> tuple[int | None, bool]:
    """(the largest value a gray file's samples can store, whether they are stored inverted), from
    its header: a PNG's bit depth, a PGM's maxval, a TIFF's BitsPerSample and PhotometricInterpretation
    (0, "MinIsWhite", as ImageJ writes inverted-LUT masks); (None, False) where nothing says."""
    data = source if isinstance(source, bytes | bytearray | memoryview) else None
    if data is None:
        with open(str(source), "rb") as f:
            head = f.read(512)
    else:
        head = bytes(data[:512])
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[25:26] == b"\x00":
        return 2 ** head[24] - 1, False
    if head[:2] in (b"P2", b"P5"):  # magic, width, height, maxval, '#' comments between them
        tokens = re.sub(rb"#[^\n]*", b" ", head[2:]).split()
        return (int(tokens[2]), False) if len(tokens) > 2 and tokens[2].isdigit() else (None, False)
    if head[:4] in _TIFF_MAGIC:
        try:
            target = BytesIO(bytes(data)) if data is not None else Path(str(source))
            with quiet_pil(), Image.open(target) as img:
                tags = getattr(img, "tag_v2", {})
                bits, photometric = tags.get(258), tags.get(262)
        except _PIL_FRAME_ERRORS:
            return None, False
        bits = bits[0] if isinstance(bits, tuple) else bits
        return (2 ** bits - 1 if isinstance(bits, int) else None), photometric == 0
    return None, False


def stored_gray(values: np.ndarray, source: PathLike | bytes | bytearray | memoryview) -> np.ndarray:
    """The values a gray ("L", or "I" from a PGM) mask stores, from the levels PIL gives: PIL
    scales a PNG's or TIFF's 2- and 4-bit samples and a PGM's 0..maxval to the full range (a 2-bit
    mask's stored 3 is 255, "ignore"; a 0/1 PGM's 1 too) and turns a MinIsWhite TIFF's samples
    over; its 1-bit ones it does not scale. ``source``: the file (path or bytes), whose header
    says how the samples are stored (:func:`_gray_storage`)."""
    maxval, inverted = _gray_storage(source)
    full = 255 if values.dtype == np.uint8 else 65535
    if inverted and values.dtype == np.uint8:  # PIL turns over only the 8-bit and narrower samples
        values = (full - values.astype(np.int64)).astype(values.dtype)
    if maxval is not None and 0 < maxval < full:  # exact: PIL rounds each stored value to its level
        values = np.rint(values.astype(np.float64) * maxval / full).astype(values.dtype)
    return values


def palette_conflict(path: PathLike, known: Mapping[tuple[int, int, int], int]
                     ) -> tuple[int, tuple[int, int, int], int] | None:
    """For a palette ("P"/"PA") mask, which :func:`read_mask` reads by index: the first index the mask
    uses whose colour in the file's own palette is, in ``known`` ({colour: class id or 255}), the
    colour of another class -> (index, colour, that class); None when there is none, and for masks
    of other modes. A colour ``known`` lacks (a gray palette) is no conflict, nor one the file's
    palette holds at several indices (a palette that does not tell classes apart, such as the
    black filler after the classes that :func:`write_mask` writes). Cheap: the header's palette
    first; the pixels are decoded only when some index's colour belongs to another class."""
    path = _existing(path)
    try:
        with quiet_pil(), _open(path) as img:
            mode = img.mode
            flat = (img.getpalette() or []) if mode in ("P", "PA") else []
    except BaseException as e:
        _raise_named(path, 0, e)
        raise
    suspects = palette_suspects(flat, known)
    if mode not in ("P", "PA") or not suspects:
        return None
    return first_used_suspect(suspects, np.asarray(_open_loaded(path)))


def palette_suspects(flat: Sequence[int], known: Mapping[tuple[int, int, int], int]
                     ) -> dict[int, tuple[tuple[int, int, int], int]]:
    """A palette mask's own palette (flat [r, g, b, ...]) -> {index: (its colour, the other class
    ``known`` gives that colour)} for the indices that would be read as another class than their
    colour says (:func:`palette_conflict`)."""
    colours = [(int(flat[3 * i]), int(flat[3 * i + 1]), int(flat[3 * i + 2])) for i in range(min(len(flat) // 3, 256))]
    repeated = {c for c, n in Counter(colours).items() if n > 1}
    suspects: dict[int, tuple[tuple[int, int, int], int]] = {}
    for i, colour in enumerate(colours):
        cls = known.get(colour, i)
        if cls != i and colour not in repeated:
            suspects[i] = (colour, cls)
    return suspects


def first_used_suspect(suspects: Mapping[int, tuple[tuple[int, int, int], int]], indices: np.ndarray
                       ) -> tuple[int, tuple[int, int, int], int] | None:
    """The first of ``suspects`` (:func:`palette_suspects`) that the mask's ``indices`` (uint8[H, W],
    or [H, W, 2] of a "PA" mask) use -> (index, colour, class); None if it uses none."""
    if indices.ndim == 3:  # PA: the index is the first channel
        indices = indices[:, :, 0]
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=256))
    for i in used.tolist():
        if i in suspects:
            return i, *suspects[i]
    return None


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """uint8[..., 3] colours -> int64[...] codes ``r << 16 | g << 8 | b`` (one number per colour)."""
    rgb = np.asarray(rgb)
    return (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]


def colors_to_index(rgb: np.ndarray, palette: Sequence[Sequence[int] | None],
                    unknown: int = 255) -> np.ndarray:
    """uint8[H, W, 3] colours -> uint8[H, W] palette indices; colours not in ``palette`` -> ``unknown``.
    ``None`` entries in ``palette`` match nothing (to reserve an index)."""
    code = colour_codes(rgb)
    out = np.full(code.shape, unknown, dtype=np.uint8)
    for i, colour in enumerate(palette):
        if colour is not None:  # None entries keep an index free
            out[code == colour_codes(np.array(colour))] = i
    return out


def palette_known(palette: Sequence[Sequence[int]], ignore_colour: Sequence[int]) -> dict[tuple[int, int, int], int]:
    """{colour: class id} of a colour palette, with ``ignore_colour`` as 255 unless a class has it
    (a class of the ignore colour stays that class): what :func:`palette_conflict` checks against."""
    known = {(int(c[0]), int(c[1]), int(c[2])): i for i, c in enumerate(palette)}
    r, g, b = (int(v) for v in ignore_colour)
    known.setdefault((r, g, b), 255)
    return known


class ImageInfo(NamedTuple):
    """What :func:`probe_info` reads from a file's header."""

    size: tuple[int, int]  # (width, height) as displayed: after the EXIF rotation
    mode: str  # PIL's mode (RGB, L, P, I;16, ...)
    format: str  # PIL's format name (PNG, JPEG, TIFF, ...)
    orientation: int  # the EXIF orientation tag, 1 when there is none
    stored_size: tuple[int, int]  # (width, height) of the pixels as stored, before the EXIF rotation
    compression: str | None = None  # PIL's info["compression"] (TIFF: "raw", "tiff_lzw", "jpeg", ...)


def probe(path: PathLike, mask: bool = False) -> tuple[tuple[int, int], str]:
    """Header-only check of an image file. -> ((width, height) as displayed, PIL mode).

    :func:`probe_info` with fewer fields: see there for what is checked. ``mask``: the file is a
    label mask, and a lossy format (JPEG, lossy WebP, ...) is refused (:func:`lossy_mask_error`).
    """
    info = probe_info(path)
    if mask:
        refuse_lossy_mask(path, info.format, info.compression)
    return info.size, info.mode


def probe_info(path: PathLike) -> ImageInfo:
    """Header-level check of an image file, without decoding pixels. -> :class:`ImageInfo`.

    Size accounts for EXIF rotation (90/270 degrees swap W and H). Truncation is found from the
    structure the header declares (:func:`truncation`): PNG chunk CRCs and end marker; the JPEG
    stream walked to its end-of-image marker (data after it, such as a phone's Motion Photo
    video, is allowed); BMP, DIB, PPM/PGM/PBM and uncompressed TGA pixel data (offset + row-padded
    size) within the file; every TIFF page's strips or tiles (offsets + byte counts) within the file,
    and every page directory readable. GIF, WebP, AVIF, PCX, RLE-compressed BMP/TGA do not declare
    where their data ends: a cut there shows only when decoding (``data inspect`` decodes every
    sample). Raises UserError naming the file.
    """
    path = _existing(path)
    try:
        with quiet_pil(), _open(path) as img:
            size, mode, fmt = img.size, img.mode, str(img.format)
            compression = img.info.get("compression")
            orientation = _orientation(path, img)
            if fmt == "TIFF":  # Pillow gives a TIFF's size already turned (it turns the pixels at load())
                tags = getattr(img, "tag_v2", {})
                stored = tags.get(256), tags.get(257)  # ImageWidth, ImageLength as the file stores them
                size = stored if all(isinstance(v, int) for v in stored) else size
            cut = truncation(path, img)
        if fmt == "PNG":  # verify() checks every chunk's CRC and the end marker without inflating
            with Image.open(path) as img:
                img.verify()
    except UnidentifiedImageError:
        raise _unidentified(path) from None
    except _PIL_FRAME_ERRORS as e:
        raise UserError(f"{path}: unreadable or truncated image ({e}); re-export it or remove it") from None
    if cut:
        raise UserError(f"{path}: truncated {fmt} ({cut}); re-export it or remove it")
    if orientation in (5, 6, 7, 8):  # a quarter turn: the stored pixels are the other way round
        return ImageInfo((size[1], size[0]), mode, fmt, orientation, size, compression)
    return ImageInfo(size, mode, fmt, orientation if isinstance(orientation, int) else 1, size, compression)


def damage(data: bytes | bytearray) -> str | None:
    """What :func:`probe_info` finds cut short or damaged in an image file's bytes (an upload, which
    has no path): the same checks, so that serve refuses what predict and the readers refuse; None
    when nothing is found. An image PIL cannot open at all is the caller's to name."""
    misread = png_misread(data)
    if misread:
        return misread
    try:
        with quiet_pil(), Image.open(io.BytesIO(data)) as img:
            fmt, cut = img.format, truncation(data, img)
        if cut:
            return f"truncated {fmt} ({cut})"
        if fmt == "PNG":
            with quiet_pil(), Image.open(io.BytesIO(data)) as img:
                img.verify()
    except _PIL_FRAME_ERRORS as e:
        return f"unreadable or truncated ({e})"
    return None


def _orientation(path: Path, img: Image.Image) -> int:
    """The EXIF orientation of the open ``img``, from its header: a PNG whose eXIf chunk is not
    before its pixels (PIL's ``getexif()`` then decodes the whole image to look after them) is
    looked through chunk by chunk, its pixel data skipped."""
    if img.format != "PNG" or "exif" in img.info:
        return img.getexif().get(_ORIENTATION_TAG, 1)
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        while len(head := f.read(8)) == 8:
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"eXIf":
                exif = Image.Exif()
                exif.load(f.read(length))
                return exif.get(_ORIENTATION_TAG, 1)
            if kind == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    # no eXIf chunk: what the header's text chunks say (an XMP tiff:Orientation, ImageMagick's "Raw
    # profile type exif"), as PIL reads them, by the base class's getexif, which decodes nothing
    return Image.Image.getexif(img).get(_ORIENTATION_TAG, 1)


# -- truncation found from the header -----------------------------------------------------------------
# Bits per pixel of the raw modes PIL's "raw" decoder gets for BMP, DIB, PPM and TGA files (others: not checked)
_RAW_BITS = {"1": 1, "1;I": 1, "1;R": 1, "P;1": 1, "P;2": 2, "P;4": 4, "L": 8, "P": 8, "L;I": 8, "LA": 16,
             "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "BGR;15": 16, "BGR;16": 16,
             "BGR;5": 16, "BGRA;15": 16, "BGRA;15Z": 16,  # a 16-bit colour TGA (Pillow 10.1's name, then later ones)
             "RGB": 24, "BGR": 24,
             "RGBA": 32, "BGRA": 32, "RGBX": 32, "BGRX": 32, "I;32": 32, "I;32B": 32, "F;32F": 32,
             "F;32BF": 32, "I": 32, "F": 32, "RGB;16B": 48, "RGBA;16B": 64}
_RAW_FORMATS = ("BMP", "DIB", "PPM", "TGA")
_TIFF_STRIPS = ((273, 279), (324, 325))  # (offsets, byte counts) of StripOffsets/-ByteCounts, TileOffsets/-ByteCounts


def truncation(source: Path | bytes | bytearray, img: Image.Image) -> str | None:
    """Why the open image ``img`` of the file at ``source`` (or of the bytes ``source``, an upload)
    is cut short, from its header and structure alone (no pixel is decoded); None when nothing is
    found (see :func:`probe_info`). A multi-page ``img`` is left on its last page."""
    length = source.stat().st_size if isinstance(source, Path) else len(source)
    fmt = img.format
    if fmt in ("JPEG", "MPO"):
        data = source.read_bytes() if isinstance(source, Path) else source
        return None if jpeg_complete(data) else "no end-of-image marker after its image data"
    if fmt in _RAW_FORMATS:
        for tile in getattr(img, "tile", []):  # an ImageFile's decoder list: (codec, extents, offset, args)
            need = _raw_tile_end(tuple(tile), img.size)
            if need is not None and need > length:
                return f"its header declares {need:,} bytes of pixel data and header, the file has {length:,}"
        return None
    if fmt == "TIFF":
        if cut := tiff_directory_cut(source, length):
            return cut
        need = _tiff_page_end(img)
        if need > length:
            return f"its strips or tiles end at byte {need:,}, the file has {length:,}"
        try:
            for page in range(1, int(getattr(img, "n_frames", 1))):  # every page, overviews too
                _seek(img, page)
                need = _tiff_page_end(img)
                if need > length:
                    return f"page {page}'s strips or tiles end at byte {need:,}, the file has {length:,}"
        except _PIL_FRAME_ERRORS as e:
            return f"a page directory after the first is cut or damaged: {e}"
    return None


def _raw_tile_end(tile: tuple, size: tuple[int, int]) -> int | None:
    """Where the pixel data of one of PIL's "raw" tiles ends (offset + rows x row-padded stride);
    None for other decoders and for raw modes not in ``_RAW_BITS``."""
    codec, extents, offset, args = tile
    if codec != "raw":
        return None
    rawmode, stride = (args, 0) if isinstance(args, str) else (args[0], args[1] if len(args) > 1 else 0)
    x0, y0, x1, y1 = extents if extents else (0, 0, *size)
    if not stride:
        bits = _RAW_BITS.get(rawmode)
        if bits is None:
            return None
        stride = ((x1 - x0) * bits + 7) // 8
    return int(offset) + abs(int(stride)) * (y1 - y0)


# the TIFF tags that say how a page's pixels are stored (size, samples, compression, colour, strips
# or tiles, colour map, sample format, predictor, JPEG tables, YCbCr layout): a value of one of them
# past the end of the file changes what PIL decodes
_TIFF_PIXEL_TAGS = frozenset({256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325,
                              338, 339, 347, 530, 531, 532})
# bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED, SSHORT,
# SLONG, SRATIONAL, FLOAT, DOUBLE, IFD; BigTIFF's LONG8, SLONG8, IFD8)
_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
                    16: 8, 17: 8, 18: 8}


def tiff_directory_cut(source: Path | bytes | bytearray, length: int) -> str | None:
    """Where the chain of page directories of the TIFF (or BigTIFF) file at ``source`` (or of the
    bytes ``source``) leaves the file: a directory, or the value of a tag that describes the pixels
    (:data:`_TIFF_PIXEL_TAGS`, stored apart from the directory), that ends past byte ``length``;
    None when every one is inside. PIL reads a directory cut short in part without an error (the
    tags after the cut are missing, such as a page's strip byte counts, and so are the pages after
    it), and passes over a tag whose value is past the end: a lost BitsPerSample read a 16-bit
    page as 1-bit. Other tags (Software, a camera's private tags) do not change the pixels and
    are not looked at; neither is a missing link after the last directory, which readers take as
    the end of the chain."""
    def at(offset: int, size: int) -> bytes | None:
        if offset + size > length:
            return None
        f.seek(offset)
        data = f.read(size)
        return data if len(data) == size else None

    with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as f:
        head = f.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = len(head) == 16 and struct.unpack(order + "H", head[2:4])[0] == 43
        count_fmt, entry_size, word, word_fmt = ("Q", 20, 8, "Q") if big else ("H", 12, 4, "I")
        where = struct.unpack(order + word_fmt, head[8:16] if big else head[4:8])[0]
        seen: set[int] = set()
        while where and where not in seen:  # a directory chain that loops back is PIL's to refuse
            page = len(seen)
            seen.add(where)
            raw = at(where, struct.calcsize(count_fmt))
            start = where + struct.calcsize(count_fmt)
            table = None if raw is None else at(start, struct.unpack(order + count_fmt, raw)[0] * entry_size)
            if table is None:
                return f"page {page}'s directory at byte {where:,} runs past the end of the file ({length:,} bytes)"
            for i in range(0, len(table), entry_size):
                tag, kind = struct.unpack(order + "HH", table[i:i + 4])
                count, value_at = struct.unpack(order + 2 * word_fmt, table[i + 4:i + entry_size])
                size = count * _TIFF_TYPE_BYTES.get(kind, 0)
                # a value too long for the entry is stored apart
                if tag in _TIFF_PIXEL_TAGS and size > word and value_at + size > length:
                    return (f"page {page}'s tag {tag} holds {size:,} bytes from byte {value_at:,}, past the end of the "
                            f"file ({length:,} bytes)")
            link = at(start + len(table), word)
            where = struct.unpack(order + word_fmt, link)[0] if link is not None else 0
    return None


def _tiff_page_end(img: Image.Image) -> int:
    """The end of the last strip or tile of the current TIFF page (0 when it declares none)."""
    tags = getattr(img, "tag_v2", {})
    end = 0
    for offsets_tag, counts_tag in _TIFF_STRIPS:
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets is None or counts is None:
            continue
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        end = max([end] + [int(o) + int(c) for o, c in zip(offsets, counts)])
    return end


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")  # a marker; FF00 is a stuffed FF, FFD0-D7 restarts
_JPEG_STANDALONE = (0x01, 0xD8)  # TEM, SOI: no length field


def jpeg_complete(data: bytes | bytearray) -> bool:
    """Whether the JPEG stream in ``data`` reaches its end-of-image marker (FFD9). The segments are
    walked by their lengths, so an FFD9 inside one (the end of an EXIF thumbnail in APP1) is not
    taken for the end; in the entropy-coded data after a start-of-scan every FF byte is stuffed
    (FF00) or a restart marker, so the next other marker is found by a search. Data after the
    end marker (a Motion Photo's video, a vendor trailer, an MPO's second picture) is allowed."""
    if not data.startswith(b"\xff\xd8"):
        return False
    pos, n = 2, len(data)
    while True:
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            return False
        i, code = found.start(), data[found.start() + 1]
        if code == 0xD9:
            return True
        if code in _JPEG_STANDALONE:
            pos = i + 2
            continue
        if i + 4 > n:
            return False
        pos = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if pos > n:
            return False


def lossy_mask_error(data: bytes | bytearray | memoryview, fmt: str | None = None,
                     compression: str | None = None) -> str | None:
    """Why a label mask file whose bytes are ``data`` (its first 26 bytes are enough but for WebP,
    whose image chunk may follow large metadata: then the whole file) cannot hold labels exactly:
    JPEG (MPO), a JPEG-compressed TIFF (``compression``: PIL's ``info["compression"]``),
    AVIF/HEIF, or lossy WebP (its ``VP8 `` image chunk); None for the others. ``fmt``: PIL's
    format name, when known."""
    head = bytes(data[:16])
    if fmt in ("JPEG", "MPO") or head.startswith(b"\xff\xd8\xff"):
        kind = "JPEG-compressed"
    elif fmt == "TIFF" and compression in ("jpeg", "tiff_jpeg"):
        kind = "JPEG-compressed TIFF"
    elif fmt in ("AVIF", "HEIF") or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix",
                                                                            b"mif1")):
        kind = "AVIF/HEIF"  # lossy as cameras and converters write them; a lossless one is not told apart
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP" and webp_lossy(data):
        kind = "lossy WebP"
    elif head[:8] == b"\x89PNG\r\n\x1a\n" and bytes(data[24:26]) in (b"\x10\x02", b"\x10\x06"):
        return ("16-bit colour PNG mask: Pillow keeps only the high byte of each sample, so class ids stored "
                "as 0..255 would all read as 0; save masks as 8-bit index or gray PNGs")
    else:
        return None
    return f"{kind} mask: lossy compression changes labels at edges; save masks as PNG"


def webp_lossy(data: bytes | bytearray | memoryview) -> bool:
    """Whether the WebP file ``data`` codes its (first) image lossily: the first image chunk is
    ``VP8 `` (lossy) rather than ``VP8L``, in a simple file or after the extended header's chunks
    (``VP8X``, ICC profile, animation frames' headers); only the chunk headers are read."""
    pos = 12
    while pos + 8 <= len(data):
        kind, size = bytes(data[pos:pos + 4]), int.from_bytes(data[pos + 4:pos + 8], "little")
        if kind in (b"VP8 ", b"VP8L"):
            return kind == b"VP8 "
        pos += 8 + (16 if kind == b"ANMF" else size + (size & 1))  # into a frame: its image chunk follows
    return False


def refuse_lossy_mask(path: PathLike, fmt: str | None = None, compression: str | None = None) -> None:
    """UserError naming ``path`` when it is a mask in a lossy format (:func:`lossy_mask_error`)."""
    with open(path, "rb") as f:
        data = f.read(26)  # a PNG's bit depth and colour type are its bytes 24 and 25
        data += f.read() if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else b""  # its chunks, whatever they hold
        why = lossy_mask_error(data, fmt, compression)
    if why:
        raise UserError(f"{path}: {why}")


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")  # little- and big-endian
_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), *((m, "TIFF") for m in _TIFF_MAGIC),
          (b"BM", "BMP"), (b"GIF8", "GIF"), (b"RIFF", "WebP"))


def _unidentified(path: Path) -> UserError:
    """The error for a file PIL cannot identify: an unsupported kind of TIFF (multi-channel float,
    from OpenCV or tifffile) is said to be unsupported, not damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        head = b""
    tiff = head[:4] in _TIFF_MAGIC
    directory = int.from_bytes(head[4:8], "little") if head[:2] == b"II" else int.from_bytes(head[4:8], "big")
    if tiff and directory + 2 > path.stat().st_size:  # written last (by PIL, for a compressed TIFF), then cut
        return UserError(f"{path}: truncated TIFF (its page directory at byte {directory:,} is past the end of "
                         f"the file, {path.stat().st_size:,} bytes); re-export it or remove it")
    layout = tiff_layout(head)
    if layout:
        return UserError(f"{path}: unsupported TIFF: {layout} cannot be read (PIL decodes 1, 8, 16 or 32-bit "
                         "integer channels and a single float channel); convert it to 8 or 16-bit RGB or gray")
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    what = f"starts like a {kind} file but cannot be read (damaged or an unsupported variant)" if kind else \
        "an empty file (0 bytes)" if not head else "not a readable image file"
    return UserError(f"{path}: {what}; re-export it or remove it")


def tiff_layout(head: bytes) -> str | None:
    """'3 channels of 32-bit float' from a TIFF's first page directory (in ``head``, a file's first
    bytes), or None (not a TIFF, or no such directory there)."""
    if head[:4] not in _TIFF_MAGIC:
        return None
    little = head[:2] == b"II"

    def num(at: int, size: int) -> int:
        return int.from_bytes(head[at:at + size], "little") if little else int.from_bytes(head[at:at + size], "big")

    ifd = num(4, 4)
    if ifd + 2 > len(head):
        return None
    entries = num(ifd, 2)
    if ifd + 2 + 12 * entries > len(head):
        return None
    tags = {}
    for k in range(entries):
        at = ifd + 2 + 12 * k
        tag, kind, count = num(at, 2), num(at + 2, 2), num(at + 4, 4)
        size = {3: 2, 4: 4}.get(kind)  # SHORT, LONG: the first value is all that is needed
        if size is not None:
            where = at + 8 if count * size <= 4 else num(at + 8, 4)  # inline, or stored at an offset
            if where + size <= len(head):
                tags[tag] = num(where, size)
    if 258 not in tags and 277 not in tags:
        return None
    channels, bits = tags.get(277, 1), tags.get(258, 1)
    sample = {1: "integer", 2: "signed integer", 3: "float"}.get(tags.get(339, 1), "other-typed")
    return f"{channels} channel(s) of {bits}-bit {sample}"


def write_mask(path: PathLike, mask: np.ndarray, palette: Sequence[Sequence[int]] | None = None,
               text: Mapping[str, str] | None = None) -> None:
    """Write uint8[H, W] class ids as a palette-indexed PNG (indices stay the pixel values), with
    :func:`encode_png`: every mask pixelwise writes, and the web API's, has the same bytes;
    ``text``: tEXt chunks (:class:`PngRowWriter`)."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"write_mask expects uint8[H, W], got shape {list(mask.shape)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(encode_png(mask, "P", palette, text))  # index 255 (ignore) is white


class PngRowWriter:
    """Encode an 8-bit PNG of ``height`` x ``width`` pixels into the binary stream ``out`` a band
    of rows at a time, so that neither the pixels nor their encoding are ever held whole:
    ``mode`` ``"P"`` (class ids with ``palette``, as :func:`write_mask`; index 255 is white),
    ``"L"`` or ``"RGB"``. Use as a context manager; :meth:`write` takes ``uint8[n, width]``
    (``[n, width, 3]`` for RGB) bands top to bottom, and leaving the block without an error
    checks that all ``height`` rows came and ends the PNG (``out`` stays open).

    Rows of L and RGB images use PNG's "Sub" filter (each byte minus its left neighbour's), which
    smooth images compress well with; class masks use none. ``text`` (keyword -> Latin-1 text)
    goes into tEXt chunks before the pixels, where :func:`png_text` finds them without decoding any."""

    _COLOUR_TYPE = {"L": (0, 1), "RGB": (2, 3), "P": (3, 1)}  # mode -> (PNG colour type, bytes per pixel)

    def __init__(self, out: BinaryIO, width: int, height: int, mode: str = "P",
                 palette: Sequence[Sequence[int]] | None = None, level: int = 6,
                 text: Mapping[str, str] | None = None) -> None:
        if mode not in self._COLOUR_TYPE:
            raise ValueError(f"mode must be one of {sorted(self._COLOUR_TYPE)}, got {mode!r}")
        colour_type, self.channels = self._COLOUR_TYPE[mode]
        self.width, self.height, self.mode, self.rows = width, height, mode, 0
        self.filter = 0 if mode == "P" else 1  # none / Sub
        self.file, self.finished = out, False
        self.zip = zlib.compressobj(level)
        self.file.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
        if mode == "P":
            self._chunk(b"PLTE", bytes(palette_bytes(palette or [])))
        for keyword, value in (text or {}).items():
            if not 0 < len(keyword) < 80 or "\0" in keyword or "\0" in value:  # the PNG specification's limits
                raise ValueError(f"a PNG text keyword has 1-79 characters and neither holds a NUL: {keyword!r}")
            self._chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + value.encode("latin-1"))

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.file.write(struct.pack(">I", len(data)) + kind + data)
        self.file.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (``uint8[n, width]``, or ``[n, width, 3]`` for RGB) below those written."""
        shape = (self.width, 3) if self.mode == "RGB" else (self.width,)
        if rows.dtype != np.uint8 or rows.shape[1:] != shape:
            raise ValueError(f"PngRowWriter({self.mode}) expects uint8[n, {', '.join(map(str, shape))}], "
                             f"got {rows.dtype}{list(rows.shape)}")
        if self.rows + len(rows) > self.height:
            raise ValueError(f"{self.rows + len(rows)} rows written to a PNG of height {self.height}")
        flat = np.ascontiguousarray(rows).reshape(len(rows), self.width * self.channels)
        lines = np.empty((len(rows), flat.shape[1] + 1), np.uint8)
        lines[:, 0] = self.filter
        lines[:, 1:] = flat
        if self.filter == 1:  # Sub: each byte minus the byte one pixel to its left (mod 256)
            lines[:, 1 + self.channels :] -= flat[:, : -self.channels]
        data = self.zip.compress(lines.tobytes())
        if data:
            self._chunk(b"IDAT", data)
        self.rows += len(rows)

    def finish(self) -> None:
        """End the PNG (once all ``height`` rows are written)."""
        if self.finished:
            return
        if self.rows != self.height:
            raise ValueError(f"PNG finished after {self.rows} of its {self.height} rows")
        self._chunk(b"IDAT", self.zip.flush())
        self._chunk(b"IEND", b"")
        self.finished = True

    def __enter__(self) -> PngRowWriter:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None:  # after an error the PNG stays unfinished and that error propagates
            self.finish()


def encode_png(pixels: np.ndarray, mode: str = "P", palette: Sequence[Sequence[int]] | None = None,
               text: Mapping[str, str] | None = None) -> bytes:
    """The PNG :class:`PngRowWriter` makes of ``pixels`` (``uint8[H, W]``, ``[H, W, 3]`` for RGB),
    in memory."""
    buf = BytesIO()
    with PngRowWriter(buf, pixels.shape[1], pixels.shape[0], mode, palette, text=text) as png:
        png.write(pixels)
    return buf.getvalue()


def png_text(path: PathLike, keyword: str) -> str | None:
    """The text of the first tEXt chunk named ``keyword`` before a PNG's pixels (as
    :class:`PngRowWriter` writes them), read from the chunk headers without decoding or checking
    anything else; None where the file is not a PNG, cannot be read or has no such chunk."""
    want = keyword.encode("latin-1") + b"\0"
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while len(head := f.read(8)) == 8:
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return None
                if kind == b"tEXt" and length <= 1 << 20:
                    data = f.read(length)
                    if data.startswith(want):
                        return data[len(want):].decode("latin-1")
                    f.seek(4, os.SEEK_CUR)
                else:
                    f.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return None
    return None
