"""Pair / tuple losses against plain numpy loops written from the papers' formulas."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.losses.pair import (
    angular_loss,
    contrastive_loss,
    generalized_lifted_structured_loss,
    lifted_structured_loss,
    npair_loss,
    quadruplet_loss,
    ranked_list_loss,
    tuplet_loss,
)
from tests.utils import assert_jit_matches, degenerate_batches, numerical_grad, random_batch

# ----------------------------------------------------------------------------- references


def np_dist(x, squared=False):
    n = len(x)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            v = np.sum((x[i] - x[j]) ** 2)
            d[i, j] = v if squared else math.sqrt(v)
    return d


def ref_contrastive(x, y, pos_margin=0.0, neg_margin=1.0, metric="euclidean", squared=False,
                    reduction="mean_nonzero"):
    n = len(x)
    pos, neg = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if metric == "cosine":
                s = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
                lp, ln = max(pos_margin - s, 0.0), max(s - neg_margin, 0.0)
            else:
                d = np.sum((x[i] - x[j]) ** 2)
                d = d if metric == "squared_euclidean" else math.sqrt(d)
                lp, ln = max(d - pos_margin, 0.0), max(neg_margin - d, 0.0)
            if squared:
                lp, ln = 0.5 * lp * lp, 0.5 * ln * ln
            (pos if y[i] == y[j] else neg).append(lp if y[i] == y[j] else ln)

    def red(v):
        if reduction == "sum":
            return sum(v)
        if reduction == "mean":
            return sum(v) / max(len(v), 1)
        nz = [a for a in v if a > 0]
        return sum(nz) / max(len(nz), 1)

    return red(pos) + red(neg)


def ref_lifted(x, y, margin=1.0):
    """Song et al. 2016 eq. (4), literally: negatives of both ends, 1/(2|P|) sum [J]_+^2."""
    d = np_dist(x)
    n = len(x)
    total, count = 0.0, 0
    for i in range(n):
        for j in range(n):
            if i == j or y[i] != y[j]:
                continue
            count += 1
            s = 0.0
            for k in range(n):
                if y[k] != y[i]:
                    s += math.exp(margin - d[i, k])
            for l in range(n):
                if y[l] != y[j]:
                    s += math.exp(margin - d[j, l])
            if s == 0.0:
                continue
            jij = math.log(s) + d[i, j]
            total += max(jij, 0.0) ** 2
    return total / (2 * max(count, 1))


def ref_generalized_lifted(x, y, pos_margin=0.0, neg_margin=1.0):
    d = np_dist(x)
    n = len(x)
    total = 0.0
    for a in range(n):
        sp = sum(math.exp(d[a, p] - pos_margin) for p in range(n) if p != a and y[p] == y[a])
        sn = sum(math.exp(neg_margin - d[a, k]) for k in range(n) if y[k] != y[a])
        value = (math.log(sp) if sp > 0 else 0.0) + (math.log(sn) if sn > 0 else 0.0)
        total += max(value, 0.0)
    return total / n


def ref_npair(x, y, l2_reg=0.002, pairs="all"):
    n = len(x)
    losses = []
    if pairs == "all":
        for a in range(n):
            for p in range(n):
                if a == p or y[a] != y[p]:
                    continue
                s = sum(math.exp(x[a] @ x[k] - x[a] @ x[p]) for k in range(n) if y[k] != y[a])
                losses.append(math.log(1.0 + s))
    else:
        pairs_by_class = {}
        for i in range(n):
            pairs_by_class.setdefault(int(y[i]), []).append(i)
        tuples = [(m[0], m[1]) for m in pairs_by_class.values() if len(m) >= 2]
        for a, p in tuples:
            logits = [x[a] @ x[q] for _, q in tuples]
            mx = max(logits)
            lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
            losses.append(lse - x[a] @ x[p])
    reg = np.mean([x[i] @ x[i] for i in range(n)])
    return sum(losses) / max(len(losses), 1) + l2_reg * reg


def ref_quadruplet(x, y, margin1=1.0, margin2=0.5):
    d = np_dist(x, squared=True)
    n = len(x)
    t1, c1, t2, c2 = 0.0, 0, 0.0, 0
    for i in range(n):
        for j in range(n):
            if i == j or y[i] != y[j]:
                continue
            for k in range(n):
                if y[k] == y[i]:
                    continue
                t1 += max(d[i, j] - d[i, k] + margin1, 0.0)
                c1 += 1
                for l in range(n):
                    if y[l] == y[i] or y[l] == y[k]:
                        continue
                    t2 += max(d[i, j] - d[l, k] + margin2, 0.0)
                    c2 += 1
    return t1 / max(c1, 1) + t2 / max(c2, 1)


def ref_quadruplet_hard(x, y, margin1=1.0, margin2=0.5, mining="hard"):
    d = np_dist(x, squared=True)
    n = len(x)
    t1, c1, t2, c2 = 0.0, 0, 0.0, 0
    for i in range(n):
        pos = [d[i, j] for j in range(n) if j != i and y[j] == y[i]]
        negs = [d[i, k] for k in range(n) if y[k] != y[i]]
        pairs = [d[l, k] for l in range(n) for k in range(n)
                 if y[l] != y[i] and y[k] != y[i] and y[l] != y[k]]
        if pos and negs:
            t1 += max(max(pos) - min(negs) + margin1, 0.0)
            c1 += 1
        if pos and pairs:
            t2 += max(max(pos) - min(pairs) + margin2, 0.0)
            c2 += 1
    return t1 / max(c1, 1) + t2 / max(c2, 1)


def ref_ranked_list(x, y, margin=0.4, boundary=1.2, temperature=10.0, temperature_pos=0.0,
                    lambda_balance=0.5):
    d = np_dist(x)
    n = len(x)
    total = 0.0
    for i in range(n):
        pw, pl, nw, nl = 0.0, 0.0, 0.0, 0.0
        for j in range(n):
            if j != i and y[j] == y[i] and d[i, j] > boundary - margin:
                w = math.exp(temperature_pos * (d[i, j] - (boundary - margin)))
                pw += w
                pl += w * (d[i, j] - (boundary - margin))
            if y[j] != y[i] and d[i, j] < boundary:
                w = math.exp(temperature * (boundary - d[i, j]))
                nw += w
                nl += w * (boundary - d[i, j])
        lp = pl / pw if pw > 0 else 0.0
        ln = nl / nw if nw > 0 else 0.0
        total += (1 - lambda_balance) * lp + lambda_balance * ln
    return total / n


def ref_angular(x, y, alpha_degrees=40.0):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    t2 = math.tan(math.radians(alpha_degrees)) ** 2
    n = len(x)
    losses = []
    for a in range(n):
        for p in range(n):
            if a == p or y[a] != y[p]:
                continue
            s = 0.0
            for k in range(n):
                if y[k] != y[a]:
                    s += math.exp(4 * t2 * (x[a] + x[p]) @ x[k] - 2 * (1 + t2) * x[a] @ x[p])
            losses.append(math.log(1.0 + s))
    return sum(losses) / max(len(losses), 1)


# (name, dmljax function, reference, config) -- every public loss and option worth checking
CASES = [
    ("contrastive", contrastive_loss, ref_contrastive, {}),
    ("contrastive_mean_sq", contrastive_loss, ref_contrastive,
     {"reduction": "mean", "squared": True, "pos_margin": 0.1, "neg_margin": 1.2}),
    ("contrastive_sum_sqeuclid", contrastive_loss, ref_contrastive,
     {"reduction": "sum", "metric": "squared_euclidean", "neg_margin": 2.0}),
    ("contrastive_cosine", contrastive_loss, ref_contrastive,
     {"metric": "cosine", "pos_margin": 0.9, "neg_margin": 0.1}),
    ("lifted", lifted_structured_loss, ref_lifted, {}),
    ("lifted_m05", lifted_structured_loss, ref_lifted, {"margin": 0.5}),
    ("generalized_lifted", generalized_lifted_structured_loss, ref_generalized_lifted, {}),
    ("generalized_lifted_margins", generalized_lifted_structured_loss, ref_generalized_lifted,
     {"pos_margin": 0.2, "neg_margin": 1.5}),
    ("npair_all", npair_loss, ref_npair, {}),
    ("npair_one_per_class", npair_loss, ref_npair, {"pairs": "one_per_class", "l2_reg": 0.05}),
    ("quadruplet", quadruplet_loss, ref_quadruplet, {}),
    ("quadruplet_margins", quadruplet_loss, ref_quadruplet, {"margin1": 2.0, "margin2": 1.5}),
    ("quadruplet_hard", quadruplet_loss, ref_quadruplet_hard, {"mining": "batch_hard"}),
    ("ranked_list", ranked_list_loss, ref_ranked_list, {}),
    ("ranked_list_tp", ranked_list_loss, ref_ranked_list,
     {"temperature_pos": 2.0, "margin": 0.8, "boundary": 1.3, "lambda_balance": 0.3}),
    ("angular", angular_loss, ref_angular, {}),
    ("angular_50", angular_loss, ref_angular, {"alpha_degrees": 50.0}),
]
IDS = [c[0] for c in CASES]


@functools.lru_cache(maxsize=None)
def _jitted(fn, config=()):
    """One compiled function per (loss, config): eager op-by-op dispatch dominates test time."""
    return jax.jit(functools.partial(fn, **dict(config)))


def jitted(fn, **config):
    return _jitted(fn, tuple(sorted(config.items())))


@functools.lru_cache(maxsize=None)
def _jitted_value_and_grad(fn, config=()):
    return jax.jit(jax.value_and_grad(functools.partial(fn, **dict(config))))


def value_and_grad(fn, **config):
    """Compiled (loss, d loss / d embeddings), reused across batches of the same shape."""
    return _jitted_value_and_grad(fn, tuple(sorted(config.items())))


def assert_finite(fn, x, y, **config):
    value, grad = value_and_grad(fn, **config)(x, y)
    assert np.isfinite(float(value)), f"loss not finite: {value}"
    assert np.isfinite(np.asarray(grad)).all(), "gradient not finite"
LOSSES = [angular_loss, contrastive_loss, generalized_lifted_structured_loss, lifted_structured_loss,
          npair_loss, quadruplet_loss, ranked_list_loss]


def _batch(seed, name, batch=10, dim=5, classes=3):
    # npair works on unnormalised embeddings (the paper); the others on unit vectors
    return random_batch(seed, batch=batch, dim=dim, classes=classes, normalize="npair" not in name)


@pytest.mark.parametrize("name,fn,ref,cfg", CASES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(name, fn, ref, cfg, seed):
    x, y = _batch(seed, name, classes=3 if seed == 0 else 4)
    if "npair" in name:
        x = 0.5 * x
    got = float(jitted(fn, **cfg)(x, y))
    want = ref(x, y, **cfg)
    assert want != 0.0  # the batches are chosen so that every loss is active
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("name,fn,ref,cfg", CASES, ids=IDS)
def test_gradients_match_finite_differences(name, fn, ref, cfg):
    x, y = _batch(3, name)  # the reference tests' shape: the compiled loss is reused
    f = jitted(fn, **cfg)
    grad = np.asarray(value_and_grad(fn, **cfg)(x, y)[1])  # materialised before x is perturbed
    # numerical_grad perturbs its argument in place, and JAX on CPU may alias numpy buffers
    # under asynchronous dispatch: hand it a private copy
    numeric = numerical_grad(lambda z: f(z, y), x.copy())
    assert np.abs(numeric).max() > 1e-3  # a real gradient, not a vacuous match
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn", LOSSES)
def test_jit_matches_eager(fn):
    x, y = random_batch(3, batch=10, dim=5)
    assert_jit_matches(fn, x, y)


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("batch_name", list(degenerate_batches()))
def test_degenerate_batches_finite(fn, batch_name):
    x, y = degenerate_batches()[batch_name]
    assert_finite(fn, x, y)
    if fn is quadruplet_loss:
        assert_finite(fn, x, y, mining="batch_hard")
    if fn is npair_loss:
        assert_finite(fn, x, y, pairs="one_per_class")


@pytest.mark.parametrize("fn", LOSSES)
def test_no_pair_gives_zero(fn):
    """No positive pair (all classes distinct): nothing to learn apart from regularisers."""
    x, _ = random_batch(0, batch=6, dim=4)
    y = np.arange(6, dtype=np.int32)
    kwargs = {"l2_reg": 0.0} if fn is npair_loss else {}
    value = float(jitted(fn, **kwargs)(x, y))
    if fn in (generalized_lifted_structured_loss, contrastive_loss, ranked_list_loss):
        assert value >= 0.0  # these still push close negatives apart
    else:
        assert value == 0.0


def test_margin_zero_and_bf16():
    x, y = random_batch(0, batch=8, dim=4)
    assert_finite(contrastive_loss, x, y, neg_margin=0.0)
    assert_finite(lifted_structured_loss, x, y, margin=0.0)
    assert_finite(quadruplet_loss, x, y, margin1=0.0, margin2=0.0)
    assert_finite(ranked_list_loss, x, y, margin=0.0)
    for fn in LOSSES:  # bf16 in, float32 accumulation out (abstract evaluation: no compile)
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), y)
        assert out.dtype == jnp.float32


@pytest.mark.parametrize("fn", LOSSES)
def test_padding_with_valid_mask(fn):
    x, y = random_batch(2, batch=8, dim=4)
    rng = np.random.default_rng(5)
    xp = np.concatenate([x, rng.normal(size=(3, 4))])
    yp = np.concatenate([y, np.array([0, 1, 2], np.int32)])
    valid = np.arange(11) < 8
    vg = value_and_grad(fn)
    padded_value, padded_grad = vg(xp, yp, valid=valid)
    value, grad = vg(x, y)
    np.testing.assert_allclose(float(padded_value), float(value), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(padded_grad)[:8], np.asarray(grad), rtol=1e-7, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(padded_grad)[8:], 0.0)  # padding gets no gradient


@pytest.mark.parametrize("fn", LOSSES)
def test_bad_inputs(fn):
    x, y = random_batch(0, batch=6, dim=4)
    with pytest.raises(ValueError, match="^embeddings must have rank 2"):
        fn(x[0], y)
    with pytest.raises(ValueError, match="^embeddings must be a floating"):
        fn(np.ones((6, 4), np.int32), y)
    with pytest.raises(ValueError, match="^labels must be an integer"):
        fn(x, y.astype(np.float32))
    with pytest.raises(ValueError, match="^labels has batch size 5"):
        fn(x, y[:5])
    with pytest.raises(ValueError, match="^valid must have shape"):
        fn(x, y, valid=np.ones(5, bool))
    with pytest.raises(ValueError, match="^reduction must be one of"):
        fn(x, y, reduction="max")


@pytest.mark.parametrize("fn,kwargs,name", [
    (contrastive_loss, {"neg_margin": -1.0}, "neg_margin"),
    (contrastive_loss, {"pos_margin": -0.1}, "pos_margin"),
    (contrastive_loss, {"metric": "manhattan"}, "metric"),
    (lifted_structured_loss, {"margin": -1.0}, "margin"),
    (lifted_structured_loss, {"metric": "cosine"}, "metric"),
    (generalized_lifted_structured_loss, {"neg_margin": -1.0}, "neg_margin"),
    (npair_loss, {"l2_reg": -0.1}, "l2_reg"),
    (npair_loss, {"pairs": "some"}, "pairs"),
    (quadruplet_loss, {"margin2": -0.5}, "margin2"),
    (quadruplet_loss, {"mining": "semihard"}, "mining"),
    (ranked_list_loss, {"lambda_balance": 1.5}, "lambda_balance"),
    (ranked_list_loss, {"temperature": -1.0}, "temperature"),
    (angular_loss, {"alpha_degrees": 90.0}, "alpha_degrees"),
    (angular_loss, {"alpha_degrees": 0.0}, "alpha_degrees"),
])
def test_bad_config(fn, kwargs, name):
    x, y = random_batch(0, batch=6, dim=4)
    with pytest.raises(ValueError, match=f"^{name} must"):
        fn(x, y, **kwargs)


@given(st.integers(0, 10_000), st.sampled_from(range(len(LOSSES))))
def test_permutation_label_renaming_rotation_invariance(seed, index):
    """Every loss is a function of the labelled point set: batch order, the names of the
    classes and an orthogonal rotation of the embedding space change nothing."""
    fn = LOSSES[index]
    x, y = random_batch(seed, batch=9, dim=4, classes=3)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    rename = rng.permutation(10)[:3] * 7 + 1
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    # npair one_per_class depends on batch order by design, so the default "all" is checked
    f = jitted(fn)
    base = float(f(x, y))
    moved = float(f(x[perm] @ q, rename[y[perm]].astype(np.int32)))
    np.testing.assert_allclose(moved, base, rtol=1e-7, atol=1e-10)


def _max_intermediate_size(jaxpr) -> int:
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    biggest = max(biggest, _max_intermediate_size(getattr(inner, "jaxpr", inner)))
    return biggest


@pytest.mark.parametrize("mining", ["all", "batch_hard"])
def test_quadruplet_memory_is_quadratic(mining):
    """No intermediate of the loss or its gradient holds B^3 values (B = 32)."""
    b = 32
    x, y = random_batch(0, batch=b, dim=4, classes=8)
    loss = functools.partial(quadruplet_loss, mining=mining)
    for fn in (loss, jax.grad(loss)):
        jaxpr = jax.make_jaxpr(fn)(x, y)
        assert _max_intermediate_size(jaxpr.jaxpr) < b ** 3 // 4


def test_lifted_uses_negatives_of_both_ends():
    """Hand-computed eq. (4) for one positive pair (0, 1) and one negative 2: the negative
    is counted from BOTH ends, exp(m - D_02) + exp(m - D_12) (PML < 1.0 / one-ended variants
    would differ)."""
    x = np.array([[0.0, 0.0], [0.6, 0.0], [0.0, 0.8]])
    y = np.array([0, 0, 1], np.int32)
    d01, d02, d12 = 0.6, 0.8, 1.0
    j01 = math.log(math.exp(1.0 - d02) + math.exp(1.0 - d12)) + d01
    want = j01 ** 2 / 2  # 1/(2|P|) * sum over P = {(0,1), (1,0)} of J^2
    np.testing.assert_allclose(float(jitted(lifted_structured_loss)(x, y)), want, rtol=1e-9)
    one_ended = (math.log(math.exp(1.0 - d02)) + d01) ** 2 / 2
    assert abs(want - one_ended) > 1e-2


def test_quadruplet_float32_large_batch_close_to_float64():
    """Prefix-sum cancellation stays small in float32 at a moderate batch."""
    x, y = random_batch(4, batch=64, dim=8, classes=16)
    f = jitted(quadruplet_loss)
    f64 = float(f(x, y))
    f32 = float(f(x.astype(np.float32), y))
    np.testing.assert_allclose(f32, f64, rtol=1e-4)


# ----------------------------------------------------------------------------- PyTorch Metric Learning


def _pml_cases():
    from pytorch_metric_learning import losses as pml

    return [
        (lambda: pml.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9),
         functools.partial(contrastive_loss, pos_margin=0.1, neg_margin=0.9)),
        (lambda: pml.LiftedStructureLoss(neg_margin=1.0), lifted_structured_loss),
        (lambda: pml.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.1),
         functools.partial(generalized_lifted_structured_loss, pos_margin=0.1)),
        (lambda: pml.NPairsLoss(), functools.partial(npair_loss, pairs="one_per_class", l2_reg=0.0)),
        (lambda: pml.AngularLoss(alpha=40), angular_loss),
        (lambda: pml.RankedListLoss(margin=0.4, Tn=10.0, alpha=1.2, imbalance=0.5), ranked_list_loss),
    ]


def test_matches_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    x, y = random_batch(7, batch=12, dim=5, classes=4)
    # unit-norm embeddings: PML's default distance normalises, which is then a no-op
    for make_pml, fn in _pml_cases():
        xt = torch.tensor(x, dtype=torch.float64)
        want = float(make_pml()(xt, torch.tensor(y, dtype=torch.long)))
        got = float(jax.jit(fn)(x, y))
        # PML's RankedListLoss adds 1e-5 per column to its denominators
        rtol = 1e-3 if fn is ranked_list_loss else 1e-6
        np.testing.assert_allclose(got, want, rtol=rtol, err_msg=str(make_pml()))


@pytest.mark.parametrize("fn", LOSSES)
def test_vmap_over_batches(fn):
    """vmap over a leading axis of several batches gives each batch's own loss."""
    batches = [random_batch(s, batch=10, dim=5) for s in (11, 12)]
    xs = np.stack([b[0] for b in batches])
    ys = np.stack([b[1] for b in batches])
    f = jitted(fn)
    stacked = jax.vmap(f)(xs, ys)
    np.testing.assert_allclose(np.asarray(stacked), [float(f(x, y)) for x, y in batches], rtol=1e-9)


