"""The train state: the model's variables (engine/variables.py) with the optimizer's state and
the step, created at step 0 for training and for weight imports that become a training
workdir. Inference never builds one: it restores the variables alone
(variables.restore_variables). Below train and the weight import; it imports neither."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from bmask_jax.engine.optim import make_optimizer
from bmask_jax.engine.variables import init_variables, new_variables
from bmask_jax.models.bmask_rcnn import BMaskRCNN


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    frozen: Any            # FrozenBN scale/shift and BatchNorm running statistics: not trained by the optimizer
    opt_state: Any
    first_nonfinite_step: jnp.ndarray   # -1 until a step produced a non-finite loss or gradient
    num_skipped: jnp.ndarray            # steps skipped because they were non-finite


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
    return step_zero_state(config, new_variables(config, rng, init))[0]
