"""Mask R-CNN baseline configs, equal to configs/bmask_rcnn.py but for the mask head.
Variants: `shapes` (default), `r50_fpn_1x`, `r101_fpn_1x`."""
from bmask_jax import config as base_config


def get_config(variant: str = "shapes"):
    c = base_config.base()
    c.model.mask_head.name = "maskrcnn"
    return base_config.variant(c, variant)
