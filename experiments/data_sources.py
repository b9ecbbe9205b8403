"""Data sources and backbones for the train CLI: one config -> training arrays, evaluation set, model.

``config.data.name`` picks the source:

=========================  ============================================================================
name                       what it loads
=========================  ============================================================================
``omniglot``               the offline Omniglot zips (`dmljax.data.omniglot`), exactly as
                           ``experiments/train.py`` did: ``data.train_split`` (+ optional rotation
                           classes) to train, ``data.test_split`` to test, plus the 20 one-shot runs
``tfds:<name>``            a TFDS dataset of `dmljax.data.tfds.DML_DATASETS` (``caltech_birds2011``,
                           ``cars196``, ``omniglot``) with the standard half/half class split (first
                           classes train, remaining classes test; Song et al. 2016), resized to
                           ``data.image_size`` and held in memory as uint8
``sop``                    Stanford Online Products from ``data.root`` (`dmljax.data.folders.load_sop`)
``inshop``                 In-shop Clothes Retrieval from ``data.root``; query vs gallery evaluation
``folder``                 ``data.root/train/<class>/*`` and ``data.root/test/<class>/*``
=========================  ============================================================================

Memory. TFDS sources are decoded once into host RAM: N * S * S * 3 bytes, i.e. CUB-200 (11788
images) at the standard 256 px "resize" size is ~2.3 GB (1.15 GB per split), Cars-196 (16185) ~3.2
GB. Use a smaller ``data.image_size`` on small machines (the crop is then taken from fewer pixels),
and ``data.cache_dir`` to keep the decoded arrays as ``.npz`` so later runs skip TFDS decoding.
SOP / In-shop / folder sources are never held in memory: `LazyImages` decodes the images of
each sampler batch (and each evaluation chunk) on demand in a thread pool.

Input convention. Images stay uint8 on the host. RGB backbones are wrapped in `ImageInput`,
which owns the whole input normalisation, so training (augmented, float in [0, 1] at the crop
size) and evaluation (uint8 at ``data.image_size``, centre-cropped to ``data.crop_size`` - the
"resize 256, centre crop 224" of every DML paper) are normalised identically and
`dmljax.train.step.embed` needs no preprocessing. The augmentation
(`build_augment_fn`) is the `dmljax.data.augment.AugmentConfig.imagenet_style` preset (random
resized crop + horizontal flip) without its normalisation, which `ImageInput` does instead.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "DataSource",
    "EvalSet",
    "ImageInput",
    "LazyImages",
    "SOURCE_KINDS",
    "build_augment_fn",
    "build_backbone",
    "build_model",
    "evaluate_source",
    "load_data_source",
    "parse_source_name",
    "source_channels",
]

SOURCE_KINDS = ("omniglot", "tfds", "sop", "inshop", "folder")
BACKBONES = ("convnet", "resnet18", "resnet34", "resnet50", "resnet101", "bn_inception")

# torchvision ImageNet statistics (RGB, images in [0, 1]); the Caffe BN-Inception expects BGR
# in [0, 255] minus (104, 117, 128) with unit std (Proxy-Anchor's dataset/utils.py, Kim et al. 2020).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (104.0, 117.0, 128.0)


def _get(node: Any, key: str, default: Any) -> Any:
    """``node.key`` if the config has it, else ``default`` (older configs lack the new keys)."""
    try:
        return node[key] if key in node else default
    except TypeError:
        return default


# ----------------------------------------------------------------------------- containers
class LazyImages:
    """Array-like view of an `ImageListDataset`: ``images[idx]`` decodes those images now.

    Supports what the trainer needs: ``len``, ``shape``, ``dtype``, integer-array / slice / int
    indexing (returns uint8 [b, S, S, 3]). Decoding runs in a thread pool created on first use.
    """

    def __init__(self, dataset, *, image_size: int, resize: str = "stretch", num_workers: int = 8):
        self.dataset = dataset
        self.image_size = int(image_size)
        self.resize = resize
        self.num_workers = int(num_workers)
        self.shape = (len(dataset), self.image_size, self.image_size, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._last_slice: tuple | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            # `dmljax.train.step.embed` slices each chunk twice (once for its length): remember
            # the last slice so it is decoded once
            bounds = index.indices(len(self))
            if self._last_slice is not None and self._last_slice[0] == bounds:
                return self._last_slice[1]
            images = self[np.arange(*bounds)]
            self._last_slice = (bounds, images)
            return images
        scalar = np.ndim(index) == 0
        indices = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers)
        images, _ = self.dataset.load(indices, image_size=self.image_size, resize=self.resize,
                                      executor=self._pool)
        return images[0] if scalar else images

    def __getstate__(self):  # a thread pool does not pickle
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_last_slice"] = None
        return state


@dataclasses.dataclass
class EvalSet:
    """Evaluation protocol: every query against the other queries (CUB, Cars, SOP, Omniglot),
    or queries against a separate gallery (In-shop). Images uint8 [N, S, S, C] or `LazyImages`."""

    query_images: Any
    query_labels: np.ndarray
    gallery_images: Any = None
    gallery_labels: np.ndarray | None = None
    ks: tuple[int, ...] = (1, 2, 4, 8)

    @property
    def num_classes(self) -> int:
        labels = self.query_labels if self.gallery_labels is None else np.concatenate(
            [self.query_labels, self.gallery_labels])
        return int(len(np.unique(labels)))


@dataclasses.dataclass
class DataSource:
    """Training data + evaluation set of one dataset.

    Attributes:
      name: ``config.data.name``.
      train_images: uint8 [N, S, S, C] (or `LazyImages`), indexed by the sampler's batches.
      train_labels: int32 [N], contiguous class ids ``0..num_classes-1``.
      num_classes: training classes (proxies to create); for TFDS the split's class count, even
        when (mock data) some classes have no image.
      eval_set: the unseen-class test protocol.
      channels: image channels (1 for Omniglot, 3 for RGB datasets).
      one_shot_runs: Omniglot's 20 official 20-way runs (`dmljax.data.omniglot`), else None.
      class_super_labels: int32 [num_classes], the super-class of every training class (Omniglot:
        its alphabet, per rotation; SOP: its product category), else None; read by
        ``sampler.name="hierarchical"``.
    """

    name: str
    train_images: Any
    train_labels: np.ndarray
    num_classes: int
    eval_set: EvalSet
    channels: int
    one_shot_runs: list | None = None
    class_super_labels: np.ndarray | None = None

    @property
    def images(self):
        """The evaluation (query) images: lets a `DataSource` stand where the trainer used the
        Omniglot test split (``test.images`` / ``test.labels``)."""
        return self.eval_set.query_images

    @property
    def labels(self) -> np.ndarray:
        return self.eval_set.query_labels

    def describe(self) -> str:
        e = self.eval_set
        test = f"{len(e.query_labels)} test images" if e.gallery_labels is None else (
            f"{len(e.query_labels)} queries / {len(e.gallery_labels)} gallery images")
        return (f"{self.name}: {len(self.train_labels)} train images / {self.num_classes} classes, "
                f"{test} / {e.num_classes} classes")


# ----------------------------------------------------------------------------- data
def parse_source_name(name: Any) -> tuple[str, str | None]:
    """``"tfds:cars196"`` -> ("tfds", "cars196"); ``"sop"`` -> ("sop", None)."""
    if not isinstance(name, str):
        raise ValueError(f"data.name must be a string, got {name!r}")
    kind, _, arg = name.partition(":")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data.name must be one of 'omniglot', 'tfds:<name>', 'sop', 'inshop', 'folder'; "
                         f"got {name!r}")
    if kind == "tfds":
        from dmljax.data.tfds import DML_DATASETS
        if arg not in DML_DATASETS:
            raise ValueError(f"data.name: TFDS dataset must be one of {tuple(DML_DATASETS)}, got {arg!r}")
        return kind, arg
    if arg:
        raise ValueError(f"data.name {name!r}: only 'tfds:' takes a ':<name>' suffix")
    return kind, None


def source_channels(config) -> int:
    """Image channels of ``config.data.name``'s images: 1 for Omniglot, 3 for RGB datasets."""
    kind, arg = parse_source_name(config.data.name)
    if kind == "omniglot":
        return 1
    if kind == "tfds":
        from dmljax.data.tfds import DML_DATASETS
        return 1 if DML_DATASETS[arg].ink_high_grayscale else 3
    return 3


