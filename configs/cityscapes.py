"""Cityscapes fine instance segmentation, 8 classes (paper Table 9; SPEC section 8).

Variants: `bmask` (default), `maskrcnn`, and `bmask_paper` / `maskrcnn_paper` with the
paper's schedule (batch 4, LR 0.005, 48k iterations, x0.1 at 36k) instead of the authors'
official config (batch 8, LR 0.01, 24k iterations, x0.1 at 18k).

Training reads a COCO-format export of Cityscapes (images under leftImg8bit/, instances JSON
per split): set data.coco_images / data.coco_train_json / data.coco_eval_json.
"""
from bmask_jax import config as base_config


def get_config(variant: str = "bmask"):
    head, _, schedule = variant.partition("_")
    if head not in ("bmask", "maskrcnn") or schedule not in ("", "paper"):
        raise ValueError(f"configs/cityscapes.py variant must be bmask, maskrcnn, bmask_paper or "
                         f"maskrcnn_paper, got {variant!r}")
    c = base_config.coco(base_config.base(), 50)
    c.data.update(coco_images="datasets/cityscapes/leftImg8bit",
                  coco_train_json="datasets/cityscapes/annotations/instancesonly_filtered_gtFine_train.json",
                  coco_eval_json="datasets/cityscapes/annotations/instancesonly_filtered_gtFine_val.json",
                  train_short_side=tuple(range(800, 1025, 32)), test_short_side=1024, max_size=2048,
                  canvas_buckets=((1024, 2048),))
    c.model.num_classes = 8
    c.model.mask_head.name = head
    c.model.roi_heads.train_on_pred_boxes = head == "bmask"
    t = c.train
    if schedule == "paper":
        t.update(batch_size=4, base_lr=0.005, max_iter=48000, lr_steps=(36000,))
    else:
        t.update(batch_size=8, base_lr=0.01, max_iter=24000, lr_steps=(18000,))
    return c
