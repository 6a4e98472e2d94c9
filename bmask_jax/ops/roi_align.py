"""Multilevel RoIAlign (detectron2's ROIPooler with ROIAlignV2) with static shapes.

Two formulations of the same arithmetic, chosen by size (`pool_method`):
- "gather": the pyramid levels are flattened into one [sum(H_l * W_l), C] table so every
  bilinear corner of every sample of every RoI, whatever its level, is one row gather: no
  per-level loop, no dynamic shapes. Its cost grows with the RoIs' samples only, so it is the
  one for large feature maps (COCO's P2 is 200x336).
- "matmul": with a fixed number of samples per bin side, bilinear RoIAlign is separable: the
  pooled grid of RoI r is A_y[r] @ F @ A_x[r]^T, where A_y [out, H] holds the summed row weights
  of each bin's samples. Two matmuls per level, no gather and no scatter in either direction.
  Its cost grows with the map's size, so it is the one for small maps (the embedded 128x128
  dataset), where gathers and their scatter-add gradients cost 10x more than the matmuls.
Bilinear interpolation follows torchvision's roi_align kernel exactly (aligned=True:
half-pixel offset; samples further than one pixel outside the map count as zero; edges are
clamped) in both.
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


@jax.custom_vjp
def weighted_gather(table: jnp.ndarray, indices: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """sum_k weights[k, ...] * table[indices[k, ...]] in float32: table [N, C], indices and
    weights [K, ...] -> [..., C]. Indices are meant to be in range; one that is not (a NaN
    box) reads a clamped row and its gradient is dropped, never written out of bounds.

    Differentiable in `table` only, like torchvision's roi_align (no gradient reaches the box
    coordinates). Its own rule because autodiff of K gathers builds K zero tables of the whole
    pyramid, one scatter each, and sums them: at the boundary head's 28x28 pool that was 90%
    of the pool's training time; here the K scatters run in place into one table."""
    out = weights[0][..., None] * table[indices[0]].astype(jnp.float32)
    for k in range(1, indices.shape[0]):
        out = out + weights[k][..., None] * table[indices[k]].astype(jnp.float32)
    return out


def _weighted_gather_fwd(table, indices, weights):
    # The table itself is not needed backward: only its shape and dtype (an empty stand-in).
    return weighted_gather(table, indices, weights), (jnp.zeros((table.shape[0], 0), table.dtype),
                                                      indices, weights)


def _weighted_gather_bwd(residual, cotangent):
    like, indices, weights = residual
    grad = jnp.zeros((like.shape[0], cotangent.shape[-1]), jnp.float32)
    for k in range(indices.shape[0]):
        grad = grad.at[indices[k]].add(weights[k][..., None] * cotangent, mode="drop")
    return grad.astype(like.dtype), None, None


weighted_gather.defvjp(_weighted_gather_fwd, _weighted_gather_bwd)


# "auto" takes the matmuls while their multiply-adds are at most this many times the gather's
# weighted reads. Measured in the embedded config's BMask train step on 2 CPU cores: the 28x28
# boundary pool (ratio 4.3) and the 14x14 mask pool (9.8) as matmuls took the step from 0.96
# to 0.44 s; the 7x7 box pool of 512 RoIs (15.9) is faster as a gather (0.50 s as matmuls).
MATMUL_COST_RATIO = 12.0


def pool_method(feature_shapes: Sequence[tuple[int, int]], output_size: int, samples_per_side: int,
                method: str = "auto") -> str:
    """'gather' or 'matmul' for pooling output_size x output_size grids from maps of these
    (H, W) sizes with samples_per_side^2 samples per bin (0: uncapped adaptive, gather only)."""
    if method not in ("auto", "gather", "matmul"):
        raise ValueError(f"RoIAlign method must be 'auto', 'gather' or 'matmul', got {method!r}")
    if samples_per_side == 0:
        return "gather"
    if method != "auto":
        return method
    matmul = sum(output_size * h * w + output_size ** 2 * w for h, w in feature_shapes)
    gather = 4 * samples_per_side ** 2 * output_size ** 2
    return "matmul" if matmul <= MATMUL_COST_RATIO * gather else "gather"


