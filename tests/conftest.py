import os
import sys

# Tests run on the CPU; a persistent compilation cache makes repeated compiles cheap.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("BMASK_JAX_CACHE", os.path.expanduser("~/.cache/bmask_jax/xla")))


def pytest_configure(config):
    # `pytest -m "not slow"`: the edit-test loop (about 2 minutes on 2 cores); the full suite
    # (README, .ci/run) runs everything.
    config.addinivalue_line("markers", "slow: trains or compiles a model for tens of seconds or more")
