"""Second-order attention, local branch and the global + local embedding model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.models.attention import (
    GlobalLocalEmbedding,
    SecondOrderAttention,
    global_local_hybrid_loss,
    second_order_attention,
)
from dmljax.losses.structured import hybrid_pair_proxy_loss


def np_second_order(features, weight, bias):
    n, h, w, c = features.shape
    maps, pooled = np.zeros((n, h, w)), np.zeros((n, c))
    for i in range(n):
        f = [features[i, y, x] for y in range(h) for x in range(w)]
        p = len(f)
        mu = sum(f) / p
        cov = np.zeros((c, c))
        for v in f:
            cov += np.outer(v - mu, v - mu)
        cov /= p
        logits = [float(weight @ (cov @ (v - mu)) / c + bias) for v in f]
        m = max(logits)
        e = [math.exp(l - m) for l in logits]
        a = [x / sum(e) for x in e]
        maps[i] = np.array(a).reshape(h, w)
        pooled[i] = sum(ai * v for ai, v in zip(a, f))
    return maps, pooled


def _fmap(seed=0, shape=(2, 3, 4, 5)):
    return np.random.default_rng(seed).normal(size=shape)


def test_matches_loop():
    f = _fmap()
    w, b = np.random.default_rng(1).normal(size=5) * 3, 0.3
    maps, pooled = second_order_attention(f, w, b)
    ref_maps, ref_pooled = np_second_order(f, w, b)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-6)
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-6)
    np.testing.assert_allclose(np.sum(maps, axis=(1, 2)), 1.0, rtol=1e-12)
    assert np.ptp(np.asarray(maps)) > 1e-3  # not uniform: the test can fail


def test_gradients_and_jit():
    f = _fmap(2, (1, 2, 3, 3))
    w = np.array([0.5, -1.0, 2.0])
    check_grads(lambda x, v: jnp.sum(second_order_attention(x, v, 0.1)[1] ** 2), (f, w), order=1, modes=["rev"])
    np.testing.assert_allclose(jax.jit(second_order_attention)(f, w, 0.1)[1], second_order_attention(f, w, 0.1)[1],
                               rtol=1e-12)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_constant_feature_maps_are_finite_and_uniform(fill):
    f = np.full((2, 2, 2, 3), fill)
    maps, pooled = second_order_attention(f, jnp.ones(3))
    np.testing.assert_allclose(maps, 0.25)
    g = jax.grad(lambda x: jnp.sum(second_order_attention(x, jnp.ones(3))[1]))(f)
    assert np.isfinite(np.asarray(g)).all()
    model = GlobalLocalEmbedding(3, 4, local_dim=3, rngs=nnx.Rngs(0))
    g = nnx.grad(lambda m: jnp.sum(jnp.concatenate(m(jnp.asarray(f)), axis=1)))(model)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


@given(st.integers(0, 10_000))
def test_spatial_permutation(seed):
    """Positions form a set: permuting them permutes the map and leaves the embeddings unchanged."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(2, 3, 3, 4))
    perm = rng.permutation(9)
    fp = f.reshape(2, 9, 4)[:, perm].reshape(2, 3, 3, 4)
    w = rng.normal(size=4)
    maps, pooled = second_order_attention(f, w, 0.0)
    maps_p, pooled_p = second_order_attention(fp, w, 0.0)
    np.testing.assert_allclose(np.asarray(maps).reshape(2, 9)[:, perm], np.asarray(maps_p).reshape(2, 9), rtol=1e-9)
    np.testing.assert_allclose(pooled_p, pooled, rtol=1e-9, atol=1e-12)


def test_model_shapes_and_norms():
    model = GlobalLocalEmbedding(5, 8, local_dim=6, local_embedding_dim=4, rngs=nnx.Rngs(0))
    x = jnp.asarray(_fmap(3, (3, 4, 4, 5)))
    g, l = model(x)
    assert g.shape == (3, 8) and l.shape == (3, 4)
    np.testing.assert_allclose(jnp.linalg.norm(g, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(l, axis=1), 1.0, rtol=1e-6)
    assert model.attention_map(x).shape == (3, 4, 4)
    assert model.retrieval_embedding(x).shape == (3, 12)
    assert isinstance(model.attention, SecondOrderAttention)
    backbone = nnx.Conv(1, 5, kernel_size=(3, 3), strides=2, rngs=nnx.Rngs(1))
    with_backbone = GlobalLocalEmbedding(5, 8, local_dim=6, backbone=backbone, rngs=nnx.Rngs(0))
    assert with_backbone(jnp.ones((2, 8, 8, 1)))[0].shape == (2, 8)


@pytest.mark.slow  # 7-16 s; the suite's 10-minute budget (covered by faster unit tests): -m slow
def test_hybrid_loss_is_the_sum_of_two_hybrid_terms_and_training_reduces_it():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(4), 4).astype(np.int32)
    centres = rng.normal(size=(4, 1, 1, 6))
    x = jnp.asarray(centres[labels] + 0.5 * rng.normal(size=(16, 3, 3, 6)))
    model = GlobalLocalEmbedding(6, 8, local_dim=8, rngs=nnx.Rngs(0))
    gp = jnp.asarray(rng.normal(size=(4, 8)))
    lp = jnp.asarray(rng.normal(size=(4, 8)))
    g, l = model(x)
    want = hybrid_pair_proxy_loss(g, labels, gp) + 0.5 * hybrid_pair_proxy_loss(l, labels, lp)
    np.testing.assert_allclose(global_local_hybrid_loss(g, l, labels, gp, lp, local_weight=0.5), want, rtol=1e-9)

    proxies = nnx.Param(jnp.stack([gp, lp]))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, proxies):
        def loss_fn(m):
            g, l = m(x)
            return global_local_hybrid_loss(g, l, labels, proxies[0], proxies[1])
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    first = float(step(model, opt, proxies[...]))
    for _ in range(40):
        last = float(step(model, opt, proxies[...]))
    assert np.isfinite(last) and last < 0.7 * first, (first, last)


def test_bad_input():
    with pytest.raises(ValueError, match="^features must have rank 4"):
        second_order_attention(np.zeros((2, 3, 4)), np.zeros(4))
    with pytest.raises(ValueError, match="^weight must have shape"):
        second_order_attention(np.zeros((1, 2, 2, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="^features must be a floating"):
        second_order_attention(np.zeros((1, 2, 2, 3), np.int32), np.zeros(3))
    model = GlobalLocalEmbedding(5, 8, local_dim=6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^features must have 5 channels"):
        model(jnp.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="^local_weight"):
        global_local_hybrid_loss(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(2, np.int32), np.zeros((1, 2)),
                                 np.zeros((1, 2)), local_weight=-1.0)
