"""Proxy losses (ProxyNCA, Proxy-Anchor, MPA, SoftTriple), HIER and imprinting vs numpy loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.losses import hyperbolic
from dmljax.losses.hyperbolic import hier_loss, hier_regularized_loss, pairwise_poincare_distance
from dmljax.losses.imprinting import imprint_weights, nearest_proxy_predict
from dmljax.losses.proxy import (
    multi_proxy_anchor_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    soft_triple_loss,
)
from tests.utils import assert_jit_matches, degenerate_batches, random_batch

# ----------------------------------------------------------------------------- numpy references


def np_normalize(v):
    return v / max(np.sqrt(np.sum(v * v)), 1e-12)


def np_cos(a, b):
    return float(np.dot(np_normalize(a), np_normalize(b)))


def ref_proxy_nca(x, y, proxies, temperature=1 / 9, normalize=True, include_positive_in_denominator=True):
    """Movshovitz-Attias et al. 2017 eq. 4 / ProxyNCA++ (Teh et al. 2020) per sample, then mean."""
    losses = []
    for i in range(len(x)):
        xi = np_normalize(x[i]) if normalize else x[i]
        dist = []
        for z in range(len(proxies)):
            pz = np_normalize(proxies[z]) if normalize else proxies[z]
            dist.append(np.sum((xi - pz) ** 2))
        numerator = math.exp(-dist[y[i]] / temperature)
        denominator = sum(
            math.exp(-dist[z] / temperature)
            for z in range(len(proxies))
            if include_positive_in_denominator or z != y[i]
        )
        losses.append(-math.log(numerator / denominator))
    return float(np.mean(losses))


def ref_proxy_anchor_from_sim(sim, y, margin, alpha):
    """Kim et al. 2020 eq. 4 from a similarity table sim[i][c]."""
    num_classes = len(sim[0])
    pos_total, neg_total, num_with_pos = 0.0, 0.0, 0
    for c in range(num_classes):
        pos = [i for i in range(len(y)) if y[i] == c]
        neg = [i for i in range(len(y)) if y[i] != c]
        if pos:
            num_with_pos += 1
            pos_total += math.log(1 + sum(math.exp(-alpha * (sim[i][c] - margin)) for i in pos))
        neg_total += math.log(1 + sum(math.exp(alpha * (sim[i][c] + margin)) for i in neg))
    return pos_total / max(num_with_pos, 1) + neg_total / num_classes


def ref_proxy_anchor(x, y, proxies, margin=0.1, alpha=32.0):
    sim = [[np_cos(x[i], proxies[c]) for c in range(len(proxies))] for i in range(len(x))]
    return ref_proxy_anchor_from_sim(sim, y, margin, alpha)


def ref_soft_similarity(xi, class_centers, gamma):
    """SoftTriple eq. 7: sum_k softmax(s_k / gamma) s_k."""
    s = [np_cos(xi, w) for w in class_centers]
    if gamma == 0:
        return max(s)
    e = [math.exp(v / gamma) for v in s]
    return sum(ek / sum(e) * sk for ek, sk in zip(e, s))


def ref_mpa(x, y, proxies, margin=0.1, alpha=32.0, gamma=0.1):
    sim = [[ref_soft_similarity(x[i], proxies[c], gamma) for c in range(len(proxies))] for i in range(len(x))]
    return ref_proxy_anchor_from_sim(sim, y, margin, alpha)


def ref_soft_triple(x, y, centers, la=20.0, gamma=0.1, margin=0.01, tau=0.2):
    """Qian et al. 2019 eqs. 8-12."""
    num_classes, k = centers.shape[0], centers.shape[1]
    losses = []
    for i in range(len(x)):
        sims = [ref_soft_similarity(x[i], centers[c], gamma) for c in range(num_classes)]
        pos = math.exp(la * (sims[y[i]] - margin))
        others = sum(math.exp(la * sims[c]) for c in range(num_classes) if c != y[i])
        losses.append(-math.log(pos / (pos + others)))
    loss = float(np.mean(losses))
    if k > 1:
        reg = 0.0
        for c in range(num_classes):
            for t in range(k):
                for s in range(t + 1, k):
                    reg += math.sqrt(2 + 1e-5 - 2 * np_cos(centers[c, t], centers[c, s]))
        loss += tau * reg / (num_classes * k * (k - 1))
    return loss


def np_mobius_add(a, b, c):
    ab, a2, b2 = np.dot(a, b), np.dot(a, a), np.dot(b, b)
    return ((1 + 2 * c * ab + c * b2) * a + (1 - c * a2) * b) / (1 + 2 * c * ab + c * c * a2 * b2)


def np_hyp_dist(a, b, c):
    t = math.sqrt(c) * np.linalg.norm(np_mobius_add(-a, b, c))
    return 2 / math.sqrt(c) * math.atanh(min(t, 1 - 1e-5))


def np_to_ball(v, c, clip_r):
    n = np.linalg.norm(v)
    if clip_r is not None and n > clip_r:
        v = v * clip_r / n
        n = clip_r
    if n > 0:
        v = math.tanh(math.sqrt(c) * n) * v / (math.sqrt(c) * n)
    max_norm = (1 - 1e-3) / math.sqrt(c)
    n = np.linalg.norm(v)
    return v * max_norm / n if n > max_norm else v


def np_lca_triplet(di, dj, dk, margin, exclude=()):
    candidates = [p for p in range(len(di)) if p not in exclude]
    lca_ij = min(candidates, key=lambda p: max(di[p], dj[p]))
    lca_ijk = min(candidates, key=lambda p: max(di[p], dj[p], dk[p]))
    if lca_ij == lca_ijk:
        return 0.0
    relu = lambda v: max(v, 0.0)  # noqa: E731
    return (relu(di[lca_ij] - di[lca_ijk] + margin) + relu(dj[lca_ij] - dj[lca_ijk] + margin)
            + relu(dk[lca_ijk] - dk[lca_ij] + margin))


def ref_hier(x, y, proxies, c=0.1, margin=0.1, clip_r=2.3, proxy_term=True, proxy_neighbours=1):
    """HIER (Kim et al. 2023) with hardest-positive/negative triplets, as documented in hier_loss."""
    z = [np_to_ball(v, c, clip_r) for v in x]
    r = [np_to_ball(v, c, clip_r) for v in proxies]
    d_zr = [[np_hyp_dist(zi, rp, c) for rp in r] for zi in z]
    total, count = 0.0, 0
    for i in range(len(z)):
        pos = [j for j in range(len(z)) if j != i and y[j] == y[i]]
        neg = [k for k in range(len(z)) if y[k] != y[i]]
        if not pos or not neg:
            continue
        j = max(pos, key=lambda j: np_hyp_dist(z[i], z[j], c))
        k = min(neg, key=lambda k: np_hyp_dist(z[i], z[k], c))
        total += np_lca_triplet(d_zr[i], d_zr[j], d_zr[k], margin)
        count += 1
    loss = total / max(count, 1)
    if proxy_term and len(r) >= proxy_neighbours + 3:
        d_rr = [[np_hyp_dist(a, b, c) if ia != ib else 0.0 for ib, b in enumerate(r)] for ia, a in enumerate(r)]
        proxy_total = 0.0
        for a in range(len(r)):
            others = sorted((p for p in range(len(r)) if p != a), key=lambda p: d_rr[a][p])
            j, k = others[0], others[proxy_neighbours]
            proxy_total += np_lca_triplet(d_rr[a], d_rr[j], d_rr[k], margin, exclude=(a, j, k))
        loss += proxy_total / len(r)
    return loss


# ----------------------------------------------------------------------------- test cases

rng0 = np.random.default_rng(0)
X, Y = random_batch(3, batch=10, dim=5, classes=4, normalize=False)
P2 = rng0.normal(size=(5, 5))  # one class (4) without samples
P3 = rng0.normal(size=(5, 3, 5))
HP = rng0.normal(size=(7, 5)) * 0.5

# name -> (loss fn, proxies, reference, kwargs)
CASES = {
    "proxy_nca": (proxy_nca_loss, P2, ref_proxy_nca, {}),
    "proxy_nca_original": (proxy_nca_loss, P2, ref_proxy_nca,
                           dict(temperature=1.0, include_positive_in_denominator=False)),
    "proxy_nca_unnormalized": (proxy_nca_loss, P2, ref_proxy_nca, dict(temperature=2.0, normalize=False)),
    "proxy_anchor": (proxy_anchor_loss, P2, ref_proxy_anchor, {}),
    "proxy_anchor_margin0": (proxy_anchor_loss, P2, ref_proxy_anchor, dict(margin=0.0, alpha=8.0)),
    "mpa": (multi_proxy_anchor_loss, P3, ref_mpa, {}),
    "mpa_hard_max": (multi_proxy_anchor_loss, P3, ref_mpa, dict(gamma=0.0, alpha=4.0)),
    "soft_triple": (soft_triple_loss, P3, ref_soft_triple, {}),
    "soft_triple_k1": (soft_triple_loss, P3[:, :1], ref_soft_triple, dict(la=5.0, margin=0.3)),
    "hier": (hier_loss, HP, ref_hier, {}),
    "hier_no_proxy_term": (hier_loss, HP, ref_hier, dict(c=0.3, margin=0.3, proxy_term=False)),
}
LOSSES = {"proxy_nca": (proxy_nca_loss, P2), "proxy_anchor": (proxy_anchor_loss, P2),
          "mpa": (multi_proxy_anchor_loss, P3), "soft_triple": (soft_triple_loss, P3),
          "hier": (hier_loss, HP)}


JITTED = {name: jax.jit(fn) for name, (fn, _) in LOSSES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name):
    fn, proxies, ref, kwargs = CASES[name]
    value = fn(X, Y, proxies, **kwargs)
    np.testing.assert_allclose(float(value), ref(X, Y, proxies, **kwargs), rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_wrt_embeddings_and_proxies(name):
    fn, proxies, _, kwargs = CASES[name]
    f = jax.jit(lambda e, p: fn(e, Y, p, **kwargs))  # jit only to keep the test fast
    check_grads(f, (X, proxies), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)
    ge, gp = jax.grad(f, argnums=(0, 1))(X, proxies)
    assert np.abs(ge).sum() > 0 and np.abs(gp).sum() > 0  # both receive a learning signal


@pytest.mark.parametrize("name", list(CASES))
def test_jit_matches_eager(name):
    fn, proxies, _, kwargs = CASES[name]
    assert_jit_matches(fn, X, Y, proxies, **kwargs)


def test_mpa_with_one_proxy_per_class_is_proxy_anchor():
    np.testing.assert_allclose(multi_proxy_anchor_loss(X, Y, P2[:, None]), proxy_anchor_loss(X, Y, P2), rtol=1e-12)


def test_pml_soft_triple_equivalence_without_regulariser():
    """tau = 0 is PML's SoftTripleLoss (it has no center regulariser)."""
    np.testing.assert_allclose(soft_triple_loss(X, Y, P3, tau=0.0), ref_soft_triple(X, Y, P3, tau=0.0), rtol=1e-6)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_degenerate_batches_finite(loss_name):
    fn, proxies = LOSSES[loss_name]
    proxies = np.concatenate([proxies, proxies[:2]], axis=0)  # >= 6 classes / proxies for "no_positives"
    value_and_grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 2)))
    for batch_name, (emb, labels) in degenerate_batches(dim=5).items():
        for p in (proxies, np.zeros_like(proxies)):  # also all-zero proxies
            value, grads = value_and_grad(emb, labels, p)
            assert np.isfinite(value), batch_name
            assert all(np.isfinite(g).all() for g in grads), batch_name
    if loss_name not in ("proxy_anchor", "mpa", "hier"):  # PA/MPA/HIER have no reduction option
        emb, labels = degenerate_batches(dim=5)["single_class"]
        assert np.isfinite(fn(emb, labels, proxies, reduction="sum"))
    # margin 0 (HIER and MPA share the code paths checked here and in CASES)
    if loss_name in ("proxy_anchor", "soft_triple"):
        emb, labels = degenerate_batches(dim=5)["identical_embeddings"]
        value, grads = jax.value_and_grad(lambda e, q: fn(e, labels, q, margin=0.0), argnums=(0, 1))(emb, proxies)
        assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_bf16_inputs_accumulate_in_float32(loss_name):
    fn, proxies = LOSSES[loss_name]
    value = jax.jit(fn)(jnp.asarray(X, jnp.bfloat16), Y, jnp.asarray(proxies, jnp.bfloat16))
    assert value.dtype == jnp.float32 and np.isfinite(value)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_padding_with_valid_mask(loss_name):
    fn, proxies = LOSSES[loss_name]
    rng = np.random.default_rng(5)
    xp = np.concatenate([X, rng.normal(size=(3, X.shape[1]))])
    yp = np.concatenate([Y, np.array([0, 1, 2], np.int32)])
    valid = np.arange(len(yp)) < len(Y)
    value_and_grad = jax.jit(jax.value_and_grad(functools.partial(fn), argnums=(0, 2)))
    value, (ge, gq) = value_and_grad(xp, yp, proxies, valid=valid)
    value0, (ge0, gq0) = value_and_grad(X, Y, proxies, valid=np.ones(len(Y), bool))
    np.testing.assert_allclose(value, value0, rtol=1e-10)
    np.testing.assert_allclose(value0, JITTED[loss_name](X, Y, proxies), rtol=1e-10)
    np.testing.assert_allclose(ge[: len(Y)], ge0, atol=1e-10)
    np.testing.assert_allclose(ge[len(Y):], 0.0, atol=1e-12)
    np.testing.assert_allclose(gq, gq0, atol=1e-10)


