"""Dynamic-margin ArcFace (Ha et al. 2020) against a numpy loop and PML 2.9's ArcFaceLoss with per-row margins."""

import jax
import numpy as np
import pytest

from dmljax.losses.classification import arcface_loss, subcenter_arcface_loss
from dmljax.losses.dynamic_margin import dynamic_arcface_loss, dynamic_margins
from tests.utils import assert_jit_matches, numerical_grad


def _setup(seed, b=8, d=5, c=4, k=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d))
    labels = rng.integers(0, c, size=b).astype(np.int32)
    w = rng.normal(size=(c, d) if k is None else (c, k, d))
    counts = rng.integers(1, 500, size=c).astype(np.float64)
    return x, labels, w, counts


def reference(x, labels, w, counts, a=0.5, b=0.05, lam=0.25, scale=64.0):
    x = np.asarray(x, np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    total = 0.0
    for i, y in enumerate(labels):
        cos = []
        for j in range(len(counts)):
            wj = np.atleast_2d(w[j])  # [D] or [K, D] sub-centers
            wn = wj / np.linalg.norm(wj, axis=1, keepdims=True)
            cos.append(np.max(wn @ xn[i]))
        cos = np.array(cos)
        m = a * counts[y] ** (-lam) + b
        t = np.arccos(np.clip(cos[y], -1 + 1e-6, 1 - 1e-6))
        target = np.cos(t + m) if t + m <= np.pi else cos[y] - m * np.sin(m)
        logits = scale * cos
        logits[y] = scale * target
        total += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[y]
    return total / len(labels)


def test_margins_formula():
    counts = np.array([1.0, 16.0, 10000.0])
    np.testing.assert_allclose(dynamic_margins(counts), 0.5 * counts ** -0.25 + 0.05, rtol=1e-12)
    np.testing.assert_allclose(dynamic_margins(counts, a=0.2, b=0.1, lambda0=0.5), 0.2 / np.sqrt(counts) + 0.1)


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_loop(k, seed):
    x, labels, w, counts = _setup(seed, k=k)
    got = assert_jit_matches(dynamic_arcface_loss, x, labels, w, counts, scale=16.0)
    np.testing.assert_allclose(got, reference(x, labels, w, counts, scale=16.0), rtol=1e-8)


def test_gradient_matches_finite_differences():
    x, labels, w, counts = _setup(2)
    gx, gw = jax.grad(lambda z, v: dynamic_arcface_loss(z, labels, v, counts, scale=8.0), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, numerical_grad(lambda z: reference(z, labels, w, counts, scale=8.0), x),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw, numerical_grad(lambda v: reference(x, labels, v, counts, scale=8.0), w),
                               rtol=1e-5, atol=1e-7)


def test_equal_counts_equal_arcface_with_that_margin():
    x, labels, w, _ = _setup(3)
    counts = np.full(4, 81.0)
    m = 0.5 / 3.0 + 0.05
    np.testing.assert_allclose(dynamic_arcface_loss(x, labels, w, counts), arcface_loss(x, labels, w, margin=m),
                               rtol=1e-10)
    x, labels, w3, _ = _setup(3, k=2)
    np.testing.assert_allclose(dynamic_arcface_loss(x, labels, w3, counts),
                               subcenter_arcface_loss(x, labels, w3, margin=m), rtol=1e-10)


def test_matches_pml_arcface_with_per_row_margins():
    """PML's DynamicArcFaceLoss sets ``loss_func.margin = margins[labels]`` on an ArcFaceLoss."""
    torch = pytest.importorskip("torch")
    from pytorch_metric_learning.losses import ArcFaceLoss

    x, labels, w, counts = _setup(4, b=10, c=5)
    pml = ArcFaceLoss(num_classes=5, embedding_size=5, scale=20.0)
    pml.W.data = torch.tensor(w.T)
    pml.margin = torch.tensor(0.5 * counts[labels] ** -0.25 + 0.05)
    expected = float(pml(torch.tensor(x), torch.tensor(labels, dtype=torch.long)).detach())
    np.testing.assert_allclose(dynamic_arcface_loss(x, labels, w, counts, scale=20.0), expected, rtol=1e-5)


def test_finite_at_embedding_equal_to_class_weight():
    x, labels, w, counts = _setup(5)
    x = w[labels].copy()
    value, grads = jax.value_and_grad(lambda z, v: dynamic_arcface_loss(z, labels, v, counts), argnums=(0, 1))(x, w)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)


def test_zero_embeddings_finite():
    _, labels, w, counts = _setup(6)
    value, grad = jax.value_and_grad(lambda z: dynamic_arcface_loss(z, labels, w, counts))(np.zeros((8, 5)))
    assert np.isfinite(value) and np.isfinite(grad).all()


@pytest.mark.parametrize("kwargs, name", [({"a": -0.1}, "a"), ({"b": -1.0}, "b"), ({"lambda0": -1.0}, "lambda0"),
                                          ({"a": 3.0, "b": 0.2}, "a \\+ b"), ({"scale": 0.0}, "scale")])
def test_bad_arguments(kwargs, name):
    x, labels, w, counts = _setup(0)
    with pytest.raises(ValueError, match=name):
        dynamic_arcface_loss(x, labels, w, counts, **kwargs)


def test_bad_counts_and_shapes():
    x, labels, w, counts = _setup(0)
    with pytest.raises(ValueError, match="class_counts"):
        dynamic_arcface_loss(x, labels, w, counts[:-1])
    bad = counts.copy()
    bad[0] = 0
    with pytest.raises(ValueError, match="class_counts"):
        dynamic_arcface_loss(x, labels, w, bad)
    with pytest.raises(ValueError, match="weights"):
        dynamic_arcface_loss(x, labels, w[0], counts)
    with pytest.raises(ValueError, match="labels"):
        dynamic_arcface_loss(x, labels + 10, w, counts)
