"""Mask branch: Mask R-CNN's conv-upsample head and the boundary-preserving mask head
(Fig. 2 of the paper, as the authors' BoundaryPreservingHead), their targets and losses."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmask_jax import losses
from bmask_jax.models.layers import Conv, Deconv2x, normal
from bmask_jax.ops.boundaries import boundary_targets
from bmask_jax.ops.roi_align import bilinear_crop


class MaskPredictor(nn.Module):
    """2x2 stride-2 transposed conv + ReLU, then 1x1 conv to K class-specific logits."""
    num_classes: int
    conv_dim: int = 256
    deconv_name: str = "mask_deconv"
    predictor_name: str = "mask_predictor"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Deconv2x(self.conv_dim, dtype=self.dtype, name=self.deconv_name)(x))
        x = Conv(self.num_classes, 1, kernel_init=normal(0.001), dtype=self.dtype,
                 name=self.predictor_name)(x)
        return x.astype(jnp.float32)


class MaskRCNNHead(nn.Module):
    """num_conv x (3x3 conv + ReLU) on 14x14 RoI features -> 28x28 mask logits [R, 28, 28, K]."""
    num_classes: int
    conv_dim: int = 256
    num_conv: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mask_features, boundary_features=None):
        x = mask_features
        for i in range(self.num_conv):
            x = nn.relu(Conv(self.conv_dim, 3, dtype=self.dtype, name=f"mask_fcn{i + 1}")(x))
        return MaskPredictor(self.num_classes, self.conv_dim, dtype=self.dtype)(x), None


class BoundaryPreservingHead(nn.Module):
    """The boundary-preserving mask head.

    Mask path: num_mask_conv convs on the 14x14 mask features -> F_m.
    Boundary path: a stride-(boundary/mask resolution) conv on the boundary features, plus
    M2B fusion ReLU(1x1(F_m)); num_boundary_conv convs -> F_b.
    B2M fusion: ReLU(1x1(F_b)) + F_m, then one more conv. Two predictors, 28x28 each.
    Returns (mask_logits, boundary_logits), each [R, 28, 28, K].
    """
    num_classes: int
    conv_dim: int = 256
    num_mask_conv: int = 4
    num_boundary_conv: int = 2
    mask_to_boundary: bool = True
    boundary_to_mask: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mask_features, boundary_features):
        conv = lambda k, s, name: Conv(self.conv_dim, k, s, dtype=self.dtype, name=name)  # noqa: E731
        f_m = mask_features
        for i in range(self.num_mask_conv):
            f_m = nn.relu(conv(3, 1, f"mask_fcn{i + 1}")(f_m))
        stride = boundary_features.shape[1] // mask_features.shape[1]
        f_b = nn.relu(conv(3, stride, "downsample")(boundary_features))
        if self.mask_to_boundary:
            f_b = f_b + nn.relu(conv(1, 1, "mask_to_boundary")(f_m))
        for i in range(self.num_boundary_conv):
            f_b = nn.relu(conv(3, 1, f"boundary_fcn{i + 1}")(f_b))
        if self.boundary_to_mask:
            f_m = nn.relu(conv(1, 1, "boundary_to_mask")(f_b)) + f_m
        f_m = nn.relu(conv(3, 1, "mask_final_fusion")(f_m))
        mask_logits = MaskPredictor(self.num_classes, self.conv_dim, dtype=self.dtype,
                                    name="mask_branch")(f_m)
        boundary_logits = MaskPredictor(self.num_classes, self.conv_dim, "boundary_deconv",
                                        "boundary_predictor", dtype=self.dtype,
                                        name="boundary_branch")(f_b)
        return mask_logits, boundary_logits


def mask_targets(roi_boxes: jnp.ndarray, gt_boxes: jnp.ndarray, gt_masks: jnp.ndarray,
                 resolution: int, sampling_ratio: int = 2) -> jnp.ndarray:
    """Binary mask targets [R, resolution, resolution] for RoIs.

    roi_boxes: [R, 4] in image pixels; gt_boxes: [R, 4] the matched GT boxes; gt_masks:
    [R, M, M] in [0, 1], each GT's mask resampled over its own box (see
    data.transforms.crop_masks_to_boxes). The RoI is mapped into that crop's pixel frame
    and pooled with aligned RoIAlign, then >= 0.5, as detectron2 does for bitmasks.
    """
    m = gt_masks.shape[-1]
    gx1, gy1, gx2, gy2 = (gt_boxes[:, i:i + 1] for i in range(4))
    sx = m / jnp.maximum(gx2 - gx1, 1e-6)
    sy = m / jnp.maximum(gy2 - gy1, 1e-6)
    local = jnp.concatenate([(roi_boxes[:, 0:1] - gx1) * sx, (roi_boxes[:, 1:2] - gy1) * sy,
                             (roi_boxes[:, 2:3] - gx1) * sx, (roi_boxes[:, 3:4] - gy1) * sy], axis=1)
    crops = jax.vmap(lambda mask, box: bilinear_crop(mask, box[None], resolution, sampling_ratio)[0])(
        gt_masks.astype(jnp.float32), local)
    return (crops >= 0.5).astype(jnp.float32)


def mask_losses(mask_logits, boundary_logits, classes, targets, weights, cfg) -> dict[str, jnp.ndarray]:
    """Mask BCE (mean over all pixels of the foreground RoIs) and, with a boundary branch, the
    boundary loss on the GT-class channel against the Laplacian (or mask) targets.

    mask_logits, boundary_logits: [R, 28, 28, K]; classes: [R]; targets: [R, 28, 28];
    weights: [R] (1 for foreground RoIs, 0 for padding).
    """
    pick = lambda logits: jnp.take_along_axis(  # noqa: E731
        logits, classes[:, None, None, None], axis=-1)[..., 0]
    out = {"loss_mask": losses.weighted_bce(pick(mask_logits), targets, weights) * cfg.mask_head.loss_weight}
    if boundary_logits is not None and cfg.boundary.supervision != "none":
        target = boundary_targets(targets) if cfg.boundary.supervision == "boundary" else targets
        out["loss_boundary"] = cfg.boundary.loss_weight * losses.boundary_loss(
            pick(boundary_logits), target, weights, cfg.boundary.loss, cfg.boundary.dice_squared)
    return out
