"""Exact resume: interrupted runs (kill -9, SIGTERM) continue to the same parameters as an
uninterrupted run, on the CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bmask_jax.state import restore_variables
from configs import bmask_rcnn

pytestmark = pytest.mark.slow      # minutes each: the full suite runs it, the edit loop does not

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, max_iter, checkpoint_every=2):
    return [sys.executable, "-m", "bmask_jax.main", "--config", "configs/bmask_rcnn.py:tiny",
            "--workdir", str(workdir), f"--config.train.max_iter={max_iter}",
            f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.eval_at_end=False",
            "--config.train.log_every=1"]


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _in_progress(workdir):
    """Checkpoints being written: Orbax writes into a temporary directory, renamed at the end."""
    d = os.path.join(workdir, "checkpoints")
    return [x for x in os.listdir(d) if not x.isdigit()] if os.path.isdir(d) else []


def _image_order(workdir):
    """{step: image ids} from image_order.jsonl; a step replayed after a resume overwrites."""
    order = {}
    with open(os.path.join(workdir, "image_order.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            order[record["step"]] = record["image_ids"]
    return order


def _params(workdir):
    c = bmask_rcnn.get_config("tiny")
    return jax.tree_util.tree_leaves(restore_variables(c, str(workdir))["params"])


def _wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "process ended early"
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.2)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_kill9_and_sigterm_resume_to_identical_parameters(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, 8), cwd=REPO, env=env, check=True, capture_output=True)
    assert _steps(straight)[-1] == 8

    # kill -9 once the step-4 checkpoint is complete, then resume to step 8.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, 8), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: 4 in _steps(killed), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_steps(killed)) < 8
    subprocess.run(_cli(killed, 8), cwd=REPO, env=env, check=True, capture_output=True)
    _assert_same(_params(straight), _params(killed))
    # The same images in the same order, the replayed steps included.
    assert sorted(_image_order(straight)) == list(range(1, 9))
    assert _image_order(killed) == _image_order(straight)

    # SIGTERM: a checkpoint is written at the step where training stopped, and resuming from
    # it reaches the same parameters as a run that was never stopped.
    termed = tmp_path / "termed"
    proc = subprocess.Popen(_cli(termed, 100000, checkpoint_every=100000), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = termed / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = _steps(termed)
    assert len(stopped) == 1 and stopped[0] >= 2, (stopped, out)
    end = stopped[0] + 2
    subprocess.run(_cli(termed, end, checkpoint_every=100000), cwd=REPO, env=env, check=True, capture_output=True)
    straight_to_end = tmp_path / "straight_to_end"
    subprocess.run(_cli(straight_to_end, end, checkpoint_every=100000), cwd=REPO, env=env, check=True,
                   capture_output=True)
    _assert_same(_params(straight_to_end), _params(termed))


def test_kill9_during_an_async_save_leaves_only_checkpoints_that_restore_right(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    # Save every step and kill -9 the moment a save is in progress (its temporary directory
    # exists); retry if the save finished first.
    for attempt in range(5):
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen(_cli(run, 100000, checkpoint_every=1), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.time()
        while not (_steps(run) and _in_progress(run)):
            assert proc.poll() is None and time.time() - start < 300
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if _in_progress(run):
            break
    assert _in_progress(run), "never caught a save in progress"
    latest = _steps(run)[-1]
    # The half-written checkpoint is ignored: resuming starts from the latest complete one
    # and ends where a run that was never killed ends.
    end = latest + 2
    subprocess.run(_cli(run, end, checkpoint_every=1), cwd=REPO, env=env, check=True, capture_output=True)
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, end, checkpoint_every=100000), cwd=REPO, env=env, check=True,
                   capture_output=True)
    _assert_same(_params(straight), _params(run))