def ref_tuplet(a, p, n, l2_reg):
    losses, norms = [], []
    for t in range(len(a)):
        s = sum(math.exp(a[t] @ n[t, k] - a[t] @ p[t]) for k in range(n.shape[1]))
        losses.append(math.log(1.0 + s))
        norms += [a[t] @ a[t], p[t] @ p[t]] + [n[t, k] @ n[t, k] for k in range(n.shape[1])]
    return sum(losses) / len(losses) + l2_reg * sum(norms) / len(norms)


def test_tuplet_loss_reference_grad_and_npair_equivalence():
    rng = np.random.default_rng(0)
    a, p, n = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 5, 3))
    f = jitted(tuplet_loss, l2_reg=0.01)
    np.testing.assert_allclose(float(f(a, p, n)), ref_tuplet(a, p, n, 0.01), rtol=1e-9)
    grad = np.asarray(jax.grad(f)(a, p, n))
    numeric = numerical_grad(lambda z: f(z, p, n), a.copy())
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)
    # N-pair-mc = (N+1)-tuplet loss whose negatives are the other pairs' positives
    x = rng.normal(size=(6, 3))  # classes 0,1,2 as pairs (0,1), (2,3), (4,5)
    y = np.array([0, 0, 1, 1, 2, 2], np.int32)
    anchors, positives = x[0::2], x[1::2]
    negs = np.stack([np.delete(positives, t, axis=0) for t in range(3)])
    np.testing.assert_allclose(float(tuplet_loss(anchors, positives, negs)),
                               float(npair_loss(x, y, pairs="one_per_class", l2_reg=0.0)), rtol=1e-9)
    with pytest.raises(ValueError, match="^negatives must have shape"):
        tuplet_loss(a, p, n[:, :, :2])
    with pytest.raises(ValueError, match="^positives must have the shape"):
        tuplet_loss(a, p[:3], n)
    with pytest.raises(ValueError, match="^anchors must have rank 2"):
        tuplet_loss(a[0], p, n)


