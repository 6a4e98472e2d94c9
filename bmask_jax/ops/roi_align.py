"""Multilevel RoIAlign (detectron2's ROIPooler with ROIAlignV2) with static shapes.

The pyramid levels are flattened into one [sum((H_l + 1) * (W_l + 1)), C] table (each level
padded by a zero row and column) so every bilinear corner of every sample of every RoI,
whatever its level, is one gather: no per-level loop, no dynamic shapes. Bilinear
interpolation follows torchvision's roi_align kernel exactly (aligned=True: half-pixel offset;
samples further than one pixel outside the map count as zero; edges are clamped).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def assign_levels(boxes: jnp.ndarray, min_level: int, max_level: int,
                  canonical_box_size: float = 224.0, canonical_level: int = 4) -> jnp.ndarray:
    """FPN level index (0 = min_level) for each box [..., 4], as detectron2's
    assign_boxes_to_levels: floor(4 + log2(sqrt(area) / 224 + 1e-8)), clamped."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    size = jnp.sqrt(jnp.maximum(w * h, 0.0))
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size + 1e-8))
    return (jnp.clip(level, min_level, max_level) - min_level).astype(jnp.int32)


def _axis_samples(start, bin_size, output_size, grid, sample, size):
    """Sample coordinates along one axis and their bilinear corners.

    start, bin_size, grid, size: [R]; sample: which sub-sample of the bin (python int).
    Returns (low [R, out] int32, high, w_low [R, out], w_high, inside [R, out] bool).
    """
    bins = jnp.arange(output_size, dtype=jnp.float32)
    coord = start[:, None] + bins[None, :] * bin_size[:, None] \
        + (sample + 0.5) * bin_size[:, None] / jnp.maximum(grid, 1)[:, None]
    size = size[:, None]
    inside = (coord >= -1.0) & (coord <= size)
    coord = jnp.maximum(coord, 0.0)
    low = jnp.floor(coord)
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    high = jnp.where(at_edge, size - 1, low + 1)
    coord = jnp.where(at_edge, low, coord)
    frac = coord - low
    return low.astype(jnp.int32), high.astype(jnp.int32), 1.0 - frac, frac, inside


