"""Anchor generation against hand-computed values (detectron2's DefaultAnchorGenerator, offset 0)."""
import math

import numpy as np

from bmask_jax.ops import anchors


def test_cell_anchors_size32():
    got = anchors.cell_anchors(32, (0.5, 1.0, 2.0))
    assert got.shape == (3, 4)
    # r = 0.5: w = sqrt(1024 / 0.5) = sqrt(2048) = 45.2548..., h = 22.6274...
    w05 = math.sqrt(2048.0)
    # r = 2: w = sqrt(512) = 22.6274..., h = 45.2548...
    w2 = math.sqrt(512.0)
    want = np.array([
        [-w05 / 2, -0.5 * w05 / 2, w05 / 2, 0.5 * w05 / 2],
        [-16, -16, 16, 16],
        [-w2 / 2, -w2, w2 / 2, w2],
    ])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[0], [-22.627417, -11.3137085, 22.627417, 11.3137085], rtol=1e-6)
    # each anchor has area size^2 and ratio h / w = r
    w = got[:, 2] - got[:, 0]
    h = got[:, 3] - got[:, 1]
    np.testing.assert_allclose(w * h, 1024.0, rtol=1e-5)
    np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0], rtol=1e-6)


def test_grid_anchors_order_and_centres_2x3():
    stride = 8
    got = anchors.grid_anchors((2, 3), stride, 32, (0.5, 1.0, 2.0))
    assert got.shape == (2 * 3 * 3, 4)
    cell = anchors.cell_anchors(32, (0.5, 1.0, 2.0))
    # Rows ordered (y, x, anchor): row index = (y * W + x) * A + a.
    expected = []
    for y in range(2):
        for x in range(3):
            for a in range(3):
                cx, cy = x * stride, y * stride
                expected.append(cell[a] + np.array([cx, cy, cx, cy]))
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-6, atol=1e-5)
    # Hand check of a few: (y=1, x=2, square anchor) -> centre (16, 8), +-16.
    np.testing.assert_allclose(got[(1 * 3 + 2) * 3 + 1], [0, -8, 32, 24])
    # (y=0, x=1, a=0): centre (8, 0)
    np.testing.assert_allclose(got[(0 * 3 + 1) * 3 + 0], [8 - 22.627417, -11.3137085, 8 + 22.627417, 11.3137085],
                               rtol=1e-6)
    centres = (got[:, :2] + got[:, 2:]) / 2
    np.testing.assert_allclose(centres[::3], [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]], atol=1e-5)


def test_level_shapes_128():
    assert anchors.level_shapes((128, 128), (4, 8, 16, 32, 64)) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    # non-square canvas, ceil division
    assert anchors.level_shapes((96, 160), (4, 32, 64)) == [(24, 40), (3, 5), (2, 3)]


def test_multilevel_counts():
    strides = (4, 8, 16, 32, 64)
    sizes = (32, 64, 128, 256, 512)
    per_level = anchors.multilevel_anchors((128, 128), strides, sizes, (0.5, 1.0, 2.0))
    assert [a.shape for a in per_level] == [(32 * 32 * 3, 4), (16 * 16 * 3, 4), (8 * 8 * 3, 4),
                                            (4 * 4 * 3, 4), (2 * 2 * 3, 4)]
    assert sum(len(a) for a in per_level) == 3 * (1024 + 256 + 64 + 16 + 4)
    # each level uses its own size: the square anchor at cell (0, 0) is +-size/2
    for a, s in zip(per_level, sizes):
        np.testing.assert_allclose(a[1], [-s / 2, -s / 2, s / 2, s / 2], rtol=1e-6)
    # last cell of the last level is centred at ((W-1)*64, (H-1)*64) = (64, 64)
    np.testing.assert_allclose((per_level[-1][-1, :2] + per_level[-1][-1, 2:]) / 2, [64, 64])
