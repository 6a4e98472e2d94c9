"""Mask branch: Mask R-CNN's conv-upsample head, the boundary-preserving mask head
(Fig. 2 of the paper, as the authors' BoundaryPreservingHead), the Sobel mask head
(Fig. 7b), Mask Scoring R-CNN's MaskIoU head (Table 2), their targets and losses."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmask_jax.models import losses
from bmask_jax.models.layers import Conv, Deconv2x, conv_norm_relu, msra_fill, normal, xavier_fill
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
    """num_conv x (3x3 conv (+ conv_norm) + ReLU) on 14x14 RoI features -> 28x28 mask logits
    [R, 28, 28, K]. conv_norm "LN": ViTDet's mask head."""
    num_classes: int
    conv_dim: int = 256
    num_conv: int = 4
    conv_norm: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mask_features, boundary_features=None, valid=None):
        """valid [R]: the RoIs a BatchNorm's statistics count (foreground slots; None: all)."""
        x = mask_features
        for i in range(self.num_conv):
            x = conv_norm_relu(x, self.conv_dim, 3, 1, self.conv_norm, f"mask_fcn{i + 1}", self.dtype, valid)
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
    conv_norm: str = ""              # "LN" on ViTDet: every conv of the head gets the norm of the head it replaces
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mask_features, boundary_features, valid=None):
        """valid [R]: the RoIs a BatchNorm's statistics count (foreground slots; None: all)."""
        def conv(x, k, s, name):
            return conv_norm_relu(x, self.conv_dim, k, s, self.conv_norm, name, self.dtype, valid)

        f_m = mask_features
        for i in range(self.num_mask_conv):
            f_m = conv(f_m, 3, 1, f"mask_fcn{i + 1}")
        stride = boundary_features.shape[1] // mask_features.shape[1]
        f_b = conv(boundary_features, 3, stride, "downsample")
        if self.mask_to_boundary:
            f_b = f_b + conv(f_m, 1, 1, "mask_to_boundary")
        for i in range(self.num_boundary_conv):
            f_b = conv(f_b, 3, 1, f"boundary_fcn{i + 1}")
        if self.boundary_to_mask:
            f_m = conv(f_b, 1, 1, "boundary_to_mask") + f_m
        f_m = conv(f_m, 3, 1, "mask_final_fusion")
        mask_logits = MaskPredictor(self.num_classes, self.conv_dim, dtype=self.dtype,
                                    name="mask_branch")(f_m)
        boundary_logits = MaskPredictor(self.num_classes, self.conv_dim, "boundary_deconv",
                                        "boundary_predictor", dtype=self.dtype,
                                        name="boundary_branch")(f_b)
        return mask_logits, boundary_logits


# Sobel operator (Kittler 1983), applied as cross-correlation like torch's conv2d:
# x responds to left->right increases, y to top->bottom increases.
SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)
SOBEL_Y = SOBEL_X.T.copy()


