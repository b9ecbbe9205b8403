"""Data sources of the trainer: one config -> training arrays, super-classes and the evaluation set.

``config.data.name`` picks the source:

=========================  ============================================================================
name                       what it loads
=========================  ============================================================================
``omniglot``               the offline Omniglot zips (`dmljax.data.omniglot`): ``data.train_split``
                           (+ ``data.rotation_classes``) to train, ``data.test_split`` to test, plus
                           the 20 official one-shot runs
``toy``                    a tiny synthetic image set (`dmljax.train.toy`) for smoke tests
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

Images stay uint8 on the host; the model owns the input normalisation
(`dmljax.train.models.ImageInput`). ``data.label_noise`` corrupts a fraction of the training
labels (`add_label_noise`). Every option is a key of `dmljax.configs.base`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DataSource",
    "EvalSet",
    "LazyImages",
    "SOURCE_KINDS",
    "add_label_noise",
    "load_data_source",
    "parse_source_name",
    "source_channels",
]

SOURCE_KINDS = ("omniglot", "toy", "tfds", "sop", "inshop", "folder")
TOY_TRAIN_CLASSES, TOY_TEST_CLASSES, TOY_PER_CLASS = 8, 4, 8


# ----------------------------------------------------------------------------- containers
class LazyImages:
    """Array-like view of an `ImageListDataset`: ``images[idx]`` decodes those images now.

    Supports what the trainer needs: ``len``, ``shape``, ``dtype``, integer-array / slice / int
    indexing (returns uint8 [b, S, S, 3]). Decoding runs in a thread pool created on first use.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from PIL import Image
      >>> from dmljax.data.folders import ImageListDataset
      >>> from dmljax.data.sources import LazyImages
      >>> root = tempfile.mkdtemp()
      >>> paths = [os.path.join(root, f"{i}.png") for i in range(3)]
      >>> for p in paths:
      ...     Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
      >>> images = LazyImages(ImageListDataset(paths, np.array([0, 0, 1], np.int32), [0, 1]), image_size=4)
      >>> print(images.shape, images[np.array([0, 2])].shape, images[1:3].dtype)
      (3, 4, 4, 3) (2, 4, 4, 3) uint8
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
    or queries against a separate gallery (In-shop). Images uint8 [N, S, S, C] or `LazyImages`.

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.sources import EvalSet
      >>> e = EvalSet(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1]),
      ...             gallery_images=np.zeros((2, 8, 8, 3), np.uint8), gallery_labels=np.array([1, 2]))
      >>> print(e.num_classes, e.ks)
      3 (1, 2, 4, 8)
    """

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

    Examples:
      >>> from dmljax.configs.base import get_config
      >>> from dmljax.data.sources import load_data_source
      >>> config = get_config()
      >>> config.data.name, config.data.image_size = "toy", 8
      >>> source = load_data_source(config)
      >>> print(source.describe())
      toy: 64 train images / 8 classes, 32 test images / 4 classes
      >>> print(source.train_images.shape, source.channels, source.class_super_labels[:4])
      (64, 8, 8, 1) 1 [0 0 1 1]
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
    """``"tfds:cars196"`` -> ("tfds", "cars196"); ``"sop"`` -> ("sop", None).

    Examples:
      >>> from dmljax.data.sources import parse_source_name
      >>> parse_source_name("tfds:cars196")
      ('tfds', 'cars196')
      >>> parse_source_name("sop")
      ('sop', None)
    """
    if not isinstance(name, str):
        raise ValueError(f"data.name must be a string, got {name!r}")
    kind, _, arg = name.partition(":")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data.name must be one of 'omniglot', 'toy', 'tfds:<name>', 'sop', 'inshop', 'folder'; "
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
    """Image channels of ``config.data.name``'s images: 1 for Omniglot, 3 for RGB datasets.

    Examples:
      >>> from dmljax.configs.base import get_config
      >>> from dmljax.data.sources import source_channels
      >>> config = get_config()
      >>> print(source_channels(config))  # the default source, omniglot
      1
      >>> config.data.name = "tfds:caltech_birds2011"
      >>> print(source_channels(config))
      3
    """
    kind, arg = parse_source_name(config.data.name)
    if kind in ("omniglot", "toy"):
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
    rotations = int(d.rotation_classes)
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
                      EvalSet(test.images, test.labels.astype(np.int32), ks=_eval_ks(config, (1, 2, 4, 8))),
                      channels=1, one_shot_runs=runs, class_super_labels=supers)


def _load_toy(config) -> DataSource:
    """`dmljax.train.toy.toy_images` at ``data.image_size``: 8 training classes, 4 unseen test
    classes (other random patterns), 8 images each; training classes 2k and 2k + 1 form
    super-class k (for ``sampler.name=hierarchical``)."""
    from dmljax.train.toy import toy_images
    size = int(config.data.image_size)
    images, labels = toy_images(config.seed, num_classes=TOY_TRAIN_CLASSES, per_class=TOY_PER_CLASS, size=size)
    test_images, test_labels = toy_images(config.seed + 1, num_classes=TOY_TEST_CLASSES,
                                          per_class=TOY_PER_CLASS, size=size)
    return DataSource("toy", images, labels, TOY_TRAIN_CLASSES,
                      EvalSet(test_images, test_labels, ks=_eval_ks(config, (1, 2, 4, 8))), channels=1,
                      class_super_labels=np.arange(TOY_TRAIN_CLASSES, dtype=np.int32) // 2)


def _eval_ks(config, protocol: tuple[int, ...]) -> tuple[int, ...]:
    """``data.eval_ks``, or the source's protocol when it is ()."""
    return tuple(int(k) for k in config.data.eval_ks) or protocol


