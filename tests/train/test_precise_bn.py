"""PreciseBN (dmljax.train.precise_bn) against a numpy forward pass of a 2-block conv-net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmljax.models.convnet import ConvNet
from dmljax.models.heads import EmbeddingHead, EmbeddingModel
from dmljax.train.optim import make_optimizer
from dmljax.train.precise_bn import precise_batch_norm
from dmljax.train.state import create_train_state
from dmljax.train.toy import toy_images


def _state(*, freeze=False):
    backbone = ConvNet(1, (3, 4), num_pools=0, rngs=nnx.Rngs(0))
    model = EmbeddingModel(backbone, EmbeddingHead(4, 2, norm="batch", rngs=nnx.Rngs(1)))
    tx = make_optimizer(learning_rate=0.01, total_steps=10)
    return create_train_state(model, tx, lambda e, y: e.sum(), freeze_batch_norm=freeze)


def _conv_numpy(x, w):
    """3x3 SAME convolution, NHWC x HWIO, plain loops over the kernel taps."""
    n, h, wd, _ = x.shape
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, wd, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += pad[:, i:i + h, j:j + wd, :] @ w[i, j]
    return out


def _reference_stats(state, batches):
    """Per-layer mean over batches of the batch mean / biased variance, train-mode forward in numpy."""
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params["model"]))
    eps = 1e-5
    sums = {}
    for x in batches:
        h = x.astype(np.float64) / 255.0
        for layer in range(2):
            z = _conv_numpy(h, p["backbone"]["convs"][layer]["kernel"])
            mu, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
            sums.setdefault(("conv", layer), []).append((mu, var))
            norm = p["backbone"]["norms"][layer]
            h = np.maximum((z - mu) / np.sqrt(var + eps) * norm["scale"] + norm["bias"], 0)
        feat = h.mean(axis=(1, 2))
        z = feat @ p["head"]["linear"]["kernel"] + p["head"]["linear"].get("bias", 0)
        sums.setdefault(("head", 0), []).append((z.mean(0), z.var(0)))
    return {k: (np.mean([m for m, _ in v], 0), np.mean([s for _, s in v], 0)) for k, v in sums.items()}


def test_statistics_match_a_numpy_forward_pass():
    state = _state()
    images = toy_images(0, num_classes=4, per_class=10, size=6)[0]  # 40 images
    key = jax.random.key(3)
    new = precise_batch_norm(state, images, key=key, num_batches=3, batch_size=8)
    order = np.asarray(jax.random.permutation(key, len(images)))[:24]
    ref = _reference_stats(state, [images[np.sort(order[i * 8:(i + 1) * 8])] for i in range(3)])
    stats = nnx.to_pure_dict(new.batch_stats)
    for layer in range(2):
        got = stats["backbone"]["norms"][layer]
        np.testing.assert_allclose(got["mean"], ref[("conv", layer)][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["var"], ref[("conv", layer)][1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["head"]["norm"]["mean"], ref[("head", 0)][0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["head"]["norm"]["var"], ref[("head", 0)][1], rtol=1e-4, atol=1e-6)
    # only the statistics change
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.step)),
                    jax.tree.leaves((new.params, new.opt_state, new.step))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batches_are_capped_by_the_images_and_deterministic():
    state = _state()
    images = toy_images(1, num_classes=2, per_class=10, size=6)[0]  # 20 images: 2 full batches of 8
    a = precise_batch_norm(state, images, key=jax.random.key(0), num_batches=50, batch_size=8)
    b = precise_batch_norm(state, images, key=jax.random.key(0), num_batches=2, batch_size=8)
    for x, y in zip(jax.tree.leaves(a.batch_stats), jax.tree.leaves(b.batch_stats)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_constant_images_give_finite_statistics_and_embeddings():
    from dmljax.train.step import embed

    state = precise_batch_norm(_state(), np.zeros((16, 6, 6, 1), np.uint8), key=jax.random.key(0),
                               num_batches=2, batch_size=8)
    assert all(np.isfinite(np.asarray(s)).all() for s in jax.tree.leaves(state.batch_stats))
    assert np.isfinite(embed(state, np.zeros((4, 6, 6, 1), np.uint8))).all()


def test_frozen_batch_norm_is_left_alone():
    state = _state(freeze=True)
    assert precise_batch_norm(state, np.zeros((16, 6, 6, 1), np.uint8), key=jax.random.key(0),
                              num_batches=2, batch_size=8) is state


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_batches=0), "num_batches"), (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.0), "batch_size"), (dict(batch_size=100), "batch_size"),
    (dict(images=np.zeros((16, 6, 6), np.uint8)), "images"), (dict(key=None), "key"),
])
def test_bad_arguments_raise(kwargs, name):
    args = dict(images=np.zeros((16, 6, 6, 1), np.uint8), key=jax.random.key(0), num_batches=2, batch_size=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}"):
        precise_batch_norm(_state(), args.pop("images"), **args)
