"""Margin-family losses of PyTorch Metric Learning: tuplet margin, intra-pair variance,
signal-to-noise-ratio contrastive (with the SNR distance), threshold-consistent margin (TCM),
P2SGrad, dynamic soft margin (DSM, explicit histogram state) and the manifold loss.

All are pure functions of arrays (embeddings [B, D], integer labels [B], learnable arrays) with
keyword-only configuration; memory is O(B^2) (O((B + K)^2) for the manifold loss), computation
runs in >= float32, and degenerate batches give a finite loss and gradient.

A weighted combination of several losses is `dmljax.losses.structured.combine_losses`
(PML ``MultipleLosses``); it is not duplicated here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import distances
from dmljax._numerics import masked_logsumexp
from dmljax._validation import (
    check_embeddings,
    check_labels,
    check_matrix,
    check_scalar,
    check_valid,
)
from dmljax.losses._core import check_loss_reduction as _check_reduction
from dmljax.losses._core import row_sum
from dmljax.masks import label_masks
from dmljax.reductions import reduce_loss

__all__ = [
    "dynamic_soft_margin_loss",
    "intra_pair_variance_loss",
    "manifold_loss",
    "p2sgrad_loss",
    "snr_contrastive_loss",
    "snr_distance",
    "threshold_consistent_margin_loss",
    "tuplet_margin_loss",
]


def _prepare(embeddings, labels, valid):
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    positive, negative = label_masks(labels, valid=valid)
    return x, labels, valid, positive, negative


# --------------------------------------------------------------------------- tuplet margin


def tuplet_margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 5.73,
    scale: float = 64.0,
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Tuplet margin loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019).

    With cosine similarities ``s`` of the (internally L2-normalised) embeddings and
    ``theta_ap = arccos(s_ap)``, for every positive pair (a, p)::

        L_ap = log(1 + sum_{n: y_n != y_a} exp(scale * (s_an - cos(theta_ap - m))))

    where ``m = radians(margin)``; ``cos(theta - m) = s cos m + sqrt(1 - s^2) sin m`` (so the
    gradient stays finite at s = +-1). The per-pair values are reduced over positive pairs
    (``reduction="mean"`` = PML ``TupletMarginLoss`` default MeanReducer).

    Defaults from the paper / PML: ``margin = 5.73`` degrees (0.1 rad), ``scale = 64``.
    The paper's intra-pair variance term is `intra_pair_variance_loss` (combine with
    `dmljax.losses.structured.combine_losses`).

    Args:
      embeddings: [B, D] floating. labels: [B] int. valid: optional bool [B] (padding).
    Returns:
      scalar loss (or [B] per-anchor sums over its positive pairs with ``reduction="none"``).
    """
    x, _, _, positive, negative = _prepare(embeddings, labels, valid)
    check_scalar(margin, name="margin", min_value=0.0, max_value=90.0)
    check_scalar(scale, name="scale", min_value=0.0, min_inclusive=False)
    _check_reduction(reduction)
    s = jnp.clip(distances.cosine_similarity(x), -1.0, 1.0)
    m = math.radians(margin) if isinstance(margin, (int, float)) else jnp.radians(margin)
    sin_ap = distances.safe_sqrt(1.0 - jnp.square(s))
    shifted_pos = s * jnp.cos(m) + sin_ap * jnp.sin(m)  # cos(theta_ap - m)
    # logits[a, p, n] would be B^3; log-sum-exp factorises per anchor instead:
    # sum_n exp(scale (s_an - c_ap)) = exp(-scale c_ap) * sum_n exp(scale s_an).
    neg_logits = scale * s
    lse_neg = _masked_lse(neg_logits, negative)  # [B] log sum_n exp(scale s_an), -inf if none
    has_neg = jnp.any(negative, axis=1)
    inner = jnp.where(has_neg[:, None], lse_neg[:, None] - scale * shifted_pos, -jnp.inf)
    per_pair = jnp.where(has_neg[:, None], jax.nn.softplus(jnp.where(has_neg[:, None], inner, 0.0)), 0.0)
    if reduction == "none":
        return row_sum(per_pair, positive.astype(per_pair.dtype))
    return reduce_loss(per_pair, positive, reduction=reduction)


def _masked_lse(logits, mask):
    """Row-wise logsumexp over ``mask`` ([B]); -inf where a row is empty, finite gradient."""
    has = jnp.any(mask, axis=1)
    peak = jax.lax.stop_gradient(jnp.max(jnp.where(mask, logits, -jnp.inf), axis=1))
    peak = jnp.where(has, peak, 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, logits, 0.0) - peak[:, None]), 0.0), axis=1)
    safe_total = jnp.where(has, total, 1.0)
    return jnp.where(has, jnp.log(safe_total) + peak, -jnp.inf)


