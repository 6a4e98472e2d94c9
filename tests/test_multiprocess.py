"""Multi-host data parallelism on one machine: two CPU processes joined by jax.distributed
(coordinator on localhost) train N steps with the same global batch as one process and end
with the same parameters, to float tolerance; then they evaluate together (each its share of
the images, detections gathered on process 0) and get the metrics one process gets from the
same checkpoint."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import tiny_config
from test_data_parallel import assert_same_detections

from bmask_jax.data.pipeline import TrainBatches, build_dataset
from bmask_jax.evaluation.evaluate import evaluate
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.state import create_train_state
from bmask_jax.engine.variables import restore_variables

pytestmark = pytest.mark.slow      # minutes each: the full suite runs it, the edit loop does not

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# Two canvas buckets: the processes' images land in different ones at some steps, so they
# must agree on one canvas for the global batch.
OVERRIDES = ["--config.data.train_short_side=(48,64)", "--config.data.canvas_buckets=((48,48),(64,64))",
             f"--config.train.max_iter={STEPS}", "--config.train.batch_size=2",
             f"--config.train.checkpoint_every={STEPS}", "--config.train.log_every=1"]


def _config():
    c = tiny_config()
    c.data.train_short_side = (48, 64)
    c.data.canvas_buckets = ((48, 48), (64, 64))
    c.train.batch_size = 2
    return c


def _cli(workdir, *extra):
    return [sys.executable, "-m", "bmask_jax.main", "--config", "configs/bmask_rcnn.py:tiny",
            "--workdir", str(workdir), *OVERRIDES, *extra]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_processes_start_on_different_canvases():
    """The setup exercises the canvas agreement: at some step the two processes' own images
    choose different buckets."""
    c = _config()
    dataset = build_dataset(c.data, "train")
    mixed = 0
    for step in range(STEPS):
        shapes = [TrainBatches(dataset, c.data, 2, c.seed, p, 2, 0)._make(step)["image"].shape for p in (0, 1)]
        mixed += shapes[0] != shapes[1]
    assert mixed >= 1


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()     # one CPU device per process
                                if not f.startswith("--xla_force_host_platform_device_count"))
    two = tmp_path / "two"
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(_cli(two, f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}",
                                   "--config.eval.batch_size=2", "--config.model.roi_heads.score_threshold=0.0"),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    one = tmp_path / "one"
    run = subprocess.run(_cli(one, "--config.train.eval_at_end=False"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    c = _config()
    a = jax.tree_util.tree_leaves(restore_variables(c, str(one))["params"])
    b = jax.tree_util.tree_leaves(restore_variables(c, str(two))["params"])
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)
    # ... and training moved the parameters, so the comparison means something.
    state, _ = create_train_state(c, BMaskRCNN(c.model), jax.random.PRNGKey(c.seed))
    moved = max(float(np.abs(np.asarray(x) - np.asarray(i)).max())
                for x, i in zip(a, jax.tree_util.tree_leaves(state.params)))
    assert moved > 1e-3

    # Evaluation: the two processes' metrics (process 0 wrote them) equal one process's on the
    # same checkpoint.
    c.eval.batch_size = 2
    c.model.roi_heads.score_threshold = 0.0    # detections even from a model trained 4 steps
    alone = evaluate(c, str(tmp_path / "alone"), restore_variables(c, str(two)))
    together = json.load(open(two / "metrics.json"))
    assert together["num_images"] == alone["num_images"] == c.data.synthetic.num_val
    assert together["num_detections"] == alone["num_detections"] > 0
    assert_same_detections(json.load(open(tmp_path / "alone" / "detections.json")),
                           json.load(open(two / "detections.json")))
    for kind in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75"):
            assert together[kind][k] == pytest.approx(alone[kind][k], abs=1e-6), (kind, k)
