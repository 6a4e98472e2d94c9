"""Box geometry on fixed-shape arrays.

Boxes are (x1, y1, x2, y2) in absolute pixels, as in detectron2. Functions are pure jnp and
work on any leading batch shape unless a docstring says otherwise.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

# detectron2's _DEFAULT_SCALE_CLAMP: the largest dw/dh accepted when decoding.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def area(boxes: jnp.ndarray) -> jnp.ndarray:
    """boxes: [..., 4] -> [...] (negative sizes count as zero)."""
    w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return w * h


def pairwise_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """IoU of every pair. boxes1: [N, 4], boxes2: [M, 4] -> [N, M].

    Pairs whose union is empty get IoU 0 (as detectron2's pairwise_iou).
    """
    lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(boxes1)[:, None] + area(boxes2)[None, :] - inter
    return jnp.where(inter > 0, inter / jnp.maximum(union, 1e-12), 0.0)


def clip(boxes: jnp.ndarray, height, width) -> jnp.ndarray:
    """Clip boxes [..., 4] to the image [0, width] x [0, height]."""
    x1 = jnp.clip(boxes[..., 0], 0, width)
    y1 = jnp.clip(boxes[..., 1], 0, height)
    x2 = jnp.clip(boxes[..., 2], 0, width)
    y2 = jnp.clip(boxes[..., 3], 0, height)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def nonempty(boxes: jnp.ndarray, threshold: float = 0.0) -> jnp.ndarray:
    """[..., 4] -> [...] bool: width and height both > threshold."""
    return ((boxes[..., 2] - boxes[..., 0]) > threshold) & ((boxes[..., 3] - boxes[..., 1]) > threshold)


def encode(boxes: jnp.ndarray, targets: jnp.ndarray, weights=(1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
    """Deltas (dx, dy, dw, dh) that turn `boxes` into `targets` (detectron2's Box2BoxTransform).

    boxes, targets: [..., 4] -> [..., 4]. Widths and heights must be positive.
    """
    wx, wy, ww, wh = weights
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    cx = boxes[..., 0] + 0.5 * w
    cy = boxes[..., 1] + 0.5 * h
    tw = targets[..., 2] - targets[..., 0]
    th = targets[..., 3] - targets[..., 1]
    tcx = targets[..., 0] + 0.5 * tw
    tcy = targets[..., 1] + 0.5 * th
    dx = wx * (tcx - cx) / w
    dy = wy * (tcy - cy) / h
    dw = ww * jnp.log(tw / w)
    dh = wh * jnp.log(th / h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(deltas: jnp.ndarray, boxes: jnp.ndarray, weights=(1.0, 1.0, 1.0, 1.0),
           scale_clamp: float = DEFAULT_SCALE_CLAMP) -> jnp.ndarray:
    """Inverse of `encode`: apply deltas [..., 4] to boxes [..., 4] (broadcasting)."""
    wx, wy, ww, wh = weights
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    cx = boxes[..., 0] + 0.5 * w
    cy = boxes[..., 1] + 0.5 * h
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
    pcx = dx * w + cx
    pcy = dy * h + cy
    pw = jnp.exp(dw) * w
    ph = jnp.exp(dh) * h
    return jnp.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=-1)
