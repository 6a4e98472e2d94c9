"""Nothing lost, nothing misleading: damaged checkpoints, full disks, hostile images, clashing
picture names, bad images in a list, wrong class counts, all-skipped training. Each case is
reproduced first, then the behaviour is checked: one line that names the culprit, and the
newest good state used."""
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
from helpers import tiny_config
from PIL import Image

from bmask_jax.engine import checkpoints
from bmask_jax.data.images import load_rgb
from bmask_jax.inference.predict import output_names
from bmask_jax.engine.variables import restore_variables
from bmask_jax.train import ClassCountError, NonFiniteLossError, cut_logs_to, json_safe, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**train):
    c = tiny_config()
    c.train.update(**{**dict(max_iter=4, checkpoint_every=2, eval_at_end=False), **train})
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train_and_evaluate(small_config(), workdir)
    assert checkpoints.step_folders(checkpoints.directory(workdir)) == [4, 2]
    return workdir


def copy_of(trained, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


def biggest_file(step_dir: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    return max(files, key=os.path.getsize)


def kernel(variables):
    return np.asarray(variables["params"]["mask_head"]["mask_fcn1"]["Conv_0"]["kernel"])


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "deleted", "metadata", "empty_newer"])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact(trained, tmp_path, caplog, damage):
    workdir = copy_of(trained, tmp_path)
    folder = checkpoints.directory(workdir)
    step4 = kernel(restore_variables(small_config(), trained))
    shutil.move(os.path.join(folder, "4"), tmp_path / "4")
    step2 = kernel(restore_variables(small_config(), workdir))
    assert not np.array_equal(step2, step4)
    shutil.move(tmp_path / "4", os.path.join(folder, "4"))
    newest = os.path.join(folder, "4")
    if damage == "truncated":
        with open(biggest_file(newest), "r+b") as f:
            f.truncate(10)
    elif damage == "deleted":
        os.remove(biggest_file(newest))
    elif damage == "metadata":
        os.remove(os.path.join(newest, "default", "_METADATA"))
    else:                                    # an empty folder left behind, newer than the intact ones
        newest = os.path.join(folder, "6")
        os.makedirs(newest)
    caplog.clear()
    variables = restore_variables(small_config(), workdir)
    lines = [r.getMessage() for r in caplog.records if r.name != "absl" or "checkpoints.py" in r.pathname]
    said = [m for m in lines if m.startswith(f"checkpoint {newest} is damaged")]
    assert len(said) == 1 and "\n" not in said[0] and "left in place" in said[0], lines
    if damage == "empty_newer":
        assert "(empty folder)" in said[0] and any("using step 4" in m for m in lines)
        np.testing.assert_array_equal(kernel(variables), step4)
    else:
        assert any("using step 2" in m for m in lines)
        np.testing.assert_array_equal(kernel(variables), step2)
    assert os.path.isdir(newest)                              # never deleted


@pytest.mark.slow
def test_resume_moves_a_damaged_step_aside_and_no_intact_step_is_one_line(trained, tmp_path, caplog):
    workdir = copy_of(trained, tmp_path)
    folder = checkpoints.directory(workdir)
    with open(biggest_file(os.path.join(folder, "4")), "r+b") as f:
        f.truncate(10)
    c = small_config(max_iter=6)
    train_and_evaluate(c, workdir)             # resumes from 2, saves 4 and 6 again
    assert sorted(os.listdir(folder)) == ["2", "4", "4.damaged", "6"]
    summary = json.load(open(os.path.join(workdir, "train_summary.json")))
    assert summary["start_step"] == 2 and summary["end_step"] == 6
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "image_order.jsonl"))]
    assert steps == sorted(set(steps)) == list(range(1, 7))          # each step once
    # Nothing intact at all: one line naming every damaged step.
    for step in checkpoints.step_folders(folder):
        os.remove(os.path.join(folder, str(step), "default", "_METADATA"))
    with pytest.raises(checkpoints.CheckpointError) as e:
        restore_variables(c, workdir)
    assert str(e.value).startswith(f"no intact checkpoint under {folder}: ") and "\n" not in str(e.value)
    assert "default/_METADATA is missing" in str(e.value)


def test_logs_are_cut_back_to_the_resumed_step(tmp_path):
    for name in ("metrics.jsonl", "image_order.jsonl"):
        with open(tmp_path / name, "w") as f:
            for step in (1, 2, 3, 4):
                f.write(json.dumps({"step": step}) + "\n")
            f.write('{"step": 5, "trunc')                    # a line cut short by a crash
    cut_logs_to(str(tmp_path), 2)
    for name in ("metrics.jsonl", "image_order.jsonl"):
        assert [json.loads(x)["step"] for x in open(tmp_path / name)] == [1, 2]


def _mount_tmpfs(path, options) -> bool:
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          check=False)
    return done.returncode == 0


