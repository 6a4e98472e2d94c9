"""Multilevel RoIAlign against a plain numpy transcription of torchvision's aligned roi_align
kernel, against torchvision's own outputs (reference npz), and its gradient against finite
differences."""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.ops.roi_align import assign_levels, pool_method, roi_align

from helpers import reference as _reference


# ------------------------------------------------------------------ numpy reference (torchvision)

def _bilinear(feat, y, x):
    """torchvision's bilinear_interpolate on feat [H, W, C] at (y, x) -> [C]."""
    h, w = feat.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(feat.shape[-1])
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feat[y_low, x_low] + hy * lx * feat[y_low, x_high]
            + ly * hx * feat[y_high, x_low] + ly * lx * feat[y_high, x_high])


def _ref_roi_align(feat, box, scale, out, sampling_ratio, grid_cap=None):
    """torchvision roi_align (aligned=True) of one box from feat [H, W, C] -> [out, out, C].
    grid_cap: optional cap on the adaptive grid (bmask_jax's max_adaptive_samples)."""
    feat = np.asarray(feat, np.float64)
    x1 = box[0] * scale - 0.5
    y1 = box[1] * scale - 0.5
    roi_w = box[2] * scale - 0.5 - x1
    roi_h = box[3] * scale - 0.5 - y1
    bin_h, bin_w = roi_h / out, roi_w / out
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out)
    if grid_cap is not None:
        gh, gw = min(gh, grid_cap), min(gw, grid_cap)
    count = max(gh * gw, 1)
    result = np.zeros((out, out, feat.shape[-1]))
    for ph in range(out):
        for pw in range(out):
            acc = np.zeros(feat.shape[-1])
            for iy in range(gh):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh
                for ix in range(gw):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw
                    acc += _bilinear(feat, y, x)
            result[ph, pw] = acc / count
    return result


@partial(jax.jit, static_argnames=("strides", "output_size", "sampling_ratio", "max_adaptive_samples", "method"))
def _jit_roi_align(features, boxes, levels, strides, output_size, sampling_ratio, max_adaptive_samples=4,
                   method="gather"):
    return roi_align(features, boxes, levels, strides, output_size, sampling_ratio,
                     max_adaptive_samples=max_adaptive_samples, method=method)


# Both formulations (a weighted gather, and separable matmuls) against the same references.
METHODS = pytest.mark.parametrize("method", ["gather", "matmul"])


def _boxes_for_map(rng, n, h, w, stride, max_side):
    """Boxes in image pixels over a (h*stride, w*stride) image, some sticking out of it."""
    img_h, img_w = h * stride, w * stride
    x1 = rng.uniform(-0.2 * img_w, 0.9 * img_w, n)
    y1 = rng.uniform(-0.2 * img_h, 0.9 * img_h, n)
    bw = rng.uniform(1.0, max_side, n)
    bh = rng.uniform(1.0, max_side, n)
    return np.stack([x1, y1, x1 + bw, y1 + bh], 1).astype(np.float32)


# ------------------------------------------------------------------ single level vs numpy loop

@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@METHODS
def test_single_level_vs_numpy_loop(output_size, sampling_ratio, method):
    rng = np.random.default_rng(output_size + sampling_ratio)
    h, w, c, stride = 12, 15, 3, 4
    feat = rng.normal(size=(h, w, c)).astype(np.float32)
    # max side such that the adaptive grid stays within the default cap of 4 samples per side
    boxes = _boxes_for_map(rng, 6, h, w, stride, max_side=min(stride * 4 * output_size, 56))
    boxes = np.concatenate([boxes, np.array([
        [-30, -30, -6, -5],             # entirely outside, beyond the one-pixel margin: zeros
        [w * stride - 8, h * stride - 8, w * stride + 20, h * stride + 12],   # over the far edge
        [10, 10, 10.5, 11],             # tiny
        [0, 0, w * stride, h * stride],  # the whole map
    ], np.float32)])
    got = np.asarray(_jit_roi_align([jnp.asarray(feat)], jnp.asarray(boxes), jnp.zeros(len(boxes), jnp.int32),
                                    (stride,), output_size, sampling_ratio, method=method))
    assert got.shape == (len(boxes), output_size, output_size, c)
    want = np.stack([_ref_roi_align(feat, b, 1.0 / stride, output_size, sampling_ratio) for b in boxes])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert np.all(want[6] == 0) and np.any(want[7] != 0)