# ----------------------------------------------------------------------------- quadruplet hinge-sum helpers


def _hinge_total_loops(entries, entry_seg, queries, query_seg, skip):
    """sum over (query, entry) of the same segment (segment ``skip``: left out) of max(q - e, 0),
    and the counting gradients: d/dq = #entries below q, d/de = -#queries above e."""
    total, d_e, d_q = 0.0, np.zeros(len(entries)), np.zeros(len(queries))
    for a, (q, sq) in enumerate(zip(queries, query_seg)):
        for b, (e, se) in enumerate(zip(entries, entry_seg)):
            if sq == se and sq != skip and q > e:
                total += q - e
                d_q[a] += 1.0
                d_e[b] -= 1.0
    return total, d_e, d_q


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sort_rows_through_integer_keys_equals_sort(dtype):
    from dmljax._numerics import _sort_rows

    x = np.random.default_rng(30).normal(size=(3, 9)).astype(dtype)
    x[0, :6] = [0.0, -0.0, np.inf, -np.inf, 1e-30, -1e-30]
    got = np.asarray(_sort_rows(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.sort(x, axis=1))
    assert got.dtype == dtype


def test_row_and_segment_hinge_totals_match_loops_with_ties():
    from dmljax._numerics import row_hinge_total as _row_hinge_total, segment_hinge_total as _segment_hinge_total

    rng = np.random.default_rng(31)
    rows, width, segs = 3, 7, 3
    entries = rng.integers(-3, 4, size=(rows, width)).astype(np.float64)  # ties, negative values
    queries = rng.integers(-3, 4, size=(rows, width)) + 0.5 * rng.integers(0, 2, size=(rows, width))
    entry_mask, query_mask = rng.random((rows, width)) < 0.7, rng.random((rows, width)) < 0.6
    # rows as segments
    row_id = np.repeat(np.arange(rows), width)
    e_seg = np.where(entry_mask.ravel(), row_id, -1)
    q_seg = np.where(query_mask.ravel(), row_id, -2)
    want, want_de, want_dq = _hinge_total_loops(entries.ravel(), e_seg, queries.ravel(), q_seg, skip=None)
    f = jax.jit(lambda e, q: _row_hinge_total(e, entry_mask, q, query_mask, 0.25))
    np.testing.assert_allclose(float(f(entries, queries)), want, rtol=1e-12)
    d_e, d_q = jax.grad(f, argnums=(0, 1))(entries, queries)
    np.testing.assert_array_equal(np.asarray(d_e).ravel(), want_de)
    np.testing.assert_array_equal(np.asarray(d_q).ravel(), want_dq)
    # free segments (segment ``segs`` = left out), entries and queries of unequal numbers
    e_seg = rng.integers(0, segs + 1, size=rows * width)
    q_seg = rng.integers(0, segs + 1, size=rows * width - 4)
    e_flat, q_flat = entries.ravel(), queries.ravel()[:-4]
    want, want_de, want_dq = _hinge_total_loops(e_flat, e_seg, q_flat, q_seg, skip=segs)
    g = jax.jit(lambda e, q: _segment_hinge_total(e, jnp.asarray(e_seg, jnp.int32), q,
                                                  jnp.asarray(q_seg, jnp.int32), -0.5, segs))
    np.testing.assert_allclose(float(g(e_flat, q_flat)), want, rtol=1e-12)
    d_e, d_q = jax.grad(g, argnums=(0, 1))(e_flat, q_flat)
    np.testing.assert_array_equal(np.asarray(d_e), want_de)
    np.testing.assert_array_equal(np.asarray(d_q), want_dq)


def test_quadruplet_unequal_classes_value_and_gradient():
    """Class sizes 1, 2, 3 and 5 (a singleton has no positive, a big class many)."""
    x, _ = random_batch(32, batch=11, dim=3)
    y = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], np.int32)
    np.testing.assert_allclose(float(jitted(quadruplet_loss)(x, y)), ref_quadruplet(x, y), rtol=1e-10)
    f = jitted(quadruplet_loss, reduction="sum")
    check_grads(lambda z: f(z, y), (x,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 3.0, 200.0])
