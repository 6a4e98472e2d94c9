"""ViTDet's pieces (models/vit.py) against independent references, and its detectron2 layout:

- the position table's bicubic resize and the relative tables' linear resize against PyTorch's
  F.interpolate (detectron2 calls it), and the relative-position gather against get_rel_pos's
  formula worked by hand;
- window attention with decomposed relative positions against a brute-force numpy version
  of detectron2's Attention (every query, key and head in a loop);
- the key/shape layout of detectron2's ViTDet (tests/helpers.d2_vitdet_shapes, written from
  detectron2's modules) imports into ViTDet-B, Cascade ViTDet-B and the small variant with
  no missing, unexpected or mis-shaped key and no layer left fresh.

detectron2's own ViTDet runs in tests/test_lazyconfig_parity.py where its sources are present."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax import config as config_lib
from bmask_jax.engine.variables import abstract_variables
from bmask_jax.models import vit
from bmask_jax.weights import convert
from helpers import d2_vitdet_shapes

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("out_size,in_size", [(64, 14), (8, 14), (14, 14), (5, 3), (3, 7)])
def test_bicubic_matrix_is_torchs_interpolate(out_size, in_size):
    grid = np.random.default_rng(0).normal(size=(in_size, in_size)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(out_size, out_size),
                                           mode="bicubic", align_corners=False)[0, 0].numpy()
    m = vit.bicubic_matrix(out_size, in_size)
    np.testing.assert_allclose(m @ grid @ m.T, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_size,in_size", [(127, 27), (7, 127), (13, 7), (27, 27)])
def test_linear_matrix_is_torchs_interpolate(out_size, in_size):
    table = np.random.default_rng(1).normal(size=(in_size, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(table.T.copy())[None], size=out_size,
                                           mode="linear", align_corners=False)[0].numpy().T
    np.testing.assert_allclose(vit.linear_matrix(out_size, in_size) @ table, want, rtol=1e-5, atol=1e-6)


def test_relative_index_as_worked_by_hand():
    """q = k = 3: rows (q - k) + 2, i.e. [[2, 1, 0], [3, 2, 1], [4, 3, 2]]. q = 2, k = 4: queries
    at 0 and 2 (scaled by k / q), keys at 0..3, offset 3."""
    np.testing.assert_array_equal(vit.relative_index(3, 3), [[2, 1, 0], [3, 2, 1], [4, 3, 2]])
    np.testing.assert_array_equal(vit.relative_index(2, 4), [[3, 2, 1, 0], [5, 4, 3, 2]])


def test_absolute_embeddings_drop_the_class_token_and_resize():
    rng = np.random.default_rng(2)
    table = rng.normal(size=(1, 1 + 4 * 4, 5)).astype(np.float32)
    got = np.asarray(vit.absolute_embeddings(jnp.asarray(table), True, (6, 3)))
    grid = torch.from_numpy(table[0, 1:].reshape(4, 4, 5)).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    same = np.asarray(vit.absolute_embeddings(jnp.asarray(table[:, 1:]), False, (4, 4)))
    np.testing.assert_array_equal(same[0], table[0, 1:].reshape(4, 4, 5))


def brute_force_attention(x, qkv_w, qkv_b, proj_w, proj_b, table_h, table_w, heads):
    """detectron2's Attention on one [H, W, C] map, written out per head, query and key."""
    h, w, c = x.shape
    hd = c // heads
    qkv = x.reshape(h * w, c) @ qkv_w + qkv_b                   # [N, 3C], torch's (3, heads, hd) order
    q, k, v = (qkv[:, i * c:(i + 1) * c].reshape(h * w, heads, hd) for i in range(3))
    out = np.zeros((h * w, heads, hd))
    for n in range(heads):
        for a in range(h * w):
            ya, xa = divmod(a, w)
            logits = np.zeros(h * w)
            for b in range(h * w):
                yb, xb = divmod(b, w)
                logits[b] = (q[a, n] * hd ** -0.5) @ k[b, n]
                logits[b] += q[a, n] @ table_h[ya - yb + h - 1] + q[a, n] @ table_w[xa - xb + w - 1]
            p = np.exp(logits - logits.max())
            out[a, n] = (p / p.sum()) @ v[:, n]
    return (out.reshape(h * w, c) @ proj_w + proj_b).reshape(h, w, c)


