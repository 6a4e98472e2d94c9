"""match() against a brute-force numpy transcription of detectron2's Matcher, and
subsample_labels() invariants (detectron2's subsample_labels with static shapes)."""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.ops.matching import match
from bmask_jax.ops.sampling import subsample_labels
from helpers import iou_brute_force as _iou


# ----------------------------------------------------------------------------- matching



def _ref_matcher(boxes, gt_boxes, gt_valid, thresholds, labels, allow_low_quality_matches,
                 skip_gt_without_overlap=True):
    """detectron2's Matcher.__call__ + set_low_quality_matches_, one box at a time, run on the
    valid GT rows only; matched indices are mapped back to the padded GT's row numbers.

    skip_gt_without_overlap: bmask_jax documents one deliberate departure from detectron2:
    a GT whose best IoU is 0 contributes no low-quality matches (detectron2 would mark every
    box with IoU 0 to it positive). With False this is exactly detectron2.
    """
    valid_rows = [g for g in range(len(gt_boxes)) if gt_valid[g]]
    n = len(boxes)
    if not valid_rows:
        return np.zeros(n, np.int64), np.full(n, labels[0], np.int64)
    q = np.array([[_iou(gt_boxes[g], b) for b in boxes] for g in valid_rows])   # [G, N]
    matched_vals = q.max(axis=0)
    matches = q.argmax(axis=0)                       # first maximum, as torch.max on CPU
    bounds = [-np.inf, *thresholds, np.inf]
    match_labels = np.zeros(n, np.int64)
    for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
        for i in range(n):
            if lo <= matched_vals[i] < hi:
                match_labels[i] = lab
    if allow_low_quality_matches:
        for gi in range(len(valid_rows)):
            best = q[gi].max()
            if skip_gt_without_overlap and best == 0:
                continue
            for i in range(n):
                if q[gi, i] == best:
                    match_labels[i] = 1
    return np.array(valid_rows)[matches], match_labels


def _random_case(rng, n_boxes=60, n_gt=7, n_invalid=3):
    """Integer-coordinate boxes (IoUs are exact ratios of small integers, so float32 and
    float64 agree on ties and thresholds), many of them jittered copies of GT boxes."""
    def rand_box(lo=0, hi=60):
        x1, y1 = rng.integers(lo, hi - 4, 2)
        w, h = rng.integers(2, 25, 2)
        return [x1, y1, x1 + w, y1 + h]
    gt = np.array([rand_box() for _ in range(n_gt)], np.float64)
    valid = np.ones(n_gt, bool)
    valid[rng.choice(n_gt, n_invalid, replace=False)] = False
    boxes = []
    for _ in range(n_boxes):
        if rng.random() < 0.6:
            g = gt[rng.integers(n_gt)]
            boxes.append(g + rng.integers(-3, 4, 4))
        else:
            boxes.append(rand_box())
    boxes = np.array(boxes, np.float64)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    boxes[5] = gt[0]                         # exact duplicates give exact IoU-1 ties
    boxes[6] = gt[0]
    return boxes, gt, valid


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thresholds,labels,low_quality", [
    ((0.3, 0.7), (0, -1, 1), True),     # RPN
    ((0.5,), (0, 1), False),            # RoI heads
])
def test_match_vs_detectron2_bruteforce(seed, thresholds, labels, low_quality):
    rng = np.random.default_rng(seed)
    boxes, gt, valid = _random_case(rng)
    got_idx, got_lab, got_iou = match(jnp.asarray(boxes, jnp.float32), jnp.asarray(gt, jnp.float32),
                                      jnp.asarray(valid), thresholds, labels, low_quality)
    want_idx, want_lab = _ref_matcher(boxes, gt, valid, thresholds, labels, low_quality)
    got_idx, got_lab = np.asarray(got_idx), np.asarray(got_lab)
    np.testing.assert_array_equal(got_lab, want_lab)
    assert np.all(valid[got_idx]), "a box was matched to a padding GT row"
    # Where the best IoU is positive the argmax is well defined up to exact ties (first wins).
    np.testing.assert_array_equal(got_idx, want_idx)
    want_iou = np.array([max(_iou(g, b) for g, v in zip(gt, valid) if v) for b in boxes])
    np.testing.assert_allclose(np.asarray(got_iou), want_iou, rtol=1e-6, atol=1e-7)
    # The case must exercise every label band (otherwise the comparison proves little).
    assert set(labels) <= set(want_lab.tolist())


