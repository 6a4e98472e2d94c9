"""Predict on image files: PNGs with masks, boxes, labels and boundaries, plus COCO results."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from bmask_jax.data.images import load_rgb
from bmask_jax.data.transforms import prepare_example
from bmask_jax.evaluate import DETECT_KEYS, make_detector, postprocess, to_coco_results
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


def predict(config, variables: dict, class_names, output_dir: str) -> str:
    """Run on config.predict.inputs; write <name>.png per image and predictions.json."""
    os.makedirs(output_dir, exist_ok=True)
    detect = make_detector(config)
    c = config.data
    results = []
    for image_id, path in enumerate(list_images(config.predict.inputs), start=1):
        image = load_rgb(path)
        ex = prepare_example({"image": image, "image_id": image_id}, c.test_short_side, c.max_size,
                             c.canvas_buckets, False, c.max_instances, c.gt_mask_size, with_gt=False)
        batch = {k: np.repeat(ex[k][None], config.eval.batch_size, axis=0) for k in DETECT_KEYS}
        det = jax.device_get(detect(variables, batch))
        inst = postprocess(det, 0, ex["scale"], ex["orig_hw"], config.eval.mask_threshold)
        keep = inst["scores"] >= config.predict.score_threshold
        inst = {k: (v[keep] if v is not None else None) for k, v in inst.items()}
        for r in to_coco_results(image_id, inst, list(range(1, len(class_names) + 1))):
            results.append(dict(r, file_name=os.path.basename(path)))
        drawn = draw_instances(image, inst["boxes"], inst["classes"], inst["scores"], inst["masks"],
                               class_names, inst["boundaries"])
        save_image(os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + ".png"), drawn)
    out = os.path.join(output_dir, "predictions.json")
    with open(out, "w") as f:
        json.dump(results, f)
    return out