@pytest.mark.parametrize("loss_name", ["proxy_nca", "proxy_anchor", "mpa", "soft_triple"])
def test_out_of_range_labels(loss_name):
    fn, proxies = LOSSES[loss_name]
    bad = Y.copy()
    bad[0] = proxies.shape[0]
    with pytest.raises(ValueError, match="^labels must be class ids"):
        fn(X, bad, proxies)
    neg = Y.copy()
    neg[1] = -1
    with pytest.raises(ValueError, match="^labels must be class ids"):
        fn(X, neg, proxies)
    # under jit the values are unknown: such rows are masked out like padding
    valid = np.ones(len(Y), bool)
    valid[0] = False
    jitted = jax.jit(fn)
    np.testing.assert_allclose(jitted(X, bad, proxies), jitted(X, Y, proxies, valid=valid), rtol=1e-10)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_bad_inputs_raise_naming_the_argument(loss_name):
    fn, proxies = LOSSES[loss_name]
    pname = {"soft_triple": "centers", "hier": "hierarchical_proxies"}.get(loss_name, "proxies")
    with pytest.raises(ValueError, match="^embeddings must have rank 2"):
        fn(X[0], Y[:1], proxies)
    with pytest.raises(ValueError, match="^labels has batch size"):
        fn(X, Y[:-1], proxies)
    with pytest.raises(ValueError, match="^labels must be an integer"):
        fn(X, Y.astype(np.float32), proxies)
    with pytest.raises(ValueError, match=f"^{pname} must have shape"):
        fn(X, Y, proxies[..., :-1])  # feature dim differs
    with pytest.raises(ValueError, match=f"^{pname} must have shape"):
        fn(X, Y, proxies[None])  # wrong rank
    with pytest.raises(ValueError, match="^valid must have shape"):
        fn(X, Y, proxies, valid=np.ones(3, bool))
    with pytest.raises(ValueError, match="^embeddings must be a floating"):
        fn(X.astype(np.int32), Y, proxies)