def test_padding_rows_are_ignored_even_when_they_overlap():
    boxes = jnp.array([[0, 0, 10, 10], [20, 20, 30, 30]], jnp.float32)
    gt = jnp.array([[0, 0, 10, 10], [20, 20, 30, 31]], jnp.float32)
    idx, lab, _ = match(boxes, gt, jnp.array([False, True]), (0.3, 0.7), (0, -1, 1), True)
    # Box 0 matches only the padding row perfectly -> background; box 1 has IoU 100/110.
    np.testing.assert_array_equal(np.asarray(lab), [0, 1])
    np.testing.assert_array_equal(np.asarray(idx), [1, 1])


def test_low_quality_match_promotes_best_box():
    # GT overlaps box 0 with IoU 0.25 (< 0.3, background by threshold) but it is the GT's best.
    boxes = jnp.array([[0, 0, 10, 10], [40, 40, 50, 50], [0, 0, 20, 20]], jnp.float32)
    gt = jnp.array([[5, 5, 15, 15]], jnp.float32)
    _, lab_on, _ = match(boxes, gt, jnp.array([True]), (0.3, 0.7), (0, -1, 1), True)
    _, lab_off, _ = match(boxes, gt, jnp.array([True]), (0.3, 0.7), (0, -1, 1), False)
    # IoU box0 = 25 / 175 = 1/7, box2 = 100/400 = 0.25 -> box 2 is the best
    np.testing.assert_array_equal(np.asarray(lab_off), [0, 0, 0])
    np.testing.assert_array_equal(np.asarray(lab_on), [0, 0, 1])


def test_gt_without_overlap_gives_no_low_quality_matches():
    # Documented departure from detectron2 (see matching.py): a GT overlapping no box does not
    # turn every zero-IoU box positive.
    boxes = jnp.array([[0, 0, 10, 10], [20, 0, 30, 10]], jnp.float32)
    gt = jnp.array([[100, 100, 110, 110]], jnp.float32)
    _, lab, _ = match(boxes, gt, jnp.array([True]), (0.3, 0.7), (0, -1, 1), True)
    np.testing.assert_array_equal(np.asarray(lab), [0, 0])


@pytest.mark.parametrize("thresholds,labels,low_quality", [
    ((0.3, 0.7), (0, -1, 1), True), ((0.5,), (0, 1), False)])
def test_no_valid_gt_all_background(thresholds, labels, low_quality):
    rng = np.random.default_rng(3)
    boxes, gt, _ = _random_case(rng)
    boxes[:len(gt)] = gt                                 # would be perfect matches if valid
    _, lab, _ = match(jnp.asarray(boxes, jnp.float32), jnp.asarray(gt, jnp.float32),
                      jnp.zeros(len(gt), bool), thresholds, labels, low_quality)
    np.testing.assert_array_equal(np.asarray(lab), np.zeros(len(boxes)))


# ----------------------------------------------------------------------------- sampling

@partial(jax.jit, static_argnums=(2, 3))
def _sample_many(keys, labels, num_samples, fraction):
    return jax.vmap(lambda k: subsample_labels(k, labels, num_samples, fraction))(keys)


