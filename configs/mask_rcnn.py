"""Mask R-CNN baseline configs: detectron2's Mask R-CNN (mask_rcnn_R_50_FPN_1x.yaml for
`r50_fpn_1x`), equal to configs/bmask_rcnn.py but for the mask head and train_on_pred_boxes.
Variants: `shapes` (default), `r50_fpn_1x`, `r101_fpn_1x`."""
from bmask_jax import config as base_config


def get_config(variant: str = "shapes"):
    c = base_config.mask_head(base_config.base(), "maskrcnn")
    return base_config.variant(c, variant)
