"""Predict on image files: PNGs with masks, boxes, labels and boundaries, plus COCO results."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from PIL import Image

from bmask_jax import sharding
from bmask_jax.data.images import load_rgb
from bmask_jax.data.pipeline import eval_batches
from bmask_jax.evaluate import DETECT_KEYS, global_eval_batch, make_detector, postprocess, to_coco_results
from bmask_jax.visualize import draw_instances, save_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: str) -> list[str]:
    """Image paths from a comma-separated list of files and folders."""
    paths = []
    for item in [p for p in inputs.split(",") if p]:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item)
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"predict.inputs: {item!r} is neither an image file nor a folder")
    if not paths:
        raise FileNotFoundError(f"predict.inputs={inputs!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


class ImageFiles:
    """Image files as a dataset for eval_batches: example i is {"image", "image_id": i + 1}.
    The images decoded for the current batch are kept for drawing (`decoded`), so that each
    file is decoded once; `forget` drops them after the batch."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._decoded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        image = self._decoded[i] = load_rgb(self.paths[i])
        return {"image": image, "image_id": i + 1}

    def decoded(self, i: int) -> np.ndarray:
        return self._decoded[i] if i in self._decoded else load_rgb(self.paths[i])

    def forget(self) -> None:
        self._decoded.clear()

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image as load_rgb returns it, from the file headers (EXIF
        orientations 5-8 turn the image by 90 degrees)."""
        out = []
        for path in self.paths:
            try:
                with Image.open(path) as im:
                    w, h = im.size
                    turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            except OSError:
                h, w = load_rgb(path).shape[:2]        # raises ValueError naming the path
                turned = False
            out.append((w, h) if turned else (h, w))
        return out


def predict(config, variables: dict, class_names, output_dir: str, mesh=None) -> str | None:
    """Run on config.predict.inputs; write <name>.png per image and predictions.json.

    Data parallel like evaluation: batches of different images (eval.batch_size, rounded up to
    the device count) over every device of every process; each process draws its own images
    and process 0 writes predictions.json (and returns its path; the others return None)."""
    mesh = mesh or sharding.make_mesh()
    os.makedirs(output_dir, exist_ok=True)
    detect = make_detector(config, mesh)
    variables = sharding.put_replicated(variables, mesh)
    files = ImageFiles(list_images(config.predict.inputs))
    results = []
    batches = eval_batches(files, config.data, global_eval_batch(config.eval.batch_size, mesh), -1,
                           jax.process_index(), jax.process_count(), files.sizes())
    for batch in batches:
        det = sharding.local_rows(detect(variables, sharding.global_batch(
            {k: batch[k] for k in DETECT_KEYS}, mesh)), mesh)
        for i in np.nonzero(batch["is_real"])[0]:
            image_id = int(batch["image_id"][i])
            path = files.paths[image_id - 1]
            inst = postprocess(det, i, batch["scale"][i], batch["orig_hw"][i], config.eval.mask_threshold)
            keep = inst["scores"] >= config.predict.score_threshold
            inst = {k: (v[keep] if v is not None else None) for k, v in inst.items()}
            for r in to_coco_results(image_id, inst, list(range(1, len(class_names) + 1))):
                results.append(dict(r, file_name=os.path.basename(path)))
            drawn = draw_instances(files.decoded(image_id - 1), inst["boxes"], inst["classes"], inst["scores"], inst["masks"],
                                   class_names, inst["boundaries"])
            save_image(os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + ".png"), drawn)
        files.forget()
    results = sharding.gather_to_main(results)
    if results is None:
        return None
    results.sort(key=lambda r: r["image_id"])
    out = os.path.join(output_dir, "predictions.json")
    with open(out, "w") as f:
        json.dump(results, f)
    return out
