"""Online (in-batch) miners with static-shape outputs.

Every miner works on a precomputed pairwise matrix ``dist`` of shape [B, M] (the
self form has M = B; a reference set such as a cross-batch memory has M != B) and
the bool ``positive`` / ``negative`` masks [B, M] from `dmljax.masks.label_masks`.
Miners return masks, one-hot weight matrices or index matrices of fixed shape,
never index lists whose length depends on the data, so ``jax.jit`` compiles once.

Padding ("valid" story): the masks from ``label_masks(labels, valid=valid)``
already exclude padded rows and columns, so a padded item is never a positive,
a negative or (having neither) a valid anchor. Miners need no separate
``valid`` argument.

Direction: with ``similarity=False`` (default) smaller ``dist`` means closer
(euclidean, squared euclidean). With ``similarity=True`` (cosine, dot) larger
means closer; internally the miners work on ``-dist``, so every margin keeps its
meaning as "how much closer the positive must be than the negative".

Memory is O(B M): the triplet miners sort each anchor's negative distances once
and locate thresholds with ``jnp.searchsorted`` (the trick of DESIGN.md), never
building a [B, M, M] tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._numerics import SortedNegatives, searchsorted_rows, sort_negatives, window_hinge
from dmljax._validation import check_bool, check_choice, check_matrix, check_scalar

__all__ = [
    "BatchHard",
    "SemihardNegatives",
    "SortedNegatives",
    "TripletStats",
    "batch_hard",
    "hard_negatives",
    "pair_margin",
    "semihard_negatives",
    "sort_negatives",
    "triplet_margin_stats",
    "window_hinge",
]


# --------------------------------------------------------------------------- checks


def _check_inputs(dist, positive, negative, similarity):
    """Validate the [B, M] matrix and its two bool masks; return distance-like dist."""
    dist = check_matrix(dist, name="dist", shape=(None, None))
    for name, mask in (("positive", positive), ("negative", negative)):
        if tuple(np.shape(mask)) != tuple(dist.shape):
            raise ValueError(f"{name} must have the shape of dist {tuple(dist.shape)}, got {tuple(np.shape(mask))}")
        if jnp.result_type(mask) != jnp.bool_:
            raise ValueError(f"{name} must be a bool mask (see dmljax.masks.label_masks), got dtype {jnp.result_type(mask)}")
    similarity = check_bool(similarity, name="similarity")
    # Larger similarity = closer; negating turns it into a distance-like quantity
    # whose differences d_ap - d_an equal s_an - s_ap, as in PML's inverted distances.
    d = -dist if similarity else dist
    return d, jnp.asarray(positive), jnp.asarray(negative)


# --------------------------------------------------------------------------- batch hard


class BatchHard(NamedTuple):
    """Batch-hard mining result.

    - positive_weights: [B, M] one-hot rows selecting the hardest (farthest) positive.
    - negative_weights: [B, M] one-hot rows selecting the hardest (closest) negative.
    - valid: [B] bool, the anchor has at least one positive and one negative; rows of
      invalid anchors are all zero in both weight matrices.
    """

    positive_weights: jax.Array
    negative_weights: jax.Array
    valid: jax.Array


def batch_hard(dist, positive, negative, *, similarity: bool = False) -> BatchHard:
    """Hardest positive and hardest negative per anchor (Hermans et al. 2017, arXiv 1703.07737).

    For anchor a: p*(a) = argmax_{p in P(a)} d(a, p), n*(a) = argmin_{n in N(a)} d(a, n)
    (argmin/argmax of the similarity when ``similarity=True``). Ties go to the lowest index.
    Selections are one-hot weights, so ``sum(w * dist, axis=1)`` gives the selected
    distances with the gradient of the selected entry (the max/min subgradient).

    Args:
      dist: [B, M] distances (or similarities with ``similarity=True``).
      positive, negative: bool [B, M] masks from `dmljax.masks.label_masks`.
      similarity: larger ``dist`` means closer.
    Returns:
      `BatchHard` (positive_weights [B, M], negative_weights [B, M], valid [B]).
    """
    d, positive, negative = _check_inputs(dist, positive, negative, similarity)
    d = jax.lax.stop_gradient(d)  # selection only; gradients flow through the weights' use
    m = d.shape[1]
    has_pos = jnp.any(positive, axis=1)
    has_neg = jnp.any(negative, axis=1)
    hardest_pos = jnp.argmax(jnp.where(positive, d, -jnp.inf), axis=1)
    hardest_neg = jnp.argmin(jnp.where(negative, d, jnp.inf), axis=1)
    valid = has_pos & has_neg
    pos_w = jax.nn.one_hot(hardest_pos, m, dtype=d.dtype) * valid[:, None]
    neg_w = jax.nn.one_hot(hardest_neg, m, dtype=d.dtype) * valid[:, None]
    return BatchHard(pos_w, neg_w, valid)


# --------------------------------------------------------------------------- sorted negatives


# --------------------------------------------------------------------------- semi-hard


class SemihardNegatives(NamedTuple):
    """Semi-hard negative per (anchor, positive) pair.

    index: [B, M] int32, column of the chosen negative for pair (a, p) (0 where not valid).
    valid: [B, M] bool, (a, p) is a positive pair and a negative was chosen for it.
    """

    index: jax.Array
    valid: jax.Array


SEMIHARD_FALLBACKS = ("none", "tfa", "hardest")


def semihard_negatives(
    dist, positive, negative, *, margin: float, similarity: bool = False, fallback: str = "none"
) -> SemihardNegatives:
    """FaceNet semi-hard negative for every (anchor, positive) pair (Schroff et al. 2015, 1503.03832).

    A negative n of anchor a is semi-hard for the positive p when
    ``d(a, p) < d(a, n) < d(a, p) + margin``: farther than the positive but still inside the
    margin. FaceNet picks such negatives; here the closest one is chosen (the hardest
    semi-hard negative, as TF-Addons ``triplet_semihard_loss`` does).

    When no semi-hard negative exists, ``fallback`` decides (the choice is documented because
    implementations differ):

      - "none" (default, the FaceNet definition): the pair gets no negative (valid False).
      - "tfa": TF-Addons behaviour: the closest negative farther than d(a, p) even beyond the
        margin (its hinge is 0), else (all negatives closer than the positive) the farthest
        negative; every positive pair of an anchor with negatives is valid.
      - "hardest": the hardest negative, argmin_n d(a, n).

    Each anchor's negative distances are sorted once and every positive's threshold is found
    by ``searchsorted``: O(B M) memory.

    Args:
      dist: [B, M] distances (similarities with ``similarity=True``).
      positive, negative: bool [B, M] masks.
      margin: >= 0, the triplet margin (FaceNet used 0.2 on unit-norm embeddings).
      similarity: larger ``dist`` means closer.
      fallback: "none" | "tfa" | "hardest".
    Returns:
      `SemihardNegatives` (index [B, M] int32, valid [B, M] bool).
    """
    d, positive, negative = _check_inputs(dist, positive, negative, similarity)
    check_scalar(margin, name="margin", min_value=0.0)
    check_choice(fallback, name="fallback", choices=SEMIHARD_FALLBACKS)
    d = jax.lax.stop_gradient(d)
    m = d.shape[1]
    sn = sort_negatives(d, negative)
    first_above = searchsorted_rows(sn.keys, d, side="right")  # first negative with d_an > d_ap
    has_above = first_above < sn.count[:, None]
    above_pos = jnp.minimum(first_above, m - 1)
    above_key = jnp.take_along_axis(sn.keys, above_pos, axis=1)
    is_semihard = has_above & (above_key < d + margin)
    above_index = jnp.take_along_axis(sn.order, above_pos, axis=1)
    has_neg = (sn.count > 0)[:, None]
    if fallback == "none":
        index = jnp.where(is_semihard, above_index, 0)
        valid = positive & is_semihard
    elif fallback == "tfa":
        farthest = sn.order[jnp.arange(d.shape[0]), jnp.maximum(sn.count - 1, 0)]
        index = jnp.where(has_above, above_index, farthest[:, None])
        valid = positive & has_neg
    else:  # "hardest"
        index = jnp.where(is_semihard, above_index, sn.order[:, :1])
        valid = positive & has_neg
    index = jnp.where(valid, index, 0).astype(jnp.int32)
    return SemihardNegatives(index, valid)


# --------------------------------------------------------------------------- hard negatives


HARD_NEGATIVE_MODES = ("any", "all")


def hard_negatives(
    dist, positive, negative, *, margin: float, similarity: bool = False, mode: str = "any"
) -> jax.Array:
    """Bool [B, M] mask of negatives that violate the margin for the anchor's positives.

    - mode "any": n is hard for a when ``d(a, n) < d(a, p) + margin`` for at least one positive p,
      i.e. w.r.t. the hardest positive: ``d(a, n) < max_p d(a, p) + margin`` (the negatives that
      make at least one triplet (a, p, n) active; Schroff et al. 2015's hard negatives with a margin).
    - mode "all": violates it for every positive: ``d(a, n) < min_p d(a, p) + margin``.

    Anchors without positives have no hard negatives. Cost O(B M).
    """
    d, positive, negative = _check_inputs(dist, positive, negative, similarity)
    check_scalar(margin, name="margin", min_value=0.0)
    check_choice(mode, name="mode", choices=HARD_NEGATIVE_MODES)
    d = jax.lax.stop_gradient(d)
    if mode == "any":
        ref = jnp.max(jnp.where(positive, d, -jnp.inf), axis=1, keepdims=True)
    else:
        ref = jnp.min(jnp.where(positive, d, jnp.inf), axis=1, keepdims=True)
    has_pos = jnp.any(positive, axis=1, keepdims=True)
    return negative & has_pos & (d < ref + margin)


# --------------------------------------------------------------------------- pair margin


def pair_margin(
    dist, positive, negative, *, pos_margin: float = 0.2, neg_margin: float = 0.8, similarity: bool = False
) -> tuple[jax.Array, jax.Array]:
    """PML ``PairMarginMiner`` semantics: the pairs that violate their margins.

    Distances: positive pairs with ``d > pos_margin`` and negative pairs with ``d < neg_margin``.
    Similarities: positive pairs with ``s < pos_margin`` and negative pairs with ``s > neg_margin``.
    Defaults are PML's (pos_margin=0.2, neg_margin=0.8). Returns (hard_positive, hard_negative)
    bool [B, M] masks.
    """
    _check_inputs(dist, positive, negative, similarity)
    check_scalar(pos_margin, name="pos_margin")
    check_scalar(neg_margin, name="neg_margin")
    if not similarity:
        check_scalar(pos_margin, name="pos_margin", min_value=0.0)
        check_scalar(neg_margin, name="neg_margin", min_value=0.0)
    s = jax.lax.stop_gradient(jnp.asarray(dist))
    if similarity:
        return positive & (s < pos_margin), negative & (s > neg_margin)
    return positive & (s > pos_margin), negative & (s < neg_margin)


# --------------------------------------------------------------------------- statistics


class TripletStats(NamedTuple):
    """Training diagnostics (DESIGN.md: a loss equal to the margin usually means collapse).

    - num_triplets: number of valid (a, p, n) triplets.
    - num_active: triplets with ``d_ap - d_an + margin > 0``.
    - fraction_active: num_active / max(num_triplets, 1).
    - mean_positive, mean_negative: mean distance over positive / negative pairs (in the
      direction of ``dist``: similarities when ``similarity=True``).
    """

    num_triplets: jax.Array
    num_active: jax.Array
    fraction_active: jax.Array
    mean_positive: jax.Array
    mean_negative: jax.Array


def triplet_margin_stats(dist, positive, negative, *, margin: float, similarity: bool = False) -> TripletStats:
    """Count active triplets (PML TripletMarginMiner "all" with this margin) without a B^3 tensor.

    For each (a, p) the active negatives are those with ``d(a, n) < d(a, p) + margin``; their number
    is one ``searchsorted`` in the anchor's sorted negative distances.
    """
    d, positive, negative = _check_inputs(dist, positive, negative, similarity)
    check_scalar(margin, name="margin", min_value=0.0)
    d = jax.lax.stop_gradient(d)
    sn = sort_negatives(d, negative)
    active = searchsorted_rows(sn.keys, d + margin, side="left")
    num_active = jnp.sum(jnp.where(positive, active, 0).astype(jnp.float32))
    num_triplets = jnp.sum(jnp.where(positive, sn.count[:, None], 0).astype(jnp.float32))
    raw = jax.lax.stop_gradient(jnp.asarray(dist))
    mean_pos = jnp.sum(jnp.where(positive, raw, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
    mean_neg = jnp.sum(jnp.where(negative, raw, 0.0)) / jnp.maximum(jnp.sum(negative), 1)
    return TripletStats(num_triplets, num_active, num_active / jnp.maximum(num_triplets, 1.0), mean_pos, mean_neg)
