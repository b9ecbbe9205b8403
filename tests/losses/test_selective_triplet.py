"""Selectively contrastive triplet loss (Xuan et al. 2020) against a numpy loop."""

import jax
import numpy as np
import pytest

from dmljax.losses.selective_triplet import selectively_contrastive_triplet_loss as sct
from tests.utils import assert_finite_loss_and_grad, assert_jit_matches, degenerate_batches, numerical_grad, random_batch


def reference(x, labels, positive_mining="easy", base_loss="nca", temperature=0.1, margin=0.05, penalty=1.0):
    x = np.asarray(x, np.float64)
    n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = n @ n.T
    out = []
    for a in range(len(labels)):
        pos = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [q for q in range(len(labels)) if labels[q] != labels[a]]
        if not pos or not neg:
            continue
        p = max(pos, key=lambda j: s[a, j]) if positive_mining == "easy" else min(pos, key=lambda j: s[a, j])
        q = max(neg, key=lambda j: s[a, j])
        sap, san = s[a, p], s[a, q]
        if san > sap:
            out.append(penalty * san)
        elif base_loss == "nca":
            out.append(-np.log(np.exp(sap / temperature) / (np.exp(sap / temperature) + np.exp(san / temperature))))
        else:
            out.append(max(san - sap + margin, 0.0))
    return np.mean(out) if out else 0.0


@pytest.mark.parametrize("positive_mining", ["easy", "hard"])
@pytest.mark.parametrize("base_loss", ["nca", "margin"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_loop(positive_mining, base_loss, seed):
    x, labels = random_batch(seed, batch=12, dim=3, classes=3, normalize=False)
    kw = {"positive_mining": positive_mining, "base_loss": base_loss, "temperature": 0.2, "margin": 0.3,
          "penalty": 0.7}
    got = assert_jit_matches(sct, x, labels, **kw)
    np.testing.assert_allclose(got, reference(x, labels, **kw), rtol=1e-9, atol=1e-12)


def test_batch_has_both_branches():
    """The test batches exercise the hard branch and the usual branch (else the test above could not fail)."""
    x, labels = random_batch(0, batch=12, dim=3, classes=3, normalize=False)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    hard = []
    for a in range(12):
        pos = [s[a, p] for p in range(12) if p != a and labels[p] == labels[a]]
        neg = [s[a, q] for q in range(12) if labels[q] != labels[a]]
        hard.append(max(neg) > max(pos))
    assert any(hard) and not all(hard)


@pytest.mark.parametrize("base_loss", ["nca", "margin"])
def test_gradient_matches_finite_differences(base_loss):
    x, labels = random_batch(1, batch=10, dim=4, classes=3, normalize=False)
    kw = {"base_loss": base_loss, "temperature": 0.5, "margin": 0.4, "penalty": 2.0}
    grad = jax.grad(lambda z: sct(z, labels, **kw))(x)
    num = numerical_grad(lambda z: reference(z, labels, **kw), x)
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)


def test_hard_branch_moves_only_anchor_and_negative():
    # anchor 0 / positive 1 (class 0) far apart, negative 2 (class 1) close to the anchor
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.2]])
    labels = np.array([0, 0, 1, 1], np.int32)
    grad = jax.grad(lambda z: sct(z, labels, reduction="none")[0])(x)
    assert np.allclose(grad[1], 0.0) and not np.allclose(grad[2], 0.0) and not np.allclose(grad[0], 0.0)


@pytest.mark.parametrize("name", list(degenerate_batches()))
@pytest.mark.parametrize("base_loss", ["nca", "margin"])
def test_degenerate_batches_finite(name, base_loss):
    x, labels = degenerate_batches()[name]
    assert_finite_loss_and_grad(sct, x, labels, base_loss=base_loss)


def test_padding_equals_unpadded():
    x, labels = random_batch(4, batch=9, dim=3, classes=3)
    xp, lp = np.concatenate([x, x[:3]]), np.concatenate([labels, labels[:3] + 1])
    valid = np.arange(12) < 9
    np.testing.assert_allclose(sct(xp, lp, valid=valid), sct(x, labels), rtol=1e-12)


@pytest.mark.parametrize("kwargs, name", [({"positive_mining": "semihard"}, "positive_mining"),
                                          ({"base_loss": "hinge"}, "base_loss"), ({"temperature": 0.0}, "temperature"),
                                          ({"margin": -1.0}, "margin"), ({"penalty": -1.0}, "penalty"),
                                          ({"reduction": "max"}, "reduction")])
def test_bad_arguments(kwargs, name):
    x, labels = random_batch(0, batch=6, dim=3, classes=2)
    with pytest.raises(ValueError, match=name):
        sct(x, labels, **kwargs)
