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
    return config_lib.mask_head(config_lib.tiny(config_lib.base()), head)


def first_batch(c) -> dict:
    """The model inputs of training step 0 for config c."""
    loader = TrainBatches(build_dataset(c.data, "train"), c.data, c.train.batch_size, 0)
    try:
        return {k: jnp.asarray(v) for k, v in loader.batch(0).items() if k in MODEL_KEYS}
    finally:
        loader.close()


def iou_brute_force(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes from the definition, in plain Python."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
