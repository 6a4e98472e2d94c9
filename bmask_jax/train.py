"""The jitted train step and the training loop (the train state is in state.py, the optimizer in
optim.py)."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from bmask_jax.engine import checkpoints, events, jit_cache, sharding

from bmask_jax.weights import pretrained
from bmask_jax.data.pipeline import TrainBatches, build_dataset
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.optim import learning_rate_np
from bmask_jax.engine.state import TrainState, create_train_state

MODEL_KEYS = ("image", "image_hw", "gt_boxes", "gt_classes", "gt_valid", "gt_masks")


def train_step(state: TrainState, batch: dict, model: BMaskRCNN, tx, seed: int, skip_nonfinite: bool):
    """One optimisation step. Randomness (sampling) comes from (seed, step), so a resumed run
    repeats exactly. A non-finite loss or gradient leaves the parameters as they were."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

    def loss_fn(params):
        # 'frozen' mutable: BatchNorm (SyncBN) layers normalise by the batch's statistics and
        # move their running ones (layers.BatchNorm); FrozenBN reads its constants unchanged.
        losses, updated = model.apply({"params": params, "frozen": state.frozen},
                                      {k: batch[k] for k in MODEL_KEYS}, rngs={"sampling": rng}, mutable=["frozen"])
        return sum(losses.values()), (losses, updated.get("frozen", state.frozen))

    (total, (losses, frozen)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # One reduction over every gradient entry, not one per leaf: XLA rewrites an `all` of the
    # per-leaf flags into a chain of ~120 scalar ANDs and copies that chain into each of the
    # ~240 parameter/optimizer update fusions (88k HLO lines instead of 31k for the tiny model,
    # and a backend compile of 13 s instead of 8 at -O0).
    finite = jnp.isfinite(total) & jnp.all(jnp.isfinite(jax.flatten_util.ravel_pytree(grads)[0]))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_old = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1, params=keep_old(params, state.params), frozen=keep_old(frozen, state.frozen),
        opt_state=keep_old(opt_state, state.opt_state),
        first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                       state.first_nonfinite_step),
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32))
    metrics = dict(losses, total_loss=total)
    return new_state, metrics


def jit_train_step(config, model: BMaskRCNN, tx, mesh, donate: bool = True):
    """train_step jitted for data parallelism over `mesh`: the global batch sharded along
    'data', the state replicated. XLA partitions the step, so its losses and gradients are those
    of the global batch, whatever the device count; the gradients cross devices in one fused
    all-reduce (tests/test_data_parallel.py counts it)."""
    # One per (model, optimizer, mesh) in the process: make_optimizer gives the same tx for the
    # same train settings, so training again in this process reuses the compiled step.
    seed, skip = config.seed, config.train.skip_nonfinite
    key = ("train_step", type(model), jit_cache.section_key(model.cfg), tx, seed, skip, mesh, donate)

    def build():
        frozen = jit_cache.frozen_module(model)
        return jax.jit(lambda s, b: train_step(s, b, frozen, tx, seed, skip),
                       in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                       out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
                       donate_argnums=0 if donate else ())

    return jit_cache.get(key, build)


class NonFiniteLossError(RuntimeError):
    pass


class ClassCountError(ValueError):
    pass


def check_class_count(config, dataset) -> None:
    """model.num_classes must be the dataset's class count: a mismatch trains (labels past the
    logits) and only shows later as a non-finite loss."""
    theirs, ours = len(dataset.class_names), config.model.num_classes
    if theirs != ours:
        raise ClassCountError(f"model.num_classes={ours} but the training data (data.dataset={config.data.dataset!r}) "
                              f"has {theirs} classes: set --config.model.num_classes={theirs}")


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:   # not the main thread
            pass

    def _handle(self, *_):
        self.requested = True


def _check_finite(state: TrainState, losses: dict | None, skip: bool) -> None:
    bad = int(state.first_nonfinite_step)
    if bad >= 0 and not skip:
        terms = "" if losses is None else ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(losses.items()))
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad} (latest logged terms: {terms}); parameters "
            "were not updated and no checkpoint was written after it. Check the learning rate and the "
            "data; if only a few steps are affected, train.skip_nonfinite=True skips them (counted).")


