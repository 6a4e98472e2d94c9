"""The name tables: which checkpoint module each of our layers comes from, per kind of
checkpoint (detectron2, torchvision, MSRA), and the keys a kind may hold that we ignore."""
from __future__ import annotations

import re
from typing import Any

from bmask_jax.weights.layers import Layer

KINDS = ("detectron2", "msra", "torchvision", "hrnet", "mae")
WHOLE_MODEL_KINDS = ("detectron2",)

Rule = tuple[str, Any]   # (regex over our layer name, source module: template or callable on the match)

# detectron2 module paths of our layers, first match wins (SPEC section 10). Cascade R-CNN's
# stage s (CascadeROIHeads) is roi_heads.box_head.{s} / roi_heads.box_predictor.{s}: it maps
# onto box_heads_{s} / box_predictors_{s} when the model has cascade stages.
DETECTRON2_RULES: list[Rule] = [
    (r"backbone/stem_conv1", "backbone.bottom_up.stem.conv1"),
    (r"backbone/stem_norm", "backbone.bottom_up.stem.conv1.norm"),
    (r"backbone/res(\d)_(\d+)/(conv\d|shortcut)", r"backbone.bottom_up.res\1.\2.\3"),
    (r"backbone/res(\d)_(\d+)/(conv\d|shortcut)_norm", r"backbone.bottom_up.res\1.\2.\3.norm"),
    # RegNet (modeling/backbone/regnet.py): stem.conv/bn, s<stage>.b<block>.proj/bn and f.a, f.a_bn, ...
    (r"backbone/stem_(conv|bn)", r"backbone.bottom_up.stem.\1"),
    (r"backbone/(s\d)_(b\d+)/(proj|bn)", r"backbone.bottom_up.\1.\2.\3"),
    (r"backbone/(s\d)_(b\d+)/f_(a|b|c)(_bn)?", lambda m: f"backbone.bottom_up.{m[1]}.{m[2]}.f.{m[3]}{m[4] or ''}"),
    (r"backbone/(s\d)_(b\d+)/f_se/f_ex_(\d)", r"backbone.bottom_up.\1.\2.f.se.f_ex.\3"),
    (r"fpn/(fpn_lateral\d|fpn_output\d)", r"backbone.\1"),
    (r"fpn/(fpn_lateral\d|fpn_output\d)_norm", r"backbone.\1.norm"),          # FPN(norm="SyncBN")
    # ViTDet (SimpleFeaturePyramid around ViT): the ViT is backbone.net, the pyramid's
    # layers backbone.simfp_<stage>.<index> (a conv's norm: .norm).
    (r"backbone/patch_embed", "backbone.net.patch_embed.proj"),
    (r"backbone", "backbone.net"),                                   # pos_embed
    (r"backbone/blocks_(\d+)/(norm1|norm2|attn|attn/qkv|attn/proj|mlp/fc1|mlp/fc2)",
     lambda m: f"backbone.net.blocks.{m[1]}.{m[2].replace('/', '.')}"),
    (r"fpn/simfp_(\d)_(\d)", r"backbone.simfp_\1.\2"),
    (r"fpn/simfp_(\d)_(\d)_norm", r"backbone.simfp_\1.\2.norm"),
    (r"rpn_head/(conv|objectness_logits|anchor_deltas)", r"proposal_generator.rpn_head.\1"),
    (r"rpn_head/conv(\d)", r"proposal_generator.rpn_head.conv.conv\1"),       # ViTDet's 2-conv head
    (r"box_head/(fc\d+|conv\d+)", r"roi_heads.box_head.\1"),
    (r"box_head/(conv\d+)_norm", r"roi_heads.box_head.\1.norm"),
    (r"box_predictor/(cls_score|bbox_pred)", r"roi_heads.box_predictor.\1"),
    (r"box_heads_(\d+)/(fc\d+|conv\d+)", r"roi_heads.box_head.\1.\2"),
    (r"box_heads_(\d+)/(conv\d+)_norm", r"roi_heads.box_head.\1.\2.norm"),
    (r"box_predictors_(\d+)/(cls_score|bbox_pred)", r"roi_heads.box_predictor.\1.\2"),
    # Mask R-CNN's head (MaskRCNNConvUpsampleHead): mask_fcn1..4, deconv, predictor.
    (r"mask_head/MaskPredictor_0/mask_deconv", "roi_heads.mask_head.deconv"),
    (r"mask_head/MaskPredictor_0/mask_predictor", "roi_heads.mask_head.predictor"),
    # The boundary-preserving head: its mask and boundary predictors keep their names.
    (r"mask_head/(?:mask|boundary)_branch/(\w+)", r"roi_heads.mask_head.\1"),
    ((r"mask_head/(mask_fcn\d+|downsample|mask_to_boundary|boundary_fcn\d+|boundary_to_mask"
      r"|mask_final_fusion)"), r"roi_heads.mask_head.\1"),
    ((r"mask_head/(mask_fcn\d+|downsample|mask_to_boundary|boundary_fcn\d+|boundary_to_mask"
      r"|mask_final_fusion)_norm"), r"roi_heads.mask_head.\1.norm"),
]

