"""Cityscapes fine instance segmentation, 8 classes (paper Table 9; SPEC section 8), from
ImageNet R-50, training short side 800..1024, inference at the full 1024x2048.

Variants, by head and schedule:
- `bmask_paper`, `maskrcnn_paper`: the paper's schedule (batch 4, LR 0.005, 48k iterations,
  x0.1 at 36k);
- `bmask_code`, `maskrcnn_code`: the authors' published config, which trained their released
  model (batch 8, LR 0.01, 24k iterations, x0.1 at 18k). A bare `bmask` (the default) or
  `maskrcnn` is this one.

Training reads the official Cityscapes folders directly (data/cityscapes.py): unzip
leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into one folder holding leftImg8bit/
and gtFine/, and set data.cityscapes_root to it (default datasets/cityscapes). Instances come
from the gtFine *_instanceIds.png files; no conversion to COCO JSON is needed. Evaluation
reports cityscapesScripts' official AP per class and writes the benchmark's result files
(cityscapes_eval.py); `--mode evaluate --config.data.eval_split=test` writes a test-server
submission.
"""
from bmask_jax import config as base_config


def get_config(variant: str = "bmask"):
    return base_config.cityscapes_variant(variant)
