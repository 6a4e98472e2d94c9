"""--mode predict: image files -> pictures (masks, boxes, labels, boundaries) and COCO-format
predictions.json, through the Predictor; video files -> annotated videos and a JSON line per
frame (video.py). Files that cannot be read are reported and skipped; the rest are still
predicted and written."""
from __future__ import annotations

import json
import logging
import os

import jax

from bmask_jax import errors
from bmask_jax.engine import sharding
from bmask_jax.data.images import load_rgb
from bmask_jax.evaluation.evaluate import to_coco_results
from bmask_jax.inference.predictor import Predictor
from bmask_jax.inference.video import VIDEO_EXTENSIONS, is_video, predict_video, require_av
from bmask_jax.evaluation.visualize import draw_instances, save_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FAILURES_FILE = "failed_images.json"


def list_images(inputs: str) -> list[str]:
    """Image and video paths from a comma-separated list of files and folders. A named file is
    taken whatever its extension (and reported later if it is not an image); folders
    contribute their files with an image or video extension. A name that does not exist is an
    error."""
    paths = []
    for item in [p for p in inputs.split(",") if p]:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item)
                            if f.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"predict.inputs: {item!r} is neither an image or video file nor a folder")
    if not paths:
        raise FileNotFoundError(f"predict.inputs={inputs!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                f"or videos ({', '.join(VIDEO_EXTENSIONS)})")
    return paths


RESERVED_NAMES = ("predictions.json", FAILURES_FILE)


def output_names(paths: list[str], output_dir: str | None = None) -> list[tuple[str, ...]]:
    """The files each input writes into output_dir, none of them an input or another output:
    (<base>.png,) for an image, (<base>.mp4, <base>.jsonl) for a video. <base> is the input's
    stem; its whole name where stems collide (same.jpg and same.png -> same.jpg.png,
    same.png.png; clip.mp4 and clip.mov -> clip.mp4.mp4, clip.mov.mp4); <name>.<position>
    where whole names collide (a/x.jpg and b/x.jpg). Where that file would be an input itself
    (the output folder is the input folder: photo.png -> photo.png.png), another input's
    output, or predictions.json / failed_images.json, the next of these forms is taken. Every
    process of a multi-host run derives the same names from the same list."""
    import collections
    names = [os.path.basename(p) for p in paths]
    stems = [os.path.splitext(n)[0] for n in names]
    stem_count, name_count = collections.Counter(stems), collections.Counter(names)
    inputs = {os.path.realpath(p) for p in paths}
    taken = set(RESERVED_NAMES)

    def free(file: str) -> bool:
        return file not in taken and not (
            output_dir is not None and os.path.realpath(os.path.join(output_dir, file)) in inputs)

    out = []
    for k, (name, stem) in enumerate(zip(names, stems)):
        forms = ([stem] if stem_count[stem] == 1 else []) + ([name] if name_count[name] == 1 else [])
        forms += [f"{name}.{k}"] + [f"{name}.{k}.{j}" for j in range(1, len(paths) + 2)]
        suffixes = (".mp4", ".jsonl") if is_video(name) else (".png",)
        files = next(files for files in ([base + s for s in suffixes] for base in forms) if all(map(free, files)))
        taken.update(files)
        out.append(tuple(files))
    return out


def predict(config, workdir: str, output_dir: str, predictor: Predictor | None = None,
            overrides: dict | None = None) -> tuple[str | None, list]:
    """Predict on config.predict.inputs: <name>.png per image and predictions.json (COCO
    results with "file_name"; image_id is the file's position in the input list + 1).

    Multi-host: each process predicts every process_count-th file on its own devices and draws
    its pictures; process 0 gathers and writes the JSON files. Returns (path of
    predictions.json or None on other processes, the failures: [{"file", "error"}] of every
    process). Unreadable files are skipped, listed in failed_images.json and returned. The model
    is workdir's newest checkpoint, else config.model.weights (the Predictor's rule)."""
    if config.predict.frame_stride < 1 or config.predict.max_frames < 0:
        raise ValueError(f"predict.frame_stride must be >= 1 and predict.max_frames >= 0 (0: every frame), got "
                         f"{config.predict.frame_stride} and {config.predict.max_frames}")
    paths = list_images(config.predict.inputs)     # a missing input is one error before the model is built
    if any(map(is_video, paths)):
        require_av()                                # the missing extra is said before the model runs
    outputs = output_names(paths, output_dir)
    errors.writable_folder(output_dir, "predict.output_dir")      # before the model, not after it
    predictor = predictor or Predictor(config, workdir, score_threshold=config.predict.score_threshold,
                                       overrides=overrides)
    mine = list(range(jax.process_index(), len(paths), jax.process_count()))
    results, failures = [], []
    step = 4 * predictor.batch_size          # files decoded at a time: full batches ...
    budget = config.predict.max_image_pixels  # ... and at most this many pixels (+ one image) held

    def flush(group):
        images = [image for _, image in group]
        for (k, image), inst in zip(group, predictor.predict_arrays(images)):
            for r in to_coco_results(k + 1, inst, predictor.category_ids):
                results.append(dict(r, file_name=os.path.basename(paths[k])))
            drawn = draw_instances(image, inst["boxes"], inst["classes"], inst["scores"], inst["masks"],
                                   predictor.class_names, inst.get("boundaries"),
                                   min_size=config.predict.min_picture_size)
            save_image(os.path.join(output_dir, outputs[k][0]), drawn)

    group, pixels = [], 0
    for k in mine:
        if is_video(paths[k]):
            _, error = predict_video(paths[k], output_dir, predictor, config.predict.frame_stride,
                                     config.predict.max_frames, outputs=outputs[k],
                                     max_pixels=config.predict.max_image_pixels)
            if error:
                failures.append({"file": paths[k], "error": error})
            continue
        try:
            image = load_rgb(paths[k], max_pixels=budget)
        except ValueError as e:                    # load_rgb names the file
            logging.error("skipped: %s", e)
            failures.append({"file": paths[k], "error": str(e)})
            continue
        group.append((k, image))
        pixels += image.shape[0] * image.shape[1]
        if len(group) >= step or pixels >= budget:
            flush(group)
            group, pixels = [], 0
    if group:
        flush(group)
    results = sharding.gather_to_main(results)
    failures = sharding.gather_to_main(failures)
    if results is None:
        return None, []
    results.sort(key=lambda r: r["image_id"])
    out = os.path.join(output_dir, "predictions.json")
    with open(out, "w") as f:
        json.dump(results, f)
    failed = os.path.join(output_dir, FAILURES_FILE)
    if failures:
        with open(failed, "w") as f:
            json.dump(failures, f, indent=1)
    elif os.path.exists(failed):
        os.remove(failed)                  # from an earlier run into the same folder
    return out, failures
