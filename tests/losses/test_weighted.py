"""Multi-similarity, margin, circle and log-ratio losses against plain numpy loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax import distances, masks
from dmljax.losses.weighted import circle_loss, log_ratio_loss, margin_loss, multi_similarity_loss
from dmljax.mining.weighting import distance_weighted_sampling
from tests.utils import (
    assert_finite_loss_and_grad,
    assert_jit_matches,
    degenerate_batches,
    numerical_grad,
    random_batch,
)

KEY = jax.random.key(7)


# ----------------------------------------------------------------------------- numpy references


def np_cos(x):
    n = len(x)
    s = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            ni, nj = np.linalg.norm(x[i]), np.linalg.norm(x[j])
            s[i, j] = x[i] @ x[j] / (ni * nj) if ni > 0 and nj > 0 else 0.0
    return s


def np_ms_loss(x, labels, alpha, beta, base, epsilon, mining):
    """Wang et al. 2019 Eq. 12 with the Eq. 5-6 mining, one anchor at a time."""
    s = np_cos(x)
    n = len(labels)
    total = 0.0
    for a in range(n):
        pos = [s[a, j] for j in range(n) if j != a and labels[j] == labels[a]]
        neg = [s[a, j] for j in range(n) if labels[j] != labels[a]]
        if mining:
            pos_kept = [v for v in pos if neg and v - epsilon < max(neg)]
            neg_kept = [v for v in neg if pos and v + epsilon > min(pos)]
        else:
            pos_kept, neg_kept = pos, neg
        total += math.log(1 + sum(math.exp(-alpha * (v - base)) for v in pos_kept)) / alpha
        total += math.log(1 + sum(math.exp(beta * (v - base)) for v in neg_kept)) / beta
    return total / n


def np_logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def np_circle_loss(x, labels, m, gamma, alpha_from=None):
    """Sun et al. 2020 Eq. 6-8, pair-wise form, averaged over anchors with both pair kinds.

    The weights alpha are constants of the optimisation step (no gradient through them):
    ``alpha_from`` gives the embeddings they are computed from (default: ``x``).
    """
    s = np_cos(x)
    s_alpha = s if alpha_from is None else np_cos(alpha_from)
    n = len(labels)
    losses = []
    for a in range(n):
        pos = [(s[a, j], s_alpha[a, j]) for j in range(n) if j != a and labels[j] == labels[a]]
        neg = [(s[a, j], s_alpha[a, j]) for j in range(n) if labels[j] != labels[a]]
        if not pos or not neg:
            continue
        # log(1 + sum_n exp(.) sum_p exp(.)) evaluated in logs: gamma = 256 overflows exp
        log_n = np_logsumexp([gamma * max(w + m, 0) * (v - m) for v, w in neg])
        log_p = np_logsumexp([-gamma * max(1 + m - w, 0) * (v - (1 - m)) for v, w in pos])
        z = log_n + log_p
        losses.append(z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z)))
    return sum(losses) / max(len(losses), 1)


def np_margin_loss(x, labels, beta, margin, nu, neg_counts=None):
    """Wu et al. 2017 Eq. 3-4; negatives from ``neg_counts`` [B, B] (None: all negatives once)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(labels)
    total, active = 0.0, 0.0
    for a in range(n):
        b = beta if np.ndim(beta) == 0 else beta[labels[a]]
        for j in range(n):
            d = np.sqrt(np.sum((xn[a] - xn[j]) ** 2))
            if j != a and labels[j] == labels[a]:
                loss = max(margin + d - b, 0.0)
                total += loss + nu * b
                active += loss > 0
            elif labels[j] != labels[a]:
                count = 1.0 if neg_counts is None else neg_counts[a, j]
                loss = max(margin - d + b, 0.0)
                total += count * loss
                active += count * (loss > 0)
    return total / max(active, 1.0)


