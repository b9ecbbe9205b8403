"""Triplet margin loss against explicit triple loops over (a, p, n) (FaceNet / Weinberger formula)."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.extend import core as jex
from jax.test_util import check_grads

from dmljax.losses.triplet import fraction_active_triplets, triplet_margin_loss
from tests.utils import assert_jit_matches, degenerate_batches, random_batch

MININGS = ["all", "semihard", "semihard_triplets", "batch_hard"]
# one compiled function per static configuration, shared by the property tests (fast reruns)
# (the eager path is covered by test_jit_matches_eager and test_bad_input)
jitted_loss = jax.jit(
    triplet_margin_loss,
    static_argnames=("margin", "mining", "metric", "soft_margin", "reduction", "semihard_fallback"),
)


# ----------------------------------------------------------------------------- reference


def np_matrix(x, metric):
    n = len(x)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            diff = x[i] - x[j]
            if metric == "euclidean":
                out[i, j] = np.sqrt(np.sum(diff * diff))
            elif metric == "squared_euclidean":
                out[i, j] = np.sum(diff * diff)
            else:  # cosine similarity
                out[i, j] = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
    return out


def np_triplets(x, labels, *, margin, mining, metric, soft, valid=None, fallback="none"):
    """List of (anchor, loss) for every triplet in the mined set, written from the papers.

    violation(a, p, n) = d(a,p) - d(a,n) for distances, s(a,n) - s(a,p) for similarities;
    a negative is harder when its violation is larger.
    """
    b = len(labels)
    valid = np.ones(b, bool) if valid is None else np.asarray(valid)
    m = np_matrix(x, metric)
    sim = metric == "cosine"

    def viol(a, p, n):
        return (m[a, n] - m[a, p]) if sim else (m[a, p] - m[a, n])

    def link(v):
        return np.log1p(np.exp(v + margin)) if soft else max(v + margin, 0.0)

    out = []
    for a in range(b):
        if not valid[a]:
            continue
        pos = [p for p in range(b) if valid[p] and p != a and labels[p] == labels[a]]
        neg = [n for n in range(b) if valid[n] and labels[n] != labels[a]]
        if mining == "batch_hard":
            if pos and neg:
                # hardest positive: farthest (least similar); hardest negative: closest
                hp = max(pos, key=lambda p: -m[a, p] if sim else m[a, p])
                hn = min(neg, key=lambda n: -m[a, n] if sim else m[a, n])
                out.append((a, link(viol(a, hp, hn))))
            continue
        for p in pos:
            if mining == "semihard":
                # FaceNet: negatives farther than the positive but inside the margin; take the closest.
                semi = [n for n in neg if -margin < viol(a, p, n) < 0]
                if semi:
                    out.append((a, link(max(viol(a, p, n) for n in semi))))
                elif fallback == "tfa" and neg:
                    outside = [n for n in neg if viol(a, p, n) < 0]
                    chosen = max(outside, key=lambda n: viol(a, p, n)) if outside else min(neg, key=lambda n: viol(a, p, n))
                    out.append((a, link(viol(a, p, chosen))))
                elif fallback == "hardest" and neg:
                    out.append((a, link(max(viol(a, p, n) for n in neg))))
                continue
            for n in neg:
                v = viol(a, p, n)
                if mining == "semihard_triplets" and not (0 < -v <= margin):
                    continue
                out.append((a, link(v)))
    return out


def np_reduce(triplets, reduction, b):
    losses = np.array([t[1] for t in triplets], dtype=np.float64)
    if reduction == "none":
        per = np.zeros(b)
        for a, loss in triplets:
            per[a] += loss
        return per
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / max(len(losses), 1)
    return losses.sum() / max(int(np.sum(losses > 0)), 1)


def np_loss(x, labels, *, margin=0.2, mining="all", metric="euclidean", soft=False, reduction="mean_nonzero",
            valid=None, fallback="none"):
    t = np_triplets(x, labels, margin=margin, mining=mining, metric=metric, soft=soft, valid=valid, fallback=fallback)
    return np_reduce(t, reduction, len(labels))


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("mining", MININGS)
def test_matches_triple_loop(mining, metric, soft):
    x, y = random_batch(3, batch=12, dim=5, classes=3)
    margin = {"euclidean": 0.5, "squared_euclidean": 0.8, "cosine": 0.3}[metric]
    got = triplet_margin_loss(x, y, margin=margin, mining=mining, metric=metric, soft_margin=soft)
    want = np_loss(x, y, margin=margin, mining=mining, metric=metric, soft=soft)
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero", "none"])
@pytest.mark.parametrize("mining", MININGS)
def test_reductions_match_loop(mining, reduction):
    x, y = random_batch(4, batch=10, dim=4, classes=3)
    got = triplet_margin_loss(x, y, margin=0.4, mining=mining, reduction=reduction)
    want = np_loss(x, y, margin=0.4, mining=mining, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("fallback", ["none", "tfa", "hardest"])
def test_semihard_fallbacks(fallback):
    # Small margin: many positive pairs have no semi-hard negative, so the fallback matters.
    x, y = random_batch(5, batch=12, dim=3, classes=3)
    for reduction in ("mean", "sum"):
        got = triplet_margin_loss(x, y, margin=0.05, mining="semihard", semihard_fallback=fallback, reduction=reduction)
        want = np_loss(x, y, margin=0.05, mining="semihard", fallback=fallback, reduction=reduction)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_margin_zero_and_unnormalised_embeddings():
    x, y = random_batch(6, batch=9, dim=4, classes=3, normalize=False)
    for mining in MININGS:
        for soft in (False, True):
            got = triplet_margin_loss(x, y, margin=0.0, mining=mining, soft_margin=soft)
            np.testing.assert_allclose(got, np_loss(x, y, margin=0.0, mining=mining, soft=soft), rtol=1e-5, atol=1e-12)


def test_fraction_active_triplets_matches_loop():
    x, y = random_batch(7, batch=12, dim=4, classes=4)
    t = np_triplets(x, y, margin=0.3, mining="all", metric="euclidean", soft=False)
    want = np.mean([loss > 0 for _, loss in t])
    np.testing.assert_allclose(fraction_active_triplets(x, y, margin=0.3), want, rtol=1e-6)
    assert 0 < want < 1
    assert float(fraction_active_triplets(x, np.arange(12, dtype=np.int32))) == 0.0


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("mining", MININGS)
def test_gradients(mining, soft):
    x, y = random_batch(8, batch=8, dim=3, classes=2)
    fn = functools.partial(triplet_margin_loss, labels=y, margin=0.5, mining=mining, soft_margin=soft)
    check_grads(jax.jit(lambda z: fn(z)), (x,), order=1, modes=["rev"])


def test_gradient_equals_loop_gradient():
    """Prefix-sum gradient of the all-triplet loss equals finite differences of the loop."""
    from tests.utils import numerical_grad

    x, y = random_batch(9, batch=7, dim=3, classes=2)
    g = jax.grad(lambda z: triplet_margin_loss(z, y, margin=0.6, reduction="sum"))(x)
    ref = numerical_grad(lambda z: np_loss(z, y, margin=0.6, reduction="sum"), x)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- jit, vmap, dtypes, padding


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("mining", MININGS)
def test_jit_matches_eager(mining, soft):
    x, y = random_batch(10, batch=10, dim=4, classes=3)
    assert_jit_matches(triplet_margin_loss, x, y, margin=0.3, mining=mining, soft_margin=soft)


def test_vmap_over_batches_and_traced_margin():
    xs = np.stack([random_batch(s, batch=8, dim=3, classes=2)[0] for s in (11, 12)])
    ys = np.stack([random_batch(s, batch=8, dim=3, classes=2)[1] for s in (11, 12)])
    for mining in MININGS:
        f = functools.partial(triplet_margin_loss, mining=mining)
        # compiled, margin traced in both (op-by-op eager vmap cost ~150 small compilations)
        one = jax.jit(lambda e, l, m, f=f: f(e, l, margin=m))
        batched = jax.jit(jax.vmap(one))(xs, ys, jnp.array([0.3, 0.4]))
        single = [one(xs[i], ys[i], m) for i, m in enumerate([0.3, 0.4])]
        np.testing.assert_allclose(batched, single, rtol=1e-10)


def test_bf16_input_gives_float32_loss():
    x, y = random_batch(13, batch=8, dim=4, classes=2)
    for mining in MININGS:
        loss = triplet_margin_loss(jnp.asarray(x, jnp.bfloat16), y, mining=mining)
        assert loss.dtype == jnp.float32
        np.testing.assert_allclose(loss, np_loss(x, y, mining=mining), rtol=3e-2)


@pytest.mark.parametrize("mining", MININGS)
def test_padding_equals_unpadded(mining):
    x, y = random_batch(14, batch=8, dim=3, classes=3)
    rng = np.random.default_rng(0)
    xp = np.concatenate([x, rng.normal(size=(4, 3))])
    yp = np.concatenate([y, np.array([0, 1, 2, 0], np.int32)])
    valid = np.arange(12) < 8
    for soft in (False, True):
        fn = functools.partial(triplet_margin_loss, margin=0.4, mining=mining, soft_margin=soft)
        got, g = jax.jit(jax.value_and_grad(lambda z, fn=fn: fn(z, yp, valid=valid)))(xp)
        np.testing.assert_allclose(got, jax.jit(fn)(x, y), rtol=1e-10)
        np.testing.assert_array_equal(g[8:], 0.0)


# ----------------------------------------------------------------------------- degenerate and bad input


@pytest.mark.parametrize("mining", MININGS)
def test_degenerate_batches_finite(mining):
    # hinge with margin 0 (euclidean); softplus with a margin (cosine) where it takes its own code path
    configs = [("euclidean", 0.0, False)]
    if mining in ("all", "semihard_triplets"):
        configs.append(("cosine", 0.2, True))
    for metric, margin, soft in configs:
        # one compiled loss + gradient per configuration, shared by the degenerate batches
        fn = jax.jit(jax.value_and_grad(functools.partial(
            triplet_margin_loss, margin=margin, mining=mining, metric=metric, soft_margin=soft)))
        for name, (x, y) in degenerate_batches().items():
            value, grad = fn(x, y)
            assert np.isfinite(float(value)), (name, metric, float(value))
            assert np.isfinite(np.asarray(grad)).all(), (name, metric)
            if name in ("single_class", "no_positives", "one_item"):
                assert float(value) == 0.0, (name, metric)  # no triplet exists


@pytest.mark.parametrize(
    "kwargs, args, match",
    [
        ({}, (np.zeros(4), np.zeros(4, np.int32)), "embeddings must have rank 2"),
        ({}, (np.zeros((4, 2), np.int32), np.zeros(4, np.int32)), "embeddings must be a floating"),
        ({}, (np.zeros((4, 2)), np.zeros(4, np.float32)), "labels must be an integer"),
        ({}, (np.zeros((4, 2)), np.zeros(3, np.int32)), "labels has batch size 3"),
        ({"margin": -0.1}, None, "margin must be >= 0"),
        ({"mining": "hardest"}, None, "mining must be one of"),
        ({"metric": "manhattan"}, None, "metric must be one of"),
        ({"reduction": "max"}, None, "reduction must be one of"),
        ({"soft_margin": 1}, None, "soft_margin must be a Python bool"),
        ({"semihard_fallback": "random"}, None, "semihard_fallback must be one of"),
        ({"valid": np.ones(5, bool)}, None, "valid must have shape"),
    ],
)
def test_bad_input(kwargs, args, match):
    args = args or (np.zeros((4, 2)), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=match):
        triplet_margin_loss(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        jax.jit(functools.partial(triplet_margin_loss, **kwargs))(*args)


def test_fraction_active_bad_input():
    with pytest.raises(ValueError, match="margin must be >= 0"):
        fraction_active_triplets(np.zeros((4, 2)), np.zeros(4, np.int32), margin=-1.0)


# ----------------------------------------------------------------------------- invariances


@given(st.integers(0, 10_000), st.sampled_from(MININGS), st.booleans())
def test_permutation_and_label_renaming_invariance(seed, mining, soft):
    x, y = random_batch(seed, batch=9, dim=3, classes=3)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(9)
    renamed = (rng.permutation(3) + 7)[y].astype(np.int32)  # a bijection of class ids
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    loss = functools.partial(jitted_loss, margin=0.3, mining=mining, soft_margin=soft)
    base = loss(x, y)
    np.testing.assert_allclose(loss(x[perm], y[perm]), base, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(loss(x, renamed), base, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(loss(x @ q, y), base, rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------- memory


def max_intermediate_size(closed_jaxpr) -> tuple[int, str]:
    """Largest number of elements of any value in a jaxpr, recursing into sub-jaxprs."""
    best = (0, "")

    def visit(jaxpr):
        nonlocal best
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                size = int(np.prod(getattr(v.aval, "shape", ()), dtype=np.int64))
                if size > best[0]:
                    best = (size, f"{eqn.primitive.name} -> {v.aval}")
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jex.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jex.Jaxpr):
                        visit(sub)

    visit(closed_jaxpr.jaxpr)
    return best


def test_memory_checker_detects_cubic_tensor():
    b = 16
    naive = lambda d: jnp.sum(jax.nn.relu(d[:, :, None] - d[:, None, :] + 0.2))  # noqa: E731
    size, _ = max_intermediate_size(jax.make_jaxpr(jax.grad(naive))(jnp.ones((b, b))))
    assert size >= b**3


@pytest.mark.parametrize(
    "mining, soft", [("all", False), ("all", True), ("semihard", False), ("semihard_triplets", False),
                     ("semihard_triplets", True), ("batch_hard", False)]
)
def test_no_cubic_intermediate_in_loss_and_grad(mining, soft):
    b, dim = 256, 8
    x = jnp.zeros((b, dim), jnp.float32)
    y = jnp.zeros((b,), jnp.int32)
    fn = functools.partial(triplet_margin_loss, margin=0.2, mining=mining, soft_margin=soft)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(x, y)
    size, where = max_intermediate_size(jaxpr)
    assert size < b**3, where
    assert size <= 2 * b * (b + 1), where  # O(B^2): the largest values are [B, B(+1)] matrices


LARGE_BATCH_SCRIPT = textwrap.dedent(
    """
    import functools, json, resource, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from dmljax.losses.triplet import triplet_margin_loss
    b, dim, mining = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (np.arange(b) % (b // 4)).astype(np.int32)
    f = jax.jit(jax.value_and_grad(functools.partial(triplet_margin_loss, margin=0.2, mining=mining)))
    compiled = f.lower(x, y).compile()
    mem = compiled.memory_analysis()
    t0 = time.perf_counter()
    loss, g = compiled(x, y)
    jax.block_until_ready(g)
    print(json.dumps({"mining": mining, "loss": float(loss), "finite": bool(np.isfinite(np.asarray(g)).all()),
                      "seconds": time.perf_counter() - t0,
                      "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mining", ["all", "semihard", "semihard_triplets"])
def test_large_batch_memory(mining):
    """B=4096, D=512 float32 loss + grad on CPU: a B^3 float32 tensor alone would be 275 GB."""
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    out = subprocess.run([sys.executable, "-c", LARGE_BATCH_SCRIPT, "4096", "512", mining], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(report)
    assert report["finite"] and np.isfinite(report["loss"])
    assert report["peak_rss_bytes"] < 4 * 2**30


def test_matches_pytorch_metric_learning():
    """The benchmark cases compute PML's loss and gradient exactly (float64, B=16)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from experiments.bench.specs_triplet import CASES

    x, y = random_batch(15, batch=16, dim=4, classes=5)
    for case in CASES:
        fn, _ = case.dmljax(16, 4, 5)
        value, grad = jax.jit(jax.value_and_grad(fn))(x, y)
        pml_fn, _ = case.pml(16, 4, 5)
        xt = torch.tensor(x, requires_grad=True)
        loss = pml_fn(xt, torch.tensor(y, dtype=torch.long))
        loss.backward()
        np.testing.assert_allclose(value, loss.item(), rtol=1e-10, err_msg=case.name)
        np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=case.name)
