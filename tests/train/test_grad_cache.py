"""Gradient caching == direct gradients (ResNet-18 and the conv-net; pair, proxy and mined triplet
losses; one device and 8 fake CPU devices, tests/conftest.py forces them)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dmljax.losses.pair import contrastive_loss
from dmljax.losses.proxy import proxy_anchor_loss
from dmljax.losses.triplet import triplet_margin_loss
from dmljax.models.heads import EmbeddingHead, EmbeddingModel
from dmljax.models.resnet import ResNet
from dmljax.train.grad_cache import (
    grad_cache_train_step,
    grad_cache_value_and_grad,
    make_parallel_grad_cache_train_step,
    state_embed_fn,
)
from dmljax.train.state import create_train_state
from dmljax.train.step import data_mesh, make_parallel_train_step, train_step
from dmljax.train.toy import tiny_model, toy_images
from tests.utils import max_tree_diff

NUM_CLASSES = 4
DIM = 8
NUM_DEVICES = 8


def _loss(name):
    if name == "contrastive":
        return functools.partial(contrastive_loss, neg_margin=1.2), ()
    if name == "proxy_anchor":
        return proxy_anchor_loss, (jax.random.normal(jax.random.key(3), (NUM_CLASSES, DIM)),)
    return functools.partial(triplet_margin_loss, mining="batch_hard", margin=0.5, reduction="mean"), ()


def _model(name):
    rngs = nnx.Rngs(0)
    if name == "convnet":
        return tiny_model(0, channels=(4, 8), embedding_dim=DIM, head_norm="batch")
    backbone = ResNet(block="basic", layers=(2, 2, 2, 2), width=4, in_channels=1, small_input=True, rngs=rngs)
    return EmbeddingModel(backbone, EmbeddingHead(backbone.feature_dim, DIM, norm="batch", rngs=rngs))


def _images(model_name, n=16, seed=0, size=None):
    size = size or (8 if model_name == "convnet" else 32)
    images, labels = toy_images(seed, num_classes=NUM_CLASSES, per_class=n // NUM_CLASSES, size=size)
    perm = np.random.default_rng(seed).permutation(n)
    return jnp.asarray(images[perm]), jnp.asarray(labels[perm])


def _state(model_name, loss_name, *, freeze):
    loss_fn, loss_params = _loss(loss_name)
    return create_train_state(_model(model_name), optax.sgd(0.1), loss_fn, loss_params, freeze_batch_norm=freeze)


def _direct(state, images, labels, chunk_size=None):
    """jax.grad of the loss on the whole batch; with chunk_size, of the model that embeds per chunk."""
    embed_fn = state_embed_fn(state, train=True)

    def objective(trainable):
        if chunk_size is None:
            emb = embed_fn(trainable["model"], images)[0]
        else:
            emb = jnp.concatenate([embed_fn(trainable["model"], images[i:i + chunk_size])[0]
                                   for i in range(0, len(images), chunk_size)])
        return state.loss_fn(emb, labels, *trainable["loss"])

    return jax.jit(jax.value_and_grad(objective))(state.params)


def _cached(state, images, labels, chunk_size, unroll=1):
    fn = jax.jit(lambda p, lp, x, y: grad_cache_value_and_grad(
        state_embed_fn(state, train=True), state.loss_fn, p, lp, x, y, chunk_size=chunk_size, unroll=unroll))
    loss, _, (gm, gl), _, _ = fn(state.params["model"], state.params["loss"], images, labels)
    return loss, {"model": gm, "loss": gl}


def _assert_close(a, b, scale_tree):
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(scale_tree))
    assert scale > 1e-6, "reference gradient is zero: the test could not fail"
    assert max_tree_diff(a, b) <= 2e-5 * max(scale, 1.0), max_tree_diff(a, b)  # float32 models


LOSSES = ["contrastive", "proxy_anchor", "batch_hard_triplet"]
# ResNet-18 at 32 px takes 10-35 s per case on 2 CPU cores (compilation): `-m slow` runs them;
# test_resnet18_small_input is a cheaper ResNet-18 case (16 px, 8 images; ~20-45 s, also slow).
MODELS = ["convnet", pytest.param("resnet18", marks=pytest.mark.slow)]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_frozen_bn_equals_full_batch_gradient(model_name, loss_name):
    state = _state(model_name, loss_name, freeze=True)
    images, labels = _images(model_name)
    loss, grads = _direct(state, images, labels)
    c_loss, c_grads = _cached(state, images, labels, chunk_size=4)
    np.testing.assert_allclose(c_loss, loss, rtol=2e-5)
    _assert_close(c_grads, grads, grads)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_train_mode_bn_equals_gradient_of_per_chunk_model(model_name, loss_name):
    state = _state(model_name, loss_name, freeze=False)
    images, labels = _images(model_name)
    loss, grads = _direct(state, images, labels, chunk_size=8)
    c_loss, c_grads = _cached(state, images, labels, chunk_size=8)
    np.testing.assert_allclose(c_loss, loss, rtol=2e-5)
    _assert_close(c_grads, grads, grads)


@pytest.mark.slow
def test_resnet18_small_input():
    """ResNet-18 (16 px, 8 images), BN in train mode, mined triplets: cached == per-chunk-model gradient."""
    state = _state("resnet18", "batch_hard_triplet", freeze=False)
    images, labels = _images("resnet18", n=8, size=16)
    loss, grads = _direct(state, images, labels, chunk_size=4)
    c_loss, c_grads = _cached(state, images, labels, chunk_size=4)
    np.testing.assert_allclose(c_loss, loss, rtol=2e-5)
    _assert_close(c_grads, grads, grads)


def test_train_mode_bn_one_chunk_equals_full_batch_and_chunks_differ():
    state = _state("convnet", "contrastive", freeze=False)
    images, labels = _images("convnet")
    _, grads = _direct(state, images, labels)
    _, one = _cached(state, images, labels, chunk_size=16)
    _assert_close(one, grads, grads)
    _, four = _cached(state, images, labels, chunk_size=4)
    assert max_tree_diff(four, grads) > 1e-6  # per-chunk BN statistics: a different model (documented)


def test_unrolled_loops_give_the_same_gradient():
    state = _state("convnet", "batch_hard_triplet", freeze=False)
    images, labels = _images("convnet")
    _, grads = _direct(state, images, labels, chunk_size=4)
    _, unrolled = _cached(state, images, labels, chunk_size=4, unroll=True)
    _assert_close(unrolled, grads, grads)


def test_batch_stats_are_mean_of_chunk_updates():
    state = _state("convnet", "contrastive", freeze=False)
    images, labels = _images("convnet")
    embed_fn = state_embed_fn(state, train=True)
    _, stats, _, _, _ = grad_cache_value_and_grad(embed_fn, state.loss_fn, state.params["model"], (), images,
                                                  labels, chunk_size=8)
    parts = [embed_fn(state.params["model"], images[i:i + 8])[1] for i in (0, 8)]
    expected = jax.tree.map(lambda a, b: (a + b) / 2, *parts)
    assert max_tree_diff(stats, expected) < 1e-6
    assert max_tree_diff(stats, state.batch_stats) > 1e-6


def test_train_step_frozen_bn_equals_train_step():
    state = _state("convnet", "proxy_anchor", freeze=True)
    images, labels = _images("convnet")
    batch = {"images": images, "labels": labels}
    key = jax.random.key(0)
    ref, ref_m = jax.jit(train_step)(state, batch, key)
    got, got_m = jax.jit(functools.partial(grad_cache_train_step, chunk_size=4))(state, batch, key)
    assert max_tree_diff(got.params, ref.params) < 2e-5
    for name in ("loss", "pos_dist", "neg_dist", "active_fraction", "grad_norm"):
        np.testing.assert_allclose(got_m[name], ref_m[name], rtol=2e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= NUM_DEVICES, "tests/conftest.py must force 8 host devices"
    return data_mesh(jax.devices()[:NUM_DEVICES])


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_eight_devices_equal_single_device_full_batch(mesh, model_name, loss_name):
    """Frozen BN: the sharded gradient-cached gradient == jax.grad on the global batch on one device."""
    state = _state(model_name, loss_name, freeze=True)
    images, labels = _images(model_name)
    loss, grads = _direct(state, images, labels)
    embed_fn = state_embed_fn(state, train=True)

    def body(p, lp, x, y):
        loss, _, (gm, gl), _, _ = grad_cache_value_and_grad(embed_fn, state.loss_fn, p, lp, x, y, chunk_size=1,
                                                            axis_name="data")
        return loss, {"model": gm, "loss": gl}

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
    c_loss, c_grads = fn(state.params["model"], state.params["loss"], images, labels)
    np.testing.assert_allclose(c_loss, loss, rtol=2e-5)
    _assert_close(c_grads, grads, grads)


def test_parallel_train_step_equals_parallel_step_and_single_device(mesh):
    """Sync BN in train mode with one chunk per device == make_parallel_train_step; frozen BN with
    chunks == train_step on the global batch."""
    images, labels = _images("convnet")
    batch = {"images": images, "labels": labels}
    key = jax.random.key(1)
    state = _state("convnet", "proxy_anchor", freeze=False)
    ref, _ = make_parallel_train_step(mesh)(state, batch, key)
    got, _ = make_parallel_grad_cache_train_step(mesh, chunk_size=2)(state, batch, key)
    assert max_tree_diff(got.params, ref.params) < 2e-5
    assert max_tree_diff(got.batch_stats, ref.batch_stats) < 2e-5
    frozen = _state("convnet", "batch_hard_triplet", freeze=True)
    ref, ref_m = jax.jit(train_step)(frozen, batch, key)
    got, got_m = make_parallel_grad_cache_train_step(mesh, chunk_size=1)(frozen, batch, key)
    assert max_tree_diff(got.params, ref.params) < 2e-5
    np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=2e-5)


def test_bad_arguments():
    state = _state("convnet", "contrastive", freeze=True)
    images, labels = _images("convnet")
    embed_fn = state_embed_fn(state)
    p = state.params["model"]
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_value_and_grad(embed_fn, state.loss_fn, p, (), images, labels, chunk_size=5)
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_value_and_grad(embed_fn, state.loss_fn, p, (), images, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        grad_cache_value_and_grad(embed_fn, state.loss_fn, p, (), images, labels[:3], chunk_size=4)
    with pytest.raises(ValueError, match="loss_params"):
        grad_cache_value_and_grad(embed_fn, state.loss_fn, p, [], images, labels, chunk_size=4)
