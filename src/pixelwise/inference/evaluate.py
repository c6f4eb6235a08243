"""``pixelwise eval``: a checkpoint on a dataset split, image by image through the same predictor
that ``predict`` uses, so the metrics equal those computed from the masks ``predict`` writes
(``tests/test_eval_consistency.py``), which :func:`evaluate_predictions` scores (``eval
--predictions``) with the same code.

Semantic keys: ``pixel_acc mean_acc mIoU fwIoU dice per_class num_images`` (from the
``confusion_matrix``, also given: pixel counts, rows ground truth, columns prediction; see
:mod:`pixelwise.metrics`), ``per_image`` (each image's ``name pixels pixel_acc mean_acc mIoU dice``
from its own confusion matrix, and its ``bf`` and ``boundary_iou``, to find the worst),
``bf_score`` (SegNet's boundary F1) and ``boundary_iou`` (Cheng et al.'s Boundary IoU;
``bf=False`` skips both boundary metrics, per image too) and,
for data whose class ``rand_foreground`` holds the objects (``isbi2012``'s cells), ``pixel_error
rand_error rand_precision rand_recall`` (ISBI 2012 challenge definitions at the argmax) and
``rand_error_best rand_best_threshold pixel_error_best pixel_best_threshold`` (the challenge's
leaderboard forms: 1 - the best Rand F, and 1 - the best F-score of cell pixels, over
probability thresholds 0.0, 0.1, ..., 0.9). Instance keys: COCO ``mask_AP mask_AP50 mask_AP75 box_AP`` and the rest,
and Boundary AP ``boundary_AP ...`` (not with ``bf=False``).
Definitions: docs/metrics.md. Every result also records the ``input`` contract it was scored with
and its ``provenance``: checkpoint path and SHA-256, dataset kind, root, split and options, the
files the check left out, resize, tile, TTA, and the pixelwise and torch versions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pixelwise import ops
from pixelwise._version import __version__
from pixelwise.coco_eval import coco_evaluate, decode_mask
from pixelwise.data import Sample, SegmentationDataset, build_dataset, sample_target, scoring_kwargs
from pixelwise.data.base import check_dataset
from pixelwise.data.coco import segmentation_problem
from pixelwise.data.download import file_sha256
from pixelwise.data.files import split_fingerprint
from pixelwise.data.io import png_text, read_mask
from pixelwise.errors import UserError, brief, finite_number, listed
from pixelwise.inference.cells import with_boundaries
from pixelwise.inference.crf import CRFSettings, check_crf_size
from pixelwise.inference.ensemble import from_checkpoints
from pixelwise.inference.predictor import InstancePredictor, Predictor, SemanticPredictor
from pixelwise.metrics import (
    BFMeter,
    BoundaryIoUMeter,
    ChallengeMeter,
    ConfusionMeter,
    RandMeter,
    pixel_error,
    segmentation_metrics,
)
from pixelwise.runtime import progress as progress_bar

PER_IMAGE_KEYS = ("pixel_acc", "mean_acc", "mIoU", "dice")  # each image's own confusion matrix's


# one image's (mask, (map, cell probability) for the ISBI meter or None) from its sample and index
Predicted = Callable[[Sample, int], tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]]


def _check_arguments(call: str, predictor: object, kind: type, ds: object) -> None:
    """A TypeError naming what ``call`` takes, for a path or a list where a predictor or a dataset
    reader goes (an AttributeError deep inside: "'str' object has no attribute 'meta'")."""
    if not isinstance(predictor, kind):
        article = "an" if kind.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"{call} takes {article} {kind.__name__}, such as Predictor.from_checkpoint(path) (or "
                        f"evaluate_checkpoint(path, ...) for a file), got {type(predictor).__name__} "
                        f"{brief(predictor)}")
    check_dataset(call, ds)


def evaluate_semantic(predictor: SemanticPredictor, ds: SegmentationDataset, progress: bool | None = None,
                      bf: bool = True, watershed: float | None = None) -> dict:
    """Confusion-matrix metrics (+ BF score and Boundary IoU unless ``bf`` is False, + ISBI errors
    where ``ds.rand_foreground`` is set) of the predictor's masks against each image's
    full-resolution labels. ``watershed``: the ISBI errors score the cell probability with the
    boundaries of its watershed cells, seeded at this threshold, drawn in
    (:func:`~pixelwise.inference.cells.with_boundaries`); the confusion-matrix metrics stay those
    of the network's masks."""
    _check_arguments("evaluate_semantic", predictor, SemanticPredictor, ds)
    check_same_classes(predictor.meta, ds)
    fg = ds.rand_foreground
    if watershed is not None and fg is None:
        raise UserError("--watershed segments cells from a membrane map: it applies to data with cells to count, "
                        "such as isbi2012; leave it out for this dataset")

    def predicted(sample: Sample, _: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        # the probabilities only where the ISBI meter reads them: a large image's would be C x H x W floats
        prediction = predictor.predict(sample.image, probs=fg is not None)
        if fg is None:
            return prediction.mask, None
        assert prediction.probs is not None
        pred, prob = prediction.mask, prediction.probs[fg].numpy()
        if watershed is not None:
            prob = with_boundaries(prob, watershed)
            pred = np.where((prob == 0) & (pred == fg), -1, pred)  # -1: a boundary, not a cell
        return prediction.mask, (pred, prob)

    return score_semantic(ds, predicted, progress, bf)


def score_semantic(ds: SegmentationDataset, predicted: Predicted, progress: bool | None = None,
                   bf: bool = True) -> dict:
    """The semantic metrics (module docstring) of the masks ``predicted(sample, index)`` gives for
    each image of ``ds``. For data with cells to count (``ds.rand_foreground``), the ISBI errors:
    all of them from the maps and cell probabilities it gives with each mask, or, where it gives
    none (masks read from files), those at the argmax (``rand_error rand_precision rand_recall
    rand_f pixel_error``), from the masks."""
    meter = ConfusionMeter(ds.num_classes)
    bf_meter = BFMeter(ds.num_classes) if bf else None
    biou_meter = BoundaryIoUMeter(ds.num_classes) if bf else None
    fg = ds.rand_foreground
    rand = ChallengeMeter(foreground=fg) if fg is not None else None
    at_argmax = RandMeter(foreground=fg) if fg is not None else None
    with_probs = False  # whether predicted gave the cell probabilities (else the errors at the argmax)
    per_image = []
    for i in progress_bar(range(len(ds)), "eval", progress):
        sample = ds.load(i)
        mask, isbi = predicted(sample, i)
        image_cm = meter.update(mask, sample.mask)
        image = segmentation_metrics(image_cm)
        per_image.append({"name": sample.name or str(i), "pixels": int(image_cm.sum()),
                          **{k: image[k] for k in PER_IMAGE_KEYS}})
        if bf_meter is not None and biou_meter is not None:
            per_image[-1]["bf"] = bf_meter.update(mask, sample.mask)
            per_image[-1]["boundary_iou"] = biou_meter.update(mask, sample.mask)
        if rand is not None and isbi is not None:
            rand.update(*isbi, sample.mask)
            with_probs = True
        elif at_argmax is not None:
            at_argmax.update(mask, sample.mask)
    metrics = meter.compute(list(ds.class_names))
    metrics["confusion_matrix"] = meter.cm.tolist()  # pixels: rows ground truth, columns prediction
    metrics["per_image"] = per_image
    if bf_meter is not None and biou_meter is not None:
        bf_result = bf_meter.compute()
        metrics["bf_score"] = bf_result["bf_score"]
        for row, value in zip(metrics["per_class"], bf_result["per_class_bf"]):
            row["bf"] = value
        biou_result = biou_meter.compute()
        metrics["boundary_iou"] = biou_result["boundary_iou"]
        for row, value in zip(metrics["per_class"], biou_result["per_class_boundary_iou"]):
            row["boundary_iou"] = value
    if rand is not None and at_argmax is not None:
        metrics["pixel_error"] = pixel_error(meter.cm)
        metrics.update(rand.compute() if with_probs else at_argmax.compute())
    metrics["num_images"] = len(ds)
    return metrics


def evaluate_instances(predictor: InstancePredictor, ds: SegmentationDataset, progress: bool | None = None,
                       boundary: bool = True) -> dict:
    """COCO AP of the predictor's detections (all scores) over a dataset split, with Boundary AP
    unless ``boundary`` is False; refused when the checkpoint's classes (number, names, COCO
    category ids where both record them) are not the data's."""
    _check_arguments("evaluate_instances", predictor, InstancePredictor, ds)
    check_same_classes(predictor.meta, ds)
    predictions, targets = [], []
    for i in progress_bar(range(len(ds)), "eval", progress):
        sample = ds.load(i)
        predictions.append(predictor.predict(sample.image))
        targets.append(sample_target(sample))
    return coco_evaluate(predictions, targets, class_ids=range(1, ds.num_classes), boundary=boundary)


def check_class_count(meta: dict, ds: SegmentationDataset) -> None:
    """Refuse (one-line UserError) a checkpoint that predicts another number of classes than the data has."""
    n = meta.get("num_classes", ds.num_classes)
    if n != ds.num_classes and getattr(ds, "classes_inferred", False) and ds.num_classes < n:
        # a folder without classes.json counts the labels its masks hold: a test folder may lack the last
        raise UserError(f"the checkpoint predicts {n} classes but the data's masks were read as {ds.num_classes} "
                        "(a folder without classes.json takes its class count from the labels its masks hold, and "
                        f"these lack the last); pass --dataset-kwargs '{{\"num_classes\": {n}}}' (Python: "
                        "dataset_kwargs) or add a classes.json")
    if n != ds.num_classes:
        raise UserError(f"the checkpoint predicts {n} classes but the data has {ds.num_classes}; evaluate on the "
                        "dataset it was trained for")


def check_same_classes(meta: dict, ds: SegmentationDataset) -> None:
    """Refuse (one-line UserError) to score a checkpoint on data whose classes are other ones: a
    different number, other names (where the checkpoint records names) or other COCO category ids
    (where both record them). Labels are positions in the class list, so such a pairing would
    compare one class's masks or detections with another class's pixels or objects, and report them
    under the data's names. Names are compared only where both sides have real ones: a folder
    dataset without classes.json calls its classes ``class_0``, ``class_1``, ..."""
    check_class_count(meta, ds)
    names, data_names = meta.get("class_names"), list(ds.class_names)
    if names and not _generic(names) and not _generic(data_names) and list(names) != data_names:
        i = next((i for i, (a, b) in enumerate(zip(names, data_names)) if a != b), min(len(names), len(data_names)))
        raise UserError(f"the checkpoint's classes are {listed(names)} but the data's are {listed(data_names)} "
                        f"(the first that differs: class {i}); evaluate on the dataset it was trained for (a folder "
                        "dataset names its classes in classes.json)")
    ids, data_ids = meta.get("category_ids"), getattr(ds, "category_ids", None)
    if ids and data_ids is not None and list(ids) != list(data_ids):
        raise UserError(f"the checkpoint's classes have COCO category ids {listed(ids)} but the data's have "
                        f"{listed(data_ids)}; evaluate on the dataset it was trained for")


def _generic(names: list) -> bool:
    return list(names) == [f"class_{i}" for i in range(len(names))]


def evaluate_checkpoint(checkpoint: str | list[str], dataset: str, data: str | None, split: str = "val", *,
                        device: str = "cpu", dataset_kwargs: dict | None = None, progress: bool | None = None,
                        bf: bool = True, resize: tuple[int, int] | None = None, native_size: bool = False,
                        skip_invalid: bool = False, watershed: float | None = None, **options) -> dict:
    """Metrics of ``checkpoint`` (a list of paths: their ensemble, see
    :mod:`pixelwise.inference.ensemble`) on ``dataset``/``split`` (keys: module docstring), plus
    ``provenance``: where the numbers came from (:func:`provenance`).

    The data is checked as training checks it: problems are refused unless ``skip_invalid``,
    which leaves those files out (listed in ``provenance["skipped"]``).
    bf: also compute the boundary metrics: the BF score and Boundary IoU of a semantic model
    (0.15 s and 0.025 s per 360x480 image on a CPU core), Boundary AP of an instance model.
    watershed: score the ISBI errors on the map with watershed boundaries seeded at this threshold
    (:func:`evaluate_semantic`).
    resize / native_size: override the checkpoint's input size (see
    :meth:`Predictor.from_checkpoint`); ``options`` (tile, overlap, tta, mc_samples, crf) go to the
    semantic predictor."""
    dataset_kwargs, _ = scoring_kwargs(dataset, dataset_kwargs or {})  # every image is scored
    ds = build_dataset(dataset, data, split, **dataset_kwargs)
    # one path (a str or a pathlib.Path, which was iterated as "not iterable"), or a list of them
    paths = [checkpoint] if isinstance(checkpoint, str | os.PathLike) else list(checkpoint)
    predictor = from_checkpoints(paths, device, resize=resize, native_size=native_size, **options)
    if isinstance(predictor, InstancePredictor):
        predictor.score_thresh = 0.0  # AP ranks every detection
    skipped = ds.check_or_refuse(skip_invalid, "evaluate")
    skipped = getattr(ds, "dropped", skipped)  # with those the reader's own skip_invalid option dropped
    crf = getattr(predictor, "crf", None)
    if crf is not None:
        check_crf_sizes(ds, crf)
    if isinstance(predictor, InstancePredictor):
        if not ds.has_instances():
            raise UserError(f"{paths[0]} holds an instance model ({predictor.meta.get('model')}), and {dataset} data "
                            "has no instance annotations to score it on; evaluate it on a dataset with instances "
                            "(shapes, coco)")
        if watershed is not None:
            raise UserError("--watershed segments cells from a semantic membrane map, not from an instance "
                            "model's detections; leave it out")
        metrics = evaluate_instances(predictor, ds, progress, bf)
    else:
        assert isinstance(predictor, SemanticPredictor)
        metrics = evaluate_semantic(predictor, ds, progress, bf, watershed)
    members = getattr(predictor, "members", [predictor])  # an ensemble's members each see the data their way
    specs = [m.input_spec.to_dict() for m in members]
    metrics["input"] = specs[0] if all(s == specs[0] for s in specs) else specs
    metrics["provenance"] = provenance(paths[0], predictor, dataset, data, split, dataset_kwargs or {},
                                       [str(p) for p in skipped])
    # an ensemble's: the member that trained on most of these images says it (its options with it);
    # members that trained on the same split (seeds of one recipe) draw it, and read its files, once
    splits = {json.dumps([m.meta.get("dataset"), m.meta.get("data")], sort_keys=True, default=str): m.meta
              for m in members}
    counted = [(n, meta) for meta in splits.values() if (n := training_images(meta, ds, dataset, data)) is not None]
    if counted:
        trained, meta = max(counted, key=lambda c: c[0])
        metrics["provenance"]["dataset"].update(training_images=trained,
                                                trained_with=meta["data"].get("dataset_kwargs") or {},
                                                held_out_split=meta["data"].get("val_split", "val"))
    if watershed is not None:
        metrics["provenance"]["watershed"] = watershed
    if len(paths) > 1:  # an ensemble: every member's file, contract and options
        metrics["provenance"]["ensemble"] = [
            {"checkpoint": str(Path(p).resolve()), "checkpoint_sha256": file_sha256(p), "input": spec,
             "prediction": prediction_options(m)} for p, m, spec in zip(paths, members, specs)]
    return metrics


def evaluate_predictions(folder: str | Path, dataset: str, data: str | None, split: str = "val", *,
                         dataset_kwargs: dict | None = None, progress: bool | None = None, bf: bool = True,
                         skip_invalid: bool = False) -> dict:
    """The metrics of predictions already written into ``folder``, one per image of
    ``dataset``/``split``, named by its sample name, else its file's stem (the names ``pixelwise
    predict`` gives), scored as :func:`evaluate_checkpoint` scores a model, with the same keys:

    - masks ``<name>.png`` of class ids (``predict``'s, or another tool's): the semantic metrics,
      but of the ISBI errors only those at the argmax (the leaderboard forms need the cell
      probability, which a mask does not hold);
    - on instance data (COCO, shapes), where the first image has a ``<name>.json`` (an instance
      model's ``predict``), those files' detections: COCO AP of what they hold, so equal to
      ``eval --checkpoint``'s where ``predict`` kept every detection (``--score-thresh 0``).

    ``provenance["predictions"]`` names the folder and the records the masks hold
    (``pixelwise.inference.writers.prediction_record``; None for a mask without one). Every image's
    file must be there, of its image's size, with class ids below the data's count: a UserError
    names the first that is not (the missing ones, all of them, before any is scored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--predictions {folder} is not a folder; give the --out folder of `pixelwise predict`")
    dataset_kwargs, _ = scoring_kwargs(dataset, dataset_kwargs or {})  # every image is scored
    ds = build_dataset(dataset, data, split, **dataset_kwargs)
    skipped = ds.check_or_refuse(skip_invalid, "evaluate")
    skipped = getattr(ds, "dropped", skipped)
    items = getattr(ds, "items", None)
    name_of = getattr(ds, "name_of", None)

    def names(i: int) -> tuple[str, ...]:  # the names predict may have given image i
        if items is not None and name_of is not None:
            return name_of(items[i][0]), Path(items[i][0]).stem
        return (ds.load(i).name or str(i),)

    suffix = ".png"
    # detections for any image (not only the first): a folder missing the first image's <name>.json is
    # a folder of detections with one missing, not predict's class maps (<name>.png) to score as masks
    if ds.task == "instance" and any(folder.glob("*.json")) and any(
            _prediction_file(folder, ".json", *names(i)) is not None for i in range(len(ds))):
        suffix = ".json"
    what = "detections" if suffix == ".json" else "mask"
    found: dict[int, Path] = {}
    if items is not None and name_of is not None:  # every file looked for before the first image is scored
        missing = []
        for i in range(len(items)):
            path = _prediction_file(folder, suffix, *names(i))
            if path is None:
                missing.append(f"{names(i)[0]}{suffix}")
            else:
                found[i] = path
        if missing:
            raise UserError(f"--predictions {folder} has no {what} for {len(missing)} of the {len(items)} images of "
                            f"{dataset}/{split} ({listed(missing[:3])}{', ...' if len(missing) > 3 else ''}); predict "
                            "them into it (pixelwise predict ... --out " + str(folder) + ") or score another split")
    records: list[dict | None] = []

    def prediction_file(sample: Sample, i: int) -> Path:
        path = found.get(i) or _prediction_file(folder, suffix, sample.name or str(i))
        if path is None:
            raise UserError(f"--predictions {folder} has no {what} {sample.name or i}{suffix} for that image of "
                            f"{dataset}/{split}; predict it into {folder}")
        record = parse_record(png_text(path.with_name(path.name[:-len(suffix)] + ".png"), RECORD_KEY)
                              if suffix == ".json" else png_text(path, RECORD_KEY))
        if record is not None:  # the models and options, once: not each image's own SHA-256
            record.pop("image", None)
        if record not in records:
            records.append(record)
        return path

    def predicted(sample: Sample, i: int) -> tuple[np.ndarray, None]:
        path = prediction_file(sample, i)
        mask = read_mask(path)
        if mask.shape != sample.mask.shape:
            raise UserError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image {sample.name or i} is "
                            f"{sample.mask.shape[1]}x{sample.mask.shape[0]}; predictions are scored at the image's "
                            "size (as predict writes them)")
        if mask.size and int(mask.max()) >= ds.num_classes:
            raise UserError(f"{path} holds class id {int(mask.max())}, but {dataset} has {ds.num_classes} classes "
                            f"(ids 0-{ds.num_classes - 1}); give masks of class ids (predict's <stem>.png, not its "
                            "overlay) of a model of this dataset's classes")
        return mask, None

    if suffix == ".json":
        detections, targets = [], []
        for i in progress_bar(range(len(ds)), "eval", progress):
            sample = ds.load(i)
            detections.append(read_detections(prediction_file(sample, i), sample.mask.shape, list(ds.class_names),
                                              getattr(ds, "category_ids", None)))
            targets.append(sample_target(sample))
        metrics: dict = coco_evaluate(detections, targets, class_ids=range(1, ds.num_classes), boundary=bf)
    else:
        metrics = score_semantic(ds, predicted, progress, bf)
    metrics["provenance"] = {
        "predictions": {"folder": str(folder.resolve()), "records": records},
        "dataset": dataset_provenance(dataset, data, split, dataset_kwargs, [str(p) for p in skipped]),
        "pixelwise_version": __version__}
    return metrics


def corners_misread(boxes: list[list[float]], masks: list[np.ndarray]) -> tuple[int, int] | None:
    """``(n, m)`` when the boxes of more than half (``n``) of the ``m`` detections whose two readings
    differ fit their masks' extent as COCO's ``[x, y, width, height]`` clearly better than as the
    corners they are read as (IoU with the mask's bounding box at least 0.5 and 0.25 above the corners'
    reading), else None. A box whose mask lies inside it, as a model's does, never qualifies: the
    width-height reading only grows the box, so its IoU with that mask is the lower one."""
    rows = []  # (the box as read, as x, y, width, height, its mask's extent) of each detection that tells
    for box, mask in zip(boxes, masks):
        ys, xs = np.any(mask, axis=1).nonzero()[0], np.any(mask, axis=0).nonzero()[0]
        as_size = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
        if len(ys) and as_size != box:
            rows.append((box, as_size, [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]))
    if not rows:
        return None
    read, sized, extent = (torch.tensor([row[k] for row in rows], dtype=torch.float64) for k in range(3))
    as_corners, as_size_iou = ops.box_iou(read, extent).diagonal(), ops.box_iou(sized, extent).diagonal()
    fits = int(((as_size_iou >= 0.5) & (as_size_iou >= as_corners + 0.25)).sum())
    return (fits, len(rows)) if fits * 2 > len(rows) else None


def read_detections(path: Path, shape: tuple[int, ...], class_names: list[str],
                    category_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """An instance model's ``<stem>.json`` (:func:`pixelwise.inference.writers.instances_json`) for an
    image of ``shape`` (H, W) of data with ``class_names`` -> detections as
    :meth:`InstancePredictor.predict` gives them; a UserError naming the file and what is off (not
    that document, another size or none, a label outside the classes or of another name, a label
    whose ``category_id`` is not the data's id of that class (``category_ids``: a COCO category id
    given as the label, or a model of data of other ids), a score outside [0, 1], a box that is not four numbers x1 <=
    x2, y1 <= y2 (a COCO x, y, width, height box), a mask that is not an RLE of the image's size,
    boxes that fit their masks as x, y, width, height: :func:`corners_misread`)."""
    h, w = shape[:2]
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not readable as predict's detections ({e}); predict the image again") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise UserError(f"{path}: not predict's detections, {{\"width\": W, \"height\": H, \"instances\": [...]}}")
    for key in ("width", "height"):
        if key not in doc:
            raise UserError(f"{path} has no \"{key}\" (the image's size, which predict writes); predict the "
                            "image again, or add its width and height")
    if (doc.get("width"), doc.get("height")) != (w, h):
        raise UserError(f"{path} is for a {doc.get('width')}x{doc.get('height')} image but its image is {w}x{h}; "
                        "predictions are scored at the image's size (as predict writes them)")
    boxes, labels, scores, masks = [], [], [], []
    for k, inst in enumerate(doc["instances"]):
        where = f"{path}: instance {k + 1}"
        inst = inst if isinstance(inst, dict) else {}
        label, name, score, box = inst.get("label"), inst.get("class_name"), inst.get("score"), inst.get("box")
        if not (isinstance(label, int) and not isinstance(label, bool) and 1 <= label < len(class_names)):
            raise UserError(f"{where} has label {label!r}, not one of the data's classes 1-{len(class_names) - 1} "
                            "(0 is the background); give the predictions of a model of this dataset's classes")
        if name is not None and not isinstance(name, str):
            raise UserError(f"{where} has class_name {name!r}, not text; give the class's name, or leave it out")
        if name is not None and name != class_names[label]:
            raise UserError(f"{where} is class {label} {name!r}, which the data names {class_names[label]!r}: the "
                            "model had other classes; give the predictions of a model of this dataset's classes")
        category = inst.get("category_id")
        if category is not None and category_ids and category != category_ids[label]:
            raise UserError(f"{where} has label {label} and category_id {category!r}, but the data's class {label} "
                            f"{class_names[label]!r} has category id {category_ids[label]}: "
                            + ("the model was trained on data of other category ids"
                               if name is not None else
                               f"labels are class indices 1-{len(class_names) - 1} (the category ids "
                               f"{list(category_ids[1:])} in order), not category ids")
                            + "; give the predictions of a model of this dataset's classes")
        if not (finite_number(score) and 0 <= score <= 1):
            raise UserError(f"{where} has score {score!r}, not a number in [0, 1]")
        if not (isinstance(box, list) and len(box) == 4 and all(finite_number(v) for v in box)):
            raise UserError(f"{where} has box {box!r}, not four numbers x1, y1, x2, y2")
        if box[2] < box[0] or box[3] < box[1]:
            raise UserError(f"{where} has box {box!r}, whose x2 < x1 or y2 < y1: not the corners x1, y1, x2, y2 "
                            "(a COCO [x, y, width, height] box?); give its corners, x2 = x + width, y2 = y + height")
        seg = inst.get("segmentation")
        problem = segmentation_problem(seg, h, w) if isinstance(seg, dict) else "has no RLE segmentation"
        if problem:
            raise UserError(f"{where} {problem}")
        assert isinstance(seg, dict)
        masks.append(decode_mask((h, w), seg["counts"]))
        boxes.append([float(v) for v in box])
        labels.append(label)
        scores.append(float(score))
    fit = corners_misread(boxes, masks)
    if fit:
        raise UserError(f"{path}: the boxes of {fit[0]} of its {fit[1]} instances fit their masks as [x, y, width, "
                        "height] (COCO's bbox), not as the corners x1, y1, x2, y2 they are read as; give the "
                        "corners, x2 = x + width, y2 = y + height")
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores, dtype=torch.float32),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.bool)}


RECORD_KEY = "pixelwise"  # the PNG text chunk of the record in every <stem>.png predict writes


def parse_record(text: str | None) -> dict | None:
    """The record (``pixelwise.inference.writers.prediction_record``) a mask's text chunk ``text``
    holds; None for no text, or text that is not a JSON object."""
    try:
        record = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):  # RecursionError: [[[[... nested too deep
        return None
    return record if isinstance(record, dict) else None


def _prediction_file(folder: Path, suffix: str, *names: str) -> Path | None:
    return next((folder / f"{name}{suffix}" for name in names if (folder / f"{name}{suffix}").is_file()), None)


def check_crf_sizes(ds: SegmentationDataset, settings: CRFSettings) -> None:
    """Every image of ``ds`` within the CRF's size and lattice (for ``settings``), read from the
    headers before the first image is predicted (a UserError naming the first that is not; readers
    without image files pass)."""
    items = getattr(ds, "items", None)
    if items is None or not hasattr(ds, "image_size"):
        return
    for image_ref, _ in items:
        w, h = ds.image_size(image_ref)
        check_crf_size(h, w, name=image_ref, settings=settings)


def training_images(meta: dict, ds: SegmentationDataset, dataset: str, data: str | None) -> int | None:
    """How many images of ``ds`` the checkpoint trained on: its recorded training split (the dataset
    options that drew it, such as CamVid's ``val_sequences``, ISBI's ``val_count``) drawn from
    ``data`` again, where that split's files are the ones it trained on (the recorded
    ``train_fingerprint``, :func:`pixelwise.data.files.split_fingerprint`: a copied or moved folder
    counts, another folder of files named alike, such as a separate test folder numbered as the
    training one, does not); None where that
    cannot be told (another dataset kind, a checkpoint without the record, a reader without image
    files, other files). A checkpoint from before 2026-12-06 records no fingerprint: its split is
    taken as drawn from these files."""
    recorded = meta.get("data")
    items = getattr(ds, "items", None)
    if meta.get("dataset") != dataset or not isinstance(recorded, dict) or items is None:
        return None
    try:
        train = build_dataset(dataset, data, str(recorded.get("train_split", "train")),
                              **(recorded.get("dataset_kwargs") or {}))
    except (UserError, TypeError, ValueError):  # that split cannot be drawn from this data: nothing to compare
        return None
    if "train_fingerprint" in recorded and recorded["train_fingerprint"] != split_fingerprint(train):
        return None  # other files: a held-out folder's own train split (by the hash rule) is no training image
    trained = {image for image, _ in getattr(train, "items", [])}
    return sum(1 for image, _ in items if image in trained)


def prediction_options(predictor: Predictor) -> dict[str, object]:
    """How one model saw the data: resize, mode, and for semantic models tile, overlap, TTA, MC samples."""
    spec = predictor.input_spec
    seen: dict[str, object] = {"resize": list(spec.resize) if spec.resize else "native",
                               "mode": getattr(predictor, "mode", "eager")}
    if isinstance(predictor, SemanticPredictor):
        seen.update(tile=predictor.tile, overlap=predictor.overlap if predictor.tile else None, tta=predictor.tta,
                    mc_samples=predictor.mc_samples)
        if seen["mode"] == "int8" and getattr(predictor, "calibration", None):  # int8 masks depend on it
            seen["calibration"] = predictor.calibration
    return seen


def crf_settings(predictor: Predictor) -> dict | None:
    """The fully connected CRF's settings that refined the predictions (None: no CRF)."""
    crf = getattr(predictor, "crf", None)
    return None if crf is None else dataclasses.asdict(crf)


