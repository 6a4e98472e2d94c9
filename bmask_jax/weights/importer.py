"""Weights into train states: a TrainState's params and frozen collection, or a step-0 Orbax
checkpoint of a config (with the config changes the weights imply). jax, the model and the
train state are imported when used, so that reading and converting weights needs numpy only."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from bmask_jax.weights.convert import ImportReport, convert, detect_kind, implied_config_changes
from bmask_jax.weights.layouts import WHOLE_MODEL_KINDS
from bmask_jax.weights.safe_pickle import read_checkpoint


def load_into_state(state, path: str, kind: str = "auto", checkpoint: dict[str, np.ndarray] | None = None):
    """Import the weights at `path` into a state.TrainState's params and frozen collection.
    Returns (new state, ImportReport). The report's config_changes are what the weights imply
    (pixel format, normalisation, stride_in_1x1, norm); they are not applied to anything here:
    the model that runs this state must use them. `checkpoint`: its arrays, if already read."""
    import jax
    import jax.numpy as jnp

    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    params, frozen, report = convert(checkpoint, jax.device_get(state.params), jax.device_get(state.frozen),
                                     kind, source=path)
    return state.replace(params=jax.tree_util.tree_map(jnp.asarray, params),
                         frozen=jax.tree_util.tree_map(jnp.asarray, frozen)), report


def apply_config_changes(config, changes: dict[str, Any], dry_run: bool = False) -> dict[str, tuple]:
    """Set dotted config keys (unless dry_run); returns {key: (old, new)} for those that differ."""
    differ = {}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        old = node[leaf]
        same = tuple(old) == tuple(value) if isinstance(value, tuple) else old == value
        if not same:
            differ[dotted] = (old, value)
            if not dry_run:
                node[leaf] = value
    return differ


def config_flags_for(changes: dict[str, Any]) -> str:
    """The --config.* flags that set these values on the command line."""
    def fmt(v):
        if isinstance(v, tuple):
            return "'(" + ", ".join(repr(float(x)) if isinstance(x, float) else str(x) for x in v) + ")'"
        return str(v)
    return " ".join(f"--config.{k}={fmt(v)}" for k, v in changes.items())


def import_weights(config, source: str, output: str, kind: str = "auto",
                   apply_changes: bool = True) -> tuple[ImportReport, dict[str, tuple]]:
    """Read `source`, apply the config changes its weights imply (apply_changes), import it
    into a step-0 TrainState of `config` and save that as an Orbax checkpoint under
    output/checkpoints, so that `--workdir output` trains from it or evaluates it (with the
    same config). Writes output/weights_import.json. Returns the report and
    {config key: (old, new)} where the config differed from what the weights imply."""
    from bmask_jax.engine import checkpoints

    checkpoint = read_checkpoint(source)
    kind = detect_kind(checkpoint, source) if kind == "auto" else kind
    changes, _ = implied_config_changes(kind, checkpoint)
    differ = apply_config_changes(config, changes, dry_run=not apply_changes)
    mgr = checkpoints.manager(output, keep=1, async_save=False)
    if mgr.latest_step() is not None:
        raise FileExistsError(f"{mgr.directory} already holds a checkpoint (step {mgr.latest_step()}); "
                              "choose an empty --output")
    state, report = imported_state(config, checkpoint, kind, source)
    checkpoints.save(mgr, 0, state, force=True)
    checkpoints.finish(mgr)
    with open(os.path.join(output, "weights_import.json"), "w") as f:
        json.dump(dict(report.to_dict(), config_differences=differ, config_changes_applied=apply_changes,
                       flags=config_flags_for({k: new for k, (_, new) in differ.items()})), f, indent=2, default=str)
    return report, differ


def imported_variables(config, checkpoint: dict[str, np.ndarray], kind: str, source: str):
    """({"params", "frozen"} of `config`'s model holding the checkpoint's weights, ImportReport).
    Whole-model imports replace every parameter: the (compiled) initialisation is skipped
    unless some layer has no counterpart in the checkpoint (those keep their initial values)."""
    import jax
    import jax.numpy as jnp

    from bmask_jax.engine.variables import new_variables
    variables = new_variables(config, init=kind not in WHOLE_MODEL_KINDS)
    params, frozen, report = convert(checkpoint, _host(variables["params"]), _host(variables.get("frozen", {})),
                                     kind, source)
    if report.initialised_fresh and kind in WHOLE_MODEL_KINDS:
        variables = new_variables(config, init=True)
        params, frozen, report = convert(checkpoint, _host(variables["params"]), _host(variables.get("frozen", {})),
                                         kind, source)
    return {"params": jax.tree_util.tree_map(jnp.asarray, params),
            "frozen": jax.tree_util.tree_map(jnp.asarray, frozen)}, report


def imported_state(config, checkpoint: dict[str, np.ndarray], kind: str, source: str):
    """A step-0 TrainState of `config` holding the checkpoint's weights (imported_variables with
    the optimizer's initial state), and the ImportReport."""
    from bmask_jax.engine.state import step_zero_state
    variables, report = imported_variables(config, checkpoint, kind, source)
    return step_zero_state(config, variables)[0], report


def _host(tree):
    import jax
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
