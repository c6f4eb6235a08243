"""``isbi2012``: the ISBI 2012 EM segmentation challenge (neuronal membranes, 512x512 grayscale).

Two layouts are accepted:

- PNG folders: ``root/train/image/<n>.png`` + ``root/train/label/<n>.png`` (sorted by number);
- the original multi-page TIFF stacks: ``root/train-volume.tif`` + ``root/train-labels.tif``
  (30 slices); items are named ``train-volume.tif#<slice>``.

Classes: 0 = ``membrane`` (black, stored 0) and 1 = ``cell`` (white, stored 255, the cell
interior); labels are read by their gray level (luminance), thresholded at 128, so every value is
valid. A 1-bit label (white stored as 1) and a palette label (indices with black/white colours),
PNG or TIFF alike, are read by the gray level of their pixels, not by the stored bit or index. A
label whose values are only 0 and 1 (cells stored as 1, not 255) would read as all membrane: it is
a problem for ``check()``. Images are gray, returned as RGB with three equal channels.

Only the training volume is labelled, so splits are cut from it deterministically:
``all`` = every slice, ``val`` = the last ``val_count`` slices (default 4), ``train`` = the rest.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from pixelwise.data.base import Problem
from pixelwise.data.files import FilePairDataset, make_lut, problem_from_error, split_ref
from pixelwise.data.io import _open_loaded, frame_count, pil_to_rgb, probe_info, refuse_lossy_mask
from pixelwise.errors import UserError

CLASS_NAMES = ["membrane", "cell"]
PALETTE = [(0, 0, 0), (255, 255, 255)]
LABEL_LUT = make_lut({v: int(v >= 128) for v in range(256)})  # gray levels: white (>= 128) = cell
STORED_LABELS = "ISBI 2012 labels: gray levels, white (>= 128) = cell, black = membrane"
SPLITS = ("train", "val", "all")
# The data is handed out after registration at the challenge site, so there is no download=True.
SITE = "https://imagej.net/events/isbi-2012-segmentation-challenge"


def _natural_key(p: Path) -> list:
    """Natural order of slice names: numbers compare as numbers wherever they are in the name, so
    slice_2 comes before slice_10 (and 2 before 10), and ``val`` holds the last slices of the stack."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", p.stem) if part]


def _read_frame(ref: str) -> Image.Image:
    """``path#k`` -> slice ``k`` of a TIFF stack, decoded (a stack shorter than its partner file, or
    damaged, is a UserError naming the file and the slice)."""
    path, frame = split_ref(ref)
    return _open_loaded(path, frame or 0)


def label_gray(img: Image.Image, ref: str) -> np.ndarray:
    """A decoded label image -> uint8[H, W] gray levels (white = 255 = cell): an 8-bit gray label as
    stored; every other mode by its luminance, so a 1-bit label's white (stored 1) and a palette
    label's white index are 255. Wider integers are clipped to 0..255 (PIL's conversion)."""
    if img.mode != "L":
        try:
            img = img.convert("L")
        except ValueError as e:  # a mode PIL cannot bring to gray
            raise UserError(f"{ref}: cannot read a label of mode {img.mode} as gray levels ({e}); save labels as "
                            "8-bit gray PNGs (cell 255, membrane 0)") from None
    return np.ascontiguousarray(np.asarray(img), dtype=np.uint8)


def _label_of(label_dir: Path, stem: str) -> Path:
    """The label of slice ``stem``: ``<stem>.png``, or a ``.tif``/``.tiff`` of that stem where
    there is no PNG (a label stack saved as single TIFFs, as the image slices may be); the PNG
    name, for the missing-mask problem, where there is none."""
    for suffix in (".png", ".tif", ".tiff"):
        if (label_dir / f"{stem}{suffix}").is_file():
            return label_dir / f"{stem}{suffix}"
    return label_dir / f"{stem}.png"


