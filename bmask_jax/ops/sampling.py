"""Fixed-size positive/negative sampling (detectron2's subsample_labels, static shapes)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def subsample_labels(rng: jax.Array, labels: jnp.ndarray, num_samples: int, positive_fraction: float,
                     candidate_ids: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Sample at most `num_samples` of the labelled entries, at most a fraction positive.

    labels: [N] int, 1 positive, 0 negative, -1 ignore. As detectron2: take
    min(#pos, int(num_samples * positive_fraction)) positives at random, then fill up to
    num_samples with random negatives.
    candidate_ids: [N] int, optional: who each entry is (e.g. the anchor a proposal came
    from). Each entry's random number is then drawn for its id rather than its position, so
    a reordering of the candidates (two proposals with near-equal scores swapping ranks on
    float noise, as a different device count can make them) samples the same candidates.

    Returns (indices [num_samples] int32, is_positive [num_samples] bool, valid [num_samples]
    bool). Positives come first, so every positive lies in the first
    int(num_samples * positive_fraction) slots; slots beyond the number sampled are invalid.
    """
    if labels.shape[0] < num_samples:
        # Fewer candidates than slots: pad with ignored entries, which are never sampled.
        pad = num_samples - labels.shape[0]
        labels = jnp.pad(labels, (0, pad), constant_values=-1)
        if candidate_ids is not None:
            candidate_ids = jnp.pad(candidate_ids, (0, pad))
    n = labels.shape[0]
    max_pos = int(num_samples * positive_fraction)
    if candidate_ids is None:
        rand = jax.random.uniform(rng, (n,))
    else:
        rand = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(candidate_ids)
    pos = labels == 1
    neg = labels == 0
    # The max_pos random positives: top-k of random keys restricted to positives.
    pos_key = jnp.where(pos, rand, -1.0)
    top_val, top_idx = jax.lax.top_k(pos_key, max_pos)
    chosen_pos = jnp.zeros(n, bool).at[top_idx].set(top_val >= 0)
    # Chosen positives rank above negatives, negatives above everything else; the top
    # num_samples then holds all chosen positives followed by num_samples - num_pos negatives.
    priority = jnp.where(chosen_pos, 2.0 + rand, jnp.where(neg, 1.0 + rand, 0.0))
    top_priority, indices = jax.lax.top_k(priority, num_samples)
    return indices.astype(jnp.int32), top_priority >= 2.0, top_priority >= 1.0
