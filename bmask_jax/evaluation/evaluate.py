"""Inference over a split, COCO results JSON, pycocotools AP, the AP-vs-IoU curve, pictures."""
from __future__ import annotations

import errno
import json
import logging
import os

import jax
import numpy as np

from bmask_jax.evaluation import cityscapes_eval

from bmask_jax.engine import events, jit_cache, sharding
from bmask_jax.evaluation.coco_eval import IOU_TYPES, coco_evaluate, plot_ap_vs_iou
from bmask_jax.data.pipeline import build_dataset, eval_batches
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.ops.masks import masks_to_rle
from bmask_jax.ops.postprocess import postprocess
from bmask_jax.evaluation.visualize import draw_instances, save_image

DETECT_KEYS = ("image", "image_hw")


def make_detector(config, mesh=None):
    """A jitted function (variables, batch) -> detections on the canvas. Over a `mesh`, the
    batch and the detections are sharded along 'data' and the variables replicated: every
    device detects on its own images."""
    def build():
        model = jit_cache.frozen_module(BMaskRCNN(config.model))
        fn = lambda variables, batch: model.apply(variables, batch, train=False)  # noqa: E731
        if mesh is None:
            return jax.jit(fn)
        return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                       out_shardings=sharding.batch_sharding(mesh))

    # One per model and mesh in the process: evaluating again, or a second Predictor, reuses it.
    return jit_cache.get(("detect", jit_cache.section_key(config.model), mesh), build)


