"""Overlapping tiles, so a large image is upscaled in bounded memory without visible seams.

:func:`plan_tiles` covers an image with tiles of at most ``tile`` x ``tile``
input pixels that overlap their neighbours by at least ``overlap`` pixels.
Every tile of an image larger than one tile has the same full size (the last
row and column are shifted back inside the image rather than cut short), so
all tiles of a request, and of concurrent requests, share one shape and can
be batched together. An image that fits in one tile is one tile of its own
size.

:class:`TileBlender` adds the upscaled tiles into a float canvas with weights
that ramp linearly from near 0 to 1 across each overlap (on sides that have a
neighbour; image borders keep weight 1) and divides by the summed weights at
the end. Pixels near a tile's inner edge, where the network saw the least
context, count least, and the transition between tiles is a smooth cross-fade.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """A tile in input pixels: top-left corner and size."""

    y: int
    x: int
    height: int
    width: int


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def plan_tiles(height: int, width: int, *, tile: int, overlap: int) -> list[Tile]:
    """Tiles covering a ``height`` x ``width`` image, row by row."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError("need tile >= 1 and 0 <= overlap < tile")
    th, tw = min(tile, height), min(tile, width)
    return [Tile(y, x, th, tw) for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]


def _ramp(length: int, ramp: int, start_open: bool, end_open: bool) -> np.ndarray:
    """1-D weights: 1, with a linear rise of ``ramp`` samples at open ends."""
    weights = np.ones(length, dtype=np.float32)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        rise = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
        if start_open:
            weights[:ramp] = np.minimum(weights[:ramp], rise)
        if end_open:
            weights[length - ramp :] = np.minimum(weights[length - ramp :], rise[::-1])
    return weights


class TileBlender:
    """Accumulates upscaled tiles (``(C, h * s, w * s)`` float32) into one ``(C, H * s, W * s)`` image."""

    def __init__(self, channels: int, height: int, width: int, *, scale: int, overlap: int) -> None:
        self.scale = scale
        self.ramp = overlap * scale
        self.height, self.width = height, width
        self.canvas = np.zeros((channels, height * scale, width * scale), dtype=np.float32)
        self.weights = np.zeros((height * scale, width * scale), dtype=np.float32)

    def add(self, tile: Tile, output: np.ndarray) -> None:
        s = self.scale
        y0, x0, h, w = tile.y * s, tile.x * s, tile.height * s, tile.width * s
        if output.shape[-2:] != (h, w):
            raise ValueError(f"tile output {output.shape[-2:]} != expected {(h, w)}")
        wy = _ramp(h, self.ramp, tile.y > 0, tile.y + tile.height < self.height)
        wx = _ramp(w, self.ramp, tile.x > 0, tile.x + tile.width < self.width)
        weight = wy[:, None] * wx[None, :]
        self.canvas[:, y0 : y0 + h, x0 : x0 + w] += output * weight
        self.weights[y0 : y0 + h, x0 : x0 + w] += weight

    def result(self) -> np.ndarray:
        return self.canvas / np.maximum(self.weights, 1e-8)
