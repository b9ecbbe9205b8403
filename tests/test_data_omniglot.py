"""Offline Omniglot loader, minimal protocol, one-shot runs and scorer."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dmljax.data.omniglot import (
    OmniglotData,
    load_omniglot,
    load_one_shot_runs,
    load_protocol,
    one_shot_error,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="module")
def minimal_train(cache_dir):
    return load_omniglot("background_small1", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def minimal_test(cache_dir):
    return load_omniglot("minimal_test", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def runs():
    return load_one_shot_runs()


def _check_split(data: OmniglotData, num_classes: int, num_images: int, size: int = 28):
    assert data.images.shape == (num_images, size, size, 1)
    assert data.images.dtype == np.uint8
    assert data.labels.dtype == np.int32 and data.labels.shape == (num_images,)
    # contiguous class ids, 20 drawers per character
    np.testing.assert_array_equal(np.bincount(data.labels), np.full(num_classes, 20))
    assert data.num_classes == num_classes == len(data.alphabets) == len(data.characters)
    assert len(set(data.characters)) == num_classes
    for c in range(num_classes):
        np.testing.assert_array_equal(np.sort(data.drawers[data.labels == c]), np.arange(1, 21))


def test_minimal_protocol_counts(minimal_train, minimal_test):
    _check_split(minimal_train, 136, 2720)
    _check_split(minimal_test, 106, 2120)
    assert sorted(set(minimal_train.alphabets)) == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert sorted(set(minimal_test.alphabets)) == ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
    # classes at test time are never seen in training
    assert not set(minimal_train.characters) & set(minimal_test.characters)


def test_ink_is_high(minimal_train):
    # strokes are thin: most pixels are background (0), ink reaches 255
    images = minimal_train.images
    assert images.max() == 255
    assert np.median(images) == 0
    assert 0.03 < (images > 127).mean() < 0.3
    # borders are background
    assert images[:, 0, :, 0].mean() < 5 and images[:, :, -1, 0].mean() < 5


def test_image_size_and_cache(cache_dir, tmp_path):
    first = load_omniglot("minimal_test", image_size=20, cache_dir=tmp_path)
    assert first.images.shape == (2120, 20, 20, 1)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    t0 = time.perf_counter()
    second = load_omniglot("minimal_test", image_size=20, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 1.0
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.drawers, second.drawers)
    assert first.characters == second.characters and first.alphabets == second.alphabets
    uncached = load_omniglot("minimal_test", image_size=20, use_cache=False)
    np.testing.assert_array_equal(first.images, uncached.images)


def test_full_size_is_undistorted(cache_dir):
    data = load_omniglot("minimal_test", image_size=105, use_cache=False)
    # the PNGs are binary, so without resizing only 0 and 255 occur
    assert set(np.unique(data.images)) == {0, 255}


@pytest.mark.parametrize("bad", [{"split": "train"}, {"image_size": 0}, {"image_size": 2.5}])
def test_bad_arguments(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name}"):
        load_omniglot(**{"split": "minimal_test", **bad})


def test_one_shot_runs_shapes(runs):
    assert len(runs) == 20
    for run in runs:
        assert run.train_images.shape == (20, 28, 28, 1) and run.test_images.shape == (20, 28, 28, 1)
        # every training class is the answer for exactly one test item
        np.testing.assert_array_equal(np.sort(run.test_to_train_index), np.arange(20))
    # run01's key, read by hand from class_labels.txt: item01 -> class08, item02 -> class09, ...
    np.testing.assert_array_equal(runs[0].test_to_train_index[:4], [7, 8, 1, 18])


def test_answer_key_matches_evaluation_set(runs, cache_dir):
    """The run images are copies of evaluation-set images: the key must pair same characters."""
    evaluation = load_omniglot("evaluation", cache_dir=cache_dir)
    label_of: dict[bytes, set[int]] = {}
    for image, label in zip(evaluation.images, evaluation.labels):
        label_of.setdefault(image.tobytes(), set()).add(int(label))
    checked = 0
    for run in runs:
        train_labels = [label_of.get(im.tobytes()) for im in run.train_images]
        for item, answer in enumerate(run.test_to_train_index):
            test_label = label_of.get(run.test_images[item].tobytes())
            assert test_label is not None and train_labels[answer] is not None
            if len(test_label) == 1 and len(train_labels[answer]) == 1:
                assert test_label == train_labels[answer]
                checked += 1
    assert checked >= 390


def test_one_shot_error_oracle_and_random(runs):
    # oracle: embed each image as the one-hot of its (run, class), found by its pixels
    code: dict[bytes, int] = {}
    for r, run in enumerate(runs):
        for j, im in enumerate(run.train_images):
            code[im.tobytes()] = 20 * r + j
        for i, im in enumerate(run.test_images):
            code[im.tobytes()] = 20 * r + int(run.test_to_train_index[i])

    def oracle(images):
        return np.eye(20 * len(runs))[[code[im.tobytes()] for im in images]]

    for metric in ("euclidean", "cosine", "sqeuclidean"):
        mean, per_run = one_shot_error(oracle, runs, metric=metric)
        assert mean == 0.0 and per_run.shape == (20,)

    rng = np.random.default_rng(0)
    errors = [one_shot_error(lambda x: rng.normal(size=(len(x), 16)), runs)[0] for _ in range(10)]
    assert abs(np.mean(errors) - 0.95) < 0.03

    # a wrong key (shifted answers) makes the oracle fail every item
    shifted = [run._replace(test_to_train_index=(run.test_to_train_index + 1) % 20) for run in runs]
    assert one_shot_error(oracle, shifted)[0] == 1.0


def test_one_shot_error_raw_pixels_better_than_chance(runs):
    # Lake et al. 2015 report raw-pixel nearest neighbour far from chance but far from human
    mean, _ = one_shot_error(lambda x: x.reshape(len(x), -1).astype(np.float64), runs)
    assert 0.5 < mean < 0.9


def test_one_shot_error_bad_arguments(runs):
    with pytest.raises(ValueError, match="^metric"):
        one_shot_error(lambda x: x.reshape(len(x), -1), runs, metric="manhattan")
    with pytest.raises(ValueError, match="^runs"):
        one_shot_error(lambda x: x.reshape(len(x), -1), [])
    with pytest.raises(ValueError, match="^embed_fn"):
        one_shot_error(lambda x: x.reshape(-1), runs)


def test_load_protocol(cache_dir, minimal_train, minimal_test):
    protocol = load_protocol("minimal", cache_dir=cache_dir)
    np.testing.assert_array_equal(protocol.train.images, minimal_train.images)
    np.testing.assert_array_equal(protocol.test.labels, minimal_test.labels)
    assert len(protocol.one_shot_runs) == 20
    with pytest.raises(ValueError, match="^name"):
        load_protocol("tiny")


@pytest.mark.parametrize("name", ["background_small1", "background_small2"])
def test_small_sets_are_the_upstream_png_bytes(name):
    """The small sets taken from the background archive hold exactly the PNG bytes of the upstream
    ``images_<name>.zip`` (digest recorded in small_sets.json from those zips before they were
    removed from the package)."""
    import hashlib
    import json

    from dmljax.data import omniglot

    recorded = json.loads((omniglot.default_data_dir() / "small_sets.json").read_text())["sets"][name]
    pngs = omniglot._read_pngs(omniglot._archive_path(omniglot.default_data_dir(), "images_background"))
    members = sorted(e[0] for e in omniglot._split_members(name, pngs))
    lines = "".join(f"{m.split('/', 1)[1]} {hashlib.sha256(pngs[m]).hexdigest()}\n" for m in members)
    assert len(members) == recorded["num_images"]
    assert hashlib.sha256(lines.encode()).hexdigest() == recorded["png_sha256_digest"]
    assert omniglot.small_set_characters(name) == recorded["characters"]


def test_upstream_zip_layout_is_read_too(tmp_path):
    """A data_dir holding upstream-style zips (directory entries included) loads the same split."""
    import zipfile

    from dmljax.data import omniglot

    pngs = omniglot._read_pngs(omniglot._archive_path(omniglot.default_data_dir(), "images_background"))
    members = [e[0] for e in omniglot._split_members("background_small1", pngs)][:60]
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as zf:
        zf.writestr("images_background/", b"")
        for m in members:
            zf.writestr(m, pngs[m])
    from_zip = load_omniglot("background_small1", data_dir=tmp_path, use_cache=False)
    shipped = load_omniglot("background_small1", use_cache=False)
    np.testing.assert_array_equal(from_zip.images, shipped.images[:60])
    assert from_zip.characters == shipped.characters[:3]
    with pytest.raises(FileNotFoundError, match="images_evaluation"):
        load_omniglot("evaluation", data_dir=tmp_path, use_cache=False)
