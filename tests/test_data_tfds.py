"""TFDS loaders with the DML class split, on TFDS mock data (no download)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from dmljax.data import tfds as dml_tfds

import tensorflow_datasets as tfds  # a dependency of dmljax (imports without TensorFlow)

tf = None  # imported by the fixture below


@pytest.fixture()
def _tensorflow():
    """Import TensorFlow when a test of the tf.data reader runs, not at collection: every xdist worker
    collects every module, and the import costs ~5 s of CPU in a worker that runs none of these.
    TensorFlow is the optional extra ``dmljax[tfds]``: those tests skip where it is not installed."""
    global tf
    tf = pytest.importorskip("tensorflow", reason="tensorflow (the dmljax[tfds] extra) is needed for tf.data")

NUM_EXAMPLES = 24  # mock examples per TFDS split


def _raw(name):
    """The mock examples as TFDS yields them: (labels, images) over all TFDS splits."""
    labels, images = [], []
    for split in dml_tfds.DML_DATASETS[name].tfds_splits:
        for ex in tfds.as_numpy(tfds.load(name, split=split, download=False, shuffle_files=False)):
            labels.append(int(ex["label"]))
            images.append(ex["image"])
    return np.array(labels), images


def _raw_data_source(name):
    labels, images = [], []
    for split in dml_tfds.DML_DATASETS[name].tfds_splits:
        source = tfds.data_source(name, split=split, download=False)
        for i in range(len(source)):
            labels.append(int(source[i]["label"]))
            images.append(source[i]["image"])
    return np.array(labels), images


def _pil_resize(image, size):
    from PIL import Image

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


@pytest.mark.parametrize("name", ["caltech_birds2011", "cars196", "omniglot"])
def test_class_split_on_mock_data_without_tensorflow(name):
    """The default reader (tfds.data_source, TF-free): same class split, PIL antialiased resize."""
    spec = dml_tfds.DML_DATASETS[name]
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        raw_labels, raw_images = _raw_data_source(name)
        train_x, train_y = dml_tfds.load_arrays(name, "train", image_size=12)
        test_x, test_y = dml_tfds.load_arrays(name, "test", image_size=12)
        source = dml_tfds.dml_data_source(name, "test", image_size=12)
        assert len(source) == len(test_y)
        np.testing.assert_array_equal(source.labels, test_y)
        if len(source):
            np.testing.assert_array_equal(source[-1]["image"], test_x[-1])
    channels = 1 if spec.ink_high_grayscale else 3
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (12, 12, channels)
    assert test_x.shape[1:] == (12, 12, channels) and train_y.dtype == np.int32
    in_train = raw_labels < spec.num_train_classes
    assert len(raw_labels) == 2 * NUM_EXAMPLES == len(train_y) + len(test_y)
    np.testing.assert_array_equal(train_y, raw_labels[in_train])
    np.testing.assert_array_equal(test_y, raw_labels[~in_train] - spec.num_train_classes)
    kept = [im for im, keep in zip(raw_images, ~in_train) if keep]
    for got, image in zip(test_x, kept):
        reference = 255 - image[..., :1] if spec.ink_high_grayscale else image
        np.testing.assert_array_equal(got, _pil_resize(reference, 12))


@pytest.mark.parametrize("name", ["caltech_birds2011", "cars196", "omniglot"])
def test_class_split_on_mock_data(name, _tensorflow):
    spec = dml_tfds.DML_DATASETS[name]
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        raw_labels, raw_images = _raw(name)
        train_x, train_y = dml_tfds.load_arrays(name, "train", image_size=12, reader="tf_data")
        test_x, test_y = dml_tfds.load_arrays(name, "test", image_size=12, reader="tf_data")
    channels = 1 if spec.ink_high_grayscale else 3
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (12, 12, channels)
    assert test_x.shape[1:] == (12, 12, channels)
    assert train_y.dtype == np.int32
    # every example lands in exactly one split, by class, with labels shifted to start at 0
    in_train = raw_labels < spec.num_train_classes
    assert len(raw_labels) == 2 * NUM_EXAMPLES == len(train_y) + len(test_y)
    np.testing.assert_array_equal(train_y, raw_labels[in_train])
    np.testing.assert_array_equal(test_y, raw_labels[~in_train] - spec.num_train_classes)
    assert train_y.min(initial=0) >= 0 and train_y.max(initial=0) < spec.num_train_classes
    assert test_y.max(initial=0) < spec.num_classes - spec.num_train_classes
    # pixels: an antialiased resize of the original (inverted for Omniglot)
    first_test = [im for im, keep in zip(raw_images, ~in_train) if keep][0]
    reference = first_test[..., :1].astype(np.float32)
    reference = 255 - reference if spec.ink_high_grayscale else first_test.astype(np.float32)
    expected = tf.image.resize(reference, (12, 12), antialias=True).numpy()
    np.testing.assert_allclose(test_x[0].astype(np.float32), np.clip(np.round(expected), 0, 255), atol=1.0)


def test_streaming_batches_and_options(_tensorflow):
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        _, all_y = dml_tfds.load_arrays("cars196", "train", image_size=10, reader="tf_data")
        batches = list(dml_tfds.iterate_batches("cars196", "train", batch_size=5, image_size=10))
        assert [len(b["label"]) for b in batches[:-1]] == [5] * (len(batches) - 1)
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), all_y)
        dropped = list(dml_tfds.iterate_batches("cars196", "train", batch_size=5, image_size=10,
                                                drop_remainder=True))
        assert all(len(b["label"]) == 5 for b in dropped) and len(dropped) == len(all_y) // 5
        shuffled = [b["label"] for b in dml_tfds.iterate_batches(
            "cars196", "train", batch_size=100, image_size=10, shuffle_buffer=64, seed=3)]
        again = [b["label"] for b in dml_tfds.iterate_batches(
            "cars196", "train", batch_size=100, image_size=10, shuffle_buffer=64, seed=3)]
        np.testing.assert_array_equal(shuffled[0], again[0])
        np.testing.assert_array_equal(np.sort(shuffled[0]), np.sort(all_y))
        cropped, cropped_y = dml_tfds.load_arrays("caltech_birds2011", "test", image_size=8, crop_to_bbox=True,
                                                  resize="center_crop", reader="tf_data")
        assert cropped.shape[1:] == (8, 8, 3) and len(cropped) == len(cropped_y)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"name": "mnist"}, "name"),
        ({"split": "validation"}, "split"),
        ({"image_size": 0}, "image_size"),
        ({"resize": "pad"}, "resize"),
        ({"name": "omniglot", "crop_to_bbox": True}, "crop_to_bbox"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = {"name": "cars196", "split": "train", "image_size": 8, "batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}"):
        next(dml_tfds.iterate_batches(args.pop("name"), args.pop("split"), **args))


def test_data_source_crop_and_center_crop_without_tensorflow():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        x, y = dml_tfds.load_arrays("caltech_birds2011", "test", image_size=8, crop_to_bbox=True,
                                    resize="center_crop")
    assert x.shape[1:] == (8, 8, 3) and len(x) == len(y)


def test_missing_tensorflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    with pytest.raises(ImportError, match=r"dmljax\[tfds\]"):
        dml_tfds.import_tensorflow()
    with pytest.raises(ImportError, match=r"dmljax\[tfds\]"):
        next(dml_tfds.iterate_batches("cars196", "train", batch_size=4, image_size=8))
    with pytest.raises(ImportError, match=r"dmljax\[tfds\]"):
        dml_tfds.load_arrays("cars196", "train", image_size=8, reader="tf_data")
    with pytest.raises(ValueError, match="^reader"):
        dml_tfds.load_arrays("cars196", "train", image_size=8, reader="tfrecord")


def test_tensorflow_is_kept_off_the_gpus(monkeypatch):
    calls = []
    fake = types.ModuleType("tensorflow")
    fake.config = types.SimpleNamespace(set_visible_devices=lambda devices, kind: calls.append((devices, kind)))
    monkeypatch.setitem(sys.modules, "tensorflow", fake)
    assert dml_tfds.import_tensorflow() is fake
    assert calls == [([], "GPU")]
