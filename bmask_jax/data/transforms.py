"""Per-image preprocessing on the host: resize, flip, pad to a canvas bucket, and the
fixed-size ground truth the jitted step expects (numpy only)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def rgb_array(image, name: str = "image") -> np.ndarray:
    """An image array -> RGB uint8 [H, W, 3]: [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4]
    (alpha dropped), of uint8 or of numbers in [0, 255]. Anything else, an empty image
    included, is a ValueError that starts with `name` ("image 3": its index in a list). The
    Predictor and serving.ExportedModel apply this rule to every image of a call before running
    any: one bad image fails the call, naming its index, and nothing is served."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if 0 in a.shape:
        raise ValueError(f"{name}: empty image, shape {a.shape}")
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"{name}: expected an RGB array [H, W, 3] (or [H, W] grey, [H, W, 4] RGBA), "
                         f"got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number) or np.isnan(a).any() or a.min() < 0 or a.max() > 255:
            raise ValueError(f"{name}: expected uint8 pixel values (or numbers in [0, 255]), got {a.dtype} "
                             f"in [{a.min()}, {a.max()}]")
        a = np.round(a).astype(np.uint8)
    return a


def resize_shortest_edge(hw: tuple[int, int], short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge: short side to `short`, long side at most `max_size`."""
    h, w = hw
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an RGB uint8 image (Pillow's, antialiased when shrinking)."""
    if image.shape[:2] == tuple(new_hw):
        return image
    from PIL import Image     # here, so that serving.py can use this module without Pillow
    return np.asarray(Image.fromarray(image).resize((new_hw[1], new_hw[0]), Image.BILINEAR))


# Pillow's fixed-point resampling (libImaging/Resample.c): coefficients scaled by 2**22.
_PRECISION_BITS = 32 - 8 - 2


def _pillow_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First source index [out] and fixed-point weights [out, taps] of Pillow's bilinear
    filter (precompute_coeffs + normalize_coeffs_8bpc): a triangle stretched by the scale
    when shrinking, normalised per output pixel, rounded to integers."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale                      # the bilinear filter's support is 1
    taps = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)     # C's (int) cast
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    k = np.arange(taps)
    w = np.maximum(1.0 - np.abs((k[None] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    w = np.where(k[None] < count[:, None], w, 0.0)
    total = w.sum(1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1.0), w)
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << _PRECISION_BITS)).astype(np.int64)
    return first, fixed


