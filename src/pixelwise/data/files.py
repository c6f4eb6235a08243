"""The shared base of the file-based readers: a list of (image, mask) files, a label table,
``check()`` and dropping invalid items.

A reader fills ``self.items`` with ``(image_ref, mask_ref)`` string pairs (usually file paths;
``mask_ref`` may be ``None`` when the mask is missing) and sets ``self.lut``, a 256-entry table
from the value stored in a mask file to the class id (``0..C-1``) or 255 (ignore); ``-1``
marks a value that should never appear (reported by ``check()``, read as 255 by ``load``).

Invalid items: ``check()`` returns :class:`Problem` s whose ``path`` is an item's image or mask
ref; ``drop(problems)`` removes those items. Every reader also takes ``skip_invalid=True``,
which runs ``check()`` at construction and drops what it finds (listed in ``self.dropped``).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from pixelwise.data.base import IGNORE_INDEX, Problem, Sample, SegmentationDataset
from pixelwise.data.io import probe, probe_info, read_image, read_mask
from pixelwise.errors import UserError
from pixelwise.runtime import progress as progress_bar


def problem_from_error(ref: str, err: UserError) -> Problem:
    """A UserError ``"path: message"`` -> Problem(ref, message)."""
    msg = str(err)
    prefix = f"{ref}: "
    return Problem(ref, msg[len(prefix):] if msg.startswith(prefix) else msg)


def make_lut(mapping: dict[int, int], invalid: int = -1) -> np.ndarray:
    """{raw value: class id or 255} -> int16[256] with ``invalid`` elsewhere."""
    lut = np.full(256, invalid, dtype=np.int16)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


def identity_lut(num_classes: int, ignore: Iterable[int] = (IGNORE_INDEX,)) -> np.ndarray:
    """Raw values 0..C-1 are the classes, the ``ignore`` values mean ignore, the rest is invalid."""
    mapping = {i: i for i in range(num_classes)}
    mapping.update({v: IGNORE_INDEX for v in ignore})
    return make_lut(mapping)


def _values_text(lut: np.ndarray) -> str:
    """'0..10, 11' style summary of the valid raw values."""
    vals = np.flatnonzero(lut >= 0).tolist()
    runs, start = [], None
    for i, v in enumerate(vals):
        if start is None:
            start = v
        if i + 1 == len(vals) or vals[i + 1] != v + 1:
            runs.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(runs)


def _rotation_note(image_ref: str, mask_size: tuple[int, int]) -> str:
    """For a size mismatch: that the image's size is after its EXIF rotation, when it has one (the
    usual cause is a mask drawn on the stored, unrotated pixels)."""
    if not Path(image_ref).is_file():
        return ""
    try:
        info = probe_info(image_ref)
    except UserError:
        return ""
    if info.orientation not in (5, 6, 7, 8):
        return ""
    matches = " (the mask matches the stored pixels)" if mask_size == info.stored_size else ""
    return (f" after its EXIF orientation {info.orientation} (a quarter turn) is applied; the file stores "
            f"{info.stored_size[0]}x{info.stored_size[1]} pixels{matches}: draw the mask on the image as displayed, "
            "or rotate the image's pixels and drop its orientation tag")


def read_split_list(path: Path) -> str:
    """The text of a split list (one name per line), read as UTF-8 with a BOM (Windows Notepad's)
    dropped; a missing list names the lists beside it, a list in another encoding is refused."""
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in path.parent.glob("*.txt"))) or "none"
        raise UserError(f"{path}: split list not found (lists there: {have})")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: split list is not UTF-8 text; save it as UTF-8") from None


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether paths ``a`` and ``b`` are one file (through links; False where either cannot be read)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def split_ref(ref: str) -> tuple[str, int | None]:
    """An item ref -> (file, number): ``path#k`` (a TIFF stack's slice ``k``, a COCO file's image
    ``k``, as the readers write them) -> (path, k); any other ref -> (ref, None), also a path
    with ``#`` in a folder's or file's name (``run#2/a.png``)."""
    path, sep, number = ref.rpartition("#")
    return (path, int(number)) if sep and number.isdigit() else (ref, None)


FINGERPRINT_CONTENT_FILES = 1000  # files (the first by name) whose first and last 4 KiB join the fingerprint


