"""Matryoshka wrapper against a direct loop over prefixes; gradients; prefix evaluation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.losses.matryoshka import evaluate_prefixes, matryoshka, matryoshka_loss
from dmljax.losses.pair import contrastive_loss
from dmljax.losses.proxy import proxy_anchor_loss
from dmljax.metrics.report import evaluate
from tests.utils import numerical_grad

DIMS = (16, 8, 4, 2)
WEIGHTS = (1.0, 0.5, 2.0, 0.25)


def _batch(seed=0, b=12, d=16, c=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)), (np.arange(b) % c).astype(np.int32), rng.normal(size=(c, d))


def _numpy_contrastive(x, labels, neg_margin=1.0):
    """PML ContrastiveLoss defaults (pos_margin 0, neg_margin 1, euclidean, mean over non-zero terms)."""
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0))
    pos, neg = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j and labels[i] == labels[j]:
                pos.append(d[i, j])
            elif labels[i] != labels[j]:
                neg.append(max(neg_margin - d[i, j], 0.0))
    mean_nz = lambda v: np.mean([u for u in v if u > 0]) if any(u > 0 for u in v) else 0.0
    return mean_nz(pos) + mean_nz(neg)


def _numpy_matryoshka(x, labels, dims=DIMS, weights=WEIGHTS, normalize=True):
    total = 0.0
    for m, c in zip(dims, weights):
        p = x[:, :m]
        if normalize:
            p = p / np.linalg.norm(p, axis=1, keepdims=True)
        total += c * _numpy_contrastive(p, labels)
    return total


def test_matches_direct_numpy_loop_and_gradient():
    x, labels, _ = _batch()
    loss = functools.partial(matryoshka_loss, loss_fn=contrastive_loss, dims=DIMS, weights=WEIGHTS)
    np.testing.assert_allclose(jax.jit(loss)(x, labels), _numpy_matryoshka(x, labels), rtol=1e-9)
    grad = jax.grad(loss)(x, labels)
    np.testing.assert_allclose(grad, numerical_grad(lambda z: _numpy_matryoshka(z, labels), x), rtol=1e-5, atol=1e-7)
    # without re-normalisation the prefixes are used as they are
    raw = matryoshka_loss(x, labels, loss_fn=contrastive_loss, dims=DIMS, weights=WEIGHTS, normalize=False)
    np.testing.assert_allclose(raw, _numpy_matryoshka(x, labels, normalize=False), rtol=1e-9)
    assert abs(float(raw) - float(loss(x, labels))) > 1e-3


def test_proxies_are_sliced_with_the_embedding():
    x, labels, proxies = _batch(1)
    got_value, got_grads = jax.value_and_grad(
        lambda z, p: matryoshka_loss(z, labels, p, loss_fn=proxy_anchor_loss, dims=DIMS, weights=WEIGHTS),
        argnums=(0, 1))(x, proxies)

    def loop(z, p):
        return sum(c * proxy_anchor_loss(z[:, :m] / jnp.linalg.norm(z[:, :m], axis=1, keepdims=True), labels,
                                         p[:, :m]) for m, c in zip(DIMS, WEIGHTS))

    ref_value, ref_grads = jax.value_and_grad(loop, argnums=(0, 1))(x, proxies)
    np.testing.assert_allclose(got_value, ref_value, rtol=1e-12)
    for g, r in zip(got_grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    assert np.abs(np.asarray(got_grads[1])[:, 2:]).max() > 0  # every prefix's proxies are trained


def test_wrapper_is_a_hashable_loss_fn_and_single_full_dim_is_the_loss():
    x, labels, _ = _batch(2)
    f = matryoshka(contrastive_loss, dims=(16,), normalize=False)
    hash(f)
    np.testing.assert_allclose(f(x, labels), contrastive_loss(x, labels), rtol=1e-12)
    g = matryoshka(contrastive_loss, dims=DIMS, weights=WEIGHTS)
    np.testing.assert_allclose(g(x, labels), _numpy_matryoshka(x, labels), rtol=1e-9)


def test_zero_embeddings_finite():
    _, labels, _ = _batch()
    value, grad = jax.value_and_grad(lambda z: matryoshka_loss(z, labels, loss_fn=contrastive_loss, dims=DIMS))(
        np.zeros((12, 16)))
    assert np.isfinite(value) and np.isfinite(grad).all()


@pytest.mark.parametrize("kwargs, name", [({"dims": (32,)}, "dims"), ({"dims": ()}, "dims"), ({"dims": (4, 4)}, "dims"),
                                          ({"dims": (0,)}, "dims"), ({"dims": 8}, "dims"),
                                          ({"weights": (1.0,)}, "weights"), ({"weights": (1, -1, 1, 1)}, "weights")])
def test_bad_arguments(kwargs, name):
    x, labels, _ = _batch()
    kw = {"dims": DIMS, **kwargs}
    with pytest.raises(ValueError, match=name):
        matryoshka_loss(x, labels, loss_fn=contrastive_loss, **kw)


def test_evaluate_prefixes_equals_evaluate_on_normalised_prefixes():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), 6)
    x = rng.normal(size=(30, 8)) + 2.0 * rng.normal(size=(5, 8))[labels]
    out = evaluate_prefixes(x, labels, dims=(8, 2), ks=(1, 2), clustering=False, metric="euclidean")
    assert list(out) == [8, 2]
    for m in (8, 2):
        p = x[:, :m] / np.linalg.norm(x[:, :m], axis=1, keepdims=True)
        ref = evaluate(p, labels, ks=(1, 2), clustering=False, metric="euclidean")
        for name in ("recall@1", "map_at_r"):
            assert out[m][name] == ref[name]
    assert out[8]["recall@1"] != out[2]["recall@1"] or out[8]["map_at_r"] != out[2]["map_at_r"]
    with pytest.raises(ValueError, match="dims"):
        evaluate_prefixes(x, labels, dims=(9,))