def sobel_edges(maps: jnp.ndarray) -> jnp.ndarray:
    """Fixed Sobel x/y filters on single-channel maps, zero padding 1 (the map's outside counts
    as 0, as in the Laplacian boundary targets, so foreground on the RoI border is an edge).

    maps: [R, H, W] -> [R, H, W, 2] (channel 0: x, channel 1: y). Constants, not parameters.
    """
    kernel = jnp.asarray(np.stack([SOBEL_X, SOBEL_Y], axis=-1)[:, :, None, :])   # HWIO [3, 3, 1, 2]
    return jax.lax.conv_general_dilated(
        maps.astype(jnp.float32)[..., None], kernel, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def select_class(logits: jnp.ndarray, classes: jnp.ndarray) -> jnp.ndarray:
    """The channel of each RoI's class: logits [R, H, W, K], classes [R] -> [R, H, W].
    Class-agnostic maps (K == 1, e.g. the Sobel head's boundary logits) are returned as is;
    classes past K - 1 (background) are clamped."""
    if logits.shape[-1] == 1:
        return logits[..., 0]
    index = jnp.minimum(classes, logits.shape[-1] - 1).astype(jnp.int32)
    return jnp.take_along_axis(logits, index[:, None, None, None], axis=-1)[..., 0]


class SobelMaskHead(nn.Module):
    """The Sobel mask head (paper Sec. 4.4, Fig. 7b; not in the authors' code).

    Mask R-CNN's head predicts the masks; a fixed Sobel operator on the predicted mask
    probabilities gives 2 boundary features (x and y), and two 3x3 convs turn them into
    boundary logits:

        mask_features [R, 14, 14, C] -> num_conv x (3x3 conv + ReLU) -> deconv + ReLU -> 1x1
            -> mask_logits [R, 28, 28, K]
        sigmoid(mask_logits[..., class]) [R, 28, 28] -> Sobel x/y [R, 28, 28, 2]
            -> 3x3 conv hidden_dim + ReLU -> 3x3 conv 1 -> boundary_logits [R, 28, 28, 1]

    `classes` [R] picks the channel: the GT class in training, the predicted class at test
    (class 0 if None). The figure gives neither the hidden width nor the nonlinearity: we use
    hidden_dim (model.mask_head.sobel_hidden_dim, default 16) and a ReLU between the convs, so
    that the head can form |Gx|, |Gy|-like responses (the signed Sobel outputs change sign
    across a boundary). Gradients of the boundary loss flow through the Sobel filters into the
    mask predictions (no stop-gradient): the boundary supervision acts on the masks themselves,
    which is how this head can improve the masks at all (+0.8 AP over Mask R-CNN in the paper).
    The mask layers are named as MaskRCNNHead's, so Mask R-CNN weights load into them.
    """
    num_classes: int
    conv_dim: int = 256
    num_conv: int = 4
    hidden_dim: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mask_features, boundary_features=None, classes=None):
        x = mask_features
        for i in range(self.num_conv):
            x = nn.relu(Conv(self.conv_dim, 3, dtype=self.dtype, name=f"mask_fcn{i + 1}")(x))
        mask_logits = MaskPredictor(self.num_classes, self.conv_dim, dtype=self.dtype)(x)
        if classes is None:
            classes = jnp.zeros(mask_logits.shape[:1], jnp.int32)
        edges = sobel_edges(jax.nn.sigmoid(select_class(mask_logits, classes)))     # [R, 28, 28, 2]
        b = nn.relu(Conv(self.hidden_dim, 3, dtype=self.dtype, name="sobel_fcn1")(edges.astype(self.dtype)))
        b = Conv(1, 3, kernel_init=normal(0.001), dtype=self.dtype, name="sobel_predictor")(b)
        return mask_logits, b.astype(jnp.float32)


