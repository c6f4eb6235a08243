"""``coco``: COCO-style instance annotations (``instances_*.json``) for Mask R-CNN.

Layout: ``root/annotations/instances_{split}{year}.json`` and images in ``root/{split}{year}/``
(or give ``ann_file=`` and ``image_dir=`` for any COCO-format data set).

Targets per image: ``instance_masks`` bool[K, H, W], ``instance_labels`` int64[K] in 1..C
(contiguous, in ascending COCO category id order; ``class_names[0] = "background"``), ``boxes``
float32[K, 4] (x1, y1, x2, y2 from the JSON ``bbox``). ``category_ids[label]`` is the COCO
category id of a label, for exporting results. Crowd annotations (``iscrowd=1``) are not
instances; their regions are 255 (ignore) in the derived semantic ``mask``, except where a
non-crowd instance covers them. In the semantic mask larger instances are painted first, so
smaller ones stay visible on top.

Degenerate annotations (a box under 1 px wide or tall, or an empty mask) are not training
instances (Mask R-CNN needs a box of some size around a non-empty mask) and are not painted in the
semantic mask, but they are ground truth for scoring: ``meta["untrained"]`` holds them, and
:func:`~pixelwise.data.sample_target` puts them (and the crowd regions, ``meta["crowd"]``) in the
ground truth that ``eval`` and training's validation score, as pycocotools scores the file.

``check()`` reports what would make pixelwise's reading differ from pycocotools' reading of the
same file: ids used twice (annotations, images, categories: pycocotools keeps the last entry of
an id), negative bbox sizes or areas, besides unreadable annotations and sizes. Segmentations are
validated before pycocotools sees them (it trusts its input: a polygon point far outside the image
makes it allocate memory in proportion to the coordinate, a bad RLE decodes garbage or fails):
polygon points must be finite and within :data:`POLYGON_TOLERANCE` px of the image, RLE counts
must be non-negative and cover the image exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
from collections import Counter
from pathlib import Path
from typing import NoReturn, TypeGuard

import numpy as np
from pycocotools.coco import COCO

from pixelwise.data.base import IGNORE_INDEX, Problem, Sample
from pixelwise.data.files import FilePairDataset, problem_from_error
from pixelwise.data.io import probe
from pixelwise.data.palette import default_palette
from pixelwise.errors import UserError, finite, finite_number, listed

URL = "https://cocodataset.org/#download"

#: How far (px) a polygon point may lie outside the image: as far as a bbox may reach past the image
#: (``check`` accepts ``x + width <= W + 1``). Real COCO polygons touch or cross the border by a
#: fraction of a pixel; anything further is a broken coordinate, and one far out makes pycocotools
#: allocate memory in proportion to it (a 1e9 coordinate crashes the process).
POLYGON_TOLERANCE = 1.0


class COCOInstances(FilePairDataset):
    """COCO instance segmentation (task ``"instance"``); item refs are (image path, ``ann_file#image_id``)."""

    task = "instance"
    # images without objects still count for scoring: a detection on one is a false positive
    training_only_options = ("skip_empty",)

    def __init__(self, root, split: str = "train", transform=None, mean=None, std=None,
                 skip_invalid: bool = False, download: bool = False, year: str = "2017",
                 ann_file: str | None = None, image_dir: str | None = None, skip_empty: bool = False):
        ann_file, image_dir = (None if p is None else str(p).replace("{split}", split) for p in (ann_file, image_dir))
        if root is None and ann_file and image_dir:  # both given: no root is read
            root = Path(image_dir).expanduser().parent
        super().__init__(root, split, transform, mean, std)
        if download:
            raise UserError(f"coco is not downloaded automatically (~20 GB); get the {split}{year} "
                            f"images and annotations from {URL} into {self.root}")
        default_ann = self.root / "annotations" / f"instances_{split}{year}.json"
        self.ann_file = self._under_root(ann_file) if ann_file else default_ann
        self.image_dir = self._under_root(image_dir) if image_dir else self.root / f"{split}{year}"
        if not self.ann_file.is_file():
            raise UserError(f"{self.ann_file}: annotation file not found (COCO layout: annotations/ and "
                            f"{split}{year}/ under {self.root}, or pass ann_file=)")
        try:
            # read here as UTF-8 (JSON's encoding; a BOM allowed): pycocotools opens it in the locale's
            # encoding, which garbles non-ASCII names on Windows (Straße -> StraÃŸe)
            with open(self.ann_file, encoding="utf-8-sig") as f:
                dataset = json.load(f)
            if not isinstance(dataset, dict):
                raise TypeError(f"the file holds a JSON {type(dataset).__name__}, not an object")
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO()
                self.coco.dataset = dataset
                self.coco.createIndex()
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:  # [[[[...: nested too deep
            raise UserError(f"{self.ann_file}: not a valid COCO annotation file "
                            f"({type(e).__name__}: {e})") from None
        for kind, key in (("image", "images"), ("category", "categories")):
            for entry in self.coco.dataset.get(key) or []:
                if not _whole_number(entry.get("id")):  # pycocotools takes any; pixelwise refers to images by id
                    raise UserError(f"{self.ann_file}: {kind} id {entry.get('id')!r} is not a whole number; COCO ids "
                                    f"are integers: renumber the {key} (and the annotations' {kind}_id with them)")
        for entry in self.coco.dataset.get("categories") or []:
            if "name" in entry and not isinstance(entry["name"], str):
                raise UserError(f"{self.ann_file}: category {entry.get('id')} has name {entry['name']!r}, not text; "
                                "give each category its name as a string")
        for a in self.coco.anns.values():
            for key in ("image_id", "category_id"):  # pycocotools files true under id 1: not a number here
                if isinstance(a.get(key), bool):
                    raise UserError(f"{self.ann_file}: annotation {a.get('id')} has {key} {json.dumps(a[key])}, not "
                                    f"a number; give the {key.split('_')[0]}'s id")
        for image_id, info in self.coco.imgs.items():
            if (not isinstance(info.get("file_name"), str) or not _positive_int(info.get("height"))
                    or not _positive_int(info.get("width"))):
                raise UserError(f"{self.ann_file}: image {image_id} needs a file_name and a width and height that "
                                f"are whole numbers above 0, and has {info!r}; fix the annotation file")
            info["height"], info["width"] = int(info["height"]), int(info["width"])  # 40.0 -> 40
        # ids listed twice: pycocotools' index keeps the last entry of each, check() reports them
        self.duplicate_image_ids = _duplicates(self.coco.dataset.get("images", []))
        self.duplicate_ann_ids = _duplicates(self.coco.dataset.get("annotations", []))
        self.duplicate_category_ids = _duplicates(self.coco.dataset.get("categories", []))
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        if len(cats) > 254:
            raise UserError(f"{self.ann_file}: {len(cats)} categories; at most 254 are supported")
        self.category_ids: list[int] = [0] + [int(c["id"]) for c in cats]
        self.cat_to_label = {cid: i for i, cid in enumerate(self.category_ids) if i > 0}
        self.class_names = _distinct_names(cats)
        self.palette = default_palette(len(self.class_names))
        for image_id in sorted(self.coco.imgs):
            if skip_empty and not any(self._trainable(a) for a in self.coco.imgToAnns.get(image_id, [])):
                continue
            info = self.coco.imgs[image_id]
            self.items.append((str(self.image_dir / info["file_name"]), f"{self.ann_file}#{int(image_id)}"))
        if skip_empty and not self.items and self.coco.imgs:  # else "no images found ... see the layout"
            raise UserError(f"{self.ann_file}: none of its {len(self.coco.imgs)} images has an object to train on "
                            "(not a crowd, a box of 1 px or more); skip_empty=true leaves no image: drop it or "
                            "add objects")
        self._finish(skip_invalid)

    @staticmethod
    def _trainable(a: dict) -> bool:
        """Whether annotation ``a`` may be a training instance, from the JSON alone (what ``skip_empty``
        asks): not a crowd, and not a bbox under 1 px wide or tall (``load`` trains on neither); an
        annotation that ``check()`` names (unknown category, no segmentation, a bad bbox) counts, so
        that its image stays and is named."""
        return not a.get("iscrowd", 0) and not _thin_box(a)

    def _under_root(self, path: str) -> Path:
        """A relative ``ann_file``/``image_dir`` is under the root when it is there, else as given
        (relative to the working folder)."""
        given = Path(path).expanduser()
        return self.root / given if not given.is_absolute() and (self.root / given).exists() else given

    def check(self, labels: bool = True, progress: bool | None = False) -> list[Problem]:
        """Every image's problems (:meth:`check_item`), and once per file: annotations of image ids
        the file does not list (their objects would silently go missing from training and scoring)
        and category ids listed twice (pycocotools names the category after its last entry).

        Not problems: annotations whose box is under 1 px wide or tall or whose mask is empty. They
        are not trained on (``load`` keeps them out of ``instance_masks``) and are scored as
        pycocotools scores them (``meta["untrained"]``); :meth:`notes` counts them."""
        problems = super().check(labels=labels, progress=progress)
        for cat_id, entries in self.duplicate_category_ids.items():
            names = ", ".join(repr(c.get("name")) for c in entries)
            problems.append(Problem(str(self.ann_file), f"category id {cat_id} is listed {len(entries)} times "
                                                        f"(names {names}); pycocotools keeps the last name, so "
                                                        "which class its objects are is ambiguous: give each "
                                                        "category its own id"))
        orphans = sorted({a.get("image_id") for a in self.coco.anns.values()} - set(self.coco.imgs), key=str)
        if orphans:
            shown = listed(orphans, 5)
            problems.append(Problem(str(self.ann_file), f"annotations of {len(orphans)} image id(s) the file does "
                                                        f"not list under images: {shown}"))
        return problems

    def label_presence(self) -> tuple[bool, bool]:
        """(whether the semantic masks have a labelled pixel, whether one of a class other than
        background), from the annotations, without drawing them: every image is background where no
        object or crowd region covers it, and an object with a segmentation and a known category
        paints its class (:func:`~pixelwise.data.inspect.label_presence`)."""
        objects = any(not a.get("iscrowd", 0) and a.get("segmentation") and a.get("category_id") in self.cat_to_label
                      for _, ref in self.items for a in self.coco.imgToAnns.get(self.image_id_of(ref), []))
        return bool(self.items), objects

    def notes(self) -> list[str]:
        """Things about the file that are not problems but change what is trained on: annotations
        whose bbox is under 1 px wide or tall (read from the JSON, no mask decoded; those whose
        mask turns out empty are left out of training as well). Eval scores them."""
        thin = [a for image_id in self.coco.imgs for a in self.coco.imgToAnns.get(image_id, [])
                if not a.get("iscrowd", 0) and _thin_box(a)]
        if not thin:
            return []
        shown = ", ".join(str(a.get("id")) for a in thin[:5]) + (", ..." if len(thin) > 5 else "")
        return [f"{self.ann_file}: {len(thin)} annotation(s) with a bbox under 1 px wide or tall (ids {shown}) "
                "are not trained on (Mask R-CNN needs a box of some size) but are scored by eval, as pycocotools "
                "scores them"]

    @staticmethod
    def image_id_of(mask_ref: str | None) -> int:
        if mask_ref is None:  # every COCO item has an annotation ref; a missing one is a bug
            raise ValueError("COCO item without an annotation ref")
        return int(mask_ref.rsplit("#", 1)[1])

    def load(self, index: int) -> Sample:
        image_ref, ann_ref = self.items[index]
        image_id = self.image_id_of(ann_ref)
        info = self.coco.imgs[image_id]
        if image_id in self.duplicate_image_ids:  # never an image with another image's objects
            raise UserError(f"{self.ann_file}: {self._duplicate_image_text(image_id)}; fix the file or use "
                            "--skip-invalid")
        image = self.read_image(image_ref)
        h, w = int(info["height"]), int(info["width"])
        if image.shape[:2] != (h, w):
            raise UserError(f"{image_ref}: image is {image.shape[1]}x{image.shape[0]} but "
                            f"{self.ann_file.name} says {w}x{h}; fix the file or use --skip-invalid")
        anns = sorted(self.coco.imgToAnns.get(image_id, []), key=lambda a: -_number(a.get("area")))
        semantic = np.zeros((h, w), dtype=np.uint8)
        crowd_masks = {id(a): self._mask(a, image_id) for a in anns if a.get("iscrowd", 0) and a.get("segmentation")}
        for m in crowd_masks.values():
            semantic[m > 0] = IGNORE_INDEX
        # instances; crowd regions: not trained on, scored as COCO scores them (neither right nor wrong);
        # degenerate instances (box under 1 px, empty mask): not trained on, scored as objects
        found: dict[str, list] = {"masks": [], "labels": [], "boxes": [], "areas": [], "bboxes": []}
        crowd: dict[str, list] = {"masks": [], "labels": [], "boxes": [], "areas": [], "bboxes": []}
        untrained: dict[str, list] = {"masks": [], "labels": [], "boxes": [], "areas": [], "bboxes": []}
        for a in anns:
            if not a.get("segmentation") or a["category_id"] not in self.cat_to_label:
                continue
            problem = annotation_problem(a, h, w)
            if problem:
                self._refuse(a, image_id, problem)
            x, y, bw, bh = (float(v) for v in a["bbox"])  # segmentation validated with the rest just above
            m = (crowd_masks[id(a)] if id(a) in crowd_masks else self._rasterise(a, image_id)).astype(bool)
            label = self.cat_to_label[a["category_id"]]
            if a.get("iscrowd", 0):
                into = crowd
            elif bw < 1 or bh < 1 or not m.any():
                into = untrained
            else:
                into = found
            into["masks"].append(m)
            into["labels"].append(label)
            into["boxes"].append((x, y, x + bw, y + bh))
            into["areas"].append(float(a.get("area", m.sum())))
            into["bboxes"].append([x, y, bw, bh])  # as the file has it: COCO's box IoU is taken on these
        masks, labels, boxes, areas = found["masks"], found["labels"], found["boxes"], found["areas"]
        # larger objects painted first, smaller ones on top: by the file's area, else the mask's pixels
        for i in sorted(range(len(masks)), key=lambda i: -areas[i]):
            semantic[masks[i]] = labels[i]

        def scored_only(part: dict[str, list]) -> dict:
            return {"masks": np.stack(part["masks"]) if part["masks"] else np.zeros((0, h, w), bool),
                    "labels": part["labels"], "boxes": part["boxes"], "areas": part["areas"], "bboxes": part["bboxes"]}

        return Sample(
            image=image, mask=semantic, name=Path(image_ref).stem,
            instance_masks=np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool),
            instance_labels=np.asarray(labels, dtype=np.int64),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            meta={"image_id": image_id, "image_path": image_ref, "areas": areas, "bboxes": found["bboxes"],
                  "crowd": scored_only(crowd), "untrained": scored_only(untrained)},
        )

    def _mask(self, a: dict, image_id: int) -> np.ndarray:
        """Annotation ``a``'s uint8[H, W] mask by pycocotools, its segmentation validated first (never
        a polygon point far out or an RLE pycocotools cannot decode: it would crash or read garbage)."""
        info = self.coco.imgs[image_id]
        problem = segmentation_problem(a["segmentation"], int(info["height"]), int(info["width"]))
        if problem is not None:
            self._refuse(a, image_id, problem)
        return self._rasterise(a, image_id)

    def _rasterise(self, a: dict, image_id: int) -> np.ndarray:
        """:meth:`_mask` for an annotation whose segmentation was validated already."""
        try:
            return self.coco.annToMask(a)
        except (ValueError, TypeError) as e:  # what the validation does not foresee
            self._refuse(a, image_id, f"has a segmentation pycocotools cannot read ({type(e).__name__}: {e})")

    def _refuse(self, a: dict, image_id: int, problem: str) -> NoReturn:
        raise UserError(f"{self.ann_file}: annotation {a.get('id')} of image {image_id} {problem}; fix it or "
                        "use --skip-invalid")

    def check_item(self, image_ref: str, mask_ref: str | None, labels: bool = True) -> list[Problem]:
        """Image readable with the size the JSON states and an id no other image entry has;
        annotations have ids no other annotation has, known categories, a segmentation, a box
        of non-negative size inside the image and a non-negative area."""
        problems: list[Problem] = []
        image_id = self.image_id_of(mask_ref)
        ref = str(mask_ref)
        info = self.coco.imgs[image_id]
        if image_id in self.duplicate_image_ids:
            problems.append(Problem(ref, self._duplicate_image_text(image_id)))
        try:
            size = probe(image_ref)[0]
            if size != (int(info["width"]), int(info["height"])):
                problems.append(Problem(image_ref, f"image is {size[0]}x{size[1]} but the annotations say "
                                                   f"{info['width']}x{info['height']}"))
        except UserError as e:
            problems.append(problem_from_error(image_ref, e))
        shared: set = set()
        for a in self.coco.imgToAnns.get(image_id, []):
            what = f"annotation {a.get('id')}"
            if a.get("id") in self.duplicate_ann_ids and a.get("id") not in shared:
                shared.add(a.get("id"))
                others = self.duplicate_ann_ids[a.get("id")]
                images = ", ".join(str(b.get("image_id")) for b in others)
                problems.append(Problem(ref, f"annotation id {a.get('id')} is used by {len(others)} annotations of the "
                                             f"file (of images {images}); pycocotools scores the last of them in place "
                                             "of each: give each annotation its own id"))
            if a.get("category_id") not in self.cat_to_label:
                problems.append(Problem(ref, f"{what} has unknown category_id {a.get('category_id')!r}"
                                        + (" (a string: ids are numbers)" if isinstance(a.get("category_id"), str)
                                           else "")))
            elif not a.get("segmentation"):
                problems.append(Problem(ref, f"{what} has no segmentation"))
            elif problem := annotation_problem(a, int(info["height"]), int(info["width"])):
                problems.append(Problem(ref, f"{what} {problem}"))
            else:
                x, y, bw, bh = (float(v) for v in a["bbox"])
                reach = POLYGON_TOLERANCE  # as far as on the right and bottom, and as the polygon's points
                if (x < -reach or y < -reach or x + bw > info["width"] + reach
                        or y + bh > info["height"] + reach):
                    problems.append(Problem(ref, f"{what} has bbox {a.get('bbox')} outside the "
                                                      f"{info['width']}x{info['height']} image"))
        return problems

    def _duplicate_image_text(self, image_id: int) -> str:
        files = ", ".join(str(i.get("file_name")) for i in self.duplicate_image_ids[image_id])
        return (f"image id {image_id} is listed {len(self.duplicate_image_ids[image_id])} times (files {files}); "
                "pycocotools keeps the last entry and gives it the objects of all: give each image its own id")


