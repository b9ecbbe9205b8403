"""MATHM modality-aware triplet hard mining and the two-branch model (synthetic two-modality data)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.models.cross_modal import TwoBranchEmbedding, modality_aware_triplet_loss
from tests.utils import degenerate_batches


def np_mathm(a, la, b, lb, margin=0.3, weights=(1.0, 1.0, 1.0)):
    items = [(a[i], la[i], 0) for i in range(len(a))] + [(b[i], lb[i], 1) for i in range(len(b))]
    n = len(items)
    d = [[float(np.linalg.norm(items[i][0] - items[j][0])) for j in range(n)] for i in range(n)]

    def term(pos_cross, neg_cross):
        losses = []
        for i in range(n):
            pos = [j for j in range(n) if j != i and items[j][1] == items[i][1]
                   and (items[j][2] != items[i][2]) == pos_cross]
            neg = [j for j in range(n) if items[j][1] != items[i][1] and (items[j][2] != items[i][2]) == neg_cross]
            if pos and neg:
                losses.append(max(max(d[i][j] for j in pos) - min(d[i][j] for j in neg) + margin, 0.0))
        return float(np.mean(losses)) if losses else 0.0

    return weights[0] * term(True, True) + weights[1] * term(False, False) + weights[2] * term(True, False)


def _batch(seed=0, na=6, nb=5, dim=4, classes=3):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(na, dim)), rng.normal(size=(nb, dim))
    return a, rng.integers(0, classes, na).astype(np.int32), b, rng.integers(0, classes, nb).astype(np.int32)


@pytest.mark.parametrize("seed,margin,weights", [(0, 0.3, (1, 1, 1)), (1, 1.0, (0.5, 0, 2)), (2, 0.0, (1, 1, 1))])
def test_matches_loop(seed, margin, weights):
    a, la, b, lb = _batch(seed)
    got = modality_aware_triplet_loss(a, la, b, lb, margin=margin, cross_weight=weights[0],
                                      intra_weight=weights[1], mixed_weight=weights[2])
    np.testing.assert_allclose(got, np_mathm(a, la, b, lb, margin, weights), rtol=1e-6)


def test_terms_are_distinct():
    # sketches cluster by modality: mixed term large, intra term small -> weights matter
    a, la, b, lb = _batch(3)
    a = a * 0.1 + 5.0
    vals = [float(modality_aware_triplet_loss(a, la, b, lb, cross_weight=c, intra_weight=i, mixed_weight=m))
            for c, i, m in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    assert len({round(v, 6) for v in vals}) == 3
    assert vals[2] > 4.0  # cross-modal positives ~5 away, same-modality negatives close


def test_gradients_jit_and_padding():
    a, la, b, lb = _batch(4, na=4, nb=4, dim=3)
    f = functools.partial(modality_aware_triplet_loss, margin=0.5)
    check_grads(lambda x, y: f(x, la, y, lb), (a, b), order=1, modes=["rev"])
    np.testing.assert_allclose(jax.jit(f)(a, la, b, lb), f(a, la, b, lb), rtol=1e-10)
    pa = np.concatenate([a, np.zeros((2, 3))])
    pla = np.concatenate([la, [la[0], la[1]]]).astype(np.int32)
    got = f(pa, pla, b, lb, valid_a=np.array([1, 1, 1, 1, 0, 0], bool))
    np.testing.assert_allclose(got, f(a, la, b, lb), rtol=1e-10)


def test_degenerate_finite():
    # one compiled loss + gradients per shape, shared by the degenerate batches
    value_and_grads = jax.jit(jax.value_and_grad(modality_aware_triplet_loss, argnums=(0, 2)))
    for name, (x, labels) in degenerate_batches().items():
        for other in ((x, labels), (x[:1] * 0, labels[:1])):
            v, g = value_and_grads(x, labels, other[0], other[1])
            assert np.isfinite(v) and all(np.isfinite(np.asarray(gi)).all() for gi in g), (name, len(other[1]))


def test_bad_input():
    a, la, b, lb = _batch()
    with pytest.raises(ValueError, match="^emb_b must have feature dim"):
        modality_aware_triplet_loss(a, la, b[:, :2], lb)
    with pytest.raises(ValueError, match="^labels_b has batch size"):
        modality_aware_triplet_loss(a, la, b, lb[:2])
    with pytest.raises(ValueError, match="^labels_a must be an integer"):
        modality_aware_triplet_loss(a, la.astype(float), b, lb)
    with pytest.raises(ValueError, match="^margin"):
        modality_aware_triplet_loss(a, la, b, lb, margin=-0.1)
    with pytest.raises(ValueError, match="^emb_a must have rank 2"):
        modality_aware_triplet_loss(a[0], la, b, lb)
    with pytest.raises(ValueError, match="^mixed_weight"):
        modality_aware_triplet_loss(a, la, b, lb, mixed_weight=-1.0)


@given(st.integers(0, 10_000))
def test_invariances(seed):
    """Permuting each modality's batch, renaming classes and rotating the space change nothing."""
    a, la, b, lb = _batch(seed % 50)
    rng = np.random.default_rng(seed)
    pa, pb = rng.permutation(len(a)), rng.permutation(len(b))
    rename = rng.permutation(10)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    ref = modality_aware_triplet_loss(a, la, b, lb)
    got = modality_aware_triplet_loss(a[pa] @ q, rename[la[pa]], b[pb] @ q, rename[lb[pb]])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def two_modality_data(seed, classes, per_class, *, centre_dim=6, feat_a=10, feat_b=12, noise=0.3):
    """Two random linear views (plus noise) of shared class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, centre_dim))
    view_a, view_b = rng.normal(size=(centre_dim, feat_a)), rng.normal(size=(centre_dim, feat_b)) * 3.0
    labels = np.repeat(np.arange(classes), per_class).astype(np.int32)
    z_a = centres[labels] + noise * rng.normal(size=(len(labels), centre_dim))
    z_b = centres[labels] + noise * rng.normal(size=(len(labels), centre_dim))
    return z_a @ view_a, z_b @ view_b + 1.0, labels


def cross_modal_map(q, g, lq, lg):
    """mAP@all of sketch queries against the photo gallery (numpy)."""
    d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    aps = []
    for i in range(len(q)):
        rel = lg[np.argsort(d[i], kind="stable")] == lq[i]
        hits = np.cumsum(rel)
        aps.append(np.sum(hits[rel] / (np.flatnonzero(rel) + 1)) / rel.sum())
    return float(np.mean(aps))


def test_zero_shot_cross_modal_retrieval_improves():
    # 16 classes share one set of views; train on 10, evaluate on the 6 unseen ones
    xa, xb, labels = two_modality_data(0, 16, 8)
    train, test = labels < 10, labels >= 10
    model = TwoBranchEmbedding(10, 12, 16, hidden=(32,), rngs=nnx.Rngs(0))
    ea, eb = model(xa[test], xb[test])
    before = cross_modal_map(np.asarray(ea), np.asarray(eb), labels[test], labels[test])
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, sa, sb, la, lb):
        def loss_fn(m):
            za, zb = m(sa, sb)
            return modality_aware_triplet_loss(za, la, zb, lb, margin=0.3)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(1)
    idx_all = np.flatnonzero(train)
    for _ in range(300):
        ia, ib = rng.choice(idx_all, 32, replace=False), rng.choice(idx_all, 32, replace=False)
        step(model, opt, xa[ia], xb[ib], labels[ia], labels[ib])
    ea, eb = model(xa[test], xb[test])
    after = cross_modal_map(np.asarray(ea), np.asarray(eb), labels[test], labels[test])
    assert after > before + 0.15, (before, after)
    assert after > 0.45, (before, after)  # chance level is ~0.25 here