def _tfds_arrays(name: str, split: str, config) -> tuple[np.ndarray, np.ndarray]:
    from dmljax.data.tfds import load_arrays
    d = config.data
    kwargs = dict(image_size=int(d.image_size), resize=d.resize, crop_to_bbox=bool(d.crop_to_bbox),
                  download=bool(d.download))
    data_dir = d.data_dir or None
    cache_dir = d.cache_dir or None
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
                      EvalSet(test_x, test_y, ks=_eval_ks(config, (1, 2, 4, 8))),
                      channels=channels)


def _lazy(dataset, config) -> LazyImages:
    d = config.data
    return LazyImages(dataset, image_size=int(d.image_size), resize=d.resize, num_workers=int(d.num_workers))


def _root(config, kind: str) -> str:
    root = config.data.root
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
    eval_set.ks = _eval_ks(config, eval_set.ks)
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
    """The `DataSource` named by ``config.data.name`` (see the module docstring).

    Examples:
      >>> from dmljax.configs.base import get_config
      >>> from dmljax.data.sources import load_data_source
      >>> config = get_config()
      >>> config.data.name, config.data.image_size = "toy", 8
      >>> source = load_data_source(config)
      >>> print(source.name, source.num_classes, source.eval_set.query_images.shape)
      toy 8 (32, 8, 8, 1)
    """
    kind, arg = parse_source_name(config.data.name)
    if kind == "omniglot":
        return _load_omniglot(config)
    if kind == "toy":
        return _load_toy(config)
    if kind == "tfds":
        return _load_tfds(arg, config)
    return _load_folders(kind, config)




def add_label_noise(config, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``data.label_noise`` > 0: corrupt exactly that fraction of the training labels
    (`dmljax.methods.label_noise.inject_label_noise`, kind ``data.label_noise_kind``; key
    ``fold_in(key(seed), 0x4E015E)``), as in the noisy-label experiments of BSPML. The test
    labels stay clean; ``labels`` is returned unchanged when the rate is 0.

    Examples:
      >>> import numpy as np
      >>> from dmljax.configs.base import get_config
      >>> from dmljax.data.sources import add_label_noise
      >>> config = get_config()
      >>> config.data.label_noise = 0.25
      >>> labels = np.repeat(np.arange(4, dtype=np.int32), 10)
      >>> noisy = add_label_noise(config, labels, num_classes=4)
      >>> print(noisy.shape, int((noisy != labels).sum()))
      (40,) 10
    """
    rate = float(config.data.label_noise)
    if rate == 0.0:
        return labels
    from dmljax.methods.label_noise import inject_label_noise
    key = jax.random.fold_in(jax.random.key(config.seed), 0x4E015E)
    noisy = inject_label_noise(key, jnp.asarray(labels, jnp.int32), rate=rate, kind=config.data.label_noise_kind,
                               num_classes=num_classes)
    return np.asarray(noisy, np.int32)
