"""The model's variables ({"params", "frozen"}) without a train state: created (initialised,
zeros or random numpy draws), their shapes alone, and restored from a workdir's newest
checkpoint. Evaluation, prediction and export need nothing else, so they never build the
optimizer (engine/state.py adds it for training)."""
from __future__ import annotations

import logging
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bmask_jax.engine import checkpoints, jit_cache
from bmask_jax.models.bmask_rcnn import BMaskRCNN

# The canvas the parameters are created on: their shapes do not depend on it, and the
# initialisation runs the backbone and FPN once (at 800x1344 that was most of R50-FPN's 17 s
# init on 2 CPU cores).
INIT_CANVAS = (128, 128)


def dummy_batch(config, batch_size: int = 1, canvas: tuple[int, int] | None = None) -> dict:
    h, w = canvas or config.data.canvas_buckets[0]
    g, m = config.data.max_instances, config.data.gt_mask_size
    return {"image": np.zeros((batch_size, h, w, 3), np.uint8),
            "image_hw": np.tile(np.array([[h, w]], np.int32), (batch_size, 1)),
            "gt_boxes": np.tile(np.array([0, 0, 16, 16], np.float32), (batch_size, g, 1)),
            "gt_classes": np.zeros((batch_size, g), np.int32),
            "gt_valid": np.ones((batch_size, g), bool),
            "gt_masks": np.full((batch_size, g, m, m), 255, np.uint8)}


def init_variables(config, model: BMaskRCNN, rng: jax.Array) -> dict:
    """The model's initial variables, drawn from rng. `BMaskRCNN.initialize` calls each module
    once instead of running the training forward: the same variables, traced in a third of the
    time or less (tests/test_init.py compares the two), which every train, import and
    parameter count pays."""
    rng_params, _ = jax.random.split(rng)    # (the second half once seeded the init's sampling)
    # One jitted init per model in the process: creating states again (and jax.eval_shape of
    # this) reuse its trace and program.
    init = jit_cache.get(("init", type(model), jit_cache.section_key(model.cfg)),
                         lambda: jax.jit(partial(jit_cache.frozen_module(model).init, method=BMaskRCNN.initialize)))
    return init({"params": rng_params}, dummy_batch(config, canvas=INIT_CANVAS))


def abstract_variables(config) -> dict:
    """The shapes and dtypes of config's model variables (jax.ShapeDtypeStruct leaves): traced,
    never compiled or run."""
    return jax.eval_shape(lambda: init_variables(config, BMaskRCNN(config.model), jax.random.PRNGKey(0)))


def new_variables(config, rng=None, init: bool = True) -> dict:
    """config's model variables: initialised from rng (default: config.seed), or zeros
    (init=False: no compilation, for imports that replace every parameter)."""
    if not init:
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_variables(config))
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    return init_variables(config, BMaskRCNN(config.model), rng)


def restore_variables(config, workdir: str) -> dict:
    """{"params", "frozen"} of the newest intact checkpoint in workdir, read alone (Orbax's
    partial restore): the optimizer's state beside them is neither built nor read, and the
    model's initialisation is traced for its shapes, not compiled."""
    abstract = abstract_variables(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    wanted = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract["params"],
              "frozen": abstract.get("frozen", {})}
    wanted = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), wanted)
    mgr = checkpoints.manager(workdir, config.train.keep_checkpoints, async_save=False)
    try:
        restored = checkpoints.restore_latest(mgr, wanted, partial=True)
    finally:
        mgr.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}; train first "
                                "(--mode=train) or point --workdir at a trained run")
    logging.info("restored the variables of step %d from %s", int(restored["step"]), mgr.directory)
    return {"params": restored["params"], "frozen": restored["frozen"]}


def random_variables(config, seed: int = 0) -> dict:
    """He-normal kernels (box and anchor deltas 1000x smaller, as detectron2 initialises
    them, so that boxes stay in the image), zero biases, identity FrozenBN for config's model,
    drawn in numpy from the parameter shapes: no compiled initialisation, for tests and
    benchmarks of full-size models."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [str(getattr(p, "key", p)) for p in path]
        name = keys[-1]
        if len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            small = any(n in keys for n in ("bbox_pred", "anchor_deltas"))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in) * (1e-3 if small else 1)).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(config))