# --------------------------------------------------------------------------- intra-pair variance


def intra_pair_variance_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    pos_eps: float = 0.01,
    neg_eps: float = 0.01,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Intra-pair variance loss (Yu & Tao, ICCV 2019, eq. 9), PML ``IntraPairVarianceLoss``.

    With cosine similarities ``s`` and the means over positive / negative pairs
    ``E[s_p]``, ``E[s_n]`` (the means keep their gradient, as in PML)::

        L = mean_{pos pairs} [(1 - pos_eps) E[s_p] - s_ap]_+^2
          + mean_{neg pairs} [s_an - (1 + neg_eps) E[s_n]]_+^2

    Defaults ``pos_eps = neg_eps = 0.01`` are PML's. Ordered pairs (a, p) and (p, a) both count,
    as in PML. Args: embeddings [B, D]; labels [B] int; valid optional bool [B].
    """
    x, _, _, positive, negative = _prepare(embeddings, labels, valid)
    check_scalar(pos_eps, name="pos_eps", min_value=0.0, max_value=1.0)
    check_scalar(neg_eps, name="neg_eps", min_value=0.0)
    s = distances.cosine_similarity(x)
    total = 0.0
    for mask, sign, eps in ((positive, 1.0, -pos_eps), (negative, -1.0, neg_eps)):
        w = mask.astype(s.dtype)
        mean = jnp.sum(w * s) / jnp.maximum(jnp.sum(w), 1.0)
        # positives: (1 - eps) mean - s ; negatives: s - (1 + eps) mean
        gap = sign * ((1.0 + eps) * mean - s)
        total = total + reduce_loss(jnp.square(jax.nn.relu(gap)), w, reduction="mean")
    return total


# --------------------------------------------------------------------------- SNR


def snr_distance(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """Signal-to-noise-ratio distance (Yuan et al., "Signal-to-Noise Ratio: A Robust Distance
    Metric for Deep Metric Learning", CVPR 2019, eq. 5), PML ``SNRDistance``::

        d_SNR(x_i, y_j) = var(y_j - x_i) / var(x_i)

    (variance over the feature axis; the 1/D vs 1/(D-1) normalisation cancels). It is
    computed from the centered vectors ``c = x - mean(x)``: ``|c_i - c'_j|^2 / |c_i|^2`` with
    one matrix product (O(B M) memory). A constant (zero-variance) anchor divides by a tiny
    floor instead of 0, so the value stays finite. [B, D], [M, D] -> [B, M]; not symmetric.
    """
    x = check_embeddings(x, name="x")
    cx = x - jnp.mean(x, axis=1, keepdims=True)
    if y is None:
        num = distances.squared_euclidean(cx)
    else:
        y = check_embeddings(y, name="y")
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y must have feature dim {x.shape[1]} like x, got shape {y.shape}")
        cy = y - jnp.mean(y, axis=1, keepdims=True)
        num = distances.squared_euclidean(cx, cy)
    anchor_var = jnp.sum(jnp.square(cx), axis=1, keepdims=True)
    return num / jnp.maximum(anchor_var, 1e-12)


def snr_contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    regularizer_weight: float = 0.1,
    reduction: str = "mean_nonzero",
    valid: jax.Array | None = None,
) -> jax.Array:
    """SNR-based contrastive loss (Yuan et al., CVPR 2019, eqs. 7-8), PML
    ``SignalToNoiseRatioContrastiveLoss`` (= ContrastiveLoss with `snr_distance`)::

        L = red_{pos pairs} [d_ap - pos_margin]_+ + red_{neg pairs} [neg_margin - d_an]_+
            + regularizer_weight * mean_i |sum_k x_ik|

    ``red`` is ``reduction`` applied separately to positives and negatives (default
    "mean_nonzero" = PML's AvgNonZeroReducer). The last term is the paper's zero-mean
    regulariser (eq. 8, lambda = 0.1 in the paper), PML ``ZeroMeanRegularizer`` with
    ``embedding_reg_weight=regularizer_weight``; set it to 0 for PML's bare loss.
    Defaults: pos_margin 0, neg_margin 1 (PML ContrastiveLoss). Embeddings are not normalised.
    """
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    check_scalar(pos_margin, name="pos_margin", min_value=0.0)
    check_scalar(neg_margin, name="neg_margin", min_value=0.0)
    check_scalar(regularizer_weight, name="regularizer_weight", min_value=0.0)
    _check_reduction(reduction, ("mean", "sum", "mean_nonzero"))
    d = snr_distance(x)
    pos = reduce_loss(jax.nn.relu(d - pos_margin), positive, reduction=reduction)
    neg = reduce_loss(jax.nn.relu(neg_margin - d), negative, reduction=reduction)
    row_w = None if valid is None else valid.astype(x.dtype)
    reg = reduce_loss(jnp.abs(jnp.sum(x, axis=1)), row_w, reduction="mean")
    return pos + neg + regularizer_weight * reg


# --------------------------------------------------------------------------- TCM


def threshold_consistent_margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    lambda_plus: float = 1.0,
    lambda_minus: float = 1.0,
    margin_plus: float = 0.9,
    margin_minus: float = 0.5,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Threshold-consistent margin loss (Zhang et al., "Threshold-Consistent Margin Loss for
    Open-World Deep Metric Learning", arXiv 2307.04047, ICLR 2024), PML
    ``ThresholdConsistentMarginLoss``.

    With cosine similarities ``s`` (embeddings L2-normalised inside)::

        L = lambda_plus  * sum_{pos, s <= m+} (m+ - s) / max(#{pos, s <= m+}, 1)
          + lambda_minus * sum_{neg, s >= m-} (s - m-) / max(#{neg, s >= m-}, 1)

    The paper adds this term to a base DML loss as a regulariser (combine with
    `dmljax.losses.structured.combine_losses`); alone it is PML's standalone loss.
    Defaults (lambda+ = lambda- = 1, m+ = 0.9, m- = 0.5) are PML's / the paper's.
    """
    x, _, _, positive, negative = _prepare(embeddings, labels, valid)
    for name, value in (("lambda_plus", lambda_plus), ("lambda_minus", lambda_minus)):
        check_scalar(value, name=name, min_value=0.0)
    check_scalar(margin_plus, name="margin_plus", min_value=-1.0, max_value=1.0)
    check_scalar(margin_minus, name="margin_minus", min_value=-1.0, max_value=1.0)
    s = distances.cosine_similarity(x)
    pos_active = positive & (s <= margin_plus)
    neg_active = negative & (s >= margin_minus)
    pos = reduce_loss(margin_plus - s, pos_active, reduction="mean")
    neg = reduce_loss(s - margin_minus, neg_active, reduction="mean")
    return lambda_plus * pos + lambda_minus * neg


# --------------------------------------------------------------------------- P2SGrad


def p2sgrad_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    valid: jax.Array | None = None,
) -> jax.Array:
    """P2SGrad loss (Zhang et al., "P2SGrad: Refined Gradients for Optimizing Deep Face
    Models", CVPR 2019, eq. 11), PML ``P2SGradLoss``.

    The paper's gradient equals that of a mean squared error between cosines and one-hot
    targets::

        L = 1 / (B C) sum_i sum_c (cos theta_ic - [c == y_i])^2,
        cos theta_ic = <x_i, w_c> / (|x_i| |w_c|)   (clipped to [-1, 1])

    Args:
      embeddings: [B, D]; labels: [B] int class ids in [0, C) (out-of-range ids match no
        class: their target row is all zero); weights: [C, D] class weights (PML stores the
        transpose [D, C] and renormalises it in place to unit columns before each call;
        here the normalisation is part of the function, so its Jacobian is in the gradient).
      valid: optional bool [B]; padded rows are excluded from the mean.
    """
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    w = check_matrix(weights, name="weights", shape=(None, x.shape[1]))
    cos = jnp.clip(distances.cosine_similarity(x, w), -1.0, 1.0)
    target = jax.nn.one_hot(labels, w.shape[0], dtype=cos.dtype)
    per_row = jnp.mean(jnp.square(cos - target), axis=1)
    row_w = None if valid is None else valid.astype(cos.dtype)
    return reduce_loss(per_row, row_w, reduction="mean")


# --------------------------------------------------------------------------- dynamic soft margin


def _dsm_bins(t, min_val, delta, num_bins):
    position = (t - min_val) / delta
    idx = jnp.floor(position)
    frac = position - idx
    return jnp.clip(idx.astype(jnp.int32), 0, num_bins - 1), idx.astype(jnp.int32), frac


def dynamic_soft_margin_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    histogram: jax.Array,
    *,
    min_val: float = -2.0,
    num_bins: int = 10,
    momentum: float = 0.01,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dynamic soft margin loss (Zhang & Rusinkiewicz, "Learning Local Descriptors with a
    CDF-Based Dynamic Soft Margin", ICCV 2019), PML ``DynamicSoftMarginLoss`` with labels.

    Over all triplets (a, p, n) with euclidean distances of the L2-normalised embeddings,
    ``t = d_ap - d_an`` (in [-2, 2]). A running histogram ``h`` of ``t`` over ``num_bins`` bins of
    width ``delta = 2 |min_val| / num_bins`` starting at ``min_val`` is updated with linear
    interpolation (each t adds ``1 - frac`` to its bin and ``frac`` to the next)::

        h' = normalise((1 - momentum) h + momentum * hist(t))   (momentum = 1 if sum(h) = 0)
        L  = mean_triplets CDF_{h'}(bin(t)) * t

    The histogram is explicit functional state: pass ``jnp.zeros(num_bins)`` first, then the
    returned one. Deviations from PML (documented): the CDF weight carries no gradient (the
    paper treats it as a weight; PML back-propagates through the interpolation fractions), bin
    indices are clipped to [0, num_bins) and the ``frac`` of the top bin is dropped (PML would
    index out of range at t = 2 exactly); a batch without triplets returns 0 and the histogram
    unchanged. PML's label-free (paired patches) mode is not provided.

    Memory O(B^2): anchors are processed one at a time with ``lax.map`` outside the gradient;
    the loss is a constant-weighted sum of the pair distances (time O(B^3), memory O(B^2)).
    Defaults (min_val -2, num_bins 10, momentum 0.01) are PML's / the paper's.

    Returns:
      (loss scalar, new histogram [num_bins]).
    """
    x, _, _, positive, negative = _prepare(embeddings, labels, valid)
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    check_scalar(min_val, name="min_val", max_value=0.0, max_inclusive=False)
    check_scalar(momentum, name="momentum", min_value=0.0, max_value=1.0)
    hist = check_matrix(histogram, name="histogram", shape=(num_bins,))
    delta = 2.0 * abs(min_val) / num_bins
    d = distances.euclidean(distances.l2_normalize(x))
    count = jnp.sum(jnp.sum(positive, 1, dtype=d.dtype) * jnp.sum(negative, 1, dtype=d.dtype))
    d_const = jax.lax.stop_gradient(d)

    def anchor_hist(args):
        row, pos, neg = args
        t = row[:, None] - row[None, :]  # [p, n]
        w = (pos[:, None] & neg[None, :]).astype(row.dtype)
        bin_clip, bin_raw, frac = _dsm_bins(t, min_val, delta, num_bins)
        upper_ok = (bin_raw + 1 >= 0) & (bin_raw + 1 < num_bins)
        # scatter-adds (bincount), O(M^2) per anchor; no [M, M, num_bins] one-hot
        lower = jnp.bincount(bin_clip.reshape(-1), (w * (1.0 - frac)).reshape(-1), length=num_bins)
        upper = jnp.bincount(jnp.clip(bin_raw + 1, 0, num_bins - 1).reshape(-1),
                             (w * frac * upper_ok).reshape(-1), length=num_bins)
        return lower + upper

    batch_hist = jnp.sum(jax.lax.map(anchor_hist, (d_const, positive, negative)), axis=0)
    has_hist = jnp.sum(hist) != 0
    mom = jnp.where(has_hist, momentum, 1.0)
    new_hist = (1.0 - mom) * hist + mom * batch_hist
    total = jnp.sum(new_hist)
    new_hist = jnp.where(count > 0, new_hist / jnp.where(total > 0, total, 1.0), hist)
    cdf = jnp.cumsum(new_hist)

    def anchor_coefficients(args):
        row, pos, neg = args
        t = row[:, None] - row[None, :]
        w = (pos[:, None] & neg[None, :]).astype(row.dtype)
        bin_clip, _, _ = _dsm_bins(t, min_val, delta, num_bins)
        weighted = w * cdf[bin_clip]  # a static-shape lookup of the (constant) CDF
        return jnp.sum(weighted, axis=1), jnp.sum(weighted, axis=0)

    # sum_{a,p,n} w cdf(t) (d_ap - d_an) is linear in d once the (constant) CDF weights are
    # summed per pair: differentiating through lax.map would store a [B, B] residual per anchor
    # (B^3 memory); the per-pair coefficients keep the backward pass O(B^2)
    coef_pos, coef_neg = jax.lax.map(anchor_coefficients, (d_const, positive, negative))
    total_loss = jnp.sum(coef_pos * d) - jnp.sum(coef_neg * d)
    loss = total_loss / jnp.maximum(count, 1.0)
    return loss, jax.lax.stop_gradient(new_hist)


# --------------------------------------------------------------------------- manifold


def manifold_loss(
    embeddings: jax.Array,
    meta_classes: jax.Array,
    proxies: jax.Array,
    *,
    lambda_c: float = 1.0,
    alpha: float = 0.8,
    margin: float = 5e-4,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Manifold (ensemble deep manifold similarity) loss, Aziere & Todorovic, "Ensemble Deep
    Manifold Similarity Learning using Hard Proxies", CVPR 2019; implemented as PML
    ``ManifoldLoss`` (which this follows faithfully, not the full ensemble of the paper).

    Nodes are the B embeddings and the K proxies. With cosine similarities ``c``::

        S = exp(max(c, 0) / 0.5) with zero diagonal,   S~ = D^-1/2 S D^-1/2 (D = row sums)
        F = (1 - alpha) (I - alpha S~)^-1              (random-walk manifold similarity)
        L_int = mean_i log(1 + sum_{k != m_i} [F_ik - F_im_i + margin > 0] exp(F_ik - F_im_i + margin))
        L_ctx = same with F_ik replaced by cos(F_i., F_{B+k}.) (context similarity)
        L = L_int + lambda_c * L_ctx   (lambda_c = inf: only L_ctx)

    where ``F_ik`` is the embedding-to-proxy block and ``m_i`` the meta-class (proxy) of item i.

    Args:
      embeddings: [B, D]. meta_classes: [B] int in [0, K) — PML ignores labels and draws
        meta-classes at random unless given; here they are an explicit input (draw them with
        ``jax.random`` for PML's behaviour). proxies: [K, D] learnable.
      lambda_c >= 0, alpha in (0, 1), margin: PML defaults (1.0, 0.8, 5e-4).
      valid: optional bool [B]; padded rows are dropped from the graph and from the mean.
    """
    x = check_embeddings(embeddings)
    meta = check_labels(meta_classes, batch_size=x.shape[0], name="meta_classes")
    valid = check_valid(valid, batch_size=x.shape[0])
    p = check_matrix(proxies, name="proxies", shape=(None, x.shape[1]))
    if lambda_c != float("inf"):
        check_scalar(lambda_c, name="lambda_c", min_value=0.0)
    check_scalar(alpha, name="alpha", min_value=0.0, max_value=1.0, min_inclusive=False, max_inclusive=False)
    check_scalar(margin, name="margin", min_value=0.0)
    dtype = jnp.promote_types(x.dtype, p.dtype)
    b, k = x.shape[0], p.shape[0]
    nodes = jnp.concatenate([x.astype(dtype), p.astype(dtype)], axis=0)
    n = b + k
    keep = jnp.ones((n,), bool) if valid is None else jnp.concatenate([valid, jnp.ones((k,), bool)])
    sim = jnp.exp(jnp.maximum(distances.cosine_similarity(nodes), 0.0) / 0.5)
    edge = keep[:, None] & keep[None, :] & ~jnp.eye(n, dtype=bool)
    sim = jnp.where(edge, sim, 0.0)
    deg_inv_sqrt = jax.lax.rsqrt(jnp.maximum(jnp.sum(sim, axis=1), 1e-12))
    s_bar = deg_inv_sqrt[:, None] * sim * deg_inv_sqrt[None, :]
    f = (1.0 - alpha) * jnp.linalg.inv(jnp.eye(n, dtype=dtype) - alpha * s_bar)
    own = jax.nn.one_hot(meta, k, dtype=bool)  # [B, K]; out-of-range ids have no own proxy
    row_w = jnp.ones((b,), dtype) if valid is None else valid.astype(dtype)

    def hinge_term(scores):
        own_score = jnp.sum(jnp.where(own, scores, 0.0), axis=1, keepdims=True)
        logits = scores - own_score + margin
        active = ~own & (logits >= 0)
        return reduce_loss(masked_logsumexp(logits, active, axis=-1, include_zero=True), row_w, reduction="mean")

    f_emb = f[:b]  # [B, n]
    f_prox = f[b:]  # [K, n]
    ctx = distances.cosine_similarity(f_emb, f_prox)  # [B, K]
    loss_ctx = hinge_term(ctx)
    if lambda_c == float("inf"):
        return loss_ctx
    loss_int = hinge_term(f[:b, b:])
    return loss_int + lambda_c * loss_ctx
