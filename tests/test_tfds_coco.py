"""COCO-format files prepared as a TFDS dataset (array_record, no TensorFlow) serve exactly what
CocoJsonDataset serves for the same files, and train and evaluate through the real entry point."""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from bmask_jax.evaluation.coco_eval import _prepare_gt, coco_evaluate
from bmask_jax.data.coco import CocoJsonDataset
from bmask_jax.data.pipeline import TrainBatches, build_dataset
from bmask_jax.data.tfds_coco import TfdsCocoDataset
from bmask_jax.data.tfds_coco import main as prepare_cli
from bmask_jax.train import train_and_evaluate
from helpers import tiny_config

CATEGORIES = [{"id": 17, "name": "dog", "supercategory": "animal"},   # non-contiguous ids, not in id order
              {"id": 3, "name": "cat", "supercategory": "animal"},
              {"id": 90, "name": "zebra", "supercategory": "animal"}, {"id": 42, "name": "bird"},
              {"id": 44, "name": "fish"}]       # five classes as in the tiny config: compiles are shared


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": r["counts"].decode()}


def _uncompressed(mask):
    flat, counts, current, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return {"size": list(mask.shape), "counts": counts + [run]}


def _box_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _write_split(root, images, annotations):
    """images: [(info, array, save kwargs)] written under root/images; returns (image dir, json)."""
    for info, array, kw in images:
        path = root / "images" / info["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, **kw)
    gt = {"info": {"description": "tiny", "year": 2024}, "licenses": [{"id": 1, "name": "CC"}],
          "images": [info for info, _, _ in images], "annotations": annotations, "categories": CATEGORIES}
    (root / "ann.json").write_text(json.dumps(gt))
    return str(root / "images"), str(root / "ann.json")


def _write_dataset(tmp):
    rng = np.random.default_rng(0)
    noise = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
    exif_im = Image.new("RGB", (44, 32))                 # stored 32x44, displayed 44x32 (EXIF 6)
    exif = exif_im.getexif()
    exif[0x0112] = 6
    train = [
        ({"id": 5, "file_name": "a.png", "height": 40, "width": 50, "license": 1, "coco_url": "http://x/a"},
         noise(40, 50, 3), {}),
        ({"id": 2, "file_name": "sub/b.jpg", "height": 36, "width": 48}, noise(36, 48, 3), {"quality": 90}),
        ({"id": 9, "file_name": "c.png", "height": 30, "width": 40}, noise(30, 40), {}),          # grayscale
        ({"id": 7, "file_name": "e.jpg", "height": 44, "width": 32}, noise(32, 44, 3), {"exif": exif}),
        ({"id": 11, "file_name": "d.png", "height": 24, "width": 24}, noise(24, 24, 4), {}),  # RGBA, no objects
    ]
    b_mask = _box_mask(36, 48, 4, 6, 20, 30)
    crowd = _box_mask(36, 48, 22, 3, 45, 33)
    anns = [
        {"id": 1, "image_id": 5, "category_id": 3, "bbox": [5, 5, 15, 13], "area": 195.0, "iscrowd": 0,
         "segmentation": [[5, 5, 20, 5, 20, 18, 5, 18]], "ignore": 0, "attributes": {"occluded": True}},
        {"id": 2, "image_id": 5, "category_id": 17, "bbox": [25.5, 2.25, 22.75, 28.1], "area": 200.5, "iscrowd": 0,
         "segmentation": [[25, 10, 40, 10, 32, 30], [42, 2, 48, 2, 48, 8]]},
        {"id": 3, "image_id": 2, "category_id": 90, "bbox": [4, 6, 16, 24], "area": 384, "iscrowd": 0,
         "segmentation": _rle(b_mask)},                                       # compressed RLE
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [22, 3, 23, 30], "area": 690, "iscrowd": 1,
         "segmentation": _uncompressed(crowd)},                               # crowd, uncompressed RLE
        {"image_id": 2, "category_id": 17, "bbox": [30, 20, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": [[30, 20, 40, 20, 40, 30]]},                         # no id
        {"id": 6, "image_id": 9, "category_id": 17, "bbox": [3, 4, 20, 15], "iscrowd": 0,
         "segmentation": [[3, 4, 23, 4, 23, 19, 3, 19]]},                     # no area
        {"id": 7, "image_id": 7, "category_id": 3, "bbox": [2, 30, 18, 12], "area": 216.0, "iscrowd": 0,
         "segmentation": [[2, 30, 20, 30, 20, 42, 2, 42]]},                   # on the EXIF-rotated image
        {"id": 8, "image_id": 999, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25.0,
         "segmentation": [[1, 1, 6, 1, 6, 6]]},                               # unknown image
        {"id": 9, "image_id": 5, "category_id": 4, "bbox": [1, 1, 5, 5], "area": 25.0,
         "segmentation": [[1, 1, 6, 1, 6, 6]]},                               # unknown category
        {"id": 10, "image_id": 5, "category_id": 3, "bbox": [1, 1, 0, 5], "area": 0.0,
         "segmentation": [[1, 1, 6, 1, 6, 6]]},                               # empty box
        {"id": 11, "image_id": 5, "category_id": 3, "bbox": [1, 1, 2, 2], "area": 4.0, "iscrowd": 0,
         "segmentation": [[1, 1, 3, 3]]},                                     # polygon of 2 points only
        {"id": 12, "image_id": 9, "category_id": 90, "bbox": [2, 2, 10, 8], "area": 80.0, "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10], [1, 1, 2, 2]]},       # one good polygon, one bad
        {"id": 13, "image_id": 9, "category_id": 90, "bbox": [2, 2, 10, 8], "area": 80.0, "iscrowd": 0},
    ]
    v1 = _box_mask(40, 40, 5, 5, 25, 30)
    val = [({"id": 1, "file_name": "v1.png", "height": 40, "width": 40}, noise(40, 40, 3), {}),
           ({"id": 3, "file_name": "v2.jpg", "height": 48, "width": 40}, noise(48, 40, 3), {})]
    val_anns = [
        {"id": 1, "image_id": 1, "category_id": 17, "bbox": [5, 5, 20, 25], "area": 500.0, "iscrowd": 0,
         "segmentation": _rle(v1)},
        {"id": 2, "image_id": 1, "category_id": 90, "bbox": [26, 8, 12, 20], "area": 120.0, "iscrowd": 0,
         "segmentation": [[26, 8, 38, 8, 32, 28]]},
        {"id": 3, "image_id": 3, "category_id": 3, "bbox": [4, 10, 30, 30], "area": 900.0, "iscrowd": 0,
         "segmentation": [[4, 10, 34, 10, 34, 40, 4, 40]]},
        {"id": 4, "image_id": 3, "category_id": 17, "bbox": [0, 0, 40, 8], "area": 320.0, "iscrowd": 1,
         "segmentation": _uncompressed(_box_mask(48, 40, 0, 0, 40, 8))},
    ]
    return {"train": _write_split(tmp / "train", train, anns), "val": _write_split(tmp / "val", val, val_anns)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    assert importlib.util.find_spec("tensorflow") is None, "TensorFlow must not be installed"
    tmp = tmp_path_factory.mktemp("tfds_coco")
    splits = _write_dataset(tmp)
    data_dir = str(tmp / "tfds")
    argv = ["--data_dir", data_dir, "--name", "tiny"]
    for split, (images, js) in splits.items():
        argv += [f"--images_{split}", images, f"--json_{split}", js]
    assert prepare_cli(argv) == 0
    assert "tensorflow" not in sys.modules
    return splits, data_dir


def _normalized(gt: dict) -> dict:
    """The ground truth as COCOeval sees it, masks as compressed RLE, annotations by id."""
    coco = _coco(copy.deepcopy(gt))
    gt = coco.dataset
    for a in gt["annotations"]:
        if "segmentation" in a and not any(len(p) < 6 for p in a["segmentation"] if isinstance(p, list)):
            rle = coco.annToRLE(a)     # (pycocotools fails on polygons of < 3 points: compared as given)
            a["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode()
                                 if isinstance(rle["counts"], bytes) else rle["counts"]}
    for a in gt["annotations"]:     # _prepare_gt numbers annotations in the order served: compare the source ids
        a["id"] = a.pop("source_id")
    gt["annotations"].sort(key=lambda a: a["id"])
    gt["images"].sort(key=lambda im: im["id"])
    return gt


@pytest.mark.parametrize("split", ["train", "val"])
def test_tfds_dataset_serves_what_coco_json_serves(prepared, split):
    splits, data_dir = prepared
    ref = CocoJsonDataset(splits[split][1], splits[split][0])
    ds = TfdsCocoDataset(data_dir, "tiny", split)
    assert len(ds) == len(ref) and ds.num_classes == ref.num_classes == 5
    assert ds.category_ids == ref.category_ids == [3, 17, 42, 44, 90]
    assert ds.class_names == ref.class_names == ("cat", "dog", "bird", "fish", "zebra")
    for i in range(len(ref)):
        a, b = ref[i], ds[i]
        assert a.keys() == b.keys()
        assert (a["image_id"], a["file_name"]) == (b["image_id"], b["file_name"])
        assert ds.index_of(a["image_id"]) == ref.index_of(a["image_id"]) == i
        for k in ("image", "boxes", "classes", "masks", "iscrowd"):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (i, k)
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"image {i} {k}")
    # CocoJsonDataset counts unusable polygons / missing masks as it serves them (once per pass);
    # the TFDS dataset counted them all at build time.
    assert ds.skipped == ref.skipped
    assert _normalized(ds.coco_dict()) == _normalized(ref.coco_dict())
    if split == "train":
        assert ref.skipped == {"unknown image_id": 1, "unknown category_id": 1, "box of zero or negative size": 1,
                               "polygon with fewer than 3 points": 1, "missing segmentation": 1,
                               "polygon part with fewer than 3 points (rest kept)": 1}
        assert [len(ds[i]["classes"]) for i in range(len(ds))] == [3, 2, 1, 2, 0]   # ids 2, 5, 7, 9, 11
        assert ds[0]["iscrowd"].tolist() == [False, True, False]


def test_original_image_bytes_are_stored_and_plain_tfds_reads_them(prepared):
    import tensorflow_datasets as tfds
    splits, data_dir = prepared
    src = tfds.data_source("coco_instances/tiny", data_dir=data_dir, split="train",
                           decoders={"image": tfds.decode.SkipDecoding()})
    names = [src[i]["file_name"].decode() for i in range(len(src))]
    assert names == ["sub/b.jpg", "a.png", "e.jpg", "c.png", "d.png"]        # image-id order
    for i, name in enumerate(names):
        with open(os.path.join(splits["train"][0], name), "rb") as f:
            assert src[i]["image"] == f.read()                                # no re-encoding
    assert "tensorflow" not in sys.modules


def test_eval_metrics_slices_and_errors(prepared):
    splits, data_dir = prepared
    ref, ds = CocoJsonDataset(splits["val"][1], splits["val"][0]), TfdsCocoDataset(data_dir, "tiny", "val")
    # Detections: the ground truth shifted a little, scored; the same numbers from both ground truths.
    results, coco_ref = [], _coco(ref.coco_dict())
    for a in coco_ref.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        mask = mask_utils.decode(coco_ref.annToRLE(a))
        rle = mask_utils.encode(np.asfortranarray(np.roll(mask, 1, axis=1)))
        rle["counts"] = rle["counts"].decode()
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + 1, y, w, h],
                        "score": 0.9 - 0.1 * a["id"], "segmentation": rle})
    for iou_type in ("bbox", "segm"):
        ours = coco_evaluate(ds.coco_dict(), results, iou_type)
        assert ours == coco_evaluate(ref.coco_dict(), results, iou_type) and ours["AP"] > 0.1
    part = TfdsCocoDataset(data_dir, "coco_instances/tiny", "val[1:]")
    assert len(part) == 1 and part[0]["image_id"] == 3 and part.index_of(3) == 0
    np.testing.assert_array_equal(part[0]["masks"], ref[1]["masks"])
    with pytest.raises(FileNotFoundError, match="bmask_jax.data.tfds_coco"):
        TfdsCocoDataset(data_dir, "nope", "train")
    with pytest.raises(ValueError, match="test"):
        TfdsCocoDataset(data_dir, "tiny", "test")


