"""The trainer's model builder: ``config.model`` -> an NNX embedding model.

``build_model(config, key)`` is the one builder: the conv-net (`dmljax.models.convnet`), ResNets
(`dmljax.models.resnet`) or BN-Inception (`dmljax.models.bn_inception`) backbone + an
`EmbeddingHead` to ``model.embedding_dim`` (L2-normalised), or, for ``model.backbone =
"global_local"``, the conv-net feature map + `dmljax.models.attention.GlobalLocalEmbedding`.

Input convention: images stay uint8 on the host. RGB backbones are wrapped in `ImageInput`,
which owns the whole input normalisation, so training (augmented, float in [0, 1] at the crop
size) and evaluation (uint8 at ``data.image_size``, centre-cropped to ``data.crop_size``: the
"resize 256, centre crop 224" of every DML paper) are normalised identically and
`dmljax.train.step.embed` needs no preprocessing. The conv-net scales uint8 itself.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmljax.data.sources import source_channels
from dmljax.models.convnet import ConvNet
from dmljax.models.heads import EmbeddingHead, EmbeddingModel

__all__ = ["BACKBONES", "ConvFeatureMap", "GlobalLocalModel", "ImageInput", "build_backbone", "build_model",
           "output_dim"]

BACKBONES = ("convnet", "global_local", "resnet18", "resnet34", "resnet50", "resnet101", "bn_inception")

# torchvision ImageNet statistics (RGB, images in [0, 1]); the Caffe BN-Inception expects BGR
# in [0, 255] minus (104, 117, 128) with unit std (Proxy-Anchor's dataset/utils.py, Kim et al. 2020).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (104.0, 117.0, 128.0)


class ImageInput(nnx.Module):
    """Input normalisation in front of an RGB backbone: images -> ``net((x * scale - mean) / std)``.

    uint8 images are scaled to [0, 1]; float images are taken to be in [0, 1] already (the
    output of the augmentation). Images whose side is not ``crop_size`` are centre-cropped by
    ``eval_crop_fraction`` and resized to ``crop_size`` (the deterministic evaluation transform).
    ``bgr`` reverses the channel order after cropping (Caffe models). No parameters.
    """

    def __init__(self, net: nnx.Module, *, crop_size: int, eval_crop_fraction: float = 1.0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 scale: float = 1.0, bgr: bool = False, dtype: Any = None):
        self.net = net
        self.crop_size = int(crop_size)
        self.eval_crop_fraction = float(eval_crop_fraction)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = float(scale)
        self.bgr = bool(bgr)
        self.dtype = dtype
        self.feature_dim = _feature_dim(net)

    def __call__(self, images: jax.Array) -> jax.Array:
        from dmljax.data.augment import center_crop_resize
        images = jnp.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"images must have rank 4 [N, H, W, C], got shape {images.shape}")
        if jnp.issubdtype(images.dtype, jnp.integer):
            x = images.astype(jnp.float32) / 255.0
        else:
            x = images.astype(jnp.float32)
        if x.shape[1:3] != (self.crop_size, self.crop_size):
            x = center_crop_resize(x, size=self.crop_size, crop_fraction=self.eval_crop_fraction)
        if self.bgr:
            x = x[..., ::-1]
        x = (x * self.scale - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        return self.net(x if self.dtype is None else x.astype(self.dtype))


def _feature_dim(backbone: nnx.Module) -> int:
    for attr in ("feature_dim", "features"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"backbone {type(backbone).__name__} exposes neither feature_dim nor features")


def _dtype(config):
    name = config.model.dtype
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}")
    return None if name == "float32" else jnp.bfloat16


def build_backbone(config, *, rngs: nnx.Rngs, in_channels: int | None = None) -> nnx.Module:
    """The backbone named by ``config.model.backbone``; returns a module with ``feature_dim``.

    ``convnet`` (`dmljax.models.convnet.ConvNet`, ``model.channels`` / ``num_pools`` /
    ``pooling``) is returned bare: it scales uint8 itself. ``resnet18/34/50/101``
    (`dmljax.models.resnet`, He et al. 2016; ``model.width`` / ``model.layers`` override the
    stage width / blocks per stage, e.g. width 8 and layers (1, 1, 1, 1) for tests) and
    ``bn_inception`` (`dmljax.models.bn_inception`, Ioffe & Szegedy 2015) are wrapped in
    `ImageInput` with ImageNet (resp. Caffe BGR) normalisation and the evaluation centre crop
    ``data.crop_size / data.image_size``.

    ``model.pretrained_path``: a torchvision (resp. Caffe-converted BN-Inception) state dict,
    ``.pth`` or ``.npz`` (`dmljax.models.convert`), loaded strictly into the backbone
    (``fc.*`` and ``num_batches_tracked`` entries are ignored). ``model.dtype="bfloat16"``
    computes convolutions in bf16 with float32 parameters.
    """
    m = config.model
    name = m.backbone
    if name not in BACKBONES or name == "global_local":
        raise ValueError(f"model.backbone must be one of {BACKBONES}, got {name!r}")
    dtype = _dtype(config)
    if in_channels is None:
        in_channels = m.in_channels or source_channels(config)
    channels = int(in_channels)
    if name == "convnet":
        from dmljax.models.convnet import ConvNet
        if m.pretrained_path:
            raise ValueError("model.pretrained_path is not supported for the convnet backbone")
        return ConvNet(channels, tuple(m.channels), num_pools=m.num_pools, pooling=m.pooling,
                       pool_padding=m.pool_padding, input_size=config.data.image_size, stem=m.stem,
                       dtype=dtype, rngs=rngs)
    if name == "bn_inception":
        from dmljax.models.bn_inception import BNInception
        net = BNInception(in_channels=channels, dtype=dtype, rngs=rngs)
        norm = dict(mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0), scale=255.0, bgr=True)
    else:
        from dmljax.models.resnet import ResNet
        depth = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                 "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}
        block, layers = depth[name]
        layers = tuple(m.layers) or layers
        width = int(m.width) or 64
        net = ResNet(block=block, layers=layers, width=width, in_channels=channels,
                     small_input=bool(m.small_input), dtype=dtype, rngs=rngs)
        norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if channels != 3:
        # grey images: one channel with the average statistics
        norm = dict(norm, mean=(float(np.mean(norm["mean"])),), std=(float(np.mean(norm["std"])),), bgr=False)
    path = m.pretrained_path
    if path:
        from dmljax.models.convert import bn_inception_torch_name, load_state_dict_file, load_torch_state_dict
        rename = bn_inception_torch_name if name == "bn_inception" else None
        unused = load_torch_state_dict(net, load_state_dict_file(path), rename=rename, strict=True)
        unused = [k for k in unused if not k.startswith(("fc.", "last_linear.")) and "num_batches_tracked" not in k]
        if unused:
            print(f"build_backbone: {len(unused)} unused state-dict entries in {path}, e.g. {unused[:3]}",
                  file=sys.stderr)
    image_size = int(config.data.image_size)
    crop = int(config.data.crop_size) or image_size
    if crop > image_size:
        raise ValueError(f"data.crop_size must be <= data.image_size={image_size}, got {crop}")
    return ImageInput(net, crop_size=crop, eval_crop_fraction=crop / image_size, dtype=dtype, **norm)


class ConvFeatureMap(nnx.Module):
    """The `ConvNet` without its final pooling: images -> feature map [N, s, s, C]."""

    def __init__(self, in_channels: int, channels, *, num_pools: int, input_size: int, rngs: nnx.Rngs):
        self.net = ConvNet(in_channels, tuple(channels), num_pools=num_pools, pooling="flatten",
                           input_size=input_size, rngs=rngs)
        self.side = input_size // 2 ** num_pools
        self.channels = int(channels[-1])

    def __call__(self, images: jax.Array) -> jax.Array:
        flat = self.net(images)
        return flat.reshape(flat.shape[0], self.side, self.side, self.channels)


class GlobalLocalModel(nnx.Module):
    """``backbone`` feature map -> `dmljax.models.attention.GlobalLocalEmbedding` -> the
    concatenation [global (D), local (D_local)] of the two unit embeddings (the objective
    splits it again; retrieval uses the concatenation, i.e. cosine of the pair averaged)."""

    def __init__(self, backbone: nnx.Module, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, images: jax.Array) -> jax.Array:
        g, l = self.head(self.backbone(images))
        return jnp.concatenate([g, l], axis=-1)


def output_dim(config) -> int:
    """Width of the model's output: ``model.embedding_dim`` (+ the local embedding of global_local)."""
    dim = int(config.model.embedding_dim)
    if config.model.backbone == "global_local":
        dim += int(config.model.global_local.local_embedding_dim) or dim
    return dim


def build_model(config, key: int | jax.Array) -> nnx.Module:
    """The embedding model of ``config.model`` (see the module docstring); parameters from
    ``nnx.Rngs(key)`` (the trainer passes ``config.seed``)."""
    rngs = nnx.Rngs(key)
    m = config.model
    if m.backbone == "global_local":
        if source_channels(config) != 1:
            raise ValueError("model.backbone='global_local' is available for grey-scale data ('omniglot' / 'toy')")
        from dmljax.models.attention import GlobalLocalEmbedding
        gl = m.global_local
        backbone = ConvFeatureMap(1, m.channels, num_pools=m.num_pools, input_size=config.data.image_size,
                                  rngs=rngs)
        head = GlobalLocalEmbedding(backbone.channels, m.embedding_dim, local_dim=int(gl.local_dim),
                                    local_embedding_dim=int(gl.local_embedding_dim) or None, rngs=rngs)
        return GlobalLocalModel(backbone, head)
    backbone = build_backbone(config, rngs=rngs)
    head = EmbeddingHead(_feature_dim(backbone), m.embedding_dim, norm=m.head_norm or None, rngs=rngs)
    return EmbeddingModel(backbone, head)
