"""model.weights, the model zoo and downloads (bmask_jax/weights/pretrained.py, model_zoo.py,
download.py), against an HTTP server on 127.0.0.1 that each test starts: nothing leaves the
machine. The checkpoints it serves are written here in detectron2's layouts (tests/helpers.py
builds their key names and shapes from a config's numbers, independently of our tree)."""
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import D2_PIXELS, d2_shapes, d2_vitdet_shapes, msra_blobs, random_d2_checkpoint, tiny_config
from helpers import file_server as server, weights_home as cache  # noqa: F401 - fixtures

from bmask_jax.weights import download, model_zoo, pretrained
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.variables import init_variables
from bmask_jax.weights import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("cache")     # every test: its own empty $BMASK_JAX_HOME, no mirror


def pickled(arrays: dict) -> bytes:
    """A checkpoint as detectron2's model zoo ships it: a pickle of numpy arrays under "model"."""
    return pickle.dumps({"model": arrays, "__author__": "test", "matching_heuristics": True})


def leftovers(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# downloads
# ---------------------------------------------------------------------------------------------

def test_download_then_cache_hit(server, cache):
    server.files["/models/a/model.pkl"] = b"x" * 3_000_000
    url = server.url + "/models/a/model.pkl"
    path = download.fetch(url, progress=False)
    assert path == str(cache / "weights" / f"127.0.0.1_{url.split(':')[2].split('/')[0]}" / "models" / "a" / "model.pkl")
    assert open(path, "rb").read() == b"x" * 3_000_000
    assert download.fetch(url, progress=False) == path
    assert server.requests == ["/models/a/model.pkl"]          # the second call asked nobody


def test_interrupted_transfer_leaves_no_file_that_is_used(server, cache):
    body = os.urandom(2_500_000)
    server.files["/m.pkl"], server.how["/m.pkl"] = body, {"cut": 1_000_000}
    with pytest.raises(download.DownloadError, match=r"cut off after 1000000 of 2500000 bytes|failed after") as e:
        download.fetch(server.url + "/m.pkl", progress=False)
    assert server.url + "/m.pkl" in str(e.value) and download.cache_path(server.url + "/m.pkl") in str(e.value)
    assert leftovers(cache) == []                               # no partial file, under any name
    del server.how["/m.pkl"]                                     # the next try starts afresh
    assert open(download.fetch(server.url + "/m.pkl", progress=False), "rb").read() == body
    assert len(server.requests) == 2


def test_checksum_from_detectron2_file_names(server, cache, monkeypatch):
    """detectron2's model-zoo files end in their md5's first 6 hex digits (MODEL_ZOO.md)."""
    body = b"weights" * 1000
    good = hashlib.md5(body).hexdigest()[:6]
    bad = "000000" if good != "000000" else "111111"
    monkeypatch.setenv("BMASK_JAX_MIRROR", server.url)
    for suffix in (good, bad):
        server.files[f"/detectron2/X/1/model_final_{suffix}.pkl"] = body
    with pytest.raises(download.DownloadError, match=f"md5 is {hashlib.md5(body).hexdigest()}.*starts with {bad}"):
        download.fetch(f"detectron2://X/1/model_final_{bad}.pkl", progress=False)
    assert leftovers(cache) == []
    path = download.fetch(f"detectron2://X/1/model_final_{good}.pkl", progress=False)
    assert path.endswith(os.path.join("dl.fbaipublicfiles.com", "detectron2", "X", "1", f"model_final_{good}.pkl"))


def test_publisher_checksums():
    assert download.publisher_checksum(model_zoo.get("mask_rcnn_R_50_FPN_1x").url) == ("md5", "a54504")
    assert download.publisher_checksum("https://download.pytorch.org/models/resnet50-0676ba61.pth") == \
        ("sha256", "0676ba61")
    assert download.publisher_checksum(model_zoo.BACKBONES["ImageNet/MSRA/R-50"]) is None
    # Every detectron2 zoo entry carries one.
    for e in model_zoo.ENTRIES.values():
        assert (download.publisher_checksum(e.url) is not None) == (e.publisher == "detectron2"), e.name


def test_404_names_the_url_and_where_to_put_the_file(server):
    url = server.url + "/nothing/here.pkl"
    with pytest.raises(download.DownloadError, match="HTTP 404") as e:
        download.fetch(url, progress=False)
    assert url in str(e.value) and f"save it as {download.cache_path(url)}" in str(e.value)


def test_no_network_names_the_url_and_where_to_put_the_file(cache):
    url = f"http://127.0.0.1:{closed_port()}/detectron2/ImageNetPretrained/MSRA/R-50.pkl"
    with pytest.raises(download.DownloadError, match="no network") as e:
        download.fetch(url, progress=False)
    assert url in str(e.value) and download.cache_path(url) in str(e.value)
    assert leftovers(cache) == []


def test_authors_share_links_resolve_to_a_file_saved_by_hand(cache):
    entry = model_zoo.get("bmask_rcnn_R_50_FPN_1x")
    with pytest.raises(download.DownloadError) as e:
        model_zoo.weights_file(entry.name)
    assert entry.url in str(e.value) and str(cache / "weights" / "zoo" / "bmask_rcnn_R_50_FPN_1x.pth") in str(e.value)
    os.makedirs(os.path.dirname(entry.cache_path()))
    open(entry.cache_path(), "wb").write(b"saved by hand")
    assert model_zoo.weights_file(entry.name) == entry.cache_path()


def test_unknown_weights_name_is_one_clear_error():
    with pytest.raises(FileNotFoundError, match="model.weights=nope.pkl: no such file.*bmask-jax zoo"):
        model_zoo.weights_file("nope.pkl")


# ---------------------------------------------------------------------------------------------
# the zoo: each entry's config fits its publisher's checkpoint layout
# ---------------------------------------------------------------------------------------------

def abstract_trees(config):
    """Our params and frozen trees of config's model, as read-only zero views (no memory)."""
    shapes = jax.eval_shape(lambda: init_variables(config, BMaskRCNN(config.model), jax.random.PRNGKey(0)))
    zeros = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes)
    return zeros["params"], zeros.get("frozen", {})


