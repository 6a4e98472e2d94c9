"""Boundary targets from binary masks (the authors' Laplacian recipe)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

LAPLACIAN = jnp.array([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]], jnp.float32)


def boundary_targets(masks: jnp.ndarray, threshold: float = 0.1) -> jnp.ndarray:
    """Inner one-pixel boundary of binary masks.

    masks: [N, H, W] in {0, 1}. Convolve with the 3x3 Laplacian (zero padding 1), clamp at 0,
    then > threshold -> 1: a foreground pixel with any background 8-neighbour, where pixels
    outside the map count as background. -> [N, H, W] float32 in {0, 1}.
    """
    x = masks.astype(jnp.float32)[:, None]                         # [N, 1, H, W]
    edges = jax.lax.conv_general_dilated(x, LAPLACIAN[None, None], (1, 1), ((1, 1), (1, 1)))[:, 0]
    return (jnp.maximum(edges, 0.0) > threshold).astype(jnp.float32)
