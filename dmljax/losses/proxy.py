"""Proxy-based losses: ProxyNCA(++), Proxy-Anchor, multi-proxy anchor (MPA) and SoftTriple.

Every loss takes the learnable proxies as an explicit positional argument, so
``jax.grad(loss, argnums=(0, 2))`` gives the gradients w.r.t. both the embeddings
and the proxies. Shapes: embeddings [B, D], integer labels [B], proxies [C, D]
(one proxy per class) or [C, K, D] (K proxies / centers per class).

Class ids out of range
    Labels must lie in ``[0, C)``. When the labels are concrete (eager calls) an
    out-of-range id raises ``ValueError("labels ...")``. Under ``jax.jit`` /
    ``vmap`` the values are unknown at trace time, so they cannot be checked;
    rows whose label is outside ``[0, C)`` are then treated like padding
    (``valid = False``) and contribute nothing, instead of silently indexing a
    wrong proxy.

Padding
    ``valid`` [B] (optional bool mask) removes padded rows; a padded batch gives
    the same loss and gradient as the unpadded one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import distances
from dmljax import _validation
from dmljax._numerics import masked_logsumexp as _masked_logsumexp
from dmljax._validation import (
    check_embeddings,
    check_labels,
    check_matrix,
    check_scalar,
    check_valid,
)
from dmljax.losses._core import check_loss_reduction
from dmljax.reductions import reduce_loss

__all__ = [
    "multi_proxy_anchor_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "soft_triple_loss",
]


# ----------------------------------------------------------------------------- helpers


def check_label_range(labels, num_classes: int, *, name: str = "labels") -> None:
    """Raise if concrete ``labels`` leave [0, num_classes) (see `dmljax._validation.check_label_range`)."""
    _validation.check_label_range(labels, num_classes, name=name, what="one per proxy class")


def check_proxy_inputs(embeddings, labels, proxies, *, valid=None, proxy_rank: int = 2, name="proxies"):
    """Validate (embeddings [B, D], labels [B], proxies [C, D] or [C, K, D], valid [B]).

    Returns (embeddings, labels, proxies, row_valid, one_hot) where ``row_valid`` [B]
    is ``valid`` and ``0 <= label < C`` and ``one_hot`` [B, C] is the bool class
    membership of the valid rows.
    """
    x = check_embeddings(embeddings)
    batch, dim = x.shape
    shape = (None,) * (proxy_rank - 1) + (dim,)
    p = check_matrix(proxies, name=name, shape=shape)
    if p.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one class, got shape {p.shape}")
    if proxy_rank == 3 and p.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one proxy per class, got shape {p.shape}")
    y = check_labels(labels, batch_size=batch)
    num_classes = p.shape[0]
    check_label_range(y, num_classes)
    valid = check_valid(valid, batch_size=batch)
    row_valid = (y >= 0) & (y < num_classes)
    if valid is not None:
        row_valid = row_valid & valid
    one_hot = (y[:, None] == jnp.arange(num_classes)[None, :]) & row_valid[:, None]
    dtype = jnp.promote_types(x.dtype, p.dtype)
    return x.astype(dtype), y, p.astype(dtype), row_valid, one_hot


def log_one_plus_sum_exp(z: jax.Array, mask: jax.Array, *, axis: int) -> jax.Array:
    """``log(1 + sum_{mask} exp(z))`` along ``axis`` (`dmljax._numerics.masked_logsumexp`)."""
    return _masked_logsumexp(z, mask, axis=axis, include_zero=True)


def masked_logsumexp(z: jax.Array, mask: jax.Array, *, axis: int) -> jax.Array:
    """``log(sum_{mask} exp(z))``; an all-masked slice gives 0 (`dmljax._numerics.masked_logsumexp`)."""
    return _masked_logsumexp(z, mask, axis=axis)


def _proxy_anchor_terms(sim, one_hot, row_valid, *, margin, alpha):
    """Proxy-Anchor objective from a [B, C] similarity matrix (shared by PA and MPA)."""
    positive = one_hot
    negative = ~one_hot & row_valid[:, None]
    pos_lse = log_one_plus_sum_exp(-alpha * (sim - margin), positive, axis=0)  # [C]
    neg_lse = log_one_plus_sum_exp(alpha * (sim + margin), negative, axis=0)  # [C]
    with_positives = jnp.any(positive, axis=0)
    num_with_positives = jnp.maximum(jnp.sum(with_positives, dtype=sim.dtype), 1.0)
    pos_term = jnp.sum(jnp.where(with_positives, pos_lse, 0.0)) / num_with_positives
    neg_term = jnp.sum(neg_lse) / sim.shape[1]
    return pos_term + neg_term


# ----------------------------------------------------------------------------- losses


def proxy_nca_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    temperature: float = 1.0 / 9.0,
    normalize: bool = True,
    include_positive_in_denominator: bool = True,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""ProxyNCA / ProxyNCA++ loss.

    With ``d(x, p) = |x/|x| - p/|p||^2`` (``normalize=True``) and temperature ``T``::

        l_i = -log( exp(-d(x_i, p_{y_i}) / T) / sum_{z in Z_i} exp(-d(x_i, p_z) / T) )

    where ``Z_i`` is every class (``include_positive_in_denominator=True``: the
    softmax cross-entropy of ProxyNCA++, Teh et al. ECCV 2020, and of PML's
    ``ProxyNCALoss``) or every class except ``y_i`` (``False``: the original ProxyNCA,
    Movshovitz-Attias et al. ICCV 2017, eq. 4). The per-sample losses are reduced
    with ``reduction`` over the valid rows.

    Defaults: ``temperature = 1/9`` is ProxyNCA++'s choice (Sec. 3.4); ``T = 1``
    with the positive excluded is the original ProxyNCA (PML: ``softmax_scale=1/T``).
    ProxyNCA++'s other ingredients are training concerns, not part of this
    function: "fast-moving proxies" means a larger learning rate for the proxies
    than for the network (e.g. ``optax.multi_transform`` with a separate Adam for
    the proxies, 100x in the paper), global max + average pooling lives in the
    backbone, and the layer-norm is the caller's embedding head.

    Args:
      embeddings: [B, D] float.
      labels: [B] int class ids in [0, C).
      proxies: [C, D] one proxy per class.
      temperature: T > 0 (logits are ``-d / T``).
      normalize: L2-normalise embeddings and proxies before the distance (both papers).
      include_positive_in_denominator: see above.
      valid: optional [B] bool mask of real rows.
      reduction: "mean" (default), "sum", "mean_nonzero" or "none" ([B]).

    Returns:
      Scalar loss (or [B] per-sample losses for ``reduction="none"``).
    """
    check_scalar(temperature, name="temperature", min_value=0.0, min_inclusive=False)
    x, _, p, row_valid, one_hot = check_proxy_inputs(embeddings, labels, proxies, valid=valid)
    if normalize:
        x = distances.l2_normalize(x)
        p = distances.l2_normalize(p)
    logits = -distances.squared_euclidean(x, p) / temperature  # [B, C]
    positive_logit = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=1)
    denominator_mask = jnp.ones_like(one_hot) if include_positive_in_denominator else ~one_hot
    per_sample = masked_logsumexp(logits, denominator_mask, axis=1) - positive_logit
    has_denominator = jnp.any(denominator_mask, axis=1)
    weights = row_valid & has_denominator
    per_sample = jnp.where(weights, per_sample, 0.0)
    return reduce_loss(per_sample, weights, reduction=check_loss_reduction(reduction))


