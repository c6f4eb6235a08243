"""``pixelwise data inspect``: counts, sizes, class frequencies, median-frequency weights, problems.

Report keys (JSON-ready): ``num_images``, ``class_names``, ``class_pixels`` (pixels per class),
``ignored_pixels`` (pixels labelled 255), ``image_sizes`` ({"WxH": count}, most common first),
``median_freq_weights`` (per class; ``null`` for a class that never occurs), ``problems``
(``"path: message"`` strings from ``check()`` and from decoding every sample), ``notes`` (what is
not a problem but changes training: :meth:`SegmentationDataset.notes`, e.g. COCO boxes under 1 px
that are not trained on, and images of several sizes, which a semantic batch cannot stack). The
items ``check()``
flags are not decoded or counted: the statistics are those of the data ``train`` and ``eval`` use
with ``--skip-invalid``.

Instance data (COCO, the generated shapes) adds ``objects`` (per class: the objects an instance
model trains on), ``crowd_regions`` (per class: ``iscrowd`` regions, scored as COCO scores them,
neither right nor wrong), ``untrained_objects`` (objects of a box under 1 px or an empty mask: not
trained on, scored as objects) and ``images_without_objects`` (images with nothing to train on;
``skip_empty`` leaves them out of training).

Median-frequency balancing (SegNet, Eigen & Fergus): ``freq(c) = pixels of c / total pixels of
the images that contain c`` (all pixels of those images, ignored ones included, as in SegNet);
``weight(c) = median(freq over the classes that occur) / freq(c)``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from pixelwise.data.base import IGNORE_INDEX, SegmentationDataset, check_dataset
from pixelwise.errors import UserError, shown
from pixelwise.runtime import progress as progress_bar


def median_frequency_weights(class_pixels: np.ndarray,
                             present_image_pixels: np.ndarray) -> list[float | None]:
    """int[C] pixels per class and int[C] summed sizes of the images containing each class ->
    per-class weights (``None`` where the class never occurs)."""
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    totals = np.asarray(present_image_pixels, dtype=np.float64)
    present = class_pixels > 0
    if not present.any():
        return [None] * len(class_pixels)
    freq = np.where(present, class_pixels / np.maximum(totals, 1), np.nan)
    med = float(np.median(freq[present]))
    return [float(med / f) if p else None for f, p in zip(freq, present)]


def label_presence(dataset: SegmentationDataset) -> tuple[bool, bool]:
    """(whether any mask has a labelled pixel, whether any has a pixel of a class other than 0),
    reading the masks only (not the images) and stopping as soon as both are found; (True, True)
    for readers without mask files (the generated shapes). Masks that cannot be read are passed
    over: the dataset check names them."""
    own = getattr(dataset, "label_presence", None)
    if own is not None:  # a reader whose masks are drawn from annotations (COCO) says it from them
        return own()
    items = getattr(dataset, "items", None)
    if items is None or not hasattr(dataset, "read_raw_mask") or not hasattr(dataset, "map_mask"):
        return True, True
    c = dataset.num_classes
    labelled = foreground = False
    for _, mask_ref in items:
        if mask_ref is None:
            continue
        try:
            mask = dataset.map_mask(dataset.read_raw_mask(mask_ref))
        except UserError:
            continue
        counts = np.bincount(mask.ravel(), minlength=256)
        labelled = labelled or bool(counts[:c].any())
        foreground = foreground or bool(counts[1:c].any())
        if labelled and foreground:
            break
    return labelled, foreground


def image_sizes(dataset: SegmentationDataset, limit: int = 2) -> list[tuple[int, int]]:
    """Up to ``limit`` distinct (height, width) of the dataset's images, from their headers; [] for
    readers without image files."""
    items = getattr(dataset, "items", None)
    if items is None or not hasattr(dataset, "image_size"):
        return []
    found: list[tuple[int, int]] = []
    for image_ref, _ in items:
        try:
            w, h = dataset.image_size(image_ref)
        except UserError:
            continue
        if (h, w) not in found:
            found.append((h, w))
            if len(found) >= limit:
                break
    return found


def inspect_dataset(dataset: SegmentationDataset, progress: bool | None = None) -> dict:
    """Decode every raw sample of ``dataset`` (no augmentation) and summarise it (keys above)."""
    check_dataset("inspect_dataset", dataset)
    c = dataset.num_classes
    found = dataset.check()
    # what the reader's own skip_invalid option already left out is a problem all the same
    problems: list[str] = [f"{p} (left out by skip_invalid)" for p in getattr(dataset, "dropped", [])]
    problems += [str(p) for p in found]
    bad_paths = {p.path for p in found}  # their files fail to load too: named once
    items = getattr(dataset, "items", None)  # file readers: (image, mask) refs, as check() names them
    class_pixels = np.zeros(c, dtype=np.int64)
    present_pixels = np.zeros(c, dtype=np.int64)
    ignored = 0
    sizes: Counter = Counter()
    instance = getattr(dataset, "task", "") == "instance"
    objects = np.zeros(c, dtype=np.int64)
    crowds = np.zeros(c, dtype=np.int64)
    untrained = without_objects = 0
    indices = progress_bar(range(len(dataset)), "inspect", progress, unit="img", leave=False)
    num_images = 0
    for i in indices:
        if items is not None and bad_paths.intersection(items[i]):
            continue  # left out, as --skip-invalid leaves it out of train and eval (a frame 0 may still load)
        try:
            sample = dataset.load(i)
        except UserError as e:
            if str(e).split(": ", 1)[0] not in bad_paths:  # the file itself, not one of its stem
                problems.append(str(e))
            continue
        num_images += 1
        h, w = sample.mask.shape
        sizes[f"{sample.image.shape[1]}x{sample.image.shape[0]}"] += 1
        counts = np.bincount(sample.mask.ravel(), minlength=256)
        ignored += int(counts[IGNORE_INDEX])
        if counts[c:IGNORE_INDEX].any():
            bad = np.flatnonzero(counts[c:IGNORE_INDEX]) + c
            problems.append(f"{sample.name}: class ids {bad.tolist()} outside the {c} classes")
        class_pixels += counts[:c]
        present_pixels += np.where(counts[:c] > 0, h * w, 0)
        if instance:
            labels = np.asarray(sample.instance_labels if sample.instance_labels is not None else [], np.int64)
            objects += np.bincount(labels, minlength=c)[:c]
            crowds += np.bincount(np.asarray(sample.meta.get("crowd", {}).get("labels", []), np.int64),
                                  minlength=c)[:c]
            untrained += len(sample.meta.get("untrained", {}).get("labels", []))
            without_objects += not len(labels)
    notes = list(dataset.notes())
    if len(sizes) > 1:  # a semantic model's training batch stacks images of one size
        notes.append(f"images of {len(sizes)} sizes: training a semantic model in batches of several needs --crop "
                     "HxW or an augment resize (or --batch-size 1); Mask R-CNN takes them as they are")
    if num_images and not class_pixels.any():  # e.g. Cityscapes' test split, whose labels are withheld
        notes.append("no labelled pixel in this split (every pixel is 255, ignore): eval can score nothing on it")
    elif num_images and ignored and c > 1 and not class_pixels[1:].any():
        problems.append(f"every labelled pixel is class 0 and {ignored:,} are 255 (ignore): " + (
            "the split's only objects are crowd regions (iscrowd 1), so an instance model has nothing to train on "
            "or score" if instance  # COCO: its 255 are crowds
            else "if these are binary masks with the foreground stored as 255, store it as 1 (255 means 'ignore' "
                 "here)"))
    report = {
        "num_images": num_images,
        "class_names": list(dataset.class_names),
        "class_pixels": class_pixels.tolist(),
        "ignored_pixels": ignored,
        "image_sizes": dict(sizes.most_common()),
        "median_freq_weights": median_frequency_weights(class_pixels, present_pixels),
        "problems": list(dict.fromkeys(problems)),
        "notes": notes,
    }
    if instance:
        report.update(objects=objects.tolist(), crowd_regions=crowds.tolist(), untrained_objects=untrained,
                      images_without_objects=without_objects)
    return report


def format_report(report: dict, max_problems: int = 20) -> str:
    """A terminal table of :func:`inspect_dataset`'s report."""
    pixels = np.asarray(report["class_pixels"], dtype=np.int64)
    total = int(pixels.sum()) + int(report["ignored_pixels"])
    lines = [f"images: {report['num_images']}   classes: {len(report['class_names'])}   "
             f"pixels: {total:,} ({report['ignored_pixels']:,} ignored)"]
    sizes = ", ".join(f"{k} x{v}" for k, v in list(report["image_sizes"].items())[:5])
    more = len(report["image_sizes"]) - 5
    lines.append(f"sizes (width x height): {sizes}" + (f" (+{more} more)" if more > 0 else ""))
    names = [shown(n) for n in report["class_names"]]  # a classes.json's names: no escape sequences run
    width = max([len("class")] + [len(n) for n in names])
    instance = "objects" in report  # instance data: objects and crowd regions per class
    lines.append(f"{'class':<{width}}  {'pixels':>14}  {'share':>7}  {'mf weight':>9}"
                 + (f"  {'objects':>9}  {'crowds':>7}" if instance else ""))
    for i, (name, n, wgt) in enumerate(zip(names, pixels, report["median_freq_weights"])):
        share = 100.0 * n / total if total else 0.0
        lines.append(f"{name:<{width}}  {int(n):>14,}  {share:>6.2f}%  "
                     f"{('-' if wgt is None else f'{wgt:.4f}'):>9}"
                     + (f"  {report['objects'][i]:>9,}  {report['crowd_regions'][i]:>7,}" if instance else ""))
    if instance:
        lines.append(f"objects: {sum(report['objects']):,} trained on, {report['untrained_objects']:,} not "
                     f"(a box under 1 px or an empty mask; scored by eval); images without an object to train "
                     f"on: {report['images_without_objects']:,}")
    probs = report["problems"]
    lines.append(f"problems: {len(probs)}" if probs else "problems: none")
    lines += [f"  {shown(p)}" for p in probs[:max_problems]]
    if len(probs) > max_problems:
        lines.append(f"  ... and {len(probs) - max_problems} more")
    lines += [f"note: {shown(n)}" for n in report.get("notes", [])]
    return "\n".join(lines)
