"""Mask heads: the boundary-preserving head with the authors' weights against the authors'
outputs (official_boundary_head.npz), parameter counts (SPEC section 11), and Deconv2x against
a numpy loop of ConvTranspose2d(kernel 2, stride 2)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bmask_jax.models.layers import Deconv2x
from bmask_jax.models.mask_heads import BoundaryPreservingHead, MaskRCNNHead

from helpers import reference as _reference

CONV_NAMES = ["mask_fcn1", "mask_fcn2", "mask_fcn3", "mask_fcn4", "downsample", "mask_to_boundary",
              "boundary_fcn1", "boundary_fcn2", "boundary_to_mask", "mask_final_fusion"]


def _param_count(module, *inputs):
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


def _conv(w, b):
    """torch conv (out, in, kh, kw) -> flax {'kernel': (kh, kw, in, out), 'bias'}."""
    return {"Conv_0": {"kernel": jnp.asarray(np.transpose(w, (2, 3, 1, 0))), "bias": jnp.asarray(b)}}


def _deconv(w, b):
    """torch transposed conv (in, out, kh, kw) -> Deconv2x {'kernel': (kh, kw, in, out), 'bias'}."""
    return {"kernel": jnp.asarray(np.transpose(w, (2, 3, 0, 1))), "bias": jnp.asarray(b)}


def _official_params(ref):
    w = lambda name: (ref[f"w/{name}.weight"], ref[f"w/{name}.bias"])  # noqa: E731
    params = {name: _conv(*w(name)) for name in CONV_NAMES}
    params["mask_branch"] = {"mask_deconv": _deconv(*w("mask_deconv")),
                             "mask_predictor": _conv(*w("mask_predictor"))}
    params["boundary_branch"] = {"boundary_deconv": _deconv(*w("boundary_deconv")),
                                 "boundary_predictor": _conv(*w("boundary_predictor"))}
    return {"params": params}


def test_boundary_head_matches_authors_outputs():
    ref = _reference("official_boundary_head.npz")
    head = BoundaryPreservingHead(80)
    mask_feats = jnp.asarray(np.transpose(ref["mask_feats"], (0, 2, 3, 1)))          # NCHW -> NHWC
    boundary_feats = jnp.asarray(np.transpose(ref["boundary_feats"], (0, 2, 3, 1)))
    variables = _official_params(ref)
    # The converted tree must have exactly the structure and shapes of the module's own.
    expected = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), mask_feats[:1], boundary_feats[:1]))
    assert jax.tree_util.tree_structure(flax.core.unfreeze(expected)) == jax.tree_util.tree_structure(variables)
    for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree_util.tree_leaves(variables)):
        assert e.shape == g.shape, path
    n_ref = sum(ref[k].size for k in ref.files if k.startswith("w/"))
    assert n_ref == 5_418_144

    mask_logits, boundary_logits = jax.jit(head.apply)(variables, mask_feats, boundary_feats)
    want_mask = np.transpose(ref["mask_logits"], (0, 2, 3, 1))
    want_boundary = np.transpose(ref["boundary_logits"], (0, 2, 3, 1))
    assert mask_logits.shape == want_mask.shape == (6, 28, 28, 80)
    np.testing.assert_allclose(np.asarray(mask_logits), want_mask, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(boundary_logits), want_boundary, atol=1e-4, rtol=1e-4)
    assert np.abs(want_mask).max() > 1e-2 and np.abs(want_boundary).max() > 1e-2


def test_boundary_head_param_count():
    assert _param_count(BoundaryPreservingHead(80), jnp.zeros((1, 14, 14, 256)),
                        jnp.zeros((1, 28, 28, 256))) == 5_418_144


def test_mask_rcnn_head_param_count():
    # 4 x (9*256*256 + 256) + (4*256*256 + 256) + (256*80 + 80)
    assert 4 * (9 * 256 * 256 + 256) + (4 * 256 * 256 + 256) + (256 * 80 + 80) == 2_643_280
    assert _param_count(MaskRCNNHead(80), jnp.zeros((1, 14, 14, 256))) == 2_643_280


def test_deconv2x_vs_conv_transpose_loop():
    rng = np.random.default_rng(0)
    n, h, w, c_in, c_out = 2, 3, 4, 3, 5
    x_nchw = rng.normal(size=(n, c_in, h, w)).astype(np.float32)
    weight = rng.normal(size=(c_in, c_out, 2, 2)).astype(np.float32)      # torch (in, out, kh, kw)
    bias = rng.normal(size=(c_out,)).astype(np.float32)
    # ConvTranspose2d(k=2, s=2): out[o, 2i+a, 2j+b] = sum_c x[c, i, j] W[c, o, a, b] + bias[o]
    want = np.zeros((n, c_out, 2 * h, 2 * w))
    for b_ in range(n):
        for o in range(c_out):
            want[b_, o] += bias[o]
            for i in range(h):
                for j in range(w):
                    for a in range(2):
                        for bb in range(2):
                            for c in range(c_in):
                                want[b_, o, 2 * i + a, 2 * j + bb] += x_nchw[b_, c, i, j] * weight[c, o, a, bb]
    variables = {"params": _deconv(weight, bias)}
    got = Deconv2x(c_out).apply(variables, jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1))))
    np.testing.assert_allclose(np.asarray(got), np.transpose(want, (0, 2, 3, 1)), atol=1e-5, rtol=1e-5)
