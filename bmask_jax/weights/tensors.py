"""Layout conversions (numpy, one layer at a time): torch's conv, transposed conv, linear and
BatchNorm arrays into our kernels and FrozenBN scale/shift."""
from __future__ import annotations

import re

import numpy as np

from bmask_jax.weights.layers import Layer
from bmask_jax.weights.layouts import FLATTENED_ROI_INPUT

BN_EPS = 1e-5


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch conv weight (out, in, kh, kw) -> flax kernel (kh, kw, in, out)."""
    return np.transpose(weight, (2, 3, 1, 0))


def deconv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d weight (in, out, kh, kw) -> Deconv2x kernel (kh, kw, in, out)."""
    return np.transpose(weight, (2, 3, 0, 1))


def dense_kernel(weight: np.ndarray, chw: tuple[int, int, int] | None = None) -> np.ndarray:
    """torch Linear weight (out, in) -> flax kernel (in, out). With chw = (C, H, W), the input is
    a feature map that torch flattens in (C, H, W) order and we in (H, W, C) order: rows are
    permuted so that kernel[(h, w, c)] = weight[:, (c, h, w)]."""
    if chw is None:
        return weight.T
    c, h, w = chw
    return weight.reshape(weight.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, weight.shape[0])


def frozen_bn(weight, bias, running_mean, running_var, eps: float = BN_EPS) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm statistics and affine, each (C,) -> the fixed (scale, shift) of FrozenBN."""
    scale = weight / np.sqrt(running_var + eps)
    return scale, bias - running_mean * scale


def expected_source_shapes(layer: Layer, roles: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """The shape each checkpoint array must have for this layer (torch layouts)."""
    if layer.kind in ("frozen_bn", "group_norm", "layer_norm"):
        c = layer.shape("scale")[0]
        return {r: (c,) for r in roles}
    if layer.kind == "bn_stats":
        c = layer.shape("mean")[0]
        return {r: (c,) for r in roles}
    if layer.kind == "tensor":                      # stored as we keep them
        return {r: layer.shape(r) for r in roles}
    k = layer.shape("kernel")
    weight = {"conv": lambda: (k[3], k[2], k[0], k[1]), "deconv": lambda: (k[2], k[3], k[0], k[1]),
              "dense": lambda: (k[1], k[0])}[layer.kind]()
    return {r: weight if r == "weight" else (k[-1],) for r in roles}


def convert_layer(layer: Layer, arrays: dict[str, np.ndarray], roi_chw=None) -> dict[str, np.ndarray]:
    """Checkpoint arrays of one layer by role -> our leaves {leaf name: array}."""
    if layer.kind == "frozen_bn":
        if "scale" in arrays:                       # MSRA: already scale and shift
            return {"scale": arrays["scale"], "shift": arrays["shift"]}
        scale, shift = frozen_bn(arrays["weight"], arrays["bias"], arrays["running_mean"], arrays["running_var"])
        return {"scale": scale, "shift": shift}
    if layer.kind in ("group_norm", "layer_norm"):
        return {"scale": arrays["weight"], "bias": arrays["bias"]}
    if layer.kind == "bn_stats":
        return {"mean": arrays["running_mean"], "var": arrays["running_var"]}
    if layer.kind == "tensor":
        return dict(arrays)
    w = arrays["weight"]
    kernel = {"conv": conv_kernel, "deconv": deconv_kernel,
              "dense": lambda x: dense_kernel(x, roi_chw if re.fullmatch(FLATTENED_ROI_INPUT, layer.name) else None)}
    out = {"kernel": kernel[layer.kind](w)}
    if "bias" in arrays:
        out["bias"] = arrays["bias"]
    return out