def proxy_anchor_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    valid: jax.Array | None = None,
) -> jax.Array:
    r"""Proxy-Anchor loss (Kim, Kim, Cho, Kwak, CVPR 2020, eq. 4).

    With cosine similarity ``s(x, p)``::

        l = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - margin)))
          + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + margin)))

    ``P`` is every proxy (the C classes), ``P+`` the proxies with at least one
    positive in the batch, ``X_p+`` / ``X_p-`` the valid embeddings of / not of
    p's class. Each sum is evaluated as a stable log-sum-exp. Defaults
    ``margin = 0.1``, ``alpha = 32`` are the paper's (and PML's).

    Args:
      embeddings: [B, D] float.
      labels: [B] int class ids in [0, C).
      proxies: [C, D] float (the paper initialises them with Kaiming normal).
      margin: delta >= 0.
      alpha: scale > 0.
      valid: optional [B] bool mask of real rows.

    Returns:
      Scalar loss (the formula is a sum over proxies, so there is no ``reduction``).
    """
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(alpha, name="alpha", min_value=0.0, min_inclusive=False)
    x, _, p, row_valid, one_hot = check_proxy_inputs(embeddings, labels, proxies, valid=valid)
    sim = distances.cosine_similarity(x, p)
    return _proxy_anchor_terms(sim, one_hot, row_valid, margin=margin, alpha=alpha)


