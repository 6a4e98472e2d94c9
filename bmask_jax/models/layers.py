"""Building blocks shared by the model files: convs with detectron2's initialisers and
explicit padding, FrozenBN, GroupNorm, and the 2x2 stride-2 transposed conv."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# c2_msra_fill: kaiming normal, fan_out, ReLU gain (torch computes fan_out of an OIHW kernel).
msra_fill = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# c2_xavier_fill: kaiming uniform with a=1, i.e. uniform with variance 1 / fan_in.
xavier_fill = jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def normal(std: float):
    return jax.nn.initializers.normal(std)


# Below this many input pixels (N * H * W) XLA's own 3x3 weight gradient is as fast.
TAPS_MIN_ROWS = 16384

# Set while tracing the branches of a lax.cond/switch (see gradients_for_conditionals).
_IN_CONDITIONAL = contextvars.ContextVar("bmask_jax_conv_in_conditional", default=False)


@contextlib.contextmanager
def gradients_for_conditionals():
    """Convs created in this context take their gradients as matmuls and plain forward convs.
    Inside the branches of a lax.cond/switch, XLA:CPU emits convolution gradients as naive
    loops: measured on a 3x3 256-channel conv at 32x14x14, the weight gradient ran 200x and
    the input gradient 5x slower than outside, while matmuls and forward convs ran as fast."""
    token = _IN_CONDITIONAL.set(True)
    try:
        yield
    finally:
        _IN_CONDITIONAL.reset(token)


def _weight_grad_by_taps(x, dy, kernel_hw, strides, padding):
    """dL/dW of an NHWC/HWIO conv as one matmul per kernel tap: dW[i, j] = the input pixels
    tap (i, j) reads, transposed, @ dy, summed over all output pixels. Same FLOPs as XLA's,
    but large-K matmuls where XLA:CPU runs a convolution 4x slower than the forward
    (measured on the FPN's P2 and the mask head's 3x3 convs)."""
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    _, h, w, _ = dy.shape
    sh, sw = strides
    dy2 = dy.reshape(-1, dy.shape[-1])
    taps = [[jnp.dot(xp[:, i:i + sh * (h - 1) + 1:sh, j:j + sw * (w - 1) + 1:sw, :].reshape(-1, x.shape[-1]).T,
                     dy2, preferred_element_type=jnp.float32) for j in range(kernel_hw[1])]
            for i in range(kernel_hw[0])]
    return jnp.stack([jnp.stack(row) for row in taps])


def _input_grad_by_phases(x_hw, dy, w, strides, padding):
    """dL/dx of an NHWC/HWIO conv as stride-1 forward convs, one per stride phase: the
    (padded) input pixels at rows a mod s_h and columns b mod s_w get their gradient only
    from the taps w[a::s_h, b::s_w], so each phase is a plain 'full' correlation of dy with
    that sub-kernel, flipped and in/out-swapped; the phases are then interleaved and cropped.
    The FLOPs of the forward conv, where XLA's own strided input gradient (a conv with lhs
    dilation, i.e. on a cotangent mostly of zeros) ran 1.3-2x slower at stride 2 (ResNet
    res3-res5 and the boundary head's 28 -> 14 conv) and, inside conditionals, far slower."""
    (top, bottom), (left, right) = padding
    sh, sw = strides
    n, oh, ow, _ = dy.shape
    cin = w.shape[2]
    uh = -(-(x_hw[0] + top + bottom) // sh)      # phase rows, covering the padded input
    uw = -(-(x_hw[1] + left + right) // sw)
    rows = []
    for a in range(sh):
        cols = []
        for b in range(sw):
            sub = w[a::sh, b::sw]
            mh, mw = sub.shape[:2]
            if mh == 0 or mw == 0:                # stride > kernel: these pixels are never read
                cols.append(jnp.zeros((n, uh, uw, cin), dy.dtype))
                continue
            cols.append(jax.lax.conv_general_dilated(
                dy, jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2), (1, 1),
                ((mh - 1, uh - oh), (mw - 1, uw - ow)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
        rows.append(jnp.stack(cols, 3))           # [N, uh, uw, sw, C]
    dx = jnp.stack(rows, 2).reshape(n, uh * sh, uw * sw, cin)
    return dx[:, top:top + x_hw[0], left:left + x_hw[1]]


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """lax.conv_general_dilated (as flax calls it), routed to what XLA:CPU runs fast; the same
    maths (measured at ResNet-FPN shapes: XLA's 1x1 convs run at 30-125 GFLOP/s forward and
    their weight gradients at 17-53, large 3x3 256-channel weight gradients at 27-41, against
    ~200 for a matmul):
    - 1x1 convs (stride s: subsample, then) are one matmul, and so are their gradients;
    - the weight gradient of k x k convs with >= 256 input channels on large maps is one
      matmul per tap (_weight_grad_by_taps; at stride 2 too, e.g. the boundary head's 28->14
      conv on 256 RoIs: 0.68 s against XLA's 1.5 s);
    - the input gradient of strided k x k convs is stride-1 convs, one per phase
      (_input_grad_by_phases; ResNet-50's stride-2 3x3s at 800x1344, batch 2: 0.37, 0.27,
      0.24 s against XLA's 0.78, 0.47, 0.33 s);
    - under gradients_for_conditionals, every k x k conv's weight gradient is one matmul per
      tap and its input gradient plain forward convs (by phases).
    The forward is always XLA's. Anything else is lax.conv_general_dilated as is."""
    def plain(x, w):
        return jax.lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count,
                                            precision, preferred_element_type)

    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    simple = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
              and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
              and not isinstance(padding, str)
              and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)
    if not simple:
        return plain(lhs, rhs)
    strides = tuple(window_strides)
    if rhs.shape[:2] == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
        x = lhs[:, ::strides[0], ::strides[1]]
        y = jnp.dot(x.reshape(-1, x.shape[-1]), rhs[0, 0], precision=precision,
                    preferred_element_type=preferred_element_type)
        return y.reshape(*x.shape[:3], rhs.shape[-1])
    in_conditional = _IN_CONDITIONAL.get()
    weight_grad_by_taps = in_conditional or (lhs.shape[-1] >= 256 and lhs.shape[0] * lhs.shape[1] * lhs.shape[2] >= TAPS_MIN_ROWS)
    input_grad_by_phases = in_conditional or strides != (1, 1)
    if not (weight_grad_by_taps or input_grad_by_phases):
        return plain(lhs, rhs)

    @jax.custom_vjp
    def conv(x, w):
        return plain(x, w)

    def forward(x, w):
        return plain(x, w), (x, w)

    def backward(residuals, dy):
        x, w = residuals
        if input_grad_by_phases:
            dx = _input_grad_by_phases(x.shape[1:3], dy, w, strides, padding).astype(x.dtype)
        else:
            dx, = jax.vjp(lambda x_: plain(x_, w), x)[1](dy)
        if weight_grad_by_taps:
            dw = _weight_grad_by_taps(x, dy, w.shape[:2], strides, padding).astype(w.dtype)
        else:
            dw, = jax.vjp(lambda w_: plain(x, w_), w)[1](dy)
        return dx, dw

    conv.defvjp(forward, backward)
    return conv(lhs, rhs)


class Conv(nn.Module):
    """k x k conv, NHWC, with symmetric explicit padding (k // 2 each side, as PyTorch with
    padding=k//2; 'SAME' would pad (0, 1) at stride 2)."""
    features: int
    kernel: int = 3
    stride: int = 1
    use_bias: bool = True
    kernel_init: Any = msra_fill
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = self.kernel // 2
        return nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                       padding=((pad, pad), (pad, pad)), use_bias=self.use_bias,
                       kernel_init=self.kernel_init, dtype=self.dtype,
                       conv_general_dilated=conv_general_dilated)(x)


class Deconv2x(nn.Module):
    """2x2 stride-2 transposed conv (ConvTranspose2d(k=2, s=2)). The 2x2 windows do not
    overlap, so it is one matmul: out[2i+a, 2j+b] = x[i, j] @ kernel[a, b].
    kernel[a, b, c_in, c_out] = torch_weight[c_in, c_out, a, b]."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c_in = x.shape[-1]
        # torch's kaiming fan_out of an (in, out, kh, kw) weight is in * kh * kw.
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=-2, out_axis=-1)
        kernel = self.param("kernel", init, (2, 2, c_in, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        # One [N*H*W, C] x [C, 4*O] matmul, then the interleave: as an einsum straight into
        # the interleaved layout XLA:CPU ran fwd+bwd 1.2x slower (256 RoIs at 14x14).
        n, h, w, _ = x.shape
        y = jnp.dot(x.reshape(-1, c_in).astype(self.dtype),
                    kernel.transpose(2, 0, 1, 3).reshape(c_in, 4 * self.features).astype(self.dtype))
        y = y.reshape(n, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


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
    """'FrozenBN' (pretrained weights), 'GN' (training from scratch) or '' (none)."""
    if kind == "FrozenBN":
        return FrozenBatchNorm(name=name)
    if kind == "GN":
        return GroupNormAuto(num_groups, dtype=dtype, name=name)
    if kind == "":
        return Identity(name=name)
    raise ValueError(f"model.backbone.norm must be 'FrozenBN', 'GN' or '', got {kind!r}")


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
