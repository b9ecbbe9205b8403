"""Pair and tuple losses: contrastive, lifted structured, N-pair, quadruplet, ranked list, angular.

Every loss is a pure function ``loss(embeddings [B, D], labels [B], *, config...) -> scalar``
built on the B x B distance matrix (`dmljax.distances`) and the label masks
(`dmljax.masks.label_masks`); nothing materialises a B x B x B tensor. All accept an
optional ``valid`` [B] bool mask: padded rows take part in no pair, so a padded batch gives
the loss of the unpadded one. Empty sets (no positive pair, one class, one item) give a
loss of 0 with a zero, finite gradient.

Labels are integer class ids. Distances follow the papers: euclidean distance between the
embeddings as given (the losses do not normalise, except `angular_loss`, whose formula
assumes unit vectors, as in the paper and PML).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dmljax import distances
from dmljax._numerics import class_ids, masked_logsumexp, row_hinge_total, segment_hinge_total
from dmljax._validation import check_choice, check_embeddings, check_labels, check_scalar, check_valid
from dmljax.losses._core import check_loss_reduction as _check_reduction
from dmljax.losses._core import check_mining, pair_set, row_sum
from dmljax.masks import label_masks
from dmljax.reductions import masked_mean, reduce_loss

__all__ = [
    "angular_loss",
    "contrastive_loss",
    "generalized_lifted_structured_loss",
    "lifted_structured_loss",
    "npair_loss",
    "quadruplet_loss",
    "ranked_list_loss",
    "tuplet_loss",
]

_DISTANCE_METRICS = ("euclidean", "squared_euclidean")


# ----------------------------------------------------------------------------- helpers


def _prepare(embeddings, labels, valid):
    """Validate and return (x [B, D] >= f32, labels [B], valid [B] bool or None, pos, neg)."""
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    positive, negative = label_masks(labels, valid=valid)
    return x, labels, valid, positive, negative


def _valid_rows(valid, batch_size, dtype):
    if valid is None:
        return jnp.ones((batch_size,), dtype)
    return valid.astype(dtype)


# ----------------------------------------------------------------------------- contrastive


def contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    metric: str = "euclidean",
    squared: bool = False,
    reduction: str = "mean_nonzero",
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006), PML ``ContrastiveLoss`` semantics.

    For a distance ``d`` (``metric`` "euclidean" or "squared_euclidean") over ordered pairs i != j::

        positive pair:  [d_ij - pos_margin]_+ ** p
        negative pair:  [neg_margin - d_ij]_+ ** p

    For a similarity ``s`` ("cosine", "dot") the hinges flip, as in PML:
    ``[pos_margin - s_ij]_+`` and ``[s_ij - neg_margin]_+`` (then choose e.g. pos_margin=1,
    neg_margin=0). ``squared=False`` gives p = 1 (PML); ``squared=True`` gives Hadsell et al.'s
    form ``1/2 [.]_+^2`` (their eq. 4 has pos_margin = 0).

    The positive and the negative terms are reduced separately and added (PML):
    ``reduction="mean_nonzero"`` (PML's default AvgNonZeroReducer: mean over pairs with
    non-zero loss), "mean" (mean over all positive pairs + mean over all negative pairs),
    "sum", or "none" ([B]: per anchor, the sum of its weighted pair terms).

    Defaults pos_margin=0, neg_margin=1 are PML's; Hadsell et al. leave m to the user.

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float. labels: [B] int class ids. valid: optional [B] bool.
    Returns:
      scalar loss (or [B] for reduction="none").
    """
    check_choice(metric, name="metric", choices=tuple(distances.METRICS))
    _check_reduction(reduction)
    similarity = distances.is_similarity(metric)
    if not similarity:
        check_scalar(pos_margin, name="pos_margin", min_value=0.0)
        check_scalar(neg_margin, name="neg_margin", min_value=0.0)
    else:
        check_scalar(pos_margin, name="pos_margin")
        check_scalar(neg_margin, name="neg_margin")
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric=metric, valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    mat = ps.matrix
    if similarity:
        pos_values = jax.nn.relu(pos_margin - mat)
        neg_values = jax.nn.relu(mat - neg_margin)
    else:
        pos_values = jax.nn.relu(mat - pos_margin)
        neg_values = jax.nn.relu(neg_margin - mat)
    if squared:
        pos_values = 0.5 * jnp.square(pos_values)
        neg_values = 0.5 * jnp.square(neg_values)
    pos_w = ps.pos_weight * ps.anchor_weight[:, None]
    neg_w = ps.neg_weight * ps.anchor_weight[:, None]
    if reduction == "none":
        return row_sum(pos_values, pos_w) + row_sum(neg_values, neg_w)
    return (reduce_loss(pos_values, pos_w, reduction=reduction)
            + reduce_loss(neg_values, neg_w, reduction=reduction))


