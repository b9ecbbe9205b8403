"""More in-batch miners with static-shape outputs: angular, batch easy-hard, hard-aware
deeply cascaded (HDC), uniform histogram, hard cluster (class means) and n-hardest.

Conventions as in `dmljax.mining.miners`: inputs are a pairwise matrix ``dist`` [B, M] and the
bool ``positive`` / ``negative`` masks [B, M] of `dmljax.masks.label_masks` (padding already
removed there); with ``similarity=True`` larger ``dist`` means closer. Outputs are masks or
real weights [B, M] (pair miners), never index lists, so ``jax.jit`` compiles once. Where PML
returns pair indices with repetitions (a triplet miner feeding a pair loss, sampling with
replacement), the weight is the multiplicity, so a weighted pair loss equals PML's.
Selection carries no gradient (as in PML: indices).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import distances
from dmljax._validation import (
    check_bool,
    check_choice,
    check_embeddings,
    check_key,
    check_labels,
    check_matrix,
    check_scalar,
    check_valid,
)
from dmljax.masks import label_masks

__all__ = [
    "AngularMined",
    "PairSelection",
    "angular_miner",
    "batch_easy_hard",
    "hard_cluster_miner",
    "hdc_miner",
    "n_hardest",
    "uniform_histogram_miner",
]


class PairSelection(NamedTuple):
    """Mined pairs: weights [B, M] (0/1 masks or multiplicities) for positives and negatives."""

    positive_weights: jax.Array
    negative_weights: jax.Array


class AngularMined(NamedTuple):
    """Angular-miner result (no [B, B, B] tensor is returned).

    positive_weights: [B, M] number of mined triplets (a, p, .) using the pair (a, p).
    negative_weights: [B, M] number of mined triplets (a, ., n) using the pair (a, n).
    num_triplets: scalar count of mined triplets.
    """

    positive_weights: jax.Array
    negative_weights: jax.Array
    num_triplets: jax.Array


def _check_inputs(dist, positive, negative, similarity=False):
    """Validate dist [B, M] and its masks; return a distance-like (smaller = closer) matrix
    without gradient, and the masks."""
    dist = check_matrix(dist, name="dist", shape=(None, None))
    for name, mask in (("positive", positive), ("negative", negative)):
        if tuple(np.shape(mask)) != tuple(dist.shape):
            raise ValueError(f"{name} must have the shape of dist {tuple(dist.shape)}, got {tuple(np.shape(mask))}")
        if jnp.result_type(mask) != jnp.bool_:
            raise ValueError(f"{name} must be a bool mask (see dmljax.masks.label_masks), got dtype "
                             f"{jnp.result_type(mask)}")
    similarity = check_bool(similarity, name="similarity")
    d = jax.lax.stop_gradient(-dist if similarity else dist)
    return d, jnp.asarray(positive), jnp.asarray(negative)


# --------------------------------------------------------------------------- angular


def angular_miner(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    angle: float = 20.0,
    valid: jax.Array | None = None,
) -> AngularMined:
    """Triplets whose angle at the negative exceeds ``angle`` degrees (PML ``AngularMiner``;
    the angle of Wang et al., "Deep Metric Learning with Angular Loss", ICCV 2017).

    With L2-normalised embeddings, ``c = (x_a + x_p) / 2`` and euclidean distances::

        angle(a, p, n) = arctan(|x_a - x_p| / (2 |x_n - c|))  >  radians(angle)

    for every triplet with y_a = y_p != y_n, a != p. The condition is evaluated anchor by anchor
    with ``lax.map`` over [M, M] (p, n) tables: memory O(B M), time O(B M^2). The result is
    the per-pair multiplicity of mined triplets (what PML's pair losses see when fed the mined
    triplets) and their number. Default angle 20 (PML).

    Args: embeddings [B, D]; labels [B] int; valid optional bool [B].
    """
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    check_scalar(angle, name="angle", min_value=0.0, max_value=90.0)
    positive, negative = label_masks(labels, valid=valid)
    xn = jax.lax.stop_gradient(distances.l2_normalize(x))
    gram = xn @ xn.T
    sq_norm = jnp.diagonal(gram)
    d_ap_all = distances.safe_sqrt(jnp.maximum(sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram, 0.0))
    threshold = math.tan(math.radians(angle)) if isinstance(angle, (int, float)) else jnp.tan(jnp.radians(angle))

    def per_anchor(args):
        g_a, sq_a, d_ap, pos, neg = args
        # with c_p = (x_a + x_p) / 2, a [p, n] table from the Gram matrix alone (no matmul):
        # |x_n - c_p|^2 = |x_n|^2 - (<x_a, x_n> + <x_p, x_n>) + |x_a + x_p|^2 / 4
        center_sq = (sq_a + sq_norm + 2.0 * g_a) / 4.0  # [p]
        nc_sq = sq_norm[None, :] - (g_a[None, :] + gram) + center_sq[:, None]
        nc = distances.safe_sqrt(jnp.maximum(nc_sq, 0.0))
        # arctan(d_ap / (2 nc)) > angle  <=>  d_ap > 2 tan(angle) nc (arctan is increasing; nc >= 0)
        # PML computes arctan(x / 0) = pi/2 for nc = 0, which also passes here when d_ap > 0.
        big_angle = d_ap[:, None] > 2.0 * threshold * nc
        if isinstance(angle, (int, float)) and angle >= 90.0:  # no angle exceeds 90 degrees
            big_angle = jnp.zeros_like(big_angle)
        mined = pos[:, None] & neg[None, :] & big_angle
        return jnp.sum(mined, axis=1), jnp.sum(mined, axis=0)

    pos_w, neg_w = jax.lax.map(per_anchor, (gram, sq_norm, d_ap_all, positive, negative))
    dtype = x.dtype
    return AngularMined(pos_w.astype(dtype), neg_w.astype(dtype), jnp.sum(pos_w).astype(dtype))


# --------------------------------------------------------------------------- batch easy / hard

_STRATEGIES = ("hard", "semihard", "easy", "all")


def _select(d, mask, *, largest, val_range, thresholds=None):
    """Per-row arg-max (largest) or arg-min of d over mask, optionally within [lo, hi] and
    beyond a semihard threshold; returns (one-hot [B, M], selected value [B], row has one)."""
    if val_range is not None:
        mask = mask & (d >= val_range[0]) & (d <= val_range[1])
    if thresholds is not None:
        # max-type keeps d < threshold, min-type keeps d > threshold (PML's semihard rule)
        mask = mask & ((d < thresholds[:, None]) if largest else (d > thresholds[:, None]))
    has = jnp.any(mask, axis=1)
    if largest:
        idx = jnp.argmax(jnp.where(mask, d, -jnp.inf), axis=1)
    else:
        idx = jnp.argmin(jnp.where(mask, d, jnp.inf), axis=1)
    onehot = jax.nn.one_hot(idx, d.shape[1], dtype=bool) & has[:, None]
    value = jnp.sum(jnp.where(onehot, d, 0.0), axis=1)
    return onehot, value, has


def _check_range(value, name):
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be None or a (low, high) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return lo, hi


def batch_easy_hard(
    dist: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    pos_strategy: str = "easy",
    neg_strategy: str = "semihard",
    allowed_pos_range: tuple[float, float] | None = None,
    allowed_neg_range: tuple[float, float] | None = None,
    similarity: bool = False,
) -> PairSelection:
    """Batch easy-hard miner (Xuan et al., "Improved Embeddings with Easy Positive Triplet
    Mining", WACV 2020), PML ``BatchEasyHardMiner`` semantics.

    Per anchor, the positive is the easiest (closest, "easy"), hardest (farthest, "hard"),
    semihard (farthest one still closer than the chosen negative) or every one ("all"); the
    negative is the hardest (closest, "hard"), easiest (farthest, "easy"), semihard (closest
    one farther than the chosen positive) or every one ("all"). Only pairs whose value (of
    ``dist`` as given) lies in the allowed closed range are candidates. Unless a strategy is
    "all", an anchor is kept only if both a positive and a negative were found. PML's rules
    hold: not both semihard, semihard not with "all". Defaults (easy, semihard) are PML's.

    Args:
      dist: [B, M] distances (or similarities with ``similarity=True``; then "closest" means
        largest similarity and ranges apply to the similarity values).
      positive, negative: bool [B, M] from `dmljax.masks.label_masks`.
    Returns:
      `PairSelection` of bool masks [B, M] (a pair-loss input, PML's (a1, p, a2, n)).
    """
    d_like, positive, negative = _check_inputs(dist, positive, negative, similarity)
    check_choice(pos_strategy, name="pos_strategy", choices=_STRATEGIES)
    check_choice(neg_strategy, name="neg_strategy", choices=_STRATEGIES)
    if pos_strategy == neg_strategy == "semihard":
        raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
    if "all" in (pos_strategy, neg_strategy) and "semihard" in (pos_strategy, neg_strategy):
        raise ValueError('pos_strategy: "semihard" cannot be combined with "all"')
    pos_range = _check_range(allowed_pos_range, "allowed_pos_range")
    neg_range = _check_range(allowed_neg_range, "allowed_neg_range")
    raw = jax.lax.stop_gradient(jnp.asarray(dist, d_like.dtype))

    # Ranges refer to raw values; selection order uses the distance-like matrix. For a
    # similarity, "largest distance-like" = smallest similarity.
    def pick(mask, val_range, largest_distance, thresholds=None):
        if val_range is not None:
            mask = mask & (raw >= val_range[0]) & (raw <= val_range[1])
        return _select(d_like, mask, largest=largest_distance, val_range=None, thresholds=thresholds)

    pos_largest = pos_strategy in ("hard", "semihard")
    neg_largest = neg_strategy == "easy"
    if pos_strategy == "semihard":
        neg_sel, neg_val, neg_has = pick(negative, neg_range, neg_largest)
        pos_sel, _, pos_has = pick(positive, pos_range, True, thresholds=neg_val)
    elif neg_strategy == "semihard":
        pos_sel, pos_val, pos_has = pick(positive, pos_range, pos_largest)
        neg_sel, _, neg_has = pick(negative, neg_range, False, thresholds=pos_val)
    else:
        if pos_strategy != "all":
            pos_sel, _, pos_has = pick(positive, pos_range, pos_largest)
        if neg_strategy != "all":
            neg_sel, _, neg_has = pick(negative, neg_range, neg_largest)
    # "all" takes every pair; PML applies the allowed ranges only to the other strategies
    if pos_strategy == "all":
        pos_sel = positive
    if neg_strategy == "all":
        neg_sel = negative
    if "all" not in (pos_strategy, neg_strategy):
        keep = pos_has & neg_has
        pos_sel = pos_sel & keep[:, None]
        neg_sel = neg_sel & keep[:, None]
    return PairSelection(pos_sel, neg_sel)


# --------------------------------------------------------------------------- HDC


def _keep_top_fraction(values, mask, fraction, *, largest):
    """Bool mask of the ceil(fraction * count) entries of ``values`` over ``mask`` that are
    largest (or smallest), ties broken by flat index; static shapes via a full sort."""
    flat_v = values.reshape(-1)
    flat_m = mask.reshape(-1)
    key = -flat_v if largest else flat_v
    key = jnp.where(flat_m, key, jnp.inf)
    order = jnp.argsort(key, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    count = jnp.sum(flat_m)
    keep_n = jnp.ceil(fraction * count.astype(values.dtype) - 1e-9).astype(order.dtype)
    return ((rank < keep_n) & flat_m).reshape(mask.shape)


def hdc_miner(
    dist: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    filter_percentage: float = 0.5,
    similarity: bool = False,
) -> PairSelection:
    """One cascade stage of hard-aware deeply cascaded embedding (Yuan et al., "Hard-Aware
    Deeply Cascaded Embedding", ICCV 2017), PML ``HDCMiner``: keep the hardest
    ``ceil(filter_percentage * #pairs)`` positive pairs (largest distances) and, separately,
    the hardest fraction of negative pairs (smallest distances), over the whole batch.

    Cascade several stages by passing the previous selection as ``positive`` / ``negative``
    (PML's ``set_idx_externally``). Ties are broken by position (PML's topk order is
    unspecified). Default filter_percentage 0.5 (PML).

    Returns: `PairSelection` of bool masks [B, M].
    """
    d_like, positive, negative = _check_inputs(dist, positive, negative, similarity)
    check_scalar(filter_percentage, name="filter_percentage", min_value=0.0, max_value=1.0)
    pos = _keep_top_fraction(d_like, positive, filter_percentage, largest=True)
    neg = _keep_top_fraction(d_like, negative, filter_percentage, largest=False)
    return PairSelection(pos, neg)


# --------------------------------------------------------------------------- uniform histogram


def _uniform_per_bin(key, values, mask, num_bins, per_bin):
    """Counts [B, M]: in each of num_bins equal-width bins over [min, max] of the masked values,
    ``per_bin`` draws with replacement among the pairs in that bin (none for empty bins)."""
    flat_v = values.reshape(-1)
    flat_m = mask.reshape(-1)
    lo = jnp.min(jnp.where(flat_m, flat_v, jnp.inf))
    hi = jnp.max(jnp.where(flat_m, flat_v, -jnp.inf))
    edges = jnp.linspace(jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0), num_bins + 1)
    # bin i holds edges[i] <= v < edges[i + 1], the last bin also v == max (PML)
    bins = jnp.clip(jnp.searchsorted(edges, flat_v, side="right") - 1, 0, num_bins - 1)
    bins = jnp.where(flat_m, bins, num_bins)  # sentinel for non-candidates
    order = jnp.argsort(bins, stable=True)
    counts = jnp.bincount(bins, length=num_bins + 1)[:num_bins]
    starts = jnp.cumsum(counts) - counts
    u = jax.random.uniform(key, (num_bins, per_bin))
    within = jnp.minimum(jnp.floor(u * counts[:, None]).astype(counts.dtype), jnp.maximum(counts[:, None] - 1, 0))
    picks = order[starts[:, None] + within]  # [num_bins, per_bin] flat pair indices
    hits = jnp.broadcast_to(counts[:, None] > 0, picks.shape)
    out = jnp.zeros(flat_v.shape, values.dtype).at[picks.reshape(-1)].add(hits.reshape(-1).astype(values.dtype))
    return out.reshape(values.shape)


def uniform_histogram_miner(
    key: jax.Array,
    dist: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    num_bins: int = 100,
    pos_per_bin: int = 10,
    neg_per_bin: int = 10,
) -> PairSelection:
    """Uniform histogram miner (PML ``UniformHistogramMiner``): positive pair values are split
    into ``num_bins`` equal-width bins between their min and max, and ``pos_per_bin`` pairs are
    drawn uniformly with replacement from every non-empty bin (likewise for negatives), so the
    mined pairs cover the whole distance range evenly.

    Returns multiplicities (a pair drawn twice has weight 2, as PML's repeated indices).
    The draws use ``key``; they follow the same distribution as PML's, not its stream.
    Defaults (100 bins, 10 per bin) are PML's. ``dist`` may be distances or similarities
    (binning does not depend on the direction).
    """
    key = check_key(key)
    d, positive, negative = _check_inputs(dist, positive, negative)
    for name, value in (("num_bins", num_bins), ("pos_per_bin", pos_per_bin), ("neg_per_bin", neg_per_bin)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    k_pos, k_neg = jax.random.split(key)
    return PairSelection(
        _uniform_per_bin(k_pos, d, positive, num_bins, pos_per_bin),
        _uniform_per_bin(k_neg, d, negative, num_bins, neg_per_bin),
    )


# --------------------------------------------------------------------------- hard cluster


def hard_cluster_miner(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    num_hard_classes: int = 1,
    valid: jax.Array | None = None,
) -> PairSelection:
    """Hard-class mining from class means (the anchor-neighbour sampling of Ge et al., "Deep
    Metric Learning with Hierarchical Triplet Loss", ECCV 2018, applied within a batch; PML
    has no equivalent).

    Each class present in the batch is summarised by its mean embedding. For an anchor of
    class c the negatives kept are all items of the ``num_hard_classes`` classes whose means
    are nearest (euclidean) to c's mean (ties by first item index); every positive pair is
    kept. Selection carries no gradient.

    Args: embeddings [B, D]; labels [B] int; valid optional bool [B].
    Returns: `PairSelection` of bool masks [B, B].
    """
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    if not isinstance(num_hard_classes, (int, np.integer)) or num_hard_classes < 1:
        raise ValueError(f"num_hard_classes must be a positive int, got {num_hard_classes!r}")
    positive, negative = label_masks(labels, valid=valid)
    b = x.shape[0]
    row_ok = jnp.ones((b,), bool) if valid is None else valid
    same = (labels[:, None] == labels[None, :]) & row_ok[:, None] & row_ok[None, :]
    xs = jax.lax.stop_gradient(x)
    means = (same.astype(xs.dtype) @ xs) / jnp.maximum(jnp.sum(same, axis=1, keepdims=True), 1).astype(xs.dtype)
    mean_dist = distances.squared_euclidean(means)
    # one representative (the first item) per class; rank the representatives per anchor
    idx = jnp.arange(b)
    first = jnp.min(jnp.where(same, idx[None, :], b), axis=1)  # [B] first item of i's class
    is_rep = (first == idx) & row_ok
    cand = negative & is_rep[None, :]
    order = jnp.argsort(jnp.where(cand, mean_dist, jnp.inf), axis=1, stable=True)
    rank = jnp.argsort(order, axis=1)  # rank of every column in its row
    rep_rank = jnp.take_along_axis(rank, jnp.broadcast_to(jnp.minimum(first, b - 1)[None, :], (b, b)), axis=1)
    hard_neg = negative & (rep_rank < num_hard_classes)
    return PairSelection(positive, hard_neg)


# --------------------------------------------------------------------------- n hardest


def n_hardest(
    dist: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    n: int = 1,
    similarity: bool = False,
) -> PairSelection:
    """Per anchor, the ``n`` hardest (closest) negatives, as a mask chosen with ``lax.top_k``
    (fewer when the anchor has fewer negatives); all positive pairs are kept. Ties by index.
    n = 1 is the negative half of batch-hard mining (Hermans et al. 2017).

    Returns: `PairSelection` of bool masks [B, M].
    """
    d_like, positive, negative = _check_inputs(dist, positive, negative, similarity)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    m = d_like.shape[1]
    k = min(int(n), m)
    _, top_idx = jax.lax.top_k(jnp.where(negative, -d_like, -jnp.inf), k)
    rows = jnp.arange(d_like.shape[0])[:, None]
    chosen = jnp.zeros(d_like.shape, bool).at[rows, top_idx].set(True)  # scatter: O(B M), not O(B n M)
    return PairSelection(positive, chosen & negative)
