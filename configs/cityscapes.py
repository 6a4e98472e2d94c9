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
    head, _, schedule = variant.partition("_")
    if head not in ("bmask", "maskrcnn") or schedule not in ("", "paper"):
        raise ValueError(f"configs/cityscapes.py variant must be bmask, maskrcnn, bmask_paper or "
                         f"maskrcnn_paper, got {variant!r}")
    c = base_config.coco(base_config.base(), 50)
    c.data.update(dataset="cityscapes", cityscapes_root="datasets/cityscapes", coco_images="",
                  coco_train_json="", coco_eval_json="",
                  train_short_side=tuple(range(800, 1025, 32)), test_short_side=1024, max_size=2048,
                  canvas_buckets=((1024, 2048),))
    c.model.num_classes = 8
    base_config.mask_head(c, head)
    t = c.train
    if schedule == "paper":
        t.update(batch_size=4, base_lr=0.005, max_iter=48000, lr_steps=(36000,))
    else:
        t.update(batch_size=8, base_lr=0.01, max_iter=24000, lr_steps=(18000,))
    return c