def split_fingerprint(ds: SegmentationDataset) -> str | None:
    """A digest of the image files of the split ``ds`` as its reader listed them (before
    ``--skip-invalid`` left any out): each file's name (with its slice or image number) and size,
    sorted, and the first and last 4 KiB of the first :data:`FINGERPRINT_CONTENT_FILES` of them (an
    uncompressed BMP's or TIFF's size is its dimensions'; a few KiB of pixels tell two apart). A copy
    or a moved folder of the same files gives the same digest, another folder of files named alike
    (a test folder numbered as the training one) another. None for a reader without image files, or
    where a file cannot be read."""
    items = getattr(ds, "listed_items", None) or getattr(ds, "items", None)
    if not items:
        return None
    entries = []
    for image, _ in items:
        path, number = split_ref(image)
        try:
            size = os.stat(path).st_size
        except OSError:
            return None
        entries.append((f"{Path(path).name}{'' if number is None else f'#{number}'}:{size}", path))
    digest, ends = hashlib.sha256(), {}
    for i, (key, path) in enumerate(sorted(entries)):
        digest.update(key.encode("utf-8", "surrogateescape") + b"\n")
        if i < FINGERPRINT_CONTENT_FILES:
            if path not in ends:  # a TIFF stack's slices share one file
                try:
                    with open(path, "rb") as f:
                        head = f.read(4096)
                        f.seek(max(len(head), os.fstat(f.fileno()).st_size - 4096))
                        ends[path] = hashlib.sha256(head + f.read(4096)).digest()
                except OSError:
                    return None
            digest.update(ends[path])
    return digest.hexdigest()


