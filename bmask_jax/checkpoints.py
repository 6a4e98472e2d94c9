"""Orbax checkpointing of the train state: async saves, keep-N, resume from the latest."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, force: bool = False) -> None:
    mgr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state):
    """Restore the newest checkpoint into the structure/shardings of abstract_state, or
    return None when the directory holds none."""
    step = mgr.latest_step()
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))