def test_attention_with_relative_positions_against_brute_force():
    rng = np.random.default_rng(3)
    h, w, c, heads = 3, 4, 8, 2
    x = rng.normal(size=(1, h, w, c)).astype(np.float32)
    module = vit.Attention(heads, (h, w))
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    p["rel_pos_h"] = rng.normal(size=p["rel_pos_h"].shape).astype(np.float32)
    p["rel_pos_w"] = rng.normal(size=p["rel_pos_w"].shape).astype(np.float32)
    p["qkv"]["bias"] = rng.normal(size=p["qkv"]["bias"].shape).astype(np.float32)
    got = np.asarray(module.apply({"params": p}, jnp.asarray(x)))
    want = brute_force_attention(x[0].astype(np.float64), p["qkv"]["kernel"], p["qkv"]["bias"], p["proj"]["kernel"],
                                 p["proj"]["bias"], p["rel_pos_h"], p["rel_pos_w"], heads)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_and_gelu_values_and_gradients_are_the_formulas(dtype):
    """layers.softmax / gelu against jax.nn's, values and gradients (JAX differentiating the
    formulas), in float32 and with a bfloat16 output."""
    from bmask_jax.models import layers
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 7)) * 3, jnp.float32)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)

    def ours(fn):
        return lambda t: jnp.sum(fn(t).astype(jnp.float32) * g)

    for mine, theirs in ((lambda t: layers.softmax(t, dtype), lambda t: jax.nn.softmax(t, axis=-1).astype(dtype)),
                         (lambda t: layers.gelu(t.astype(dtype)), lambda t: jax.nn.gelu(t.astype(dtype), False))):
        np.testing.assert_allclose(np.asarray(mine(x), np.float32), np.asarray(theirs(x), np.float32), **tol)
        np.testing.assert_allclose(jax.grad(ours(mine))(x), jax.grad(ours(theirs))(x), **tol)


def test_a_global_block_keeps_one_attention_map_for_its_gradient():
    """What the backward pass of a global ViT block keeps: one [heads, tokens, tokens] array
    (the softmax's output, in the compute dtype), where jax.nn.softmax's formula kept two (and
    a float32 one beside its bfloat16 copy under bfloat16), and two MLP-wide arrays, where the
    erf GELU's formula kept four. With remat, only the block's input."""
    import contextlib
    import io
    import re
    from jax.ad_checkpoint import print_saved_residuals     # its list, printed (the only public form)
    x = jnp.zeros((1, 64, 64, 3))

    def kept(dtype, remat):
        model = vit.ViT(embed_dim=32, depth=1, num_heads=2, patch_size=4, img_size=64, global_blocks=(0,),
                        drop_path_rate=0.0, pretrain_img_size=64, dtype=dtype, remat=remat)
        params = model.init(jax.random.PRNGKey(0), x)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_saved_residuals(lambda p: jnp.sum(model.apply(p, x).astype(jnp.float32)), params)
        lines = [line for line in printed.getvalue().splitlines() if "argument" not in line]
        return [(kind, tuple(int(d) for d in dims.split(",") if d))
                for kind, dims in (re.match(r"(\w+)\[([\d,]*)\]", line).groups() for line in lines)]

    for dtype, kind in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
        shapes = kept(dtype, False)
        assert [k for k, s in shapes if s == (2, 256, 256)] == [kind], shapes
        assert sum(s == (1, 16, 16, 128) for _, s in shapes) == 2, shapes
    assert [s for _, s in kept(jnp.float32, True) if np.prod(s) > 16 * 16 and s != x.shape] == [(1, 16, 16, 32)]


