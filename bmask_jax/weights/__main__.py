"""python -m bmask_jax.weights (the command, still in convert.py until the split)."""
from absl import app

from bmask_jax.weights.convert import _define_flags, main

_define_flags()
app.run(main)
