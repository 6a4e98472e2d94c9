"""The model's detections on the canvas -> instances in original-image pixels (numpy only:
evaluation, the Predictor and serving.py share it)."""
from __future__ import annotations

import numpy as np

from bmask_jax.ops.masks import paste_masks


def postprocess(det: dict, i: int, scale, orig_hw, mask_threshold: float, boundaries: bool = True) -> dict:
    """Detections of image i of a batch in original-image pixels, masks pasted at full size.
    Returns boxes [N, 4], scores, classes, masks [N, H, W] bool, and the predicted boundaries
    pasted the same way if the model gives them and `boundaries` asks for them (else None)."""
    valid = det["valid"][i]
    sy, sx = float(scale[0]), float(scale[1])
    boxes = det["boxes"][i][valid] / np.array([sx, sy, sx, sy], np.float32)
    hw = (int(orig_hw[0]), int(orig_hw[1]))
    out = {"boxes": boxes, "scores": det["scores"][i][valid], "classes": det["classes"][i][valid],
           "masks": paste_masks(det["mask_probs"][i][valid], boxes, hw, mask_threshold),
           "boundaries": None, "box_scores": None}
    if "box_scores" in det:
        out["box_scores"] = det["box_scores"][i][valid]
    if boundaries and "boundary_probs" in det:
        out["boundaries"] = paste_masks(det["boundary_probs"][i][valid], boxes, hw, 0.5)
    return out


def image_instances(det: dict, i: int, scale, orig_hw, mask_threshold: float, class_names,
                    score_threshold: float = 0.0) -> dict:
    """Image i's instances as the Predictor and serving return them (numpy, original pixels):
    boxes [N, 4] xyxy float32, scores [N], classes [N] int32 (contiguous ids), class_names
    [N], masks [N, H, W] bool, and boundaries [N, H, W] bool where the model predicts them;
    detections scoring below score_threshold dropped."""
    inst = postprocess(det, i, scale, orig_hw, mask_threshold)
    keep = inst["scores"] >= score_threshold
    out = {"boxes": inst["boxes"][keep].astype(np.float32), "scores": inst["scores"][keep],
           "classes": inst["classes"][keep].astype(np.int32)}
    out["class_names"] = [class_names[c] for c in out["classes"]]
    out["masks"] = inst["masks"][keep]
    if inst["boundaries"] is not None:
        out["boundaries"] = inst["boundaries"][keep]
    return out
