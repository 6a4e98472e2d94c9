"""Building blocks shared by the model files: convs with detectron2's initialisers and
explicit padding, FrozenBN, GroupNorm, the 2x2 stride-2 transposed conv, and a softmax and GELU
that keep one array for their gradient. Which kernels run them (XLA's own, or the XLA:CPU
routes) is cpu_kernels' business."""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmask_jax.models import cpu_kernels

# c2_msra_fill: kaiming normal, fan_out, ReLU gain (torch computes fan_out of an OIHW kernel).
msra_fill = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# c2_xavier_fill: kaiming uniform with a=1, i.e. uniform with variance 1 / fan_in.
xavier_fill = jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def softmax(x: jnp.ndarray, dtype: Any = None) -> jnp.ndarray:
    """jax.nn.softmax over the last axis, computed in x's precision and returned in `dtype`
    (default x's), whose gradient keeps only that output (PyTorch keeps one too). JAX
    differentiates jax.nn.softmax's formula unless the global flag jax_softmax_custom_jvp is
    set, and then keeps both exp(x) and the quotient: two [heads, tokens, tokens] arrays per
    attention layer, 0.75 GiB each in a global ViT-B block at 1024x1024; under bfloat16 compute
    a float32 output and its bfloat16 copy for the next matmul would both be kept."""
    return _softmax(x, jnp.dtype(x.dtype), jnp.dtype(dtype or x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _softmax(x, wide, dtype):
    unnormalized = jnp.exp(x - x.max(axis=-1, keepdims=True))
    return (unnormalized / unnormalized.sum(axis=-1, keepdims=True)).astype(dtype)


def _softmax_forward(x, wide, dtype):
    y = _softmax(x, wide, dtype)
    return y, y                  # a vjp, not a jvp: the output is all that is kept


def _softmax_backward(wide, dtype, y, dy):
    y, dy = y.astype(wide), dy.astype(wide)
    return (y * (dy - (y * dy).sum(axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_forward, _softmax_backward)


@jax.custom_jvp
def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """The exact (erf) GELU, torch's nn.GELU, whose gradient keeps one array, GELU'(x); JAX's
    own derivative of the formula keeps four arrays of x's size (a ViT MLP's widest)."""
    return jax.nn.gelu(x, approximate=False)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return gelu(x), dx * (cdf + x * pdf).astype(x.dtype)


def normal(std: float):
    return jax.nn.initializers.normal(std)


class Conv(nn.Module):
    """k x k conv, NHWC, with symmetric explicit padding (k // 2 each side, as PyTorch with
    padding=k//2; 'SAME' would pad (0, 1) at stride 2)."""
    features: int
    kernel: int = 3
    stride: int = 1
    use_bias: bool = True
    kernel_init: Any = msra_fill
    dtype: Any = jnp.float32
    groups: int = 1                     # group convolution (RegNet's 3x3)

    @nn.compact
    def __call__(self, x):
        pad = self.kernel // 2
        return nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                       padding=((pad, pad), (pad, pad)), use_bias=self.use_bias,
                       kernel_init=self.kernel_init, dtype=self.dtype, feature_group_count=self.groups,
                       conv_general_dilated=cpu_kernels.conv_general_dilated)(x)


def conv_norm_relu(x, features: int, kernel: int, stride: int, norm: str, name: str, dtype, valid=None):
    """Inside a module's compact call: conv `name` (a bias only without a norm), the norm
    `<name>_norm` and ReLU, as detectron2's Conv2d(norm=..., activation=ReLU) in its heads.
    valid [N]: the rows a BatchNorm's statistics count (RoI slots that hold RoIs)."""
    x = Conv(features, kernel, stride, use_bias=not norm, dtype=dtype, name=name)(x)
    if norm == "SyncBN":
        # The heads' NaiveSyncBatchNorm(stats_mode="N"): only real RoIs counted, and its running
        # variance is the biased one (mean of squares minus squared mean).
        return nn.relu(BatchNorm(dtype=dtype, unbiased_running_var=False, name=f"{name}_norm")(x, valid))
    return nn.relu(make_norm(norm, dtype=dtype, name=f"{name}_norm")(x))


class Deconv2x(nn.Module):
    """2x2 stride-2 transposed conv (ConvTranspose2d(k=2, s=2)):
    out[2i+a, 2j+b] = x[i, j] @ kernel[a, b], kernel[a, b, c_in, c_out] = torch_weight[c_in, c_out, a, b]."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c_in = x.shape[-1]
        # torch's kaiming fan_out of an (in, out, kh, kw) weight is in * kh * kw.
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=-2, out_axis=-1)
        kernel = self.param("kernel", init, (2, 2, c_in, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = cpu_kernels.deconv2x(x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine: y = x * scale + shift, where scale and
    shift live in the 'frozen' collection (constants, never trained)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.variable("frozen", "scale", lambda: jnp.ones((c,), jnp.float32)).value
        shift = self.variable("frozen", "shift", lambda: jnp.zeros((c,), jnp.float32)).value
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def make_norm(kind: str, num_groups: int = 32, dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
    """'FrozenBN' (pretrained weights), 'SyncBN' (BatchNorm over the global batch: the
    large-scale-jitter baselines, trained from scratch), 'GN' (training from scratch), 'LN'
    (per-pixel LayerNorm over the channels: ViTDet's feature pyramid and heads) or '' (none)."""
    if kind == "FrozenBN":
        return FrozenBatchNorm(name=name)
    if kind == "SyncBN":
        return BatchNorm(dtype=dtype, name=name)
    if kind == "GN":
        return GroupNormAuto(num_groups, dtype=dtype, name=name)
    if kind == "LN":
        return ChannelLayerNorm(dtype=dtype, name=name)
    if kind == "":
        return Identity(name=name)
    raise ValueError(f"norm must be 'FrozenBN', 'SyncBN', 'GN', 'LN' or '', got {kind!r}")


class BatchNorm(nn.Module):
    """BatchNorm over the channels (last axis) with PyTorch's eps 1e-5 and momentum 0.1.

    Batch statistics in training, running statistics otherwise; training is when the 'frozen'
    collection is mutable (the train step applies the model with mutable=['frozen']), so no
    flag needs threading through every module. Under jit over a data-parallel mesh the batch
    axis is the global batch, so the statistics are those of every device's images together
    (SyncBN) and XLA inserts the cross-device reduction itself. `valid` ([N] over the leading
    axis, e.g. RoI slots) leaves padded rows out of the statistics, as detectron2's
    NaiveSyncBatchNorm(stats_mode="N") counts only real samples; with no valid row the
    running statistics are not moved. The scale and bias are parameters; the running mean and
    variance live in 'frozen' (not trained by the optimizer). The running variance is the
    unbiased one (n / (n - 1)), as torch.nn.SyncBatchNorm keeps it, or the biased one
    (unbiased_running_var=False: NaiveSyncBatchNorm, detectron2's norm in the heads)."""
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    unbiased_running_var: bool = True

    @nn.compact
    def __call__(self, x, valid=None):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("frozen", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("frozen", "var", lambda: jnp.ones((c,), jnp.float32))
        y = x.astype(jnp.float32)
        if self.is_mutable_collection("frozen"):
            axes = tuple(range(x.ndim - 1))
            per_row = math.prod(x.shape[1:-1])
            if valid is None:
                weight, count = None, jnp.asarray(math.prod(x.shape[:-1]), jnp.float32)
            else:
                weight = valid.reshape((-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
                count = weight.sum() * per_row
            total = jnp.maximum(count, 1.0)
            mean = (y if weight is None else y * weight).sum(axes) / total
            centred = jnp.square(y - mean)
            var = (centred if weight is None else centred * weight).sum(axes) / total
            if not self.is_initializing():
                momentum = self.momentum * (count > 0)          # nothing seen: nothing moves
                kept = var * count / jnp.maximum(count - 1.0, 1.0) if self.unbiased_running_var else var
                running_mean.value = running_mean.value + momentum * (jax.lax.stop_gradient(mean) - running_mean.value)
                running_var.value = running_var.value + momentum * (jax.lax.stop_gradient(kept) - running_var.value)
        else:
            mean, var = running_mean.value, running_var.value
        y = (y - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


class ChannelLayerNorm(nn.Module):
    """detectron2's LayerNorm for NCHW conv features (ConvNeXt's): each pixel normalised over
    its channels, eps 1e-6, then a per-channel scale and bias. Statistics in float32."""
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        y = x.astype(jnp.float32)
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
        y = (y - mean) / jnp.sqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class GroupNormAuto(nn.Module):
    """GroupNorm with min(num_groups, C) groups, so narrow CPU-sized models work too."""
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        groups = min(self.num_groups, x.shape[-1])
        while x.shape[-1] % groups:
            groups -= 1
        return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype)(x)


class Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x
