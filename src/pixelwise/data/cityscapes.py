"""``cityscapes``: Cityscapes fine annotations mapped to the 19 evaluation ("train id") classes.

Layout: ``root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png`` and
``root/gtFine/{split}/{city}/{name}_gtFine_labelIds.png``. The label ids 0..33 are mapped to the
19 train ids of the official ``labels.py``; every other id (and 255) becomes 255 (ignore).
Splits: ``train`` (2,975), ``val`` (500), ``test`` (1,525; its labels hold only ids 0..3,
unlabeled, ego vehicle, rectification border and out of roi, all ignored).
The ``*_gtFine_labelIds.png`` files are what is read: a ``*_gtFine_labelTrainIds.png`` (made by
cityscapesScripts' ``createTrainIdLabelImgs``, which adds it beside the labelIds file) or a coarse
annotation (``gtCoarse/``, not supported) found where it is missing is named in the "missing mask"
problem.
No download: the data needs a login at https://www.cityscapes-dataset.com/downloads/.
"""

from __future__ import annotations

from pathlib import Path

from pixelwise.data.base import IGNORE_INDEX
from pixelwise.data.files import FilePairDataset, make_lut
from pixelwise.errors import UserError

# (name, label id, colour) of the 19 train-id classes, in train-id order (cityscapesScripts labels.py).
CLASSES = [
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)), ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)), ("fence", 13, (190, 153, 153)), ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)), ("terrain", 22, (152, 251, 152)), ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)), ("rider", 25, (255, 0, 0)), ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)), ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)), ("bicycle", 33, (119, 11, 32)),
]
CLASS_NAMES = [c[0] for c in CLASSES]
PALETTE = [c[2] for c in CLASSES]
LABEL_TO_TRAIN = {label_id: train_id for train_id, (_, label_id, _) in enumerate(CLASSES)}
# label ids 0..33 are valid (the unused ones -> ignore); 255 (no label) is accepted as ignore too
LABEL_LUT = make_lut({**{i: IGNORE_INDEX for i in range(34)}, IGNORE_INDEX: IGNORE_INDEX, **LABEL_TO_TRAIN})
STORED_LABELS = "Cityscapes *_gtFine_labelIds.png: label ids 0..33, mapped to the 19 train ids"
SPLITS = ("train", "val", "test")
URL = "https://www.cityscapes-dataset.com/downloads/"


class Cityscapes(FilePairDataset):
    """Cityscapes gtFine, 19 classes."""

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False):
        super().__init__(root, split, transform, mean, std)
        if split not in SPLITS:
            raise UserError(f"cityscapes has no split {split!r}; choose one of: {', '.join(SPLITS)}")
        if download:
            raise UserError(f"cityscapes cannot be downloaded automatically (login required); get "
                            f"leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from {URL}")
        images = self.root / "leftImg8bit" / split
        if not images.is_dir():
            raise UserError(f"{images}: not found; expected leftImg8bit/ and gtFine/ from {URL} "
                            f"in {self.root}")
        self.lut = LABEL_LUT
        for img in sorted(images.glob("*/*_leftImg8bit.png")):
            name = img.name[: -len("_leftImg8bit.png")]
            mask = self.root / "gtFine" / split / img.parent.name / f"{name}_gtFine_labelIds.png"
            self.items.append((str(img), str(mask)))
        self._finish(skip_invalid)

    def missing_mask_note(self, image_ref: str) -> str:
        """Say so when the labelIds file is missing but a train-id or coarse label of the image is there."""
        img = Path(image_ref)
        name, city = img.name[: -len("_leftImg8bit.png")], img.parent.name
        fine = self.root / "gtFine" / self.split / city
        train_ids = fine / f"{name}_gtFine_labelTrainIds.png"
        if train_ids.is_file():
            return (f" ({train_ids} is there, but pixelwise reads the label ids of {name}_gtFine_labelIds.png and "
                    "maps them to train ids itself; cityscapesScripts' createTrainIdLabelImgs adds the labelTrainIds "
                    "files beside the labelIds files, it does not replace them: keep or restore the labelIds files "
                    "from gtFine_trainvaltest.zip)")
        coarse = sorted((self.root / "gtCoarse").glob(f"*/{city}/{name}_gtCoarse_labelIds.png"),
                        key=lambda p: p.parent.parent.name != self.split)  # the same split's first
        if coarse:
            return (f" ({coarse[0]} is there, but pixelwise reads only the fine annotations, "
                    f"gtFine/{self.split}/{city}/{name}_gtFine_labelIds.png from gtFine_trainvaltest.zip; coarse "
                    "annotations (gtCoarse) are not supported)")
        return ""

    def name_of(self, ref: str) -> str:
        return ref.rsplit("/", 1)[-1][: -len("_leftImg8bit.png")]
