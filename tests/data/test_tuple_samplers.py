"""FixedSetOfTriplets, tuple weights and TuplesToWeightsSampler (PML samplers): validity,
determinism, restart, distributions, numpy / PML references for the weights, bad input."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.data import FixedSetOfTriplets, TuplesToWeightsSampler, tuple_counts, tuple_weights
from dmljax.distances import euclidean
from dmljax.masks import label_masks
from dmljax.mining import batch_hard, pair_margin
from tests.utils import random_batch


def _labels(num_classes=6, per_class=4, seed=0):
    labels = np.repeat(np.arange(num_classes) * 5 - 7, per_class)  # non-contiguous, negative ids
    return np.random.default_rng(seed).permutation(labels)


# --------------------------------------------------------------------------- FixedSetOfTriplets


def test_fixed_triplets_are_valid_and_fixed():
    labels = np.concatenate([_labels(), [100]])  # plus a singleton class
    sampler = FixedSetOfTriplets(labels, num_triplets=3000, triplets_per_batch=4, seed=1)
    t = sampler.triplets
    assert t.shape == (3000, 3) and t.dtype == np.int64
    a, p, n = t.T
    assert (labels[a] == labels[p]).all() and (labels[n] != labels[a]).all()
    singleton = labels[a] == 100
    assert singleton.any() and (a[singleton] == p[singleton]).all()
    assert (a[~singleton] != p[~singleton]).all()  # without replacement when the class allows
    # anchor classes uniform over the 7 classes; negative classes uniform over the other 6
    freq = np.array(list(collections.Counter(labels[a].tolist()).values())) / 3000
    np.testing.assert_allclose(freq, 1 / 7, atol=0.03)
    pair_freq = collections.Counter(zip(labels[a].tolist(), labels[n].tolist()))
    assert len(pair_freq) == 42  # every ordered pair of distinct classes occurs
    # every item of a class is used as anchor
    assert set(a.tolist()) == set(range(len(labels)))
    # same seed -> same triplets; another seed -> others
    np.testing.assert_array_equal(t, FixedSetOfTriplets(labels, num_triplets=3000, seed=1).triplets)
    assert not np.array_equal(t, FixedSetOfTriplets(labels, num_triplets=3000, seed=2).triplets)


def test_fixed_triplets_epochs_batches_and_restart():
    labels = _labels()
    sampler = FixedSetOfTriplets(labels, num_triplets=12, triplets_per_batch=3, seed=4)
    assert sampler.batch_size == 9 and sampler.steps_per_epoch == 4
    for epoch in range(2):
        rows = np.concatenate([sampler.batch_triplets(epoch * 4 + s) for s in range(4)])
        # each epoch visits every triplet exactly once
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, sampler.triplets.tolist()))
    batch = sampler.batch_indices(0)
    np.testing.assert_array_equal(batch, sampler.batch_triplets(0).reshape(-1))  # [a0, p0, n0, a1, ...]
    assert batch.shape == (9,) and batch.dtype == np.int64
    epoch0 = [sampler.batch_triplets(s).tolist() for s in range(4)]
    epoch1 = [sampler.batch_triplets(s).tolist() for s in range(4, 8)]
    assert epoch0 != epoch1  # re-shuffled every epoch
    uninterrupted = list(sampler.iterate(0, num_steps=10))
    state = sampler.state_dict(6)
    resumed = FixedSetOfTriplets(labels, num_triplets=12, triplets_per_batch=3, seed=state["seed"])
    for x, y in zip(uninterrupted[6:], resumed.iterate(state["step"], num_steps=4), strict=True):
        np.testing.assert_array_equal(x, y)
    for s in reversed(range(10)):
        np.testing.assert_array_equal(sampler.batch_indices(s), uninterrupted[s])
    # a remainder waits: 13 triplets, 3 per batch -> 4 steps per epoch, batches keep their size
    odd = FixedSetOfTriplets(labels, num_triplets=13, triplets_per_batch=3)
    assert odd.steps_per_epoch == 4 and all(odd.batch_indices(s).shape == (9,) for s in range(8))


def test_fixed_triplets_bad_input():
    labels = _labels()
    with pytest.raises(ValueError, match="two classes"):
        FixedSetOfTriplets(np.zeros(5, int), num_triplets=3)
    with pytest.raises(ValueError, match="num_triplets"):
        FixedSetOfTriplets(labels, num_triplets=0)
    with pytest.raises(ValueError, match="triplets_per_batch"):
        FixedSetOfTriplets(labels, num_triplets=3, triplets_per_batch=4)
    with pytest.raises(ValueError, match="labels"):
        FixedSetOfTriplets(labels.astype(float), num_triplets=3)
    with pytest.raises(ValueError, match="seed"):
        FixedSetOfTriplets(labels, num_triplets=3, seed=-1)
    with pytest.raises(ValueError, match="step"):
        FixedSetOfTriplets(labels, num_triplets=3).batch_indices(-1)


# --------------------------------------------------------------------------- tuple weights


def _bh_miner(e, l):
    pos, neg = label_masks(l)
    return batch_hard(euclidean(e), pos, neg)


def _pm_miner(e, l):
    pos, neg = label_masks(l)
    return pair_margin(euclidean(e), pos, neg, pos_margin=0.9, neg_margin=1.1)


def _np_weights(index_lists, b):
    """PML convert_to_weights from explicit index tuples, with numpy."""
    flat = np.concatenate([np.asarray(i, int) for i in index_lists]) if index_lists else np.zeros(0, int)
    if flat.size == 0:
        return np.ones(b)
    counts = np.bincount(flat, minlength=b).astype(float)
    return counts / counts.max()


def test_tuple_weights_match_explicit_tuples():
    x, y = random_batch(0, batch=12, dim=3, classes=3)
    # triplets from batch hard: (a, hardest p, hardest n) for every anchor, listed explicitly
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    a_list, p_list, n_list = [], [], []
    for a in range(12):
        pos = [j for j in range(12) if j != a and y[j] == y[a]]
        neg = [j for j in range(12) if y[j] != y[a]]
        a_list.append(a)
        p_list.append(max(pos, key=lambda j: d[a, j]))
        n_list.append(min(neg, key=lambda j: d[a, j]))
    got = jax.jit(lambda e, l: tuple_weights(e, l, miner=_bh_miner, tuples="triplets"))(x, y)
    np.testing.assert_allclose(got, _np_weights([a_list, p_list, n_list], 12), rtol=1e-12)
    # pairs from pair margin: (a1, p) with d > 0.9 and (a2, n) with d < 1.1
    same = (y[:, None] == y[None]) & ~np.eye(12, dtype=bool)
    a1, p = np.nonzero(same & (d > 0.9))
    a2, n = np.nonzero(~(y[:, None] == y[None]) & (d < 1.1))
    assert len(a1) and len(a2)
    got = tuple_weights(x, y, miner=_pm_miner, tuples="pairs")
    np.testing.assert_allclose(got, _np_weights([a1, p, a2, n], 12), rtol=1e-12)


def test_tuple_weights_edge_cases():
    x, y = random_batch(1, batch=8, dim=3, classes=2)
    nothing = tuple_weights(x, y, miner=lambda e, l: (jnp.zeros((8, 8)), jnp.zeros((8, 8))))
    np.testing.assert_array_equal(nothing, np.ones(8))  # PML: "weights + 1" when nothing is mined
    valid = np.arange(8) < 6
    w = tuple_weights(x, y, miner=lambda e, l: (jnp.zeros((8, 8)), jnp.zeros((8, 8))), valid=valid)
    np.testing.assert_array_equal(w, valid.astype(float))
    g = jax.grad(lambda e: jnp.sum(tuple_weights(e, y, miner=_bh_miner, tuples="triplets")))(x)
    assert np.all(np.asarray(g) == 0.0)  # weights carry no gradient
    counts = tuple_counts(jnp.eye(3, k=1), jnp.zeros((3, 3)), tuples="pairs")
    np.testing.assert_array_equal(counts, [1, 2, 1])
    with pytest.raises(ValueError, match="tuples"):
        tuple_weights(x, y, miner=_bh_miner, tuples="quadruplets")
    with pytest.raises(ValueError, match="miner"):
        tuple_weights(x, y, miner=None)
    with pytest.raises(ValueError, match="miner"):
        tuple_weights(x, y, miner=lambda e, l: jnp.zeros(()))
    with pytest.raises(ValueError, match="negative_weights"):
        tuple_counts(jnp.zeros((3, 3)), jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="labels"):
        tuple_weights(x, y[:5], miner=_bh_miner)


def test_tuple_weights_match_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, miners
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    x, y = random_batch(2, batch=12, dim=3, classes=3)
    lp = distances.LpDistance(normalize_embeddings=False)
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.long)
    for miner, ours, kind in [
        (miners.BatchHardMiner(distance=lp), _bh_miner, "triplets"),
        (miners.PairMarginMiner(pos_margin=0.9, neg_margin=1.1, distance=lp), _pm_miner, "pairs"),
    ]:
        expected = lmu.convert_to_weights(miner(xt, yt), yt, dtype=torch.float64).numpy()
        np.testing.assert_allclose(tuple_weights(x, y, miner=ours, tuples=kind), expected, rtol=1e-12)


# --------------------------------------------------------------------------- TuplesToWeightsSampler


def test_weighted_sampler_draws_in_proportion_to_the_weights():
    sampler = TuplesToWeightsSampler(50, subset_size=10, seed=3)
    rows = sampler.subset_indices(0)
    assert rows.shape == (10,) and len(set(rows.tolist())) == 10 and rows.max() < 50
    np.testing.assert_array_equal(rows, TuplesToWeightsSampler(50, subset_size=10, seed=3).subset_indices(0))
    assert not np.array_equal(rows, sampler.subset_indices(1))  # a new subset each epoch
    w = np.array([1.0, 0.5, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.25])
    full = sampler.dataset_weights(0, w)
    assert full.shape == (50,) and full.sum() == w.sum() and (full[rows] == w).all()
    draws = sampler.epoch_indices(0, w)
    assert draws.shape == (10,) and set(draws.tolist()) <= set(rows[w > 0].tolist())
    np.testing.assert_array_equal(draws, sampler.epoch_indices(0, w))  # deterministic
    big = TuplesToWeightsSampler(4, seed=0)
    assert len(big) == 4 and (big.subset_indices(5) == np.arange(4)).all()
    many = np.concatenate([big.epoch_indices(e, [4.0, 2.0, 1.0, 1.0]) for e in range(2000)])
    np.testing.assert_allclose(np.bincount(many, minlength=4) / many.size, [0.5, 0.25, 0.125, 0.125], atol=0.02)
    assert big.state_dict(7) == {"seed": 0, "epoch": 7}


def test_weighted_sampler_end_to_end_with_a_miner():
    labels = np.repeat(np.arange(5), 4)
    x = np.random.default_rng(0).normal(size=(20, 3))
    sampler = TuplesToWeightsSampler(20, subset_size=12, seed=0)
    rows = sampler.subset_indices(2)
    w = tuple_weights(x[rows], labels[rows], miner=_bh_miner, tuples="triplets")
    order = sampler.epoch_indices(2, np.asarray(w))
    assert order.shape == (12,) and set(order.tolist()) <= set(rows[np.asarray(w) > 0].tolist())


def test_weighted_sampler_bad_input():
    with pytest.raises(ValueError, match="subset_size"):
        TuplesToWeightsSampler(5, subset_size=6)
    with pytest.raises(ValueError, match="num_items"):
        TuplesToWeightsSampler(0)
    sampler = TuplesToWeightsSampler(5, subset_size=3)
    with pytest.raises(ValueError, match="subset_weights"):
        sampler.epoch_indices(0, np.ones(4))
    with pytest.raises(ValueError, match="subset_weights"):
        sampler.epoch_indices(0, np.zeros(3))
    with pytest.raises(ValueError, match="subset_weights"):
        sampler.epoch_indices(0, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="epoch"):
        sampler.subset_indices(-1)
