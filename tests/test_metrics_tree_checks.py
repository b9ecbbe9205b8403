"""Whole-result checks with chex: metric dicts compared as trees, finiteness of every value and
gradient of the regularizers at once (chex is a test dependency, in the dev extra)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dmljax import regularizers as R
from dmljax.metrics import evaluate


def _retrieval(emb, labels):
    m = evaluate(emb, labels, ks=(1, 2, 4), clustering=False)
    return {k: v for k, v in m.items() if k != "knn_seconds"}  # the only wall-clock entry


def test_evaluate_is_invariant_to_a_joint_permutation_of_the_test_set():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 4).astype(np.int32)
    emb = rng.normal(size=(24, 5)).astype(np.float32)
    perm = rng.permutation(24)
    chex.assert_trees_all_close(_retrieval(emb, labels), _retrieval(emb[perm], labels[perm]), rtol=1e-6)
    # and not to a permutation of the labels alone (the check can fail)
    shuffled = _retrieval(emb, labels[rng.permutation(24)])
    assert shuffled != _retrieval(emb, labels)


_REGULARIZERS = {
    "lp": R.lp_regularizer,
    "zero_mean": R.zero_mean_regularizer,
    "center_invariant": R.center_invariant_regularizer,
    "regularface": R.regularface_regularizer,
}


def _degenerate_inputs():
    one = jnp.ones((4, 3))
    return {"zeros": jnp.zeros((4, 3)), "duplicated": one, "one_row": one[:1] * 2.0,
            "bf16": jnp.ones((4, 3), jnp.bfloat16)}


def test_regularizer_values_and_gradients_are_finite_on_degenerate_inputs():
    tree = {}
    for name, fn in _REGULARIZERS.items():
        for kind, x in _degenerate_inputs().items():
            if name == "regularface" and x.shape[0] < 2:
                continue  # needs two classes
            tree[(name, kind)] = jax.value_and_grad(lambda v: fn(v).astype(jnp.float32))(x)
    centers = jnp.ones((2, 3, 4))  # SoftTriple centers [C, K, D], all identical
    tree[("sparse_centers", "identical")] = jax.value_and_grad(R.sparse_centers_regularizer)(centers)
    chex.assert_tree_all_finite(tree)


def test_regularizers_jit_equals_eager_as_trees():
    x = jax.random.normal(jax.random.key(0), (6, 4))
    eager = {name: jax.value_and_grad(fn)(x) for name, fn in _REGULARIZERS.items()}
    jitted = {name: jax.jit(jax.value_and_grad(fn))(x) for name, fn in _REGULARIZERS.items()}
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal_shapes_and_dtypes(jitted, eager)
    p3 = functools.partial(R.lp_regularizer, p=3.0, power=2.0)
    chex.assert_trees_all_close(jax.jit(jax.grad(p3))(x), jax.grad(p3)(x), rtol=1e-6)