@pytest.mark.parametrize("num_pos,num_neg,num_ign,num_samples,fraction", [
    (40, 300, 60, 64, 0.25),    # plenty of both: 16 positives, 48 negatives
    (5, 300, 20, 64, 0.25),     # few positives: negatives fill up
    (100, 20, 10, 64, 0.5),     # few negatives: fewer than num_samples valid
    (0, 100, 30, 32, 0.5),      # no positives
    (30, 0, 50, 32, 0.5),       # no negatives
    (0, 0, 50, 16, 0.5),        # everything ignored
    (10, 10, 200, 64, 1.0),
    (8, 6, 0, 3, 0.25),         # int(3 * 0.25) = 0: no positive may be taken
])
def test_subsample_invariants(num_pos, num_neg, num_ign, num_samples, fraction):
    rng = np.random.default_rng(num_pos * 7 + num_neg)
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ign, np.int32)
    rng.shuffle(labels)
    n_seeds = 64
    keys = jax.random.split(jax.random.PRNGKey(num_pos + 1000 * num_neg), n_seeds)
    idx, is_pos, valid = map(np.asarray, _sample_many(keys, jnp.asarray(labels), num_samples, fraction))
    assert idx.shape == is_pos.shape == valid.shape == (n_seeds, num_samples)
    max_pos = int(num_samples * fraction)
    want_pos = min(num_pos, max_pos)
    want_valid = min(num_samples, want_pos + num_neg)
    for s in range(n_seeds):
        i, p, v = idx[s], is_pos[s], valid[s]
        assert p.sum() == want_pos
        assert v.sum() == want_valid
        # positives first, then negatives, then invalid slots
        np.testing.assert_array_equal(p, np.arange(num_samples) < want_pos)
        np.testing.assert_array_equal(v, np.arange(num_samples) < want_valid)
        assert len(set(i.tolist())) == num_samples, "sampled indices repeat"
        assert np.all((i >= 0) & (i < len(labels)))
        np.testing.assert_array_equal(labels[i[p]], 1)
        np.testing.assert_array_equal(labels[i[v & ~p]], 0)
        assert not np.any(labels[i[v]] == -1)
    # Different seeds draw different subsets whenever there is a choice to make.
    possible = math.comb(num_pos, want_pos) * math.comb(num_neg, want_valid - want_pos)
    if possible > 1:
        draws = {tuple(sorted(idx[s][valid[s]].tolist())) for s in range(n_seeds)}
        assert len(draws) >= min(n_seeds // 2, possible // 2)


def test_subsample_is_roughly_uniform():
    # 40 positives competing for 16 slots: each is chosen with probability 0.4.
    labels = np.array([1] * 40 + [0] * 200, np.int32)
    n_seeds = 500
    keys = jax.random.split(jax.random.PRNGKey(7), n_seeds)
    idx, is_pos, _ = map(np.asarray, _sample_many(keys, jnp.asarray(labels), 64, 0.25))
    counts = np.bincount(idx[is_pos], minlength=240)[:40]
    # binomial(500, 0.4): mean 200, sd ~11; 6 sd bounds
    assert counts.min() > 200 - 66 and counts.max() < 200 + 66
    neg_counts = np.bincount(idx[~is_pos], minlength=240)[40:]
    # 48 of 200 negatives: p = 0.24 -> mean 120, sd ~9.5
    assert neg_counts.min() > 120 - 57 and neg_counts.max() < 120 + 57


def test_subsample_same_key_same_draw():
    labels = jnp.asarray(np.array([1] * 30 + [0] * 100 + [-1] * 10, np.int32))
    a = subsample_labels(jax.random.PRNGKey(0), labels, 32, 0.5)
    b = subsample_labels(jax.random.PRNGKey(0), labels, 32, 0.5)
    c = subsample_labels(jax.random.PRNGKey(1), labels, 32, 0.5)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.sort(np.asarray(a[0])), np.sort(np.asarray(c[0])))


def test_sampling_by_candidate_id_ignores_the_candidates_order():
    """With candidate ids, each candidate's random number is its own: shuffling the candidates
    (as two near-tied proposals swapping ranks does) samples the same candidates, in the same
    slots; without ids, the same shuffle samples others."""
    rng = np.random.default_rng(3)
    labels = rng.choice([-1, 0, 1], size=300, p=[0.2, 0.7, 0.1]).astype(np.int32)
    ids = rng.permutation(10_000)[:300].astype(np.int32)
    perm = rng.permutation(300)
    key = jax.random.PRNGKey(7)
    a = subsample_labels(key, jnp.asarray(labels), 64, 0.25, jnp.asarray(ids))
    b = subsample_labels(key, jnp.asarray(labels[perm]), 64, 0.25, jnp.asarray(ids[perm]))
    np.testing.assert_array_equal(ids[np.asarray(a[0])], ids[perm][np.asarray(b[0])])
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[2]))
    c = subsample_labels(key, jnp.asarray(labels), 64, 0.25)
    d = subsample_labels(key, jnp.asarray(labels[perm]), 64, 0.25)
    assert set(np.asarray(c[0]).tolist()) != set(perm[np.asarray(d[0])].tolist())
