"""Procedurally generated instance-segmentation dataset ("synthetic shapes").

The default dataset of bmask_jax: it is shipped as code, so Mask R-CNN can be
trained and evaluated on a laptop CPU in minutes without downloading anything.

Each image shows 1..6 solid shapes from five categories (ellipse, star,
crescent, cross, ring) on a textured background. Shapes are exact analytic
regions (implicit functions in a rotated, scaled frame) rasterised by sampling
pixel centres, so masks are precise and the image is painted with exactly the
mask: no anti-aliasing, no label noise. Boundaries are non-trivial: curves,
concavities (crescent, star, cross), holes (ring) and thin parts (star tips,
crescent horns). Shapes overlap; later shapes occlude earlier ones and the
annotations are the *visible* masks.

Placement rule: a new shape is placed only if every instance (already placed
ones and the new one) keeps at least ``min_visible_fraction`` of its full area
and at least 20 pixels visible; otherwise the placement is re-sampled (or the
shape skipped). So no unannotated fragment of a shape is ever drawn.

Everything is a pure function of ``(seed, split, index)``: image ``i`` uses
``np.random.default_rng([seed, split_index, i])``, so items are independent of
access order and the train and val splits are disjoint random streams.
"""
from __future__ import annotations

import colorsys
import json
import os

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("ellipse", "star", "crescent", "cross", "ring")

_SPLITS = {"train": 0, "val": 1}
_DEFAULT_NUM_IMAGES = {"train": 2000, "val": 200}
_MIN_VISIBLE_PIXELS = 20
_PLACEMENT_TRIES = 12  # position/size re-samples per shape before giving up on it


# --------------------------------------------------------------------------
# Shapes: each takes normalised coordinates (u, v) in the shape's own frame
# (the shape lies inside the unit disk) and its parameters; returns a bool mask.
# --------------------------------------------------------------------------

def _sample_params(cls: int, rng: np.random.Generator) -> tuple:
    if cls == 0:  # ellipse: minor/major axis ratio
        return (rng.uniform(0.45, 1.0),)
    if cls == 1:  # star: points, inner radius, phase, aspect
        return (int(rng.integers(5, 7)), rng.uniform(0.38, 0.55),
                rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.0))
    if cls == 2:  # crescent: cut-disk radius, cut-disk offset, aspect
        return (rng.uniform(0.72, 0.9), rng.uniform(0.38, 0.6), rng.uniform(0.8, 1.0))
    if cls == 3:  # cross: arm half-width, relative length of the second arm
        return (rng.uniform(0.2, 0.34), rng.uniform(0.6, 1.0))
    if cls == 4:  # ring: aspect, hole ratio
        return (rng.uniform(0.7, 1.0), rng.uniform(0.4, 0.62))
    raise ValueError(cls)


