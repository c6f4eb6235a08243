"""Colour palettes and mask colouring helpers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC bit-interleaving colour map, extended to any number of classes."""
    out = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def palette_bytes(palette: Sequence[Sequence[int]]) -> list[int]:
    """A flat 768-entry PIL palette; index 255 (ignore) is white."""
    flat = [0] * 768
    for i, (r, g, b) in enumerate(palette[:255]):
        flat[3 * i : 3 * i + 3] = [int(r), int(g), int(b)]
    flat[765:768] = [255, 255, 255]
    return flat


def colorize(mask: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """uint8[H, W] class ids -> uint8[H, W, 3] colours (255 -> white)."""
    lut = np.array(palette_bytes(palette), dtype=np.uint8).reshape(256, 3)
    return lut[mask]


# names of a class 0 that is the absence of the classes: VOC's and COCO's background, and the generic
# name a folder dataset without classes.json gives (binary masks store the background as 0)
BACKGROUND_NAMES = ("background", "_background_", "bg", "class_0")


def clear_class(class_names: Sequence[str]) -> int | None:
    """The class an overlay leaves clear: class 0 where it is a background (:data:`BACKGROUND_NAMES`),
    none where class 0 is a thing to see (Cityscapes' road, CamVid's sky, ADE20K's wall, ISBI's membrane)."""
    return 0 if len(class_names) and str(class_names[0]).casefold() in BACKGROUND_NAMES else None


def overlay(image: np.ndarray, mask: np.ndarray, palette: list[tuple[int, int, int]],
            alpha: float = 0.5, clear: int | None = 0) -> np.ndarray:
    """Blend the coloured mask over uint8[H, W, 3] ``image``; class ``clear`` (:func:`clear_class`;
    None: no class) and 255 (ignore) stay clear."""
    colours = colorize(mask, palette).astype(np.float32)
    img = image.astype(np.float32)
    # float32 throughout: a float64 alpha promoted every product to float64 (72 bytes a pixel)
    a = np.where((mask != 255) & (mask != (-1 if clear is None else clear)), np.float32(alpha),
                 np.float32(0.0))[..., None]
    return (img * (1 - a) + colours * a).round().clip(0, 255).astype(np.uint8)
