"""CUB end to end on TFDS mock data: data source -> tiny ResNet -> 2 train steps -> DML metrics.

Also the pieces of experiments/data_sources.py: input normalisation, pretrained-weight loading,
lazily decoded image folders, augmentation preset and config validation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmljax.data import sources
from dmljax.train import builders
from dmljax.train import evaluation
from dmljax.train import models
from dmljax.configs import get_config

EMBEDDING_DIM = 8


def _tiny_config(**data):
    """The real CUB config, shrunk: 40 px stored, 32 px crops, ResNet-18 layout with 1 block per
    stage and width 8, 8-d embedding."""
    c = get_config("cub200_resnet50")
    c.data.image_size, c.data.crop_size = 40, 32
    for k, v in data.items():
        c.data[k] = v
    c.model.backbone = "resnet18"
    c.model.width = 8
    c.model.layers = (1, 1, 1, 1)
    c.model.embedding_dim = EMBEDDING_DIM
    return c


def _normalised(images_uint8, lo, hi):
    """Independent reference of the eval transform when the centre crop is a whole-pixel window."""
    x = images_uint8[:, lo:hi, lo:hi].astype(np.float64) / 255.0
    return (x - np.array(models.IMAGENET_MEAN)) / np.array(models.IMAGENET_STD)


@pytest.fixture(scope="module")
def cub_source():
    pytest.importorskip("tensorflow", reason="tensorflow (tensorflow-cpu) is needed for TFDS loading")
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=16):
        return sources.load_data_source(_tiny_config())


def test_cub_mock_source_layout(cub_source):
    src = cub_source
    assert src.name == "tfds:caltech_birds2011" and src.channels == 3
    assert src.num_classes == 100  # the split's class count, not max(label) + 1 of the mock data
    assert src.train_images.dtype == np.uint8 and src.train_images.shape[1:] == (40, 40, 3)
    assert src.eval_set.query_images.shape[1:] == (40, 40, 3)
    assert src.train_labels.dtype == np.int32 and len(src.train_labels) == len(src.train_images)
    assert 0 <= src.train_labels.min() and src.train_labels.max() < 100
    assert 0 <= src.eval_set.query_labels.min() and src.eval_set.query_labels.max() < 100
    assert len(src.train_labels) + len(src.eval_set.query_labels) == 32  # 16 mock examples x 2 TFDS splits
    assert src.eval_set.gallery_images is None and src.eval_set.ks == (1, 2, 4, 8)


def test_cub_mock_train_two_steps_and_evaluate(cub_source):
    from dmljax.data.samplers import MPerClassSampler
    from dmljax.losses.proxy import proxy_anchor_loss
    from dmljax.metrics.report import evaluate
    from dmljax.train.optim import make_optimizer
    from dmljax.train.state import create_train_state
    from dmljax.train.step import train_step

    src, c = cub_source, _tiny_config()
    model = models.build_model(c, 0)
    proxies = jax.random.normal(jax.random.key(1), (src.num_classes, EMBEDDING_DIM), jnp.float32)
    o = c.optim
    tx = make_optimizer(learning_rate=o.learning_rate, total_steps=2, loss_lr_mult=o.loss_lr_mult,
                        weight_decay=o.weight_decay, optimizer=o.optimizer)
    loss_fn = functools.partial(proxy_anchor_loss, **c.loss.options)
    state = create_train_state(model, tx, loss_fn, (proxies,), augment_fn=builders.build_augment(c),
                               freeze_batch_norm=o.freeze_batch_norm)
    initial = state
    sampler = MPerClassSampler(src.train_labels, classes_per_batch=4, samples_per_class=2, seed=0)
    step_fn = jax.jit(train_step)
    for step in range(2):
        idx = sampler.batch_indices(step)
        batch = {"images": src.train_images[idx], "labels": src.train_labels[idx]}
        state, metrics = step_fn(state, batch, jax.random.key(step))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    assert int(state.step) == 2
    moved = lambda a, b: any(float(jnp.max(jnp.abs(x - y))) > 0 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert moved(state.params["model"]["backbone"], initial.params["model"]["backbone"])
    assert moved(state.params["loss"], initial.params["loss"])
    # BN frozen (Proxy-Anchor's --bn-freeze 1): running statistics untouched by training
    assert not moved(state.batch_stats, initial.batch_stats)

    kept: dict = {}
    result = evaluation.evaluate(state, src, with_nmi=True, batch_size=8, keep=kept)
    for name in ("recall@1", "recall@8", "map_at_r", "r_precision", "nmi"):
        assert 0.0 <= result[name] <= 1.0, (name, result[name])
    assert not any(k.startswith("ndcg") for k in result) and "one_shot_error" not in result
    assert result["num_queries"] == len(src.eval_set.query_labels) and kept["step"] == 2

    # the evaluated embeddings are the trained model's on independently normalised images
    # (stored 40 px, centre crop 32/40 = the pixel window [4, 36), ImageNet statistics), and the
    # metrics are dmljax.metrics.evaluate's on them. (TFDS mock data repeats each test image
    # twice, so the mock recalls are 1 for any deterministic embedding: compare embeddings.)
    trained = nnx.merge(state.graphdef, state.params["model"], state.batch_stats)
    trained.eval()
    x = jnp.asarray(_normalised(src.eval_set.query_images, 4, 36), jnp.float32)
    emb = np.asarray(trained.head(trained.backbone.net(x)))
    np.testing.assert_allclose(kept["embeddings"], emb, rtol=1e-4, atol=1e-5)
    assert np.std(emb, axis=0).max() > 1e-3  # not collapsed: the comparison means something
    expected = evaluate(emb, src.eval_set.query_labels, ks=(1, 2, 4, 8), clustering=False)
    for name in ("recall@1", "recall@2", "recall@4", "recall@8", "map_at_r"):
        assert result[name] == pytest.approx(expected[name], abs=1e-6), name


class _MeanPool(nnx.Module):
    """Stand-in backbone: the per-channel mean of what it receives, so inputs can be inspected."""

    feature_dim = 3

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize("caffe", [False, True])
def test_image_input_normalisation(caffe):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    if caffe:  # BN-Inception: BGR in [0, 255] minus (104, 117, 128)
        layer = models.ImageInput(_MeanPool(), crop_size=32, eval_crop_fraction=0.8, mean=models.CAFFE_BGR_MEAN,
                              std=(1.0, 1.0, 1.0), scale=255.0, bgr=True)
        window = images[:, 4:36, 4:36, ::-1].astype(np.float64)
        expected = (window - np.array(models.CAFFE_BGR_MEAN)).mean(axis=(1, 2))
    else:
        layer = models.ImageInput(_MeanPool(), crop_size=32, eval_crop_fraction=0.8)
        expected = _normalised(images, 4, 36).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(images))), expected, rtol=1e-4, atol=1e-4)
    # training input (float in [0, 1], already at the crop size) is normalised the same way
    crops = jnp.asarray(images[:, 4:36, 4:36], jnp.float32) / 255.0
    np.testing.assert_allclose(np.asarray(layer(crops)), expected, rtol=1e-4, atol=1e-4)


def _torch_state_dict(net) -> dict[str, np.ndarray]:
    """Our ResNet's variables under torchvision names and layouts (the inverse of the converter)."""
    names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(net, nnx.Any(nnx.Param, nnx.BatchStat))):
        *prefix, leaf = [str(p) for p in path]
        value = np.asarray(var.get_value())
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1)  # [kh, kw, I, O] -> torch [O, I, kh, kw]
        out[".".join(prefix + [names[leaf]])] = value
    return out


