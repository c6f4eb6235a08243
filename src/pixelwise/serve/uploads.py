"""Request bodies and uploaded images, read in memory and checked before any large allocation.

- :func:`read_multipart`: a ``multipart/form-data`` body -> its parts, in memory (nothing spills to a
  temporary file, unlike the usual form parsers past 1 MB), refusing bodies over the upload limit
  while they stream in (413).
- :func:`decode_image`: bytes -> uint8[H, W, 3] RGB exactly as :func:`pixelwise.data.io.read_image`
  reads a file (first frame, EXIF orientation applied, any mode), after checking the format (415)
  and the pixel count in the header (413: a small file can declare a huge image).
- :func:`decode_mask`: a ground-truth mask -> uint8[H, W] class ids, as
  :func:`pixelwise.data.io.read_mask` reads one.

Each problem is an :class:`UploadError` carrying the HTTP status and a sentence for the user.
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import parse_options_header

from pixelwise.data import StoredLabels
from pixelwise.data.folder import IGNORE_COLOUR
from pixelwise.data.io import (
    UPLOAD_FORMATS,
    colors_to_index,
    colour_codes,
    damage,
    first_used_suspect,
    format_names,
    lossy_mask_error,
    palette_known,
    palette_suspects,
    pil_to_rgb,
    quiet_pil,
    stored_bits,
    stored_gray,
    tiff_layout,
)
from pixelwise.data.isbi import label_gray
from pixelwise.errors import UserError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# PIL's own decoders accept dozens of formats; the server opens only those of pixelwise.data.io.UPLOAD_FORMATS
# (the folder formats, MPO, ICO); others: 415 naming these.
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "BMP": "image/bmp", "DIB": "image/bmp",
         "GIF": "image/gif", "TIFF": "image/tiff", "WEBP": "image/webp", "PPM": "image/x-portable-anymap",
         "TGA": "image/x-tga", "PCX": "image/x-pcx", "AVIF": "image/avif", "ICO": "image/x-icon"}
FORMATS = {name: _MIME.get(name, "application/octet-stream") for name in UPLOAD_FORMATS}
ACCEPTED = format_names(UPLOAD_FORMATS)  # as the messages name them (an MPO is a JPEG, a DIB a BMP)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)  # as data.io
_ORIENTATION_TAG = 0x0112  # EXIF orientation, applied as data.io.read_image applies it
MAX_PARTS = 16
MAX_FIELD_BYTES = 4096  # a text field (tile, tta, ...)
FILE_FIELDS = ("image", "ground_truth")  # the fields that carry files
# how the files of the formats the server opens begin: bytes that begin so but cannot be decoded are a
# damaged image (400); any other bytes are not an image the server opens at all (415), whatever
# content type the client declared (curl declares image/png for any file named .png)
MAX_BOUNDARY = 256  # newer python-multipart's own limit (0.0.34 has it, the floor 0.0.18 not): held for both
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))
_PNM = re.compile(rb"P[1-6]\s")
_PCX = re.compile(rb"\x0a[\x00-\x05][\x00\x01]")
_EXTENDED_FILENAME = re.compile(rb"filename\*\s*=\s*([^;]+)", re.IGNORECASE)  # which parse_options_header drops


class UploadError(Exception):
    """A request the server refuses: ``status`` (HTTP) and a one-sentence ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Part:
    """One multipart part: ``name``, ``filename`` (None for a plain field), its declared
    ``content_type`` and its bytes."""

    name: str
    filename: str | None = None
    content_type: str = ""
    data: bytearray = field(default_factory=bytearray)

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace").strip()


def text_value(name: str) -> UploadError:
    """The 422 for a file field sent as a text value (``curl -F "image=<photo.jpg"`` or ``-F image=x``)."""
    return UploadError(422, f"send the {name.replace('_', ' ')} as a file in the field {name!r} "
                            f"(e.g. curl -F {name}=@photo.png), not as a text value")


