"""``folder``: your own data as ``images/`` + ``masks/`` with matching file stems.

Layout::

    root/
      images/   a.jpg  b.png ...          the formats of pixelwise.data.io.IMAGE_SUFFIXES (as predict DIR)
      masks/    a.png  b.png ...          index masks (P or L: the value is the class id, 255 = ignore)
      classes.json                        optional: {"names": [...], "palette": [[r, g, b], ...]}
      splits/   train.txt val.txt ...     optional: one image stem per line

Masks may also be RGB colour masks when ``classes.json`` gives the palette: each colour is its
class, ``"ignore_color"`` (default white) is ignored, any other colour is a problem for ``check()``.
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
the stem so it stays stable as files are added, and ``train`` is the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from pixelwise.data.base import IGNORE_INDEX, Problem
from pixelwise.data.files import FilePairDataset, identity_lut, read_split_list
from pixelwise.data.io import IMAGE_SUFFIXES, OTHER_IMAGE_SUFFIXES, format_names, read_mask
from pixelwise.data.palette import default_palette
from pixelwise.errors import UserError

IMAGE_EXTS = tuple(sorted(IMAGE_SUFFIXES))  # the one list of pixelwise.data.io, as predict DIR reads a folder
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")  # lossless formats only
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".avif")
IGNORE_COLOUR = (255, 255, 255)  # the colour of ignored pixels in RGB masks, unless classes.json says another
UNKNOWN_COLOUR = 254  # raw value given to colours not in the palette; invalid in the label table
VAL_FRACTION = 0.1


def _rgb(colour) -> tuple[int, int, int]:
    """[r, g, b] from classes.json -> a colour tuple (ValueError/TypeError when it is not three numbers)."""
    r, g, b = (int(v) for v in colour)
    return r, g, b


def inferred_class_count(labels: set[int]) -> int:
    """The class count of masks holding ``labels`` (255 excluded), without classes.json: one more
    than the largest label L such that at least half of 0..L occur (at least 2 classes)."""
    count = 0
    for i, value in enumerate(sorted(labels)):  # i + 1 labels are <= value
        if 2 * (i + 1) >= value + 1:
            count = value + 1
    return max(count, 2)


def val_stems(stems: list[str], fraction: float = VAL_FRACTION) -> set[str]:
    """The deterministic held-out set: the ``ceil(fraction * n)`` stems with the smallest SHA-1."""
    if len(stems) < 2:
        return set()
    n = max(1, math.ceil(fraction * len(stems)))
    ranked = sorted(stems, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    return set(ranked[:n])


class FolderDataset(FilePairDataset):
    """images/ + masks/ folders with matching stems."""

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False, num_classes: int | None = None):
        super().__init__(root, split, transform, mean, std)
        if download:
            raise UserError("folder datasets are your own files; there is nothing to download")
        images_dir, masks_dir = self.root / "images", self.root / "masks"
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
            elif suffix in OTHER_IMAGE_SUFFIXES and not p.name.startswith("."):
                self.unused_images.append(p)
        unused_stems = {p.stem for p in self.unused_images}
        self.orphan_masks = [str(masks[s]) for s in sorted(set(masks) - set(images) - unused_stems)]
        stems = self._split_stems(sorted(images), split)
        self.items = [(str(images[s]), str(masks.get(s, masks_dir / f"{s}.png"))) for s in stems]
        self.colour_palette: list[tuple[int, int, int]] | None = None
        self.ignore_colour = IGNORE_COLOUR
        self.far_labels: list[int] = []  # labels found far above the others (reported by check())
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
            try:
                info = json.loads(spec.read_text())
                if not isinstance(info["names"], list):  # a string would give a class per character
                    raise TypeError(f"names must be a list, got {info['names']!r}")
                names = [str(n) for n in info["names"]]
                palette = [_rgb(c) for c in info.get("palette", [])] or None
                if "ignore_color" in info:
                    self.ignore_colour = _rgb(info["ignore_color"])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{spec}: expected {{\"names\": [...], \"palette\": [[r, g, b], ...]}} "
                                f"({type(e).__name__}: {e})") from None
            if palette is not None and len(palette) != len(names):
                raise UserError(f"{spec}: {len(names)} names but {len(palette)} palette colours")
            if num_classes is not None and num_classes != len(names):
                raise UserError(f"{spec}: lists {len(names)} classes but num_classes={num_classes}")
            self.class_names = names
            self.palette = palette or default_palette(len(names))
            self.colour_palette = palette
        else:
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

    def read_raw_mask(self, ref: str) -> np.ndarray:
        if self.colour_palette is None:
            return read_mask(ref)
        # RGB masks: palette colour -> class, ignore colour -> 255, others -> UNKNOWN_COLOUR.
        # Index (P/L) masks are read as they are.
        full = list(self.colour_palette) + [None] * (IGNORE_INDEX - len(self.colour_palette))
        return read_mask(ref, palette=full + [self.ignore_colour], unknown=UNKNOWN_COLOUR)

    def check(self, labels: bool = True, progress: bool | None = False):
        problems = super().check(labels=labels, progress=progress)
        if self.far_labels:  # say why those labels are outside the classes, and what to do
            top = self.far_labels[-1]
            note = (f"; there is no classes.json or num_classes, and label {self.far_labels[0]} is far above the "
                    f"others, so the classes were taken as 0..{self.num_classes - 1}: store ignored pixels as 255, "
                    f"or describe the classes in {self.root / 'classes.json'} (or pass num_classes={top + 1})")
            problems = [Problem(p.path, p.message + note) if p.message.startswith("label values") else p
                        for p in problems]
        if self.colour_palette is not None:  # colour masks: the "label" 254 stands for unknown colours
            spec = self.root / "classes.json"
            problems = [Problem(p.path, f"colours that are not in the palette of {spec} (nor its ignore_color "
                                        f"{list(self.ignore_colour)}); add them to the palette or recolour those "
                                        "pixels")
                        if p.message.startswith(f"label values {UNKNOWN_COLOUR} outside") else p for p in problems]
        problems += [Problem(str(p), _unused_reason(p.name)) for p in self.unused_images]
        if self.split == "all":
            problems += [Problem(m, "mask without an image in images/") for m in self.orphan_masks]
        return problems

    def missing_mask_note(self, image_ref: str) -> str:
        found = self.unused_masks.get(Path(image_ref).stem)
        if not found:
            return ""
        names = ", ".join(str(p) for p in found)
        if any(p.suffix.lower() in LOSSY_SUFFIXES for p in found):
            why = "lossy compression (JPEG, WebP, AVIF) changes labels at edges"
        else:
            why = f"masks are read from {format_names(set(MASK_EXTS))} files only"
        return f" ({names} is there, but {why}; save masks as PNG)"


def _unused_reason(name: str) -> str:
    """The problem of an image file in images/ whose format folder datasets do not read."""
    return (f"{Path(name).suffix} images are not read by folder datasets (they read {format_names()}); convert it "
            "to PNG or move it out of images/")
