"""A small VGG-style conv-net for small grey-scale images (Omniglot, MNIST-like).

Blocks of ``3x3 conv -> BatchNorm -> ReLU [-> 2x2 max pool]`` followed by a global
average pool, as in the conv-nets used for Omniglot by Vinyals et al. 2016 ("Matching
Networks", 4 blocks of 64 channels) and Snell et al. 2017 ("Prototypical Networks"); the
default widens the later blocks (64-128-256) because DML on the 964 background classes
benefits from a wider final representation.

Input: images [N, H, W, C] (NHWC; uint8 in [0, 255] or float already scaled); output:
pooled features [N, channels[-1]] (or the flattened last feature map, ``pooling="flatten"``). Works with ``nnx.jit`` and with the functional
``nnx.split`` / ``nnx.merge`` API (params and BN statistics as pytrees, e.g. for shard_map).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ConvNet", "max_pool_2x2", "preprocess_images", "space_to_depth_2x2"]


def preprocess_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 [0, 255] -> float in [0, 1]; floating input is passed through (cast to ``dtype``)."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(dtype) / 255.0
    return images.astype(dtype)


@jax.custom_vjp
def _max_pool_2x2_even(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _first_max_masks(x: jax.Array, y: jax.Array) -> list[jax.Array]:
    """One-hot (row-major first) position of the maximum in each 2x2 window, as 4 masks."""
    taken = jnp.zeros(y.shape, bool)
    masks = []
    for i in (0, 1):
        for j in (0, 1):
            hit = (x[:, i::2, j::2] == y) & ~taken
            masks.append(hit)
            taken = taken | hit
    return masks


def _max_pool_fwd(x):
    y = _max_pool_2x2_even(x)
    return y, (x, y)


def _max_pool_bwd(residuals, dy):
    x, y = residuals
    n, h, w, c = x.shape
    masks = _first_max_masks(x, y)
    parts = [jnp.where(m, dy, 0).astype(x.dtype) for m in masks]  # [N, H/2, W/2, C] each
    rows = [jnp.stack(parts[2 * i:2 * i + 2], axis=3) for i in (0, 1)]  # [N, H/2, W/2, 2(j), C]
    dx = jnp.stack(rows, axis=2)  # [N, H/2, 2(i), W/2, 2(j), C]
    return (dx.reshape(n, h, w, c),)


_max_pool_2x2_even.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_2x2(x: jax.Array, padding: str = "VALID") -> jax.Array:
    """2x2 max pool, stride 2: [N, H, W, C] -> [N, H//2, W//2, C] with ``padding="VALID"`` (an odd
    trailing row / column is dropped) or [N, ceil(H/2), ceil(W/2), C] with ``"SAME"`` (it is kept,
    as its own window).

    Same values and gradients as ``nnx.max_pool(x, (2, 2), strides=(2, 2))`` (the gradient goes
    to the first maximum of each window in row-major order, as XLA's select-and-scatter does),
    written as a reshape + max with a custom VJP of elementwise selects: the reduce-window
    gradient of XLA:CPU materialises four int32 index arrays of the input's size per pool, and
    autodiff of the reshape + max a tie-count reduction (measured: ~40% and ~12% of the Omniglot
    conv-net train step).
    """
    if padding not in ("VALID", "SAME"):
        raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
    n, h, w, c = x.shape
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
        h, w = h + h % 2, w + w % 2
    return _max_pool_2x2_even(x[:, : h // 2 * 2, : w // 2 * 2])


def space_to_depth_2x2(x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, H//2, W//2, 4C]: each 2x2 block of pixels becomes one pixel with its
    four values as channels (row-major within the block); an odd last row / column is dropped."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // 2, w // 2, 4 * c)


class ConvNet(nnx.Module):
    """Conv-net backbone: ``len(channels)`` blocks, max pooling after the first ``num_pools``.

    Args:
      in_channels: channels of the input images (1 for grey-scale).
      channels: output channels of each block, e.g. (64, 128, 128, 256).
      num_pools: how many of the first blocks end with a 2x2 max pool (28 px: 3 pools -> 3x3).
      pool_padding: "VALID" (an odd row / column is dropped: 28 px -> 14 -> 7 -> 3, losing the
        last feature row and column of the 7x7 map) or "SAME" (kept: 28 -> 14 -> 7 -> 4).
      stem: "conv" (the first block sees the full-resolution image) or "space_to_depth" (the
        image is first folded into 2x2 blocks, `space_to_depth_2x2`: [N, H, W, C] -> [N, H/2,
        W/2, 4C], which takes the place of the first block's max pool; the first conv then runs
        at half resolution with a 6x6-pixel receptive field, as a stride-2 stem does -- the same
        feature-map sizes from the second block on, without the full-resolution first layer
        that dominates the memory traffic of the step). Needs ``num_pools >= 1``.
      pooling: "avg" (global average pool -> [N, channels[-1]]) or "flatten" (keep the
        spatial layout of the last feature map -> [N, channels[-1] * side^2]; where a stroke is
        matters for characters). "flatten" needs ``input_size`` (square images).
      bn_momentum: running-average momentum of BatchNorm (flax convention: 0.9 = torch 0.1).
      dtype: computation dtype (parameters stay float32).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 128, 256),
        *,
        num_pools: int | None = None,
        bn_momentum: float = 0.9,
        pooling: str = "avg",
        input_size: int | None = None,
        pool_padding: str = "VALID",
        stem: str = "conv",
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if len(channels) == 0 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}")
        self.num_pools = len(channels) - 1 if num_pools is None else int(num_pools)
        if not 0 <= self.num_pools <= len(channels):
            raise ValueError(f"num_pools must be in [0, {len(channels)}], got {num_pools}")
        if pooling not in ("avg", "flatten"):
            raise ValueError(f"pooling must be 'avg' or 'flatten', got {pooling!r}")
        if pooling == "flatten" and (input_size is None or input_size < 1):
            raise ValueError(f"input_size must be a positive int with pooling='flatten', got {input_size}")
        if pool_padding not in ("VALID", "SAME"):
            raise ValueError(f"pool_padding must be 'VALID' or 'SAME', got {pool_padding!r}")
        if stem not in ("conv", "space_to_depth"):
            raise ValueError(f"stem must be 'conv' or 'space_to_depth', got {stem!r}")
        if stem == "space_to_depth" and self.num_pools < 1:
            raise ValueError("num_pools must be >= 1 with stem='space_to_depth' (the fold replaces the first pool)")
        self.stem = stem
        self.dtype = dtype
        self.pool_padding = pool_padding
        self.pooling = pooling
        self.input_size = input_size
        if pooling == "flatten":
            side = input_size
            for i in range(self.num_pools):
                valid = pool_padding == "VALID" or (i == 0 and stem == "space_to_depth")
                side = side // 2 if valid else -(-side // 2)
            self.features = int(channels[-1]) * side * side
        else:
            self.features = int(channels[-1])
        convs, norms = [], []
        cin = in_channels * (4 if stem == "space_to_depth" else 1)
        for cout in channels:
            convs.append(nnx.Conv(cin, cout, (3, 3), padding="SAME", use_bias=False, dtype=dtype,
                                  kernel_init=nnx.initializers.he_normal(), rngs=rngs))
            norms.append(nnx.BatchNorm(cout, momentum=bn_momentum, epsilon=1e-5, dtype=dtype, rngs=rngs))
            cin = cout
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"images must have rank 4 [N, H, W, C], got shape {images.shape}")
        x = preprocess_images(images, self.dtype or jnp.float32)
        folded = self.stem == "space_to_depth"
        if folded:
            x = space_to_depth_2x2(x)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = nnx.relu(norm(conv(x)))
            if i < self.num_pools and not (folded and i == 0):
                x = max_pool_2x2(x, self.pool_padding)
        if self.pooling == "flatten":
            if images.shape[1:3] != (self.input_size, self.input_size):
                raise ValueError(f"images must be {self.input_size}x{self.input_size} with pooling='flatten', "
                                 f"got shape {images.shape}")
            return x.reshape(x.shape[0], -1).astype(jnp.float32)
        return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
