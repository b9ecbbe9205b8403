"""DCL / DCLW against a plain-numpy loop over positive pairs (Yeh et al. 2022), and PML's NT-Xent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.losses.decoupled_contrastive import decoupled_contrastive_loss, von_mises_fisher_weights
from tests.utils import assert_finite_loss_and_grad, assert_jit_matches, degenerate_batches, numerical_grad, random_batch


def _cos(x):
    n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return n @ n.T


def reference_dcl(x, labels, temperature=0.1, weighting=None, sigma=0.5):
    s = _cos(np.asarray(x, np.float64))
    b = len(labels)
    pairs = [(a, p) for a in range(b) for p in range(b) if a != p and labels[a] == labels[p]]
    if not pairs:
        return 0.0
    if weighting == "von_mises_fisher":
        e = {pair: np.exp(s[pair] / sigma) for pair in pairs}
        mean = np.mean(list(e.values()))
        w = {pair: 2.0 - e[pair] / mean for pair in pairs}
    else:
        w = {pair: 1.0 for pair in pairs}
    total = 0.0
    for a, p in pairs:
        negs = [np.exp(s[a, n] / temperature) for n in range(b) if labels[n] != labels[a]]
        lse = np.log(np.sum(negs)) if negs else 0.0
        total += -w[(a, p)] * s[a, p] / temperature + lse
    return total / len(pairs)


@pytest.mark.parametrize("weighting", [None, "von_mises_fisher"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_loop(weighting, seed):
    x, labels = random_batch(seed, batch=10, dim=5, classes=3, normalize=False)
    got = assert_jit_matches(decoupled_contrastive_loss, x, labels, temperature=0.2, weighting=weighting)
    np.testing.assert_allclose(got, reference_dcl(x, labels, 0.2, weighting), rtol=1e-9)


@pytest.mark.parametrize("weighting", [None, "von_mises_fisher"])
def test_gradient_matches_finite_differences(weighting):
    x, labels = random_batch(2, batch=8, dim=4, classes=3, normalize=False)
    grad = jax.grad(lambda z: decoupled_contrastive_loss(z, labels, temperature=0.3, weighting=weighting))(x)
    num = numerical_grad(lambda z: reference_dcl(z, labels, 0.3, weighting), x)
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)


def test_equals_pml_ntxent_minus_positive_term():
    """ntxent_ap - dcl_ap = softplus(s_ap/T - lse_n s_an/T): checked against PML 2.9's NTXentLoss."""
    torch = pytest.importorskip("torch")
    from pytorch_metric_learning.losses import NTXentLoss

    x, labels = random_batch(3, batch=12, dim=6, classes=4, normalize=False)
    t = 0.25
    pml = float(NTXentLoss(temperature=t)(torch.tensor(x), torch.tensor(labels, dtype=torch.long)))
    s = _cos(x) / t
    diffs = []
    for a in range(len(labels)):
        lse = np.log(np.sum([np.exp(s[a, n]) for n in range(len(labels)) if labels[n] != labels[a]]))
        for p in range(len(labels)):
            if p != a and labels[p] == labels[a]:
                diffs.append(np.logaddexp(0.0, s[a, p] - lse))
    ours = float(decoupled_contrastive_loss(x, labels, temperature=t))
    np.testing.assert_allclose(ours, pml - np.mean(diffs), rtol=1e-6)


def test_dclw_weights_average_to_one_over_positive_pairs():
    x, labels = random_batch(4, batch=12, dim=5, classes=3)
    pos = (labels[:, None] == labels[None, :]) & ~np.eye(12, dtype=bool)
    w = np.asarray(von_mises_fisher_weights(jnp.asarray(_cos(x)), jnp.asarray(pos), sigma=0.5))
    np.testing.assert_allclose(w[pos].mean(), 1.0, rtol=1e-12)
    assert np.all(w[~pos] == 0)


@pytest.mark.parametrize("name", list(degenerate_batches()))
@pytest.mark.parametrize("weighting", [None, "von_mises_fisher"])
def test_degenerate_batches_finite(name, weighting):
    x, labels = degenerate_batches()[name]
    assert_finite_loss_and_grad(decoupled_contrastive_loss, x, labels, weighting=weighting)


def test_no_positive_gives_zero():
    x, labels = degenerate_batches()["no_positives"]
    assert float(decoupled_contrastive_loss(x, labels)) == 0.0


def test_padding_equals_unpadded():
    x, labels = random_batch(5, batch=10, dim=4, classes=3)
    xp = np.concatenate([x, np.ones((3, 4))])
    lp = np.concatenate([labels, labels[:3]])
    valid = np.arange(13) < 10
    for weighting in (None, "von_mises_fisher"):
        np.testing.assert_allclose(decoupled_contrastive_loss(xp, lp, valid=valid, weighting=weighting),
                                   decoupled_contrastive_loss(x, labels, weighting=weighting), rtol=1e-12)


@pytest.mark.parametrize("kwargs, name", [({"temperature": 0.0}, "temperature"), ({"sigma": -1.0}, "sigma"),
                                          ({"weighting": "vmf"}, "weighting"), ({"reduction": "max"}, "reduction")])
def test_bad_arguments(kwargs, name):
    x, labels = random_batch(0, batch=6, dim=3, classes=2)
    with pytest.raises(ValueError, match=name):
        decoupled_contrastive_loss(x, labels, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="embeddings"):
        decoupled_contrastive_loss(np.zeros(4), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="labels"):
        decoupled_contrastive_loss(np.zeros((4, 2)), np.zeros(3, np.int32))
