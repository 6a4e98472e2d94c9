"""What the predict path's first call costs: a fresh process makes a Predictor from a workdir's
checkpoint and runs it on one image. Reported per model: seconds to restore the variables
(`inference_variables`, the Predictor's first step), seconds to the first detections (from the
Predictor's construction, compilation included), and the process's peak resident memory.

    python experiments/predict_first_call.py [--config configs/bmask_rcnn.py:shapes]
        [--config configs/bmask_rcnn.py:r50_fpn_1x] [--repeats 2]

Each config gets a step-0 checkpoint written once (random weights, with the optimizer's state
that training saves beside them); each measurement runs in its own process with no persistent
compilation cache, the configs alternating, and the median is printed. Quote the processor.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(config_arg: str, workdir: str) -> None:
    """A workdir holding a step-0 TrainState of the config (random weights: numpy, no compile)."""
    sys.path.insert(0, ROOT)
    from bmask_jax.config import from_file
    from bmask_jax.engine import checkpoints
    from bmask_jax.engine.state import step_zero_state
    from bmask_jax.engine.variables import random_variables

    config = from_file(config_arg)
    state, _ = step_zero_state(config, random_variables(config))
    mgr = checkpoints.manager(workdir, 1, async_save=False)
    checkpoints.save(mgr, 0, state, force=True)
    checkpoints.finish(mgr)


def first_call(config_arg: str, workdir: str) -> dict:
    """In this (fresh) process: restore, construct, first detections."""
    sys.path.insert(0, ROOT)
    import numpy as np

    from bmask_jax import Predictor
    from bmask_jax.config import from_file
    from bmask_jax.weights.pretrained import inference_variables

    config = from_file(config_arg)
    h, w = (480, 640) if config.data.dataset != "synthetic" else tuple(config.data.synthetic.image_size)
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)
    t0 = time.perf_counter()
    config, variables = inference_variables(config, workdir)
    t_restore = time.perf_counter() - t0
    predictor = Predictor(config, variables=variables, class_names=[f"c{i}" for i in range(config.model.num_classes)])
    out = predictor(image)
    total = time.perf_counter() - t0
    return {"restore_s": t_restore, "first_detections_s": total, "detections": len(out["scores"]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="config file[:variant], repeatable")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(first_call(*args.child)))
        return
    if args.write:
        write_checkpoint(*args.write)
        return
    configs = args.config or ["configs/bmask_rcnn.py:shapes", "configs/bmask_rcnn.py:r50_fpn_1x"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores; {args.repeats} fresh processes per config, median", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "BMASK_JAX_CACHE"}
    env["JAX_PLATFORMS"] = "cpu"
    me = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        workdirs = {}
        for c in configs:
            workdirs[c] = os.path.join(tmp, str(len(workdirs)))
            subprocess.run([sys.executable, me, "--write", c, workdirs[c]], check=True, env=env, cwd=ROOT)
        runs = {c: [] for c in configs}
        for _ in range(args.repeats):
            for c in configs:
                done = subprocess.run([sys.executable, me, "--child", c, workdirs[c]], check=True, env=env, cwd=ROOT,
                                      capture_output=True, text=True)
                runs[c].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for c, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("restore_s", "first_detections_s", "peak_rss_mib")}
        print(f"{c}: restore {med['restore_s']:.2f} s, first detections {med['first_detections_s']:.2f} s, "
              f"peak RSS {med['peak_rss_mib']:.0f} MiB  (runs: "
              + ", ".join(f"{r['restore_s']:.2f}/{r['first_detections_s']:.2f} s {r['peak_rss_mib']:.0f} MiB"
                          for r in rs) + ")", flush=True)


if __name__ == "__main__":
    main()
