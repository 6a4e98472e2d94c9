"""Cityscapes read from the official folders: a tiny fake tree of real PNG files, checked
against values worked out by hand, evaluated by pycocotools and trained on."""
import json
import logging
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from bmask_jax.evaluation.coco_eval import coco_evaluate
from bmask_jax.data.cityscapes import CLASS_NAMES, CityscapesInstances
from bmask_jax.data.pipeline import build_dataset
from configs import cityscapes as cityscapes_config
from helpers import tiny_config, write_cityscapes_from_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

H, W = 64, 128
ROAD, SKY = 7, 23          # stuff labelIds: ignored


def _scene_aachen_0():
    ids = np.full((H, W), ROAD, np.uint16)
    ids[:10] = SKY
    ids[20:40, 10:50] = 26000       # car, its top-left 5x5 corner cut out
    ids[20:25, 10:15] = ROAD
    ids[30:60, 70:80] = 24001       # person
    ids[40:50, 100:120] = 24        # person group: a crowd region
    ids[50:56, 20:30] = 33001       # bicycle
    ids[5:15, 60:70] = 29000        # caravan: has instances, but Cityscapes does not evaluate it
    ids[62, 0:10] = 25000           # rider one pixel tall: dropped, as detectron2 does
    return ids


def _scene_aachen_1():              # no instances of the 8 classes
    ids = np.full((H, W), ROAD, np.uint16)
    ids[:10] = SKY
    ids[30:40, 30:60] = 29001
    return ids


def _scene_bremen_0():
    ids = np.full((H, W), ROAD, np.uint16)
    ids[0:20, 0:10] = 25001         # rider
    ids[10:30, 20:60] = 27000       # truck
    ids[30:60, 60:100] = 28000      # bus
    ids[0:20, 100:128] = 31000      # train
    ids[40:60, 0:16] = 32000        # motorcycle
    return ids


def _scene_frankfurt_0():
    ids = np.full((H, W), ROAD, np.uint16)
    ids[10:40, 20:70] = 26000       # car
    ids[20:60, 90:100] = 24000      # person
    return ids


def _scene_lindau_0():
    ids = np.full((H, W), SKY, np.uint16)
    ids[0:30, 0:40] = 24            # person group
    ids[30:60, 50:90] = 32000       # motorcycle
    return ids


SCENES = {
    ("train", "aachen", "aachen_000000_000019"): _scene_aachen_0,
    ("train", "aachen", "aachen_000001_000019"): _scene_aachen_1,
    ("train", "bremen", "bremen_000000_000019"): _scene_bremen_0,
    ("val", "frankfurt", "frankfurt_000000_000294"): _scene_frankfurt_0,
    ("val", "lindau", "lindau_000000_000019"): _scene_lindau_0,
}


def _gt_path(root, split, city, stem):
    return os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_instanceIds.png")


def write_tree(root) -> dict:
    """The fake Cityscapes tree under root; returns the RGB image written for each stem."""
    images = {}
    for k, ((split, city, stem), scene) in enumerate(SCENES.items()):
        for top in ("leftImg8bit", "gtFine"):
            os.makedirs(os.path.join(root, top, split, city), exist_ok=True)
        images[stem] = np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(images[stem]).save(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"))
        Image.fromarray(scene()).save(_gt_path(root, split, city, stem))     # 16-bit PNG (mode I;16)
        # files the loader must not mistake for instance annotations
        Image.fromarray(np.zeros((H, W), np.uint8)).save(
            os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"))
    return images


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "cityscapes")
    return root, write_tree(root)


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_instances_classes_boxes_masks_and_crowd(tree):
    root, images = tree
    assert Image.open(_gt_path(root, "train", "aachen", "aachen_000000_000019")).mode == "I;16"
    ds = CityscapesInstances(root, "train")
    assert len(ds) == 3 and ds.num_classes == 8 and ds.name == "cityscapes_train"
    assert ds.category_ids == [24, 25, 26, 27, 28, 31, 32, 33]
    assert ds.class_names == ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    assert [ds[i]["file_name"] for i in range(3)] == ["aachen/aachen_000000_000019_leftImg8bit.png",
                                                      "aachen/aachen_000001_000019_leftImg8bit.png",
                                                      "bremen/bremen_000000_000019_leftImg8bit.png"]
    assert [ds[i]["image_id"] for i in range(3)] == [1, 2, 3] and ds.index_of(3) == 2

    a = ds[0]
    np.testing.assert_array_equal(a["image"], images["aachen_000000_000019"])
    # ordered by pixel value: group 24, person 24001, car 26000, bicycle 33001
    assert a["classes"].dtype == np.int32 and a["classes"].tolist() == [0, 0, 2, 7]
    assert a["iscrowd"].dtype == bool and a["iscrowd"].tolist() == [True, False, False, False]
    assert a["boxes"].dtype == np.float32
    np.testing.assert_array_equal(a["boxes"], [[100, 40, 120, 50], [70, 30, 80, 60], [10, 20, 50, 40],
                                               [20, 50, 30, 56]])
    car = _rect(20, 40, 10, 50)
    car[20:25, 10:15] = 0
    assert a["masks"].dtype == np.uint8 and a["masks"].shape == (4, H, W)
    for got, want in zip(a["masks"], [_rect(40, 50, 100, 120), _rect(30, 60, 70, 80), car, _rect(50, 56, 20, 30)]):
        np.testing.assert_array_equal(got, want)
    assert a["masks"][2].sum() == 20 * 40 - 25

    empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, H, W) and len(empty["classes"]) == 0

    c = ds[2]   # rider 25001, truck 27000, bus 28000, train 31000, motorcycle 32000
    assert c["classes"].tolist() == [1, 3, 4, 5, 6] and not c["iscrowd"].any()
    np.testing.assert_array_equal(c["boxes"], [[0, 0, 10, 20], [20, 10, 60, 30], [60, 30, 100, 60],
                                               [100, 0, 128, 20], [0, 40, 16, 60]])
    np.testing.assert_array_equal(c["masks"][3], _rect(0, 20, 100, 128))

    ds[0]   # read again: the dropped rider is counted once
    assert ds.skipped == {"instance one pixel wide or tall": 1}


