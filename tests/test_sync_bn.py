"""SyncBN (models/layers.BatchNorm), the norm of detectron2's large-scale-jitter baselines:
- against numpy on a worked batch: training output from the batch's statistics, the running
  mean and unbiased variance moved by momentum 0.1, padded rows left out when `valid` says so
  (NaiveSyncBatchNorm's stats_mode="N"), nothing moved when no row is valid, the running
  statistics at inference;
- the train step over 4 forced CPU devices gives the statistics of one device holding the
  whole batch (the same running statistics and parameters after a step), in a subprocess."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax.models.layers import BatchNorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(x, valid, mean0, var0, scale, bias, momentum=0.1, eps=1e-5, unbiased=True):
    """BatchNorm written out in numpy: (output, new running mean, new running var)."""
    rows = x[valid] if valid is not None else x
    flat = rows.reshape(-1, x.shape[-1]).astype(np.float64)
    n = len(flat)
    if n == 0:
        return None, mean0, var0
    mean, var = flat.mean(0), flat.var(0)
    out = (x - mean) / np.sqrt(var + eps) * scale + bias
    kept = var * n / (n - 1) if unbiased else var
    return out, (1 - momentum) * mean0 + momentum * mean, (1 - momentum) * var0 + momentum * kept


@pytest.mark.parametrize("with_valid,unbiased", [(False, True), (True, True), (True, False)])
def test_batch_norm_against_numpy(with_valid, unbiased):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(6, 4, 5, 3)).astype(np.float32)
    valid = np.array([True, False, True, True, False, True]) if with_valid else None
    bn = BatchNorm(unbiased_running_var=unbiased)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    params = {"scale": jnp.asarray([1.0, 2.0, 0.5]), "bias": jnp.asarray([0.0, -1.0, 3.0])}
    frozen = {"mean": jnp.asarray([0.5, -0.5, 1.0]), "var": jnp.asarray([2.0, 1.0, 0.5])}
    assert jax.tree_util.tree_map(jnp.shape, variables) == {"params": {"scale": (3,), "bias": (3,)},
                                                              "frozen": {"mean": (3,), "var": (3,)}}
    out, updated = bn.apply({"params": params, "frozen": frozen}, jnp.asarray(x),
                            None if valid is None else jnp.asarray(valid), mutable=["frozen"])
    want, mean, var = reference(x, valid, np.asarray(frozen["mean"]), np.asarray(frozen["var"]),
                                np.asarray(params["scale"]), np.asarray(params["bias"]), unbiased=unbiased)
    rows = valid if valid is not None else slice(None)
    np.testing.assert_allclose(np.asarray(out)[rows], want[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(updated["frozen"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated["frozen"]["var"], var, rtol=1e-5, atol=1e-6)
    # Inference: the running statistics, nothing moves.
    out = bn.apply({"params": params, "frozen": frozen}, jnp.asarray(x))
    np.testing.assert_allclose(out, (x - frozen["mean"]) / np.sqrt(np.asarray(frozen["var"]) + 1e-5)
                               * params["scale"] + params["bias"], rtol=1e-5, atol=1e-5)


def test_no_valid_row_moves_nothing_and_stays_finite():
    x = jnp.ones((3, 2, 2, 4))
    bn = BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), x)
    out, updated = bn.apply(variables, x, jnp.zeros((3,), bool), mutable=["frozen"])
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(updated["frozen"]["mean"], variables["frozen"]["mean"])
    np.testing.assert_array_equal(updated["frozen"]["var"], variables["frozen"]["var"])


def worker(out_path: str) -> None:
    """In a subprocess with 4 CPU devices: one train step of a tiny SyncBN model (stem, every
    stage, the FPN and the box head's convs) on 1 device and on 4, from the same state and
    global batch."""
    from helpers import tiny_config

    from bmask_jax.data.pipeline import TrainBatches, build_dataset
    from bmask_jax.engine import sharding
    from bmask_jax.engine.state import create_train_state
    from bmask_jax.models.bmask_rcnn import BMaskRCNN
    from bmask_jax.train import MODEL_KEYS, jit_train_step

    assert jax.device_count() == 4
    c = tiny_config()
    c.model.backbone.update(norm="SyncBN", freeze_at=0)
    c.model.fpn.norm = "SyncBN"
    # Box-head convs with BatchNorm over the sampled RoIs (padding slots left out).
    c.model.roi_heads.update(conv_dims=(c.model.fpn.channels,) * 2, conv_norm="SyncBN", num_fc=1)
    c.train.batch_size = 4
    model = BMaskRCNN(c.model)
    state, tx = create_train_state(c, model, jax.random.PRNGKey(0))
    loader = TrainBatches(build_dataset(c.data, "train"), c.data, 4, c.seed)
    batch = {k: v for k, v in loader.batch(0).items() if k in MODEL_KEYS}
    loader.close()
    result = {}
    for n, mesh in ((1, sharding.make_mesh(jax.devices()[:1])), (4, sharding.make_mesh())):
        step = jit_train_step(c, model, tx, mesh, donate=False)
        new, metrics = step(sharding.put_replicated(state, mesh), sharding.global_batch(batch, mesh))
        new = jax.device_get(new)
        result[n] = {"frozen": jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), new.frozen),
                     "params": [np.asarray(p).ravel()[:64].tolist() for p in jax.tree_util.tree_leaves(new.params)],
                     "loss": float(metrics["total_loss"])}
    result["initial_frozen"] = jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), jax.device_get(state.frozen))
    with open(out_path, "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_four_devices_give_the_statistics_of_one_holding_the_whole_batch(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
    code = f"import conftest, test_sync_bn as t; t.worker({str(tmp_path / 'out.json')!r})"
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(REPO, "tests"), env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.load(open(tmp_path / "out.json"))
    one, four = out["1"], out["4"]
    leaves = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
    moved = [np.abs(a - b).max() for a, b in zip(leaves(one["frozen"]), leaves(out["initial_frozen"]))]
    assert len(moved) >= 2 * 10 and min(moved) > 1e-6          # every running statistic moved
    for a, b in zip(leaves(one["frozen"]), leaves(four["frozen"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(leaves(one["params"]), leaves(four["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert one["loss"] == pytest.approx(four["loss"], rel=1e-5)


@pytest.mark.slow
def test_a_regnety_lsj_model_trains_a_step():
    """RegNetY-4GF (group convs, squeeze-and-excitation) with SyncBN throughout, on the tiny
    canvas: one train step gives finite losses, moves every running statistic and changes the
    grouped convs' kernels."""
    from helpers import tiny_config

    from bmask_jax.data.pipeline import TrainBatches, build_dataset
    from bmask_jax.engine import sharding
    from bmask_jax.engine.state import create_train_state
    from bmask_jax.models.bmask_rcnn import BMaskRCNN
    from bmask_jax.train import MODEL_KEYS, jit_train_step

    c = tiny_config()
    c.model.backbone.update(name="regnet", regnet="regnety_4gf", norm="SyncBN", freeze_at=0)
    c.model.fpn.norm = "SyncBN"
    model = BMaskRCNN(c.model)
    state, tx = create_train_state(c, model, jax.random.PRNGKey(0))
    loader = TrainBatches(build_dataset(c.data, "train"), c.data, c.train.batch_size, c.seed)
    batch = {k: v for k, v in loader.batch(0).items() if k in MODEL_KEYS}
    loader.close()
    mesh = sharding.make_mesh()
    new, metrics = jit_train_step(c, model, tx, mesh, donate=False)(state, sharding.global_batch(batch, mesh))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    before, after = jax.device_get(state.frozen), jax.device_get(new.frozen)
    stats = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), before, after))
    assert len(stats) > 100 and min(stats) > 0
    kernel = ("backbone", "s1_b1", "f_b", "Conv_0", "kernel")
    old, now = state.params, new.params
    for key in kernel:
        old, now = old[key], now[key]
    assert old.shape == (3, 3, 64, 128) and not np.allclose(old, now)     # 128 channels in groups of 64


