"""Anchor generation (detectron2's DefaultAnchorGenerator with offset 0).

Anchors depend only on the canvas shape, so they are built once in numpy at trace time and
enter the jitted step as constants.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def cell_anchors(size: float, aspect_ratios: Sequence[float]) -> np.ndarray:
    """Anchors centred on (0, 0) for one size. -> [len(aspect_ratios), 4] float32.

    For ratio r = h / w: w = sqrt(size^2 / r), h = r * w (no rounding).
    """
    out = []
    for r in aspect_ratios:
        w = math.sqrt(size * size / r)
        h = r * w
        out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(out, np.float32)


def grid_anchors(feature_hw: tuple[int, int], stride: int, size: float,
                 aspect_ratios: Sequence[float], offset: float = 0.0) -> np.ndarray:
    """All anchors of one level. -> [H * W * A, 4], ordered (y, x, anchor) like detectron2."""
    h, w = feature_hw
    shifts_x = (np.arange(w, dtype=np.float32) + offset) * stride
    shifts_y = (np.arange(h, dtype=np.float32) + offset) * stride
    sy, sx = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors(size, aspect_ratios)[None]).reshape(-1, 4)


def level_shapes(canvas_hw: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """Feature-map sizes of each level for a canvas that is a multiple of the largest stride."""
    return [(-(-canvas_hw[0] // s), -(-canvas_hw[1] // s)) for s in strides]


def multilevel_anchors(canvas_hw: tuple[int, int], strides: Sequence[int], sizes: Sequence[float],
                       aspect_ratios: Sequence[float], offset: float = 0.0) -> list[np.ndarray]:
    """Per-level anchors [H_l * W_l * A, 4] for the canvas."""
    return [grid_anchors(hw, s, size, aspect_ratios, offset)
            for hw, s, size in zip(level_shapes(canvas_hw, strides), strides, sizes)]