def test_remat_gives_the_same_gradients():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 64, 3)), jnp.float32)
    grads = []
    for remat in (False, True):
        model = vit.ViT(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=64, window_size=4,
                        global_blocks=(1,), drop_path_rate=0.2, pretrain_img_size=64, remat=remat)
        params = model.init(jax.random.PRNGKey(0), x)
        grads.append(jax.grad(lambda p: jnp.sum(model.apply(p, x, True, rngs={"sampling": jax.random.PRNGKey(2)})
                                                ** 2))(params))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


def test_windows_pad_and_come_back():
    x = jnp.arange(2 * 5 * 7 * 3, dtype=jnp.float32).reshape(2, 5, 7, 3)
    windows, padded = vit.window_partition(x, 4)
    assert windows.shape == (2 * 2 * 2, 4, 4, 3) and padded == (8, 8)
    np.testing.assert_array_equal(windows[1], jnp.pad(x, ((0, 0), (0, 3), (0, 1), (0, 0)))[0, :4, 4:8])
    np.testing.assert_array_equal(vit.window_unpartition(windows, 4, padded, (5, 7)), x)


def zeros_for(config):
    abstract = abstract_variables(config)
    return (jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract["params"]),
            jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract.get("frozen", {})))


@pytest.mark.parametrize("spec", ["bmask_rcnn:tiny_vitdet", "mask_rcnn:cascade_vitdet_b", "bmask_rcnn:vitdet_b"])
def test_detectron2_vitdet_layout_imports_whole(spec):
    """Every key lands (values checked on the small model; ViT-B's 86M zeros check shapes)."""
    config = config_lib.from_file(spec)
    shapes = d2_vitdet_shapes(config)
    small = config.model.backbone.vit.depth < 12
    rng = np.random.default_rng(0)
    checkpoint = {k: rng.normal(size=s).astype(np.float32) if small else np.zeros(s, np.float32)
                  for k, s in shapes.items()}
    params, frozen = zeros_for(config)
    new_params, _, report = convert(checkpoint, params, frozen, "detectron2", spec)
    assert not report.initialised_fresh and len(report.loaded) == len(shapes)
    assert report.config_changes["model.input_format"] == "RGB"
    if not small:
        return
    b = new_params["backbone"]
    np.testing.assert_array_equal(b["pos_embed"], checkpoint["backbone.net.pos_embed"])
    np.testing.assert_array_equal(b["blocks_0"]["attn"]["qkv"]["kernel"],
                                  checkpoint["backbone.net.blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(b["blocks_1"]["attn"]["rel_pos_w"], checkpoint["backbone.net.blocks.1.attn.rel_pos_w"])
    np.testing.assert_array_equal(new_params["fpn"]["simfp_2_1"]["scale"], checkpoint["backbone.simfp_2.1.weight"])
    np.testing.assert_array_equal(new_params["fpn"]["simfp_2_0"]["kernel"],
                                  checkpoint["backbone.simfp_2.0.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(b["patch_embed"]["Conv_0"]["kernel"],
                                  checkpoint["backbone.net.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(new_params["rpn_head"]["conv1"]["Conv_0"]["bias"],
                                  checkpoint["proposal_generator.rpn_head.conv.conv1.bias"])
    np.testing.assert_array_equal(new_params["mask_head"]["downsample_norm"]["bias"],
                                  checkpoint["roi_heads.mask_head.downsample.norm.bias"])
    # fc1 reads conv4's (C, 7, 7) map, flattened (C, H, W) by detectron2 and (H, W, C) here.
    c = config.model.roi_heads.conv_dims[-1]
    w = checkpoint["roi_heads.box_head.fc1.weight"]
    np.testing.assert_array_equal(new_params["box_head"]["fc1"]["kernel"],
                                  w.reshape(-1, c, 7, 7).transpose(2, 3, 1, 0).reshape(49 * c, -1))


def test_optimizer_groups_and_layer_decay_as_detectron2s_vitdet_b():
    """get_vit_lr_decay_rate(name, 0.7, 12): 0.7 ** 13 for the patch and position embeddings,
    0.7 ** (12 - i) for block i, 1 for the pyramid and heads; pos_embed has no weight decay,
    the LayerNorms (the pyramid's simfp_2.1 too) weight_decay_norm."""
    from bmask_jax.engine import optim
    config = config_lib.from_file("mask_rcnn:vitdet_b")
    params, _ = zeros_for(config)
    factors = optim.vit_lr_decay_factors(params, config.model, 0.7)
    assert factors["backbone"]["pos_embed"] == pytest.approx(0.7 ** 13)
    assert factors["backbone"]["patch_embed"]["Conv_0"]["kernel"] == pytest.approx(0.7 ** 13)
    assert factors["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"] == pytest.approx(0.7 ** 12)
    assert factors["backbone"]["blocks_11"]["mlp"]["fc2"]["bias"] == pytest.approx(0.7)
    assert factors["fpn"]["simfp_2_0"]["kernel"] == 1.0 and factors["box_predictor"]["cls_score"]["kernel"] == 1.0
    labels = optim.parameter_labels(params, config.model, tuple(config.train.no_decay_params))
    assert labels["backbone"]["pos_embed"] == "no_decay"
    assert labels["backbone"]["blocks_3"]["norm1"]["scale"] == "norm"
    assert labels["fpn"]["simfp_2_1"]["bias"] == "norm" and labels["fpn"]["simfp_2_4_norm"]["scale"] == "norm"
    assert labels["backbone"]["blocks_3"]["attn"]["rel_pos_h"] == "default"
    assert labels["box_head"]["conv1"]["Conv_0"]["kernel"] == "default"


def test_layer_decay_scales_each_update_by_its_factor():
    from bmask_jax.engine import optim
    config = config_lib.from_file("bmask_rcnn:tiny_vitdet")
    config.train.update(optimizer="adamw", weight_decay=0.1, no_decay_params=("pos_embed",))
    params, _ = zeros_for(config)
    params = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.5, np.float32), params)
    grads = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.01, np.float32), params)
    updates = {}
    for decay in (1.0, 0.5):
        config.train.layer_decay = decay
        tx = optim._make_optimizer(config, params)
        updates[decay], _ = tx.update(grads, tx.init(params), params)
    factors = optim.vit_lr_decay_factors(params, config.model, 0.5)
    for (path, a), b, f in zip(jax.tree_util.tree_leaves_with_path(updates[1.0]), jax.tree_util.tree_leaves(updates[0.5]),
                               jax.tree_util.tree_leaves(factors)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a) * f, rtol=1e-6, err_msg=str(path))
    assert jax.tree_util.tree_leaves(factors)[0] != 1.0 or len(set(jax.tree_util.tree_leaves(factors))) > 1


