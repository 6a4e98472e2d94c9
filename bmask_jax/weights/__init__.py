"""bmask_jax/weights.py, moved as it is to weights/convert.py; the next commit splits it."""
from bmask_jax.weights.convert import *  # noqa: F401,F403
