"""Box branch: RoI sampling, the 2-FC head and predictor, losses and inference
(detectron2's StandardROIHeads box path with FastRCNNConvFCHead and FastRCNNOutputLayers)."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmask_jax.models import losses
from bmask_jax.models.layers import conv_norm_relu, normal, xavier_fill
from bmask_jax.ops import boxes as box_ops
from bmask_jax.ops.matching import match
from bmask_jax.ops.nms import nms
from bmask_jax.ops.sampling import subsample_labels


class BoxHead(nn.Module):
    """conv_dims 3x3 convs (+ conv_norm, no bias then) + ReLU on the 7x7 RoI features (none in
    the classic 2fc head; ViTDet's 4conv1fc has four with LayerNorm), flatten, then num_fc x
    (FC fc_dim + ReLU): detectron2's FastRCNNConvFCHead."""
    num_fc: int = 2
    fc_dim: int = 1024
    conv_dims: tuple[int, ...] = ()
    conv_norm: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, valid=None):
        """valid [N]: the RoIs a BatchNorm's statistics count (None: all)."""
        for i, dim in enumerate(self.conv_dims):
            x = conv_norm_relu(x, dim, 3, 1, self.conv_norm, f"conv{i + 1}", self.dtype, valid)
        x = x.reshape(x.shape[0], -1)
        for i in range(self.num_fc):
            x = nn.relu(nn.Dense(self.fc_dim, kernel_init=xavier_fill, dtype=self.dtype,
                                 name=f"fc{i + 1}")(x))
        return x


class BoxPredictor(nn.Module):
    """K+1 class logits (background last) and 4K class-specific deltas (4 when
    class_agnostic, as in the Cascade R-CNN stages)."""
    num_classes: int
    class_agnostic: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(self.num_classes + 1, kernel_init=normal(0.01), dtype=self.dtype,
                          name="cls_score")(x)
        deltas = nn.Dense(4 if self.class_agnostic else 4 * self.num_classes, kernel_init=normal(0.001),
                          dtype=self.dtype, name="bbox_pred")(x)
        return logits.astype(jnp.float32), deltas.astype(jnp.float32)


GT_ID_OFFSET = 1 << 30


def label_and_sample_proposals(rng, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
                               num_classes: int, iou_threshold: float, cfg, proposal_ids=None):
    """Append GT to the proposals, match at IoU iou_threshold and sample
    cfg.batch_size_per_image RoIs, at most cfg.positive_fraction foreground. One image.
    proposal_ids [P] (optional): each proposal's anchor; sampling then draws its random
    numbers per anchor (and per GT box), not per rank (see subsample_labels).

    Returns dict of [S] arrays: boxes [S, 4], classes (K = background), gt_index, is_fg,
    valid; foreground RoIs occupy the first int(S * positive_fraction) slots.
    """
    boxes = jnp.concatenate([proposals, gt_boxes])
    valid = jnp.concatenate([proposal_valid, gt_valid])
    matched, labels, _ = match(boxes, gt_boxes, gt_valid, (iou_threshold,), (0, 1),
                               allow_low_quality_matches=False)
    labels = jnp.where(valid, labels, -1)
    ids = None
    if proposal_ids is not None:
        # GT boxes get ids past any anchor's.
        ids = jnp.concatenate([proposal_ids, GT_ID_OFFSET + jnp.arange(gt_boxes.shape[0])]).astype(jnp.int32)
    idx, is_fg, sampled = subsample_labels(rng, labels, cfg.batch_size_per_image, cfg.positive_fraction, ids)
    gt_index = matched[idx]
    classes = jnp.where(is_fg, gt_classes[gt_index], num_classes)
    return {"boxes": boxes[idx], "classes": classes, "gt_index": gt_index, "is_fg": is_fg,
            "valid": sampled}


def relabel_boxes(boxes, valid, gt_boxes, gt_classes, gt_valid, iou_threshold: float, num_classes: int):
    """Match already-sampled boxes again at a new IoU threshold, without resampling (a
    Cascade R-CNN stage after the first). One image; boxes [S, 4], valid [S].
    Returns the same dict as label_and_sample_proposals."""
    matched, labels, _ = match(boxes, gt_boxes, gt_valid, (iou_threshold,), (0, 1),
                               allow_low_quality_matches=False)
    valid = valid & box_ops.nonempty(boxes)
    is_fg = (labels == 1) & valid
    return {"boxes": boxes, "classes": jnp.where(is_fg, gt_classes[matched], num_classes),
            "gt_index": matched, "is_fg": is_fg, "valid": valid}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: jnp.ndarray, scale: float) -> jnp.ndarray:
    """Identity forward; gradient multiplied by `scale` (Cascade R-CNN's 1/num_stages)."""
    return x


