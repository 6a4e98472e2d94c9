import math
import time

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bmask_jax.ops.masks import masks_to_rle, paste_masks


def _ref_paste(mask, box, h, w):
    """Brute force: F.grid_sample(bilinear, zeros, align_corners=False) at every pixel centre.

    Written from the formula, one pixel at a time.
    """
    mh, mw = mask.shape
    x1, y1, x2, y2 = [float(v) for v in box]
    out = np.zeros((h, w), dtype=np.float64)
    for r in range(h):
        for c in range(w):
            # normalised grid coordinates, as detectron2's _do_paste_mask builds them
            gx = (c + 0.5 - x1) / (x2 - x1) * 2 - 1
            gy = (r + 0.5 - y1) / (y2 - y1) * 2 - 1
            # grid_sample unnormalisation with align_corners=False
            u = ((gx + 1) * mw - 1) / 2
            v = ((gy + 1) * mh - 1) / 2
            u0 = math.floor(u)
            v0 = math.floor(v)
            val = 0.0
            for yi, wy in ((v0, 1 - (v - v0)), (v0 + 1, v - v0)):
                for xi, wx in ((u0, 1 - (u - u0)), (u0 + 1, u - u0)):
                    if 0 <= yi < mh and 0 <= xi < mw:  # zero padding
                        val += wy * wx * float(mask[yi, xi])
            out[r, c] = val
    return out


def test_hand_worked_2x2():
    # 2x2 mask pasted into box (1, 1, 5, 5) of a 6x6 image: every image pixel is half a mask
    # cell wide, so the 1-D weights at box-relative pixel k = 0..3 are
    #   k=0: u=-0.25 -> 0.75 on cell 0;  k=1: u=0.25 -> 0.75/0.25 on cells 0/1;
    #   k=2: u=0.75 -> 0.25/0.75;        k=3: u=1.25 -> 0.75 on cell 1.
    # Pixel just outside the box (k=-1): u=-0.75 -> 0.25 on cell 0; k=4: u=1.75 -> 0.25 on cell 1.
    m = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    box = np.array([[1.0, 1.0, 5.0, 5.0]])
    p = paste_masks(m[None], box, (6, 6), threshold=None)[0]
    assert p.dtype == np.float32
    assert p[1, 1] == pytest.approx(0.0)
    assert p[2, 2] == pytest.approx(0.75 * 0.25 * 1.0 + 0.25 * 0.75 * 0.5 + 0.25 * 0.25 * 0.25)
    assert p[1, 4] == pytest.approx(0.75 * 0.75 * 1.0)  # top-right corner pixel
    assert p[4, 1] == pytest.approx(0.75 * 0.75 * 0.5)  # bottom-left
    assert p[4, 4] == pytest.approx(0.75 * 0.75 * 0.25)  # bottom-right
    assert p[3, 3] == pytest.approx(0.25 * 0.25 * 0.0 + 0.25 * 0.75 * 1.0 + 0.75 * 0.25 * 0.5
                                    + 0.75 * 0.75 * 0.25)
    # outside the box: only a fraction of the border cell leaks in
    assert p[0, 4] == pytest.approx(0.25 * 0.75 * 1.0)
    assert p[5, 5] == pytest.approx(0.25 * 0.25 * 0.25)
    assert p[0, 0] == pytest.approx(0.25 * 0.25 * 0.0)
    # threshold uses >=: with only cell (0, 1) on, the maximum 0.75 * 0.75 = 0.5625 (exact in
    # float32) is reached at box-relative rows 0..1, cols 2..3 -> image rows 1..2, cols 3..4.
    m1 = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
    b = paste_masks(m1[None], box, (6, 6), threshold=0.5625)[0]
    assert b.dtype == np.bool_
    expected = np.zeros((6, 6), bool)
    expected[1:3, 3:5] = True
    np.testing.assert_array_equal(b, expected)
    assert not paste_masks(m1[None], box, (6, 6), threshold=0.5626).any()


