"""Maximum-loss subset miner (PML MaximumLossMiner): numpy reference, subsets, jit, gradients,
padding, degenerate batches and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.losses import triplet_margin_loss
from dmljax.mining import maximum_loss_miner, random_subsets
from tests.utils import degenerate_batches, random_batch

_LOSS = functools.partial(triplet_margin_loss, margin=0.3, reduction="mean")


def _cheap_loss(e, l, *, valid=None):
    """Mean squared distance over positive pairs (cheap to compile; the miner is loss-agnostic)."""
    pos = (l[:, None] == l[None, :]) & ~jnp.eye(l.shape[0], dtype=bool)
    if valid is not None:
        pos = pos & valid[:, None] & valid[None, :]
    d2 = jnp.sum(jnp.square(e[:, None, :] - e[None, :, :]), axis=-1)
    return jnp.sum(jnp.where(pos, d2, 0.0)) / jnp.maximum(jnp.sum(pos), 1)


def _np_triplet_mean(x, y, margin=0.3):
    """All-triplet hinge mean, plain loops (the loss evaluated on each subset)."""
    total, count = 0.0, 0
    for a in range(len(y)):
        for p in range(len(y)):
            if p == a or y[p] != y[a]:
                continue
            for n in range(len(y)):
                if y[n] == y[a]:
                    continue
                total += max(np.linalg.norm(x[a] - x[p]) - np.linalg.norm(x[a] - x[n]) + margin, 0.0)
                count += 1
    return total / max(count, 1)


@functools.lru_cache(maxsize=None)
def _miner(loss_fn=_cheap_loss, **kw):
    """One jitted miner per configuration (reused across tests: one compilation)."""
    return jax.jit(functools.partial(maximum_loss_miner, loss_fn=loss_fn, **kw))


def test_matches_numpy_reference():
    x, y = random_batch(0, batch=12, dim=3, classes=3)
    key = jax.random.key(3)
    out = _miner(_LOSS, subset_size=6, num_trials=4)(x, y, key)
    subsets = np.asarray(random_subsets(key, 12, subset_size=6, num_trials=4))
    losses = np.array([_np_triplet_mean(x[s], y[s]) for s in subsets])
    np.testing.assert_allclose(out.losses, losses, rtol=1e-6, atol=1e-12)
    best = int(np.argmax(losses))
    assert int(out.best) == best
    np.testing.assert_array_equal(out.indices, subsets[best])
    expected_mask = np.zeros(12, bool)
    expected_mask[subsets[best]] = True
    np.testing.assert_array_equal(out.mask, expected_mask)
    assert out.indices.shape == (6,) and out.mask.shape == (12,) and out.losses.shape == (4,)


def test_random_subsets_are_uniform_distinct_and_deterministic():
    subsets = np.asarray(random_subsets(jax.random.key(0), 10, subset_size=4, num_trials=2000))
    assert subsets.shape == (2000, 4) and subsets.min() >= 0 and subsets.max() < 10
    assert all(len(set(row)) == 4 for row in subsets)
    freq = np.bincount(subsets.ravel(), minlength=10) / subsets.size
    np.testing.assert_allclose(freq, 0.1, atol=0.012)  # 8000 draws: sd ~ 0.0034
    np.testing.assert_array_equal(subsets, random_subsets(jax.random.key(0), 10, subset_size=4, num_trials=2000))
    assert not np.array_equal(subsets, random_subsets(jax.random.key(1), 10, subset_size=4, num_trials=2000))
    # the full set is a permutation
    assert sorted(np.asarray(random_subsets(jax.random.key(2), 7, subset_size=7, num_trials=1))[0]) == list(range(7))


def test_jit_matches_eager_and_selection_has_no_gradient():
    x, y = random_batch(1, batch=10, dim=4, classes=2)
    key = jax.random.key(5)
    eager = maximum_loss_miner(x, y, key, loss_fn=_cheap_loss, subset_size=5, num_trials=3)
    jitted = _miner(subset_size=5, num_trials=3)(x, y, key)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)

    miner = _miner(subset_size=5, num_trials=3)

    def train_loss(e):
        r = miner(e, y, key)
        return _cheap_loss(e[r.indices], jnp.asarray(y)[r.indices]) + jnp.sum(r.losses)  # r.losses: no gradient

    idx = np.asarray(jitted.indices)
    grad = jax.jit(jax.grad(train_loss))(x)
    expected = jax.jit(jax.grad(lambda e: _cheap_loss(e[idx], y[idx])))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(grad)[~np.asarray(jitted.mask)] == 0.0)
    assert np.isfinite(np.asarray(grad)).all()


def test_vmap_over_keys():
    x, y = random_batch(2, batch=8, dim=3, classes=2)
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.jit(jax.vmap(lambda k: maximum_loss_miner(x, y, k, loss_fn=_cheap_loss, subset_size=4,
                                                             num_trials=2)))(keys)
    single = _miner(subset_size=4, num_trials=2)
    for i in range(3):
        np.testing.assert_array_equal(batched.indices[i], single(x, y, keys[i]).indices)


def test_padding_rows_are_not_drawn_and_valid_reaches_the_loss():
    x, y = random_batch(3, batch=10, dim=3, classes=2)
    valid = np.array([True] * 7 + [False] * 3)
    out = _miner(subset_size=6, num_trials=3)(x, y, jax.random.key(1), valid=valid)
    assert valid[np.asarray(out.indices)].all()
    seen = []

    def spy(e, l, *, valid):
        seen.append(valid.shape)
        return jnp.sum(valid) * 1.0

    out = maximum_loss_miner(x, y, jax.random.key(0), loss_fn=spy, subset_size=9, num_trials=2, valid=valid)
    assert seen == [(9,)]  # traced once under vmap, with the subset's validity
    np.testing.assert_array_equal(out.losses, [7.0, 7.0])  # every valid row is drawn before padding
    assert int(out.best) == 0  # ties go to the first trial


@pytest.mark.parametrize("name", ["single_class", "no_positives", "identical_embeddings", "zero_embeddings"])
def test_degenerate_batches(name):
    x, y = degenerate_batches()[name]
    out = _miner(subset_size=4, num_trials=3)(x, y, jax.random.key(0))
    assert np.isfinite(np.asarray(out.losses)).all()
    assert len(set(np.asarray(out.indices).tolist())) == 4 and int(np.sum(out.mask)) == 4


def test_bad_inputs_raise():
    x, y = random_batch(0, batch=6, dim=3, classes=2)
    key = jax.random.key(0)
    for kwargs, match in [
        ({"subset_size": 0}, "subset_size"),
        ({"subset_size": 7}, "subset_size"),
        ({"subset_size": 2.0}, "subset_size"),
        ({"subset_size": 3, "num_trials": 0}, "num_trials"),
        ({"subset_size": 3, "loss_fn": 1.0}, "loss_fn"),
        ({"subset_size": 3, "loss_fn": lambda e, l: e[:, 0]}, "loss_fn"),
        ({"subset_size": 3, "valid": np.ones(5, bool)}, "valid"),
    ]:
        kwargs = {"loss_fn": _cheap_loss, **kwargs}
        with pytest.raises(ValueError, match=match):
            maximum_loss_miner(x, y, key, **kwargs)
    with pytest.raises(ValueError, match="key"):
        maximum_loss_miner(x, y, None, loss_fn=_cheap_loss, subset_size=3)
    with pytest.raises(ValueError, match="labels"):
        maximum_loss_miner(x, y[:5], key, loss_fn=_cheap_loss, subset_size=3)
