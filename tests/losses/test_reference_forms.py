"""Reference sets, miner weights and sample weights of the pair-based losses.

Every loss is checked against a plain-numpy loop over (query, reference) pairs written from
its formula, for values and gradients (w.r.t. the queries), with pair masks coming from a
miner of `dmljax.mining`, and against PML's ``loss(emb, labels, indices_tuple, ref_emb,
ref_labels)`` where PML has that form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax import distances
from dmljax.losses import (
    angular_loss,
    circle_loss,
    contrastive_loss,
    generalized_lifted_structured_loss,
    lifted_structured_loss,
    multi_similarity_loss,
    npair_loss,
    ntxent_loss,
    ranked_list_loss,
    supcon_loss,
    triplet_margin_loss,
)
from dmljax.masks import label_masks
from dmljax.mining import batch_hard, pair_margin
from tests.utils import numerical_grad


def _sets(seed=0, b=6, m=9, d=4, classes=3):
    rng = np.random.default_rng(seed)
    xq = rng.normal(size=(b, d))
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xr = rng.normal(size=(m, d))
    xr /= np.linalg.norm(xr, axis=1, keepdims=True)
    yq = (np.arange(b) % classes).astype(np.int32)
    yr = (np.arange(m) % classes).astype(np.int32)
    rng.shuffle(yr)
    return xq, yq, xr, yr


def _np_masks(yq, yr, pos_sel=None, neg_sel=None):
    pos = yq[:, None] == yr[None, :]
    neg = ~pos
    if pos_sel is not None:
        pos = pos & pos_sel
        neg = neg & neg_sel
    return pos, neg


def _np_dist(a, b):
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))


def _np_cos(a, b):
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    return an @ bn.T


def _lse(v):
    if len(v) == 0:
        return 0.0
    mx = max(v)
    return mx + math.log(sum(math.exp(t - mx) for t in v))


# ----------------------------------------------------------------------------- numpy loops


def np_contrastive(xq, yq, xr, yr, pos, neg, w, pos_margin=0.0, neg_margin=1.0):
    d = _np_dist(xq, xr)
    pv = [w[i] * max(d[i, j] - pos_margin, 0.0) for i in range(len(xq)) for j in range(len(xr)) if pos[i, j]]
    nv = [w[i] * max(neg_margin - d[i, j], 0.0) for i in range(len(xq)) for j in range(len(xr)) if neg[i, j]]
    mean_nz = lambda v: sum(v) / max(sum(1 for t in v if t > 0), 1)  # noqa: E731
    return mean_nz(pv) + mean_nz(nv)


def np_triplet(xq, yq, xr, yr, pos, neg, w, margin=0.2):
    d = _np_dist(xq, xr)
    vals = []
    for a in range(len(xq)):
        for p in range(len(xr)):
            if not pos[a, p]:
                continue
            for n in range(len(xr)):
                if neg[a, n]:
                    vals.append(w[a] * max(d[a, p] - d[a, n] + margin, 0.0))
    return sum(vals) / max(sum(1 for v in vals if v > 0), 1)


def np_multi_similarity(xq, yq, xr, yr, pos, neg, w, alpha=2.0, beta=50.0, base=0.5):
    s = _np_cos(xq, xr)
    total = 0.0
    for a in range(len(xq)):
        pt = math.log1p(sum(math.exp(-alpha * (s[a, j] - base)) for j in range(len(xr)) if pos[a, j])) / alpha
        nt = math.log1p(sum(math.exp(beta * (s[a, j] - base)) for j in range(len(xr)) if neg[a, j])) / beta
        total += w[a] * (pt + nt)
    return total / max(sum(w), 1.0)


def np_circle(xq, yq, xr, yr, pos, neg, w, m=0.4, gamma=80.0, alpha_from=None):
    """``alpha_from``: queries the (non-differentiated) weights alpha are computed from."""
    s = _np_cos(xq, xr)
    s0 = s if alpha_from is None else _np_cos(alpha_from, xr)
    vals, ws = [], []
    for a in range(len(xq)):
        sp = [(s[a, j], s0[a, j]) for j in range(len(xr)) if pos[a, j]]
        sn = [(s[a, j], s0[a, j]) for j in range(len(xr)) if neg[a, j]]
        if not sp or not sn:
            continue
        lp = _lse([-gamma * max(1 + m - v0, 0.0) * (v - (1 - m)) for v, v0 in sp])
        ln = _lse([gamma * max(v0 + m, 0.0) * (v - m) for v, v0 in sn])
        z = lp + ln
        vals.append(w[a] * (max(z, 0.0) + math.log1p(math.exp(-abs(z)))))
        ws.append(w[a])
    return sum(vals) / max(sum(ws), 1.0)


def np_generalized_lifted(xq, yq, xr, yr, pos, neg, w, pos_margin=0.0, neg_margin=1.0):
    d = _np_dist(xq, xr)
    total = 0.0
    for a in range(len(xq)):
        lp = _lse([d[a, j] - pos_margin for j in range(len(xr)) if pos[a, j]])
        ln = _lse([neg_margin - d[a, j] for j in range(len(xr)) if neg[a, j]])
        total += w[a] * max(lp + ln, 0.0)
    return total / max(sum(w), 1.0)


def np_lifted_reference(xq, yq, xr, yr, pos, neg, w, margin=1.0):
    """Reference form: J_ij = log sum_{k in N(i)} exp(m - D_ik) + D_ij (the anchor's negatives)."""
    d = _np_dist(xq, xr)
    vals, ws = [], []
    for i in range(len(xq)):
        negs = [margin - d[i, k] for k in range(len(xr)) if neg[i, k]]
        for j in range(len(xr)):
            if pos[i, j]:
                ws.append(w[i])
                vals.append(w[i] * (0.5 * max(_lse(negs) + d[i, j], 0.0) ** 2 if negs else 0.0))
    return sum(vals) / max(sum(ws), 1.0)


def np_ranked_list(xq, yq, xr, yr, pos, neg, w, margin=0.4, boundary=1.2, temperature=10.0, lam=0.5):
    d = _np_dist(xq, xr)
    total = 0.0
    for a in range(len(xq)):
        pv = [d[a, j] - (boundary - margin) for j in range(len(xr)) if pos[a, j] and d[a, j] > boundary - margin]
        nv = [boundary - d[a, j] for j in range(len(xr)) if neg[a, j] and d[a, j] < boundary]
        lp = sum(pv) / len(pv) if pv else 0.0
        if nv:
            ew = [math.exp(temperature * v) for v in nv]
            ln = sum(e * v for e, v in zip(ew, nv)) / sum(ew)
        else:
            ln = 0.0
        total += w[a] * ((1 - lam) * lp + lam * ln)
    return total / max(sum(w), 1.0)


def np_angular(xq, yq, xr, yr, pos, neg, w, alpha_degrees=40.0):
    qn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    rn = xr / np.linalg.norm(xr, axis=1, keepdims=True)
    t2 = math.tan(math.radians(alpha_degrees)) ** 2
    vals, ws = [], []
    for a in range(len(xq)):
        for p in range(len(xr)):
            if not pos[a, p]:
                continue
            f = [4 * t2 * (qn[a] + rn[p]) @ rn[n] - 2 * (1 + t2) * qn[a] @ rn[p]
                 for n in range(len(xr)) if neg[a, n]]
            ws.append(w[a])
            vals.append(w[a] * (math.log1p(sum(math.exp(v) for v in f)) if f else 0.0))
    return sum(vals) / max(sum(ws), 1.0)


def np_npair(xq, yq, xr, yr, pos, neg, w):
    s = xq @ xr.T
    vals, ws = [], []
    for a in range(len(xq)):
        for p in range(len(xr)):
            if pos[a, p]:
                terms = [s[a, n] - s[a, p] for n in range(len(xr)) if neg[a, n]]
                ws.append(w[a])
                vals.append(w[a] * (math.log1p(sum(math.exp(t) for t in terms)) if terms else 0.0))
    return sum(vals) / max(sum(ws), 1.0)


def np_supcon(xq, yq, xr, yr, pos, neg, w, temperature=0.1):
    s = _np_cos(xq, xr) / temperature
    total, ws = 0.0, 0.0
    for a in range(len(xq)):
        ps = [j for j in range(len(xr)) if pos[a, j]]
        if not ps:
            continue
        den = _lse([s[a, j] for j in range(len(xr)) if pos[a, j] or neg[a, j]])
        total += w[a] * -np.mean([s[a, j] - den for j in ps])
        ws += w[a]
    return total / max(ws, 1.0)


def np_ntxent(xq, yq, xr, yr, pos, neg, w, temperature=0.07):
    s = _np_cos(xq, xr) / temperature
    vals, ws = [], []
    for a in range(len(xq)):
        for p in range(len(xr)):
            if pos[a, p]:
                den = _lse([s[a, p]] + [s[a, n] for n in range(len(xr)) if neg[a, n]])
                vals.append(w[a] * (den - s[a, p]))
                ws.append(w[a])
    return sum(vals) / max(sum(ws), 1.0)


CASES = [
    ("contrastive", contrastive_loss, np_contrastive, {}),
    ("triplet", triplet_margin_loss, np_triplet, {}),
    ("multi_similarity", multi_similarity_loss, np_multi_similarity, {"mining": False}),
    ("circle", circle_loss, np_circle, {}),
    ("generalized_lifted", generalized_lifted_structured_loss, np_generalized_lifted, {}),
    ("lifted", lifted_structured_loss, np_lifted_reference, {}),
    ("ranked_list", ranked_list_loss, np_ranked_list, {}),
    ("angular", angular_loss, np_angular, {}),
    ("npair", npair_loss, np_npair, {"l2_reg": 0.0}),
    ("supcon", supcon_loss, np_supcon, {}),
    ("ntxent", ntxent_loss, np_ntxent, {}),
]


def _miner_masks(xq, yq, xr, yr):
    """PML PairMarginMiner-style selection on euclidean distances (a miner of dmljax.mining)."""
    d = distances.euclidean(jnp.asarray(xq), jnp.asarray(xr))
    pos, neg = label_masks(jnp.asarray(yq), jnp.asarray(yr))
    hp, hn = pair_margin(d, pos, neg, pos_margin=0.9, neg_margin=1.3)
    return np.asarray(hp), np.asarray(hn)


@pytest.mark.parametrize("name,fn,ref,cfg", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", ["reference", "reference+miner+weights"])
def test_reference_form_matches_numpy_loop(name, fn, ref, cfg, form):
    xq, yq, xr, yr = _sets(1)
    b = len(xq)
    kwargs = dict(cfg, ref_embeddings=xr, ref_labels=yr)
    sel = (None, None)
    w = np.ones(b)
    if form != "reference":
        sel = _miner_masks(xq, yq, xr, yr)
        assert sel[0].any() and sel[1].any() and not sel[1].all()
        w = np.linspace(0.5, 1.5, b)
        kwargs.update(pair_weights=sel, sample_weights=w)
    pos, neg = _np_masks(yq, yr, *sel)
    got = float(jax.jit(lambda q: fn(q, yq, **kwargs))(xq))
    want = ref(xq, yq, xr, yr, pos, neg, w, **{k: v for k, v in cfg.items() if k not in ("mining", "l2_reg")})
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
    grad = np.asarray(jax.grad(lambda q: fn(q, yq, **kwargs))(xq))
    ref_cfg = {k: v for k, v in cfg.items() if k not in ("mining", "l2_reg")}
    if name == "circle":  # the paper's weights alpha are not differentiated
        ref_cfg["alpha_from"] = xq
    num = numerical_grad(lambda q: ref(q, yq, xr, yr, pos, neg, w, **ref_cfg), xq)
    np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,fn,ref,cfg", CASES, ids=[c[0] for c in CASES])
def test_padded_reference_rows_change_nothing(name, fn, ref, cfg):
    """NaN in padded query and reference rows reaches neither the value nor the gradient."""
    xq, yq, xr, yr = _sets(2)
    base = fn(xq, yq, ref_embeddings=xr, ref_labels=yr, **cfg)
    xq_p = np.concatenate([xq, np.full((2, xq.shape[1]), np.nan)])
    yq_p = np.concatenate([yq, [0, 1]]).astype(np.int32)
    xr_p = np.concatenate([xr, np.full((3, xr.shape[1]), np.nan)])
    yr_p = np.concatenate([yr, [0, 1, 2]]).astype(np.int32)
    valid = np.arange(len(xq_p)) < len(xq)
    ref_valid = np.arange(len(xr_p)) < len(xr)

    def padded(q):
        return fn(q, yq_p, ref_embeddings=xr_p, ref_labels=yr_p, valid=valid, ref_valid=ref_valid, **cfg)

    np.testing.assert_allclose(float(padded(xq_p)), float(base), rtol=1e-9)
    g = np.asarray(jax.grad(padded)(xq_p))
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g[: len(xq)], np.asarray(jax.grad(
        lambda q: fn(q, yq, ref_embeddings=xr, ref_labels=yr, **cfg))(xq)), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name,fn,ref,cfg", CASES, ids=[c[0] for c in CASES])
def test_reference_is_the_batch_except_self_pairs(name, fn, ref, cfg):
    """The batch as its own reference set with its self-pairs removed by pair_weights equals
    the self form (self-pairs are excluded only in the self form)."""
    xq, yq, _, _ = _sets(3, b=8)
    not_self = ~np.eye(len(xq), dtype=bool)
    self_form = float(fn(xq, yq, **cfg))
    as_ref = float(fn(xq, yq, ref_embeddings=xq, ref_labels=yq, pair_weights=not_self, **cfg))
    if name == "lifted":  # the reference form uses the anchor's negatives only (documented)
        return
    np.testing.assert_allclose(as_ref, self_form, rtol=1e-9, atol=1e-12)


def test_batch_hard_miner_drives_triplet_loss():
    """batch_hard's one-hot weights as pair_weights == mining="batch_hard"."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 3))
    y = (np.arange(10) % 3).astype(np.int32)
    d = distances.euclidean(jnp.asarray(x))
    pos, neg = label_masks(jnp.asarray(y))
    mined = batch_hard(d, pos, neg)
    for reduction in ("mean", "sum", "mean_nonzero"):
        got = triplet_margin_loss(x, y, pair_weights=mined, reduction=reduction, margin=0.5)
        want = triplet_margin_loss(x, y, mining="batch_hard", reduction=reduction, margin=0.5)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-9)


def test_bad_reference_arguments_raise():
    xq, yq, xr, yr = _sets(0)
    with pytest.raises(ValueError, match="^ref_embeddings needs ref_labels"):
        contrastive_loss(xq, yq, ref_embeddings=xr)
    with pytest.raises(ValueError, match="^ref_labels needs ref_embeddings"):
        contrastive_loss(xq, yq, ref_labels=yr)
    with pytest.raises(ValueError, match="^ref_embeddings must have feature dim"):
        contrastive_loss(xq, yq, ref_embeddings=xr[:, :2], ref_labels=yr)
    with pytest.raises(ValueError, match="^pair_weights must have shape"):
        contrastive_loss(xq, yq, ref_embeddings=xr, ref_labels=yr, pair_weights=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="^sample_weights must have shape"):
        multi_similarity_loss(xq, yq, sample_weights=np.ones(3))
    with pytest.raises(ValueError, match="^reduction='threshold' is not a loss option"):
        triplet_margin_loss(xq, yq, reduction="threshold")


# ----------------------------------------------------------------------------- PML forms


def _pml_pairs(sel_pos, sel_neg, torch):
    a1, p = np.nonzero(sel_pos)
    a2, n = np.nonzero(sel_neg)
    return tuple(torch.as_tensor(v, dtype=torch.long) for v in (a1, p, a2, n))


def _pml_cases(pml):
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

    return [
        ("contrastive", contrastive_loss, {}, pml.ContrastiveLoss(distance=LpDistance(normalize_embeddings=False))),
        ("triplet", triplet_margin_loss, {}, pml.TripletMarginLoss(margin=0.2, distance=LpDistance(normalize_embeddings=False))),
        ("multi_similarity", multi_similarity_loss, {"mining": False}, pml.MultiSimilarityLoss()),
        ("circle", circle_loss, {}, pml.CircleLoss()),
        ("generalized_lifted", generalized_lifted_structured_loss, {},
         pml.GeneralizedLiftedStructureLoss(distance=LpDistance(normalize_embeddings=False))),
        ("angular", angular_loss, {}, pml.AngularLoss()),
        ("supcon", supcon_loss, {"reduction": "mean_nonzero"}, pml.SupConLoss(temperature=0.1)),
        ("ntxent", ntxent_loss, {}, pml.NTXentLoss(temperature=0.07)),
        ("cosine_contrastive", contrastive_loss, {"metric": "cosine", "pos_margin": 1.0, "neg_margin": 0.0},
         pml.ContrastiveLoss(pos_margin=1.0, neg_margin=0.0, distance=CosineSimilarity())),
    ]


@pytest.mark.parametrize("with_miner", [False, True])
def test_reference_forms_match_pml(with_miner):
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pml

    xq, yq, xr, yr = _sets(5, b=8, m=12)
    sel = _miner_masks(xq, yq, xr, yr) if with_miner else (np.ones((8, 12), bool), np.ones((8, 12), bool))
    pos, neg = _np_masks(yq, yr, *sel)
    for name, fn, cfg, loss in _pml_cases(pml):
        kwargs = dict(cfg, ref_embeddings=xr, ref_labels=yr)
        if with_miner:
            # PML's AngularLoss takes only the positive pairs of an indices_tuple (every item of
            # another class is a negative)
            kwargs["pair_weights"] = (sel[0], np.ones_like(sel[1])) if name == "angular" else sel
        got = float(fn(xq, yq, **kwargs))
        tq = torch.tensor(xq, requires_grad=True)
        indices = _pml_pairs(pos, neg, torch) if with_miner else None
        want = loss(tq, torch.as_tensor(yq, dtype=torch.long), indices, torch.tensor(xr),
                    torch.as_tensor(yr, dtype=torch.long))
        np.testing.assert_allclose(got, float(want), rtol=1e-6, atol=1e-9, err_msg=name)
        want.backward()
        grad = np.asarray(jax.grad(lambda q: fn(q, yq, **kwargs))(xq))
        np.testing.assert_allclose(grad, tq.grad.numpy(), rtol=1e-5, atol=1e-8, err_msg=name)


def test_class_weighted_reducer_recipe_matches_pml():
    """PML ClassWeightedReducer(w) divides by the number of terms N, not by the weight sum:
    ``loss(..., sample_weights=w[labels], reduction="sum") / N`` (README recipe)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.reducers import ClassWeightedReducer

    from dmljax.masks import triplet_count

    rng = np.random.default_rng(7)
    x = rng.normal(size=(12, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (np.arange(12) % 3).astype(np.int32)
    w = np.array([0.2, 1.0, 2.5])
    tx, ty = torch.tensor(x), torch.as_tensor(y, dtype=torch.long)
    red = ClassWeightedReducer(torch.tensor(w))
    # triplets: N = number of triplets
    want = float(pml.TripletMarginLoss(margin=0.2, distance=LpDistance(normalize_embeddings=False),
                                       reducer=red)(tx, ty))
    pos, neg = label_masks(jnp.asarray(y))
    got = float(triplet_margin_loss(x, y, sample_weights=w[y], reduction="sum")) / float(triplet_count(pos, neg))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    weight_sum_mean = float(triplet_margin_loss(x, y, sample_weights=w[y], reduction="mean"))
    assert abs(weight_sum_mean - want) > 1e-3  # dividing by the weight sum is another number
    # (PML's per-anchor losses such as MultiSimilarityLoss return [B, 1] losses, which its
    # ClassWeightedReducer broadcasts against [B] weights: mean(l) * mean(w[labels]) there.)
