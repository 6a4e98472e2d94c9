"""experiments/device_check.py --smoke runs on the CPU (tiny configs) and writes every row the
GPU check reports: train and inference of Mask R-CNN, BMask R-CNN and BMask ViTDet (tiny_vitdet
in a smoke run, ViTDet-B on the GPU), compile times.
It runs as a subprocess, as on the GPU machine, with the tests' persistent compilation cache
(BMASK_JAX_CACHE, as tests/conftest.py), so that a rerun skips XLA's compiles."""
import json
import math
import os
import subprocess
import sys
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("mask_rcnn", "bmask_rcnn", "bmask_vitdet_b")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_smoke_writes_every_row(tmp_path):
    out = tmp_path / "x.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               BMASK_JAX_CACHE=os.environ.get("BMASK_JAX_CACHE", os.path.expanduser("~/.cache/bmask_jax/xla")))
    # One per-chip batch: a second (the GPU check runs 2 and 8) takes the same path and would
    # add two compiles.
    proc = subprocess.run([sys.executable, "experiments/device_check.py", "--smoke", "--batches", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke" and result["backend"] == "cpu" and result["per_chip_batches"] == [1]
    assert result["configs"]["bmask_vitdet_b"] == "configs/bmask_rcnn.py:tiny_vitdet"
    assert not result["skipped_stages"] and not result["errors"]

    train = {(r["model"], r["per_chip_batch"]): r for r in result["train"]}
    assert set(train) == {(m, 1) for m in MODELS}
    for (_, batch), row in train.items():
        assert row["global_batch"] == batch * result["device_count"]
        for key in ("step_s", "images_per_s", "images_per_s_per_chip", "compile_s"):
            assert _positive(row[key]), (key, row)
        assert math.isfinite(row["final_total_loss"])
        assert row["xla_memory_bytes"]["peak"] > 0
        assert "peak_bytes_in_use" in row["device_memory_so_far"]   # None on the CPU

    infer = {r["model"]: r for r in result["inference"]}
    assert set(infer) == set(MODELS)
    for row in infer.values():
        for key in ("ms_per_image", "device_ms_per_image", "compile_s"):
            assert _positive(row[key]), (key, row)
        assert row["detections"] > 0          # score threshold 0: the mask head and pasting ran

    assert "skipped" in result["torchvision"]  # a smoke run leaves torchvision out by default
    assert _positive(result["ratios"]["bmask_over_mask_inference"])
    assert "bmask_rcnn" in proc.stdout and "img/s" in proc.stdout
