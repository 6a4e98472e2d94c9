"""Routes for XLA:CPU: the same maths as XLA's own convolutions and their gradients, written
as the operations XLA:CPU runs fast. They exist because XLA:CPU runs some convolutions far
below its matmul speed (~200 GFLOP/s on the 2-core AMD EPYC these were measured on); cuDNN and
the TPU's convolution units have no such gaps, so on a GPU or TPU these routes would only
replace the vendor's kernels with slower ones.

`model.kernels` picks them: "cpu" always, "xla" never, "auto" (the default) only when the
program is traced for the CPU backend (JAX's default backend, which jit compiles for unless
told otherwise). The model sets the choice for its own tracing with `use_kernels`; code that
traces model pieces directly gets "auto".

| route | where | why on XLA:CPU | measured here (AMD EPYC, 2 cores) |
|---|---|---|---|
| 1x1 conv as a matmul (and its gradients) | every 1x1 conv, stride s by subsampling first | XLA:CPU's 1x1 convs ran 30-125 GFLOP/s forward, 17-53 for the weight gradient | with the next route: R50-FPN train step at 512x832 22.3 s -> 15.2 s |
| weight gradient as one matmul per kernel tap (`weight_grad_by_taps`) | k x k convs with >= TAPS_MIN_CHANNELS input channels on maps of >= TAPS_MIN_ROWS input pixels | XLA:CPU's 3x3 256-channel weight gradients ran 27-41 GFLOP/s, 4x slower than the forward | boundary head 28->14 conv at 256 RoIs: 0.68 s vs 1.5 s |
| input gradient of strided convs by stride phases (`input_grad_by_phases`) | k x k convs with stride > 1 | XLA convolves a stride-dilated cotangent, mostly zeros | R50 stride-2 3x3s at 800x1344, batch 2: 0.37/0.27/0.24 s vs 0.78/0.47/0.33 s |
| all k x k conv gradients as the two routes above, under `gradients_for_conditionals` | the mask branch inside the foreground-bucket switch | XLA:CPU emits conv gradients inside lax.cond/switch branches as naive loops | 3x3 256-ch conv at 32x14x14: weight gradient 11.4 s vs 0.059 s, input gradient 0.215 s vs 0.038 s |
| 2x2 stride-2 transposed conv as one matmul + interleave (`deconv2x`) | the mask heads' deconvs | a [NHW, C] x [C, 4O] matmul at matmul speed | see experiments/kernels_benchmark.py |

What stays on every backend, because it is the same HLO either way or measured neutral:
RoIAlign's `weighted_gather` rule (a gather forward, one scatter-add backward: the op kinds
autodiff emits, without autodiff's one zero table of the whole pyramid per corner), the
foreground-bucket switch (it removes FLOPs, not a kernel choice), and the forward k x k convs,
which are XLA's own on every route.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

KERNELS = ("auto", "xla", "cpu")

# Below this many input channels or input pixels (N * H * W) XLA's own k x k weight gradient
# is as fast as the matmul per tap.
TAPS_MIN_CHANNELS = 256
TAPS_MIN_ROWS = 16384

_KERNELS = contextvars.ContextVar("bmask_jax_kernels", default="auto")
# Set while tracing the branches of a lax.cond/switch (see gradients_for_conditionals).
_IN_CONDITIONAL = contextvars.ContextVar("bmask_jax_conv_in_conditional", default=False)


def resolve(kernels: str, platform: str | None = None) -> str:
    """'xla' or 'cpu' for model.kernels; 'auto' is 'cpu' exactly when `platform` (default:
    JAX's default backend) is the CPU."""
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels != "auto":
        return kernels
    return "cpu" if (platform or jax.default_backend()) == "cpu" else "xla"


@contextlib.contextmanager
def use_kernels(kernels: str):
    """Layers traced in this context take `kernels` ('auto', 'xla' or 'cpu')."""
    token = _KERNELS.set(resolve(kernels))
    try:
        yield
    finally:
        _KERNELS.reset(token)


def cpu_routes_active() -> bool:
    return resolve(_KERNELS.get()) == "cpu"


@contextlib.contextmanager
def gradients_for_conditionals():
    """With the CPU routes, convs traced in this context take their gradients as matmuls and
    plain forward convs (XLA:CPU emits conv gradients inside cond/switch branches as naive
    loops; see the table above). No effect with XLA's kernels."""
    token = _IN_CONDITIONAL.set(True)
    try:
        yield
    finally:
        _IN_CONDITIONAL.reset(token)


def weight_grad_by_taps(x, dy, kernel_hw, strides, padding):
    """dL/dW of an NHWC/HWIO conv as one matmul per kernel tap: dW[i, j] = the input pixels
    tap (i, j) reads, transposed, @ dy, summed over all output pixels. Same FLOPs as XLA's."""
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    _, h, w, _ = dy.shape
    sh, sw = strides
    dy2 = dy.reshape(-1, dy.shape[-1])
    taps = [[jnp.dot(xp[:, i:i + sh * (h - 1) + 1:sh, j:j + sw * (w - 1) + 1:sw, :].reshape(-1, x.shape[-1]).T,
                     dy2, preferred_element_type=jnp.float32) for j in range(kernel_hw[1])]
            for i in range(kernel_hw[0])]
    return jnp.stack([jnp.stack(row) for row in taps])


def input_grad_by_phases(x_hw, dy, w, strides, padding):
    """dL/dx of an NHWC/HWIO conv as stride-1 forward convs, one per stride phase: the
    (padded) input pixels at rows a mod s_h and columns b mod s_w get their gradient only
    from the taps w[a::s_h, b::s_w], so each phase is a plain 'full' correlation of dy with
    that sub-kernel, flipped and in/out-swapped; the phases are then interleaved and cropped.
    The FLOPs of the forward conv, where XLA convolves a cotangent dilated with zeros."""
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
    """lax.conv_general_dilated (as flax calls it); with the CPU routes active, the routes of
    the table above for NHWC/HWIO convs without dilation or groups. The forward of a k x k
    conv is always XLA's; anything else is lax.conv_general_dilated as is."""
    def plain(x, w):
        return jax.lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count,
                                            precision, preferred_element_type)

    if not cpu_routes_active():
        return plain(lhs, rhs)
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
    by_taps = in_conditional or (lhs.shape[-1] >= TAPS_MIN_CHANNELS and lhs.shape[0] * lhs.shape[1] * lhs.shape[2] >= TAPS_MIN_ROWS)
    by_phases = in_conditional or strides != (1, 1)
    if not (by_taps or by_phases):
        return plain(lhs, rhs)

    @jax.custom_vjp
    def conv(x, w):
        return plain(x, w)

    def forward(x, w):
        return plain(x, w), (x, w)

    def backward(residuals, dy):
        x, w = residuals
        if by_phases:
            dx = input_grad_by_phases(x.shape[1:3], dy, w, strides, padding).astype(x.dtype)
        else:
            dx, = jax.vjp(lambda x_: plain(x_, w), x)[1](dy)
        if by_taps:
            dw = weight_grad_by_taps(x, dy, w.shape[:2], strides, padding).astype(w.dtype)
        else:
            dw, = jax.vjp(lambda w_: plain(x, w_), w)[1](dy)
        return dx, dw

    conv.defvjp(forward, backward)
    return conv(lhs, rhs)


def deconv2x(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """2x2 stride-2 transposed conv, no bias: x [N, H, W, C], kernel [2, 2, C, O] ->
    [N, 2H, 2W, O] with out[2i+a, 2j+b] = x[i, j] @ kernel[a, b] (the windows do not overlap).
    With the CPU routes, one [NHW, C] x [C, 4O] matmul and then the interleave; otherwise XLA's
    transposed convolution, which cuDNN and the TPU run natively."""
    n, h, w, c = x.shape
    o = kernel.shape[-1]
    if not cpu_routes_active():
        # conv_transpose correlates the zero-dilated input with the kernel as given, so
        # out[2i+a] meets kernel[1-a]: flip it to get kernel[a].
        return jax.lax.conv_transpose(x, jnp.flip(kernel, (0, 1)), (2, 2), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.dot(x.reshape(-1, c), kernel.transpose(2, 0, 1, 3).reshape(c, 4 * o))
    y = y.reshape(n, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, 2 * h, 2 * w, o)
