"""Export a trained (or imported) model for serving.

    bmask-jax export --config configs/bmask_rcnn.py:shapes --workdir runs/shapes_bmask \\
        --output exported/shapes_bmask [--platforms cpu,cuda] [--format jax|saved_model]

--format jax (default) writes, into --output:
    model_<H>x<W>.jax   the detector on one canvas bucket, serialized with jax.export: inputs
                        (variables, image uint8 [B, H, W, 3], image_hw int32 [B, 2]), the batch
                        size B symbolic (any B works), lowered for each of --platforms;
    weights.npz         the variables, one array per "params/..." / "frozen/..." path;
    serving.json        what serving needs to prepare images and read the detections: canvas
                        buckets, resize sizes, mask threshold, class names and category ids.
`bmask_jax.inference.serving.ExportedModel(DIR)` runs it with jax, numpy and flatbuffers alone.

--format saved_model writes a TensorFlow SavedModel through jax2tf (TensorFlow must be
installed; it is not a dependency of bmask_jax): one signature per canvas bucket,
"bucket_<H>x<W>" (the first is also "serving_default"), taking image uint8 [B, H, W, 3]
and image_hw int32 [B, 2] with B = --batch_size (default 1), the variables as tf.Variables.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from bmask_jax import errors
from bmask_jax.errors import UsageError
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.weights.pretrained import inference_variables, recorded_config
from bmask_jax.inference.predictor import dataset_labels

from bmask_jax.inference.serving import SERVING_FILE
WEIGHTS_FILE = "weights.npz"
FORMAT_VERSION = 1


def model_file(canvas_hw) -> str:
    return f"model_{int(canvas_hw[0])}x{int(canvas_hw[1])}.jax"


def detector_function(config):
    """(variables, image, image_hw) -> the model's detections on the canvas, with XLA's own
    conv kernels: the CPU routes (models/cpu_kernels.py) serve training gradients on this
    machine's backend, while an export is for any platform and any batch size."""
    config = config.copy_and_resolve_references()
    config.model.kernels = "xla"
    model = BMaskRCNN(config.model)
    return lambda variables, image, image_hw: model.apply(  # noqa: E731
        variables, {"image": image, "image_hw": image_hw}, train=False)


