"""Export (jax.export, one batch-polymorphic artifact per canvas bucket, weights beside it) and
bmask_jax.inference.serving (jax and numpy only): the same detections as the Predictor, on the tiny
embedded model and on an R50-FPN with random weights; serving's numpy resize is Pillow's, bit
for bit."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from bmask_jax import config as config_lib
from bmask_jax.data.synthetic import CLASS_NAMES
from bmask_jax.data.transforms import resize_image, resize_image_numpy
from bmask_jax.inference.export import SERVING_FILE, export_model, export_saved_model
from bmask_jax.inference.predictor import Predictor
from bmask_jax.inference.serving import ExportedModel
from bmask_jax.engine.variables import random_variables
from test_predictor import assert_same_instances, images, predictor_config, workdir  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("size, new", [((480, 640), (800, 1067)), ((64, 64), (128, 128)), ((128, 96), (37, 50)),
                                       ((100, 200), (100, 150)), ((30, 40), (31, 39)), ((1000, 700), (800, 560)),
                                       ((7, 9), (1, 1)), ((5, 5), (9, 2)), ((333, 500), (800, 1201))])
def test_numpy_resize_is_pillows(size, new):
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), np.uint8)
    np.testing.assert_array_equal(resize_image_numpy(image, new), resize_image(image, new))


def _assert_same(a: list[dict], b: list[dict]):
    for x, y in zip(a, b, strict=True):
        assert_same_instances(x, y)
        assert x["class_names"] == y["class_names"]
        assert ("boundaries" in x) == ("boundaries" in y)
        if "boundaries" in x:
            assert (x["boundaries"] != y["boundaries"]).mean() < 1e-3


@pytest.mark.slow
def test_export_command_and_serving_without_flax(workdir, tmp_path):  # noqa: F811
    """The command writes one artifact per bucket; a fresh interpreter serves it, importing
    neither flax nor the model code nor Pillow, and returns the Predictor's detections."""
    out = tmp_path / "exported"
    flags = ["--config", os.path.join(REPO, "configs", "bmask_rcnn.py") + ":tiny",
             "--config.data.test_short_side=32", "--config.data.max_size=64",
             "--config.data.canvas_buckets=((32, 64), (64, 32), (64, 64))",
             "--config.model.roi_heads.score_threshold=0.0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)     # this checkout's code, installed or not
    run = subprocess.run([sys.executable, "-m", "bmask_jax.inference.export", *flags, "--workdir", workdir, "--output", str(out)],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["model_32x64.jax", "model_64x32.jax", "model_64x64.jax", SERVING_FILE,
                                       "weights.npz"]
    meta = json.load(open(out / SERVING_FILE))
    assert meta["class_names"] == list(CLASS_NAMES) and meta["boundaries"] and meta["platforms"] == ["cpu"]
    ims = images()
    np.savez(tmp_path / "images.npz", *ims)
    script = f"""
import sys, numpy as np
from bmask_jax.inference.serving import ExportedModel
model = ExportedModel({str(out)!r}, batch_size=3)
ims = np.load({str(tmp_path / 'images.npz')!r})
out = model([ims[f'arr_{{i}}'] for i in range({len(ims)})])
np.savez({str(tmp_path / 'served.npz')!r}, **{{f'{{k}}_{{i}}': np.asarray(o[k]) for i, o in enumerate(out)
                                          for k in ('boxes', 'scores', 'classes', 'masks', 'boundaries')}})
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'PIL', 'optax', 'orbax', 'pycocotools')
                or m.startswith('bmask_jax.models'))
print('LOADED', loaded)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LOADED []" in run.stdout
    served = np.load(tmp_path / "served.npz")
    predicted = Predictor(predictor_config(), workdir)(ims)
    _assert_same([{k: served[f"{k}_{i}"] for k in ("boxes", "scores", "classes", "masks", "boundaries")}
                  | {"class_names": [CLASS_NAMES[c] for c in served[f"classes_{i}"]]} for i in range(len(ims))],
                 predicted)
    with pytest.raises(FileExistsError, match="already holds an exported model"):
        export_model(predictor_config(), str(out), workdir)
    with pytest.raises(FileNotFoundError, match="serving.json"):
        ExportedModel(str(tmp_path))


@pytest.mark.slow
def test_r50_fpn_exported_matches_predictor(tmp_path):
    """The COCO R50-FPN (80 classes, FrozenBN, Mask R-CNN head) with random weights, on a
    reduced canvas; the images are resized (by Pillow in the Predictor, by numpy in serving)."""
    c = config_lib.variant(config_lib.mask_head(config_lib.base(), "maskrcnn"), "r50_fpn_1x")
    c.data.update(test_short_side=256, max_size=384, canvas_buckets=((256, 384),))
    c.model.roi_heads.score_threshold = 0.0
    c.eval.batch_size = 2
    variables = random_variables(c)
    names = [f"c{k}" for k in range(80)]
    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 256, (200, 300, 3), np.uint8), rng.integers(0, 256, (150, 200, 3), np.uint8)]
    meta = export_model(c, str(tmp_path / "r50"), variables=variables, class_names=names)
    assert not meta["boundaries"] and meta["models"] == {"256x384": "model_256x384.jax"}
    served = ExportedModel(str(tmp_path / "r50"))(ims)
    predicted = Predictor(c, variables=variables, class_names=names)(ims)
    assert all("boundaries" not in p for p in predicted)
    _assert_same(served, predicted)


def test_saved_model_export(workdir, tmp_path):  # noqa: F811
    """Through jax2tf, when TensorFlow is installed (it is not a dependency)."""
    tf = pytest.importorskip("tensorflow")
    c = predictor_config()
    export_saved_model(c, str(tmp_path / "sm"), workdir)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    p = Predictor(c, workdir)
    from bmask_jax.data.transforms import prepare_example
    d = c.data
    ex = prepare_example({"image": images()[1]}, d.test_short_side, d.max_size, d.canvas_buckets, False, 0, 0,
                         with_gt=False)
    assert ex["image"].shape[:2] == (64, 32)
    out = loaded.signatures["bucket_64x32"](image=tf.constant(ex["image"][None]),
                                            image_hw=tf.constant(ex["image_hw"][None]))
    ref = jax.device_get(p._detect(p.variables, {"image": np.repeat(ex["image"][None], 2, 0),
                                                 "image_hw": np.repeat(ex["image_hw"][None], 2, 0)}))
    assert set(loaded.signatures) == {"serving_default", "bucket_32x64", "bucket_64x32", "bucket_64x64"}
    np.testing.assert_allclose(out["scores"].numpy()[0], ref["scores"][0], atol=1e-5)
    np.testing.assert_allclose(out["boxes"].numpy()[0], ref["boxes"][0], atol=1e-3)
