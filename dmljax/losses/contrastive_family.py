"""Softmax-over-the-batch losses: SupCon, NT-Xent, NCA, soft nearest neighbour, multiple-negatives
ranking, the instance loss, the VICReg self-supervised objective, and TF-Similarity's PN loss.

Each is a pure function on the B x B similarity/distance matrix (or, for the instance loss,
the B x C class logits; for VICReg, the D x D feature covariances): no B x B x B tensor.
Soft maxima use masked ``logsumexp`` (`dmljax._numerics.masked_logsumexp`), so empty sets
(no positive, one class, one item) give 0 with a zero, finite gradient. Labels are integer
class ids [B]; an optional ``valid`` [B] mask removes padded rows and columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import distances
from dmljax._validation import check_choice, check_embeddings, check_scalar, check_valid
from dmljax.losses.classification import _check_common, _one_hot, _target
from dmljax.losses.classification import _prepare as _prepare_classes
from dmljax._numerics import masked_logsumexp
from dmljax.losses._core import check_mining, pair_set, row_sum
from dmljax.losses.pair import _check_reduction, _prepare
from dmljax.reductions import masked_mean, reduce_loss

__all__ = [
    "instance_loss",
    "multiple_negatives_ranking_loss",
    "nca_loss",
    "ntxent_loss",
    "pn_loss",
    "soft_nearest_neighbour_loss",
    "supcon_loss",
    "vicreg_loss",
]


def _check_temperature(temperature, name="temperature"):
    check_scalar(temperature, name=name, min_value=0.0, min_inclusive=False)


# ----------------------------------------------------------------------------- SupCon


def supcon_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.1,
    reduction: str = "mean",
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020, eq. 2 "L_out"; PML ``SupConLoss``).

    With cosine similarities ``s`` and, for anchor i, positives P_i and A_i = every other
    valid item::

        loss_i = -1 / |P_i| sum_{p in P_i} log( exp(s_ip / T) / sum_{a in A_i} exp(s_ia / T) )

    reduced over anchors with a positive. ``temperature`` 0.1 is PML's default (the paper
    uses 0.1 for its ResNet-50 results). Differences from PML: PML returns 0 when the whole
    batch has no negative, and its AvgNonZero reducer skips anchors whose loss is exactly 0;
    here the formula is applied as written (``reduction="mean_nonzero"`` gives PML's reducer).

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`); real
    pair weights scale the terms inside the softmax sums.
    """
    _check_temperature(temperature)
    _check_reduction(reduction)
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric="cosine", valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    positive = ps.positive
    logits = ps.matrix / temperature
    log_denominator = masked_logsumexp(logits, positive | ps.negative, axis=1, weights=ps.pos_weight + ps.neg_weight)
    log_prob = logits - log_denominator[:, None]
    mean_log_prob_pos = masked_mean(log_prob, ps.pos_weight, axis=1)
    has_pos = jnp.any(positive, axis=1)
    return reduce_loss(-mean_log_prob_pos, jnp.where(has_pos, ps.anchor_weight, 0.0), reduction=reduction)


# ----------------------------------------------------------------------------- NT-Xent


