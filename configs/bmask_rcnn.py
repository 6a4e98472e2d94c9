"""BMask R-CNN configs. Variants: `shapes` (default: the embedded dataset on a CPU), `tiny`;
COCO from ImageNet R-50/R-101 (the paper's Table 1 setting and the authors' model zoo):
`r50_fpn_1x`, `r101_fpn_1x`, `cascade_r50_fpn_1x`, `cascade_r101_fpn_1x`, and `r50_fpn_3x`,
`r101_fpn_3x`, `cascade_r50_fpn_3x` (detectron2's 3x with multi-scale training; the authors'
3x config trains at 800 only); `hrnet_w32_fpn_1x`; the boundary head on ViTDet: `vitdet_b`,
`vitdet_l`, `vitdet_h`, `cascade_vitdet_{b,l,h}`, and at the embedded scale `shapes_vitdet`,
`tiny_vitdet`; on the large-scale-jitter baselines (SyncBN, from scratch, the BMask head's convs
with BatchNorm): `r50_fpn_{100,200,400}ep_lsj`, `r101_fpn_{100,200,400}ep_lsj`.

    python -m bmask_jax.main --config configs/bmask_rcnn.py:r50_fpn_1x --workdir runs/x
"""
from bmask_jax import config as base_config


def get_config(variant: str = "shapes"):
    return base_config.from_file(f"bmask_rcnn:{variant}")
