"""The mask head runs on the smallest foreground bucket that holds the step's foreground, and
that changes neither the losses nor the gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.data.pipeline import TrainBatches, build_dataset
from bmask_jax.models.bmask_rcnn import BMaskRCNN, foreground_slot_sizes
from bmask_jax.engine.variables import init_variables
from bmask_jax.train import MODEL_KEYS
from helpers import tiny_config


def test_foreground_slot_sizes():
    assert foreground_slot_sizes((32, 64), 128) == [32, 64, 128]
    assert foreground_slot_sizes((64, 32, 128, 256), 128) == [32, 64, 128]
    assert foreground_slot_sizes((32, 64), 16) == [16]
    assert foreground_slot_sizes((), 128) == [128]


def _losses_and_grads_fn(config, variables):
    """jitted (batch, rng) -> (losses, gradients, sown intermediates) at fixed parameters."""
    model = BMaskRCNN(config.model)

    def loss_fn(params, batch, rng):
        losses, state = model.apply({**variables, "params": params}, batch, rngs={"sampling": rng},
                                    mutable=["intermediates"])
        return sum(losses.values()), (losses, state["intermediates"])

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def run(batch, rng):
        (_, (losses, inter)), grads = grad_fn(variables["params"], batch, rng)
        return losses, grads, inter
    return run


@pytest.mark.slow
def test_bucketed_mask_branch_equals_all_slots():
    c = tiny_config("bmask")
    # 16 foreground slots per image and buckets of 1 and 2; the steps below have 1 to 3
    # foreground RoIs in an image (its GT boxes, at init), so they run 1 slot or all 16.
    c.model.roi_heads.update(batch_size_per_image=32, positive_fraction=0.5, num_mask_rois=16)
    full = c.copy_and_resolve_references()
    full.model.roi_heads.foreground_buckets = ()
    c.model.roi_heads.foreground_buckets = (1, 2)
    variables = init_variables(c, BMaskRCNN(c.model), jax.random.PRNGKey(0))
    bucketed, all_slots = _losses_and_grads_fn(c, variables), _losses_and_grads_fn(full, variables)
    loader = TrainBatches(build_dataset(c.data, "train"), c.data, 2, 0)
    used = set()
    for step in range(4):
        batch = {k: jnp.asarray(v) for k, v in loader.batch(step).items() if k in MODEL_KEYS}
        if step == 0:    # one image with a single instance: little foreground
            batch["gt_valid"] = batch["gt_valid"].at[:, 1:].set(False)
        rng = jax.random.PRNGKey(step)
        losses, grads, inter = bucketed(batch, rng)
        ref_losses, ref_grads, ref_inter = all_slots(batch, rng)
        assert int(ref_inter["mask_slots"][0]) == 16
        # The size that ran: the smallest that holds the largest per-image foreground count.
        slots, need = int(inter["mask_slots"][0]), int(inter["most_foreground_per_image"][0])
        assert slots == min(n for n in (1, 2, 16) if n >= need), (slots, need)
        used.add(slots)
        for k, v in ref_losses.items():
            np.testing.assert_allclose(float(losses[k]), float(v), rtol=1e-5, atol=1e-7, err_msg=k)
        for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
    loader.close()
    assert 16 in used and min(used) < 16, f"the steps ran {used} slots; pick batches that need more than one size"