def _soft_class_similarity(x, centers, gamma):
    """SoftTriple's relaxed class similarity [B, C] from normalised x and centers [C, K, D].

    ``S_{i,c} = sum_k softmax_k(s_{i,c,k} / gamma) s_{i,c,k}``; ``gamma = 0`` is the hard max.
    """
    xn = distances.l2_normalize(x)
    cn = distances.l2_normalize(centers)
    sim = jnp.einsum("bd,ckd->bck", xn, cn)  # [B, C, K]: O(B x number of proxies)
    if gamma == 0:
        return jnp.max(sim, axis=2)
    weights = jax.nn.softmax(sim / gamma, axis=2)
    return jnp.sum(weights * sim, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _soft_similarity_normalised(xn, cn, gamma):
    """``_soft_class_similarity`` of already normalised xn [B, D] and centers cn [C, K, D]
    (gamma > 0), with a written-out backward: dS_ic / ds_ick = p_ick (1 + (s_ick - S_ic) / gamma),
    p = softmax_k(s / gamma); one fused pass and two matmuls (the centers' gradient as
    (xn^T ds)^T, which avoids transposing the [B, C K] gradient on CPU)."""
    return _soft_similarity_fwd(xn, cn, gamma)[0]


def _soft_similarity_fwd(xn, cn, gamma):
    c, k, d = cn.shape
    sim = (xn @ cn.reshape(c * k, d).T).reshape(-1, c, k)
    shift = jax.lax.stop_gradient(jnp.max(sim, axis=2, keepdims=True))
    weights = jnp.exp((sim - shift) / gamma)
    total = jnp.sum(weights, axis=2, keepdims=True)
    soft = jnp.sum(weights * sim, axis=2) / total[..., 0]
    return soft, (xn, cn, sim, shift, total, soft)


def _soft_similarity_bwd(gamma, residuals, g):
    xn, cn, sim, shift, total, soft = residuals
    c, k, d = cn.shape
    p = jnp.exp((sim - shift) / gamma) / total
    d_sim = (g[..., None] * p * (1.0 + (sim - soft[..., None]) / gamma)).reshape(-1, c * k)
    d_xn = d_sim @ cn.reshape(c * k, d)
    d_cn = (xn.T @ d_sim).T.reshape(c, k, d)
    return d_xn, d_cn


_soft_similarity_normalised.defvjp(_soft_similarity_fwd, _soft_similarity_bwd)


def multi_proxy_anchor_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    gamma: float = 0.1,
    valid: jax.Array | None = None,
) -> jax.Array:
    r"""Multi-proxy anchor (MPA) loss: Proxy-Anchor with K proxies per class.

    Saeki, Kawahara, Aman, "Multi Proxy Anchor Family Loss for Several Types of
    Gradients" (arXiv 2110.03997, 2021-2023). Each class owns K proxies
    ``p_{c,1..K}`` so a class may have several local centers. The implemented
    aggregation (documented here because the paper's exact equation could not be
    checked against the source available while writing this) is:

    1. class similarity by SoftTriple's relaxed max over the class's proxies
       (Qian et al. 2019, eq. 7)::

           S(x, c) = sum_k softmax_k(s(x, p_{c,k}) / gamma) s(x, p_{c,k})

       with cosine ``s``; ``gamma -> 0`` is the nearest proxy of the class
       (``gamma = 0`` uses the hard max);
    2. the Proxy-Anchor objective on ``S`` with each class as the anchor::

           l = 1/|C+| sum_{c in C+} log(1 + sum_{x in X_c+} exp(-alpha (S(x,c) - margin)))
             + 1/|C|  sum_{c}       log(1 + sum_{x in X_c-} exp( alpha (S(x,c) + margin)))

    With K = 1 it equals `proxy_anchor_loss` exactly. Positives pull only
    (softly) towards their closest proxy of the class, so the K proxies may
    settle on different local centers; negatives are pushed from the
    closest proxies of other classes.

    Args:
      embeddings: [B, D] float.
      labels: [B] int class ids in [0, C).
      proxies: [C, K, D] float.
      margin, alpha: as in Proxy-Anchor (defaults 0.1, 32).
      gamma: softmax temperature of the aggregation over a class's proxies
        (default 0.1, SoftTriple's); 0 selects the hard max.
      valid: optional [B] bool mask of real rows.
    """
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(alpha, name="alpha", min_value=0.0, min_inclusive=False)
    check_scalar(gamma, name="gamma", min_value=0.0)
    x, _, p, row_valid, one_hot = check_proxy_inputs(embeddings, labels, proxies, valid=valid, proxy_rank=3)
    sim = _soft_class_similarity(x, p, gamma)
    return _proxy_anchor_terms(sim, one_hot, row_valid, margin=margin, alpha=alpha)


