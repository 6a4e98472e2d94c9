"""ViTDet against detectron2 itself: detectron2's own LazyConfig (projects/ViTDet/configs/COCO,
from its newest sources: ViTDet is not in the release PyPI serves) builds the model with
random weights, runs an image as its test mapper does (longer side 1024, padded to the square
1024 canvas), and its state dict goes through our weight import and predict path. Both must
return the same detections: classes, scores, boxes and pasted masks.

Runs where those sources import (PYTHONPATH at a detectron2 checkout with projects/ViTDet,
torchvision, timm; docs/model_zoo.md, "Checking against detectron2", says how); skipped
elsewhere, as in CI. tests/test_vitdet.py checks the layout and the pieces everywhere."""
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
if importlib.util.find_spec("detectron2") is None:
    pytest.skip("detectron2's sources are not importable (see docs/model_zoo.md, 'Checking against detectron2')",
                allow_module_level=True)
if importlib.util.find_spec("detectron2._C") is None:
    sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")
if importlib.util.find_spec("detectron2.modeling.backbone.vit") is None:
    pytest.skip("this detectron2 has no ViTDet (modeling/backbone/vit.py): use its newest sources",
                allow_module_level=True)
import detectron2  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

import jax  # noqa: E402
from bmask_jax import config as config_lib  # noqa: E402
from bmask_jax import weights  # noqa: E402
from bmask_jax.data.synthetic import SyntheticShapes  # noqa: E402
from bmask_jax.data.transforms import prepare_example  # noqa: E402
from bmask_jax.engine.variables import restore_variables  # noqa: E402
from bmask_jax.evaluation.evaluate import make_detector  # noqa: E402
from bmask_jax.ops.postprocess import postprocess  # noqa: E402
from helpers import assert_same_detections  # noqa: E402

NUM_CLASSES = 5
SOURCES = os.path.dirname(os.path.dirname(detectron2.__file__))
CONFIGS = os.path.join(SOURCES, "projects", "ViTDet", "configs", "COCO")
if not os.path.isdir(CONFIGS):
    pytest.skip(f"no {CONFIGS}: the detectron2 checkout needs projects/ViTDet", allow_module_level=True)


def d2_model(name: str, image_rgb):
    """detectron2's ViTDet with random weights, the predictors scaled to the features they see
    on this image (logits over a few units, moderate deltas) so that tiny float differences
    cannot reorder anything. The LayerNorms get random affines."""
    cfg = LazyConfig.load(os.path.join(CONFIGS, f"{name}.py"))
    cfg.model.roi_heads.num_classes = NUM_CLASSES
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "LayerNorm":
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    rpn = model.proposal_generator.rpn_head
    rpn_features, box_features = [], []
    hook = rpn.conv.register_forward_hook(lambda _m, _i, out: rpn_features.append(out))
    d2_detect(model, image_rgb)
    hook.remove()
    with torch.no_grad():
        rpn_norm = float(torch.cat([f.norm(dim=1).flatten() for f in rpn_features]).mean())
        rpn.objectness_logits.weight.normal_(0, 2.0 / rpn_norm)
        rpn.anchor_deltas.weight.normal_(0, 0.2 / rpn_norm)
    heads = model.roi_heads.box_head
    heads = list(heads) if isinstance(heads, torch.nn.ModuleList) else [heads]
    predictors = model.roi_heads.box_predictor
    predictors = list(predictors) if isinstance(predictors, torch.nn.ModuleList) else [predictors]
    hook = heads[0].register_forward_hook(lambda _m, _i, out: box_features.append(out))
    d2_detect(model, image_rgb)
    hook.remove()
    with torch.no_grad():
        box_norm = float(box_features[0].norm(dim=1).mean())
        for p in predictors:
            p.cls_score.weight.normal_(0, 2.0 / box_norm)
            p.bbox_pred.weight.normal_(0, 0.2 / box_norm)
    return model


def d2_detect(model, image_rgb):
    """ViTDet's test mapper (ResizeShortestEdge(1024, max_size=1024)) and the model on an RGB
    image (the model's input_format)."""
    h, w = image_rgb.shape[:2]
    resized = T.ResizeShortestEdge(1024, 1024).get_transform(image_rgb).apply_image(image_rgb)
    inputs = {"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), "height": h, "width": w}
    with torch.no_grad():
        inst = model([inputs])[0]["instances"]
    return {"boxes": inst.pred_boxes.tensor.numpy(), "scores": inst.scores.numpy(),
            "classes": inst.pred_classes.numpy(), "masks": inst.pred_masks.numpy()}


def parity_image():
    image = SyntheticShapes("val", num_images=1, image_size=(256, 256), seed=3, max_size=160)[0]["image"]
    return np.asarray(Image.fromarray(image).resize((330, 240), Image.BILINEAR))


@pytest.mark.parametrize("name,variant", [("mask_rcnn_vitdet_b_100ep", "vitdet_b"),
                                          ("cascade_mask_rcnn_vitdet_b_100ep", "cascade_vitdet_b")])
def test_same_detections_as_detectron2_vitdet(tmp_path, name, variant):
    torch.set_num_threads(2)
    image = parity_image()
    model = d2_model(name, image)
    theirs = d2_detect(model, image)
    assert len(theirs["scores"]) >= 10, "the random model should detect something"

    path = os.path.join(tmp_path, "model_final.pth")
    torch.save({"model": model.state_dict()}, path)
    config = config_lib.from_file(f"configs/mask_rcnn.py:{variant}")
    config.model.update(num_classes=NUM_CLASSES, compute_dtype="float32")     # detectron2's eval runs float32
    config.model.roi_heads.update(sampling_ratio=0, max_adaptive_samples=0, topk_candidates=1000 * NUM_CLASSES)
    config.eval.batch_size = 1
    report, _ = weights.import_weights(config, path, str(tmp_path / "ours"), kind="detectron2")
    assert not report.initialised_fresh, report
    c = config.data
    ex = prepare_example({"image": image}, c.test_short_side, c.max_size, c.canvas_buckets, False,
                         c.max_instances, c.gt_mask_size, with_gt=False)
    variables = restore_variables(config, str(tmp_path / "ours"))
    det = jax.device_get(make_detector(config)(variables, {k: ex[k][None] for k in ("image", "image_hw")}))
    ours = postprocess(det, 0, ex["scale"], ex["orig_hw"], config.eval.mask_threshold)

    assert_same_detections(ours, theirs, name)
