import os
import sys

# Tests run on the CPU; a persistent compilation cache makes repeated compiles cheap.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("BMASK_JAX_CACHE", os.path.expanduser("~/.cache/bmask_jax/xla")))
