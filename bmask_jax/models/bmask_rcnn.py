"""Mask R-CNN and BMask R-CNN: backbone + FPN, RPN, box branch and a mask branch chosen by
config (model.mask_head = 'bmask' or 'maskrcnn').

`BMaskRCNN.__call__(batch, train=True)` returns the loss dict; with train=False it returns
detections. All shapes are static: a canvas size and the config fix every array.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmask_jax.models.box_head import (BoxHead, BoxPredictor, box_inference, box_losses,
                                       label_and_sample_proposals, select_class_deltas)
from bmask_jax.models.fpn import FPN
from bmask_jax.models.mask_heads import BoundaryPreservingHead, MaskRCNNHead, mask_losses, mask_targets
from bmask_jax.models.resnet import ResNet
from bmask_jax.models.rpn import RPNHead, find_top_proposals, rpn_losses
from bmask_jax.ops import anchors as anchor_ops
from bmask_jax.ops import boxes as box_ops
from bmask_jax.ops.roi_align import assign_levels, roi_align

ROI_LEVELS = ("p2", "p3", "p4", "p5")
ROI_STRIDES = (4, 8, 16, 32)


def pool(pyramid: dict, names, strides, boxes: jnp.ndarray, resolution: int, sampling_ratio: int,
         max_adaptive_samples: int) -> jnp.ndarray:
    """Multilevel RoIAlign for a batch. boxes: [B, R, 4] -> [B, R, res, res, C]."""
    min_level = int(np.log2(strides[0]))
    max_level = int(np.log2(strides[-1]))

    def one(features, b):
        levels = assign_levels(b, min_level, max_level)
        return roi_align(features, b, levels, strides, resolution, sampling_ratio,
                         max_adaptive_samples=max_adaptive_samples)

    return jax.vmap(one)([pyramid[n] for n in names], boxes)


class BMaskRCNN(nn.Module):
    cfg: Any  # the `model` ConfigDict

    def setup(self):
        cfg = self.cfg
        dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
        b = cfg.backbone
        self.backbone = ResNet(b.depth, b.stem_channels, b.res2_out_channels, b.bottleneck_channels,
                               b.stride_in_1x1, b.norm, b.freeze_at, dtype)
        self.fpn = FPN(cfg.fpn.channels, dtype)
        self.rpn_head = RPNHead(len(cfg.anchors.aspect_ratios), dtype)
        self.box_head = BoxHead(cfg.roi_heads.num_fc, cfg.roi_heads.fc_dim, dtype)
        self.box_predictor = BoxPredictor(cfg.num_classes, dtype)
        m = cfg.mask_head
        if m.name == "bmask":
            self.mask_head = BoundaryPreservingHead(
                cfg.num_classes, m.conv_dim, m.num_conv, cfg.boundary.num_conv,
                cfg.boundary.mask_to_boundary, cfg.boundary.boundary_to_mask, dtype)
        elif m.name == "maskrcnn":
            self.mask_head = MaskRCNNHead(cfg.num_classes, m.conv_dim, m.num_conv, dtype)
        else:
            raise ValueError(f"model.mask_head.name must be 'bmask' or 'maskrcnn', got {m.name!r}")

    # -- pieces -------------------------------------------------------------------------------
    def normalize(self, images: jnp.ndarray) -> jnp.ndarray:
        """uint8 RGB [B, H, W, 3] -> normalised float in the weights' channel order."""
        x = images.astype(jnp.float32)
        if self.cfg.input_format == "BGR":
            x = x[..., ::-1]
        return (x - jnp.asarray(self.cfg.pixel_mean)) / jnp.asarray(self.cfg.pixel_std)

    def pyramid(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
        dtype = jnp.bfloat16 if self.cfg.compute_dtype == "bfloat16" else jnp.float32
        return self.fpn(self.backbone(self.normalize(images).astype(dtype)))

    def anchors(self, canvas_hw) -> list[jnp.ndarray]:
        a = self.cfg.anchors
        return [jnp.asarray(x) for x in anchor_ops.multilevel_anchors(
            canvas_hw, a.strides, a.sizes, a.aspect_ratios, a.offset)]

    def proposals(self, anchors, logits, deltas, image_hw, train: bool):
        r = self.cfg.rpn
        topk = r.pre_nms_topk_train if train else r.pre_nms_topk_test
        post = r.post_nms_topk_train if train else r.post_nms_topk_test
        logits = [jax.lax.stop_gradient(x) for x in logits]
        deltas = [jax.lax.stop_gradient(x) for x in deltas]
        return jax.vmap(lambda lg, dl, hw: find_top_proposals(
            anchors, lg, dl, hw, topk, post, r.nms_threshold, r.bbox_reg_weights))(logits, deltas, image_hw)

    def mask_branch(self, pyramid, boxes):
        """Mask (and boundary) logits for boxes [B, R, 4] -> ([B*R, 28, 28, K], ... or None)."""
        cfg = self.cfg
        m = cfg.mask_head
        n = boxes.shape[0] * boxes.shape[1]
        feats = pool(pyramid, ROI_LEVELS, ROI_STRIDES, boxes, m.pooler_resolution,
                     cfg.roi_heads.sampling_ratio, cfg.roi_heads.max_adaptive_samples)
        feats = feats.reshape(n, *feats.shape[2:])
        boundary_feats = None
        if m.name == "bmask":
            levels = cfg.boundary.in_features
            strides = tuple(ROI_STRIDES[ROI_LEVELS.index(x)] for x in levels)
            boundary_feats = pool(pyramid, levels, strides, boxes, cfg.boundary.resolution,
                                  cfg.roi_heads.sampling_ratio, cfg.roi_heads.max_adaptive_samples)
            boundary_feats = boundary_feats.reshape(n, *boundary_feats.shape[2:])
        return self.mask_head(feats, boundary_feats)

    # -- forward ------------------------------------------------------------------------------
    def __call__(self, batch: dict, train: bool = True):
        return self.losses(batch) if train else self.detect(batch)

    def losses(self, batch: dict) -> dict[str, jnp.ndarray]:
        """Training losses. batch: image [B, H, W, 3] uint8, image_hw [B, 2], gt_boxes [B, G, 4],
        gt_classes [B, G], gt_valid [B, G], gt_masks [B, G, M, M] uint8 (mask * 255 over the
        GT box). Draws randomness from the 'sampling' rng stream."""
        cfg = self.cfg
        k = cfg.num_classes
        images = batch["image"]
        b = images.shape[0]
        pyramid = self.pyramid(images)
        anchors = self.anchors(images.shape[1:3])
        logits, deltas = self.rpn_head([pyramid[n] for n in ("p2", "p3", "p4", "p5", "p6")])

        rng_rpn, rng_roi = jax.random.split(self.make_rng("sampling"))
        out = rpn_losses(rng_rpn, jnp.concatenate(anchors), jnp.concatenate(logits, 1),
                         jnp.concatenate(deltas, 1), batch["gt_boxes"], batch["gt_valid"], cfg.rpn)

        proposals, _, proposal_valid = self.proposals(anchors, logits, deltas, batch["image_hw"], True)
        rois = jax.vmap(lambda r, p, pv, gb, gc, gv: label_and_sample_proposals(
            r, p, pv, gb, gc, gv, k, cfg.roi_heads))(
            jax.random.split(rng_roi, b), proposals, proposal_valid, batch["gt_boxes"],
            batch["gt_classes"], batch["gt_valid"])
        s = rois["boxes"].shape[1]
        matched_gt = jnp.take_along_axis(batch["gt_boxes"], rois["gt_index"][..., None], axis=1)

        feats = pool(pyramid, ROI_LEVELS, ROI_STRIDES, rois["boxes"], cfg.roi_heads.pooler_resolution,
                     cfg.roi_heads.sampling_ratio, cfg.roi_heads.max_adaptive_samples)
        box_features = self.box_head(feats.reshape(b * s, *feats.shape[2:]))
        cls_logits, box_deltas = self.box_predictor(box_features)
        flat = {key: v.reshape(b * s, *v.shape[2:]) for key, v in rois.items()}
        out.update(box_losses(cls_logits, box_deltas, flat, matched_gt.reshape(b * s, 4), k, cfg.roi_heads))

        # Mask branch on the foreground slots, which sampling puts first.
        # num_mask_rois caps the mask head's static batch (detectron2 has no cap: 128 slots).
        f = min(int(cfg.roi_heads.batch_size_per_image * cfg.roi_heads.positive_fraction),
                cfg.roi_heads.num_mask_rois, s)
        fg = {key: v[:, :f] for key, v in rois.items()}
        mask_boxes = fg["boxes"]
        if cfg.roi_heads.train_on_pred_boxes:
            pred = box_ops.decode(select_class_deltas(box_deltas, flat["classes"], k),
                                  flat["boxes"], cfg.roi_heads.bbox_reg_weights)
            mask_boxes = jax.lax.stop_gradient(pred.reshape(b, s, 4)[:, :f])
        mask_logits, boundary_logits = self.mask_branch(pyramid, mask_boxes)
        gt_index = fg["gt_index"]
        gt_masks = jnp.take_along_axis(batch["gt_masks"], gt_index[:, :, None, None], axis=1)
        targets = mask_targets(mask_boxes.reshape(b * f, 4),
                               jnp.take_along_axis(batch["gt_boxes"], gt_index[..., None], axis=1).reshape(b * f, 4),
                               gt_masks.reshape(b * f, *gt_masks.shape[2:]).astype(jnp.float32) / 255.0,
                               mask_logits.shape[1], cfg.roi_heads.sampling_ratio)
        out.update(mask_losses(mask_logits, boundary_logits, fg["classes"].reshape(-1), targets,
                               fg["is_fg"].reshape(-1).astype(jnp.float32), cfg))
        return out

    def detect(self, batch: dict) -> dict[str, jnp.ndarray]:
        """Inference. Returns boxes [B, D, 4] (canvas pixels), scores [B, D], classes [B, D],
        valid [B, D], mask_probs [B, D, 28, 28] and boundary_probs (BMask only) of the
        predicted class."""
        cfg = self.cfg
        k = cfg.num_classes
        images = batch["image"]
        b = images.shape[0]
        pyramid = self.pyramid(images)
        anchors = self.anchors(images.shape[1:3])
        logits, deltas = self.rpn_head([pyramid[n] for n in ("p2", "p3", "p4", "p5", "p6")])
        proposals, _, proposal_valid = self.proposals(anchors, logits, deltas, batch["image_hw"], False)
        p = proposals.shape[1]
        feats = pool(pyramid, ROI_LEVELS, ROI_STRIDES, proposals, cfg.roi_heads.pooler_resolution,
                     cfg.roi_heads.sampling_ratio, cfg.roi_heads.max_adaptive_samples)
        cls_logits, box_deltas = self.box_predictor(self.box_head(feats.reshape(b * p, *feats.shape[2:])))
        boxes, scores, classes, valid = jax.vmap(lambda lg, dl, pr, pv, hw: box_inference(
            lg, dl, pr, pv, hw, k, cfg.roi_heads))(
            cls_logits.reshape(b, p, -1), box_deltas.reshape(b, p, -1), proposals, proposal_valid,
            batch["image_hw"])
        mask_logits, boundary_logits = self.mask_branch(pyramid, boxes)
        d = boxes.shape[1]
        pick = lambda x: jnp.take_along_axis(  # noqa: E731
            x, classes.reshape(-1)[:, None, None, None], axis=-1)[..., 0].reshape(b, d, *x.shape[1:3])
        out = {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid,
               "mask_probs": jax.nn.sigmoid(pick(mask_logits))}
        if boundary_logits is not None:
            out["boundary_probs"] = jax.nn.sigmoid(pick(boundary_logits))
        return out
