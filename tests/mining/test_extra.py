"""Extra miners (dmljax.mining.extra) against plain numpy loops of PML's rules."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmljax import distances
from dmljax.masks import label_masks
from dmljax.mining import extra
from tests.utils import degenerate_batches, random_batch

B, D, C = 10, 4, 3


def _setup(seed=0, batch=B, normalize=True):
    x, labels = random_batch(seed, batch=batch, dim=D, classes=C, normalize=normalize)
    d = np.asarray(distances.euclidean(x))
    pos, neg = label_masks(labels)
    return x, labels, d, np.asarray(pos), np.asarray(neg)


# --------------------------------------------------------------------------- angular


def ref_angular(x, labels, angle):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    pos_w, neg_w = np.zeros((n, n)), np.zeros((n, n))
    for a in range(n):
        for p in range(n):
            for q in range(n):
                if a == p or labels[a] != labels[p] or labels[a] == labels[q]:
                    continue
                c = (xn[a] + xn[p]) / 2
                ang = math.atan(np.linalg.norm(xn[a] - xn[p]) / (2 * np.linalg.norm(xn[q] - c)))
                if ang > math.radians(angle):
                    pos_w[a, p] += 1
                    neg_w[a, q] += 1
    return pos_w, neg_w


@pytest.mark.parametrize("angle", [10.0, 20.0, 35.0])
def test_angular_miner_matches_loop(angle):
    x, labels, *_ = _setup(1, normalize=False)
    out = jax.jit(functools.partial(extra.angular_miner, angle=angle))(x, labels)
    ref_p, ref_n = ref_angular(x, labels, angle)
    np.testing.assert_array_equal(out.positive_weights, ref_p)
    np.testing.assert_array_equal(out.negative_weights, ref_n)
    assert float(out.num_triplets) == ref_p.sum() > 0


# --------------------------------------------------------------------------- batch easy / hard


def ref_batch_easy_hard(d, pos, neg, ps, ns, prange, nrange):
    n = len(d)
    in_p = lambda v: prange is None or prange[0] <= v <= prange[1]  # noqa: E731
    in_n = lambda v: nrange is None or nrange[0] <= v <= nrange[1]  # noqa: E731
    out_p, out_n = np.zeros((n, n), bool), np.zeros((n, n), bool)
    for a in range(n):
        ps_cand = [j for j in range(n) if pos[a, j] and in_p(d[a, j])]
        ns_cand = [j for j in range(n) if neg[a, j] and in_n(d[a, j])]

        def choose_pos(cands):
            if not cands:
                return None
            key = (lambda j: d[a, j]) if ps == "easy" else (lambda j: -d[a, j])
            return min(cands, key=key)

        def choose_neg(cands):
            if not cands:
                return None
            key = (lambda j: -d[a, j]) if ns == "easy" else (lambda j: d[a, j])
            return min(cands, key=key)

        if ps == "semihard":
            q = choose_neg(ns_cand)
            p = None if q is None else choose_pos([j for j in ps_cand if d[a, j] < d[a, q]])
        elif ns == "semihard":
            p = choose_pos(ps_cand)
            q = None if p is None else choose_neg([j for j in ns_cand if d[a, j] > d[a, p]])
        else:
            p = None if ps == "all" else choose_pos(ps_cand)
            q = None if ns == "all" else choose_neg(ns_cand)
        if ps == "all":
            out_p[a] = pos[a]
        if ns == "all":
            out_n[a] = neg[a]
        if "all" not in (ps, ns) and (p is None or q is None):
            continue
        if p is not None:
            out_p[a, p] = True
        if q is not None:
            out_n[a, q] = True
    return out_p, out_n


STRATEGY_PAIRS = [("easy", "semihard"), ("hard", "hard"), ("semihard", "easy"), ("all", "hard"),
                  ("easy", "all"), ("hard", "easy"), ("all", "all")]


@pytest.mark.parametrize("ps, ns", STRATEGY_PAIRS)
@pytest.mark.parametrize("ranges", [None, (0.4, 1.4)])
def test_batch_easy_hard_matches_loop(ps, ns, ranges):
    x, labels, d, pos, neg = _setup(2)
    out = extra.batch_easy_hard(d, pos, neg, pos_strategy=ps, neg_strategy=ns,
                                allowed_pos_range=ranges, allowed_neg_range=ranges)
    ref_p, ref_n = ref_batch_easy_hard(d, pos, neg, ps, ns, ranges, ranges)
    np.testing.assert_array_equal(out.positive_weights, ref_p)
    np.testing.assert_array_equal(out.negative_weights, ref_n)


@pytest.mark.parametrize("ps, ns", STRATEGY_PAIRS[:3])
def test_batch_easy_hard_similarity_equals_negated_distance(ps, ns):
    x, labels, _, pos, neg = _setup(3)
    s = np.asarray(distances.cosine_similarity(x))
    a = extra.batch_easy_hard(s, pos, neg, pos_strategy=ps, neg_strategy=ns, similarity=True)
    b = extra.batch_easy_hard(-s, pos, neg, pos_strategy=ps, neg_strategy=ns)
    np.testing.assert_array_equal(a.positive_weights, b.positive_weights)
    np.testing.assert_array_equal(a.negative_weights, b.negative_weights)


# --------------------------------------------------------------------------- HDC / n-hardest / histogram / cluster


def ref_hdc(d, pos, neg, frac):
    n = len(d)
    out = []
    for mask, largest in ((pos, True), (neg, False)):
        pairs = [(i, j) for i in range(n) for j in range(n) if mask[i, j]]
        pairs.sort(key=lambda ij: -d[ij] if largest else d[ij])
        keep = np.zeros((n, n), bool)
        for ij in pairs[: math.ceil(frac * len(pairs))]:
            keep[ij] = True
        out.append(keep)
    return out


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.5, 1.0])
def test_hdc_matches_loop(frac):
    _, _, d, pos, neg = _setup(4)
    out = jax.jit(functools.partial(extra.hdc_miner, filter_percentage=frac))(d, pos, neg)
    ref_p, ref_n = ref_hdc(d, pos, neg, frac)
    np.testing.assert_array_equal(out.positive_weights, ref_p)
    np.testing.assert_array_equal(out.negative_weights, ref_n)


def test_hdc_cascade_shrinks_selection():
    _, _, d, pos, neg = _setup(4)
    first = extra.hdc_miner(d, pos, neg, filter_percentage=0.5)
    second = extra.hdc_miner(d, first.positive_weights, first.negative_weights, filter_percentage=0.5)
    ref_p, _ = ref_hdc(d, np.asarray(first.positive_weights), np.asarray(first.negative_weights), 0.5)
    np.testing.assert_array_equal(second.positive_weights, ref_p)
    assert np.all(np.asarray(second.positive_weights) <= np.asarray(first.positive_weights))


@pytest.mark.parametrize("n_neg", [1, 3, 50])
def test_n_hardest_matches_loop(n_neg):
    _, _, d, pos, neg = _setup(5)
    out = extra.n_hardest(d, pos, neg, n=n_neg)
    ref = np.zeros_like(neg)
    for a in range(len(d)):
        cands = sorted((j for j in range(len(d)) if neg[a, j]), key=lambda j: d[a, j])
        ref[a, cands[:n_neg]] = True
    np.testing.assert_array_equal(out.negative_weights, ref)
    np.testing.assert_array_equal(out.positive_weights, pos)


@pytest.mark.parametrize("k", [1, 2])
def test_hard_cluster_matches_loop(k):
    x, labels, _, pos, neg = _setup(6, batch=12)
    out = extra.hard_cluster_miner(x, labels, num_hard_classes=k)
    classes = sorted(set(labels.tolist()))
    means = {c: x[labels == c].mean(0) for c in classes}
    ref = np.zeros_like(neg)
    for a in range(len(x)):
        others = sorted((c for c in classes if c != labels[a]), key=lambda c: np.sum((means[c] - means[labels[a]]) ** 2))
        for j in range(len(x)):
            ref[a, j] = labels[j] in others[:k]
    np.testing.assert_array_equal(out.negative_weights, ref)
    np.testing.assert_array_equal(out.positive_weights, pos)


def test_uniform_histogram_counts_per_bin():
    _, _, d, pos, neg = _setup(7, batch=12)
    bins, per_bin = 5, 3
    out = jax.jit(functools.partial(extra.uniform_histogram_miner, num_bins=bins, pos_per_bin=per_bin,
                                    neg_per_bin=2))(jax.random.key(0), d, pos, neg)
    for weights, mask, k in ((out.positive_weights, pos, per_bin), (out.negative_weights, neg, 2)):
        weights = np.asarray(weights)
        assert np.all(weights[~mask] == 0)
        vals = d[mask]
        edges = np.linspace(vals.min(), vals.max(), bins + 1)
        for i in range(bins):
            last = i == bins - 1
            in_bin = mask & (d >= edges[i]) & ((d <= edges[i + 1]) if last else (d < edges[i + 1]))
            expected = k if in_bin.any() else 0
            assert weights[in_bin].sum() == expected, (i, weights[in_bin].sum(), expected)
    again = extra.uniform_histogram_miner(jax.random.key(0), d, pos, neg, num_bins=bins, pos_per_bin=per_bin,
                                          neg_per_bin=2)
    np.testing.assert_array_equal(again.positive_weights, out.positive_weights)


def test_uniform_histogram_is_uniform_within_a_bin():
    """One bin: every candidate is drawn with the same probability (chi-square style bound)."""
    _, _, d, pos, neg = _setup(8, batch=6)
    draws = 4000
    out = jax.jit(functools.partial(extra.uniform_histogram_miner, num_bins=1, pos_per_bin=draws, neg_per_bin=1))(
        jax.random.key(1), d, pos, neg)
    counts = np.asarray(out.positive_weights)[pos]
    expected = draws / pos.sum()
    assert counts.sum() == draws
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


# --------------------------------------------------------------------------- robustness


def _all_miners(x, labels, d, pos, neg):
    return {
        "angular": extra.angular_miner(x, labels),
        "easy_hard": extra.batch_easy_hard(d, pos, neg),
        "hdc": extra.hdc_miner(d, pos, neg),
        "histogram": extra.uniform_histogram_miner(jax.random.key(0), d, pos, neg, num_bins=4),
        "cluster": extra.hard_cluster_miner(x, labels),
        "n_hardest": extra.n_hardest(d, pos, neg, n=2),
    }


_all_miners_jit = jax.jit(_all_miners)  # compiled once per batch shape instead of op by op


@pytest.mark.parametrize("case", sorted(degenerate_batches()))
def test_degenerate_batches_give_valid_selections_and_finite_loss(case):
    x, labels = degenerate_batches()[case]
    d = distances.euclidean(x)
    pos, neg = label_masks(labels)
    for name, out in _all_miners_jit(x, labels, d, pos, neg).items():
        pw, nw = np.asarray(out[0]), np.asarray(out[1])
        assert np.all(np.isfinite(pw)) and np.all(np.isfinite(nw)), name
        assert np.all(pw[~np.asarray(pos)] == 0) and np.all(nw[~np.asarray(neg)] == 0), name

        def mined_contrastive(z, pw=pw, nw=nw):
            dz = distances.euclidean(z)
            return (jnp.sum(pw * dz) / max(pw.sum(), 1.0)
                    + jnp.sum(nw * jax.nn.relu(1.0 - dz)) / max(nw.sum(), 1.0))

        value, grad = jax.value_and_grad(mined_contrastive)(jnp.asarray(x))
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), name


def test_padded_rows_are_never_selected():
    x, labels, _, _, _ = _setup(9)
    valid = np.arange(B) < B - 3
    d = distances.euclidean(x)
    pos, neg = label_masks(labels, valid=valid)
    outs = dict(_all_miners_jit(x, labels, d, pos, neg))
    outs.update(jax.jit(lambda x, labels, valid: {  # compiled: eager dispatch cost seconds here
        "angular": extra.angular_miner(x, labels, valid=valid),
        "cluster": extra.hard_cluster_miner(x, labels, valid=valid)})(x, labels, valid))
    for name, out in outs.items():
        for w in out[:2]:
            w = np.asarray(w)
            assert np.all(w[~valid] == 0) and np.all(w[:, ~valid] == 0), name


_EQUIVARIANT = {
    "hard_cluster": jax.jit(lambda x, l, d, p, n: extra.hard_cluster_miner(x, l, num_hard_classes=1).negative_weights),
    "n_hardest": jax.jit(lambda x, l, d, p, n: extra.n_hardest(d, p, n, n=2).negative_weights),
    "angular": jax.jit(lambda x, l, d, p, n: extra.angular_miner(x, l).positive_weights),
    "easy_hard": jax.jit(lambda x, l, d, p, n: extra.batch_easy_hard(
        d, p, n, pos_strategy="hard", neg_strategy="hard").negative_weights),
}


@given(st.integers(0, 10_000))
def test_selections_are_permutation_equivariant(seed):
    """Permuting the batch permutes rows and columns of every deterministic selection."""
    x, labels, d, pos, neg = _setup(seed % 50)
    perm = np.random.default_rng(seed).permutation(B)
    ix = np.ix_(perm, perm)
    for name, fn in _EQUIVARIANT.items():
        base = np.asarray(fn(x, labels, d, pos, neg))
        moved = np.asarray(fn(x[perm], labels[perm], d[ix], pos[ix], neg[ix]))
        np.testing.assert_array_equal(moved, base[ix], err_msg=name)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, l, d, p, n: extra.batch_easy_hard(d, p, n, pos_strategy="medium"), "pos_strategy must be one of"),
        (lambda x, l, d, p, n: extra.batch_easy_hard(d, p, n, neg_strategy="x"), "neg_strategy must be one of"),
        (lambda x, l, d, p, n: extra.batch_easy_hard(d, p, n, pos_strategy="semihard", neg_strategy="semihard"),
         "pos_strategy and neg_strategy cannot both"),
        (lambda x, l, d, p, n: extra.batch_easy_hard(d, p, n, pos_strategy="all"), "pos_strategy: \"semihard\""),
        (lambda x, l, d, p, n: extra.batch_easy_hard(d, p, n, allowed_pos_range=(2.0, 1.0)), "allowed_pos_range"),
        (lambda x, l, d, p, n: extra.batch_easy_hard(d, p, n, allowed_neg_range=0.5), "allowed_neg_range"),
        (lambda x, l, d, p, n: extra.batch_easy_hard(d[0], p, n), "dist must have shape"),
        (lambda x, l, d, p, n: extra.hdc_miner(d, p.astype(np.int32), n), "positive must be a bool mask"),
        (lambda x, l, d, p, n: extra.hdc_miner(d, p, n[:-1]), "negative must have the shape"),
        (lambda x, l, d, p, n: extra.hdc_miner(d, p, n, filter_percentage=1.5), "filter_percentage must be"),
        (lambda x, l, d, p, n: extra.n_hardest(d, p, n, n=0), "n must be a positive int"),
        (lambda x, l, d, p, n: extra.n_hardest(d, p, n, similarity="yes"), "similarity must be a Python bool"),
        (lambda x, l, d, p, n: extra.uniform_histogram_miner(None, d, p, n), "key must be"),
        (lambda x, l, d, p, n: extra.uniform_histogram_miner(jax.random.key(0), d, p, n, num_bins=0), "num_bins"),
        (lambda x, l, d, p, n: extra.angular_miner(x, l, angle=-5.0), "angle must be"),
        (lambda x, l, d, p, n: extra.angular_miner(x, l.astype(np.float32)), "labels must be an integer"),
        (lambda x, l, d, p, n: extra.hard_cluster_miner(x, l, num_hard_classes=0), "num_hard_classes"),
        (lambda x, l, d, p, n: extra.hard_cluster_miner(x[0], l), "embeddings must have rank 2"),
    ],
)
def test_bad_input_raises(call, match):
    x, labels, d, pos, neg = _setup(0)
    with pytest.raises(ValueError, match=match):
        call(x, labels, d, pos, neg)
