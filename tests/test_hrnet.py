"""HRNetV2 backbone: output layout, parameter count of HRNetV2-W32 against a hand count, the
multi-resolution fusion against numpy, freezing, and BMask R-CNN training on a tiny HRNet."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import first_batch, tiny_config

from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.models.hrnet import HRNet, MultiResolutionFusion
from bmask_jax.engine.optim import parameter_labels
from bmask_jax.engine.state import create_train_state
from bmask_jax.train import train_step

TINY = {"stem_channels": 8, "stage1_channels": 4, "stage1_blocks": 1, "widths": (4, 8, 12, 16),
        "num_modules": (1, 1, 1), "num_blocks": (1, 1, 1)}


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_tiny_hrnet_outputs_strides_and_widths():
    model = HRNet(**TINY, norm="GN", freeze_at=0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    out = jax.jit(model.apply)(variables, x)
    assert sorted(out) == ["res2", "res3", "res4", "res5"]
    for (name, stride), width in zip((("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)), TINY["widths"]):
        assert out[name].shape == (2, 64 // stride, 64 // stride, width), (name, out[name].shape)
        assert np.isfinite(np.asarray(out[name])).all()
        assert (np.asarray(out[name]) >= 0).all()       # every branch leaves a fusion ReLU


def hrnetv2_w32_conv_weights() -> int:
    """HRNetV2-W32's conv weights counted by hand from the architecture (no conv has a bias):
    a k x k conv from a to b channels has k*k*a*b weights."""
    stem = 9 * 3 * 64 + 9 * 64 * 64
    # stage 1: 4 bottlenecks 1x1 -> 3x3 -> 1x1 (64, 64, 256); the first projects 64 -> 256.
    stage1 = (64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256) + 3 * (256 * 64 + 9 * 64 * 64 + 64 * 256)
    transition1 = 9 * 256 * 32 + 9 * 256 * 64                      # 3x3 to 32, 3x3 stride 2 to 64
    # A module: 4 basic blocks (two 3x3 convs) per branch, then the fusion: a 1x1 conv for every
    # coarser-to-finer pair, and for finer-to-coarser pairs a chain of stride-2 3x3 convs (the
    # intermediate ones keep the source width).
    stage2 = 1 * (4 * 2 * 9 * (32 * 32 + 64 * 64)
                  + 64 * 32                                        # up 1->0
                  + 9 * 32 * 64)                                   # down 0->1
    transition2 = 9 * 64 * 128
    stage3 = 4 * (4 * 2 * 9 * (32 * 32 + 64 * 64 + 128 * 128)
                  + 64 * 32 + 128 * 32 + 128 * 64                  # up 1->0, 2->0, 2->1
                  + 9 * 32 * 64                                    # down 0->1
                  + 9 * 32 * 32 + 9 * 32 * 128                     # down 0->2
                  + 9 * 64 * 128)                                  # down 1->2
    transition3 = 9 * 128 * 256
    stage4 = 3 * (4 * 2 * 9 * (32 * 32 + 64 * 64 + 128 * 128 + 256 * 256)
                  + 64 * 32 + 128 * 32 + 256 * 32 + 128 * 64 + 256 * 64 + 256 * 128   # up
                  + 9 * 32 * 64                                    # down 0->1
                  + 9 * 32 * 32 + 9 * 32 * 128                     # down 0->2
                  + 9 * 32 * 32 + 9 * 32 * 32 + 9 * 32 * 256       # down 0->3
                  + 9 * 64 * 128                                   # down 1->2
                  + 9 * 64 * 64 + 9 * 64 * 256                     # down 1->3
                  + 9 * 128 * 256)                                 # down 2->3
    return stem + stage1 + transition1 + stage2 + transition2 + stage3 + transition3 + stage4


def hrnetv2_w32_norm_channels() -> int:
    """Channels normalised after the convs above (one norm per conv)."""
    stem = 64 + 64
    stage1 = (64 + 64 + 256 + 256) + 3 * (64 + 64 + 256)
    transition1 = 32 + 64
    stage2 = 1 * (4 * 2 * (32 + 64) + 32 + 64)
    transition2 = 128
    stage3 = 4 * (4 * 2 * (32 + 64 + 128) + (32 + 32 + 64) + 64 + (32 + 128) + 128)
    transition3 = 256
    stage4 = 3 * (4 * 2 * (32 + 64 + 128 + 256) + (32 + 32 + 32 + 64 + 64 + 128)
                  + 64 + (32 + 128) + (32 + 32 + 256) + 128 + (64 + 256) + 256)
    return stem + stage1 + transition1 + stage2 + transition2 + stage3 + transition3 + stage4


def test_hrnetv2_w32_parameter_count_equals_hand_count():
    conv_weights = hrnetv2_w32_conv_weights()
    assert conv_weights == 29_248_192
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    # FrozenBN: scale/shift are constants, so the parameters are the conv weights alone.
    shapes = jax.eval_shape(lambda: HRNet(norm="FrozenBN").init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))
    assert count(shapes["params"]) == conv_weights
    assert count(shapes["frozen"]) == 2 * hrnetv2_w32_norm_channels()
    # With a trainable affine norm (BN's weight/bias in the reference) the count is ~29.3M.
    shapes = jax.eval_shape(lambda: HRNet(norm="GN").init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))
    assert count(shapes["params"]) == conv_weights + 2 * hrnetv2_w32_norm_channels() == 29_305_536


def test_hrnet_w32_variant_builds_the_w32_backbone():
    from bmask_jax.engine.summary import parameter_counts
    from configs import bmask_rcnn
    c = bmask_rcnn.get_config("hrnet_w32_fpn_1x")
    assert c.model.backbone.name == "hrnet" and c.model.input_format == "RGB"
    c.data.canvas_buckets = ((256, 256),)   # eval_shape only; a smaller canvas traces the same
    counts = parameter_counts(c)
    assert counts["backbone"] == hrnetv2_w32_conv_weights()
    # The FPN laterals read 32/64/128/256 channels instead of ResNet's 256..2048.
    assert counts["fpn"] == (32 + 64 + 128 + 256) * 256 + 4 * 256 + 4 * (9 * 256 * 256 + 256)


# -- multi-resolution fusion against numpy ---------------------------------------------------------
def np_conv(x, w, stride):
    """x [N, H, W, Ci], w [k, k, Ci, Co], zero padding k // 2 on every side."""
    k = w.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho = (x.shape[1] + 2 * p - k) // stride + 1
    wo = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j] = np.einsum("nabc,abco->no", patch, w)
    return out


