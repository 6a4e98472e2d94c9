"""Architecture parity with detectron2 (SPEC section 11) and the paper's mask-head cost."""
from bmask_jax.engine.summary import mask_head_macs_per_roi, parameter_counts
from configs import bmask_rcnn, mask_rcnn

# detectron2's Mask R-CNN / BMask R-CNN R50-FPN with 80 classes (SPEC section 11).
D2_COMMON = {"backbone": 23_454_912, "fpn": 3_344_384, "rpn_head": 593_935,
             "box_head": 13_895_680, "box_predictor": 411_025}


def test_mask_rcnn_r50_fpn_parameter_counts_equal_detectron2():
    counts = parameter_counts(mask_rcnn.get_config("r50_fpn_1x"))
    assert counts == dict(D2_COMMON, mask_head=2_643_280)
    assert sum(counts.values()) == 44_343_216


def test_bmask_rcnn_r50_fpn_parameter_counts_equal_detectron2():
    counts = parameter_counts(bmask_rcnn.get_config("r50_fpn_1x"))
    assert counts == dict(D2_COMMON, mask_head=5_418_144)
    assert sum(counts.values()) == 47_118_080


def test_r101_backbone_parameter_count():
    assert parameter_counts(bmask_rcnn.get_config("r101_fpn_1x"))["backbone"] == 42_394_816


def test_mask_head_cost_matches_hand_count():
    conv3 = 14 * 14 * 9 * 256 * 256        # one 3x3 conv, 256 -> 256, at 14x14
    conv1 = 14 * 14 * 256 * 256            # one 1x1 fusion conv
    core, _ = mask_head_macs_per_roi(mask_rcnn.get_config("r50_fpn_1x"))
    assert core == 4 * conv3               # 0.46 G in the paper's Table 8
    # BMask: 4 mask convs, the stride-2 downsample (output 14x14), 2 boundary convs, the final
    # fusion conv, and the two 1x1 fusions: 0.95 G in Table 8.
    core, _ = mask_head_macs_per_roi(bmask_rcnn.get_config("r50_fpn_1x"))
    assert core == 8 * conv3 + 2 * conv1