def flatten_variables(variables: dict) -> dict[str, np.ndarray]:
    """{"params": {"a": {"b": x}}} -> {"params/a/b": x} (numpy), in jax's leaf order."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(leaf)
    return flat


def serving_metadata(config, class_names, category_ids, platforms, boundaries: bool) -> dict:
    d = config.data
    return {"format": "jax.export", "version": FORMAT_VERSION, "jax_version": jax.__version__,
            "platforms": list(platforms), "canvas_buckets": [list(b) for b in d.canvas_buckets],
            "models": {f"{b[0]}x{b[1]}": model_file(b) for b in d.canvas_buckets},
            "weights": WEIGHTS_FILE, "test_short_side": int(d.test_short_side), "max_size": int(d.max_size),
            "mask_threshold": float(config.eval.mask_threshold), "class_names": list(class_names),
            "category_ids": [int(i) for i in category_ids], "boundaries": boundaries,
            "mask_head": config.model.mask_head.name}


def _model(config, workdir: str | None, variables: dict | None, overrides: dict | None):
    """(config, variables) of the model to export: `variables` as given, else workdir's newest
    checkpoint, else config.model.weights (pretrained.py), with the config its weights imply."""
    if variables is not None:
        return recorded_config(config, workdir), variables
    if not workdir and not config.model.weights:
        raise UsageError("export: give --workdir (a trained run) or --config.model.weights=NAME|URL|FILE "
                         "(bmask-jax zoo lists the names)")
    return inference_variables(config, workdir, overrides)


def export_model(config, output: str, workdir: str | None = None, variables: dict | None = None,
                 platforms=None, class_names=None, overrides: dict | None = None) -> dict:
    """Write the jax.export artifacts of `config`'s model (weights from `variables`, else
    workdir's latest checkpoint, else config.model.weights) into `output`; returns the serving
    metadata. The files go to a temporary folder first and are moved in only when all are
    written: an interrupted export leaves no partial model behind."""
    config, variables = _model(config, workdir, variables, overrides)
    if class_names is None:
        class_names, category_ids = dataset_labels(config)
    else:
        category_ids = list(range(1, len(class_names) + 1))
    platforms = tuple(platforms or (jax.default_backend(),))
    variables = jax.device_get(variables)
    fn = jax.jit(detector_function(config))
    spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), variables)
    batch, = export.symbolic_shape("batch")
    os.makedirs(output, exist_ok=True)
    if os.path.exists(os.path.join(output, SERVING_FILE)):
        raise FileExistsError(f"{output} already holds an exported model ({SERVING_FILE}); choose an empty --output")
    boundaries = False
    with tempfile.TemporaryDirectory(dir=output) as tmp:
        for h, w in config.data.canvas_buckets:
            exported = export.export(fn, platforms=platforms)(
                spec, jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8), jax.ShapeDtypeStruct((batch, 2), jnp.int32))
            boundaries = "boundary_probs" in exported.out_tree.unflatten(list(range(exported.out_tree.num_leaves)))
            with open(os.path.join(tmp, model_file((h, w))), "wb") as f:
                f.write(exported.serialize())
        flat = flatten_variables(variables)
        np.savez(os.path.join(tmp, WEIGHTS_FILE), **flat)
        meta = serving_metadata(config, class_names, category_ids, platforms, boundaries)
        meta["variables"] = list(flat)         # the artifacts' leaf order
        with open(os.path.join(tmp, SERVING_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        # serving.json last: its presence marks a complete export.
        for name in sorted(os.listdir(tmp), key=lambda n: n == SERVING_FILE):
            os.replace(os.path.join(tmp, name), os.path.join(output, name))
    return meta


def export_saved_model(config, output: str, workdir: str | None = None, variables: dict | None = None,
                       batch_size: int = 1, overrides: dict | None = None) -> None:
    """A TensorFlow SavedModel of the detector through jax2tf (needs TensorFlow), for batches
    of batch_size images: TensorFlow's XlaCallModule (2.21) fails to refine this model's
    batch-polymorphic shapes ("Module has dynamic shapes"), so the batch is fixed."""
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise errors.MissingExtraError("--format saved_model needs TensorFlow (pip install tensorflow-cpu); "
                          "bmask_jax does not depend on it") from e
    config, variables = _model(config, workdir, variables, overrides)
    fn = detector_function(config)
    module = tf.Module()
    module.variables_tree = tf.nest.map_structure(tf.Variable, jax.device_get(variables))
    tf_fn = jax2tf.convert(fn, with_gradient=False)
    signatures = {}
    for h, w in config.data.canvas_buckets:
        f = tf.function(lambda image, image_hw: tf_fn(module.variables_tree, image, image_hw), autograph=False,
                        input_signature=[tf.TensorSpec((batch_size, h, w, 3), tf.uint8, name="image"),
                                         tf.TensorSpec((batch_size, 2), tf.int32, name="image_hw")])
        setattr(module, f"bucket_{h}x{w}", f)
        signatures[f"bucket_{h}x{w}"] = f
    signatures["serving_default"] = next(iter(signatures.values()))
    with _stablehlo_for_older_consumers():      # jax2tf serializes as the functions are traced
        signatures = {k: f.get_concrete_function() for k, f in signatures.items()}
        tf.saved_model.save(module, output, signatures=signatures)


@contextlib.contextmanager
def _stablehlo_for_older_consumers():
    """Serialize StableHLO for consumers up to 12 weeks older than this jax, not jax's default
    4: TensorFlow releases trail JAX's, and TF 2.21's XlaCallModule cannot read the ops that
    jax 0.10's default target writes (vhlo.composite_v2, from lax.top_k). Uses jax's private
    export module; where that has moved, the default target is kept."""
    from jax._src.export import _export
    hlo = getattr(_export, "hlo", None)
    requirement = getattr(getattr(hlo, "StablehloCompatibilityRequirement", None), "WEEK_12", None)
    if requirement is None:
        yield
        return
    original = hlo.get_version_from_compatibility_requirement
    hlo.get_version_from_compatibility_requirement = lambda _: original(requirement)
    try:
        yield
    finally:
        hlo.get_version_from_compatibility_requirement = original


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: file.py:variant.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Training or weight-import workdir (its latest checkpoint; without "
                        "one, the config's model.weights).")
    flags.DEFINE_string("output", None, "Empty directory to write the exported model to.")
    flags.DEFINE_enum("format", "jax", ["jax", "saved_model"], "jax.export artifacts, or a TF SavedModel.")
    flags.DEFINE_integer("batch_size", 1, "Images per call of a SavedModel signature (saved_model format; "
                         "the jax format takes any batch size).")
    flags.DEFINE_list("platforms", None, "Platforms to lower for (jax format), e.g. cpu,cuda,tpu; "
                      "default: this machine's.")
    flags.mark_flags_as_required(["config", "output"])


def main(argv):
    del argv
    from absl import flags
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    from ml_collections import config_flags
    f = flags.FLAGS
    overrides = config_flags.get_override_values(f["config"])
    with errors.boundary():
        _export(f, overrides)


def _export(f, overrides):
    if f.format == "saved_model":
        export_saved_model(f.config, f.output, f.workdir, batch_size=f.batch_size, overrides=overrides)
        print(f"wrote a SavedModel to {f.output}")
        return
    meta = export_model(f.config, f.output, f.workdir, platforms=f.platforms, overrides=overrides)
    print(f"wrote {len(meta['models'])} model(s) ({', '.join(meta['models'])}) for {', '.join(meta['platforms'])} "
          f"and {WEIGHTS_FILE} to {f.output}; load them with bmask_jax.inference.serving.ExportedModel({f.output!r})")


if __name__ == "__main__":
    from absl import app
    sys.argv = errors.take_verbose_flag(sys.argv)
    _define_flags()
    sys.exit(app.run(main))
