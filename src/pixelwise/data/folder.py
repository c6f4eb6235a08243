"""``folder``: your own data as ``images/`` + ``masks/`` with matching file stems.

Layout::

    root/
      images/   a.jpg  b.png ...          the formats of pixelwise.data.io.IMAGE_SUFFIXES (as predict DIR)
      masks/    a.png  b.png ...          index masks (P or L: the value is the class id, 255 = ignore)
      classes.json                        optional: {"names": [...], "palette": [[r, g, b], ...]}
      splits/   train.txt val.txt ...     optional: one image stem per line

Masks may also be RGB colour masks when ``classes.json`` gives the palette: each colour is its
class, ``"ignore_color"`` (default white) is ignored, any other colour is a problem for ``check()``.
``classes.json`` holds these three keys only; an unknown key (with a did-you-mean), a colour that is
not three whole numbers 0..255, two classes of one colour and a class of the ignore colour are
refused in one line. With a palette, a palette ("P") mask is still read by index, and one whose own
palette gives an index it uses another class's colour (colours saved in another order) is a
problem for ``check()``.
Without ``classes.json`` the class count is ``num_classes=N`` or, if not given, inferred from the
labels found in the masks (names ``class_0``...): one more than the largest label ``L`` such that
at least half of ``0..L`` occur. Labels far above the others (0, 1 and 200) would otherwise make
199 classes that never occur; they are reported by ``check()`` instead, as values outside the
classes, with the fix (``classes.json``, ``num_classes``, or 255 for "ignore").

An image file of another format in images/ (``.ico``, ``.heic``, ...) is a problem for ``check()``,
not passed over. Masks are read from lossless files (``MASK_EXTS``: PNG, BMP, TIFF, GIF, PNM); a
mask that is JPEG-coded, whatever its name, is a problem (lossy compression changes labels at
edges), and a ``masks/a.jpg`` beside ``images/a.png`` is named in the "missing mask" problem.

Splits: with ``splits/`` the lists decide. Without it every pair is in ``all``; ``val`` is a
deterministic 10% of ``all`` (at least one image when there are two or more), chosen by a hash of
the stem (the smallest hashes; adding files can move a val image into train), and ``train`` is
the rest.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
from pathlib import Path

import numpy as np

from pixelwise.checkpoint import distinct_names_problem
from pixelwise.data.base import IGNORE_INDEX, Problem
from pixelwise.data.files import FilePairDataset, identity_lut, read_split_list
from pixelwise.data.io import (
    IMAGE_SUFFIXES,
    OTHER_IMAGE_SUFFIXES,
    format_names,
    palette_conflict,
    palette_known,
    probe,
    read_mask,
    webp_lossy,
)
from pixelwise.data.palette import default_palette
from pixelwise.errors import UserError

IMAGE_EXTS = tuple(sorted(IMAGE_SUFFIXES))  # the one list of pixelwise.data.io, as predict DIR reads a folder
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")  # lossless formats only
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".avif")
IGNORE_COLOUR = (255, 255, 255)  # the colour of ignored pixels in RGB masks, unless classes.json says another
UNKNOWN_COLOUR = 254  # raw value given to colours not in the palette; invalid in the label table
VAL_FRACTION = 0.1


CLASSES_KEYS = ("names", "palette", "ignore_color")  # what classes.json may hold
# keys met in other tools' class files (or other spellings), and the key pixelwise reads instead
KEY_ALIASES = {"colors": "palette", "colours": "palette", "color": "palette", "colour": "palette",
               "colour_palette": "palette", "color_palette": "palette", "colormap": "palette",
               "colourmap": "palette", "cmap": "palette", "ignore_colour": "ignore_color",
               "classes": "names", "class_names": "names", "labels": "names"}


def _key_hint(key: str) -> str:
    """' (did you mean X?)' for an unknown classes.json key (an alias or a close spelling), or ''."""
    if key == "ignore_index":
        return (" (ignored pixels are 255 in index masks, and in colour masks the colour ignore_color, "
                "default white)")
    alias = KEY_ALIASES.get(key.lower())
    close = [alias] if alias else difflib.get_close_matches(key.lower(), CLASSES_KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _ColourError(ValueError):
    """A classes.json colour that is not three whole numbers 0..255 (the message says which and why)."""


def _rgb(colour: object, where: str) -> tuple[int, int, int]:
    """[r, g, b] from classes.json -> a colour tuple; :class:`_ColourError` naming ``where`` when it is
    not three whole numbers 0..255 (a float such as 0.5 of a 0..1 colour scale is refused, not
    truncated; true and false are not numbers, as for every option of pixelwise)."""
    def whole(v: object) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= int(v) <= 255

    if isinstance(colour, list | tuple) and len(colour) == 3 and all(whole(v) for v in colour):
        r, g, b = (int(v) for v in colour)
        return r, g, b
    values = list(colour) if isinstance(colour, list | tuple) else []
    if any(isinstance(v, float) for v in values):
        why = " (write a colour of a 0..1 scale, as matplotlib's, times 255: 0.5 as 128)"
    elif any(isinstance(v, bool) for v in values):
        why = " (true and false are not numbers)"
    elif any(isinstance(v, int) and not 0 <= v <= 255 for v in values):
        why = f" ({next(v for v in values if isinstance(v, int) and not 0 <= v <= 255)} is outside 0..255)"
    else:
        why = ""
    raise _ColourError(f"{where} is {json.dumps(colour)}: colours are [r, g, b] with whole numbers 0..255{why}")


def palette_order_problem(ref: str, known: dict[tuple[int, int, int], int], names: list[str],
                          source: str) -> Problem | None:
    """The problem of a palette mask (read by index) whose own palette gives an index it uses the
    colour that ``known`` ({colour: class id, or 255 for ignore}, from ``source``) gives another
    class: its pixels look right but are read as the wrong class. None otherwise (also for a mask
    whose palette colours are not in ``known``, such as a gray palette)."""
    found = palette_conflict(ref, known)
    if found is None:
        return None
    index, colour, cls = found

    def what(c: int) -> str:
        return "ignore (255)" if c == IGNORE_INDEX else f"class {c} {names[c]!r}" if c < len(names) else \
            f"label {c} (not a class)"

    return Problem(ref, f"palette mask whose index {index} has the colour {list(colour)} in its own palette, the "
                        f"colour of {what(cls)} in {source}; palette masks are read by index, so these pixels would "
                        f"be read as {what(index)}: re-save the mask with the dataset's palette order, or as class "
                        "indices (pixel value = class id)")


def inferred_class_count(labels: set[int]) -> int:
    """The class count of masks holding ``labels`` (255 excluded), without classes.json: one more
    than the largest label L such that at least half of 0..L occur (at least 2 classes)."""
    count = 0
    for i, value in enumerate(sorted(labels)):  # i + 1 labels are <= value
        if 2 * (i + 1) >= value + 1:
            count = value + 1
    return max(count, 2)


def _name_bytes(name: str) -> bytes:
    """A file name's bytes: UTF-8, the bytes Python escaped in a name that is not UTF-8 (Linux), a
    lone UTF-16 surrogate (a Windows name) as its three bytes."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")


