"""Cityscapes' own instance-level metric, computed by cityscapesScripts, and the result files
its benchmark server takes.

The benchmark (and the paper's Table 9) scores instance segmentation with
`cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling`, not with COCO's
pycocotools: its own matching (IoU strictly above each of 0.50..0.95), instances under 100
pixels and predictions mostly over void or group regions ignored, and AP averaged over the
classes that have ground truth. So we write our detections in its result format and let it
score them.

The result format, per image `{city}_{seq}_{frame}_leftImg8bit.png`, in
WORKDIR/cityscapes_{split}_results:

    {city}_{seq}_{frame}_pred.txt       one line per instance: "masks/<png> <labelId> <score>"
    masks/{city}_{seq}_{frame}_<k>.png  the instance's binary mask, full image size

The same folder, zipped (WORKDIR/cityscapes_{split}_results.zip), is a test-server submission.

What cityscapesScripts writes, and where we send it (so that a read-only dataset folder and a
read-only site-packages work): `gtInstances.json` (its ground-truth cache, by default beside
its own module, and stale if the ground truth changes: we give each run a fresh one),
`matches.json` (always into the current directory) and, with JSONOutput, a results JSON under
$CITYSCAPES_DATASET (turned off). It reads only the gtFine `*_instanceIds.png` files.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import types
import zipfile

import numpy as np
from PIL import Image

IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_DIR = "masks"


class CityscapesEvalError(RuntimeError):
    """cityscapesScripts refused the results or the ground truth (it calls sys.exit)."""


def image_stem(file_name: str) -> str:
    """'frankfurt/frankfurt_000000_000294_leftImg8bit.png' -> 'frankfurt_000000_000294'."""
    base = os.path.basename(file_name)
    return base[:-len(IMAGE_SUFFIX)] if base.endswith(IMAGE_SUFFIX) else os.path.splitext(base)[0]


def write_results(results_dir: str, images: list[dict], results: list[dict]) -> int:
    """Writes the official result files of `images` (COCO image records with file_name,
    height, width) from COCO-format `results` (category_id = Cityscapes labelId, RLE
    segmentation) into results_dir, replacing what was there. Every image gets its text file,
    empty if it has no detections: the scripts require one per ground-truth image. Empty
    masks are left out (the scripts skip them). Returns the number of masks written."""
    from pycocotools import mask as mask_utils
    if os.path.isdir(results_dir):
        shutil.rmtree(results_dir)
    os.makedirs(os.path.join(results_dir, MASK_DIR))
    by_image = collections.defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    written = 0
    for im in images:
        stem = image_stem(im["file_name"])
        lines = []
        for r in sorted(by_image.get(im["id"], []), key=lambda r: -r["score"]):
            mask = mask_utils.decode(r["segmentation"]).astype(bool)
            if not mask.any():
                continue
            name = f"{MASK_DIR}/{stem}_{len(lines)}.png"
            Image.fromarray(mask).save(os.path.join(results_dir, name))     # mode "1": one bit a pixel
            lines.append(f"{name} {int(r['category_id'])} {float(r['score']):.6f}\n")
            written += 1
        with open(os.path.join(results_dir, f"{stem}_pred.txt"), "w") as f:
            f.writelines(lines)
    return written


def zip_results(results_dir: str, zip_path: str) -> str:
    """results_dir as a zip with the text files at its top level and masks/ beside them (the
    layout the benchmark server unpacks); written to a temporary name and moved in complete."""
    tmp = f"{zip_path}.part-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for root, _, files in os.walk(results_dir):
            for name in sorted(files):
                path = os.path.join(root, name)
                z.write(path, os.path.relpath(path, results_dir))
    os.replace(tmp, zip_path)
    return zip_path


def official_instance_ap(results_dir: str, gt_files: list[str], scratch_dir: str) -> dict:
    """Scores the result files in results_dir against the gtFine instanceIds PNGs `gt_files`
    with cityscapesScripts. Returns {"AP", "AP50", "per_class": {name: {"AP", "AP50"}}}, in
    [0, 1]; a class with no ground truth in these images has None (the scripts' NaN, left out
    of the averages)."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as cs

    _fit_to_numpy_2(cs)
    os.makedirs(scratch_dir, exist_ok=True)
    args = cs.args                       # the scripts keep their settings in a module global
    args.predictionPath = os.path.abspath(results_dir)
    args.predictionWalk = None
    args.gtInstancesFile = os.path.join(scratch_dir, "gtInstances.json")
    args.exportFile = os.path.join(scratch_dir, "resultInstanceLevelSemanticLabeling.json")
    args.JSONOutput = False
    args.quiet = True
    args.colorized = False
    if os.path.exists(args.gtInstancesFile):      # a cache of another run's ground truth
        os.remove(args.gtInstancesFile)
    gt_files = [os.path.abspath(p) for p in gt_files]
    said = io.StringIO()
    cwd = os.getcwd()
    try:
        with contextlib.redirect_stdout(said):
            predictions = [cs.getPrediction(gt, args) for gt in gt_files]
            os.chdir(scratch_dir)             # evaluateImgLists writes matches.json here
            result = cs.evaluateImgLists(predictions, gt_files, args)
    except SystemExit as e:                   # the scripts' printError
        raise CityscapesEvalError(f"cityscapesScripts stopped on {results_dir}: "
                                  f"{said.getvalue().strip() or e}") from None
    finally:
        os.chdir(cwd)
    averages = result["averages"]

    def number(x):
        return None if x is None or math.isnan(float(x)) else float(x)

    return {"AP": number(averages["allAp"]), "AP50": number(averages["allAp50%"]),
            "per_class": {name: {"AP": number(v["ap"]), "AP50": number(v["ap50%"])}
                          for name, v in averages["classes"].items()}}