@pytest.mark.parametrize(
    "fn, proxies, kwargs, arg",
    [
        (proxy_nca_loss, P2, dict(temperature=0.0), "temperature"),
        (proxy_anchor_loss, P2, dict(margin=-0.1), "margin"),
        (proxy_anchor_loss, P2, dict(alpha=0.0), "alpha"),
        (multi_proxy_anchor_loss, P3, dict(gamma=-1.0), "gamma"),
        (soft_triple_loss, P3, dict(la=-1.0), "la"),
        (soft_triple_loss, P3, dict(gamma=0.0), "gamma"),
        (soft_triple_loss, P3, dict(tau=-0.2), "tau"),
        (soft_triple_loss, P3, dict(margin=-0.01), "margin"),
        (soft_triple_loss, P3, dict(reduction="max"), "reduction"),
        (hier_loss, HP, dict(c=0.0), "c"),
        (hier_loss, HP, dict(margin=-1.0), "margin"),
        (hier_loss, HP[:1], {}, "hierarchical_proxies"),
        (hier_loss, HP, dict(proxy_neighbours=0), "proxy_neighbours"),
    ],
)
def test_bad_config_raises(fn, proxies, kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        fn(X, Y, proxies, **kwargs)


def test_vmap_over_several_batches():
    xs = np.stack([X, X[::-1], 2 * X])
    ys = np.stack([Y, Y[::-1], Y])
    out = jax.vmap(lambda e, l: proxy_anchor_loss(e, l, P2))(xs, ys)
    np.testing.assert_allclose(out, [proxy_anchor_loss(e, l, P2) for e, l in zip(xs, ys)], rtol=1e-10)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@given(seed=st.integers(0, 10_000))
def test_invariant_to_batch_and_consistent_class_permutation(loss_name, seed):
    """Permuting the batch, and renaming classes while permuting their proxies alike, keeps the loss."""
    fn, proxies = LOSSES[loss_name]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 5))
    y = rng.integers(0, 3, size=8).astype(np.int32)
    batch_perm = rng.permutation(8)
    proxy_perm = rng.permutation(proxies.shape[0])  # new index of old proxy c is proxy_perm[c]
    new_proxies = np.empty_like(proxies)
    new_proxies[proxy_perm] = proxies
    new_labels = y if loss_name == "hier" else proxy_perm[y].astype(np.int32)
    jitted = JITTED[loss_name]
    expected = jitted(x, y, proxies)
    np.testing.assert_allclose(jitted(x[batch_perm], new_labels[batch_perm], new_proxies), expected, rtol=1e-9)


