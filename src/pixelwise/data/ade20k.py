"""``ade20k``: the MIT Scene Parsing benchmark (ADEChallengeData2016), 150 classes.

Layout: ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png``
(``root`` may also be the folder holding ``ADEChallengeData2016``). Masks store 0 for "other"
(ignored -> 255) and 1..150 for the classes, so stored label L becomes class L-1.
Splits: ``train``/``training`` (20,210), ``val``/``validation`` (2,000).
"""

from __future__ import annotations

from pixelwise.data.base import IGNORE_INDEX
from pixelwise.data.download import Archive, download_and_extract, download_once
from pixelwise.data.files import FilePairDataset, make_lut
from pixelwise.data.palette import default_palette
from pixelwise.errors import UserError

# objectInfo150 names (first name of each entry), in label order 1..150.
CLASS_NAMES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
# Distinct colours from the VOC bit-interleaving map (skipping its black entry 0).
PALETTE = default_palette(len(CLASS_NAMES) + 1)[1:]
# stored value -> class: 0 = "other" (ignored), L = class L - 1
LABEL_LUT = make_lut({0: IGNORE_INDEX, **{i: i - 1 for i in range(1, len(CLASS_NAMES) + 1)}})
STORED_LABELS = "ADE20K annotation PNGs: 0 = other (ignored), value L = class L-1"
SPLIT_DIRS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
URL = "https://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
# SHA-256 and size as published in tensorflow/datasets (url_checksums/ade20k.txt) for this file.
ARCHIVE = Archive(URL, sha256="7ff1be44964418441f542a7cc1e1a650e7dc0fc275f5d23252bc9bbdbc977b29", size=967382037)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class ADE20K(FilePairDataset):
    """ADE20K SceneParsing, 150 classes; ``download=True`` fetches the challenge zip (~920 MB)."""

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False):
        super().__init__(root, split, transform, mean, std)
        if split not in SPLIT_DIRS:
            raise UserError(f"ade20k has no split {split!r}; choose one of: train, val")
        unpacked = self.root / "ADEChallengeData2016"
        if download and not unpacked.is_dir() and not (self.root / "images").is_dir():
            download_once(self.root, ARCHIVE.name, unpacked.is_dir, lambda: download_and_extract(ARCHIVE, self.root))
        if unpacked.is_dir():
            self.root = unpacked
        sub = SPLIT_DIRS[split]
        images = self.root / "images" / sub
        if not images.is_dir():
            raise UserError(f"{images}: not found; expected ADEChallengeData2016/images/{sub} "
                            f"and annotations/{sub} (get it from {URL})")
        self.lut = LABEL_LUT
        for img in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            self.items.append((str(img), str(self.root / "annotations" / sub / f"{img.stem}.png")))
        self._finish(skip_invalid)