def np_log_ratio_loss(x, targets, squared, eps=1e-6):
    """Kim et al. 2019 Eq. 2 over all triplets (a, i, j) with D(y_a, y_i) < D(y_a, y_j)."""
    targets = targets.reshape(len(x), -1)
    n = len(x)

    def dist(u, v):
        d2 = float(np.sum((u - v) ** 2))
        return d2 if squared else math.sqrt(d2)

    total, count = 0.0, 0
    for a in range(n):
        for i in range(n):
            for j in range(n):
                if len({a, i, j}) < 3:
                    continue
                dy_i, dy_j = dist(targets[a], targets[i]), dist(targets[a], targets[j])
                if not (dy_i < dy_j or (dy_i == dy_j and i < j)):
                    continue
                f = math.log((dist(x[a], x[i]) + eps) / (dist(x[a], x[j]) + eps))
                g = math.log((dy_i + eps) / (dy_j + eps))
                total += (f - g) ** 2
                count += 1
    return total / max(count, 1)


def _targets(seed, batch, k=2):
    return np.random.default_rng(seed + 100).normal(size=(batch, k))


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("mining", [True, False])
@pytest.mark.parametrize("seed, config", [(0, dict()), (1, dict(alpha=1.0, beta=10.0, base=0.2, epsilon=0.3))])
def test_multi_similarity_matches_loop(seed, mining, config):
    x, labels = random_batch(seed, batch=12, dim=4, classes=3, normalize=False)
    full = dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1) | config
    got = multi_similarity_loss(x, labels, mining=mining, **config)
    np.testing.assert_allclose(got, np_ms_loss(x, labels, mining=mining, **full), rtol=1e-5)


def test_multi_similarity_mining_changes_the_value():
    x, labels = random_batch(3, batch=12, dim=4, classes=3)
    assert abs(float(multi_similarity_loss(x, labels)) - float(multi_similarity_loss(x, labels, mining=False))) > 1e-6


@pytest.mark.parametrize("seed, m, gamma", [(0, 0.4, 80.0), (1, 0.25, 256.0), (2, 0.1, 2.0)])
def test_circle_matches_loop(seed, m, gamma):
    x, labels = random_batch(seed, batch=10, dim=4, classes=3, normalize=False)
    np.testing.assert_allclose(circle_loss(x, labels, m=m, gamma=gamma), np_circle_loss(x, labels, m, gamma), rtol=1e-5)


@pytest.mark.parametrize("beta_kind", ["scalar", "per_class"])
@pytest.mark.parametrize("margin, nu", [(0.2, 0.0), (0.5, 0.1)])
def test_margin_all_negatives_matches_loop(beta_kind, margin, nu):
    x, labels = random_batch(2, batch=12, dim=4, classes=3, normalize=False)
    beta = np.float64(1.2) if beta_kind == "scalar" else np.array([1.0, 1.2, 1.4])
    got = margin_loss(x, labels, beta, margin=margin, nu=nu, sampling="all")
    np.testing.assert_allclose(got, np_margin_loss(x, labels, beta, margin, nu), rtol=1e-5)


@pytest.mark.parametrize("num_negatives", [None, 2])
def test_margin_distance_weighted_matches_loop(num_negatives):
    x, labels = random_batch(3, batch=12, dim=4, classes=3, normalize=False)
    beta = np.array([1.0, 1.2, 0.9])
    dist = distances.euclidean(distances.l2_normalize(jnp.asarray(x)))
    pos, neg = masks.label_masks(jnp.asarray(labels))
    counts = np.asarray(distance_weighted_sampling(KEY, dist, pos, neg, dim=4, num_negatives=num_negatives))
    if num_negatives is None:
        np.testing.assert_array_equal(counts.sum(1), np.asarray(pos).sum(1))
    got = margin_loss(x, labels, beta, key=KEY, nu=0.05, num_negatives=num_negatives)
    np.testing.assert_allclose(got, np_margin_loss(x, labels, beta, 0.2, 0.05, counts), rtol=1e-5)
    assert abs(float(got) - np_margin_loss(x, labels, beta, 0.2, 0.05)) > 1e-6  # sampling matters


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_log_ratio_matches_triple_loop(squared, k):
    x, _ = random_batch(4, batch=9, dim=4, normalize=False)
    t = _targets(4, 9, k)
    t = t[:, 0] if k == 1 else t
    np.testing.assert_allclose(log_ratio_loss(x, t, squared=squared), np_log_ratio_loss(x, t, squared), rtol=1e-5)


