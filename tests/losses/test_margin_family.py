"""Margin-family losses (dmljax.losses.margin_family) against plain numpy loops from the papers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.losses import margin_family as mf
from tests.utils import assert_finite_loss_and_grad, assert_jit_matches, degenerate_batches, random_batch

B, D, C = 8, 4, 3


def _cos(u, v):
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def _pairs(labels):
    n = len(labels)
    pos = [(a, p) for a in range(n) for p in range(n) if a != p and labels[a] == labels[p]]
    neg = [(a, q) for a in range(n) for q in range(n) if labels[a] != labels[q]]
    return pos, neg


# --------------------------------------------------------------------------- references


def ref_tuplet(x, labels, margin=5.73, scale=64.0):
    m = math.radians(margin)
    pos, _ = _pairs(labels)
    losses = []
    for a, p in pos:
        theta = math.acos(max(-1.0, min(1.0, _cos(x[a], x[p]))))
        total = 0.0
        for n in range(len(x)):
            if labels[n] != labels[a]:
                total += math.exp(scale * (_cos(x[a], x[n]) - math.cos(theta - m)))
        losses.append(math.log(1.0 + total))
    return float(np.mean(losses)) if losses else 0.0


def ref_ipv(x, labels, pos_eps=0.01, neg_eps=0.01):
    pos, neg = _pairs(labels)
    out = 0.0
    if pos:
        s = [_cos(x[a], x[p]) for a, p in pos]
        mean = np.mean(s)
        out += np.mean([max(0.0, (1 - pos_eps) * mean - v) ** 2 for v in s])
    if neg:
        s = [_cos(x[a], x[q]) for a, q in neg]
        mean = np.mean(s)
        out += np.mean([max(0.0, v - (1 + neg_eps) * mean) ** 2 for v in s])
    return out


def ref_snr_distance(u, v):
    return np.var(v - u) / np.var(u)


def ref_snr_contrastive(x, labels, pos_margin=0.0, neg_margin=1.0, regularizer_weight=0.1):
    pos, neg = _pairs(labels)

    def avg_nonzero(values):
        nz = [v for v in values if v > 0]
        return sum(nz) / len(nz) if nz else 0.0

    lp = avg_nonzero([max(0.0, ref_snr_distance(x[a], x[p]) - pos_margin) for a, p in pos])
    ln = avg_nonzero([max(0.0, neg_margin - ref_snr_distance(x[a], x[q])) for a, q in neg])
    reg = np.mean([abs(np.sum(row)) for row in x])
    return lp + ln + regularizer_weight * reg


def ref_tcm(x, labels, lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5):
    pos, neg = _pairs(labels)
    ps = [margin_plus - _cos(x[a], x[p]) for a, p in pos if _cos(x[a], x[p]) <= margin_plus]
    ns = [_cos(x[a], x[q]) - margin_minus for a, q in neg if _cos(x[a], x[q]) >= margin_minus]
    return lambda_plus * (np.mean(ps) if ps else 0.0) + lambda_minus * (np.mean(ns) if ns else 0.0)


def ref_p2sgrad(x, labels, w):
    total = 0.0
    for i in range(len(x)):
        for c in range(len(w)):
            total += (_cos(x[i], w[c]) - (1.0 if labels[i] == c else 0.0)) ** 2
    return total / (len(x) * len(w))


def ref_dsm(x, labels, hist, min_val=-2.0, num_bins=10, momentum=0.01):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    delta = 2 * abs(min_val) / num_bins
    ts = []
    for a in range(len(x)):
        for p in range(len(x)):
            for n in range(len(x)):
                if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
                    ts.append(np.linalg.norm(xn[a] - xn[p]) - np.linalg.norm(xn[a] - xn[n]))
    if not ts:
        return 0.0, np.array(hist, float)
    batch = np.zeros(num_bins)
    for t in ts:
        k = int(math.floor((t - min_val) / delta))
        frac = (t - min_val) / delta - k
        batch[k] += 1 - frac
        if k + 1 < num_bins:
            batch[k + 1] += frac
    mom = momentum if np.sum(hist) != 0 else 1.0
    new = (1 - mom) * np.asarray(hist, float) + mom * batch
    new /= new.sum()
    cdf = np.cumsum(new)
    loss = np.mean([cdf[int(math.floor((t - min_val) / delta))] * t for t in ts])
    return loss, new


def ref_manifold(x, meta, proxies, lambda_c=1.0, alpha=0.8, margin=5e-4):
    nodes = np.concatenate([x, proxies])
    n, b, k = len(nodes), len(x), len(proxies)
    s = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                s[i, j] = math.exp(max(_cos(nodes[i], nodes[j]), 0.0) / 0.5)
    deg = s.sum(1)
    s_bar = s / np.sqrt(np.outer(deg, deg))
    f = (1 - alpha) * np.linalg.inv(np.eye(n) - alpha * s_bar)

    def term(score):
        out = []
        for i in range(b):
            total = 0.0
            for c in range(k):
                z = score(i, c) - score(i, meta[i]) + margin
                if c != meta[i] and z >= 0:
                    total += math.exp(z)
            out.append(math.log1p(total))
        return np.mean(out)

    loss_int = term(lambda i, c: f[i, b + c])
    loss_ctx = term(lambda i, c: _cos(f[i], f[b + c]))
    return loss_int + lambda_c * loss_ctx


# --------------------------------------------------------------------------- cases

W_RNG = np.random.default_rng(7)
WEIGHTS = W_RNG.normal(size=(C, D))
PROXIES = W_RNG.normal(size=(4, D))
META = (np.arange(B) % 4).astype(np.int32)


def _dsm_value(x, labels, *, hist=None, **kw):
    hist = jnp.zeros(10) if hist is None else hist
    return mf.dynamic_soft_margin_loss(x, labels, hist, **kw)[0]


# name -> (dmljax fn(x, labels, **kw), numpy reference(x, labels, **kw), config)
CASES = {
    "tuplet": (mf.tuplet_margin_loss, ref_tuplet, dict(margin=5.73, scale=16.0)),
    "tuplet_default": (mf.tuplet_margin_loss, ref_tuplet, {}),
    "ipv": (mf.intra_pair_variance_loss, ref_ipv, dict(pos_eps=0.05, neg_eps=0.02)),
    "snr": (mf.snr_contrastive_loss, ref_snr_contrastive, dict(neg_margin=1.5)),
    "tcm": (mf.threshold_consistent_margin_loss, ref_tcm, dict(margin_plus=0.5, margin_minus=0.0)),
    "p2sgrad": (lambda x, l, **kw: mf.p2sgrad_loss(x, l, WEIGHTS, **kw),
                lambda x, l: ref_p2sgrad(x, l, WEIGHTS), {}),
    "dsm": (_dsm_value, lambda x, l: ref_dsm(x, l, np.zeros(10))[0], {}),
    "manifold": (lambda x, l, **kw: mf.manifold_loss(x, META, PROXIES, **kw),
                 lambda x, l, **kw: ref_manifold(x, META, PROXIES, **kw), dict(lambda_c=0.5, margin=0.01)),
}


_JITTED = {}


def jitted(name):
    """One compiled function per case, shared by the tests (same shapes -> compiled once)."""
    if name not in _JITTED:
        fn, _, config = CASES[name]
        _JITTED[name] = jax.jit(functools.partial(fn, **config))
    return _JITTED[name]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_reference(name, seed):
    fn, ref, config = CASES[name]
    x, labels = random_batch(seed, batch=B, dim=D, classes=C, normalize=(seed == 0))
    value = jitted(name)(x, labels)
    np.testing.assert_allclose(float(value), ref(x, labels, **config), rtol=1e-5, atol=1e-10)


def test_dsm_histogram_state_matches_reference_over_steps():
    hist = jnp.zeros(10)
    ref_hist = np.zeros(10)
    step = jax.jit(functools.partial(mf.dynamic_soft_margin_loss, momentum=0.3))
    for seed in range(3):
        x, labels = random_batch(seed, batch=B, dim=D, classes=C)
        loss, hist = step(x, labels, hist)
        ref_loss, ref_hist = ref_dsm(x, labels, ref_hist, momentum=0.3)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(hist), ref_hist, rtol=1e-5, atol=1e-12)
    # a batch without triplets leaves the state alone
    x, _ = random_batch(5, batch=B, dim=D)
    loss, same = step(x, np.zeros(B, np.int32), hist)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(np.asarray(same), np.asarray(hist))


GRAD_CASES = {
    "tuplet": lambda z, l: mf.tuplet_margin_loss(z, l, scale=8.0),
    "ipv": lambda z, l: mf.intra_pair_variance_loss(z, l, pos_eps=0.2, neg_eps=0.2),
    "snr": lambda z, l: mf.snr_contrastive_loss(z, l, neg_margin=2.0),
    "tcm": lambda z, l: mf.threshold_consistent_margin_loss(z, l, margin_plus=0.5, margin_minus=-0.2),
    "p2sgrad_emb": lambda z, l: mf.p2sgrad_loss(z, l, WEIGHTS),
    # momentum 0 with a prior histogram: the CDF weights are constants, the loss smooth
    "dsm": lambda z, l: mf.dynamic_soft_margin_loss(z, l, jnp.linspace(0.1, 1.0, 10), momentum=0.0)[0],
    "manifold": lambda z, l: mf.manifold_loss(z, META, PROXIES, margin=0.01),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients(name):
    x, labels = random_batch(3, batch=B, dim=D, classes=C)
    f = jax.jit(functools.partial(GRAD_CASES[name], l=labels))
    check_grads(f, (x,), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)


def test_gradients_of_learnable_arrays():
    x, labels = random_batch(4, batch=B, dim=D, classes=C)
    check_grads(jax.jit(lambda w: mf.p2sgrad_loss(x, labels, w)), (WEIGHTS,), order=1, modes=["rev"])
    check_grads(jax.jit(lambda p: mf.manifold_loss(x, META, p, margin=0.01)), (PROXIES,), order=1, modes=["rev"],
                atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_matches_eager(name):
    fn, _, config = CASES[name]
    x, labels = random_batch(2, batch=B, dim=D, classes=C)
    assert_jit_matches(fn, x, labels, rtol=1e-9, **config)


@pytest.mark.parametrize("name", sorted(CASES))
def test_degenerate_batches_finite(name):
    fn = CASES[name][0]
    if name == "manifold":  # the batch sizes here differ from META's
        fn = lambda z, l: mf.manifold_loss(z, np.zeros(len(z), np.int32), PROXIES)  # noqa: E731
    fn = jax.jit(fn)  # one jit object for all cases: compiled once per shape, not op by op
    for case, (x, labels) in degenerate_batches(batch=4, dim=D).items():
        assert_finite_loss_and_grad(fn, x, labels)


@pytest.mark.parametrize("name", ["tuplet", "ipv", "snr", "tcm", "p2sgrad", "dsm", "manifold"])
def test_padding_mask_equals_unpadded_batch(name):
    fn, _, config = CASES[name]
    x, labels = random_batch(6, batch=B, dim=D, classes=C)
    if name == "manifold":
        fn = lambda z, l, **kw: mf.manifold_loss(z, np.arange(len(z)) % 4, PROXIES, **kw)  # noqa: E731
    padded_x = np.concatenate([x, np.random.default_rng(0).normal(size=(3, D))])
    padded_l = np.concatenate([labels, np.array([0, 1, 2], np.int32)])
    valid = np.arange(B + 3) < B
    fn = jax.jit(functools.partial(fn, **config))
    np.testing.assert_allclose(float(fn(padded_x, padded_l, valid=valid)), float(fn(x, labels)), rtol=1e-6)


def test_bf16_input_accumulates_in_float32():
    x, labels = random_batch(0, batch=B, dim=D, classes=C)
    out = mf.tuplet_margin_loss(jnp.asarray(x, jnp.bfloat16), labels)
    assert out.dtype == jnp.float32 and np.isfinite(float(out))
    assert mf.snr_distance(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


def test_snr_distance_matches_loop_and_is_not_symmetric():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, D)), rng.normal(size=(3, D))
    ref = np.array([[ref_snr_distance(u, v) for v in y] for u in x])
    np.testing.assert_allclose(mf.snr_distance(x, y), ref, rtol=1e-7)
    d = np.asarray(mf.snr_distance(x))
    assert not np.allclose(d, d.T)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, l: mf.tuplet_margin_loss(x[0], l), "embeddings must have rank 2"),
        (lambda x, l: mf.tuplet_margin_loss(x, l.astype(np.float32)), "labels must be an integer"),
        (lambda x, l: mf.tuplet_margin_loss(x, l[:-1]), "labels has batch size"),
        (lambda x, l: mf.tuplet_margin_loss(x, l, margin=-1.0), "margin must be"),
        (lambda x, l: mf.tuplet_margin_loss(x, l, scale=0.0), "scale must be"),
        (lambda x, l: mf.tuplet_margin_loss(x, l, reduction="max"), "reduction must be"),
        (lambda x, l: mf.intra_pair_variance_loss(x, l, pos_eps=-0.1), "pos_eps must be"),
        (lambda x, l: mf.snr_contrastive_loss(x, l, neg_margin=-1.0), "neg_margin must be"),
        (lambda x, l: mf.snr_contrastive_loss(x, l, regularizer_weight=-1.0), "regularizer_weight must be"),
        (lambda x, l: mf.threshold_consistent_margin_loss(x, l, margin_plus=2.0), "margin_plus must be"),
        (lambda x, l: mf.threshold_consistent_margin_loss(x, l, lambda_minus=-1.0), "lambda_minus must be"),
        (lambda x, l: mf.p2sgrad_loss(x, l, np.zeros((C, D + 1))), "weights must have shape"),
        (lambda x, l: mf.dynamic_soft_margin_loss(x, l, np.zeros(5)), "histogram must have shape"),
        (lambda x, l: mf.dynamic_soft_margin_loss(x, l, np.zeros(10), num_bins=0), "num_bins must be"),
        (lambda x, l: mf.dynamic_soft_margin_loss(x, l, np.zeros(10), min_val=1.0), "min_val must be"),
        (lambda x, l: mf.manifold_loss(x, l, PROXIES, alpha=1.0), "alpha must be"),
        (lambda x, l: mf.manifold_loss(x, l, np.zeros((4, D + 1))), "proxies must have shape"),
        (lambda x, l: mf.manifold_loss(x, l[:-1], PROXIES), "meta_classes has batch size"),
        (lambda x, l: mf.tuplet_margin_loss(x, l, valid=np.ones(B + 1, bool)), "valid must have shape"),
    ],
)
def test_bad_input_raises(call, match):
    x, labels = random_batch(0, batch=B, dim=D, classes=C)
    with pytest.raises(ValueError, match=match):
        call(x, labels)


_INVARIANT = ["tuplet", "ipv", "snr", "tcm", "dsm"]


@given(st.integers(0, 10_000), st.sampled_from(_INVARIANT))
def test_invariant_to_batch_permutation_and_label_renaming(seed, name):
    fn = jitted(name)
    rng = np.random.default_rng(seed)
    x, labels = random_batch(seed, batch=B, dim=D, classes=C)
    perm = rng.permutation(B)
    renamed = (np.array([5, 2, 9])[labels]).astype(np.int32)
    base = float(fn(x, labels))
    np.testing.assert_allclose(float(fn(x[perm], labels[perm])), base, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(fn(x, renamed)), base, rtol=1e-6, atol=1e-12)


@given(st.integers(0, 10_000))
def test_cosine_losses_rotation_and_scale_invariant(seed):
    """Tuplet margin, intra-pair variance and TCM only see cosines: orthogonal maps and positive
    rescaling of the rows do not change them."""
    rng = np.random.default_rng(seed)
    x, labels = random_batch(seed, batch=B, dim=D, classes=C)
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    scaled = (x @ q) * rng.uniform(0.5, 3.0, size=(B, 1))
    for name in ("tuplet", "ipv", "tcm"):
        fn = jitted(name)
        np.testing.assert_allclose(float(fn(scaled, labels)), float(fn(x, labels)), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ["tuplet", "snr", "dsm", "p2sgrad"])
def test_vmap_over_batches_equals_loop(name):
    fn = jitted(name)
    xs = np.stack([random_batch(s, batch=B, dim=D, classes=C)[0] for s in (10, 11)])
    ls = np.stack([random_batch(s, batch=B, dim=D, classes=C)[1] for s in (10, 11)])
    np.testing.assert_allclose(jax.vmap(fn)(xs, ls), [float(fn(x, lab)) for x, lab in zip(xs, ls)], rtol=1e-9)