@METHODS
def test_adaptive_grid_is_capped_as_documented(method):
    # A box needing ceil(11 / 2) = 6 samples per side at output 2: with the cap each side
    # uses max_adaptive_samples samples, with a large enough cap it is exact torchvision.
    rng = np.random.default_rng(5)
    feat = rng.normal(size=(16, 16, 2)).astype(np.float32)
    boxes = np.array([[2.0, 3.0, 13.0, 14.0], [5.0, 5.0, 9.0, 8.0]], np.float32)
    lv = jnp.zeros(2, jnp.int32)
    capped = np.asarray(_jit_roi_align([jnp.asarray(feat)], jnp.asarray(boxes), lv, (1,), 2, 0, 3, method))
    np.testing.assert_allclose(capped, np.stack([_ref_roi_align(feat, b, 1.0, 2, 0, grid_cap=3) for b in boxes]),
                               atol=2e-5)
    exact = np.asarray(_jit_roi_align([jnp.asarray(feat)], jnp.asarray(boxes), lv, (1,), 2, 0, 6, method))
    np.testing.assert_allclose(exact, np.stack([_ref_roi_align(feat, b, 1.0, 2, 0) for b in boxes]), atol=2e-5)
    assert not np.allclose(capped[0], exact[0], atol=1e-3)
    # max_adaptive_samples=0: no cap, as many samples as the largest box needs (here 6).
    uncapped = np.asarray(_jit_roi_align([jnp.asarray(feat)], jnp.asarray(boxes), lv, (1,), 2, 0, 0, method))
    np.testing.assert_allclose(uncapped, exact, atol=2e-5)
    big = np.array([[0.0, 0.0, 16.0, 16.0], [1.0, 2.0, 3.0, 4.0]], np.float32)     # needs 8, and 1
    uncapped = np.asarray(_jit_roi_align([jnp.asarray(feat)], jnp.asarray(big), lv, (1,), 2, 0, 0))
    np.testing.assert_allclose(uncapped, np.stack([_ref_roi_align(feat, b, 1.0, 2, 0) for b in big]), atol=2e-5)


# ------------------------------------------------------------------ torchvision reference outputs

@pytest.mark.parametrize("output_size", [7, 14, 28])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@METHODS
def test_vs_torchvision_reference(output_size, sampling_ratio, method):
    ref = _reference("roi_align_torchvision.npz")
    feats = np.transpose(ref["features"], (0, 2, 3, 1))            # NCHW -> NHWC
    rois = ref["rois"]
    scale = float(ref["spatial_scale"])
    assert scale == 0.25
    stride = 4
    want = np.transpose(ref[f"out_size{output_size}_sr{sampling_ratio}"], (0, 2, 3, 1))
    # Enough adaptive samples for every RoI, so sampling ratio 0 is exact.
    side = np.maximum(rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]) * scale
    cap = max(1, int(np.ceil(side.max() / output_size)))
    got = np.zeros_like(want)
    for b in range(feats.shape[0]):
        # All RoIs through one compiled call per configuration; keep those of image b.
        out = np.asarray(_jit_roi_align([jnp.asarray(feats[b])], jnp.asarray(rois[:, 1:]),
                                        jnp.zeros(len(rois), jnp.int32), (stride,), output_size,
                                        sampling_ratio, cap, method))
        sel = rois[:, 0] == b
        got[sel] = out[sel]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ multilevel

