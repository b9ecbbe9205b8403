"""EET, CBML, Gaussian-mixture structured loss and the hybrid/combined losses vs numpy loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.losses import structured as sl
from tests.utils import assert_finite_loss_and_grad, assert_jit_matches, degenerate_batches, random_batch

# ----------------------------------------------------------------- numpy references (loops)


def np_dist(a, b, metric="euclidean"):
    sq = float(np.sum((a - b) ** 2))
    return math.sqrt(sq) if metric == "euclidean" else sq


def np_eet(x, labels, margin=0.2, equidistant_weight=1.0, equidistributed_weight=1.0, triplets="hard",
           metric="euclidean"):
    n = len(x)
    d = [[np_dist(x[i], x[j], metric) for j in range(n)] for i in range(n)]
    mc, ec = [], []
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [q for q in range(n) if labels[q] != labels[a]]
        if not pos or not neg:
            continue
        if triplets == "hard":
            p = max(pos, key=lambda j: d[a][j])
            q = min(neg, key=lambda j: d[a][j])
            chosen = [(p, q)]
        else:
            chosen = [(p, q) for p in pos for q in neg]
        for p, q in chosen:
            mc.append(max(d[a][p] - d[a][q] + margin, 0.0))
            ec.append(abs(d[a][q] - d[p][q]))
    l_mc = float(np.mean(mc)) if mc else 0.0
    l_ec = float(np.mean(ec)) if ec else 0.0
    classes = sorted(set(labels.tolist()))
    m = len(classes)
    closest = {}
    for c1 in classes:
        for c2 in classes:
            if c1 != c2:
                closest[c1, c2] = min(d[i][j] for i in range(n) for j in range(n)
                                      if labels[i] == c1 and labels[j] == c2)
    l_m = sum(math.exp(-v) for v in closest.values()) / (m * (m - 1)) if m > 1 else 0.0
    l_e = 0.0
    if m > 1:
        d_min = {c: min(closest[c, o] for o in classes if o != c) for c in classes}
        nearest = {c: min((o for o in classes if o != c), key=lambda o: closest[c, o]) for c in classes}
        l_e = sum(abs(d_min[c] - d_min[nearest[c]]) for c in classes) / m
    return l_mc + equidistant_weight * l_ec + equidistributed_weight * (l_m + l_e)


def np_cbml(x, labels, pos_a=0.5, pos_b=0.5, neg_a=1.0, neg_b=0.01, margin=0.1, variance_weight=1.0,
            hyper_weight=0.0, loss_type="log", weight_p=0.25, weight_n=0.25):
    """Loop over anchors following the authors' released code."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    total = 0.0
    for i in range(n):
        sims = [float(xn[i] @ xn[j]) for j in range(n)]
        pos_all = [sims[j] for j in range(n) if labels[j] == labels[i] and sims[j] < 1 - 1e-5]
        neg_all = [sims[j] for j in range(n) if labels[j] != labels[i]]
        if not pos_all or not neg_all:
            continue
        mean = (1 - hyper_weight) * np.mean(sims) + hyper_weight * (min(pos_all) + max(neg_all)) / 2
        sigma = sum((s - mean) ** 2 for s in neg_all)
        pos = [s for s in pos_all if s - margin < max(neg_all)]
        neg = [s for s in neg_all if s + margin > min(pos_all)]
        if not pos or not neg:
            continue
        fp = sum(math.exp(-(s - pos_a) / pos_b) for s in pos)
        fn = sum(math.exp((s - neg_a) / neg_b) for s in neg)
        if loss_type == "log":
            pl, nl = math.log(1 + fp), math.log(1 + fn)
        elif loss_type == "sqrt":
            pl, nl = math.sqrt(1 + fp), math.sqrt(1 + fn)
        else:
            pl, nl = 1 + weight_p * fp, 1 + weight_n * fn
        total += pl + nl + variance_weight * sigma
    return total / n


def np_gaussian(x, labels, sigma=1.0, likelihood_weight=0.1):
    classes = sorted(set(labels.tolist()))
    mu = {c: np.mean([x[i] for i in range(len(x)) if labels[i] == c], axis=0) for c in classes}
    losses = []
    for i in range(len(x)):
        logits = {c: -np.sum((x[i] - mu[c]) ** 2) / (2 * sigma**2) for c in classes}
        top = max(logits.values())
        log_norm = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        own = logits[labels[i]]
        losses.append(log_norm - own + likelihood_weight * (-own))
    return float(np.mean(losses))


