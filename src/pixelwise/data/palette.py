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


def overlay(image: np.ndarray, mask: np.ndarray, palette: list[tuple[int, int, int]],
            alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured mask over uint8[H, W, 3] ``image``; class 0 (background) stays clear."""
    colours = colorize(mask, palette).astype(np.float32)
    img = image.astype(np.float32)
    a = np.where((mask > 0) & (mask != 255), alpha, 0.0)[..., None]
    return (img * (1 - a) + colours * a).round().clip(0, 255).astype(np.uint8)
