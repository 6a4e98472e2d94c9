"""Every command's error boundary (bmask_jax/errors.py), one table: each command run on each
bad input a user can give it (bad, unsafe, cut or oversized weight files, failed or malformed
downloads, a damaged checkpoint, missing inputs, outputs that cannot be written, a port in
use, a missing optional extra). Each must exit non-zero with at most 3 lines on stderr (absl's
warning lines and progress bars aside) that name the culprit, and no traceback; --verbose
brings the traceback back. Nothing here compiles a model: every error comes before one."""
import io
import os
import pickle
import re
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/bmask_rcnn.py:tiny"

pytestmark = pytest.mark.slow      # about 20 command starts (jax, flax, the config) of 2-4 s


class Evil:
    def __reduce__(self):
        return (os.system, ("echo never-run",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = pickle.dumps({"model": {"w": np.zeros(1000, np.float32)}})
    (d / "cut.pkl").write_bytes(good[:len(good) // 2])
    (d / "evil.pkl").write_bytes(pickle.dumps({"model": {"w": Evil()}}))
    # A torch.save-style zip whose data.pkl asks for posix.system (written without torch).
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    (d / "evil.pth").write_bytes(buffer.getvalue())
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "photo.png")
    (d / "a_file").write_text("not a folder")
    (d / "clip.mp4").write_bytes(b"\x00" * 100)
    fake = d / "no_av"                           # an `av` that is not installed
    (fake / "av").mkdir(parents=True)
    (fake / "av" / "__init__.py").write_text("raise ImportError('No module named av')\n")
    damaged = d / "damaged_run" / "checkpoints" / "3"
    damaged.mkdir(parents=True)
    (damaged / "junk").write_text("junk")
    return d


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path) -> str:
    return f"--config.model.weights={path}"


def cases(d, tmp):
    """(id, command line after `python -m bmask_jax`, culprit in stderr, extra env)."""
    img = d / "photo.png"
    wd = ["--workdir", str(tmp / "run")]
    url = f"http://127.0.0.1:{closed_port()}/m.pkl"
    predict = ["predict", "--config", TINY, *wd, f"--config.predict.inputs={img}"]
    return [
        ("predict-cut-weights", [*predict, weights(d / "cut.pkl")], str(d / "cut.pkl"), {}),
        ("predict-unsafe-pickle", [*predict, weights(d / "evil.pkl")], str(d / "evil.pkl"), {}),
        ("evaluate-unsafe-pth", ["evaluate", "--config", TINY, *wd, weights(d / "evil.pth")], str(d / "evil.pth"), {}),
        ("predict-no-network", [*predict, weights(url)], url, {}),
        ("predict-bad-host", [*predict, weights("http://../x.pkl")], "http://../x.pkl", {}),
        ("predict-no-such-weights", [*predict, weights(d / "nope.pkl")], str(d / "nope.pkl"), {}),
        ("predict-missing-input", ["predict", "--config", TINY, *wd, f"--config.predict.inputs={d / 'nope.png'}"],
         str(d / "nope.png"), {}),
        ("predict-output-is-a-file", [*predict, weights(d / "cut.pkl"), f"--config.predict.output_dir={d / 'a_file'}"],
         "predict.output_dir", {}),
        ("predict-video-without-av", ["predict", "--config", TINY, *wd, f"--config.predict.inputs={d / 'clip.mp4'}"],
         "pip install", {}),
        ("evaluate-damaged-checkpoint", ["evaluate", "--config", TINY, "--workdir", str(d / "damaged_run")],
         str(d / "damaged_run" / "checkpoints"), {}),
        ("evaluate-workdir-is-a-file", ["evaluate", "--config", TINY, "--workdir", str(d / "a_file")],
         "--workdir", {}),
        ("export-without-weights", ["export", "--config", TINY, "--output", str(tmp / "exported")],
         "--config.model.weights", {}),
        ("export-unsafe-weights", ["export", "--config", TINY, "--output", str(tmp / "exported"),
                                   weights(d / "evil.pkl")], str(d / "evil.pkl"), {}),
        ("import-missing-source", ["import-weights", "--config", TINY, "--source", str(d / "nope.pkl"),
                                   "--output", str(tmp / "imported")], str(d / "nope.pkl"), {}),
        ("import-unsafe-source", ["import-weights", "--config", TINY, "--source", str(d / "evil.pth"),
                                  "--output", str(tmp / "imported")], str(d / "evil.pth"), {}),
        ("import-cut-source", ["import-weights", "--config", TINY, "--source", str(d / "cut.pkl"),
                               "--output", str(tmp / "imported")], str(d / "cut.pkl"), {}),
        ("demo-port-in-use", ["demo", "--config", TINY, *wd, "--port", "{busy}"], "--port", {}),
    ]


def stderr_lines(err: str) -> list[str]:
    """stderr without absl's log lines (`W1207 19:06:56.860086 ...`) and progress bars."""
    return [line for line in err.splitlines()
            if line.strip() and not re.match(r"[WI]\d{4} \d\d:\d\d:\d\d", line) and "%|" not in line]


@pytest.mark.parametrize("case", range(17))
def test_a_user_error_is_one_line_naming_its_culprit(files, tmp_path, case):
    name, argv, culprit, env = cases(files, tmp_path)[case]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    argv = [a.replace("{busy}", str(busy.getsockname()[1])) for a in argv]
    if name == "predict-video-without-av":
        env = {"PYTHONPATH": f"{files / 'no_av'}{os.pathsep}{REPO}"}
    try:
        proc = subprocess.run([sys.executable, "-m", "bmask_jax", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **env})
    finally:
        busy.close()
    lines = stderr_lines(proc.stderr)
    assert proc.returncode != 0, (name, proc.stdout[-500:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
    assert 1 <= len(lines) <= 3, (name, lines)
    assert culprit in proc.stderr, (name, culprit, lines)
    assert "never-run" not in proc.stdout + proc.stderr


def test_verbose_shows_the_traceback(files, tmp_path):
    argv = ["predict", "--config", TINY, "--workdir", str(tmp_path / "run"), weights(files / "evil.pkl"),
            f"--config.predict.inputs={files / 'photo.png'}"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    quiet = subprocess.run([sys.executable, "-m", "bmask_jax", *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env=env)
    loud = subprocess.run([sys.executable, "-m", "bmask_jax", *argv, "--verbose"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UnsafeCheckpointError" in loud.stderr
