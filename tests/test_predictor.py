"""bmask_jax.Predictor and --mode predict, on the tiny model with fresh (untrained) weights
saved as a checkpoint: any sizes, batches of different images over the canvas buckets, one
compile per bucket, the same instances as the model run on each image alone; predict skips
unreadable files, writes the rest, lists the bad ones and exits non-zero."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import bmask_jax
from bmask_jax.engine import jit_cache
from bmask_jax.data.synthetic import CLASS_NAMES, SyntheticShapes
from bmask_jax.data.transforms import prepare_example
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.ops.postprocess import postprocess
from bmask_jax.inference.predict import FAILURES_FILE, predict
from bmask_jax.inference.predictor import Predictor
from bmask_jax.train import compile_count
from helpers import fresh_checkpoint, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def predictor_config():
    """The tiny model with three canvas buckets, and every detection kept (untrained weights)."""
    c = tiny_config()
    c.data.update(test_short_side=32, max_size=64, canvas_buckets=((32, 64), (64, 32), (64, 64)))
    c.model.roi_heads.score_threshold = 0.0
    c.eval.batch_size = 2
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir holding a step-0 checkpoint of predictor_config()."""
    return fresh_checkpoint(predictor_config(), str(tmp_path_factory.mktemp("predictor") / "run"))


def images():
    """Three sizes landing in three buckets (32x64, 64x32 and 32x64 again, 64x64 never)."""
    rng = np.random.default_rng(0)
    shapes = SyntheticShapes("val", num_images=4, image_size=(64, 64))
    return [shapes[0]["image"][:40],                                        # 40x64 -> 32x51 in 32x64
            np.asarray(Image.fromarray(shapes[1]["image"]).resize((50, 100))),  # 100x50 -> 64x32
            rng.integers(0, 256, (30, 90, 3), np.uint8),                        # 30x90 -> 21x64 in 32x64
            shapes[2]["image"][:, :48]]                                         # 64x48 -> 32x24 in 32x64


def one_by_one(c, variables, image) -> dict:
    """Reference: the model applied to this image alone (batch of 1, no mesh), then postprocess."""
    d = c.data
    ex = prepare_example({"image": image}, d.test_short_side, d.max_size, d.canvas_buckets, False,
                         d.max_instances, d.gt_mask_size, with_gt=False)
    det = jax.device_get(jax.jit(lambda v, b: BMaskRCNN(c.model).apply(v, b, train=False))(
        variables, {"image": ex["image"][None], "image_hw": ex["image_hw"][None]}))
    return postprocess(det, 0, ex["scale"], ex["orig_hw"], c.eval.mask_threshold)


def assert_same_instances(a: dict, b: dict):
    assert len(a["scores"]) == len(b["scores"]) > 0
    np.testing.assert_array_equal(a["classes"], b["classes"])
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
    # masks may differ where a probability sits at the threshold
    assert (a["masks"] != b["masks"]).mean() < 1e-3


@pytest.mark.slow
def test_predictor_any_sizes_batched_over_buckets(workdir):
    c = predictor_config()
    jit_cache.clear()           # the compile count below starts from a fresh process's
    predictor = bmask_jax.Predictor(c, workdir)
    assert predictor.class_names == list(CLASS_NAMES)
    ims = images()
    out = predictor(ims)
    assert isinstance(out, list) and len(out) == 4
    # two buckets used: 32x64 (3 images: two batches of 2) and 64x32; one compile each
    assert compile_count(predictor._detect) == 2
    variables = predictor.variables
    for image, inst in zip(ims, out):
        h, w = image.shape[:2]
        assert inst["masks"].shape[1:] == (h, w) and inst["masks"].dtype == bool
        assert inst["boundaries"].shape == inst["masks"].shape      # the BMask head draws boundaries
        assert inst["boxes"].dtype == np.float32 and inst["classes"].dtype == np.int32
        assert inst["class_names"] == [CLASS_NAMES[k] for k in inst["classes"]]
        assert (inst["boxes"][:, [0, 2]] <= w + 1e-3).all() and (inst["boxes"][:, [1, 3]] <= h + 1e-3).all()
        ref = one_by_one(c, jax.device_get(variables), image)
        assert_same_instances(inst, ref)
    # a single image (array or path) gives a dict; a score threshold drops detections
    single = predictor(ims[1])
    assert isinstance(single, dict)
    assert_same_instances(single, out[1])
    strict = Predictor(c, workdir, score_threshold=float(np.median(out[1]["scores"])))(ims[1])
    assert 0 < len(strict["scores"]) < len(out[1]["scores"]) and (strict["scores"] >= np.median(out[1]["scores"])).all()