# ----------------------------------------------------------------------------- geometry / imprinting


def test_poincare_helpers_match_explicit_mobius_formulas():
    rng = np.random.default_rng(7)
    for c in (0.1, 1.0):
        a = np.stack([np_to_ball(v, c, 2.3) for v in rng.normal(size=(5, 3))])
        b = np.stack([np_to_ball(v, c, 2.3) for v in rng.normal(size=(4, 3))])
        np.testing.assert_allclose(hyperbolic.to_poincare(rng.normal(size=(2, 3)) * 0, c=c), 0.0)
        np.testing.assert_allclose(
            hyperbolic.mobius_add(a[0], b[0], c=c), np_mobius_add(a[0], b[0], c), rtol=1e-10)
        ref = np.array([[np_hyp_dist(u, v, c) for v in b] for u in a])
        np.testing.assert_allclose(pairwise_poincare_distance(a, b, c=c), ref, rtol=1e-7)
        np.testing.assert_allclose(hyperbolic.poincare_distance(a[:, None], b[None], c=c), ref, rtol=1e-7)
        d_self = pairwise_poincare_distance(a, c=c)
        np.testing.assert_allclose(np.diag(d_self), 0.0, atol=1e-12)
    # points pushed far outside the ball are clipped inside; distance and gradient stay finite
    far = np.array([[1e6, 0.0], [0.0, -1e6], [0.0, 0.0]])
    z = hyperbolic.to_poincare(far, c=1.0, clip_r=None)
    assert np.all(np.linalg.norm(z, axis=1) < 1.0)
    g = jax.jit(jax.grad(lambda q: jnp.sum(pairwise_poincare_distance(
        hyperbolic.to_poincare(q, c=1.0, clip_r=None), c=1.0))))(far)
    assert np.isfinite(g).all()