def test_softmax_weighted_mean_gradient_matches_plain_autodiff(temperature):
    """The ranked list's hand-written backward against autodiff of sum_j softmax(T v)_j v_j, with
    an empty row (0, zero gradient) and T = 200 (exp(T v) overflows without the shift)."""
    from dmljax.losses.pair import _softmax_weighted_mean

    rng = np.random.default_rng(33)
    v = rng.uniform(0.0, 2.0, size=(4, 6))
    mask = rng.random((4, 6)) < 0.6
    mask[2] = False
    cot = np.array([1.0, -2.0, 3.0, 0.5])

    def plain(v):
        rows = []
        for r in range(4):
            vals = v[r][mask[r]]
            rows.append(jnp.sum(jax.nn.softmax(temperature * vals) * vals) if mask[r].any() else 0.0)
        return jnp.stack(rows)

    got = _softmax_weighted_mean(jnp.asarray(v), mask, temperature)
    np.testing.assert_allclose(got, plain(v), rtol=1e-12)
    g_got = jax.grad(lambda z: jnp.sum(cot * _softmax_weighted_mean(z, mask, temperature)))(v)
    g_want = jax.grad(lambda z: jnp.sum(cot * plain(z)))(v)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert np.isfinite(g_got).all() and not g_got[2].any()
