import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax import config as config_lib
from helpers import first_batch, tiny_config
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.optim import learning_rate, learning_rate_np, make_optimizer, parameter_labels
from bmask_jax.engine.state import create_train_state
from bmask_jax.train import train_and_evaluate, train_step


def test_learning_rate_warmup_and_steps():
    c = config_lib.base().train
    c.update(base_lr=0.02, warmup_iters=1000, warmup_factor=0.001, lr_steps=(60000, 80000), lr_gamma=0.1)
    sched = learning_rate(c)
    for step, expected in [(0, 0.02 * 0.001), (500, 0.02 * (0.001 * 0.5 + 0.5)), (1000, 0.02),
                           (59999, 0.02), (60000, 0.002), (80000, 0.0002)]:
        np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-5)
        np.testing.assert_allclose(learning_rate_np(c, step), expected, rtol=1e-5)


def test_parameter_labels_freeze_and_norm():
    c = config_lib.base()
    c.model.backbone.update(depth=18, res2_out_channels=64, norm="GN", freeze_at=2)
    c.model.num_classes = 3
    params = {"backbone": {"stem_conv1": {"kernel": 0}, "res2_0": {"conv1": {"kernel": 0}},
                           "res3_0": {"conv1_norm": {"GroupNorm_0": {"scale": 0}}, "conv1": {"kernel": 0}}},
              "box_head": {"fc1": {"kernel": 0}}}
    labels = parameter_labels(params, c.model)
    assert labels["backbone"]["stem_conv1"]["kernel"] == "frozen"
    assert labels["backbone"]["res2_0"]["conv1"]["kernel"] == "frozen"
    assert labels["backbone"]["res3_0"]["conv1_norm"]["GroupNorm_0"]["scale"] == "norm"
    assert labels["backbone"]["res3_0"]["conv1"]["kernel"] == "default"
    assert labels["box_head"]["fc1"]["kernel"] == "default"


def _adamw_numpy(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW, written out: decoupled decay, then the bias-corrected Adam step."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p - lr[t - 1] * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr[t - 1] * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_against_torch_semantics(name):
    """Three steps on the three groups: 'default' decays by weight_decay, 'norm' by
    weight_decay_norm, 'frozen' never moves; against SGD / AdamW written out in numpy."""
    c = config_lib.base()
    c.model.backbone.freeze_at = 1
    c.train.update(optimizer=name, base_lr=0.1, warmup_iters=2, warmup_factor=0.5, lr_steps=(2,), lr_gamma=0.1,
                   weight_decay=0.05, weight_decay_norm=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    normal = lambda: rng.normal(size=3).astype(np.float32)  # noqa: E731
    params = {"backbone": {"stem_conv1": {"kernel": normal()}},
              "box_head": {"fc1": {"kernel": normal()}, "fc1_norm": {"scale": normal()}}}
    grads = [jax.tree_util.tree_map(lambda _: normal(), params) for _ in range(3)]
    tx = make_optimizer(c, params)
    state, p = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
    lr = [learning_rate_np(c.train, k) for k in range(3)]         # 0.05, 0.075, 0.01
    np.testing.assert_allclose(lr, [0.05, 0.075, 0.01], rtol=1e-6)

    def expected(p0, key, wd):
        gs = [g["box_head"][key]["kernel" if key == "fc1" else "scale"] for g in grads]
        if name == "adamw":
            return _adamw_numpy(p0, gs, lr, wd)
        buf = np.zeros_like(p0)
        for k, g in enumerate(gs):                 # torch.optim.SGD: decay into the gradient, then momentum
            buf = 0.9 * buf + (g + wd * p0) if k else g + wd * p0
            p0 = p0 - lr[k] * buf
        return p0

    np.testing.assert_allclose(p["box_head"]["fc1"]["kernel"],
                               expected(params["box_head"]["fc1"]["kernel"], "fc1", 0.05), rtol=1e-5)
    np.testing.assert_allclose(p["box_head"]["fc1_norm"]["scale"],
                               expected(params["box_head"]["fc1_norm"]["scale"], "fc1_norm", 0.01), rtol=1e-5)
    np.testing.assert_array_equal(p["backbone"]["stem_conv1"]["kernel"], params["backbone"]["stem_conv1"]["kernel"])
    c.train.optimizer = "adam"
    with pytest.raises(ValueError, match="train.optimizer='adam'"):
        make_optimizer(c, params)


@pytest.mark.slow
def test_frozen_parameters_do_not_move():
    c = tiny_config()
    c.model.backbone.freeze_at = 2
    model = BMaskRCNN(c.model)
    state, tx = create_train_state(c, model, jax.random.PRNGKey(0))
    batch = first_batch(c)
    new, _ = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False))(state, batch)
    before, after = state.params["backbone"], new.params["backbone"]
    np.testing.assert_array_equal(before["res2_0"]["conv1"]["Conv_0"]["kernel"],
                                  after["res2_0"]["conv1"]["Conv_0"]["kernel"])
    assert not np.allclose(before["res3_0"]["conv1"]["Conv_0"]["kernel"],
                           after["res3_0"]["conv1"]["Conv_0"]["kernel"])


