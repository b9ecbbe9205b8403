"""IAA: running per-class statistics against numpy, neighbour correction, adaptive synthesis."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.methods.iaa import (iaa_init, iaa_neighbor_correction, iaa_strength_schedule, iaa_synthesize,
                                iaa_update)
from tests.utils import random_batch

C, D = 3, 4


def np_merge(mean, var, amount, x, y, momentum):
    """The merge formula of the module docstring, class by class."""
    mean, var, amount = mean.copy(), var.copy(), amount.copy()
    for c in range(len(mean)):
        xc = x[y == c]
        if len(xc) == 0:
            continue
        mu_b, var_b = xc.mean(0), xc.var(0)
        w = max(len(xc) / (len(xc) + amount[c]), 1 - momentum)
        var[c] = (1 - w) * var[c] + w * var_b + w * (1 - w) * (mean[c] - mu_b) ** 2
        mean[c] = (1 - w) * mean[c] + w * mu_b
        amount[c] += len(xc)
    return mean, var, amount


@pytest.mark.parametrize("momentum", [1.0, 0.8, 0.0])
def test_update_matches_numpy_merge(momentum):
    state = iaa_init(C, D, dtype=jnp.float64)
    mean, var, amount = np.zeros((C, D)), np.zeros((C, D)), np.zeros(C)
    for seed in range(3):
        x, y = random_batch(seed, batch=9, dim=D, classes=C, normalize=False)
        state = iaa_update(state, x, y, momentum=momentum)
        mean, var, amount = np_merge(mean, var, amount, x, y, momentum)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.variance, var, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.amount, amount)


def test_momentum_one_gives_exact_pooled_statistics():
    """The merge with w = n_b / (n_b + N) is exact: equal to the statistics of all batches together."""
    xs, ys = zip(*[random_batch(s, batch=8, dim=D, classes=C, normalize=False) for s in range(4)])
    state = iaa_init(C, D, dtype=jnp.float64)
    for x, y in zip(xs, ys):
        state = iaa_update(state, x, y, momentum=1.0)
    x, y = np.concatenate(xs), np.concatenate(ys)
    for c in range(C):
        np.testing.assert_allclose(state.mean[c], x[y == c].mean(0), rtol=1e-10)
        np.testing.assert_allclose(state.variance[c], x[y == c].var(0), rtol=1e-9)


def test_neighbor_correction_only_touches_few_shot_classes():
    rng = np.random.default_rng(0)
    c = 6
    mean = np.arange(c)[:, None] * np.ones((c, D))
    var = rng.uniform(0.1, 1.0, size=(c, D))
    counts = np.array([100, 100, 100, 2, 100, 100.0])
    state = iaa_init(c, D, dtype=jnp.float64)._replace(mean=jnp.asarray(mean), variance=jnp.asarray(var),
                                                       amount=jnp.asarray(counts))
    out = np.asarray(iaa_neighbor_correction(state, num_neighbors=2, gamma=0.0, few_shot=40))
    np.testing.assert_allclose(out[counts >= 40], var[counts >= 40])
    a = 1 / (1 + np.log1p(1.0))
    neigh = out[3] - (1 - a) * var[3]
    # gamma = 0: the correction is a convex combination of the 2 nearest classes' variances (2 and 4)
    lo, hi = np.minimum(var[2], var[4]), np.maximum(var[2], var[4])
    assert np.all(neigh / a >= lo - 1e-12) and np.all(neigh / a <= hi + 1e-12)
    out_g = np.asarray(iaa_neighbor_correction(state, gamma=1.0))
    glob = np.sum(var[counts > 1] * counts[counts > 1, None], 0) / counts[counts > 1].sum()
    np.testing.assert_allclose(out_g[3], (1 - a) * var[3] + a * glob, rtol=1e-10)


def test_synthesis_has_the_class_variance_and_is_deterministic():
    var = np.array([[0.04, 0.25, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    y = np.array([0], np.int32)
    f = functools.partial(iaa_synthesize, strength=0.5, num_augment=4000)
    out, lab = f(jax.random.key(0), x, y, var)
    assert out.shape == (4000, D) and np.all(np.asarray(lab) == 0)
    np.testing.assert_allclose(np.var(np.asarray(out), axis=0), 0.5 * var[0], rtol=0.1, atol=1e-12)
    np.testing.assert_allclose(np.mean(np.asarray(out), axis=0), x[0], atol=0.05)
    out2, _ = jax.jit(f)(jax.random.key(0), x, y, var)
    np.testing.assert_allclose(out, out2, rtol=1e-12)
    # gradient reaches the anchors (identity), not through sigma; finite at zero variance
    g = jax.grad(lambda z: jnp.sum(iaa_synthesize(jax.random.key(1), z, y, var, num_augment=3)[0]))(x)
    np.testing.assert_allclose(g, 3.0)


def test_schedule_and_degenerate():
    vals = [float(iaa_strength_schedule(p, strength=1.0)) for p in (0.1, 0.5, 0.7, 0.9)]
    assert vals == pytest.approx([1.0, 0.9, 0.75, 0.6])
    state = iaa_update(iaa_init(C, D), np.zeros((4, D)), np.zeros(4, np.int32))
    assert np.isfinite(np.asarray(iaa_neighbor_correction(state))).all()
    one = iaa_update(iaa_init(C, D), np.ones((1, D)), np.zeros(1, np.int32))
    assert np.isfinite(np.asarray(iaa_neighbor_correction(one))).all()


def test_bad_input():
    x, y = random_batch(0, batch=6, dim=D, classes=2)
    state = iaa_init(C, D)
    with pytest.raises(ValueError, match="^momentum"):
        iaa_update(state, x, y, momentum=1.5)
    with pytest.raises(ValueError, match="^embeddings must have dim"):
        iaa_update(state, x[:, :2], y)
    with pytest.raises(ValueError, match="^variance"):
        iaa_synthesize(jax.random.key(0), x, y, np.ones((C, 2)))
    with pytest.raises(ValueError, match="^strength"):
        iaa_synthesize(jax.random.key(0), x, y, np.ones((C, D)), strength=-1.0)
    with pytest.raises(ValueError, match="^gamma"):
        iaa_neighbor_correction(state, gamma=2.0)
    with pytest.raises(ValueError, match="^class_counts"):
        iaa_neighbor_correction(state, class_counts=np.ones(2))
    with pytest.raises(ValueError, match="^state"):
        iaa_update({}, x, y)
