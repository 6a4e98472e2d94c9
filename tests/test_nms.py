"""Fixed-size NMS against a brute-force python greedy NMS (torchvision.ops.nms semantics)."""
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.ops.nms import nms
from helpers import iou_brute_force as _iou




def _ref_nms(boxes, scores, thr, candidates=None):
    """Greedy NMS: visit by score (descending, stable on ties), keep a box when its IoU with
    every box kept so far is <= thr. Returns the kept indices as a set."""
    if candidates is None:
        candidates = range(len(boxes))
    order = sorted(candidates, key=lambda i: -scores[i])     # sorted() is stable
    kept = []
    for i in order:
        if all(_iou(boxes[i], boxes[k]) <= thr for k in kept):
            kept.append(i)
    return set(kept)


def _random_case(rng, n=40):
    # Integer coordinates: IoUs are exact ratios of small integers, so float32 and float64
    # agree on every comparison with the threshold (including IoU exactly equal to it).
    x1 = rng.integers(0, 40, n)
    y1 = rng.integers(0, 40, n)
    w = rng.integers(4, 20, n)
    h = rng.integers(4, 20, n)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float64)
    boxes[3] = boxes[1]                    # duplicate box
    boxes[10] = [0, 0, 10, 10]             # IoU exactly 0.5 with box 11
    boxes[11] = [0, 0, 10, 20]
    scores = rng.integers(0, 6, n) / 5.0   # many ties
    scores[3] = scores[1]                  # duplicate with a tied score: lower index wins
    return boxes, scores


def _keep_set(keep):
    return set(np.flatnonzero(np.asarray(keep)).tolist())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.5, 0.7, 0.3])
def test_nms_vs_bruteforce(seed, thr):
    rng = np.random.default_rng(seed)
    boxes, scores = _random_case(rng)
    keep = nms(jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32), thr)
    want = _ref_nms(boxes, scores, thr)
    assert _keep_set(keep) == want
    assert 0 < len(want) < len(boxes)     # the case really suppresses something
    if thr == 0.5:
        # box 10 vs 11 have IoU exactly 0.5: never a reason to drop either
        assert _iou(boxes[10], boxes[11]) == 0.5


def test_tie_keeps_lower_index():
    boxes = jnp.array([[0, 0, 10, 10]] * 3, jnp.float32)
    keep = nms(boxes, jnp.array([0.5, 0.9, 0.9]), 0.5)
    np.testing.assert_array_equal(np.asarray(keep), [False, True, False])


def test_iou_equal_to_threshold_is_kept():
    # IoU(A, B) = 100 / 200 = 0.5 exactly: suppression needs IoU > threshold.
    boxes = jnp.array([[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 11]], jnp.float32)
    # IoU(A, C) = 100 / 110 > 0.5 -> C dropped; IoU(B, C) = 110 / 200 = 0.55 as well
    keep = nms(boxes, jnp.array([0.9, 0.8, 0.7]), 0.5)
    np.testing.assert_array_equal(np.asarray(keep), [True, True, False])


def test_chain_suppression_hand_case():
    # A suppresses B, B would suppress C but B is gone, so C survives.
    boxes = jnp.array([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], jnp.float32)
    # IoU(A,B) = 60/140 = 0.43; IoU(B,C) = 0.43; IoU(A,C) = 20/180 = 0.11
    keep = nms(boxes, jnp.array([0.9, 0.8, 0.7]), 0.4)
    np.testing.assert_array_equal(np.asarray(keep), [True, False, True])


@pytest.mark.parametrize("seed", range(3))
def test_valid_mask(seed):
    rng = np.random.default_rng(100 + seed)
    boxes, scores = _random_case(rng)
    valid = rng.random(len(boxes)) < 0.6
    # Give invalid boxes the highest scores: they must still neither survive nor suppress.
    scores = np.where(valid, scores, 2.0)
    keep = np.asarray(nms(jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32), 0.5,
                          valid=jnp.asarray(valid)))
    assert not np.any(keep & ~valid)
    assert _keep_set(keep) == _ref_nms(boxes, scores, 0.5, np.flatnonzero(valid).tolist())


@pytest.mark.parametrize("seed", range(3))
def test_groups_equal_separate_runs(seed):
    rng = np.random.default_rng(200 + seed)
    boxes, scores = _random_case(rng)
    groups = rng.integers(0, 3, len(boxes))
    b32, s32 = jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32)
    thr = 0.3
    keep = np.asarray(nms(b32, s32, thr, groups=jnp.asarray(groups, jnp.int32)))
    expected = np.zeros(len(boxes), bool)
    for g in range(3):
        members = groups == g
        # running the library's NMS on one group at a time (others masked out) ...
        sep = np.asarray(nms(b32, s32, thr, valid=jnp.asarray(members)))
        expected |= sep
        # ... and the brute force on that group alone
        assert _keep_set(sep) == _ref_nms(boxes, scores, thr, np.flatnonzero(members).tolist())
    np.testing.assert_array_equal(keep, expected)
    # grouping matters in this case (otherwise the test would be vacuous)
    assert not np.array_equal(keep, np.asarray(nms(b32, s32, thr)))