@pytest.mark.parametrize("head", ["maskrcnn", "bmask"])
def test_the_mask_heads_batch_norms_count_only_foreground_slots(head):
    """Background (padding) slots in the mask head's batch change no statistic: the head on 6
    slots of which 3 are foreground moves every running mean and variance exactly as the head
    on those 3 alone (detectron2's mask head sees only foreground RoIs)."""
    from bmask_jax.models.mask_heads import BoundaryPreservingHead, MaskRCNNHead
    rng = np.random.default_rng(1)
    feats = jnp.asarray(rng.normal(size=(6, 7, 7, 8)), jnp.float32)
    bound = jnp.asarray(rng.normal(size=(6, 14, 14, 8)), jnp.float32)
    valid = jnp.asarray([True, False, True, False, False, True])
    module = (MaskRCNNHead(3, 8, 2, "SyncBN") if head == "maskrcnn"
              else BoundaryPreservingHead(3, 8, 2, 1, conv_norm="SyncBN"))
    variables = module.init(jax.random.PRNGKey(0), feats, bound)
    _, padded = module.apply(variables, feats, bound, valid, mutable=["frozen"])
    _, alone = module.apply(variables, feats[valid], bound[valid], mutable=["frozen"])
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), variables["frozen"], alone["frozen"])
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-4
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           padded["frozen"], alone["frozen"])
