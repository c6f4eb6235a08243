"""``pixelwise predict``: image files in, palette-indexed masks and overlays out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pixelwise.data.io import read_image
from pixelwise.data.palette import overlay, palette_bytes
from pixelwise.errors import UserError
from pixelwise.inference.predictor import Predictor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders expand to the image files inside them (sorted)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"input {p} not found")
    if not paths:
        raise UserError(f"no images found in {', '.join(inputs)}")
    return paths


def save_index_png(mask: np.ndarray, palette, path: Path) -> None:
    """uint8[H, W] -> palette-indexed ('P' mode) PNG."""
    img = Image.fromarray(mask, mode="P")
    img.putpalette(palette_bytes(palette))
    img.save(path)


def predict_files(checkpoint: str, inputs: list[str], out: str, *, tile: int | None = None,
                  overlap: float = 0.25, tta: bool = False, uncertainty: bool = False,
                  device: str = "cpu", progress: bool = True) -> list[Path]:
    paths = expand_inputs(inputs)
    predictor = Predictor.from_checkpoint(checkpoint, device, tile=tile, overlap=overlap, tta=tta)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if predictor.task == "instance":
        from pixelwise.inference.instance_output import predict_instance_files

        return predict_instance_files(predictor, paths, out_dir, progress=progress)
    written = []
    for path in tqdm(paths, desc="predict", disable=not progress, dynamic_ncols=True):
        image = read_image(path)
        pred = predictor.predict(image, uncertainty=uncertainty)
        save_index_png(pred.mask, predictor.palette, out_dir / f"{path.stem}.png")
        Image.fromarray(overlay(image, pred.mask, predictor.palette)).save(out_dir / f"{path.stem}_overlay.png")
        if pred.uncertainty is not None:
            scale = np.log(max(pred.probs.shape[0], 2))  # max entropy -> 255
            u8 = (pred.uncertainty / scale * 255).clip(0, 255).astype(np.uint8)
            Image.fromarray(u8, mode="L").save(out_dir / f"{path.stem}_uncertainty.png")
        written.append(out_dir / f"{path.stem}.png")
    return written
