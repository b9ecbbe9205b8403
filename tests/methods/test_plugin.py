"""make_method: every method as one scalar objective, jittable, finite, stop-gradient partition."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmljax.distances import l2_normalize
from dmljax.losses.weighted import multi_similarity_loss
from dmljax.methods.daml import HardNegativeGenerator, daml_generator_loss
from dmljax.methods.alternating_projection import representative_mask
from dmljax.methods.plugin import METHODS, make_method
from dmljax.methods._common import sample_triplets
from tests.utils import random_batch

C, D, B = 4, 6, 16
_base = functools.partial(multi_similarity_loss, mining=False)


def _method(name):
    extra = {}
    if name == "alternating_projection":
        extra["representatives"] = representative_mask(classes_per_batch=4, samples_per_class=4,
                                                       representatives_per_class=2)
    if name == "divide_conquer":
        extra["num_learners"] = 2
    return make_method(name, _base, num_classes=C, dim=D, total_steps=10, **extra)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_is_a_finite_jittable_objective(name):
    x, y = random_batch(0, batch=B, dim=D, classes=C)
    x = x.astype(np.float32)
    method = _method(name)
    params, state = method.init(jax.random.key(0))
    ids = jnp.asarray(np.arange(B) % 2, jnp.int32)

    @jax.jit
    def step(params, state, x, labels, key, step):
        (loss, new_state), grads = jax.value_and_grad(
            lambda p, e: method.loss(p, state, e, labels, key, step, cluster_ids=ids), argnums=(0, 1),
            has_aux=True)(params, x)
        return loss, new_state, grads

    fresh = state
    for i in range(2):
        loss, state, (gp, gx) = step(params, state, x, y, jax.random.key(i), i)
        assert np.isfinite(float(loss)), name
        assert np.isfinite(np.asarray(gx)).all() and np.abs(np.asarray(gx)).sum() > 0, name
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(gp)), name
    # degenerate: a single class (same shapes: no recompilation)
    loss, _, (gp, gx) = step(params, fresh, x, np.zeros(B, np.int32), jax.random.key(0), 0)
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(gx)).all(), name
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(gp)), name


def test_daml_objective_partitions_the_gradients():
    """Network gradient = metric part only; generator gradient = J_gen only."""
    x, y = random_batch(1, batch=B, dim=D, classes=C)
    x = jnp.asarray(x)
    method = make_method("daml", _base, num_classes=C, dim=D, margin=0.2)
    params, state = method.init(jax.random.key(0))
    key = jax.random.key(3)
    gp, gx = jax.jit(jax.grad(lambda p, e: method.loss(p, state, e, y, key, 0)[0], argnums=(0, 1)))(params, x)
    graphdef = nnx.graphdef(HardNegativeGenerator(D, normalize=True, rngs=nnx.Rngs(0)))
    trip, ok = sample_triplets(key, y)

    def j_gen(p):
        a, pos, n = (x[trip[:, i]] for i in range(3))
        return daml_generator_loss(a, pos, n, nnx.merge(graphdef, p)(a, pos, n), margin=0.2, weights=ok)

    want_gp = jax.jit(jax.grad(j_gen))(params)
    for got, want in zip(jax.tree.leaves(gp), jax.tree.leaves(want_gp)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)
    # the network gradient does not depend on the generator objective's weights
    m2 = make_method("daml", _base, num_classes=C, dim=D, margin=0.2, lambda_reg=5.0, lambda_adv=0.0)
    gx2 = jax.jit(jax.grad(lambda e: m2.loss(params, state, e, y, key, 0)[0]))(x)
    np.testing.assert_allclose(gx, gx2, rtol=1e-10)


def test_bad_configuration():
    with pytest.raises(ValueError, match="^name"):
        make_method("mixup", _base, num_classes=C, dim=D)
    with pytest.raises(ValueError, match="^options not used"):
        make_method("das", _base, num_classes=C, dim=D, strength=0.3)
    with pytest.raises(ValueError, match="^representatives"):
        make_method("alternating_projection", _base, num_classes=C, dim=D)
    m = make_method("divide_conquer", _base, num_classes=C, dim=D, num_learners=2)
    x, y = random_batch(0, batch=8, dim=D, classes=2)
    with pytest.raises(ValueError, match="^cluster_ids"):
        m.loss((), (), x, y, jax.random.key(0), 0)
