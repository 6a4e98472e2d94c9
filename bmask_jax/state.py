"""The model's train state: creating it (initialised, or with zero parameters for an import)
and restoring it from a workdir's latest checkpoint. Below train, evaluate, predict and the
weight import, which all build on it; it imports none of them."""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmask_jax import jit_cache
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    frozen: Any            # FrozenBN scale/shift: constants, not trained
    opt_state: Any
    first_nonfinite_step: jnp.ndarray   # -1 until a step produced a non-finite loss or gradient
    num_skipped: jnp.ndarray            # steps skipped because they were non-finite


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
    time or less (tests/test_init.py compares the two), which every train, restore, import and
    parameter count pays."""
    rng_params, _ = jax.random.split(rng)    # (the second half once seeded the init's sampling)
    # One jitted init per model in the process: restoring, importing and creating states
    # again (and jax.eval_shape of this) reuse its trace and program.
    init = jit_cache.get(("init", type(model), jit_cache.section_key(model.cfg)),
                         lambda: jax.jit(partial(jit_cache.frozen_module(model).init, method=BMaskRCNN.initialize)))
    return init({"params": rng_params}, dummy_batch(config, canvas=INIT_CANVAS))


def create_train_state(config, model: BMaskRCNN, rng: jax.Array) -> tuple[TrainState, optax.GradientTransformation]:
    return step_zero_state(config, init_variables(config, model, rng))


def step_zero_state(config, variables: dict) -> tuple[TrainState, optax.GradientTransformation]:
    """The step-0 TrainState holding `variables`, and the optimizer for them."""
    params = variables["params"]
    tx = make_optimizer(config, params)
    state = TrainState(step=jnp.array(0, jnp.int32), params=params, frozen=variables.get("frozen", {}),
                       opt_state=tx.init(params), first_nonfinite_step=jnp.array(-1, jnp.int32),
                       num_skipped=jnp.array(0, jnp.int32))
    return state, tx


def new_train_state(config, rng=None, init: bool = True):
    """A step-0 TrainState for config: initialised (init=True) or with zero parameters
    (init=False, no compilation; for imports that replace every parameter)."""
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    model = BMaskRCNN(config.model)
    if init:
        return create_train_state(config, model, rng)[0]
    abstract = jax.eval_shape(lambda: init_variables(config, model, rng))
    return step_zero_state(config, jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract))[0]


def restore_variables(config, workdir: str) -> dict:
    """Parameters of the latest checkpoint in workdir."""
    from bmask_jax import checkpoints
    model = BMaskRCNN(config.model)
    state, _ = create_train_state(config, model, jax.random.PRNGKey(config.seed))
    mgr = checkpoints.manager(workdir, config.train.keep_checkpoints, async_save=False)
    restored = checkpoints.restore_latest(mgr, state)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}; train first "
                                "(--mode=train) or point --workdir at a trained run")
    logging.info("restored step %d from %s", int(restored.step), mgr.directory)
    return {"params": restored.params, "frozen": restored.frozen}


def random_variables(config, seed: int = 0) -> dict:
    """He-normal kernels (box and anchor deltas 1000x smaller, as detectron2 initialises
    them, so that boxes stay in the image), zero biases, identity FrozenBN for config's model,
    drawn in numpy from the parameter shapes: no compiled initialisation, for tests and
    benchmarks of full-size models."""
    abstract = jax.eval_shape(lambda: init_variables(config, BMaskRCNN(config.model), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [str(getattr(p, "key", p)) for p in path]
        name = keys[-1]
        if len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            small = any(n in keys for n in ("bbox_pred", "anchor_deltas"))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in) * (1e-3 if small else 1)).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)
