"""Lifted structured hard-negative batches: pairs are positive, negatives are the nearest ones."""

import functools

import jax
import numpy as np
import pytest

from dmljax.methods.lifted_sampling import lifted_hard_negative_batch
from tests.utils import random_batch


def test_pairs_and_nearest_negatives_match_numpy_loop():
    x, y = random_batch(0, batch=16, dim=4, classes=4)
    f = jax.jit(functools.partial(lifted_hard_negative_batch, num_pairs=3, negatives_per_pair=2))
    idx, ok = f(jax.random.key(0), x, y)
    idx2, _ = f(jax.random.key(0), x, y)
    np.testing.assert_array_equal(idx, idx2)
    assert idx.shape == (12,) and np.all(ok)
    for a, p, *negs in np.asarray(idx).reshape(3, 4):
        assert y[a] == y[p] and a != p
        score = [min(np.sum((x[a] - x[j]) ** 2), np.sum((x[p] - x[j]) ** 2)) if y[j] != y[a] else np.inf
                 for j in range(16)]
        assert all(y[j] != y[a] for j in negs) and len(set(negs)) == 2
        np.testing.assert_allclose(sorted(score[j] for j in negs), sorted(score)[:2], rtol=1e-10)


def test_degenerate_pools_are_flagged():
    x, _ = random_batch(0, batch=6, dim=3)
    _, ok = lifted_hard_negative_batch(jax.random.key(0), x, np.arange(6, dtype=np.int32), num_pairs=2,
                                       negatives_per_pair=2)
    assert not np.any(ok)  # no positive pair at all
    _, ok = lifted_hard_negative_batch(jax.random.key(0), x, np.zeros(6, np.int32), num_pairs=2,
                                       negatives_per_pair=2)
    ok = np.asarray(ok).reshape(2, 4)
    assert np.all(ok[:, :2]) and not np.any(ok[:, 2:])  # one class: no negatives


def test_bad_input():
    x, y = random_batch(0, batch=6, dim=3, classes=2)
    with pytest.raises(ValueError, match="^num_pairs"):
        lifted_hard_negative_batch(jax.random.key(0), x, y, num_pairs=0, negatives_per_pair=1)
    with pytest.raises(ValueError, match="^negatives_per_pair"):
        lifted_hard_negative_batch(jax.random.key(0), x, y, num_pairs=1, negatives_per_pair=7)
    with pytest.raises(ValueError, match="^labels"):
        lifted_hard_negative_batch(jax.random.key(0), x, y[:3], num_pairs=1, negatives_per_pair=1)


def test_valid_mask_and_large_pool_without_pool_squared_memory():
    """Padding items are never drawn; an item whose only class partner is padding is no anchor
    (the O(N log N) has_positive of the sorted labels, checked against a loop over pairs)."""
    x, _ = random_batch(1, batch=12, dim=3)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 6], np.int32)
    valid = np.ones(12, bool)
    valid[[1, 2, 11]] = False  # classes 0, 1, 6 lose their partner
    has_pos = [valid[i] and any(valid[j] and y[j] == y[i] for j in range(12) if j != i) for i in range(12)]
    f = jax.jit(functools.partial(lifted_hard_negative_batch, num_pairs=40, negatives_per_pair=3))
    idx, ok = f(jax.random.key(3), x, y, valid=valid)
    idx = np.asarray(idx).reshape(40, 5)
    assert np.all(ok)
    assert set(idx[:, 0]) == {i for i in range(12) if has_pos[i]}  # 40 draws hit both classes 2 and 3
    assert np.all(valid[idx]) and np.all(y[idx[:, 0]] == y[idx[:, 1]]) and np.all(idx[:, 0] != idx[:, 1])
