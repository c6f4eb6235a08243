"""``voc``: PASCAL VOC 2012 segmentation, optionally with the SBD augmented training set.

``root`` may be ``VOC2012`` itself, ``VOCdevkit`` or the folder holding ``VOCdevkit``. Splits
``train`` (1,464), ``val`` (1,449), ``trainval`` come from ``ImageSets/Segmentation/{split}.txt``.
``train_aug`` (10,582 with the usual data) uses either

- ``SegmentationClassAug/*.png`` inside VOC2012 (the DeepLab release, or mmsegmentation's
  converter, which puts only SBD's masks there): the stems listed in
  ``ImageSets/Segmentation/train_aug.txt`` (DeepLab's name) or ``trainaug.txt`` (mmseg's) when
  present, else every mask there and VOC ``train``, minus ``val``; VOC's own PNG
  (``SegmentationClass``) is used where one exists, the Aug mask elsewhere; or
- ``sbd_root=PATH`` (SBD's ``benchmark_RELEASE/dataset`` with ``cls/*.mat``, ``train.txt``,
  ``val.txt``): SBD train + SBD val + VOC train, minus VOC val; VOC's own PNG is used where
  one exists.

Masks are palette-indexed PNGs read as indices: 0 background, 1..20 classes, 255 void. A palette
mask whose own palette gives an index it uses the VOC colour of another class (a mask re-saved by
an editor or a PNG optimiser with its colours in another order: it looks right and would be read
wrong) is a problem for ``check()``. SBD ``.mat`` labels must hold whole numbers 0..255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from pixelwise.data.base import IGNORE_INDEX, Problem
from pixelwise.data.download import Archive, download_and_extract, download_once
from pixelwise.data.files import FilePairDataset, identity_lut, read_split_list
from pixelwise.data.folder import palette_order_problem
from pixelwise.data.palette import default_palette
from pixelwise.errors import UserError

CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
PALETTE = default_palette(len(CLASS_NAMES))
VOID_COLOUR = (224, 224, 192)  # index 255 (void) in the masks' palette: VOC's colour map
KNOWN_COLOURS = {**{c: i for i, c in enumerate(PALETTE)}, VOID_COLOUR: IGNORE_INDEX}
SPLITS = ("train", "val", "trainval", "train_aug")
URL = "https://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
# SHA-256 and size as published in tensorflow/datasets (url_checksums/voc.txt) for this file (its copy
# on pjreddie.com; the same name and size; torchvision checks the same file by MD5 6cd6e144...).
ARCHIVE = Archive(URL, sha256="e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb", size=1999639040)


def find_voc_root(root: Path) -> Path:
    """The VOC2012 folder under any of the accepted roots."""
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise UserError(f"{root}: no VOC2012/JPEGImages found; pass the VOCdevkit or VOC2012 folder "
                    "(or have it downloaded: --dataset-kwargs '{\"download\": true}', download=True in Python)")


def read_list(path: Path, required: bool = True) -> list[str]:
    """Stems from a split list; accepts 'stem' lines and DeepLab's '/JPEGImages/x.jpg /Seg.../x.png'.
    ``required``: the list is the split asked for, so an empty one is a UserError (a list only
    combined with others, such as SBD's, may be empty)."""
    stems = [Path(line.split()[0]).stem for line in read_split_list(path).splitlines() if line.strip()]
    if required and not stems:
        raise UserError(f"{path}: the split list is empty; list one image name per line")
    return stems


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """SBD ``cls/*.mat`` -> uint8[H, W] class ids (0..20, 255 on boundaries where present). SBD stores
    uint8; a re-exported file of another type must hold whole numbers 0..255 (a UserError naming
    what it holds otherwise: such values are not wrapped or truncated)."""
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except NotImplementedError:  # scipy on MATLAB's v7.3 format (HDF5), what `save -v7.3` writes
        raise UserError(f"{path}: a MATLAB v7.3 (HDF5) .mat file, which is not read; save it with "
                        "`save(..., '-v7')` or re-download SBD") from None
    except (OSError, ValueError, KeyError, AttributeError, TypeError, MatReadError) as e:  # MatReadError: empty
        raise UserError(f"{path}: unreadable SBD .mat file ({e}); re-download SBD") from None
    if seg.ndim != 2 or not (np.issubdtype(seg.dtype, np.integer) or np.issubdtype(seg.dtype, np.floating)
                             or seg.dtype == bool):
        raise UserError(f"{path}: GTcls.Segmentation is a {seg.dtype} array of shape {seg.shape}, not a 2-D "
                        "array of class ids; re-download SBD")
    if seg.dtype == np.uint8 or seg.dtype == bool:
        return np.ascontiguousarray(seg, dtype=np.uint8)
    fix = "class ids are whole numbers 0..20, 255 = ignore; re-export it as uint8 (or re-download SBD)"
    odd = seg[~(seg == np.round(seg))] if np.issubdtype(seg.dtype, np.floating) else seg[:0]  # NaN too
    if odd.size:
        raise UserError(f"{path}: GTcls.Segmentation ({seg.dtype}) holds values that are not whole numbers, "
                        f"e.g. {odd.flat[0]}; {fix}")
    if seg.size and (seg.min() < 0 or seg.max() > 255):
        raise UserError(f"{path}: GTcls.Segmentation ({seg.dtype}) holds values {seg.min():g}..{seg.max():g}, "
                        f"outside 0..255; {fix}")
    return np.ascontiguousarray(seg, dtype=np.uint8)


class VOCSegmentation(FilePairDataset):
    """PASCAL VOC 2012 (21 classes incl. background); ``download=True`` fetches the trainval tar (2 GB)."""

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False, sbd_root: str | None = None):
        super().__init__(root, split, transform, mean, std)
        if split not in SPLITS:
            raise UserError(f"voc has no split {split!r}; choose one of: {', '.join(SPLITS)}")
        # checked on every split, although only train_aug reads SBD: training passes the same options
        # to its val split, so a wrong path would otherwise go unnoticed there
        if sbd_root is not None and not Path(sbd_root).expanduser().is_dir():
            raise UserError(f"sbd_root {sbd_root}: no such folder; give SBD's benchmark_RELEASE/dataset")
        def present() -> bool:
            return any((c / "JPEGImages").is_dir() for c in
                       (self.root, self.root / "VOC2012", self.root / "VOCdevkit" / "VOC2012"))

        if download and not present():
            download_once(self.root, ARCHIVE.name, present, lambda: download_and_extract(ARCHIVE, self.root))
        self.voc = find_voc_root(self.root)
        self.lut = identity_lut(len(CLASS_NAMES))
        sets = self.voc / "ImageSets" / "Segmentation"
        if split != "train_aug":
            stems = read_list(sets / f"{split}.txt")
            self.items = [(self._jpg(s), str(self.voc / "SegmentationClass" / f"{s}.png")) for s in stems]
        elif (self.voc / "SegmentationClassAug").is_dir() and sbd_root is None:
            aug = self.voc / "SegmentationClassAug"
            listed = [sets / n for n in ("train_aug.txt", "trainaug.txt") if (sets / n).is_file()]  # DeepLab's, mmseg's
            if listed:
                stems = read_list(listed[0])
            else:  # mmseg's converter puts only SBD's masks here: VOC train comes from SegmentationClass
                val = set(read_list(sets / "val.txt", required=False))
                stems = sorted(({p.stem for p in aug.glob("*.png")} | set(read_list(sets / "train.txt", False))) - val)
            voc_masks = self.voc / "SegmentationClass"  # VOC's own label where it has one, as with sbd_root
            self.items = [(self._jpg(s), str(png if (png := voc_masks / f"{s}.png").is_file() else aug / f"{s}.png"))
                          for s in stems]
        elif sbd_root is not None:
            sbd = Path(sbd_root).expanduser()
            if not (sbd / "cls").is_dir():
                raise UserError(f"{sbd}: no cls/ folder; pass SBD's benchmark_RELEASE/dataset as sbd_root")
            val = set(read_list(sets / "val.txt", required=False))
            voc_train = read_list(sets / "train.txt", required=False)
            stems = sorted((set(read_list(sbd / "train.txt", False)) | set(read_list(sbd / "val.txt", False))
                            | set(voc_train)) - val)
            voc_masks = self.voc / "SegmentationClass"
            for s in stems:
                png = voc_masks / f"{s}.png"
                mask = png if png.is_file() else sbd / "cls" / f"{s}.mat"
                image = self._jpg(s)
                if not Path(image).is_file() and (sbd / "img" / f"{s}.jpg").is_file():
                    image = str(sbd / "img" / f"{s}.jpg")
                self.items.append((image, str(mask)))
        else:
            raise UserError(f"{self.voc}: split 'train_aug' needs SegmentationClassAug/ in VOC2012 or "
                            "sbd_root=PATH to SBD's benchmark_RELEASE/dataset")
        self._finish(skip_invalid)

    def _jpg(self, stem: str) -> str:
        return str(self.voc / "JPEGImages" / f"{stem}.jpg")

    def read_raw_mask(self, ref: str) -> np.ndarray:
        return read_sbd_mat(ref) if ref.endswith(".mat") else super().read_raw_mask(ref)

    def check_item(self, image_ref: str, mask_ref: str | None, labels: bool = True) -> list[Problem]:
        problems = super().check_item(image_ref, mask_ref, labels)
        if labels and mask_ref is not None and not mask_ref.endswith(".mat") and \
                not any(p.path == mask_ref for p in problems):  # a palette mask in another colour order
            found = palette_order_problem(mask_ref, KNOWN_COLOURS, CLASS_NAMES, "the VOC colour map")
            problems += [found] if found else []
        return problems

    def mask_size(self, ref: str) -> tuple[int, int]:
        if ref.endswith(".mat"):
            h, w = read_sbd_mat(ref).shape
            return w, h
        return super().mask_size(ref)