@given(seed=st.integers(0, 10_000))
def test_poincare_distance_is_a_mobius_isometry(seed):
    """d(a (+) x, a (+) y) = d(x, y): left Mobius translations are isometries of the ball."""
    rng = np.random.default_rng(seed)
    pts = np.asarray(hyperbolic.to_poincare(rng.normal(size=(5, 3)) * 0.7, c=1.0))
    a = np.asarray(hyperbolic.to_poincare(rng.normal(size=(1, 3)) * 0.5, c=1.0))[0]
    moved = np.asarray(hyperbolic.mobius_add(a[None], pts, c=1.0))
    dist = jax.jit(functools.partial(pairwise_poincare_distance, c=1.0))
    np.testing.assert_allclose(dist(moved), dist(pts), atol=1e-7)


def test_hier_regularized_loss_is_weighted_sum():
    base = functools.partial(proxy_anchor_loss, margin=0.1)
    total = jax.jit(functools.partial(hier_regularized_loss, base_loss=base, weight=0.5))(X, Y, HP, P2)
    np.testing.assert_allclose(total, base(X, Y, P2) + 0.5 * JITTED["hier"](X, Y, HP), rtol=1e-12)
    g = jax.jit(jax.grad(lambda h, p: hier_regularized_loss(X, Y, h, p, base_loss=base), argnums=(0, 1)))(HP, P2)
    assert all(np.isfinite(v).all() and np.abs(v).sum() > 0 for v in g)