def test_coco_dict_scores_a_perfect_detection_ap_1(tree, caplog):
    root, _ = tree
    ds = CityscapesInstances(root, "train")
    with caplog.at_level(logging.INFO):
        gt = ds.coco_dict()
    assert "1 of 3 images have no instances" in caplog.text
    assert ds.coco_dict() is gt
    assert [im["id"] for im in gt["images"]] == [1, 2, 3]
    assert gt["images"][0] == {"id": 1, "file_name": "aachen/aachen_000000_000019_leftImg8bit.png",
                               "height": H, "width": W}
    assert [c["id"] for c in gt["categories"]] == [24, 25, 26, 27, 28, 31, 32, 33]
    anns = gt["annotations"]
    assert [a["id"] for a in anns] == list(range(1, 10))
    assert [a["category_id"] for a in anns] == [24, 24, 26, 33, 25, 27, 28, 31, 32]
    assert [a["iscrowd"] for a in anns] == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    car = anns[2]
    assert car["image_id"] == 1 and car["bbox"] == [10.0, 20.0, 40.0, 20.0] and car["area"] == 775.0
    assert mask_utils.area(car["segmentation"]) == 775
    json.dumps(gt)   # serialisable, as evaluation writes it

    results = []
    for i in range(len(ds)):
        ex = ds[i]
        for box, cls, mask, crowd in zip(ex["boxes"], ex["classes"], ex["masks"], ex["iscrowd"]):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode()
            x1, y1, x2, y2 = (float(v) for v in box)
            # a detection on the crowd region is ignored, not a false positive
            results.append({"image_id": ex["image_id"], "category_id": ds.category_ids[int(cls)],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle,
                            "score": 0.5 if crowd else 1.0})
    for kind in ("bbox", "segm"):
        assert coco_evaluate(gt, results, kind)["AP"] == pytest.approx(1.0)


