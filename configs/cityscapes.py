"""Cityscapes fine instance segmentation, 8 classes (paper Table 9; SPEC section 8).

Variants: `bmask` (default), `maskrcnn`, and `bmask_paper` / `maskrcnn_paper` with the
paper's schedule (batch 4, LR 0.005, 48k iterations, x0.1 at 36k) instead of the authors'
official config (batch 8, LR 0.01, 24k iterations, x0.1 at 18k).

Training reads the official Cityscapes folders directly (data/cityscapes.py): unzip
leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into one folder holding leftImg8bit/
and gtFine/, and set data.cityscapes_root to it (default datasets/cityscapes). Instances come
from the gtFine *_instanceIds.png files; no conversion to COCO JSON is needed.
"""
from bmask_jax import config as base_config


def get_config(variant: str = "bmask"):
    return base_config.cityscapes_variant(variant)
