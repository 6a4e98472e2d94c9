"""Reading image files as RGB uint8."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


def load_rgb(path: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] with EXIF orientation applied; grayscale, RGBA (alpha dropped) and
    16-bit images are converted. Unreadable or missing files raise ValueError naming the path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return decode_rgb(data, path)


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """load_rgb for the encoded contents of an image file (JPEG, PNG, ...); `name` (the file it
    came from) is named in the ValueError raised when they cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, np.float64)
                arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"))
    except Image.UnidentifiedImageError as e:     # its message names a BytesIO, not the file
        raise ValueError(f"cannot read image {name}: not an image format Pillow can read") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
