"""BMask R-CNN in JAX/Flax. `bmask_jax.Predictor` runs a trained model on images."""


def __getattr__(name):
    # Lazily, so that `import bmask_jax.serving` (jax, numpy and flatbuffers only) does not load the model.
    if name == "Predictor":
        from bmask_jax.predictor import Predictor
        return Predictor
    raise AttributeError(f"module 'bmask_jax' has no attribute {name!r}")
