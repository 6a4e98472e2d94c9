"""Feature Pyramid Network on C2..C5 with P6 by stride-2 subsampling of P5 (detectron2's
FPN with LastLevelMaxPool)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn

import jax.numpy as jnp

from bmask_jax.models.layers import Conv, xavier_fill


def upsample2x_nearest(x: jnp.ndarray, target_hw: tuple[int, int]) -> jnp.ndarray:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, :target_hw[0], :target_hw[1]]


class FPN(nn.Module):
    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
        names = ["res2", "res3", "res4", "res5"]
        outputs = {}
        prev = None
        for level in (5, 4, 3, 2):
            c = features[names[level - 2]]
            lateral = Conv(self.channels, 1, kernel_init=xavier_fill, dtype=self.dtype,
                           name=f"fpn_lateral{level}")(c)
            prev = lateral if prev is None else lateral + upsample2x_nearest(prev, c.shape[1:3])
            outputs[f"p{level}"] = Conv(self.channels, 3, kernel_init=xavier_fill, dtype=self.dtype,
                                        name=f"fpn_output{level}")(prev)
        # LastLevelMaxPool: max-pool with kernel 1, stride 2, i.e. every other pixel of P5.
        outputs["p6"] = outputs["p5"][:, ::2, ::2]
        return {k: outputs[k] for k in ("p2", "p3", "p4", "p5", "p6")}