def zero_checkpoint(shapes: dict) -> dict:
    return {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", list(model_zoo.ENTRIES))
def test_zoo_entry_config_fits_detectron2_keys(name):
    """A checkpoint with detectron2's key names and shapes for the entry's architecture imports
    without missing, unexpected or mis-shaped keys, and fills every layer."""
    entry = model_zoo.get(name)
    config = entry.build_config()
    assert config.model.weights == name
    m = config.model
    assert m.mask_head.name == ("bmask" if "bmask" in name else "maskrcnn")
    assert m.roi_heads.cascade.enabled == name.startswith("cascade")
    if "vitdet" in name:
        assert m.backbone.name == "vit" and m.backbone.vit.depth == {"b": 12, "l": 24, "h": 32}[name[-1]]
    elif "regnet" in name:
        assert m.backbone.name == "regnet" and name.startswith(f"mask_rcnn_{m.backbone.regnet}_dds")
    else:
        assert m.backbone.depth == (101 if "R_101" in name else 50)
    assert m.num_classes == (8 if entry.dataset == "Cityscapes" else 80)
    params, frozen = abstract_trees(config)
    layout = d2_vitdet_shapes(config) if m.backbone.name == "vit" else d2_shapes(config)
    checkpoint = dict(zero_checkpoint(layout), **D2_PIXELS)
    _, _, report = convert(checkpoint, params, frozen, "auto", name)
    assert report.kind == "detectron2" and not report.initialised_fresh
    assert sorted(k for k in report.ignored if not k.endswith("num_batches_tracked")) == ["pixel_mean", "pixel_std"]
    assert config.model.backbone.norm == ("SyncBN" if name.endswith("_LSJ") else config.model.backbone.norm)


@pytest.mark.parametrize("spec", ["configs/mask_rcnn.py:r50_fpn_1x", "configs/bmask_rcnn.py:r101_fpn_3x",
                                  "configs/bmask_rcnn.py:cascade_r50_fpn_1x", "configs/cityscapes.py:bmask_code"])
def test_coco_and_cityscapes_configs_start_from_msra_imagenet(spec):
    from bmask_jax import config as config_lib
    config = config_lib.from_file(spec)
    depth = config.model.backbone.depth
    assert config.model.weights == f"detectron2://ImageNetPretrained/MSRA/R-{depth}.pkl"
    assert download.expand_url(config.model.weights) == model_zoo.BACKBONES[f"ImageNet/MSRA/R-{depth}"].replace(
        "detectron2://", download.DETECTRON2_PREFIX)
    params, frozen = abstract_trees(config)
    _, _, report = convert(msra_blobs(zero_checkpoint(d2_shapes(config))), params, frozen, "auto", spec)
    assert report.kind == "msra" and not any(n.startswith("backbone/") for n in report.initialised_fresh)


def test_embedded_configs_download_nothing():
    from configs import bmask_rcnn, mask_rcnn
    for module in (bmask_rcnn, mask_rcnn):
        for variant in ("shapes", "tiny"):
            assert module.get_config(variant).model.weights == ""


def test_zoo_table_command():
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "bmask_jax.weights.model_zoo"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    for e in model_zoo.ENTRIES.values():
        assert f"| `{e.name}` | `{e.config}` |" in done.stdout
    assert "| 38.6 | 35.2 |" in done.stdout and "| — | 36.6 |" in done.stdout


# ---------------------------------------------------------------------------------------------
# model.weights in training, evaluation and prediction (the tiny model)
# ---------------------------------------------------------------------------------------------

def frozen_bn_tiny():
    c = tiny_config("bmask")
    c.model.backbone.norm = "FrozenBN"
    c.train.update(max_iter=1, base_lr=0.0, eval_at_end=False, checkpoint_every=1)
    return c


def served_checkpoint(server, config, name="/d2/tiny_bmask.pkl", seed=0):
    arrays = dict(random_d2_checkpoint(config, seed), **D2_PIXELS)
    server.files[name] = pickled(arrays)
    return server.url + name, arrays


def fc1_kernel(arrays):
    return arrays["roi_heads.mask_head.mask_fcn1.weight"].transpose(2, 3, 1, 0)


@pytest.mark.slow
def test_train_starts_from_weights_once_and_resume_ignores_them(server, tmp_path, caplog):
    from bmask_jax.engine.variables import restore_variables
    from bmask_jax.train import train_and_evaluate
    c = frozen_bn_tiny()
    c.model.weights, arrays = served_checkpoint(server, c)
    assert c.model.input_format == "RGB"
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir)                               # lr 0: step 1 keeps the imported values
    record = json.load(open(os.path.join(workdir, pretrained.RECORD)))
    assert record["weights"] == c.model.weights and record["kind"] == "detectron2"
    assert record["config_changes"]["model.input_format"] == "BGR"
    resumed_config = pretrained.recorded_config(c, workdir)
    assert resumed_config.model.input_format == "BGR" and tuple(resumed_config.model.pixel_std) == (1.0, 1.0, 1.0)
    restored = restore_variables(resumed_config, workdir)
    np.testing.assert_array_equal(restored["params"]["mask_head"]["mask_fcn1"]["Conv_0"]["kernel"], fc1_kernel(arrays))
    # Resuming with other (unreachable) weights: the checkpoint wins (the config its weights
    # recorded), nothing is fetched, and the log says so. train_and_evaluate resolves through this.
    c.model.weights = f"http://127.0.0.1:{closed_port()}/other.pkl"
    caplog.clear()
    config, weights = pretrained.resolve(c, workdir)
    assert weights is None and config.model.input_format == "BGR"
    assert any("holds a checkpoint (step 1)" in r.getMessage() and "is not applied" in r.getMessage()
               for r in caplog.records)
    assert len(server.requests) == 1


