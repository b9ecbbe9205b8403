"""Each method wired into a jitted train step of a toy linear embedding (how the trainer uses them).

Data: 4 Gaussian classes in 8-d; model: W [8, 4], embeddings l2_normalize(x @ W); optimiser Adam.
Every step function is pure (method state in, method state out) and compiled once; the test checks
the loss is finite and the held-out nearest-neighbour accuracy is high after a few steps.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dmljax.distances import l2_normalize
from dmljax.losses.triplet import triplet_margin_loss
from dmljax.losses.weighted import multi_similarity_loss
from dmljax.methods import (HardNegativeGenerator, alternating_projection_regularizer, bspml_sample_weights,
                            daml_generator_loss, daml_triplet_loss, das_augment, das_init, das_update,
                            divide_and_conquer_loss, iaa_init, iaa_synthesize, iaa_update, projection_targets,
                            sample_triplets, weighted_multi_similarity_loss)

C, F, D, B, STEPS = 4, 8, 4, 16, 40


def _data(seed):
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.normal(size=(C, F))
    y = np.repeat(np.arange(C), B // C).astype(np.int32)
    return (means[y] + rng.normal(size=(B, F))).astype(np.float32), y, means


def _embed(w, x):
    return l2_normalize(x @ w)


_ms = functools.partial(multi_similarity_loss, mining=False)


def _objective(method):
    """(loss(w, extra, x, y, key) -> (scalar, new_extra), initial extra state)."""
    if method == "none":
        return lambda w, s, x, y, k: (_ms(_embed(w, x), y), s), ()
    if method == "das":
        def f(w, s, x, y, k):
            e = _embed(w, x)
            s = das_update(s, e, y, k)  # record first, then produce (the authors' order)
            ex, ey = das_augment(s, e, y, jax.random.fold_in(k, 1))
            return _ms(ex, ey), s
        return f, das_init(C, D)
    if method == "iaa":
        def f(w, s, x, y, k):
            e = _embed(w, x)
            s = iaa_update(s, e, y)
            sx, sy = iaa_synthesize(k, e, y, s.variance, strength=0.8, num_augment=2)
            return _ms(jnp.concatenate([e, sx]), jnp.concatenate([y, sy])), s
        return f, iaa_init(C, D)
    if method == "bspml":
        def f(w, s, x, y, k):
            e = _embed(w, x)
            v = bspml_sample_weights(e, y, age=0.5)  # weights block: no gradient
            return weighted_multi_similarity_loss(e, y, v, mining=False), s
        return f, ()
    if method == "alternating_projection":
        reps = jnp.arange(B) % (B // C) < 2

        def f(w, s, x, y, k):
            targets, step = s
            e = _embed(w, x)
            targets = projection_targets(targets, e, step, repeat=5)
            loss = _ms(e, y) + alternating_projection_regularizer(e, targets, reps, weight=0.1)
            return loss, (targets, step + 1)
        return f, (jnp.zeros((B, D)), jnp.zeros((), jnp.int32))
    if method == "divide_conquer":
        loss = functools.partial(triplet_margin_loss, margin=0.2, reduction="mean")
        ids = jnp.asarray(np.arange(B) % 2, jnp.int32)  # stand-in for k-means cluster ids
        return (lambda w, s, x, y, k: (divide_and_conquer_loss(x @ w, y, ids, loss_fn=loss, num_learners=2), s)), ()
    raise AssertionError(method)


# stateful methods only: the plugin tests (tests/methods/test_plugin.py) cover jit/finiteness of every method
@pytest.mark.parametrize("method", ["das", "iaa", "bspml", "alternating_projection"])
def test_method_trains_a_toy_embedding(method):
    x, y, means = _data(0)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(F, D)) * 0.1, jnp.float32)
    tx = optax.adam(0.05)
    opt = tx.init(w)
    objective, extra = _objective(method)

    @jax.jit
    def step(w, opt, extra, key):
        (loss, extra), g = jax.value_and_grad(objective, has_aux=True)(w, extra, x, y, key)
        updates, opt = tx.update(g, opt, w)
        return optax.apply_updates(w, updates), opt, extra, loss

    for i in range(STEPS):
        w, opt, extra, loss = step(w, opt, extra, jax.random.key(i))
        assert np.isfinite(float(loss))
    xt, yt, _ = _data(0)
    rng = np.random.default_rng(2)
    xt = (means[yt] + rng.normal(size=(B, F))).astype(np.float32)
    e, et = np.asarray(_embed(w, x)), np.asarray(_embed(w, xt))
    nearest = y[np.argmax(et @ e.T, axis=1)]
    assert np.mean(nearest == yt) > 0.8


def test_daml_alternating_updates():
    """DAML: the generator and the metric take alternating Adam steps in one jitted function."""
    x, y, _ = _data(0)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(F, D)) * 0.1, jnp.float32)
    gen = HardNegativeGenerator(D, normalize=True, rngs=nnx.Rngs(0))
    gdef, gparams = nnx.split(gen)
    tx = optax.adam(0.02)
    opt_w, opt_g = tx.init(w), tx.init(gparams)

    @jax.jit
    def step(w, gparams, opt_w, opt_g, key):
        trip, ok = sample_triplets(key, y)

        def gen_loss(gp):  # generator step: the metric's embeddings are constants
            e = jax.lax.stop_gradient(_embed(w, x))
            a, p, n = e[trip[:, 0]], e[trip[:, 1]], e[trip[:, 2]]
            s = nnx.merge(gdef, gp)(a, p, n)
            return daml_generator_loss(a, p, n, s, lambda_reg=0.5, margin=0.2, weights=ok)

        def metric_loss(w):  # metric step: synthetic negatives are constants
            e = _embed(w, x)
            a, p, n = (jax.lax.stop_gradient(e[trip[:, i]]) for i in range(3))
            s = jax.lax.stop_gradient(nnx.merge(gdef, gparams)(a, p, n))
            return daml_triplet_loss(e, y, s, trip, margin=0.2, triplet_valid=ok)

        lg, gg = jax.value_and_grad(gen_loss)(gparams)
        ug, opt_g = tx.update(gg, opt_g, gparams)
        lm, gw = jax.value_and_grad(metric_loss)(w)
        uw, opt_w = tx.update(gw, opt_w, w)
        return optax.apply_updates(w, uw), optax.apply_updates(gparams, ug), opt_w, opt_g, lm, lg

    for i in range(STEPS):
        w, gparams, opt_w, opt_g, lm, lg = step(w, gparams, opt_w, opt_g, jax.random.key(i))
        assert np.isfinite(float(lm)) and np.isfinite(float(lg))
    e = np.asarray(_embed(w, x))
    sim = e @ e.T
    same = y[:, None] == y[None, :]
    assert sim[same].mean() > sim[~same].mean() + 0.5