def train_and_evaluate(config, workdir: str, overrides: dict | None = None) -> dict:
    """Train (resuming from workdir if it holds a checkpoint, else starting from model.weights
    if set), then evaluate if configured. overrides: the command line's --config.* values, which
    must agree with the config the weights imply (pretrained.py)."""
    r = config.model.roi_heads
    if r.sampling_ratio == 0 and r.max_adaptive_samples == 0:
        raise ValueError("model.roi_heads.max_adaptive_samples=0 (uncapped adaptive RoIAlign sampling) is for "
                         "inference only: its loop length depends on the boxes, so it has no gradient. "
                         "Train with a cap (e.g. 4, the default) or with model.roi_heads.sampling_ratio=2")
    # The data first: a missing folder or a class-count mismatch is one error before anything
    # is built or written.
    dataset = build_dataset(config.data, config.data.train_split)
    check_class_count(config, dataset)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh()
    is_main = jax.process_index() == 0
    # The weights decide the input format and normalisation: resolved before the model is built.
    config, weights = pretrained.resolve(config, workdir, overrides, progress=is_main)
    model = BMaskRCNN(config.model)
    state, tx = create_train_state(config, model, jax.random.PRNGKey(config.seed))
    if is_main:
        checkpoints.remove_partial_saves(workdir)
    mgr = checkpoints.manager(workdir, config.train.keep_checkpoints)
    restored = checkpoints.restore_latest(mgr, state, set_aside_damaged=is_main)
    if restored is not None:
        state = restored
        logging.info("resumed from %s at step %d", mgr.directory, int(state.step))
    elif weights is not None:
        state, report = pretrained.load_into_state(state, weights)
        if is_main:
            pretrained.write_record(workdir, weights, report)
    state = jax.device_put(state, sharding.replicated(mesh))

    t = config.train
    step_fn = jit_train_step(config, model, tx, mesh)
    compiled_before = compile_count(step_fn)      # the step may come compiled from an earlier run

    loader = TrainBatches(dataset, config.data, t.batch_size, config.seed, jax.process_index(),
                          jax.process_count(), config.data.num_workers)
    if is_main:
        # Steps after the checkpoint we resume from will run again: their records go.
        cut_logs_to(workdir, int(state.step))
    writer = _metric_writer(workdir) if is_main else None
    # Which images each step trained on (this process's share): the record that a resumed
    # run replays the same data in the same order, and where to look when a step goes wrong.
    image_log = open(os.path.join(workdir, "image_order.jsonl"), "a", buffering=1) if is_main else None
    preempt = _Preemption()
    start = int(state.step)
    progress = _progress(start, t.max_iter, is_main)
    last_time, last_step = time.time(), start
    metrics = None
    canvases: set[tuple[int, int]] = set()
    run_start = time.time()

    def to_devices(step: int) -> tuple[dict, list[int]]:
        local = loader.batch(step)
        local["image"] = sharding.agree_on_canvas(local["image"])
        canvases.add(tuple(local["image"].shape[1:3]))
        return sharding.global_batch({k: local[k] for k in MODEL_KEYS}, mesh), local["image_id"].tolist()

    try:
        batch, image_ids = to_devices(start) if start < t.max_iter else (None, None)
        for step in range(start, t.max_iter):
            state, metrics = step_fn(state, batch)
            checkpoints.check(mgr)          # a failed asynchronous save stops training here
            if is_main:
                image_log.write(json.dumps({"step": step + 1, "image_ids": image_ids}) + "\n")
            # The step runs asynchronously: the next batch is prepared and sent to the devices
            # meanwhile.
            if step + 1 < t.max_iter:
                batch, image_ids = to_devices(step + 1)
            progress.update(1)
            done = step + 1
            stop = sharding.any_process(preempt.requested)   # once: SIGTERM may come at any moment
            last = done == t.max_iter or stop
            if done % t.log_every == 0 or last:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(state, values, t.skip_nonfinite)
                now = time.time()
                values["lr"] = learning_rate_np(t, step)
                values["images_per_sec"] = (done - last_step) * t.batch_size / max(now - last_time, 1e-9)
                values["num_skipped_nonfinite"] = int(state.num_skipped)
                last_time, last_step = now, done
                progress.set_postfix(loss=f"{values['total_loss']:.3f}", lr=f"{values['lr']:.4g}",
                                     img_s=f"{values['images_per_sec']:.1f}")
                if writer is not None:
                    writer(done, values)
            if done % t.checkpoint_every == 0 or last:
                _check_finite(state, None, t.skip_nonfinite)
                checkpoints.save(mgr, done, state, force=last)
            if stop:
                logging.warning("SIGTERM: saved a checkpoint at step %d and stopped", done)
                break
    except BaseException:
        checkpoints.finish(mgr, raise_errors=False)
        raise
    else:
        checkpoints.finish(mgr)
    finally:
        loader.close()
        if is_main:
            image_log.close()
        progress.close()
    if is_main:
        # One compile per canvas bucket and never again: the count proves it (a recompile on
        # every new shape would show here, and is what static shapes are for).
        summary = {"start_step": start, "end_step": int(state.step), "seconds": time.time() - run_start,
                   "canvases": sorted(canvases), "train_step_compiles": compile_count(step_fn) - compiled_before,
                   "instances_beyond_max": loader.num_dropped, "skipped_nonfinite": int(state.num_skipped),
                   # What the training set left out, by reason (bad annotations, degenerate masks).
                   "skipped_annotations": dict(getattr(dataset, "skipped", {}))}
        if summary["skipped_annotations"]:
            logging.warning("training data: skipped %d annotations: %s",
                            sum(summary["skipped_annotations"].values()), summary["skipped_annotations"])
        with open(os.path.join(workdir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if int(state.step) < t.max_iter:   # stopped early by SIGTERM
        return {}
    ran = int(state.step) - start
    if ran > 0 and int(state.num_skipped) >= int(state.step) and t.skip_nonfinite:
        # Every step so far was skipped: the parameters are the initial ones; evaluating them
        # would report a model that never trained.
        raise NonFiniteLossError(f"all {int(state.step)} steps were skipped as non-finite (train.skip_nonfinite=True): "
                                 "the model did not train; not evaluating. Check the learning rate, the data and "
                                 "model.num_classes")
    if t.eval_at_end:
        from bmask_jax.evaluation import evaluate
        # Every process takes part; process 0 gathers the detections and returns the metrics.
        return evaluate.evaluate(config, workdir, {"params": state.params, "frozen": state.frozen}, mesh,
                                 step=int(state.step))
    return {}


def compile_count(jitted) -> int:
    """How many programs a jitted function has compiled (one per distinct input shape)."""
    return jitted._cache_size() if hasattr(jitted, "_cache_size") else -1


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True,
                mininterval=2.0)


LOGS = ("metrics.jsonl", "image_order.jsonl")


def cut_logs_to(workdir: str, step: int) -> None:
    """Keep only the records of steps <= step in the per-step logs: a resumed run repeats the
    steps after its checkpoint, and each step must appear once."""
    for name in LOGS:
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            lines = f.readlines()
        kept = [line for line in lines if _record_step(line) is not None and _record_step(line) <= step]
        if len(kept) != len(lines):
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
            logging.warning("%s: dropped %d record(s) after step %d, the step this run resumes from", path,
                            len(lines) - len(kept), step)


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None                     # a line cut short by a crash


def json_safe(values: dict) -> dict:
    """Non-finite floats as the strings "nan", "inf", "-inf": strict JSON has no NaN."""
    return {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in values.items()}


def _metric_writer(workdir: str):
    """Metrics to workdir/metrics.jsonl and TensorBoard event files in workdir/tensorboard."""
    tb = events.summary_writer(os.path.join(workdir, "tensorboard"))
    path = os.path.join(workdir, "metrics.jsonl")

    def write(step: int, values: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **json_safe(values)}) + "\n")
        for k, v in values.items():
            tb.add_scalar(f"train/{k}", v, step)
        tb.flush()

    return write