def test_pretrained_state_dict_is_loaded(tmp_path):
    c = _tiny_config()
    source = models.build_backbone(c, rngs=nnx.Rngs(1)).net
    for path, var in nnx.to_flat_state(nnx.state(source, nnx.BatchStat)):  # non-trivial BN statistics
        var.set_value(var.get_value() + 0.25)
    state_dict = _torch_state_dict(source)
    state_dict["fc.weight"] = np.zeros((10, 64), np.float32)  # classifier entries are ignored
    file = tmp_path / "weights.npz"
    np.savez(file, **state_dict)

    c.model.pretrained_path = str(file)
    loaded = models.build_backbone(c, rngs=nnx.Rngs(2)).net
    fresh = models.build_backbone(_tiny_config(), rngs=nnx.Rngs(2)).net
    want = jax.tree.leaves(nnx.state(source, nnx.Any(nnx.Param, nnx.BatchStat)))
    got = jax.tree.leaves(nnx.state(loaded, nnx.Any(nnx.Param, nnx.BatchStat)))
    other = jax.tree.leaves(nnx.state(fresh, nnx.Any(nnx.Param, nnx.BatchStat)))
    assert len(want) == len(got) > 0
    for a, b in zip(want, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(want, other))

    del state_dict["conv1.weight"]
    np.savez(file, **state_dict)
    with pytest.raises(ValueError, match="conv1.weight"):
        models.build_backbone(c, rngs=nnx.Rngs(2))