def test_log_ratio_ties_in_labels_and_integer_targets():
    x, _ = random_batch(5, batch=8, dim=3, normalize=False)
    t = np.array([0, 1, 1, 2, 3, 3, 3, 5], np.int32)  # equal label distances: each pair once
    np.testing.assert_allclose(log_ratio_loss(x, t), np_log_ratio_loss(x, t.astype(float), True), rtol=1e-5)


# ----------------------------------------------------------------------------- gradients, jit


LOSSES = {
    "ms": lambda e, l: multi_similarity_loss(e, l),
    "ms_nomining": lambda e, l: multi_similarity_loss(e, l, mining=False, beta=10.0),
    "circle": lambda e, l: circle_loss(e, l, gamma=4.0),
    "margin_dws": lambda e, l: margin_loss(e, l, 1.0, key=KEY),
    "margin_all": lambda e, l: margin_loss(e, l, jnp.linspace(0.9, 1.1, 6), sampling="all", nu=0.1),
    "log_ratio": lambda e, l: log_ratio_loss(e, l.astype(jnp.float64) * 0.7),
}


# jitted once per module: eager op-by-op execution dominates the run time otherwise
JIT_LOSSES = {name: jax.jit(f) for name, f in LOSSES.items()}


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "circle"])
def test_gradients_numerical(name):
    x, labels = random_batch(5, batch=8, dim=3, classes=3, normalize=False)
    f = JIT_LOSSES[name]
    check_grads(lambda z: f(z, jnp.asarray(labels)), (x,), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)


def test_circle_gradient_treats_alphas_as_constants():
    """The paper (and PML) do not differentiate alpha_p, alpha_n: compare with finite
    differences of the reference in which the alphas are frozen at the current point."""
    x, labels = random_batch(5, batch=8, dim=3, classes=3, normalize=False)
    g = jax.grad(lambda z: circle_loss(z, jnp.asarray(labels), m=0.25, gamma=4.0))(x)
    frozen = x.copy()  # numerical_grad perturbs its argument in place
    num = numerical_grad(lambda z: np_circle_loss(z, labels, 0.25, 4.0, alpha_from=frozen), x.copy())
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-7)
    full = numerical_grad(lambda z: np_circle_loss(z, labels, 0.25, 4.0), x.copy())
    assert np.abs(full - num).max() > 1e-3  # the stop-gradient really matters


