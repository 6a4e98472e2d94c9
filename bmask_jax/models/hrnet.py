"""HRNetV2 bottom-up backbone (Wang et al., "Deep High-Resolution Representation Learning for
Visual Recognition"; the detection version of HRNet-MaskRCNN-Benchmark and mmdetection).

Layout for HRNetV2-W32 (all convs without bias, each followed by the norm):
- stem: two 3x3 stride-2 convs, 64 channels, norm + ReLU after each (stride 4).
- stage 1 ("layer1"): 4 bottleneck blocks, width 64 -> 256 channels (a ResNet res2).
- transition 1: branch 0 = 3x3 conv 256 -> 32 (+ norm, ReLU); branch 1 = 3x3 stride-2 conv
  256 -> 64 (+ norm, ReLU).
- stages 2, 3, 4: 1, 4 and 3 high-resolution modules on 2, 3 and 4 branches of widths
  32/64/128/256 (strides 4/8/16/32). A module runs 4 basic blocks on every branch, then the
  multi-resolution fusion (see `MultiResolutionFusion`). Before stages 3 and 4 a transition
  adds the new lowest-resolution branch: 3x3 stride-2 conv (+ norm, ReLU) of the previous
  lowest branch. The last module of stage 4 outputs all four resolutions.

Returns {'res2', 'res3', 'res4', 'res5'} = the four branches at strides 4, 8, 16, 32 (widths
32/64/128/256 for W32), so the FPN of fpn.py takes them unchanged. This follows the paper's
Table 1 ("HRNetV2-W32-FPN"); HRNet's own detection code puts HRFPN (concatenate all branches
at stride 4, then pool) there instead, which we do not implement.

Widths, block and module counts are config fields (model.backbone.hrnet), so a narrow HRNet
runs in tests. Parameter names: `stem_*`, `res2_<i>` (stage 1, named like the ResNet stage
it is so that freezing and optim.parameter_labels treat both backbones alike),
`transition<t>_<branch>[_<k>]_{conv,norm}`, `stage<s>_<m>` (the modules).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmask_jax.models.layers import Conv, make_norm
from bmask_jax.models.resnet import BasicBlock, BottleneckBlock


def upsample_nearest(x: jnp.ndarray, factor: int, target_hw: tuple[int, int]) -> jnp.ndarray:
    """Nearest-neighbour upsampling by an integer factor, cropped to target_hw (a stride-2 conv
    with padding 1 rounds up, so the coarse map may cover one row/column more). x: [N, H, W, C]."""
    x = jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)
    return x[:, :target_hw[0], :target_hw[1]]


class MultiResolutionFusion(nn.Module):
    """HRNet's exchange unit: output i = ReLU(sum_j f_ij(x_j)) over all input branches j, with
    - f_ii = identity;
    - j > i (coarser): 1x1 conv c_j -> c_i, norm, nearest upsampling by 2^(j-i);
    - j < i (finer): i-j 3x3 stride-2 convs (padding 1); all but the last keep c_j channels
      and are followed by norm + ReLU, the last maps to c_i and is followed by norm only.
    xs: list of [N, H_b, W_b, c_b] with H_{b+1} = ceil(H_b / 2); returns the same shapes.
    Parameters: fuse<i>_<j>_{conv,norm} (up) and fuse<i>_<j>_<k>_{conv,norm} (down, step k).
    """
    norm: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
        outputs = []
        for i, xi in enumerate(xs):
            ci = xi.shape[-1]
            y = xi
            for j, xj in enumerate(xs):
                cj = xj.shape[-1]
                if j > i:
                    z = Conv(ci, 1, 1, False, dtype=self.dtype, name=f"fuse{i}_{j}_conv")(xj)
                    z = make_norm(self.norm, dtype=self.dtype, name=f"fuse{i}_{j}_norm")(z)
                    y = y + upsample_nearest(z, 2 ** (j - i), xi.shape[1:3])
                elif j < i:
                    z = xj
                    for k in range(i - j):
                        last = k == i - j - 1
                        z = Conv(ci if last else cj, 3, 2, False, dtype=self.dtype,
                                 name=f"fuse{i}_{j}_{k}_conv")(z)
                        z = make_norm(self.norm, dtype=self.dtype, name=f"fuse{i}_{j}_{k}_norm")(z)
                        if not last:
                            z = nn.relu(z)
                    y = y + z
            outputs.append(nn.relu(y))
        return outputs


class HRModule(nn.Module):
    """One high-resolution module: `num_blocks` basic blocks on every branch (widths unchanged),
    then the multi-resolution fusion. xs: list of [N, H_b, W_b, c_b]."""
    num_blocks: int
    norm: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
        ys = []
        for b, x in enumerate(xs):
            for k in range(self.num_blocks):
                x = BasicBlock(x.shape[-1], 1, self.norm, self.dtype, name=f"branch{b}_{k}")(x)
            ys.append(x)
        if len(ys) == 1:
            return ys
        return MultiResolutionFusion(self.norm, self.dtype, name="fusion")(ys)


class HRNet(nn.Module):
    """HRNetV2 backbone; defaults are HRNetV2-W32.

    widths: branch widths (4 of them); stage s in 2..4 runs on widths[:s].
    num_modules / num_blocks: modules per stage and basic blocks per branch, stages 2, 3, 4.
    freeze_at: 0 trains everything (HRNet's detection configs), 1 freezes the stem (both 3x3
    convs), 2 the stem and stage 1 (the four bottleneck blocks). Gradients stop at the frozen
    output; optim.parameter_labels leaves the `stem_*` / `res2_*` parameters untouched.
    """
    stem_channels: int = 64
    stage1_channels: int = 64           # bottleneck width of stage 1; its output is 4x this
    stage1_blocks: int = 4
    widths: Sequence[int] = (32, 64, 128, 256)
    num_modules: Sequence[int] = (1, 4, 3)
    num_blocks: Sequence[int] = (4, 4, 4)
    norm: str = "FrozenBN"
    freeze_at: int = 0
    dtype: Any = jnp.float32

    def _conv_norm_relu(self, x, features: int, stride: int, name: str):
        x = Conv(features, 3, stride, False, dtype=self.dtype, name=f"{name}_conv")(x)
        return nn.relu(make_norm(self.norm, dtype=self.dtype, name=f"{name}_norm")(x))

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """x: [N, H, W, 3] normalised image, H and W multiples of 32 -> {'res2'..'res5'}."""
        widths, num_modules, num_blocks = tuple(self.widths), tuple(self.num_modules), tuple(self.num_blocks)
        if len(widths) != 4 or len(num_modules) != 3 or len(num_blocks) != 3:
            raise ValueError("model.backbone.hrnet needs 4 widths and 3 num_modules / num_blocks "
                             f"(stages 2-4), got {widths}, {num_modules}, {num_blocks}")
        if not 0 <= self.freeze_at <= 2:
            raise ValueError(f"HRNet supports model.backbone.freeze_at 0, 1 or 2, got {self.freeze_at}")

        for k in (1, 2):
            x = Conv(self.stem_channels, 3, 2, False, dtype=self.dtype, name=f"stem_conv{k}")(x)
            x = nn.relu(make_norm(self.norm, dtype=self.dtype, name=f"stem_norm{k}")(x))
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        for k in range(self.stage1_blocks):
            x = BottleneckBlock(4 * self.stage1_channels, self.stage1_channels, 1, False, self.norm,
                                self.dtype, name=f"res2_{k}")(x)
        if self.freeze_at >= 2:
            x = jax.lax.stop_gradient(x)

        xs = [x]
        for stage in (2, 3, 4):
            t = stage - 1
            new = []
            for b in range(stage):
                if b < len(xs):   # existing branch: identity, or a 3x3 conv if the width changes
                    y = xs[b]
                    if y.shape[-1] != widths[b]:
                        y = self._conv_norm_relu(y, widths[b], 1, f"transition{t}_{b}")
                else:             # new branch: stride-2 3x3 convs from the lowest resolution
                    y = xs[-1]
                    steps = b + 1 - len(xs)
                    for k in range(steps):
                        c = widths[b] if k == steps - 1 else y.shape[-1]
                        y = self._conv_norm_relu(y, c, 2, f"transition{t}_{b}_{k}")
                new.append(y)
            xs = new
            for m in range(num_modules[stage - 2]):
                xs = HRModule(num_blocks[stage - 2], self.norm, self.dtype, name=f"stage{stage}_{m}")(xs)
        return {f"res{b + 2}": y for b, y in enumerate(xs)}