@pytest.mark.parametrize("seed,flip", [(0, False), (1, True), (5, False), (7, True)])
def test_large_scale_jitter_against_pillow(seed, flip):
    """The image is Pillow's bilinear resize of the (flipped) image, cropped; each mask is
    Pillow's nearest resize, cropped; boxes are the cropped masks' extents; instances cropped
    away are dropped. The two draws (scale, then the window's place) replayed by hand."""
    from PIL import Image

    from bmask_jax.data.transforms import large_scale_jitter
    h, w, size = 60, 80, 64
    image = (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)
    masks = np.zeros((3, h, w), bool)
    masks[0, 10:30, 20:60] = True
    masks[1, 0:3, 0:3] = True
    masks[2, 40:59, 70:79] = True
    example = {"image": image, "masks": masks, "boxes": np.zeros((3, 4), np.float32), "classes": np.array([1, 2, 3]),
               "iscrowd": np.array([False, False, True])}
    out = large_scale_jitter(example, np.random.default_rng(seed), size, 0.1, 2.0, flip)

    replay = np.random.default_rng(seed)
    s, u = replay.uniform(0.1, 2.0), replay.uniform(0.0, 1.0)
    scale = min(size * s / h, size * s / w)
    nh, nw = int(np.round(h * scale)), int(np.round(w * scale))
    oy, ox = int(np.round(max(nh - size, 0) * u)), int(np.round(max(nw - size, 0) * u))
    window = (slice(oy, oy + min(size, nh)), slice(ox, ox + min(size, nw)))
    src = image[:, ::-1] if flip else image
    want_image = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((nw, nh), Image.BILINEAR))[window]
    np.testing.assert_array_equal(out["image"], want_image)
    want_masks, want_boxes, kept = [], [], []
    for i, m in enumerate(masks):
        m = np.ascontiguousarray(m[:, ::-1] if flip else m)
        r = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST))[window] > 0
        if r.any():
            ys, xs = np.nonzero(r)
            want_masks.append(r)
            want_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            kept.append(i)
    assert out["image"].shape[0] <= size and out["image"].shape[1] <= size
    np.testing.assert_array_equal(out["masks"], np.array(want_masks, bool).reshape(-1, *out["image"].shape[:2]))
    np.testing.assert_array_equal(out["boxes"], np.array(want_boxes, np.float32).reshape(-1, 4))
    np.testing.assert_array_equal(out["classes"], np.array([1, 2, 3])[kept])
    np.testing.assert_array_equal(out["iscrowd"], np.array([False, False, True])[kept])