def too_large(limit: int) -> UploadError:
    return UploadError(413, f"the upload is larger than the server's limit of {limit / 2**20:.4g} MB "
                            "(pixelwise serve --max-upload-mb raises it)")


class _FormReader:
    """python-multipart callbacks that collect the parts in memory."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._name = self._value = b""
        self._headers: list[tuple[bytes, bytes]] = []

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data}

    def on_part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise UploadError(400, f"too many form fields (at most {MAX_PARTS})")
        self.parts.append(Part(name=""))
        self._headers = []

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers.append((self._name.lower(), self._value))
        self._name = self._value = b""

    def on_headers_finished(self) -> None:
        part = self.parts[-1]
        for key, value in self._headers:
            if key == b"content-disposition":
                _, options = parse_options_header(value)
                part.name = options.get(b"name", b"").decode("utf-8", errors="replace")
                if b"filename" in options:
                    part.filename = options[b"filename"].decode("utf-8", errors="replace")
                elif extended := _EXTENDED_FILENAME.search(value):  # RFC 5987 only: charset'lang'%-encoded
                    part.filename = unquote(extended[1].decode("latin-1").strip().strip('"').split("'", 2)[-1])
            elif key == b"content-type":
                part.content_type = value.decode("latin-1").strip().lower()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        if not part.name:  # no Content-Disposition name: no field it could be
            raise UploadError(400, "a part of the form has no name (its Content-Disposition header, e.g. "
                                   "'form-data; name=\"image\"; filename=\"a.png\"', is missing); send the image "
                                   "as the field image")
        part.data += data[start:end]
        if part.filename is None and len(part.data) > MAX_FIELD_BYTES:
            if part.name in FILE_FIELDS:  # e.g. curl -F "image=<photo.jpg" sends the bytes as a text value
                raise text_value(part.name)
            raise UploadError(400, f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")


async def read_multipart(content_type: str, content_length: str | None, chunks: AsyncIterator[bytes],
                         limit: int) -> dict[str, Part]:
    """The parts of a ``multipart/form-data`` body by field name.

    Refuses: another content type (415), a declared or actual body over ``limit`` bytes (413,
    before reading it when Content-Length says so), a malformed body (400), a field given more
    than once (422: which of two ``tile`` values was meant?), a file field (:data:`FILE_FIELDS`)
    sent as a non-empty text value instead of a file (422)."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise UploadError(415, f"send the image as multipart/form-data (field 'image'), not "
                               f"{(kind or b'an empty content type').decode('latin-1')}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "the multipart/form-data content type has no boundary")
    if len(boundary) > MAX_BOUNDARY:  # newer python-multipart refuses these in its constructor, older ones not
        raise UploadError(400, f"malformed multipart/form-data content type: its boundary has {len(boundary)} "
                               f"bytes, more than {MAX_BOUNDARY} (RFC 2046 allows 70)")
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadError(400, f"bad Content-Length {content_length!r}") from None
        if declared > limit:
            raise too_large(limit)
    reader = _FormReader()
    try:
        parser = MultipartParser(boundary, reader.callbacks())
    except FormParserError as e:  # any other refusal of the constructor: a 400, not a 500
        raise UploadError(400, f"malformed multipart/form-data content type ({e})") from None
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        raise UploadError(400, f"malformed multipart/form-data body ({e})") from None
    found: dict[str, Part] = {}
    for part in reader.parts:
        if part.name in found:
            times = sum(p.name == part.name for p in reader.parts)
            raise UploadError(422, f"form field {part.name!r} is given {times} times; send each field once")
        found[part.name] = part
    for name in FILE_FIELDS:  # an empty text value is no file (the page's ground truth when none is chosen)
        if name in found and found[name].filename is None and found[name].data:
            raise text_value(name)
    return found