def test_predictor_inputs(workdir, tmp_path):
    c = predictor_config()
    predictor = Predictor(c, workdir)
    ims = images()
    path = tmp_path / "a.png"
    Image.fromarray(ims[0]).save(path)
    from_path, from_array, grey = predictor([str(path), ims[0], ims[0].mean(-1)])
    assert_same_instances(from_path, from_array)
    assert grey["masks"].shape[1:] == ims[0].shape[:2]
    with pytest.raises(ValueError, match="image 1: expected an RGB array"):
        predictor([ims[0], np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(ValueError, match="image 0: expected uint8"):
        predictor([np.full((8, 8, 3), 300.0)])
    with pytest.raises(ValueError, match="missing.png"):
        predictor(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="give a workdir, variables, or a config with model.weights"):
        Predictor(c)


def test_the_predictor_restores_variables_without_building_a_train_state(workdir, monkeypatch):
    """Inference reads params and frozen alone from the checkpoint (Orbax's partial restore):
    with the optimizer and the train state made to fail, the Predictor still gets the saved
    variables, bit for bit the ones a resumed training run reads."""
    from bmask_jax.engine import checkpoints, optim
    from bmask_jax.engine import state as state_lib
    c = predictor_config()
    template, _ = state_lib.create_train_state(c, BMaskRCNN(c.model), jax.random.PRNGKey(1))
    mgr = checkpoints.manager(workdir, 1, async_save=False)
    saved = checkpoints.restore_latest(mgr, template)
    mgr.close()

    def refuse(*args, **kwargs):
        raise AssertionError("inference built an optimizer or a train state")
    for module, name in ((optim, "make_optimizer"), (state_lib, "make_optimizer"), (state_lib, "step_zero_state")):
        monkeypatch.setattr(module, name, refuse)
    variables = Predictor(c, workdir).variables
    for key in ("params", "frozen"):
        got, want = jax.tree_util.tree_flatten_with_path(variables[key]), jax.tree_util.tree_flatten_with_path(
            getattr(saved, key))
        assert [p for p, _ in got[0]] == [p for p, _ in want[0]]
        for (path, a), (_, b) in zip(got[0], want[0]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    # And not the template's values: the restore read the file.
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(template.params)[0]),
                              np.asarray(jax.tree_util.tree_leaves(variables["params"])[0]))


def test_predictor_applies_the_config_changes_of_a_weight_import(workdir, tmp_path, caplog):
    """An imported-weights workdir records the config values its weights need
    (weights_import.json, as `python -m bmask_jax.weights` writes it); the Predictor uses them."""
    c = predictor_config()
    imported = tmp_path / "imported"
    shutil.copytree(os.path.join(workdir, "checkpoints"), imported / "checkpoints")
    with open(imported / "weights_import.json", "w") as f:
        json.dump({"config_changes_applied": True,
                   "config_differences": {"model.pixel_mean": [[127.5, 127.5, 127.5], [103.53, 116.28, 123.675]]}},
                  f)
    p = Predictor(c, str(imported))
    assert tuple(p.config.model.pixel_mean) == (103.53, 116.28, 123.675)
    assert tuple(c.model.pixel_mean) == (127.5, 127.5, 127.5)      # the caller's config is untouched
    assert "weights_import.json" in caplog.text and "pixel_mean" in caplog.text


def _folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(images()[:3]):
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.mark.slow
def test_predict_skips_unreadable_files_and_draws_small_images_upscaled(workdir, tmp_path):
    c = predictor_config()
    c.predict.inputs = str(_folder(tmp_path))
    c.predict.score_threshold = 0.0
    out_dir = tmp_path / "out"
    path, failures = predict(c, workdir, str(out_dir))
    assert [os.path.basename(f["file"]) for f in failures] == ["broken.png"]
    assert "cannot read image" in failures[0]["error"]
    assert sorted(os.listdir(out_dir)) == ["0.png", "1.png", "2.png", FAILURES_FILE, "predictions.json"]
    preds = json.load(open(path))
    assert {p["file_name"] for p in preds} == {"0.png", "1.png", "2.png"}
    assert json.load(open(out_dir / FAILURES_FILE))[0]["file"].endswith("broken.png")
    # 40x64 drawn x8 (512 px wide), 100x50 x6 (600 px high)
    assert np.asarray(Image.open(out_dir / "0.png")).shape == (320, 512, 3)
    assert np.asarray(Image.open(out_dir / "1.png")).shape == (600, 300, 3)
    # the predictions are those of the Predictor on the same images
    ref = Predictor(c, workdir)(images()[:3])
    for k in range(3):
        mine = [p for p in preds if p["file_name"] == f"{k}.png"]
        assert len(mine) == len(ref[k]["scores"])
        np.testing.assert_allclose(sorted(p["score"] for p in mine), sorted(ref[k]["scores"]), atol=1e-6)


@pytest.mark.slow
def test_predict_command_lists_bad_files_and_exits_nonzero(workdir, tmp_path):
    folder = _folder(tmp_path)
    out_dir = tmp_path / "cli"
    # The CLI with the tiny config and this test's buckets, as flags.
    flags = ["--config", os.path.join(REPO, "configs", "bmask_rcnn.py") + ":tiny",
             "--config.data.test_short_side=32", "--config.data.max_size=64",
             "--config.data.canvas_buckets=((32, 64), (64, 32), (64, 64))",
             "--config.model.roi_heads.score_threshold=0.0", "--config.eval.batch_size=2",
             f"--config.predict.inputs={folder}", f"--config.predict.output_dir={out_dir}",
             "--config.predict.score_threshold=0.0"]
    run = subprocess.run([sys.executable, "-m", "bmask_jax.main", *flags, "--workdir", workdir, "--mode", "predict"],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode != 0, run.stderr[-2000:]
    assert "wrote pictures and" in run.stdout
    last = run.stderr.strip().splitlines()
    assert "could not read 1 image(s)" in "\n".join(last[-3:]) and "broken.png" in last[-1]
    assert sorted(os.listdir(out_dir)) == ["0.png", "1.png", "2.png", FAILURES_FILE, "predictions.json"]