def _coco(gt):
    c = COCO()
    c.dataset = _prepare_gt(gt)
    c.createIndex()
    return c


def test_cli_runs_as_a_module(tmp_path):
    images, js = _write_split(tmp_path, [({"id": 1, "file_name": "x.png", "height": 8, "width": 8},
                                          np.zeros((8, 8, 3), np.uint8), {})], [])
    out = subprocess.run([sys.executable, "-m", "bmask_jax.data.tfds_coco", "--data_dir", str(tmp_path / "d"),
                          "--name", "one", "--images_val", images, "--json_val", js],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "val: 1 images, 5 classes" in out.stdout and "--config.data.tfds_name=one" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bmask_jax.data.tfds_coco", "--data_dir", str(tmp_path / "d"),
                          "--images_train", images], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--json_train" in bad.stderr


@pytest.mark.slow
def test_trains_and_evaluates_from_tfds(prepared, tmp_path):
    splits, data_dir = prepared
    c = tiny_config("maskrcnn")
    assert c.model.num_classes == 5
    c.data.update(dataset="tfds", tfds_name="tiny", tfds_data_dir=data_dir)
    c.train.update(max_iter=2, checkpoint_every=100)
    # Same files, same order: the training batches equal the COCO-JSON path's.
    coco_cfg = copy.deepcopy(c.data)
    coco_cfg.update(dataset="coco", coco_train_json=splits["train"][1], coco_images=splits["train"][0])
    loaders = [TrainBatches(build_dataset(d, "train"), d, c.train.batch_size, 0) for d in (c.data, coco_cfg)]
    try:
        for step in (0, 2):
            a, b = (loader.batch(step) for loader in loaders)
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    finally:
        for loader in loaders:
            loader.close()
    metrics = train_and_evaluate(c, str(tmp_path / "run"))
    assert metrics["num_images"] == 2 and "AP" in metrics["segm"]
    assert "tensorflow" not in sys.modules