def test_imprint_weights_matches_loop_and_handles_missing_classes():
    x, y = X, Y
    w = imprint_weights(x, y, num_classes=6)
    for c in range(6):
        members = [np_normalize(x[i]) for i in range(len(x)) if y[i] == c]
        expected = np_normalize(np.mean(members, axis=0)) if members else np.zeros(x.shape[1])
        np.testing.assert_allclose(w[c], expected, rtol=1e-10, atol=1e-12)
    assert np.isfinite(jax.jacobian(lambda e: imprint_weights(e, y, num_classes=6))(x)).all()
    with pytest.raises(ValueError, match="^labels must be class ids"):
        imprint_weights(x, y, num_classes=2)
    with pytest.raises(ValueError, match="^num_classes"):
        imprint_weights(x, y, num_classes=0)
    assert_jit_matches(imprint_weights, x, y, num_classes=6)


def test_nearest_proxy_predict():
    rng = np.random.default_rng(3)
    proxies = np.eye(4)[:3] * 5.0
    x = proxies[[2, 0, 1, 1]] + 0.1 * rng.normal(size=(4, 4))
    np.testing.assert_array_equal(nearest_proxy_predict(x, proxies), [2, 0, 1, 1])
    multi = np.stack([proxies, -proxies], axis=1)  # [C, 2, D]
    np.testing.assert_array_equal(nearest_proxy_predict(-x, multi), [2, 0, 1, 1])
    with pytest.raises(ValueError, match="^proxies must have shape"):
        nearest_proxy_predict(x, proxies[:, :2])


def test_matches_pytorch_metric_learning():
    """The benchmark settings give PML's values (same proxies), so the timings compare like with like."""
    pytest.importorskip("pytorch_metric_learning")
    import torch

    from experiments.bench.specs_proxy import CASES as BENCH_CASES

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    labels = (np.arange(12) % 4).astype(np.int32)
    for case in BENCH_CASES:
        fn, params = case.dmljax(12, 6, 5)
        torch_fn, _ = case.pml(12, 6, 5)
        expected = float(torch_fn(torch.from_numpy(x), torch.from_numpy(labels).long()).detach())
        np.testing.assert_allclose(float(fn(x, labels, *params)), expected, rtol=1e-4, err_msg=case.name)


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_soft_triple_similarity_backward_matches_autodiff_of_the_formula(gamma):
    """SoftTriple's written-out backward (custom VJP) against autodiff of the plain relaxed
    similarity S_ic = sum_k softmax_k(s_ick / gamma) s_ick on normalised inputs."""
    from dmljax.losses.proxy import _soft_similarity_normalised

    rng = np.random.default_rng(40)
    xn = rng.normal(size=(5, 3))
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    cn = rng.normal(size=(4, 3, 3))
    cn /= np.linalg.norm(cn, axis=2, keepdims=True)
    cot = rng.normal(size=(5, 4))

    def plain(xn, cn):
        s = jnp.einsum("bd,ckd->bck", xn, cn)
        return jnp.sum(jax.nn.softmax(s / gamma, axis=2) * s, axis=2)

    np.testing.assert_allclose(_soft_similarity_normalised(xn, cn, gamma), plain(xn, cn), rtol=1e-12)
    got = jax.grad(lambda a, b: jnp.sum(cot * _soft_similarity_normalised(a, b, gamma)), argnums=(0, 1))(xn, cn)
    want = jax.grad(lambda a, b: jnp.sum(cot * plain(a, b)), argnums=(0, 1))(xn, cn)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
