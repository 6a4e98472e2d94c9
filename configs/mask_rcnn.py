"""Mask R-CNN baseline configs: detectron2's Mask R-CNN (mask_rcnn_R_50_FPN_1x.yaml for
`r50_fpn_1x`), equal to configs/bmask_rcnn.py but for the mask head and train_on_pred_boxes.

Variants: `shapes` (default), `tiny`; COCO from ImageNet R-50/R-101: `r50_fpn_1x`,
`r101_fpn_1x`, `r50_fpn_3x`, `r101_fpn_3x`, `cascade_r50_fpn_1x`, `cascade_r50_fpn_3x`,
`cascade_r101_fpn_1x` (detectron2's model zoo rows: bmask-jax zoo); ViTDet's COCO models
`vitdet_b`, `vitdet_l`, `vitdet_h`, `cascade_vitdet_{b,l,h}`; `shapes_vitdet`, `tiny_vitdet`; detectron2's
large-scale-jitter baselines (SyncBN, from scratch) `r50_fpn_{100,200,400}ep_lsj`, `r101_fpn_{...}ep_lsj`."""
from bmask_jax import config as base_config


def get_config(variant: str = "shapes"):
    return base_config.from_file(f"mask_rcnn:{variant}")
