"""Every config and paper-table row builds, and rows differ from each other as the tables say."""
import pytest

from bmask_jax.engine.summary import mask_head_macs_per_roi
from configs import bmask_rcnn, cityscapes, mask_rcnn, paper


@pytest.mark.parametrize("row", sorted(paper.ROWS))
def test_paper_rows_build(row):
    c = paper.get_config(row)
    assert c.model.num_classes == 80
    if row.startswith(("table3", "table4", "table5", "table6", "table7", "table8")):
        assert (c.data.test_short_side, c.data.max_size) == (600, 1000)
        assert c.model.backbone.depth == 50


def test_ablation_rows_change_only_what_the_table_varies():
    t6 = {r: paper.get_config(f"table6_{r}").model.boundary for r in ("no_fusion", "m2b_only", "b2m_only", "both")}
    assert [(b.mask_to_boundary, b.boundary_to_mask) for b in t6.values()] == [
        (False, False), (True, False), (False, True), (True, True)]
    assert [paper.get_config(f"table7_{r}").model.boundary.loss for r in ("bce", "weighted_bce", "dice", "dice_bce")] \
        == ["bce", "weighted_bce", "dice", "dice_bce"]
    t5 = paper.get_config("table5_p2p5_14").model.boundary
    assert tuple(t5.in_features) == ("p2", "p3", "p4", "p5") and t5.resolution == 14
    assert paper.get_config("table4_mask_targets").model.boundary.supervision == "mask"
    assert paper.get_config("table3_baseline").model.mask_head.name == "maskrcnn"
    assert paper.get_config("table1_bmask_hrnetv2_w32").model.backbone.name == "hrnet"
    assert paper.get_config("table2_bmask_mask_scoring_r101").model.mask_scoring.enabled


def test_table8_compute_matches_paper():
    # Table 8 FLOPs column: MRCNN 0.46G, LMH 0.93G, BMask 0.95G (multiply-adds, 14x14).
    got = {r: mask_head_macs_per_roi(paper.get_config(f"table8_{r}"))[0] / 1e9
           for r in ("maskrcnn", "maskrcnn_lmh", "bmask")}
    assert round(got["maskrcnn"], 2) == 0.46
    assert round(got["maskrcnn_lmh"], 2) == 0.92   # 8 x 0.1156 G; the paper rounds to 0.93
    assert round(got["bmask"], 2) == 0.95


@pytest.mark.parametrize("variant", ["bmask", "maskrcnn", "bmask_code", "maskrcnn_code", "bmask_paper",
                                     "maskrcnn_paper"])
def test_cityscapes_configs(variant):
    """Paper section 4.3 (and the authors' config for _code): short side 800..1024 in
    training, the full 1024x2048 at inference, from ImageNet R-50."""
    c = cityscapes.get_config(variant)
    assert c.model.num_classes == 8 and c.data.max_size == 2048
    assert c.data.train_short_side == tuple(range(800, 1025, 32)) and c.data.test_short_side == 1024
    assert tuple(c.data.canvas_buckets[0]) == (1024, 2048)
    assert c.model.weights == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert c.model.mask_head.name == variant.split("_")[0]
    paper = variant.endswith("paper")
    assert (c.train.batch_size, c.train.base_lr, c.train.max_iter, tuple(c.train.lr_steps)) == (
        (4, 0.005, 48000, (36000,)) if paper else (8, 0.01, 24000, (18000,)))
    with pytest.raises(ValueError, match="bmask_code, bmask_paper"):
        cityscapes.get_config("bmask_fast")


def test_unknown_variants_are_named():
    for module in (bmask_rcnn, mask_rcnn):
        with pytest.raises(ValueError, match="nope"):
            module.get_config("nope")
    with pytest.raises(ValueError, match="nope"):
        paper.get_config("nope")


