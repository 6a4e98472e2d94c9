"""The conv's fast gradients equal XLA's (the forward is XLA's own)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.models import layers


@pytest.mark.parametrize("shape,kernel,padding,stride,own_gradient", [
    ((2, 96, 100, 256), (3, 3), ((1, 1), (1, 1)), 1, True),    # above TAPS_MIN_ROWS: taps dW
    ((1, 130, 130, 256), (3, 3), ((2, 0), (1, 3)), 1, True),   # asymmetric padding
    ((4, 20, 20, 256), (3, 3), ((1, 1), (1, 1)), 1, False),    # too small: XLA's gradients
    ((2, 96, 100, 8), (3, 3), ((1, 1), (1, 1)), 1, False),     # too few channels: XLA's
    ((2, 9, 11, 16), (1, 1), ((0, 0), (0, 0)), 1, False),      # 1x1: a matmul
    ((2, 9, 11, 16), (1, 1), ((0, 0), (0, 0)), 2, False),      # 1x1 stride 2 (odd sizes)
    ((2, 9, 11, 16), (3, 3), ((1, 1), (1, 1)), 2, True),       # strided 3x3: dx by phases
    ((2, 10, 13, 16), (3, 3), ((2, 0), (1, 3)), 2, True),      # ... asymmetric padding
    ((2, 11, 12, 4), (5, 5), ((2, 2), (2, 2)), 3, True),       # ... stride 3, 5x5
    ((2, 11, 12, 4), (2, 2), ((0, 0), (0, 0)), 3, True),       # ... stride > kernel: rows unread
    ((2, 96, 101, 256), (3, 3), ((1, 1), (1, 1)), 2, True),    # strided 3x3, large map: taps too
])
def test_same_values_and_gradients_as_xla(shape, kernel, padding, stride, own_gradient):
    jaxpr = _compare_with_xla(shape, kernel, padding, stride)
    assert ("custom_vjp" in jaxpr) == own_gradient
    assert ("conv_general_dilated" not in jaxpr) == (kernel == (1, 1))


@pytest.mark.parametrize("shape,kernel,padding,stride", [
    ((4, 14, 14, 32), (3, 3), ((1, 1), (1, 1)), 1),        # the mask head's 3x3
    ((4, 28, 28, 32), (3, 3), ((1, 1), (1, 1)), 2),        # the boundary path's stride-2 3x3
    ((2, 9, 11, 16), (3, 3), ((1, 1), (1, 1)), 2),         # odd sizes: the last row unread
    ((2, 10, 13, 16), (3, 3), ((2, 0), (1, 3)), 2),        # asymmetric padding
    ((2, 12, 12, 8), (5, 5), ((2, 2), (2, 2)), 1),
])
def test_gradients_for_conditionals_equal_xla(shape, kernel, padding, stride):
    """Under gradients_for_conditionals every k x k conv takes the matmul/forward-conv gradients."""
    with layers.gradients_for_conditionals():
        jaxpr = _compare_with_xla(shape, kernel, padding, stride)
    assert "custom_vjp" in jaxpr


def _compare_with_xla(shape, kernel, padding, stride) -> str:
    """Values and both gradients of layers.conv_general_dilated against XLA's conv; returns
    the jaxpr of ours, traced in the caller's context."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, shape[-1], 5)), jnp.float32) / np.sqrt(shape[-1])
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(conv, x, w):
        y = conv(x, w, (stride, stride), padding,
                 dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, dn))
        return jnp.sum(jnp.sin(y)), y

    jaxpr = str(jax.make_jaxpr(lambda x, w: loss(layers.conv_general_dilated, x, w))(x, w))
    grad = lambda conv: jax.jit(jax.grad(lambda x, w: loss(conv, x, w), argnums=(0, 1), has_aux=True))  # noqa: E731
    (dx, dw), y = grad(layers.conv_general_dilated)(x, w)
    (dx_ref, dw_ref), y_ref = grad(jax.lax.conv_general_dilated)(x, w)
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    return jaxpr


def test_conv_layer_uses_the_taps_gradient_on_large_maps():
    conv = layers.Conv(8)
    for shape, expected in (((2, 100, 100, 256), True), ((2, 20, 20, 256), False)):
        x = jnp.zeros(shape)
        v = conv.init(jax.random.PRNGKey(0), x)
        jaxpr = str(jax.make_jaxpr(lambda p: conv.apply(p, x))(v))     # before grad resolves it
        assert ("custom_vjp" in jaxpr) == expected
