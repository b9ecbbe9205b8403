"""RKD distance / angle losses (Park et al. 2019) against numpy loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.losses import distillation as rkd
from dmljax.losses.triplet import triplet_margin_loss
from tests.utils import degenerate_batches, random_batch


def np_huber(x):
    return 0.5 * x * x if abs(x) <= 1.0 else abs(x) - 0.5


def np_rkd_distance(s, t):
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if not pairs:
        return 0.0
    ds = {p: np.linalg.norm(s[p[0]] - s[p[1]]) for p in pairs}
    dt = {p: np.linalg.norm(t[p[0]] - t[p[1]]) for p in pairs}
    ms, mt = np.mean(list(ds.values())), np.mean(list(dt.values()))
    return float(np.mean([np_huber(ds[p] / ms - dt[p] / mt) for p in pairs]))


def np_cos_angle(x, i, j, k):
    a, b = x[i] - x[j], x[k] - x[j]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def np_rkd_angle(s, t, triplets=None):
    n = len(s)
    if triplets is None:
        triplets = [(i, j, k) for i in range(n) for j in range(n) for k in range(n) if len({i, j, k}) == 3]
    if len(triplets) == 0:
        return 0.0
    return float(np.mean([np_huber(np_cos_angle(s, *tr) - np_cos_angle(t, *tr)) for tr in triplets]))


def _pair(seed=0, batch=7, ds=4, dt=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, ds)), 3.0 * rng.normal(size=(batch, dt))


def test_distance_matches_loop():
    s, t = _pair()
    np.testing.assert_allclose(rkd.rkd_distance_loss(s, t), np_rkd_distance(s, t), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])
def test_angle_matches_loop_any_chunk(chunk_size):
    s, t = _pair()
    np.testing.assert_allclose(rkd.rkd_angle_loss(s, t, chunk_size=chunk_size), np_rkd_angle(s, t), rtol=1e-5)


def test_huber_branch_is_exercised():
    # teacher angles flipped relative to the student: |diff| > 1 occurs, so both Huber branches count
    s, _ = _pair(1)
    t = s.copy()
    t[:, 0] *= -5.0
    ref = np_rkd_angle(s, t)
    np.testing.assert_allclose(rkd.rkd_angle_loss(s, t), ref, rtol=1e-5)
    np.testing.assert_allclose(rkd.rkd_distance_loss(s, t), np_rkd_distance(s, t), rtol=1e-5)


def test_sampled_matches_loop_on_its_triplets_and_estimates_full():
    s, t = _pair(2)
    key = jax.random.key(0)
    tri = np.asarray(rkd.sample_distinct_triplets(key, len(s), 64))
    assert all(len(set(r)) == 3 for r in tri.tolist())
    np.testing.assert_allclose(rkd.rkd_angle_loss_sampled(key, s, t, num_triplets=64),
                               np_rkd_angle(s, t, [tuple(r) for r in tri]), rtol=1e-5)
    est = rkd.rkd_angle_loss_sampled(jax.random.key(1), s, t, num_triplets=20000)
    np.testing.assert_allclose(est, rkd.rkd_angle_loss(s, t), rtol=0.05)


def test_sampler_is_uniform_over_distinct_triplets():
    tri = np.asarray(rkd.sample_distinct_triplets(jax.random.key(3), 4, 24000))
    codes = tri[:, 0] * 16 + tri[:, 1] * 4 + tri[:, 2]
    counts = np.bincount(codes, minlength=64)
    nonzero = counts[counts > 0]
    assert len(nonzero) == 24  # 4 * 3 * 2 ordered distinct triplets
    assert nonzero.min() > 0.8 * 1000 and nonzero.max() < 1.2 * 1000


@pytest.mark.parametrize("fn", ["distance", "angle"])
def test_gradients(fn):
    s, t = _pair(3, batch=5, ds=3, dt=4)
    f = (lambda z: rkd.rkd_distance_loss(z, t)) if fn == "distance" else (lambda z: rkd.rkd_angle_loss(z, t, chunk_size=2))
    check_grads(jax.jit(f), (s,), order=1, modes=["rev"])
    # the teacher receives no gradient
    g = jax.grad(lambda tt: rkd.rkd_angle_loss(s, tt) + rkd.rkd_distance_loss(s, tt))(t)
    assert np.all(np.asarray(g) == 0)


def test_jit_equals_eager_and_valid_mask_equals_unpadded():
    s, t = _pair(4)
    for f in (rkd.rkd_distance_loss, functools.partial(rkd.rkd_angle_loss, chunk_size=3)):
        np.testing.assert_allclose(jax.jit(f)(s, t), f(s, t), rtol=1e-10)
        sp = np.concatenate([s, 100 + np.zeros((2, s.shape[1]))])
        tp = np.concatenate([t, np.ones((2, t.shape[1]))])
        valid = np.array([True] * len(s) + [False, False])
        np.testing.assert_allclose(f(sp, tp, valid=valid), f(s, t), rtol=1e-8)


def test_zero_when_student_is_scaled_rotated_teacher():
    t = _pair(5)[1]
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
    s = 0.3 * t @ q
    assert float(rkd.rkd_distance_loss(s, t)) < 1e-12
    assert float(rkd.rkd_angle_loss(s, t)) < 1e-12


def test_degenerate_batches_finite():
    # one compiled loss + gradient per shape, shared by the degenerate batches and teachers
    value_and_grad = jax.jit(jax.value_and_grad(
        functools.partial(rkd.rkd_distillation_loss, base_loss=triplet_margin_loss)))
    for name, (x, labels) in degenerate_batches().items():
        t = np.random.default_rng(0).normal(size=(len(x), 3))
        # the helper covers the distance, angle and base terms; the second teacher is all zeros
        for teacher in (t, np.zeros_like(t)):
            v, g = value_and_grad(x, teacher, labels)
            assert np.isfinite(v) and np.isfinite(np.asarray(g)).all(), (name, float(np.abs(teacher).max()))


def test_distillation_helper_combines_terms():
    s, t = _pair(6, batch=8)
    labels = np.arange(8) % 3
    base = functools.partial(triplet_margin_loss, margin=0.2)
    got = rkd.rkd_distillation_loss(s, t, labels, base_loss=base, base_weight=0.5)
    want = np_rkd_distance(s, t) + 2.0 * np_rkd_angle(s, t) + 0.5 * float(base(s, labels))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(rkd.rkd_distillation_loss(s, t), np_rkd_distance(s, t) + 2 * np_rkd_angle(s, t), rtol=1e-5)


def test_bf16_upcast():
    s, t = _pair(7)
    v = rkd.rkd_angle_loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert v.dtype == jnp.float32


def test_bad_input():
    s, t = _pair()
    with pytest.raises(ValueError, match="^student must have rank 2"):
        rkd.rkd_distance_loss(s[0], t)
    with pytest.raises(ValueError, match="^teacher has batch size"):
        rkd.rkd_angle_loss(s, t[:3])
    with pytest.raises(ValueError, match="^teacher must be a floating"):
        rkd.rkd_distance_loss(s, np.zeros((7, 2), np.int32))
    with pytest.raises(ValueError, match="^chunk_size"):
        rkd.rkd_angle_loss(s, t, chunk_size=0)
    with pytest.raises(ValueError, match="^delta"):
        rkd.rkd_distance_loss(s, t, delta=-1.0)
    with pytest.raises(ValueError, match="^num_triplets"):
        rkd.rkd_angle_loss_sampled(jax.random.key(0), s, t, num_triplets=0)
    with pytest.raises(ValueError, match="^labels are required"):
        rkd.rkd_distillation_loss(s, t, base_loss=triplet_margin_loss)
    with pytest.raises(ValueError, match="^angle_weight"):
        rkd.rkd_distillation_loss(s, t, angle_weight=-1.0)


_ANGLE = jax.jit(rkd.rkd_angle_loss, static_argnames=("chunk_size",))
_DISTANCE = jax.jit(rkd.rkd_distance_loss)


@given(st.integers(0, 10_000))
def test_permutation_invariance(seed):
    s, t = _pair(seed % 97, batch=6)
    perm = np.random.default_rng(seed).permutation(6)
    ref = _ANGLE(s, t, chunk_size=4)
    assert math.isfinite(float(ref)) and float(ref) > 0
    np.testing.assert_allclose(_ANGLE(s[perm], t[perm], chunk_size=4), ref, rtol=1e-9)
    np.testing.assert_allclose(_DISTANCE(s[perm], t[perm]), _DISTANCE(s, t), rtol=1e-9)


def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            yield from _all_shapes(sub)
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                yield from _all_shapes(getattr(inner, "jaxpr", inner))


def test_angle_term_memory_is_quadratic_in_the_batch():
    """No intermediate of the forward + backward pass holds B^3 (or chunk x B^2 with chunk > 2) entries."""
    b, d = 24, 3
    s, t = np.ones((b, d)), np.ones((b, d))
    jaxpr = jax.make_jaxpr(jax.grad(lambda z: rkd.rkd_angle_loss(z, t, chunk_size=2)))(s).jaxpr
    sizes = [int(np.prod(sh)) for sh in _all_shapes(jaxpr)]
    assert max(sizes) <= 2 * b * b, max(sizes)
    # the sampled estimate never builds a B x B matrix at all
    jaxpr = jax.make_jaxpr(jax.grad(lambda z: rkd.rkd_angle_loss_sampled(jax.random.key(0), z, t, num_triplets=16)))(s).jaxpr
    assert max(int(np.prod(sh)) for sh in _all_shapes(jaxpr)) <= max(16 * d, b * d)