def _pillow_pass(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass of Pillow's 8-bit resampling along `axis` (0 rows, 1 columns)."""
    first, fixed = _pillow_bilinear_taps(image.shape[axis], out_size)
    # Weights of a row sum to 2**22, so the sums fit in int32 (255 * 2**22 < 2**31).
    src = image.astype(np.int32)
    acc = np.full(src.shape[:axis] + (out_size,) + src.shape[axis + 1:], 1 << (_PRECISION_BITS - 1), np.int32)
    shape = (1,) * axis + (out_size,) + (1,) * (image.ndim - axis - 1)
    for t in range(fixed.shape[1]):
        index = np.minimum(first + t, image.shape[axis] - 1)
        acc += np.take(src, index, axis=axis) * fixed[:, t].astype(np.int32).reshape(shape)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_image_numpy(image: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """resize_image in numpy alone, bit for bit: Pillow's bilinear resampling in its own
    fixed-point arithmetic, columns first, then rows (tests/test_serving.py checks it
    against Pillow). For serving without Pillow; the input pipeline keeps Pillow's C."""
    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    if w != new_hw[1]:
        image = _pillow_pass(image, new_hw[1], 1)
    if h != new_hw[0]:
        image = _pillow_pass(image, new_hw[0], 0)
    return image


def choose_canvas(hw: tuple[int, int], buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The smallest (by area) canvas bucket that holds an image of size hw."""
    fits = [tuple(b) for b in buckets if b[0] >= hw[0] and b[1] >= hw[1]]
    if not fits:
        raise ValueError(f"an image resized to {hw[0]}x{hw[1]} fits none of data.canvas_buckets "
                         f"{[tuple(b) for b in buckets]}; add a bucket at least that large")
    return min(fits, key=lambda b: b[0] * b[1])


def crop_masks_to_boxes(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Resample each mask over its own box to size x size (aligned bilinear, as RoIAlign with
    one sample per bin).

    masks: [N, H, W] binary; boxes: [N, 4] in the masks' pixel frame -> [N, size, size]
    uint8 (probability * 255). Mask targets for any RoI are later pooled from this crop.
    """
    n, h, w = masks.shape
    if n == 0:
        return np.zeros((0, size, size), np.uint8)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    xs = boxes[:, 0:1] + t[None] * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5      # [N, size]
    ys = boxes[:, 1:2] + t[None] * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5
    xs = np.clip(xs, 0, w - 1)
    ys = np.clip(ys, 0, h - 1)
    x0 = np.floor(xs).astype(np.int64)
    y0 = np.floor(ys).astype(np.int64)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = (xs - x0)[:, None, :]
    fy = (ys - y0)[:, :, None]
    m = masks.astype(np.float32)
    idx = np.arange(n)[:, None, None]
    top = m[idx, y0[:, :, None], x0[:, None, :]] * (1 - fx) + m[idx, y0[:, :, None], x1[:, None, :]] * fx
    bottom = m[idx, y1[:, :, None], x0[:, None, :]] * (1 - fx) + m[idx, y1[:, :, None], x1[:, None, :]] * fx
    return np.round((top * (1 - fy) + bottom * fy) * 255).astype(np.uint8)


def pillow_nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """The input pixel each output pixel reads in Pillow's NEAREST resize (ImagingScaleAffine:
    the source coordinate starts at scale / 2 and grows by `scale` per pixel, summed in double
    precision, then truncated): detectron2 resizes bitmasks with it."""
    scale = in_size / out_size
    steps = np.full(out_size, scale)
    steps[0] = scale * 0.5
    return np.minimum(np.cumsum(steps).astype(np.int64), in_size - 1)


def large_scale_jitter(example: dict, rng: np.random.Generator, size: int, min_scale: float, max_scale: float,
                       flip: bool, pad_value: float | None = None) -> dict:
    """detectron2's large-scale jitter (ViTDet's and the LSJ baselines' training mapper):
    RandomFlip, then ResizeScale (the image scaled to fit size x size times a scale drawn
    uniformly in [min_scale, max_scale], bilinear), then FixedSizeCrop(size, pad=False) (a
    random window of at most size x size, one uniform draw placing it along both axes), and the
    boxes recomputed from the cropped masks (recompute_boxes); instances left empty are dropped.
    The masks are resized nearest-neighbour (as detectron2 resizes bitmasks) and only inside
    the window. Returns an example of the same keys, its image at most size x size; with
    pad_value, exactly size x size: FixedSizeCrop(pad=True, pad_value=...) (the LSJ baselines'
    mapper: 128) fills the rest of the window, right and bottom, in the image itself."""
    image, masks = example["image"], np.asarray(example["masks"])
    h, w = image.shape[:2]
    masks = masks.reshape(-1, h, w)
    if flip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    scale = rng.uniform(min_scale, max_scale)
    out_scale = min(size * scale / h, size * scale / w)
    nh, nw = int(np.round(h * out_scale)), int(np.round(w * out_scale))
    u = rng.uniform(0.0, 1.0)
    oy, ox = int(np.round(max(nh - size, 0) * u)), int(np.round(max(nw - size, 0) * u))
    ch, cw = min(size, nh), min(size, nw)
    crop = resize_image(np.ascontiguousarray(image), (nh, nw))[oy:oy + ch, ox:ox + cw]
    ys = pillow_nearest_index(nh, h)[oy:oy + ch]
    xs = pillow_nearest_index(nw, w)[ox:ox + cw]
    masks = masks[:, ys][:, :, xs].astype(bool)
    rows, cols = masks.any(2), masks.any(1)
    keep = rows.any(1)
    boxes = np.zeros((len(masks), 4), np.float32)
    for i in np.nonzero(keep)[0]:
        y = np.nonzero(rows[i])[0]
        x = np.nonzero(cols[i])[0]
        boxes[i] = (x[0], y[0], x[-1] + 1, y[-1] + 1)
    masks = masks[keep]
    if pad_value is not None:
        pad = ((0, size - ch), (0, size - cw))
        crop = np.pad(crop, pad + ((0, 0),), constant_values=np.asarray(pad_value).astype(crop.dtype))
        masks = np.pad(masks, ((0, 0),) + pad)
    out = dict(example, image=np.ascontiguousarray(crop), masks=masks, boxes=boxes[keep],
               classes=np.asarray(example["classes"]).reshape(-1)[keep])
    if "iscrowd" in example:
        out["iscrowd"] = np.asarray(example["iscrowd"]).reshape(-1)[keep]
    return out


def prepare_example(example: dict, short_side: int | None, max_size: int, buckets, flip: bool,
                    max_instances: int, gt_mask_size: int, with_gt: bool = True, resize=resize_image) -> dict:
    """One dataset example -> fixed-shape arrays for the model.

    example: image [H, W, 3] uint8, and for training boxes [N, 4], classes [N], masks
    [N, H, W], iscrowd [N] (optional). Crowd instances and boxes that are empty after
    resizing are not trained on; beyond max_instances the largest are kept and
    `num_dropped` counts the rest, so the caller can report them. short_side None: the image
    keeps its size (large_scale_jitter has sized it). resize: the image resize (serving passes
    resize_image_numpy, the same resize without Pillow).
    """
    image = example["image"]
    h, w = image.shape[:2]
    new_hw = (h, w) if short_side is None else resize_shortest_edge((h, w), short_side, max_size)
    canvas_hw = choose_canvas(new_hw, buckets)
    resized = resize(image, new_hw)
    if flip:
        resized = resized[:, ::-1]
    canvas = np.zeros((*canvas_hw, 3), np.uint8)
    canvas[:new_hw[0], :new_hw[1]] = resized
    out = {"image": canvas, "image_hw": np.array(new_hw, np.int32),
           "scale": np.array([new_hw[0] / h, new_hw[1] / w], np.float32),
           "orig_hw": np.array([h, w], np.int32), "image_id": np.int64(example.get("image_id", -1))}
    if not with_gt:
        return out
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
    classes = np.asarray(example["classes"], np.int32).reshape(-1)
    masks = np.asarray(example["masks"]).reshape(-1, h, w)
    keep = ~np.asarray(example.get("iscrowd", np.zeros(len(boxes), bool)), bool)
    sy, sx = new_hw[0] / h, new_hw[1] / w
    scaled = boxes * np.array([sx, sy, sx, sy], np.float32)
    keep &= (scaled[:, 2] - scaled[:, 0] > 0) & (scaled[:, 3] - scaled[:, 1] > 0)
    order = np.nonzero(keep)[0]
    areas = (scaled[order, 2] - scaled[order, 0]) * (scaled[order, 3] - scaled[order, 1])
    order = order[np.argsort(-areas, kind="stable")]
    num_dropped = max(len(order) - max_instances, 0)
    order = order[:max_instances]
    crops = crop_masks_to_boxes(masks[order], boxes[order], gt_mask_size)
    scaled = scaled[order]
    if flip:
        scaled = np.stack([new_hw[1] - scaled[:, 2], scaled[:, 1], new_hw[1] - scaled[:, 0], scaled[:, 3]], 1)
        crops = crops[:, :, ::-1]
    g = len(order)
    gt_boxes = np.zeros((max_instances, 4), np.float32)
    gt_boxes[:g] = scaled
    gt_classes = np.zeros((max_instances,), np.int32)
    gt_classes[:g] = classes[order]
    gt_valid = np.zeros((max_instances,), bool)
    gt_valid[:g] = True
    gt_masks = np.zeros((max_instances, gt_mask_size, gt_mask_size), np.uint8)
    gt_masks[:g] = crops
    out.update(gt_boxes=gt_boxes, gt_classes=gt_classes, gt_valid=gt_valid, gt_masks=gt_masks,
               num_dropped=np.int32(num_dropped))
    return out