def image_kind(head: bytes) -> str | None:
    """The format whose files begin like ``head`` (of those the server opens), or None."""
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:12] in (b"ftypavif", b"ftypavis"):  # an ISO media file of AVIF's brand
        return "AVIF"
    if _PNM.match(head):
        return "PPM"
    if _PCX.match(head):
        return "PCX"
    if head[:4] == b"\x00\x00\x01\x00":  # an icon directory (reserved 0, type 1)
        return "ICO"
    return None


def open_image(data: bytes | bytearray, max_pixels: int, declared_type: str = "", what: str = "image") -> Image.Image:
    """Identify, check the size in the header, then decode the first frame with EXIF orientation
    applied (as :func:`pixelwise.data.io.read_image` opens a file). PIL's warnings (a damaged EXIF
    block, its DecompressionBombWarning below the server's own limit) are not shown: the upload
    either decodes or becomes one UploadError, not lines of a Python warning in the server's log."""
    with quiet_pil():
        return _open_image(data, max_pixels, declared_type, what)


def _open_image(data: bytes | bytearray, max_pixels: int, declared_type: str, what: str) -> Image.Image:
    if not data:
        raise UploadError(400, f"the {what} is empty")
    try:
        img: Image.Image = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError:
        layout = tiff_layout(bytes(data[:1 << 16]))
        if layout:  # a valid TIFF of a kind PIL cannot decode (OpenCV's or tifffile's float RGB), not a damaged one
            raise UploadError(415, f"the {what} is an unsupported TIFF: {layout} cannot be read (1, 8, 16 or 32-bit "
                                   "integer channels and a single float channel can); convert it to 8 or 16-bit "
                                   "RGB or gray") from None
        kind = image_kind(bytes(data[:16]))
        if kind:  # it begins as an image does: a damaged one, not another kind of file
            article = "an" if kind[0] in "AEIOU" else "a"  # an AVIF
            raise UploadError(400, f"the {what} cannot be decoded: it begins as {article} {kind} file, but the rest is "
                                   "damaged; re-export it") from None
        declared = f" (declared {declared_type}: a file of another kind renamed?)" if declared_type else ""
        raise UploadError(415, f"the {what} is not an image in a supported format{declared}; send one of "
                               f"{ACCEPTED}") from None
    except Image.DecompressionBombError as e:  # PIL's own guard, at twice its limit (at least --max-pixels)
        count = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(count[1]):,} pixels, more" if count else "more pixels"
        raise UploadError(413, f"the {what} has {size} than the server's limit of {max_pixels:,} "
                               "(pixelwise serve --max-pixels raises it)") from None
    except _PIL_ERRORS as e:
        raise UploadError(400, f"the {what} cannot be decoded ({e}); re-export it") from None
    if img.format not in FORMATS:
        raise UploadError(415, f"{img.format} images are not accepted; send one of {ACCEPTED}")
    width, height = img.size
    if width * height > max_pixels:
        raise UploadError(413, f"the {what} is {width}x{height} = {width * height:,} pixels, more than the "
                               f"server's limit of {max_pixels:,} (pixelwise serve --max-pixels raises it)")
    problem = damage(data)  # what predict and the readers refuse: a PNG without its end, a TIFF cut in a directory
    if problem:
        raise UploadError(400, f"the {what} is {problem}; re-export it")
    try:
        img.load()
        if img.getexif().get(_ORIENTATION_TAG, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except _PIL_ERRORS as e:
        raise UploadError(400, f"the {what} is truncated or damaged ({e}); re-export it") from None
    return img


def decode_image(data: bytes | bytearray, max_pixels: int, declared_type: str = "") -> np.ndarray:
    """Upload bytes -> uint8[H, W, 3] RGB, the pixels :func:`pixelwise.data.io.read_image` gives."""
    img = open_image(data, max_pixels, declared_type)
    try:
        with quiet_pil():  # a damaged EXIF block read again for the orientation
            return pil_to_rgb(img)
    except _PIL_ERRORS as e:
        raise UploadError(415, f"cannot convert an image of mode {img.mode} to RGB ({e})") from None


def colour_mask(rgb: np.ndarray, palette: Sequence[Sequence[int]],
                ignore_colour: Sequence[int] = IGNORE_COLOUR) -> np.ndarray:
    """uint8[H, W, 3] colours -> class ids: the palette's colours their classes, ``ignore_colour``
    (white unless the model's folder dataset set another) 255; any other colour is a 422 naming it,
    as the folder reader's check names it (mapping it to "ignore" would leave those pixels out of
    the scores without a word)."""
    ignore = tuple(int(v) for v in ignore_colour)
    mask = colors_to_index(rgb, palette)  # other colours: 255 (a class of the ignore colour stays that class)
    unknown = (mask == 255) & ~(rgb == np.array(ignore, np.uint8)).all(axis=-1)
    if unknown.any():
        colours = np.unique(rgb[unknown].reshape(-1, 3), axis=0)
        shown = ", ".join(str(c) for c in colours[:3].tolist()) + (" ..." if len(colours) > 3 else "")
        raise UploadError(422, f"the ground-truth mask has {int(unknown.sum()):,} pixels of {len(colours)} colour(s) "
                               f"not in the model's palette (GET /api/info), e.g. {shown}; {list(ignore)} "
                               "is 'ignore'. Recolour them, or send a mask of class ids")
    return mask


def colours_known(rgb: np.ndarray, colours: Sequence[Sequence[int]]) -> bool:
    """Whether every pixel of uint8[H, W, 3] ``rgb`` has one of ``colours``."""
    return bool(np.isin(np.unique(colour_codes(rgb)), colour_codes(np.array(colours))).all())


def refuse_reordered_palette(flat: Sequence[int], indices: np.ndarray, palette: Sequence[Sequence[int]],
                             ignore_colour: Sequence[int]) -> None:
    """422 for a palette mask whose own palette gives an index it uses the colour of another class
    of the model (an editor's indexed export in its own order): read by index, its classes would be
    swapped without a word. The folder reader's check refuses the same file."""
    found = first_used_suspect(palette_suspects(flat, palette_known(palette, ignore_colour)), indices)
    if found is not None:
        index, colour, cls = found
        other = "ignore (255)" if cls == 255 else f"class {cls}"
        raise UploadError(422, f"the ground-truth mask is a palette PNG whose index {index} has the colour "
                               f"{list(colour)}, the colour of {other} in the model's palette; palette masks are "
                               f"read by index, so these pixels would be class {index}: save it with the model's "
                               "palette order (GET /api/info), as RGB colours, or as class ids")


def decode_mask(data: bytes | bytearray, max_pixels: int, palette: Sequence[Sequence[int]],
                num_classes: int, shape: tuple[int, int], declared_type: str = "",
                stored: StoredLabels | None = None, ignore_colour: Sequence[int] = IGNORE_COLOUR,
                name: str | None = None) -> np.ndarray:
    """A ground-truth mask -> uint8[H, W] class ids (255 = ignore), read like
    :func:`pixelwise.data.io.read_mask`: index ("P", "L") PNGs as stored; colour masks through
    the model's ``palette`` (white: 255; any other colour: 422, :func:`colour_mask`), gray RGB as
    its values. With ``stored`` (a dataset's own label file, :data:`pixelwise.data.STORED_LABELS`)
    the stored values (or gray levels) are mapped to classes as that dataset's reader maps them
    (``name``, the upload's file name, tells a file of the layout that holds class ids already).
    It must have the image's ``shape`` and hold only ``0..num_classes-1`` and 255 (422 otherwise)."""
    if stored is not None and name:
        for ending, instead in stored.not_these:
            if name.endswith(ending):
                raise UploadError(422, f"the ground truth {name} is not a label file of this kind ({stored.describe}):"
                                       f" it {instead}")
    img = open_image(data, max_pixels, declared_type, what="ground-truth mask")
    lossy = lossy_mask_error(memoryview(data), img.format, img.info.get("compression"))
    if lossy:  # e.g. "JPEG-compressed mask: lossy compression changes labels at edges; save masks as PNG"
        raise UploadError(422, f"the ground-truth mask is a {lossy}")
    if (img.height, img.width) != tuple(shape):  # before its values: a photo of another size is that first
        raise UploadError(422, f"the ground-truth mask is {img.width}x{img.height} but the image is "
                               f"{shape[1]}x{shape[0]}")
    mode = img.mode
    if stored is not None:
        mask = _stored_labels(img, stored, data)
    elif mode in ("P", "L", "LA", "PA"):
        indices = np.asarray(img, dtype=np.uint8)
        indices = stored_gray(indices, data) if mode == "L" else indices
        if mode in ("P", "PA"):  # read by index, as the data readers do: not if its colours say other classes
            refuse_reordered_palette(img.getpalette() or [], indices, palette, ignore_colour)
        mask = indices if indices.ndim == 2 else np.ascontiguousarray(indices[:, :, 0])
    elif mode == "1":
        mask = stored_bits(np.asarray(img).astype(np.uint8), data)
    elif mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(img)[:, :, :3]
        gray = np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
        # the palette first, as the folder reader reads colour masks: a gray mask is read as its values
        # only when some gray in it is no colour of the palette (a white class is that class, not 'ignore')
        by_value = gray and not colours_known(rgb, [*palette, ignore_colour])
        mask = rgb[:, :, 0].copy() if by_value else colour_mask(rgb, palette, ignore_colour)
    else:
        arr = np.asarray(img)
        if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
            arr = stored_gray(arr, data)  # a PGM of maxval 300, as read_mask reads it
        fits = arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer)
        fits = fits and (not arr.size or 0 <= arr.min() <= arr.max() <= 255)
        if not fits:
            raise UploadError(422, f"a {mode} ground-truth mask cannot hold class ids; save it as an 8-bit index PNG")
        mask = arr.astype(np.uint8)
    bad = np.unique(mask[(mask >= num_classes) & (mask != 255)])
    if bad.size:
        raise UploadError(422, f"the ground-truth mask has values {bad[:8].tolist()} that are not class ids "
                               f"0..{num_classes - 1} (or 255 = ignore); a label file of the training dataset "
                               "is read with truth_format=dataset")
    return np.require(mask, np.uint8, ["C", "W"])  # writable: torch.from_numpy takes it as it is


