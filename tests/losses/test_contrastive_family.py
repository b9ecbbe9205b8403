"""SupCon, NT-Xent, NCA, soft nearest neighbour, MNRL, instance loss and VICReg against plain numpy
loops written from the papers' formulas."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmljax.losses.contrastive_family import (
    instance_loss,
    multiple_negatives_ranking_loss,
    nca_loss,
    ntxent_loss,
    pn_loss,
    soft_nearest_neighbour_loss,
    supcon_loss,
    vicreg_loss,
)
from tests.utils import degenerate_batches, numerical_grad, random_batch

# ----------------------------------------------------------------------------- references


def cos(a, b):
    na = math.sqrt(sum(v * v for v in a))
    nb = math.sqrt(sum(v * v for v in b))
    return sum(p * q for p, q in zip(a, b)) / (na * nb)


def sqdist(a, b):
    return sum((p - q) ** 2 for p, q in zip(a, b))


def ref_supcon(x, y, temperature=0.1):
    """Khosla et al. 2020 eq. (2), anchors with a positive averaged."""
    n = len(x)
    losses = []
    for i in range(n):
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denominator = sum(math.exp(cos(x[i], x[a]) / temperature) for a in range(n) if a != i)
        losses.append(-sum(math.log(math.exp(cos(x[i], x[p]) / temperature) / denominator) for p in pos)
                      / len(pos))
    return sum(losses) / max(len(losses), 1)


def ref_ntxent(x, y, temperature=0.07):
    n = len(x)
    losses = []
    for a in range(n):
        for p in range(n):
            if p == a or y[p] != y[a]:
                continue
            num = math.exp(cos(x[a], x[p]) / temperature)
            den = num + sum(math.exp(cos(x[a], x[k]) / temperature) for k in range(n) if y[k] != y[a])
            losses.append(-math.log(num / den))
    return sum(losses) / max(len(losses), 1)


def ref_nca(x, y, softmax_scale=1.0):
    """Goldberger et al. 2004: -log of the probability of picking a same-class neighbour."""
    n = len(x)
    losses = []
    for i in range(n):
        if not any(j != i and y[j] == y[i] for j in range(n)):
            continue
        weights = {j: math.exp(-softmax_scale * sqdist(x[i], x[j])) for j in range(n) if j != i}
        total = sum(weights.values())
        losses.append(-math.log(sum(w for j, w in weights.items() if y[j] == y[i]) / total))
    return sum(losses) / max(len(losses), 1)


def ref_snn(x, y, temperature=1.0):
    """Frosst et al. 2019 eq. (1)."""
    n = len(x)
    losses = []
    for i in range(n):
        num = sum(math.exp(-sqdist(x[i], x[j]) / temperature) for j in range(n) if j != i and y[j] == y[i])
        if num == 0.0:
            continue
        den = sum(math.exp(-sqdist(x[i], x[k]) / temperature) for k in range(n) if k != i)
        losses.append(-math.log(num / den))
    return sum(losses) / max(len(losses), 1)


def ref_mnrl(a, p, scale=20.0, symmetric=False):
    n = len(a)

    def one_direction(q, r):
        total = 0.0
        for i in range(n):
            logits = [scale * cos(q[i], r[j]) for j in range(n)]
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
        return total / n

    forward = one_direction(a, p)
    return 0.5 * (forward + one_direction(p, a)) if symmetric else forward


def ref_instance(x, y, w, scale=1.0, normalize=False):
    n = len(x)
    total = 0.0
    for i in range(n):
        logits = [scale * (cos(x[i], w[c]) if normalize else sum(u * v for u, v in zip(x[i], w[c])))
                  for c in range(len(w))]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[y[i]]
    return total / n


def ref_vicreg(z1, z2, invariance=25.0, variance=25.0, covariance=1.0, eps=1e-4):
    """Bardes et al. 2022 eq. (1)-(6) and Algorithm 1."""
    n, d = z1.shape

    def v_and_c(z):
        mean = [sum(z[i, k] for i in range(n)) / n for k in range(d)]
        cov = [[sum((z[i, a] - mean[a]) * (z[i, b] - mean[b]) for i in range(n)) / max(n - 1, 1)
                for b in range(d)] for a in range(d)]
        v = sum(max(0.0, 1.0 - math.sqrt(cov[k][k] + eps)) for k in range(d)) / d
        c = sum(cov[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d
        return v, c

    s = sum((z1[i, k] - z2[i, k]) ** 2 for i in range(n) for k in range(d)) / (n * d)
    v1, c1 = v_and_c(z1)
    v2, c2 = v_and_c(z2)
    return invariance * s + variance * (v1 + v2) / 2 + covariance * (c1 + c2)


def ref_pn(x, y, margin=1.0, soft_margin=False, metric="cosine", positive_mining="hard",
           negative_mining="semihard"):
    """Szubert et al. 2019 / TF-Similarity PNLoss with its mining rules, one anchor at a time."""
    n = len(x)

    def dist(i, j):
        if metric == "cosine":
            return 1.0 - cos(x[i], x[j]) if i != j else 0.0
        return math.sqrt(sqdist(x[i], x[j])) if metric == "euclidean" else sqdist(x[i], x[j])

    losses = []
    for a in range(n):
        pos = [j for j in range(n) if j != a and y[j] == y[a]]
        neg = [j for j in range(n) if y[j] != y[a]]
        if not pos or not neg:
            continue
        pick = max if positive_mining == "hard" else min
        p = pick(pos, key=lambda j: dist(a, j))
        if negative_mining == "hard":
            m = min(neg, key=lambda j: dist(a, j))
        elif negative_mining == "easy":
            m = max(neg, key=lambda j: dist(a, j))
        else:
            farthest_pos = max(dist(a, j) for j in pos)
            beyond = [j for j in neg if dist(a, j) > farthest_pos]
            m = min(beyond, key=lambda j: dist(a, j)) if beyond else max(neg, key=lambda j: dist(a, j))
        d_neg = min(dist(a, m), dist(p, m))
        gap = dist(a, p) - d_neg
        losses.append(math.log1p(math.exp(gap)) if soft_margin else max(0.0, margin + gap))
    return sum(losses) / max(len(losses), 1)


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _jitted(fn, config=()):
    return jax.jit(functools.partial(fn, **dict(config)))


@functools.lru_cache(maxsize=None)
def _jitted_value_and_grad(fn, argnums, config=()):
    return jax.jit(jax.value_and_grad(functools.partial(fn, **dict(config)), argnums=argnums))


def jitted(fn, **config):
    return _jitted(fn, tuple(sorted(config.items())))


def value_and_grad(fn, argnums=0, **config):
    return _jitted_value_and_grad(fn, argnums, tuple(sorted(config.items())))


def _batch(seed, batch=10, dim=4, classes=3):
    return random_batch(seed, batch=batch, dim=dim, classes=classes)


def _pairs(seed, batch=6, dim=4):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, dim))
    return a, a + 0.7 * rng.normal(size=(batch, dim))


def _classifier(seed, batch=8, dim=4, classes=5):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, dim)), rng.integers(0, classes, size=batch).astype(np.int32),
            rng.normal(size=(classes, dim)))


# ----------------------------------------------------------------------------- label losses

LABEL_CASES = [
    ("supcon", supcon_loss, ref_supcon, {}),
    ("supcon_t0.5", supcon_loss, ref_supcon, {"temperature": 0.5}),
    ("ntxent", ntxent_loss, ref_ntxent, {}),
    ("ntxent_t0.3", ntxent_loss, ref_ntxent, {"temperature": 0.3}),
    ("nca", nca_loss, ref_nca, {}),
    ("nca_scale3", nca_loss, ref_nca, {"softmax_scale": 3.0}),
    ("snn", soft_nearest_neighbour_loss, ref_snn, {}),
    ("snn_t0.2", soft_nearest_neighbour_loss, ref_snn, {"temperature": 0.2}),
    ("pn", pn_loss, ref_pn, {}),
    ("pn_soft_euclid_hard_easy", pn_loss, ref_pn,
     {"soft_margin": True, "metric": "euclidean", "positive_mining": "easy", "negative_mining": "hard"}),
    ("pn_sq_easy_neg", pn_loss, ref_pn, {"metric": "squared_euclidean", "negative_mining": "easy", "margin": 3.0}),
]
LABEL_IDS = [c[0] for c in LABEL_CASES]
# a temperature / scale only rescales the logits: one gradient check per formula suffices
LABEL_GRAD_CASES = [c for c in LABEL_CASES if c[0] not in {"supcon_t0.5", "ntxent_t0.3", "nca_scale3", "snn_t0.2"}]
LABEL_LOSSES = [supcon_loss, ntxent_loss, nca_loss, soft_nearest_neighbour_loss, pn_loss]
LABEL_LOSS_IDS = ["supcon", "ntxent", "nca", "snn", "pn"]


@pytest.mark.parametrize("name,fn,ref,cfg", LABEL_CASES, ids=LABEL_IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_label_losses_match_loop_reference(name, fn, ref, cfg, seed):
    x, y = _batch(seed, classes=3 if seed == 0 else 4)
    if seed == 1:
        y[0] = 99  # an anchor without positives: it must be left out of the mean
        x = 1.5 * x  # NCA / SNN see the scale
    got = float(jitted(fn, **cfg)(x, y))
    want = ref(x, y, **cfg)
    assert want != 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("name,fn,ref,cfg", LABEL_GRAD_CASES, ids=[c[0] for c in LABEL_GRAD_CASES])
def test_label_losses_gradients_match_finite_differences(name, fn, ref, cfg):
    x, y = _batch(3)
    grad = np.asarray(value_and_grad(fn, **cfg)(x, y)[1])
    f = jitted(fn, **cfg)
    numeric = numerical_grad(lambda z: f(z, y), x.copy())
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


def test_pn_semi_hard_falls_back_to_the_farthest_negative():
    # anchor 0: its positive (distance 1.9) is farther than every negative -> farthest negative
    x = np.array([[0.0, 0.0], [1.9, 0.0], [0.0, 0.5], [0.0, -0.8]])
    y = np.array([0, 0, 1, 1], np.int32)
    cfg = {"metric": "euclidean", "margin": 0.1}
    got = float(jitted(pn_loss, reduction="none", **cfg)(x, y)[0])
    # farthest negative (0, -0.8): d_an = 0.8, d_pn = sqrt(1.9^2 + 0.64)
    np.testing.assert_allclose(got, 0.1 + 1.9 - 0.8, rtol=1e-12)
    np.testing.assert_allclose(float(jitted(pn_loss, **cfg)(x, y)), ref_pn(x, y, **cfg), rtol=1e-12)


def test_snn_is_nca_with_inverse_temperature():
    x, y = _batch(2)
    np.testing.assert_allclose(float(jitted(soft_nearest_neighbour_loss, temperature=0.25)(x, y)),
                               float(jitted(nca_loss, softmax_scale=4.0)(x, y)), rtol=1e-12)


@pytest.mark.parametrize("fn", LABEL_LOSSES, ids=LABEL_LOSS_IDS)
def test_label_losses_jit_valid_and_vmap(fn):
    x, y = _batch(4, batch=8)
    np.testing.assert_allclose(float(jax.jit(fn)(x, y)), float(fn(x, y)), rtol=1e-10)
    rng = np.random.default_rng(0)
    padded_x = np.concatenate([x, rng.normal(size=(3, x.shape[1]))])
    padded_y = np.concatenate([y, np.array([0, 1, 0], np.int32)])
    got = float(jitted(fn)(padded_x, padded_y, valid=np.arange(11) < 8))
    np.testing.assert_allclose(got, float(jitted(fn)(x, y)), rtol=1e-9)
    xs = np.stack([x, 2 * x])
    ys = np.stack([y, y])
    np.testing.assert_allclose(np.asarray(jax.vmap(jitted(fn))(xs, ys)),
                               [float(jitted(fn)(x, y)), float(jitted(fn)(2 * x, y))], rtol=1e-9)


@pytest.mark.parametrize("fn", LABEL_LOSSES, ids=LABEL_LOSS_IDS)
@pytest.mark.parametrize("case", sorted(degenerate_batches()))
def test_label_losses_degenerate_batches_finite(fn, case):
    x, y = degenerate_batches()[case]
    value, grad = value_and_grad(fn)(x, y)
    assert np.isfinite(float(value)), f"loss not finite: {value}"
    assert np.isfinite(np.asarray(grad)).all(), "gradient not finite"
    if case in ("no_positives", "one_item"):
        assert float(value) == 0.0 and not np.asarray(grad).any()


def test_bf16_input_accumulates_in_float32():
    x, y = _batch(8)
    for fn in LABEL_LOSSES:
        value = jitted(fn)(jnp.asarray(x, jnp.bfloat16), y)
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(float(value), float(jitted(fn)(x, y)), rtol=0.05)


@pytest.mark.parametrize("fn", LABEL_LOSSES, ids=LABEL_LOSS_IDS)
def test_label_losses_bad_inputs_raise(fn):
    x, y = _batch(0)
    with pytest.raises(ValueError, match="^embeddings"):
        fn(x[0], y)
    with pytest.raises(ValueError, match="^labels"):
        fn(x, y.astype(np.float32))
    with pytest.raises(ValueError, match="^labels"):
        fn(x, y[:-1])
    with pytest.raises(ValueError, match="^reduction"):
        fn(x, y, reduction="median")


@pytest.mark.parametrize("fn,arg", [(supcon_loss, "temperature"), (ntxent_loss, "temperature"),
                                    (nca_loss, "softmax_scale"), (soft_nearest_neighbour_loss, "temperature")])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_non_positive_config_raises(fn, arg, value):
    x, y = _batch(0)
    with pytest.raises(ValueError, match=f"^{arg}"):
        fn(x, y, **{arg: value})


@pytest.mark.parametrize("cfg,arg", [({"margin": -0.5}, "margin"), ({"metric": "dot"}, "metric"),
                                     ({"positive_mining": "semi-hard"}, "positive_mining"),
                                     ({"negative_mining": "all"}, "negative_mining")])
def test_pn_bad_config_raises(cfg, arg):
    x, y = _batch(0)
    with pytest.raises(ValueError, match=f"^{arg}"):
        pn_loss(x, y, **cfg)


@pytest.mark.parametrize("fn", LABEL_LOSSES, ids=LABEL_LOSS_IDS)
@given(seed=st.integers(0, 2**16), shift=st.integers(-50, 50))
def test_permutation_and_label_renaming_invariance(fn, seed, shift):
    x, y = _batch(seed % 97)
    perm = np.random.default_rng(seed).permutation(len(x))
    renamed = (5 * y + shift).astype(np.int32)
    f = jitted(fn)
    np.testing.assert_allclose(float(f(x[perm], renamed[perm])), float(f(x, y)), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- MNRL


@pytest.mark.parametrize("cfg", [{}, {"scale": 5.0}, {"symmetric": True}], ids=["default", "scale5", "symmetric"])
def test_mnrl_matches_reference_and_gradients(cfg):
    a, p = _pairs(0)
    value, (ga, gp) = value_and_grad(multiple_negatives_ranking_loss, (0, 1), **cfg)(a, p)
    np.testing.assert_allclose(float(value), ref_mnrl(a, p, **cfg), rtol=1e-5)
    f = jitted(multiple_negatives_ranking_loss, **cfg)
    np.testing.assert_allclose(np.asarray(ga), numerical_grad(lambda z: f(z, p), a.copy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gp), numerical_grad(lambda z: f(a, z), p.copy()), rtol=1e-5, atol=1e-6)
    if not cfg:  # eager (slow: op-by-op dispatch) equals jit, once
        np.testing.assert_allclose(float(multiple_negatives_ranking_loss(a, p, **cfg)), float(value), rtol=1e-10)


def test_mnrl_valid_mask_and_degenerate():
    a, p = _pairs(1)
    f = jitted(multiple_negatives_ranking_loss)
    valid = np.arange(6) < 4
    np.testing.assert_allclose(float(f(a, p, valid=valid)), float(f(a[:4], p[:4])), rtol=1e-9)
    for anchors, positives in [(a[:1], p[:1]), (np.zeros_like(a), p), (np.tile(a[:1], (6, 1)), np.tile(a[:1], (6, 1)))]:
        value, grads = value_and_grad(multiple_negatives_ranking_loss, (0, 1))(anchors, positives)
        assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
    with pytest.raises(ValueError, match="^positives"):
        multiple_negatives_ranking_loss(a, p[:-1])
    with pytest.raises(ValueError, match="^anchors"):
        multiple_negatives_ranking_loss(a[0], p)
    with pytest.raises(ValueError, match="^scale"):
        multiple_negatives_ranking_loss(a, p, scale=0.0)


@given(seed=st.integers(0, 2**16))
def test_mnrl_invariant_to_joint_pair_permutation(seed):
    a, p = _pairs(seed % 101)
    perm = np.random.default_rng(seed).permutation(len(a))
    f = jitted(multiple_negatives_ranking_loss)
    np.testing.assert_allclose(float(f(a[perm], p[perm])), float(f(a, p)), rtol=1e-9)


# ----------------------------------------------------------------------------- instance loss


@pytest.mark.parametrize("cfg", [{}, {"scale": 4.0, "normalize": True}], ids=["linear", "cosine"])
def test_instance_loss_matches_reference_and_gradients(cfg):
    x, y, w = _classifier(0)
    value, (gx, gw) = value_and_grad(instance_loss, (0, 2), **cfg)(x, y, w)
    np.testing.assert_allclose(float(value), ref_instance(x, y, w, **cfg), rtol=1e-5)
    f = jitted(instance_loss, **cfg)
    np.testing.assert_allclose(np.asarray(gx), numerical_grad(lambda z: f(z, y, w), x.copy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), numerical_grad(lambda z: f(x, y, z), w.copy()), rtol=1e-5, atol=1e-6)
    if not cfg:  # eager (slow: op-by-op dispatch) equals jit, once
        np.testing.assert_allclose(float(instance_loss(x, y, w, **cfg)), float(value), rtol=1e-10)


def test_instance_loss_degenerate_and_bad_inputs():
    x, y, w = _classifier(1)
    for emb, lab in [(np.zeros_like(x), y), (x[:1], y[:1])]:
        value, grads = value_and_grad(instance_loss, (0, 2), normalize=True, scale=8.0)(emb, lab, w)
        assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
    with pytest.raises(ValueError, match="^labels"):
        instance_loss(x, np.full_like(y, 5), w)  # class id == number of weight rows
    with pytest.raises(ValueError, match="^weights"):
        instance_loss(x, y, w[:, :-1])
    with pytest.raises(ValueError, match="^scale"):
        instance_loss(x, y, w, scale=-1.0)
    # under jit an out-of-range id cannot be checked: that row is dropped from the mean
    bad = y.copy()
    bad[0] = 7
    np.testing.assert_allclose(float(jitted(instance_loss)(x, bad, w)),
                               float(jitted(instance_loss)(x[1:], y[1:], w)), rtol=1e-9)


@given(seed=st.integers(0, 2**16))
def test_instance_loss_invariant_to_class_permutation(seed):
    x, y, w = _classifier(seed % 103)
    perm = np.random.default_rng(seed).permutation(len(w))  # new class c holds old class perm[c]
    inverse = np.argsort(perm).astype(np.int32)
    f = jitted(instance_loss)
    np.testing.assert_allclose(float(f(x, inverse[y], w[perm])), float(f(x, y, w)), rtol=1e-9)


# ----------------------------------------------------------------------------- VICReg


@pytest.mark.parametrize("cfg", [{}, {"invariance": 1.0, "variance": 2.0, "covariance": 3.0, "eps": 1e-3}],
                         ids=["paper", "custom"])
def test_vicreg_matches_reference_and_gradients(cfg):
    z1, z2 = _pairs(2, batch=7, dim=4)
    z1, z2 = 0.5 * z1, 0.5 * z2  # std below 1 so the variance hinge is active
    value, (g1, g2) = value_and_grad(vicreg_loss, (0, 1), **cfg)(z1, z2)
    np.testing.assert_allclose(float(value), ref_vicreg(z1, z2, **cfg), rtol=1e-5)
    f = jitted(vicreg_loss, **cfg)
    np.testing.assert_allclose(np.asarray(g1), numerical_grad(lambda z: f(z, z2), z1.copy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g2), numerical_grad(lambda z: f(z1, z), z2.copy()), rtol=1e-5, atol=1e-6)
    if not cfg:  # eager (slow: op-by-op dispatch) equals jit, once
        np.testing.assert_allclose(float(vicreg_loss(z1, z2, **cfg)), float(value), rtol=1e-10)


def test_vicreg_degenerate_and_bad_inputs():
    z1, z2 = _pairs(3)
    constant = np.ones_like(z1)
    for a, b in [(z1[:1], z2[:1]), (constant, constant), (np.zeros_like(z1), np.zeros_like(z1))]:
        value, grads = value_and_grad(vicreg_loss, (0, 1))(a, b)
        assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
    # constant features: std = sqrt(eps), no covariance, no invariance term
    np.testing.assert_allclose(float(vicreg_loss(constant, constant)), 25.0 * (1 - math.sqrt(1e-4)), rtol=1e-9)
    with pytest.raises(ValueError, match="^z2"):
        vicreg_loss(z1, z2[:, :-1])
    with pytest.raises(ValueError, match="^z1"):
        vicreg_loss(z1[0], z2)
    with pytest.raises(ValueError, match="^invariance"):
        vicreg_loss(z1, z2, invariance=-1.0)
    with pytest.raises(ValueError, match="^eps"):
        vicreg_loss(z1, z2, eps=0.0)


@given(seed=st.integers(0, 2**16))
def test_vicreg_symmetries(seed):
    """Same loss for a joint permutation of the batch, for swapped views, and for a shared shift."""
    z1, z2 = _pairs(seed % 107)
    perm = np.random.default_rng(seed).permutation(len(z1))
    f = jitted(vicreg_loss)
    want = float(f(z1, z2))
    np.testing.assert_allclose(float(f(z1[perm], z2[perm])), want, rtol=1e-9)
    np.testing.assert_allclose(float(f(z2, z1)), want, rtol=1e-9)
    np.testing.assert_allclose(float(f(z1 + 3.0, z2 + 3.0)), want, rtol=1e-9)


# ----------------------------------------------------------------------------- PyTorch Metric Learning


def test_matches_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    from pytorch_metric_learning import distances as pml_distances

    x, y = random_batch(7, batch=12, dim=5, classes=4)
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.long)
    lp2 = pml_distances.LpDistance(normalize_embeddings=False, p=2, power=2)
    for loss, fn in [
        (pml.SupConLoss(temperature=0.1), supcon_loss),
        (pml.NTXentLoss(temperature=0.07), ntxent_loss),
        (pml.NCALoss(softmax_scale=2.0, distance=lp2), functools.partial(nca_loss, softmax_scale=2.0)),
    ]:
        np.testing.assert_allclose(float(jitted(fn)(x, y)), float(loss(xt, yt)), rtol=1e-6, err_msg=str(loss))
    # PML InstanceLoss: the batch is its own classifier, targets = rank among unique labels
    ranks = np.unique(y, return_inverse=True)[1].astype(np.int32)
    np.testing.assert_allclose(float(instance_loss(x, ranks, x, scale=64.0, normalize=True)),
                               float(pml.InstanceLoss(gamma=64)(xt, yt)), rtol=1e-6)
    z2 = x + 0.1 * np.random.default_rng(0).normal(size=x.shape)
    np.testing.assert_allclose(float(vicreg_loss(x, z2)), float(pml.VICRegLoss()(xt, ref_emb=torch.tensor(z2))),
                               rtol=1e-6)
