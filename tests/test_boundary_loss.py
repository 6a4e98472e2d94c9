"""Boundary targets and the boundary loss against hand-made masks, numpy formulas and the
authors' own outputs (official_boundary_head.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.models import losses
from bmask_jax.ops.boundaries import boundary_targets

from helpers import reference as _reference


def _bt(mask):
    return np.asarray(boundary_targets(jnp.asarray(np.asarray(mask, np.float32)[None])))[0]


def _ref_boundary(mask):
    """Definition: a foreground pixel with at least one background 8-neighbour, pixels outside
    the map counting as background."""
    h, w = mask.shape
    out = np.zeros((h, w), np.float32)
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ii, jj = i + di, j + dj
                    if not (0 <= ii < h and 0 <= jj < w) or not mask[ii, jj]:
                        out[i, j] = 1.0
    return out


# ------------------------------------------------------------------ boundary targets

def test_filled_square_gives_its_ring():
    m = np.zeros((9, 9), np.float32)
    m[2:7, 2:7] = 1
    want = m.copy()
    want[3:6, 3:6] = 0
    got = _bt(m)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 16


def test_mask_touching_border():
    m = np.zeros((5, 5), np.float32)
    m[0:3, :] = 1                       # top three rows, touching top, left and right borders
    want = np.zeros((5, 5), np.float32)
    want[0, :] = 1                      # on the map's border
    want[2, :] = 1                      # background below
    want[1, 0] = want[1, 4] = 1         # left/right border pixels
    np.testing.assert_array_equal(_bt(m), want)
    # a full map is all border
    np.testing.assert_array_equal(_bt(np.ones((4, 4))), [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]])


def test_empty_and_single_pixel():
    np.testing.assert_array_equal(_bt(np.zeros((6, 7))), np.zeros((6, 7)))
    m = np.zeros((6, 7), np.float32)
    m[3, 4] = 1
    np.testing.assert_array_equal(_bt(m), m)


def test_random_masks_vs_definition():
    rng = np.random.default_rng(0)
    masks = (rng.random((5, 12, 10)) < np.linspace(0.2, 0.9, 5)[:, None, None]).astype(np.float32)
    got = np.asarray(boundary_targets(jnp.asarray(masks)))
    for m, g in zip(masks, got):
        np.testing.assert_array_equal(g, _ref_boundary(m))


def test_boundary_targets_vs_authors():
    ref = _reference("official_boundary_head.npz")
    got = np.asarray(boundary_targets(jnp.asarray(ref["loss_gt"])))
    np.testing.assert_array_equal(got, ref["boundary_targets"])
    assert ref["boundary_targets"].sum() > 0


# ------------------------------------------------------------------ losses vs the authors' values

def test_boundary_loss_dice_bce_vs_authors():
    ref = _reference("official_boundary_head.npz")
    logits = jnp.asarray(ref["loss_logits"])
    targets = boundary_targets(jnp.asarray(ref["loss_gt"]))
    got = float(losses.boundary_loss(logits, targets, jnp.ones(logits.shape[0]), kind="dice_bce"))
    assert got == pytest.approx(float(ref["boundary_loss"]), rel=1e-5)


def test_dice_loss_vs_authors():
    ref = _reference("official_boundary_head.npz")
    got = float(losses.dice_loss(jax.nn.sigmoid(jnp.asarray(ref["loss_logits"])), jnp.asarray(ref["loss_gt"]),
                                 jnp.ones(6)))
    assert got == pytest.approx(float(ref["dice_loss"]), rel=1e-5)


# ------------------------------------------------------------------ losses vs numpy formulas

def _np_bce(z, y):
    z = z.astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    return np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _np_dice(p, y, squared=False):
    p = p.astype(np.float64)
    per = []
    for pi, yi in zip(p, y):
        den = (pi ** 2).sum() + (yi ** 2).sum() if squared else pi.sum() + yi.sum()
        per.append(1 - (2 * (pi * yi).sum() + 1) / (den + 1))
    return np.mean(per)


def _random_inputs(seed, n=4, h=8, w=8):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, h, w)).astype(np.float32)
    targets = (rng.random((n, h, w)) < 0.3).astype(np.float32)
    return logits, targets


def test_bce_vs_numpy():
    z, y = _random_inputs(1)
    got = float(losses.boundary_loss(jnp.asarray(z), jnp.asarray(y), jnp.ones(4), kind="bce"))
    assert got == pytest.approx(_np_bce(z, y), rel=1e-5)
    assert float(losses.weighted_bce(jnp.asarray(z), jnp.asarray(y), jnp.ones(4))) == pytest.approx(got, rel=1e-6)


def test_dice_and_dice_bce_vs_numpy():
    z, y = _random_inputs(2)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    w = jnp.ones(4)
    assert float(losses.boundary_loss(jnp.asarray(z), jnp.asarray(y), w, kind="dice")) == \
        pytest.approx(_np_dice(p, y), rel=1e-5)
    assert float(losses.boundary_loss(jnp.asarray(z), jnp.asarray(y), w, kind="dice_bce")) == \
        pytest.approx(_np_dice(p, y) + _np_bce(z, y), rel=1e-5)


def test_dice_squared_is_paper_eq3():
    z, y = _random_inputs(3)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    want = _np_dice(p, y, squared=True)
    got = float(losses.dice_loss(jax.nn.sigmoid(jnp.asarray(z)), jnp.asarray(y), jnp.ones(4), squared=True))
    assert got == pytest.approx(want, rel=1e-5)
    got_kind = float(losses.boundary_loss(jnp.asarray(z), jnp.asarray(y), jnp.ones(4), kind="dice",
                                          dice_squared=True))
    assert got_kind == pytest.approx(want, rel=1e-5)
    assert abs(want - _np_dice(p, y)) > 1e-3          # the two variants really differ here


def test_weighted_bce_kind_vs_numpy():
    z, y = _random_inputs(4)
    pos_w = (1 - y).sum() / y.sum()
    zz = z.astype(np.float64)
    per = -(pos_w * y * np.log(1 / (1 + np.exp(-zz))) + (1 - y) * np.log(1 / (1 + np.exp(zz))))
    got = float(losses.boundary_loss(jnp.asarray(z), jnp.asarray(y), jnp.ones(4), kind="weighted_bce"))
    assert got == pytest.approx(per.mean(), rel=1e-5)


@pytest.mark.parametrize("kind", ["bce", "dice", "dice_bce", "weighted_bce"])
def test_zero_weight_rois_do_not_change_the_loss(kind):
    z, y = _random_inputs(5)
    junk_z, junk_y = _random_inputs(6, n=3)
    junk_y = 1 - junk_y
    w_real = jnp.ones(4)
    base = float(losses.boundary_loss(jnp.asarray(z), jnp.asarray(y), w_real, kind=kind))
    # padding rows interleaved with the real ones
    zz = np.concatenate([junk_z[:1], z[:2], junk_z[1:], z[2:]])
    yy = np.concatenate([junk_y[:1], y[:2], junk_y[1:], y[2:]])
    ww = jnp.asarray([0, 1, 1, 0, 0, 1, 1], jnp.float32)
    padded = float(losses.boundary_loss(jnp.asarray(zz), jnp.asarray(yy), ww, kind=kind))
    assert padded == pytest.approx(base, rel=1e-5)
    # with all weights 1 the junk does count (so the check above is meaningful)
    full = float(losses.boundary_loss(jnp.asarray(zz), jnp.asarray(yy), jnp.ones(7), kind=kind))
    assert abs(full - base) > 1e-4


def test_unknown_kind_raises():
    z, y = _random_inputs(7)
    with pytest.raises(ValueError):
        losses.boundary_loss(jnp.asarray(z), jnp.asarray(y), jnp.ones(4), kind="focal")