def _load_omniglot(config) -> DataSource:
    from dmljax.data.omniglot import load_omniglot, load_one_shot_runs
    d = config.data
    train = load_omniglot(d.train_split, image_size=d.image_size)
    test = load_omniglot(d.test_split, image_size=d.image_size)
    images, labels = train.images, train.labels.astype(np.int32)
    num_classes = int(labels.max()) + 1
    supers = train.class_alphabet_labels  # [C]
    num_alphabets = len(set(train.alphabets))
    rotations = _get(d, "rotation_classes", 1)
    if rotations > 1:
        # every rotation of a character is a new class (Santoro et al. 2016, Vinyals et al. 2016);
        # the rotated copies of an alphabet form a super-class of their own
        rotated = [np.rot90(images, k, axes=(1, 2)) for k in range(rotations)]
        images = np.ascontiguousarray(np.concatenate(rotated))
        labels = np.concatenate([labels + k * num_classes for k in range(rotations)])
        supers = np.concatenate([supers + k * num_alphabets for k in range(rotations)]).astype(np.int32)
        num_classes *= rotations
    runs = load_one_shot_runs(image_size=d.image_size)
    return DataSource("omniglot", images, labels, num_classes,
                      EvalSet(test.images, test.labels.astype(np.int32)), channels=1, one_shot_runs=runs,
                      class_super_labels=supers)