@pytest.mark.parametrize("seed", [2, 3])            # scales 0.6 and 0.26: windows smaller than the canvas
def test_large_scale_jitter_with_a_fill_pads_the_window_in_the_image(seed):
    """FixedSizeCrop(pad=True, pad_value=128), the LSJ baselines' mapper: the same crop as
    without a fill, then the image filled with 128 and the masks with False to size x size,
    right and bottom; boxes and classes unchanged."""
    from bmask_jax.data.transforms import large_scale_jitter
    h, w, size = 60, 80, 64
    image = (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)
    masks = np.zeros((2, h, w), bool)
    masks[0, 10:30, 20:60] = True
    masks[1, 40:59, 5:30] = True
    example = {"image": image, "masks": masks, "boxes": np.zeros((2, 4), np.float32), "classes": np.array([1, 2])}
    plain = large_scale_jitter(example, np.random.default_rng(seed), size, 0.1, 2.0, False)
    filled = large_scale_jitter(example, np.random.default_rng(seed), size, 0.1, 2.0, False, pad_value=128.0)
    ch, cw = plain["image"].shape[:2]
    assert filled["image"].shape == (size, size, 3) and filled["masks"].shape[1:] == (size, size)
    assert (ch, cw) != (size, size)                     # these seeds draw a window smaller than the canvas
    np.testing.assert_array_equal(filled["image"][:ch, :cw], plain["image"])
    assert (filled["image"][ch:] == 128).all() and (filled["image"][:, cw:] == 128).all()
    np.testing.assert_array_equal(filled["masks"][:, :ch, :cw], plain["masks"])
    assert not filled["masks"][:, ch:].any() and not filled["masks"][:, :, cw:].any()
    np.testing.assert_array_equal(filled["boxes"], plain["boxes"])
    np.testing.assert_array_equal(filled["classes"], plain["classes"])


def test_lsj_batches_fill_one_static_canvas():
    from bmask_jax.data.pipeline import TrainBatches, build_dataset
    config = config_lib.from_file("bmask_rcnn:tiny_vitdet")
    loader = TrainBatches(build_dataset(config.data, "train"), config.data, 4, seed=0)
    try:
        batch = loader.batch(0, prefetch=0)
    finally:
        loader.close()
    assert batch["image"].shape == (4, 64, 64, 3)
    assert (batch["image_hw"] <= 64).all() and len({tuple(x) for x in batch["image_hw"]}) > 1   # jittered sizes
    valid = batch["gt_valid"]
    boxes = batch["gt_boxes"][valid]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, 2] <= batch["image_hw"][np.nonzero(valid)[0], 1]).all()


