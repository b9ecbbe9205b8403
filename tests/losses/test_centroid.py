"""Centroid triplet loss (Wieczorek et al. 2021): numpy loop reference, gradients, jit, vmap,
degenerate batches, bad input, and parity with PML 1.x ``CentroidTripletLoss``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.losses import centroid_triplet_loss
from tests.utils import (
    assert_finite_loss_and_grad,
    assert_jit_matches,
    degenerate_batches,
    numerical_grad,
    random_batch,
)

# One compilation per configuration (eager op-by-op dispatch is what makes small tests slow).
_loss = jax.jit(centroid_triplet_loss, static_argnames=("metric", "normalize", "soft_margin", "reduction"))


def _reference(x, y, *, margin=0.05, metric="euclidean", normalize=True, soft_margin=False,
               reduction="mean_nonzero", valid=None):
    """Plain loops over (query, other class), written from the paper's formula."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    keep = np.ones(len(y), bool) if valid is None else np.asarray(valid, bool)

    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12) if normalize else v

    def dist(a, b):
        if metric == "euclidean":
            return np.linalg.norm(unit(a) - unit(b))
        if metric == "squared_euclidean":
            return np.sum((unit(a) - unit(b)) ** 2)
        if metric == "cosine":
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            return -(a @ b) / (max(na, 1e-12) * max(nb, 1e-12))
        return -(unit(a) @ unit(b))  # dot (a similarity): negate

    classes = sorted({int(c) for c, k in zip(y, keep) if k})
    per_query = np.zeros(len(y))
    total, num, nonzero = 0.0, 0, 0
    for q in range(len(y)):
        if not keep[q]:
            continue
        others = [i for i in range(len(y)) if keep[i] and y[i] == y[q] and i != q]
        if not others:
            continue
        c_pos = x[others].mean(axis=0)
        for c in classes:
            if c == y[q]:
                continue
            c_neg = x[[i for i in range(len(y)) if keep[i] and y[i] == c]].mean(axis=0)
            z = dist(x[q], c_pos) - dist(x[q], c_neg) + margin
            v = np.log1p(np.exp(z)) if soft_margin else max(z, 0.0)
            per_query[q] += v
            total += v
            num += 1
            nonzero += v > 0
    if reduction == "none":
        return per_query
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(num, 1)
    return total / max(nonzero, 1)


def _imbalanced(seed=0, dim=5):
    rng = np.random.default_rng(seed)
    y = np.array([5, 5, 5, -2, -2, 40, 40, 40, 40, 9], np.int32)  # sizes 3, 2, 4 and a singleton
    rng.shuffle(y)
    return rng.normal(size=(len(y), dim)), y


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"margin": 0.4, "reduction": "mean"},
        {"metric": "cosine", "margin": 0.3, "reduction": "sum"},
        {"metric": "squared_euclidean", "normalize": False, "margin": 1.0},
        {"metric": "dot", "soft_margin": True, "reduction": "none"},
    ],
)
def test_matches_numpy_loop(config):
    # both batches [10, 5]: one compilation per configuration
    for x, y in (random_batch(0, batch=10, dim=5, classes=3, normalize=False), _imbalanced(1)):
        np.testing.assert_allclose(_loss(x, y, **config), _reference(x, y, **config),
                                   rtol=1e-6, atol=1e-12)


def test_padding_is_ignored():
    x, y = _imbalanced(2)
    valid = np.ones(len(y), bool)
    valid[[1, 6]] = False
    value = _loss(x, y, valid=valid, reduction="mean")
    np.testing.assert_allclose(value, _reference(x, y, valid=valid, reduction="mean"), rtol=1e-6)
    np.testing.assert_allclose(value, _loss(x[valid], y[valid], reduction="mean"), rtol=1e-10)
    # garbage in padding rows changes nothing
    x2 = x.copy()
    x2[~valid] = 1e3
    np.testing.assert_allclose(_loss(x2, y, valid=valid, reduction="mean"), value, rtol=1e-10)


