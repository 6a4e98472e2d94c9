"""The paper's R50-FPN COCO configs (800x1333 canvas, 80 classes) build and run one train
step and one inference step on the CPU with finite outputs. The parameters are drawn in numpy
(state.random_variables): the compiled initialisation is the tiny configs' code, and at R50
it alone compiles for 17 s at -O0."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bmask_rcnn
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.state import step_zero_state
from bmask_jax.engine.variables import dummy_batch, random_variables
from bmask_jax.train import train_step

pytestmark = pytest.mark.slow      # minutes each: the full suite runs it, the edit loop does not


@pytest.mark.parametrize("config_module", [bmask_rcnn])
def test_r50_fpn_coco_step_and_inference(config_module):
    c = config_module.get_config("r50_fpn_1x")
    assert c.model.num_classes == 80 and tuple(c.data.canvas_buckets[0]) == (800, 1344)
    model = BMaskRCNN(c.model)
    state, tx = step_zero_state(c, random_variables(c))
    batch = dummy_batch(c, 1)
    rng = np.random.default_rng(0)
    batch["image"] = rng.integers(0, 255, batch["image"].shape).astype(np.uint8)
    batch["image_hw"][:] = (800, 1333)
    xy = rng.uniform(0, 600, (100, 2))
    batch["gt_boxes"][0] = np.concatenate([xy, xy + rng.uniform(20, 200, (100, 2))], 1)
    batch["gt_classes"][0] = rng.integers(0, 80, 100)
    batch["gt_valid"][0] = np.arange(100) < 12
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    new_state, metrics = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False))(state, batch)
    losses = {k: float(v) for k, v in metrics.items()}
    assert set(losses) >= {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask",
                           "loss_boundary"}
    assert all(np.isfinite(v) for v in losses.values()), losses
    assert int(new_state.num_skipped) == 0
    # Inference with the drawn parameters: one SGD step at lr 0.02 from them (He-normal, no
    # BatchNorm statistics) sends the deep layers' activations past float32.
    det = jax.jit(lambda v, b: model.apply(v, b, train=False))(
        {"params": state.params, "frozen": state.frozen},
        {"image": batch["image"], "image_hw": batch["image_hw"]})
    assert det["boxes"].shape == (1, 100, 4) and det["mask_probs"].shape == (1, 100, 28, 28)
    assert np.isfinite(np.asarray(det["mask_probs"])).all()
