"""BMask R-CNN configs. Variants: `shapes` (default: the embedded dataset on a CPU),
`r50_fpn_1x`, `r101_fpn_1x` (COCO, the paper's Table 1 setting).

    python -m bmask_jax.main --config configs/bmask_rcnn.py:r50_fpn_1x --workdir runs/x
"""
from bmask_jax import config as base_config


def get_config(variant: str = "shapes"):
    c = base_config.mask_head(base_config.base(), "bmask")
    return base_config.variant(c, variant)
