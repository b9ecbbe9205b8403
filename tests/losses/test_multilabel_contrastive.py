"""MultiSupCon against a numpy loop of PML's formula, and against SupCon for one-hot labels."""

import jax
import numpy as np
import pytest

from dmljax.losses.contrastive_family import supcon_loss
from dmljax.losses.multilabel_contrastive import multi_supcon_loss
from tests.utils import assert_finite_loss_and_grad, assert_jit_matches, numerical_grad


def _batch(seed, b=10, d=5, c=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d))
    y = (rng.uniform(size=(b, c)) < 0.45).astype(np.int32)
    y[0] = 0  # an item with no label
    return x, y


def reference(x, y, temperature=0.1, threshold=0.3):
    x = np.asarray(x, np.float64)
    n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = n @ n.T / temperature
    b = len(y)
    losses = []
    for i in range(b):
        others = [j for j in range(b) if j != i]
        lse = np.log(np.sum([np.exp(s[i, j]) for j in others]))
        terms = []
        for j in others:
            inter = np.sum((y[i] > 0) & (y[j] > 0))
            union = np.sum((y[i] > 0) | (y[j] > 0))
            jac = inter / union if union else 0.0
            if jac > threshold:
                terms.append(jac * (s[i, j] - lse))
        if terms:
            losses.append(-np.sum(terms) / len(terms))
    return np.mean(losses) if losses else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_loop(seed):
    x, y = _batch(seed)
    got = assert_jit_matches(multi_supcon_loss, x, y, temperature=0.2, threshold=0.3)
    np.testing.assert_allclose(got, reference(x, y, 0.2, 0.3), rtol=1e-6)


def test_gradient_matches_finite_differences():
    x, y = _batch(3, b=8, d=4)
    grad = jax.grad(lambda z: multi_supcon_loss(z, y, temperature=0.5))(x)
    num = numerical_grad(lambda z: reference(z, y, 0.5), x)
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)


def test_one_hot_labels_equal_supcon():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 5))
    labels = np.arange(12) % 4
    y = np.eye(4, dtype=np.int32)[labels]
    np.testing.assert_allclose(multi_supcon_loss(x, y, temperature=0.1), supcon_loss(x, labels, temperature=0.1),
                               rtol=1e-6)


@pytest.mark.parametrize("case", ["all_empty", "all_same", "identical_embeddings", "zero_embeddings", "one_item"])
def test_degenerate_batches_finite(case):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), (rng.uniform(size=(6, 4)) < 0.5).astype(np.int32)
    if case == "all_empty":
        y = np.zeros_like(y)
    elif case == "all_same":
        y = np.ones_like(y)
    elif case == "identical_embeddings":
        x = np.tile(x[:1], (6, 1))
    elif case == "zero_embeddings":
        x = np.zeros_like(x)
    else:
        x, y = x[:1], y[:1]
    value, _ = assert_finite_loss_and_grad(multi_supcon_loss, x, y)
    if case in ("all_empty", "one_item"):
        assert float(value) == 0.0


def test_padding_equals_unpadded():
    x, y = _batch(6)
    xp, yp = np.concatenate([x, x[:2]]), np.concatenate([y, y[:2]])
    valid = np.arange(len(xp)) < len(x)
    np.testing.assert_allclose(multi_supcon_loss(xp, yp, valid=valid), multi_supcon_loss(x, y), rtol=1e-12)


@pytest.mark.parametrize("kwargs, name", [({"temperature": 0.0}, "temperature"), ({"threshold": 1.0}, "threshold"),
                                          ({"threshold": -0.1}, "threshold"), ({"reduction": "max"}, "reduction")])
def test_bad_arguments(kwargs, name):
    x, y = _batch(0)
    with pytest.raises(ValueError, match=name):
        multi_supcon_loss(x, y, **kwargs)


def test_bad_labels():
    x, y = _batch(0)
    with pytest.raises(ValueError, match="multi_hot"):
        multi_supcon_loss(x, np.zeros(len(x), np.int32))
    with pytest.raises(ValueError, match="multi_hot"):
        multi_supcon_loss(x, y[:-1])


def test_one_hot_labels_equal_pml_supcon():
    torch = pytest.importorskip("torch")
    from pytorch_metric_learning.losses import SupConLoss

    rng = np.random.default_rng(7)
    x = rng.normal(size=(12, 5))
    labels = rng.integers(0, 4, size=12)
    expected = float(SupConLoss(temperature=0.2)(torch.tensor(x), torch.tensor(labels)).detach())
    y = np.eye(4, dtype=np.int32)[labels]
    np.testing.assert_allclose(multi_supcon_loss(x, y, temperature=0.2), expected, rtol=1e-6)
