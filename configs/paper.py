"""One variant per row of the paper's Tables 1 and 3-8 (and Table 2's Mask Scoring row).

    python -m bmask_jax.main --config configs/paper.py:table6_m2b_only --workdir runs/t6_m2b

Tables 1-2 use the 1x COCO setting (800x1333). The ablations of Tables 3-8 use ResNet-50-FPN
with the short side 600 and the long side at most 1000 (paper Sec. 4.1, SPEC section 8).
`python -m bmask_jax.main --config configs/paper.py:list` is not a run: see ROWS below.
"""
from bmask_jax import config as base_config


def _coco(head: str, depth: int = 50):
    return base_config.mask_head(base_config.coco(base_config.base(), depth), head)


def _hrnet(head: str):
    return base_config.mask_head(base_config.hrnet_coco(base_config.base(), 32), head)


def _ablation(head: str = "bmask", **boundary):
    """Tables 3-8: R50-FPN at 600/1000, BMask head with the given boundary settings."""
    c = _coco(head)
    c.data.update(train_short_side=(600,), test_short_side=600, max_size=1000,
                  canvas_buckets=((608, 1024), (1024, 608), (1024, 1024)))
    c.model.boundary.update(**boundary)
    return c


def _lmh():
    c = _ablation("maskrcnn")
    c.model.mask_head.num_conv = 8      # the larger mask head (LMH): 4 more 3x3 convs
    return c


def _mask_scoring():
    c = _coco("bmask", 101)
    c.model.mask_scoring.enabled = True
    return c


# Table 3 builds BMask up from Mask R-CNN: boundary supervision with BCE and no fusions,
# then the fusions, then Dice-BCE, then boundary features from P2 at 28x28 (the earlier rows
# pool boundary features like mask features: P2-P5 by level at 14x14).
_EARLY = dict(in_features=("p2", "p3", "p4", "p5"), resolution=14)

ROWS = {
    # Table 1: COCO val2017, 1x.
    "table1_maskrcnn_r50": lambda: _coco("maskrcnn", 50),
    "table1_bmask_r50": lambda: _coco("bmask", 50),
    "table1_maskrcnn_r101": lambda: _coco("maskrcnn", 101),
    "table1_bmask_r101": lambda: _coco("bmask", 101),
    "table1_maskrcnn_hrnetv2_w32": lambda: _hrnet("maskrcnn"),
    "table1_bmask_hrnetv2_w32": lambda: _hrnet("bmask"),
    # Table 2, last row: BMask R-CNN with Mask Scoring, R101-FPN.
    "table2_bmask_mask_scoring_r101": _mask_scoring,
    # Table 3: adding components.
    "table3_baseline": lambda: _ablation("maskrcnn"),
    "table3_boundary": lambda: _ablation(loss="bce", mask_to_boundary=False, boundary_to_mask=False, **_EARLY),
    "table3_fusions": lambda: _ablation(loss="bce", **_EARLY),
    "table3_dice_bce": lambda: _ablation(loss="dice_bce", **_EARLY),
    "table3_roi_strategy": lambda: _ablation(),
    # Table 4: what supervises the boundary head.
    "table4_no_supervision": lambda: _ablation(supervision="none"),
    "table4_mask_targets": lambda: _ablation(supervision="mask"),
    "table4_boundary_targets": lambda: _ablation(supervision="boundary"),
    # Table 5: boundary RoI features: source and size.
    "table5_p2p5_14": lambda: _ablation(in_features=("p2", "p3", "p4", "p5"), resolution=14),
    "table5_p2_14": lambda: _ablation(in_features=("p2",), resolution=14),
    "table5_p2p5_28": lambda: _ablation(in_features=("p2", "p3", "p4", "p5"), resolution=28),
    "table5_p2_28": lambda: _ablation(in_features=("p2",), resolution=28),
    # Table 6: fusion blocks.
    "table6_no_fusion": lambda: _ablation(mask_to_boundary=False, boundary_to_mask=False),
    "table6_m2b_only": lambda: _ablation(mask_to_boundary=True, boundary_to_mask=False),
    "table6_b2m_only": lambda: _ablation(mask_to_boundary=False, boundary_to_mask=True),
    "table6_both": lambda: _ablation(),
    # Table 7: boundary loss.
    "table7_bce": lambda: _ablation(loss="bce"),
    "table7_weighted_bce": lambda: _ablation(loss="weighted_bce"),
    "table7_dice": lambda: _ablation(loss="dice"),
    "table7_dice_bce": lambda: _ablation(loss="dice_bce"),
    # Table 8: equal compute.
    "table8_maskrcnn": lambda: _ablation("maskrcnn"),
    "table8_maskrcnn_lmh": _lmh,
    "table8_bmask": lambda: _ablation(),
}


def get_config(row: str = "table1_bmask_r50"):
    if row not in ROWS:
        raise ValueError(f"configs/paper.py has no row {row!r}; rows: {', '.join(ROWS)}")
    return ROWS[row]()
