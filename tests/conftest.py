import os
import sys

# Tests run on the CPU; a persistent compilation cache makes repeated compiles cheap.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile far more than they run, so they ask XLA's CPU backend for its cheapest code:
# LLVM at -O0, and its older per-fusion emitters (the newer fusion emitters cost more compile
# time at -O0). On the tiny train step (AMD EPYC) the backend compile went from 26 s to 15 s
# with -O0, and from 8-11 s to 5-6 s with the older emitters, for steps of about the same speed.
# Subprocesses inherit them. XLA reads the flags when its CPU backend starts, after this file.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for flag in TEST_XLA_FLAGS:
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("BMASK_JAX_CACHE", os.path.expanduser("~/.cache/bmask_jax/xla")))


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker a core, at most 4; each worker holds its own JAX
    and compiled programs (up to ~3 GB for the full-size test)."""
    return max(1, min(os.cpu_count() or 1, 4))


# The test files that take longest, longest first, so that the workers finish together (the
# longest-processing-time-first rule; pytest.ini keeps xdist from reordering them); the rest
# follow in pytest's order. Seconds per file in one clean-clone run on 2 cores (AMD EPYC).
LONGEST_FIRST = ("test_nothing_lost.py",      # 136
                 "test_mask_variants.py",     # 124
                 "test_serving.py",           # 76
                 "test_data_parallel.py",     # 64
                 "test_multiprocess.py",      # 63
                 "test_full_size.py",         # 63
                 "test_pretrained.py",        # 61
                 "test_layers.py",            # 49
                 "test_resume.py",            # 46
                 "test_train.py",             # 46
                 "test_predictor.py",         # 43
                 "test_hrnet.py",             # 43
                 "test_foreground_buckets.py",  # 43
                 "test_device_check.py",      # 39
                 "test_static_shapes.py",     # 36
                 "test_init.py",              # 32
                 "test_cityscapes.py",        # 29
                 "test_weights.py",           # 28
                 "test_coco_data.py",         # 23
                 "test_nonfinite.py",         # 22
                 "test_cascade.py")           # 21


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _pin_xdist_worker_to_its_share_of_cores():
    """Worker k of n runs, with its subprocesses, on its own 1/n of the cores. XLA sizes its
    CPU thread pools by the cores a process may use, so each process then runs as many threads
    as its share: unpinned, two workers and their subprocesses ran two to four pools of two
    threads each on 2 cores, and the oversubscribed pools' spinning cost CPU time: the suite
    took 676 s (1211 s of CPU), pinned 481-582 s (873-1041 s). Before the first JAX
    computation, which creates XLA's CPU client."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not (worker.startswith("gw") and count > 1 and hasattr(os, "sched_setaffinity")):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return
    k = int(worker[2:])
    share = len(cores) // count
    os.sched_setaffinity(0, cores[k * share:(k + 1) * share])


def pytest_configure(config):
    _pin_xdist_worker_to_its_share_of_cores()
    # `pytest -m "not slow"`: the edit-test loop (about 2 minutes on 2 cores); the full suite
    # (README, .ci/run) runs everything.
    config.addinivalue_line("markers", "slow: trains or compiles a model for tens of seconds or more")