def soft_triple_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    tau: float = 0.2,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""SoftTriple loss (Qian, Shang, Sun, Hu, Li, Jin, ICCV 2019, eqs. 8-12).

    With normalised embeddings and centers, ``s_{i,c,k} = <x_i, w_{c,k}>`` and the
    relaxed class similarity ``S_{i,c} = sum_k softmax_k(s_{i,c,k} / gamma) s_{i,c,k}``::

        l_i = -log( exp(la (S_{i,y_i} - margin)) /
                    (exp(la (S_{i,y_i} - margin)) + sum_{c != y_i} exp(la S_{i,c})) )

        loss = reduce_i(l_i) + tau * R,
        R = sum_c sum_{t < s} sqrt(2 + 1e-5 - 2 <w_{c,t}, w_{c,s}>) / (C K (K - 1))

    ``R`` is the paper's L2,1-style regulariser that lets similar centers of a class
    merge (the ``1e-5`` keeps the sqrt differentiable when two centers coincide,
    as in PML). For K = 1 the regulariser is 0. Defaults ``la=20, gamma=0.1,
    margin=0.01, tau=0.2`` are the paper's; PML's ``SoftTripleLoss`` (2.9) shares la, gamma,
    margin (and K = 10 centers per class) but has no tau: its center regulariser is a
    separate ``weight_regularizer``, so ``tau=0`` matches PML's loss alone.

    Args:
      embeddings: [B, D] float.
      labels: [B] int class ids in [0, C).
      centers: [C, K, D] float.
      la: lambda, scale of the logits (> 0).
      gamma: softmax temperature over a class's centers (> 0).
      margin: delta >= 0.
      tau: weight of the center regulariser >= 0.
      valid: optional [B] bool mask of real rows.
      reduction: reduction of the per-sample terms ("mean", "sum", "mean_nonzero", "none").
        With "none" the [B] per-sample values are returned without the regulariser.
    """
    check_scalar(la, name="la", min_value=0.0, min_inclusive=False)
    check_scalar(gamma, name="gamma", min_value=0.0, min_inclusive=False)
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(tau, name="tau", min_value=0.0)
    x, _, w, row_valid, one_hot = check_proxy_inputs(
        embeddings, labels, centers, valid=valid, proxy_rank=3, name="centers"
    )
    sim = _soft_similarity_normalised(distances.l2_normalize(x), distances.l2_normalize(w), float(gamma))  # [B, C]
    logits = la * (sim - margin * one_hot.astype(sim.dtype))
    positive_logit = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=1)
    per_sample = jax.nn.logsumexp(logits, axis=1) - positive_logit
    per_sample = jnp.where(row_valid, per_sample, 0.0)
    loss = reduce_loss(per_sample, row_valid, reduction=check_loss_reduction(reduction))
    if reduction == "none":
        return loss
    num_classes, k = w.shape[0], w.shape[1]
    if k > 1 and not (isinstance(tau, (int, float)) and tau == 0):
        wn = distances.l2_normalize(w)
        gram = jnp.einsum("ckd,csd->cks", wn, wn)  # [C, K, K]
        upper = jnp.triu(jnp.ones((k, k), dtype=bool), k=1)
        spread = jnp.sqrt(jnp.maximum(2.0 + 1e-5 - 2.0 * gram, 1e-5))
        reg = jnp.sum(jnp.where(upper[None], spread, 0.0)) / (num_classes * k * (k - 1))
        loss = loss + tau * reg
    return loss
