"""Cityscapes fine instance segmentation, read directly from the official folders.

Layout (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unzipped into one root):

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_instanceIds.png

Annotations come from the instanceIds PNGs, as detectron2's loader does with from_json=False
(no polygon round trip, so a mask is exactly the labelled pixels): a pixel value v >= 1000 is
an instance of labelId v // 1000; v < 1000 is a plain labelId, which for a thing class marks a
group region (several objects labelled as one) and becomes a crowd instance. Only the 8
classes Cityscapes evaluates instances of are kept; caravan and trailer (instances but
ignoreInEval), stuff and void are ignored. Boxes are the mask extent (x2 = max x + 1).

Served through the interface of data/synthetic.py: dataset[i] -> image, boxes, classes
(contiguous 0..7), masks, iscrowd; coco_dict() -> the ground truth for pycocotools;
category_ids maps back to the Cityscapes labelIds. Nothing large is held in memory: each
__getitem__ reads its instanceIds PNG, and coco_dict() keeps only RLEs.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from bmask_jax.data.images import load_rgb

CLASS_NAMES: tuple[str, ...] = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CATEGORY_IDS: tuple[int, ...] = (24, 25, 26, 27, 28, 31, 32, 33)   # Cityscapes labelIds
_CONTIGUOUS = {cid: k for k, cid in enumerate(CATEGORY_IDS)}
IMAGE_SUFFIX = "_leftImg8bit.png"
GT_SUFFIX = "_gtFine_instanceIds.png"
_INSTANCE_ID_MODES = ("I;16", "I;16B", "I;16L", "I", "L")
_DEGENERATE = "instance one pixel wide or tall"   # detectron2 drops these too
# The benchmark keeps the test split's labels; gtFine/test holds placeholders (all void), so
# the test split is read as images only: predicted and written for the server, never scored.
UNLABELLED_SPLITS = ("test",)


def find_images(root: str, split: str, labelled: bool = True) -> list[tuple[str, str | None]]:
    """(file_name relative to leftImg8bit/{split}, instanceIds path or None if not labelled)
    of every image of the split, sorted by city then name so that image ids are stable across
    runs and machines."""
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"Cityscapes root {root!r} not found (set data.cityscapes_root to the folder "
                                "holding leftImg8bit/ and gtFine/)")
    image_dir = os.path.join(root, "leftImg8bit", split)
    gt_dir = os.path.join(root, "gtFine", split)
    for d in (image_dir, gt_dir) if labelled else (image_dir,):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"Cityscapes split folder {d} not found (split {split!r} under root {root})")
    found = []
    for city in sorted(e.name for e in os.scandir(image_dir) if e.is_dir()):
        for name in sorted(os.listdir(os.path.join(image_dir, city))):
            if not name.endswith(IMAGE_SUFFIX):
                continue
            if not labelled:
                found.append((f"{city}/{name}", None))
                continue
            gt_path = os.path.join(gt_dir, city, name[:-len(IMAGE_SUFFIX)] + GT_SUFFIX)
            if not os.path.isfile(gt_path):
                raise FileNotFoundError(f"image {os.path.join(image_dir, city, name)} has no instance "
                                        f"annotation {gt_path}")
            found.append((f"{city}/{name}", gt_path))
    if not found:
        raise FileNotFoundError(f"no *{IMAGE_SUFFIX} images in the city folders of {image_dir}")
    return found


def read_instance_ids(path: str) -> np.ndarray:
    """The instanceIds PNG as int32 [H, W]; unreadable or non-label files raise ValueError
    naming the path (a colour PNG here means the wrong file was put in its place)."""
    try:
        with Image.open(path) as im:
            if im.mode not in _INSTANCE_ID_MODES:
                raise ValueError(f"mode {im.mode}, not a single-channel label image")
            return np.asarray(im).astype(np.int32)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read Cityscapes instanceIds {path}: {e}") from e


def decode_instances(ids: np.ndarray) -> tuple[list[dict], collections.Counter]:
    """Instances of the 8 thing classes in an instanceIds array, each as dict(cls, iscrowd,
    box x1y1x2y2, mask bool [H, W]), ordered by pixel value; and the reasons for any dropped."""
    out, skipped = [], collections.Counter()
    for v in np.unique(ids[ids >= min(CATEGORY_IDS)]):
        label = v // 1000 if v >= 1000 else v
        if label not in _CONTIGUOUS:
            continue
        mask = ids == v
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows[-1] == rows[0] or cols[-1] == cols[0]:
            skipped[_DEGENERATE] += 1
            continue
        out.append({"cls": _CONTIGUOUS[int(label)], "iscrowd": bool(v < 1000), "mask": mask,
                    "box": (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)})
    return out, skipped


class CityscapesInstances:
    """Cityscapes fine instances of one split ('train', 'val', ...) under `root`.

    Image ids are positions + 1 in the sorted file list. `skipped` counts dropped instances by
    reason, each image counted once however often it is read. The test split (`labelled`
    False) has images and no instances.
    """

    def __init__(self, root: str, split: str):
        self.root = root
        self.split = split
        self.labelled = split not in UNLABELLED_SPLITS
        self.image_dir = os.path.join(root, "leftImg8bit", split)
        self.files = find_images(root, split, self.labelled)
        self.class_names = CLASS_NAMES
        self.category_ids = list(CATEGORY_IDS)
        self.num_classes = len(CLASS_NAMES)
        self.name = f"cityscapes_{split}"
        self.skipped = collections.Counter()
        self._counted: set[int] = set()
        self._lock = threading.Lock()
        self._gt: dict | None = None
        logging.info("%s: %d images in %s", self.name, len(self.files), self.image_dir)

    def __len__(self) -> int:
        return len(self.files)

    def index_of(self, image_id: int) -> int:
        return image_id - 1

    def gt_path(self, image_id: int) -> str:
        """The gtFine instanceIds PNG of an image (what cityscapesScripts scores against)."""
        return self.files[self.index_of(image_id)][1]

    def _instances(self, i: int) -> tuple[tuple[int, int], list[dict]]:
        if not self.labelled:
            with Image.open(os.path.join(self.image_dir, self.files[i][0])) as im:   # reads the header only
                return (im.height, im.width), []
        ids = read_instance_ids(self.files[i][1])
        instances, skipped = decode_instances(ids)
        with self._lock:
            if i not in self._counted:
                self._counted.add(i)
                self.skipped.update(skipped)
        return ids.shape, instances

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {self.name} with {len(self)} images")
        file_name, gt_path = self.files[i]
        path = os.path.join(self.image_dir, file_name)
        image = load_rgb(path)
        (h, w), instances = self._instances(i)
        if image.shape[:2] != (h, w):
            raise ValueError(f"{path} is {image.shape[0]}x{image.shape[1]} but its annotation {gt_path} "
                             f"is {h}x{w}")
        return {"image_id": i + 1, "image": image, "file_name": file_name,
                "boxes": np.asarray([a["box"] for a in instances], np.float32).reshape(-1, 4),
                "classes": np.asarray([a["cls"] for a in instances], np.int32),
                "masks": np.asarray([a["mask"] for a in instances], np.uint8).reshape(-1, h, w),
                "iscrowd": np.asarray([a["iscrowd"] for a in instances], bool)}

    def _coco_image(self, i: int) -> tuple[dict, list[dict]]:
        """The COCO image entry and annotations (without ids) of image i: RLEs only, so that
        a whole split fits in memory."""
        (h, w), instances = self._instances(i)
        anns = []
        for a in instances:
            rle = mask_utils.encode(np.asfortranarray(a["mask"], np.uint8))
            x1, y1, x2, y2 = (float(c) for c in a["box"])
            anns.append({"image_id": i + 1, "category_id": CATEGORY_IDS[a["cls"]],
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                         "area": float(mask_utils.area(rle)), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "iscrowd": int(a["iscrowd"])})
        return {"id": i + 1, "file_name": self.files[i][0], "height": h, "width": w}, anns

    def coco_dict(self) -> dict:
        """COCO-format ground truth of the split, computed on first use (it reads every
        instanceIds PNG, which only evaluation needs) and kept."""
        if self._gt is None:
            images, annotations = [], []
            empty = 0
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                for image, anns in pool.map(self._coco_image, range(len(self))):
                    images.append(image)
                    empty += not anns
                    for a in anns:
                        annotations.append(dict(a, id=len(annotations) + 1))
            logging.info("%s: %d of %d images have no instances of the %d classes (kept)", self.name, empty,
                         len(images), self.num_classes)
            if self.skipped:
                logging.warning("%s: skipped %d instances: %s", self.name, sum(self.skipped.values()),
                                dict(self.skipped))
            self._gt = {"info": {"description": f"Cityscapes fine instances, {self.split} ({self.root})"},
                        "images": images, "annotations": annotations,
                        "categories": [{"id": cid, "name": n} for cid, n in zip(CATEGORY_IDS, CLASS_NAMES)]}
        return self._gt
