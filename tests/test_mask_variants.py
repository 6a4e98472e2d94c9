"""Mask-branch variants (SPEC sections 5-7), each a config switch: a few train steps on a fixed
batch with finite losses and the expected loss terms, then one detect call with the right
shapes. Plus the new pieces against independent numpy references: the fixed Sobel filters,
the 2x2 max-pool (28 -> 14) and the MaskIoU target, and the heads' shapes and parameters.

Every distinct config compiles three times (init, train step, detect), so orthogonal switches
share a config: one run per row of VARIANTS covers all the switches in its name. The switches
that only change loss arithmetic (supervision, loss kind, squared Dice) are also checked one by
one on mask_losses, without compiling the model.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import first_batch, tiny_config

from bmask_jax.models import losses
from bmask_jax.engine import state as state_lib
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.models.layers import Conv
from bmask_jax.models.mask_heads import (BoundaryPreservingHead, MaskIoUHead, SobelMaskHead, mask_iou_targets,
                                         mask_losses, max_pool_2x2, sobel_edges)
from bmask_jax.ops.boundaries import boundary_targets
from bmask_jax.train import train_step

BASE_KEYS = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}

# name -> (head, {dotted config path under model: value}, extra loss keys expected).
# Every switch that changes the model's graph gets a full run here; the switches that only
# change the loss arithmetic are also checked one by one, cheaply, on mask_losses below.
VARIANTS = {
    # Table 4 (supervision = mask targets), Table 7 (weighted BCE), Table 6 (no M2B), Table 5
    # (P2..P5 at 28), and d2's adaptive sampling_ratio 0.
    "bmask-supmask-wbce-noM2B-p2p5x28-sampling0": (
        "bmask", {"boundary.supervision": "mask", "boundary.loss": "weighted_bce",
                  "boundary.mask_to_boundary": False, "boundary.in_features": ("p2", "p3", "p4", "p5"),
                  "roi_heads.sampling_ratio": 0}, {"loss_boundary"}),
    # Table 6 (no B2M), Table 5 (P2 at 14: a stride-1 first boundary conv), Table 7 (Dice)
    # with the paper's squared Dice denominator.
    "bmask-noB2M-p2x14-dicesq": (
        "bmask", {"boundary.boundary_to_mask": False, "boundary.resolution": 14,
                  "boundary.loss": "dice", "boundary.dice_squared": True}, {"loss_boundary"}),
    # Table 2 (Mask Scoring) on BMask, Table 4 (no boundary supervision: the boundary branch
    # runs but has no loss), Table 5 (P2..P5 at 14).
    "bmask-ms-supnone-p2p5x14": (
        "bmask", {"mask_scoring.enabled": True, "boundary.supervision": "none",
                  "boundary.in_features": ("p2", "p3", "p4", "p5"), "boundary.resolution": 14},
        {"loss_mask_iou"}),
    # Fig. 7b, Dice+BCE (BCE and Dice inside).
    "sobel": ("sobel", {}, {"loss_boundary"}),
    # Table 8's larger Mask R-CNN head (8 convs) and Table 2's Mask Scoring on Mask R-CNN.
    "maskrcnn-lmh8-ms": ("maskrcnn", {"mask_head.num_conv": 8, "mask_scoring.enabled": True},
                         {"loss_mask_iou"}),
}


def variant_config(head, overrides):
    c = tiny_config(head)
    for path, value in overrides.items():
        section, field = path.split(".")
        c.model[section][field] = value
    return c


@pytest.fixture(scope="module")
def batch():
    c = tiny_config()
    return first_batch(c)


# The steps run on 64x64 images: XLA's backend optimisations would cost more compile time than
# they save at run time, so these tests compile without them (this file only).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_detects(name, batch):
    head, overrides, extra_keys = VARIANTS[name]
    c = variant_config(head, overrides)
    model = BMaskRCNN(c.model)
    state, tx = state_lib.create_train_state(c, model, jax.random.PRNGKey(0))
    step = _compile(lambda s, b: train_step(s, b, model, tx, 0, False), state, batch)
    for _ in range(2):
        state, metrics = step(state, batch)
        metrics = jax.device_get(metrics)
        assert set(metrics) == BASE_KEYS | extra_keys | {"total_loss"}, sorted(metrics)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert int(state.first_nonfinite_step) == -1      # gradients finite too

    variables = {"params": state.params, "frozen": state.frozen}
    images = {k: batch[k] for k in ("image", "image_hw")}
    det = jax.device_get(_compile(lambda v, b: model.apply(v, b, train=False), variables, images)(variables, images))
    b, d = 2, c.model.roi_heads.detections_per_image
    want = {"boxes": (b, d, 4), "scores": (b, d), "classes": (b, d), "valid": (b, d),
            "mask_probs": (b, d, 28, 28)}
    if head in ("bmask", "sobel"):
        want["boundary_probs"] = (b, d, 28, 28)
    if c.model.mask_scoring.enabled:
        want.update(box_scores=(b, d), mask_iou=(b, d))
    assert {k: v.shape for k, v in det.items()} == want
    for k in ("boxes", "mask_probs", "scores"):
        assert np.isfinite(det[k]).all(), k
    if c.model.mask_scoring.enabled:
        np.testing.assert_allclose(det["scores"], det["box_scores"] * det["mask_iou"], rtol=1e-6)
    if c.model.mask_head.num_conv == 8:
        assert "mask_fcn8" in state.params["mask_head"] and "mask_fcn9" not in state.params["mask_head"]


@pytest.mark.parametrize("head", ["bmask", "sobel"])
@pytest.mark.parametrize("supervision", ["boundary", "mask", "none"])
@pytest.mark.parametrize("kind,squared", [("bce", False), ("weighted_bce", False), ("dice", False),
                                          ("dice_bce", False), ("dice", True), ("dice_bce", True)])
def test_boundary_supervision_and_loss_switches(head, supervision, kind, squared):
    """Tables 4 and 7 on mask_losses: the switch picks the target (Laplacian boundary, mask,
    none) and the loss; the boundary logits are the GT class's channel (bmask) or the single
    class-agnostic channel (sobel); padding RoIs do not count."""
    c = tiny_config(head).model
    c.boundary.update(supervision=supervision, loss=kind, dice_squared=squared)
    rng = np.random.default_rng(4)
    r, k = 4, 3
    mask_logits = jnp.asarray(rng.normal(size=(r, 28, 28, k)).astype(np.float32))
    boundary_logits = jnp.asarray(rng.normal(size=(r, 28, 28, k if head == "bmask" else 1)).astype(np.float32))
    targets = np.zeros((r, 28, 28), np.float32)
    for i in range(r):
        y0, x0 = rng.integers(0, 10, size=2)
        targets[i, y0:y0 + 12 + i, x0:x0 + 10 + i] = 1.0
    targets = jnp.asarray(targets)
    classes = jnp.array([2, 0, 1, 3])            # the last is a padding slot (background)
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    out = mask_losses(mask_logits, boundary_logits, classes, targets, weights, c)
    assert set(out) == ({"loss_mask"} if supervision == "none" else {"loss_mask", "loss_boundary"})
    if supervision == "none":
        return
    picked = np.stack([np.asarray(boundary_logits)[i, ..., min(int(classes[i]), k - 1) if head == "bmask" else 0]
                       for i in range(r)])
    target = boundary_targets(targets) if supervision == "boundary" else targets
    want = losses.boundary_loss(jnp.asarray(picked[:3]), target[:3], weights[:3], kind, squared)
    np.testing.assert_allclose(float(out["loss_boundary"]), float(want), rtol=1e-5)
    grad = jax.grad(lambda b: mask_losses(mask_logits, b, classes, targets, weights, c)["loss_boundary"])(
        boundary_logits)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad[3]).sum()) == 0.0


def test_boundary_resolution_14_uses_a_stride_1_first_conv():
    """Table 5: 14x14 boundary features keep their size through the first boundary conv
    (stride 1), so M2B adds 14x14 maps; the parameters are those of the 28x28 head."""
    head = BoundaryPreservingHead(3, conv_dim=8)
    mask_feats = jnp.ones((2, 14, 14, 8))
    captured = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "downsample" and context.method_name == "__call__":
            captured["downsample"] = (args[0].shape, out.shape)
        return out

    shapes = {}
    for res in (14, 28):
        feats = jnp.ones((2, res, res, 8))
        variables = head.init(jax.random.PRNGKey(0), mask_feats, feats)
        with flax.linen.intercept_methods(record):
            mask_logits, boundary_logits = head.apply(variables, mask_feats, feats)
        assert mask_logits.shape == boundary_logits.shape == (2, 28, 28, 3)
        assert captured["downsample"] == ((2, res, res, 8), (2, 14, 14, 8))
        shapes[res] = jax.tree_util.tree_map(lambda x: x.shape, variables)
    assert shapes[14] == shapes[28]


# ---- the Sobel head ------------------------------------------------------------------------

def _sobel_numpy(m):
    """Hand-written cross-correlation with Gx = [[-1,0,1],[-2,0,2],[-1,0,1]], Gy = Gx^T and
    zero padding 1."""
    h, w = m.shape
    p = np.zeros((h + 2, w + 2))
    p[1:-1, 1:-1] = m
    gx = np.zeros((h, w))
    gy = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            a = p[i:i + 3, j:j + 3]      # a[1, 1] is pixel (i, j)
            gx[i, j] = (a[0, 2] + 2 * a[1, 2] + a[2, 2]) - (a[0, 0] + 2 * a[1, 0] + a[2, 0])
            gy[i, j] = (a[2, 0] + 2 * a[2, 1] + a[2, 2]) - (a[0, 0] + 2 * a[0, 1] + a[0, 2])
    return gx, gy


def test_sobel_edges_match_numpy():
    rng = np.random.default_rng(0)
    maps = rng.uniform(size=(3, 5, 7)).astype(np.float32)
    out = np.asarray(sobel_edges(jnp.asarray(maps)))
    assert out.shape == (3, 5, 7, 2)
    for r in range(3):
        gx, gy = _sobel_numpy(maps[r])
        np.testing.assert_allclose(out[r, ..., 0], gx, atol=1e-5)
        np.testing.assert_allclose(out[r, ..., 1], gy, atol=1e-5)


def test_sobel_edges_on_a_step():
    # A vertical step 0 -> 1 between columns 2 and 3 of a 6x6 map: x-response 4 on both sides
    # of the step inside the map, none in y away from the top and bottom rows (zero padding).
    m = np.zeros((1, 6, 6), np.float32)
    m[:, :, 3:] = 1.0
    out = np.asarray(sobel_edges(jnp.asarray(m)))[0]
    np.testing.assert_allclose(out[1:-1, 2, 0], 4.0)
    np.testing.assert_allclose(out[1:-1, 3, 0], 4.0)
    np.testing.assert_allclose(out[1:-1, 0, 0], 0.0)
    np.testing.assert_allclose(out[1:-1, :, 1], 0.0)
    np.testing.assert_allclose(out[1:-1, -1, 0], -4.0)    # the map's right edge: 0 outside


def test_sobel_head_shapes_parameters_and_gradient():
    k, c, r = 3, 8, 2
    head = SobelMaskHead(k, conv_dim=c, num_conv=2, hidden_dim=16)
    feats = jax.random.normal(jax.random.PRNGKey(0), (r, 14, 14, c))
    classes = jnp.array([2, 0])
    variables = head.init(jax.random.PRNGKey(1), feats, None, classes)
    params = flax.core.unfreeze(variables["params"])
    assert set(variables) == {"params"}       # the Sobel filters are constants, not variables
    assert set(params) == {"mask_fcn1", "mask_fcn2", "MaskPredictor_0", "sobel_fcn1", "sobel_predictor"}
    assert params["sobel_fcn1"]["Conv_0"]["kernel"].shape == (3, 3, 2, 16)
    assert params["sobel_predictor"]["Conv_0"]["kernel"].shape == (3, 3, 16, 1)
    mask_logits, boundary_logits = head.apply(variables, feats, None, classes)
    assert mask_logits.shape == (r, 28, 28, k) and boundary_logits.shape == (r, 28, 28, 1)

    # The boundary logits are the two convs applied to Sobel(sigmoid(mask logits of the class)).
    def convs(edges):
        sub = {"params": {"c1": params["sobel_fcn1"], "c2": params["sobel_predictor"]}}

        class Two(flax.linen.Module):
            @flax.linen.compact
            def __call__(self, x):
                x = flax.linen.relu(Conv(16, 3, name="c1")(x))
                return Conv(1, 3, name="c2")(x)
        return Two().apply(sub, edges)
    picked = np.stack([np.asarray(mask_logits)[i, ..., int(classes[i])] for i in range(r)])
    want = convs(sobel_edges(jax.nn.sigmoid(jnp.asarray(picked))))
    np.testing.assert_allclose(np.asarray(boundary_logits), np.asarray(want), atol=1e-5)

    # The boundary output depends on the mask layers: the boundary loss trains the mask head.
    def boundary_sum(p):
        return jnp.sum(head.apply({"params": p}, feats, None, classes)[1] ** 2)
    grads = jax.grad(boundary_sum)(params)
    assert float(jnp.abs(grads["mask_fcn1"]["Conv_0"]["kernel"]).sum()) > 0


# ---- Mask Scoring ----------------------------------------------------------------------------

def test_max_pool_2x2_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(3, 28, 28)).astype(np.float32)
    want = np.zeros((3, 14, 14), np.float32)
    for r in range(3):
        for i in range(14):
            for j in range(14):
                want[r, i, j] = max(x[r, 2 * i, 2 * j], x[r, 2 * i, 2 * j + 1],
                                    x[r, 2 * i + 1, 2 * j], x[r, 2 * i + 1, 2 * j + 1])
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(jnp.asarray(x))), want)


def test_mask_iou_targets_match_numpy():
    rng = np.random.default_rng(2)
    probs = rng.uniform(size=(6, 28, 28)).astype(np.float32)
    targets = (rng.uniform(size=(6, 28, 28)) > 0.6).astype(np.float32)
    probs[4] = 0.0                  # empty prediction: IoU 0
    probs[5] = 0.0
    targets[5] = 0.0                # both empty: 0 / max(0, 1) = 0
    probs[3] = np.where(targets[3] > 0, 0.9, 0.1)   # exact prediction: IoU 1
    got = np.asarray(mask_iou_targets(jnp.asarray(probs), jnp.asarray(targets)))
    for r in range(6):
        p = probs[r] > 0.5
        t = targets[r] > 0.5
        union = np.logical_or(p, t).sum()
        want = np.logical_and(p, t).sum() / union if union else 0.0
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-7)
    assert got[3] == 1.0 and got[4] == 0.0 and got[5] == 0.0


def test_mask_iou_head_shapes_and_full_size_parameter_count():
    head = MaskIoUHead(5, conv_dim=16, fc_dim=32)
    feats = jnp.ones((3, 14, 14, 8))
    probs = jnp.full((3, 28, 28), 0.7)
    variables = head.init(jax.random.PRNGKey(0), feats, probs)
    p = variables["params"]
    assert p["maskiou_fcn1"]["Conv_0"]["kernel"].shape == (3, 3, 9, 16)     # features + 1 mask channel
    assert p["maskiou_fc1"]["kernel"].shape == (7 * 7 * 16, 32)             # last conv has stride 2
    assert head.apply(variables, feats, probs).shape == (3, 5)
    # MS R-CNN at full size (257 -> 256 x4, 256*7*7 -> 1024 -> 1024 -> 80), counted by hand.
    full = MaskIoUHead(80)
    shapes = jax.eval_shape(lambda: full.init(jax.random.PRNGKey(0), jnp.zeros((1, 14, 14, 256)),
                                              jnp.zeros((1, 28, 28))))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    want = (257 * 256 * 9 + 256) + 3 * (256 * 256 * 9 + 256) + (256 * 49 * 1024 + 1024) \
        + (1024 * 1024 + 1024) + (1024 * 80 + 80)
    assert n == want == 16_340_304


def test_mask_iou_loss_value_and_no_gradient_into_masks():
    c = tiny_config("maskrcnn").model
    c.mask_scoring.enabled = True
    rng = np.random.default_rng(3)
    r, k = 4, 3
    logits = jnp.asarray(rng.normal(size=(r, 28, 28, k)).astype(np.float32))
    targets = jnp.asarray((rng.uniform(size=(r, 28, 28)) > 0.5).astype(np.float32))
    classes = jnp.array([1, 0, 2, 3])             # the last is a padding slot (background)
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    pred_iou = jnp.asarray(rng.uniform(size=(r, k)).astype(np.float32))
    out = mask_losses(logits, None, classes, targets, weights, c, pred_iou)
    assert set(out) == {"loss_mask", "loss_mask_iou"}
    want = 0.0
    for i in range(3):
        p = 1 / (1 + np.exp(-np.asarray(logits)[i, ..., int(classes[i])])) > 0.5
        t = np.asarray(targets)[i] > 0.5
        iou = np.logical_and(p, t).sum() / max(np.logical_or(p, t).sum(), 1)
        want += (float(pred_iou[i, int(classes[i])]) - iou) ** 2
    np.testing.assert_allclose(float(out["loss_mask_iou"]), want / 3, rtol=1e-5)
    g_logits, g_iou = jax.grad(lambda lg, pi: mask_losses(lg, None, classes, targets, weights, c, pi)
                               ["loss_mask_iou"], argnums=(0, 1))(logits, pred_iou)
    assert float(jnp.abs(g_logits).sum()) == 0.0
    assert float(jnp.abs(g_iou[3]).sum()) == 0.0 and float(jnp.abs(g_iou[:3]).sum()) > 0