def test_bad_inputs_name_the_path(tree, tmp_path):
    root, _ = tree
    with pytest.raises(FileNotFoundError, match="nope"):
        CityscapesInstances(str(tmp_path / "nope"), "train")
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train_extra"):
        CityscapesInstances(root, "train_extra")
    os.makedirs(os.path.join(root, "leftImg8bit", "train_extra", "berlin"))
    with pytest.raises(FileNotFoundError, match=r"gtFine/train_extra"):
        CityscapesInstances(root, "train_extra")
    os.makedirs(os.path.join(root, "gtFine", "train_extra", "berlin"))
    with pytest.raises(FileNotFoundError, match=r"no \*_leftImg8bit.png images .*leftImg8bit/train_extra"):
        CityscapesInstances(root, "train_extra")
    # The test split is images only: no gtFine/test needed.
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/test"):
        CityscapesInstances(root, "test")
    os.makedirs(os.path.join(root, "leftImg8bit", "test", "berlin"))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(
        os.path.join(root, "leftImg8bit", "test", "berlin", "berlin_000000_000019_leftImg8bit.png"))
    test = CityscapesInstances(root, "test")
    assert not test.labelled and test.coco_dict()["annotations"] == []
    assert test.coco_dict()["images"][0]["height"] == H and len(test[0]["classes"]) == 0

    c = tiny_config()
    c.data.dataset = "cityscapes"
    with pytest.raises(FileNotFoundError, match="data.cityscapes_root"):
        build_dataset(c.data, "train")
    c.data.dataset = "kitti"
    with pytest.raises(ValueError, match="'synthetic', 'coco' or 'cityscapes'"):
        build_dataset(c.data, "train")

    gt = _gt_path(root, "val", "lindau", "lindau_000000_000019")
    os.replace(gt, gt + ".bak")
    with pytest.raises(FileNotFoundError, match=r"lindau_000000_000019_leftImg8bit.png has no instance "
                                                r"annotation .*lindau_000000_000019_gtFine_instanceIds.png"):
        CityscapesInstances(root, "val")
    os.replace(gt + ".bak", gt)

    ds = CityscapesInstances(root, "val")
    with open(gt, "wb") as f:
        f.write(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="lindau_000000_000019_gtFine_instanceIds.png"):
        ds[1]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(gt)   # a colour PNG in its place
    with pytest.raises(ValueError, match="mode RGB.*lindau_000000_000019_gtFine_instanceIds|"
                                         "lindau_000000_000019_gtFine_instanceIds.*mode RGB"):
        ds[1]
    Image.fromarray(np.zeros((H, W // 2), np.uint16)).save(gt)
    with pytest.raises(ValueError, match=r"lindau_000000_000019_leftImg8bit.png is 64x128 but .* is 64x64"):
        ds[1]
    image = os.path.join(root, "leftImg8bit", "val", "frankfurt", "frankfurt_000000_000294_leftImg8bit.png")
    with open(image, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match="frankfurt_000000_000294_leftImg8bit.png"):
        ds[0]


@pytest.mark.slow
def test_train_evaluate_and_submit_from_the_command_line(tmp_path):
    """The round trip from `python -m bmask_jax.main` on a tree in the official layout: train
    a few steps and evaluate on val (COCO-style AP and cityscapesScripts' AP per class), then
    write the test split's submission, which has no labels and scores nothing."""
    full = cityscapes_config.get_config()
    assert full.data.dataset == "cityscapes" and full.data.cityscapes_root == "datasets/cityscapes"
    root = str(tmp_path / "cityscapes")
    write_cityscapes_from_shapes(root)
    workdir = tmp_path / "run"
    cli = [sys.executable, "-m", "bmask_jax.main", "--config", "configs/bmask_rcnn.py:tiny", "--workdir", str(workdir),
           "--config.data.dataset=cityscapes", f"--config.data.cityscapes_root={root}",
           "--config.model.num_classes=8", "--config.data.train_short_side=(64,)", "--config.data.max_size=128",
           "--config.data.canvas_buckets=((64,128),)", "--config.train.max_iter=2",
           "--config.model.roi_heads.score_threshold=0.0"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.load(open(workdir / "metrics.json"))
    assert metrics["num_images"] == 2 and all("AP" in metrics[k] for k in ("bbox", "segm", "boundary"))
    summary = json.load(open(workdir / "train_summary.json"))
    assert summary["end_step"] == 2 and summary["canvases"] == [[64, 128]]
    official = metrics["cityscapes"]
    assert set(official["per_class"]) == set(CLASS_NAMES) and 0.0 <= official["AP"] <= 1.0
    assert official["num_masks"] > 0
    # The printed table: one row a class, Table 9's columns.
    assert "Cityscapes instance-level evaluation" in run.stdout
    for name in CLASS_NAMES + ("average",):
        assert re.search(rf"^{name} +(-|[0-9.]+) +(-|[0-9.]+)$", run.stdout, re.M), name
    pred_files = sorted(os.listdir(workdir / "cityscapes_val_results"))
    assert pred_files == ["frankfurt_000000_000019_pred.txt", "lindau_000001_000019_pred.txt", "masks"]

    test = subprocess.run(cli + ["--mode=evaluate", "--config.data.eval_split=test"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "2 images without labels" in test.stdout and "cityscapes_test_results.zip" in test.stdout
    names = zipfile.ZipFile(workdir / "cityscapes_test_results.zip").namelist()
    assert {"berlin_000000_000019_pred.txt", "berlin_000001_000019_pred.txt"} <= set(names)
    assert any(n.startswith("masks/berlin_000000_000019_") for n in names)
    unscored = json.load(open(workdir / "metrics_test.json"))
    assert "segm" not in unscored and "AP" not in unscored["cityscapes"] and unscored["num_images"] == 2
    assert json.load(open(workdir / "metrics.json")) == metrics        # the val metrics stay
    assert os.listdir(workdir / "cityscapes_val_results")               # and so do its result files