def np_fusion(xs, params, frozen):
    """HRNet's fuse layers written out: out_i = relu(sum_j f_ij(x_j))."""
    def conv_norm(x, name, stride):
        w = np.asarray(params[f"{name}_conv"]["Conv_0"]["kernel"])
        norm = frozen[f"{name}_norm"]
        return np_conv(x, w, stride) * np.asarray(norm["scale"]) + np.asarray(norm["shift"])

    outs = []
    for i, xi in enumerate(xs):
        y = xi.copy()
        for j, xj in enumerate(xs):
            if j > i:
                z = conv_norm(xj, f"fuse{i}_{j}", 1)
                f = 2 ** (j - i)
                up = np.zeros((z.shape[0], z.shape[1] * f, z.shape[2] * f, z.shape[3]))
                for a in range(up.shape[1]):
                    for b in range(up.shape[2]):
                        up[:, a, b] = z[:, a // f, b // f]
                y = y + up[:, :xi.shape[1], :xi.shape[2]]
            elif j < i:
                z = xj
                for k in range(i - j):
                    z = conv_norm(z, f"fuse{i}_{j}_{k}", 2)
                    if k < i - j - 1:
                        z = np.maximum(z, 0)
                y = y + z
        outs.append(np.maximum(y, 0))
    return outs


def check_fusion(shapes, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes) + 1)
    xs = [jax.random.normal(k, s) for k, s in zip(keys, shapes)]
    fusion = MultiResolutionFusion("FrozenBN")
    variables = jax.jit(fusion.init)(keys[-1], xs)
    # Known, non-trivial norm constants (FrozenBN's init would be the identity).
    leaves, treedef = jax.tree_util.tree_flatten(variables["frozen"])
    rng = np.random.default_rng(seed)
    frozen = jax.tree_util.tree_unflatten(treedef, [rng.normal(0.5, 0.3, x.shape).astype(np.float32)
                                                    for x in leaves])
    out = jax.jit(fusion.apply)({"params": variables["params"], "frozen": frozen}, xs)
    ref = np_fusion([np.asarray(x, np.float64) for x in xs], variables["params"], frozen)
    assert [o.shape for o in out] == [tuple(s) for s in shapes]
    for o, r in zip(out, ref):
        np.testing.assert_allclose(np.asarray(o), r, rtol=1e-4, atol=1e-4)


def test_two_branch_fusion_matches_numpy():
    # Odd sizes: the stride-2 branch is ceil(5 / 2) = 3, its 2x upsampling is cropped to 5.
    check_fusion([(2, 5, 5, 3), (2, 3, 3, 4)], seed=0)


def test_three_branch_fusion_matches_numpy():
    # Branch 0 -> 2 takes two stride-2 convs with a ReLU between them.
    check_fusion([(1, 7, 7, 2), (1, 4, 4, 3), (1, 2, 2, 5)], seed=1)


# -- freezing and training --------------------------------------------------------------------------
def test_freeze_at_2_stops_stem_and_stage1():
    model = HRNet(**TINY, norm="GN", freeze_at=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 64, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]
    grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(v ** 2) for v in model.apply({"params": p}, x).values())))(params)
    c = tiny_config()
    c.model.backbone.update(name="hrnet", freeze_at=2)
    labels = parameter_labels({"backbone": params}, c.model)["backbone"]
    for name in grads:
        frozen = name.startswith(("stem_", "res2_"))
        assert [v == "frozen" for v in jax.tree_util.tree_leaves(labels[name])] == \
            [frozen] * len(jax.tree_util.tree_leaves(labels[name])), name
        moved = any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads[name]))
        assert moved != frozen, name
    assert {"stem_conv1", "stem_conv2", "res2_0", "transition1_0_conv", "stage4_0"} <= set(grads)


@pytest.mark.slow
def test_bmask_rcnn_trains_with_a_tiny_hrnet():
    c = tiny_config()
    # FrozenBN (the pretrained setting) rather than the from-scratch GN compiles much faster.
    c.model.backbone.update(name="hrnet", norm="FrozenBN")
    c.model.backbone.hrnet.update(**TINY)
    model = BMaskRCNN(c.model)
    state, tx = create_train_state(c, model, jax.random.PRNGKey(0))
    assert "stage4_0" in state.params["backbone"]
    batch = first_batch(c)
    step = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False))
    first = state.params["backbone"]["stage4_0"]["fusion"]["fuse0_3_conv"]["Conv_0"]["kernel"]
    for _ in range(3):
        state, metrics = step(state, batch)
        assert all(np.isfinite(float(v)) for k, v in metrics.items() if k.startswith("loss")), metrics
        assert np.isfinite(float(metrics["total_loss"]))
    last = state.params["backbone"]["stage4_0"]["fusion"]["fuse0_3_conv"]["Conv_0"]["kernel"]
    assert not np.allclose(first, last)     # gradients reach the HRNet fusion convs
