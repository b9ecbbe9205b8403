"""Per-anchor random subsampling of mined tuples: counts, support, determinism, uniformity."""

import jax
import numpy as np
import pytest

from dmljax.masks import label_masks
from dmljax.mining.subsample import triplets_per_anchor, tuples_per_anchor


def _mask(seed=0, b=9, m=11, p=0.5):
    return np.random.default_rng(seed).uniform(size=(b, m)) < p


@pytest.mark.parametrize("k", [1, 3, 5])
def test_exact_count_and_support(k):
    mask = _mask()
    mask[0] = False  # a row with nothing to keep
    mask[1, :2] = True
    mask[1, 2:] = False  # a row with fewer than k entries
    out = np.asarray(jax.jit(lambda key, w: tuples_per_anchor(key, w, k=k))(jax.random.key(0), mask))
    assert out.dtype == bool and out.shape == mask.shape
    np.testing.assert_array_equal(out.sum(1), np.minimum(mask.sum(1), k))
    assert not np.any(out & ~mask)


def test_real_weights_keep_their_values():
    rng = np.random.default_rng(1)
    w = np.where(_mask(1), rng.uniform(0.1, 2.0, size=(9, 11)), 0.0)
    out = np.asarray(tuples_per_anchor(jax.random.key(3), w, k=2))
    kept = out != 0
    np.testing.assert_array_equal(out[kept], w[kept])
    np.testing.assert_array_equal(kept.sum(1), np.minimum((w != 0).sum(1), 2))


def test_deterministic_per_key_and_k_at_least_width_is_identity():
    mask = _mask(2)
    a = tuples_per_anchor(jax.random.key(5), mask, k=2)
    b = tuples_per_anchor(jax.random.key(5), mask, k=2)
    c = tuples_per_anchor(jax.random.key(6), mask, k=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(tuples_per_anchor(jax.random.key(5), mask, k=11), mask)


def test_uniform_over_the_allowed_entries():
    """Each allowed entry of a row with n entries is kept with probability k / n."""
    mask = np.zeros((1, 8), bool)
    mask[0, [0, 2, 3, 5, 7]] = True
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda key: tuples_per_anchor(key, mask, k=2))(keys))[:, 0]
    freq = draws.mean(0)
    np.testing.assert_allclose(freq[mask[0]], 2 / 5, atol=0.03)  # 4 sigma ~ 0.031
    assert freq[~mask[0]].max() == 0
    # every 2-subset of the 5 entries appears about equally often (10 subsets, 400 each expected)
    codes = (draws[:, mask[0]] * (2 ** np.arange(5))).sum(1)
    counts = np.bincount(codes, minlength=32)[[3, 5, 6, 9, 10, 12, 17, 18, 20, 24]]
    assert counts.min() > 300 and counts.max() < 500


def test_triplets_per_anchor_support_and_validity():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    pos, neg = label_masks(labels)
    pos = np.asarray(pos)
    neg = np.asarray(neg)
    out = jax.jit(lambda key: triplets_per_anchor(key, pos, neg, k=6))(jax.random.key(1))
    p, n, valid = (np.asarray(v) for v in out)
    assert p.shape == n.shape == valid.shape == (8, 6)
    np.testing.assert_array_equal(valid[:, 0], pos.any(1) & neg.any(1))  # item 5 (class 2) has no positive
    rows = np.arange(8)[:, None]
    assert np.all(pos[rows, p][valid]) and np.all(neg[rows, n][valid])
    again = triplets_per_anchor(jax.random.key(1), pos, neg, k=6)
    np.testing.assert_array_equal(again.negative_index, n)


def test_triplets_per_anchor_uniform_and_weighted_negatives():
    pos = np.zeros((1, 6), bool)
    pos[0, [1, 2]] = True
    neg = np.zeros((1, 6), bool)
    neg[0, [3, 4, 5]] = True
    out = triplets_per_anchor(jax.random.key(2), pos, neg, k=6000)
    p, n = np.asarray(out.positive_index)[0], np.asarray(out.negative_index)[0]
    np.testing.assert_allclose(np.bincount(p, minlength=6)[[1, 2]] / 6000, 0.5, atol=0.03)
    np.testing.assert_allclose(np.bincount(n, minlength=6)[[3, 4, 5]] / 6000, 1 / 3, atol=0.03)
    w = np.array([[9.0, 0, 0, 1.0, 3.0, 0.0]])  # weight outside the negatives is ignored; 5 has weight 0
    out = triplets_per_anchor(jax.random.key(3), pos, neg, k=6000, negative_weights=w)
    np.testing.assert_allclose(np.bincount(np.asarray(out.negative_index)[0], minlength=6)[[3, 4, 5]] / 6000,
                               [0.25, 0.75, 0.0], atol=0.03)
    none = triplets_per_anchor(jax.random.key(3), pos, neg, k=2, negative_weights=np.zeros((1, 6)))
    assert not np.any(none.valid)


def test_bad_input():
    mask = _mask()
    with pytest.raises(ValueError, match="k"):
        tuples_per_anchor(jax.random.key(0), mask, k=0)
    with pytest.raises(ValueError, match="k"):
        tuples_per_anchor(jax.random.key(0), mask, k=2.0)
    with pytest.raises(ValueError, match="weights"):
        tuples_per_anchor(jax.random.key(0), mask[0], k=1)
    with pytest.raises(ValueError, match="key"):
        tuples_per_anchor(None, mask, k=1)
    with pytest.raises(ValueError, match="negative"):
        triplets_per_anchor(jax.random.key(0), mask, mask[:, :3], k=1)
    with pytest.raises(ValueError, match="negative_weights"):
        triplets_per_anchor(jax.random.key(0), mask, mask, k=1, negative_weights=np.ones(3))