def global_eval_batch(batch_size: int, mesh) -> int:
    """eval.batch_size rounded up to a multiple of the device count, so that every device of
    every process gets the same number of images."""
    n = mesh.devices.size
    return -(-batch_size // n) * n


def to_coco_results(image_id: int, inst: dict, category_ids) -> list[dict]:
    rles = masks_to_rle(inst["masks"])
    out = []
    for j, (box, score, cls, rle) in enumerate(zip(inst["boxes"], inst["scores"], inst["classes"], rles)):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append({"image_id": int(image_id), "category_id": int(category_ids[int(cls)]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score), "segmentation": rle})
        if inst.get("box_scores") is not None:
            out[-1]["box_score"] = float(inst["box_scores"][j])
    return out


def evaluate(config, workdir: str, variables: dict, mesh=None, step: int | None = None) -> dict:
    """Run the model over data.eval_split, write detections.json, metrics.json, the AP-vs-IoU
    plot and pictures of the first eval.num_pictures images into workdir; return the metrics.

    Data parallel over `mesh` (default: every device of every process): each process prepares
    its share of each global batch, each device detects on its own images, each process pastes
    and encodes its own detections, and process 0 gathers them, scores them and writes the
    files (the other processes return {}). Pictures are of process 0's images.

    The APs and the pictures also go to TensorBoard (workdir/tensorboard) at `step`, the
    training step of the evaluated parameters (default: the workdir's newest checkpoint, else
    0)."""
    mesh = mesh or sharding.make_mesh()
    is_main = jax.process_index() == 0
    dataset = build_dataset(config.data, config.data.eval_split)
    category_ids = getattr(dataset, "category_ids", [k + 1 for k in range(dataset.num_classes)])
    gt = dataset.coco_dict()
    if config.eval.num_images >= 0:
        keep = {im["id"] for im in gt["images"][:config.eval.num_images]}
        gt = dict(gt, images=[im for im in gt["images"] if im["id"] in keep],
                  annotations=[a for a in gt["annotations"] if a["image_id"] in keep])
    sizes = image_sizes(dataset, gt["images"])
    detect = make_detector(config, mesh)
    variables = sharding.put_replicated(variables, mesh)
    os.makedirs(workdir, exist_ok=True)          # a folder that cannot be made fails here, before the model
    results, pictures, drawings = [], [], []
    pic_dir = os.path.join(workdir, "pictures")
    # What could not be written: the evaluation goes on, prints its metrics and saves what it
    # can, and says at the end what is missing (an error, so the exit status shows it).
    unwritten: dict[str, str] = {}
    codes: list[int] = []                 # their errno values (the first one is raised)
    batches = eval_batches(dataset, config.data, global_eval_batch(config.eval.batch_size, mesh),
                           config.eval.num_images, jax.process_index(), jax.process_count(), sizes)
    for batch in batches:
        det = sharding.local_rows(detect(variables, sharding.global_batch(
            {k: batch[k] for k in DETECT_KEYS}, mesh)), mesh)
        for i in np.nonzero(batch["is_real"])[0]:
            pictured = is_main and len(pictures) < config.eval.num_pictures  # only pictures show boundaries
            inst = postprocess(det, i, batch["scale"][i], batch["orig_hw"][i], config.eval.mask_threshold, pictured)
            image_id = int(batch["image_id"][i])
            results.extend(to_coco_results(image_id, inst, category_ids))
            if pictured:
                pictures.append(image_id)
                image = dataset[dataset_index(dataset, image_id)]["image"]
                drawn = draw_instances(image, inst["boxes"], inst["classes"], inst["scores"], inst["masks"],
                                       dataset.class_names, inst["boundaries"], config.predict.score_threshold,
                                       config.predict.min_picture_size)
                if "pictures" not in unwritten:
                    try:
                        os.makedirs(pic_dir, exist_ok=True)
                        save_image(os.path.join(pic_dir, f"{image_id:06d}.png"), drawn)
                    except OSError as e:
                        unwritten["pictures"] = f"{pic_dir}: {e.strerror or e}"
                        codes.append(e.errno or errno.EACCES)
                        logging.warning("cannot write the pictures (%s); the evaluation goes on",
                                        unwritten["pictures"])
                if len(drawings) < TENSORBOARD_PICTURES:
                    drawings.append((image_id, drawn))
    results = sharding.gather_to_main(results)
    if not is_main:
        return {}
    # Detections in image order, whatever the batching and device count.
    order = {im["id"]: k for k, im in enumerate(gt["images"])}
    results.sort(key=lambda r: order[r["image_id"]])
    labelled = getattr(dataset, "labelled", True)
    metrics = {kind: coco_evaluate(gt, results, kind) for kind in IOU_TYPES} if labelled else {}
    metrics.update(num_images=len(gt["images"]), num_detections=len(results))
    if config.data.dataset == "cityscapes":
        # The benchmark's own metric and result files, beside the COCO-style numbers.
        metrics["cityscapes"] = cityscapes_eval.evaluate_split(dataset, gt["images"], results, workdir)
    summary = format_metrics(metrics)
    logging.info("\n%s", summary)
    print(summary, flush=True)                  # first: whatever cannot be written, this is seen
    # An unlabelled split (Cityscapes test) keeps its files apart: the val metrics stay.
    suffix = "" if labelled else f"_{config.data.eval_split}"
    writes = [(f"metrics{suffix}.json", lambda path: _write_json(path, metrics, indent=2)),
              (f"detections{suffix}.json", lambda path: _write_json(path, results))]
    if labelled:
        writes.append(("ap_vs_iou.png", lambda path: plot_ap_vs_iou(
            {kind: metrics[kind]["AP_per_iou"] for kind in IOU_TYPES}, path,
            title=f"AP vs IoU threshold ({config.model.mask_head.name})")))
    writes.append(("tensorboard", lambda path: write_tensorboard(
        workdir, eval_step(workdir) if step is None else step, metrics, drawings)))
    for name, write in writes:
        try:
            write(os.path.join(workdir, name))
        except OSError as e:
            unwritten[name] = f"{os.path.join(workdir, name)}: {e.strerror or e}"
            codes.append(e.errno or errno.EACCES)
    if unwritten:
        raise OSError(codes[0], "the evaluation ran and its metrics are printed above, but these could not be written: "
                      + "; ".join(unwritten.values()))
    return metrics


def _write_json(path: str, value, **kwargs) -> None:
    with open(path, "w") as f:
        json.dump(value, f, **kwargs)


TENSORBOARD_PICTURES = 4
TENSORBOARD_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def eval_step(workdir: str) -> int:
    """The step of the workdir's newest checkpoint (what --mode evaluate restores), else 0."""
    from bmask_jax.engine import checkpoints
    steps = checkpoints.step_folders(checkpoints.directory(workdir))
    return steps[0] if steps else 0


def write_tensorboard(workdir: str, step: int, metrics: dict, drawings: list) -> None:
    """What a detectron2 user finds in TensorBoard after an evaluation: bbox/AP, segm/AP50,
    boundary/AP75, ... in percent (pycocotools' -1, an area range without objects, left out),
    cityscapes/AP and AP50 where scored, and the first pictures with masks and boundaries
    (eval/<image id>), all at the training step of the evaluated model."""
    with events.summary_writer(os.path.join(workdir, "tensorboard")) as tb:
        for kind in IOU_TYPES:
            for k in TENSORBOARD_KEYS:
                v = metrics.get(kind, {}).get(k)
                if v is not None and v >= 0:
                    tb.add_scalar(f"{kind}/{k}", 100 * v, step)
        official = metrics.get("cityscapes", {})
        for k in ("AP", "AP50"):
            if official.get(k) is not None:
                tb.add_scalar(f"cityscapes/{k}", 100 * official[k], step)
        for image_id, drawn in drawings:
            tb.add_image(f"eval/{image_id:06d}", drawn, step, dataformats="HWC")


def image_sizes(dataset, images: list[dict]) -> list[tuple[int, int]] | None:
    """(height, width) of the dataset's images in dataset order, from the ground truth's image
    records, or None if some record lacks them (the images are then read to find out)."""
    sizes: list = [None] * len(images)
    for im in images:
        if not (im.get("height") and im.get("width")):
            return None
        i = dataset_index(dataset, im["id"])
        if i >= len(sizes):
            return None
        sizes[i] = (int(im["height"]), int(im["width"]))
    return None if any(s is None for s in sizes) else sizes


def dataset_index(dataset, image_id: int) -> int:
    """Position of an image id in the dataset (synthetic ids are index + 1)."""
    if hasattr(dataset, "index_of"):
        return dataset.index_of(image_id)
    return image_id - 1


def format_metrics(metrics: dict) -> str:
    lines = []
    if IOU_TYPES[0] in metrics:
        lines += [f"COCO evaluation on {metrics['num_images']} images ({metrics['num_detections']} detections)",
                  f"{'':9s}{'AP':>7s}{'AP50':>7s}{'AP75':>7s}{'APs':>7s}{'APm':>7s}{'APl':>7s}"]
    else:
        lines.append(f"{metrics['num_images']} images without labels ({metrics['num_detections']} detections): "
                     "nothing scored")
    for kind in (k for k in IOU_TYPES if k in metrics):
        m = metrics[kind]
        # pycocotools reports -1 for an area range with no objects.
        lines.append(f"{kind:9s}" + "".join(f"{100 * m[k]:7.1f}" if m[k] >= 0 else f"{'-':>7s}"
                                            for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    cs = metrics.get("cityscapes")
    if cs and "AP" in cs:
        lines += ["", f"Cityscapes instance-level evaluation ({cs['num_masks']} masks)",
                  cityscapes_eval.format_table(cs)]
    if cs:
        lines.append(f"Cityscapes result files: {cs['results_dir']}; for the benchmark server: {cs['zip']}")
    return "\n".join(lines)