def _fit_to_numpy_2(cs) -> None:
    """cityscapesScripts 2.3.0 predates numpy 2, which removed np.in1d (the scripts' one use:
    which ground-truth pixels are void) and whose np.count_nonzero returns numpy integers
    that the scripts' JSON writer (matches.json) cannot serialise. Both are fixed in the
    scripts' module namespace only: numpy itself is left alone."""
    if not hasattr(cs.np, "in1d"):
        shim = types.ModuleType("numpy")
        shim.__dict__.update(np.__dict__)
        shim.in1d = lambda a, b: np.isin(np.ravel(a), b)
        cs.np = shim

    def write_json(d, path):
        with open(path, "w") as f:
            json.dump(d, f, default=lambda o: o.item() if isinstance(o, np.generic) else o.__dict__)

    cs.writeDict2JSON = write_json


def format_table(metrics: dict) -> str:
    """The official AP and AP50 (%) per class and on average, one row a class (Table 9's
    columns); '-' for a class with no ground truth."""
    def cell(x):
        return f"{100 * x:7.1f}" if x is not None else f"{'-':>7s}"

    lines = [f"{'':12s}{'AP':>7s}{'AP50':>7s}   (cityscapesScripts)"]
    for name, v in metrics["per_class"].items():
        lines.append(f"{name:12s}{cell(v['AP'])}{cell(v['AP50'])}")
    lines.append(f"{'average':12s}{cell(metrics['AP'])}{cell(metrics['AP50'])}")
    return "\n".join(lines)


def evaluate_split(dataset, images: list[dict], results: list[dict], workdir: str) -> dict:
    """Writes the result files of `images` into WORKDIR/cityscapes_{split}_results and its
    zip; scores them if the split has labels. Returns what goes under metrics['cityscapes']."""
    results_dir = os.path.join(workdir, f"cityscapes_{dataset.split}_results")
    num_masks = write_results(results_dir, images, results)
    zip_path = zip_results(results_dir, os.path.join(workdir, f"cityscapes_{dataset.split}_results.zip"))
    out = {"results_dir": results_dir, "zip": zip_path, "num_masks": num_masks}
    if not dataset.labelled:
        return out
    gt_files = [dataset.gt_path(im["id"]) for im in images]
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        out.update(official_instance_ap(results_dir, gt_files, scratch))
    return out