# detectron2's values for configs/mask_rcnn_R_50_FPN_1x.yaml (its _BASE_ Base-RCNN-FPN.yaml
# over config/defaults.py), written out by hand: our field -> (detectron2 key, its value).
DETECTRON2_MASK_RCNN_R50_FPN_1X = {
    "num_classes": ("ROI_HEADS.NUM_CLASSES", 80),
    "input_format": ("INPUT.FORMAT", "BGR"),
    "weights": ("WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"),
    "pixel_mean": ("PIXEL_MEAN", (103.530, 116.280, 123.675)),
    "pixel_std": ("PIXEL_STD", (1.0, 1.0, 1.0)),
    "backbone.name": ("BACKBONE.NAME build_resnet_fpn_backbone", "resnet"),
    "backbone.depth": ("RESNETS.DEPTH", 50),
    "backbone.stem_channels": ("RESNETS.STEM_OUT_CHANNELS", 64),
    "backbone.res2_out_channels": ("RESNETS.RES2_OUT_CHANNELS", 256),
    "backbone.bottleneck_channels": ("RESNETS.NUM_GROUPS * WIDTH_PER_GROUP", 1 * 64),
    "backbone.stride_in_1x1": ("RESNETS.STRIDE_IN_1X1", True),
    "backbone.norm": ("RESNETS.NORM", "FrozenBN"),
    "backbone.freeze_at": ("BACKBONE.FREEZE_AT", 2),
    "fpn.channels": ("FPN.OUT_CHANNELS", 256),
    "fpn.norm": ("FPN.NORM", ""),
    "anchors.sizes": ("ANCHOR_GENERATOR.SIZES", (32, 64, 128, 256, 512)),
    "anchors.aspect_ratios": ("ANCHOR_GENERATOR.ASPECT_RATIOS", (0.5, 1.0, 2.0)),
    "anchors.strides": ("p2..p6 strides", (4, 8, 16, 32, 64)),
    "anchors.offset": ("ANCHOR_GENERATOR.OFFSET", 0.0),
    "rpn.iou_thresholds": ("RPN.IOU_THRESHOLDS", (0.3, 0.7)),
    "rpn.batch_size_per_image": ("RPN.BATCH_SIZE_PER_IMAGE", 256),
    "rpn.positive_fraction": ("RPN.POSITIVE_FRACTION", 0.5),
    "rpn.bbox_reg_weights": ("RPN.BBOX_REG_WEIGHTS", (1.0, 1.0, 1.0, 1.0)),
    "rpn.smooth_l1_beta": ("RPN.SMOOTH_L1_BETA", 0.0),
    "rpn.loss_weight": ("RPN.LOSS_WEIGHT", 1.0),
    "rpn.pre_nms_topk_train": ("RPN.PRE_NMS_TOPK_TRAIN (Base-RCNN-FPN)", 2000),
    "rpn.pre_nms_topk_test": ("RPN.PRE_NMS_TOPK_TEST (Base-RCNN-FPN)", 1000),
    "rpn.post_nms_topk_train": ("RPN.POST_NMS_TOPK_TRAIN (Base-RCNN-FPN)", 1000),
    "rpn.post_nms_topk_test": ("RPN.POST_NMS_TOPK_TEST (Base-RCNN-FPN)", 1000),
    "rpn.nms_threshold": ("RPN.NMS_THRESH", 0.7),
    "roi_heads.iou_threshold": ("ROI_HEADS.IOU_THRESHOLDS", 0.5),
    "roi_heads.batch_size_per_image": ("ROI_HEADS.BATCH_SIZE_PER_IMAGE", 512),
    "roi_heads.positive_fraction": ("ROI_HEADS.POSITIVE_FRACTION", 0.25),
    "roi_heads.pooler_resolution": ("ROI_BOX_HEAD.POOLER_RESOLUTION", 7),
    "roi_heads.num_fc": ("ROI_BOX_HEAD.NUM_FC", 2),
    "roi_heads.fc_dim": ("ROI_BOX_HEAD.FC_DIM", 1024),
    "roi_heads.bbox_reg_weights": ("ROI_BOX_HEAD.BBOX_REG_WEIGHTS", (10.0, 10.0, 5.0, 5.0)),
    "roi_heads.smooth_l1_beta": ("ROI_BOX_HEAD.SMOOTH_L1_BETA", 0.0),
    "roi_heads.train_on_pred_boxes": ("ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES", False),
    "roi_heads.class_agnostic_bbox_reg": ("ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False),
    "roi_heads.score_threshold": ("ROI_HEADS.SCORE_THRESH_TEST", 0.05),
    "roi_heads.nms_threshold": ("ROI_HEADS.NMS_THRESH_TEST", 0.5),
    "roi_heads.detections_per_image": ("TEST.DETECTIONS_PER_IMAGE", 100),
    # every foreground RoI gets a mask: at most 512 x 0.25
    "roi_heads.num_mask_rois": ("ROI_HEADS.BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION", 128),
    "roi_heads.cascade.enabled": ("META_ARCHITECTURE GeneralizedRCNN, StandardROIHeads", False),
    "mask_head.name": ("ROI_MASK_HEAD.NAME MaskRCNNConvUpsampleHead", "maskrcnn"),
    "mask_head.pooler_resolution": ("ROI_MASK_HEAD.POOLER_RESOLUTION", 14),
    "mask_head.conv_dim": ("ROI_MASK_HEAD.CONV_DIM", 256),
    "mask_head.num_conv": ("ROI_MASK_HEAD.NUM_CONV", 4),
    "mask_head.loss_weight": ("ROI_MASK_HEAD.LOSS_WEIGHT", 1.0),
    "mask_scoring.enabled": ("no MaskIoU head", False),
    "rpn.num_convs": ("RPN.CONV_DIMS [-1]", 1),
    "roi_heads.conv_dims": ("ROI_BOX_HEAD.NUM_CONV 0", ()),
    "roi_heads.conv_norm": ("ROI_BOX_HEAD.NORM", ""),
    "mask_head.conv_norm": ("ROI_MASK_HEAD.NORM", ""),
    "backbone.hrnet.*": ("unused: backbone.name is resnet", None),
    "backbone.vit.*": ("unused: backbone.name is resnet", None),
    "backbone.regnet": ("unused: backbone.name is resnet", None),
    "boundary.*": ("unused: read by the 'bmask' head only", None),
    "mask_head.sobel_hidden_dim": ("unused: read by the 'sobel' head only", None),
    "mask_scoring.*": ("unused: mask_scoring.enabled is False", None),
    "roi_heads.cascade.*": ("unused: cascade.enabled is False", None),
}
# Fields where we knowingly differ or that detectron2 has no knob for, and why.
NOT_DETECTRON2 = {
    # SPEC section 4: a static 2x2 samples per bin (TPU implementations do the same); 0 with
    # a cap (max_adaptive_samples) gives detectron2's adaptive sampling for converted weights.
    "roi_heads.sampling_ratio": 2,
    "roi_heads.max_adaptive_samples": 4,
    # detectron2 keeps every (box, class) above the score threshold before NMS; static shapes
    # keep the best 1000.
    "roi_heads.topk_candidates": 1000,
    "roi_heads.foreground_buckets": (32, 64),   # which static mask-head batch sizes are compiled
    "compute_dtype": "float32",                  # detectron2 trains in float32 by default
    "kernels": "auto",                           # which conv kernels XLA:CPU uses
}


def _leaves(d, prefix=""):
    for k, v in d.items():
        if hasattr(v, "items"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_mask_rcnn_r50_fpn_1x_is_detectron2s():
    fields = dict(_leaves(mask_rcnn.get_config("r50_fpn_1x").model))
    checked = set()
    for key, (d2_key, want) in DETECTRON2_MASK_RCNN_R50_FPN_1X.items():
        if want is None:    # a field (or group, ".*") the Mask R-CNN model never reads
            checked |= {k for k in fields if k == key or (key.endswith(".*") and k.startswith(key[:-1]))}
            continue
        got = fields[key]
        got = tuple(got) if isinstance(got, (list, tuple)) else got
        assert got == pytest.approx(want) if isinstance(want, tuple) else got == want, (key, d2_key, got, want)
        checked.add(key)
    for key, ours in NOT_DETECTRON2.items():
        got = fields[key]
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == ours, key
        checked.add(key)
    # Every model field is accounted for: a new field has to be placed in one of the tables.
    assert set(fields) == checked, sorted(set(fields) - checked)


def test_bmask_configs_differ_from_the_baseline_in_the_head_only():
    for variant in ("r50_fpn_1x", "shapes"):
        base = dict(_leaves(mask_rcnn.get_config(variant)))
        bmask = dict(_leaves(bmask_rcnn.get_config(variant)))
        assert {k for k in base if base[k] != bmask[k]} == {"model.mask_head.name",
                                                            "model.roi_heads.train_on_pred_boxes"}
        assert bmask["model.mask_head.name"] == "bmask" and bmask["model.roi_heads.train_on_pred_boxes"]


@pytest.mark.parametrize("net,epochs", [("r50", 100), ("r50", 200), ("r101", 400), ("regnetx_4gf", 100),
                                        ("regnety_4gf", 400)])
def test_lsj_baselines_are_detectron2s(net, epochs):
    """configs/new_baselines/mask_rcnn_{R_50,R_101,regnet?_4gf_dds}_FPN_{epochs}ep_LSJ.py, value
    by value (numbers copied from detectron2's files and its configs/common/models/mask_rcnn_fpn.py)."""
    for file in (mask_rcnn, bmask_rcnn):
        c = file.get_config(f"{net}_fpn_{epochs}ep_lsj")
        m, t = c.model, c.train
        if net.startswith("regnet"):
            assert (m.backbone.name, m.backbone.regnet) == ("regnet", net)
        else:
            assert (m.backbone.name, m.backbone.depth) == ("resnet", int(net[1:]))
        assert m.weights == ""
        assert (m.backbone.norm, m.backbone.freeze_at, m.fpn.norm) == ("SyncBN", 0, "SyncBN")
        assert m.rpn.num_convs == 2
        assert (tuple(m.roi_heads.conv_dims), m.roi_heads.conv_norm, m.roi_heads.num_fc, m.roi_heads.fc_dim) == \
            ((256, 256, 256, 256), "SyncBN", 1, 1024)
        assert m.mask_head.conv_norm == "SyncBN"
        std = (57.375, 57.120, 58.395) if net.startswith("regnet") else (1.0, 1.0, 1.0)   # detectron2's constants
        assert (m.input_format, tuple(m.pixel_mean), tuple(m.pixel_std)) == ("BGR", (103.530, 116.280, 123.675), std)
        assert m.compute_dtype == "bfloat16"
        assert (c.data.lsj.enabled, c.data.lsj.size, c.data.lsj.min_scale, c.data.lsj.max_scale) == (True, 1024, 0.1, 2.0)
        assert c.data.lsj.pad_value == 128.0                # FixedSizeCrop(crop_size) defaults: pad=True, 128
        assert (1024, 1024) in tuple(map(tuple, c.data.canvas_buckets))
        assert (c.data.test_short_side, c.data.max_size) == (800, 1333)
        scale = epochs // 100
        assert (t.optimizer, t.batch_size, t.base_lr, t.momentum, t.weight_decay) == ("sgd", 64, 0.1, 0.9, 4e-5)
        assert (t.warmup_iters, t.warmup_factor, t.weight_decay_norm) == (500, 0.067, 0.0)
        assert t.max_iter == 184375 * scale and tuple(t.lr_steps) == (163889 * scale, 177546 * scale)


def test_regnet_stages_are_pycls_published_ones():
    """RegNetX-4.0GF and RegNetY-4.0GF's stage widths, depths and groups as pycls's model zoo
    lists them (widths 80/240/560/1360, depths 2/5/14/2, group width 40; 128/192/512/1088,
    2/6/12/2, 64), derived from (depth, w_a, w_0, w_m) as detectron2 does."""
    from bmask_jax.models.regnet import REGNETS, regnet_parameters
    spec = {k: {n: v for n, v in s.items() if n != "se_ratio"} for k, s in REGNETS.items()}
    assert regnet_parameters(**spec["regnetx_4gf"]) == ([80, 240, 560, 1360], [2, 5, 14, 2], [40] * 4)
    assert regnet_parameters(**spec["regnety_4gf"]) == ([128, 192, 512, 1088], [2, 6, 12, 2], [64] * 4)
