"""Compile discipline and mixed precision."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.engine import jit_cache
from bmask_jax.data.pipeline import TrainBatches, build_dataset
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.state import create_train_state
from bmask_jax.train import MODEL_KEYS, train_and_evaluate, train_step
from helpers import tiny_config


@pytest.mark.slow
def test_train_step_compiles_once_per_canvas_bucket(tmp_path):
    c = tiny_config("maskrcnn")
    # 96x96 images resized to a short side of 64 or 96: two canvas buckets, mixed batches.
    c.data.synthetic.image_size = (96, 96)
    c.data.update(train_short_side=(64, 96), max_size=96, canvas_buckets=((64, 64), (96, 96)))
    c.train.update(max_iter=8, eval_at_end=False, checkpoint_every=100)
    # A train step kept from an earlier test of this worker with the same model may already
    # hold the 64x64 program; the count is of this run's compiles, from a fresh step.
    jit_cache.clear()
    train_and_evaluate(c, str(tmp_path))
    summary = json.load(open(os.path.join(tmp_path, "train_summary.json")))
    assert sorted(map(tuple, summary["canvases"])) == [(64, 64), (96, 96)]
    assert summary["train_step_compiles"] == 2


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_close_losses():
    losses = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_config("bmask")
        c.model.compute_dtype = dtype
        model = BMaskRCNN(c.model)
        state, tx = create_train_state(c, model, jax.random.PRNGKey(0))
        loader = TrainBatches(build_dataset(c.data, "train"), c.data, 2, 0)
        batch = {k: jnp.asarray(v) for k, v in loader.batch(0).items() if k in MODEL_KEYS}
        loader.close()
        new_state, metrics = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False))(state, batch)
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new_state.params))
        assert all(v.dtype == jnp.float32 for v in metrics.values())
        losses[dtype] = {k: float(v) for k, v in metrics.items()}
    # Same parameters (same init seed) and batch: bf16 compute moves each loss by a few percent.
    for k, v in losses["float32"].items():
        np.testing.assert_allclose(losses["bfloat16"][k], v, rtol=0.1, atol=0.02, err_msg=k)
