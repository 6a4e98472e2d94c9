"""RegNet backbones (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020) as
detectron2's `modeling/backbone/regnet.py` builds them (from pycls): a 3x3 stride-2 stem, then
four stages s1..s4 of residual bottleneck blocks

    x -> 1x1 (a) -> norm, ReLU -> 3x3 group conv, stride (b) -> norm, ReLU [-> SE] -> 1x1 (c) -> norm
      + x, or a 1x1 stride projection (proj) and its norm where the width or stride changes
      -> ReLU

whose widths, depths and groups come from four numbers (w_a, w_0, w_m, depth) and the group
width (regnet_parameters). RegNetY adds squeeze-and-excitation (se_ratio 0.25 of the block's
input width). The stages' outputs are named res2..res5 for the FPN, as ResNet's.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bmask_jax.models.layers import Conv, make_norm

# detectron2's configs/new_baselines/mask_rcnn_regnet{x,y}_4gf_dds_FPN_*_LSJ.py
# (also COCO-InstanceSegmentation/mask_rcnn_regnet{x,y}_4gf_dds_fpn_1x.py).
REGNETS = {
    "regnetx_4gf": dict(depth=23, w_a=38.65, w_0=96, w_m=2.43, group_width=40, se_ratio=0.0),
    "regnety_4gf": dict(depth=22, w_a=31.41, w_0=96, w_m=2.24, group_width=64, se_ratio=0.25),
}
STEM_WIDTH = 32


def regnet_parameters(depth: int, w_a: float, w_0: int, w_m: float, group_width: int,
                      bottleneck_ratio: float = 1.0, q: int = 8) -> tuple[list[int], list[int], list[int]]:
    """(widths, depths, group widths) per stage: the continuous widths w_0 + w_a * i of the
    `depth` blocks, quantised to w_0 * w_m ** round(log(w / w_0) / log(w_m)) and to multiples
    of q; blocks of one width make a stage; then each width made divisible by its group width
    (detectron2's generate_regnet_parameters and adjust_block_compatibility)."""
    continuous = np.arange(depth) * w_a + w_0
    exponents = np.round(np.log(continuous / w_0) / np.log(w_m))
    quantised = (np.round(w_0 * np.power(w_m, exponents) / q).astype(int) * q).tolist()
    widths, depths = (x.tolist() for x in np.unique(quantised, return_counts=True))
    bottlenecks = [max(1, int(w * bottleneck_ratio)) for w in widths]
    groups = [int(min(group_width, b)) for b in bottlenecks]
    multiples = [int(np.lcm(g, int(bottleneck_ratio))) if bottleneck_ratio > 1 else g for g in groups]
    bottlenecks = [max(m, int(round(b / m) * m)) for b, m in zip(bottlenecks, multiples)]
    widths = [int(b / bottleneck_ratio) for b in bottlenecks]
    return widths, depths, groups


class SqueezeExcite(nn.Module):
    """Global average pool, 1x1 conv to `hidden` + ReLU, 1x1 conv back + sigmoid, times x."""
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = x.mean(axis=(1, 2), keepdims=True)
        s = nn.relu(Conv(self.hidden, 1, dtype=self.dtype, name="f_ex_0")(s))
        s = nn.sigmoid(Conv(x.shape[-1], 1, dtype=self.dtype, name="f_ex_2")(s))
        return x * s


class RegNetBlock(nn.Module):
    """ResBottleneckBlock with bottleneck ratio 1: see the module docstring."""
    width: int
    stride: int
    group_width: int
    se_hidden: int
    norm: str = "SyncBN"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shortcut = x
        if x.shape[-1] != self.width or self.stride != 1:
            shortcut = Conv(self.width, 1, self.stride, use_bias=False, dtype=self.dtype, name="proj")(x)
            shortcut = make_norm(self.norm, dtype=self.dtype, name="bn")(shortcut)
        y = Conv(self.width, 1, use_bias=False, dtype=self.dtype, name="f_a")(x)
        y = nn.relu(make_norm(self.norm, dtype=self.dtype, name="f_a_bn")(y))
        y = Conv(self.width, 3, self.stride, use_bias=False, groups=self.width // self.group_width,
                 dtype=self.dtype, name="f_b")(y)
        y = nn.relu(make_norm(self.norm, dtype=self.dtype, name="f_b_bn")(y))
        if self.se_hidden:
            y = SqueezeExcite(self.se_hidden, self.dtype, name="f_se")(y)
        y = Conv(self.width, 1, use_bias=False, dtype=self.dtype, name="f_c")(y)
        y = make_norm(self.norm, dtype=self.dtype, name="f_c_bn")(y)
        return nn.relu(shortcut + y)


class RegNet(nn.Module):
    """The stem and four stages; returns {"res2": s1, ..., "res5": s4} (strides 4 to 32)."""
    depth: int
    w_a: float
    w_0: int
    w_m: float
    group_width: int
    se_ratio: float = 0.0
    stem_width: int = STEM_WIDTH
    norm: str = "SyncBN"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x) -> dict[str, jnp.ndarray]:
        widths, depths, groups = regnet_parameters(self.depth, self.w_a, self.w_0, self.w_m, self.group_width)
        x = Conv(self.stem_width, 3, 2, use_bias=False, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(make_norm(self.norm, dtype=self.dtype, name="stem_bn")(x))
        out = {}
        for s, (width, blocks, group) in enumerate(zip(widths, depths, groups)):
            for i in range(blocks):
                # SE width from the block's input width, as pycls (w_in * se_r).
                se_hidden = int(round(x.shape[-1] * self.se_ratio))
                x = RegNetBlock(width, 2 if i == 0 else 1, group, se_hidden, self.norm, self.dtype,
                                name=f"s{s + 1}_b{i + 1}")(x)
            out[f"res{s + 2}"] = x
        return out

