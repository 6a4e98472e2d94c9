"""Proposal-to-ground-truth matching (detectron2's Matcher) on padded GT."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from bmask_jax.ops import boxes as box_ops


def match(boxes: jnp.ndarray, gt_boxes: jnp.ndarray, gt_valid: jnp.ndarray,
          thresholds: Sequence[float], labels: Sequence[int],
          allow_low_quality_matches: bool) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Match each box to its best ground truth.

    boxes: [N, 4]; gt_boxes: [G, 4]; gt_valid: [G] bool (padding rows are False).
    thresholds / labels as detectron2's Matcher: with thresholds (t1, t2) and labels (0, -1, 1),
    IoU < t1 -> 0, t1 <= IoU < t2 -> -1, IoU >= t2 -> 1.
    Returns (matched_gt [N] int32, match_labels [N] int32, max_iou [N] float32).
    With no valid GT every box gets the label of the lowest band (background).
    """
    iou = box_ops.pairwise_iou(boxes, gt_boxes)              # [N, G]
    iou = jnp.where(gt_valid[None, :], iou, -1.0)
    matched_gt = jnp.argmax(iou, axis=1).astype(jnp.int32)
    max_iou = jnp.max(iou, axis=1)
    bounds = [-jnp.inf, *thresholds, jnp.inf]
    match_labels = jnp.zeros(boxes.shape[0], jnp.int32)
    for lo, hi, label in zip(bounds[:-1], bounds[1:], labels):
        match_labels = jnp.where((max_iou >= lo) & (max_iou < hi), label, match_labels)
    if allow_low_quality_matches:
        # Each GT's best boxes (ties included) become positive. Unlike detectron2 we skip a GT
        # that overlaps nothing, which would otherwise mark every zero-IoU box positive.
        best_per_gt = jnp.max(iou, axis=0)                     # [G]
        is_best = (iou == best_per_gt[None, :]) & gt_valid[None, :] & (best_per_gt[None, :] > 0)
        match_labels = jnp.where(jnp.any(is_best, axis=1), labels[-1], match_labels)
    return matched_gt, match_labels, max_iou
