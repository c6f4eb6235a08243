"""The sample images the page offers: a folder of the user's (``--samples DIR``), or a few held-out
scenes of the built-in synthetic ``shapes`` dataset, generated on start (a pure function of the
seed, so nothing is downloaded or stored)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pixelwise.data import StoredLabels
from pixelwise.data.folder import IGNORE_COLOUR
from pixelwise.data.shapes import CLASS_NAMES as SHAPES_CLASSES
from pixelwise.data.shapes import PALETTE as SHAPES_PALETTE
from pixelwise.data.shapes import ShapesDataset
from pixelwise.inference.writers import IMAGE_SUFFIXES
from pixelwise.serve.results import image_png, mask_png
from pixelwise.serve.uploads import UploadError, decode_image, decode_mask

MAX_SAMPLES = 24
BROWSER_FORMATS = frozenset({"PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP"})  # what browsers show (PIL's names)


@dataclass(frozen=True)
class Sample:
    """``name`` (a file name), the image file's bytes, and a ground-truth mask PNG or None."""

    name: str
    image: bytes
    ground_truth: bytes | None = None


def shapes_samples(class_names: Sequence[str], count: int = 3, size: int = 128) -> list[Sample]:
    """Held-out ``shapes`` test scenes; with their ground truth when the model has the shapes
    classes (a mask in another model's classes would be meaningless)."""
    ds = ShapesDataset(split="test", num_test=count, size=size)
    with_truth = list(class_names) == SHAPES_CLASSES
    out = []
    for i in range(count):
        s = ds.load(i)
        truth = mask_png(s.mask, SHAPES_PALETTE) if with_truth else None
        out.append(Sample(f"shapes_{i}.png", image_png(s.image), truth))
    return out


def folder_samples(folder: Path, max_pixels: int, palette: Sequence[Sequence[int]], num_classes: int,
                   stored: StoredLabels | None = None,
                   ignore_colour: Sequence[int] = IGNORE_COLOUR) -> tuple[list[Sample], list[str]]:
    """The images directly in ``folder`` (sorted, at most :data:`MAX_SAMPLES`), each with
    ``folder/masks/<stem>.png`` as ground truth when that exists and fits (read as
    :func:`~pixelwise.serve.uploads.decode_mask` reads an upload: ``stored`` for a dataset's own label
    files), offered as class ids; an image in a format browsers do not show (TIFF, PPM) is offered
    as a PNG of its decoded pixels. -> (samples, problems)."""
    samples: list[Sample] = []
    problems: list[str] = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        if len(samples) == MAX_SAMPLES:
            problems.append(f"{folder}: only the first {MAX_SAMPLES} images are offered")
            break
        data = path.read_bytes()
        try:
            image = decode_image(data, max_pixels)
        except UploadError as e:
            problems.append(f"{path}: skipped, {e.detail}")
            continue
        if Image.open(io.BytesIO(data)).format not in BROWSER_FORMATS:  # TIFF, PPM: the page could not show it
            data = image_png(image)  # the same pixels, so the same prediction
        truth = None
        mask_path = Path(folder) / "masks" / f"{path.stem}.png"
        if mask_path.is_file():
            try:
                truth = mask_png(decode_mask(mask_path.read_bytes(), max_pixels, palette, num_classes,
                                             image.shape[:2], stored=stored, ignore_colour=ignore_colour,
                                             name=mask_path.name), palette)
            except UploadError as e:
                problems.append(f"{mask_path}: ground truth skipped, {e.detail}")
        samples.append(Sample(path.name, data, truth))
    if not samples:
        problems.append(f"{folder}: no readable images")
    return samples, problems
