"""Alternating-projection regulariser: representatives of the repeated batches, targets, gradient."""

import functools

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

from dmljax.data.samplers import RepeatedCompositionSampler
from dmljax.methods.alternating_projection import (alternating_projection_regularizer, projection_targets,
                                                   representative_mask)
from tests.utils import random_batch


def test_representative_mask_matches_the_sampler_layout():
    labels = np.repeat(np.arange(6), 5)
    sampler = RepeatedCompositionSampler(labels, classes_per_batch=3, samples_per_class=4, repeat=3,
                                         representatives_per_class=2, seed=0)
    mask = np.asarray(representative_mask(classes_per_batch=3, samples_per_class=4, representatives_per_class=2))
    assert mask.tolist() == [True, True, False, False] * 3
    # the items marked as representatives are the ones repeated across the T steps of a block
    b0, b1 = sampler.batch_indices(0), sampler.batch_indices(1)
    np.testing.assert_array_equal(b0[mask], b1[mask])


def np_regularizer(x, z, reps, weight):
    total, count = 0.0, 0
    for i in range(len(x)):
        if reps[i]:
            total += np.sum((x[i] - z[i]) ** 2)
            count += 1
    return weight * total / max(count, 1)


def test_regularizer_matches_numpy_grads_and_jit():
    x, _ = random_batch(0, batch=8, dim=4)
    z, _ = random_batch(1, batch=8, dim=4)
    reps = np.arange(8) % 4 < 2
    f = functools.partial(alternating_projection_regularizer, weight=0.3)
    np.testing.assert_allclose(f(x, z, reps), np_regularizer(x, z, reps, 0.3), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(f)(x, z, reps), f(x, z, reps), rtol=1e-12)
    check_grads(lambda e: f(e, z, reps), (x,), order=1, modes=["rev"])
    g = np.asarray(jax.grad(lambda e: f(e, z, reps))(x))
    np.testing.assert_array_equal(g[~reps], 0.0)
    np.testing.assert_allclose(g[reps], 2 * 0.3 * (x - z)[reps] / reps.sum(), rtol=1e-12)
    # targets carry no gradient; no representative -> 0 with zero gradient
    assert np.all(np.asarray(jax.grad(lambda t: f(x, t, reps))(z)) == 0)
    assert float(f(x, z, np.zeros(8, bool))) == 0.0


def test_targets_refresh_at_block_starts_only():
    x, _ = random_batch(0, batch=4, dim=3)
    old = np.zeros_like(x)
    np.testing.assert_array_equal(projection_targets(old, x, 6, repeat=3), x)
    np.testing.assert_array_equal(projection_targets(old, x, 7, repeat=3), old)
    jitted = jax.jit(functools.partial(projection_targets, repeat=3))
    np.testing.assert_array_equal(jitted(old, x, 9), x)


def test_bad_input():
    x, _ = random_batch(0, batch=4, dim=3)
    with pytest.raises(ValueError, match="^targets"):
        alternating_projection_regularizer(x, x[:2], np.ones(4, bool))
    with pytest.raises(ValueError, match="^representatives"):
        alternating_projection_regularizer(x, x, np.ones(3, bool))
    with pytest.raises(ValueError, match="^weight"):
        alternating_projection_regularizer(x, x, np.ones(4, bool), weight=-1.0)
    with pytest.raises(ValueError, match="^representatives_per_class"):
        representative_mask(classes_per_batch=2, samples_per_class=2, representatives_per_class=3)
    with pytest.raises(ValueError, match="^repeat"):
        projection_targets(x, x, 0, repeat=0)