def _tfds_arrays(name: str, split: str, config) -> tuple[np.ndarray, np.ndarray]:
    from dmljax.data.tfds import load_arrays
    d = config.data
    kwargs = dict(image_size=int(d.image_size), resize=_get(d, "resize", "stretch"),
                  crop_to_bbox=bool(_get(d, "crop_to_bbox", False)), download=bool(_get(d, "download", False)))
    data_dir = _get(d, "data_dir", "") or None
    cache_dir = _get(d, "cache_dir", "") or None
    cache = None
    if cache_dir is not None:
        tag = f"{name}_{split}_{kwargs['image_size']}_{kwargs['resize']}{'_bbox' if kwargs['crop_to_bbox'] else ''}"
        cache = Path(cache_dir) / f"{tag}.npz"
        if cache.is_file():
            with np.load(cache) as f:
                return f["images"], f["labels"].astype(np.int32)
    images, labels = load_arrays(name, split, data_dir=data_dir, **kwargs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    return images, labels.astype(np.int32)


def _load_tfds(name: str, config) -> DataSource:
    from dmljax.data.tfds import DML_DATASETS
    spec = DML_DATASETS[name]
    train_x, train_y = _tfds_arrays(name, "train", config)
    test_x, test_y = _tfds_arrays(name, "test", config)
    channels = 1 if spec.ink_high_grayscale else 3
    return DataSource(f"tfds:{name}", train_x, train_y, spec.num_train_classes,
                      EvalSet(test_x, test_y, ks=tuple(_get(config.data, "eval_ks", (1, 2, 4, 8)))),
                      channels=channels)


def _lazy(dataset, config) -> LazyImages:
    d = config.data
    return LazyImages(dataset, image_size=int(d.image_size), resize=_get(d, "resize", "stretch"),
                      num_workers=int(_get(d, "num_workers", 8)))


def _root(config, kind: str) -> str:
    root = _get(config.data, "root", "")
    if not root:
        raise ValueError(f"data.root must name the {kind} dataset directory, got {root!r}")
    return root


def _load_folders(kind: str, config) -> DataSource:
    from dmljax.data import folders
    root = _root(config, kind)
    if kind == "sop":
        splits = folders.load_sop(root)
        ks = (1, 10, 100, 1000)  # the SOP protocol of Song et al. 2016
        eval_set = EvalSet(_lazy(splits["test"], config), splits["test"].labels, ks=ks)
    elif kind == "inshop":
        splits = folders.load_inshop(root)
        ks = (1, 10, 20, 30, 40, 50)  # Liu et al. 2016 / Proxy-Anchor
        eval_set = EvalSet(_lazy(splits["query"], config), splits["query"].labels,
                           _lazy(splits["gallery"], config), splits["gallery"].labels, ks=ks)
    else:
        splits = {s: folders.load_image_folder(os.path.join(root, s)) for s in ("train", "test")}
        eval_set = EvalSet(_lazy(splits["test"], config), splits["test"].labels)
    eval_set.ks = tuple(_get(config.data, "eval_ks", eval_set.ks))
    train = splits["train"]
    return DataSource(kind, _lazy(train, config), train.labels.astype(np.int32), train.num_classes,
                      eval_set, channels=3, class_super_labels=_class_super_labels(train))


def _class_super_labels(split) -> np.ndarray | None:
    """int32 [C]: the super-class of each class of an `ImageListDataset` (None without super-classes)."""
    if split.super_labels is None:
        return None
    supers = np.zeros(split.num_classes, np.int32)
    supers[split.labels] = split.super_labels
    return supers


def load_data_source(config) -> DataSource:
    """The `DataSource` named by ``config.data.name`` (see the module docstring)."""
    kind, arg = parse_source_name(config.data.name)
    if kind == "omniglot":
        return _load_omniglot(config)
    if kind == "tfds":
        return _load_tfds(arg, config)
    return _load_folders(kind, config)


# ----------------------------------------------------------------------------- model
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
    name = _get(config.model, "dtype", "float32") or "float32"
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
    if name not in BACKBONES:
        raise ValueError(f"model.backbone must be one of {BACKBONES}, got {name!r}")
    dtype = _dtype(config)
    if in_channels is None:
        in_channels = _get(m, "in_channels", 0) or source_channels(config)
    channels = int(in_channels)
    if name == "convnet":
        from dmljax.models.convnet import ConvNet
        if _get(m, "pretrained_path", ""):
            raise ValueError("model.pretrained_path is not supported for the convnet backbone")
        return ConvNet(channels, tuple(m.channels), num_pools=m.num_pools, pooling=_get(m, "pooling", "avg"),
                       input_size=config.data.image_size, dtype=dtype, rngs=rngs)
    if name == "bn_inception":
        from dmljax.models.bn_inception import BNInception
        net = BNInception(in_channels=channels, dtype=dtype, rngs=rngs)
        norm = dict(mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0), scale=255.0, bgr=True)
    else:
        from dmljax.models.resnet import ResNet
        depth = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                 "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}
        block, layers = depth[name]
        layers = tuple(_get(m, "layers", ()) or layers)
        width = int(_get(m, "width", 0) or 64)
        net = ResNet(block=block, layers=layers, width=width, in_channels=channels,
                     small_input=bool(_get(m, "small_input", False)), dtype=dtype, rngs=rngs)
        norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if channels != 3:
        # grey images: one channel with the average statistics
        norm = dict(norm, mean=(float(np.mean(norm["mean"])),), std=(float(np.mean(norm["std"])),), bgr=False)
    path = _get(m, "pretrained_path", "")
    if path:
        from dmljax.models.convert import bn_inception_torch_name, load_state_dict_file, load_torch_state_dict
        rename = bn_inception_torch_name if name == "bn_inception" else None
        unused = load_torch_state_dict(net, load_state_dict_file(path), rename=rename, strict=True)
        unused = [k for k in unused if not k.startswith(("fc.", "last_linear.")) and "num_batches_tracked" not in k]
        if unused:
            print(f"build_backbone: {len(unused)} unused state-dict entries in {path}, e.g. {unused[:3]}",
                  file=sys.stderr)
    image_size = int(config.data.image_size)
    crop = int(_get(config.data, "crop_size", 0) or image_size)
    if crop > image_size:
        raise ValueError(f"data.crop_size must be <= data.image_size={image_size}, got {crop}")
    return ImageInput(net, crop_size=crop, eval_crop_fraction=crop / image_size, dtype=dtype, **norm)


