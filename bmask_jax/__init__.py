"""BMask R-CNN in JAX/Flax. `bmask_jax.Predictor` runs a trained model on images; `bmask-jax`
(or `python -m bmask_jax`) is the command line."""
from bmask_jax import _moved

_moved.install()


def __getattr__(name):
    # Lazily, so that `import bmask_jax.inference.serving` (jax, numpy and flatbuffers only)
    # does not load the model.
    if name == "Predictor":
        from bmask_jax.inference.predictor import Predictor
        return Predictor
    raise AttributeError(f"module 'bmask_jax' has no attribute {name!r}")
