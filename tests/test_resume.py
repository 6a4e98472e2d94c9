"""Exact resume: interrupted runs (kill -9, SIGTERM) continue to the same parameters as an
uninterrupted run, on the CPU. One run is interrupted both ways, so that the test starts five
processes, not eleven: each costs seconds of imports, tracing and compiled-program loading."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bmask_jax.engine.variables import restore_variables
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


END = 20


def test_kill9_during_a_save_then_sigterm_then_resume_reach_the_uninterrupted_parameters(tmp_path):
    """One run interrupted twice, against one run never interrupted (both to step END):

    1. kill -9 while an asynchronous save is in progress (its temporary folder exists): the
       half-written checkpoint is ignored, and the run resumes from the newest complete one;
    2. SIGTERM during the resumed run: a checkpoint is written at the step where it stopped,
       and the process exits 0;
    3. resumed again to END: the same parameters, bit for bit, and the same images in the same
       order (the replayed steps included) as the uninterrupted run."""
    env = dict(os.environ, PYTHONPATH=REPO)
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, END, checkpoint_every=100000), cwd=REPO, env=env, check=True, capture_output=True)
    assert sorted(_image_order(straight)) == list(range(1, END + 1))

    # 1. Save every step and kill -9 the moment a save is in progress; retry if the save
    # finished first.
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

    # 2. Resume (no periodic checkpoints now) and SIGTERM once it has logged a step the killed
    # process never reached (the killed one logged past its newest complete save).
    metrics = run / "metrics.jsonl"

    def logged_steps():
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return [json.loads(x)["step"] for x in lines if x.endswith("}")]

    target = max(logged_steps() + [latest]) + 2
    proc = subprocess.Popen(_cli(run, 100000, checkpoint_every=100000), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: max(logged_steps() + [0]) >= target, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = json.load(open(run / "train_summary.json"))
    assert stopped["start_step"] == latest, (stopped, latest)      # from the newest complete save
    assert target <= stopped["end_step"] < END, (stopped, target)
    assert _steps(run)[-1] == stopped["end_step"] and not _in_progress(run), (_steps(run), out)

    # 3. Resume to END.
    subprocess.run(_cli(run, END, checkpoint_every=100000), cwd=REPO, env=env, check=True, capture_output=True)
    _assert_same(_params(straight), _params(run))
    assert _image_order(run) == _image_order(straight)