def build_model(config, *, rngs: nnx.Rngs, in_channels: int | None = None):
    """`EmbeddingModel` (backbone + `EmbeddingHead` to ``model.embedding_dim``, L2-normalised)."""
    from dmljax.models.heads import EmbeddingHead, EmbeddingModel
    backbone = build_backbone(config, rngs=rngs, in_channels=in_channels)
    head = EmbeddingHead(_feature_dim(backbone), config.model.embedding_dim,
                         norm=_get(config.model, "head_norm", "") or None, rngs=rngs)
    return EmbeddingModel(backbone, head)


# ----------------------------------------------------------------------------- augmentation
def _augment(images, key, *, config):
    from dmljax.data.augment import augment
    return augment(key, images, config)


def build_augment_fn(config):
    """``augment_fn(images, key)`` for `dmljax.train.state.create_train_state`, or None.

    ``augment.preset``: ``"imagenet"`` - `AugmentConfig.imagenet_style` at ``data.crop_size``
    (random resized crop with ``augment.crop_scale``, horizontal flip; normalisation left to
    `ImageInput`); ``"affine"`` - small rotations/shears/shifts/zooms from ``augment.*`` at
    ``data.image_size`` (the Omniglot recipe of ``experiments/configs/omniglot.py``). Without
    ``augment.preset``: affine for convnet backbones, imagenet otherwise.
    """
    from dmljax.data.augment import AugmentConfig
    a = config.augment
    if not a.enabled:
        return None
    preset = _get(a, "preset", "") or ("affine" if config.model.backbone == "convnet" else "imagenet")
    if preset == "imagenet":
        crop = int(_get(config.data, "crop_size", 0) or config.data.image_size)
        aug = AugmentConfig.imagenet_style(crop)
        aug = dataclasses.replace(aug, crop_scale=tuple(_get(a, "crop_scale", aug.crop_scale)),
                                  flip=bool(_get(a, "flip", True)), mean=None, std=None)
    elif preset == "affine":
        aug = AugmentConfig(size=(config.data.image_size,) * 2, rotation=a.rotation, shear=a.shear,
                            translation=a.translation, zoom=tuple(a.zoom))
    else:
        raise ValueError(f"augment.preset must be 'imagenet' or 'affine', got {preset!r}")
    return functools.partial(_augment, config=aug)


