"""Classification-margin losses and center loss against plain numpy loops from the papers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmljax.losses import classification as cl
from tests.utils import assert_finite_loss_and_grad, assert_jit_matches, degenerate_batches, random_batch

# ----------------------------------------------------------------- numpy references (loops)


def np_cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_ce(logits, target):
    """-log softmax(logits)[target] with a stable log-sum-exp, a loop over classes."""
    top = max(logits)
    total = 0.0
    for z in logits:
        total += math.exp(z - top)
    return -(logits[target] - top - math.log(total))


def np_margin_loss(x, labels, w, target_fn, other_fn):
    """Mean over rows of CE with logits other_fn(i, j) and target logit target_fn(i, y_i)."""
    losses = []
    for i in range(len(x)):
        logits = []
        for j in range(len(w)):
            logits.append(target_fn(i, j) if j == labels[i] else other_fn(i, j))
        losses.append(np_ce(logits, labels[i]))
    return float(np.mean(losses))


def np_normalized_softmax(x, labels, w, temperature=0.05):
    f = lambda i, j: np_cos(x[i], w[j]) / temperature
    return np_margin_loss(x, labels, w, f, f)


def np_cosface(x, labels, w, margin=0.35, scale=64.0):
    return np_margin_loss(x, labels, w, lambda i, j: scale * (np_cos(x[i], w[j]) - margin),
                          lambda i, j: scale * np_cos(x[i], w[j]))


def np_arcface_logit(c, margin):
    theta = math.acos(min(max(c, -1.0), 1.0))
    if theta + margin <= math.pi:  # official code: cos(theta + m) while theta <= pi - m
        return math.cos(theta + margin)
    return c - margin * math.sin(margin)


def np_arcface(x, labels, w, margin=0.5, scale=64.0):
    return np_margin_loss(x, labels, w, lambda i, j: scale * np_arcface_logit(np_cos(x[i], w[j]), margin),
                          lambda i, j: scale * np_cos(x[i], w[j]))


def np_subcenter_arcface(x, labels, w, margin=0.5, scale=64.0):
    def best(i, j):
        return max(np_cos(x[i], w[j, k]) for k in range(w.shape[1]))

    return np_margin_loss(x, labels, w, lambda i, j: scale * np_arcface_logit(best(i, j), margin),
                          lambda i, j: scale * best(i, j))


def np_psi(c, m):
    theta = math.acos(c)
    k = min(int(math.floor(theta * m / math.pi)), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def np_angular(x, labels, w, margin=4, scale=1.0, lambda_=0.0, normalize_weights=True):
    def mag(i, j):
        n = np.linalg.norm(x[i])
        return n if normalize_weights else n * np.linalg.norm(w[j])

    def target(i, j):
        c = np_cos(x[i], w[j])
        return scale * mag(i, j) * (lambda_ * c + np_psi(c, margin)) / (1 + lambda_)

    return np_margin_loss(x, labels, w, target, lambda i, j: scale * mag(i, j) * np_cos(x[i], w[j]))


def np_center_loss(x, labels, c):
    return float(np.mean([0.5 * np.sum((x[i] - c[labels[i]]) ** 2) for i in range(len(x))]))


def np_center_update(c, x, labels, alpha):
    new = c.copy()
    for j in range(len(c)):
        delta = np.zeros(c.shape[1])
        count = 0
        for i in range(len(x)):
            if labels[i] == j:
                delta += c[j] - x[i]
                count += 1
        new[j] = c[j] - alpha * delta / (1 + count)
    return new


# ----------------------------------------------------------------- cases

C = 4
D = 5


def make_weights(seed=3, shape=(C, D)):
    return np.random.default_rng(seed).normal(size=shape)


# name -> (loss fn, numpy reference, config, weights shape, normalise embeddings)
CASES = {
    "normalized_softmax": (cl.normalized_softmax_loss, np_normalized_softmax, dict(temperature=0.5), (C, D)),
    "cosface": (cl.cosface_loss, np_cosface, dict(margin=0.35, scale=4.0), (C, D)),
    "arcface": (cl.arcface_loss, np_arcface, dict(margin=0.5, scale=4.0), (C, D)),
    "arcface_big_margin": (cl.arcface_loss, np_arcface, dict(margin=2.0, scale=3.0), (C, D)),
    "subcenter_arcface": (cl.subcenter_arcface_loss, np_subcenter_arcface, dict(margin=0.5, scale=4.0), (C, 3, D)),
    "sphereface": (cl.sphereface_loss, np_angular, dict(margin=4, scale=1.0), (C, D)),
    "sphereface_lambda": (cl.sphereface_loss, np_angular, dict(margin=3, scale=0.5, lambda_=5.0), (C, D)),
    "large_margin_softmax": (cl.large_margin_softmax_loss,
                             functools.partial(np_angular, normalize_weights=False), dict(margin=2), (C, D)),
}
# one configuration per loss for the finiteness tests (their cost is compilation per shape)
FAMILIES = ["normalized_softmax", "cosface", "arcface", "subcenter_arcface", "sphereface", "large_margin_softmax"]
DEFAULTS = {  # paper defaults, checked once against the reference with default arguments
    "normalized_softmax": (cl.normalized_softmax_loss, np_normalized_softmax, (C, D)),
    "cosface": (cl.cosface_loss, np_cosface, (C, D)),
    "arcface": (cl.arcface_loss, np_arcface, (C, D)),
    "subcenter_arcface": (cl.subcenter_arcface_loss, np_subcenter_arcface, (C, 2, D)),
    "sphereface": (cl.sphereface_loss, np_angular, (C, D)),
}


def batch(seed=0, b=10):
    x, labels = random_batch(seed, batch=b, dim=D, classes=C, normalize=False)
    return x, labels


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name):
    fn, ref, config, wshape = CASES[name]
    for seed in range(2):
        x, labels = batch(seed)
        w = make_weights(seed + 5, wshape)
        np.testing.assert_allclose(fn(x, labels, w, **config), ref(x, labels, w, **config), rtol=1e-5)


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_defaults_match_reference(name):
    fn, ref, wshape = DEFAULTS[name]
    x, labels = batch(1)
    w = make_weights(2, wshape)
    np.testing.assert_allclose(fn(x, labels, w), ref(x, labels, w), rtol=1e-5)


def test_arcface_fallback_branch_is_exercised():
    """With m = 2 some target angles exceed pi - m: both branches of the reference run."""
    x, labels = batch(0)
    w = make_weights(5)
    angles = [math.acos(np_cos(x[i], w[labels[i]])) for i in range(len(x))]
    assert any(a > math.pi - 2.0 for a in angles) and any(a <= math.pi - 2.0 for a in angles)


def test_easy_margin():
    x, labels = batch(0)
    w = make_weights(5)

    def ref_logit(c, m):
        return math.cos(math.acos(c) + m) if c > 0 else c

    ref = np_margin_loss(x, labels, w, lambda i, j: 4.0 * ref_logit(np_cos(x[i], w[j]), 0.5),
                         lambda i, j: 4.0 * np_cos(x[i], w[j]))
    np.testing.assert_allclose(cl.arcface_loss(x, labels, w, scale=4.0, easy_margin=True), ref, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_wrt_embeddings_and_weights(name):
    fn, _, config, wshape = CASES[name]
    x, labels = batch(2, b=6)
    w = make_weights(7, wshape)
    check_grads(lambda e, v: fn(e, labels, v, **config), (x, w), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_jit_matches_eager(name):
    fn, _, config, wshape = CASES[name]
    x, labels = batch(3)
    assert_jit_matches(fn, x, labels, make_weights(1, wshape), **config)


@pytest.mark.parametrize("name", FAMILIES)
def test_degenerate_batches_finite(name):
    fn, _, config, wshape = CASES[name]
    w = make_weights(1, (6,) + wshape[1:])  # 6 classes: "no_positives" uses labels 0..5
    # one compiled loss + gradients (embeddings and weights) shared by every degenerate batch
    value_and_grads = jax.jit(jax.value_and_grad(functools.partial(fn, **config), argnums=(0, 2)))
    for kind, (x, labels) in degenerate_batches(dim=D).items():
        value, (gx, gw) = value_and_grads(x, labels, w)
        assert np.isfinite(float(value)), (kind, float(value))
        assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gw)).all(), kind


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cos_exactly_one_finite(name, dtype):
    """Embeddings equal to (minus) their class weight: |cos| = 1, sqrt(1 - cos^2) = 0."""
    fn, _, config, wshape = CASES[name]
    w = make_weights(4, wshape)
    labels = np.array([0, 1, 2, 3, 0, 1], np.int32)
    rows = w[labels] if w.ndim == 2 else w[labels, 0]
    wj = jnp.asarray(w, dtype)
    value_and_grads = jax.jit(jax.value_and_grad(lambda e, v: fn(e, labels, v, **config), argnums=(0, 1)))
    for sign in (1.0, -1.0):  # cos = +1 and cos = -1, one compilation
        value, (gx, gw) = value_and_grads(jnp.asarray(sign * rows, dtype), wj)
        assert value.dtype == jnp.float32  # bf16 accumulates in float32
        assert np.isfinite(float(value)), sign
        assert np.isfinite(np.asarray(gx, np.float32)).all() and np.isfinite(np.asarray(gw, np.float32)).all(), sign


@pytest.mark.parametrize("name", list(CASES))
def test_bad_inputs(name):
    fn, _, config, wshape = CASES[name]
    x, labels = batch(0)
    w = make_weights(1, wshape)
    with pytest.raises(ValueError, match="^labels must be class ids"):
        fn(x, np.where(labels == 0, C, labels), w, **config)
    with pytest.raises(ValueError, match="^labels must be class ids"):
        fn(x, labels - 1, w, **config)
    with pytest.raises(ValueError, match="^labels must be an integer"):
        fn(x, labels.astype(np.float32), w, **config)
    with pytest.raises(ValueError, match="^labels has batch size"):
        fn(x, labels[:-1], w, **config)
    with pytest.raises(ValueError, match="^embeddings must have rank 2"):
        fn(x[0], labels, w, **config)
    with pytest.raises(ValueError, match="^weights must have feature dim"):
        fn(x, labels, w[..., :-1], **config)
    with pytest.raises(ValueError, match="^weights must have rank"):
        fn(x, labels, w[0], **config)
    with pytest.raises(ValueError, match="^valid must have shape"):
        fn(x, labels, w, valid=np.ones(3, bool), **config)
    with pytest.raises(ValueError, match="^reduction must be one of"):
        fn(x, labels, w, reduction="max", **config)


@pytest.mark.parametrize("fn,kwargs,argname", [
    (cl.cosface_loss, dict(margin=-0.1), "margin"),
    (cl.arcface_loss, dict(margin=-0.1), "margin"),
    (cl.arcface_loss, dict(margin=4.0), "margin"),
    (cl.cosface_loss, dict(scale=0.0), "scale"),
    (cl.normalized_softmax_loss, dict(temperature=0.0), "temperature"),
    (cl.sphereface_loss, dict(margin=1.5), "margin"),
    (cl.sphereface_loss, dict(margin=0), "margin"),
    (cl.sphereface_loss, dict(lambda_=-1.0), "lambda_"),
])
def test_bad_config(fn, kwargs, argname):
    x, labels = batch(0)
    with pytest.raises(ValueError, match=f"^{argname} must"):
        fn(x, labels, make_weights(), **kwargs)


@pytest.mark.parametrize("name", ["arcface", "cosface", "center"])
def test_valid_mask_and_out_of_range_under_jit(name):
    """Padded rows (valid=False) and, under jit, out-of-range labels do not contribute."""
    fn = cl.center_loss if name == "center" else CASES[name][0]
    config = {} if name == "center" else CASES[name][2]
    x, labels = batch(0, b=8)
    w = make_weights(1)
    want = fn(x[:6], labels[:6], w, **config)
    padded = fn(x, labels, w, valid=np.arange(8) < 6, **config)
    np.testing.assert_allclose(padded, want, rtol=1e-10)
    bad = labels.copy()
    bad[6:] = [C, -1]
    np.testing.assert_allclose(jax.jit(functools.partial(fn, **config))(x, bad, w), want, rtol=1e-10)


@given(st.integers(0, 10_000))
def test_class_permutation_and_batch_permutation_invariance(seed):
    """Renaming classes (permuting weight rows + relabelling) or shuffling the batch changes nothing."""
    rng = np.random.default_rng(seed)
    x, labels = batch(seed % 7)
    w = make_weights(seed % 5)
    perm = rng.permutation(C)  # class j is renamed perm[j]
    w_perm = np.empty_like(w)
    w_perm[perm] = w
    order = rng.permutation(len(x))
    for name in ["normalized_softmax", "cosface", "arcface", "sphereface", "large_margin_softmax"]:
        fn, _, config, _ = CASES[name]
        base = fn(x, labels, w, **config)
        np.testing.assert_allclose(fn(x, perm[labels], w_perm, **config), base, rtol=1e-9)
        np.testing.assert_allclose(fn(x[order], labels[order], w, **config), base, rtol=1e-9)
    # sub-centers: permuting the sub-centers inside a class changes nothing either
    ws = make_weights(seed % 3, (C, 3, D))
    base = cl.subcenter_arcface_loss(x, labels, ws)
    np.testing.assert_allclose(cl.subcenter_arcface_loss(x, labels, ws[:, rng.permutation(3)]), base, rtol=1e-9)


def test_margin_zero_reduces_to_normalized_softmax():
    x, labels = batch(0)
    w = make_weights(1)
    base = cl.normalized_softmax_loss(x, labels, w, temperature=1 / 8)
    np.testing.assert_allclose(cl.cosface_loss(x, labels, w, margin=0.0, scale=8.0), base, rtol=1e-9)
    np.testing.assert_allclose(cl.arcface_loss(x, labels, w, margin=0.0, scale=8.0), base, rtol=1e-9)
    np.testing.assert_allclose(cl.subcenter_arcface_loss(x, labels, w[:, None], margin=0.0, scale=8.0), base,
                               rtol=1e-9)


# ----------------------------------------------------------------- center loss / update


def test_center_loss_reference_gradients_and_sum():
    x, labels = batch(0)
    c = make_weights(2)
    np.testing.assert_allclose(cl.center_loss(x, labels, c), np_center_loss(x, labels, c), rtol=1e-10)
    np.testing.assert_allclose(cl.center_loss(x, labels, c, reduction="sum"),
                               len(x) * np_center_loss(x, labels, c), rtol=1e-10)
    check_grads(lambda e, v: cl.center_loss(e, labels, v), (x, c), order=1, modes=["rev"])
    # analytic gradient of the paper: dL/dx_i = (x_i - c_{y_i}) / B
    g = jax.grad(cl.center_loss)(x, labels, c)
    np.testing.assert_allclose(g, (x - c[labels]) / len(x), rtol=1e-10)
    assert_jit_matches(cl.center_loss, x, labels, c)


@pytest.mark.parametrize("kind", list(degenerate_batches(dim=D)))
def test_center_loss_degenerate(kind):
    x, labels = degenerate_batches(dim=D)[kind]
    assert_finite_loss_and_grad(lambda e, l: cl.center_loss(e, l, make_weights(1, (6, D))), x, labels)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_center_update_matches_eq4(alpha):
    x, labels = batch(1)
    labels = np.where(labels == 3, 0, labels)  # class 3 absent: its center must not move
    c = make_weights(3)
    new = cl.center_update(c, x, labels, alpha=alpha)
    np.testing.assert_allclose(new, np_center_update(c, x, labels, alpha), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(new)[3], c[3])
    np.testing.assert_allclose(jax.jit(functools.partial(cl.center_update, alpha=alpha))(c, x, labels), new,
                               rtol=1e-12)
    # padding rows are ignored
    padded = cl.center_update(c, np.concatenate([x, x[:2] + 9.0]), np.concatenate([labels, labels[:2]]),
                              alpha=alpha, valid=np.arange(len(x) + 2) < len(x))
    np.testing.assert_allclose(padded, new, rtol=1e-12)


def test_center_update_converges_to_class_means_and_bad_input():
    x, labels = batch(2)
    c = np.zeros((C, D))
    for _ in range(200):
        c = cl.center_update(c, x, labels, alpha=0.5)
    means = np.stack([x[labels == j].mean(0) for j in range(C)])
    np.testing.assert_allclose(c, means, atol=1e-8)
    with pytest.raises(ValueError, match="^alpha must be"):
        cl.center_update(c, x, labels, alpha=1.5)
    with pytest.raises(ValueError, match="^labels must be class ids"):
        cl.center_update(c, x, labels + C)
    with pytest.raises(ValueError, match="^centers must have feature dim"):
        cl.center_update(np.zeros((C, D + 1)), x, labels)
    with pytest.raises(ValueError, match="^centers must have rank 2"):
        cl.center_loss(x, labels, np.zeros(D))


# ----------------------------------------------------------------- PML parity (optional)


def test_matches_pytorch_metric_learning():
    """Same numbers as PML with the weights transposed ([C, D] here, [D, C] there)."""
    pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    import torch

    from experiments.bench.specs_classification import CASES as BENCH

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(12, 6)) * rng.uniform(0.5, 2.0, size=(12, 1))).astype(np.float32)
    labels = (np.arange(12) % 5).astype(np.int32)
    for case in BENCH:
        fn, params = case.dmljax(12, 6, 5)
        pml_fn, _ = case.pml(12, 6, 5)
        ours = float(fn(jnp.asarray(x), jnp.asarray(labels), *params))
        theirs = float(pml_fn(torch.from_numpy(x), torch.from_numpy(labels).long()).detach())
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, err_msg=case.name)


# ----------------------------------------------------------------- training (acceptance 2)


@pytest.mark.parametrize("name,config", [
    ("normalized_softmax", dict(temperature=0.1)),
    ("cosface", dict(scale=16.0)),
    ("arcface", dict(scale=16.0)),
    ("subcenter_arcface", dict(scale=16.0)),
    ("sphereface", dict(scale=4.0, lambda_=5.0)),
])
def test_training_separable_problem_reaches_high_accuracy(name, config):
    """A linear embedding + class weights trained with optax classify held-out points > 95%."""
    import optax

    fn = CASES[name][0]
    rng = np.random.default_rng(0)
    classes, in_dim, emb_dim = 5, 8, 4
    means = 4.0 * rng.normal(size=(classes, in_dim))

    def sample(n):
        y = rng.integers(0, classes, size=n).astype(np.int32)
        return (means[y] + rng.normal(size=(n, in_dim))).astype(np.float32), y

    x_train, y_train = sample(256)
    x_test, y_test = sample(256)
    wshape = (classes, 2, emb_dim) if name == "subcenter_arcface" else (classes, emb_dim)
    params = {"proj": 0.1 * rng.normal(size=(in_dim, emb_dim)).astype(np.float32),
              "weights": rng.normal(size=wshape).astype(np.float32)}
    opt = optax.adam(0.05)

    def objective(p):
        return fn(jnp.asarray(x_train) @ p["proj"], y_train, p["weights"], **config)

    @jax.jit
    def train(p):
        def step(carry, _):
            p, state = carry
            grads = jax.grad(objective)(p)
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=300)
        return p

    start = float(objective(params))
    params = train(params)
    assert float(objective(params)) < start
    emb = np.asarray(x_test @ params["proj"])
    w = np.asarray(params["weights"]).reshape(classes, -1, emb_dim)
    cos = np.einsum("bd,ckd->bck", emb / np.linalg.norm(emb, axis=1, keepdims=True),
                    w / np.linalg.norm(w, axis=2, keepdims=True)).max(axis=2)
    accuracy = float(np.mean(cos.argmax(axis=1) == y_test))
    assert accuracy > 0.95, accuracy


@pytest.mark.parametrize("name", ["arcface", "sphereface"])
def test_vmap_over_batches(name):
    fn, _, config, wshape = CASES[name]
    xs, ls = zip(*(batch(s, b=8) for s in range(2)))
    w = make_weights(1, wshape)
    loss = jax.jit(functools.partial(fn, **config))
    np.testing.assert_allclose(jax.vmap(loss, in_axes=(0, 0, None))(np.stack(xs), np.stack(ls), w),
                               [loss(xs[i], ls[i], w) for i in range(2)], rtol=1e-10)
    new = jax.vmap(cl.center_update, in_axes=(None, 0, 0))(w if w.ndim == 2 else w[:, 0], np.stack(xs),
                                                           np.stack(ls))
    np.testing.assert_allclose(new[1], cl.center_update(w if w.ndim == 2 else w[:, 0], xs[1], ls[1]), rtol=1e-10)
