"""Cascade BMask R-CNN: stage re-labelling, gradient scaling, and a few training steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.models.box_head import relabel_boxes, scale_gradient
from bmask_jax.engine.state import create_train_state
from bmask_jax.train import train_step
from helpers import first_batch, tiny_config


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = jnp.array([1.0, -2.0, 3.0])
    np.testing.assert_array_equal(scale_gradient(x, 1 / 3), x)
    g = jax.grad(lambda v: jnp.sum(scale_gradient(v, 1 / 3) * jnp.array([3.0, 6.0, 9.0])))(x)
    np.testing.assert_allclose(g, [1.0, 2.0, 3.0], rtol=1e-6)


def test_relabel_boxes_by_hand():
    gt = jnp.array([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    boxes = jnp.array([[0.0, 0.0, 10.0, 8.0],     # IoU 0.8 with gt 0
                       [0.0, 0.0, 10.0, 6.5],     # IoU 0.65 with gt 0
                       [50.0, 50.0, 60.0, 60.0],  # IoU 1 with gt 1, but marked invalid
                       [5.0, 5.0, 5.0, 9.0]])     # empty box
    valid = jnp.array([True, True, False, True])
    out = relabel_boxes(boxes, valid, gt, jnp.array([3, 1]), jnp.array([True, True]), 0.7, num_classes=5)
    assert out["is_fg"].tolist() == [True, False, False, False]
    assert out["classes"].tolist() == [3, 5, 5, 5]
    assert out["valid"].tolist() == [True, True, False, False]


@pytest.mark.slow
def test_cascade_bmask_trains_and_detects():
    c = tiny_config("bmask")
    c.model.roi_heads.cascade.enabled = True
    c.model.rpn.post_nms_topk_train = 60
    model = BMaskRCNN(c.model)
    state, tx = create_train_state(c, model, jax.random.PRNGKey(0))
    assert {"box_heads_0", "box_heads_2", "box_predictors_1"} <= set(state.params)
    assert state.params["box_predictors_0"]["bbox_pred"]["kernel"].shape[-1] == 4   # class-agnostic
    batch = first_batch(c)
    step = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False))
    for _ in range(2):
        state, metrics = step(state, batch)
    keys = {f"loss_{n}_stage{i}" for n in ("cls", "box_reg") for i in range(3)} | {"loss_mask", "loss_boundary"}
    assert keys <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    det = jax.jit(lambda v, b: model.apply(v, b, train=False))(
        {"params": state.params, "frozen": state.frozen}, {"image": batch["image"], "image_hw": batch["image_hw"]})
    assert det["boxes"].shape == (2, c.model.roi_heads.detections_per_image, 4)
    assert np.isfinite(np.asarray(det["scores"])).all()
