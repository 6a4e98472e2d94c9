"""ViTDet's backbone (Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection", ECCV 2022) as detectron2's `modeling/backbone/vit.py` builds it: a plain ViT with
window attention in most blocks and global attention in a few, decomposed relative position
embeddings, absolute position embeddings resized from the pretraining grid, and the simple
feature pyramid (P2..P6 from the last feature map alone).

The layout (ViT-B): patch 16 -> 64x64 tokens of 768 on a 1024 canvas; 12 blocks, window 14
(padded to 70x70 = 5x5 windows) except the global blocks 2, 5, 8, 11; then

    last feature (stride 16) -> deconv 2x, LN, GELU, deconv 2x -> 1x1 + LN, 3x3 + LN -> P2
                             -> deconv 2x                      -> 1x1 + LN, 3x3 + LN -> P3
                             ->                                   1x1 + LN, 3x3 + LN -> P4
                             -> max-pool 2x                    -> 1x1 + LN, 3x3 + LN -> P5
    P5 -> every other pixel (LastLevelMaxPool)                                          -> P6

Interpolations (the position embeddings' bicubic resize, the relative embeddings' linear one)
are matrices built in numpy from the static sizes, with PyTorch's sampling conventions
(align_corners=False; bicubic with A = -0.75 and clamped taps), so converted weights give
detectron2's features.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmask_jax.models.layers import Conv, Deconv2x, gelu, make_norm, softmax

LN_EPS = 1e-6                        # ViTDet's nn.LayerNorm(eps=1e-6) and detectron2's LayerNorm
trunc_normal = jax.nn.initializers.truncated_normal(0.02)


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's cubic convolution kernel (upsample_bicubic2d, A = -0.75)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=None)
def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of F.interpolate(mode="bicubic", align_corners=False) along one axis."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5            # not clamped at 0 for cubic (as PyTorch)
        x0 = math.floor(src)
        t = src - x0
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), in_size - 1)] += _cubic(np.array(t - k))
    return m.astype(np.float32)


@lru_cache(maxsize=None)
def linear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of F.interpolate(mode="linear", align_corners=False), computed in
    float32 as PyTorch's CPU kernel does (in float64 a 127 -> 7 resize differed by 1e-5)."""
    f32 = np.float32
    m = np.zeros((out_size, in_size), np.float64)
    scale = f32(in_size) / f32(out_size)
    for i in range(out_size):
        src = max(f32(i + 0.5) * scale - f32(0.5), f32(0.0))
        x0 = min(int(math.floor(src)), in_size - 1)
        x1 = min(x0 + 1, in_size - 1)
        t = float(f32(src - f32(x0)))
        m[i, x0] += 1 - t
        m[i, x1] += t
    return m.astype(np.float32)


@lru_cache(maxsize=None)
def relative_index(q_size: int, k_size: int) -> np.ndarray:
    """[q, k] rows of the (resized) relative table each query/key pair reads (get_rel_pos)."""
    q = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return ((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).astype(np.int64)


def relative_embeddings(q_size: int, k_size: int, table: jnp.ndarray) -> jnp.ndarray:
    """get_rel_pos: the table [L, C] resized linearly to 2 * max(q, k) - 1 rows if it has
    another length, then gathered to [q, k, C]."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = jnp.asarray(linear_matrix(length, table.shape[0])) @ table.astype(jnp.float32)
    return table[relative_index(q_size, k_size)]


def absolute_embeddings(pos_embed: jnp.ndarray, has_cls_token: bool, hw: tuple[int, int]) -> jnp.ndarray:
    """get_abs_pos: [1, (1 +) N, C] from the pretraining grid -> [1, H, W, C] (bicubic)."""
    if has_cls_token:
        pos_embed = pos_embed[:, 1:]
    size = int(round(math.sqrt(pos_embed.shape[1])))
    grid = pos_embed.reshape(size, size, -1)
    if (size, size) == tuple(hw):
        return grid[None]
    wh, ww = jnp.asarray(bicubic_matrix(hw[0], size)), jnp.asarray(bicubic_matrix(hw[1], size))
    return jnp.einsum("hi,ijc,wj->hwc", wh, grid.astype(jnp.float32), ww)[None]


def window_partition(x: jnp.ndarray, window: int) -> tuple[jnp.ndarray, tuple[int, int]]:
    """[B, H, W, C] -> [B * windows, window, window, C], zero-padded to whole windows (the
    padding takes part in attention, as in detectron2)."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jnp.ndarray, window: int, padded_hw, hw) -> jnp.ndarray:
    hp, wp = padded_hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :hw[0], :hw[1]]


