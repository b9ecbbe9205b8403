"""Multi-similarity mining and distance-weighted sampling against plain numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from dmljax import distances, masks
from dmljax.mining.weighting import (
    distance_weighted_probabilities,
    distance_weighted_sampling,
    multi_similarity_mining,
)
from tests.utils import random_batch


# ----------------------------------------------------------------------------- references


def np_ms_mining(sim, labels, epsilon):
    """Wang et al. 2019, Eq. 5-6, one anchor and one pair at a time."""
    n = len(labels)
    pos_keep = np.zeros((n, n), bool)
    neg_keep = np.zeros((n, n), bool)
    for a in range(n):
        pos = [sim[a, j] for j in range(n) if j != a and labels[j] == labels[a]]
        neg = [sim[a, j] for j in range(n) if labels[j] != labels[a]]
        for j in range(n):
            if j != a and labels[j] == labels[a] and neg and sim[a, j] - epsilon < max(neg):
                pos_keep[a, j] = True
            if labels[j] != labels[a] and pos and sim[a, j] + epsilon > min(pos):
                neg_keep[a, j] = True
    return pos_keep, neg_keep


def np_dws_probabilities(dist, labels, dim, cutoff, nonzero_loss_cutoff):
    """Wu et al. 2017 Sec. 4: weight q(d)^-1, clipped at the cutoff, zero beyond the cut-off."""
    n = len(labels)
    probs = np.zeros((n, n))
    for a in range(n):
        weights = np.zeros(n)
        for j in range(n):
            d = max(dist[a, j], cutoff)
            if labels[j] == labels[a] or d >= nonzero_loss_cutoff:
                continue
            q = d ** (dim - 2) * (1 - d * d / 4) ** ((dim - 3) / 2)
            weights[j] = 1.0 / q
        if weights.sum() == 0:  # fallback: uniform over negatives
            weights = np.array([float(labels[j] != labels[a]) for j in range(n)])
        if weights.sum() > 0:
            probs[a] = weights / weights.sum()
    return probs


def _masks(labels):
    return masks.label_masks(jnp.asarray(labels))


# ----------------------------------------------------------------------------- multi-similarity mining


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
def test_ms_mining_matches_loop(seed, epsilon):
    x, labels = random_batch(seed, batch=12, dim=4, classes=3)
    sim = np.asarray(distances.cosine_similarity(x))
    pos, neg = _masks(labels)
    pos_keep, neg_keep = multi_similarity_mining(sim, pos, neg, epsilon=epsilon)
    ref_pos, ref_neg = np_ms_mining(sim, labels, epsilon)
    np.testing.assert_array_equal(pos_keep, ref_pos)
    np.testing.assert_array_equal(neg_keep, ref_neg)
    # the mining really removes pairs at the paper's epsilon (the test can fail)
    if epsilon == 0.1:
        assert ref_neg.sum() < np.asarray(neg).sum()


def test_ms_mining_jit_and_empty_rows():
    x, _ = random_batch(batch=6, dim=3)
    sim = distances.cosine_similarity(x)
    labels = np.zeros(6, np.int32)  # no negatives anywhere -> nothing kept
    pos, neg = _masks(labels)
    pk, nk = jax.jit(multi_similarity_mining)(sim, pos, neg)
    assert not np.asarray(pk).any() and not np.asarray(nk).any()
    pos, neg = _masks(np.arange(6, dtype=np.int32))  # no positives -> nothing kept
    pk, nk = multi_similarity_mining(sim, pos, neg)
    assert not np.asarray(pk).any() and not np.asarray(nk).any()


def test_ms_mining_bad_input():
    sim = np.zeros((4, 4))
    m = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="^sim must have rank 2"):
        multi_similarity_mining(np.zeros(4), m, m)
    with pytest.raises(ValueError, match="^positive must have the shape"):
        multi_similarity_mining(sim, np.zeros((4, 3), bool), m)
    with pytest.raises(ValueError, match="^negative must be a bool"):
        multi_similarity_mining(sim, m, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="^epsilon must be >= 0"):
        multi_similarity_mining(sim, m, m, epsilon=-0.1)
    with pytest.raises(ValueError, match="^sim must be a floating"):
        multi_similarity_mining(np.zeros((4, 4), np.int32), m, m)


# ----------------------------------------------------------------------------- distance weighted


@pytest.mark.parametrize("dim", [2, 3, 8])
@pytest.mark.parametrize("cutoffs", [(0.5, 1.4), (0.2, 1.0), (0.5, 0.05)])
def test_dws_probabilities_match_loop(dim, cutoffs):
    cutoff, nonzero = cutoffs
    x, labels = random_batch(3, batch=10, dim=dim, classes=3)
    dist = np.asarray(distances.euclidean(x))
    pos, neg = _masks(labels)
    probs = distance_weighted_probabilities(dist, pos, neg, dim=dim, cutoff=cutoff, nonzero_loss_cutoff=nonzero)
    ref = np_dws_probabilities(dist, labels, dim, cutoff, nonzero)
    np.testing.assert_allclose(probs, ref, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.asarray(probs).sum(1), 1.0, rtol=1e-10)


def test_dws_determinism_jit_and_key_dependence():
    x, labels = random_batch(4, batch=12, dim=4, classes=3)
    dist = distances.euclidean(x)
    pos, neg = _masks(labels)
    f = lambda k: distance_weighted_sampling(k, dist, pos, neg, dim=4, num_negatives=3)  # noqa: E731
    a = f(jax.random.key(0))
    np.testing.assert_array_equal(a, f(jax.random.key(0)))
    np.testing.assert_array_equal(a, jax.jit(f)(jax.random.key(0)))
    np.testing.assert_array_equal(f(jax.random.PRNGKey(0)).sum(1), 3)  # legacy uint32 keys work too
    assert not np.array_equal(a, f(jax.random.key(1)))
    a = np.asarray(a)
    assert a.shape == (12, 12)
    np.testing.assert_array_equal(a.sum(1), 3)
    assert (a[~np.asarray(neg)] == 0).all(), "only negatives are ever drawn"


def test_dws_empirical_distribution_matches_weights():
    """Chi-square goodness of fit of many draws against the analytic probabilities."""
    x, labels = random_batch(5, batch=8, dim=3, classes=2)
    dist = np.asarray(distances.euclidean(x))
    pos, neg = _masks(labels)
    draws = 20000
    counts = np.asarray(distance_weighted_sampling(
        jax.random.key(42), dist, pos, neg, dim=3, cutoff=0.3, nonzero_loss_cutoff=1.9, num_negatives=draws))
    ref = np_dws_probabilities(dist, labels, 3, 0.3, 1.9)
    assert (counts[ref == 0] == 0).all()
    p_values = []
    for a in range(len(labels)):
        support = ref[a] > 0
        assert support.sum() >= 2
        observed, expected = counts[a, support], draws * ref[a, support]
        p_values.append(stats.chisquare(observed, expected).pvalue)
    # 8 independent tests: all above 1e-4 unless the sampler is wrong
    assert min(p_values) > 1e-4, p_values
    # and the weighting is far from uniform, so a uniform sampler would fail this test
    assert max(np.ptp(ref[a][ref[a] > 0]) for a in range(len(labels))) > 0.05


def test_dws_fallback_to_uniform_and_single_class():
    x, labels = random_batch(6, batch=8, dim=4, classes=2)
    dist = distances.euclidean(x)
    pos, neg = _masks(labels)
    # every negative beyond the cut-off -> uniform over negatives
    probs = np.asarray(distance_weighted_probabilities(dist, pos, neg, dim=4, nonzero_loss_cutoff=1e-3))
    negs = np.asarray(neg)
    np.testing.assert_allclose(probs, negs / negs.sum(1, keepdims=True))
    counts = np.asarray(distance_weighted_sampling(jax.random.key(0), dist, pos, neg, dim=4,
                                                   nonzero_loss_cutoff=1e-3, num_negatives=5))
    np.testing.assert_array_equal(counts.sum(1), 5)
    assert (counts[~negs] == 0).all()
    # one class fills the batch: no negatives -> all-zero rows, finite
    pos1, neg1 = _masks(np.zeros(8, np.int32))
    counts = np.asarray(distance_weighted_sampling(jax.random.key(0), dist, pos1, neg1, dim=4, num_negatives=None))
    assert np.isfinite(counts).all() and (counts == 0).all()


def test_dws_one_negative_per_positive_and_degenerate_distances():
    labels = np.array([0, 0, 0, 1, 1, 2], np.int32)
    pos, neg = _masks(labels)
    for dist in (np.zeros((6, 6)), np.full((6, 6), 2.0), np.full((6, 6), 3.0)):
        probs = np.asarray(distance_weighted_probabilities(dist, pos, neg, dim=8))
        assert np.isfinite(probs).all()
        counts = np.asarray(distance_weighted_sampling(jax.random.key(1), dist, pos, neg, dim=8, num_negatives=None))
        np.testing.assert_array_equal(counts.sum(1), np.asarray(pos).sum(1))
        assert (counts[~np.asarray(neg)] == 0).all()
    g = jax.grad(lambda d: jnp.sum(distance_weighted_probabilities(d, pos, neg, dim=8)))(jnp.zeros((6, 6)))
    assert np.isfinite(g).all()


def test_dws_bad_input():
    d = np.ones((4, 4))
    m = np.zeros((4, 4), bool)
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="^key must be a jax.random key"):
        distance_weighted_sampling(None, d, m, m, dim=3)
    with pytest.raises(ValueError, match="^dim must be a positive"):
        distance_weighted_sampling(k, d, m, m, dim=0)
    with pytest.raises(ValueError, match="^num_negatives must be"):
        distance_weighted_sampling(k, d, m, m, dim=3, num_negatives=0)
    with pytest.raises(ValueError, match="^cutoff must be > 0"):
        distance_weighted_sampling(k, d, m, m, dim=3, cutoff=-1.0)
    with pytest.raises(ValueError, match="^nonzero_loss_cutoff must be > 0"):
        distance_weighted_sampling(k, d, m, m, dim=3, nonzero_loss_cutoff=0.0)
    with pytest.raises(ValueError, match="^dist must have rank 2"):
        distance_weighted_sampling(k, np.ones(4), m, m, dim=3)
    with pytest.raises(ValueError, match="^negative must have the shape"):
        distance_weighted_sampling(k, d, m, np.zeros((3, 4), bool), dim=3)


@given(st.integers(0, 10_000))
def test_mining_equivariant_under_batch_permutation(seed):
    """Permuting the batch permutes the mined masks and the sampling distribution."""
    x, labels = random_batch(seed, batch=9, dim=3, classes=3)
    perm = np.random.default_rng(seed).permutation(9)
    sim = np.asarray(distances.cosine_similarity(x))
    dist = np.asarray(distances.euclidean(x))
    pos, neg = _masks(labels)
    pos_p, neg_p = _masks(labels[perm])
    pk, nk = multi_similarity_mining(sim, pos, neg)
    pk_p, nk_p = multi_similarity_mining(sim[perm][:, perm], pos_p, neg_p)
    np.testing.assert_array_equal(np.asarray(pk)[perm][:, perm], pk_p)
    np.testing.assert_array_equal(np.asarray(nk)[perm][:, perm], nk_p)
    probs = np.asarray(distance_weighted_probabilities(dist, pos, neg, dim=3))
    probs_p = distance_weighted_probabilities(dist[perm][:, perm], pos_p, neg_p, dim=3)
    np.testing.assert_allclose(probs[perm][:, perm], probs_p, rtol=1e-9, atol=1e-12)
