"""Box geometry (bmask_jax.ops.boxes) against brute-force numpy and hand-worked values."""
import math

import numpy as np
import pytest

from bmask_jax.ops import boxes as box_ops


def _ref_iou(a, b):
    """IoU of two boxes, straight from the definition; 0 when the union is empty."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n, span=50.0):
    xy = rng.uniform(0, span, (n, 2))
    wh = rng.uniform(0.5, span / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_pairwise_iou_vs_double_loop():
    rng = np.random.default_rng(0)
    b1 = _random_boxes(rng, 12)
    b2 = _random_boxes(rng, 9)
    special1 = np.array([
        [10, 10, 20, 20],      # identical to special2[0]
        [0, 0, 30, 30],        # contains special2[1]
        [100, 100, 110, 110],  # disjoint from everything
        [5, 5, 5, 15],         # zero width
        [7, 7, 7, 7],          # a point
        [0, 0, 10, 10],        # touches special2[3] along an edge (zero intersection)
    ], np.float64)
    special2 = np.array([
        [10, 10, 20, 20],
        [5, 6, 12, 14],
        [7, 7, 7, 7],          # identical zero-area box: union 0 -> IoU 0
        [10, 0, 20, 10],
        [-5, -5, 3, 4],
    ], np.float64)
    b1 = np.concatenate([b1, special1]).astype(np.float32)
    b2 = np.concatenate([b2, special2]).astype(np.float32)
    got = np.asarray(box_ops.pairwise_iou(b1, b2))
    assert got.shape == (len(b1), len(b2))
    want = np.array([[_ref_iou(a.astype(np.float64), b.astype(np.float64)) for b in b2] for a in b1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The hand-checkable cases.
    n = 12
    assert got[n + 0, 9 + 0] == pytest.approx(1.0)
    assert got[n + 1, 9 + 1] == pytest.approx(7 * 8 / 900)
    assert np.all(got[n + 2] == 0)
    assert np.all(got[n + 3] == 0) and np.all(got[n + 4] == 0)
    assert got[n + 5, 9 + 3] == 0
    assert np.all(np.isfinite(got))


def test_area():
    b = np.array([[0, 0, 2, 3], [1, 1, 1, 5], [5, 5, 4, 7], [-1, -2, 1.5, 0.5]], np.float32)
    np.testing.assert_allclose(np.asarray(box_ops.area(b)), [6.0, 0.0, 0.0, 2.5 * 2.5])
    # Leading batch dims.
    assert np.asarray(box_ops.area(b.reshape(2, 2, 4))).shape == (2, 2)


def test_clip():
    b = np.array([[-5, -3, 20, 40], [2, 3, 4, 5], [50, 60, 70, 80]], np.float32)
    got = np.asarray(box_ops.clip(b, 30, 10))  # height 30, width 10
    np.testing.assert_array_equal(got, [[0, 0, 10, 30], [2, 3, 4, 5], [10, 30, 10, 30]])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(1)
    src = _random_boxes(rng, 50).astype(np.float32)
    dst = _random_boxes(rng, 50).astype(np.float32)
    deltas = box_ops.encode(src, dst, weights)
    back = np.asarray(box_ops.decode(deltas, src, weights))
    np.testing.assert_allclose(back, dst, rtol=1e-4, atol=1e-3)


def test_encode_hand_example():
    # Box: centre (15, 30), w 10, h 20. Target: centre (20, 25), w 20, h 10.
    src = np.array([[10, 20, 20, 40]], np.float32)
    dst = np.array([[10, 20, 30, 30]], np.float32)
    # dx = (20 - 15) / 10 = 0.5; dy = (25 - 30) / 20 = -0.25; dw = log 2; dh = log 0.5
    np.testing.assert_allclose(np.asarray(box_ops.encode(src, dst)),
                               [[0.5, -0.25, math.log(2), math.log(0.5)]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(box_ops.encode(src, dst, (10, 10, 5, 5))),
                               [[5.0, -2.5, 5 * math.log(2), 5 * math.log(0.5)]], rtol=1e-6)
    # decode of those deltas with the box gives the target back exactly enough
    np.testing.assert_allclose(
        np.asarray(box_ops.decode(np.array([[5.0, -2.5, 5 * math.log(2), 5 * math.log(0.5)]], np.float32),
                                  src, (10, 10, 5, 5))), dst, atol=1e-4)


def test_decode_clamps_scale():
    clamp = math.log(1000.0 / 16)
    assert box_ops.DEFAULT_SCALE_CLAMP == pytest.approx(clamp)
    box = np.array([[0, 0, 16, 8]], np.float32)   # centre (8, 4), w 16, h 8
    # dw, dh far beyond the clamp: width -> 16 * 1000 / 16 = 1000, height -> 8 * 62.5 = 500.
    out = np.asarray(box_ops.decode(np.array([[0, 0, 10.0, 20.0]], np.float32), box))
    np.testing.assert_allclose(out, [[8 - 500, 4 - 250, 8 + 500, 4 + 250]], rtol=1e-5)
    # With weights (10, 10, 5, 5) the clamp applies after dividing by the weight:
    # dw = 30 / 5 = 6 > clamp (4.135) -> clamped; dh = 10 / 5 = 2 -> exp(2) * 8.
    out = np.asarray(box_ops.decode(np.array([[10.0, -10.0, 30.0, 10.0]], np.float32), box, (10, 10, 5, 5)))
    cx, cy = 8 + 1.0 * 16, 4 - 1.0 * 8
    h = math.exp(2.0) * 8
    np.testing.assert_allclose(out, [[cx - 500, cy - h / 2, cx + 500, cy + h / 2]], rtol=1e-5)
    # Below the clamp nothing changes: dw = 4.0 -> exp(4) * 16.
    out = np.asarray(box_ops.decode(np.array([[0, 0, 4.0, -1.0]], np.float32), box))
    w, h = math.exp(4.0) * 16, math.exp(-1.0) * 8
    np.testing.assert_allclose(out, [[8 - w / 2, 4 - h / 2, 8 + w / 2, 4 + h / 2]], rtol=1e-5)
