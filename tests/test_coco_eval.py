import numpy as np
import pytest
from PIL import Image

from bmask_jax.evaluation.coco_eval import coco_evaluate, plot_ap_vs_iou
from bmask_jax.ops.masks import masks_to_rle

IOU_KEYS = [f"{t:.2f}" for t in np.linspace(0.5, 0.95, 10)]
H, W = 100, 120


def _rect_mask(x, y, w, h):
    m = np.zeros((H, W), bool)
    m[y:y + h, x:x + w] = True
    return m


def _make_gt(objs):
    """objs: list of (image_id, category_id, mask) -> COCO gt dict with RLE segmentations."""
    image_ids = sorted({o[0] for o in objs} | {1})
    anns = []
    for i, (img, cat, m) in enumerate(objs):
        ys, xs = np.nonzero(m)
        x0, y0 = xs.min(), ys.min()
        bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
        anns.append({"id": i + 1, "image_id": img, "category_id": cat, "bbox": bbox,
                     "area": float(m.sum()), "iscrowd": 0,
                     "segmentation": masks_to_rle(m[None])[0]})
    return {
        "images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in image_ids],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _det(img, cat, mask, score, bbox=None):
    ys, xs = np.nonzero(mask)
    if bbox is None:
        x0, y0 = xs.min(), ys.min()
        bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
    return {"image_id": img, "category_id": cat, "bbox": bbox, "score": score,
            "segmentation": masks_to_rle(mask[None])[0]}


def _check_keys(res):
    assert set(res) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP_per_iou"}
    assert list(res["AP_per_iou"]) == IOU_KEYS
    for v in [res[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] + list(
            res["AP_per_iou"].values()):
        assert isinstance(v, float)


def test_perfect_detections():
    objs = [
        (1, 1, _rect_mask(5, 5, 40, 30)),      # medium (1200 px)
        (1, 2, _rect_mask(60, 50, 10, 12)),    # small
        (2, 1, _rect_mask(20, 40, 100, 60)),   # medium (6000 < 96^2 px)
        (3, 2, _rect_mask(0, 0, 15, 15)),      # small
    ]
    gt = _make_gt(objs)
    results = [_det(img, cat, m, 1.0) for img, cat, m in objs]
    for iou_type in ("bbox", "segm"):
        res = coco_evaluate(gt, results, iou_type)
        _check_keys(res)
        assert res["AP"] == pytest.approx(1.0)
        assert res["AP50"] == pytest.approx(1.0)
        assert res["AP75"] == pytest.approx(1.0)
        assert res["APs"] == pytest.approx(1.0)
        assert res["APm"] == pytest.approx(1.0)
        assert res["APl"] == -1.0  # no large objects
        assert all(v == pytest.approx(1.0) for v in res["AP_per_iou"].values())
    # the inputs are not mutated by pycocotools
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert "ignore" not in gt["annotations"][0]


def test_hand_made_false_positive_first():
    # One image, two GTs (class 1, medium size). Detections sorted by score:
    #   FP (0.9, on empty background), TP on GT A (0.8). GT B is missed.
    # Cumulative: after FP recall 0 / precision 0, after TP recall 1/2 / precision 1/2.
    # 101-point interpolation: p_interp(r) = max precision at recall >= r = 0.5 for the 51
    # recall thresholds r in {0.00, ..., 0.50}, 0 for the other 50 -> AP = 0.5 * 51 / 101,
    # at every IoU threshold (the TP is exact).
    a = _rect_mask(10, 10, 40, 40)
    b = _rect_mask(60, 50, 40, 40)
    gt = _make_gt([(1, 1, a), (1, 1, b)])
    fp = _rect_mask(70, 0, 45, 30)  # disjoint from A and B
    results = [_det(1, 1, fp, 0.9), _det(1, 1, a, 0.8)]
    expected = 0.5 * 51 / 101
    for iou_type in ("bbox", "segm"):
        res = coco_evaluate(gt, results, iou_type)
        _check_keys(res)
        assert res["AP"] == pytest.approx(expected, abs=1e-12)
        assert res["AP50"] == pytest.approx(expected, abs=1e-12)
        assert res["APm"] == pytest.approx(expected, abs=1e-12)
        assert res["APs"] == -1.0 and res["APl"] == -1.0
        assert res["AP_per_iou"]["0.50"] == res["AP50"]
        assert res["AP_per_iou"]["0.75"] == res["AP75"]

    # Same detections but the TP scores higher: precision 1 up to recall 0.5 -> AP = 51 / 101.
    results = [_det(1, 1, fp, 0.5), _det(1, 1, a, 0.8)]
    res = coco_evaluate(gt, results, "bbox")
    assert res["AP"] == pytest.approx(51 / 101, abs=1e-12)


def test_images_without_detections_count():
    # Two images with one GT each; only image 1 is detected: recall 1/2 at precision 1.
    gt = _make_gt([(1, 1, _rect_mask(10, 10, 40, 40)), (2, 1, _rect_mask(30, 30, 40, 40))])
    res = coco_evaluate(gt, [_det(1, 1, _rect_mask(10, 10, 40, 40), 0.7)], "segm")
    assert res["AP"] == pytest.approx(51 / 101, abs=1e-12)


def test_shifted_boxes_ap_decreases_with_iou():
    # Ten 40x40 GTs, each on its own image; detection k is shifted right by k pixels, so its
    # IoU is (40 - k) / (40 + k): from 1.0 down to ~0.63 -> every GT matches at IoU 0.5, fewer
    # and fewer at higher thresholds.
    objs, results = [], []
    for k in range(10):
        objs.append((k + 1, 1, _rect_mask(20, 20, 40, 40)))
        results.append(_det(k + 1, 1, _rect_mask(20 + k, 20, 40, 40), 0.5 + 0.01 * k))
    gt = _make_gt(objs)
    for iou_type in ("bbox", "segm"):
        res = coco_evaluate(gt, results, iou_type)
        ap = [res["AP_per_iou"][k] for k in IOU_KEYS]
        assert ap[0] == pytest.approx(1.0)
        assert all(x >= y - 1e-12 for x, y in zip(ap, ap[1:]))
        assert ap[-1] < ap[4] < ap[0]
        assert res["AP50"] == pytest.approx(ap[0], abs=1e-12)
        assert res["AP75"] == pytest.approx(ap[5], abs=1e-12)
        assert res["AP"] == pytest.approx(np.mean(ap), abs=1e-12)


def test_empty_results():
    gt = _make_gt([(1, 1, _rect_mask(10, 10, 40, 40))])
    for iou_type in ("bbox", "segm"):
        res = coco_evaluate(gt, [], iou_type)
        _check_keys(res)
        assert all(res[k] == 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
        assert all(v == 0.0 for v in res["AP_per_iou"].values())


def test_no_stdout_flood(capsys):
    gt = _make_gt([(1, 1, _rect_mask(10, 10, 40, 40))])
    coco_evaluate(gt, [_det(1, 1, _rect_mask(10, 10, 40, 40), 0.7)], "bbox")
    assert capsys.readouterr().out == ""


def test_plot_ap_vs_iou(tmp_path):
    curves = {
        "Mask R-CNN": {k: 0.6 - 0.05 * i for i, k in enumerate(IOU_KEYS)},
        "BMask R-CNN": {k: 0.62 - 0.045 * i for i, k in enumerate(IOU_KEYS)},
    }
    path = tmp_path / "sub" / "ap_vs_iou.png"
    plot_ap_vs_iou(curves, str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_box_score_ranks_boxes_and_score_ranks_masks():
    # Mask Scoring: masks ranked by "score", boxes by "box_score". Here the masks put the FP
    # first (AP 0.5 * 51/101, as above) while the boxes put the TP first (AP 51/101).
    a = _rect_mask(10, 10, 40, 40)
    b = _rect_mask(60, 50, 40, 40)
    gt = _make_gt([(1, 1, a), (1, 1, b)])
    fp = _rect_mask(70, 0, 45, 30)
    results = [dict(_det(1, 1, fp, 0.9), box_score=0.5), dict(_det(1, 1, a, 0.8), box_score=0.8)]
    assert coco_evaluate(gt, results, "segm")["AP"] == pytest.approx(0.5 * 51 / 101, abs=1e-12)
    assert coco_evaluate(gt, results, "bbox")["AP"] == pytest.approx(51 / 101, abs=1e-12)


# ------------------------------------------------------------------ Boundary AP, by hand
# Images are 100x120: diagonal 156.2 px, so the boundary band is d = round(0.02 * 156.2) = 3
# px wide (Cheng et al.'s default dilation ratio 0.02). One GT and one detection: AP at each
# threshold t is 1 if the overlap >= t, else 0, so the AP is the share of the ten thresholds
# 0.50..0.95 at or below the overlap, and Boundary AP uses min(mask IoU, boundary IoU).

def _ap_of_one_match(overlap):
    return sum(t <= overlap for t in np.linspace(0.5, 0.95, 10)) / 10


@pytest.mark.parametrize("shift, inter", [(1, 370), (2, 296)])
def test_boundary_ap_square_shifted_by_hand(shift, inter):
    # A 40x40 square and the same square shifted right by `shift` px. Each one's boundary band
    # is the square minus its 34x34 interior: 1600 - 1156 = 444 px. With O = outer square,
    # I = interior, band_a & band_b = |Oa&Ob| - |Oa&Ib| - |Ia&Ob| + |Ia&Ib|:
    #   shift 1: 40*39 - 34*34 - 34*34 + 34*33 = 1560 - 1156 - 1156 + 1122 = 370
    #   shift 2: 40*38 - 34*34 - 34*34 + 34*32 = 1520 - 1156 - 1156 + 1088 = 296
    # boundary IoU = inter / (444 + 444 - inter): 370/518 = 0.714 and 296/592 = 0.500, while
    # the mask IoU is 1560/1640 = 0.951 and 1520/1680 = 0.905.
    gt_mask = _rect_mask(20, 20, 40, 40)
    gt = _make_gt([(1, 1, gt_mask)])
    det = [_det(1, 1, _rect_mask(20 + shift, 20, 40, 40), 0.9)]
    boundary_iou = inter / (888 - inter)
    mask_iou = 40 * (40 - shift) / (1600 + 40 * shift)
    assert boundary_iou < mask_iou
    boundary = coco_evaluate(gt, det, "boundary")
    _check_keys(boundary)
    assert boundary["AP"] == pytest.approx(_ap_of_one_match(boundary_iou), abs=1e-12)
    assert boundary["AP"] == pytest.approx({1: 0.5, 2: 0.1}[shift], abs=1e-12)
    mask_ap = coco_evaluate(gt, det, "segm")["AP"]
    assert mask_ap == pytest.approx(_ap_of_one_match(mask_iou), abs=1e-12)
    assert mask_ap == pytest.approx({1: 1.0, 2: 0.9}[shift], abs=1e-12)
    # per threshold: matched up to the boundary IoU, missed above it
    for key, ap in boundary["AP_per_iou"].items():
        assert ap == pytest.approx(1.0 if float(key) <= boundary_iou else 0.0, abs=1e-12)


def test_boundary_ap_thin_ring_is_its_own_boundary():
    # A ring 2 px wide (outer 40x40, inner 36x36: 1600 - 1296 = 304 px) lies wholly within
    # 3 px of its contour, so its boundary band is the ring itself; the detection, the same
    # outer square 3 px wide (1600 - 1156 = 444 px), likewise. Boundary IoU = mask IoU =
    # 304 / 444 = 0.685: matched at 0.50..0.65, AP 0.4 for both.
    def ring(width):
        m = _rect_mask(20, 20, 40, 40)
        m[20 + width:60 - width, 20 + width:60 - width] = False
        return m
    gt = _make_gt([(1, 1, ring(2))])
    det = [_det(1, 1, ring(3), 0.9)]
    assert ring(2).sum() == 304 and ring(3).sum() == 444
    assert coco_evaluate(gt, det, "segm")["AP"] == pytest.approx(0.4, abs=1e-12)
    assert coco_evaluate(gt, det, "boundary")["AP"] == pytest.approx(0.4, abs=1e-12)


def test_boundary_ap_empty_prediction_and_no_results():
    # An empty predicted mask has an empty boundary: IoU 0, a false positive, and the GT a miss.
    gt = _make_gt([(1, 1, _rect_mask(20, 20, 40, 40))])
    empty = dict(_det(1, 1, _rect_mask(20, 20, 40, 40), 0.9),
                 segmentation=masks_to_rle(np.zeros((1, H, W), bool))[0])
    res = coco_evaluate(gt, [empty], "boundary")
    assert res["AP"] == 0.0 and all(v == 0.0 for v in res["AP_per_iou"].values())
    perfect = coco_evaluate(gt, [_det(1, 1, _rect_mask(20, 20, 40, 40), 0.9)], "boundary")
    assert perfect["AP"] == pytest.approx(1.0, abs=1e-12)
    assert coco_evaluate(gt, [], "boundary")["AP"] == 0.0


def test_annotation_id_zero_is_counted():
    # COCOeval marks matches with the GT annotation's id, 0 meaning unmatched: without
    # renumbering, a GT with id 0 would be a miss and its perfect detection a false positive.
    a, b = _rect_mask(10, 10, 40, 40), _rect_mask(60, 50, 30, 30)
    gt = _make_gt([(1, 1, a), (1, 2, b)])
    gt["annotations"][0]["id"] = 0
    gt["annotations"][1]["id"] = 0          # and a duplicate id
    results = [_det(1, 1, a, 0.9), _det(1, 2, b, 0.8)]
    for iou_type in ("bbox", "segm", "boundary"):
        assert coco_evaluate(gt, results, iou_type)["AP"] == pytest.approx(1.0, abs=1e-12), iou_type
    assert [ann["id"] for ann in gt["annotations"]] == [0, 0]     # the caller's dict is untouched
