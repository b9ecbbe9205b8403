"""Spherical embedding constraint (Zhang et al., NeurIPS 2020) against a numpy loop."""

import jax
import numpy as np
import pytest

from dmljax.regularizers_spherical import spherical_embedding_regularizer as sec
from tests.utils import numerical_grad


def reference(x):
    norms = np.linalg.norm(np.asarray(x, np.float64), axis=1)
    return np.mean((norms - norms.mean()) ** 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_and_gradient(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(7, 4)) * rng.uniform(0.2, 3.0, size=(7, 1))
    np.testing.assert_allclose(jax.jit(sec)(x), reference(x), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(sec)(x), numerical_grad(reference, x), rtol=1e-5, atol=1e-8)
    assert reference(x) > 0.01


def test_equal_norms_zero_and_degenerate_finite():
    x = np.eye(4) * 3.0
    assert abs(float(sec(x))) < 1e-12
    for z in (np.zeros((5, 3)), np.tile([[1.0, 2.0]], (4, 1)), np.ones((1, 3))):
        value, grad = jax.value_and_grad(sec)(z)
        assert np.isfinite(value) and np.isfinite(grad).all()


def test_padding_and_bad_input():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 3))
    xp = np.concatenate([x, 100 * np.ones((2, 3))])
    np.testing.assert_allclose(sec(xp, valid=np.arange(8) < 6), sec(x), rtol=1e-12)
    with pytest.raises(ValueError, match="x"):
        sec(np.ones(3))
    with pytest.raises(ValueError, match="valid"):
        sec(x, valid=np.ones(5, bool))
