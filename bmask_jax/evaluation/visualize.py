"""Drawing detections / instance masks / predicted boundaries on images (PIL only)."""
from __future__ import annotations

import colorsys
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (RGB); instance i gets _PALETTE[i % len].
_PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
        (128, 0, 0), (0, 0, 128), (128, 128, 0), (255, 225, 25), (220, 190, 255),
        (170, 255, 195), (250, 190, 212), (128, 128, 128),
    ],
    dtype=np.uint8,
)
_MASK_ALPHA = 0.45


def _instance_color(i: int) -> tuple[int, int, int]:
    c = _PALETTE[i % len(_PALETTE)]
    return int(c[0]), int(c[1]), int(c[2])


def _boundary_color(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Bright colour of the complementary hue (full saturation/value), so it stands out on the fill."""
    h, _, _ = colorsys.rgb_to_hsv(*(v / 255.0 for v in fill))
    r, g, b = colorsys.hsv_to_rgb((h + 0.5) % 1.0, 1.0, 1.0)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if lum > 150 else (255, 255, 255)


def _font(image_hw: tuple[int, int]):
    # Small text: ~10 px on small images, growing slowly with the image size.
    size = int(np.clip(round(min(image_hw) / 48), 9, 18))
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType: fixed bitmap font.
        return ImageFont.load_default()


def draw_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    scores: np.ndarray | None,
    masks: np.ndarray | None,
    class_names: Sequence[str],
    boundaries: np.ndarray | None = None,
    score_threshold: float = 0.0,
    min_size: int = 0,
) -> np.ndarray:
    """Draw instances on a copy of `image`.

    image: uint8 [H, W, 3] RGB. boxes: [N, 4] xyxy pixels. classes: [N] contiguous class ids
    (indices into class_names). scores: [N] or None. masks: [N, H, W] bool or None.
    boundaries: [N, H, W] bool or None (predicted boundary pixels).
    Draws, in order: semi-transparent mask fills (a deterministic distinct colour per instance),
    box outlines, boundary pixels (opaque, bright complementary colour), then the labels
    "name 0.93" with a filled background at each box's top-left (above the box when there is
    room). Instances with score < score_threshold are skipped. Returns a new uint8 [H, W, 3],
    or, when the image's longer side is below min_size, [k H, k W, 3] with the smallest
    integer k that reaches it: the image, masks and boundaries enlarged pixel by pixel
    (nearest), so that the labels and boundaries of a small image can be read.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    h, w = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = boxes.shape[0]
    classes = np.zeros(n, np.int64) if classes is None else np.asarray(classes).reshape(-1)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    for name, arr in (("masks", masks), ("boundaries", boundaries)):
        if arr is not None and np.asarray(arr).shape != (n, h, w):
            raise ValueError(f"{name} must be [{n}, {h}, {w}], got {np.asarray(arr).shape}")

    if 0 < max(h, w) < min_size:
        k = -(-min_size // max(h, w))
        grow = lambda a: None if a is None else np.repeat(np.repeat(np.asarray(a), k, -2), k, -1)  # noqa: E731
        image = np.repeat(np.repeat(image, k, 0), k, 1)
        masks, boundaries, boxes = grow(masks), grow(boundaries), boxes * k
        h, w = image.shape[:2]

    keep = [i for i in range(n) if scores is None or scores[i] >= score_threshold]
    colors = {i: _instance_color(i) for i in keep}

    out = image.astype(np.float32)
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        for i in keep:
            m = masks[i]
            out[m] = out[m] * (1.0 - _MASK_ALPHA) + np.asarray(colors[i], np.float32) * _MASK_ALPHA
    canvas = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)

    line_w = max(1, int(round(min(h, w) / 400)))
    for i in keep:
        x1, y1, x2, y2 = boxes[i]
        if x2 < x1 or y2 < y1:
            continue
        draw.rectangle([x1, y1, x2, y2], outline=colors[i], width=line_w)

    if boundaries is not None:
        arr = np.array(canvas)
        boundaries = np.asarray(boundaries, dtype=bool)
        for i in keep:
            arr[boundaries[i]] = _boundary_color(colors[i])
        canvas = Image.fromarray(arr)
        draw = ImageDraw.Draw(canvas)

    font = _font((h, w))
    for i in keep:
        c = int(classes[i])
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        x1, y1 = float(boxes[i, 0]), float(boxes[i, 1])
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l, b - t
        pad = 1
        bw, bh = tw + 2 * pad, th + 2 * pad
        x = int(np.clip(np.floor(x1), 0, max(w - bw, 0)))
        y = int(np.floor(y1)) - bh  # above the box if it fits, else just inside
        if y < 0:
            y = int(np.clip(np.floor(y1), 0, max(h - bh, 0)))
        draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=colors[i])
        draw.text((x + pad - l, y + pad - t), text, fill=_text_color(colors[i]), font=font)

    return np.array(canvas, dtype=np.uint8)


def save_image(path, image) -> None:
    """Save a uint8 [H, W, 3] (or [H, W]) array as an image file (format from the extension)."""
    d = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
