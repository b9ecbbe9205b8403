"""Shared test helpers: random batches, degenerate batches, finite-difference gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_batch(seed: int = 0, *, batch: int = 12, dim: int = 5, classes: int = 4, normalize=True):
    """(embeddings float64 [B, D], labels int32 [B]) with every class present at least twice."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim))
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.arange(batch) % classes
    rng.shuffle(labels)
    return x, labels.astype(np.int32)


def degenerate_batches(*, batch: int = 6, dim: int = 4):
    """Named (embeddings, labels) pairs every loss must survive with finite loss and gradient."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    same = np.tile(x[:1], (batch, 1))
    return {
        "single_class": (x, np.zeros(batch, np.int32)),
        "no_positives": (x, np.arange(batch, dtype=np.int32)),
        "identical_embeddings": (same, (np.arange(batch) % 2).astype(np.int32)),
        "zero_embeddings": (np.zeros((batch, dim)), (np.arange(batch) % 2).astype(np.int32)),
        "one_item": (x[:1], np.zeros(1, np.int32)),
    }


def numerical_grad(f, x: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of scalar f at x (float64)."""
    # a private copy: JAX on CPU may alias numpy buffers, so perturbing the caller's array
    # in place could race with a computation still reading it
    x = np.array(x, dtype=np.float64, copy=True)
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gflat = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = float(f(x))
        flat[i] = old - eps
        fm = float(f(x))
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def assert_finite_loss_and_grad(loss_fn, embeddings, labels, **kwargs):
    """loss_fn(embeddings, labels, **kwargs) and its gradient w.r.t. embeddings are finite."""
    e = jnp.asarray(embeddings)
    value, grad = jax.value_and_grad(lambda z: loss_fn(z, jnp.asarray(labels), **kwargs))(e)
    assert np.isfinite(np.asarray(value)).all(), f"loss not finite: {value}"
    assert np.isfinite(np.asarray(grad)).all(), "gradient not finite"
    return value, grad


def assert_jit_matches(loss_fn, *args, rtol=1e-10, **kwargs):
    """The jitted function gives the same value as the eager one."""
    import functools

    eager = loss_fn(*args, **kwargs)
    jitted = jax.jit(functools.partial(loss_fn, **kwargs))(*args)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=rtol, atol=1e-12)
    return eager


def max_tree_diff(a, b) -> float:
    """Largest absolute difference between the leaves of two pytrees of the same structure."""
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class Interrupted(Exception):
    """Raised by `fit_with_interrupt`'s callback to kill a run mid-way."""


def fit_with_interrupt(directory, state, *, stop_after: int | None = None, resume: bool = False,
                       save_every: int = 2, **fit_kwargs):
    """`dmljax.train.loop.fit` with an orbax checkpointer in ``directory`` (every ``save_every``
    steps), raising `Interrupted` after step ``stop_after`` (a killed run); returns the final state."""
    from dmljax.train.checkpoint import Checkpointer
    from dmljax.train.loop import fit

    def stopper(s, record):
        if stop_after is not None and int(s.step) == stop_after:
            raise Interrupted
    ckpt = Checkpointer(directory, save_every=save_every, best_metric=None)
    try:
        return fit(state, checkpointer=ckpt, resume=resume, callbacks=[stopper], **fit_kwargs)[0]
    finally:
        ckpt.wait()
        ckpt.close()