def test_folder_source_decodes_lazily(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", ("ant", "bee", "cat")), ("test", ("dog", "eel"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    c = _tiny_config(name="folder", root=str(tmp_path), image_size=16, crop_size=16)
    src = sources.load_data_source(c)
    assert isinstance(src.train_images, sources.LazyImages) and src.num_classes == 3
    assert src.train_images.shape == (9, 16, 16, 3) and len(src.eval_set.query_labels) == 6
    np.testing.assert_array_equal(src.train_labels, np.repeat(np.arange(3), 3))
    picked = src.train_images[np.array([7, 0, 4])]
    with Image.open(tmp_path / "train" / "cat" / "1.png") as im:
        expected = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    assert picked.dtype == np.uint8 and picked.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(picked[0], expected)
    np.testing.assert_array_equal(src.train_images[6:9][1], expected)
    assert src.train_images[6:9] is src.train_images[6:9]  # a repeated slice is decoded once
    np.testing.assert_array_equal(src.train_images[-3:][1], expected)
    np.testing.assert_array_equal(src.train_images[7], expected)


def test_imagenet_augmentation_preset():
    c = _tiny_config()
    augment_fn = jax.jit(builders.build_augment(c))
    images = np.random.default_rng(0).integers(0, 256, size=(4, 40, 40, 3), dtype=np.uint8)
    out = np.asarray(augment_fn(jnp.asarray(images), jax.random.key(0)))
    # crop size, still in [0, 1]: normalisation is left to ImageInput
    assert out.shape == (4, 32, 32, 3) and out.min() >= 0.0 and out.max() <= 1.0
    again = np.asarray(augment_fn(jnp.asarray(images), jax.random.key(0)))
    np.testing.assert_array_equal(out, again)
    c.augment.enabled = False
    assert builders.build_augment(c) is None


@pytest.mark.parametrize(
    "section, key, value, name",
    [
        ("data", "name", "imagenet", "data.name"),
        ("data", "name", "tfds:mnist", "data.name"),
        ("data", "name", "sop:extra", "data.name"),
        ("data", "name", "sop", "data.root"),
        ("data", "crop_size", 64, "data.crop_size"),
        ("model", "backbone", "vgg16", "model.backbone"),
        ("model", "dtype", "float16", "model.dtype"),
        ("augment", "preset", "autoaugment", "augment.preset"),
    ],
)
def test_bad_config(section, key, value, name):
    c = _tiny_config()
    c[section][key] = value
    with pytest.raises(ValueError, match=f"^{name}"):
        if section == "data" and key != "crop_size":
            sources.load_data_source(c)
        elif section == "augment":
            builders.build_augment(c)
        else:
            models.build_backbone(c, rngs=nnx.Rngs(0))


def test_bfloat16_option_computes_in_bf16_with_float32_parameters():
    c = _tiny_config()
    c.model.dtype = "bfloat16"
    backbone = models.build_backbone(c, rngs=nnx.Rngs(0))
    convs = [m for _, m in nnx.iter_modules(backbone) if isinstance(m, nnx.Conv)]
    assert convs and all(m.dtype == jnp.bfloat16 for m in convs)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(backbone, nnx.Param)))
    # the normalised input reaches the network in bf16 (normalisation itself in float32)
    layer = models.ImageInput(_MeanPool(), crop_size=8, dtype=jnp.bfloat16)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    out = layer(jnp.asarray(images))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), _normalised(images, 0, 8).mean(axis=(1, 2)),
                               rtol=2e-2, atol=2e-2)


def _write_png(path, rng):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("kind", ["sop", "inshop"])
def test_sop_and_inshop_sources_from_list_files(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "sop":
        for split, products in (("train", (5, 9)), ("test", (11, 12, 13))):
            lines = ["image_id class_id super_class_id path"]
            for i, product in enumerate(products):
                for j in range(2):
                    rel = f"bike_final/{product}_{j}.JPG"
                    _write_png(tmp_path / rel, rng)
                    lines.append(f"{2 * i + j + 1} {product} 1 {rel}")
            (tmp_path / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    else:
        rows = [("id_01", "train"), ("id_01", "train"), ("id_02", "train"), ("id_03", "query"),
                ("id_03", "gallery"), ("id_04", "query"), ("id_04", "gallery"), ("id_04", "gallery")]
        lines = [str(len(rows)), "image_name item_id evaluation_status"]
        for i, (item, status) in enumerate(rows):
            rel = f"img/WOMEN/Tees/{item}/{i}_front.jpg"
            _write_png(tmp_path / rel, rng)
            lines.append(f"{rel} {item} {status}")
        (tmp_path / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    c = _tiny_config(name=kind, root=str(tmp_path), image_size=8, crop_size=8)
    c.data.eval_ks = (1, 2)
    src = sources.load_data_source(c)
    e = src.eval_set
    assert src.num_classes == 2 and src.channels == 3 and e.ks == (1, 2)
    assert src.train_images[np.arange(len(src.train_labels))].shape == (len(src.train_labels), 8, 8, 3)
    if kind == "sop":
        assert e.gallery_images is None and len(e.query_labels) == 6 and e.num_classes == 3
    else:  # query vs gallery with one item-id mapping
        np.testing.assert_array_equal(e.query_labels, [0, 1])
        np.testing.assert_array_equal(e.gallery_labels, [0, 1, 1])
        assert e.gallery_images[np.arange(3)].shape == (3, 8, 8, 3)
