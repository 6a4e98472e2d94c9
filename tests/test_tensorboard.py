"""TensorBoard holds what a detectron2 user looks for: the training scalars, and after each
evaluation bbox/segm/boundary AP, AP50, AP75 at the training step, and validation pictures.
Read back with TensorBoard's own event reader, not with the writer's code."""
import json
import os

import numpy as np
import pytest

from bmask_jax.evaluation.evaluate import evaluate
from bmask_jax.engine.variables import restore_variables
from bmask_jax.train import train_and_evaluate
from helpers import tiny_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard (a test dependency) reads the event files")


def read_events(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_training_and_evaluation_write_scalars_and_pictures(tmp_path):
    c = tiny_config()
    c.train.update(max_iter=4, log_every=2, checkpoint_every=4)
    c.model.roi_heads.score_threshold = 0.0           # pictures with detections from a 4-step model
    c.eval.num_pictures = 2
    workdir = tmp_path / "run"
    metrics = train_and_evaluate(c, str(workdir))
    acc = read_events(workdir / "tensorboard")
    tags = acc.Tags()
    assert {"train/total_loss", "train/loss_boundary", "train/lr", "train/images_per_sec"} <= set(tags["scalars"])
    for kind in ("bbox", "segm", "boundary"):
        for k in ("AP", "AP50", "AP75"):
            events = acc.Scalars(f"{kind}/{k}")
            assert [e.step for e in events] == [4]                        # the evaluated step
            assert events[0].value == pytest.approx(100 * metrics[kind][k], abs=1e-4)
    assert len(tags["images"]) == 2 and all(t.startswith("eval/") for t in tags["images"])
    picture = acc.Images(tags["images"][0])[0]
    assert picture.step == 4 and picture.width == picture.height == 512   # drawn 8x, as the PNGs
    pngs = sorted(os.listdir(workdir / "pictures"))
    assert f"eval/{pngs[0][:-4]}" == sorted(tags["images"])[0]

    # --mode evaluate on the same workdir: its numbers land at the checkpoint's step.
    again = evaluate(c, str(workdir), restore_variables(c, str(workdir)))
    events = read_events(workdir / "tensorboard").Scalars("segm/AP")
    assert [e.step for e in events] == [4, 4]
    np.testing.assert_allclose([e.value for e in events], 100 * again["segm"]["AP"], atol=1e-4)
    assert json.load(open(workdir / "metrics.json"))["segm"]["AP"] == again["segm"]["AP"]


def test_the_writer_does_not_load_torch_and_torch_still_imports(tmp_path):
    # tensorboardX imports torch when it is installed (1.8 s a start); it must not, and a
    # later `import torch` must work. A fresh interpreter: this one may have torch loaded.
    import subprocess
    import sys
    code = ("import sys\nfrom bmask_jax.engine import events\n"
            f"w = events.summary_writer({str(tmp_path)!r}); w.add_scalar('x', 1.0, 0); w.close()\n"
            "assert 'torch' not in sys.modules, 'torch was loaded'\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('torch'):\n    import torch; torch.zeros(1)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=dict(os.environ, PYTHONPATH=repo),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_events(tmp_path).Scalars("x")[0].value == 1.0