# ----------------------------------------------------------------- cases

CASES = {
    "eet_hard": (sl.eet_loss, np_eet, dict()),
    "eet_all": (sl.eet_loss, np_eet, dict(triplets="all", margin=0.5, equidistant_weight=0.3)),
    "eet_squared": (sl.eet_loss, np_eet, dict(metric="squared_euclidean", equidistributed_weight=2.0)),
    "cbml_log": (sl.cbml_loss, np_cbml, dict()),
    "cbml_sqrt_soft": (sl.cbml_loss, np_cbml, dict(loss_type="sqrt", neg_b=0.2, neg_a=0.3, hyper_weight=0.4,
                                                    margin=0.5)),
    "cbml_constant": (sl.cbml_loss, np_cbml, dict(loss_type="constant", neg_b=0.1, neg_a=0.2, margin=0.3)),
    "gaussian": (sl.gaussian_mixture_structured_loss, np_gaussian, dict()),
    "gaussian_sigma": (sl.gaussian_mixture_structured_loss, np_gaussian, dict(sigma=0.3, likelihood_weight=0.0)),
}
# one configuration per family (plus "all" triplets) for the tests whose cost is compilation
MAIN = ["eet_hard", "eet_all", "cbml_log", "gaussian"]
LOSSES = {"eet": sl.eet_loss, "cbml": sl.cbml_loss, "gaussian": sl.gaussian_mixture_structured_loss}


@functools.lru_cache(maxsize=None)
def _jitted(fn, config_items):
    return jax.jit(functools.partial(fn, **dict(config_items)))


def jitted(fn, **config):
    """Cached jit of a configured loss: eager dispatch compiles every small op, jit compiles once."""
    return _jitted(fn, tuple(sorted(config.items())))


def batch(seed=0, b=12, d=5, classes=4):
    return random_batch(seed, batch=b, dim=d, classes=classes)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name):
    fn, ref, config = CASES[name]
    for seed in range(3):
        x, labels = batch(seed, classes=3 + seed)
        np.testing.assert_allclose(jitted(fn, **config)(x, labels), ref(x, labels, **config), rtol=1e-5,
                                   atol=1e-12)