def max_pool_2x2(maps: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pool, stride 2: [R, H, W] -> [R, H/2, W/2] (28 -> 14 for the MaskIoU head)."""
    r, h, w = maps.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs even sizes, got {h}x{w}")
    return maps.reshape(r, h // 2, 2, w // 2, 2).max(axis=(2, 4))


class MaskIoUHead(nn.Module):
    """Mask Scoring R-CNN's MaskIoU head (Huang et al., CVPR 2019; the paper's Table 2, last row).

        concat(mask_features [R, 14, 14, C], max_pool_2x2(mask_probs)[..., None])  [R, 14, 14, C+1]
        -> num_conv x (3x3 conv conv_dim + ReLU), the last with stride 2 (padding 1) -> [R, 7, 7, conv_dim]
        -> flatten -> 2 x (FC fc_dim + ReLU) -> FC K -> predicted MaskIoU per class [R, K]

    mask_probs [R, 28, 28]: the predicted mask probabilities of the GT class (train) or the
    predicted class (test). Init as MS R-CNN: convs MSRA fan_out, FCs kaiming_uniform(a=1),
    output normal(0.01), biases 0. The flatten is in (H, W, C) order, as the box head's.
    """
    num_classes: int
    conv_dim: int = 256
    num_conv: int = 4
    fc_dim: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mask_features, mask_probs):
        pooled = max_pool_2x2(mask_probs)[..., None].astype(mask_features.dtype)
        x = jnp.concatenate([mask_features, pooled], axis=-1)
        for i in range(self.num_conv):
            stride = 2 if i == self.num_conv - 1 else 1
            x = nn.relu(Conv(self.conv_dim, 3, stride, kernel_init=msra_fill, dtype=self.dtype,
                             name=f"maskiou_fcn{i + 1}")(x))
        x = x.reshape(x.shape[0], -1)
        for i in range(2):
            x = nn.relu(nn.Dense(self.fc_dim, kernel_init=xavier_fill, dtype=self.dtype,
                                 name=f"maskiou_fc{i + 1}")(x))
        x = nn.Dense(self.num_classes, kernel_init=normal(0.01), dtype=self.dtype, name="maskiou")(x)
        return x.astype(jnp.float32)


def mask_iou_targets(mask_probs: jnp.ndarray, targets: jnp.ndarray, threshold: float = 0.5) -> jnp.ndarray:
    """IoU between the thresholded predicted mask and the mask target, per RoI.

    mask_probs, targets: [R, 28, 28] -> [R] = |P & T| / max(|P| + |T| - |P & T|, 1), with
    P = mask_probs > threshold. (MS R-CNN also rescales |T| by the share of the instance inside
    the RoI and thresholds logits at 0.5; we use the plain IoU of the two 28x28 masks.)
    """
    pred = (mask_probs > threshold).astype(jnp.float32)
    inter = jnp.sum(pred * targets, axis=(1, 2))
    union = jnp.sum(pred, axis=(1, 2)) + jnp.sum(targets, axis=(1, 2)) - inter
    return inter / jnp.maximum(union, 1.0)


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


def mask_losses(mask_logits, boundary_logits, classes, targets, weights, cfg,
                mask_iou=None) -> dict[str, jnp.ndarray]:
    """Mask BCE (mean over all pixels of the foreground RoIs); with a boundary branch, the
    boundary loss on the GT-class channel against the Laplacian (or mask) targets; with a
    MaskIoU head, the L2 loss of its GT-class output against the IoU of the thresholded
    predicted mask and the target (no gradient into the mask prediction).

    mask_logits: [R, 28, 28, K]; boundary_logits: [R, 28, 28, K] or [R, 28, 28, 1] (Sobel
    head) or None; classes: [R]; targets: [R, 28, 28]; weights: [R] (1 for foreground RoIs,
    0 for padding); mask_iou: [R, K] or None.
    """
    mask_pick = select_class(mask_logits, classes)
    out = {"loss_mask": losses.weighted_bce(mask_pick, targets, weights) * cfg.mask_head.loss_weight}
    if boundary_logits is not None and cfg.boundary.supervision != "none":
        target = boundary_targets(targets) if cfg.boundary.supervision == "boundary" else targets
        out["loss_boundary"] = cfg.boundary.loss_weight * losses.boundary_loss(
            select_class(boundary_logits, classes), target, weights, cfg.boundary.loss,
            cfg.boundary.dice_squared)
    if mask_iou is not None:
        ms = cfg.mask_scoring
        iou_target = jax.lax.stop_gradient(
            mask_iou_targets(jax.nn.sigmoid(mask_pick), targets, ms.mask_threshold))
        pred = jnp.take_along_axis(mask_iou, jnp.minimum(classes, mask_iou.shape[-1] - 1)[:, None], axis=-1)[:, 0]
        out["loss_mask_iou"] = ms.loss_weight * jnp.sum(weights * (pred - iou_target) ** 2) \
            / jnp.maximum(jnp.sum(weights), 1.0)
    return out