def _stored_labels(img: Image.Image, stored: StoredLabels, data: bytes | bytearray | memoryview) -> np.ndarray:
    """A dataset's own label file -> class ids (255 = ignore) through ``stored``'s table; stored
    values the dataset does not have are 422."""
    if stored.gray:  # by gray level, as the reader reads it: a 1-bit or palette label by its pixels' colour
        try:
            values = label_gray(img, "the ground truth")
        except UserError as e:
            raise UploadError(422, str(e)) from None
    elif img.mode in ("P", "L"):
        values = np.asarray(img, dtype=np.uint8)
        values = stored_gray(values, data) if img.mode == "L" else values  # as read_mask reads it
    else:
        raise UploadError(422, f"a {img.mode} ground truth is not a label file of this kind ({stored.describe}): "
                               "send the 8-bit label PNG")
    if stored.gray and values.size and int(values.max()) == 1:  # as the reader's check says of such a label
        raise UploadError(422, "the ground truth's values are only 0 and 1, so every pixel would be class 0 by its "
                               f"gray level ({stored.describe}): store the other class as 255, or send it with "
                               "truth_format=classes")
    classes = stored.lut[values]
    bad = np.unique(values[classes < 0])
    if bad.size:
        raise UploadError(422, f"the ground truth has values {bad[:8].tolist()} that are not labels of "
                               f"{stored.describe}")
    return classes.astype(np.uint8)
