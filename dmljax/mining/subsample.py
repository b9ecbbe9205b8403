"""Random per-anchor subsampling of mined tuples with static shapes (PML ``tuples_per_anchor`` /
``triplets_per_anchor``).

Miners here return masks or weights over the [B, M] anchor x reference matrix (pairs, or
triplets in the (a, p) -> n form of `dmljax.mining.miners.semihard_negatives`). Large batches
mine many tuples per anchor; keeping a random few per anchor bounds the loss's work and evens out
the anchors' influence. Both functions take an explicit PRNG key, never change shapes (a dropped
tuple gets weight 0), and jit once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_key

__all__ = ["SampledTriplets", "triplets_per_anchor", "tuples_per_anchor"]


def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _check_rows(x, name):
    shape = np.shape(x)
    if len(shape) != 2:
        raise ValueError(f"{name} must have rank 2 [anchors, references], got shape {shape}")
    return jnp.asarray(x)


def tuples_per_anchor(key: jax.Array, weights: jax.Array, *, k: int) -> jax.Array:
    """Keep a uniformly random subset of at most ``k`` selected entries in every row.

    ``weights`` [B, M] is any miner's output over anchors x references: a bool mask (pairs,
    e.g. ``positive & (dist < margin)``), real weights (multi-similarity, distance-weighted), or
    the [B, M] ``valid`` mask of a triplet-form miner (one negative per (a, p) pair). An entry is
    selected when it is non-zero. Per row, the selected entries are ranked by i.i.d. uniform
    scores and the top ``min(k, count)`` are kept: a uniformly random ``k``-subset without
    replacement (all of them when the row has at most ``k``). Kept entries keep their value;
    the others become 0 (False). Same shape and dtype as ``weights``.

    Args:
      key: PRNG key (the same key gives the same subset).
      weights: [B, M] bool / int / float.
      k: positive int, the most entries kept per row (static).
    Returns:
      [B, M] like ``weights``.
    Raises:
      ValueError: ``weights`` not rank 2, ``k`` not a positive int, ``key`` not a key.
    """
    key = check_key(key)
    k = _check_k(k)
    w = _check_rows(weights, "weights")
    b, m = w.shape
    if k >= m:
        return w
    selected = w != 0
    scores = jnp.where(selected, jax.random.uniform(key, (b, m)), -1.0)
    top, idx = jax.lax.top_k(scores, k)
    keep = jnp.zeros((b, m), bool).at[jnp.arange(b)[:, None], idx].set(top >= 0.0)
    return jnp.where(keep, w, jnp.zeros((), w.dtype))


class SampledTriplets(NamedTuple):
    """Result of `triplets_per_anchor`: ``k`` triplets (a, positive_index[a, t], negative_index[a, t]).

    positive_index, negative_index: int32 [B, k] columns of the reference set.
    valid: bool [B, k], False for anchors without a positive or a negative (indices are 0 there).
    """

    positive_index: jax.Array
    negative_index: jax.Array
    valid: jax.Array


def _sample_columns(key, mask, k, probs=None):
    """k columns per row drawn with replacement from the row's non-zero entries (uniform or probs)."""
    if probs is None:
        logits = jnp.where(mask, 0.0, -jnp.inf)
    else:
        logits = jnp.where(mask & (probs > 0), jnp.log(jnp.where(mask & (probs > 0), probs, 1.0)), -jnp.inf)
    any_set = jnp.any(jnp.isfinite(logits), axis=1, keepdims=True)
    logits = jnp.where(any_set, logits, 0.0)
    idx = jax.random.categorical(key, logits[:, None, :], axis=-1, shape=(mask.shape[0], k))
    return idx.astype(jnp.int32), any_set[:, 0]


def triplets_per_anchor(
    key: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    k: int,
    negative_weights: jax.Array | None = None,
) -> SampledTriplets:
    """``k`` random triplets per anchor, PML's ``triplets_per_anchor=k`` (``get_random_triplet_indices``).

    For every anchor with at least one positive and one negative: ``k`` positives drawn uniformly
    *with replacement* from its positives and, independently, ``k`` negatives drawn uniformly from
    its negatives (or proportional to ``negative_weights``, PML's ``weights`` argument, e.g. the
    distance-weighted probabilities). Static shapes [B, k]; O(B M) memory, never the B x M x M
    triplet tensor. Use ``jnp.take_along_axis(dist, index, axis=1)`` to read the distances.

    Args:
      key: PRNG key. positive, negative: bool [B, M] (`dmljax.masks.label_masks`).
      k: positive int (static). negative_weights: optional [B, M] >= 0; an anchor whose weights
        on its negatives are all 0 gets no triplet (as in PML).
    Returns:
      `SampledTriplets`.
    """
    key = check_key(key)
    k = _check_k(k)
    positive = _check_rows(positive, "positive").astype(bool)
    negative = _check_rows(negative, "negative").astype(bool)
    if positive.shape != negative.shape:
        raise ValueError(f"negative must have the shape of positive {positive.shape}, got {negative.shape}")
    if negative_weights is not None:
        negative_weights = _check_rows(negative_weights, "negative_weights")
        if negative_weights.shape != negative.shape:
            raise ValueError(f"negative_weights must have shape {negative.shape}, got {negative_weights.shape}")
    key_p, key_n = jax.random.split(key)
    p_idx, has_p = _sample_columns(key_p, positive, k)
    n_idx, has_n = _sample_columns(key_n, negative, k, negative_weights)
    valid = jnp.broadcast_to((has_p & has_n)[:, None], p_idx.shape)
    return SampledTriplets(jnp.where(valid, p_idx, 0), jnp.where(valid, n_idx, 0), valid)