class Attention(nn.Module):
    """Multi-head self-attention over [B, H, W, C] with decomposed relative positions."""
    num_heads: int
    rel_pos_size: tuple[int, int] | None      # (H, W) the relative tables are made for; None: none
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, dim = x.shape
        hd = dim // self.num_heads
        qkv = nn.Dense(3 * dim, kernel_init=trunc_normal, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = (t.reshape(b * self.num_heads, h * w, hd) for t in qkv)
        attn = jnp.einsum("nqc,nkc->nqk", q * (hd ** -0.5), k, preferred_element_type=jnp.float32)
        if self.rel_pos_size is not None:
            ry, rx = self.rel_pos_size
            table_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * ry - 1, hd), jnp.float32)
            table_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * rx - 1, hd), jnp.float32)
            r_q = q.reshape(-1, h, w, hd).astype(jnp.float32)
            rel_h = jnp.einsum("bhwc,hkc->bhwk", r_q, relative_embeddings(h, h, table_h))
            rel_w = jnp.einsum("bhwc,wkc->bhwk", r_q, relative_embeddings(w, w, table_w))
            attn = (attn.reshape(-1, h, w, h, w) + rel_h[:, :, :, :, None]
                    + rel_w[:, :, :, None, :]).reshape(-1, h * w, h * w)
        attn = softmax(attn, v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", attn, v).reshape(b, self.num_heads, h, w, hd)
        out = out.transpose(0, 2, 3, 1, 4).reshape(b, h, w, dim)
        return nn.Dense(dim, kernel_init=trunc_normal, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    """timm's Mlp: fc1, GELU (the erf form, torch's nn.GELU), fc2 back to the input width."""
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.hidden, kernel_init=trunc_normal, dtype=self.dtype, name="fc1")(x)
        y = gelu(y)
        return nn.Dense(x.shape[-1], kernel_init=trunc_normal, dtype=self.dtype, name="fc2")(y)


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    # Two-pass variance, as torch: the one-pass form differs in the last bits.
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


class Block(nn.Module):
    """norm1 -> (window) attention -> residual (drop path); norm2 -> MLP -> residual."""
    num_heads: int
    mlp_ratio: float
    window: int                      # 0: global attention
    rel_pos_size: tuple[int, int] | None
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        shortcut = x
        y = layer_norm("norm1", self.dtype)(x)
        if self.window:
            hw = y.shape[1:3]
            y, padded = window_partition(y, self.window)
        y = Attention(self.num_heads, self.rel_pos_size, self.dtype, name="attn")(y)
        if self.window:
            y = window_unpartition(y, self.window, padded, hw)
        x = shortcut + self._drop_path(y, train)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(layer_norm("norm2", self.dtype)(x))
        return x + self._drop_path(y, train)

    def _drop_path(self, y, train: bool):
        """Stochastic depth: in training, each image's branch is dropped with probability
        drop_path and kept ones are scaled by 1 / (1 - drop_path) (timm's DropPath)."""
        if not train or self.drop_path == 0.0:
            return y
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(self.make_rng("sampling"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
        return jnp.where(mask, y / keep, 0).astype(y.dtype)


class PatchEmbed(nn.Module):
    """A p x p stride-p conv (torch's default init: kaiming uniform, a = sqrt(5))."""
    embed_dim: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        return nn.Conv(self.embed_dim, (p, p), (p, p), padding="VALID", dtype=self.dtype,
                       kernel_init=jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))(images)


class ViT(nn.Module):
    """The plain ViT of ViTDet; returns the last feature map [B, H/16, W/16, embed_dim]."""
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    img_size: int = 1024                  # the relative tables of the global blocks are made for it
    window_size: int = 14
    global_blocks: Sequence[int] = (2, 5, 8, 11)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    pretrain_img_size: int = 224
    pretrain_use_cls_token: bool = True
    dtype: Any = jnp.float32
    # Recompute each block in the backward pass instead of keeping its activations (detectron2's
    # use_act_checkpoint): training memory falls to about one block's, for one more forward.
    remat: bool = False

    @nn.compact
    def __call__(self, images, train: bool = False):
        p = self.patch_size
        x = PatchEmbed(self.embed_dim, p, self.dtype, name="patch_embed")(images)
        grid = self.pretrain_img_size // p
        pos = self.param("pos_embed", trunc_normal,
                         (1, grid * grid + int(self.pretrain_use_cls_token), self.embed_dim), jnp.float32)
        x = x + absolute_embeddings(pos, self.pretrain_use_cls_token, x.shape[1:3]).astype(x.dtype)
        tokens = self.img_size // p
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)     # stochastic depth rises linearly
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block     # (self, x, train)
        for i in range(self.depth):
            window = 0 if i in tuple(self.global_blocks) else self.window_size
            size = (window, window) if window else (tokens, tokens)
            x = block(self.num_heads, self.mlp_ratio, window, size, float(rates[i]), self.dtype,
                      name=f"blocks_{i}")(x, train)
        return x


class SimpleFeaturePyramid(nn.Module):
    """P2..P5 from the last feature map by scales 4, 2, 1, 0.5, each through 1x1 and 3x3 convs
    with LayerNorm (no bias), and P6 = P5's every other pixel. Layer names follow detectron2's
    `simfp_<stage>.<index>` (stage = log2 of the output stride)."""
    channels: int = 256
    scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5)
    norm: str = "LN"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        out = {}
        for scale in self.scale_factors:
            stage = int(math.log2(16 / scale))
            y, index = x, 0
            if scale == 4.0:
                y = Deconv2x(dim // 2, self.dtype, name=f"simfp_{stage}_0")(y)
                y = make_norm(self.norm, dtype=self.dtype, name=f"simfp_{stage}_1")(y)
                y = gelu(y)
                y = Deconv2x(dim // 4, self.dtype, name=f"simfp_{stage}_3")(y)
                index = 4
            elif scale == 2.0:
                y = Deconv2x(dim // 2, self.dtype, name=f"simfp_{stage}_0")(y)
                index = 1
            elif scale == 0.5:
                y = nn.max_pool(y, (2, 2), (2, 2))
                index = 1
            elif scale != 1.0:
                raise ValueError(f"SimpleFeaturePyramid: scale factor {scale} is not 4, 2, 1 or 0.5")
            for kernel in (1, 3):
                y = Conv(self.channels, kernel, use_bias=self.norm == "", dtype=self.dtype,
                         name=f"simfp_{stage}_{index}")(y)
                y = make_norm(self.norm, dtype=self.dtype, name=f"simfp_{stage}_{index}_norm")(y)
                index += 1
            out[f"p{stage}"] = y
        out["p6"] = out["p5"][:, ::2, ::2]          # LastLevelMaxPool: kernel 1, stride 2
        return {k: out[k] for k in ("p2", "p3", "p4", "p5", "p6")}
