"""End-to-end parity with detectron2 itself (issue 3, item 4).

A detectron2 Mask R-CNN / Cascade Mask R-CNN R50-FPN with random weights runs on an image the
way detectron2's DefaultPredictor does (ResizeShortestEdge, normalise, pad to a multiple of
32, RPN, box head inference, mask pasting); its state dict, saved with torch.save, goes
through our weight import and our predict path (prepare_example, the jitted detector,
postprocess). Both must return the same detections: classes, scores, boxes and masks.

detectron2 is not on PyPI and its C++ extension needs a compiler, so this module is skipped
unless `import detectron2` works. Its Python sources suffice: the extension only serves
deformable convolution, rotated boxes and the fast COCO evaluator, none of which run here, so
a missing `detectron2._C` is replaced by an empty module. See docs/model_zoo.md ("Checking against
detectron2") for the commands.
"""
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

if importlib.util.find_spec("detectron2") is None:
    pytest.skip("detectron2 is not importable (see docs/model_zoo.md, 'Checking against detectron2')",
                allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
if importlib.util.find_spec("detectron2._C") is None:
    sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")
from PIL import Image  # noqa: E402

if not hasattr(Image, "LINEAR"):        # detectron2 <= 0.6 names a constant Pillow 10 removed
    Image.LINEAR = Image.BILINEAR

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import jax  # noqa: E402
from bmask_jax import config as config_lib  # noqa: E402
from bmask_jax import weights  # noqa: E402
from bmask_jax.data.synthetic import SyntheticShapes  # noqa: E402
from bmask_jax.data.transforms import prepare_example  # noqa: E402
from bmask_jax.evaluation.evaluate import make_detector  # noqa: E402
from bmask_jax.ops.postprocess import postprocess  # noqa: E402
from bmask_jax.engine.variables import restore_variables  # noqa: E402
from helpers import assert_same_detections, scale_d2_predictors  # noqa: E402

NUM_CLASSES = 5
SHORT, MAX_SIZE = 320, 512


def d2_config(cascade: bool, sampling_ratio: int):
    """detectron2's Base-RCNN-FPN.yaml (+ Cascade) as code, at a small test size."""
    cfg = get_cfg()
    m = cfg.MODEL
    m.DEVICE = "cpu"
    m.MASK_ON = True
    m.BACKBONE.NAME = "build_resnet_fpn_backbone"
    m.RESNETS.DEPTH = 50
    m.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    m.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    m.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    m.RPN.PRE_NMS_TOPK_TEST = 1000
    m.RPN.POST_NMS_TOPK_TEST = 1000
    m.ROI_HEADS.NAME = "CascadeROIHeads" if cascade else "StandardROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    m.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_FC = 2
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    m.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = sampling_ratio
    m.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    m.ROI_MASK_HEAD.NUM_CONV = 4
    m.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    m.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = sampling_ratio
    if cascade:
        m.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
        m.ROI_BOX_CASCADE_HEAD.IOUS = (0.5, 0.6, 0.7)
        m.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                                                   (30.0, 30.0, 15.0, 15.0))
    cfg.INPUT.MIN_SIZE_TEST = SHORT
    cfg.INPUT.MAX_SIZE_TEST = MAX_SIZE
    return cfg


def d2_model(cfg, image_rgb):
    """Random weights made well-conditioned on this image, so that tiny float differences
    cannot reorder anything: every FrozenBatchNorm's statistics are calibrated on its input
    (with a random scale and shift), and the RPN and box predictors' weights are scaled to
    the norm of the features they see, for logits spread over a few units and moderate box
    deltas. (Raw random init gives activations in the thousands, degenerate proposals and
    class scores saturated at 1.0.)"""
    from detectron2.layers import FrozenBatchNorm2d
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]

    def calibrate(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)

    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    with torch.no_grad():
        d2_detect(model, cfg, image_rgb)
    for h in hooks:
        h.remove()
    scale_d2_predictors(model, lambda: d2_detect(model, cfg, image_rgb))
    return model


def d2_detect(model, cfg, image_rgb):
    """detectron2's DefaultPredictor.__call__ on an RGB uint8 image (it takes BGR)."""
    bgr = image_rgb[:, :, ::-1]
    h, w = bgr.shape[:2]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(bgr).apply_image(bgr)
    inputs = {"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), "height": h, "width": w}
    with torch.no_grad():
        inst = model([inputs])[0]["instances"]
    return {"boxes": inst.pred_boxes.tensor.numpy(), "scores": inst.scores.numpy(),
            "classes": inst.pred_classes.numpy(), "masks": inst.pred_masks.numpy()}


def our_config(cascade: bool, sampling_ratio: int, canvas_hw):
    config = config_lib.base()
    config.model.mask_head.name = "maskrcnn"
    config = config_lib.variant(config, "cascade_r50_fpn_1x" if cascade else "r50_fpn_1x")
    config.model.num_classes = NUM_CLASSES
    config.model.roi_heads.sampling_ratio = sampling_ratio
    config.model.roi_heads.max_adaptive_samples = 0         # uncapped, as detectron2
    # detectron2 keeps every (box, class) pair above the threshold before NMS; ours keeps the
    # best topk_candidates: make that all of them.
    config.model.roi_heads.topk_candidates = 1000 * NUM_CLASSES
    config.data.test_short_side = SHORT
    config.data.max_size = MAX_SIZE
    config.data.canvas_buckets = (tuple(canvas_hw),)
    config.eval.batch_size = 1
    return config


def our_detect(config, variables, image_rgb):
    c = config.data
    ex = prepare_example({"image": image_rgb}, c.test_short_side, c.max_size, c.canvas_buckets, False,
                         c.max_instances, c.gt_mask_size, with_gt=False)
    det = jax.device_get(make_detector(config)(variables, {k: ex[k][None] for k in ("image", "image_hw")}))
    return postprocess(det, 0, ex["scale"], ex["orig_hw"], config.eval.mask_threshold)


def parity_image():
    """A synthetic scene at a size that detectron2 pads (330 -> 440 wide -> 448)."""
    image = SyntheticShapes("val", num_images=1, image_size=(256, 256), seed=3, max_size=160)[0]["image"]
    return np.asarray(Image.fromarray(image).resize((330, 240), Image.BILINEAR))


@pytest.mark.parametrize("cascade,sampling_ratio", [(False, 2), (False, 0), (True, 0)],
                         ids=["mask_rcnn-sampling2", "mask_rcnn-adaptive", "cascade-adaptive"])
def test_same_detections_as_detectron2(tmp_path, cascade, sampling_ratio):
    torch.set_num_threads(2)
    cfg = d2_config(cascade, sampling_ratio)
    image = parity_image()
    model = d2_model(cfg, image)
    theirs = d2_detect(model, cfg, image)
    assert len(theirs["scores"]) >= 10, "the random model should detect something"

    path = os.path.join(tmp_path, "model_final.pth")
    torch.save({"model": model.state_dict()}, path)
    new_h, new_w = (320, 440)
    config = our_config(cascade, sampling_ratio, (new_h, -(-new_w // 32) * 32))
    report, _ = weights.import_weights(config, path, str(tmp_path / "ours"), kind="detectron2")
    assert not report.initialised_fresh, report
    ours = our_detect(config, restore_variables(config, str(tmp_path / "ours")), image)

    assert_same_detections(ours, theirs, f"cascade={cascade} sampling_ratio={sampling_ratio}")
