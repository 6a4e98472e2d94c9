"""Region Proposal Network: the shared head, its losses, and proposal selection
(detectron2's StandardRPNHead, RPN.losses and find_top_rpn_proposals), per image with
static shapes."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmask_jax.models import losses
from bmask_jax.models.layers import Conv, normal
from bmask_jax.ops import boxes as box_ops
from bmask_jax.ops.matching import match
from bmask_jax.ops.nms import nms
from bmask_jax.ops.sampling import subsample_labels


class RPNHead(nn.Module):
    """num_convs x (3x3 conv + ReLU) shared over levels (one, `conv`, in the classic models;
    ViTDet's has two, `conv0` and `conv1`), then 1x1 objectness (A) and 1x1 deltas (4A).

    Returns per level objectness [B, H*W*A] and deltas [B, H*W*A, 4], ordered (y, x, anchor)
    to line up with anchors.grid_anchors.
    """
    num_anchors: int = 3
    num_convs: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray]):
        channels = features[0].shape[-1]
        names = ["conv"] if self.num_convs == 1 else [f"conv{k}" for k in range(self.num_convs)]
        convs = [Conv(channels, 3, kernel_init=normal(0.01), dtype=self.dtype, name=n) for n in names]
        objectness = Conv(self.num_anchors, 1, kernel_init=normal(0.01), dtype=self.dtype,
                          name="objectness_logits")
        deltas = Conv(4 * self.num_anchors, 1, kernel_init=normal(0.01), dtype=self.dtype,
                      name="anchor_deltas")
        logits_out, deltas_out = [], []
        for x in features:
            t = x
            for conv in convs:
                t = nn.relu(conv(t))
            b = x.shape[0]
            logits_out.append(objectness(t).reshape(b, -1).astype(jnp.float32))
            deltas_out.append(deltas(t).reshape(b, -1, 4).astype(jnp.float32))
        return logits_out, deltas_out


def rpn_losses(rng: jax.Array, anchors: jnp.ndarray, logits: jnp.ndarray, deltas: jnp.ndarray,
               gt_boxes: jnp.ndarray, gt_valid: jnp.ndarray, cfg) -> dict[str, jnp.ndarray]:
    """RPN objectness and box losses for a batch.

    anchors: [A, 4] (all levels); logits: [B, A]; deltas: [B, A, 4]; gt_boxes: [B, G, 4];
    gt_valid: [B, G]. cfg: the model.rpn config. Both losses are sums over the sampled
    anchors divided by batch_size_per_image * B, as detectron2.
    """
    def per_image(rng, gt_boxes, gt_valid):
        matched, labels, _ = match(anchors, gt_boxes, gt_valid, (cfg.iou_thresholds[0], cfg.iou_thresholds[1]),
                                   (0, -1, 1), allow_low_quality_matches=True)
        idx, is_pos, valid = subsample_labels(rng, labels, cfg.batch_size_per_image, cfg.positive_fraction)
        sampled = jnp.zeros(anchors.shape[0], jnp.float32).at[idx].max(valid.astype(jnp.float32))
        positive = jnp.zeros(anchors.shape[0], jnp.float32).at[idx].max(is_pos.astype(jnp.float32))
        targets = box_ops.encode(anchors, gt_boxes[matched], cfg.bbox_reg_weights)
        targets = jnp.where(positive[:, None] > 0, targets, 0.0)
        return sampled, positive, targets

    rngs = jax.random.split(rng, logits.shape[0])
    sampled, positive, targets = jax.vmap(per_image)(rngs, gt_boxes, gt_valid)
    normalizer = cfg.batch_size_per_image * logits.shape[0]
    loss_cls = jnp.sum(losses.sigmoid_bce(logits, positive) * sampled) / normalizer
    reg = losses.smooth_l1(deltas, targets, cfg.smooth_l1_beta).sum(-1)
    loss_loc = jnp.sum(reg * positive) / normalizer
    return {"loss_rpn_cls": loss_cls * cfg.loss_weight, "loss_rpn_loc": loss_loc * cfg.loss_weight}


def find_top_proposals(anchors: Sequence[jnp.ndarray], logits: Sequence[jnp.ndarray],
                       deltas: Sequence[jnp.ndarray], image_hw: jnp.ndarray, pre_nms_topk: int,
                       post_nms_topk: int, nms_threshold: float, bbox_reg_weights,
                       min_box_size: float = 0.0):
    """Proposals of one image.

    anchors/logits/deltas: per level [A_l, 4] / [A_l] / [A_l, 4]; image_hw: [2] the image's
    extent inside the canvas. Per level: top pre_nms_topk by objectness, decode, clip, drop
    empty boxes, NMS. Then the top post_nms_topk over all levels.
    Returns (boxes [P, 4], scores [P], valid [P], anchor_ids [P]) with P = post_nms_topk (or
    fewer candidates); anchor_ids: each proposal's anchor, numbered over all levels.
    """
    all_boxes, all_scores, all_valid, all_ids = [], [], [], []
    first_id = 0
    for anchors_l, logits_l, deltas_l in zip(anchors, logits, deltas):
        k = min(pre_nms_topk, anchors_l.shape[0])
        scores, idx = jax.lax.top_k(logits_l, k)
        all_ids.append(first_id + idx)
        first_id += anchors_l.shape[0]
        boxes = box_ops.decode(deltas_l[idx], anchors_l[idx], bbox_reg_weights)
        boxes = box_ops.clip(boxes, image_hw[0], image_hw[1])
        valid = box_ops.nonempty(boxes, min_box_size) & jnp.isfinite(scores) \
            & jnp.all(jnp.isfinite(boxes), axis=-1)
        valid = nms(boxes, scores, nms_threshold, valid)
        all_boxes.append(boxes)
        all_scores.append(scores)
        all_valid.append(valid)
    boxes = jnp.concatenate(all_boxes)
    scores = jnp.concatenate(all_scores)
    valid = jnp.concatenate(all_valid)
    ids = jnp.concatenate(all_ids)
    k = min(post_nms_topk, boxes.shape[0])
    _, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
    boxes = jnp.where(valid[idx, None], boxes[idx], 0.0)
    return boxes, scores[idx], valid[idx], ids[idx]
