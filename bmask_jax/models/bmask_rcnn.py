"""Mask R-CNN and BMask R-CNN: backbone + FPN, RPN, box branch and a mask branch chosen by
config (model.mask_head.name = 'bmask', 'maskrcnn' or 'sobel'), optionally with Mask Scoring
R-CNN's MaskIoU head (model.mask_scoring.enabled).

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
                                       label_and_sample_proposals, relabel_boxes, scale_gradient,
                                       select_class_deltas)
from bmask_jax.models.fpn import FPN
from bmask_jax.models.hrnet import HRNet
from bmask_jax.models.cpu_kernels import gradients_for_conditionals, use_kernels
from bmask_jax.models.mask_heads import (BoundaryPreservingHead, MaskIoUHead, MaskRCNNHead, SobelMaskHead,
                                         mask_losses, mask_targets, select_class)
from bmask_jax.models.resnet import ResNet
from bmask_jax.models.rpn import RPNHead, find_top_proposals, rpn_losses
from bmask_jax.models.regnet import REGNETS, RegNet
from bmask_jax.models.vit import ViT, SimpleFeaturePyramid
from bmask_jax.ops import anchors as anchor_ops
from bmask_jax.ops import boxes as box_ops
from bmask_jax.ops.roi_align import assign_levels, roi_align

RPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")     # the levels the RPN head runs on
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


def foreground_slot_sizes(buckets, num_slots: int) -> list[int]:
    """The mask head's static batch sizes per image: the configured buckets below num_slots,
    then num_slots itself, ascending."""
    return sorted({int(n) for n in buckets if 0 < n < num_slots} | {num_slots})


class BMaskRCNN(nn.Module):
    cfg: Any  # the `model` ConfigDict

    def setup(self):
        cfg = self.cfg
        if cfg.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.compute_dtype must be 'float32' or 'bfloat16', got {cfg.compute_dtype!r}")
        dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
        b = cfg.backbone
        if b.name == "resnet":
            self.backbone = ResNet(b.depth, b.stem_channels, b.res2_out_channels, b.bottleneck_channels,
                                   b.stride_in_1x1, b.norm, b.freeze_at, dtype)
        elif b.name == "hrnet":
            h = b.hrnet
            self.backbone = HRNet(h.stem_channels, h.stage1_channels, h.stage1_blocks, tuple(h.widths),
                                  tuple(h.num_modules), tuple(h.num_blocks), b.norm, b.freeze_at, dtype)
        elif b.name == "regnet":
            if b.freeze_at:
                raise ValueError("model.backbone.freeze_at must be 0 for a RegNet (the LSJ baselines train it all)")
            self.backbone = RegNet(**REGNETS[b.regnet], norm=b.norm, dtype=dtype)
        elif b.name == "vit":
            v = b.vit
            self.backbone = ViT(v.embed_dim, v.depth, v.num_heads, v.patch_size, v.img_size, v.window_size,
                                tuple(v.global_blocks), v.mlp_ratio, v.drop_path_rate, v.pretrain_img_size,
                                v.pretrain_use_cls_token, dtype, v.remat)
        else:
            raise ValueError(f"model.backbone.name must be 'resnet', 'hrnet', 'regnet' or 'vit', got {b.name!r}")
        # ViTDet's simple feature pyramid on the ViT's last map; the FPN on the others' stages.
        self.fpn = (SimpleFeaturePyramid(cfg.fpn.channels, norm=b.vit.pyramid_norm, dtype=dtype)
                    if b.name == "vit" else FPN(cfg.fpn.channels, dtype, cfg.fpn.norm))
        self.rpn_head = RPNHead(len(cfg.anchors.aspect_ratios), cfg.rpn.num_convs, dtype)
        r = cfg.roi_heads
        if r.cascade.enabled:
            n = len(r.cascade.iou_thresholds)
            self.box_heads = [BoxHead(r.num_fc, r.fc_dim, tuple(r.conv_dims), r.conv_norm, dtype) for _ in range(n)]
            self.box_predictors = [BoxPredictor(cfg.num_classes, True, dtype) for _ in range(n)]
        else:
            self.box_head = BoxHead(r.num_fc, r.fc_dim, tuple(r.conv_dims), r.conv_norm, dtype)
            self.box_predictor = BoxPredictor(cfg.num_classes, r.class_agnostic_bbox_reg, dtype)
        m = cfg.mask_head
        if m.name == "bmask":
            self.mask_head = BoundaryPreservingHead(
                cfg.num_classes, m.conv_dim, m.num_conv, cfg.boundary.num_conv,
                cfg.boundary.mask_to_boundary, cfg.boundary.boundary_to_mask, m.conv_norm, dtype)
        elif m.name == "maskrcnn":
            self.mask_head = MaskRCNNHead(cfg.num_classes, m.conv_dim, m.num_conv, m.conv_norm, dtype)
        elif m.name == "sobel":
            self.mask_head = SobelMaskHead(cfg.num_classes, m.conv_dim, m.num_conv, m.sobel_hidden_dim, dtype)
        else:
            raise ValueError(f"model.mask_head.name must be 'bmask', 'maskrcnn' or 'sobel', got {m.name!r}")
        ms = cfg.mask_scoring
        self.mask_iou_head = (MaskIoUHead(cfg.num_classes, ms.conv_dim, ms.num_conv, ms.fc_dim, dtype)
                              if ms.enabled else None)

    # -- pieces -------------------------------------------------------------------------------
    def normalize(self, images: jnp.ndarray, image_hw: jnp.ndarray | None = None) -> jnp.ndarray:
        """uint8 RGB [B, H, W, 3] -> normalised float in the weights' channel order. The canvas
        beyond image_hw [B, 2] is zero after normalisation, as in detectron2's ImageList (which
        pads the normalised images), so that converted weights see the same border."""
        x = images.astype(jnp.float32)
        if self.cfg.input_format == "BGR":
            x = x[..., ::-1]
        x = (x - jnp.asarray(self.cfg.pixel_mean)) / jnp.asarray(self.cfg.pixel_std)
        if image_hw is None:
            return x
        rows = jnp.arange(x.shape[1])[None, :, None] < image_hw[:, 0, None, None]
        cols = jnp.arange(x.shape[2])[None, None, :] < image_hw[:, 1, None, None]
        return jnp.where((rows & cols)[..., None], x, 0.0)

    def pyramid(self, images: jnp.ndarray, image_hw: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        """P2..P6. train: the ViT's stochastic depth is on (drawn from the 'sampling' stream)."""
        dtype = jnp.bfloat16 if self.cfg.compute_dtype == "bfloat16" else jnp.float32
        x = self.normalize(images, image_hw).astype(dtype)
        return self.fpn(self.backbone(x, train) if self.cfg.backbone.name == "vit" else self.backbone(x))

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

    def mask_branch(self, pyramid, boxes, classes, valid=None):
        """Mask branch for boxes [B, R, 4] of classes [B*R] (GT classes in training, predicted
        at test; the Sobel head and the MaskIoU head pick their mask channel by them).

        Returns mask logits [B*R, 28, 28, K], boundary logits ([B*R, 28, 28, K] for 'bmask',
        [B*R, 28, 28, 1] for 'sobel', None for 'maskrcnn') and the predicted MaskIoU [B*R, K]
        (None without Mask Scoring). valid [B*R]: the RoIs a BatchNorm in the head counts (the
        foreground slots in training; detectron2's NaiveSyncBatchNorm(stats_mode="N") sees only
        foreground RoIs).
        """
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
        return self.mask_heads(feats, boundary_feats, classes, valid)

    def mask_heads(self, feats, boundary_feats, classes, valid=None):
        """The mask head (and MaskIoU head) on pooled RoI features [N, 14, 14, C] (and boundary
        features [N, 28, 28, C] for 'bmask'); see mask_branch."""
        m = self.cfg.mask_head
        if m.name == "sobel":
            mask_logits, boundary_logits = self.mask_head(feats, None, classes)
        else:
            mask_logits, boundary_logits = self.mask_head(feats, boundary_feats, valid)
        mask_iou = None
        if self.mask_iou_head is not None:
            # MS R-CNN: the 14x14 mask RoI features and the predicted mask of the class, with no
            # gradient from the MaskIoU loss into the mask prediction.
            probs = jax.lax.stop_gradient(jax.nn.sigmoid(select_class(mask_logits, classes)))
            mask_iou = self.mask_iou_head(feats, probs)
        return mask_logits, boundary_logits, mask_iou

    def box_stages(self):
        """(head, predictor, IoU threshold, box coding weights) per stage: one for Faster
        R-CNN's box branch, three for Cascade R-CNN."""
        r = self.cfg.roi_heads
        if not r.cascade.enabled:
            return [(self.box_head, self.box_predictor, r.iou_threshold, tuple(r.bbox_reg_weights))]
        return list(zip(self.box_heads, self.box_predictors, r.cascade.iou_thresholds,
                        [tuple(w) for w in r.cascade.bbox_reg_weights]))

    def box_features(self, pyramid, boxes, head, num_stages: int, valid=None):
        """RoIAlign 7x7 + the FC head for boxes [B, S, 4] -> [B*S, fc_dim]. Under a cascade
        each stage's head passes 1/num_stages of the gradient to the shared features. valid
        [B, S]: the sampled RoIs, the only ones a BatchNorm in the head counts (padding slots
        are not RoIs)."""
        r = self.cfg.roi_heads
        b, s = boxes.shape[:2]
        feats = pool(pyramid, ROI_LEVELS, ROI_STRIDES, boxes, r.pooler_resolution, r.sampling_ratio,
                     r.max_adaptive_samples)
        feats = feats.reshape(b * s, *feats.shape[2:])
        if num_stages > 1:
            feats = scale_gradient(feats, 1.0 / num_stages)
        return head(feats, None if valid is None else valid.reshape(b * s))

    def box_branch_losses(self, pyramid, proposals, proposal_valid, proposal_ids, batch, rng):
        """Sample RoIs from the proposals (plus GT), then the box loss of each stage; later
        cascade stages re-match the previous stage's regressed boxes at their own IoU.
        Returns (losses, the first stage's sampled RoIs [B, S] dict, its deltas [B*S, ...])."""
        cfg = self.cfg
        k = cfg.num_classes
        stages = self.box_stages()
        b = proposals.shape[0]
        gt = (batch["gt_boxes"], batch["gt_classes"], batch["gt_valid"])
        rois = jax.vmap(lambda r, p, pv, pid, gb, gc, gv: label_and_sample_proposals(
            r, p, pv, gb, gc, gv, k, stages[0][2], cfg.roi_heads, pid))(
            jax.random.split(rng, b), proposals, proposal_valid, proposal_ids, *gt)
        first_rois, first_deltas = rois, None
        out = {}
        prev = None
        for i, (head, predictor, iou, weights) in enumerate(stages):
            if prev is not None:
                boxes = box_ops.clip(box_ops.decode(prev[1].reshape(b, -1, 4), prev[0]["boxes"], prev[2]),
                                     batch["image_hw"][:, 0:1], batch["image_hw"][:, 1:2])
                rois = jax.vmap(lambda bx, v, gb, gc, gv: relabel_boxes(bx, v, gb, gc, gv, iou, k))(
                    jax.lax.stop_gradient(boxes), prev[0]["valid"], *gt)
            s = rois["boxes"].shape[1]
            logits, deltas = predictor(self.box_features(pyramid, rois["boxes"], head, len(stages), rois["valid"]))
            flat = {key: v.reshape(b * s, *v.shape[2:]) for key, v in rois.items()}
            matched_gt = jnp.take_along_axis(batch["gt_boxes"], rois["gt_index"][..., None], axis=1)
            stage_losses = box_losses(logits, deltas, flat, matched_gt.reshape(b * s, 4), k, weights,
                                      cfg.roi_heads.smooth_l1_beta)
            suffix = f"_stage{i}" if len(stages) > 1 else ""
            out.update({name + suffix: v for name, v in stage_losses.items()})
            if i == 0:
                first_deltas = deltas
            prev = (rois, jax.lax.stop_gradient(deltas), weights)
        return out, first_rois, first_deltas

    def box_branch_detect(self, pyramid, proposals, proposal_valid, image_hw):
        """Detections [B, D] from the proposals; a cascade averages the stages' class
        probabilities and takes the boxes of the last stage."""
        cfg = self.cfg
        k = cfg.num_classes
        stages = self.box_stages()
        b, p = proposals.shape[:2]
        boxes = proposals
        probs_sum, deltas = 0.0, None
        for i, (head, predictor, _, weights) in enumerate(stages):
            if i > 0:
                boxes = box_ops.clip(box_ops.decode(deltas.reshape(b, p, 4), boxes, stages[i - 1][3]),
                                     image_hw[:, 0:1], image_hw[:, 1:2])
            logits, deltas = predictor(self.box_features(pyramid, boxes, head, len(stages)))
            probs_sum = probs_sum + jax.nn.softmax(logits, axis=-1)
        probs = (probs_sum / len(stages)).reshape(b, p, -1)
        return jax.vmap(lambda pr, dl, bx, pv, hw: box_inference(
            pr, dl, bx, pv, hw, k, stages[-1][3], cfg.roi_heads))(
            probs, deltas.reshape(b, p, -1), boxes, proposal_valid, image_hw)

    # -- forward ------------------------------------------------------------------------------
    def initialize(self, batch: dict) -> None:
        """Calls every submodule once, on the shapes it sees in training, so that `init` with
        this method creates the same variables (names, shapes and values: each module draws
        from its own path's stream) as the training forward, without tracing RPN matching,
        proposals, sampling, pooling and the losses. Under foreground buckets the training
        forward calls the mask head inside nn.switch, which draws other values; this gives the
        unbucketed model's. batch: as `losses`, only image and image_hw are read."""
        with use_kernels(self.cfg.get("kernels", "auto")):
            pyramid = self.pyramid(batch["image"], batch["image_hw"])
            self.rpn_head([pyramid[n] for n in RPN_LEVELS])
            channels, dtype = pyramid["p2"].shape[-1], pyramid["p2"].dtype
            roi = lambda size: jnp.zeros((1, size, size, channels), dtype)  # noqa: E731
            for head, predictor, _, _ in self.box_stages():
                predictor(head(roi(self.cfg.roi_heads.pooler_resolution)))
            boundary = roi(self.cfg.boundary.resolution) if self.cfg.mask_head.name == "bmask" else None
            self.mask_heads(roi(self.cfg.mask_head.pooler_resolution), boundary, jnp.zeros((1,), jnp.int32))

    def __call__(self, batch: dict, train: bool = True):
        with use_kernels(self.cfg.get("kernels", "auto")):
            return self.losses(batch) if train else self.detect(batch)

    def losses(self, batch: dict) -> dict[str, jnp.ndarray]:
        """Training losses. batch: image [B, H, W, 3] uint8, image_hw [B, 2], gt_boxes [B, G, 4],
        gt_classes [B, G], gt_valid [B, G], gt_masks [B, G, M, M] uint8 (mask * 255 over the
        GT box). Draws randomness from the 'sampling' rng stream."""
        cfg = self.cfg
        k = cfg.num_classes
        images = batch["image"]
        b = images.shape[0]
        pyramid = self.pyramid(images, batch["image_hw"], train=True)
        anchors = self.anchors(images.shape[1:3])
        logits, deltas = self.rpn_head([pyramid[n] for n in RPN_LEVELS])

        rng_rpn, rng_roi = jax.random.split(self.make_rng("sampling"))
        out = rpn_losses(rng_rpn, jnp.concatenate(anchors), jnp.concatenate(logits, 1),
                         jnp.concatenate(deltas, 1), batch["gt_boxes"], batch["gt_valid"], cfg.rpn)

        proposals, _, proposal_valid, proposal_ids = self.proposals(anchors, logits, deltas, batch["image_hw"], True)
        box_out, rois, box_deltas = self.box_branch_losses(pyramid, proposals, proposal_valid, proposal_ids,
                                                           batch, rng_roi)
        out.update(box_out)
        s = rois["boxes"].shape[1]
        flat = {key: v.reshape(b * s, *v.shape[2:]) for key, v in rois.items()}

        # Mask branch on the foreground slots, which sampling puts first.
        # num_mask_rois caps the mask head's static batch (detectron2 has no cap: 128 slots).
        f = min(int(cfg.roi_heads.batch_size_per_image * cfg.roi_heads.positive_fraction),
                cfg.roi_heads.num_mask_rois, s)
        fg = {key: v[:, :f] for key, v in rois.items()}
        mask_boxes = fg["boxes"]
        if cfg.roi_heads.train_on_pred_boxes and not cfg.roi_heads.cascade.enabled:
            pred = box_ops.decode(select_class_deltas(box_deltas, flat["classes"], k),
                                  flat["boxes"], cfg.roi_heads.bbox_reg_weights)
            mask_boxes = jax.lax.stop_gradient(pred.reshape(b, s, 4)[:, :f])
        operands = (pyramid, mask_boxes, fg["classes"], fg["gt_index"], fg["is_fg"],
                    batch["gt_boxes"], batch["gt_masks"])
        sizes = foreground_slot_sizes(cfg.roi_heads.foreground_buckets, f)
        if len(sizes) == 1:
            out.update(self.mask_branch_losses(*operands))
        else:
            # detectron2 runs the mask head on this step's foreground only; static shapes allow a
            # few sizes, so run it on the smallest that holds every image's foreground. The
            # slots left out are background (weight 0): the losses and gradients are unchanged.
            need = jnp.max(jnp.sum(fg["is_fg"].astype(jnp.int32), axis=1))
            self.sow("intermediates", "most_foreground_per_image", need)
            index = jnp.searchsorted(jnp.asarray(sizes), need)
            branches = [lambda mdl, *ops, n=n: mdl.mask_branch_losses(*ops, num_slots=n) for n in sizes]
            with gradients_for_conditionals():
                out.update(nn.switch(index, branches, self, *operands))
        return out

    def mask_branch_losses(self, pyramid, mask_boxes, classes, gt_index, is_fg, gt_boxes, gt_masks,
                           num_slots: int | None = None):
        """Mask (and boundary, MaskIoU) losses of the mask RoIs [B, F]: boxes, GT classes,
        matched GT indices and foreground flags, of which the first num_slots (all if None) are
        used; gt_boxes [B, G, 4], gt_masks [B, G, M, M]."""
        if num_slots is not None:
            mask_boxes, classes, gt_index, is_fg = (x[:, :num_slots] for x in (mask_boxes, classes, gt_index, is_fg))
        b, f = classes.shape
        self.sow("intermediates", "mask_slots", jnp.int32(f))   # which size ran, for tests
        mask_logits, boundary_logits, mask_iou = self.mask_branch(pyramid, mask_boxes, classes.reshape(-1),
                                                                  is_fg.reshape(-1))
        masks = jnp.take_along_axis(gt_masks, gt_index[:, :, None, None], axis=1)
        targets = mask_targets(mask_boxes.reshape(b * f, 4),
                               jnp.take_along_axis(gt_boxes, gt_index[..., None], axis=1).reshape(b * f, 4),
                               masks.reshape(b * f, *masks.shape[2:]).astype(jnp.float32) / 255.0,
                               mask_logits.shape[1], self.cfg.roi_heads.sampling_ratio)
        return mask_losses(mask_logits, boundary_logits, classes.reshape(-1), targets,
                           is_fg.reshape(-1).astype(jnp.float32), self.cfg, mask_iou)

    def detect(self, batch: dict) -> dict[str, jnp.ndarray]:
        """Inference. Returns boxes [B, D, 4] (canvas pixels), scores [B, D], classes [B, D],
        valid [B, D], mask_probs [B, D, 28, 28] and boundary_probs ('bmask' and 'sobel') of the
        predicted class. With Mask Scoring, scores = class score x predicted MaskIoU of the
        class, and box_scores (the class scores) and mask_iou [B, D] are returned too."""
        images = batch["image"]
        b = images.shape[0]
        pyramid = self.pyramid(images, batch["image_hw"])
        anchors = self.anchors(images.shape[1:3])
        logits, deltas = self.rpn_head([pyramid[n] for n in RPN_LEVELS])
        proposals, _, proposal_valid, _ = self.proposals(anchors, logits, deltas, batch["image_hw"], False)
        boxes, scores, classes, valid = self.box_branch_detect(pyramid, proposals, proposal_valid,
                                                               batch["image_hw"])
        d = boxes.shape[1]
        flat_classes = classes.reshape(-1)
        mask_logits, boundary_logits, mask_iou = self.mask_branch(pyramid, boxes, flat_classes)
        pick = lambda x: select_class(x, flat_classes).reshape(b, d, *x.shape[1:3])  # noqa: E731
        out = {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid,
               "mask_probs": jax.nn.sigmoid(pick(mask_logits))}
        if boundary_logits is not None:
            out["boundary_probs"] = jax.nn.sigmoid(pick(boundary_logits))
        if mask_iou is not None:
            iou = jnp.take_along_axis(mask_iou, flat_classes[:, None], axis=-1).reshape(b, d)
            out.update(scores=scores * iou, box_scores=scores, mask_iou=iou)
        return out
