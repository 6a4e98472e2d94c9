"""Serve a model exported with `bmask-jax export`, with jax, numpy and flatbuffers
(jax.export's deserializer) alone: no flax, no model code, no Pillow, no pycocotools.

    from bmask_jax.inference.serving import ExportedModel
    model = ExportedModel("exported/shapes_bmask")
    out = model(image)                 # RGB uint8 [H, W, 3], or a list of them

It prepares images exactly as the Predictor does (Pillow's bilinear resize, reproduced bit for
bit in numpy; padding into the smallest canvas bucket), runs the exported detector of each
bucket on batches of up to `batch_size` images, and returns the same instances: boxes,
scores, classes, class_names, masks and, for the BMask and Sobel heads, boundaries.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax import export

from bmask_jax.data.pipeline import eval_plan
from bmask_jax.data.transforms import prepare_example, resize_image_numpy, rgb_array
from bmask_jax.ops.postprocess import image_instances

SERVING_FILE = "serving.json"      # as bmask_jax.inference.export writes them
SUPPORTED_VERSION = 1


class ExportedModel:
    """An exported detector. batch_size: images per call of the exported function (its batch
    size is symbolic; this bounds memory)."""

    def __init__(self, directory: str, batch_size: int = 8):
        path = os.path.join(directory, SERVING_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: export a model with bmask-jax export")
        with open(path) as f:
            self.meta = json.load(f)
        if self.meta.get("version") != SUPPORTED_VERSION:
            raise ValueError(f"{path}: format version {self.meta.get('version')}; this serving reads "
                             f"version {SUPPORTED_VERSION}")
        self.batch_size = batch_size
        self.class_names = list(self.meta["class_names"])
        self.category_ids = list(self.meta["category_ids"])
        self.buckets = [tuple(b) for b in self.meta["canvas_buckets"]]
        self._models = {}
        for b in self.buckets:
            with open(os.path.join(directory, self.meta["models"][f"{b[0]}x{b[1]}"]), "rb") as f:
                self._models[b] = export.deserialize(bytearray(f.read()))
        # The weights, in the exported functions' argument order, go back into the variables
        # tree that the artifacts themselves record (empty collections included).
        with np.load(os.path.join(directory, self.meta["weights"])) as weights:
            leaves = [weights[name] for name in self.meta["variables"]]
        (variables, _, _), _ = next(iter(self._models.values())).in_tree.unflatten(leaves + [None, None])
        self.variables = jax.device_put(variables)

    def __call__(self, images):
        """One image array -> its instances; a list -> a list of them. Arrays follow the
        Predictor's rule (transforms.rgb_array): RGB, grey or RGBA, uint8 or numbers in [0, 255];
        a bad one fails the call with a ValueError naming its index ("image 2: ...")."""
        single = isinstance(images, np.ndarray)
        out = self.predict_arrays([images] if single else list(images))
        return out[0] if single else out

    def predict_arrays(self, images: list[np.ndarray]) -> list[dict]:
        """Images prepared as the Predictor prepares them (Pillow's resize, in numpy), run in
        batches that share a canvas bucket."""
        arrays = [rgb_array(im, f"image {i}") for i, im in enumerate(images)]     # all checked first
        prepared = [prepare_example({"image": a}, self.meta["test_short_side"], self.meta["max_size"],
                                    self.buckets, False, 0, 0, with_gt=False, resize=resize_image_numpy)
                    for a in arrays]
        results: list = [None] * len(images)
        for chunk in eval_plan([p["image"].shape[:2] for p in prepared], self.batch_size):
            chunk = [i for i in chunk if i >= 0]          # the batch size is symbolic: no padding
            canvas = prepared[chunk[0]]["image"].shape[:2]
            det = jax.device_get(self._models[canvas].call(
                self.variables, np.stack([prepared[i]["image"] for i in chunk]),
                np.stack([prepared[i]["image_hw"] for i in chunk])))
            for row, i in enumerate(chunk):
                results[i] = image_instances(det, row, prepared[i]["scale"], prepared[i]["orig_hw"],
                                             self.meta["mask_threshold"], self.class_names)
        return results