# ----------------------------------------------------------------------------- lifted structure


def lifted_structured_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 1.0,
    metric: str = "euclidean",
    reduction: str = "mean",
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Lifted structured loss, the smooth upper bound of Song et al., CVPR 2016 (arXiv 1511.06452).

    Eq. (4) of the paper: for every positive pair (i, j) in P::

        J_ij = log( sum_{k in N(i)} exp(m - D_ik) + sum_{l in N(j)} exp(m - D_jl) ) + D_ij
        L    = 1 / (2 |P|) * sum_{(i,j) in P} [J_ij]_+ ** 2

    with D the euclidean distance and N(i) the negatives of i: the negatives of BOTH ends
    of the pair. Computed in O(B^2): one masked log-sum-exp per item
    (``L_i = log sum_{k in N(i)} exp(m - D_ik)``), then ``J_ij = logaddexp(L_i, L_j) + D_ij``.
    P counts ordered pairs; the (i, j) and (j, i) terms are equal, so the normalisation is
    the paper's. A pair whose ends have no negative at all (single-class batch) has J = -inf
    and contributes 0 (PML's ``LiftedStructureLoss`` uses an empty log-sum-exp of 0 there,
    giving D_ij ** 2 / 2). Otherwise this equals PML's ``LiftedStructureLoss(neg_margin=m,
    pos_margin=0)`` on the same distances (PML normalises embeddings by default).

    Default margin 1 is the paper's (alpha = 1). ``reduction``: "mean" (the paper's
    1/(2|P|) sum), "sum", "mean_nonzero", or "none" ([B]: per anchor i, sum_j [J_ij]_+^2 / 2).
    In the reference form a reference j has no negatives of its own, so
    ``J_ij = log sum_{k in N(i)} exp(m - D_ik) + D_ij`` (the anchor's negatives only); PML's
    ``ref_emb`` form compares query and reference indices there and is not reproduced.
    Negative pair weights scale the terms inside the log-sum-exp.

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float. labels: [B] int. valid: optional [B] bool.
      metric: "euclidean" (paper) or "squared_euclidean".
    """
    check_choice(metric, name="metric", choices=_DISTANCE_METRICS)
    _check_reduction(reduction)
    check_scalar(margin, name="margin", min_value=0.0)
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric=metric, valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    dist, negative = ps.matrix, ps.negative
    per_item = masked_logsumexp(margin - dist, negative, axis=1, weights=ps.neg_weight)
    has_negative = jnp.any(negative, axis=1)
    if ps.self_form:
        li, lj = per_item[:, None], per_item[None, :]
        hi, hj = has_negative[:, None], has_negative[None, :]
        log_neg = jnp.where(hi & hj, jnp.logaddexp(li, lj), jnp.where(hi, li, lj))
        has_any = hi | hj
    else:  # a reference has no negatives of its own: the anchor's only
        log_neg = per_item[:, None]
        has_any = jnp.broadcast_to(has_negative[:, None], dist.shape)
    j_values = log_neg + dist
    values = 0.5 * jnp.square(jax.nn.relu(j_values))
    values = jnp.where(has_any, values, 0.0)
    weights = ps.pos_weight * ps.anchor_weight[:, None]
    if reduction == "none":
        return row_sum(values, weights)
    return reduce_loss(values, weights, reduction=reduction)


def generalized_lifted_structured_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    metric: str = "euclidean",
    reduction: str = "mean",
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Generalised lifted structure loss (Hermans, Beyer & Leibe 2017, arXiv 1703.07737, p. 4).

    Per anchor a (PML ``GeneralizedLiftedStructureLoss``)::

        L_a = [ log sum_{p in P(a)} exp(D_ap - pos_margin)
                + log sum_{n in N(a)} exp(neg_margin - D_an) ]_+

    averaged over the (valid) anchors. As in PML, the log-sum-exp of an empty set is 0, so
    an anchor with negatives but no positive still contributes its negative term. Defaults
    (pos_margin 0, neg_margin 1) are PML's; Hermans et al. write a single margin m on the
    negative side, i.e. pos_margin = 0.

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float. labels: [B] int. valid: optional [B] bool.
      reduction: "mean", "sum", "mean_nonzero" or "none" ([B] per anchor).
    """
    check_choice(metric, name="metric", choices=_DISTANCE_METRICS)
    _check_reduction(reduction)
    check_scalar(pos_margin, name="pos_margin", min_value=0.0)
    check_scalar(neg_margin, name="neg_margin", min_value=0.0)
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric=metric, valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    dist = ps.matrix
    pos_lse = masked_logsumexp(dist - pos_margin, ps.positive, axis=1, weights=ps.pos_weight)
    neg_lse = masked_logsumexp(neg_margin - dist, ps.negative, axis=1, weights=ps.neg_weight)
    values = jax.nn.relu(pos_lse + neg_lse)
    return reduce_loss(values, ps.anchor_weight, reduction=reduction)


# ----------------------------------------------------------------------------- N-pair


def npair_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    l2_reg: float = 0.002,
    pairs: str = "all",
    reduction: str = "mean",
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Multi-class N-pair loss (Sohn, NeurIPS 2016) with its L2 embedding regulariser.

    With dot-product similarities s_ij = f_i . f_j, for an anchor a with positive p and
    negatives n (eq. 3 of the paper, the (N+1)-tuplet loss)::

        l(a, p) = log(1 + sum_n exp(s_an - s_ap))      (softmax cross-entropy of p vs. n)
        L = mean_{(a, p)} l(a, p) + l2_reg * mean_i ||f_i||^2

    ``pairs`` chooses the tuples taken from a batch:

    * "all" (default): the batch form for m-per-class batches: every ordered positive pair
      (a, p) is a tuple and every item of another class is a negative of a. With exactly two
      items per class this is the paper's N-pair batch except that the anchors of other
      classes are negatives too.
    * "one_per_class": the paper's exact N-pair construction and PML ``NPairsLoss``: per class
      the first two valid items (in batch order) form the pair (anchor, positive); the
      negatives of an anchor are the positives of the other classes (an N-way softmax).
      Items beyond the first two of a class are unused.

    ``l2_reg``: Sohn regularises the squared L2 norm of the embeddings; 0.002 is the
    value used by the reference TensorFlow ``npairs_loss`` (``reg_lambda``), which scales it
    as ``0.25 * l2_reg * (mean|f_anchor|^2 + mean|f_pos|^2)``; here the penalty is
    ``l2_reg * mean over valid items of ||f_i||^2``. PML's ``NPairsLoss`` has no regulariser
    (``l2_reg=0`` matches it). Embeddings should NOT be L2-normalised (the paper's setting).

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float. labels: [B] int. valid: optional [B] bool.
      reduction: "mean", "sum", "mean_nonzero" over tuples (the regulariser is always a mean),
        or "none" ([B]: per anchor the sum of its tuples' losses + l2_reg ||f_i||^2; pairs="all").

    PML ``NPairsLoss`` uses its default ``DotProductSimilarity`` whose default
    ``normalize_embeddings=True`` normalises the embeddings: pass unit vectors (and
    ``l2_reg=0``) to compare; on raw embeddings PML computes a cosine, not Sohn's dot product.
    """
    check_choice(pairs, name="pairs", choices=("all", "one_per_class"))
    _check_reduction(reduction)
    check_scalar(l2_reg, name="l2_reg", min_value=0.0)
    if pairs == "one_per_class":
        if reduction == "none":
            raise ValueError("reduction='none' needs pairs='all' (one value per anchor)")
        if ref_embeddings is not None or pair_weights is not None or sample_weights is not None:
            raise ValueError("pairs='one_per_class' builds its own tuples: ref_embeddings, pair_weights "
                             "and sample_weights need pairs='all'")
    x, labels, valid, positive, negative = _prepare(embeddings, labels, valid)
    if valid is not None:
        x = jnp.where(valid[:, None], x, 0.0)  # padded rows reach neither value nor gradient
    n = x.shape[0]
    if pairs == "all":
        ps = pair_set(x, labels, ref_embeddings, ref_labels, metric="dot", valid=valid, ref_valid=ref_valid,
                      pair_weights=pair_weights, sample_weights=sample_weights)
        sim = ps.matrix
        neg_lse = masked_logsumexp(sim, ps.negative, axis=1, weights=ps.neg_weight)
        has_negative = jnp.any(ps.negative, axis=1)
        values = jnp.where(has_negative[:, None], jax.nn.softplus(neg_lse[:, None] - sim), 0.0)
        weights = ps.pos_weight * ps.anchor_weight[:, None]
        if reduction == "none":
            return row_sum(values, weights) + l2_reg * jnp.where(ps.anchor_weight != 0, jnp.sum(jnp.square(x), axis=1), 0.0)
        tuple_loss = reduce_loss(values, weights, reduction=reduction)
    else:
        sim = distances.dot_product(x)
        is_valid = jnp.ones((n,), bool) if valid is None else valid
        same = labels[:, None] == labels[None, :]
        earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)  # earlier[i, j]: j < i
        rank = jnp.sum(same & earlier & is_valid[None, :], axis=1)
        first = is_valid & (rank == 0)
        second = is_valid & (rank == 1)
        # anchor a's positive is the second item of its class; every second item is a logit
        target = same & second[None, :]
        is_anchor = first & jnp.any(target, axis=1)
        logits_mask = second[None, :] & jnp.any(target, axis=0)[None, :]
        lse = masked_logsumexp(sim, logits_mask, axis=1)
        s_ap = jnp.sum(jnp.where(target, sim, 0.0), axis=1)
        values = jnp.where(is_anchor, lse - s_ap, 0.0)
        tuple_loss = reduce_loss(values, is_anchor, reduction=reduction)
    sq_norms = jnp.sum(jnp.square(x), axis=1)
    reg = masked_mean(sq_norms, _valid_rows(valid, n, sq_norms.dtype))
    return tuple_loss + l2_reg * reg


def tuplet_loss(
    anchors: jax.Array,
    positives: jax.Array,
    negatives: jax.Array,
    *,
    l2_reg: float = 0.0,
    reduction: str = "mean",
) -> jax.Array:
    """(N+1)-tuplet loss on explicit tuples (Sohn, NeurIPS 2016, eq. 3).

    For tuple t with anchor f, positive f+ and N-1 negatives f_1..f_{N-1}::

        l_t = log(1 + sum_i exp(f . f_i - f . f+))
        L = mean_t l_t + l2_reg * mean ||f||^2   (over every embedding given)

    Use this when the tuples come from a sampler; `npair_loss` builds them from a labelled
    batch instead. The regulariser is off by default here (Sohn adds it for N-pair-mc training).

    Args:
      anchors: [T, D]. positives: [T, D]. negatives: [T, K, D] with K = N - 1 >= 1.
      reduction: "mean", "sum" or "none" ([T]).
    """
    _check_reduction(reduction, ("mean", "sum", "none"))
    check_scalar(l2_reg, name="l2_reg", min_value=0.0)
    anchors = check_embeddings(anchors, name="anchors")
    positives = check_embeddings(positives, name="positives")
    if positives.shape != anchors.shape:
        raise ValueError(f"positives must have the shape of anchors {anchors.shape}, got {positives.shape}")
    neg_shape = tuple(jnp.shape(negatives))
    if len(neg_shape) != 3 or neg_shape[0] != anchors.shape[0] or neg_shape[2] != anchors.shape[1] \
            or neg_shape[1] == 0:
        raise ValueError(f"negatives must have shape ({anchors.shape[0]}, K >= 1, {anchors.shape[1]}), "
                         f"got {neg_shape}")
    negatives = check_embeddings(negatives.reshape(-1, neg_shape[2]), name="negatives").reshape(neg_shape)
    dtype = jnp.result_type(anchors, positives, negatives)
    anchors, positives, negatives = (a.astype(dtype) for a in (anchors, positives, negatives))
    s_pos = jnp.sum(anchors * positives, axis=1)
    s_neg = jnp.einsum("td,tkd->tk", anchors, negatives)
    values = jax.nn.logsumexp(jnp.concatenate([s_pos[:, None], s_neg], axis=1), axis=1) - s_pos
    sq_norms = jnp.concatenate([jnp.sum(jnp.square(anchors), axis=1), jnp.sum(jnp.square(positives), axis=1),
                                jnp.sum(jnp.square(negatives), axis=2).reshape(-1)])
    reg = l2_reg * jnp.mean(sq_norms)
    if reduction == "none":
        return values + reg
    return reduce_loss(values, reduction=reduction) + reg


# ----------------------------------------------------------------------------- quadruplet


def quadruplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin1: float = 1.0,
    margin2: float = 0.5,
    metric: str = "squared_euclidean",
    mining: str = "all",
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Quadruplet loss (Chen, Chen, Zhang & Huang, CVPR 2017, arXiv 1704.01719, eq. 3).

    With distance g (the paper's g(x_i, x_j)^2, hence ``metric="squared_euclidean"``)::

        L = sum_{i,j,k} [g_ij - g_ik + margin1]_+ + sum_{i,j,l,k} [g_ij - g_lk + margin2]_+

    where y_i = y_j (i != j), y_k != y_i, and in the second term y_l != y_k, y_l != y_i,
    y_k != y_i: the negative pair (l, k) shares no class with the anchor nor within itself.
    Defaults margin1 = 1, margin2 = 0.5 (the second, weaker constraint gets the smaller margin,
    as the paper argues); the paper itself sets both margins adaptively from the batch's mean
    positive / negative distances during its hard-negative mining, which is not implemented
    here, so pass margins that fit the scale of your distances.

    ``mining="all"``: every triplet and every quadruplet, each term averaged over its valid
    tuples (``reduction="mean"``) or summed ("sum"). Without any B^3/B^4 tensor: for the
    first term, each anchor's negative distances are sorted once and every positive-pair
    query finds the count and prefix sum of those below it by binary search; for the
    second, the multiset of negative-pair distances not involving class c equals all
    negative pairs minus twice those with one end in c (d is symmetric), handled the same
    way with one sorted list, and one sorted by (class, distance). The gradient of a hinge
    sum is a count (queries above / entries below), given by a custom VJP, so nothing is
    differentiated through a sort. O(B^2 log B) time, O(B^2) memory.

    ``mining="batch_hard"`` (formerly "hard"): batch-hard form (the hardest-sample idea of the paper's online
    mining, in the style of Hermans et al. 2017): per anchor i, the largest positive
    distance, the smallest negative distance, and the smallest distance of a negative pair
    valid for i's class::

        L_i = [max_j g_ij - min_k g_ik + margin1]_+ + [max_j g_ij - min_{l,k} g_lk + margin2]_+

    averaged over anchors with the required tuples. The paper's adaptive margin (from the
    batch's mean distances) is not implemented.

    Args:
      embeddings: [B, D] float. labels: [B] int. valid: optional [B] bool.
    """
    check_choice(metric, name="metric", choices=_DISTANCE_METRICS)
    check_mining(mining, ("all", "batch_hard"), renames={"hard": "batch_hard"})
    _check_reduction(reduction, ("mean", "sum"))
    check_scalar(margin1, name="margin1", min_value=0.0)
    check_scalar(margin2, name="margin2", min_value=0.0)
    x, labels, valid, positive, negative = _prepare(embeddings, labels, valid)
    dist = distances.pairwise(x, metric=metric)
    if mining == "batch_hard":
        return _quadruplet_hard(dist, labels, positive, negative, margin1, margin2, reduction)
    n = x.shape[0]
    dtype = dist.dtype
    num_neg = jnp.sum(negative, axis=1, dtype=dtype)
    center = jax.lax.stop_gradient(jnp.sum(jnp.where(negative, dist, 0.0)) / jnp.maximum(jnp.sum(num_neg), 1.0))
    # first term: per anchor row, positives' d_ij + margin1 against the row's negatives
    sum1 = row_hinge_total(dist, negative, dist + margin1, positive, center)
    count1 = jnp.sum(jnp.sum(positive, axis=1, dtype=dtype) * num_neg)
    # second term: all negative pairs minus twice those with one end in the anchor's class
    classes = class_ids(labels)
    class_neg = jax.ops.segment_sum(num_neg, classes, num_segments=n)[classes]  # [B] per anchor
    count2_each = jnp.sum(num_neg) - 2.0 * class_neg
    # quadruplets exist only where some negative pair avoids the anchor's class
    queries_ok = positive & (count2_each > 0)[:, None]
    queries = dist + margin2
    hinge_all = row_hinge_total(dist.reshape(1, -1), negative.reshape(1, -1), queries.reshape(1, -1),
                                 queries_ok.reshape(1, -1), center)
    row_class = jnp.broadcast_to(classes[:, None], (n, n))
    entry_seg = jnp.where(negative, row_class, n).reshape(-1)
    query_seg = jnp.where(queries_ok, row_class, n).reshape(-1)
    hinge_cls = segment_hinge_total(dist.reshape(-1), entry_seg, queries.reshape(-1), query_seg, center, n)
    sum2 = hinge_all - 2.0 * hinge_cls
    if reduction == "sum":
        return sum1 + sum2
    count2 = jnp.sum(jnp.where(positive, count2_each[:, None], 0.0))
    return sum1 / jnp.maximum(count1, 1.0) + sum2 / jnp.maximum(count2, 1.0)


def _quadruplet_hard(dist, labels, positive, negative, margin1, margin2, reduction):
    big = jnp.asarray(jnp.finfo(dist.dtype).max, dist.dtype)
    has_pos = jnp.any(positive, axis=1)
    has_neg = jnp.any(negative, axis=1)
    hardest_pos = jnp.max(jnp.where(positive, dist, 0.0), axis=1)
    hardest_neg = jnp.min(jnp.where(negative, dist, big), axis=1)
    # For row l, the closest negative k (class c1) and the closest negative of another class
    # than c1: the closest negative of l outside any class c is one of the two.
    classes = class_ids(labels)
    neg_dist = jnp.where(negative, dist, big)
    first_col = jnp.argmin(neg_dist, axis=1)
    first_val = jnp.min(neg_dist, axis=1)
    first_cls = classes[first_col]
    second_val = jnp.min(jnp.where(classes[None, :] == first_cls[:, None], big, neg_dist), axis=1)
    # row_best[i, l]: closest negative pair (l, k) with y_l != y_i and y_k != y_i
    row_best = jnp.where(first_cls[None, :] == classes[:, None], second_val[None, :], first_val[None, :])
    row_ok = negative  # l must be a valid item of another class than i
    pair_neg = jnp.min(jnp.where(row_ok, row_best, big), axis=1)
    has_quad = has_pos & (pair_neg < big)
    safe_pair_neg = jnp.where(has_quad, pair_neg, 0.0)
    safe_neg = jnp.where(has_neg, hardest_neg, 0.0)
    term1 = jnp.where(has_pos & has_neg, jax.nn.relu(hardest_pos - safe_neg + margin1), 0.0)
    term2 = jnp.where(has_quad, jax.nn.relu(hardest_pos - safe_pair_neg + margin2), 0.0)
    return (reduce_loss(term1, has_pos & has_neg, reduction=reduction)
            + reduce_loss(term2, has_quad, reduction=reduction))


# ----------------------------------------------------------------------------- ranked list


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_weighted_mean(values, mask, temperature):
    """Per row: ``sum_j p_j v_j`` with ``p = softmax(temperature * v)`` over the masked entries
    of ``values`` [B, M] (0 for an empty row), the weights differentiated through.

    The gradient, ``dL/dv_j = p_j (1 + temperature (v_j - L))``, is written out (one fused
    pass over B x M instead of the many reductions autodiff of the masked softmax makes).
    """
    return _softmax_weighted_mean_fwd(values, mask, temperature)[0]


def _softmax_weighted_mean_fwd(values, mask, temperature):
    scaled = temperature * values
    shift = jnp.max(jnp.where(mask, scaled, -jnp.inf), axis=1, keepdims=True)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    weights = jnp.where(mask, jnp.exp(jnp.where(mask, scaled - shift, 0.0)), 0.0)
    total = jnp.sum(weights, axis=1)
    safe_total = jnp.where(total > 0, total, 1.0)
    mean = jnp.sum(weights * jnp.where(mask, values, 0.0), axis=1) / safe_total
    return mean, (values, mask, shift, safe_total, mean)


def _softmax_weighted_mean_bwd(temperature, residuals, g):
    values, mask, shift, safe_total, mean = residuals
    p = jnp.where(mask, jnp.exp(jnp.where(mask, temperature * values - shift, 0.0)), 0.0) / safe_total[:, None]
    d_values = g[:, None] * p * (1.0 + temperature * (values - mean[:, None]))
    return jnp.where(mask, d_values, 0.0), None


_softmax_weighted_mean.defvjp(_softmax_weighted_mean_fwd, _softmax_weighted_mean_bwd)




def ranked_list_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.4,
    boundary: float = 1.2,
    temperature: float = 10.0,
    temperature_pos: float = 0.0,
    lambda_balance: float = 0.5,
    reduction: str = "mean",
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Ranked list loss (Wang, Hua, Kodirov, Hu, Garnier & Robertson, CVPR 2019, arXiv 1903.03238).

    With euclidean distances d, boundary alpha and margin m, per anchor i::

        P*_i = {j : y_j = y_i, j != i, d_ij > alpha - m}     (positives outside alpha - m)
        N*_i = {j : y_j != y_i, d_ij < alpha}                (negatives inside alpha)
        L_P(i) = sum_{P*} w+_ij (d_ij - (alpha - m)) / sum_{P*} w+_ij,  w+ = exp(T_p (d - (alpha - m)))
        L_N(i) = sum_{N*} w-_ij (alpha - d_ij) / sum_{N*} w-_ij,        w- = exp(T_n (alpha - d))
        L(i) = (1 - lambda) L_P(i) + lambda L_N(i)

    averaged over anchors. T_p = 0 (``temperature_pos``) gives the CVPR paper's plain mean
    over P*; the weights are differentiated through (as PML). Defaults alpha = 1.2, m = 0.4,
    T_n = 10, lambda = 0.5 are the paper's SOP settings. Empty P* or N* gives 0 for that
    part. PML ``RankedListLoss(margin, Tn, imbalance, alpha, Tp)`` computes the same except
    that it adds 1e-5 per batch column to each denominator.

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float (the paper L2-normalises them first). labels: [B] int.
      reduction: "mean", "sum", "mean_nonzero" or "none" ([B] per anchor).
    """
    _check_reduction(reduction)
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(boundary, name="boundary", min_value=0.0)
    check_scalar(temperature, name="temperature", min_value=0.0)
    check_scalar(temperature_pos, name="temperature_pos", min_value=0.0)
    check_scalar(lambda_balance, name="lambda_balance", min_value=0.0, max_value=1.0)
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric="euclidean", valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    dist, positive, negative = ps.matrix, ps.positive, ps.negative
    pos_violation = dist - (boundary - margin)
    neg_violation = boundary - dist
    pos_set = positive & (pos_violation > 0)
    neg_set = negative & (neg_violation > 0)
    # softmax-weighted means of the violations (weights exp(T v), differentiated through)
    loss_pos = _softmax_weighted_mean(pos_violation, pos_set, float(temperature_pos))
    loss_neg = _softmax_weighted_mean(neg_violation, neg_set, float(temperature))
    values = (1.0 - lambda_balance) * loss_pos + lambda_balance * loss_neg
    return reduce_loss(values, ps.anchor_weight, reduction=reduction)


# ----------------------------------------------------------------------------- angular


def angular_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha_degrees: float = 40.0,
    reduction: str = "mean",
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Angular loss in N-pair form (Wang, Zhou, Wen, Liu & Lin, ICCV 2017, arXiv 1708.01682, eq. 8).

    On L2-normalised embeddings x, for every ordered positive pair (a, p)::

        f_apn = 4 tan^2(alpha) (x_a + x_p) . x_n - 2 (1 + tan^2(alpha)) x_a . x_p
        l(a, p) = log(1 + sum_{n in N(a)} exp(f_apn))

    averaged over positive pairs (PML ``AngularLoss``: all pairs, negatives are every item of
    another class). Default alpha = 40 degrees is within the paper's best range (36-55) and
    PML's default. The paper also adds the N-pair loss (lambda = 2); use `npair_loss` for it.
    The sum over n is a matrix product of masked exponentials (O(B^2) memory).

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float (normalised inside; zero vectors stay zero). labels: [B] int.
      alpha_degrees: in (0, 90). reduction: "mean", "sum", "mean_nonzero" or "none" ([B], per
        anchor the sum over its positive pairs). Negative pair weights select negatives (their
        support); positive pair weights scale the pair terms.  PML's ``AngularLoss`` with an ``indices_tuple``
        uses only its positive pairs (every item of another class stays a negative).
    """
    _check_reduction(reduction)
    check_scalar(alpha_degrees, name="alpha_degrees", min_value=0.0, max_value=90.0,
                 min_inclusive=False, max_inclusive=False)
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric="dot", valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights,
                  normalize=True)
    sim, negative = ps.matrix, ps.negative
    sq_tan = jnp.square(jnp.tan(jnp.deg2rad(alpha_degrees)))
    scale = 4.0 * sq_tan
    # log sum_n exp(scale (S_an + S_pn)) = log (A B^T)_ap with row-shifted exponentials;
    # N(a) = N(p) for a positive pair, so masking the anchor factor suffices.
    scaled = scale * sim
    has_negative = jnp.any(negative, axis=1)
    shift = jnp.max(jnp.where(negative, scaled, -jnp.inf), axis=1)
    shift = jax.lax.stop_gradient(jnp.where(has_negative, shift, 0.0))
    # both factors are masked: an unmasked same-class entry could overflow, and inf * 0 = NaN
    masked_exp = jnp.where(negative, jnp.exp(jnp.where(negative, scaled - shift[:, None], 0.0)), 0.0)
    if ps.self_form:
        other_part, other_shift = masked_exp, shift
    else:  # S_pn between references: [M, M], each row shifted by its maximum (no overflow)
        y = distances.l2_normalize(check_embeddings(ref_embeddings, name="ref_embeddings").astype(sim.dtype))
        if ref_valid is not None:
            y = jnp.where(jnp.asarray(ref_valid, bool)[:, None], y, 0.0)
        ref_scaled = scale * (y @ y.T)
        other_shift = jax.lax.stop_gradient(jnp.max(ref_scaled, axis=1))
        other_part = jnp.exp(ref_scaled - other_shift[:, None])
    total = masked_exp @ other_part.T
    tiny = jnp.finfo(total.dtype).tiny
    lse = jnp.log(jnp.maximum(total, tiny)) + shift[:, None] + other_shift[None, :]
    values = jax.nn.softplus(lse - 2.0 * (1.0 + sq_tan) * sim)
    values = jnp.where(has_negative[:, None], values, 0.0)
    weights = ps.pos_weight * ps.anchor_weight[:, None]
    if reduction == "none":
        return row_sum(values, weights)
    return reduce_loss(values, weights, reduction=reduction)
