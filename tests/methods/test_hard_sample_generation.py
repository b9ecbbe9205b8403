"""Two-stage hard sample generation: manipulation against a numpy loop, cGAN parts, reverse constraint."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.methods.hard_sample_generation import (ConditionalDiscriminator, ConditionalRefiner,
                                                   adaptive_reverse_margin, adaptive_reverse_metric_loss,
                                                   cgan_losses, piecewise_linear_manipulation,
                                                   piecewise_linear_schedule)


def _triplets(seed=0, t=8, d=4):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(t, d))
    return a, a + 0.5 * rng.normal(size=(t, d)), a + 1.5 * rng.normal(size=(t, d))


def np_manipulate(a, p, n, s):
    hp, hn = np.zeros_like(p), np.zeros_like(n)
    for i in range(len(a)):
        dp, dn = np.linalg.norm(p[i] - a[i]), np.linalg.norm(n[i] - a[i])
        gap = max(dn - dp, 0.0)
        hp[i] = a[i] + (dp + s * gap / 2) / dp * (p[i] - a[i])
        hn[i] = a[i] + (dn - s * gap / 2) / dn * (n[i] - a[i])
    return hp, hn


def test_manipulation_matches_numpy_loop_and_grads():
    a, p, n = _triplets()
    hp, hn = piecewise_linear_manipulation(a, p, n, strength=0.6)
    want_p, want_n = np_manipulate(a, p, n, 0.6)
    np.testing.assert_allclose(hp, want_p, rtol=1e-10)
    np.testing.assert_allclose(hn, want_n, rtol=1e-10)
    f = functools.partial(piecewise_linear_manipulation, strength=0.6)
    np.testing.assert_allclose(jax.jit(f)(a, p, n)[1], hn, rtol=1e-12)
    check_grads(lambda x, y, z: jnp.sum(f(x, y, z)[1] ** 2) + jnp.sum(f(x, y, z)[0]), (a, p, n),
                order=1, modes=["rev"])


@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_manipulated_pairs_are_harder_but_keep_their_order(seed, s):
    a, p, n = _triplets(seed % 50)
    hp, hn = (np.asarray(v) for v in piecewise_linear_manipulation(a, p, n, strength=s))
    dp, dn = np.linalg.norm(p - a, axis=1), np.linalg.norm(n - a, axis=1)
    hdp, hdn = np.linalg.norm(hp - a, axis=1), np.linalg.norm(hn - a, axis=1)
    assert np.all(hdn <= dn + 1e-12) and np.all(hdp >= dp - 1e-12)  # harder
    easy = dp < dn
    assert np.all(hdp[easy] <= hdn[easy] + 1e-9)  # the order of easy pairs never crosses
    np.testing.assert_allclose(hn[~easy], n[~easy])  # identity on pairs that are already hard
    np.testing.assert_allclose(hp[~easy], p[~easy])
    cos = np.sum((hn - a) * (n - a), axis=1)
    assert np.all(cos >= -1e-12)  # direction kept


def test_degenerate_and_schedule():
    a = np.zeros((3, 4))
    g = jax.grad(lambda x: jnp.sum(piecewise_linear_manipulation(x, a, a, strength=0.5)[1]))(a)
    assert np.isfinite(g).all()
    vals = [float(piecewise_linear_schedule(t)) for t in (0.0, 0.15, 0.3, 0.65, 1.0, 2.0)]
    assert vals == pytest.approx([0.0, 0.15, 0.3, 0.55, 0.8, 0.8])
    with pytest.raises(ValueError, match="^knots"):
        piecewise_linear_schedule(0.5, knots=(0.0, 0.0), values=(0.0, 1.0))


def test_cgan_parts_shapes_determinism_and_losses():
    a, _, _ = _triplets(t=6)
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    g1, g2 = ConditionalRefiner(4, 3, rngs=nnx.Rngs(0)), ConditionalRefiner(4, 3, rngs=nnx.Rngs(0))
    d = ConditionalDiscriminator(4, 3, rngs=nnx.Rngs(1))
    out = g1(a, y)
    np.testing.assert_array_equal(out, g2(a, y))
    assert out.shape == (6, 4) and d(out, y).shape == (6,)
    d_loss, g_loss = cgan_losses(jnp.zeros(6), jnp.zeros(6))
    assert float(d_loss) == pytest.approx(2 * np.log(2)) and float(g_loss) == pytest.approx(np.log(2))


def test_discriminator_learns_the_class_condition():
    """The label condition matters: D separates real (x, y) from the same x with a wrong label."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20).astype(np.int32)
    x = (np.eye(4)[y] + 0.05 * rng.normal(size=(60, 4))).astype(np.float32)
    wrong = (y + 1) % 3
    d = ConditionalDiscriminator(4, 3, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(d, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(d, opt):
        loss, grads = nnx.value_and_grad(lambda m: cgan_losses(m(x, y), m(x, wrong))[0])(d)
        opt.update(d, grads)
        return loss

    for _ in range(200):
        loss = step(d, opt)
    assert float(loss) < 0.1
    assert np.mean(np.asarray(d(x, y)) > np.asarray(d(x, wrong))) > 0.95


def test_adaptive_reverse_constraint():
    margins = [float(adaptive_reverse_margin(j, margin=0.2, beta=0.1)) for j in (0.01, 0.1, 1.0, 100.0)]
    assert margins == sorted(margins) and margins[-1] == pytest.approx(0.2, rel=1e-2) and margins[0] < 1e-4
    a, p, n = _triplets()
    gamma = 0.2 * np.exp(-0.1 / 0.5)
    want = np.mean([max(0.0, np.linalg.norm(n[i] - a[i]) - np.linalg.norm(p[i] - a[i]) - gamma)
                    for i in range(len(a))])
    np.testing.assert_allclose(adaptive_reverse_metric_loss(a, p, n, 0.5), want, rtol=1e-6)
    check_grads(lambda z: adaptive_reverse_metric_loss(a, p, z, 0.5), (n,), order=1, modes=["rev"])
    # minimising it moves synthetic negatives to within gamma of the positive distance
    z = jnp.asarray(n)
    for _ in range(300):
        z = z - 0.05 * jax.grad(lambda v: adaptive_reverse_metric_loss(a, p, v, 0.5))(z) * len(a)
    gap = np.linalg.norm(np.asarray(z) - a, axis=1) - np.linalg.norm(p - a, axis=1)
    assert np.all(gap <= gamma + 1e-2)


def test_bad_input():
    a, p, n = _triplets()
    with pytest.raises(ValueError, match="^strength"):
        piecewise_linear_manipulation(a, p, n, strength=1.5)
    with pytest.raises(ValueError, match="^negatives"):
        piecewise_linear_manipulation(a, p, n[:3], strength=0.5)
    with pytest.raises(ValueError, match="^margin"):
        adaptive_reverse_metric_loss(a, p, n, 0.5, margin=-0.1)
    with pytest.raises(ValueError, match="^labels"):
        ConditionalRefiner(4, 3, rngs=nnx.Rngs(0))(a, np.zeros(8))
    with pytest.raises(ValueError, match="^real_logits"):
        cgan_losses(jnp.zeros((2, 2)), jnp.zeros(2))
