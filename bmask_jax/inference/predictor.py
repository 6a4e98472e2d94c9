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

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np

from bmask_jax.engine import sharding
from bmask_jax.errors import UsageError
from bmask_jax.data.images import load_rgb
from bmask_jax.data.pipeline import eval_plan
from bmask_jax.data.transforms import choose_canvas, prepare_example, resize_shortest_edge, rgb_array
from bmask_jax.evaluation.evaluate import DETECT_KEYS, global_eval_batch, make_detector
from bmask_jax.ops.postprocess import image_instances
from bmask_jax.weights.pretrained import inference_variables


def as_rgb(image, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """An image given as a path or an array -> RGB uint8 [H, W, 3] (transforms.rgb_array's rule
    for arrays, shared with serving.ExportedModel). Files above max_pixels are refused."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(os.fspath(image), max_pixels)      # ValueError naming the file
    return rgb_array(image, name)


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
        known = _known_labels(config)
        if known is not None:
            return known
        logging.warning("class names: cannot read the dataset of the config (%s); naming classes 'class 0'..", e)
        return [f"class {i}" for i in range(k)], list(range(1, k + 1))
    if len(names) != k:
        raise ValueError(f"the dataset has {len(names)} classes but model.num_classes is {k}")
    return names, ids


def _known_labels(config) -> tuple[list[str], list[int]] | None:
    """COCO's or Cityscapes' own class names and ids for a model of theirs used without the
    dataset's files (a model-zoo model on your photos)."""
    k, dataset = config.model.num_classes, config.data.dataset
    if dataset in ("coco", "tfds") and k == 80:
        from bmask_jax.data.coco import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
        return list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS)
    if dataset == "cityscapes" and k == 8:
        from bmask_jax.data.cityscapes import CATEGORY_IDS, CLASS_NAMES
        return list(CLASS_NAMES), list(CATEGORY_IDS)
    return None


class Predictor:
    """Run a model on images of any size; see the module docstring.

    config: the model's config (the config values that the workdir's weights record, or that
        config.model.weights implies, are applied).
    workdir: a training or weight-import workdir (its latest checkpoint; without one, and with
        None, config.model.weights), unless `variables` ({"params", "frozen"}) are given.
    class_names: names of the model's classes (default: those of the config's dataset).
    batch_size: images per step (default eval.batch_size), rounded up to the device count.
    score_threshold: drop detections scoring lower (default: keep all the model returns).
    devices: where to run (default: every device of this process).
    """

    def __init__(self, config, workdir: str | None = None, *, variables: dict | None = None,
                 class_names: Sequence[str] | None = None, batch_size: int | None = None,
                 score_threshold: float = 0.0, devices=None, overrides: dict | None = None):
        if workdir is not None and variables is not None:
            raise ValueError("Predictor: give a workdir (to restore its latest checkpoint) or variables, not both")
        if workdir is None and variables is None and not config.model.weights:
            raise UsageError("Predictor: give a workdir, variables, or a config with model.weights "
                             "(or use Predictor.from_pretrained)")
        if variables is None:       # the config that comes back carries what the weights imply
            config, variables = inference_variables(config, workdir, overrides)
        self.config = config.copy_and_resolve_references()
        if class_names is None:
            class_names, self.category_ids = dataset_labels(self.config)
        else:
            self.category_ids = list(range(1, len(class_names) + 1))
        self.class_names = list(class_names)
        self.mesh = sharding.make_mesh(jax.local_devices() if devices is None else devices)
        self.batch_size = global_eval_batch(batch_size or self.config.eval.batch_size, self.mesh)
        self.score_threshold = score_threshold
        self.variables = sharding.put_replicated(variables, self.mesh)
        self._detect = make_detector(self.config, self.mesh)

    @classmethod
    def from_pretrained(cls, weights: str, config=None, **kwargs) -> Predictor:
        """A Predictor of published or saved weights: a model-zoo name (python -m
        bmask_jax.weights.model_zoo; its config is the zoo's unless `config` is given), an https:// or
        detectron2:// URL, or a local file (these need `config`, the model they fit). Files are
        downloaded once into $BMASK_JAX_HOME. kwargs: as Predictor's."""
        from bmask_jax.weights import model_zoo
        if config is None:
            if weights not in model_zoo.ENTRIES:
                raise ValueError(f"Predictor.from_pretrained({weights!r}): not a model-zoo name, so give the config "
                                 f"it fits (config=...); zoo names: {', '.join(model_zoo.ENTRIES)}")
            config = model_zoo.get(weights).build_config()
        config = config.copy_and_resolve_references()
        config.model.weights = weights
        return cls(config, **kwargs)

    def __call__(self, images):
        """One image (an RGB array or a path) -> its instances; a list -> a list of them.

        Instances (numpy, original-image pixels): boxes [N, 4] xyxy float32, scores [N],
        classes [N] (contiguous ids), class_names [N], masks [N, H, W] bool, and boundaries
        [N, H, W] bool where the mask head predicts them (BMask and Sobel heads)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        arrays = [as_rgb(x, f"image {i}", self.config.predict.max_image_pixels) for i, x in enumerate(items)]
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