@METHODS
def test_multilevel_equals_per_level_pooling(method):
    rng = np.random.default_rng(11)
    c = 4
    f0 = rng.normal(size=(16, 20, c)).astype(np.float32)    # stride 4 over a 64x80 image
    f1 = rng.normal(size=(8, 10, c)).astype(np.float32)     # stride 8
    boxes = _boxes_for_map(rng, 10, 16, 20, 4, max_side=40)
    levels = np.array([0, 1] * 5, np.int32)
    got = np.asarray(_jit_roi_align([jnp.asarray(f0), jnp.asarray(f1)], jnp.asarray(boxes),
                                    jnp.asarray(levels), (4, 8), 7, 2, method=method))
    for i, (b, lv) in enumerate(zip(boxes, levels)):
        feat, stride = (f0, 4) if lv == 0 else (f1, 8)
        alone = np.asarray(_jit_roi_align([jnp.asarray(feat)], jnp.asarray(b[None]), jnp.zeros(1, jnp.int32),
                                          (stride,), 7, 2, method=method))[0]
        np.testing.assert_allclose(got[i], alone, atol=1e-5)
        np.testing.assert_allclose(got[i], _ref_roi_align(feat, b, 1.0 / stride, 7, 2), atol=2e-5)
    # pooling from the wrong level really gives something else
    wrong = np.asarray(_jit_roi_align([jnp.asarray(f0), jnp.asarray(f1)], jnp.asarray(boxes),
                                      jnp.asarray(1 - levels), (4, 8), 7, 2, method=method))
    assert not np.allclose(wrong, got, atol=1e-3)


def test_assign_levels_by_hand():
    def box(side):
        return [10.0, 20.0, 10.0 + side, 20.0 + side]
    boxes = jnp.array([box(224), box(112), box(448), box(4), box(2000), box(223), box(111.9),
                       [0, 0, 448, 112]], jnp.float32)
    got = np.asarray(assign_levels(boxes, 2, 5))
    # 224 -> floor(4 + log2(1)) = 4 -> index 2; 112 -> 3 -> 1; 448 -> 5 -> 3;
    # 4 -> 4 + log2(4/224) = -1.8 -> clamp 2 -> 0; 2000 -> 7.16 -> clamp 5 -> 3;
    # 223 -> 3.99 -> 3 -> 1; 111.9 -> 2.999 -> 2 -> 0; 448x112 has sqrt(area) 224 -> 4 -> 2.
    np.testing.assert_array_equal(got, [2, 1, 3, 0, 3, 1, 0, 2])


# ------------------------------------------------------------------ gradient

@METHODS
def test_grad_wrt_features_matches_finite_differences(method):
    rng = np.random.default_rng(3)
    h, w, c = 5, 6, 2
    feat = rng.normal(size=(h, w, c)).astype(np.float32)
    boxes = jnp.array([[1.0, 2.0, 15.0, 13.0], [-3.0, 6.0, 9.0, 22.0]], jnp.float32)   # stride 4
    cot = jnp.asarray(rng.normal(size=(2, 3, 3, c)).astype(np.float32))

    def f(x):
        out = roi_align([x], boxes, jnp.zeros(2, jnp.int32), (4,), 3, 2, method=method)
        return jnp.sum(out * cot)

    grad = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(feat)))
    eps = 0.5
    basis = np.eye(h * w * c, dtype=np.float32).reshape(-1, h, w, c) * eps
    fv = jax.jit(jax.vmap(f))
    fd = (np.asarray(fv(feat + basis)) - np.asarray(fv(feat - basis))) / (2 * eps)
    np.testing.assert_allclose(grad.reshape(-1), fd, atol=1e-4)
    assert np.abs(grad).max() > 1e-2


def test_pool_method_by_size():
    # The embedded dataset's pools (P2..P5 of a 128x128 image) take the matmuls for the mask
    # (14x14) and boundary (28x28 from P2) grids, the gather for the 7x7 box grid; COCO's
    # (800x1344) take the gather everywhere. Uncapped adaptive sampling is gather only.
    small = [(32, 32), (16, 16), (8, 8), (4, 4)]
    coco = [(200, 336), (100, 168), (50, 84), (25, 42)]
    assert [pool_method(small, n, 2) for n in (7, 14)] == ["gather", "matmul"]
    assert pool_method(small[:1], 28, 2) == "matmul"
    assert [pool_method(coco, n, 2) for n in (7, 14)] == ["gather", "gather"]
    assert pool_method(coco[:1], 28, 2) == "gather"
    assert pool_method(small, 14, 0) == "gather" and pool_method(small, 14, 2, "gather") == "gather"
    with pytest.raises(ValueError, match="method"):
        pool_method(small, 14, 2, "dense")
