"""Any COCO-format instance segmentation dataset: an instances JSON and an image folder.

Served through the same interface as the synthetic dataset (see data/synthetic.py):
dataset[i] -> image, boxes, classes (contiguous 0..K-1 in category-id order), masks,
iscrowd; coco_dict() -> the ground truth for pycocotools; category_ids maps back.
Annotations that cannot be used are skipped, counted by reason and reported once.
"""
from __future__ import annotations

import collections
import json
import logging
import os

import numpy as np
from pycocotools import mask as mask_utils

from bmask_jax.data.images import load_rgb

# COCO 2017's 80 categories, by contiguous class (the order of its category ids): the names
# a COCO model's detections get when the annotation files are not at hand (model zoo).
COCO_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",)
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)



def usable_segmentation(a: dict, height: int | None, width: int | None) -> tuple[dict, str | None, int]:
    """(annotation, None, parts dropped) when its segmentation can be rasterised, else (a,
    reason, 0). Polygons with fewer than 3 points are dropped from a multi-polygon and the
    rest kept; a polygon set with none left, or no point inside the image, makes the
    annotation unusable. Decided once, at load time, so that training and the evaluation
    ground truth agree."""
    seg = a.get("segmentation")
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        return a, None, 0
    if not isinstance(seg, list) or not seg:
        return a, "missing segmentation", 0
    polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    if not polys:
        return a, "polygon with fewer than 3 points", 0
    if height and width:
        xs = np.concatenate([np.asarray(p[0::2], float) for p in polys])
        ys = np.concatenate([np.asarray(p[1::2], float) for p in polys])
        if xs.max() <= 0 or ys.max() <= 0 or xs.min() >= width or ys.min() >= height:
            return a, "polygon outside the image", 0
    dropped = len(seg) - len(polys)
    return (dict(a, segmentation=polys) if dropped else a), None, dropped


class CocoJsonDataset:
    def __init__(self, json_path: str, image_dir: str):
        if not json_path or not os.path.isfile(json_path):
            raise FileNotFoundError(f"COCO annotations not found: {json_path!r} (set data.coco_train_json / "
                                    "data.coco_eval_json)")
        with open(json_path) as f:
            try:
                gt = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{json_path} is not valid JSON: {e}") from e
        if not image_dir or not os.path.isdir(image_dir):
            raise FileNotFoundError(f"data.coco_images={image_dir!r}: no such folder (the images of {json_path})")
        for key in ("images", "annotations", "categories"):
            if key not in gt:
                raise ValueError(f"{json_path} has no '{key}' list; is it a COCO instances file?")
        self.json_path = json_path
        self.image_dir = image_dir
        cats = sorted(gt["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.class_names = tuple(c["name"] for c in cats)
        self.num_classes = len(cats)
        self.name = os.path.basename(json_path)
        self._contiguous = {cid: k for k, cid in enumerate(self.category_ids)}
        self.images = sorted(gt["images"], key=lambda im: im["id"])
        self._position = {im["id"]: i for i, im in enumerate(self.images)}
        self.skipped = collections.Counter()
        anns = collections.defaultdict(list)
        kept = []
        next_id = 1 + max((a["id"] for a in gt["annotations"] if isinstance(a.get("id"), int)), default=0)
        for a in gt["annotations"]:
            if not isinstance(a.get("id"), int):
                a, next_id = dict(a, id=next_id), next_id + 1
            where = f"annotation id {a.get('id')} in {json_path}"
            if a.get("image_id") not in self._position:
                self.skipped["unknown image_id"] += 1
                logging.warning("%s: image_id %s is not in 'images'; skipped", where, a.get("image_id"))
                continue
            if a.get("category_id") not in self._contiguous:
                self.skipped["unknown category_id"] += 1
                logging.warning("%s: category_id %s is not in 'categories'; skipped", where, a.get("category_id"))
                continue
            x, y, w, h = a.get("bbox", (0, 0, 0, 0))
            if w <= 0 or h <= 0:
                self.skipped["box of zero or negative size"] += 1
                continue
            info = self.images[self._position[a["image_id"]]]
            a, problem, dropped_parts = usable_segmentation(a, info.get("height"), info.get("width"))
            if dropped_parts:
                self.skipped["polygon part with fewer than 3 points (rest kept)"] += dropped_parts
            if problem:
                self.skipped[problem] += 1
                logging.warning("%s: %s; skipped", where, problem)
                continue
            # pycocotools needs these; COCO-format files written by other tools may omit them.
            a = dict(a, iscrowd=int(bool(a.get("iscrowd", 0))), area=float(a.get("area", w * h)))
            anns[a["image_id"]].append(a)
            kept.append(a)
        self._anns = anns
        self._gt = dict(gt, annotations=kept)
        self.num_without_instances = sum(
            not any(not a.get("iscrowd", 0) for a in anns.get(im["id"], [])) for im in self.images)
        if self.num_without_instances:
            logging.warning("%s: %d of %d images have no (non-crowd) instances; they are kept, as "
                            "background-only images", json_path, self.num_without_instances, len(self.images))
        if self.skipped:
            logging.warning("%s: skipped %d annotations: %s", json_path, sum(self.skipped.values()),
                            dict(self.skipped))

    def __len__(self) -> int:
        return len(self.images)

    def index_of(self, image_id: int) -> int:
        return self._position[image_id]

    def coco_dict(self) -> dict:
        return self._gt

    def annotations_of(self, i: int) -> list[dict]:
        """The usable annotations of image i (unknown image/category and empty boxes left out)."""
        return self._anns.get(self.images[i]["id"], [])

    def _mask(self, a: dict, h: int, w: int) -> np.ndarray:
        return mask_utils.decode(self.rle(a, h, w)).astype(np.uint8)

    def rle(self, a: dict, h: int, w: int) -> dict:
        """The mask of a kept annotation on an h x w image as a COCO RLE (polygons and
        uncompressed RLE converted)."""
        seg = a["segmentation"]
        if isinstance(seg, list):
            return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        if [int(v) for v in seg["size"]] != [h, w]:
            raise ValueError(f"annotation id {a.get('id')} in {self.json_path}: RLE of size {seg['size']} on "
                             f"image id {a.get('image_id')}, which is {h}x{w}")
        return mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg

    def __getitem__(self, i: int) -> dict:
        info = self.images[i]
        path = os.path.join(self.image_dir, info["file_name"])
        image = load_rgb(path)
        h, w = image.shape[:2]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(f"{path} is {h}x{w} but {self.json_path} says "
                             f"{info.get('height')}x{info.get('width')} (image id {info['id']})")
        boxes, classes, masks, crowd = [], [], [], []
        for a in self._anns.get(info["id"], []):
            m = self._mask(a, h, w)
            if m is None:
                continue
            x, y, bw, bh = a["bbox"]
            boxes.append([x, y, x + bw, y + bh])
            classes.append(self._contiguous[a["category_id"]])
            masks.append(m)
            crowd.append(bool(a.get("iscrowd", 0)))
        return {"image_id": info["id"], "image": image, "file_name": info["file_name"],
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "classes": np.asarray(classes, np.int32),
                "masks": np.asarray(masks, np.uint8).reshape(-1, h, w),
                "iscrowd": np.asarray(crowd, bool)}
