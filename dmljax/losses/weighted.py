"""Pair-weighting losses: multi-similarity, margin (with distance-weighted sampling),
circle, and the log-ratio loss for continuous labels.

All are pure functions of static-shape [B, B] matrices (masks, not gathers), memory
O(B^2), float32 accumulation for bf16 inputs, finite loss and gradient on
degenerate batches (one class, no positive pair, identical or zero embeddings,
one item). ``valid`` [B] (optional bool) removes padded rows: a padded batch gives
the same loss as the unpadded one.

References:
  * Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning", CVPR 2019.
  * Wu et al., "Sampling Matters in Deep Embedding Learning", ICCV 2017.
  * Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity
    Optimization", CVPR 2020.
  * Kim et al., "Deep Metric Learning Beyond Binary Supervision", CVPR 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import distances
from dmljax._numerics import masked_logsumexp
from dmljax._validation import (
    check_label_range,
    as_float,
    check_choice,
    check_embeddings,
    check_key,
    check_labels,
    check_scalar,
    check_valid,
)
from dmljax.losses._core import check_loss_reduction, pair_set
from dmljax.mining.weighting import distance_weighted_sampling, multi_similarity_mining
from dmljax.reductions import reduce_loss

__all__ = ["circle_loss", "log_ratio_loss", "margin_loss", "multi_similarity_loss"]


# ----------------------------------------------------------------------------- helpers


def _pair_inputs(embeddings, labels, valid):
    x = check_embeddings(embeddings)
    y = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    return x, y, valid


def _row_weights(valid, batch, dtype):
    return jnp.ones((batch,), dtype) if valid is None else valid.astype(dtype)


# ----------------------------------------------------------------------------- multi-similarity


def multi_similarity_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    mining: bool = True,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Multi-similarity loss (Wang et al., CVPR 2019, Eq. 12) with its pair mining.

    With cosine similarities ``S`` and, per anchor ``a``, the mined positives P(a)
    and negatives N(a) (`dmljax.mining.weighting.multi_similarity_mining`):

        L_a = 1/alpha log(1 + sum_{p in P(a)} exp(-alpha (S_ap - base)))
            + 1/beta  log(1 + sum_{n in N(a)} exp( beta (S_an - base)))

    and the loss is the mean of L_a over the (valid) anchors (the paper's 1/m).
    Each term is a log-sum-exp with an extra zero logit (stable for beta = 50); an
    anchor whose mined set is empty contributes 0 for that term, as in PML.

    Defaults alpha=2, beta=50, base (the paper's lambda)=0.5, epsilon=0.1 are PML's
    ``MultiSimilarityLoss`` / ``MultiSimilarityMiner`` defaults. The paper reports
    alpha=2, beta=50, epsilon=0.1; the authors' released code (research-ms-loss) uses
    lambda=0.5 (``thresh``) with beta=40 in its default config. ``mining=False`` uses
    every positive and negative pair (PML's loss without a miner). The mining is not
    differentiated.

    Real pair weights w enter inside the sums (``log(1 + sum_p w_ap exp(...))``), sample
    weights outside (BSPML's denoising MS loss is ``pair_weights=v[None, :]``,
    ``sample_weights=v``). With ``mining=True`` the MS miner runs on the pairs left by
    ``pair_weights``.

    Differences from the authors' code (both follow PML): an anchor whose mined
    positive (or negative) set is empty still contributes its other term (their loop
    skips such anchors but still divides by the batch size), and items identical to
    the anchor (cosine 1) stay positives (their code drops S_ap > 1 - 1e-5).

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float (normalised inside: cosine similarity).
      labels: [B] integer class ids.
      valid: optional [B] bool mask of real rows.
      reduction: "mean" | "sum" | "mean_nonzero" | "none" over the per-anchor losses.

    Returns:
      scalar loss (or [B] per-anchor losses with ``reduction="none"``).
    """
    check_loss_reduction(reduction)
    check_scalar(alpha, name="alpha", min_value=0.0, min_inclusive=False)
    check_scalar(beta, name="beta", min_value=0.0, min_inclusive=False)
    check_scalar(base, name="base")
    check_scalar(epsilon, name="epsilon", min_value=0.0)
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric="cosine", valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    sim, positive, negative = ps.matrix, ps.positive, ps.negative
    if mining:
        positive, negative = multi_similarity_mining(sim, positive, negative, epsilon=epsilon)
    pos_term = masked_logsumexp(-alpha * (sim - base), positive, axis=1, weights=ps.pos_weight,
                                include_zero=True) / alpha
    neg_term = masked_logsumexp(beta * (sim - base), negative, axis=1, weights=ps.neg_weight,
                                include_zero=True) / beta
    return reduce_loss(pos_term + neg_term, ps.anchor_weight, reduction=reduction)


