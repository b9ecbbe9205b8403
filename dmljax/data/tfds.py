"""TFDS loaders with the standard deep-metric-learning class split.

DML evaluates on classes never seen in training (Song et al., "Deep metric learning via lifted
structured feature embedding", CVPR 2016, whose protocol every later paper follows): all images of
the first classes train, all images of the remaining classes test; TFDS's own train/test splits
(which share classes) are concatenated and ignored.

==================  =======  =============  ===============================================
TFDS name           classes  train classes  note
==================  =======  =============  ===============================================
caltech_birds2011   200      0..99          CUB-200-2011; test = 100..199 (5864 / 5924 images)
cars196             196      0..97          CARS196; test = 98..195 (8054 / 8131 images)
omniglot            1623     0..963         TFDS label = character id - 1, so ids < 964 are
                                            exactly the background set and the rest the
                                            evaluation set: the official Omniglot protocol
==================  =======  =============  ===============================================

Labels are shifted to be contiguous from 0 in each split. Images are resized to
``image_size x image_size`` with TF's antialiased bilinear resize, either stretched (default; the
random resized crop of :mod:`dmljax.data.augment` then picks the aspect ratio) or resized on the
shorter side and centre-cropped. Omniglot images (black ink on white, 3 identical channels) are
returned as one ink-high channel like :func:`dmljax.data.omniglot.load_omniglot`.

Two readers:

* :func:`load_arrays` (the default ``reader="data_source"``) and :func:`dml_data_source` use
  ``tfds.data_source``: TensorFlow-free random access to the prepared ``array_record`` files
  (``tensorflow-datasets`` is a dependency of dmljax; TensorFlow is not). Images are resized with
  PIL's antialiased bilinear filter, like :mod:`dmljax.data.omniglot`. The dataset must have been
  prepared in ``array_record`` format (``tfds build --file_format=array_record`` or
  ``tfds.builder(name, file_format="array_record").download_and_prepare()``).
* :func:`dml_tf_dataset`, :func:`iterate_batches` and ``load_arrays(..., reader="tf_data")``
  stream with ``tf.data`` and resize with TF; they need TensorFlow, the optional extra
  ``pip install "dmljax[tfds]"``. Without it they raise an :class:`ImportError` naming that extra.
  When this module imports TensorFlow it hides the GPUs from it
  (``tf.config.set_visible_devices([], "GPU")``) so that it never takes accelerator memory from
  JAX.

Data is never downloaded unless ``download=True``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = [
    "DML_DATASETS",
    "DmlDataSource",
    "TfdsDmlSpec",
    "dml_data_source",
    "dml_tf_dataset",
    "import_tensorflow",
    "iterate_batches",
    "load_arrays",
]

TFDS_EXTRA_HINT = 'pip install "dmljax[tfds]"'


def import_tensorflow():
    """Import TensorFlow for the ``tf.data`` readers, kept off the accelerators.

    Returns:
      The ``tensorflow`` module, with every GPU hidden from it
      (``tf.config.set_visible_devices([], "GPU")``, so it never reserves accelerator memory that
      JAX needs).

    Raises:
      ImportError: TensorFlow is not installed; the message names the ``dmljax[tfds]`` extra.

    Examples:
      >>> import sys
      >>> from unittest import mock
      >>> from dmljax.data.tfds import import_tensorflow
      >>> with mock.patch.dict(sys.modules, {"tensorflow": None}):  # as if TensorFlow were not installed
      ...     try:
      ...         import_tensorflow()
      ...     except ImportError as e:
      ...         print("dmljax[tfds]" in str(e))
      True
    """
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(
            "the tf.data TFDS readers (dml_tf_dataset, iterate_batches, load_arrays(reader='tf_data')) "
            f"need TensorFlow, an optional extra of dmljax: {TFDS_EXTRA_HINT} (or use the TF-free "
            "load_arrays / dml_data_source)"
        ) from e
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF already initialised its devices (the caller configured it): leave it as it is
    return tf


@dataclasses.dataclass(frozen=True)
class TfdsDmlSpec:
    """How one TFDS dataset is split by class for deep metric learning.

    Attributes:
      tfds_splits: the TFDS splits whose union is split by class.
      num_classes: classes in the dataset.
      num_train_classes: the first ``num_train_classes`` class ids train, the rest test.
      ink_high_grayscale: Omniglot: return 1 channel with ink = 255.
      has_bbox: the examples carry a ``bbox`` feature (``crop_to_bbox`` allowed).

    Examples:
      >>> from dmljax.data.tfds import DML_DATASETS
      >>> spec = DML_DATASETS["caltech_birds2011"]  # a TfdsDmlSpec
      >>> print(spec.num_classes, spec.num_train_classes, spec.has_bbox, spec.ink_high_grayscale)
      200 100 True False
    """

    tfds_splits: tuple[str, ...]  # TFDS splits whose union is split by class
    num_classes: int
    num_train_classes: int
    ink_high_grayscale: bool = False  # Omniglot: 1 channel, ink = 255
    has_bbox: bool = False


DML_DATASETS: dict[str, TfdsDmlSpec] = {
    "caltech_birds2011": TfdsDmlSpec(("train", "test"), 200, 100, has_bbox=True),
    "cars196": TfdsDmlSpec(("train", "test"), 196, 98, has_bbox=True),
    "omniglot": TfdsDmlSpec(("train", "test"), 1623, 964, ink_high_grayscale=True),
}

_RESIZE_MODES = ("stretch", "center_crop")


def _check_args(name: str, split: str, image_size: Any, resize: str, crop_to_bbox: bool) -> TfdsDmlSpec:
    if name not in DML_DATASETS:
        raise ValueError(f"name must be one of {tuple(DML_DATASETS)}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (the DML class split), got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if resize not in _RESIZE_MODES:
        raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {resize!r}")
    spec = DML_DATASETS[name]
    if crop_to_bbox and not spec.has_bbox:
        raise ValueError(f"crop_to_bbox is only available for datasets with boxes, not {name!r}")
    return spec


def dml_tf_dataset(
    name: str,
    split: str,
    *,
    image_size: int,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    resize: str = "stretch",
    crop_to_bbox: bool = False,
):
    """A ``tf.data.Dataset`` of ``{"image": uint8 [S, S, C], "label": int32}`` for one DML split.

    Args:
      name: a key of :data:`DML_DATASETS`.
      split: ``"train"`` (first classes) or ``"test"`` (remaining classes).
      image_size: S.
      data_dir: TFDS data directory (default: TFDS's, ``~/tensorflow_datasets``).
      download: let TFDS download and prepare the data if absent.
      resize: ``"stretch"`` to S x S, or ``"center_crop"`` (shorter side to S, central square).
      crop_to_bbox: crop CUB / Cars images to their bounding box first (some papers do; the
        standard protocol does not).

    Examples:
      >>> import sys
      >>> from unittest import mock
      >>> from dmljax.data.tfds import dml_tf_dataset
      >>> try:  # arguments are checked first
      ...     dml_tf_dataset("cars196", "validation", image_size=64)
      ... except ValueError as e:
      ...     print(e)
      split must be 'train' or 'test' (the DML class split), got 'validation'
      >>> with mock.patch.dict(sys.modules, {"tensorflow": None}):  # without the dmljax[tfds] extra
      ...     try:
      ...         dml_tf_dataset("cars196", "train", image_size=64)
      ...     except ImportError as e:
      ...         print("dmljax[tfds]" in str(e))
      True
    """
    spec = _check_args(name, split, image_size, resize, crop_to_bbox)
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    datasets = [
        tfds.load(name, split=s, data_dir=None if data_dir is None else os.fspath(data_dir),
                  download=download, shuffle_files=False)
        for s in spec.tfds_splits
    ]
    ds = datasets[0]
    for other in datasets[1:]:
        ds = ds.concatenate(other)

    if split == "train":
        keep = lambda ex: ex["label"] < spec.num_train_classes
        offset = 0
    else:
        keep = lambda ex: ex["label"] >= spec.num_train_classes
        offset = spec.num_train_classes
    ds = ds.filter(keep)

    def prepare(ex):
        image = ex["image"]
        if crop_to_bbox:
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            box = ex["bbox"]  # normalised [ymin, xmin, ymax, xmax]
            top = tf.cast(tf.floor(box[0] * shape[0]), tf.int32)
            left = tf.cast(tf.floor(box[1] * shape[1]), tf.int32)
            bottom = tf.maximum(tf.cast(tf.math.ceil(box[2] * shape[0]), tf.int32), top + 1)
            right = tf.maximum(tf.cast(tf.math.ceil(box[3] * shape[1]), tf.int32), left + 1)
            image = image[top:bottom, left:right]
        if spec.ink_high_grayscale:
            image = 255 - image[..., :1]
        image = tf.cast(image, tf.float32)
        if resize == "center_crop":
            hw = tf.cast(tf.shape(image)[:2], tf.float32)
            ratio = image_size / tf.reduce_min(hw)
            new_hw = tf.maximum(tf.cast(tf.round(hw * ratio), tf.int32), image_size)
            image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
            top = (new_hw[0] - image_size) // 2
            left = (new_hw[1] - image_size) // 2
            image = image[top:top + image_size, left:left + image_size]
        else:
            image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        channels = 1 if spec.ink_high_grayscale else 3
        image = tf.ensure_shape(image, (image_size, image_size, channels))
        return {"image": image, "label": tf.cast(ex["label"] - offset, tf.int32)}

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def iterate_batches(
    name: str,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    shuffle_buffer: int = 0,
    seed: int = 0,
    drop_remainder: bool = False,
    **kwargs: Any,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream numpy batches ``{"image": uint8 [b, S, S, C], "label": int32 [b]}`` (not all in memory).

    ``shuffle_buffer > 0`` shuffles with a buffer of that size (deterministic given ``seed``); for
    class-balanced training batches materialise with :func:`load_arrays` and use
    :mod:`dmljax.data.samplers`. Other keyword arguments go to :func:`dml_tf_dataset`.

    Examples:
      >>> import sys
      >>> from unittest import mock
      >>> from dmljax.data.tfds import iterate_batches
      >>> with mock.patch.dict(sys.modules, {"tensorflow": None}):  # without the dmljax[tfds] extra
      ...     try:
      ...         next(iterate_batches("cars196", "train", batch_size=32, image_size=64))
      ...     except ImportError as e:
      ...         print("dmljax[tfds]" in str(e))
      True
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_args(name, split, image_size, kwargs.get("resize", "stretch"), kwargs.get("crop_to_bbox", False))
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    ds = dml_tf_dataset(name, split, image_size=image_size, **kwargs)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    yield from tfds.as_numpy(ds)


class DmlDataSource(Sequence):
    """Random access to one DML class split of a TFDS dataset, TensorFlow-free.

    ``source[i]`` is ``{"image": uint8 [S, S, C], "label": int}`` (labels contiguous from 0 in the
    split), decoded and resized on access. Built by :func:`dml_data_source`.

    Attributes:
      labels: int32 [N], the labels of the split (read once when the source is built).

    Examples:
      >>> import tensorflow_datasets as tfds
      >>> from dmljax.data.tfds import dml_data_source
      >>> with tfds.testing.mock_data(num_examples=8):  # 8 random examples per TFDS split, no download
      ...     source = dml_data_source("cars196", "test", image_size=8)
      ...     example = source[0]
      >>> print(type(source).__name__, example["image"].shape, example["image"].dtype, source.labels.dtype)
      DmlDataSource (8, 8, 3) uint8 int32
    """

    def __init__(self, records: Sequence[Any], indices: np.ndarray, labels: np.ndarray, *,
                 spec: TfdsDmlSpec, image_size: int, resize: str, crop_to_bbox: bool):
        self._records = records  # (record source, index) pairs
        self._indices = indices
        self.labels = labels
        self._spec, self._size, self._resize, self._crop = spec, image_size, resize, crop_to_bbox

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a source of {len(self)} examples")
        source, index = self._records[int(self._indices[i])]
        example = source[int(index)]
        image = _prepare_numpy(np.asarray(example["image"]), example.get("bbox"), spec=self._spec,
                               image_size=self._size, resize=self._resize, crop_to_bbox=self._crop)
        return {"image": image, "label": int(self.labels[i])}


def _prepare_numpy(image: np.ndarray, bbox: Any, *, spec: TfdsDmlSpec, image_size: int, resize: str,
                   crop_to_bbox: bool) -> np.ndarray:
    """The numpy/PIL counterpart of :func:`dml_tf_dataset`'s ``prepare`` (bbox crop, ink inversion,
    antialiased bilinear resize)."""
    from PIL import Image

    if crop_to_bbox:
        h, w = image.shape[:2]
        box = np.asarray(bbox, dtype=np.float32)  # normalised [ymin, xmin, ymax, xmax]
        top, left = int(np.floor(box[0] * h)), int(np.floor(box[1] * w))
        bottom = max(int(np.ceil(box[2] * h)), top + 1)
        right = max(int(np.ceil(box[3] * w)), left + 1)
        image = image[top:bottom, left:right]
    if spec.ink_high_grayscale:
        image = 255 - image[..., :1]
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if resize == "center_crop":
        w, h = pil.size
        ratio = image_size / min(h, w)
        new_h, new_w = max(round(h * ratio), image_size), max(round(w * ratio), image_size)
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
        pil = pil.crop((left, top, left + image_size, top + image_size))
    else:
        pil = pil.resize((image_size, image_size), Image.Resampling.BILINEAR)
    out = np.asarray(pil, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def dml_data_source(
    name: str,
    split: str,
    *,
    image_size: int,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    resize: str = "stretch",
    crop_to_bbox: bool = False,
) -> DmlDataSource:
    """A TensorFlow-free random-access :class:`DmlDataSource` for one DML class split.

    Reads the dataset's ``array_record`` files with ``tfds.data_source`` (no TensorFlow needed).
    Every record is read once to find the split's examples (TFDS records carry the label with the
    image); images are then decoded and resized on access with PIL's antialiased bilinear filter.

    Args:
      name: a key of :data:`DML_DATASETS`.
      split: ``"train"`` (first classes) or ``"test"`` (remaining classes).
      image_size: S.
      data_dir: TFDS data directory (default: TFDS's, ``~/tensorflow_datasets``).
      download: let TFDS download and prepare the data if absent.
      resize: ``"stretch"`` to S x S, or ``"center_crop"`` (shorter side to S, central square).
      crop_to_bbox: crop CUB / Cars images to their bounding box first.

    Examples:
      >>> import tensorflow_datasets as tfds
      >>> from dmljax.data.tfds import dml_data_source
      >>> with tfds.testing.mock_data(num_examples=8):  # 8 random examples per TFDS split, no download
      ...     train = dml_data_source("omniglot", "train", image_size=8)
      ...     test = dml_data_source("omniglot", "test", image_size=8)
      ...     print(len(train) + len(test), test[0]["image"].shape)  # one ink-high channel
      16 (8, 8, 1)
    """
    spec = _check_args(name, split, image_size, resize, crop_to_bbox)
    import tensorflow_datasets as tfds

    records, labels = [], []
    for tfds_split in spec.tfds_splits:
        source = tfds.data_source(name, split=tfds_split, download=download,
                                  data_dir=None if data_dir is None else os.fspath(data_dir))
        for index in range(len(source)):
            records.append((source, index))
            labels.append(int(source[index]["label"]))
    labels = np.asarray(labels, dtype=np.int64)
    in_train = labels < spec.num_train_classes
    keep = np.flatnonzero(in_train if split == "train" else ~in_train)
    offset = 0 if split == "train" else spec.num_train_classes
    return DmlDataSource(records, keep, (labels[keep] - offset).astype(np.int32), spec=spec,
                         image_size=int(image_size), resize=resize, crop_to_bbox=crop_to_bbox)


_READERS = ("data_source", "tf_data")


def load_arrays(name: str, split: str, *, image_size: int, reader: str = "data_source",
                **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """The whole DML split in memory: (images uint8 [N, S, S, C], labels int32 [N]).

    Memory is N * S * S * C bytes (CUB at 256 px: ~1.2 GB per split); use
    :func:`dml_data_source` (random access) or :func:`iterate_batches` to stream instead.

    Args:
      name, split, image_size: as for :func:`dml_data_source`.
      reader: ``"data_source"`` (default: ``tfds.data_source``, TensorFlow-free, PIL resize) or
        ``"tf_data"`` (``tf.data`` with TF's resize; needs the ``dmljax[tfds]`` extra).
      **kwargs: ``data_dir``, ``download``, ``resize``, ``crop_to_bbox``.

    Examples:
      >>> import tensorflow_datasets as tfds
      >>> from dmljax.data.tfds import load_arrays
      >>> with tfds.testing.mock_data(num_examples=8):  # 8 random examples per TFDS split, no download
      ...     images, labels = load_arrays("cars196", "train", image_size=8)
      >>> print(images.shape[1:], images.dtype, labels.dtype, bool((labels < 98).all()))
      (8, 8, 3) uint8 int32 True
    """
    if reader not in _READERS:
        raise ValueError(f"reader must be one of {_READERS}, got {reader!r}")
    channels = 1 if name in DML_DATASETS and DML_DATASETS[name].ink_high_grayscale else 3
    if reader == "data_source":
        source = dml_data_source(name, split, image_size=image_size, **kwargs)
        images = np.zeros((len(source), image_size, image_size, channels), np.uint8)
        for i in range(len(source)):
            images[i] = source[i]["image"]
        return images, source.labels
    images, labels = [], []
    for batch in iterate_batches(name, split, batch_size=256, image_size=image_size, **kwargs):
        images.append(batch["image"])
        labels.append(batch["label"])
    if not images:
        return np.zeros((0, image_size, image_size, channels), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(images), np.concatenate(labels)