def test_margin_gradient_wrt_beta():
    x, labels = random_batch(6, batch=10, dim=3, classes=3, normalize=False)
    counts = np.asarray(distance_weighted_sampling(
        KEY, distances.euclidean(distances.l2_normalize(jnp.asarray(x))),
        *masks.label_masks(jnp.asarray(labels)), dim=3, num_negatives=None))
    for beta in (np.float64(1.1), np.array([0.9, 1.1, 1.3])):
        g = np.asarray(jax.jit(jax.grad(lambda b: margin_loss(x, labels, b, key=KEY, nu=0.3)))(beta))
        assert np.all(g != 0)
        ref = lambda b: np_margin_loss(x, labels, b, 0.2, 0.3, counts)  # noqa: E731
        eps = 1e-6
        num = np.array([(ref(beta + eps * e) - ref(beta - eps * e)) / (2 * eps)
                        for e in np.eye(np.size(beta)).reshape(-1, *np.shape(beta))])
        np.testing.assert_allclose(g.reshape(-1), num.reshape(-1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(LOSSES))
def test_jit_matches_eager(name):
    x, labels = random_batch(8, batch=10, dim=4, classes=3)
    assert_jit_matches(LOSSES[name], x, labels)


def test_jit_with_partial_config_and_vmap():
    x, labels = random_batch(9, batch=8, dim=4, classes=2)
    f = jax.jit(functools.partial(multi_similarity_loss, alpha=2.0, beta=40.0))
    np.testing.assert_allclose(f(x, labels), multi_similarity_loss(x, labels, beta=40.0), rtol=1e-12)
    xs = np.stack([x, x[::-1]])
    ls = np.stack([labels, labels[::-1]])
    for loss in (multi_similarity_loss, circle_loss):
        batched = jax.jit(jax.vmap(loss))(xs, ls)
        np.testing.assert_allclose(batched, [loss(x, labels)] * 2, rtol=1e-10)
    keys = jax.random.split(KEY, 2)
    batched = jax.jit(jax.vmap(lambda e, l, k: margin_loss(e, l, 1.2, key=k)))(xs, ls, keys)
    assert batched.shape == (2,) and np.isfinite(batched).all()
    batched = jax.jit(jax.vmap(lambda e, t: log_ratio_loss(e, t)))(xs, np.stack([_targets(0, 8)] * 2))
    assert batched.shape == (2,)


def test_bf16_inputs_accumulate_in_float32():
    x, labels = random_batch(10, batch=8, dim=4, classes=2)
    xb = jnp.asarray(x, jnp.bfloat16)
    for name, f in JIT_LOSSES.items():
        if name == "log_ratio":
            value = JIT_LOG_RATIO(xb, _targets(0, 8))
        else:
            value = f(xb, jnp.asarray(labels))
        assert value.dtype == jnp.float32 or value.dtype == jnp.float64, name
        assert np.isfinite(float(value))


# ----------------------------------------------------------------------------- degenerate, padding


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch_name", list(degenerate_batches()))
def test_degenerate_batches_finite(name, batch_name):
    e, l = degenerate_batches()[batch_name]
    assert_finite_loss_and_grad(JIT_LOSSES[name], e, l)


def test_degenerate_values():
    batches = degenerate_batches()
    for name in ("ms", "circle", "ms_nomining"):
        for which in ("single_class", "no_positives", "one_item"):
            e, l = batches[which]
            # no anchor has both kinds of pairs: MS mining keeps nothing, circle has no anchor
            if name == "ms_nomining" and which != "one_item":
                continue
            assert float(JIT_LOSSES[name](jnp.asarray(e), jnp.asarray(l))) == 0.0, (name, which)
    # margin 0: positive pairs at distance 0 contribute nothing
    e, l = batches["identical_embeddings"]
    assert float(margin_loss(e, l, 0.0, margin=0.0, sampling="all")) == 0.0
    # log-ratio with fewer than 3 items has no triplet
    assert float(log_ratio_loss(np.ones((2, 3)), np.ones(2))) == 0.0


PADDED = {
    "ms": lambda e, l, v: multi_similarity_loss(e, l, valid=v),
    "circle": lambda e, l, v: circle_loss(e, l, valid=v),
    "margin_all": lambda e, l, v: margin_loss(e, l, jnp.array([1.0, 1.2, 1.1]), sampling="all", nu=0.1, valid=v),
    "log_ratio": lambda e, l, v: log_ratio_loss(e, l.astype(jnp.float64), valid=v),
}


@pytest.mark.parametrize("name", list(PADDED))
def test_padding_is_ignored(name):
    x, labels = random_batch(11, batch=9, dim=4, classes=3)
    rng = np.random.default_rng(0)
    xp = np.concatenate([x, rng.normal(size=(3, 4))])
    lp = np.concatenate([labels, np.array([0, 1, 2], np.int32)])
    valid = np.arange(12) < 9
    f = jax.jit(PADDED[name])
    full = f(jnp.asarray(x), jnp.asarray(labels), None)
    padded = f(jnp.asarray(xp), jnp.asarray(lp), jnp.asarray(valid))
    np.testing.assert_allclose(padded, full, rtol=1e-10)
    g = jax.jit(jax.grad(f))(xp, jnp.asarray(lp), jnp.asarray(valid))
    assert np.all(g[9:] == 0)


def test_margin_out_of_range_labels():
    x, labels = random_batch(12, batch=8, dim=3, classes=3)
    beta = jnp.ones(3)
    with pytest.raises(ValueError, match="^labels must be class ids in \\[0, 3\\)"):
        margin_loss(x, labels + 1, beta, sampling="all")
    # under jit the values are unknown: rows with an out-of-range label are padding
    bad = labels.copy()
    bad[0] = 7
    jitted = jax.jit(lambda e, l: margin_loss(e, l, beta, sampling="all"))(x, bad)
    np.testing.assert_allclose(jitted, margin_loss(x[1:], labels[1:], beta, sampling="all"), rtol=1e-10)


# ----------------------------------------------------------------------------- bad input


def test_bad_input():
    x, labels = random_batch(13, batch=6, dim=3, classes=2)
    cases = [
        (lambda: multi_similarity_loss(x[0], labels), "^embeddings must have rank 2"),
        (lambda: multi_similarity_loss(x, labels[:5]), "^labels has batch size 5"),
        (lambda: multi_similarity_loss(x, labels.astype(float)), "^labels must be an integer"),
        (lambda: multi_similarity_loss(x, labels, alpha=0.0), "^alpha must be > 0"),
        (lambda: multi_similarity_loss(x, labels, epsilon=-1.0), "^epsilon must be >= 0"),
        (lambda: multi_similarity_loss(x, labels, valid=np.ones(5, bool)), "^valid must have shape"),
        (lambda: multi_similarity_loss(x, labels, reduction="max"), "^reduction must be one of"),
        (lambda: circle_loss(x, labels, m=-0.1), "^m must be >= 0"),
        (lambda: circle_loss(x, labels, gamma=0.0), "^gamma must be > 0"),
        (lambda: circle_loss(x.astype(np.int32), labels), "^embeddings must be a floating"),
        (lambda: margin_loss(x, labels, 1.2), "^key must be a jax.random key"),
        (lambda: margin_loss(x, labels, 1.2, margin=-0.1, sampling="all"), "^margin must be >= 0"),
        (lambda: margin_loss(x, labels, 1.2, nu=-1.0, sampling="all"), "^nu must be >= 0"),
        (lambda: margin_loss(x, labels, 1.2, sampling="hard"), "^sampling must be one of"),
        (lambda: margin_loss(x, labels, np.ones((2, 2)), sampling="all"), "^beta must be a scalar"),
        (lambda: margin_loss(x, labels, np.ones(2, np.int32), sampling="all"), "^beta must be a floating"),
        (lambda: margin_loss(x, labels, 1.2, key=KEY, num_negatives=0), "^num_negatives must be"),
        (lambda: log_ratio_loss(x, np.ones((5, 2))), "^targets has batch size 5"),
        (lambda: log_ratio_loss(x, np.ones((6, 2, 2))), "^targets must have shape"),
        (lambda: log_ratio_loss(x, np.ones(6, bool)), "^targets must be real valued"),
        (lambda: log_ratio_loss(x, np.ones(6), epsilon=0.0), "^epsilon must be > 0"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


# ----------------------------------------------------------------------------- properties


INVARIANT_LOSSES = [jax.jit(multi_similarity_loss), jax.jit(circle_loss),
                    jax.jit(lambda e, l: margin_loss(e, l, 1.1, sampling="all", nu=0.1))]
JIT_LOG_RATIO = jax.jit(log_ratio_loss)
JIT_LOG_RATIO_TINY_EPS = jax.jit(functools.partial(log_ratio_loss, epsilon=1e-12))


@given(st.integers(0, 10_000), st.integers(0, 5))
def test_invariances(seed, label_offset):
    """Permuting the batch, renaming labels and rotating the embeddings leave every loss unchanged."""
    x, labels = random_batch(seed, batch=8, dim=3, classes=3)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(8)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    renamed = (labels * 7 + label_offset) % 31  # injective on {0, 1, 2}
    t = _targets(seed, 8)
    for f in INVARIANT_LOSSES:
        base = float(f(x, labels))
        np.testing.assert_allclose(f(x[perm], labels[perm]), base, rtol=1e-9)
        np.testing.assert_allclose(f(x @ q, renamed.astype(np.int32)), base, rtol=1e-8)
    base = float(JIT_LOG_RATIO(x, t))
    np.testing.assert_allclose(JIT_LOG_RATIO(x[perm], t[perm]), base, rtol=1e-9)
    np.testing.assert_allclose(JIT_LOG_RATIO(x @ q + 1.0, t), base, rtol=1e-8)


@given(st.integers(0, 10_000), st.floats(0.1, 10.0), st.floats(0.1, 10.0))
def test_log_ratio_scale_invariance(seed, embedding_scale, target_scale):
    """Only ratios of distances matter: scaling embeddings or targets changes nothing (up to eps)."""
    x, _ = random_batch(seed, batch=7, dim=3, normalize=False)
    t = _targets(seed, 7, 2)
    f = JIT_LOG_RATIO_TINY_EPS
    base = float(f(x, t))
    scaled = float(f(embedding_scale * x, target_scale * t))
    np.testing.assert_allclose(scaled, base, rtol=1e-6)