def _shape_mask(cls: int, params: tuple, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if cls == 0:
        (b,) = params
        return u * u + (v / b) ** 2 <= 1.0
    if cls == 1:
        n, r_in, phase, b = params
        v = v / b
        rho = np.sqrt(u * u + v * v)
        step = np.pi / n
        rel = np.mod(np.arctan2(v, u) - phase, 2 * np.pi)
        k = np.minimum(np.floor(rel / step), 2 * n - 1)
        t = rel - k * step  # angle inside the sector [0, step)
        even = (k % 2) == 0
        r0 = np.where(even, 1.0, r_in)
        r1 = np.where(even, r_in, 1.0)
        # distance to the straight edge (r0 at angle 0) -> (r1 at angle step), along angle t
        boundary = r0 * r1 * np.sin(step) / (r0 * np.sin(t) + r1 * np.sin(step - t))
        return rho <= boundary
    if cls == 2:
        r_cut, d, b = params
        v = v / b
        outer = u * u + v * v <= 1.0
        cut = (u - d) ** 2 + v * v <= r_cut * r_cut
        return outer & ~cut
    if cls == 3:
        w, rel_len = params
        length = np.sqrt(1.0 - w * w)  # arm corners on the unit circle
        au, av = np.abs(u), np.abs(v)
        return ((au <= length) & (av <= w)) | ((av <= length * rel_len) & (au <= w))
    if cls == 4:
        b, t = params
        q = u * u + (v / b) ** 2
        return (q <= 1.0) & (q > t * t)
    raise ValueError(cls)


# --------------------------------------------------------------------------
# Colours and background
# --------------------------------------------------------------------------

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255.0


def _dist_to_segment(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(c - a, ab) / max(float(np.dot(ab, ab)), 1e-6), 0.0, 1.0))
    return float(np.linalg.norm(c - (a + t * ab)))


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights (align-corners) for smooth upsampling."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _background(rng: np.random.Generator, h: int, w: int):
    """Textured background [h, w, 3] float32 and its two end colours."""
    c1 = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.85))
    c2 = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.85))
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    ang = rng.uniform(0, 2 * np.pi)
    proj = np.cos(ang) * xs + np.sin(ang) * ys  # [h, w]
    span = abs(np.cos(ang)) * w + abs(np.sin(ang)) * h
    lo = min(0.0, np.cos(ang) * w) + min(0.0, np.sin(ang) * h)
    t = ((proj - lo) / span)[..., None]
    bg = c1 + (c2 - c1) * t

    # Low-frequency colour noise: a small random grid, smoothly upsampled.
    g = int(rng.integers(3, 7))
    grid = rng.standard_normal((g, g, 3)).astype(np.float32) * rng.uniform(4.0, 18.0)
    rows = (_interp_matrix(h, g) @ grid.reshape(g, g * 3)).reshape(h, g, 3)
    bg += (rows.transpose(0, 2, 1) @ _interp_matrix(w, g).T).transpose(0, 2, 1)

    # Regular texture of random frequency, orientation and colour: none/stripes/checker.
    kind = int(rng.integers(0, 3))
    if kind:
        period = rng.uniform(4.0, 24.0)
        a = rng.uniform(0, np.pi)
        pu = (np.cos(a) * xs + np.sin(a) * ys) * (2 * np.pi / period) + rng.uniform(0, 2 * np.pi)
        if kind == 1:
            pattern = np.sin(pu)
        else:
            pv = (-np.sin(a) * xs + np.cos(a) * ys) * (2 * np.pi / period)
            pattern = np.sign(np.sin(pu)) * np.sign(np.sin(pv))
        direction = rng.standard_normal(3).astype(np.float32)
        direction /= np.linalg.norm(direction) + 1e-6
        bg += pattern[..., None] * (direction * rng.uniform(6.0, 22.0))
    return bg, c1, c2


