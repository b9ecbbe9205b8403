"""DAS: frequency recorder and transformation memory against numpy loops; produced embeddings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.methods.das import das_augment, das_generate, das_init, das_update
from tests.utils import random_batch

C, D = 4, 6


def test_frequency_recorder_matches_numpy_loop():
    x, y = random_batch(0, batch=12, dim=D, classes=C, normalize=False)
    state = das_update(das_init(C, D), x, y, jax.random.key(0), num_scale=2)
    want = np.zeros((C, D))
    for i in range(len(y)):
        for dim in np.argsort(-x[i])[:2]:
            want[y[i], dim] += 1
    np.testing.assert_array_equal(state.frequency, want)


def test_memory_holds_intra_class_transformations_fifo():
    x, y = random_batch(1, batch=12, dim=D, classes=C, normalize=False)
    state = das_init(C, D, bank_size=5)
    for step in range(3):
        state = das_update(state, x * (step + 1), y, jax.random.key(step))
    bank, count = np.asarray(state.bank), np.asarray(state.bank_count)
    np.testing.assert_array_equal(count, np.full(C, 5))
    np.testing.assert_array_equal(state.bank_ptr, np.full(C, (3 * 3) % 5))  # 3 writes per class per step
    x = 3 * x  # slots 1, 2, 3 (the last writes, FIFO) hold the last batch's differences
    for c in range(C):
        members = x[y == c]
        diffs = [members[i] - members[j] for i in range(len(members)) for j in range(len(members)) if i != j]
        for slot in (1, 2, 3):
            assert min(np.abs(bank[c, slot] - d).max() for d in diffs) < 1e-6  # bank is float32


def test_generate_scales_only_discriminative_dims_and_shifts_from_memory():
    x, y = random_batch(2, batch=8, dim=D, classes=C, normalize=False)
    state = das_update(das_init(C, D), x, y, jax.random.key(0), num_scale=2)
    # no memory, no scaling range -> the anchors themselves
    empty = das_init(C, D)._replace(frequency=state.frequency)
    out, lab = das_generate(empty, x, y, jax.random.key(1), num_produce=2, num_scale=2, scale_range=(1.0, 1.0),
                            normalize=False)
    np.testing.assert_allclose(out, np.concatenate([x, x]), rtol=1e-12)
    np.testing.assert_array_equal(lab, np.concatenate([y, y]))
    out, _ = das_generate(empty, x, y, jax.random.key(1), num_produce=1, num_scale=2, normalize=False)
    freq = np.asarray(state.frequency)
    for i in range(len(y)):
        top = set(np.argsort(-freq[y[i]], kind="stable")[:2])
        ratio = np.asarray(out)[i] / x[i]
        for dim in range(D):
            if dim in top:
                assert 0.5 <= ratio[dim] < 2.0
            else:
                assert abs(ratio[dim] - 1) < 1e-12
    # with memory and unit scales: the shift is shift_scale times a stored transformation of the class
    out, _ = das_generate(state, x, y, jax.random.key(2), num_scale=2, scale_range=(1.0, 1.0), shift_scale=0.5,
                          normalize=False, num_produce=1)
    bank = np.asarray(state.bank)
    for i in range(len(y)):
        shift = (np.asarray(out)[i] - x[i]) / 0.5
        assert min(np.abs(shift - bank[y[i], s]).max() for s in range(int(state.bank_count[y[i]]))) < 1e-9


def test_deterministic_jit_shapes_and_gradients():
    x, y = random_batch(3, batch=8, dim=D, classes=C)
    state = das_update(das_init(C, D), x, y, jax.random.key(0))
    f = functools.partial(das_augment, num_produce=3)
    ex, ey = f(state, x, y, jax.random.key(4))
    assert ex.shape == (32, D) and ey.shape == (32,)
    ex2, _ = jax.jit(f)(state, x, y, jax.random.key(4))
    np.testing.assert_allclose(ex, ex2, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(ex[8:], axis=1), 1.0, rtol=1e-9)
    # detach=False lets the loss reach the anchors through the produced embeddings; finite
    g = jax.grad(lambda z: jnp.sum(das_generate(state, z, y, jax.random.key(0), detach=False)[0] ** 2))(x)
    assert np.isfinite(g).all() and np.abs(g).sum() > 0
    g = jax.grad(lambda z: jnp.sum(das_generate(state, z, y, jax.random.key(0))[0]))(x)
    np.testing.assert_array_equal(g, 0.0)
    # zero embeddings and a single class stay finite
    z = np.zeros((4, D))
    s2 = das_update(das_init(C, D), z, np.zeros(4, np.int32), jax.random.key(0))
    assert np.isfinite(np.asarray(das_generate(s2, z, np.zeros(4, np.int32), jax.random.key(0))[0])).all()


def test_padding_and_out_of_range_labels_are_ignored():
    x, y = random_batch(4, batch=8, dim=D, classes=C)
    valid = np.arange(8) < 6
    s_pad = das_update(das_init(C, D), x, y, jax.random.key(0), valid=valid)
    s_cut = das_update(das_init(C, D), x[:6], y[:6], jax.random.key(0))
    np.testing.assert_array_equal(s_pad.frequency, s_cut.frequency)
    y_bad = y.copy()
    y_bad[0] = C + 3
    s_bad = das_update(das_init(C, D), x, y_bad, jax.random.key(0))
    assert np.asarray(s_bad.frequency).sum() == 7 * 4


def test_bf16_is_computed_in_float32():
    x, y = random_batch(5, batch=8, dim=D, classes=C)
    xb = jnp.asarray(x, jnp.bfloat16)
    state = das_update(das_init(C, D), xb, y, jax.random.key(0))
    out, _ = das_generate(state, xb, y, jax.random.key(1))
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_bad_input():
    x, y = random_batch(0, batch=6, dim=D, classes=2)
    state = das_init(C, D)
    with pytest.raises(ValueError, match="^embeddings must have dim"):
        das_update(state, x[:, :3], y, jax.random.key(0))
    with pytest.raises(ValueError, match="^num_scale"):
        das_update(state, x, y, jax.random.key(0), num_scale=D + 1)
    with pytest.raises(ValueError, match="^state"):
        das_generate((1, 2), x, y, jax.random.key(0))
    with pytest.raises(ValueError, match="^num_produce"):
        das_generate(state, x, y, jax.random.key(0), num_produce=0)
    with pytest.raises(ValueError, match="^labels"):
        das_generate(state, x, y.astype(float), jax.random.key(0))
    with pytest.raises(ValueError, match="^bank_size"):
        das_init(C, D, bank_size=0)
