"""Fixed-size greedy non-maximum suppression."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bmask_jax.ops import boxes as box_ops


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float,
        valid: jnp.ndarray | None = None, groups: jnp.ndarray | None = None) -> jnp.ndarray:
    """Greedy NMS as torchvision.ops.nms / batched_nms, on a fixed number of boxes.

    boxes: [N, 4]; scores: [N]; valid: [N] bool (invalid boxes neither survive nor suppress);
    groups: [N] int, optional: boxes only suppress boxes of the same group (class or level).
    Returns keep [N] bool in the input order. A box is dropped when a kept box of higher score
    (ties broken by lower index, as a stable sort) overlaps it with IoU > iou_threshold.
    """
    n = boxes.shape[0]
    if valid is None:
        valid = jnp.ones(n, bool)
    order = jnp.argsort(-scores, stable=True)
    sorted_boxes = boxes[order]
    overlaps = box_ops.pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold
    if groups is not None:
        sorted_groups = groups[order]
        overlaps &= sorted_groups[:, None] == sorted_groups[None, :]
    later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
    suppresses = overlaps & later                            # [i, j]: i suppresses later j

    def body(i, keep):
        # keep[i] is final once every earlier box has been visited.
        return keep & ~(keep[i] & suppresses[i])

    keep_sorted = jax.lax.fori_loop(0, n, body, valid[order])
    return jnp.zeros(n, bool).at[order].set(keep_sorted)

