"""Feature Pyramid Network on C2..C5 with P6 by stride-2 subsampling of P5 (detectron2's
FPN with LastLevelMaxPool)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn

import jax.numpy as jnp

from bmask_jax.models.layers import Conv, make_norm, xavier_fill


def upsample2x_nearest(x: jnp.ndarray, target_hw: tuple[int, int]) -> jnp.ndarray:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, :target_hw[0], :target_hw[1]]


class FPN(nn.Module):
    """norm: '' (convs with a bias) or a make_norm kind after each lateral and output conv
    (detectron2's FPN(norm=...): its convs then have no bias; the LSJ baselines' 'SyncBN')."""
    channels: int = 256
    dtype: Any = jnp.float32
    norm: str = ""

    @nn.compact
    def __call__(self, features: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
        names = ["res2", "res3", "res4", "res5"]
        outputs = {}
        prev = None
        for level in (5, 4, 3, 2):
            c = features[names[level - 2]]
            lateral = self._conv_norm(c, 1, f"fpn_lateral{level}")
            prev = lateral if prev is None else lateral + upsample2x_nearest(prev, c.shape[1:3])
            outputs[f"p{level}"] = self._conv_norm(prev, 3, f"fpn_output{level}")
        # LastLevelMaxPool: max-pool with kernel 1, stride 2, i.e. every other pixel of P5.
        outputs["p6"] = outputs["p5"][:, ::2, ::2]
        return {k: outputs[k] for k in ("p2", "p3", "p4", "p5", "p6")}

    def _conv_norm(self, x, kernel: int, name: str):
        x = Conv(self.channels, kernel, use_bias=not self.norm, kernel_init=xavier_fill, dtype=self.dtype, name=name)(x)
        return make_norm(self.norm, dtype=self.dtype, name=f"{name}_norm")(x) if self.norm else x


