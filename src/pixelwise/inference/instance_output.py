"""``pixelwise predict`` for instance models: per input image

- ``<stem>.png``: palette-indexed class mask (each pixel takes the class of the highest-scoring
  instance covering it), the input's size;
- ``<stem>_instances.png``: 16-bit instance-id map (0 = none, k = k-th detection in the JSON);
- ``<stem>_overlay.png``: instances in distinct colours with boxes, class names and scores;
- ``<stem>.json``: ``{"width", "height", "instances": [{"id", "label", "class_name", "score",
  "box" (x1, y1, x2, y2), "area", "segmentation" (COCO RLE, counts as a string)}]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pixelwise.data.io import read_image
from pixelwise.data.palette import default_palette
from pixelwise.engine.coco_eval import encode_mask


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


def predict_instance_files(predictor, paths: list[Path], out_dir: Path, progress: bool = True,
                           score_thresh: float = 0.5) -> list[Path]:
    from pixelwise.inference.predict_files import save_index_png

    written = []
    for path in tqdm(paths, desc="predict", disable=not progress, dynamic_ncols=True):
        image = read_image(path)
        det = predictor.predict_instances(image, score_thresh=score_thresh)
        masks = det["masks"].numpy()
        boxes, labels, scores = det["boxes"].numpy(), det["labels"].numpy(), det["scores"].numpy()
        classes, ids = instance_maps(masks, labels, image.shape[:2])
        save_index_png(classes, predictor.palette, out_dir / f"{path.stem}.png")
        Image.fromarray(ids).save(out_dir / f"{path.stem}_instances.png")
        draw_instances(image, masks, boxes, labels, scores, predictor.class_names).save(
            out_dir / f"{path.stem}_overlay.png")
        instances = []
        for k in range(len(masks)):
            rle = encode_mask(masks[k])
            instances.append({"id": k + 1, "label": int(labels[k]),
                              "class_name": predictor.class_names[labels[k]] if labels[k] < len(predictor.class_names)
                              else str(labels[k]),
                              "score": round(float(scores[k]), 5), "box": [round(float(v), 2) for v in boxes[k]],
                              "area": int(masks[k].sum()),
                              "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}})
        doc = {"width": image.shape[1], "height": image.shape[0], "instances": instances}
        (out_dir / f"{path.stem}.json").write_text(json.dumps(doc))
        written.append(out_dir / f"{path.stem}.png")
    return written
