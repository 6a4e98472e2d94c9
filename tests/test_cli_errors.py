"""Bad command lines fail fast with a message that names the flag, and write nothing."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bmask_jax.main", "--workdir", str(workdir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode != 0
    assert not workdir.exists()
    return proc.stderr


@pytest.mark.parametrize("override,expected", [
    ("--config.model.nonexistent=1", "--config.model.nonexistent=1: the config has no key 'nonexistent'"),
    ("--config.model.rpn.nms_thresh=0.5", 'Did you mean "nms_threshold"'),
    ("--config.train.max_iter=abc", "--config.train.max_iter=abc: invalid literal for int()"),
    ("--config.train.batch_size=2.5", "--config.train.batch_size=2.5"),
])
def test_unknown_or_mistyped_config_keys_are_named(tmp_path, override, expected):
    err = _run(tmp_path, "--config", "configs/bmask_rcnn.py:tiny", override)
    assert expected in err
    assert "Traceback" not in err


def test_missing_config_file_and_unknown_variant_are_named(tmp_path):
    """One line each (before anything is built), not a traceback from inside the run."""
    err = _run(tmp_path, "--config", "configs/nope.py")
    assert err.strip() == f"FATAL --config configs/nope.py: no config file {os.path.join(REPO, 'configs', 'nope.py')}"
    err = _run(tmp_path, "--config", "configs/bmask_rcnn.py:huge")
    assert "unknown config variant 'huge'" in err.splitlines()[0] and "Traceback" not in err