# ----------------------------------------------------------------------------- evaluation
def evaluate_source(state, source: DataSource, *, with_nmi: bool = False, batch_size: int = 256,
                    key: jax.Array | None = None, embed_fn=None, keep: dict | None = None) -> dict[str, float]:
    """Embed the evaluation set with ``state`` (eval mode) and compute the DML metrics.

    Returns `dmljax.metrics.report.evaluate`'s retrieval metrics (``recall@k`` for the source's
    ks, ``map_at_r``, ``r_precision``, ...; no nDCG), NMI / AMI / F1 (one k-means restart) when
    ``with_nmi``, and for Omniglot the 20-way one-shot error of the official runs.

    ``embed_fn(state, images, batch_size) -> [N, D]`` replaces `dmljax.train.step.embed`
    (e.g. the trainer's test-time-augmented embedding). ``keep`` (a dict), as in the trainer's
    ``evaluate``, receives ``step``, ``metrics`` and the query ``embeddings``.
    """
    from dmljax.metrics.report import evaluate
    from dmljax.train.step import embed
    if embed_fn is None:
        embed_fn = lambda s, x, b: embed(s, x, batch_size=b)
    e = source.eval_set
    query = embed_fn(state, e.query_images, batch_size)
    gallery = None if e.gallery_images is None else embed_fn(state, e.gallery_images, batch_size)
    try:
        out = evaluate(query, e.query_labels, gallery, e.gallery_labels, ks=e.ks, metric="cosine",
                       clustering=with_nmi, kmeans_restarts=1, key=key)
    except Exception as err:  # NMI is a bonus; never lose a finished run over k-means
        if not with_nmi:
            raise
        print(f"clustering metrics failed: {err}", file=sys.stderr)
        out = evaluate(query, e.query_labels, gallery, e.gallery_labels, ks=e.ks, metric="cosine",
                       clustering=False)
    out = {k: float(v) for k, v in out.items() if not k.startswith("ndcg")}
    if source.one_shot_runs is not None:
        from dmljax.data.omniglot import one_shot_error
        out["one_shot_error"], _ = one_shot_error(lambda x: embed_fn(state, x, 64), source.one_shot_runs)
        out["one_shot_error"] = float(out["one_shot_error"])
    if keep is not None:
        keep.update(step=int(state.step), metrics=dict(out), embeddings=query)
    return out
