"""Host-side (numpy) mask post-processing: pasting RoI masks into the image and RLE encoding.

`paste_masks` reproduces detectron2's `paste_masks_in_image` / `_do_paste_mask`, which samples
the RoI mask with `F.grid_sample(..., mode="bilinear", padding_mode="zeros",
align_corners=False)` at the centre of every image pixel. Bilinear sampling of a 2-D array is
separable, so the pasted mask of one RoI is exactly

    out[r, c] = sum_{i, j} wy[r, i] * mask[i, j] * wx[c, j] = (Wy @ mask @ Wx.T)[r, c]

where `wy[r, :]` / `wx[c, :]` hold the (at most two) 1-D linear-interpolation weights of the
sample row/column; neighbours that fall outside the mask are simply dropped (zero padding).
Only the image window where the sample can be non-zero (the box grown by half a mask cell,
clipped to the image) is computed; everything else is 0.
"""
from __future__ import annotations

import numpy as np

# Smallest box side used when dividing (detectron2 divides by the raw side length).
_MIN_BOX_SIDE = 1e-6


def _interp_matrix(start: int, stop: int, lo: float, size: float, m: int) -> np.ndarray:
    """1-D bilinear weights of image pixels [start, stop) into a length-m mask.

    Pixel p samples mask coordinate u = (p + 0.5 - lo) / size * m - 0.5 (grid_sample with
    align_corners=False), computed as grid_sample does: g = (p + 0.5 - lo) / size * 2 - 1,
    u = ((g + 1) * m - 1) / 2. Returns [stop - start, m] float64 with zero padding.
    """
    p = np.arange(start, stop, dtype=np.float64) + 0.5
    g = (p - lo) / size * 2.0 - 1.0
    u = ((g + 1.0) * m - 1.0) / 2.0
    i0 = np.floor(u)
    f = u - i0
    i0 = i0.astype(np.int64)
    i1 = i0 + 1
    w = np.zeros((stop - start, m), dtype=np.float64)
    rows = np.arange(stop - start)
    ok0 = (i0 >= 0) & (i0 < m)
    ok1 = (i1 >= 0) & (i1 < m)
    w[rows[ok0], i0[ok0]] += 1.0 - f[ok0]
    w[rows[ok1], i1[ok1]] += f[ok1]
    return w


def _support(lo: float, size: float, m: int, limit: int) -> tuple[int, int]:
    """Pixel range [start, stop) (clipped to [0, limit]) where the sample may be non-zero.

    Non-zero needs -1 < u < m, i.e. lo - 0.5 - size/(2m) < p < lo - 0.5 + size + size/(2m);
    one extra pixel each side guards against rounding (the weights there are exactly 0).
    """
    half_cell = 0.5 * size / m
    start = int(np.floor(lo - 0.5 - half_cell)) - 1
    stop = int(np.ceil(lo - 0.5 + size + half_cell)) + 2
    return max(start, 0), min(stop, limit)


def paste_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float | None = 0.5,
) -> np.ndarray:
    """Paste per-RoI mask probabilities into the image, as detectron2's paste_masks_in_image.

    Matches its _do_paste_mask with F.grid_sample(align_corners=False), bilinear, zeros outside:
    image pixel (r, c) samples mask coordinates u = (c + 0.5 - x1) / (x2 - x1) * Mw - 0.5,
    v = (r + 0.5 - y1) / (y2 - y1) * Mh - 0.5.

    masks: [N, Mh, Mw] (or [N, 1, Mh, Mw]) float probabilities in [0, 1].
    boxes: [N, 4] float (x1, y1, x2, y2) absolute pixels in the image.
    image_hw: (H, W).
    Returns [N, H, W] bool (prob >= threshold, as detectron2) if threshold is not None, else
    [N, H, W] float32 probabilities.

    Note: detectron2 on CPU additionally crops each paste to [floor(x1) - 1, ceil(x2) + 1),
    which can only zero sub-0.5 probabilities just outside the box (never changes the
    thresholded mask); here the full grid_sample result is returned.
    """
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, Mh, Mw], got shape {masks.shape}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n, mh, mw = masks.shape
    if boxes.shape[0] != n:
        raise ValueError(f"{n} masks but {boxes.shape[0]} boxes")
    h, w = int(image_hw[0]), int(image_hw[1])
    masks = masks.astype(np.float32, copy=False)

    out = np.zeros((n, h, w), dtype=bool if threshold is not None else np.float32)
    for k in range(n):
        x1, y1, x2, y2 = boxes[k]
        bw = max(x2 - x1, _MIN_BOX_SIDE)
        bh = max(y2 - y1, _MIN_BOX_SIDE)
        c0, c1 = _support(x1, bw, mw, w)
        r0, r1 = _support(y1, bh, mh, h)
        if c1 <= c0 or r1 <= r0:
            continue
        wx = _interp_matrix(c0, c1, x1, bw, mw).astype(np.float32)
        wy = _interp_matrix(r0, r1, y1, bh, mh).astype(np.float32)
        # Contract the smaller side first.
        if (r1 - r0) * mw <= mh * (c1 - c0):
            pasted = (wy @ masks[k]) @ wx.T
        else:
            pasted = wy @ (masks[k] @ wx.T)
        if threshold is not None:
            out[k, r0:r1, c0:c1] = pasted >= threshold
        else:
            out[k, r0:r1, c0:c1] = pasted
    return out


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """[N, H, W] bool -> list of N pycocotools RLEs {"size": [H, W], "counts": str} (JSON-ready)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    from pycocotools import mask as mask_utils     # here: serving.py pastes masks without pycocotools
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for rle in rles:
        counts = rle["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        out.append({"size": [int(s) for s in rle["size"]], "counts": counts})
    return out