@pytest.mark.parametrize("mh,mw", [(28, 28), (5, 7)])
def test_against_brute_force(mh, mw):
    rng = np.random.default_rng(mh * 100 + mw)
    h, w = 23, 31
    boxes = np.array([
        [3.3, 2.7, 17.9, 15.2],      # fractional, inside
        [-6.5, -4.2, 9.1, 8.8],      # partly outside top-left
        [20.4, 12.6, 40.0, 30.5],    # partly outside bottom-right
        [-10.0, -10.0, 45.0, 35.0],  # larger than the image
        [11.2, 9.6, 11.5, 9.8],      # tiny (sub-pixel)
        [4.0, 4.0, 6.0, 5.0],        # small, integer
        [29.0, 0.0, 31.0, 23.0],     # thin, on the right edge
        [0.0, 0.0, 31.0, 23.0],      # whole image
        [50.0, 50.0, 60.0, 60.0],    # entirely outside
    ])
    masks = rng.random((len(boxes), mh, mw)).astype(np.float32)
    probs = paste_masks(masks, boxes, (h, w), threshold=None)
    bools = paste_masks(masks, boxes, (h, w))
    assert probs.shape == (len(boxes), h, w) and probs.dtype == np.float32
    assert bools.shape == (len(boxes), h, w) and bools.dtype == np.bool_
    for k in range(len(boxes)):
        ref = _ref_paste(masks[k], boxes[k], h, w)
        np.testing.assert_allclose(probs[k], ref, atol=2e-6, err_msg=f"box {k}")
        # thresholded output agrees wherever the reference is not within rounding of 0.5
        decided = np.abs(ref - 0.5) > 1e-5
        np.testing.assert_array_equal(bools[k][decided], (ref >= 0.5)[decided])
    assert not probs[-1].any()


def test_random_boxes_vs_brute_force():
    rng = np.random.default_rng(0)
    h, w = 19, 26
    n = 6
    xy = rng.uniform(-8, 24, size=(n, 2))
    wh = rng.uniform(0.2, 20, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    masks = rng.random((n, 28, 28))
    probs = paste_masks(masks, boxes, (h, w), threshold=None)
    for k in range(n):
        np.testing.assert_allclose(probs[k], _ref_paste(masks[k], boxes[k], h, w), atol=2e-6)


def test_constant_mask_fills_box():
    # A mask of ones pastes to exactly 1 strictly inside the box (>= half a cell from the edge).
    m = np.ones((1, 28, 28), np.float32)
    p = paste_masks(m, np.array([[10.0, 20.0, 66.0, 76.0]]), (100, 100), threshold=None)[0]
    assert np.allclose(p[21:75, 11:65], 1.0)
    b = paste_masks(m, np.array([[10.0, 20.0, 66.0, 76.0]]), (100, 100))[0]
    assert b[20:76, 10:66].all() and b.sum() == 56 * 56


def test_channel_dim_zero_width_and_empty():
    rng = np.random.default_rng(1)
    m = rng.random((2, 1, 28, 28)).astype(np.float32)
    boxes = np.array([[5.0, 5.0, 5.0, 9.0], [3.0, 3.0, 9.0, 9.0]])  # first has zero width
    p = paste_masks(m, boxes, (12, 12), threshold=None)
    assert p.shape == (2, 12, 12) and np.isfinite(p).all()
    np.testing.assert_allclose(p[1], _ref_paste(m[1, 0], boxes[1], 12, 12), atol=2e-6)
    e = paste_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), (7, 9))
    assert e.shape == (0, 7, 9) and e.dtype == np.bool_


def test_speed_100_masks():
    rng = np.random.default_rng(2)
    n = 100
    xy = rng.uniform(0, 1000, size=(n, 2))
    wh = rng.uniform(10, 500, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    masks = rng.random((n, 28, 28)).astype(np.float32)
    t = time.perf_counter()
    out = paste_masks(masks, boxes, (800, 1333))
    dt = time.perf_counter() - t
    assert out.shape == (n, 800, 1333)
    assert dt < 3.0, dt  # ~0.2 s normally; generous for shared CPUs


def test_masks_to_rle_roundtrip():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 17, 23)) > 0.6
    masks[1] = False
    masks[2] = True
    rles = masks_to_rle(masks)
    assert len(rles) == 4
    for rle, m in zip(rles, masks):
        assert isinstance(rle["counts"], str)
        assert list(rle["size"]) == [17, 23]
        dec = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        np.testing.assert_array_equal(dec.astype(bool), m)
        # pycocotools also accepts the str form directly
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), m)
        assert mask_utils.area(rle) == m.sum()
    import json
    json.dumps(rles)
    assert masks_to_rle(np.zeros((0, 5, 5), bool)) == []
