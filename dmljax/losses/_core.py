"""The core under every pair-based loss: queries x references -> matrix, masks, weights.

`pair_set(embeddings, labels, ref_embeddings, ref_labels, metric=..., valid=...,
ref_valid=..., pair_weights=..., sample_weights=...)` returns a `PairSet`:

* ``matrix`` [B, M]: the ``metric`` between every query (anchor) row and every reference
  row (`dmljax.distances.pairwise`). Without a reference set the references are the batch
  itself (M = B, the "self form").
* ``positive`` / ``negative`` bool [B, M]: same / different label, both rows valid; the
  self-pair (i, i) is excluded only in the self form (PML's rule: a separate reference set,
  e.g. a memory holding a copy of the batch, excludes nothing by itself).
* ``pos_weight`` / ``neg_weight`` float [B, M]: the pair weights (1 on every positive /
  negative pair by default, 0 elsewhere), from ``pair_weights``: the output of any miner in
  `dmljax.mining` -- a bool or real [B, M] array (applied to both masks), a
  ``(positive, negative)`` pair of [B, M] arrays (`pair_margin`, `multi_similarity_mining`,
  ``(positive, distance_weighted_sampling(...))``), or an object with ``positive_weights`` /
  ``negative_weights`` (`batch_hard`, `batch_easy_hard`). A pair with weight 0 leaves the
  masks; real weights multiply the pair's term.
* ``anchor_weight`` [B]: ``valid`` (0 on padded rows) times ``sample_weights``; kept apart
  from the pair weights (a loss that reduces over pairs multiplies them; one with a
  log-sum-exp per anchor uses the pair weights inside and the anchor weight outside).

Padded rows (``valid`` / ``ref_valid`` False) are set to 0 BEFORE the matrix product and
leave every mask, so NaN / inf in a padded row never reaches the value or the gradient of a
real row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import distances
from dmljax._validation import check_choice, check_embeddings, check_labels, check_valid
from dmljax.masks import label_masks
from dmljax.reductions import reduce_loss

__all__ = ["LOSS_REDUCTIONS", "MINING_RENAMES", "check_mining", "check_sample_weights", "PairSet", "check_loss_reduction", "pair_set", "reduce_per_anchor", "row_sum"]

# The reductions every loss accepts (see dmljax.losses): "none" is one value per anchor [B].
LOSS_REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")


def check_loss_reduction(reduction, allowed=LOSS_REDUCTIONS):
    """ValueError naming ``reduction``; "threshold" points at `dmljax.reductions.reduce_loss`."""
    if reduction == "threshold":
        raise ValueError(
            "reduction='threshold' is not a loss option: take reduction='none' (one value per "
            "anchor) and apply dmljax.reductions.reduce_loss(values, reduction='threshold', "
            "low=..., high=...)")
    return check_choice(reduction, name="reduction", choices=tuple(allowed))


# Mining names shared by every loss (dmljax.losses, "Vocabulary"); old spellings -> new ones.
MINING_RENAMES = {"semi-hard": "semihard", "semi_hard": "semihard", "batch-hard": "batch_hard",
                  "batchhard": "batch_hard"}


def check_mining(value, choices, *, name: str = "mining", renames=None):
    """An option among ``choices`` (mining names, or any renamed option such as a metric);
    ValueError naming ``name``; an old spelling names the new one."""
    table = dict(MINING_RENAMES, **(renames or {}))
    if isinstance(value, str) and value not in choices and table.get(value) in choices:
        raise ValueError(f"{name}={value!r} is now spelled {table[value]!r}")
    return check_choice(value, name=name, choices=tuple(choices))


class PairSet(NamedTuple):
    """Queries x references: see the module docstring. ``similarity`` / ``self_form`` are static."""

    matrix: jax.Array
    positive: jax.Array
    negative: jax.Array
    pos_weight: jax.Array
    neg_weight: jax.Array
    anchor_weight: jax.Array
    similarity: bool
    self_form: bool


def _mask_rows(x, valid):
    if valid is None:
        return x
    return jnp.where(valid[:, None], x, 0.0)


def _split_pair_weights(pair_weights):
    if pair_weights is None:
        return None, None
    if hasattr(pair_weights, "positive_weights") and hasattr(pair_weights, "negative_weights"):
        return pair_weights.positive_weights, pair_weights.negative_weights
    if isinstance(pair_weights, (tuple, list)):
        if len(pair_weights) != 2:
            raise ValueError("pair_weights must be a [B, M] array, a (positive, negative) pair of "
                             f"[B, M] arrays or a miner result, got a sequence of {len(pair_weights)}")
        return pair_weights[0], pair_weights[1]
    return pair_weights, pair_weights


def _check_weight_matrix(w, shape, name):
    if w is None:
        return None
    if tuple(np.shape(w)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (queries x references), got {tuple(np.shape(w))}")
    dtype = jnp.result_type(w)
    if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.floating)
            or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{name} must be bool or real weights, got dtype {dtype}")
    return jax.lax.stop_gradient(jnp.asarray(w))


def check_sample_weights(sample_weights, batch_size):
    """None or a real [B] array (no gradient), ValueError naming ``sample_weights``."""
    if sample_weights is None:
        return None
    if tuple(np.shape(sample_weights)) != (batch_size,):
        raise ValueError(f"sample_weights must have shape ({batch_size},), got {tuple(np.shape(sample_weights))}")
    dtype = jnp.result_type(sample_weights)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
            or jnp.issubdtype(dtype, jnp.bool_)):
        raise ValueError(f"sample_weights must be real, got dtype {dtype}")
    return jax.lax.stop_gradient(jnp.asarray(sample_weights))


def pair_set(
    embeddings,
    labels,
    ref_embeddings=None,
    ref_labels=None,
    *,
    metric: str = "euclidean",
    valid=None,
    ref_valid=None,
    pair_weights=None,
    sample_weights=None,
    normalize: bool = False,
) -> PairSet:
    """Validate the inputs and build the `PairSet` (module docstring). ``normalize``: L2-normalise
    both sides first (losses whose formula assumes unit vectors)."""
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    check_choice(metric, name="metric", choices=tuple(distances.METRICS))
    self_form = ref_embeddings is None
    if self_form:
        if ref_labels is not None:
            raise ValueError("ref_labels needs ref_embeddings (the reference set); got ref_labels only")
        if ref_valid is not None:
            raise ValueError("ref_valid needs ref_embeddings; in the self form pass only valid")
        y, y_labels, y_valid = None, None, None
    else:
        if ref_labels is None:
            raise ValueError("ref_embeddings needs ref_labels (one label per reference row)")
        y = check_embeddings(ref_embeddings, name="ref_embeddings")
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"ref_embeddings must have feature dim {x.shape[1]} like embeddings, got {y.shape}")
        y_labels = check_labels(ref_labels, batch_size=y.shape[0], name="ref_labels")
        y_valid = check_valid(ref_valid, batch_size=y.shape[0], name="ref_valid")
        dtype = jnp.promote_types(x.dtype, y.dtype)
        x, y = x.astype(dtype), y.astype(dtype)
    x = _mask_rows(x, valid)
    if not self_form:
        y = _mask_rows(y, y_valid)
    if normalize:
        x = distances.l2_normalize(x)
        y = None if self_form else distances.l2_normalize(y)
    matrix = distances.pairwise(x, y, metric=metric)
    positive, negative = label_masks(labels, y_labels, valid=valid, ref_valid=y_valid)
    dtype = matrix.dtype
    pos_w, neg_w = _split_pair_weights(pair_weights)
    pos_w = _check_weight_matrix(pos_w, matrix.shape, "pair_weights")
    neg_w = _check_weight_matrix(neg_w, matrix.shape, "pair_weights")
    if pos_w is not None:
        positive = positive & (pos_w != 0)
        negative = negative & (neg_w != 0)
        pos_weight = jnp.where(positive, pos_w.astype(dtype), 0.0)
        neg_weight = jnp.where(negative, neg_w.astype(dtype), 0.0)
    else:
        pos_weight = positive.astype(dtype)
        neg_weight = negative.astype(dtype)
    anchor_weight = jnp.ones((x.shape[0],), dtype) if valid is None else valid.astype(dtype)
    sample_weights = check_sample_weights(sample_weights, x.shape[0])
    if sample_weights is not None:
        anchor_weight = anchor_weight * sample_weights.astype(dtype)
    return PairSet(matrix, positive, negative, pos_weight, neg_weight, anchor_weight,
                   distances.is_similarity(metric), self_form)


def row_sum(values, weights):
    """Per-anchor sum ``sum_j w_ij v_ij`` [B]; entries with w = 0 never reach it (even NaN)."""
    return jnp.sum(jnp.where(weights != 0, values * weights, 0.0), axis=1)


def reduce_per_anchor(values, anchor_weight, reduction):
    """Reduce per-anchor values [B] with the anchor weights; "none" gives ``w_i * values_i`` [B]."""
    return reduce_loss(values, anchor_weight, reduction=reduction)