class ISBI2012(FilePairDataset):
    """ISBI 2012 membranes, 2 classes (membrane, cell), from TIFF stacks or PNG folders."""

    # labels are gray levels thresholded at 128: 255 is a cell here, not "ignore"
    all_background_hint = "ISBI labels are thresholded at 128: store cells as 255 (white), membranes as 0"

    class_names = CLASS_NAMES
    palette = PALETTE
    rand_foreground = 1  # cells: the challenge scores the Rand error of their connected components

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False, val_count: int = 4):
        super().__init__(root, split, transform, mean, std)
        if split not in SPLITS:
            raise UserError(f"isbi2012 has no split {split!r}; choose one of: {', '.join(SPLITS)}")
        self.lut = LABEL_LUT
        png_dir = self.root / "train" / "image"
        volume, labels = self.root / "train-volume.tif", self.root / "train-labels.tif"
        if download and not png_dir.is_dir() and not volume.is_file():
            raise UserError(f"isbi2012 cannot be downloaded automatically (registration required); get "
                            f"train-volume.tif and train-labels.tif via {SITE} into {self.root}")
        if png_dir.is_dir():
            images = sorted((p for p in png_dir.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff")),
                            key=_natural_key)
            label_dir = self.root / "train" / "label"
            items: list[tuple[str, str | None]] = [(str(p), str(_label_of(label_dir, p.stem))) for p in images]
        elif volume.is_file():
            n = frame_count(volume)
            items = [(f"{volume}#{k}", f"{labels}#{k}") for k in range(n)]
        else:
            raise UserError(f"{self.root}: expected train/image/ + train/label/ PNG folders or "
                            "train-volume.tif + train-labels.tif (see the README's Datasets section)")
        if not items:
            raise UserError(f"{png_dir}: no .png/.tif images in it; put the slices there (labels in "
                            f"{self.root / 'train' / 'label'})")
        if split != "all" and not 0 <= val_count < len(items):  # all does not use val_count
            if volume.is_file() and not png_dir.is_dir():
                probe_info(volume)  # too few slices because the stack is damaged: that is the error to give
            raise UserError(f"isbi2012: val_count={val_count} must be in 0..{len(items) - 1}")
        if val_count == 0 and split == "val":
            raise UserError("isbi2012: val_count=0 leaves the val split empty; give val_count >= 1, or use "
                            "split all")
        cut = len(items) - val_count
        self.items = {"all": items, "train": items[:cut], "val": items[cut:]}[split]
        self._finish(skip_invalid)

    def read_image(self, ref: str) -> np.ndarray:
        if split_ref(ref)[1] is None:
            return super().read_image(ref)
        return pil_to_rgb(_read_frame(ref))

    def read_raw_mask(self, ref: str) -> np.ndarray:
        """The label's gray levels (:func:`label_gray`), of a PNG file or a TIFF stack's slice alike."""
        path = split_ref(ref)[0]
        img = _read_frame(ref) if path != ref else _open_loaded(ref)
        refuse_lossy_mask(path, img.format, img.info.get("compression"))
        return label_gray(img, ref)

    def check_item(self, image_ref: str, mask_ref: str | None, labels: bool = True) -> list[Problem]:
        # every gray level is valid (thresholded at 128), so the base class's value check finds
        # nothing; what is checked here is a label holding only 0 and 1, whose cells would be read
        # as membrane: one decode of the mask, as the base class does
        problems = super().check_item(image_ref, mask_ref, labels=False)
        if not labels or mask_ref is None or any(p.path == mask_ref for p in problems):
            return problems
        try:
            gray = self.read_raw_mask(mask_ref)
        except UserError as e:
            return [*problems, problem_from_error(mask_ref, e)]
        top = int(gray.max()) if gray.size else 0
        if top == 1:
            problems.append(Problem(mask_ref, "label values are only 0 and 1, and values are thresholded at 128, "
                                              "so every pixel would be membrane: cells must be stored as 255 "
                                              "(white), membranes as 0; multiply the labels by 255"))
        elif 0 < top < 128:  # e.g. 0/1 stored at 4 bits, which reads as the gray levels 0/17
            problems.append(Problem(mask_ref, f"label gray levels are at most {top} of 255, and values are "
                                              "thresholded at 128, so every pixel would be membrane: cells must "
                                              "be stored as 255 (white), membranes as 0"))
        return problems

    def image_size(self, ref: str) -> tuple[int, int]:
        return _read_frame(ref).size if split_ref(ref)[1] is not None else super().image_size(ref)

    def mask_size(self, ref: str) -> tuple[int, int]:
        return _read_frame(ref).size if split_ref(ref)[1] is not None else super().mask_size(ref)

    def name_of(self, ref: str) -> str:
        path, frame = split_ref(ref)
        return f"{Path(path).stem}_{frame:02d}" if frame is not None else Path(path).stem
