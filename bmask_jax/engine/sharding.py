"""Data parallelism: one mesh axis 'data' over every device of every process; the batch is
sharded along it, parameters and optimizer state are replicated."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """jax.distributed set-up for multi-host runs. With no arguments, JAX detects Cloud TPU
    and SLURM environments itself; BMASK_COORDINATOR / BMASK_NUM_PROCESSES / BMASK_PROCESS_ID
    give explicit values (e.g. several CPU processes on one machine)."""
    coordinator = coordinator or os.environ.get("BMASK_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("BMASK_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("BMASK_PROCESS_ID", "-1"))
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif "SLURM_JOB_ID" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh, axis 'data', over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble the global batch from each process's local slice (leading axis)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def agree_on_canvas(local_images: np.ndarray) -> np.ndarray:
    """Pad this process's images [b, H, W, 3] to the canvas every process can use this step:
    the largest of all processes' canvases. (Processes choose canvas buckets from their own
    images; the global batch needs one shape.) One tiny all-gather per step when multi-host."""
    if jax.process_count() == 1:
        return local_images
    from jax.experimental import multihost_utils

    from bmask_jax.data.pipeline import largest_canvas, pad_images
    hws = multihost_utils.process_allgather(np.asarray(local_images.shape[1:3], np.int32))
    canvas = largest_canvas(np.asarray(hws).reshape(-1, 2))
    if canvas == tuple(local_images.shape[1:3]):
        return local_images
    return pad_images(list(local_images), canvas)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (e.g. SIGTERM reached one host first):
    all processes must stop, save and exit at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def put_replicated(tree, mesh: Mesh):
    """`tree` replicated over `mesh`: arrays already so stay as they are, host values (the
    same on every process) are sent."""
    target = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.device_put(np.asarray(x), target)

    return jax.tree_util.tree_map(put, tree)


def local_rows(tree, mesh: Mesh):
    """This process's rows of arrays sharded along 'data' over `mesh`, as numpy (the inverse of
    global_batch)."""
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
        return jax.device_get(tree)
    local = multihost_utils.global_array_to_host_local_array(tree, mesh, P("data"))
    return jax.device_get(local)


def gather_to_main(items: list) -> list | None:
    """Process 0 gets every process's `items` (JSON-serialisable), in process order; the others
    get None. One all-gather of lengths and one of the padded bytes."""
    if jax.process_count() == 1:
        return list(items)
    import json

    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(items).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    if jax.process_index() != 0:
        return None
    out = []
    for row, n in zip(every, lengths):
        out.extend(json.loads(row[:n].tobytes().decode()))
    return out
