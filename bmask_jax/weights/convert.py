"""Whole checkpoints: a flat checkpoint dict into our 'params' and 'frozen' trees, with every
check, hint and error message, the report, and the config the weights imply."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from bmask_jax.weights.errors import WeightImportError
from bmask_jax.weights.layers import Layer, flatten, model_layers, unflatten
from bmask_jax.weights.layouts import (CASCADE_KEY, CLS_SCORE, FLATTENED_ROI_INPUT, IGNORED, KINDS, RULES,
                                       WHOLE_MODEL_KINDS, source_keys, source_module)
from bmask_jax.weights.tensors import convert_layer, expected_source_shapes


@dataclasses.dataclass
class ImportReport:
    """What an import did: keys used, our layers left at their initial values, keys with no
    place in the model, and the config (dotted key: value) the weights come with."""
    source: str
    kind: str
    loaded: list[str] = dataclasses.field(default_factory=list)             # checkpoint keys used
    initialised_fresh: list[str] = dataclasses.field(default_factory=list)  # our layers left at init
    ignored: list[str] = dataclasses.field(default_factory=list)            # keys with no place here
    config_changes: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"imported {self.source} ({self.kind}): {len(self.loaded)} arrays loaded"]
        if self.initialised_fresh:
            lines.append(f"initialised fresh ({len(self.initialised_fresh)} layers): "
                         + ", ".join(self.initialised_fresh))
        if self.ignored:
            lines.append(f"ignored ({len(self.ignored)}): " + ", ".join(self.ignored))
        if self.config_changes:
            lines.append("config the weights imply: " + ", ".join(
                f"{k}={v!r}" for k, v in self.config_changes.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def detect_kind(checkpoint: dict[str, np.ndarray], source: str = "checkpoint") -> str:
    """'detectron2' (module paths like backbone.bottom_up..., roi_heads...), 'msra' (Caffe2
    blobs conv1_w, res2_0_branch2a_w, ...), 'hrnet' (conv1, conv2, layer1, stage2.0.branches...)
    'torchvision' (conv1.weight, layer1.0...) or 'mae' (MAE's ViT encoder: patch_embed.proj,
    blocks.0.attn.qkv...)."""
    keys = set(checkpoint)
    if any(k.startswith(("backbone.", "roi_heads.", "proposal_generator.")) for k in keys):
        return "detectron2"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.0.attn.qkv.") for k in keys):
        return "mae"
    if "conv1_w" in keys or "res_conv1_bn_s" in keys:
        return "msra"
    if any(k.startswith("stage2.0.branches.") for k in keys) and "conv2.weight" in keys:
        return "hrnet"                     # before torchvision: it also has conv1 and layer1
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    if any(k.startswith(("stem.", "res2.")) for k in keys):
        raise WeightImportError(f"{source}: looks like a detectron2 backbone-only file (stem.*, res2.*); "
                                "only whole detectron2 models, MSRA .pkl and torchvision .pth backbones "
                                "are supported")
    raise WeightImportError(f"{source}: cannot tell the checkpoint's kind from its keys "
                            f"(e.g. {sorted(keys)[:8]}); pass --kind")


def _check_cascade(checkpoint: dict, layers: list[Layer], kind: str, source: str) -> None:
    """A Cascade R-CNN checkpoint (one box head per stage) fits only a model with stages."""
    if kind != "detectron2":
        return
    theirs = sorted(k for k in checkpoint if re.fullmatch(CASCADE_KEY, k))
    ours = any(layer.name.startswith("box_heads_") for layer in layers)
    if theirs and not ours:
        raise WeightImportError(
            f"{source}: a Cascade R-CNN checkpoint ({theirs[0]}, ...: one box head per stage) is not "
            "supported by this model: it has no cascade stages to load it into")
    if ours and not theirs:
        raise WeightImportError(f"{source}: the model has Cascade R-CNN stages but the checkpoint has a "
                                "single box head (roi_heads.box_head.fc1...); turn the cascade off")


def implied_config_changes(kind: str, checkpoint: dict[str, np.ndarray]) -> tuple[dict[str, Any], list[str]]:
    """The config the weights come with (SPEC sections 1-2), as {dotted key: value}, and notes
    on how it was decided. MSRA: BGR, mean (103.530, 116.280, 123.675), std 1, stride in the
    1x1 conv. torchvision: RGB, ImageNet mean/std x 255, stride in the 3x3. detectron2: from its
    stored pixel_mean/pixel_std when present, else detectron2's defaults (MSRA-initialised).
    hrnet (HRNet-Image-Classification's ImageNet models): RGB with ImageNet mean/std x 255."""
    msra = {"model.input_format": "BGR", "model.pixel_mean": (103.530, 116.280, 123.675),
            "model.pixel_std": (1.0, 1.0, 1.0), "model.backbone.stride_in_1x1": True}
    torchvision = {"model.input_format": "RGB", "model.pixel_mean": (123.675, 116.280, 103.530),
                   "model.pixel_std": (58.395, 57.120, 57.375), "model.backbone.stride_in_1x1": False}
    notes = []
    if kind == "msra":
        changes = dict(msra)
    elif kind == "torchvision":
        changes = dict(torchvision)
    elif kind in ("hrnet", "mae"):
        # Stride placement does not apply (HRNet's stage 1 runs at stride 1; a ViT has none).
        changes = {k: v for k, v in torchvision.items() if k != "model.backbone.stride_in_1x1"}
    else:
        if "pixel_mean" in checkpoint:
            mean = tuple(round(float(x), 3) for x in np.ravel(checkpoint["pixel_mean"]))
            std = tuple(round(float(x), 3) for x in np.ravel(checkpoint.get("pixel_std", np.ones(3))))
            bgr = mean[0] < mean[2]           # blue has the lowest ImageNet mean
            changes = {"model.input_format": "BGR" if bgr else "RGB", "model.pixel_mean": mean,
                       "model.pixel_std": std, "model.backbone.stride_in_1x1": bgr}
            notes.append("pixel_mean/pixel_std from the checkpoint; channel order and stride_in_1x1 "
                         f"inferred from the mean's order ({'BGR: MSRA' if bgr else 'RGB: torchvision'} "
                         "initialisation)")
        elif any(k.startswith("backbone.bottom_up.s1.b1.") for k in checkpoint):
            changes = {"model.input_format": "BGR", "model.pixel_mean": msra["model.pixel_mean"],
                       "model.pixel_std": (57.375, 57.120, 58.395)}
            notes.append("the checkpoint stores no pixel_mean: a RegNet model, so BGR with the ImageNet mean "
                         "and std (detectron2's configs for its RegNets)")
        elif any(k.startswith("backbone.net.blocks.") for k in checkpoint):
            changes = {k: v for k, v in torchvision.items() if k != "model.backbone.stride_in_1x1"}
            notes.append("the checkpoint stores no pixel_mean: a ViTDet model, so ViTDet's RGB with ImageNet "
                         "mean/std (detectron2's configs/common/models/mask_rcnn_vitdet.py)")
        else:
            changes = dict(msra)
            notes.append("the checkpoint stores no pixel_mean: assumed detectron2's defaults "
                         "(BGR, MSRA mean, std 1, stride_in_1x1=True)")
    if kind == "mae":
        return changes, notes                 # a ViT: model.backbone.norm does not apply
    if kind == "detectron2" and any(re.fullmatch(r"backbone\.bottom_up\..*norm\.num_batches_tracked", k)
                                    for k in checkpoint):
        # Trained with (Sync)BatchNorm, whose buffers include num_batches_tracked (detectron2's
        # FrozenBatchNorm2d has none): the large-scale-jitter baselines, trained from scratch.
        changes["model.backbone.norm"] = "SyncBN"
        notes.append("BatchNorm buffers with num_batches_tracked: a model trained with SyncBN")
    elif kind != "detectron2" or any(k.endswith("norm.running_mean") for k in checkpoint):
        changes["model.backbone.norm"] = "FrozenBN"
    elif any(re.fullmatch(r"backbone\.bottom_up\..*norm\.weight", k) for k in checkpoint):
        changes["model.backbone.norm"] = "GN"
    return changes, notes


def _roi_chw(layers: list[Layer], roi_channels: int | None) -> tuple[int, int, int] | None:
    """(C, H, W) of the box head's flattened input: C = the FPN's width, H = W from fc1's size."""
    by_name = {layer.name: layer for layer in layers}
    fc1 = next((x for x in layers if re.fullmatch(FLATTENED_ROI_INPUT, x.name)), None)
    if fc1 is None:
        return None
    # The map fc1 flattens: the box head's last conv (ViTDet's 4conv1fc), else the pyramid's
    # P2 (the FPN's, or the simple feature pyramid's last 3x3).
    head = fc1.name.rsplit("/", 1)[0]
    convs = sorted((x for x in layers if re.fullmatch(re.escape(head) + r"/conv\d+", x.name)),
                   key=lambda x: int(x.name.rsplit("conv", 1)[1]))
    if roi_channels is None:
        source = convs[-1] if convs else by_name.get("fpn/fpn_output2") or by_name.get("fpn/simfp_2_5")
        roi_channels = source.shape("kernel")[-1] if source is not None else None
    if roi_channels is None:
        raise WeightImportError(f"cannot tell the channels of {fc1.name}'s input (no FPN in the tree): "
                                "pass roi_channels")
    side = math.isqrt(fc1.shape("kernel")[0] // roi_channels)
    if side * side * roi_channels != fc1.shape("kernel")[0]:
        raise WeightImportError(f"{fc1.name} takes {fc1.shape('kernel')[0]} inputs, not C x R x R "
                                f"with C = {roi_channels}")
    return roi_channels, side, side


def _class_count_check(checkpoint: dict, layers: list[Layer], source: str) -> None:
    """Class-count mismatch first, with a hint, rather than as a list of mis-shaped keys."""
    key = next((k for k in sorted(checkpoint)
                if re.fullmatch(r"roi_heads\.box_predictor\.(\d+\.)?cls_score\.weight", k)), None)
    layer = next((x for x in layers if re.fullmatch(CLS_SCORE, x.name)), None)
    if key is not None and layer is not None:
        theirs = checkpoint[key].shape[0] - 1
        ours = layer.shape("kernel")[1] - 1
        if theirs != ours:
            raise WeightImportError(
                f"{source}: the checkpoint predicts {theirs} classes ({theirs + 1} logits with background) "
                f"but the model has model.num_classes={ours}; use --config.model.num_classes={theirs} "
                "(or a config for that dataset)")


def _hints(checkpoint: dict, layers: list[Layer], kind: str) -> list[str]:
    names = {layer.name for layer in layers}
    hints = []
    try:
        detected = detect_kind(checkpoint)
    except WeightImportError:
        detected = kind
    if detected != kind:
        hints.append(f"the keys look like a {detected} checkpoint, not {kind}: try --kind auto")
    if kind == "detectron2":
        ours_bmask = "mask_head/boundary_branch/boundary_predictor" in names
        theirs_bmask = "roi_heads.mask_head.boundary_predictor.weight" in checkpoint
        theirs_mrcnn = "roi_heads.mask_head.predictor.weight" in checkpoint
        if ours_bmask and theirs_mrcnn:
            hints.append("the checkpoint has Mask R-CNN's mask head: use configs/mask_rcnn.py")
        if not ours_bmask and theirs_bmask:
            hints.append("the checkpoint has the boundary-preserving mask head: use configs/bmask_rcnn.py")
    stage = {"detectron2": r"backbone\.bottom_up\.res4\.(\d+)\.", "torchvision": r"layer3\.(\d+)\.",
             "msra": r"res4_(\d+)_"}.get(kind)
    if stage is None:
        return hints
    theirs = {int(m[1]) for k in checkpoint if (m := re.match(stage, k))}
    ours = {int(m[1]) for n in names if (m := re.match(r"backbone/res4_(\d+)/", n))}
    if theirs and ours and len(theirs) != len(ours):
        depth = {6: "ResNet-50", 23: "ResNet-101", 36: "ResNet-152"}
        hints.append(f"the checkpoint's res4 has {len(theirs)} blocks ({depth.get(len(theirs), '?')}), the model's "
                     f"{len(ours)} ({depth.get(len(ours), '?')}): set model.backbone.depth (e.g. the "
                     ":r101_fpn_1x variant)")
    return hints


def _norm_mismatch(layer: Layer, checkpoint: dict, module: str, kind: str) -> str | None:
    """A BatchNorm checkpoint against a GroupNorm model (or the reverse), said as such."""
    bn_key = f"{module}_s" if kind == "msra" else f"{module}.running_mean"
    if layer.kind == "group_norm" and bn_key in checkpoint:
        return (f"{module} holds BatchNorm weights but the model's {layer.name} is GroupNorm: set "
                "model.backbone.norm='FrozenBN'")
    if (layer.kind == "frozen_bn" and kind != "msra" and f"{module}.weight" in checkpoint
            and bn_key not in checkpoint):
        return (f"{module} has no running statistics (GroupNorm?) but the model's {layer.name} is FrozenBN: "
                "set model.backbone.norm='GN'")
    return None


def convert(checkpoint: dict[str, np.ndarray], params, frozen, kind: str = "auto", source: str = "checkpoint",
            roi_channels: int | None = None) -> tuple[dict, dict, ImportReport]:
    """Fill our 'params' and 'frozen' trees (nested dicts of arrays, or any subtree rooted like
    BMaskRCNN's: backbone/..., fpn/...) from a flat checkpoint dict.

    detectron2: every layer with a detectron2 name must be there, with the right shape, and
    every checkpoint key must be used (or be a known non-parameter, e.g. pixel_mean); layers
    detectron2 has no counterpart for (e.g. the Sobel or MaskIoU heads) keep their values and
    are reported as initialised fresh. msra / torchvision: the same for the backbone; all other
    layers keep their values (initialised fresh). Everything wrong is named in one
    WeightImportError. roi_channels: the box head's input width, when the trees hold no FPN.
    Returns new (params, frozen) trees as numpy arrays, and the report.
    """
    if kind == "auto":
        kind = detect_kind(checkpoint, source)
    if kind not in KINDS:
        raise WeightImportError(f"unknown kind {kind!r}; choose one of {KINDS} or 'auto'")
    layers = model_layers(params, frozen)
    _check_cascade(checkpoint, layers, kind, source)
    _class_count_check(checkpoint, layers, source)
    roi_chw = _roi_chw(layers, roi_channels) if kind in WHOLE_MODEL_KINDS else None
    changes, notes = implied_config_changes(kind, checkpoint)
    report = ImportReport(source, kind, config_changes=changes, notes=notes)

    new = {"params": flatten(params), "frozen": flatten(frozen)}
    missing, misshaped, problems, used = [], [], [], set()
    for layer in sorted(layers, key=lambda x: x.name):
        module = source_module(layer, RULES[kind])
        if module is None:
            report.initialised_fresh.append(layer.name)
            continue
        if (problem := _norm_mismatch(layer, checkpoint, module, kind)) is not None:
            problems.append(problem)
            continue
        roles = source_keys(kind, layer, module)
        used.update(k for k in roles.values() if k in checkpoint)
        absent, bad = _check_layer_keys(layer, roles, checkpoint)
        missing += absent
        misshaped += bad
        if absent or bad:
            continue
        arrays = {r: np.asarray(checkpoint[k], np.float32) for r, k in roles.items()}
        for leaf, value in convert_layer(layer, arrays, roi_chw).items():
            collection, path, shape = layer.leaves[leaf]
            assert value.shape == shape, (layer.name, leaf, value.shape, shape)
            new[collection][path] = np.ascontiguousarray(value, np.float32)
        report.loaded.extend(roles.values())

    leftover = sorted(set(checkpoint) - used)
    ignorable = [k for k in leftover if any(re.fullmatch(p, k) for p in IGNORED[kind])]
    unexpected = [k for k in leftover if k not in ignorable]
    report.ignored = ignorable
    if missing or misshaped or unexpected or problems:
        raise WeightImportError(_error_message(source, kind, missing, unexpected, misshaped, problems,
                                               _hints(checkpoint, layers, kind)))
    if kind == "detectron2" and report.initialised_fresh:
        report.notes.append("the layers initialised fresh have no detectron2 counterpart")
    return unflatten(new["params"]), unflatten(new["frozen"]), report


def _check_layer_keys(layer: Layer, roles: dict[str, str], checkpoint: dict) -> tuple[list[str], list[str]]:
    """(missing keys, mis-shaped keys) of one layer, each described for the error message."""
    expected = expected_source_shapes(layer, roles)
    missing = [f"{k} (for {layer.name})" for k in roles.values() if k not in checkpoint]
    misshaped = [f"{k}: checkpoint {tuple(checkpoint[k].shape)}, model expects {expected[r]} (for {layer.name})"
                 for r, k in roles.items() if k in checkpoint and tuple(checkpoint[k].shape) != expected[r]]
    return missing, misshaped


def _error_message(source, kind, missing, unexpected, misshaped, problems, hints) -> str:
    lines = [f"cannot import {source} ({kind}) into this model:"]
    for title, items in (("missing in the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                         ("mis-shaped", misshaped), ("norm mismatch", problems)):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {item}" for item in items]
    lines += [f"  hint: {h}" for h in hints]
    return "\n".join(lines)