def dataset_provenance(dataset: str, data: str | None, split: str, dataset_kwargs: dict, skipped: list[str]) -> dict:
    """Which data a result scored: kind, root (resolved), split, options and the files left out."""
    return {"kind": dataset, "root": str(Path(data).expanduser().resolve()) if data else None, "split": split,
            "options": dataset_kwargs, "skipped": skipped}


def provenance(checkpoint: str | Path, predictor: Predictor, dataset: str, data: str | None, split: str,
               dataset_kwargs: dict, skipped: list[str]) -> dict:
    """Where a result came from: the checkpoint (path and SHA-256), the data (kind, root, split,
    options, files left out), how the model saw it (resize, mode, tile, overlap, TTA, MC samples, CRF) and
    the pixelwise and torch versions."""
    views = [prediction_options(m) for m in getattr(predictor, "members", [predictor])]
    # an ensemble's: what its members share, "per member" where they differ (provenance["ensemble"])
    seen = {k: v if all(view.get(k) == v for view in views) else "per member" for k, v in views[0].items()}
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(checkpoint),
            "dataset": dataset_provenance(dataset, data, split, dataset_kwargs, skipped),
            "prediction": {**seen, "crf": crf_settings(predictor)}, "pixelwise_version": __version__,
            "torch_version": torch.__version__}
