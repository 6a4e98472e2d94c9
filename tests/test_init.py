"""The parameters are created by `BMaskRCNN.initialize`, which calls each module once on the
shapes it sees in training instead of running the training forward: it must create exactly
the variables the training forward creates (names, shapes, dtypes, and values, since flax
draws each module's parameters from its own path's stream)."""
import jax
import numpy as np
import pytest

from bmask_jax import config as config_lib
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.variables import INIT_CANVAS, dummy_batch
from helpers import tiny_config


def _both_inits(c, run):
    """(variables of the training forward, variables of initialize) for config c; run is
    jax.jit or _shapes."""
    model = BMaskRCNN(c.model)
    batch = dummy_batch(c, canvas=INIT_CANVAS)
    rngs = {"params": jax.random.PRNGKey(3), "sampling": jax.random.PRNGKey(4)}
    forward = run(lambda r, b: model.init(r, b))(rngs, batch)
    initialize = run(lambda r, b: model.init({"params": r["params"]}, b, method=BMaskRCNN.initialize))(rngs, batch)
    return forward, initialize


def _shapes(f):
    """Like jax.jit(f), but only traces: the output's shapes and dtypes."""
    return lambda *args: jax.eval_shape(f, *args)


def _assert_same_tree(forward, initialize):
    a, b = jax.tree_util.tree_flatten_with_path(forward), jax.tree_util.tree_flatten_with_path(initialize)
    assert a[1] == b[1]
    for (path, x), (_, y) in zip(a[0], b[0]):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)


def _sobel_cascade_scoring():
    c = tiny_config("sobel")
    c.model.roi_heads.cascade.enabled = True
    c.model.mask_scoring.enabled = True
    return c


@pytest.mark.parametrize("make", [lambda: tiny_config("bmask"), _sobel_cascade_scoring],
                         ids=["bmask", "sobel-cascade-maskscoring"])
def test_initialize_draws_the_training_forwards_parameters(make):
    forward, initialize = _both_inits(make(), jax.jit)
    _assert_same_tree(forward, initialize)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(forward), jax.tree_util.tree_leaves(initialize)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=jax.tree_util.keystr(path))


def test_initialize_with_foreground_buckets_creates_the_same_variables():
    # Under foreground buckets the training forward calls the mask head inside nn.switch,
    # whose lifted scope draws other values; initialize draws those of the unbucketed model.
    c = tiny_config("bmask")
    c.model.roi_heads.foreground_buckets = (2,)
    _assert_same_tree(*_both_inits(c, _shapes))


@pytest.mark.slow
def test_initialize_creates_the_full_size_variables():
    # Cascade R50-FPN with FrozenBN statistics ("frozen"), 80 classes; shapes only (tracing,
    # no compile).
    c = config_lib.from_file("bmask_rcnn:cascade_r50_fpn_1x")
    forward, initialize = _both_inits(c, _shapes)
    assert set(forward) == {"params", "frozen"}
    _assert_same_tree(forward, initialize)


def test_initialize_creates_the_hrnet_variables():
    c = tiny_config()
    c.model.backbone.update(name="hrnet", norm="FrozenBN")
    c.model.backbone.hrnet.update(stem_channels=8, stage1_channels=4, stage1_blocks=1, widths=(4, 8, 12, 16),
                                  num_modules=(1, 1, 1), num_blocks=(1, 1, 1))
    forward, initialize = _both_inits(c, _shapes)
    assert "stage4_0" in forward["params"]["backbone"] and "frozen" in forward
    _assert_same_tree(forward, initialize)