@pytest.mark.slow
def test_evaluate_and_predictor_apply_weights_without_training(server, tmp_path):
    from bmask_jax import Predictor
    from bmask_jax.evaluation.evaluate import evaluate
    c = frozen_bn_tiny()
    c.model.weights, arrays = served_checkpoint(server, c)
    workdir = str(tmp_path / "eval")
    config, variables = pretrained.inference_variables(c, workdir)
    assert config.model.input_format == "BGR" and c.model.input_format == "RGB"     # a copy changed
    np.testing.assert_array_equal(variables["params"]["mask_head"]["mask_fcn1"]["Conv_0"]["kernel"], fc1_kernel(arrays))
    metrics = evaluate(config, workdir, variables)
    assert "segm" in metrics or "segm/AP" in json.dumps(metrics)
    assert os.path.exists(os.path.join(workdir, pretrained.RECORD))
    # The Predictor: from a config with model.weights and no workdir (the file is cached now).
    p = Predictor(c)
    assert p.config.model.input_format == "BGR" and len(server.requests) == 1
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    out = p(image)
    assert set(out) >= {"boxes", "scores", "masks", "boundaries"}


def test_predictor_from_pretrained_zoo_name(server, monkeypatch):
    """A zoo name: the entry's config is built and its file fetched (an entry for the tiny model
    here, served by the local server; the real entries' files are checked in the tests above)."""
    from bmask_jax import Predictor
    c = frozen_bn_tiny()
    url, arrays = served_checkpoint(server, c, "/d2/zoo_tiny.pkl", seed=5)
    entry = model_zoo.ZooEntry("tiny_test", "configs/bmask_rcnn.py:tiny", url, "test", "shapes", None, None)
    monkeypatch.setitem(model_zoo.ENTRIES, "tiny_test", entry)
    p = Predictor.from_pretrained("tiny_test")
    # The zoo's config (the tiny one, with GroupNorm) takes the values the weights imply.
    assert p.config.model.weights == "tiny_test" and p.config.model.backbone.norm == "FrozenBN"
    np.testing.assert_array_equal(np.asarray(p.variables["params"]["mask_head"]["mask_fcn1"]["Conv_0"]["kernel"]),
                                  fc1_kernel(arrays))
    with pytest.raises(ValueError, match="not a model-zoo name"):
        Predictor.from_pretrained(url)
    assert Predictor.from_pretrained(url, config=c).config.model.weights == url
    assert len(server.requests) == 1                            # one download, then the cache


