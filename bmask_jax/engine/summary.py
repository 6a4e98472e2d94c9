"""Per-module parameter counts and the mask head's cost per RoI.

    bmask-jax summary --config configs/bmask_rcnn.py:r50_fpn_1x

The mask-head cost is counted as the paper's Table 8 counts it (SPEC section 11):
multiply-adds per RoI at 14x14 of the 3x3 and 1x1 convs, leaving out the transposed convs
and the 1x1 predictors; the same figure with those included is printed beside it.
"""
from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bmask_jax import errors
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.models.layers import Conv, Deconv2x
from bmask_jax.engine.variables import dummy_batch, init_variables


def parameter_counts(config) -> dict[str, int]:
    """Trainable parameters per top-level module (FrozenBN constants are not parameters)."""
    shapes = jax.eval_shape(lambda: init_variables(config, BMaskRCNN(config.model), jax.random.PRNGKey(0)))
    return {name: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
            for name, tree in shapes["params"].items()}


def mask_head_macs_per_roi(config) -> tuple[int, int]:
    """(MACs of the 3x3/1x1 convs, MACs of every layer incl. transposed convs and predictors)
    for one RoI through the mask head, recorded from the layers' actual shapes."""
    cfg = config.model
    model = BMaskRCNN(cfg)
    res = cfg.mask_head.pooler_resolution
    channels = cfg.fpn.channels
    mask_feats = jnp.zeros((1, res, res, channels))
    boundary_feats = jnp.zeros((1, cfg.boundary.resolution, cfg.boundary.resolution, channels))
    records = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (Conv, Deconv2x)):
            x = args[0]
            if isinstance(module, Conv):
                macs = out.shape[1] * out.shape[2] * module.kernel ** 2 * x.shape[-1] * out.shape[-1]
                core = "predictor" not in module.name
            else:
                macs = x.shape[1] * x.shape[2] * 4 * x.shape[-1] * out.shape[-1]
                core = False
            records.append((macs, core))
        return out

    def run():
        variables = model.init({"params": jax.random.PRNGKey(0), "sampling": jax.random.PRNGKey(1)},
                               dummy_batch(config))
        with nn.intercept_methods(record):
            model.apply(variables, mask_feats, boundary_feats,
                        method=lambda m, a, b: m.mask_head(a, b))

    jax.eval_shape(run)
    return sum(m for m, core in records if core), sum(m for m, _ in records)


def format_summary(config) -> str:
    counts = parameter_counts(config)
    order = ["backbone", "fpn", "rpn_head", "box_head", "box_predictor", "mask_head"]
    names = [n for n in order if n in counts] + [n for n in counts if n not in order]
    lines = [f"{'module':16s}{'parameters':>14s}"]
    lines += [f"{n:16s}{counts[n]:>14,d}" for n in names]
    lines.append(f"{'total':16s}{sum(counts.values()):>14,d}")
    core, total = mask_head_macs_per_roi(config)
    lines.append(f"mask head ({config.model.mask_head.name}) per RoI: {core / 1e9:.3f} GMACs "
                 f"(3x3/1x1 convs at {config.model.mask_head.pooler_resolution}x"
                 f"{config.model.mask_head.pooler_resolution}, the paper's 'GFLOPs'); "
                 f"{total / 1e9:.3f} GMACs with transposed convs and predictors")
    return "\n".join(lines)


def main(argv):
    del argv
    with errors.boundary():
        print(format_summary(flags.FLAGS.config))


if __name__ == "__main__":
    sys.argv = errors.take_verbose_flag(sys.argv)
    config_flags.DEFINE_config_file("config", None, "Config file[:variant].")
    flags.mark_flags_as_required(["config"])
    app.run(main)
