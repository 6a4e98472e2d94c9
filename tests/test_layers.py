"""The XLA:CPU routes (models/cpu_kernels.py) equal XLA's own kernels: values and gradients;
and the kernels choice: "auto" takes them only for the CPU backend, "xla" never."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.models import cpu_kernels, layers


@pytest.mark.slow
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
    with cpu_kernels.use_kernels("cpu"):
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
    with cpu_kernels.use_kernels("cpu"), cpu_kernels.gradients_for_conditionals():
        jaxpr = _compare_with_xla(shape, kernel, padding, stride)
    assert "custom_vjp" in jaxpr


def _compare_with_xla(shape, kernel, padding, stride) -> str:
    """Values and both gradients of cpu_kernels.conv_general_dilated against XLA's conv; returns
    the jaxpr of ours, traced in the caller's context."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, shape[-1], 5)), jnp.float32) / np.sqrt(shape[-1])
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(conv, x, w):
        y = conv(x, w, (stride, stride), padding,
                 dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, dn))
        return jnp.sum(jnp.sin(y)), y

    jaxpr = str(jax.make_jaxpr(lambda x, w: loss(cpu_kernels.conv_general_dilated, x, w))(x, w))
    grad = lambda conv: jax.jit(jax.grad(lambda x, w: loss(conv, x, w), argnums=(0, 1), has_aux=True))  # noqa: E731
    (dx, dw), y = grad(cpu_kernels.conv_general_dilated)(x, w)
    (dx_ref, dw_ref), y_ref = grad(jax.lax.conv_general_dilated)(x, w)
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    return jaxpr


def test_conv_layer_uses_the_taps_gradient_on_large_maps():
    conv = layers.Conv(8)
    for shape, expected in (((2, 100, 100, 256), True), ((2, 20, 20, 256), False)):
        x = jnp.zeros(shape)
        v = conv.init(jax.random.PRNGKey(0), x)
        with cpu_kernels.use_kernels("cpu"):
            jaxpr = str(jax.make_jaxpr(lambda p: conv.apply(p, x))(v))     # before grad resolves it
        assert ("custom_vjp" in jaxpr) == expected


def test_xla_kernels_take_no_cpu_route():
    """With "xla" (and with "auto" when compiling for a GPU or TPU) every conv, its gradients
    and the deconv are XLA's own ops: no custom rule, no conv rewritten as a matmul."""
    x = jnp.zeros((2, 100, 100, 256))
    for layer, expected in ((layers.Conv(8, kernel=1), "conv_general_dilated"),
                            (layers.Conv(8, stride=2), "conv_general_dilated"),
                            (layers.Deconv2x(8), "conv_general_dilated")):
        v = layer.init(jax.random.PRNGKey(0), x)
        with cpu_kernels.use_kernels("xla"):
            jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, layer=layer: jnp.sum(layer.apply(p, x))))(v))
        assert "custom_vjp" not in jaxpr and expected in jaxpr and "dot_general" not in jaxpr


@pytest.mark.parametrize("kernels,platform,expected", [
    ("auto", "cpu", "cpu"), ("auto", "gpu", "xla"), ("auto", "cuda", "xla"), ("auto", "tpu", "xla"),
    ("xla", "cpu", "xla"), ("cpu", "gpu", "cpu")])
def test_auto_takes_the_cpu_routes_only_on_the_cpu(kernels, platform, expected):
    assert cpu_kernels.resolve(kernels, platform) == expected


def test_unknown_kernels_name_the_key():
    with pytest.raises(ValueError, match="model.kernels"):
        cpu_kernels.resolve("cudnn")


def test_deconv_routes_agree():
    """The matmul + interleave and XLA's transposed conv, against the definition
    out[2i+a, 2j+b] = x[i, j] @ kernel[a, b] written as a numpy loop."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    k = rng.normal(size=(2, 2, 5, 6)).astype(np.float32)
    want = np.zeros((2, 6, 8, 6), np.float32)
    for i in range(3):
        for j in range(4):
            for a in range(2):
                for b in range(2):
                    want[:, 2 * i + a, 2 * j + b] = x[:, i, j] @ k[a, b]
    for kernels in ("xla", "cpu"):
        with cpu_kernels.use_kernels(kernels):
            got = cpu_kernels.deconv2x(jnp.asarray(x), jnp.asarray(k))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_model_losses_and_gradients_equal_on_both_kernels(monkeypatch):
    """The tiny BMask R-CNN, one training forward and backward with "xla" and with "cpu"
    kernels: every loss term and every parameter gradient agree (rtol 1e-4). The thresholds
    are lowered so that every route runs on the tiny model (taps for every k x k weight
    gradient, the foreground-bucket switch with its conditional gradients)."""
    from helpers import first_batch, tiny_config

    from bmask_jax.models.bmask_rcnn import BMaskRCNN
    from bmask_jax.engine.state import create_train_state
    monkeypatch.setattr(cpu_kernels, "TAPS_MIN_CHANNELS", 1)
    monkeypatch.setattr(cpu_kernels, "TAPS_MIN_ROWS", 1)
    c = tiny_config()
    c.model.roi_heads.foreground_buckets = (2,)
    batch = first_batch(c)
    state, _ = create_train_state(c, BMaskRCNN(c.model), jax.random.PRNGKey(0))
    out, convs = {}, {}
    for kernels in ("xla", "cpu"):
        c.model.kernels = kernels
        model = BMaskRCNN(c.model)

        def loss(params, model=model):
            losses = model.apply({"params": params, "frozen": state.frozen}, batch,
                                 rngs={"sampling": jax.random.PRNGKey(1)})
            return sum(losses.values()), losses

        jaxpr = str(jax.make_jaxpr(jax.grad(loss, has_aux=True))(state.params))
        convs[kernels] = jaxpr.count("conv_general_dilated[")
        out[kernels] = jax.jit(jax.grad(loss, has_aux=True))(state.params)
    assert convs["cpu"] < convs["xla"]          # the routes ran: 1x1 convs became matmuls
    (g_xla, l_xla), (g_cpu, l_cpu) = out["xla"], out["cpu"]
    assert set(l_xla) == set(l_cpu) and "loss_mask" in l_xla
    for k in l_xla:
        np.testing.assert_allclose(float(l_cpu[k]), float(l_xla[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    flat_xla = jax.tree_util.tree_leaves_with_path(g_xla)
    flat_cpu = jax.tree_util.tree_leaves(g_cpu)
    for (path, a), b in zip(flat_xla, flat_cpu):
        a, b = np.asarray(a), np.asarray(b)
        # Float32 sums in another order, with cancellation: a bias gradient sums thousands of
        # terms to a small total. Seen up to 9e-4 of a leaf's largest entry (mask_deconv's bias:
        # 6.72e-5 against 6.74e-5, largest 1.9e-4) when XLA compiles at -O0 (tests/conftest.py);
        # a wrong kernel is off by the order of the values themselves.
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=3e-3 * max(float(np.abs(a).max()), 1e-6),
                                   err_msg=jax.tree_util.keystr(path))


def test_unknown_compute_dtype_names_the_key():
    from helpers import tiny_config

    from bmask_jax.models.bmask_rcnn import BMaskRCNN
    from bmask_jax.engine.variables import init_variables
    c = tiny_config()
    c.model.compute_dtype = "float16"
    with pytest.raises(ValueError, match="model.compute_dtype"):
        init_variables(c, BMaskRCNN(c.model), jax.random.PRNGKey(0))