def _duplicates(entries: list) -> dict:
    """{id: [entries with that id]} for the ids that more than one entry has."""
    by_id: dict = {}
    for entry in entries:
        if isinstance(entry, dict):
            by_id.setdefault(entry.get("id"), []).append(entry)
    return {k: v for k, v in by_id.items() if len(v) > 1}


def _number(value: object) -> float:
    """``value`` if it is a finite number, else 0 (for sorting by ``area`` before the check names it)."""
    return float(value) if finite_number(value) else 0.0


def _thin_box(a: dict) -> bool:
    """Whether annotation ``a`` has a bbox under 1 px wide or tall, which ``load`` does not train on."""
    box = a.get("bbox")
    return _is_box(box) and min(box[2:]) < 1


def _is_box(box: object) -> TypeGuard[list | tuple]:
    return (isinstance(box, list | tuple) and len(box) == 4
            and all(finite_number(v) for v in box))


def _distinct_names(cats: list[dict]) -> list[str]:
    """"background" and the categories' names, in id order, each its own: a missing or empty name is
    ``category_<id>``, and a name that another category (or background) has is followed by its id, so
    that reports and the legend tell them apart (public annotation files do repeat names)."""
    counts = Counter(c.get("name") for c in cats)
    names = ["background"]
    for c in cats:
        name = c.get("name")
        name = name if isinstance(name, str) and name.strip() else f"category_{c['id']}"
        if counts[name] > 1 or name in names:
            name = f"{name} (id {c['id']})"
        names.append(name)
    return names


