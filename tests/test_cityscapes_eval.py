"""Cityscapes' own metric (cityscapesScripts) on our result files: perfect predictions, and
cases whose AP is worked out by hand from the scripts' definition:

- matching: a prediction matches a ground-truth instance of its class when their IoU is
  strictly above the threshold (0.50, 0.55, ..., 0.95); AP is averaged over the 10;
- ground-truth instances under 100 pixels are ignored, and so is a prediction lying mostly
  (more than the threshold) on void or on a group region (labelId < 1000 in instanceIds);
- the precision/recall points are integrated with the scripts' step rule: with one ground
  truth found at score s and a false positive above it, the curve is (recall 1, precision
  1/2) then the artificial (0, 1), which integrates to 0.25;
- a class without ground truth has no AP (NaN, None here) and is left out of the average.
"""
import os
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from bmask_jax.evaluation.cityscapes_eval import CityscapesEvalError, official_instance_ap, write_results, zip_results

H, W = 64, 128
ROAD, VOID = 7, 0
CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


def rect(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def scene():
    """One val image: two people (one 20x10, one 30x10), a person group, two cars (one
    20x40, one 30x30), a truck, a car of 8x10 = 80 pixels (under the 100-pixel limit)."""
    ids = np.full((H, W), ROAD, np.uint16)
    ids[0:5] = VOID
    ids[rect(10, 30, 0, 10)] = 24000
    ids[rect(30, 60, 12, 22)] = 24001
    ids[rect(40, 60, 100, 120)] = 24              # person group
    ids[rect(10, 30, 30, 70)] = 26000
    ids[rect(32, 62, 30, 60)] = 26001
    ids[rect(5, 25, 80, 100)] = 27000
    ids[rect(50, 58, 70, 80)] = 26002             # 80 px: ignored
    return ids


def write_gt(root):
    city_dir = os.path.join(root, "gtFine", "val", "frankfurt")
    os.makedirs(city_dir, exist_ok=True)
    path = os.path.join(city_dir, "frankfurt_000000_000294_gtFine_instanceIds.png")
    Image.fromarray(scene()).save(path)
    return [path]


def result(mask, label_id, score):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"image_id": 1, "category_id": label_id, "score": score,
            "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}}


IMAGES = [{"id": 1, "file_name": "frankfurt/frankfurt_000000_000294_leftImg8bit.png", "height": H, "width": W}]


def score(tmp_path, results):
    gt = write_gt(str(tmp_path / "cityscapes"))
    out = str(tmp_path / "results")
    write_results(out, IMAGES, results)
    return official_instance_ap(out, gt, str(tmp_path / "scratch"))


def perfect():
    return [result(rect(10, 30, 0, 10), 24, 0.9), result(rect(30, 60, 12, 22), 24, 0.8),
            result(rect(10, 30, 30, 70), 26, 0.9), result(rect(32, 62, 30, 60), 26, 0.7),
            result(rect(5, 25, 80, 100), 27, 0.6)]


def test_perfect_predictions_score_1_per_class_present(tmp_path):
    m = score(tmp_path, perfect())
    per_class = {k: v["AP"] for k, v in m["per_class"].items()}
    assert per_class == {"person": 1.0, "rider": None, "car": 1.0, "truck": 1.0, "bus": None, "train": None,
                         "motorcycle": None, "bicycle": None}
    assert m["AP"] == 1.0 and m["AP50"] == 1.0


def test_a_missed_instance_halves_recall(tmp_path):
    # One of the two cars missed: recall 1/2 at precision 1 -> AP 0.5 at every threshold.
    m = score(tmp_path, [r for r in perfect() if r["score"] != 0.7])
    assert m["per_class"]["car"] == {"AP": 0.5, "AP50": 0.5}
    assert m["per_class"]["person"]["AP"] == 1.0
    assert m["AP"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)


def test_false_positives_above_and_below_the_true_ones(tmp_path):
    # A truck on the road scoring above the real one: (r 1, p 1/2), then (0, 1): AP 0.25.
    m = score(tmp_path, perfect() + [result(rect(40, 60, 64, 96), 27, 0.95)])
    assert m["per_class"]["truck"] == {"AP": 0.25, "AP50": 0.25}
    # ... and below it: the curve reaches recall 1 at precision 1 first, AP stays 1.
    m = score(tmp_path, perfect() + [result(rect(40, 60, 64, 96), 27, 0.3)])
    assert m["per_class"]["truck"]["AP"] == 1.0


def test_predictions_on_a_group_region_or_void_are_ignored(tmp_path):
    # Over the person group, and over the void top rows, scoring above everything: ignored,
    # not false positives (counted, either would bring its class down to AP 5/12 or 1/4).
    on_group = result(rect(40, 60, 100, 120), 24, 0.99)
    on_void = result(rect(0, 5, 0, 40), 26, 0.99)
    m = score(tmp_path, perfect() + [on_group, on_void])
    assert m["per_class"]["person"]["AP"] == 1.0 and m["per_class"]["car"]["AP"] == 1.0
    # A prediction partly on the group is ignored only while its share there is above the
    # threshold (the scripts count it when share <= threshold). Half on the group, half on the
    # road: counted at every threshold, a false positive above two true people: precision
    # 2/3, 1/2, 0 at recall 1, 1/2, 0, and the step rule gives 2/3 * 1/4 + 1/2 * 1/2 = 5/12.
    half = result(rect(40, 60, 90, 110), 24, 0.99)
    m = score(tmp_path, perfect() + [half])
    assert m["per_class"]["person"]["AP50"] == pytest.approx(5 / 12)
    assert m["per_class"]["person"]["AP"] == pytest.approx(5 / 12)
    # The whole group and 114 road pixels above it: share 400/514 = 0.78, ignored at
    # 0.50..0.75 (6 thresholds), counted at 0.80..0.95 (4).
    mostly = result(rect(40, 60, 100, 120) | rect(34, 40, 100, 119), 24, 0.99)
    m = score(tmp_path, perfect() + [mostly])
    assert m["per_class"]["person"]["AP50"] == 1.0
    assert m["per_class"]["person"]["AP"] == pytest.approx((6 + 4 * 5 / 12) / 10)


def test_small_ground_truth_is_ignored_and_an_absent_class_has_no_ap(tmp_path):
    # The 80-pixel car is not a miss; a train predicted where there is no train gives no AP
    # (None) and is left out of the average; the bus, never predicted and absent, too.
    m = score(tmp_path, perfect() + [result(rect(40, 60, 64, 96), 31, 0.9)])
    assert m["per_class"]["car"]["AP"] == 1.0
    assert m["per_class"]["train"] == {"AP": None, "AP50": None}
    assert m["AP"] == 1.0
    # A class with ground truth and no prediction scores 0 and counts.
    m = score(tmp_path, [r for r in perfect() if r["category_id"] != 27])
    assert m["per_class"]["truck"]["AP"] == 0.0 and m["AP"] == pytest.approx(2 / 3)


def test_result_files_and_zip_layout(tmp_path):
    out = str(tmp_path / "results")
    images = IMAGES + [{"id": 2, "file_name": "lindau/lindau_000000_000019_leftImg8bit.png", "height": H,
                        "width": W}]
    empty = result(np.zeros((H, W), bool), 26, 0.99)
    assert write_results(out, images, perfect() + [empty]) == 5       # the empty mask is left out
    lines = open(os.path.join(out, "frankfurt_000000_000294_pred.txt")).read().splitlines()
    assert len(lines) == 5 and lines[0].split()[1:] == ["24", "0.900000"]
    mask = np.asarray(Image.open(os.path.join(out, lines[0].split()[0])).convert("L")) != 0
    assert mask.shape == (H, W) and (mask == rect(10, 30, 0, 10)).all()
    assert open(os.path.join(out, "lindau_000000_000019_pred.txt")).read() == ""   # one file per image
    path = zip_results(out, str(tmp_path / "submission.zip"))
    names = zipfile.ZipFile(path).namelist()
    assert "frankfurt_000000_000294_pred.txt" in names and "lindau_000000_000019_pred.txt" in names
    assert sorted(n for n in names if n.startswith("masks/")) == [f"masks/frankfurt_000000_000294_{k}.png"
                                                                  for k in range(5)]
    assert not [n for n in os.listdir(tmp_path) if ".part" in n]


def test_writes_nothing_outside_its_scratch_folder(tmp_path, monkeypatch):
    """cityscapesScripts by default caches the ground truth beside its own module and writes
    matches.json into the current directory; neither may happen (read-only installs and
    dataset folders), and a second run on other ground truth must not read a stale cache."""
    import cityscapesscripts.evaluation as cs_package
    package_dir = os.path.dirname(cs_package.__file__)
    before = set(os.listdir(package_dir))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    m = score(tmp_path, perfect())
    dataset_files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "cityscapes").rglob("*"))
    assert m["AP"] == 1.0
    assert set(os.listdir(package_dir)) == before and os.listdir(cwd) == [] and os.getcwd() == str(cwd)
    assert dataset_files == ["cityscapes/gtFine", "cityscapes/gtFine/val", "cityscapes/gtFine/val/frankfurt",
                             "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_instanceIds.png"]
    # Same scratch folder, other ground truth (the truck gone): scored afresh.
    gt = str(tmp_path / "cityscapes" / "gtFine" / "val" / "frankfurt" /
             "frankfurt_000000_000294_gtFine_instanceIds.png")
    ids = scene()
    ids[ids == 27000] = ROAD
    Image.fromarray(ids).save(gt)
    m = official_instance_ap(str(tmp_path / "results"), [gt], str(tmp_path / "scratch"))
    assert m["per_class"]["truck"]["AP"] is None


def test_a_missing_result_file_is_one_clear_error(tmp_path):
    gt = write_gt(str(tmp_path / "cityscapes"))
    out = tmp_path / "results"
    out.mkdir()
    with pytest.raises(CityscapesEvalError, match="Found no prediction for ground truth .*frankfurt_000000_000294"):
        official_instance_ap(str(out), gt, str(tmp_path / "scratch"))
