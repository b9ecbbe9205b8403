"""Ensemble of losses with learned weights: formulas, optima, training behaviour."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.losses.ensemble import ensemble_weights, make_loss_ensemble, weighted_loss_ensemble
from dmljax.losses.triplet import triplet_margin_loss
from dmljax.losses.weighted import multi_similarity_loss
from tests.utils import degenerate_batches, random_batch


def np_ensemble(losses, raw, method, lam=1.0):
    if method == "uncertainty":
        w = [0.5 * math.exp(-s) for s in raw]
        return sum(wk * lk + 0.5 * s for wk, lk, s in zip(w, losses, raw)), w
    z = sum(math.exp(r) for r in raw)
    w = [math.exp(r) / z for r in raw]
    entropy = -sum(wk * math.log(wk) for wk in w)
    return sum(wk * lk for wk, lk in zip(w, losses)) - lam * entropy, w


@pytest.mark.parametrize("method,lam", [("uncertainty", 1.0), ("softmax", 1.0), ("softmax", 0.1)])
def test_matches_formula(method, lam):
    losses, raw = np.array([0.3, 2.0, 0.05]), np.array([0.2, -1.0, 0.7])
    total, w = weighted_loss_ensemble(losses, raw, method=method, entropy_weight=lam)
    ref_total, ref_w = np_ensemble(losses, raw, method, lam)
    np.testing.assert_allclose(total, ref_total, rtol=1e-9)
    np.testing.assert_allclose(w, ref_w, rtol=1e-9)
    check_grads(lambda l, r: weighted_loss_ensemble(l, r, method=method, entropy_weight=lam)[0], (losses, raw),
                order=1, modes=["rev"])
    f = jax.jit(functools.partial(weighted_loss_ensemble, method=method, entropy_weight=lam))
    np.testing.assert_allclose(f(losses, raw)[0], total, rtol=1e-12)


def test_sequence_of_scalars_accepted():
    total, w = weighted_loss_ensemble([jnp.array(1.0), jnp.array(2.0)], jnp.zeros(2))
    np.testing.assert_allclose(total, 1.5)
    np.testing.assert_allclose(w, [0.5, 0.5])


@pytest.mark.parametrize("method,lam", [("uncertainty", 1.0), ("softmax", 2.0)])
def test_weight_optimum_is_the_documented_closed_form(method, lam):
    """Gradient descent on the raw weights alone reaches w = 1/(2L) resp. softmax(-L/lambda)."""
    losses = jnp.array([0.2, 1.0, 4.0])
    raw = jnp.zeros(3)
    grad = jax.jit(jax.grad(lambda r: weighted_loss_ensemble(losses, r, method=method, entropy_weight=lam)[0]))
    for _ in range(3000):
        raw = raw - 0.2 * grad(raw)
    _, w = weighted_loss_ensemble(losses, raw, method=method, entropy_weight=lam)
    want = 1.0 / (2.0 * losses) if method == "uncertainty" else jax.nn.softmax(-losses / lam)
    np.testing.assert_allclose(w, want, rtol=1e-4)
    # the weights never collapse to zero, which an unregularised weighted sum would do
    assert float(jnp.min(w)) > 1e-3


def test_make_loss_ensemble_trains_embeddings_and_weights():
    x, labels = random_batch(0, batch=12, dim=5)
    fns = [functools.partial(triplet_margin_loss, margin=0.2), functools.partial(multi_similarity_loss)]
    ens = make_loss_ensemble(fns)
    (total, aux), (gx, gr) = jax.value_and_grad(ens, argnums=(0, 2), has_aux=True)(x, labels, jnp.array([0.0, 1.0]))
    values = [float(f(x, labels)) for f in fns]
    np.testing.assert_allclose(aux["losses"], values, rtol=1e-9)
    np.testing.assert_allclose(total, np_ensemble(values, [0.0, 1.0], "uncertainty")[0], rtol=1e-9)
    assert np.isfinite(gx).all() and np.all(np.asarray(gr) != 0)
    np.testing.assert_allclose(ensemble_weights(jnp.array([0.0, 1.0])), aux["weights"], rtol=1e-12)
    scalar = make_loss_ensemble(fns, return_aux=False)(x, labels, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(scalar, total, rtol=1e-12)
    valid = np.ones(12, bool)
    np.testing.assert_allclose(ens(x, labels, jnp.zeros(2), valid=valid)[0], ens(x, labels, jnp.zeros(2))[0], rtol=1e-12)


def test_degenerate_finite():
    ens = make_loss_ensemble([triplet_margin_loss, multi_similarity_loss], method="softmax")
    # one compiled loss + gradients per shape, shared by the degenerate batches
    value_and_grads = jax.jit(jax.value_and_grad(ens, argnums=(0, 2), has_aux=True))
    for name, (x, labels) in degenerate_batches().items():
        (v, _), (gx, gr) = value_and_grads(x, labels, jnp.zeros(2))
        assert np.isfinite(v) and np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gr)).all(), name
    v, g = jax.value_and_grad(lambda r: weighted_loss_ensemble(jnp.zeros(2), r)[0])(jnp.array([-30.0, 30.0]))
    assert np.isfinite(v) and np.isfinite(np.asarray(g)).all()


def test_bad_input():
    with pytest.raises(ValueError, match="^raw_weights must have shape"):
        weighted_loss_ensemble(jnp.ones(3), jnp.ones(2))
    with pytest.raises(ValueError, match="^losses must have shape"):
        weighted_loss_ensemble(jnp.ones((2, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match="^losses must contain"):
        weighted_loss_ensemble([], jnp.ones(0))
    with pytest.raises(ValueError, match=r"^losses\[1\] must be a scalar"):
        weighted_loss_ensemble([jnp.ones(()), jnp.ones(2)], jnp.ones(2))
    with pytest.raises(ValueError, match="^method"):
        weighted_loss_ensemble(jnp.ones(2), jnp.ones(2), method="mean")
    with pytest.raises(ValueError, match="^entropy_weight"):
        weighted_loss_ensemble(jnp.ones(2), jnp.ones(2), method="softmax", entropy_weight=0.0)
    with pytest.raises(ValueError, match="^raw_weights must be a floating"):
        weighted_loss_ensemble(jnp.ones(2), jnp.ones(2, jnp.int32))
    with pytest.raises(ValueError, match="^loss_fns"):
        make_loss_ensemble([])


@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=5), st.integers(0, 1000), st.sampled_from(["uncertainty", "softmax"]))
def test_permutation_equivariance(losses, seed, method):
    rng = np.random.default_rng(seed)
    losses = np.array(losses)
    raw = rng.normal(size=len(losses))
    perm = rng.permutation(len(losses))
    total, w = weighted_loss_ensemble(losses, raw, method=method)
    total_p, w_p = weighted_loss_ensemble(losses[perm], raw[perm], method=method)
    np.testing.assert_allclose(total_p, total, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(w_p, np.asarray(w)[perm], rtol=1e-12)
    if method == "softmax":
        np.testing.assert_allclose(np.sum(w), 1.0, rtol=1e-12)
