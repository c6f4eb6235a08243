"""``isbi2012``: the ISBI 2012 EM segmentation challenge (neuronal membranes, 512x512 grayscale).

Two layouts are accepted:

- PNG folders: ``root/train/image/<n>.png`` + ``root/train/label/<n>.png`` (sorted by number);
- the original multi-page TIFF stacks: ``root/train-volume.tif`` + ``root/train-labels.tif``
  (30 slices); items are named ``train-volume.tif#<slice>``.

Classes: 0 = ``membrane`` (black, stored 0) and 1 = ``cell`` (white, stored 255, the cell
interior); stored values are thresholded at 128, so every value is valid. Images are gray,
returned as RGB with three equal channels.

Only the training volume is labelled, so splits are cut from it deterministically:
``all`` = every slice, ``val`` = the last ``val_count`` slices (default 4), ``train`` = the rest.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from pixelwise.data.files import FilePairDataset, make_lut
from pixelwise.data.io import _open_loaded, frame_count, pil_to_rgb
from pixelwise.errors import UserError

CLASS_NAMES = ["membrane", "cell"]
PALETTE = [(0, 0, 0), (255, 255, 255)]
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
    path, _, frame = ref.partition("#")
    return _open_loaded(path, int(frame or 0))


class ISBI2012(FilePairDataset):
    """ISBI 2012 membranes, 2 classes (membrane, cell), from TIFF stacks or PNG folders."""

    class_names = CLASS_NAMES
    palette = PALETTE
    rand_foreground = 1  # cells: the challenge scores the Rand error of their connected components

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False, val_count: int = 4):
        super().__init__(root, split, transform, mean, std)
        if split not in SPLITS:
            raise UserError(f"isbi2012 has no split {split!r}; choose one of: {', '.join(SPLITS)}")
        self.lut = make_lut({v: int(v >= 128) for v in range(256)})
        png_dir = self.root / "train" / "image"
        volume, labels = self.root / "train-volume.tif", self.root / "train-labels.tif"
        if download and not png_dir.is_dir() and not volume.is_file():
            raise UserError(f"isbi2012 cannot be downloaded automatically (registration required); get "
                            f"train-volume.tif and train-labels.tif via {SITE} into {self.root}")
        if png_dir.is_dir():
            images = sorted((p for p in png_dir.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff")),
                            key=_natural_key)
            items: list[tuple[str, str | None]] = [(str(p), str(self.root / "train" / "label" / f"{p.stem}.png"))
                                                   for p in images]
        elif volume.is_file():
            n = frame_count(volume)
            items = [(f"{volume}#{k}", f"{labels}#{k}") for k in range(n)]
        else:
            raise UserError(f"{self.root}: expected train/image/ + train/label/ PNG folders or "
                            "train-volume.tif + train-labels.tif (see the README's Datasets section)")
        if not items:
            raise UserError(f"{png_dir}: no .png/.tif images in it; put the slices there (labels in "
                            f"{self.root / 'train' / 'label'})")
        if not 0 <= val_count < len(items):
            raise UserError(f"isbi2012: val_count={val_count} must be in 0..{len(items) - 1}")
        if val_count == 0 and split == "val":
            raise UserError("isbi2012: val_count=0 leaves the val split empty; give val_count >= 1, or use "
                            "split all")
        cut = len(items) - val_count
        self.items = {"all": items, "train": items[:cut], "val": items[cut:]}[split]
        self._finish(skip_invalid)

    def read_image(self, ref: str) -> np.ndarray:
        if "#" not in ref:
            return super().read_image(ref)
        return pil_to_rgb(_read_frame(ref))

    def read_raw_mask(self, ref: str) -> np.ndarray:
        if "#" not in ref:
            return super().read_raw_mask(ref)
        img = _read_frame(ref)
        return np.asarray(img.convert("L") if img.mode not in ("L", "P") else img, dtype=np.uint8)

    def image_size(self, ref: str) -> tuple[int, int]:
        return _read_frame(ref).size if "#" in ref else super().image_size(ref)

    def mask_size(self, ref: str) -> tuple[int, int]:
        return _read_frame(ref).size if "#" in ref else super().mask_size(ref)

    def name_of(self, ref: str) -> str:
        path, _, frame = ref.partition("#")
        return f"{Path(path).stem}_{int(frame):02d}" if frame else Path(path).stem