def ntxent_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.07,
    reduction: str = "mean",
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Supervised NT-Xent / InfoNCE (Chen et al., SimCLR, ICML 2020; Sohn 2016), as PML ``NTXentLoss``.

    Every ordered positive pair (a, p) is one softmax over the positive and the anchor's
    negatives N_a, with cosine similarities ``s``::

        loss_ap = -log( exp(s_ap / T) / (exp(s_ap / T) + sum_{n in N_a} exp(s_an / T)) )

    averaged over positive pairs (PML's ``pos_pair`` reduction). Unlike SupCon the other
    positives are not in the denominator. ``temperature`` 0.07 is PML's default (MoCo's value).
    With labels that pair each item with exactly one augmented view this is SimCLR's loss.

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`); real
    pair weights scale the terms inside the softmax sums.
    """
    _check_temperature(temperature)
    _check_reduction(reduction)
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric="cosine", valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    positive, negative = ps.positive, ps.negative
    logits = ps.matrix / temperature
    log_neg = masked_logsumexp(logits, negative, axis=1, weights=ps.neg_weight)
    has_neg = jnp.any(negative, axis=1)
    log_denominator = jnp.where(has_neg[:, None], jnp.logaddexp(logits, log_neg[:, None]), logits)
    values = jnp.where(positive, log_denominator - logits, 0.0)
    weights = ps.pos_weight * ps.anchor_weight[:, None]
    if reduction == "none":
        return row_sum(values, weights)
    return reduce_loss(values, weights, reduction=reduction)


# ----------------------------------------------------------------------------- NCA / SNN


def _neighbour_softmax_loss(x, positive, negative, scale, reduction):
    """-log sum_{j in P_i} softmax_{j != i}(-scale * |x_i - x_j|^2), over anchors with a positive."""
    logits = -scale * distances.squared_euclidean(x)
    log_pos = masked_logsumexp(logits, positive, axis=1)
    has_pos = jnp.any(positive, axis=1)
    log_all = masked_logsumexp(logits, positive | negative, axis=1)
    values = jnp.where(has_pos, log_all - log_pos, 0.0)
    return reduce_loss(values, has_pos.astype(x.dtype), reduction=reduction)


def nca_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    softmax_scale: float = 1.0,
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Neighbourhood components analysis (Goldberger, Roweis, Hinton & Salakhutdinov, NIPS 2004).

    Stochastic nearest-neighbour probabilities over the batch (i excluded)::

        p_ij   = exp(-scale |x_i - x_j|^2) / sum_{k != i} exp(-scale |x_i - x_k|^2)
        loss_i = -log sum_{j in P_i} p_ij

    reduced over anchors with a positive (PML ``NCALoss``, which drops anchors whose
    probability is 0). The log of the summed probability is the paper's f_ML objective (eq. 6);
    ``softmax_scale`` 1 is PML's default. The embeddings are used as given (PML's default
    distance normalises them; pass normalised embeddings for the same value).
    """
    check_scalar(softmax_scale, name="softmax_scale", min_value=0.0, min_inclusive=False)
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    return _neighbour_softmax_loss(x, positive, negative, softmax_scale, reduction)


def soft_nearest_neighbour_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Soft nearest neighbour loss (Frosst, Papernot & Hinton, ICML 2019, eq. 1; TF-Similarity
    ``SoftNearestNeighborLoss``)::

        loss_i = -log( sum_{j != i, y_j = y_i} exp(-|x_i - x_j|^2 / T)
                       / sum_{k != i} exp(-|x_i - x_k|^2 / T) )

    averaged over anchors with a positive (the paper's formula is -inf for an anchor without
    one; TF-Similarity adds 1e-9 inside the log instead). ``temperature`` 1 is TF-Similarity's
    default. This is `nca_loss` with ``softmax_scale = 1 / temperature``.
    """
    _check_temperature(temperature)
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    return _neighbour_softmax_loss(x, positive, negative, 1.0 / temperature, reduction)


# ----------------------------------------------------------------------------- MNRL


def multiple_negatives_ranking_loss(
    anchors: jax.Array,
    positives: jax.Array,
    *,
    scale: float = 20.0,
    symmetric: bool = False,
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Multiple negatives ranking loss (Henderson et al., "Efficient Natural Language Response
    Suggestion for Smart Reply", 2017; sentence-transformers ``MultipleNegativesRankingLoss``).

    Aligned pairs (anchors[i], positives[i]); every other positive in the batch is a negative
    of anchor i. With cosine similarities ``s_ij = cos(a_i, p_j)``::

        loss_i = -log( exp(scale s_ii) / sum_j exp(scale s_ij) )

    ``scale`` 20 is sentence-transformers' default. ``symmetric=True`` averages with the
    positive -> anchor direction (sentence-transformers ``MultipleNegativesSymmetricRankingLoss``).

    Args:
      anchors, positives: [B, D] float. valid: optional [B] bool (padded pairs are neither
        anchors nor negatives).
    """
    a = check_embeddings(anchors, name="anchors")
    p = check_embeddings(positives, name="positives")
    if p.shape != a.shape:
        raise ValueError(f"positives must have the shape of anchors {a.shape}, got {p.shape}")
    check_scalar(scale, name="scale", min_value=0.0, min_inclusive=False)
    _check_reduction(reduction)
    n = a.shape[0]
    valid = check_valid(valid, batch_size=n)
    rows = jnp.ones((n,), bool) if valid is None else valid
    columns = jnp.broadcast_to(rows[None, :], (n, n))
    logits = scale * distances.cosine_similarity(a, p)

    def direction(mat):
        lse = masked_logsumexp(mat, columns, axis=1)
        return jnp.where(rows, lse - jnp.diagonal(mat), 0.0)

    values = direction(logits)
    if symmetric:
        values = 0.5 * (values + direction(logits.T))
    return reduce_loss(values, rows.astype(a.dtype), reduction=reduction)


# ----------------------------------------------------------------------------- instance loss


def instance_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    scale: float = 1.0,
    normalize: bool = False,
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Instance loss (Zheng, Zheng, Garrett, Yang, Xu & Shen, "Dual-Path Convolutional
    Image-Text Embeddings with Instance Loss", ACM TOMM 2020, eq. 1-2).

    Every training instance (an image and its captions) is its own class; a shared linear
    classifier ``weights`` [C, D] (rows = instances) is trained with softmax cross entropy::

        loss_i = -log softmax(scale * <x_i, w_c>)_{labels_i}

    The paper uses a plain fully connected layer (``normalize=False, scale=1``).
    ``normalize=True`` uses cosines ``scale * cos(x_i, w_c)``; PML ``InstanceLoss(gamma)``
    is this with ``weights = embeddings`` (the batch itself as classifier), ``scale = gamma``,
    ``normalize=True`` and labels replaced by their rank among the batch's unique labels.

    Labels outside [0, C) raise ``ValueError`` when concrete; under jit their rows get
    weight 0. Args: embeddings [B, D], labels [B] int, weights [C, D], valid [B] optional.
    """
    _check_common(scale, reduction)
    x, labels, w, row_weights = _prepare_classes(embeddings, labels, weights, valid)
    if normalize:
        logits = scale * distances.cosine_similarity(x, w)
    else:
        logits = scale * (x @ w.T)
    target = _one_hot(labels, w.shape[0])
    values = jax.nn.logsumexp(logits, axis=1) - _target(logits, target)
    return reduce_loss(values, row_weights, reduction=reduction)


# ----------------------------------------------------------------------------- VICReg


def vicreg_loss(
    z1: jax.Array,
    z2: jax.Array,
    *,
    invariance: float = 25.0,
    variance: float = 25.0,
    covariance: float = 1.0,
    eps: float = 1e-4,
) -> jax.Array:
    """VICReg (Bardes, Ponce & LeCun, ICLR 2022, eq. 1-6 and Algorithm 1; PML ``VICRegLoss``).

    For two [B, D] batches of embeddings of two views::

        s(Z, Z') = 1/B sum_i ||z_i - z'_i||^2 / D                (mean squared error)
        v(Z)     = 1/D sum_d max(0, 1 - sqrt(Var(z_.d) + eps))   (unbiased variance)
        c(Z)     = 1/D sum_{d != e} Cov(Z)_de^2                  (unbiased covariance)
        loss     = invariance * s + variance * (v(Z) + v(Z')) / 2 + covariance * (c(Z) + c(Z'))

    The ``/ 2`` on the variance term is the paper's Algorithm 1 and PML. Defaults
    lambda = mu = 25, nu = 1, eps = 1e-4 are the paper's. With B = 1 the variance and
    covariance use the divisor max(B - 1, 1) (torch would give NaN); constant features give
    std = sqrt(eps), so values and gradients stay finite.
    """
    z1 = check_embeddings(z1, name="z1")
    z2 = check_embeddings(z2, name="z2")
    if z2.shape != z1.shape:
        raise ValueError(f"z2 must have the shape of z1 {z1.shape}, got {z2.shape}")
    for value, name in ((invariance, "invariance"), (variance, "variance"), (covariance, "covariance")):
        check_scalar(value, name=name, min_value=0.0)
    check_scalar(eps, name="eps", min_value=0.0, min_inclusive=False)
    dtype = jnp.promote_types(z1.dtype, z2.dtype)
    z1, z2 = z1.astype(dtype), z2.astype(dtype)
    n, d = z1.shape
    denominator = float(max(n - 1, 1))
    off_diagonal = ~np.eye(d, dtype=bool)

    def var_cov(z):
        centred = z - jnp.mean(z, axis=0)
        cov = centred.T @ centred / denominator
        std = jnp.sqrt(jnp.diagonal(cov) + eps)
        v = jnp.mean(jax.nn.relu(1.0 - std))
        c = jnp.sum(jnp.where(off_diagonal, cov, 0.0) ** 2) / d
        return v, c

    v1, c1 = var_cov(z1)
    v2, c2 = var_cov(z2)
    sim = jnp.mean(jnp.square(z1 - z2))
    return invariance * sim + variance * 0.5 * (v1 + v2) + covariance * (c1 + c2)


# ----------------------------------------------------------------------------- PN loss

_PN_DISTANCES = {
    "cosine_distance": lambda x: 1.0 - distances.cosine_similarity(x),
    "euclidean": distances.euclidean,
    "squared_euclidean": distances.squared_euclidean,
}


def pn_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 1.0,
    soft_margin: bool = False,
    metric: str = "cosine_distance",
    positive_mining: str = "hard",
    negative_mining: str = "semihard",
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """PN loss (Szubert, Cole, Monaco & Drozdov, ivis, Sci. Rep. 2019; TF-Similarity ``PNLoss``).

    A triplet loss in which the negative must be far from *both* the anchor and the positive:
    for every anchor a, one mined positive p and one mined negative n,

        d_neg  = min(d(a, n), d(p, n))
        loss_a = max(0, margin + d(a, p) - d_neg)       (soft_margin: log(1 + exp(d(a, p) - d_neg)))

    reduced over anchors with a positive and a negative. Mining (TF-Similarity's options):
    ``positive_mining`` "hard" (farthest positive) | "easy" (closest); ``negative_mining``
    "hard" (closest negative) | "easy" (farthest) | "semihard" (formerly "semi-hard"; the closest negative farther
    than the anchor's farthest positive, else the farthest negative). ``metric``:
    "cosine_distance" (``1 - cos``; formerly spelled "cosine", which names the similarity in
    every other loss), "euclidean" or "squared_euclidean". Defaults (margin 1, cosine distance, hard positives, semi-hard negatives) are TF-Similarity's.
    Indices are picked with ``argmax`` / ``argmin`` (static shapes); gradients flow through the
    selected distances only, as in TF-Similarity. Memory O(B^2).
    """
    check_scalar(margin, name="margin", min_value=0.0)
    check_mining(metric, tuple(_PN_DISTANCES), name="metric", renames={"cosine": "cosine_distance"})
    check_mining(positive_mining, ("hard", "easy"), name="positive_mining")
    check_mining(negative_mining, ("hard", "semihard", "easy"), name="negative_mining")
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    dist = _PN_DISTANCES[metric](x)
    blocked = jax.lax.stop_gradient(dist)  # the mining decisions carry no gradient
    big = jnp.asarray(jnp.finfo(dist.dtype).max, dist.dtype)
    farthest_pos = jnp.argmax(jnp.where(positive, blocked, -big), axis=1)
    closest_pos = jnp.argmin(jnp.where(positive, blocked, big), axis=1)
    pos_idx = farthest_pos if positive_mining == "hard" else closest_pos
    closest_neg = jnp.argmin(jnp.where(negative, blocked, big), axis=1)
    farthest_neg = jnp.argmax(jnp.where(negative, blocked, -big), axis=1)
    if negative_mining == "hard":
        neg_idx = closest_neg
    elif negative_mining == "easy":
        neg_idx = farthest_neg
    else:
        max_pos = jnp.max(jnp.where(positive, blocked, -big), axis=1, keepdims=True)
        candidates = negative & (blocked > max_pos)
        semi_hard = jnp.argmin(jnp.where(candidates, blocked, big), axis=1)
        neg_idx = jnp.where(jnp.any(candidates, axis=1), semi_hard, farthest_neg)
    d_ap = jnp.take_along_axis(dist, pos_idx[:, None], axis=1)[:, 0]
    d_an = jnp.take_along_axis(dist, neg_idx[:, None], axis=1)[:, 0]
    d_pn = jnp.take_along_axis(dist[pos_idx], neg_idx[:, None], axis=1)[:, 0]
    d_neg = jnp.minimum(d_an, d_pn)
    if soft_margin:
        values = jax.nn.softplus(d_ap - d_neg)
    else:
        values = jax.nn.relu(margin + d_ap - d_neg)
    weights = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
    return reduce_loss(values, weights.astype(x.dtype), reduction=reduction)
