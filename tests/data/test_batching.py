"""Static-shape padded batching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmljax.data.batching import iterate_padded, pad_batch


def test_pad_batch():
    x = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
    y = np.array([4, 5, 6], np.int32)
    (px, py), valid = pad_batch(x, y, batch_size=5)
    assert px.shape == (5, 2) and px.dtype == np.float32 and py.dtype == np.int32
    np.testing.assert_array_equal(px[:3], x)
    np.testing.assert_array_equal(px[3:], 0)
    np.testing.assert_array_equal(valid, [True, True, True, False, False])


@given(n=st.integers(0, 23), batch_size=st.integers(1, 7))
def test_property_iterate_padded_round_trip(n, batch_size):
    x = np.random.default_rng(n).normal(size=(n, 3))
    labels = np.arange(n, dtype=np.int32)
    batches = list(iterate_padded(x, labels, batch_size=batch_size))
    assert len(batches) == -(-n // batch_size)
    assert all(bx.shape == (batch_size, 3) and v.shape == (batch_size,) for (bx, _), v in batches)
    if n:
        np.testing.assert_array_equal(np.concatenate([bx[v] for (bx, _), v in batches]), x)
        np.testing.assert_array_equal(np.concatenate([by[v] for (_, by), v in batches]), labels)
        # only the last batch has padding
        assert all(v.all() for _, v in batches[:-1])


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: pad_batch(np.zeros(3), batch_size=0), "batch_size"),
        (lambda: pad_batch(np.zeros(3), batch_size=2), "batch_size"),
        (lambda: pad_batch(np.zeros(3), np.zeros(2), batch_size=4), "arrays"),
        (lambda: pad_batch(batch_size=4), "arrays"),
        (lambda: next(iterate_padded(np.zeros(3), np.zeros(2), batch_size=4)), "arrays"),
    ],
)
def test_bad_arguments(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call()
