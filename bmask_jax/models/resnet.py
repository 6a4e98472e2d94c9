"""ResNet bottom-up backbone (detectron2's ResNet: 'MSRA' or torchvision stride placement).

Returns the stage outputs {'res2': C2, ..., 'res5': C5} (strides 4..32), NHWC.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmask_jax.models.layers import Conv, make_norm

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                    152: (3, 8, 36, 3)}


class BottleneckBlock(nn.Module):
    out_channels: int
    bottleneck_channels: int
    stride: int
    stride_in_1x1: bool
    norm: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        if x.shape[-1] != self.out_channels:
            shortcut = Conv(self.out_channels, 1, self.stride, False, dtype=self.dtype, name="shortcut")(x)
            shortcut = make_norm(self.norm, dtype=self.dtype, name="shortcut_norm")(shortcut)
        else:
            shortcut = x
        y = Conv(self.bottleneck_channels, 1, s1, False, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(make_norm(self.norm, dtype=self.dtype, name="conv1_norm")(y))
        y = Conv(self.bottleneck_channels, 3, s3, False, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(make_norm(self.norm, dtype=self.dtype, name="conv2_norm")(y))
        y = Conv(self.out_channels, 1, 1, False, dtype=self.dtype, name="conv3")(y)
        y = make_norm(self.norm, dtype=self.dtype, name="conv3_norm")(y)
        return nn.relu(y + shortcut)


class BasicBlock(nn.Module):
    out_channels: int
    stride: int
    norm: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != self.out_channels or self.stride != 1:
            shortcut = Conv(self.out_channels, 1, self.stride, False, dtype=self.dtype, name="shortcut")(x)
            shortcut = make_norm(self.norm, dtype=self.dtype, name="shortcut_norm")(shortcut)
        else:
            shortcut = x
        y = Conv(self.out_channels, 3, self.stride, False, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(make_norm(self.norm, dtype=self.dtype, name="conv1_norm")(y))
        y = Conv(self.out_channels, 3, 1, False, dtype=self.dtype, name="conv2")(y)
        y = make_norm(self.norm, dtype=self.dtype, name="conv2_norm")(y)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """depth 18/34 use basic blocks (res2_out_channels 64 in detectron2), 50+ bottlenecks.

    freeze_at: 0 trains everything, 1 freezes the stem, 2 the stem and res2 (detectron2's
    default with ImageNet weights). Gradients stop at the frozen output here; the optimizer
    also leaves those parameters untouched (see optim.parameter_labels).
    """
    depth: int = 50
    stem_channels: int = 64
    res2_out_channels: int = 256
    bottleneck_channels: int = 64
    stride_in_1x1: bool = True
    norm: str = "FrozenBN"
    freeze_at: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"model.backbone.depth must be one of {sorted(BLOCKS_PER_STAGE)}, "
                             f"got {self.depth}")
        x = Conv(self.stem_channels, 7, 2, False, dtype=self.dtype, name="stem_conv1")(x)
        x = nn.relu(make_norm(self.norm, dtype=self.dtype, name="stem_norm")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        outputs = {}
        out_channels, bottleneck = self.res2_out_channels, self.bottleneck_channels
        for stage, num_blocks in enumerate(BLOCKS_PER_STAGE[self.depth]):
            for i in range(num_blocks):
                stride = 2 if (i == 0 and stage > 0) else 1
                name = f"res{stage + 2}_{i}"
                if self.depth >= 50:
                    x = BottleneckBlock(out_channels, bottleneck, stride, self.stride_in_1x1,
                                        self.norm, self.dtype, name=name)(x)
                else:
                    x = BasicBlock(out_channels, stride, self.norm, self.dtype, name=name)(x)
            if self.freeze_at >= stage + 2:
                x = jax.lax.stop_gradient(x)
            outputs[f"res{stage + 2}"] = x
            out_channels *= 2
            bottleneck *= 2
        return outputs
