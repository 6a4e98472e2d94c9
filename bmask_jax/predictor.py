"""`Predictor`: a trained (or imported) model as a Python function on images, as detectron2's
DefaultPredictor.

    from bmask_jax import Predictor
    from configs.bmask_rcnn import get_config

    predictor = Predictor(get_config("shapes"), "runs/shapes_bmask")
    out = predictor("photo.png")              # an RGB uint8 array, a path, or a list of either
    out["boxes"], out["scores"], out["class_names"], out["masks"], out["boundaries"]

Images are prepared as in evaluation (resized, padded into the smallest canvas bucket that
holds them), grouped by bucket and run in batches over every local device; the detector is
compiled once per bucket.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np

from bmask_jax import sharding
from bmask_jax.data.images import load_rgb
from bmask_jax.data.pipeline import eval_plan
from bmask_jax.data.transforms import choose_canvas, prepare_example, resize_shortest_edge
from bmask_jax.evaluate import DETECT_KEYS, global_eval_batch, make_detector
from bmask_jax.postprocess import image_instances
from bmask_jax.state import restore_variables

WEIGHTS_IMPORT_RECORD = "weights_import.json"      # written by python -m bmask_jax.weights


def as_rgb(image, name: str = "image") -> np.ndarray:
    """An image given as a path or an array -> RGB uint8 [H, W, 3]. Arrays may be [H, W]
    (grey), [H, W, 3] (RGB) or [H, W, 4] (alpha dropped), of uint8 or of floats in [0, 255]."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(os.fspath(image))                  # ValueError naming the file
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or 0 in a.shape:
        raise ValueError(f"{name}: expected an RGB array [H, W, 3] (or [H, W] grey, [H, W, 4] RGBA), "
                         f"got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number) or np.isnan(a).any() or a.min() < 0 or a.max() > 255:
            raise ValueError(f"{name}: expected uint8 pixel values (or numbers in [0, 255]), got {a.dtype} "
                             f"in [{a.min()}, {a.max()}]")
        a = np.round(a).astype(np.uint8)
    return a


def config_for_workdir(config, workdir: str):
    """config with the changes that a weight import into `workdir` recorded (pixel format,
    normalisation, ...): the imported weights only make sense with them. A copy; warns
    about each value it changes."""
    record = os.path.join(workdir, WEIGHTS_IMPORT_RECORD)
    config = config.copy_and_resolve_references()
    if not os.path.exists(record):
        return config
    with open(record) as f:
        imported = json.load(f)
    if not imported.get("config_changes_applied", True):
        return config
    from bmask_jax.weights.importer import apply_config_changes
    wanted = {k: tuple(new) if isinstance(new, list) else new
              for k, (_, new) in imported.get("config_differences", {}).items()}
    changed = apply_config_changes(config, wanted)
    if changed:
        logging.warning("%s: the weights were imported with these config values; using them: %s", record,
                        "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    return config


def dataset_labels(config) -> tuple[list[str], list[int]]:
    """Class names and dataset category ids (contiguous class k -> id) of the config's dataset,
    or generic ones ("class 0", ids 1..K) where the dataset cannot be read here (a COCO model
    used without the annotation files)."""
    from bmask_jax.data.pipeline import build_dataset
    k = config.model.num_classes
    try:
        ds = build_dataset(config.data, config.data.eval_split)
        names = list(ds.class_names)
        ids = list(getattr(ds, "category_ids", range(1, len(names) + 1)))
    except (OSError, ValueError) as e:
        logging.warning("class names: cannot read the dataset of the config (%s); naming classes 'class 0'..", e)
        return [f"class {i}" for i in range(k)], list(range(1, k + 1))
    if len(names) != k:
        raise ValueError(f"the dataset has {len(names)} classes but model.num_classes is {k}")
    return names, ids


class Predictor:
    """Run a model on images of any size; see the module docstring.

    config: the model's config (for an imported-weights workdir, the config it was imported
        with; the config changes the import recorded are applied).
    workdir: a training or weight-import workdir (its latest checkpoint), unless `variables`
        ({"params", "frozen"}) are given.
    class_names: names of the model's classes (default: those of the config's dataset).
    batch_size: images per step (default eval.batch_size), rounded up to the device count.
    score_threshold: drop detections scoring lower (default: keep all the model returns).
    devices: where to run (default: every device of this process).
    """

    def __init__(self, config, workdir: str | None = None, *, variables: dict | None = None,
                 class_names: Sequence[str] | None = None, batch_size: int | None = None,
                 score_threshold: float = 0.0, devices=None):
        if (workdir is None) == (variables is None):
            raise ValueError("Predictor: give a workdir (to restore its latest checkpoint) or variables, not both")
        self.config = config_for_workdir(config, workdir) if workdir else config.copy_and_resolve_references()
        if class_names is None:
            class_names, self.category_ids = dataset_labels(self.config)
        else:
            self.category_ids = list(range(1, len(class_names) + 1))
        self.class_names = list(class_names)
        self.mesh = sharding.make_mesh(jax.local_devices() if devices is None else devices)
        self.batch_size = global_eval_batch(batch_size or self.config.eval.batch_size, self.mesh)
        self.score_threshold = score_threshold
        if variables is None:
            variables = restore_variables(self.config, workdir)
        self.variables = sharding.put_replicated(variables, self.mesh)
        self._detect = make_detector(self.config, self.mesh)

    def __call__(self, images):
        """One image (an RGB array or a path) -> its instances; a list -> a list of them.

        Instances (numpy, original-image pixels): boxes [N, 4] xyxy float32, scores [N],
        classes [N] (contiguous ids), class_names [N], masks [N, H, W] bool, and boundaries
        [N, H, W] bool where the mask head predicts them (BMask and Sobel heads)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        arrays = [as_rgb(x, f"image {i}") for i, x in enumerate(items)]
        out = self.predict_arrays(arrays)
        return out[0] if single else out

    def canvas_of(self, image_hw) -> tuple[int, int]:
        d = self.config.data
        return choose_canvas(resize_shortest_edge(tuple(image_hw), d.test_short_side, d.max_size), d.canvas_buckets)

    def predict_arrays(self, images: list[np.ndarray]) -> list[dict]:
        """RGB uint8 arrays -> their instances, in order: batches share a canvas bucket; the last
        batch of a bucket is padded by repeating one of its images."""
        d = self.config.data
        results: list[dict | None] = [None] * len(images)
        for chunk in eval_plan([self.canvas_of(im.shape[:2]) for im in images], self.batch_size):
            fill = next(i for i in chunk if i >= 0)
            prepared = [prepare_example({"image": images[i if i >= 0 else fill]}, d.test_short_side, d.max_size,
                                        d.canvas_buckets, False, d.max_instances, d.gt_mask_size, with_gt=False)
                        for i in chunk]
            batch = {k: np.stack([p[k] for p in prepared]) for k in DETECT_KEYS}
            det = jax.device_get(self._detect(self.variables, batch))
            for row, i in enumerate(chunk):
                if i >= 0:
                    results[i] = image_instances(det, row, prepared[row]["scale"], prepared[row]["orig_hw"],
                                                 self.config.eval.mask_threshold, self.class_names,
                                                 self.score_threshold)
        return results