# ----------------------------------------------------------------------------- margin loss


def margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    beta: jax.Array,
    *,
    margin: float = 0.2,
    nu: float = 0.0,
    key: jax.Array | None = None,
    sampling: str = "distance_weighted",
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    num_negatives: int | None = None,
    normalize: bool = True,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """Margin loss with a learnable boundary beta (Wu et al., ICCV 2017, Eq. 3-4).

    With euclidean distances ``D_ij`` (between L2-normalised embeddings unless
    ``normalize=False``), ``y_ij = +1`` for positive pairs and -1 for negatives:

        l(i, j) = [margin + y_ij (D_ij - beta(i))]_+

    summed over every positive pair and over the sampled negatives of each anchor
    (with multiplicity), plus ``nu * sum_{(a, p) positive} beta(a)``, all divided by
    the number of pairs with non-zero loss (as in the authors' code and PML's
    ``DivisorReducer``; at least 1). ``beta(i)`` is ``beta`` when it is a scalar, or
    ``beta[labels[i]]`` (class-specific boundary of the anchor) when it has shape [C].

    Negatives: ``sampling="distance_weighted"`` draws them with
    `dmljax.mining.weighting.distance_weighted_sampling` (needs ``key``; by default
    one negative per positive pair, ``num_negatives=None``, as the authors and PML);
    ``sampling="all"`` uses every negative pair once: all PAIRS, not PML's all triplets (PML
    ``MarginLoss`` without a miner forms every (a, p, n) triplet, so a negative pair counts
    once per positive of its anchor there). Sampling is not differentiated; with
    ``pair_weights`` the sampled negatives are multiplied by the negative pair weights.

    Defaults margin=0.2 (alpha in the paper), nu=0, cutoff=0.5, nonzero_loss_cutoff=1.4
    are the paper's / authors' code values; the paper initialises beta to 1.2.

    Differences from PML (``MarginLoss`` + ``DistanceWeightedMiner``): PML draws the
    positive of each triplet at random (with replacement) and skips anchors whose
    negative weights are all zero; here every positive pair is used once and such
    anchors fall back to uniform negatives. With a scalar beta PML adds ``nu * beta``
    without dividing by the pair count; here the regulariser is always the authors'
    ``nu * sum over positive pairs of beta(anchor)`` divided by the pair count.

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float.
      labels: [B] integer class ids (in [0, C) when beta has shape [C]; under jit
        out-of-range rows are treated as padding, eager calls raise ValueError).
      beta: learnable boundary, scalar [] or per class [C]; differentiable.
      key: ``jax.random`` key for distance-weighted sampling.
      valid: optional [B] bool mask of real rows.

    Returns:
      scalar loss.
    """
    x, y, valid = _pair_inputs(embeddings, labels, valid)
    batch, dim = x.shape
    if ref_embeddings is not None and ref_labels is None:
        raise ValueError("ref_embeddings needs ref_labels (one label per reference row)")
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(nu, name="nu", min_value=0.0)
    check_choice(sampling, name="sampling", choices=("distance_weighted", "all"))
    beta_arr = as_float(beta, name="beta")
    if beta_arr.ndim > 1:
        raise ValueError(f"beta must be a scalar or a [num_classes] vector, got shape {beta_arr.shape}")
    if beta_arr.ndim == 1:
        num_classes = beta_arr.shape[0]
        if num_classes == 0:
            raise ValueError("beta must hold at least one class, got shape (0,)")
        check_label_range(y, num_classes, what=f"beta is per class, shape [{num_classes}]")
        in_range = (y >= 0) & (y < num_classes)
        valid = in_range if valid is None else valid & in_range
        anchor_beta = beta_arr[jnp.clip(y, 0, num_classes - 1)]
    else:
        anchor_beta = jnp.broadcast_to(beta_arr, (batch,))
    dtype = jnp.promote_types(x.dtype, beta_arr.dtype)
    x = x.astype(dtype)
    anchor_beta = anchor_beta.astype(dtype)
    ref = None if ref_embeddings is None else check_embeddings(ref_embeddings, name="ref_embeddings").astype(dtype)
    ps = pair_set(x, y, ref, ref_labels, metric="euclidean", valid=valid, ref_valid=ref_valid,
                  pair_weights=pair_weights, sample_weights=sample_weights, normalize=normalize)
    dist, positive, negative = ps.matrix, ps.positive, ps.negative
    if sampling == "all":
        neg_weight = ps.neg_weight
    else:
        key = check_key(key)
        neg_weight = distance_weighted_sampling(
            key, dist, positive, negative, dim=dim, cutoff=cutoff,
            nonzero_loss_cutoff=nonzero_loss_cutoff, num_negatives=num_negatives,
        ).astype(dtype) * ps.neg_weight
    pos_weight = ps.pos_weight
    if sample_weights is not None:
        pos_weight = pos_weight * ps.anchor_weight[:, None]
        neg_weight = neg_weight * ps.anchor_weight[:, None]
    pos_loss = jax.nn.relu(margin + dist - anchor_beta[:, None])
    neg_loss = jax.nn.relu(margin - dist + anchor_beta[:, None])
    total = jnp.sum(pos_weight * pos_loss) + jnp.sum(neg_weight * neg_loss)
    active = jnp.sum(pos_weight * (pos_loss > 0)) + jnp.sum(neg_weight * (neg_loss > 0))
    regulariser = nu * jnp.sum(pos_weight * anchor_beta[:, None])
    return (total + regulariser) / jnp.maximum(jax.lax.stop_gradient(active), 1.0)