def roi_align(features: Sequence[jnp.ndarray], boxes: jnp.ndarray, levels: jnp.ndarray,
              strides: Sequence[int], output_size: int, sampling_ratio: int = 2,
              aligned: bool = True, max_adaptive_samples: int = 4) -> jnp.ndarray:
    """Pool a fixed-size feature grid for each box from its pyramid level.

    features: per level [H_l, W_l, C] (one image); boxes: [R, 4] (x1, y1, x2, y2) in image
    pixels; levels: [R] int index into `features`; strides: per level.
    sampling_ratio > 0: that many samples per bin side (static). 0: torchvision's adaptive
    ceil(roi_size / output_size) per side, computed per RoI up to max_adaptive_samples (exact
    for RoIs that need no more, which is every RoI no larger than that many bins' worth of
    pixels on its level; the rest are sampled with the cap). max_adaptive_samples=0: no cap,
    exactly torchvision's, in a loop whose length depends on the boxes (inference only).
    Returns [R, output_size, output_size, C] in the features' dtype.
    """
    channels = features[0].shape[-1]
    # The zero row and column past each level's edge let the four corners of a sample be
    # four gathers at index, +1, +row, +row+1 with no bounds checks. (A table of 4C-wide rows
    # holding each pixel's three neighbours too, one gather per sample, measured slower at
    # every scale here: building it writes the pyramid four times per pool.)
    table = jnp.concatenate([jnp.pad(f, ((0, 1), (0, 1), (0, 0))).reshape(-1, channels) for f in features])
    heights = np.array([f.shape[0] for f in features], np.float32)
    widths = np.array([f.shape[1] for f in features], np.float32)
    offsets = np.cumsum([0] + [(f.shape[0] + 1) * (f.shape[1] + 1) for f in features])[:-1].astype(np.int32)

    scale = jnp.asarray(1.0 / np.asarray(strides, np.float32))[levels]
    height = jnp.asarray(heights)[levels]
    width = jnp.asarray(widths)[levels]
    offset = jnp.asarray(offsets)[levels]
    row_stride = width.astype(jnp.int32) + 1

    half = 0.5 if aligned else 0.0
    boxes = boxes.astype(jnp.float32)
    x1 = boxes[:, 0] * scale - half
    y1 = boxes[:, 1] * scale - half
    roi_w = boxes[:, 2] * scale - half - x1
    roi_h = boxes[:, 3] * scale - half - y1
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_w = roi_w / output_size
    bin_h = roi_h / output_size

    if sampling_ratio > 0:
        grid_h = grid_w = jnp.full(boxes.shape[:1], float(sampling_ratio))
    else:
        cap = max_adaptive_samples or np.inf
        grid_h = jnp.clip(jnp.ceil(roi_h / output_size), 0, cap)
        grid_w = jnp.clip(jnp.ceil(roi_w / output_size), 0, cap)
    count = jnp.maximum(grid_h * grid_w, 1.0)

    def sample(sy, sx):
        """The bilinear value at sub-sample (sy, sx) of every bin, zero where unused."""
        y_lo, y_hi, wy_lo, wy_hi, y_in = _axis_samples(y1, bin_h, output_size, grid_h, sy, height)
        x_lo, x_hi, wx_lo, wx_hi, x_in = _axis_samples(x1, bin_w, output_size, grid_w, sx, width)
        used = (y_in & (sy < grid_h)[:, None])[:, :, None] & (x_in & (sx < grid_w)[:, None])[:, None, :]
        index = offset[:, None, None] + y_lo[:, :, None] * row_stride[:, None, None] + x_lo[:, None, :]
        weights = jnp.stack([wy_lo[:, :, None] * wx_lo[:, None, :], wy_lo[:, :, None] * wx_hi[:, None, :],
                             wy_hi[:, :, None] * wx_lo[:, None, :], wy_hi[:, :, None] * wx_hi[:, None, :]],
                            axis=-1) * used.astype(jnp.float32)[..., None]      # [R, out, out, 4]
        row = row_stride[:, None, None]
        values = jnp.stack([table[index], table[index + 1], table[index + row], table[index + row + 1]],
                           axis=-2).astype(jnp.float32)                           # [R, out, out, 4, C]
        return jnp.einsum("rijk,rijkc->rijc", weights, values)

    out = jnp.zeros((boxes.shape[0], output_size, output_size, channels), jnp.float32)
    if sampling_ratio > 0 or max_adaptive_samples:
        # A static number of samples per side, unrolled: differentiable, one fused program.
        n = sampling_ratio if sampling_ratio > 0 else max_adaptive_samples
        for sy in range(n):
            for sx in range(n):
                out = out + sample(sy, sx)
    else:
        # Uncapped adaptive sampling (detectron2's and torchvision's exact semantics): loop
        # over as many sub-samples as the largest RoI needs. The trip count is data
        # dependent, so this is for inference: reverse-mode differentiation is refused.
        rows = jnp.max(grid_h).astype(jnp.int32)
        cols = jnp.maximum(jnp.max(grid_w).astype(jnp.int32), 1)
        out = jax.lax.fori_loop(0, rows * cols, lambda s, acc: acc + sample(s // cols, s % cols), out)
    return (out / count[:, None, None, None]).astype(features[0].dtype)


def bilinear_crop(image: jnp.ndarray, boxes: jnp.ndarray, output_size: int,
                  sampling_ratio: int = 2) -> jnp.ndarray:
    """Aligned RoIAlign of a single-channel map [H, W] for boxes [R, 4] in its pixel
    coordinates -> [R, output_size, output_size]."""
    return roi_align([image[..., None]], boxes, jnp.zeros(boxes.shape[0], jnp.int32), [1],
                     output_size, sampling_ratio)[..., 0]