def mae_checkpoint(config, seed=0) -> dict[str, np.ndarray]:
    """MAE's mae_pretrain_vit_*.pth layout (timm's VisionTransformer encoder, written from its
    modules): class token, position table with the class token's row, patch conv, blocks, the
    final norm."""
    v = config.model.backbone.vit
    d, p, hidden = v.embed_dim, v.patch_size, int(v.embed_dim * v.mlp_ratio)
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, (v.pretrain_img_size // p) ** 2 + 1, d),
              "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(v.depth):
        for name, shape in (("norm1", (d,)), ("norm2", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)),
                            ("mlp.fc1", (hidden, d)), ("mlp.fc2", (d, hidden))):
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_mae_backbone_imports_as_detectron2s_matching_heuristics_do(tmp_path):
    """A .pth in MAE's layout (saved by torch) fills the ViT; the relative tables and all above
    the ViT keep their initial values; the class token and the final norm are ignored."""
    from bmask_jax.weights import detect_kind, read_checkpoint
    config = config_lib.from_file("bmask_rcnn:tiny_vitdet")
    arrays = mae_checkpoint(config)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in arrays.items()}}, path)
    checkpoint = read_checkpoint(str(path))
    assert detect_kind(checkpoint) == "mae"
    params, frozen = zeros_for(config)
    new, _, report = convert(checkpoint, params, frozen, "auto", str(path))
    assert report.kind == "mae" and sorted(report.ignored) == ["cls_token", "norm.bias", "norm.weight"]
    fresh = set(report.initialised_fresh)
    assert {f"backbone/blocks_{i}/attn" for i in range(4)} <= fresh and "fpn/simfp_2_0" in fresh
    assert not any(name.startswith("backbone/") and not name.endswith("/attn") for name in fresh)
    np.testing.assert_array_equal(new["backbone"]["pos_embed"], arrays["pos_embed"])
    np.testing.assert_array_equal(new["backbone"]["blocks_2"]["mlp"]["fc1"]["kernel"], arrays["blocks.2.mlp.fc1.weight"].T)
    np.testing.assert_array_equal(new["backbone"]["blocks_1"]["norm2"]["scale"], arrays["blocks.1.norm2.weight"])
    assert report.config_changes == {"model.input_format": "RGB", "model.pixel_mean": (123.675, 116.280, 103.530),
                                     "model.pixel_std": (58.395, 57.120, 57.375)}


@pytest.mark.slow
def test_vitdet_b_train_step_and_detector_lower_for_gpu_and_tpu():
    """ViTDet-B at 1024x1024 in bf16, lowered with jax.export for CUDA and TPU (nothing
    compiles): an op either platform cannot lower fails here, on a CPU. XLA's own kernels, as
    model.kernels "auto" picks on those platforms."""
    from bmask_jax.engine.optim import make_optimizer
    from bmask_jax.engine.state import step_zero_state
    from bmask_jax.engine.variables import dummy_batch
    from bmask_jax.inference.export import detector_function
    from bmask_jax.models.bmask_rcnn import BMaskRCNN
    from bmask_jax.train import MODEL_KEYS, train_step

    config = config_lib.from_file("bmask_rcnn:vitdet_b")
    config.model.update(compute_dtype="bfloat16", kernels="xla")
    abstract = abstract_variables(config)
    tx = make_optimizer(config, abstract["params"])
    state = jax.eval_shape(lambda v: step_zero_state(config, v)[0], abstract)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dummy_batch(config, 1).items() if k in MODEL_KEYS}
    model = BMaskRCNN(config.model)
    step = jax.export.export(jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False)),
                             platforms=("cuda", "tpu"))(state, batch)
    assert step.platforms == ("cuda", "tpu")
    assert "stablehlo.dot_general" in step.mlir_module() and "custom_call @cpu" not in step.mlir_module()
    detect = detector_function(config)
    detector = jax.export.export(jax.jit(detect), platforms=("cuda", "tpu"))(
        abstract, batch["image"], batch["image_hw"])
    assert detector.platforms == ("cuda", "tpu") and len(detector.out_avals) >= 6