class FilePairDataset(SegmentationDataset):
    """Base of the readers that pair an image file with a mask file.

    Subclasses call ``super().__init__(root, split, transform, mean, std)``, fill ``self.items``
    and ``self.lut``, set ``class_names``/``palette``, then call ``self._finish(skip_invalid)``.
    They override :meth:`read_raw_mask` / :meth:`mask_size` (and the image counterparts) for
    files PIL cannot open (e.g. SBD ``.mat`` files, TIFF stack frames).
    """

    def __init__(self, root: str | Path | None, split: str,
                 transform: Callable[[Sample], Sample] | None = None,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None):
        super().__init__(transform=transform, mean=mean, std=std)
        if root is None:
            raise UserError(f"{type(self).__name__} needs --data PATH (the dataset root folder)")
        self.root = Path(root).expanduser()
        self.split = split
        self.items: list[tuple[str, str | None]] = []
        self.lut: np.ndarray = identity_lut(0)
        self.dropped: list[Problem] = []
        self.listed_items: list[tuple[str, str | None]] | None = None  # the items before any was dropped
        self.repeated: list[str] = []  # images a split list names more than once (:meth:`notes`)

    # -- construction helpers -------------------------------------------------------------
    def _finish(self, skip_invalid: bool) -> None:
        counts = Counter(self.items)  # a split list naming a file twice: used once
        self.repeated = [image for (image, _), n in counts.items() if n > 1]
        self.items = list(counts)
        if not self.items:
            raise UserError(f"{self.root}: no images found for split {self.split!r} "
                            f"({type(self).__name__}); see the README's Datasets section for the expected layout")
        if skip_invalid:
            problems = self.check()
            self.drop(problems)
            if not self.items:
                raise UserError(f"{self.root}: every item of split {self.split!r} is invalid; "
                                f"first problem: {problems[0]}")

    def notes(self) -> list[str]:
        if not self.repeated:
            return []
        return [f"the {self.split} split lists {len(self.repeated)} image(s) more than once (first: "
                f"{Path(self.repeated[0]).name}); each is used once"]

    # -- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def read_image(self, ref: str) -> np.ndarray:
        """uint8[H, W, 3] RGB."""
        return read_image(ref)

    def read_raw_mask(self, ref: str) -> np.ndarray:
        """uint8[H, W] values as stored in the file (before ``lut``)."""
        return read_mask(ref)

    def image_size(self, ref: str) -> tuple[int, int]:
        """(width, height) from the header only."""
        return probe(ref)[0]

    def mask_size(self, ref: str) -> tuple[int, int]:
        """(width, height) from the header only; a mask in a lossy format (JPEG) is refused."""
        return probe(ref, mask=True)[0]

    def missing_mask_note(self, image_ref: str) -> str:
        """More for the "missing mask" problem of ``image_ref`` (a file found but not taken as its mask)."""
        return ""

    def map_mask(self, raw: np.ndarray) -> np.ndarray:
        """uint8[H, W] stored values -> uint8[H, W] class ids, 255 = ignore (and invalid values)."""
        lut = np.where(self.lut < 0, IGNORE_INDEX, self.lut).astype(np.uint8)
        return lut[raw]

    def name_of(self, ref: str) -> str:
        return Path(ref).stem

    def load(self, index: int) -> Sample:
        image_ref, mask_ref = self.items[index]
        image = self.read_image(image_ref)
        if mask_ref is None:
            raise UserError(f"{image_ref}: no mask for this image; add it or use --skip-invalid")
        mask = self.map_mask(self.read_raw_mask(mask_ref))
        if mask.shape != image.shape[:2]:
            raise UserError(f"{mask_ref}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_ref} is "
                            f"{image.shape[1]}x{image.shape[0]}; fix the pair or use --skip-invalid")
        return Sample(image=image, mask=mask, name=self.name_of(image_ref),
                      meta={"image_path": image_ref, "mask_path": mask_ref})

    # -- validation ---------------------------------------------------------------------------
    def check_item(self, image_ref: str, mask_ref: str | None, labels: bool = True) -> list[Problem]:
        """Problems of one pair: unreadable files, missing mask, size mismatch, bad label values."""
        problems: list[Problem] = []
        try:
            isize = self.image_size(image_ref)
        except UserError as e:
            problems.append(problem_from_error(image_ref, e))
            isize = None
        mask_file = Path(split_ref(mask_ref)[0]) if mask_ref is not None else None
        if mask_ref is None or mask_file is None or not (mask_file.exists() or mask_file.is_symlink()):
            # (a broken link is named as one by mask_size below)
            ref = mask_ref if mask_ref is not None else image_ref
            problems.append(Problem(ref, f"missing mask for image {image_ref}{self.missing_mask_note(image_ref)}"))
            return problems
        if _same_file(split_ref(image_ref)[0], mask_file):  # a link of one to the other: the labels as the photo
            problems.append(Problem(mask_ref, f"mask is the same file as its image {image_ref} (a link to it, or "
                                              "it a link to the mask?); give the image its own file"))
            return problems
        try:
            msize = self.mask_size(mask_ref)
        except UserError as e:
            problems.append(problem_from_error(mask_ref, e))
            return problems
        if isize is not None and msize != isize:
            problems.append(Problem(mask_ref, f"mask is {msize[0]}x{msize[1]} but image {image_ref} is "
                                              f"{isize[0]}x{isize[1]}{_rotation_note(image_ref, msize)}"))
        if labels:
            try:
                values = np.unique(self.read_raw_mask(mask_ref))
            except UserError as e:
                problems.append(problem_from_error(mask_ref, e))
                return problems
            bad = values[self.lut[values] < 0]
            if bad.size:
                shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
                problems.append(Problem(mask_ref, f"label values {shown} outside the {self.num_classes} "
                                                  f"classes (valid stored values: {_values_text(self.lut)})"))
        return problems

    def check(self, labels: bool = True, progress: bool | None = False) -> list[Problem]:
        """Validate every item: headers and sizes (no image decode); with ``labels`` each mask is
        decoded once to find values outside the classes. -> list of Problems (empty = clean)."""
        items = progress_bar(self.items, f"check {self.split}", progress, unit="img", leave=False)
        problems: list[Problem] = []
        for image_ref, mask_ref in items:
            problems.extend(self.check_item(image_ref, mask_ref, labels))
        return problems

    def drop(self, problems: Iterable[Problem]) -> int:
        """Remove every item whose image or mask ref is the path of one of ``problems``.
        -> number of items removed. The problems are kept in ``self.dropped``."""
        problems = list(problems)
        bad = {p.path for p in problems}
        if self.listed_items is None:
            self.listed_items = list(self.items)
        before = len(self.items)
        self.items = [(i, m) for i, m in self.items if i not in bad and m not in bad]
        self.dropped.extend(problems)
        return before - len(self.items)