_BRANCH = "abc"
TORCHVISION_RULES: list[Rule] = [
    (r"backbone/stem_conv1", "conv1"),
    (r"backbone/stem_norm", "bn1"),
    (r"backbone/res(\d)_(\d+)/conv(\d)", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}"),
    (r"backbone/res(\d)_(\d+)/conv(\d)_norm", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}"),
    (r"backbone/res(\d)_(\d+)/shortcut", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0"),
    (r"backbone/res(\d)_(\d+)/shortcut_norm", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1"),
]

MSRA_RULES: list[Rule] = [
    (r"backbone/stem_conv1", "conv1"),
    (r"backbone/stem_norm", "res_conv1_bn"),
    (r"backbone/res(\d)_(\d+)/conv(\d)", lambda m: f"res{m[1]}_{m[2]}_branch2{_BRANCH[int(m[3]) - 1]}"),
    (r"backbone/res(\d)_(\d+)/conv(\d)_norm", lambda m: f"res{m[1]}_{m[2]}_branch2{_BRANCH[int(m[3]) - 1]}_bn"),
    (r"backbone/res(\d)_(\d+)/shortcut", r"res\1_\2_branch1"),
    (r"backbone/res(\d)_(\d+)/shortcut_norm", r"res\1_\2_branch1_bn"),
]

# HRNet-Image-Classification's ImageNet checkpoints (hrnetv2_w32_imagenet_pretrained.pth,
# lib/models/cls_hrnet.py): the stem conv1/bn1/conv2/bn2, stage 1 as `layer1` (bottlenecks),
# transition<t>.<branch>.{0: conv, 1: bn} (a width change) or .<branch>.<k>.{0, 1} (a new branch),
# stage<s>.<module>.branches.<b>.<k> (basic blocks) and .fuse_layers.<i>.<j>[.<k>].{0, 1}.
HRNET_RULES: list[Rule] = [
    (r"backbone/stem_conv(\d)", r"conv\1"),
    (r"backbone/stem_norm(\d)", r"bn\1"),
    (r"backbone/res2_(\d+)/conv(\d)", r"layer1.\1.conv\2"),
    (r"backbone/res2_(\d+)/conv(\d)_norm", r"layer1.\1.bn\2"),
    (r"backbone/res2_(\d+)/shortcut", r"layer1.\1.downsample.0"),
    (r"backbone/res2_(\d+)/shortcut_norm", r"layer1.\1.downsample.1"),
    (r"backbone/transition(\d)_(\d)_conv", r"transition\1.\2.0"),
    (r"backbone/transition(\d)_(\d)_norm", r"transition\1.\2.1"),
    (r"backbone/transition(\d)_(\d)_(\d)_conv", r"transition\1.\2.\3.0"),
    (r"backbone/transition(\d)_(\d)_(\d)_norm", r"transition\1.\2.\3.1"),
    (r"backbone/stage(\d)_(\d+)/branch(\d)_(\d+)/conv(\d)", r"stage\1.\2.branches.\3.\4.conv\5"),
    (r"backbone/stage(\d)_(\d+)/branch(\d)_(\d+)/conv(\d)_norm", r"stage\1.\2.branches.\3.\4.bn\5"),
    (r"backbone/stage(\d)_(\d+)/fusion/fuse(\d)_(\d)_conv", r"stage\1.\2.fuse_layers.\3.\4.0"),
    (r"backbone/stage(\d)_(\d+)/fusion/fuse(\d)_(\d)_norm", r"stage\1.\2.fuse_layers.\3.\4.1"),
    (r"backbone/stage(\d)_(\d+)/fusion/fuse(\d)_(\d)_(\d)_conv", r"stage\1.\2.fuse_layers.\3.\4.\5.0"),
    (r"backbone/stage(\d)_(\d+)/fusion/fuse(\d)_(\d)_(\d)_norm", r"stage\1.\2.fuse_layers.\3.\4.\5.1"),
]

# MAE's ImageNet ViTs (mae_pretrain_vit_*.pth: the encoder, timm's names), into ViTDet's
# backbone as detectron2's matching heuristics put them: each key lands on the model key it is
# a suffix of (blocks.3.attn.qkv.weight -> backbone.net.blocks.3.attn.qkv.weight). The
# relative position tables have no counterpart (they start at zero, as in ViTDet), nor has
# anything above the ViT.
MAE_RULES: list[Rule] = [
    (r"backbone/patch_embed", "patch_embed.proj"),
    (r"backbone", ""),                                               # pos_embed
    (r"backbone/blocks_(\d+)/(norm1|norm2|attn/qkv|attn/proj|mlp/fc1|mlp/fc2)",
     lambda m: f"blocks.{m[1]}.{m[2].replace('/', '.')}"),
]

RULES = {"detectron2": DETECTRON2_RULES, "torchvision": TORCHVISION_RULES, "msra": MSRA_RULES,
         "hrnet": HRNET_RULES, "mae": MAE_RULES}

# Source keys a kind may hold that have no place in our model: reported, not an error.
IGNORED = {
    "detectron2": [r"pixel_mean", r"pixel_std", r".*num_batches_tracked",
                   r"proposal_generator\.anchor_generator\..*"],
    "torchvision": [r"fc\.(weight|bias)", r".*num_batches_tracked"],
    "msra": [r"pred_[wb]", r"fc1000_[wb]", r".*_momentum"],
    # the classification head: incre_modules, downsamp_modules, final_layer, classifier
    "hrnet": [r"(incre_modules|downsamp_modules|final_layer|classifier)\..*", r".*num_batches_tracked"],
    # the class token and the encoder's last norm (ViTDet uses neither), a classifier if any
    "mae": [r"cls_token", r"mask_token", r"norm\.(weight|bias)", r"fc_norm\.(weight|bias)", r"head\..*",
            r"decoder.*"],
}

# Layers whose input is the flattened RoI feature map: (C, H, W) in detectron2, (H, W, C) here.
FLATTENED_ROI_INPUT = r"box_head/fc1|box_heads_\d+/fc1"
CASCADE_KEY = r"roi_heads\.(box_head|box_predictor)\.\d+\..*"
CLS_SCORE = r"box_predictors?(_\d+)?/cls_score"


def source_module(layer: Layer, rules: list[Rule]) -> str | None:
    for pattern, target in rules:
        m = re.fullmatch(pattern, layer.name)
        if m:
            return target(m) if callable(target) else m.expand(target)
    return None


def source_keys(kind: str, layer: Layer, module: str) -> dict[str, str]:
    """The checkpoint keys of one layer, by role (weight, bias, running_mean, ...)."""
    if kind == "msra":
        if layer.kind == "frozen_bn":
            return {"scale": f"{module}_s", "shift": f"{module}_b"}
        roles = {"weight": f"{module}_w"}
        if "bias" in layer.leaves:
            roles["bias"] = f"{module}_b"
        return roles
    if layer.kind == "frozen_bn":
        return {r: f"{module}.{r}" for r in ("weight", "bias", "running_mean", "running_var")}
    if layer.kind == "bn_stats":
        return {r: f"{module}.{r}" for r in ("running_mean", "running_var")}
    if layer.kind == "tensor":
        return {leaf: f"{module}.{leaf}" if module else leaf for leaf in layer.leaves}
    roles = {"weight": f"{module}.weight"}
    if "bias" in layer.leaves or layer.kind in ("group_norm", "layer_norm"):
        roles["bias"] = f"{module}.bias"
    return roles