def test_command_line_value_that_contradicts_the_weights_is_an_error(server, tmp_path):
    c = frozen_bn_tiny()
    c.model.weights, _ = served_checkpoint(server, c)
    with pytest.raises(pretrained.WeightsConflictError,
                       match=r"--config.model.input_format='RGB' contradicts model.weights=.*needs model.input_format='BGR'"):
        pretrained.resolve(c, str(tmp_path / "w"), overrides={"model.input_format": "RGB"})
    # Agreeing values are fine.
    config, weights = pretrained.resolve(c, str(tmp_path / "w"), overrides={"model.input_format": "BGR"})
    assert weights.kind == "detectron2" and config.model.input_format == "BGR"


def run_main(*args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "bmask_jax.main", "--config", "configs/bmask_rcnn.py:tiny", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_main_evaluate_with_weights_url_and_a_contradicting_flag(server, tmp_path, cache):
    c = frozen_bn_tiny()
    url, _ = served_checkpoint(server, c)
    common = ["--config.model.backbone.norm=FrozenBN", f"--config.model.weights={url}"]
    bad = run_main("--workdir", str(tmp_path / "bad"), "--mode", "evaluate", *common,
                   "--config.model.input_format=RGB", env_extra={"BMASK_JAX_HOME": str(cache)})
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "error: --config.model.input_format='RGB' contradicts model.weights=")
    ok = run_main("--workdir", str(tmp_path / "ok"), "--mode", "evaluate", *common,
                  env_extra={"BMASK_JAX_HOME": str(cache)})
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "config values set for the weights of model.weights=" in ok.stderr
    assert "model.input_format: 'RGB' -> 'BGR'" in ok.stderr
    assert os.path.exists(tmp_path / "ok" / "metrics.json") and os.path.exists(tmp_path / "ok" / pretrained.RECORD)


def test_export_applies_weights_without_a_checkpoint(server, tmp_path):
    from bmask_jax.inference.export import WEIGHTS_FILE, export_model
    c = frozen_bn_tiny()
    c.model.weights, arrays = served_checkpoint(server, c)
    export_model(c, str(tmp_path / "exported"), workdir=str(tmp_path / "empty"))
    saved = np.load(tmp_path / "exported" / WEIGHTS_FILE)
    np.testing.assert_array_equal(saved["params/mask_head/mask_fcn1/Conv_0/kernel"], fc1_kernel(arrays))
    meta = json.load(open(tmp_path / "exported" / "serving.json"))
    assert meta["class_names"] == ["ellipse", "star", "crescent", "cross", "ring"]
