"""Subset miners: choose a static-size sub-batch of the batch (PML ``MaximumLossMiner``).

PyTorch Metric Learning's ``MaximumLossMiner`` (a ``BaseSubsetBatchMiner``, pytorch-metric-learning
<= 1.7; removed in 2.0) draws ``num_trials`` random subsets of ``output_batch_size`` items without
replacement, evaluates the loss (after an optional inner miner) on each and returns the indices of
the subset with the largest loss. Here the subsets come from an explicit PRNG key, their size is
static, and the trials run in one ``jax.vmap``, so the miner jits once and never syncs with the host.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dmljax._validation import check_positive_int, check_embeddings, check_key, check_labels, check_valid

__all__ = ["MaximumLossSubset", "maximum_loss_miner", "random_subsets"]


class MaximumLossSubset(NamedTuple):
    """Result of `maximum_loss_miner`.

    indices: int32 [S] rows of the batch in the chosen (max-loss) subset, distinct.
    mask: bool [B], True for the chosen rows.
    losses: [T] the loss of every trial (no gradient); ``losses[best]`` is the maximum.
    best: int32 scalar, the chosen trial.
    """

    indices: jax.Array
    mask: jax.Array
    losses: jax.Array
    best: jax.Array


def random_subsets(
    key: jax.Array, batch_size: int, *, subset_size: int, num_trials: int, valid: jax.Array | None = None
) -> jax.Array:
    """int32 [T, S] uniformly random subsets of ``range(batch_size)`` without replacement.

    Each row is the top-S of i.i.d. uniform scores (a uniformly random S-subset in random order).
    With ``valid`` [B], padding rows score below every valid row: they are drawn only when fewer
    than S rows are valid.
    """
    key = check_key(key)
    subset_size = check_positive_int(subset_size, name="subset_size")
    num_trials = check_positive_int(num_trials, name="num_trials")
    if subset_size > batch_size:
        raise ValueError(f"subset_size must be <= the batch size {batch_size}, got {subset_size}")
    scores = jax.random.uniform(key, (num_trials, batch_size))
    if valid is not None:
        scores = jnp.where(valid[None, :], scores, scores - 2.0)
    return jax.lax.top_k(scores, subset_size)[1].astype(jnp.int32)


def maximum_loss_miner(
    embeddings: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    loss_fn: Callable[..., jax.Array],
    subset_size: int,
    num_trials: int = 5,
    valid: jax.Array | None = None,
) -> MaximumLossSubset:
    """Of ``num_trials`` random subsets of ``subset_size`` rows, the one with the largest loss.

    PML ``MaximumLossMiner(loss, miner=None, num_trials=5, output_batch_size=S)``: for t = 1..T,
    draw a subset I_t of S distinct rows (uniform, without replacement) and evaluate
    ``L_t = loss_fn(embeddings[I_t], labels[I_t])``; return ``I_{argmax_t L_t}``. An inner miner is
    part of ``loss_fn`` here (e.g. ``functools.partial(triplet_margin_loss, mining="batch_hard")``).
    Ties go to the lowest trial. The selection carries no gradient (PML returns indices): train
    on ``loss_fn(embeddings[r.indices], labels[r.indices])`` with the returned indices.

    Shapes are static (S, T are Python ints), the T evaluations run under one ``jax.vmap``:
    memory is T times that of ``loss_fn`` at batch S (O(T S^2) for the library's losses).

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer class ids.
      key: PRNG key for the subsets.
      loss_fn: ``loss_fn(embeddings [S, D], labels [S]) -> scalar`` (``valid=[S] bool`` is also
        passed when ``valid`` is given, so it must then accept it, as the library's losses do).
      subset_size: S, 1 <= S <= B.
      num_trials: T >= 1 (PML's default 5).
      valid: optional bool [B]; padding rows are drawn only when fewer than S rows are valid.
    Returns:
      `MaximumLossSubset` (indices [S], mask [B], losses [T], best).
    """
    x = check_embeddings(embeddings)
    b = x.shape[0]
    labels = check_labels(labels, batch_size=b)
    valid = check_valid(valid, batch_size=b)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
    subsets = random_subsets(key, b, subset_size=subset_size, num_trials=num_trials, valid=valid)
    xs = jax.lax.stop_gradient(x)

    def trial(idx):
        if valid is None:
            value = loss_fn(xs[idx], labels[idx])
        else:
            value = loss_fn(xs[idx], labels[idx], valid=valid[idx])
        if jnp.shape(value) != ():
            raise ValueError(f"loss_fn must return a scalar, got shape {jnp.shape(value)}")
        return value

    losses = jax.lax.stop_gradient(jax.vmap(trial)(subsets))
    best = jnp.argmax(losses).astype(jnp.int32)
    indices = subsets[best]
    mask = jnp.zeros((b,), bool).at[indices].set(True)
    return MaximumLossSubset(indices, mask, losses, best)
