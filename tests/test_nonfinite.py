"""A non-finite loss stops training with an error naming the step and the loss terms, and
the newest checkpoint stays a good one; train.skip_nonfinite skips and counts instead."""
import json
import os

import jax
import numpy as np
import pytest

from bmask_jax.engine.variables import restore_variables
from bmask_jax.train import NonFiniteLossError, train_and_evaluate
from helpers import tiny_config

pytestmark = pytest.mark.slow      # minutes each: the full suite runs it, the edit loop does not


def _exploding_config():
    c = tiny_config("maskrcnn")
    # From step 2 on, a learning rate of 1e12 sends the parameters to inf within a step.
    c.train.update(base_lr=1e12, warmup_iters=0, lr_steps=(), max_iter=12, checkpoint_every=2,
                   log_every=1, eval_at_end=False)
    c.train.warmup_factor = 1e-12
    c.train.warmup_iters = 2
    return c


def test_nonfinite_loss_stops_with_named_step_and_keeps_good_checkpoint(tmp_path):
    c = _exploding_config()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step \d+") as err:
        train_and_evaluate(c, str(tmp_path))
    assert "loss_cls" in str(err.value)
    params = jax.tree_util.tree_leaves(restore_variables(c, str(tmp_path))["params"])
    assert all(np.isfinite(np.asarray(p)).all() for p in params)


def test_skip_nonfinite_counts_and_finishes(tmp_path):
    c = _exploding_config()
    c.train.skip_nonfinite = True
    train_and_evaluate(c, str(tmp_path))
    summary = json.load(open(os.path.join(tmp_path, "train_summary.json")))
    assert summary["end_step"] == 12 and summary["skipped_nonfinite"] > 0
    params = jax.tree_util.tree_leaves(restore_variables(c, str(tmp_path))["params"])
    assert all(np.isfinite(np.asarray(p)).all() for p in params)
