"""Data-parallel (shard_map over "data") train step == single-device step on the global batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dmljax.losses.proxy import proxy_anchor_loss
from dmljax.train.optim import make_optimizer
from dmljax.train.state import create_train_state
from dmljax.train.step import data_mesh, make_parallel_train_step, train_step
from dmljax.train.toy import tiny_model, toy_images

NUM_DEVICES = 8
NUM_CLASSES = 4


def _pair_loss():
    from dmljax.losses.pair import contrastive_loss
    return contrastive_loss, ()


def _weighted_loss():
    weighted = pytest.importorskip("dmljax.losses.weighted")
    return weighted.multi_similarity_loss, ()


def _proxy_loss():
    proxies = jax.random.normal(jax.random.key(3), (NUM_CLASSES, 4))
    return functools.partial(proxy_anchor_loss, margin=0.1, alpha=32.0), (proxies,)


LOSSES = {"contrastive": _pair_loss, "multi_similarity": _weighted_loss, "proxy_anchor": _proxy_loss}


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= NUM_DEVICES, "tests/conftest.py must force 8 host devices"
    return data_mesh(jax.devices()[:NUM_DEVICES])


def _state(loss_name, optimizer="sgd"):
    loss_fn, loss_params = LOSSES[loss_name]()
    tx = make_optimizer(learning_rate=0.05, total_steps=10, optimizer=optimizer, loss_lr_mult=10.0)
    return create_train_state(tiny_model(0, head_norm="batch"), tx, loss_fn, loss_params)


def _batch(seed=0):
    images, labels = toy_images(seed, num_classes=NUM_CLASSES, per_class=4)
    perm = np.random.default_rng(seed).permutation(len(labels))  # classes spread over devices
    return {"images": jnp.asarray(images[perm]), "labels": jnp.asarray(labels[perm])}


def _max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_abs(a):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_parallel_step_equals_single_device(mesh, loss_name):
    # SGD with momentum: Adam would turn float noise in exactly-zero gradients (a Linear bias
    # before BatchNorm) into full-size updates of random sign, hiding real differences
    state = _state(loss_name, optimizer="sgd")
    parallel = make_parallel_train_step(mesh)
    single = jax.jit(train_step)
    key = jax.random.key(0)
    s1, s8 = state, state
    for step in range(2):  # two steps: the second one also compares the optimizer states
        batch = _batch(step)
        s1, m1 = single(s1, batch, key)
        s8, m8 = parallel(s8, batch, key)
        for name in ("loss", "pos_dist", "neg_dist", "active_fraction", "hard_negative_fraction", "grad_norm"):
            np.testing.assert_allclose(float(m8[name]), float(m1[name]), rtol=2e-5, atol=1e-6, err_msg=name)
    change = jax.tree.map(lambda a, b: a - b, s1.params, state.params)
    assert _max_abs(change) > 1e-3, "the step must actually move the parameters"
    # tolerance relative to the size of the update (float32 model, reductions in another order)
    assert _max_abs_diff(s8.params, s1.params) <= 1e-4 * _max_abs(change) + 1e-6
    assert _max_abs_diff(s8.batch_stats, s1.batch_stats) < 1e-5
    assert _max_abs_diff(s8.opt_state, s1.opt_state) <= 1e-4 * _max_abs(s1.opt_state) + 1e-6
    assert int(s8.step) == int(s1.step) == 2
    if loss_name == "proxy_anchor":
        proxy_change = _max_abs(jax.tree.map(lambda a, b: a - b, s1.params["loss"], state.params["loss"]))
        assert proxy_change > 1e-3
        assert _max_abs_diff(s8.params["loss"], s1.params["loss"]) <= 1e-4 * proxy_change


@pytest.mark.parametrize("scale_by_devices", [True, False])
def test_gathered_embedding_gradient_is_exact(mesh, scale_by_devices):
    """grad of the global loss w.r.t. each device's own embeddings == the single-device gradient
    of the global batch restricted to that shard (all_gather transposes to a reduce-scatter);
    without the 1/num_devices scaling it is num_devices times too large."""
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(size=(16, 4)))
    labels = jnp.asarray(np.arange(16) % 4, jnp.int32)
    proxies = jnp.asarray(rng.normal(size=(4, 4)))
    loss = functools.partial(proxy_anchor_loss, margin=0.1, alpha=32.0)

    def per_device(e, y, p):
        def global_loss(e_local, p_):
            all_e = jax.lax.all_gather(e_local, "data", tiled=True)
            all_y = jax.lax.all_gather(y, "data", tiled=True)
            value = loss(all_e, all_y, p_)
            return value / jax.lax.axis_size("data") if scale_by_devices else value
        return jax.grad(global_loss, argnums=(0, 1))(e, p)

    g_emb, g_proxies = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                                             out_specs=(P("data"), P())))(emb, labels, proxies)
    want_emb, want_proxies = jax.grad(loss, argnums=(0, 2))(emb, labels, proxies)
    factor = 1.0 if scale_by_devices else float(NUM_DEVICES)
    np.testing.assert_allclose(np.asarray(g_emb), factor * np.asarray(want_emb), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(g_proxies), factor * np.asarray(want_proxies), rtol=1e-10, atol=1e-12)


def test_bad_axis_name_raises(mesh):
    with pytest.raises(ValueError, match="^axis_name"):
        make_parallel_train_step(mesh, axis_name="batch")
