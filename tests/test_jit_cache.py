"""Jitted programs kept per process (bmask_jax/engine/jit_cache.py): the same settings give the same
jitted function, other settings another, and a config changed after the fact changes nothing
that was kept. Nothing here compiles a model."""
import jax
import jax.numpy as jnp
import numpy as np

from bmask_jax.engine import jit_cache
from bmask_jax.evaluation.evaluate import make_detector
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.optim import make_optimizer
from bmask_jax.train import jit_train_step
from helpers import tiny_config

PARAMS = {"box_head": {"fc1": {"kernel": jnp.ones(3)}}}


def test_same_settings_same_program_other_settings_another():
    jit_cache.clear()
    c = tiny_config()
    assert make_detector(c) is make_detector(tiny_config())
    tx = make_optimizer(c, PARAMS)
    assert make_optimizer(tiny_config(), PARAMS) is tx
    c.train.max_iter += 100                 # the loop's length does not enter the optimizer
    assert make_optimizer(c, PARAMS) is tx
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    step = jit_train_step(c, BMaskRCNN(c.model), tx, mesh)
    assert jit_train_step(tiny_config(), BMaskRCNN(tiny_config().model), tx, mesh) is step

    other = tiny_config()
    other.model.roi_heads.score_threshold = 0.5
    assert make_detector(other) is not make_detector(c)
    other = tiny_config()
    other.train.base_lr = 0.5
    assert make_optimizer(other, PARAMS) is not tx
    assert jit_train_step(other, BMaskRCNN(other.model), make_optimizer(other, PARAMS), mesh) is not step
    other = tiny_config()
    other.seed = 7                          # sampling's random numbers come from the seed
    assert jit_train_step(other, BMaskRCNN(other.model), tx, mesh) is not step
    assert jit_train_step(c, BMaskRCNN(c.model), tx, mesh, donate=False) is not step
    before = make_detector(c)
    jit_cache.clear()
    assert make_detector(c) is not before


def test_a_kept_program_does_not_see_later_config_changes():
    """A kept function may trace again (new shapes) after its caller changed the ConfigDict it
    was built from: it must trace the settings it was keyed on."""
    jit_cache.clear()
    c = tiny_config()
    model = BMaskRCNN(c.model)
    frozen = jit_cache.frozen_module(model)
    c.model.roi_heads.score_threshold = 0.9
    assert frozen.cfg.roi_heads.score_threshold != 0.9 and model.cfg.roi_heads.score_threshold == 0.9

    # The learning-rate schedule reads its numbers when it is made.
    c.train.update(base_lr=0.1, warmup_iters=0, lr_steps=())
    params = {"w": jnp.ones(2)}
    tx = make_optimizer(c, params)
    c.train.base_lr = 1000.0
    updates, _ = jax.jit(tx.update)({"w": jnp.ones(2)}, tx.init(params), params)
    # SGD: -lr * (grad + weight_decay * p)
    np.testing.assert_allclose(updates["w"], -0.1 * (1 + c.train.weight_decay), rtol=1e-6)


def test_oldest_entries_go_beyond_the_limit():
    jit_cache.clear()
    for k in range(jit_cache.MAX_ENTRIES + 3):
        jit_cache.get(("k", k), lambda k=k: k)
    jit_cache.get(("k", 3), lambda: "rebuilt")            # kept: used again, now the newest
    assert jit_cache.get(("k", 0), lambda: "rebuilt") == "rebuilt"      # gone: rebuilt
    assert jit_cache.get(("k", 3), lambda: "other") == 3
    jit_cache.clear()