# ----------------------------------------------------------------------------- circle loss


def circle_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    pair_weights=None,
    sample_weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Circle loss, pair-wise form (Sun et al., CVPR 2020, Eq. 6-8).

    With cosine similarities, per anchor the positives s_p and negatives s_n::

        alpha_p = [1 + m - s_p]_+,   alpha_n = [s_n + m]_+      (not differentiated)
        L_a = softplus( logsumexp_n gamma alpha_n (s_n - m)
                        + logsumexp_p -gamma alpha_p (s_p - (1 - m)) )

    i.e. O_p = 1 + m, O_n = -m, Delta_p = 1 - m, Delta_n = m. The loss averages L_a
    over the anchors that have at least one positive and one negative (PML's
    ``CircleLoss`` with its ``AvgNonZeroReducer``; softplus is positive).

    Defaults m=0.4, gamma=80 are the paper's fine-grained image retrieval setting
    (CUB, Cars, SOP) and PML's; the paper uses m=0.25, gamma=256 for face recognition.

    ``ref_embeddings`` / ``ref_labels`` / ``ref_valid``, ``pair_weights``, ``sample_weights``:
    the common arguments of the pair-based losses (`dmljax.losses`).

    Args:
      embeddings: [B, D] float (normalised inside).
      labels: [B] integer class ids.
      valid: optional [B] bool mask of real rows.
      reduction: "mean" | "sum" | "mean_nonzero" | "none" over per-anchor losses.
    """
    check_loss_reduction(reduction)
    check_scalar(m, name="m", min_value=0.0)
    check_scalar(gamma, name="gamma", min_value=0.0, min_inclusive=False)
    ps = pair_set(embeddings, labels, ref_embeddings, ref_labels, metric="cosine", valid=valid,
                  ref_valid=ref_valid, pair_weights=pair_weights, sample_weights=sample_weights)
    sim, positive, negative = ps.matrix, ps.positive, ps.negative
    detached = jax.lax.stop_gradient(sim)
    alpha_p = jax.nn.relu(1.0 + m - detached)
    alpha_n = jax.nn.relu(detached + m)
    logit_p = -gamma * alpha_p * (sim - (1.0 - m))
    logit_n = gamma * alpha_n * (sim - m)
    has_both = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
    lse_p = masked_logsumexp(logit_p, positive, axis=1, weights=ps.pos_weight)
    lse_n = masked_logsumexp(logit_n, negative, axis=1, weights=ps.neg_weight)
    per_anchor = jax.nn.softplus(jnp.where(has_both, lse_p + lse_n, 0.0))
    return reduce_loss(per_anchor, jnp.where(has_both, ps.anchor_weight, 0.0), reduction=reduction)


# ----------------------------------------------------------------------------- log-ratio loss


def log_ratio_loss(
    embeddings: jax.Array,
    targets: jax.Array,
    *,
    squared: bool = True,
    epsilon: float = 1e-6,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Log-ratio loss with dense triplet mining (Kim et al., CVPR 2019, Eq. 2).

    For continuous labels (targets) ``y`` and every triplet (a, i, j) of distinct
    items, with embedding and label distances ``D``:

        l(a, i, j) = ( log (D(f_a, f_i) + eps) / (D(f_a, f_j) + eps)
                       - log (D(y_a, y_i) + eps) / (D(y_a, y_j) + eps) )^2

    averaged over all triplets of the batch, each unordered pair {i, j} counted once
    (the paper orders it by D(y_a, y_i) < D(y_a, y_j); l is symmetric in i, j). Every
    item is an anchor (dense mining over the whole batch).

    O(B^2) instead of B^3: with ``w_ak = log(D(f_a,f_k)+eps) - log(D(y_a,y_k)+eps)``,
    ``l(a, i, j) = (w_ai - w_aj)^2`` and for an anchor with n others
    ``sum_{i<j} (w_ai - w_aj)^2 = n sum_k (w_ak - mean_a w)^2`` exactly.

    ``D`` is the squared euclidean distance as in the paper (``squared=False`` gives
    the plain distance, as the authors' released code); eps=1e-6 as in their code.
    The authors build each minibatch around one anchor and its nearest neighbours in
    label space and use only that anchor; here every row is an anchor (pass a batch
    built that way and the other anchors add more triplets of the same kind).

    Args:
      embeddings: [B, D] float.
      targets: [B, K] (or [B]) real-valued labels.
      valid: optional [B] bool mask of real rows.

    Returns:
      scalar loss; 0 when no anchor has two others.
    """
    x = check_embeddings(embeddings)
    batch = x.shape[0]
    t_shape = tuple(np.shape(targets))
    if len(t_shape) not in (1, 2):
        raise ValueError(f"targets must have shape [batch] or [batch, K], got {t_shape}")
    if t_shape[0] != batch:
        raise ValueError(f"targets has batch size {t_shape[0]} but the embeddings have {batch}")
    t_dtype = jnp.result_type(targets)
    if not (jnp.issubdtype(t_dtype, jnp.floating) or jnp.issubdtype(t_dtype, jnp.integer)):
        raise ValueError(f"targets must be real valued (float or int), got dtype {t_dtype}")
    t = jnp.asarray(targets).astype(x.dtype)
    if t.ndim == 1:
        t = t[:, None]
    if t.shape[1] == 0:
        raise ValueError(f"targets must have a non-empty label axis, got shape {t_shape}")
    valid = check_valid(valid, batch_size=batch)
    check_scalar(epsilon, name="epsilon", min_value=0.0, min_inclusive=False)
    if squared:
        d_f, d_y = distances.squared_euclidean(x), distances.squared_euclidean(t)
    else:
        d_f, d_y = distances.euclidean(x), distances.euclidean(t)
    w = jnp.log(d_f + epsilon) - jnp.log(d_y + epsilon)
    others = ~jnp.eye(batch, dtype=bool)
    if valid is not None:
        others = others & valid[:, None] & valid[None, :]
    n = jnp.sum(others, axis=1).astype(w.dtype)
    mean_w = jnp.sum(jnp.where(others, w, 0.0), axis=1) / jnp.maximum(n, 1.0)
    centered = jnp.where(others, w - mean_w[:, None], 0.0)
    pair_sums = n * jnp.sum(jnp.square(centered), axis=1)
    num_triplets = jnp.sum(n * (n - 1.0) / 2.0)
    return jnp.sum(pair_sums) / jnp.maximum(num_triplets, 1.0)