scale_gradient.defvjp(lambda x, scale: (x, None), lambda scale, _, g: (g * scale,))


def select_class_deltas(deltas: jnp.ndarray, classes: jnp.ndarray, num_classes: int) -> jnp.ndarray:
    """deltas [R, 4K], classes [R] (background clamped to K-1) -> [R, 4]. Class-agnostic
    deltas [R, 4] pass through."""
    if deltas.shape[-1] == 4:
        return deltas
    per_class = deltas.reshape(deltas.shape[0], num_classes, 4)
    return jnp.take_along_axis(per_class, jnp.minimum(classes, num_classes - 1)[:, None, None], axis=1)[:, 0]


def box_losses(logits, deltas, rois, gt_boxes, num_classes: int, weights,
               smooth_l1_beta: float = 0.0) -> dict[str, jnp.ndarray]:
    """Softmax CE over sampled RoIs and L1 on foreground deltas of the GT class, summed and
    divided by the number of sampled RoIs. All inputs flattened over the batch: logits
    [R, K+1], deltas [R, 4K]; rois: dict from label_and_sample_proposals with [R] arrays;
    gt_boxes: [R, 4] the matched GT box of each RoI; weights: the box coding weights."""
    sampled = rois["valid"].astype(jnp.float32)
    loss_cls = losses.softmax_cross_entropy(logits, rois["classes"], sampled)
    fg = rois["is_fg"]
    targets = box_ops.encode(rois["boxes"], gt_boxes, weights)
    targets = jnp.where(fg[:, None], targets, 0.0)
    pred = select_class_deltas(deltas, rois["classes"], num_classes)
    reg = losses.smooth_l1(pred, targets, smooth_l1_beta).sum(-1)
    loss_box = jnp.sum(reg * fg) / jnp.maximum(jnp.sum(sampled), 1.0)
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}


def box_inference(probs, deltas, proposals, proposal_valid, image_hw, num_classes: int, weights, cfg):
    """Detections of one image (detectron2's fast_rcnn_inference_single_image, static).

    probs [P, K+1] (softmax; the mean over stages for a cascade), deltas [P, 4K] or
    class-agnostic [P, 4], proposals [P, 4], proposal_valid [P], image_hw [2], weights: the
    box coding weights of the stage that predicted the deltas.
    Scores > cfg.score_threshold; of those, the cfg.topk_candidates best (box, class) pairs
    go through per-class NMS; the best cfg.detections_per_image survive.
    Returns boxes [D, 4], scores [D], classes [D], valid [D].
    """
    probs = probs[:, :num_classes]                                                  # [P, K]
    per_class = deltas.reshape(deltas.shape[0], -1, 4)                               # [P, K or 1, 4]
    boxes = box_ops.decode(per_class, proposals[:, None, :], weights)
    boxes = jnp.broadcast_to(boxes, (deltas.shape[0], num_classes, 4))
    boxes = box_ops.clip(boxes, image_hw[0], image_hw[1])                            # [P, K, 4]
    candidate = (probs > cfg.score_threshold) & proposal_valid[:, None] \
        & jnp.all(jnp.isfinite(boxes), axis=-1)
    flat_scores = jnp.where(candidate, probs, -1.0).reshape(-1)
    k = min(cfg.topk_candidates, flat_scores.shape[0])
    scores, idx = jax.lax.top_k(flat_scores, k)
    classes = (idx % num_classes).astype(jnp.int32)
    cand_boxes = boxes.reshape(-1, 4)[idx]
    keep = nms(cand_boxes, scores, cfg.nms_threshold, scores > cfg.score_threshold, classes)
    d = min(cfg.detections_per_image, k)
    top_scores, top = jax.lax.top_k(jnp.where(keep, scores, -1.0), d)
    return cand_boxes[top], top_scores, classes[top], top_scores > cfg.score_threshold
