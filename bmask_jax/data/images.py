"""Reading image files as RGB uint8."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


class _Refused(ValueError):
    """An image refused before decoding (its message is complete)."""


def load_rgb(path: str, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] with EXIF orientation applied; grayscale, RGBA (alpha dropped) and
    16-bit images are converted. Unreadable or missing files, decompression bombs and images of
    more than max_pixels pixels (read from the header, before decoding) raise ValueError naming
    the path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return decode_rgb(data, path, max_pixels)


def decode_rgb(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """load_rgb for the encoded contents of an image file (JPEG, PNG, ...); `name` (the file it
    came from) is named in the ValueError raised when they cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:       # reads the header only
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                # A small file can declare a huge image (a PNG of one colour): refuse it before
                # decoding rather than hold w * h * 3 bytes and their copies.
                raise _Refused(f"cannot read image {name}: {w}x{h} is {w * h / 1e6:.0f} MP, more than "
                                 f"predict.max_image_pixels={max_pixels}")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, np.float64)
                arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"))
    except _Refused:
        raise
    except Image.UnidentifiedImageError as e:     # its message names a BytesIO, not the file
        raise ValueError(f"cannot read image {name}: not an image format Pillow can read") from e
    except Image.DecompressionBombError as e:     # not an OSError: it would end the whole run
        raise ValueError(f"cannot read image {name}: {e}") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