def clustered_batch(seed=0, b=12, d=5, classes=3, noise=0.3):
    """Classes around separate centers: positives are easy, so mining drops pairs."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(b) % classes).astype(np.int32)
    x = np.eye(d)[labels] + noise * rng.normal(size=(b, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_on_clustered_batches(name):
    fn, ref, config = CASES[name]
    for noise in (0.2, 0.6):
        x, labels = clustered_batch(1, noise=noise)
        np.testing.assert_allclose(jitted(fn, **config)(x, labels), ref(x, labels, **config), rtol=1e-5,
                                   atol=1e-12)


def test_cbml_mining_changes_the_loss():
    """With clustered data, margin 0 drops easy positives (even whole anchors) that margin 5 keeps."""
    x, labels = clustered_batch(0, noise=0.4)
    small, large = (float(jitted(sl.cbml_loss, margin=m, variance_weight=0.0)(x, labels)) for m in (0.0, 5.0))
    assert abs(small - large) > 1e-3 * abs(large)
    np.testing.assert_allclose(small, np_cbml(x, labels, margin=0.0, variance_weight=0.0), rtol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients(name):
    fn, _, config = CASES[name]
    x, labels = batch(4, b=8, d=4, classes=3)
    loss = jitted(fn, **config)
    check_grads(lambda e: loss(e, labels), (x,), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MAIN)
def test_jit_matches_eager(name):
    fn, _, config = CASES[name]
    x, labels = batch(5)
    assert_jit_matches(fn, x, labels, **config)


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("kind", list(degenerate_batches()))
def test_degenerate_batches_finite(name, kind):
    fn, _, config = CASES[name]
    x, labels = degenerate_batches()[kind]
    assert_finite_loss_and_grad(jitted(fn, **config), x, labels)


@pytest.mark.parametrize("name", ["eet", "cbml", "gaussian"])
def test_bf16_finite_and_float32(name):
    x, labels = batch(1)
    value, grad = jax.jit(jax.value_and_grad(LOSSES[name]))(jnp.asarray(x, jnp.bfloat16), labels)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    assert np.isfinite(np.asarray(grad, np.float32)).all()


def test_single_class_and_empty_terms_are_zero():
    x, _ = batch(0)
    one = np.zeros(len(x), np.int32)
    assert float(jitted(sl.eet_loss)(x, one)) == 0.0
    assert float(jitted(sl.cbml_loss)(x, one)) == 0.0


@pytest.mark.parametrize("name", ["eet", "cbml", "gaussian"])
def test_valid_mask_equals_unpadded(name):
    x, labels = batch(2)
    xp = np.concatenate([x, x[:3] * 5.0])
    lp = np.concatenate([labels, np.array([0, 7, 1], np.int32)])
    valid = np.arange(len(xp)) < len(x)
    for config in ([dict(), dict(triplets="all")] if name == "eet" else [dict()]):
        fn = jitted(LOSSES[name], **config)
        np.testing.assert_allclose(fn(xp, lp, valid=valid), fn(x, labels), rtol=1e-10)


@given(st.integers(0, 10_000))
def test_invariances(seed):
    """Batch permutation, class renaming and rotation of the embedding space change nothing."""
    rng = np.random.default_rng(seed)
    x, labels = batch(seed % 11, b=10, d=4, classes=3)
    order = rng.permutation(len(x))
    renamed = np.array([17, 3, 9], np.int32)[labels]
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    for fn in LOSSES.values():
        fn = jitted(fn)
        base = float(fn(x, labels))
        np.testing.assert_allclose(fn(x[order], labels[order]), base, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(fn(x, renamed), base, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(fn(x @ q, labels), base, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("fn,kwargs,argname", [
    (sl.eet_loss, dict(margin=-0.1), "margin"),
    (sl.eet_loss, dict(triplets="semihard"), "triplets"),
    (sl.eet_loss, dict(metric="cosine"), "metric"),
    (sl.eet_loss, dict(equidistant_weight=-1.0), "equidistant_weight"),
    (sl.cbml_loss, dict(pos_b=0.0), "pos_b"),
    (sl.cbml_loss, dict(neg_b=-1.0), "neg_b"),
    (sl.cbml_loss, dict(loss_type="exp"), "loss_type"),
    (sl.cbml_loss, dict(hyper_weight=2.0), "hyper_weight"),
    (sl.cbml_loss, dict(margin=-0.1), "margin"),
    (sl.gaussian_mixture_structured_loss, dict(sigma=0.0), "sigma"),
    (sl.gaussian_mixture_structured_loss, dict(likelihood_weight=-1.0), "likelihood_weight"),
])
def test_bad_config(fn, kwargs, argname):
    x, labels = batch(0)
    with pytest.raises(ValueError, match=f"^{argname} must"):
        fn(x, labels, **kwargs)


@pytest.mark.parametrize("name", ["eet", "cbml", "gaussian"])
def test_bad_inputs(name):
    fn = LOSSES[name]
    x, labels = batch(0)
    with pytest.raises(ValueError, match="^labels must be an integer"):
        fn(x, labels.astype(np.float32))
    with pytest.raises(ValueError, match="^labels has batch size"):
        fn(x, labels[:-1])
    with pytest.raises(ValueError, match="^embeddings must have rank 2"):
        fn(x[None], labels)
    with pytest.raises(ValueError, match="^valid must have shape"):
        fn(x, labels, valid=np.ones(2, bool))


def test_eet_terms_behave_as_described():
    """Equidistant term: zero when every positive pair coincides; spread term falls as classes separate."""
    centers = np.eye(3)[:, :3] * 1.0
    labels = np.repeat(np.arange(3), 2).astype(np.int32)
    tight = np.repeat(centers, 2, axis=0)
    # every positive pair coincides -> d(a, n) == d(p, n); equal class distances -> L_E = 0;
    # margin satisfied (sqrt(2) > 0.2) -> only the spread term exp(-sqrt 2) remains
    eet = jitted(sl.eet_loss)
    np.testing.assert_allclose(eet(tight, labels), math.exp(-math.sqrt(2)), rtol=1e-9)
    np.testing.assert_allclose(eet(3 * tight, labels), math.exp(-3 * math.sqrt(2)), rtol=1e-9)


def test_gaussian_mixture_separated_classes_have_small_posterior_loss():
    labels = np.repeat(np.arange(3), 3).astype(np.int32)
    rng = np.random.default_rng(0)
    x = np.repeat(np.eye(3) * 10, 3, axis=0) + 0.01 * rng.normal(size=(9, 3))
    assert float(jitted(sl.gaussian_mixture_structured_loss, likelihood_weight=0.0)(x, labels)) < 1e-10


# ----------------------------------------------------------------- combinators


def test_combine_losses_is_the_weighted_sum():
    from dmljax.losses.classification import cosface_loss

    x, labels = batch(3, d=5, classes=4)
    w = np.random.default_rng(1).normal(size=(4, 5))
    cos = functools.partial(cosface_loss, scale=4.0)
    combined = sl.combine_losses((1.0, sl.eet_loss), (0.5, cos, 1),
                                 (2.0, functools.partial(sl.gaussian_mixture_structured_loss, sigma=0.5)))
    eet, gauss, cos_jit = jitted(sl.eet_loss), jitted(sl.gaussian_mixture_structured_loss, sigma=0.5), jax.jit(cos)
    want = eet(x, labels) + 0.5 * cos_jit(x, labels, w) + 2.0 * gauss(x, labels)
    combined_jit = jax.jit(combined)
    np.testing.assert_allclose(combined_jit(x, labels, w), want, rtol=1e-10)
    check_grads(lambda e, v: combined_jit(e, labels, v), (x, w), order=1, modes=["rev"], eps=1e-6, atol=1e-5,
                rtol=1e-5)
    valid = np.arange(len(x)) < 8
    np.testing.assert_allclose(
        combined_jit(x, labels, w, valid=valid),
        eet(x, labels, valid=valid) + 0.5 * cos_jit(x, labels, w, valid=valid) + 2.0 * gauss(x, labels, valid=valid),
        rtol=1e-10)
    with pytest.raises(ValueError, match="^arrays"):
        combined(x, labels)
    with pytest.raises(ValueError, match="^terms"):
        sl.combine_losses()
    with pytest.raises(ValueError, match=r"^terms\[0\]"):
        sl.combine_losses((1.0, "not a function"))
    with pytest.raises(ValueError, match=r"^terms\[0\] weight"):
        sl.combine_losses((-1.0, sl.eet_loss))


@pytest.mark.parametrize("pair_loss,proxy_loss", [("multi_similarity", "proxy_anchor"), ("contrastive", "proxy_nca")])
def test_hybrid_pair_proxy_loss(pair_loss, proxy_loss):
    try:
        pair_fn = sl._named_loss(pair_loss)
        proxy_fn = sl._named_loss(proxy_loss)
    except ImportError as err:  # the component modules belong to other parts of the library
        pytest.skip(f"component loss not available: {err}")
    x, labels = batch(1, d=5, classes=4)
    proxies = np.random.default_rng(2).normal(size=(4, 5))
    want = 0.7 * jax.jit(pair_fn)(x, labels) + 1.3 * jax.jit(proxy_fn)(x, labels, proxies)
    hybrid = jax.jit(functools.partial(sl.hybrid_pair_proxy_loss, pair_weight=0.7, proxy_weight=1.3,
                                       pair_loss=pair_loss, proxy_loss=proxy_loss))
    np.testing.assert_allclose(hybrid(x, labels, proxies), want, rtol=1e-10)
    gx, gp = jax.jit(jax.grad(lambda e, p: hybrid(e, labels, p), argnums=(0, 1)))(x, proxies)
    assert np.isfinite(gx).all() and np.isfinite(gp).all() and np.abs(gp).sum() > 0
    with pytest.raises(ValueError, match="^pair_loss must be one of"):
        sl.hybrid_pair_proxy_loss(x, labels, proxies, pair_loss="triplet")
    with pytest.raises(ValueError, match="^proxy_weight must be"):
        sl.hybrid_pair_proxy_loss(x, labels, proxies, proxy_weight=-1.0)


@pytest.mark.parametrize("name", MAIN)
def test_vmap_over_batches(name):
    fn, _, config = CASES[name]
    xs, ls = zip(*(batch(s, b=8, d=4, classes=3) for s in range(2)))
    loss = jitted(fn, **config)
    np.testing.assert_allclose(jax.vmap(loss)(np.stack(xs), np.stack(ls)),
                               [loss(xs[i], ls[i]) for i in range(2)], rtol=1e-10)