def _object_colour(rng, c1, c2, previous) -> np.ndarray:
    """Saturated colour far from the background colours and from earlier objects."""
    best, best_score = None, -1.0
    for _ in range(30):
        c = _hsv(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
        d_bg = _dist_to_segment(c, c1, c2)
        d_obj = min((float(np.linalg.norm(c - p)) for p in previous), default=1e9)
        score = min(d_bg / 90.0, d_obj / 60.0)
        if score > best_score:
            best, best_score = c, score
        if score >= 1.0:
            break
    return best


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------

class SyntheticShapes:
    """Dataset interface shared with the COCO loader.

    Args:
      split: "train" or "val" (disjoint random streams).
      num_images: number of images; default 2000 for train, 200 for val.
      image_size: (height, width) in pixels.
      seed: global seed; image ``i`` is a pure function of (seed, split, i).
      max_instances / min_instances: range of instances per image (the number of
        shapes attempted is uniform in it; at least ``min_instances`` are kept).
      min_size / max_size: range (pixels, log-uniform) of a shape's extent, i.e. the
        diameter of the circle bounding it (its longest dimension for most shapes).
      min_visible_fraction: every kept instance has at least this fraction of its
        full area (and >= 20 px) visible after occlusion and image-border truncation.
    """

    def __init__(self, split: str = "train", num_images: int | None = None,
                 image_size: tuple[int, int] = (128, 128), seed: int = 0,
                 max_instances: int = 6, min_instances: int = 1, min_size: int = 16,
                 max_size: int = 64, min_visible_fraction: float = 0.3):
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLITS)}")
        if num_images is None:
            num_images = _DEFAULT_NUM_IMAGES[split]
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if not 0 <= min_instances <= max_instances:
            raise ValueError(f"need 0 <= min_instances <= max_instances, got {min_instances}, {max_instances}")
        if not 2 <= min_size <= max_size:
            raise ValueError(f"need 2 <= min_size <= max_size, got {min_size}, {max_size}")
        if not 0.0 <= min_visible_fraction <= 1.0:
            raise ValueError(f"min_visible_fraction must be in [0, 1], got {min_visible_fraction}")
        self.split = split
        self.num_images = int(num_images)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.max_instances = int(max_instances)
        self.min_instances = int(min_instances)
        self.min_size = float(min_size)
        self.max_size = float(max_size)
        self.min_visible_fraction = float(min_visible_fraction)
        self.class_names = CLASS_NAMES
        self.num_classes = len(CLASS_NAMES)
        self.name = f"synthetic_shapes_{split}"

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, num_images={self.num_images}, "
                f"image_size={self.image_size}, seed={self.seed})")

    # -- generation ---------------------------------------------------------

    def _min_visible(self, full_area: int) -> float:
        return max(_MIN_VISIBLE_PIXELS, self.min_visible_fraction * full_area)

    def _try_place(self, rng, cls, instances):
        """Samples a pose for a shape of class ``cls``; returns the placement or None."""
        h, w = self.image_size
        size = float(np.exp(rng.uniform(np.log(self.min_size), np.log(self.max_size))))
        s = size / 2.0  # radius of the bounding circle
        # Centres anywhere in the image: shapes near the border are truncated; the
        # visibility test rejects poses that cut off too much.
        cx = rng.uniform(0.0, w)
        cy = rng.uniform(0.0, h)
        theta = rng.uniform(0, 2 * np.pi)
        params = _sample_params(cls, rng)

        # Unclipped window covering the bounding circle; pixel (r, c) has centre (c+.5, r+.5).
        x0, x1 = int(np.floor(cx - s)) - 1, int(np.ceil(cx + s)) + 1
        y0, y1 = int(np.floor(cy - s)) - 1, int(np.ceil(cy + s)) + 1
        dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
        ct, st = np.cos(theta), np.sin(theta)
        u = (ct * dx + st * dy) / s
        v = (-st * dx + ct * dy) / s
        full = _shape_mask(cls, params, u, v)
        full_area = int(full.sum())
        if full_area == 0:
            return None
        # Clip the window to the image.
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, w), min(y1, h)
        if cx1 <= cx0 or cy1 <= cy0:
            return None
        sl = (slice(cy0, cy1), slice(cx0, cx1))
        local = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        mask = full[local]
        if mask.sum() < self._min_visible(full_area):
            return None
        overlaps = []
        for inst in instances:
            ov = int(np.count_nonzero(inst["visible"][sl] & mask))
            if inst["visible_area"] - ov < self._min_visible(inst["full_area"]):
                return None
            overlaps.append(ov)
        return dict(cls=cls, sl=sl, mask=mask, full_area=full_area, overlaps=overlaps,
                    u=u[local], v=v[local])

    def _generate(self, i: int):
        h, w = self.image_size
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], i])
        image, c1, c2 = _background(rng, h, w)
        target = int(rng.integers(self.min_instances, self.max_instances + 1))
        instances: list[dict] = []
        colours: list[np.ndarray] = []
        attempts = 0
        max_attempts = max(target, 1) * 4 + 20
        while len(instances) < target and attempts < max_attempts:
            attempts += 1
            cls = int(rng.integers(0, len(CLASS_NAMES)))
            placed = None
            for _ in range(_PLACEMENT_TRIES):
                placed = self._try_place(rng, cls, instances)
                if placed is not None:
                    break
            if placed is None:
                continue
            sl, mask = placed["sl"], placed["mask"]
            for inst, ov in zip(instances, placed["overlaps"]):
                if ov:
                    inst["visible"][sl] &= ~mask
                    inst["visible_area"] -= ov
            visible = np.zeros((h, w), bool)
            visible[sl] = mask
            instances.append(dict(cls=cls, visible=visible, visible_area=int(mask.sum()),
                                  full_area=placed["full_area"]))
            # Paint: base colour with a mild linear shading in the shape's frame plus noise.
            colour = _object_colour(rng, c1, c2, colours)
            colours.append(colour)
            gu, gv = rng.uniform(-0.15, 0.15, size=2)
            shade = 1.0 + gu * placed["u"] + gv * placed["v"]
            patch = colour * shade[..., None].astype(np.float32)
            patch += rng.standard_normal(patch.shape, dtype=np.float32) * rng.uniform(1.0, 5.0)
            region = image[sl]
            region[mask] = patch[mask]
        if len(instances) < self.min_instances:
            raise RuntimeError(
                f"could not place {self.min_instances} instances in image {i} "
                f"(image_size={self.image_size}, sizes {self.min_size}..{self.max_size})")
        image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.0, 3.0)
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        return image, instances

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += self.num_images
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.name} with {self.num_images} images")
        image, instances = self._generate(i)
        h, w = self.image_size
        n = len(instances)
        masks = np.zeros((n, h, w), np.uint8)
        boxes = np.zeros((n, 4), np.float32)
        classes = np.zeros((n,), np.int32)
        for k, inst in enumerate(instances):
            vis = inst["visible"]
            masks[k] = vis
            rows = np.flatnonzero(vis.any(axis=1))
            cols = np.flatnonzero(vis.any(axis=0))
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            classes[k] = inst["cls"]
        return {
            "image_id": i + 1,
            "image": image,
            "boxes": boxes,
            "classes": classes,
            "masks": masks,
            "iscrowd": np.zeros((n,), np.bool_),
            "file_name": f"{i + 1:06d}.png",
        }

    # -- COCO export ----------------------------------------------------------

    def _coco_from_items(self, items) -> dict:
        from pycocotools import mask as mask_util

        h, w = self.image_size
        images, annotations = [], []
        for item in items:
            images.append({"id": item["image_id"], "file_name": item["file_name"],
                           "height": h, "width": w})
            if len(item["classes"]) == 0:
                continue
            rles = mask_util.encode(np.asfortranarray(item["masks"].transpose(1, 2, 0)))
            for k, rle in enumerate(rles):
                x1, y1, x2, y2 = (float(c) for c in item["boxes"][k])
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": item["image_id"],
                    "category_id": int(item["classes"][k]) + 1,
                    "segmentation": {"size": [int(s) for s in rle["size"]],
                                     "counts": rle["counts"].decode("ascii")},
                    "area": float(item["masks"][k].sum()),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                })
        return {
            "info": {"description": f"bmask_jax {self.name} (procedurally generated)",
                     "version": "1.0", "seed": self.seed, "split": self.split,
                     "image_size": list(self.image_size)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                           for k, n in enumerate(self.class_names)],
        }

    def coco_dict(self) -> dict:
        """COCO-format ground truth for the whole split (RLE segmentations, JSON-serialisable)."""
        return self._coco_from_items(self[i] for i in range(len(self)))

    def export_coco(self, directory: str) -> str:
        """Writes ``directory/images/<file_name>`` PNGs and ``directory/annotations.json``.

        Returns the path of the annotation file.
        """
        from PIL import Image

        img_dir = os.path.join(directory, "images")
        os.makedirs(img_dir, exist_ok=True)

        def items():
            for i in range(len(self)):
                item = self[i]
                Image.fromarray(item["image"]).save(os.path.join(img_dir, item["file_name"]))
                yield item

        coco = self._coco_from_items(items())
        path = os.path.join(directory, "annotations.json")
        with open(path, "w") as f:
            json.dump(coco, f)
        return path
