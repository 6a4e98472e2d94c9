"""COCO-format input: real files on disk, odd images and bad annotations."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bmask_jax.data.coco import CocoJsonDataset
from bmask_jax.data.images import load_rgb
from bmask_jax.data.synthetic import SyntheticShapes
from bmask_jax.train import train_and_evaluate
from helpers import tiny_config


@pytest.mark.slow
def test_coco_json_dataset_trains_and_evaluates_from_files(tmp_path):
    train_json = SyntheticShapes("train", num_images=8, image_size=(64, 64), max_instances=3).export_coco(str(tmp_path / "train"))
    val_json = SyntheticShapes("val", num_images=4, image_size=(64, 64), max_instances=3).export_coco(str(tmp_path / "val"))
    train_gt = json.load(open(train_json))           # one unusable annotation, to be counted
    train_gt["annotations"].append(dict(train_gt["annotations"][0], id=10**6, category_id=999))
    json.dump(train_gt, open(train_json, "w"))
    ds = CocoJsonDataset(train_json, str(tmp_path / "train" / "images"))
    ref = SyntheticShapes("train", num_images=8, image_size=(64, 64), max_instances=3)
    np.testing.assert_array_equal(ds[3]["image"], ref[3]["image"])
    np.testing.assert_array_equal(ds[3]["masks"], ref[3]["masks"])
    np.testing.assert_allclose(ds[3]["boxes"], ref[3]["boxes"])
    c = tiny_config("maskrcnn")
    c.data.update(dataset="coco", coco_train_json=train_json, coco_eval_json=val_json,
                  coco_images=str(tmp_path / "train" / "images"))
    c.train.update(max_iter=2, checkpoint_every=100)
    # val images live in their own folder: evaluate reads data.coco_images for both splits,
    # so point it at a folder holding both.
    for name in os.listdir(tmp_path / "val" / "images"):
        os.replace(tmp_path / "val" / "images" / name, tmp_path / "train" / "images" / f"val_{name}")
    gt = json.load(open(val_json))
    for im in gt["images"]:
        im["file_name"] = f"val_{im['file_name']}"
    json.dump(gt, open(val_json, "w"))
    metrics = train_and_evaluate(c, str(tmp_path / "run"))
    assert metrics["num_images"] == 4 and "AP" in metrics["segm"]
    summary = json.load(open(tmp_path / "run" / "train_summary.json"))
    assert summary["skipped_annotations"] == {"unknown category_id": 1}


def _write(path, array, **kw):
    Image.fromarray(array).save(path, **kw)
    return str(path)


def test_load_rgb_converts_grayscale_rgba_16bit_and_exif(tmp_path):
    gray = _write(tmp_path / "g.png", np.full((4, 6), 100, np.uint8))
    assert load_rgb(gray).shape == (4, 6, 3) and (load_rgb(gray) == 100).all()
    rgba = _write(tmp_path / "a.png", np.full((4, 6, 4), 50, np.uint8))
    assert load_rgb(rgba).shape == (4, 6, 3)
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((4, 6), 65535, np.uint16)).save(deep)
    assert load_rgb(str(deep)).shape == (4, 6, 3) and load_rgb(str(deep)).max() == 255
    # EXIF orientation 6 (rotate 90 clockwise to display): a 4x6 file displays as 6x4.
    im = Image.fromarray(np.zeros((4, 6, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "e.jpg", exif=exif)
    assert load_rgb(str(tmp_path / "e.jpg")).shape == (6, 4, 3)


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_rgb(str(tmp_path / "bad.jpg"))
    with pytest.raises(ValueError, match="missing.png"):
        load_rgb(str(tmp_path / "missing.png"))


def test_bad_annotations_are_skipped_and_counted(tmp_path):
    _write(tmp_path / "a.png", np.zeros((20, 30, 3), np.uint8))
    mask = np.zeros((20, 30), np.uint8, order="F")
    mask[2:8, 3:9] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode()
    uncompressed = {"size": [20, 30], "counts": [int(x) for x in _uncompressed_counts(mask)]}
    poly = [[3, 2, 9, 2, 9, 8, 3, 8]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [3, 2, 6, 6], "segmentation": poly},
        {"id": 2, "image_id": 1, "category_id": 42, "bbox": [3, 2, 6, 6], "segmentation": rle},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [3, 2, 6, 6], "segmentation": uncompressed},
        {"id": 4, "image_id": 99, "category_id": 7, "bbox": [3, 2, 6, 6], "segmentation": poly},
        {"id": 5, "image_id": 1, "category_id": 5, "bbox": [3, 2, 6, 6], "segmentation": poly},
        {"id": 6, "image_id": 1, "category_id": 7, "bbox": [3, 2, 0, 6], "segmentation": poly},
        {"id": 7, "image_id": 1, "category_id": 7, "bbox": [3, 2, 6, 6], "segmentation": [[1, 1, 2, 2]]},
        {"id": 8, "image_id": 1, "category_id": 42, "bbox": [3, 2, 6, 6], "segmentation": poly, "iscrowd": 1},
        {"id": 9, "image_id": 1, "category_id": 7, "bbox": [3, 2, 6, 6], "segmentation": [[40, 1, 50, 1, 50, 9]]},
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [3, 2, 6, 6]},
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [3, 2, 6, 6], "segmentation": poly + [[1, 1, 2, 2]]},
        {"id": 12, "image_id": 2, "category_id": 7, "bbox": [3, 2, 6, 6], "segmentation": poly, "iscrowd": 1},
    ]
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
                     {"id": 2, "file_name": "a.png", "height": 20, "width": 30},      # crowd only
                     {"id": 3, "file_name": "a.png", "height": 20, "width": 30}],     # no annotations
          "annotations": anns,
          "categories": [{"id": 7, "name": "seven"}, {"id": 42, "name": "forty-two"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(gt))
    ds = CocoJsonDataset(str(path), str(tmp_path))
    assert ds.category_ids == [7, 42] and ds.class_names == ("seven", "forty-two")   # non-contiguous ids
    # Counted once, at load time, by reason.
    assert ds.skipped == {"unknown image_id": 1, "unknown category_id": 1, "box of zero or negative size": 1,
                          "polygon with fewer than 3 points": 1, "polygon outside the image": 1,
                          "missing segmentation": 1, "polygon part with fewer than 3 points (rest kept)": 1}
    assert ds.num_without_instances == 2
    ex = ds[0]
    # polygon, RLE, uncompressed RLE, crowd, and the multi-polygon without its 2-point part
    assert ex["classes"].tolist() == [0, 1, 0, 1, 0]
    assert ex["iscrowd"].tolist() == [False, False, False, True, False]
    for m in ex["masks"][[0, 1, 2, 4]]:
        np.testing.assert_array_equal(m, mask)
    for _ in range(2):                                       # reading again counts nothing more
        ds[0], ds[1], ds[2]
    assert sum(ds.skipped.values()) == 7
    assert len(ds[1]["classes"]) == 1 and ds[1]["iscrowd"].all() and len(ds[2]["classes"]) == 0
    # The ground truth holds only what is trained on, so pycocotools can evaluate it.
    assert sorted(a["id"] for a in ds.coco_dict()["annotations"]) == [1, 2, 3, 8, 11, 12]
    coco_gt = COCO()
    coco_gt.dataset = ds.coco_dict()
    coco_gt.createIndex()
    dets = coco_gt.loadRes([{"image_id": 1, "category_id": 7, "segmentation": rle, "score": 0.9}])
    e = COCOeval(coco_gt, dets, "segm")
    e.evaluate(); e.accumulate()


def _uncompressed_counts(mask):
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_missing_or_malformed_annotation_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoJsonDataset(str(tmp_path / "nope.json"), str(tmp_path))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        CocoJsonDataset(str(tmp_path / "broken.json"), str(tmp_path))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="images"):
        CocoJsonDataset(str(tmp_path / "other.json"), str(tmp_path))


def test_rle_of_the_wrong_size_is_named(tmp_path):
    _write(tmp_path / "a.png", np.zeros((20, 30, 3), np.uint8))
    rle = mask_utils.encode(np.ones((10, 10), np.uint8, order="F"))
    rle["counts"] = rle["counts"].decode()
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
          "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "segmentation": rle}],
          "categories": [{"id": 1, "name": "one"}]}
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    ds = CocoJsonDataset(str(tmp_path / "ann.json"), str(tmp_path))
    with pytest.raises(ValueError, match="annotation id 5 .*ann.json: RLE of size \\[10, 10\\]"):
        ds[0]


@pytest.mark.slow
def test_evaluate_counts_annotation_id_zero(tmp_path, monkeypatch):
    # A COCO-format ground truth numbered from 0, as some annotation tools write it, through
    # the evaluate path (dataset files -> detections -> COCO metrics), with the detections
    # replaced by the ground truth itself: every metric must be a perfect 1.0. Before the
    # ids were renumbered, the instance with id 0 counted as a miss and its detection as a
    # false positive.
    import jax
    from bmask_jax.evaluation import evaluate as evaluate_lib
    from bmask_jax.models.bmask_rcnn import BMaskRCNN
    from bmask_jax.engine.variables import init_variables

    val_json = SyntheticShapes("val", num_images=3, image_size=(64, 64), max_instances=3).export_coco(
        str(tmp_path / "val"))
    gt = json.load(open(val_json))
    for k, a in enumerate(gt["annotations"]):
        a["id"] = k                                   # 0, 1, 2, ...
    json.dump(gt, open(val_json, "w"))
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)

    def perfect(image_id, inst, category_ids):
        return [{"image_id": image_id, "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                 "segmentation": a["segmentation"]} for a in by_image.get(image_id, [])]

    monkeypatch.setattr(evaluate_lib, "to_coco_results", perfect)
    c = tiny_config("maskrcnn")
    c.data.update(dataset="coco", coco_train_json=val_json, coco_eval_json=val_json,
                  coco_images=str(tmp_path / "val" / "images"))
    c.eval.num_pictures = 0
    variables = init_variables(c, BMaskRCNN(c.model), jax.random.PRNGKey(0))
    metrics = evaluate_lib.evaluate(c, str(tmp_path / "run"), variables)
    assert min(a["id"] for a in gt["annotations"]) == 0 and metrics["num_detections"] == len(gt["annotations"])
    for kind in ("bbox", "segm", "boundary"):
        assert metrics[kind]["AP"] == pytest.approx(1.0), kind
    assert json.load(open(tmp_path / "run" / "metrics.json"))["segm"]["AP"] == pytest.approx(1.0)
