"""Shared test helpers: the tiny config, its first training batch, and the reference files."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax import config as config_lib
from bmask_jax.data.pipeline import TrainBatches, build_dataset
from bmask_jax.train import MODEL_KEYS

# The repo is cloned with shared/ beside it (CI does the same).
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


def reference(name: str):
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"reference file {path} not found (expected the shared/ directory beside the repo)")
    return np.load(path)


def tiny_config(head: str = "bmask"):
    c = config_lib.tiny(config_lib.base())
    c.model.mask_head.name = head
    return c


def first_batch(c) -> dict:
    """The model inputs of training step 0 for config c."""
    loader = TrainBatches(build_dataset(c.data, "train"), c.data, c.train.batch_size, 0)
    try:
        return {k: jnp.asarray(v) for k, v in loader.batch(0).items() if k in MODEL_KEYS}
    finally:
        loader.close()