def _whole_number(value: object) -> bool:
    """An id pixelwise can use: an integer, or a float of integer value (1.0), as JSON writers give."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and finite(value)
            and float(value).is_integer())


def _positive_int(value: object) -> bool:
    """A width or height: a whole number (40, or 40.0 as some JSON writers give) above 0."""
    return _whole_number(value) and value > 0  # type: ignore[operator]


def annotation_problem(a: dict, height: int, width: int) -> str | None:
    """What makes annotation ``a`` (with a segmentation) unreadable on a ``width x height`` image:
    a bbox that is not four finite numbers or has a negative width or height, an ``iscrowd`` other
    than 0 or 1, an ``area`` that is not a non-negative number, or a segmentation problem
    (:func:`segmentation_problem`); None if it is readable."""
    box = a.get("bbox")
    if not _is_box(box):
        return f"has bbox {box!r}, not [x, y, width, height]"
    if box[2] < 0 or box[3] < 0:
        return f"has bbox {box!r} of negative width or height (COCO boxes are [x, y, width, height])"
    crowd = a.get("iscrowd", 0)
    if not (isinstance(crowd, int | float) and crowd in (0, 1)):  # JSON's true/false are 1/0 here, as for pycocotools
        return f"has iscrowd {crowd!r}, not 0 or 1"
    area = a.get("area", 0.0)
    if not (finite_number(area) and area >= 0):
        return f"has area {area!r}, not a non-negative number (COCO's evaluation ignores such an object)"
    return segmentation_problem(a["segmentation"], height, width)


def segmentation_problem(seg: object, height: int, width: int) -> str | None:
    """What keeps pycocotools from reading segmentation ``seg`` safely on a ``width x height``
    image: a polygon of fewer than three points, an odd number of coordinates, a coordinate that is
    not a finite number or lies more than :data:`POLYGON_TOLERANCE` px outside the image; an RLE of
    another size, or whose counts (a list, or COCO's compressed string, decoded here by
    :func:`rle_counts_from_string`, not by pycocotools) are not non-negative integers summing to
    ``height * width``. None if it is readable."""
    if isinstance(seg, list):
        for poly in seg:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                    and all(isinstance(v, int | float) and not isinstance(v, bool) for v in poly)):
                return "has a polygon that is not x1, y1, x2, y2, ... of three points or more"
            for i, v in enumerate(poly):
                limit = width if i % 2 == 0 else height
                # ints compare exactly (no float conversion, which huge ints would overflow); NaN fails both
                if not (isinstance(v, int) or math.isfinite(v)) or not (
                        -POLYGON_TOLERANCE <= v <= limit + POLYGON_TOLERANCE):
                    point = f"({poly[i - i % 2]!r}, {poly[i - i % 2 + 1]!r})"
                    return (f"has polygon point {point} outside the {width}x{height} image (more than "
                            f"{POLYGON_TOLERANCE:g} px past its border)")
        return None
    if isinstance(seg, dict):
        size = seg.get("size")
        if not isinstance(size, list | tuple) or list(size) != [height, width] or "counts" not in seg:
            return f"has an RLE of size {size!r} on a {width}x{height} image (size is [height, width])"
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                return "has an RLE whose counts are not all non-negative integers"
            what = "counts"
        elif isinstance(counts, str | bytes):
            try:
                counts = rle_counts_from_string(counts)
            except ValueError as e:
                return f"has an RLE whose compressed counts are invalid ({e})"
            if any(c < 0 for c in counts):
                return "has an RLE whose compressed counts decode to a negative count"
            what = "compressed counts"
        else:
            return f"has an RLE whose counts are a {type(counts).__name__}, not a list or a compressed string"
        total = sum(counts)
        if total != height * width:
            return (f"has an RLE whose {what} cover {total} pixels, not the {height}x{width} = "
                    f"{height * width} of the image")
        return None
    return f"has a segmentation of type {type(seg).__name__}, not polygons or an RLE"


#: Characters a value of a compressed RLE may take at most: 13 * 5 bits hold any 64-bit count
#: (pycocotools reads into a C long); longer ones would only be slow to decode here.
_MAX_RLE_CHARS = 13


def rle_counts_from_string(counts: str | bytes) -> list[int]:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``, decoded here
    so that a broken string is reported rather than read past its end by pycocotools): each value
    in characters ``chr(48 + b)`` of 6 bits ``b``, 5 data bits (least significant first) and a
    continuation bit 0x20; on a value's last character 0x10 is the sign. From the fourth value on
    (index > 2, as ``rleFrString`` has it) a value is the difference to the count two before.
    Raises ValueError on a character outside ``'0'..'o'`` or a value cut off by the end of the
    string. Counts are returned as decoded: the caller checks that they are non-negative."""
    data = [ord(ch) for ch in counts] if isinstance(counts, str) else list(counts)
    out: list[int] = []
    p, n = 0, len(data)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError(f"the string ends inside value {len(out) + 1}")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {chr(data[p])!r} at {p} is not one of '0'..'o'")
            if k == _MAX_RLE_CHARS:
                raise ValueError(f"value {len(out) + 1} is longer than {_MAX_RLE_CHARS} characters")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out
