"""COCO evaluation and the AP-vs-IoU-threshold plot of the BMask R-CNN paper.

bbox and segm AP come from pycocotools, the reference implementation. Boundary AP (Cheng et
al., "Boundary IoU", CVPR 2021) comes from faster-coco-eval's iouType="boundary": a detection
matches a ground-truth instance at threshold t when min(mask IoU, boundary IoU) >= t, where
the boundary IoU compares the two masks' inner bands of width d = 2% of the image diagonal
(pixels within d of the contour, the image border counting as contour). Mask AP barely moves
when a large object's outline is off by a few pixels; Boundary AP does.
"""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np

_SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
IOU_TYPES = ("bbox", "segm", "boundary")
BOUNDARY_DILATION_RATIO = 0.02    # Cheng et al.: d = 2% of the image diagonal


def _iou_key(t: float) -> str:
    return f"{t:.2f}"


def _zero_metrics() -> dict:
    out = {k: 0.0 for k in _SUMMARY_KEYS}
    out["AP_per_iou"] = {_iou_key(t): 0.0 for t in _IOU_THRESHOLDS}
    return out


def _prepare_gt(gt: dict) -> dict:
    """Shallow copy of gt with the fields COCOeval needs filled in (iscrowd, area), and the
    annotation ids renumbered 1..N (the source's id kept as "source_id").

    COCOeval (pycocotools and faster-coco-eval alike) marks matches with the matched
    annotation's id, 0 meaning "unmatched": an instance with id 0, as some annotation tools
    write them, would silently count as a miss and its detection as a false positive, and two
    instances sharing an id would be matched as one. Evaluation never reports annotation ids,
    so renumbering changes nothing else."""
    anns = []
    for i, a in enumerate(gt.get("annotations", [])):
        a = dict(a)
        a.setdefault("iscrowd", 0)
        a["source_id"] = a.get("id")
        a["id"] = i + 1
        if "area" not in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
        anns.append(a)
    out = dict(gt)
    out["annotations"] = anns
    out.setdefault("categories", [])
    return out


def coco_evaluate(gt: dict, results: list[dict], iou_type: str) -> dict:
    """Run pycocotools COCOeval on all images of `gt` and return the summary numbers.

    gt: COCO-format ground truth dict (images, annotations, categories).
    results: COCO results list ({"image_id", "category_id", "bbox": [x, y, w, h], "score"},
        plus "segmentation" RLE for segm). For segm, "bbox" is ignored (removed, as detectron2
        does) so that small/medium/large use the mask area. An optional "box_score" replaces
        "score" for bbox evaluation.
    iou_type: "bbox", "segm" (both pycocotools) or "boundary" (faster-coco-eval: segm with
        min(mask IoU, boundary IoU) as the overlap).
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP_per_iou": {"0.50": ..., ...,
    "0.95": ...}} as floats in [0, 1] (-1 where pycocotools gives -1). AP_per_iou[t] is the mean
    of COCOeval.eval["precision"][t, :, :, area=all, maxDets=100] over entries > -1, exactly as
    summarize() computes AP at a single IoU. Empty results -> all zeros.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if len(results) == 0:
        return _zero_metrics()

    # COCOeval / loadRes mutate the result dicts; work on copies.
    results = [dict(r) for r in results]
    if iou_type in ("segm", "boundary"):
        for r in results:
            r.pop("bbox", None)
    else:
        for r in results:
            r.pop("segmentation", None)
            # With Mask Scoring, masks are scored by class score x MaskIoU but boxes keep the
            # class score (as Mask Scoring R-CNN), carried as "box_score".
            if "box_score" in r:
                r["score"] = r.pop("box_score")

    with contextlib.redirect_stdout(io.StringIO()):
        if iou_type == "boundary":
            from faster_coco_eval import COCO, COCOeval_faster
            coco_gt = COCO(_prepare_gt(gt))
            ev = COCOeval_faster(coco_gt, coco_gt.loadRes(results), iouType="boundary",
                                 boundary_dilation_ratio=BOUNDARY_DILATION_RATIO,
                                 print_function=lambda *args: None)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
            coco_gt = COCO()
            coco_gt.dataset = _prepare_gt(gt)
            coco_gt.createIndex()
            ev = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    stats = ev.stats
    out = {k: float(stats[i]) for i, k in enumerate(_SUMMARY_KEYS)}

    p = ev.params
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    a_idx = list(p.areaRngLbl).index("all")
    m_idx = list(p.maxDets).index(100)
    per_iou = {}
    for t_idx, t in enumerate(p.iouThrs):
        s = precision[t_idx, :, :, a_idx, m_idx]
        valid = s[s > -1]
        per_iou[_iou_key(float(t))] = float(np.mean(valid)) if valid.size else -1.0
    out["AP_per_iou"] = per_iou
    return out


def plot_ap_vs_iou(
    curves: dict[str, dict[str, float]], path: str, title: str = "AP vs IoU threshold"
) -> None:
    """Plot AP (%) against IoU threshold (0.50..0.95), one marked line per label; save a PNG.

    curves: label -> AP_per_iou dict (as returned by coco_evaluate). Values < 0 (undefined) are
    left out of the line.
    """
    # Agg canvas on a bare Figure: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, ap) in enumerate(curves.items()):
        items = sorted((float(k), float(v)) for k, v in ap.items())
        xs = np.array([k for k, _ in items])
        ys = np.array([v * 100.0 if v >= 0 else np.nan for _, v in items])
        ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.5, markersize=5,
                label=label)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.set_xticks(_IOU_THRESHOLDS)
    ax.set_xticklabels([_iou_key(t) for t in _IOU_THRESHOLDS])
    ax.set_xlim(0.48, 0.97)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, format="png")
