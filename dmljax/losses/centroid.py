"""Centroid triplet loss (Wieczorek, Rychalska & Dabrowski 2021), static shapes, O(B^2) memory.

"On the Unreasonable Effectiveness of Centroids in Image Retrieval" (ICONIP 2021,
arXiv 2104.13643), Sec. 3: in a P x M batch every sample q of class k is used as a query, the
other M - 1 samples of class k build its positive centroid ``c_k^{-q}``, and the classes j != k
are represented by their centroids ``c_j``; the loss is the triplet loss on (query, positive
centroid, negative centroid):

    l(q, j) = [ d(q, c_k^{-q}) - d(q, c_j) + margin ]_+ ,
    c_k^{-q} = (sum_{i: y_i = k} x_i - x_q) / (n_k - 1),     c_j = (1 / n_j) sum_{i: y_i = j} x_i .

Static shapes: class sums are ``same @ x`` with the [B, B] same-label mask (row i holds the sum
of i's class), so no class count or label range is needed (labels are arbitrary integers); each
class appears as a negative once, through the column of its first member in the batch. The
triplet values form a [B, B] (query x class-representative) matrix: memory O(B^2 + B D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax._validation import check_choice, check_embeddings, check_labels, check_scalar, check_valid
from dmljax.distances import METRICS, is_similarity, l2_normalize, pairwise, safe_sqrt
from dmljax.losses.triplet import _reduce

__all__ = ["CENTROID_REDUCTIONS", "centroid_triplet_loss"]

CENTROID_REDUCTIONS = ("mean_nonzero", "mean", "sum", "none")


def _rowwise(x: jax.Array, c: jax.Array, metric: str) -> jax.Array:
    """metric(x_i, c_i) for paired rows, [B, D] x [B, D] -> [B] (same values as `pairwise`)."""
    if metric in ("euclidean", "squared_euclidean"):
        sq = jnp.sum(jnp.square(x - c), axis=1)
        return safe_sqrt(sq) if metric == "euclidean" else sq
    if metric == "cosine":
        x, c = l2_normalize(x), l2_normalize(c)
    return jnp.sum(x * c, axis=1)


def centroid_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.05,
    metric: str = "euclidean",
    normalize: bool = True,
    soft_margin: bool = False,
    reduction: str = "mean_nonzero",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Centroid triplet loss ``[d(q, c_k^{-q}) - d(q, c_j) + margin]_+`` (Wieczorek et al. 2021).

    For every query q (a valid row whose class has >= 2 valid members) and every other class j
    present in the batch, one triplet (q, leave-one-out centroid of q's class, centroid of j)
    as in the module docstring. ``metric`` "cosine" / "dot" are similarities s and give
    ``[s(q, c_j) - s(q, c_k^{-q}) + margin]_+`` (PML's convention). ``soft_margin=True`` uses
    ``softplus`` instead of the hinge (PML ``smooth_loss=True``).

    Defaults are PML ``CentroidTripletLoss``'s (pytorch-metric-learning 1.x; removed in 2.0):
    margin 0.05, ``LpDistance(normalize_embeddings=True)`` = euclidean distance between the
    L2-normalised query and L2-normalised centroids (``normalize=True``; centroids are averaged
    from the raw embeddings, then normalised, as in PML), all triplets, AvgNonZeroReducer
    (``reduction="mean_nonzero"``: mean over triplets with positive loss, the count carrying no
    gradient). "mean" divides by the number of triplets, "sum" sums, "none" returns the per-query
    sum [B].

    Differences from PML 1.7.3 (checked against it): PML raises for a class with one sample; here
    such a class gives no query but still serves as a negative centroid. PML's index bookkeeping
    keeps only 3 negative centroids per query when a batch has P >= 5 classes, and mislabels
    negative centroids in imbalanced batches; this function always uses every other class, as the
    paper and PML's documentation describe (equal to PML for balanced batches with P <= 4).

    Degenerate batches (one class, only singletons, identical or zero embeddings, one item) give
    a finite loss (0 without triplets) and finite gradients. bf16 inputs compute in float32.

    Args:
      embeddings: [B, D] floating.
      labels: [B] integer class ids (any integers).
      margin: >= 0 (Python float or a traced scalar).
      metric: "euclidean" (default), "squared_euclidean", "cosine" or "dot" (static).
      normalize: L2-normalise queries and centroids before the metric (static bool).
      soft_margin: softplus instead of the hinge (static bool).
      reduction: "mean_nonzero" (default), "mean", "sum" or "none" (static).
      valid: optional bool [B]; False rows are padding: no query, no part of any centroid.
    Returns:
      Scalar loss, or [B] per-query sums with ``reduction="none"``.

    Example::

        loss = centroid_triplet_loss(emb, labels)                       # PML defaults
        loss = centroid_triplet_loss(emb, labels, margin=0.3, normalize=False)
    """
    x = check_embeddings(embeddings)
    b = x.shape[0]
    labels = check_labels(labels, batch_size=b)
    valid = check_valid(valid, batch_size=b)
    check_choice(metric, name="metric", choices=tuple(METRICS))
    check_choice(reduction, name="reduction", choices=CENTROID_REDUCTIONS)
    check_scalar(margin, name="margin", min_value=0.0)
    for name, flag in (("normalize", normalize), ("soft_margin", soft_margin)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a Python bool, got {flag!r}")

    ok = jnp.ones((b,), bool) if valid is None else valid
    same = (labels[:, None] == labels[None, :]) & ok[:, None] & ok[None, :]  # [B, B], diagonal = ok
    count = jnp.sum(same, axis=1).astype(x.dtype)  # n_{y_i} (0 for padding rows)
    sums = same.astype(x.dtype) @ x  # [B, D] class sum of row i's class
    class_centroid = sums / jnp.maximum(count, 1.0)[:, None]  # c_{y_i}
    is_query = ok & (count >= 2)
    loo = (sums - x) / jnp.maximum(count - 1.0, 1.0)[:, None]  # c_{y_i}^{-i}
    loo = jnp.where(is_query[:, None], loo, 0.0)
    # Column j stands for class y_j iff j is the first valid member of its class.
    earlier = jnp.tril(same, k=-1)  # [i, j] same class, j < i
    is_first = ok & ~jnp.any(earlier, axis=1)
    negative = is_query[:, None] & is_first[None, :] & ~same & ok[None, :]  # [query, class column]

    q = l2_normalize(x) if normalize else x
    pos_c = l2_normalize(loo) if normalize else loo
    neg_c = l2_normalize(class_centroid) if normalize else class_centroid
    d_pos = _rowwise(q, pos_c, metric)  # [B]
    d_neg = pairwise(q, neg_c, metric=metric)  # [B, B]
    if is_similarity(metric):
        d_pos, d_neg = -d_pos, -d_neg
    z = d_pos[:, None] - d_neg + margin
    link = jax.nn.softplus if soft_margin else jax.nn.relu
    values = jnp.where(negative, link(jnp.where(negative, z, 0.0)), 0.0)

    return _reduce(jnp.sum(values, axis=1), jnp.sum(negative, axis=1, dtype=x.dtype),
                   jnp.sum(negative & (values > 0), axis=1, dtype=x.dtype), reduction)