def _train_cli(workdir, max_iter):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "bmask_jax.main", "--config", "configs/bmask_rcnn.py:tiny",
                           "--workdir", str(workdir), f"--config.train.max_iter={max_iter}",
                           "--config.train.checkpoint_every=2", "--config.train.eval_at_end=False"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["bytes", "inodes"])
def test_full_disk_stops_training_with_one_line_and_resume_cleans_up(tmp_path, limit):
    """On a small tmpfs: 10 MiB holds one tiny checkpoint (7 MiB), not two; 52 inodes hold one,
    not two (a tiny checkpoint is 23 to 32 files and folders, as many data files as orbax's
    writer threads made, and the workdir's logs take about 10: at 45 a first save once failed). Either way the second save is refused before writing: orbax, left to fail on
    inodes mid-write, hung 5 minutes before its error. Resuming after a save that did fail
    half-written (its temporary folder left behind, as a kill -9 mid-save leaves it) removes it."""
    mount = tmp_path / "disk"
    if not _mount_tmpfs(mount, "size=10m" if limit == "bytes" else "size=50m,nr_inodes=52"):
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk case is not reproduced")
    try:
        workdir = mount / "run"
        first = _train_cli(workdir, 8)
        assert first.returncode != 0
        err = [line for line in first.stderr.splitlines() if line.strip() and not line.startswith("train:")]
        assert len(err) == 1, first.stderr[-3000:]                      # no traceback storm
        assert err[0].startswith("error: saving") and "no space left on device" in err[0]
        assert str(workdir / "checkpoints") in err[0] and ("inodes" in err[0]) == (limit == "inodes")
        assert checkpoints.step_folders(str(workdir / "checkpoints")) == [2]
        assert not [n for n in os.listdir(workdir / "checkpoints") if checkpoints.TMP_MARKER in n]
        # Space comes back; the next start removes a half-written save and cuts the logs.
        subprocess.run(["mount", "-o", "remount,size=200m,nr_inodes=10000", str(mount)], check=True)
        partial = f"4{checkpoints.TMP_MARKER}-1764779000"
        shutil.copytree(workdir / "checkpoints" / "2", workdir / "checkpoints" / partial)
        second = _train_cli(workdir, 6)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"removed 1 partial checkpoint folder(s) of an interrupted save: {partial}" in second.stderr
        assert not any(checkpoints.TMP_MARKER in n for n in os.listdir(workdir / "checkpoints"))
        for name in ("metrics.jsonl", "image_order.jsonl"):
            steps = [json.loads(x)["step"] for x in open(workdir / name)]
            assert len(steps) == len(set(steps)) and max(steps) == 6, (name, steps)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def png_declaring(path, width, height):
    """A valid PNG of one grey colour, of any declared size, in a few KB: the rows compress to
    nothing (the shape of a decompression bomb)."""
    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * width
    data = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()

    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                                              + bytes([8, 0, 0, 0, 0])) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_bombs_and_oversized_images_are_refused_before_decoding(tmp_path):
    bomb, big = tmp_path / "bomb.png", tmp_path / "big.png"
    png_declaring(bomb, 30000, 30000)               # beyond Pillow's own bomb limit
    png_declaring(big, 12000, 12000)                # under it: Pillow would decode 432 MB
    assert os.path.getsize(big) < 300_000
    with pytest.raises(ValueError, match=f"cannot read image {bomb}: .*decompression bomb"):
        load_rgb(str(bomb))
    with pytest.raises(ValueError) as e:
        load_rgb(str(big), max_pixels=50_000_000)
    assert str(e.value) == f"cannot read image {big}: 12000x12000 is 144 MP, more than predict.max_image_pixels=50000000"


def test_picture_names_never_overwrite():
    names = [files[0] for files in output_names(["d/same.jpg", "d/same.png", "a/x.jpg", "b/x.jpg", "d/one.png"])]
    assert names == ["same.jpg.png", "same.png.png", "x.jpg.2.png", "x.jpg.3.png", "one.png"]
    assert len({files[0] for files in output_names(["d/a.jpg", "d/a.png", "d/a.jpg.png"])}) == 3


