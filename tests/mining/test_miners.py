"""In-batch miners (dmljax.mining.miners) against explicit per-anchor loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmljax import distances, masks
from dmljax.mining.miners import (
    batch_hard,
    hard_negatives,
    pair_margin,
    semihard_negatives,
    triplet_margin_stats,
)
from tests.utils import random_batch


def setup(seed=0, *, batch=12, dim=4, classes=3, metric="euclidean", pad=0):
    """dist [B, B], bool masks, python lists for the loops; the last ``pad`` rows are padding."""
    x, y = random_batch(seed, batch=batch, dim=dim, classes=classes)
    valid = np.arange(batch) < batch - pad
    pos, neg = masks.label_masks(y, valid=valid)
    dist = np.asarray(distances.pairwise(x, metric=metric))
    return dist, np.asarray(pos), np.asarray(neg), y, valid


def closer(sim):
    """key for "how close": larger is closer for similarities, smaller for distances."""
    return (lambda v: -v) if sim else (lambda v: v)


# ----------------------------------------------------------------------------- batch hard


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("pad", [0, 3])
def test_batch_hard_matches_loop(metric, pad):
    sim = metric == "cosine"
    dist, pos, neg, y, valid = setup(1, metric=metric, pad=pad)
    got = batch_hard(dist, pos, neg, similarity=sim)
    b = len(y)
    for a in range(b):
        p_list = [p for p in range(b) if valid[a] and valid[p] and p != a and y[p] == y[a]]
        n_list = [n for n in range(b) if valid[a] and valid[n] and y[n] != y[a]]
        ok = bool(p_list) and bool(n_list)
        assert bool(got.valid[a]) == ok
        want_p = np.zeros(b)
        want_n = np.zeros(b)
        if ok:
            # farthest positive, closest negative
            want_p[max(p_list, key=lambda p: closer(sim)(dist[a, p]))] = 1
            want_n[min(n_list, key=lambda n: closer(sim)(dist[a, n]))] = 1
        np.testing.assert_array_equal(got.positive_weights[a], want_p)
        np.testing.assert_array_equal(got.negative_weights[a], want_n)


def test_batch_hard_weights_carry_gradient():
    x, y = random_batch(2, batch=8, dim=3, classes=2)
    pos, neg = masks.label_masks(y)

    def hardest_gap(z):
        d = distances.euclidean(z)
        w = batch_hard(d, pos, neg)
        return jnp.sum(jnp.sum(w.positive_weights * d, 1) - jnp.sum(w.negative_weights * d, 1))

    g = jax.grad(hardest_gap)(x)
    assert np.isfinite(g).all() and np.abs(g).sum() > 0


# ----------------------------------------------------------------------------- semi-hard


def loop_semihard(dist, y, valid, margin, fallback, sim):
    b = len(y)
    index = np.zeros((b, b), int)
    ok = np.zeros((b, b), bool)
    c = closer(sim)
    for a in range(b):
        negs = [n for n in range(b) if valid[a] and valid[n] and y[n] != y[a]]
        for p in range(b):
            if not (valid[a] and valid[p] and p != a and y[p] == y[a]):
                continue
            dap = c(dist[a, p])
            semi = [n for n in negs if dap < c(dist[a, n]) < dap + margin]
            if semi:
                index[a, p], ok[a, p] = min(semi, key=lambda n: c(dist[a, n])), True
            elif negs and fallback == "tfa":
                outside = [n for n in negs if c(dist[a, n]) > dap]
                if outside:
                    index[a, p] = min(outside, key=lambda n: c(dist[a, n]))
                else:
                    index[a, p] = max(negs, key=lambda n: c(dist[a, n]))
                ok[a, p] = True
            elif negs and fallback == "hardest":
                index[a, p], ok[a, p] = min(negs, key=lambda n: c(dist[a, n])), True
    return index, ok


@pytest.mark.parametrize("fallback", ["none", "tfa", "hardest"])
@pytest.mark.parametrize("metric, margin", [("euclidean", 0.2), ("euclidean", 1.0), ("cosine", 0.3)])
def test_semihard_matches_loop(fallback, metric, margin):
    sim = metric == "cosine"
    dist, pos, neg, y, valid = setup(3, batch=14, dim=3, metric=metric, pad=2)
    got = semihard_negatives(dist, pos, neg, margin=margin, similarity=sim, fallback=fallback)
    want_index, want_ok = loop_semihard(dist, y, valid, margin, fallback, sim)
    np.testing.assert_array_equal(got.valid, want_ok)
    np.testing.assert_array_equal(np.where(want_ok, got.index, 0), want_index)
    np.testing.assert_array_equal(np.where(want_ok, 0, got.index), 0)
    assert want_ok.any()
    if fallback == "none" and margin == 0.2:
        assert not want_ok[pos].all()  # some pairs without a semi-hard negative: the case matters


# ----------------------------------------------------------------------------- hard negatives, pair margin


@pytest.mark.parametrize("mode", ["any", "all"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_hard_negatives_match_loop(mode, metric):
    sim = metric == "cosine"
    dist, pos, neg, y, valid = setup(4, metric=metric, pad=2)
    got = np.asarray(hard_negatives(dist, pos, neg, margin=0.3, similarity=sim, mode=mode))
    b = len(y)
    c = closer(sim)
    want = np.zeros((b, b), bool)
    for a in range(b):
        ps = [p for p in range(b) if pos[a, p]]
        for n in range(b):
            if neg[a, n] and ps:
                hits = [c(dist[a, n]) < c(dist[a, p]) + 0.3 for p in ps]
                want[a, n] = any(hits) if mode == "any" else all(hits)
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want[neg].all()


@pytest.mark.parametrize("metric, pos_margin, neg_margin", [("euclidean", 0.9, 1.2), ("cosine", 0.5, 0.1)])
def test_pair_margin_matches_loop(metric, pos_margin, neg_margin):
    sim = metric == "cosine"
    dist, pos, neg, y, valid = setup(5, metric=metric, pad=2)
    hp, hn = pair_margin(dist, pos, neg, pos_margin=pos_margin, neg_margin=neg_margin, similarity=sim)
    b = len(y)
    want_p = np.zeros((b, b), bool)
    want_n = np.zeros((b, b), bool)
    for i in range(b):
        for j in range(b):
            if sim:
                want_p[i, j] = pos[i, j] and dist[i, j] < pos_margin
                want_n[i, j] = neg[i, j] and dist[i, j] > neg_margin
            else:
                want_p[i, j] = pos[i, j] and dist[i, j] > pos_margin
                want_n[i, j] = neg[i, j] and dist[i, j] < neg_margin
    np.testing.assert_array_equal(hp, want_p)
    np.testing.assert_array_equal(hn, want_n)
    assert want_p.any() and want_n.any()


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_triplet_stats_match_loop(metric):
    sim = metric == "cosine"
    dist, pos, neg, y, valid = setup(6, metric=metric, pad=2)
    got = triplet_margin_stats(dist, pos, neg, margin=0.25, similarity=sim)
    b = len(y)
    c = closer(sim)
    total = active = 0
    for a in range(b):
        for p in range(b):
            for n in range(b):
                if pos[a, p] and neg[a, n]:
                    total += 1
                    active += c(dist[a, p]) - c(dist[a, n]) + 0.25 > 0
    assert float(got.num_triplets) == total and float(got.num_active) == active
    np.testing.assert_allclose(got.fraction_active, active / total, rtol=1e-6)
    np.testing.assert_allclose(got.mean_positive, dist[pos].mean(), rtol=1e-6)
    np.testing.assert_allclose(got.mean_negative, dist[neg].mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- jit, degenerate, bad input


MINERS = {
    "batch_hard": lambda d, p, n: batch_hard(d, p, n),
    "semihard": lambda d, p, n: semihard_negatives(d, p, n, margin=0.2, fallback="tfa"),
    "hard_negatives": lambda d, p, n: hard_negatives(d, p, n, margin=0.2),
    "pair_margin": lambda d, p, n: pair_margin(d, p, n, pos_margin=0.2, neg_margin=0.8),
    "stats": lambda d, p, n: triplet_margin_stats(d, p, n, margin=0.2),
}


@pytest.mark.parametrize("name", list(MINERS))
def test_jit_matches_eager(name):
    dist, pos, neg, *_ = setup(7)
    eager = MINERS[name](dist, pos, neg)
    jitted = jax.jit(MINERS[name])(dist, pos, neg)
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(j))


@pytest.mark.parametrize("name", list(MINERS))
@pytest.mark.parametrize("labels", [[0], [0, 0, 0, 0], [0, 1, 2, 3], [0, 1, 0, 1]])
def test_degenerate_masks(name, labels):
    labels = np.array(labels, np.int32)
    dist = np.zeros((len(labels), len(labels)))  # identical embeddings: every distance 0
    pos, neg = masks.label_masks(labels)
    out = MINERS[name](dist, pos, neg)
    for leaf in jax.tree.leaves(out):
        leaf = np.asarray(leaf)
        assert not (np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all())
    if name == "batch_hard":
        assert bool(np.asarray(out.valid).any()) == (len(set(labels.tolist())) > 1 and len(labels) > len(set(labels.tolist())))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d, p, n: batch_hard(d[0], p, n), "dist must have shape"),
        (lambda d, p, n: batch_hard(d, p[:2], n), "positive must have the shape of dist"),
        (lambda d, p, n: batch_hard(d, p, n.astype(np.int32)), "negative must be a bool mask"),
        (lambda d, p, n: batch_hard(d.astype(np.int32), p, n), "dist must be a floating"),
        (lambda d, p, n: batch_hard(d, p, n, similarity="yes"), "similarity must be a Python bool"),
        (lambda d, p, n: semihard_negatives(d, p, n, margin=-0.1), "margin must be >= 0"),
        (lambda d, p, n: semihard_negatives(d, p, n, margin=0.1, fallback="random"), "fallback must be one of"),
        (lambda d, p, n: hard_negatives(d, p, n, margin=-1.0), "margin must be >= 0"),
        (lambda d, p, n: hard_negatives(d, p, n, margin=0.1, mode="some"), "mode must be one of"),
        (lambda d, p, n: pair_margin(d, p, n, pos_margin=-0.1), "pos_margin must be >= 0"),
        (lambda d, p, n: pair_margin(d, p, n, neg_margin=float("nan")), "neg_margin must be finite"),
        (lambda d, p, n: triplet_margin_stats(d, p, n, margin=-0.5), "margin must be >= 0"),
    ],
)
def test_bad_input(call, match):
    dist, pos, neg, *_ = setup(8, batch=4)
    with pytest.raises(ValueError, match=match):
        call(dist, pos, neg)


# ----------------------------------------------------------------------------- invariance


@given(st.integers(0, 10_000))
def test_miners_are_permutation_equivariant(seed):
    """Relabelling the batch order permutes every miner's output the same way."""
    x, y = random_batch(seed, batch=9, dim=3, classes=3)
    perm = np.random.default_rng(seed).permutation(9)
    inv = np.argsort(perm)
    d = np.asarray(distances.euclidean(x))
    pos, neg = masks.label_masks(y)
    dp, pp, npm = d[perm][:, perm], np.asarray(pos)[perm][:, perm], np.asarray(neg)[perm][:, perm]
    permute = lambda m: np.asarray(m)[perm][:, perm]  # noqa: E731

    bh, bhp = jitted_batch_hard(d, pos, neg), jitted_batch_hard(dp, pp, npm)
    np.testing.assert_array_equal(permute(bh.positive_weights), bhp.positive_weights)
    np.testing.assert_array_equal(permute(bh.negative_weights), bhp.negative_weights)

    sh, shp = jitted_semihard(d, pos, neg), jitted_semihard(dp, pp, npm)
    np.testing.assert_array_equal(permute(sh.valid), shp.valid)
    # chosen negative columns map through the inverse permutation
    np.testing.assert_array_equal(np.where(shp.valid, inv[permute(sh.index)], 0), np.where(shp.valid, shp.index, 0))

    np.testing.assert_array_equal(permute(jitted_hard(d, pos, neg)), jitted_hard(dp, pp, npm))
    st_a, st_b = jitted_stats(d, pos, neg), jitted_stats(dp, pp, npm)
    assert float(st_a.num_active) == float(st_b.num_active)


jitted_batch_hard = jax.jit(batch_hard)
jitted_semihard = jax.jit(functools.partial(semihard_negatives, margin=0.4))
jitted_hard = jax.jit(functools.partial(hard_negatives, margin=0.3))
jitted_stats = jax.jit(functools.partial(triplet_margin_stats, margin=0.3))


def test_reference_form_rectangular_dist():
    """Miners accept [B, M] against a reference set (e.g. a cross-batch memory)."""
    rng = np.random.default_rng(9)
    x, ref = rng.normal(size=(5, 3)), rng.normal(size=(8, 3))
    y, ref_y = np.array([0, 1, 2, 0, 1], np.int32), (np.arange(8) % 3).astype(np.int32)
    pos, neg = masks.label_masks(y, ref_y)
    d = np.asarray(distances.euclidean(x, ref))
    bh = batch_hard(d, pos, neg)
    assert bh.positive_weights.shape == (5, 8)
    for a in range(5):
        assert int(np.argmax(bh.positive_weights[a])) == max(np.flatnonzero(pos[a]), key=lambda j: d[a, j])
    sh = semihard_negatives(d, pos, neg, margin=0.5, fallback="hardest")
    assert sh.index.shape == (5, 8) and bool(np.asarray(sh.valid).any())
