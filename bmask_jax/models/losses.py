"""Loss functions on fixed-shape, weighted inputs.

Padding slots carry weight 0, so every loss is a weighted sum over a normaliser chosen as
detectron2 chooses it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def sigmoid_bce(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Elementwise binary cross-entropy with logits."""
    return optax.sigmoid_binary_cross_entropy(logits, targets)


def weighted_bce(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                 positive_weight: jnp.ndarray | float = 1.0) -> jnp.ndarray:
    """Mean BCE over the pixels of the weighted RoIs.

    logits, targets: [N, H, W]; weights: [N] (1 real RoI, 0 padding).
    positive_weight scales the loss of target-1 pixels (the 'weighted BCE' of Table 7).
    """
    per_pixel = -(positive_weight * targets * jax.nn.log_sigmoid(logits)
                  + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
    pixels = logits.shape[1] * logits.shape[2]
    per_roi = jnp.sum(per_pixel, axis=(1, 2))
    return jnp.sum(per_roi * weights) / (jnp.maximum(jnp.sum(weights), 1.0) * pixels)


def dice_loss(probs: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
              squared: bool = False, smooth: float = 1.0) -> jnp.ndarray:
    """The authors' dice_loss_func: per RoI 1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1),
    averaged over the weighted RoIs. squared=True uses sum(p^2) + sum(y^2) (paper's Eq. 3)."""
    inter = jnp.sum(probs * targets, axis=(1, 2))
    if squared:
        denom = jnp.sum(probs * probs, axis=(1, 2)) + jnp.sum(targets * targets, axis=(1, 2))
    else:
        denom = jnp.sum(probs, axis=(1, 2)) + jnp.sum(targets, axis=(1, 2))
    per_roi = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return jnp.sum(per_roi * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def boundary_loss(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                  kind: str = "dice_bce", dice_squared: bool = False) -> jnp.ndarray:
    """Boundary loss of Table 7: 'bce', 'weighted_bce', 'dice' or 'dice_bce' (the default).

    logits, targets: [N, H, W]; weights: [N].
    """
    if kind == "weighted_bce":
        # Positive weight = negatives / positives over the RoI batch.
        mask = weights[:, None, None]
        positives = jnp.sum(targets * mask)
        negatives = jnp.sum((1.0 - targets) * mask)
        pos_weight = jax.lax.stop_gradient(negatives / jnp.maximum(positives, 1.0))
        return weighted_bce(logits, targets, weights, pos_weight)
    losses = {
        "bce": lambda: weighted_bce(logits, targets, weights),
        "dice": lambda: dice_loss(jax.nn.sigmoid(logits), targets, weights, dice_squared),
        "dice_bce": lambda: weighted_bce(logits, targets, weights)
        + dice_loss(jax.nn.sigmoid(logits), targets, weights, dice_squared),
    }
    if kind not in losses:
        raise ValueError(f"model.boundary.loss must be one of {sorted(losses) + ['weighted_bce']}, "
                         f"got {kind!r}")
    return losses[kind]()


def smooth_l1(pred: jnp.ndarray, target: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Elementwise smooth-L1 (plain L1 when beta == 0, detectron2's default)."""
    diff = jnp.abs(pred - target)
    if beta <= 0:
        return diff
    return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """Mean cross-entropy over weighted rows. logits [N, C], labels [N] int, weights [N]."""
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)