@pytest.mark.slow
def test_training_loss_falls_on_a_fixed_batch():
    # Each step samples other RoIs, so the loss is noisy; at the default LR (0.02) the
    # trajectory on one fixed batch of 2 images is chaotic from step ~10 (float noise of
    # 1e-6 changes it), at 0.01 it falls steadily to about 0.65x.
    c = tiny_config()
    c.train.base_lr = 0.01
    model = BMaskRCNN(c.model)
    state, tx = create_train_state(c, model, jax.random.PRNGKey(0))
    batch = first_batch(c)
    step = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False))
    totals = []
    for _ in range(40):
        state, metrics = step(state, batch)
        totals.append(float(metrics["total_loss"]))
    assert np.isfinite(totals).all()
    assert np.mean(totals[-10:]) < 0.75 * np.mean(totals[:3]), totals


@pytest.mark.slow
def test_train_loop_writes_metrics_checkpoints_and_resumes(tmp_path):
    c = tiny_config()
    c.train.max_iter = 4
    c.train.eval_at_end = False
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [3, 4]
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4]
    assert {"loss_rpn_cls", "loss_mask", "loss_boundary", "lr", "images_per_sec"} <= set(lines[0])
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    # Running again with a larger max_iter resumes at step 4, not from scratch.
    c.train.max_iter = 6
    train_and_evaluate(c, workdir)
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4, 6]
    # ... with the train step the first run compiled (bmask_jax/engine/jit_cache.py).
    assert json.load(open(os.path.join(workdir, "train_summary.json")))["train_step_compiles"] == 0


def test_uncapped_adaptive_roi_align_is_refused_for_training(tmp_path):
    config = tiny_config()
    config.model.roi_heads.sampling_ratio = 0
    config.model.roi_heads.max_adaptive_samples = 0
    with pytest.raises(ValueError, match="max_adaptive_samples=0"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_images_without_instances_train_with_finite_losses():
    """An image with no annotations (or only crowd ones, which prepare_example leaves out)
    has no valid GT: every anchor and RoI is background, the box and mask losses are zero."""
    c = tiny_config()
    model = BMaskRCNN(c.model)
    state, tx = create_train_state(c, model, jax.random.PRNGKey(0))
    batch = dict(first_batch(c))
    step = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False))
    for empty in ([True, False], [True, True]):
        b = dict(batch, gt_valid=batch["gt_valid"] & ~np.asarray(empty)[:, None])
        new_state, metrics = step(state, b)
        values = {k: float(v) for k, v in metrics.items()}
        assert all(np.isfinite(v) for v in values.values()), values
        assert int(new_state.num_skipped) == 0
    # With no GT anywhere, the regression and mask terms have nothing to learn from.
    assert values["loss_box_reg"] == 0.0 and values["loss_rpn_loc"] == 0.0
    assert values["loss_mask"] == 0.0


def test_a_finite_loss_with_a_non_finite_gradient_is_not_applied():
    """train_step's finiteness check covers every gradient entry, not just the loss: sqrt at 0
    has a finite value and an infinite derivative, in one entry of one leaf."""
    import optax

    from bmask_jax.engine.state import TrainState
    from bmask_jax.train import MODEL_KEYS

    class SqrtModel:
        def apply(self, variables, batch, rngs, mutable=()):     # flax's contract: (output, mutated collections)
            p = variables["params"]
            return {"loss_a": jnp.sum(jnp.sqrt(p["a"])), "loss_b": jnp.sum(p["b"] ** 2)}, {}

    params = {"a": jnp.array([1.0, 0.0, 4.0]), "b": jnp.ones((2, 2))}
    tx = optax.sgd(0.1)
    state = TrainState(step=jnp.array(0), params=params, frozen={}, opt_state=tx.init(params),
                       first_nonfinite_step=jnp.array(-1), num_skipped=jnp.array(0))
    batch = {k: jnp.zeros(1) for k in MODEL_KEYS}
    new, metrics = jax.jit(lambda s, b: train_step(s, b, SqrtModel(), tx, 0, True))(state, batch)
    assert np.isfinite(float(metrics["total_loss"]))
    assert int(new.first_nonfinite_step) == 0 and int(new.num_skipped) == 1
    np.testing.assert_array_equal(new.params["b"], params["b"])     # the finite leaf did not move either
    # Without the zero the same step is applied.
    state = state.replace(params={"a": jnp.array([1.0, 2.0, 4.0]), "b": jnp.ones((2, 2))})
    new, _ = jax.jit(lambda s, b: train_step(s, b, SqrtModel(), tx, 0, True))(state, batch)
    assert int(new.num_skipped) == 0 and not np.allclose(new.params["b"], 1.0)