def roi_align(features: Sequence[jnp.ndarray], boxes: jnp.ndarray, levels: jnp.ndarray,
              strides: Sequence[int], output_size: int, sampling_ratio: int = 2,
              aligned: bool = True, max_adaptive_samples: int = 4, method: str = "auto") -> jnp.ndarray:
    """Pool a fixed-size feature grid for each box from its pyramid level.

    features: per level [H_l, W_l, C] (one image); boxes: [R, 4] (x1, y1, x2, y2) in image
    pixels; levels: [R] int index into `features`; strides: per level.
    sampling_ratio > 0: that many samples per bin side (static). 0: torchvision's adaptive
    ceil(roi_size / output_size) per side, computed per RoI up to max_adaptive_samples (exact
    for RoIs that need no more, which is every RoI no larger than that many bins' worth of
    pixels on its level; the rest are sampled with the cap). max_adaptive_samples=0: no cap,
    exactly torchvision's, in a loop whose length depends on the boxes (inference only).
    method: "gather", "matmul" or "auto" (by the maps' size, `pool_method`); same results.
    Returns [R, output_size, output_size, C] in the features' dtype.
    """
    samples = sampling_ratio if sampling_ratio > 0 else max_adaptive_samples
    if pool_method([f.shape[:2] for f in features], output_size, samples, method) == "matmul":
        return _separable_roi_align(features, boxes, levels, strides, output_size, sampling_ratio,
                                    aligned, samples)
    channels = features[0].shape[-1]
    table = jnp.concatenate([f.reshape(-1, channels) for f in features])
    heights = np.array([f.shape[0] for f in features], np.float32)
    widths = np.array([f.shape[1] for f in features], np.float32)
    offsets = np.cumsum([0] + [f.shape[0] * f.shape[1] for f in features])[:-1].astype(np.int32)

    scale = jnp.asarray(1.0 / np.asarray(strides, np.float32))[levels]
    height = jnp.asarray(heights)[levels]
    width = jnp.asarray(widths)[levels]
    offset = jnp.asarray(offsets)[levels]
    row_stride = width.astype(jnp.int32)

    x1, y1, bin_w, bin_h, grid_w, grid_h = _roi_frame(boxes, scale, output_size, sampling_ratio, aligned,
                                                     max_adaptive_samples)
    count = jnp.maximum(grid_h * grid_w, 1.0)

    def corners(sy, sx):
        """Table rows and bilinear weights [4, R, out, out] of the four corners of sub-sample
        (sy, sx) of every bin, weight zero where the sample is unused."""
        y_lo, y_hi, wy_lo, wy_hi, y_in = _axis_samples(y1, bin_h, output_size, grid_h, sy, height)
        x_lo, x_hi, wx_lo, wx_hi, x_in = _axis_samples(x1, bin_w, output_size, grid_w, sx, width)
        used = (y_in & (sy < grid_h)[:, None])[:, :, None] & (x_in & (sx < grid_w)[:, None])[:, None, :]
        # Corner indices are in range: _axis_samples clamps to the map (NaN boxes aside).
        rows = offset[:, None, None] + jnp.stack([y_lo, y_lo, y_hi, y_hi])[:, :, :, None] * row_stride[:, None, None]
        index = rows + jnp.stack([x_lo, x_hi, x_lo, x_hi])[:, :, None, :]                 # [4, R, out, out]
        weights = (jnp.stack([wy_lo, wy_lo, wy_hi, wy_hi])[:, :, :, None]
                   * jnp.stack([wx_lo, wx_hi, wx_lo, wx_hi])[:, :, None, :] * used.astype(jnp.float32))
        return index, weights

    if sampling_ratio > 0 or max_adaptive_samples:
        # A static number of samples per side: one weighted gather of all their corners.
        n = sampling_ratio if sampling_ratio > 0 else max_adaptive_samples
        index, weights = zip(*[corners(sy, sx) for sy in range(n) for sx in range(n)])
        out = weighted_gather(table, jnp.concatenate(index), jnp.concatenate(weights))
    else:
        # Uncapped adaptive sampling (detectron2's and torchvision's exact semantics): loop
        # over as many sub-samples as the largest RoI needs. The trip count is data
        # dependent, so this is for inference: reverse-mode differentiation is refused.
        rows = jnp.max(grid_h).astype(jnp.int32)
        cols = jnp.maximum(jnp.max(grid_w).astype(jnp.int32), 1)
        out = jax.lax.fori_loop(0, rows * cols, lambda s, acc: acc + weighted_gather(
            table, *corners(s // cols, s % cols)), jnp.zeros((boxes.shape[0], output_size, output_size, channels)))
    return (out / count[:, None, None, None]).astype(features[0].dtype)


def _roi_frame(boxes, scale, output_size, sampling_ratio, aligned, cap):
    """Per RoI in a map's pixels: (x1, y1, bin_w, bin_h, grid_w, grid_h) as torchvision."""
    half = 0.5 if aligned else 0.0
    boxes = boxes.astype(jnp.float32)
    x1 = boxes[:, 0] * scale - half
    y1 = boxes[:, 1] * scale - half
    roi_w = boxes[:, 2] * scale - half - x1
    roi_h = boxes[:, 3] * scale - half - y1
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = jnp.full(boxes.shape[:1], float(sampling_ratio))
    else:
        cap = cap or np.inf
        grid_h = jnp.clip(jnp.ceil(roi_h / output_size), 0, cap)
        grid_w = jnp.clip(jnp.ceil(roi_w / output_size), 0, cap)
    return x1, y1, roi_w / output_size, roi_h / output_size, grid_w, grid_h


def _axis_weights(start, bin_size, grid, size: int, output_size: int, samples: int) -> jnp.ndarray:
    """[R, output_size, size]: weight of each map row (or column) in each bin's average along
    one axis: the bilinear weights of its samples summed, divided by the sample count."""
    total = 0.0
    full = jnp.full(start.shape, float(size))
    for s in range(samples):
        low, high, w_low, w_high, inside = _axis_samples(start, bin_size, output_size, grid, s, full)
        used = (inside & (s < grid)[:, None]).astype(jnp.float32)
        total = total + used[..., None] * (jax.nn.one_hot(low, size) * w_low[..., None]
                                           + jax.nn.one_hot(high, size) * w_high[..., None])
    return total / jnp.maximum(grid, 1.0)[:, None, None]


def _separable_roi_align(features, boxes, levels, strides, output_size, sampling_ratio, aligned, samples):
    """RoIAlign as A_y[r] @ F_l @ A_x[r]^T on each RoI's level l (see the module docstring).
    Every level's matmuls run for every RoI, with the weights of RoIs on other levels zero."""
    out = 0.0
    for level, (feature, stride) in enumerate(zip(features, strides)):
        h, w, c = feature.shape
        x1, y1, bin_w, bin_h, grid_w, grid_h = _roi_frame(boxes, 1.0 / stride, output_size, sampling_ratio,
                                                         aligned, samples)
        on_level = (levels == level).astype(jnp.float32)[:, None, None]
        a_y = _axis_weights(y1, bin_h, grid_h, h, output_size, samples) * on_level   # [R, out, H]
        a_x = _axis_weights(x1, bin_w, grid_w, w, output_size, samples)              # [R, out, W]
        rows = jnp.einsum("riy,yxc->rixc", a_y, feature.astype(jnp.float32))         # one [R*out, H] @ [H, W*C]
        out = out + jnp.einsum("rixc,rjx->rijc", rows, a_x)
    return out.astype(features[0].dtype)


def bilinear_crop(image: jnp.ndarray, boxes: jnp.ndarray, output_size: int,
                  sampling_ratio: int = 2) -> jnp.ndarray:
    """Aligned RoIAlign of a single-channel map [H, W] for boxes [R, 4] in its pixel
    coordinates -> [R, output_size, output_size]."""
    return roi_align([image[..., None]], boxes, jnp.zeros(boxes.shape[0], jnp.int32), [1],
                     output_size, sampling_ratio)[..., 0]

