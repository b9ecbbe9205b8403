"""Divide and conquer: learner slices, cluster masks partition the batch, per-cluster losses."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmljax.distances import l2_normalize
from dmljax.losses.triplet import triplet_margin_loss
from dmljax.methods.divide_conquer import (cluster_embeddings, cluster_masks, divide_and_conquer_loss,
                                           learner_slices, recluster_due, use_full_embedding)
from dmljax.metrics.clustering import normalized_mutual_info
from tests.utils import degenerate_batches, random_batch


@given(st.integers(1, 64), st.integers(1, 64))
def test_learner_slices_partition_the_dimensions(dim, k):
    if k > dim:
        with pytest.raises(ValueError, match="^num_learners"):
            learner_slices(dim, k)
        return
    s = learner_slices(dim, k)
    assert len(s) == k and s[0][0] == 0 and s[-1][1] == dim
    assert all(a[1] == b[0] for a, b in zip(s[:-1], s[1:]))
    sizes = [b - a for a, b in s]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@given(st.lists(st.integers(0, 3), min_size=1, max_size=16), st.integers(0, 2 ** 16))
def test_cluster_masks_partition_the_valid_batch(ids, seed):
    ids = np.asarray(ids, np.int32)
    valid = np.random.default_rng(seed).random(len(ids)) < 0.8
    m = np.asarray(cluster_masks(ids, 4, valid=valid))
    np.testing.assert_array_equal(m.sum(0), valid.astype(int))
    for k in range(4):
        np.testing.assert_array_equal(m[k], (ids == k) & valid)


_loss = functools.partial(triplet_margin_loss, margin=0.2, reduction="mean")
_loss_jit = jax.jit(_loss)


def test_loss_equals_sum_of_losses_on_each_cluster_subset():
    x, y = random_batch(0, batch=16, dim=6, classes=4, normalize=False)
    ids = (np.arange(16) % 2).astype(np.int32)
    f = jax.jit(functools.partial(divide_and_conquer_loss, loss_fn=_loss, num_learners=2))
    got = f(x, y, ids)
    want = 0.0
    for k, (a, b) in enumerate(learner_slices(6, 2)):
        sub = np.asarray(l2_normalize(x[ids == k, a:b]))
        want += float(_loss_jit(sub, y[ids == k]))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # merge phase: the ordinary loss on the full (normalised) embedding
    full = divide_and_conquer_loss(x, y, ids, loss_fn=_loss, num_learners=2, full_embedding=True)
    np.testing.assert_allclose(full, _loss(l2_normalize(x), y), rtol=1e-12)
    np.testing.assert_allclose(divide_and_conquer_loss(x, y, ids, loss_fn=_loss, num_learners=2), got, rtol=1e-10)
    # learner k's gradient only touches its own slice and its own cluster's items
    g = np.asarray(jax.jit(jax.grad(lambda z: f(z, y, ids)))(x))
    a0, b0 = learner_slices(6, 2)[0]
    assert np.all(g[ids == 1, a0:b0] == 0) and np.all(g[ids == 0, b0:] == 0)


def test_degenerate_batches_finite():
    f = jax.jit(jax.value_and_grad(functools.partial(divide_and_conquer_loss, loss_fn=_loss, num_learners=2)))
    for name, (x, y) in degenerate_batches().items():
        value, grad = f(x, y, np.zeros(len(y), np.int32))
        assert np.isfinite(value) and np.isfinite(grad).all(), name


def test_clustering_recovers_separated_groups_and_is_deterministic():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), 10)
    x = 5 * np.eye(4)[groups] + 0.1 * rng.normal(size=(30, 4))
    _, a1 = cluster_embeddings(jax.random.key(0), x, 3)
    _, a2 = cluster_embeddings(jax.random.key(0), x, 3)
    np.testing.assert_array_equal(a1, a2)
    assert normalized_mutual_info(groups, np.asarray(a1)) == pytest.approx(1.0)


def test_schedules_and_bad_input():
    assert [recluster_due(e, every=2) for e in range(5)] == [True, False, True, False, True]
    assert not use_full_embedding(80, total_steps=100, finetune_fraction=0.1)
    assert use_full_embedding(95, total_steps=100, finetune_fraction=0.1)
    x, y = random_batch(0, batch=6, dim=4, classes=2)
    with pytest.raises(ValueError, match="^cluster_ids"):
        divide_and_conquer_loss(x, y, np.zeros(5, np.int32), loss_fn=_loss, num_learners=2)
    with pytest.raises(ValueError, match="^num_learners"):
        divide_and_conquer_loss(x, y, np.zeros(6, np.int32), loss_fn=_loss, num_learners=5)
    with pytest.raises(ValueError, match="^loss_fn"):
        divide_and_conquer_loss(x, y, np.zeros(6, np.int32), loss_fn=None, num_learners=2)
    with pytest.raises(ValueError, match="^every"):
        recluster_due(1, every=0)
    with pytest.raises(ValueError, match="^finetune_fraction"):
        use_full_embedding(1, total_steps=10, finetune_fraction=2.0)
