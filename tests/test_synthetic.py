import json
import os

import numpy as np
import pytest
from PIL import Image

from bmask_jax.data.synthetic import CLASS_NAMES, SyntheticShapes


def _assert_items_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def _items_differ(a, b):
    return a["image"].shape != b["image"].shape or not np.array_equal(a["image"], b["image"])


def test_class_names_and_attributes():
    assert len(CLASS_NAMES) == 5 and len(set(CLASS_NAMES)) == 5
    ds = SyntheticShapes("val")
    assert ds.class_names == CLASS_NAMES
    assert ds.num_classes == 5
    assert ds.name == "synthetic_shapes_val"
    assert len(ds) == 200
    assert len(SyntheticShapes("train")) == 2000
    assert len(SyntheticShapes("train", num_images=7)) == 7


def test_determinism():
    ds = SyntheticShapes("train", num_images=20, seed=3)
    a = ds[5]
    ds[2], ds[11]  # other accesses in between must not matter
    _assert_items_equal(a, ds[5])
    _assert_items_equal(a, SyntheticShapes("train", num_images=20, seed=3)[5])
    # The item does not depend on the dataset length either.
    _assert_items_equal(a, SyntheticShapes("train", num_images=100, seed=3)[5])
    assert _items_differ(a, SyntheticShapes("train", num_images=20, seed=4)[5])
    assert _items_differ(a, ds[6])


def test_train_val_differ():
    train = SyntheticShapes("train", num_images=5)
    val = SyntheticShapes("val", num_images=5)
    for i in range(5):
        assert _items_differ(train[i], val[i])


@pytest.mark.parametrize("image_size", [(128, 128), (96, 160)])
def test_shapes_and_dtypes(image_size):
    h, w = image_size
    ds = SyntheticShapes("train", num_images=10, image_size=image_size)
    for i in range(len(ds)):
        item = ds[i]
        n = len(item["classes"])
        assert 1 <= n <= 6
        assert item["image_id"] == i + 1
        assert item["file_name"] == f"{i + 1:06d}.png"
        assert item["image"].shape == (h, w, 3) and item["image"].dtype == np.uint8
        assert item["boxes"].shape == (n, 4) and item["boxes"].dtype == np.float32
        assert item["classes"].shape == (n,) and item["classes"].dtype == np.int32
        assert item["masks"].shape == (n, h, w) and item["masks"].dtype == np.uint8
        assert item["iscrowd"].shape == (n,) and item["iscrowd"].dtype == np.bool_
        assert not item["iscrowd"].any()
        assert set(np.unique(item["masks"])) <= {0, 1}
        assert ((item["classes"] >= 0) & (item["classes"] < 5)).all()


def test_boxes_are_tight_boxes_of_visible_masks_and_masks_are_disjoint():
    ds = SyntheticShapes("train", num_images=30, seed=1)
    for i in range(len(ds)):
        item = ds[i]
        masks = item["masks"].astype(bool)
        # Visible masks never overlap.
        assert masks.sum(axis=0).max() <= 1
        for m, box in zip(masks, item["boxes"]):
            assert m.sum() >= 20
            ys, xs = np.nonzero(m)
            expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            np.testing.assert_array_equal(box, np.array(expected, np.float32))


def test_instance_count_range():
    ds = SyntheticShapes("train", num_images=15, min_instances=3, max_instances=4)
    counts = [len(ds[i]["classes"]) for i in range(len(ds))]
    assert min(counts) >= 3 and max(counts) <= 4


def test_every_class_appears():
    ds = SyntheticShapes("train", num_images=50)
    classes = np.concatenate([ds[i]["classes"] for i in range(len(ds))])
    counts = np.bincount(classes, minlength=5)
    assert counts.shape == (5,) and (counts > 0).all(), counts
    # Occlusion exists: some images have an instance whose box overlaps another.
    overlapping = 0
    for i in range(len(ds)):
        b = ds[i]["boxes"]
        lt = np.maximum(b[:, None, :2], b[None, :, :2])
        rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
        np.fill_diagonal(inter, 0)
        overlapping += int((inter > 0).any())
    assert overlapping >= 5


def test_coco_dict_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    ds = SyntheticShapes("val", num_images=6)
    d = ds.coco_dict()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(d))  # JSON-serialisable
    coco = COCO(str(path))
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    assert sorted(coco.getImgIds()) == list(range(1, 7))
    ann_ids = set()
    for i in range(len(ds)):
        item = ds[i]
        img = coco.loadImgs(item["image_id"])[0]
        assert img["file_name"] == item["file_name"]
        assert (img["height"], img["width"]) == (128, 128)
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=item["image_id"])), key=lambda a: a["id"])
        assert len(anns) == len(item["classes"])
        for k, ann in enumerate(anns):
            ann_ids.add(ann["id"])
            assert ann["category_id"] == item["classes"][k] + 1
            assert ann["iscrowd"] == 0
            np.testing.assert_array_equal(coco.annToMask(ann), item["masks"][k])
            assert ann["area"] == item["masks"][k].sum()
            x1, y1, x2, y2 = item["boxes"][k]
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    assert len(ann_ids) == len(d["annotations"])  # unique annotation ids


def test_export_coco(tmp_path):
    ds = SyntheticShapes("val", num_images=3, seed=2)
    json_path = ds.export_coco(str(tmp_path))
    assert json_path == os.path.join(str(tmp_path), "annotations.json")
    with open(json_path) as f:
        d = json.load(f)
    assert len(d["images"]) == 3
    for i in range(len(ds)):
        item = ds[i]
        with Image.open(tmp_path / "images" / item["file_name"]) as im:
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), item["image"])


def test_bad_split_raises():
    with pytest.raises(ValueError, match="test"):
        SyntheticShapes("test")


def test_index_out_of_range():
    ds = SyntheticShapes("val", num_images=4)
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds[-5]
    _assert_items_equal(ds[-1], ds[3])
    assert len(list(ds)) == 4  # iteration protocol via __getitem__ stops cleanly


def test_visible_fraction_rule():
    ds = SyntheticShapes("train", num_images=20, min_visible_fraction=0.3)
    for i in range(len(ds)):
        _, instances = ds._generate(i)
        for inst in instances:
            assert inst["visible"].sum() == inst["visible_area"]
            assert inst["visible_area"] >= max(20, 0.3 * inst["full_area"])


def test_empty_images_allowed_when_min_instances_is_zero():
    ds = SyntheticShapes("val", num_images=8, min_instances=0, max_instances=1)
    counts = [len(ds[i]["classes"]) for i in range(len(ds))]
    assert 0 in counts
    for i in range(len(ds)):
        item = ds[i]
        n = len(item["classes"])
        assert item["boxes"].shape == (n, 4) and item["masks"].shape == (n, 128, 128)
    assert len(ds.coco_dict()["annotations"]) == sum(counts)