@pytest.mark.parametrize("config", [{"reduction": "mean", "margin": 0.5}, {"metric": "cosine", "soft_margin": True}])
def test_gradient_matches_finite_differences(config):
    x, y = _imbalanced(3, dim=3)
    f = jax.jit(functools.partial(centroid_triplet_loss, labels=y, **config))
    grad = jax.grad(f)(x)
    expected = numerical_grad(f, x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_learnable_margin_gradient():
    x, y = random_batch(4, batch=8, dim=3, classes=2, normalize=False)
    f = jax.jit(lambda m: centroid_triplet_loss(x, y, margin=m, reduction="sum"))
    g = jax.grad(f)(0.3)
    eps = 1e-6
    fd = (f(0.3 + eps) - f(0.3 - eps)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_jit_and_vmap():
    x, y = random_batch(5, batch=10, dim=4, classes=3)
    assert_jit_matches(centroid_triplet_loss, x, y, margin=0.3, reduction="mean")
    xs = np.stack([x, x[::-1], 2 * x])
    loss = functools.partial(centroid_triplet_loss, margin=0.3, reduction="mean")
    batched = jax.jit(jax.vmap(loss))(jnp.asarray(xs), jnp.asarray(np.stack([y] * 3)))
    for i in range(3):  # eager (its primitives are already compiled by assert_jit_matches)
        np.testing.assert_allclose(batched[i], loss(xs[i], y), rtol=1e-10)


def test_float32_and_bfloat16_inputs():
    x, y = random_batch(6, batch=8, dim=4, classes=2)
    ref = _reference(x, y, margin=0.5)
    value32 = _loss(jnp.asarray(x, jnp.float32), y, margin=0.5)
    assert value32.dtype == jnp.float32
    np.testing.assert_allclose(value32, ref, rtol=1e-5)
    value = _loss(jnp.asarray(x, jnp.bfloat16), y, margin=0.5)
    assert value.dtype == jnp.float32 and np.isfinite(value)


@pytest.mark.parametrize("name", sorted(degenerate_batches()))
def test_degenerate_batches_are_finite(name):
    x, y = degenerate_batches()[name]
    configs = [{}]
    if name in ("identical_embeddings", "zero_embeddings"):  # zero distances / zero centroids
        configs.append({"metric": "cosine", "soft_margin": True, "reduction": "mean"})
    for config in configs:
        for margin in (0.05, 0.0):  # a traced margin: one compilation for both
            value, _ = assert_finite_loss_and_grad(_loss, x, y, margin=margin, **config)
            if name in ("single_class", "no_positives", "one_item"):
                assert float(value) == 0.0  # no triplet exists


def test_separated_classes_give_zero_loss():
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(3), 3)
    x = np.eye(3)[y] * 10 + 0.01 * rng.normal(size=(9, 3))
    assert float(_loss(x, y, margin=0.1)) == 0.0
    assert float(_loss(x, np.tile(np.arange(3), 3), margin=0.1)) > 0.0  # mixed classes


def test_bad_inputs_raise():
    x, y = random_batch(0, batch=6, dim=3, classes=2)
    with pytest.raises(ValueError, match="embeddings"):
        centroid_triplet_loss(x[0], y)
    with pytest.raises(ValueError, match="labels"):
        centroid_triplet_loss(x, y[:4])
    with pytest.raises(ValueError, match="labels"):
        centroid_triplet_loss(x, y.astype(float))
    with pytest.raises(ValueError, match="margin"):
        centroid_triplet_loss(x, y, margin=-0.1)
    with pytest.raises(ValueError, match="metric"):
        centroid_triplet_loss(x, y, metric="manhattan")
    with pytest.raises(ValueError, match="reduction"):
        centroid_triplet_loss(x, y, reduction="threshold")
    with pytest.raises(ValueError, match="normalize"):
        centroid_triplet_loss(x, y, normalize=1)
    with pytest.raises(ValueError, match="valid"):
        centroid_triplet_loss(x, y, valid=np.ones(5, bool))


def _pml_centroid_triplet_loss():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses

    if not hasattr(losses, "CentroidTripletLoss"):
        pytest.skip("CentroidTripletLoss was removed in pytorch-metric-learning 2.0: for this test, "
                    "pip install --no-deps --target DIR pytorch-metric-learning==1.7.3; PYTHONPATH=DIR")
    return torch, losses.CentroidTripletLoss


@pytest.mark.parametrize("classes,per_class", [(2, 3), (3, 2), (4, 3)])
def test_matches_pytorch_metric_learning(classes, per_class):
    """Loss and gradient equal PML 1.7.3 on balanced batches with <= 4 classes (see the docstring
    of centroid_triplet_loss for why PML differs beyond that)."""
    torch, CentroidTripletLoss = _pml_centroid_triplet_loss()
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.reducers import MeanReducer

    rng = np.random.default_rng(classes * 10 + per_class)
    y = rng.permutation(np.repeat(np.arange(classes) * 3 + 1, per_class))
    x = rng.normal(size=(len(y), 4))
    cases = [
        ({}, {}),
        ({"margin": 0.5, "reduction": "mean"}, {"margin": 0.5, "reducer": MeanReducer()}),
        ({"metric": "cosine", "margin": 0.3}, {"margin": 0.3, "distance": CosineSimilarity()}),
        ({"soft_margin": True}, {"smooth_loss": True}),
    ]
    for ours, theirs in cases:
        value, grad = jax.jit(jax.value_and_grad(lambda e: centroid_triplet_loss(e, y, **ours)))(x)
        xt = torch.tensor(x, requires_grad=True)
        loss = CentroidTripletLoss(**theirs)(xt, torch.tensor(y))
        loss.backward()
        np.testing.assert_allclose(value, loss.item(), rtol=1e-9, err_msg=str(ours))
        np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-7, atol=1e-12, err_msg=str(ours))
