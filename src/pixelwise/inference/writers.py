"""``pixelwise predict``: image files in, masks, overlays and instance files out.

Per input ``<stem>``:

- ``<stem>.png``: palette-indexed class mask (the class id is the pixel value), the input's size;
- ``<stem>_overlay.png``: the mask blended over the image;
- ``<stem>_uncertainty.png`` (semantic, with ``uncertainty``): predictive entropy, 255 = maximal;
- instance models: the class mask takes the class of the highest-scoring instance covering each
  pixel, ``<stem>_instances.png`` is a 16-bit instance-id map (0 = none, k = k-th detection of the
  JSON), the overlay shows instances with boxes, class names and scores, and ``<stem>.json`` holds
  ``{"width", "height", "instances": [{"id", "label", "class_name", "score", "box" (x1, y1, x2, y2),
  "area", "segmentation" (COCO RLE, counts as a string)}]}``.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pixelwise.coco_eval import encode_mask
from pixelwise.data.io import PngRowWriter, read_image, write_mask
from pixelwise.data.palette import default_palette, overlay
from pixelwise.errors import UserError
from pixelwise.inference.predictor import InstancePredictor, Predictor, SemanticPredictor

STRIP_ROWS = 64  # image rows per step when writing an overlay or uncertainty map (bounds their temporaries)
MaskRow = tuple[int, np.ndarray, np.ndarray | None]  # (y, mask uint8[n, W], entropy float32[n, W] | None)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders expand to the image files inside them (sorted), and so do glob
    patterns (``'photos/*.jpg'``, quoted so that pixelwise rather than the shell expands them)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(q) for q in glob.glob(item) if Path(q).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise UserError(f"no images match {item}")
            paths += matches
        else:
            raise UserError(f"input {p} not found")
    if not paths:
        raise UserError(f"no images found in {', '.join(inputs)}")
    return paths


def write_semantic(out_dir: Path, stem: str, image: np.ndarray, rows: Iterable[MaskRow], palette: list,
                   num_classes: int, uncertainty: bool = False) -> Path:
    """The mask, the overlay and (with ``uncertainty``) the uncertainty map of one image, written
    as its row bands come (``(y, mask, entropy)`` top to bottom, as
    :meth:`~pixelwise.inference.predictor.SemanticPredictor.predict_rows` gives them): no file's
    pixels are held whole, and the overlay's float temporaries cover ``STRIP_ROWS`` rows."""
    h, w = image.shape[:2]
    scale = np.log(max(num_classes, 2))  # the largest possible entropy -> 255
    with ExitStack() as files:

        def png(suffix: str, mode: str) -> PngRowWriter:
            return files.enter_context(PngRowWriter(files.enter_context(open(out_dir / f"{stem}{suffix}.png", "wb")),
                                                    w, h, mode, palette))

        mask_png, overlay_png = png("", "P"), png("_overlay", "RGB")
        entropy_png = png("_uncertainty", "L") if uncertainty else None
        for y, mask, entropy in rows:
            mask_png.write(mask)
            for s in range(0, len(mask), STRIP_ROWS):
                e = min(s + STRIP_ROWS, len(mask))
                overlay_png.write(overlay(image[y + s : y + e], mask[s:e], palette))
                if entropy_png is not None and entropy is not None:
                    entropy_png.write((entropy[s:e] / scale * 255).clip(0, 255).astype(np.uint8))
    return out_dir / f"{stem}.png"


