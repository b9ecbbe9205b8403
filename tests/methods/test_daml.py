"""DAML: generator objective and metric loss against numpy loops, the closed-form optimum, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from dmljax.methods.daml import HardNegativeGenerator, daml_generator_loss, daml_triplet_loss, sample_triplets
from tests.utils import degenerate_batches, random_batch


def _triplet_arrays(seed=0, t=6, d=4):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(t, d)) for _ in range(4)]


def np_generator_loss(a, p, n, s, lam1, lam2, alpha):
    total = 0.0
    for i in range(len(a)):
        dsa = np.sum((s[i] - a[i]) ** 2)
        total += dsa + lam1 * np.sum((s[i] - n[i]) ** 2) + lam2 * max(0.0, dsa - np.sum((p[i] - a[i]) ** 2) - alpha)
    return total / len(a)


def test_generator_loss_matches_numpy_and_grads():
    a, p, n, s = _triplet_arrays()
    got = daml_generator_loss(a, p, n, s, lambda_reg=0.5, lambda_adv=3.0, margin=0.3)
    np.testing.assert_allclose(got, np_generator_loss(a, p, n, s, 0.5, 3.0, 0.3), rtol=1e-10)
    check_grads(lambda z: daml_generator_loss(a, p, n, z, lambda_reg=0.5, lambda_adv=3.0, margin=0.3),
                (s,), order=1, modes=["rev"])
    w = np.array([1, 0, 1, 1, 0, 1.0])
    per = daml_generator_loss(a, p, n, s, reduction="none")
    np.testing.assert_allclose(daml_generator_loss(a, p, n, s, weights=w), np.sum(per * w) / 4, rtol=1e-10)


@pytest.mark.parametrize("lam1,lam2,alpha", [(0.5, 50.0, 0.1), (1.0, 50.0, 4.0), (0.5, 0.5, 0.0)])
def test_generator_objective_optimum_is_harder_but_not_the_anchor(lam1, lam2, alpha):
    """Minimising J_gen over s: on the segment a->n at the closed-form t*, closer than n, never a."""
    a, p, n = np.zeros(3), np.array([0.5, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])
    ts = np.linspace(0, 1.2, 24001)
    pts = a[None] + ts[:, None] * (n - a)[None]
    rep = lambda v: np.tile(v, (len(ts), 1))  # noqa: E731
    vals = np.asarray(daml_generator_loss(rep(a), rep(p), rep(n), pts, lambda_reg=lam1, lambda_adv=lam2,
                                          margin=alpha, reduction="none"))
    t_best = ts[np.argmin(vals)]
    dist_n, dp2 = 2.0, 0.25
    t_star = max(lam1 / (1 + lam1 + lam2), min(lam1 / (1 + lam1), np.sqrt(dp2 + alpha) / dist_n))
    assert abs(t_best - t_star) < 1e-3
    assert 0 < t_best < 1  # harder than the real negative, not collapsed onto the anchor
    # off the segment the objective only grows
    best = pts[np.argmin(vals)]
    off = best + 1e-2 * np.random.default_rng(0).normal(size=(8, 3))
    off_vals = daml_generator_loss(np.tile(a, (8, 1)), np.tile(p, (8, 1)), np.tile(n, (8, 1)), off,
                                   lambda_reg=lam1, lambda_adv=lam2, margin=alpha, reduction="none")
    assert np.all(np.asarray(off_vals) > vals.min())


def np_daml_triplet(x, y, s, trip, margin, rw, sw):
    real, synth, cnt = 0.0, 0.0, 0
    for t, (i, j, k) in enumerate(trip):
        if y[i] != y[j] or i == j or y[i] == y[k]:
            continue
        dap = np.sum((x[i] - x[j]) ** 2)
        real += max(0.0, dap - np.sum((x[i] - x[k]) ** 2) + margin)
        synth += max(0.0, dap - np.sum((x[i] - s[t]) ** 2) + margin)
        cnt += 1
    return (rw * real + sw * synth) / max(cnt, 1)


def test_triplet_loss_matches_numpy_jit_and_grads():
    x, y = random_batch(0, batch=10, dim=4, classes=3)
    trip, ok = sample_triplets(jax.random.key(0), y)
    trip = np.array(trip)
    trip[1] = [1, 1, 2]  # an invalid triplet (anchor == positive) must be ignored
    s = np.random.default_rng(1).normal(size=(10, 4)) * 0.3
    f = functools.partial(daml_triplet_loss, margin=0.5, real_weight=0.7, synthetic_weight=1.3)
    np.testing.assert_allclose(f(x, y, s, trip), np_daml_triplet(x, y, s, trip, 0.5, 0.7, 1.3), rtol=1e-10)
    np.testing.assert_allclose(jax.jit(f)(x, y, s, trip), f(x, y, s, trip), rtol=1e-12)
    check_grads(lambda z, w: f(z, y, w, trip), (x, s), order=1, modes=["rev"])


def test_sample_triplets_valid_and_deterministic():
    x, y = random_batch(0, batch=12, dim=4, classes=4)
    t1, ok1 = sample_triplets(jax.random.key(5), y)
    t2, ok2 = sample_triplets(jax.random.key(5), y)
    np.testing.assert_array_equal(t1, t2)
    t1 = np.asarray(t1)
    assert np.all(ok1)
    assert np.all(y[t1[:, 0]] == y[t1[:, 1]]) and np.all(t1[:, 0] != t1[:, 1]) and np.all(y[t1[:, 0]] != y[t1[:, 2]])
    _, ok = sample_triplets(jax.random.key(0), np.zeros(5, np.int32))
    assert not np.any(ok)


def test_degenerate_batches_finite():
    for name, (x, y) in degenerate_batches().items():
        trip, ok = sample_triplets(jax.random.key(0), y)
        s = np.asarray(x) * 0.5
        val, grads = jax.value_and_grad(lambda z, w: daml_triplet_loss(z, y, w, trip, triplet_valid=ok),
                                        argnums=(0, 1))(jnp.asarray(x), jnp.asarray(s))
        assert np.isfinite(val) and all(np.isfinite(g).all() for g in grads), name
        g = jax.grad(lambda w: daml_generator_loss(x[trip[:, 0]], x[trip[:, 1]], x[trip[:, 2]], w, weights=ok))(s)
        assert np.isfinite(g).all(), name


def test_generator_module_trains_towards_harder_negatives():
    """A few Adam steps on J_gen: synthetic negatives get closer to the anchor than the real ones
    and the synthetic triplets violate the margin more often (the paper's claim)."""
    rng = np.random.default_rng(0)
    d, t, margin = 4, 32, 0.2
    a = rng.normal(size=(t, d)).astype(np.float32)
    p = a + 0.3 * rng.normal(size=(t, d)).astype(np.float32)
    n = a + 2.0 * rng.normal(size=(t, d)).astype(np.float32)
    gen = HardNegativeGenerator(d, hidden=(32,), rngs=nnx.Rngs(0))
    gen2 = HardNegativeGenerator(d, hidden=(32,), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(gen(a, p, n), gen2(a, p, n))  # deterministic init
    opt = nnx.Optimizer(gen, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(gen, opt):
        loss, grads = nnx.value_and_grad(
            lambda g: daml_generator_loss(a, p, n, g(a, p, n), lambda_reg=0.5, margin=margin))(gen)
        opt.update(gen, grads)
        return loss

    first = float(step(gen, opt))
    for _ in range(150):
        last = float(step(gen, opt))
    assert last < first
    s = np.asarray(gen(a, p, n))
    d_sa, d_na = np.sum((s - a) ** 2, 1), np.sum((n - a) ** 2, 1)
    d_pa = np.sum((p - a) ** 2, 1)
    assert np.mean(d_sa < d_na) > 0.9
    assert np.mean(d_sa < d_pa + margin) > np.mean(d_na < d_pa + margin) + 0.5
    assert np.all(np.isfinite(s))


def test_bad_input():
    a, p, n, s = _triplet_arrays()
    with pytest.raises(ValueError, match="^synthetic"):
        daml_generator_loss(a, p, n, s[:3])
    with pytest.raises(ValueError, match="^lambda_reg"):
        daml_generator_loss(a, p, n, s, lambda_reg=0.0)
    with pytest.raises(ValueError, match="^margin"):
        daml_generator_loss(a, p, n, s, margin=-1.0)
    x, y = random_batch(0, batch=6, dim=4, classes=2)
    trip = np.zeros((6, 3), np.int32)
    with pytest.raises(ValueError, match="^triplets"):
        daml_triplet_loss(x, y, s, np.zeros((6, 2), np.int32))
    with pytest.raises(ValueError, match="^triplets must index"):
        daml_triplet_loss(x, y, s, trip + 6)
    with pytest.raises(ValueError, match="^synthetic_negatives"):
        daml_triplet_loss(x, y, s[:, :3], trip)
    with pytest.raises(ValueError, match="^labels"):
        daml_triplet_loss(x, y.astype(float), s, trip)
    with pytest.raises(ValueError, match="^anchors must have dim"):
        HardNegativeGenerator(3, rngs=nnx.Rngs(0))(a, p, n)
