"""End-to-end: optax trains a linear embedding and the proxies of each proxy loss on a separable
synthetic problem; nearest-proxy accuracy on held-out points must exceed 95%. Imprinted proxies
of novel classes classify held-out samples of those classes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dmljax.losses.hyperbolic import hier_regularized_loss
from dmljax.losses.imprinting import imprint_weights, nearest_proxy_predict
from dmljax.losses.proxy import multi_proxy_anchor_loss, proxy_anchor_loss, proxy_nca_loss, soft_triple_loss
from dmljax.models.proxies import ProxyAnchorHead, kaiming_normal_fan_out

IN_DIM, EMB_DIM, NUM_CLASSES, NUM_NOVEL = 8, 6, 4, 2
STEPS = 200


def make_data(seed=0, per_class_train=16, per_class_test=40):
    """Gaussian blobs around orthogonal class means (base classes 0..3, novel classes 4..5)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(IN_DIM, IN_DIM)))
    means = 3.0 * q[: NUM_CLASSES + NUM_NOVEL]

    def sample(n):
        labels = np.repeat(np.arange(NUM_CLASSES + NUM_NOVEL), n)
        x = means[labels] + 0.6 * rng.normal(size=(len(labels), IN_DIM))
        return x.astype(np.float32), labels.astype(np.int32)

    return sample(per_class_train), sample(per_class_test)


def train(loss_fn, proxy_shapes, x, y, *, seed=0, lr=0.05):
    """Adam on (W, *proxies) for STEPS full-batch steps inside one jitted lax.scan."""
    keys = jax.random.split(jax.random.key(seed), 1 + len(proxy_shapes))
    params = (jax.random.normal(keys[0], (IN_DIM, EMB_DIM)) / np.sqrt(IN_DIM),) + tuple(
        kaiming_normal_fan_out(k, s) for k, s in zip(keys[1:], proxy_shapes))
    opt = optax.adam(lr)

    def objective(p):
        return loss_fn(x @ p[0], y, *p[1:])

    @jax.jit
    def run(params):
        def step(carry, _):
            p, state = carry
            value, grads = jax.value_and_grad(objective)(p)
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), value

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=STEPS)
        return params, losses

    params, losses = run(params)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    return params


def hier_with_proxy_anchor(emb, labels, pa_proxies, hier_proxies):
    return hier_regularized_loss(emb, labels, hier_proxies, pa_proxies, base_loss=proxy_anchor_loss, weight=1.0)


# compiled once per proxy shape (eager dispatch of the few ops costs more than compiling them)
predict = jax.jit(nearest_proxy_predict)

