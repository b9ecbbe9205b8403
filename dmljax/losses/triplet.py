"""Triplet margin loss over all, semi-hard or batch-hard triplets, in O(B^2) memory.

For an anchor a, a positive p (same class, p != a) and a negative n (other class),
the triplet loss of Weinberger & Saul (JMLR 2009, LMNN) and Schroff et al.
(FaceNet, CVPR 2015, arXiv 1503.03832) is

    l(a, p, n) = [d(a, p) - d(a, n) + margin]_+ ,

and the soft-margin variant of Hermans, Beyer & Leibe ("In Defense of the Triplet
Loss", 2017, arXiv 1703.07737) replaces the hinge by the softplus

    l(a, p, n) = log(1 + exp(d(a, p) - d(a, n) + margin))

(Hermans et al. use margin = 0: pass ``margin=0.0``; with a margin this is PML's
``TripletMarginLoss(smooth_loss=True)``).

Memory. "All triplets" never builds the [B, B, B] tensor: for an anchor a, its
negative distances are sorted once; for a positive p the active negatives are
those with d(a, n) < d(a, p) + margin, a prefix of the sorted list found by
``searchsorted``, and the hinge sum over them is
``k (d(a, p) + margin) - prefix_sum[k]``: a difference of differentiable prefix
sums, so the gradient is exact. The softplus has no such window; soft-margin
"all" runs a ``lax.map`` over anchors, each step building one [B, B]
(positive x negative) slab, under ``jax.checkpoint`` so the backward pass
recomputes the slab instead of storing B of them: memory O(B^2), time O(B^3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax._validation import check_bool, check_choice, check_scalar
from dmljax.losses._core import check_loss_reduction, check_mining, pair_set
from dmljax._numerics import searchsorted_rows, sort_negatives, window_hinge
from dmljax.mining import batch_hard, semihard_negatives, triplet_margin_stats
from dmljax.mining.miners import SEMIHARD_FALLBACKS

__all__ = ["MININGS", "fraction_active_triplets", "triplet_margin_loss"]

MININGS = ("all", "semihard", "semihard_triplets", "batch_hard")


def _distance_like(embeddings, labels, metric, valid, ref_embeddings=None, ref_labels=None, ref_valid=None,
                   pair_weights=None, sample_weights=None):
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric=metric, valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    # Similarities grow as items get closer: -s is distance-like with the same differences.
    d = -ps.matrix if ps.similarity else ps.matrix
    return d, ps.positive, ps.negative, ps.anchor_weight


def _all_triplets_hinge(d, positive, negative, margin, *, semihard_window: bool):
    """Per-anchor hinge sums, triplet counts and non-zero counts via sorted prefix sums."""
    sn = sort_negatives(d, negative)
    threshold = d + margin  # d(a, p) + margin for every (a, p)
    hi = searchsorted_rows(sn.keys, threshold, side="left")  # negatives with d_an < d_ap + m
    if semihard_window:
        # PML TripletMarginMiner("semihard"): 0 < d_an - d_ap <= margin.
        lo = searchsorted_rows(sn.keys, d, side="right")
        hi_inclusive = searchsorted_rows(sn.keys, threshold, side="right")
        mined = jnp.maximum(hi_inclusive - lo, 0)
    else:
        lo = jnp.zeros_like(hi)
        mined = jnp.broadcast_to(sn.count[:, None], hi.shape)
    sums = window_hinge(threshold, lo, hi, sn)
    per_anchor = jnp.sum(jnp.where(positive, sums, 0.0), axis=1)
    count_dtype = d.dtype
    num = jnp.sum(jnp.where(positive, mined, 0), axis=1).astype(count_dtype)
    nonzero = jnp.sum(jnp.where(positive, jnp.maximum(hi - lo, 0), 0), axis=1).astype(count_dtype)
    return per_anchor, num, nonzero


def _all_triplets_soft(d, positive, negative, margin, *, semihard_window: bool):
    """Softplus over all (or semi-hard-window) triplets: lax.map over anchors, one [B, B] slab each."""

    @jax.checkpoint  # recompute the slab in the backward pass: residuals stay O(B^2) in total
    def per_anchor(row):
        d_row, pos_row, neg_row = row
        d_p = d_row[:, None]
        d_n = d_row[None, :]
        mask = pos_row[:, None] & neg_row[None, :]
        if semihard_window:
            gap = jax.lax.stop_gradient(d_n - d_p)
            mask = mask & (gap > 0) & (gap <= margin)
        values = jnp.where(mask, jax.nn.softplus(d_p - d_n + margin), 0.0)
        num = jnp.sum(mask).astype(d.dtype)
        nonzero = jnp.sum(mask & (values > 0)).astype(d.dtype)
        return jnp.sum(values), num, nonzero

    return jax.lax.map(per_anchor, (d, positive, negative))


def _reduce(per_anchor, num, nonzero, reduction, anchor_weight=None):
    """Per-anchor triplet sums / counts -> the reduction; ``anchor_weight`` [B] scales anchors
    ("mean": sum_a w_a l_a / sum_a w_a n_a, the weighted mean over triplets)."""
    if anchor_weight is not None:
        per_anchor = jnp.where(anchor_weight != 0, per_anchor * anchor_weight, 0.0)
        num = num * anchor_weight
    if reduction == "none":
        return per_anchor
    total = jnp.sum(per_anchor)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / jnp.maximum(jnp.sum(num), 1.0)
    # mean_nonzero: PML's AvgNonZeroReducer; the count carries no gradient.
    return total / jnp.maximum(jax.lax.stop_gradient(jnp.sum(nonzero)), 1.0)


def triplet_margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.2,
    mining: str = "all",
    metric: str = "euclidean",
    soft_margin: bool = False,
    reduction: str = "mean_nonzero",
    valid: jax.Array | None = None,
    semihard_fallback: str = "none",
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Triplet margin loss ``[d(a,p) - d(a,n) + margin]_+`` (Weinberger & Saul 2009; FaceNet 2015).

    Triplet sets (``mining``):

      - "all": every valid (a, p, n) in the batch (PML ``TripletMarginLoss`` without a miner).
        O(B^2) memory by sorted prefix sums (see the module docstring).
      - "semihard": FaceNet (Schroff et al. 2015): for each positive pair (a, p) the closest
        negative with d(a, p) < d(a, n) < d(a, p) + margin (`dmljax.mining.miners.semihard_negatives`;
        ``semihard_fallback`` "none" | "tfa" | "hardest" decides pairs without one, default "none":
        they do not count; "tfa" reproduces TF-Addons ``triplet_semihard_loss``).
      - "semihard_triplets": every triplet with 0 < d(a, n) - d(a, p) <= margin (PML
        ``TripletMarginMiner(type_of_triplets="semihard")`` + ``TripletMarginLoss``), O(B^2) memory.
      - "batch_hard": Hermans et al. 2017: per anchor the farthest positive and closest negative.

    ``metric``: "euclidean" (default, FaceNet/Hermans), "squared_euclidean" (FaceNet's formula
    on squared distances), "cosine" or "dot" (similarities s: the loss is
    ``[s(a,n) - s(a,p) + margin]_+``, PML's convention for CosineSimilarity).
    ``soft_margin=True``: ``log(1 + exp(d(a,p) - d(a,n) + margin))`` instead of the hinge
    (Hermans et al. 2017 with margin=0; PML ``smooth_loss=True``).

    Defaults: margin 0.2 is FaceNet's (unit-norm embeddings). ``reduction="mean_nonzero"`` (mean
    over triplets with positive loss, the gradient ignoring the count) is PML's default
    AvgNonZeroReducer; "mean" divides by the number of triplets in the mined set (FaceNet,
    Hermans), "sum" sums them, and "none" returns the per-anchor sum [B] of its triplets' losses.

    Embeddings are not normalised here (the model's head does it); bf16 inputs are computed in
    float32. Degenerate batches (one class, no positive pair, identical or zero embeddings,
    one item) give a finite loss (0 when no triplet exists) and finite gradients.

    Reference set and miners (`dmljax.losses`, "Common arguments"): with ``ref_embeddings`` /
    ``ref_labels`` the positives and negatives of query a are reference rows (PML
    ``loss(emb, labels, ref_emb=..., ref_labels=...)``). ``pair_weights`` (any miner's output,
    e.g. `dmljax.mining.batch_hard`, `hard_negatives`, `pair_margin`) restricts the triplets to
    (a, p, n) with (a, p) a selected positive pair and (a, n) a selected negative pair (PML's
    pair ``indices_tuple`` converted to triplets); only the weights' support counts.
    ``sample_weights`` [B] scales each anchor's triplets.

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer class ids.
      margin: >= 0 (Python float or a traced scalar for a learnable margin).
      mining, metric, soft_margin, reduction, semihard_fallback: see above (static).
      valid: optional bool [B]; False rows are padding and take part in no triplet.
    Returns:
      Scalar loss (or [B] per-anchor sums with ``reduction="none"``).
    """
    check_mining(mining, MININGS)
    check_loss_reduction(reduction)
    check_choice(semihard_fallback, name="semihard_fallback", choices=SEMIHARD_FALLBACKS)
    check_scalar(margin, name="margin", min_value=0.0)
    soft_margin = check_bool(soft_margin, name="soft_margin")
    d, positive, negative, anchor_weight = _distance_like(
        embeddings, labels, metric, valid, ref_embeddings, ref_labels, ref_valid, pair_weights, sample_weights)
    aw = None if sample_weights is None else anchor_weight

    if mining in ("all", "semihard_triplets"):
        window = mining == "semihard_triplets"
        if soft_margin:
            per_anchor, num, nonzero = _all_triplets_soft(d, positive, negative, margin, semihard_window=window)
        else:
            per_anchor, num, nonzero = _all_triplets_hinge(d, positive, negative, margin, semihard_window=window)
        return _reduce(per_anchor, num, nonzero, reduction, aw)

    link = jax.nn.softplus if soft_margin else jax.nn.relu
    if mining == "batch_hard":
        mined = batch_hard(d, positive, negative)
        d_ap = jnp.sum(mined.positive_weights * d, axis=1)
        d_an = jnp.sum(mined.negative_weights * d, axis=1)
        values = jnp.where(mined.valid, link(d_ap - d_an + margin), 0.0)
        num = mined.valid.astype(d.dtype)
        nonzero = (mined.valid & (values > 0)).astype(d.dtype)
        return _reduce(values, num, nonzero, reduction, aw)

    # "semihard": one negative per positive pair.
    mined = semihard_negatives(d, positive, negative, margin=margin, fallback=semihard_fallback)
    d_an = jnp.take_along_axis(d, mined.index, axis=1)
    values = jnp.where(mined.valid, link(d - d_an + margin), 0.0)
    per_anchor = jnp.sum(values, axis=1)
    num = jnp.sum(mined.valid, axis=1).astype(d.dtype)
    nonzero = jnp.sum(mined.valid & (values > 0), axis=1).astype(d.dtype)
    return _reduce(per_anchor, num, nonzero, reduction, aw)


def fraction_active_triplets(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.2,
    metric: str = "euclidean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Fraction of all valid triplets with ``d(a,p) - d(a,n) + margin > 0`` (no gradient).

    A diagnostic to log during training (a value near 1 with a loss near the margin means
    collapsed embeddings). Counted with sorted negatives, O(B^2) memory; 0 when no triplet exists.
    """
    check_scalar(margin, name="margin", min_value=0.0)
    d, positive, negative, _ = _distance_like(embeddings, labels, metric, valid)
    return triplet_margin_stats(d, positive, negative, margin=margin).fraction_active
