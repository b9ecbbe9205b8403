"""Label-noise injection: exact rate, corruption models, determinism, validation."""

import functools

import jax
import numpy as np
import pytest

from dmljax.methods.label_noise import inject_label_noise


def _labels(n=200, classes=10):
    return (np.arange(n) % classes).astype(np.int32)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45, 1.0])
def test_rate_is_hit_exactly(kind, rate):
    y = _labels()
    noisy = np.asarray(inject_label_noise(jax.random.key(0), y, rate=rate, kind=kind))
    assert noisy.dtype == y.dtype and noisy.shape == y.shape
    assert np.sum(noisy != y) == round(rate * len(y))
    assert noisy.min() >= 0 and noisy.max() < 10


def test_pairflip_maps_to_next_class_and_symmetric_to_other_classes():
    y = _labels()
    pf = np.asarray(inject_label_noise(jax.random.key(1), y, rate=0.5, kind="pairflip"))
    flipped = pf != y
    np.testing.assert_array_equal(pf[flipped], (y[flipped] + 1) % 10)
    # symmetric: over many draws the new class is uniform over the 9 other classes
    counts = np.zeros((10, 10))
    for seed in range(20):
        s = np.asarray(inject_label_noise(jax.random.key(seed), y, rate=0.5, kind="symmetric"))
        for a, b in zip(y[s != y], s[s != y]):
            counts[a, b] += 1
    assert np.all(np.diag(counts) == 0)
    off = counts[~np.eye(10, dtype=bool)]
    assert off.min() > 0.4 * off.mean() and off.max() < 1.8 * off.mean()


def test_deterministic_under_key_and_jit():
    y = _labels(50, 5)
    a = inject_label_noise(jax.random.key(3), y, rate=0.3)
    b = inject_label_noise(jax.random.key(3), y, rate=0.3)
    c = inject_label_noise(jax.random.key(4), y, rate=0.3)
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))
    f = jax.jit(functools.partial(inject_label_noise, rate=0.3, num_classes=5))
    np.testing.assert_array_equal(f(jax.random.key(3), y), a)


def test_bad_input():
    y = _labels(20, 4)
    with pytest.raises(ValueError, match="^rate"):
        inject_label_noise(jax.random.key(0), y, rate=1.5)
    with pytest.raises(ValueError, match="^kind"):
        inject_label_noise(jax.random.key(0), y, rate=0.1, kind="asymmetric")
    with pytest.raises(ValueError, match="^num_classes"):
        inject_label_noise(jax.random.key(0), np.zeros(5, np.int32), rate=0.1)
    with pytest.raises(ValueError, match="^labels"):
        inject_label_noise(jax.random.key(0), y.astype(np.float32), rate=0.1)
    with pytest.raises(ValueError, match="^labels must lie"):
        inject_label_noise(jax.random.key(0), y, rate=0.1, num_classes=3)
    with pytest.raises(ValueError, match="^key"):
        inject_label_noise(None, y, rate=0.1)
