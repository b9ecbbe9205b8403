"""The pure train step: learning on a toy problem, every loss family plugs in, metrics, options."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from dmljax.train.optim import make_optimizer, param_labels, warmup_cosine
from dmljax.train.state import create_train_state
from dmljax.train.step import embedding_metrics, train_step
from dmljax.train.toy import tiny_model, toy_images

NUM_CLASSES = 4
DIM = 4

# (module, function, kind): kind "pair" -> fn(emb, labels); "proxy" -> fn(emb, labels, [C, D])
LOSS_FAMILIES = [
    ("dmljax.losses.pair", "contrastive_loss", "pair"),
    ("dmljax.losses.triplet", "triplet_margin_loss", "pair"),
    ("dmljax.losses.weighted", "multi_similarity_loss", "pair"),
    ("dmljax.losses.proxy", "proxy_anchor_loss", "proxy"),
    ("dmljax.losses.proxy", "proxy_nca_loss", "proxy"),
    ("dmljax.losses.classification", "normalized_softmax_loss", "proxy"),
    ("dmljax.losses.classification", "arcface_loss", "proxy"),
]


def _loss(module, name, kind):
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"{module}.{name} not available")
    params = (jax.random.normal(jax.random.key(7), (NUM_CLASSES, DIM)),) if kind == "proxy" else ()
    return fn, params


def _state(loss_fn, loss_params=(), *, lr=0.01, steps=100, freeze=False, head_norm="batch", **opt):
    tx = make_optimizer(learning_rate=lr, total_steps=steps, **opt)
    return create_train_state(tiny_model(0, embedding_dim=DIM, head_norm=head_norm), tx, loss_fn,
                              loss_params, freeze_batch_norm=freeze)


@pytest.fixture(scope="module")
def data():
    images, labels = toy_images(0, num_classes=NUM_CLASSES, per_class=4)
    return {"images": jnp.asarray(images), "labels": jnp.asarray(labels)}


def _diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loss_decreases_on_toy_problem(data):
    from dmljax.losses.proxy import proxy_anchor_loss
    fn, params = _loss("dmljax.losses.proxy", "proxy_anchor_loss", "proxy")
    state = _state(functools.partial(proxy_anchor_loss, margin=0.1, alpha=16.0), params, lr=0.03, steps=30,
                   optimizer="adam", loss_lr_mult=3.0)
    step = jax.jit(train_step)
    losses = []
    for i in range(30):
        state, metrics = step(state, data, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    # the classes separate: positives closer than negatives at the end
    assert float(metrics["pos_dist"]) < float(metrics["neg_dist"])


@pytest.mark.parametrize("module,name,kind", LOSS_FAMILIES, ids=[f[1] for f in LOSS_FAMILIES])
def test_every_loss_family_plugs_in(data, module, name, kind):
    fn, params = _loss(module, name, kind)
    state = _state(fn, params)
    new, metrics = jax.jit(train_step)(state, data, jax.random.key(0))
    assert set(metrics) >= {"loss", "pos_dist", "neg_dist", "active_fraction", "hard_negative_fraction"}
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert int(new.step) == 1 and int(new.sampler_step) == 1
    assert _diff(new.params["model"], state.params["model"]) > 0
    if kind == "proxy":  # proxies / class weights are trained alongside the network
        assert _diff(new.params["loss"], state.params["loss"]) > 0


@pytest.mark.slow  # ~270 op-by-op compilations (8-11 s CPU); every other test here runs the jitted step
def test_jit_matches_eager(data):
    from dmljax.losses.pair import contrastive_loss
    # SGD: Adam would blow float noise in exactly-zero gradients up to full-size updates
    state = _state(contrastive_loss, optimizer="sgd")
    eager, m_eager = train_step(state, data, jax.random.key(1))
    jitted, m_jit = jax.jit(train_step)(state, data, jax.random.key(1))
    np.testing.assert_allclose(float(m_jit["loss"]), float(m_eager["loss"]), rtol=1e-5)
    assert _diff(jitted.params, eager.params) < 1e-5


def test_embedding_metrics_match_numpy_loop():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 3))
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 0, 2], np.int32)
    grad = rng.normal(size=(10, 3))
    grad[[1, 4]] = 0.0
    got = jax.jit(embedding_metrics)(jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(grad))
    pos, neg, hard, negatives = [], [], 0, 0
    for i in range(10):
        farthest = max([np.linalg.norm(emb[i] - emb[j]) for j in range(10) if j != i and labels[j] == labels[i]],
                       default=-np.inf)
        for j in range(10):
            d = np.linalg.norm(emb[i] - emb[j])
            if i != j and labels[i] == labels[j]:
                pos.append(d)
            elif labels[i] != labels[j]:
                neg.append(d)
                negatives += 1
                hard += d < farthest
    np.testing.assert_allclose(float(got["pos_dist"]), np.mean(pos), rtol=1e-5)
    np.testing.assert_allclose(float(got["neg_dist"]), np.mean(neg), rtol=1e-5)
    np.testing.assert_allclose(float(got["hard_negative_fraction"]), hard / negatives, rtol=1e-6)
    np.testing.assert_allclose(float(got["active_fraction"]), 0.8)


def test_collapsed_embeddings_are_flagged_and_finite():
    emb = jnp.tile(jnp.array([[1.0, 0.0, 0.0]]), (6, 1))
    labels = jnp.array([0, 0, 1, 1, 2, 2])
    m = embedding_metrics(emb, labels, jnp.zeros_like(emb))
    assert float(m["pos_dist"]) == 0.0 and float(m["neg_dist"]) == 0.0
    assert float(m["active_fraction"]) == 0.0
    assert all(np.isfinite(float(v)) for v in m.values())


def test_freeze_batch_norm_keeps_statistics(data):
    from dmljax.losses.pair import contrastive_loss
    for freeze in (False, True):
        state = _state(contrastive_loss, freeze=freeze)
        new, _ = jax.jit(train_step)(state, data, jax.random.key(0))
        changed = _diff(new.batch_stats, state.batch_stats) > 0
        assert changed != freeze
        assert _diff(new.params["model"], state.params["model"]) > 0


def test_separate_learning_rates(data):
    fn, params = _loss("dmljax.losses.proxy", "proxy_anchor_loss", "proxy")
    state = _state(fn, params, backbone_lr_mult=0.0, loss_lr_mult=0.0)
    labels = param_labels(state.params)
    assert set(jax.tree.leaves(labels["model"]["backbone"])) == {"backbone"}
    assert set(jax.tree.leaves(labels["model"]["head"])) == {"head"}
    assert jax.tree.leaves(labels["loss"]) == ["loss"]
    new, _ = jax.jit(train_step)(state, data, jax.random.key(0))
    assert _diff(new.params["model"]["backbone"], state.params["model"]["backbone"]) == 0.0
    assert _diff(new.params["loss"], state.params["loss"]) == 0.0
    assert _diff(new.params["model"]["head"], state.params["model"]["head"]) > 0


def test_warmup_cosine_schedule():
    sched = warmup_cosine(1.0, total_steps=20, warmup_steps=10, end_fraction=0.1)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(20)), 0.1, rtol=1e-5)
    assert float(sched(15)) < 1.0


def test_augmentation_is_applied_with_the_key(data):
    from dmljax.losses.pair import contrastive_loss
    calls = []

    def shift(images, key):
        calls.append(key)
        return jnp.roll(images, 1, axis=1).astype(jnp.float32) / 255.0 + jax.random.uniform(key, (1, 1, 1, 1))

    tx = make_optimizer(learning_rate=0.01, total_steps=10)
    state = create_train_state(tiny_model(0, embedding_dim=DIM), tx, contrastive_loss, augment_fn=shift)
    step = jax.jit(train_step)
    _, m1 = step(state, data, jax.random.key(1))
    _, m2 = step(state, data, jax.random.key(2))
    assert calls and float(m1["loss"]) != float(m2["loss"])


@pytest.mark.parametrize("bad,match", [
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, np.int32)}, r"^batch\['images'\]"),
    ({"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.zeros(3, np.int32)}, r"^batch\['labels'\]"),
    ({"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.zeros(4, np.float32)}, r"^batch\['labels'\]"),
    ({"pixels": np.zeros((4, 8, 8, 1), np.uint8)}, r"^batch"),
])
def test_bad_batch_raises(bad, match):
    from dmljax.losses.pair import contrastive_loss
    with pytest.raises(ValueError, match=match):
        train_step(_state(contrastive_loss), bad, jax.random.key(0))


def test_bad_config_raises():
    from dmljax.losses.pair import contrastive_loss
    tx = make_optimizer(learning_rate=0.01, total_steps=10)
    with pytest.raises(ValueError, match="^loss_params"):
        create_train_state(tiny_model(0), tx, contrastive_loss, [jnp.zeros((2, 4))])
    with pytest.raises(ValueError, match="^optimizer"):
        make_optimizer(learning_rate=0.01, total_steps=10, optimizer="lbfgs")
    with pytest.raises(ValueError, match="^warmup_steps"):
        warmup_cosine(0.1, total_steps=10, warmup_steps=11)


_PERM_STATE = {}


@given(st.permutations(list(range(16))))
def test_step_is_invariant_to_batch_order(perm):
    """Loss, metrics and the update do not depend on the order of the batch (BN and the loss are
    permutation invariant)."""
    from dmljax.losses.weighted import multi_similarity_loss
    if not _PERM_STATE:
        images, labels = toy_images(1, num_classes=NUM_CLASSES, per_class=4)
        state = _state(multi_similarity_loss, optimizer="sgd")  # see test_jit_matches_eager
        step = jax.jit(train_step)
        ref = step(state, {"images": jnp.asarray(images), "labels": jnp.asarray(labels)}, jax.random.key(0))
        _PERM_STATE.update(images=images, labels=labels, state=state, step=step, ref=ref)
    s = _PERM_STATE
    perm = np.asarray(perm)
    new, m = s["step"](s["state"], {"images": jnp.asarray(s["images"][perm]),
                                     "labels": jnp.asarray(s["labels"][perm])}, jax.random.key(0))
    ref_state, ref_m = s["ref"]
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m["hard_negative_fraction"]), float(ref_m["hard_negative_fraction"]), rtol=1e-6)
    assert _diff(new.params, ref_state.params) < 1e-5