def val_stems(stems: list[str], fraction: float = VAL_FRACTION) -> set[str]:
    """The deterministic held-out set: the ``ceil(fraction * n)`` stems (at least one) with the
    smallest SHA-1 (of the name's bytes, :func:`_name_bytes`: a name that is not UTF-8 too); none
    of fewer than two stems, which all train."""
    if len(stems) < 2:
        return set()
    n = max(1, math.ceil(fraction * len(stems)))
    ranked = sorted(stems, key=lambda s: hashlib.sha1(_name_bytes(s)).hexdigest())
    return set(ranked[:n])


class FolderDataset(FilePairDataset):
    """images/ + masks/ folders with matching stems."""

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False, num_classes: int | None = None):
        super().__init__(root, split, transform, mean, std)
        if download:
            raise UserError("folder datasets are your own files; there is nothing to download")
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        if not self.root.exists():
            raise UserError(f"{self.root}: no such folder; give the folder that holds images/ and masks/ (--data)")
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise UserError(f"{self.root}: expected images/ and masks/ folders with matching file names")
        masks: dict[str, Path] = {}
        self.unused_masks: dict[str, list[Path]] = {}  # stem -> files in masks/ not read as masks (e.g. a.jpg)
        for p in sorted(masks_dir.iterdir()):
            if p.suffix.lower() in MASK_EXTS and (p.stem not in masks or p.suffix.lower() == ".png"):
                masks[p.stem] = p
            elif p.suffix.lower() not in MASK_EXTS and not p.name.startswith("."):
                self.unused_masks.setdefault(p.stem, []).append(p)
        images: dict[str, Path] = {}
        self.unused_images: list[Path] = []  # image files of a format not in IMAGE_EXTS: problems, not ignored
        for p in sorted(images_dir.iterdir()):
            suffix = p.suffix.lower()
            if suffix in IMAGE_EXTS and (p.is_file() or p.is_symlink()):  # a broken link is a problem of check()
                if p.stem in images:  # one stem, one mask: which image it labels cannot be told
                    raise UserError(f"{images_dir}: {images[p.stem].name} and {p.name} have the same stem, and a "
                                    "mask pairs with its image by stem; rename or remove one")
                images[p.stem] = p
            elif (suffix in OTHER_IMAGE_SUFFIXES or suffix in IMAGE_EXTS) and not p.name.startswith("."):
                self.unused_images.append(p)  # another format, or a folder of an image's name (as camvid names it)
        unused_stems = {p.stem for p in self.unused_images}
        self.orphan_masks = [str(masks[s]) for s in sorted(set(masks) - set(images) - unused_stems)]
        stems = self._split_stems(sorted(images), split)
        self.items = [(str(images[s]), str(masks.get(s, masks_dir / f"{s}.png"))) for s in stems]
        self.colour_palette: list[tuple[int, int, int]] | None = None
        self.ignore_colour = IGNORE_COLOUR
        self.far_labels: list[int] = []  # labels found far above the others (reported by check())
        self.classes_inferred = False
        self._read_classes(num_classes, [m for m in masks.values()])
        self._finish(skip_invalid)

    def _split_stems(self, stems: list[str], split: str) -> list[str]:
        lists = self.root / "splits"
        if lists.is_dir():
            path = lists / f"{split}.txt"
            text = read_split_list(path)
            known = set(stems)
            # a line is a stem (scan.001 is one), or a file name whose image extension is dropped
            wanted = [w if w in known or Path(w).suffix.lower() not in IMAGE_EXTS else Path(w).stem
                      for w in (line.strip() for line in text.splitlines()) if w]
            if not wanted:  # else "no images found ... see the layout", of a folder whose layout is right
                raise UserError(f"{path}: lists no images; write the stems or file names of the {split} images "
                                "into it, one per line")
            missing = [w for w in wanted if w not in known]
            if missing:
                unread = [p.name for p in self.unused_images if p.stem == missing[0]]
                note = f"; {unread[0]} is there, but {_unused_reason(unread[0])}" if unread else ""
                raise UserError(f"{path}: {len(missing)} listed images are not in images/ "
                                f"(first: {missing[0]!r}{note})")
            return wanted
        held = val_stems(stems)
        if split == "all":
            return stems
        if split == "val":
            if len(stems) == 1:  # nothing can be held out of one image
                raise UserError(f"{self.root}: the val split of a folder of one image is empty (val holds out "
                                f"{VAL_FRACTION:.0%} of the images); validate on it with --val-split train, or "
                                "add images")
            return [s for s in stems if s in held]
        if split == "train":
            return [s for s in stems if s not in held]
        raise UserError(f"folder dataset without splits/ has splits all, train, val; not {split!r}")

    def _read_classes(self, num_classes: int | None, masks: list[Path]) -> None:
        spec = self.root / "classes.json"
        if spec.is_file():
            names, palette = self._parse_classes(spec)
            if num_classes is not None and num_classes != len(names):
                raise UserError(f"{spec}: lists {len(names)} classes but num_classes={num_classes}")
            self.class_names = names
            self.palette = palette or default_palette(len(names))
            self.colour_palette = palette
        else:
            self.classes_inferred = num_classes is None  # the count is the labels these masks hold
            if num_classes is None:  # one decode per mask (masks are small); reports unreadable ones later
                seen: set[int] = set()
                for m in masks:
                    try:
                        v = read_mask(m)
                    except UserError:
                        continue
                    seen.update(int(x) for x in np.unique(v) if x != IGNORE_INDEX)
                num_classes = inferred_class_count(seen)
                self.far_labels = sorted(v for v in seen if v >= num_classes)
            if not 1 <= num_classes <= 254:
                raise UserError(f"{self.root}: num_classes {num_classes}; between 1 and 254 are supported")
            self.class_names = [f"class_{i}" for i in range(num_classes)]
            self.palette = default_palette(num_classes)
        if not 1 <= len(self.class_names) <= 254:
            raise UserError(f"{self.root}: {len(self.class_names)} classes; between 1 and 254 are supported")
        self.lut = identity_lut(len(self.class_names))

    def _parse_classes(self, spec: Path) -> tuple[list[str], list[tuple[int, int, int]] | None]:
        """classes.json -> (names, palette or None); sets ``ignore_colour``. Anything it cannot take
        as written is one UserError naming the file and the fix: an unknown key, a colour that is
        not three whole numbers 0..255, a colour two classes share, a class of the ignore colour."""
        shape = '{"names": [...], "palette": [[r, g, b], ...], "ignore_color": [r, g, b]}'
        try:
            info = json.loads(spec.read_text(encoding="utf-8-sig"))  # JSON is UTF-8; editors may add a BOM
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise UserError(f"{spec}: not valid JSON ({e}); expected {shape}") from None
        if not isinstance(info, dict):
            raise UserError(f"{spec}: expected an object {shape}, got {type(info).__name__}")
        unknown = [k for k in info if k not in CLASSES_KEYS]
        if unknown:
            keys = ", ".join(f"{k!r}{_key_hint(str(k))}" for k in unknown)
            raise UserError(f"{spec}: unknown key{'s' if len(unknown) > 1 else ''} {keys}; classes.json holds "
                            f"{', '.join(CLASSES_KEYS)} ({shape}): rename or remove "
                            f"{'them' if len(unknown) > 1 else 'it'}")
        try:
            if "names" not in info:
                raise KeyError("names")
            if not isinstance(info["names"], list):  # a string would give a class per character
                raise TypeError(f"names must be a list, got {info['names']!r}")
            names = [str(n) for n in info["names"]]
            named_twice = distinct_names_problem(names)
            if named_twice:
                raise UserError(f"{spec}: names: {named_twice}")
            raw = info.get("palette", [])
            if not isinstance(raw, list):
                raise TypeError(f"palette must be a list of [r, g, b], got {raw!r}")
            palette = [_rgb(c, f"palette[{i}]") for i, c in enumerate(raw)] or None
            if "ignore_color" in info:
                self.ignore_colour = _rgb(info["ignore_color"], "ignore_color")
        except _ColourError as e:
            raise UserError(f"{spec}: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{spec}: expected {shape} ({type(e).__name__}: {e})") from None
        if palette is None:
            return names, None
        if len(palette) != len(names):
            raise UserError(f"{spec}: {len(names)} names but {len(palette)} palette colours")
        seen: dict[tuple[int, int, int], int] = {}
        for i, colour in enumerate(palette):
            if colour in seen:  # every pixel of that colour would be the later class
                j = seen[colour]
                raise UserError(f"{spec}: classes {j} {names[j]!r} and {i} {names[i]!r} have the same colour "
                                f"{list(colour)}, so a colour mask cannot tell them apart; give each class its "
                                "own colour")
            seen[colour] = i
        if self.ignore_colour in seen:  # its pixels would be ignored, never that class
            i = seen[self.ignore_colour]
            which = ("ignore_color" if "ignore_color" in info else
                     f"the ignore colour (ignore_color, white {list(IGNORE_COLOUR)} unless set)")
            raise UserError(f"{spec}: class {i} {names[i]!r} has the colour {list(self.ignore_colour)}, which is "
                            f"{which}, so its pixels would be ignored; set ignore_color to a colour no class uses")
        return names, palette

    def read_raw_mask(self, ref: str) -> np.ndarray:
        if self.colour_palette is None:
            return read_mask(ref)
        # RGB masks: palette colour -> class, ignore colour -> 255, others -> UNKNOWN_COLOUR.
        # Index (P/L) masks are read as they are.
        full = list(self.colour_palette) + [None] * (IGNORE_INDEX - len(self.colour_palette))
        return read_mask(ref, palette=full + [self.ignore_colour], unknown=UNKNOWN_COLOUR)

    def check_item(self, image_ref: str, mask_ref: str | None, labels: bool = True) -> list[Problem]:
        problems = super().check_item(image_ref, mask_ref, labels)
        if labels and self.colour_palette is not None and mask_ref is not None and \
                not any(p.path == mask_ref for p in problems):  # a palette mask in other colours than these
            known = palette_known(self.colour_palette, self.ignore_colour)
            found = palette_order_problem(mask_ref, known, self.class_names, str(self.root / "classes.json"))
            problems += [found] if found else []
        return problems

    def check(self, labels: bool = True, progress: bool | None = False):
        problems = super().check(labels=labels, progress=progress)
        if self.far_labels:  # say why those labels are outside the classes, and what to do
            top = self.far_labels[-1]
            more = (f", or describe the classes in {self.root / 'classes.json'} (or pass num_classes={top + 1})"
                    if top + 1 <= 254 else f" (label {top} cannot be a class: 0..253 are classes, 255 is ignore)")
            note = (f"; there is no classes.json or num_classes, and label {self.far_labels[0]} is far above the "
                    f"others, so the classes were taken as 0..{self.num_classes - 1}: store ignored pixels as 255"
                    f"{more}")
            problems = [Problem(p.path, p.message + note) if p.message.startswith("label values") else p
                        for p in problems]
        if self.colour_palette is not None:  # colour masks: the "label" 254 stands for unknown colours
            spec = self.root / "classes.json"
            problems = [Problem(p.path, f"colours that are not in the palette of {spec} (nor its ignore_color "
                                        f"{list(self.ignore_colour)}); add them to the palette or recolour those "
                                        "pixels")
                        if p.message.startswith(f"label values {UNKNOWN_COLOUR} outside") and _colour_mask(p.path)
                        else p for p in problems]
        problems += [Problem(str(p), _unused_reason(p.name)) for p in self.unused_images]
        if self.split == "all":
            problems += [Problem(m, "mask without an image in images/") for m in self.orphan_masks]
        return problems

    def missing_mask_note(self, image_ref: str) -> str:
        found = self.unused_masks.get(Path(image_ref).stem)
        if not found:
            return ""
        names = ", ".join(str(p) for p in found)
        if any(_lossy(p) for p in found):
            why = "lossy compression (JPEG, WebP, AVIF) changes labels at edges"
        else:
            why = f"masks are read from {format_names(set(MASK_EXTS))} files only"
        return f" ({names} is there, but {why}; save masks as PNG)"


def _lossy(path: Path) -> bool:
    """Whether a mask file of a format folder datasets do not read is also lossily compressed: a
    JPEG, AVIF or a WebP whose image chunk is lossy (a lossless WebP is refused for its format only)."""
    if path.suffix.lower() == ".webp":
        try:
            return webp_lossy(path.read_bytes())
        except OSError:
            return True
    return path.suffix.lower() in LOSSY_SUFFIXES


def _colour_mask(path: str) -> bool:
    """Whether the mask at ``path`` is an RGB colour mask (read through the palette), not an index
    mask whose stored 254 is a label value of its own."""
    try:
        return probe(path)[1] in ("RGB", "RGBA", "RGBX")
    except UserError:
        return False


def _unused_reason(name: str) -> str:
    """The problem of an entry of images/ that folder datasets do not read: an image of another format,
    or a folder (a pipe, a device) of an image's name."""
    if Path(name).suffix.lower() in IMAGE_EXTS:
        return "not a file (a folder, pipe or device of an image's name); move it out of images/"
    return (f"{Path(name).suffix} images are not read by folder datasets (they read {format_names()}); convert it "
            "to PNG or move it out of images/")
