"""Multi-label relevance, triplet selection (Sumbul et al. 2021) and retrieval metrics vs numpy loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.losses import multilabel as ml
from dmljax.metrics import multilabel as mm
from tests.utils import degenerate_batches


def _batch(seed=0, batch=10, dim=4, classes=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim))
    y = (rng.random((batch, classes)) < 0.3).astype(np.int32)
    return x, y


def np_anchors(x, num, valid=None):
    n = len(x)
    valid = np.ones(n, bool) if valid is None else valid
    items = [i for i in range(n) if valid[i]]
    mean = np.mean(x[items], axis=0)
    chosen = [max(items, key=lambda i: np.sum((x[i] - mean) ** 2))]
    while len(chosen) < min(num, len(items)):
        rest = [i for i in items if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(np.sum((x[i] - x[c]) ** 2) for c in chosen)))
    return sorted(chosen)


def np_loss(x, y, margin, mining, num_anchors):
    n = len(x)
    d = [[math.sqrt(np.sum((x[i] - x[j]) ** 2)) for j in range(n)] for i in range(n)]
    anchors = np_anchors(x, num_anchors) if mining == "informative" else range(n)
    losses = []
    for a in anchors:
        pos = [p for p in range(n) if p != a and np.sum(y[a] * y[p]) > 0]
        neg = [q for q in range(n) if np.sum(y[a] * y[q]) == 0]
        if not pos or not neg:
            continue
        if mining == "informative":
            jac = lambda p: np.sum(y[a] * y[p]) / np.sum(np.maximum(y[a], y[p]))
            p = max(pos, key=lambda j: jac(j) * d[a][j])
        else:
            p = max(pos, key=lambda j: d[a][j])
        q = min(neg, key=lambda j: d[a][j])
        losses.append(max(d[a][p] - d[a][q] + margin, 0.0))
    return float(np.mean(losses)) if losses else 0.0


def test_relevance_matches_loop():
    _, y = _batch(1)
    y[0] = 0  # an empty row: Jaccard 0
    shared = np.array([[np.sum(a * b) for b in y] for a in y])
    union = np.array([[np.sum(np.maximum(a, b)) for b in y] for a in y])
    np.testing.assert_allclose(ml.shared_label_count(y), shared)
    np.testing.assert_allclose(ml.jaccard_relevance(y), np.where(union > 0, shared / np.maximum(union, 1), 0))
    pos, neg = ml.multilabel_masks(y)
    np.testing.assert_array_equal(pos, (shared > 0) & ~np.eye(len(y), dtype=bool))
    np.testing.assert_array_equal(neg, shared == 0)


@pytest.mark.parametrize("num", [1, 3, 10, 20])
def test_diverse_anchors_match_loop(num):
    x, _ = _batch(2)
    got = np.flatnonzero(ml.select_diverse_anchors(x, num))
    assert got.tolist() == np_anchors(x, num)
    valid = np.arange(10) < 7
    assert np.flatnonzero(ml.select_diverse_anchors(x, num, valid=valid)).tolist() == np_anchors(x, num, valid)


@pytest.mark.parametrize("seed,mining,margin,num", [(0, "informative", 0.2, 5), (1, "informative", 1.0, 3),
                                                     (2, "batch_hard", 0.5, None), (3, "informative", 0.0, 10)])
def test_loss_matches_loop(seed, mining, margin, num):
    x, y = _batch(seed)
    got = ml.multilabel_triplet_loss(x, y, margin=margin, mining=mining, num_anchors=num)
    want = np_loss(x, y, margin, mining, num if num else 5)
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gradients_jit_padding():
    x, y = _batch(4, batch=8, dim=3)
    f = functools.partial(ml.multilabel_triplet_loss, margin=0.5, num_anchors=4)
    check_grads(lambda z: f(z, y), (x,), order=1, modes=["rev"])
    np.testing.assert_allclose(jax.jit(f)(x, y), f(x, y), rtol=1e-10)
    xp = np.concatenate([x, np.zeros((2, 3))])
    yp = np.concatenate([y, np.ones((2, y.shape[1]), np.int32)])
    np.testing.assert_allclose(f(xp, yp, valid=np.arange(10) < 8), f(x, y), rtol=1e-10)


def test_degenerate_finite():
    # one compiled loss + gradient per mining (and shape), shared by the degenerate batches
    value_and_grad = {mining: jax.jit(jax.value_and_grad(functools.partial(ml.multilabel_triplet_loss, mining=mining)))
                      for mining in ("informative", "batch_hard")}
    for name, (x, labels) in degenerate_batches().items():
        y = np.eye(3, dtype=np.float32)[labels % 3]
        for mining, f in value_and_grad.items():
            v, g = f(x, y)
            assert np.isfinite(v) and np.isfinite(np.asarray(g)).all(), (name, mining)
        v, g = value_and_grad["informative"](x, np.zeros_like(y))  # no labels at all
        assert float(v) == 0.0 and np.isfinite(np.asarray(g)).all(), name


def test_bad_input():
    x, y = _batch()
    with pytest.raises(ValueError, match="^multi_hot must have rank 2"):
        ml.multilabel_triplet_loss(x, y[:, 0])
    with pytest.raises(ValueError, match="^multi_hot has batch size"):
        ml.multilabel_triplet_loss(x, y[:3])
    with pytest.raises(ValueError, match="^margin"):
        ml.multilabel_triplet_loss(x, y, margin=-1.0)
    with pytest.raises(ValueError, match="^mining"):
        ml.multilabel_triplet_loss(x, y, mining="all")
    with pytest.raises(ValueError, match="^num_anchors"):
        ml.multilabel_triplet_loss(x, y, num_anchors=0)
    with pytest.raises(ValueError, match="^embeddings must have rank 2"):
        ml.multilabel_triplet_loss(x[0], y)
    with pytest.raises(ValueError, match="^ref_multi_hot must have"):
        ml.jaccard_relevance(y, y[:, :2])
    idx = np.zeros((10, 3), np.int32)
    with pytest.raises(ValueError, match="^k must be"):
        mm.multilabel_map_at_k(idx, y, y, k=4)
    with pytest.raises(ValueError, match="^neighbor_indices must have shape"):
        mm.multilabel_ndcg_at_k(idx[:2], y, y, k=2)
    with pytest.raises(ValueError, match="^gallery_labels must have rank 2"):
        mm.multilabel_precision_at_k(idx, y, y[:, 0], k=2)


@given(st.integers(0, 10_000))
def test_invariances(seed):
    """Permuting the batch, the label columns, and rotating the space leave the loss unchanged."""
    x, y = _batch(seed % 50)
    rng = np.random.default_rng(seed)
    perm, cols = rng.permutation(len(x)), rng.permutation(y.shape[1])
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    for mining in ("informative", "batch_hard"):
        ref = ml.multilabel_triplet_loss(x, y, mining=mining, num_anchors=4)
        got = ml.multilabel_triplet_loss(x[perm] @ q, y[perm][:, cols], mining=mining, num_anchors=4)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- metrics


def np_metrics(idx, qy, gy, k):
    prec, aps, ndcgs = [], [], []
    for i in range(len(qy)):
        gains = [int(np.sum(qy[i] * gy[j])) for j in idx[i][:k]]
        rel = [g > 0 for g in gains]
        prec.append(sum(rel) / k)
        hits, ap = 0, 0.0
        for r, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                ap += hits / r
        aps.append(ap / hits if hits else 0.0)
        ideal = sorted((int(np.sum(qy[i] * g)) for g in gy), reverse=True)[:k]
        idcg = sum((2 ** g - 1) / math.log2(r + 1) for r, g in enumerate(ideal, start=1))
        if idcg > 0:
            ndcgs.append(sum((2 ** g - 1) / math.log2(r + 1) for r, g in enumerate(gains, start=1)) / idcg)
    return np.mean(prec), np.mean(aps), np.mean(ndcgs)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_metrics_match_loop(k):
    rng = np.random.default_rng(k)
    qy = (rng.random((7, 4)) < 0.4).astype(np.int32)
    gy = (rng.random((12, 4)) < 0.4).astype(np.int32)
    qy[0] = 0  # a query sharing nothing: skipped by nDCG, 0 for P and AP
    idx = np.stack([rng.permutation(12)[:6] for _ in range(7)]).astype(np.int32)
    p, ap, ndcg = np_metrics(idx, qy, gy, k)
    np.testing.assert_allclose(mm.multilabel_precision_at_k(idx, qy, gy, k=k), p, rtol=1e-6)
    np.testing.assert_allclose(mm.multilabel_map_at_k(idx, qy, gy, k=k), ap, rtol=1e-6)
    np.testing.assert_allclose(mm.multilabel_ndcg_at_k(idx, qy, gy, k=k), ndcg, rtol=1e-6)
    out = mm.multilabel_retrieval_metrics(idx, qy, gy, ks=(k,))
    assert set(out) == {f"precision@{k}", f"map@{k}", f"ndcg@{k}"}


def test_ndcg_is_one_for_the_ideal_ranking():
    rng = np.random.default_rng(5)
    qy = (rng.random((5, 4)) < 0.5).astype(np.int32)
    gy = (rng.random((9, 4)) < 0.5).astype(np.int32)
    idx = np.argsort(-(qy @ gy.T), axis=1, kind="stable")[:, :4].astype(np.int32)
    has = (qy @ gy.T).max(axis=1) > 0
    assert has.any()
    np.testing.assert_allclose(mm.multilabel_ndcg_at_k(idx, qy, gy, k=4), 1.0, rtol=1e-6)
    worst = np.argsort(qy @ gy.T, axis=1, kind="stable")[:, :4].astype(np.int32)
    assert float(mm.multilabel_ndcg_at_k(worst, qy, gy, k=4)) < 1.0
