"""SOP / In-shop / ImageFolder loaders on tiny fake datasets written in each exact format."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dmljax.data.folders import decode_image, load_image_folder, load_inshop, load_sop
from dmljax.data.samplers import HierarchicalSampler


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37) % 256, (i * 91 + 40) % 256, (i * 13 + 200) % 256


def _write(path, colour, size=(9, 7), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _assert_colours(images, colour_ids, tol=0):
    for image, i in zip(images, colour_ids):
        np.testing.assert_allclose(image.reshape(-1, 3).astype(int), np.tile(_colour(i), (image[..., 0].size, 1)),
                                   atol=tol)


@pytest.fixture
def sop_root(tmp_path):
    """SOP layout: Ebay_{train,test}.txt with header, class ids 1.., super classes, category dirs."""
    rows = {"train": [], "test": []}
    supers = ["bicycle_final", "cabinet_final", "chair_final"]
    image_id = 0
    for class_id in range(1, 9):  # classes 1..5 train, 6..8 test (as in SOP: disjoint)
        split = "train" if class_id <= 5 else "test"
        super_id = (class_id - 1) % 3 + 1
        for k in range(class_id % 3 + 2):
            image_id += 1
            rel = f"{supers[super_id - 1]}/{100000 + class_id}_{k}.JPG"
            _write(tmp_path / rel, _colour(image_id), fmt="JPEG")
            rows[split].append((image_id, class_id, super_id, rel))
    for split, filename in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, r)) for r in rows[split]]
        (tmp_path / filename).write_text("\n".join(lines) + "\n")
    return tmp_path, rows


def test_sop(sop_root):
    root, rows = sop_root
    data = load_sop(root)
    for split in ("train", "test"):
        ds = data[split]
        expected_ids = [r[1] for r in rows[split]]
        assert len(ds) == len(rows[split])
        assert ds.class_ids == sorted(set(expected_ids))
        np.testing.assert_array_equal(np.asarray(ds.class_ids)[ds.labels], expected_ids)
        assert ds.labels.dtype == np.int32 and ds.labels.max() == ds.num_classes - 1
        assert ds.super_labels is not None and set(ds.super_labels.tolist()) <= {0, 1, 2}
        images, labels = ds.load([2, 0], image_size=5)
        assert images.shape == (2, 5, 5, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, ds.labels[[2, 0]])
        _assert_colours(images, [rows[split][2][0], rows[split][0][0]], tol=3)  # JPEG: near-exact
    # SOP labels drive the hierarchical sampler directly
    train = data["train"]
    sampler = HierarchicalSampler(train.labels, train.super_labels, super_classes_per_batch=2,
                                  classes_per_super_class=1, samples_per_class=2, seed=0)
    images, labels = train.load(sampler.batch_indices(3), image_size=4)
    assert images.shape == (4, 4, 4, 3) and len(set(labels.tolist())) == 2


def test_sop_bad_files(tmp_path, sop_root):
    root, _ = sop_root
    text = (root / "Ebay_train.txt").read_text().replace("image_id class_id", "id class")
    (root / "Ebay_train.txt").write_text(text)
    with pytest.raises(ValueError, match="^list_file"):
        load_sop(root)
    with pytest.raises(FileNotFoundError):
        load_sop(tmp_path / "missing")


def _write_inshop(root, *, nested=True, count_delta=0):
    image_root = root / "Img" if nested else root
    entries = []
    n = 0
    for item in range(1, 7):
        status_of = ["train"] * 3 if item <= 3 else ["query", "gallery", "gallery"]
        for k, status in enumerate(status_of):
            n += 1
            name = f"img/WOMEN/Dresses/id_{item:08d}/{k + 1:02d}_{k + 1}_front.jpg"
            _write(image_root / name, _colour(n))
            entries.append((name, f"id_{item:08d}", status, n))
    list_dir = root / "Eval" if nested else root
    list_dir.mkdir(parents=True, exist_ok=True)
    lines = [str(len(entries) + count_delta), "image_name item_id evaluation_status"]
    lines += [f"{e[0]} {e[1]} {e[2]}" for e in entries]
    (list_dir / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return entries


@pytest.mark.parametrize("nested", [True, False])
def test_inshop(tmp_path, nested):
    entries = _write_inshop(tmp_path, nested=nested)
    data = load_inshop(tmp_path)
    assert {k: len(v) for k, v in data.items()} == {"train": 9, "query": 3, "gallery": 6}
    assert data["train"].class_ids == ["id_00000001", "id_00000002", "id_00000003"]
    # query and gallery share one mapping: every query item has its gallery images under the same label
    assert data["query"].class_ids == data["gallery"].class_ids
    for status in ("train", "query", "gallery"):
        ds = data[status]
        mine = [e for e in entries if e[2] == status]
        np.testing.assert_array_equal(np.asarray(ds.class_ids)[ds.labels], [e[1] for e in mine])
        images, _ = ds.load(np.arange(len(ds)), image_size=3)
        _assert_colours(images, [e[3] for e in mine])
    assert set(data["query"].labels.tolist()) == set(data["gallery"].labels.tolist())


def test_inshop_bad_count(tmp_path):
    _write_inshop(tmp_path, count_delta=1)
    with pytest.raises(ValueError, match="^list_file"):
        load_inshop(tmp_path)


def test_image_folder_and_streaming(tmp_path):
    n = 0
    expected = []
    for name, count in (("zebra", 3), ("apple", 4), ("mango", 2)):
        for k in range(count):
            n += 1
            sub = "nested/" if k == 0 else ""
            _write(tmp_path / name / f"{sub}img{k}.png", _colour(n))
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    ds = load_image_folder(tmp_path)
    assert ds.class_ids == ["apple", "mango", "zebra"] and len(ds) == 9
    np.testing.assert_array_equal(np.bincount(ds.labels), [4, 2, 3])
    all_images, all_labels = ds.load(np.arange(len(ds)), image_size=4)
    # streaming in order reproduces load(); batches of 4 with a short last batch
    batches = list(ds.iterate(batch_size=4, image_size=4, num_workers=2, prefetch=1))
    assert [len(b[1]) for b in batches] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), all_images)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), all_labels)
    # shuffled streaming: a seeded permutation of the same items, dropping the remainder
    shuffled = list(ds.iterate(batch_size=4, image_size=4, shuffle=True, seed=1, drop_remainder=True))
    again = list(ds.iterate(batch_size=4, image_size=4, shuffle=True, seed=1, drop_remainder=True))
    assert len(shuffled) == 2
    for (x, y), (x2, y2) in zip(shuffled, again):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    got = np.concatenate([b[0] for b in shuffled]).reshape(8, -1)
    assert not np.array_equal(got, all_images[:8].reshape(8, -1))
    assert {row.tobytes() for row in got} <= {row.tobytes() for row in all_images.reshape(9, -1)}


def test_decode_center_crop(tmp_path):
    # 12 x 4 image: left third red, middle green, right third blue; the centre crop keeps green
    image = np.zeros((4, 12, 3), np.uint8)
    image[:, :4, 0] = 255
    image[:, 4:8, 1] = 255
    image[:, 8:, 2] = 255
    Image.fromarray(image).save(tmp_path / "wide.png")
    crop = decode_image(tmp_path / "wide.png", image_size=4, resize="center_crop")
    assert crop.shape == (4, 4, 3)
    np.testing.assert_array_equal(crop[..., 1], 255)
    stretched = decode_image(tmp_path / "wide.png", image_size=4)
    assert stretched[:, 0, 0].min() > 200 and stretched[:, -1, 2].min() > 200
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 5), 77).save(gray)
    np.testing.assert_array_equal(decode_image(gray, image_size=2), np.full((2, 2, 3), 77))


@pytest.mark.parametrize(
    "kwargs, name",
    [({"image_size": 0}, "image_size"), ({"indices": [99]}, "indices"), ({"resize": "pad"}, "resize"),
     ({"num_workers": 0}, "num_workers")],
)
def test_bad_arguments(tmp_path, kwargs, name):
    _write(tmp_path / "a" / "x.png", (1, 2, 3))
    ds = load_image_folder(tmp_path)
    args = {"indices": [0], "image_size": 4, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}"):
        ds.load(args.pop("indices"), **args)
    with pytest.raises(ValueError, match="^batch_size"):
        next(ds.iterate(batch_size=0, image_size=4))
    with pytest.raises(ValueError, match="^root"):
        load_image_folder(tmp_path / "a")
