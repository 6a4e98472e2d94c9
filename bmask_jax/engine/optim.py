"""The optimizer: detectron2's learning-rate schedule; SGD (detectron2's) or AdamW, with
per-group weight decay."""
from __future__ import annotations

import bisect

import jax
import jax.numpy as jnp
import optax

from bmask_jax.engine import jit_cache


def learning_rate(train_cfg):
    """detectron2's WarmupMultiStepLR: linear warmup from warmup_factor, x gamma at each step."""
    # The numbers are read now: the schedule is traced later, and the config may change meanwhile.
    steps = tuple(train_cfg.lr_steps)
    base_lr, gamma = train_cfg.base_lr, train_cfg.lr_gamma
    warmup_iters, warmup_factor = train_cfg.warmup_iters, train_cfg.warmup_factor

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        alpha = jnp.minimum(step / max(warmup_iters, 1), 1.0)
        warmup = jnp.where(step < warmup_iters, warmup_factor * (1 - alpha) + alpha, 1.0)
        decays = sum(jnp.where(step >= s, 1, 0) for s in steps) if steps else 0
        return base_lr * warmup * (gamma ** decays)

    return schedule


def learning_rate_np(train_cfg, step: int) -> float:
    """The same schedule on the host, for logging without a device round trip."""
    t = train_cfg
    alpha = min(step / max(t.warmup_iters, 1), 1.0)
    warmup = t.warmup_factor * (1 - alpha) + alpha if step < t.warmup_iters else 1.0
    return t.base_lr * warmup * t.lr_gamma ** bisect.bisect_right(sorted(t.lr_steps), step)


def parameter_labels(params, model_cfg, no_decay: tuple[str, ...] = ()):
    """'frozen' for the stem/res2 parameters that freeze_at freezes, 'norm' for normalisation
    parameters (weight_decay_norm): a module named for a norm, or one holding a `scale` (a
    LayerNorm such as ViTDet's simfp_2.1), 'no_decay' for parameters named in no_decay (ViTDet's
    pos_embed), 'default' for the rest."""
    freeze_at = model_cfg.backbone.freeze_at
    frozen_prefixes = (["stem_"] if freeze_at >= 1 else []) + (["res2_"] if freeze_at >= 2 else [])
    paths = [tuple(getattr(p, "key", str(p)) for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    with_scale = {path[:-1] for path in paths if path[-1] == "scale"}

    def label(path, _):
        names = tuple(getattr(p, "key", str(p)) for p in path)
        if names[0] == "backbone" and any(names[1].startswith(f) for f in frozen_prefixes):
            return "frozen"
        if names[-1] in no_decay:
            return "no_decay"
        if any("norm" in n.lower() for n in names) or names[:-1] in with_scale:
            return "norm"
        return "default"

    return jax.tree_util.tree_map_with_path(label, params)


def vit_lr_decay_factors(params, model_cfg, decay: float):
    """detectron2's get_vit_lr_decay_rate per parameter: decay ** (depth + 1 - layer), layer 0
    for the patch and position embeddings, i + 1 for block i, depth + 1 (factor 1) for the
    rest (the feature pyramid and the heads)."""
    depth = model_cfg.backbone.vit.depth

    def factor(path, _):
        names = [getattr(p, "key", str(p)) for p in path]
        layer = depth + 1
        if names[0] == "backbone" and names[1] in ("pos_embed", "patch_embed"):
            layer = 0
        elif names[0] == "backbone" and names[1].startswith("blocks_"):
            layer = int(names[1].split("_")[1]) + 1
        return float(decay ** (depth + 1 - layer))

    return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_factors(factors) -> optax.GradientTransformation:
    """Each update times its parameter's factor: a per-parameter learning rate (and, after
    AdamW, decoupled weight decay scaled the same way, as torch's per-group lr does)."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


OPTIMIZERS = ("sgd", "adamw")


# train.* keys that do not enter the optimizer or the compiled step (the loop's, and the batch
# size, which only shapes the inputs).
LOOP_KEYS = ("batch_size", "checkpoint_every", "eval_at_end", "keep_checkpoints", "log_every", "max_iter")


def make_optimizer(config, params) -> optax.GradientTransformation:
    """The optimizer of config for params: the same object for the same settings in this
    process, so that a compiled train step (train.jit_train_step) can be reused."""
    settings = {k: v for k, v in config.train.items() if k not in LOOP_KEYS}
    key = ("optimizer", repr(sorted(settings.items())), jit_cache.section_key(config.model),
           jax.tree_util.tree_structure(params))
    return jit_cache.get(key, lambda: _make_optimizer(config, params))


def _make_optimizer(config, params) -> optax.GradientTransformation:
    """train.optimizer over the parameter groups of parameter_labels ('default': weight_decay,
    'norm': weight_decay_norm, 'frozen': not updated), on learning_rate's schedule:

    sgd    detectron2's (the paper's): torch.optim.SGD with momentum, the weight decay added
           to the gradient before momentum;
    adamw  torch.optim.AdamW: Adam with decoupled weight decay (p -= lr * wd * p), betas
           train.adam_betas. The embedded default trains its from-scratch model with it: it
           reaches in 480 steps the mask AP that SGD needed 800 for (docs/getting_started.md).
    """
    t = config.train
    if t.optimizer == "sgd":
        group = lambda wd: optax.chain(optax.add_decayed_weights(wd),  # noqa: E731
                                       optax.sgd(learning_rate(t), momentum=t.momentum))
    elif t.optimizer == "adamw":
        b1, b2 = t.adam_betas
        group = lambda wd: optax.adamw(learning_rate(t), b1=b1, b2=b2, eps=1e-8, weight_decay=wd)  # noqa: E731
    else:
        raise ValueError(f"train.optimizer={t.optimizer!r}: choose one of {OPTIMIZERS}")
    no_decay = tuple(t.get("no_decay_params", ()))
    groups = {"default": group(t.weight_decay), "norm": group(t.weight_decay_norm), "frozen": optax.set_to_zero()}
    if no_decay:
        groups["no_decay"] = group(0.0)
    tx = optax.multi_transform(groups, parameter_labels(params, config.model, no_decay))
    decay = t.get("layer_decay", 1.0)
    if decay != 1.0:
        if config.model.backbone.name != "vit":
            raise ValueError(f"train.layer_decay={decay}: layer-wise lr decay is for ViT backbones "
                             f"(model.backbone.name is {config.model.backbone.name!r})")
        tx = optax.chain(tx, scale_by_factors(vit_lr_decay_factors(params, config.model, decay)))
    return tx