@pytest.mark.slow
def test_predict_lists_bombs_and_keeps_every_picture(trained, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    png_declaring(folder / "bomb.png", 30000, 30000)
    png_declaring(folder / "big.png", 12000, 12000)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "same.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "same.png")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "bmask_jax.main", "--config", "configs/bmask_rcnn.py:tiny",
                           "--workdir", trained, "--mode", "predict", f"--config.predict.inputs={folder}",
                           f"--config.predict.output_dir={tmp_path / 'out'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    out = sorted(os.listdir(tmp_path / "out"))
    assert out == ["failed_images.json", "predictions.json", "same.jpg.png", "same.png.png"]
    failed = json.load(open(tmp_path / "out" / "failed_images.json"))
    assert sorted(os.path.basename(f["file"]) for f in failed) == ["big.png", "bomb.png"]
    assert "could not read 2 image(s)" in done.stderr


@pytest.mark.slow
def test_predictor_and_exported_model_name_the_bad_image_of_a_list(trained, tmp_path):
    from bmask_jax import Predictor
    from bmask_jax.inference.export import export_model
    from bmask_jax.inference.serving import ExportedModel
    good = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    empty = np.zeros((0, 0, 3), np.uint8)
    export_model(small_config(), str(tmp_path / "exported"), workdir=trained)
    for model in (Predictor(small_config(), trained), ExportedModel(str(tmp_path / "exported"))):
        with pytest.raises(ValueError, match=r"^image 1: empty image, shape \(0, 0, 3\)$"):
            model([good, empty, good])
        with pytest.raises(ValueError, match=r"^image 2: expected uint8 pixel values"):
            model([good, good, np.full((8, 8, 3), 300.0)])
        assert len(model([good, good])) == 2


# ---------------------------------------------------------------------------------------------
# class counts, non-finite steps, metrics as strict JSON
# ---------------------------------------------------------------------------------------------

def test_class_count_is_checked_before_anything_is_built(tmp_path):
    c = small_config()
    c.model.num_classes = 3
    with pytest.raises(ClassCountError, match=r"^model.num_classes=3 but the training data \(data.dataset='synthetic'\) "
                                              r"has 5 classes: set --config.model.num_classes=5$"):
        train_and_evaluate(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_a_run_whose_every_step_was_skipped_fails(tmp_path):
    c = small_config(skip_nonfinite=True, max_iter=3, log_every=1)
    c.model.rpn.loss_weight = float("nan")           # every loss is NaN: every step is skipped
    with pytest.raises(NonFiniteLossError, match="all 3 steps were skipped as non-finite"):
        train_and_evaluate(c, str(tmp_path / "run"))
    for line in open(tmp_path / "run" / "metrics.jsonl"):
        record = json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))
        assert record["total_loss"] == "nan"


def test_json_safe_writes_non_finite_values_as_strings():
    assert json.dumps(json_safe({"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 1.5, "e": 3})) == \
        '{"a": "nan", "b": "inf", "c": "-inf", "d": 1.5, "e": 3}'


def test_missing_coco_images_folder_is_one_line_before_the_model(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "bmask_jax.main", "--config", "configs/bmask_rcnn.py:tiny",
                           "--workdir", str(tmp_path / "run"), "--config.data.dataset=coco",
                           f"--config.data.coco_train_json={ann}", f"--config.data.coco_images={tmp_path / 'nope'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: data.coco_images='{tmp_path / 'nope'}': no such folder (the images of {ann})"
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# places that cannot be written
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_read_only_workdir_is_said_before_the_model_runs(trained, tmp_path, monkeypatch):
    from bmask_jax import main
    from bmask_jax.weights import pretrained
    mount = tmp_path / "ro"
    if not _mount_tmpfs(mount, "size=50m"):
        pytest.skip("cannot mount a tmpfs here (needs root): the read-only case is not reproduced")
    try:
        shutil.copytree(trained, mount / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        monkeypatch.setattr(pretrained, "inference_variables", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(OSError) as e:
            main.run_mode("evaluate", small_config(), str(mount / "run"), {})
        assert str(e.value).endswith(f"--workdir={mount / 'run'} cannot be written to: Read-only file system")
        c = small_config()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photo.png")
        c.predict.update(inputs=str(tmp_path / "photo.png"), output_dir=str(mount / "out"))
        with pytest.raises(OSError, match=f"predict.output_dir={mount / 'out'} cannot be written to"):
            main.run_mode("predict", c, str(mount / "run"), {})
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_an_evaluation_whose_pictures_cannot_be_written_still_reports_and_saves(trained, tmp_path, capsys):
    from bmask_jax.evaluation.evaluate import evaluate
    workdir = copy_of(trained, tmp_path)
    pictures = os.path.join(workdir, "pictures")
    shutil.rmtree(pictures, ignore_errors=True)
    if not _mount_tmpfs(pictures, "size=1m,ro"):
        pytest.skip("cannot mount a tmpfs here (needs root): the unwritable-pictures case is not reproduced")
    try:
        c = small_config()
        with pytest.raises(OSError) as e:
            evaluate(c, workdir, restore_variables(c, workdir))
        message = str(e.value)
        assert "the evaluation ran and its metrics are printed above" in message
        assert f"{pictures}: Read-only file system" in message and "metrics.json" not in message
        printed = capsys.readouterr().out
        assert "segm" in printed and "AP" in printed
        saved = json.load(open(os.path.join(workdir, "metrics.json")))
        assert saved["num_images"] > 0 and "segm" in saved
    finally:
        subprocess.run(["umount", pictures], check=False)