def instance_maps(masks: np.ndarray, labels: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """bool[D, H, W] masks (sorted by decreasing score) -> (class mask uint8[H, W], ids uint16[H, W]);
    where instances overlap, the higher-scoring one wins."""
    classes = np.zeros(shape, np.uint8)
    ids = np.zeros(shape, np.uint16)
    for k in range(len(masks) - 1, -1, -1):  # paint low scores first
        classes[masks[k]] = labels[k]
        ids[masks[k]] = k + 1
    return classes, ids


def draw_instances(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                   scores: np.ndarray, class_names: list[str], alpha: float = 0.45) -> Image.Image:
    colours = default_palette(len(masks) + 8)[8:]  # skip the darkest entries
    out = image.astype(np.float32)
    for k in range(len(masks) - 1, -1, -1):
        out[masks[k]] = out[masks[k]] * (1 - alpha) + np.array(colours[k], np.float32) * alpha
    img = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for k, (box, label, score) in enumerate(zip(boxes, labels, scores)):
        name = class_names[label] if label < len(class_names) else str(label)
        draw.rectangle([float(v) for v in box], outline=tuple(colours[k]), width=2)
        draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{name} {score:.2f}", fill=(255, 255, 255))
    return img


def instances_json(det: dict, image_shape: tuple[int, ...], class_names: list[str]) -> dict:
    """Detections (``InstancePredictor.predict``) -> the ``<stem>.json`` document."""
    masks = det["masks"].numpy()
    boxes, labels, scores = det["boxes"].numpy(), det["labels"].numpy(), det["scores"].numpy()
    instances = []
    for k in range(len(masks)):
        rle = encode_mask(masks[k])
        label = int(labels[k])
        instances.append({"id": k + 1, "label": label,
                          "class_name": class_names[label] if label < len(class_names) else str(label),
                          "score": round(float(scores[k]), 5), "box": [round(float(v), 2) for v in boxes[k]],
                          "area": int(masks[k].sum()),
                          "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}})
    return {"width": int(image_shape[1]), "height": int(image_shape[0]), "instances": instances}


def write_instances(out_dir: Path, stem: str, image: np.ndarray, det: dict, class_names: list[str],
                    palette: list) -> Path:
    masks, labels = det["masks"].numpy(), det["labels"].numpy()
    classes, ids = instance_maps(masks, labels, image.shape[:2])
    write_mask(out_dir / f"{stem}.png", classes, palette)
    Image.fromarray(ids).save(out_dir / f"{stem}_instances.png")
    draw_instances(image, masks, det["boxes"].numpy(), labels, det["scores"].numpy(), class_names).save(
        out_dir / f"{stem}_overlay.png")
    (out_dir / f"{stem}.json").write_text(json.dumps(instances_json(det, image.shape, class_names)))
    return out_dir / f"{stem}.png"


def image_batches(paths: list[Path], predictor: SemanticPredictor) -> Iterator[list[tuple[Path, np.ndarray]]]:
    """The images of ``paths``, read in the order given and grouped for
    :meth:`~pixelwise.inference.predictor.SemanticPredictor.predict_rows`: up to
    ``predictor.batch_size`` images that each fit in one model input, and every image that needs
    tiles on its own (so a large image is never held together with others)."""
    batch: list[tuple[Path, np.ndarray]] = []
    for path in paths:
        image = read_image(path)
        if predictor.needs_tiles(image):
            if batch:
                yield batch
                batch = []
            yield [(path, image)]
            continue
        batch.append((path, image))
        if len(batch) == predictor.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_files(predictor: Predictor, inputs: list[str], out: str | Path, *, uncertainty: bool = False,
                  progress: bool = True) -> list[Path]:
    """Predict every image of ``inputs`` (files, folders or glob patterns) into ``out``; -> the mask
    paths. Semantic models run small images in batches and large ones in streamed tiles (with a bar
    over the tiles), whose rows are written as the tiles finish."""
    paths = expand_inputs(inputs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=len(paths), desc="predict", disable=None if progress else True,  # None: on a terminal
               dynamic_ncols=True)
    if isinstance(predictor, SemanticPredictor):
        for batch in image_batches(paths, predictor):
            images = [image for _, image in batch]
            rows = predictor.predict_rows(images, uncertainty=uncertainty, progress=progress)
            for (path, image), image_rows in zip(batch, rows):
                written.append(write_semantic(out_dir, path.stem, image, image_rows, predictor.palette,
                                              len(predictor.class_names), uncertainty))
                bar.update()
    else:
        assert isinstance(predictor, InstancePredictor)
        for path in paths:
            image = read_image(path)
            det = predictor.predict(image)
            written.append(write_instances(out_dir, path.stem, image, det, predictor.class_names, predictor.palette))
            bar.update()
    bar.close()
    return written
