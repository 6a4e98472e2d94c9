"""Latency per image of the Predictor and of the same model exported (jax.export + serving.py),
one image per call, on the embedded model and on the COCO R50-FPN at 800x1333.

    python experiments/predictor_latency.py [--workdir runs/shapes_bmask] [--repeats 5]

The embedded model is the trained one in --workdir if given (else fresh weights); the R50-FPN
has random weights (bmask_jax.engine.variables.random_variables) and every detection kept
(score threshold 0, 100 per image), so that pasting 100 masks is part of the time, as in COCO
evaluation. Compilation is excluded (one warm-up call per model); the median of --repeats
calls is reported, both models timed in the same run, alternating.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bmask_jax import config as config_lib  # noqa: E402
from bmask_jax.data.synthetic import SyntheticShapes  # noqa: E402
from bmask_jax.inference.export import export_model  # noqa: E402
from bmask_jax.models.bmask_rcnn import BMaskRCNN  # noqa: E402
from bmask_jax.inference.predictor import Predictor  # noqa: E402
from bmask_jax.inference.serving import ExportedModel  # noqa: E402
from bmask_jax.engine.variables import init_variables, random_variables  # noqa: E402


def time_calls(fns: dict, images: list, repeats: int) -> dict:
    """Median seconds per call of each fn on each image, fns alternating image by image."""
    for fn in fns.values():
        fn(images[0])                                   # compile
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for image in images:
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(image)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(name: str, config, variables, class_names, images, repeats: int) -> dict:
    config.eval.batch_size = 1
    predictor = Predictor(config, variables=variables, class_names=class_names)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(config, os.path.join(tmp, "m"), variables=variables, class_names=class_names)
        served = ExportedModel(os.path.join(tmp, "m"), batch_size=1)
        n = [len(predictor(im)["scores"]) for im in images]
        got = time_calls({"predictor": predictor, "exported": served}, images, repeats)
    print(f"{name}: Predictor {1000 * got['predictor']:.0f} ms/image, exported {1000 * got['exported']:.0f} "
          f"ms/image (ratio {got['exported'] / got['predictor']:.3f}; {np.mean(n):.0f} detections/image)",
          flush=True)
    return got


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="", help="trained embedded-model workdir (configs/bmask_rcnn.py:shapes)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip_r50", action="store_true")
    a = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs", flush=True)

    c = config_lib.variant(config_lib.mask_head(config_lib.base(), "bmask"), "shapes")
    if a.workdir:
        from bmask_jax.engine.variables import restore_variables
        variables = restore_variables(c, a.workdir)
    else:
        variables = init_variables(c, BMaskRCNN(c.model), jax.random.PRNGKey(0))
    shapes = SyntheticShapes("val", num_images=4)
    measure("embedded BMask R-CNN, 128x128", c, variables, list(shapes.class_names),
            [shapes[i]["image"] for i in range(4)], a.repeats)

    if not a.skip_r50:
        c = config_lib.variant(config_lib.mask_head(config_lib.base(), "bmask"), "r50_fpn_1x")
        c.model.roi_heads.score_threshold = 0.0
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (480, 640, 3), np.uint8), rng.integers(0, 256, (427, 640, 3), np.uint8)]
        measure("BMask R-CNN R50-FPN, 800x1333 (images 480x640 -> 800x1067)", c, random_variables(c),
                [f"c{k}" for k in range(80)], images, max(2, a.repeats // 2))


if __name__ == "__main__":
    main()