K = 3
CASES = {
    "proxy_nca": (functools.partial(proxy_nca_loss), [(NUM_CLASSES, EMB_DIM)]),
    "proxy_nca_original": (functools.partial(proxy_nca_loss, temperature=1.0, include_positive_in_denominator=False),
                           [(NUM_CLASSES, EMB_DIM)]),
    "proxy_anchor": (proxy_anchor_loss, [(NUM_CLASSES, EMB_DIM)]),
    "mpa": (multi_proxy_anchor_loss, [(NUM_CLASSES, K, EMB_DIM)]),
    "soft_triple": (soft_triple_loss, [(NUM_CLASSES, K, EMB_DIM)]),
    "hier+proxy_anchor": (hier_with_proxy_anchor, [(NUM_CLASSES, EMB_DIM), (8, EMB_DIM)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_reaches_high_nearest_proxy_accuracy(name):
    loss_fn, shapes = CASES[name]
    (x, y), (xt, yt) = make_data()
    base, base_t = y < NUM_CLASSES, yt < NUM_CLASSES
    params = train(loss_fn, shapes, x[base], y[base])
    w, proxies = params[0], params[1]
    accuracy = float(np.mean(np.asarray(predict(xt[base_t] @ w, proxies)) == yt[base_t]))
    assert accuracy > 0.95, f"{name}: held-out nearest-proxy accuracy {accuracy:.3f}"


def test_imprinted_proxies_classify_novel_classes():
    (x, y), (xt, yt) = make_data(seed=1)
    base = y < NUM_CLASSES
    w, proxies = train(proxy_anchor_loss, [(NUM_CLASSES, EMB_DIM)], x[base], y[base], seed=1)
    shots = np.concatenate([np.flatnonzero(y == c)[:5] for c in range(NUM_CLASSES, NUM_CLASSES + NUM_NOVEL)])
    imprinted = imprint_weights(x[shots] @ w, y[shots] - NUM_CLASSES, num_classes=NUM_NOVEL)
    novel_t = yt >= NUM_CLASSES
    # novel classes among themselves
    pred = np.asarray(predict(xt[novel_t] @ w, imprinted)) + NUM_CLASSES
    assert np.mean(pred == yt[novel_t]) > 0.95
    np.testing.assert_allclose(np.linalg.norm(imprinted, axis=1), 1.0, rtol=1e-5)
    # The imprinted weights are good proxies for further training too: the proxy loss of the
    # novel samples is lower with them than with random proxies of the same norm.
    novel = ~base
    random_proxies = kaiming_normal_fan_out(jax.random.key(5), (NUM_NOVEL, EMB_DIM))
    loss = jax.jit(proxy_anchor_loss)
    with_imprinted = loss(x[novel] @ w, y[novel] - NUM_CLASSES, imprinted)
    with_random = loss(x[novel] @ w, y[novel] - NUM_CLASSES, random_proxies)
    assert with_imprinted < with_random


def test_nnx_head_trains_with_nnx_jit():
    """ProxyAnchorHead owns the proxies; nnx.jit + nnx.Optimizer update both model and head."""
    (x, y), (xt, yt) = make_data(seed=2)
    base, base_t = y < NUM_CLASSES, yt < NUM_CLASSES
    x, y, xt, yt = x[base], y[base], xt[base_t], yt[base_t]

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(IN_DIM, EMB_DIM, rngs=rngs)
            self.head = ProxyAnchorHead(NUM_CLASSES, EMB_DIM, rngs=rngs)

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: m.head(m.embed(x), y))(model)
        optimizer.update(model, grads)
        return loss

    first = float(step(model, optimizer, x, y))
    for _ in range(60):
        last = float(step(model, optimizer, x, y))
    assert last < first
    accuracy = float(np.mean(np.asarray(model.head.predict(model.embed(xt))) == yt))
    assert accuracy > 0.95


def test_heads_call_the_pure_losses_and_init_like_the_papers():
    from dmljax.losses.hyperbolic import hier_loss
    from dmljax.models.proxies import HIERHead, MultiProxyAnchorHead, ProxyNCAHead, SoftTripleHead

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, EMB_DIM)).astype(np.float32)
    y = (np.arange(8) % NUM_CLASSES).astype(np.int32)
    heads = [
        (ProxyNCAHead(NUM_CLASSES, EMB_DIM, rngs=nnx.Rngs(0)), proxy_nca_loss),
        (ProxyAnchorHead(NUM_CLASSES, EMB_DIM, rngs=nnx.Rngs(0), margin=0.2), functools.partial(proxy_anchor_loss, margin=0.2)),
        (MultiProxyAnchorHead(NUM_CLASSES, EMB_DIM, 2, rngs=nnx.Rngs(0)), multi_proxy_anchor_loss),
        (SoftTripleHead(NUM_CLASSES, EMB_DIM, 2, rngs=nnx.Rngs(0)), soft_triple_loss),
        (HIERHead(8, EMB_DIM, rngs=nnx.Rngs(0)), hier_loss),
    ]
    call = nnx.jit(lambda h, e, l: h(e, l))
    for head, pure in heads:
        value = call(head, x, y)
        # the pure loss compiled too: op-by-op eager dispatch of five losses cost seconds
        np.testing.assert_allclose(value, jax.jit(pure)(x, y, head.proxies[...]), rtol=1e-5)
    big = ProxyAnchorHead(200, 64, rngs=nnx.Rngs(1))
    assert abs(float(jnp.std(big.proxies[...])) - np.sqrt(2.0 / 200)) < 0.01  # Kaiming normal, fan_out = C
    with pytest.raises(ValueError, match="^num_classes"):
        ProxyAnchorHead(0, 4, rngs=nnx.Rngs(0))
