"""Classification-margin losses (softmax over class weights) and the center loss.

Every loss here takes explicit class weights ``weights`` of shape [C, D] (one row per
class; sub-center ArcFace takes [C, K, D]) and integer labels [B] in [0, C). Note the
layout: PyTorch Metric Learning stores ``W`` as [D, C]; ``weights = W.T``.

Numerics shared by all margin losses:
  * inputs are upcast to at least float32 (bf16 is accumulated in float32);
  * the cosine of the target class is clamped to [-1 + eps, 1 - eps] before
    ``sqrt(1 - cos^2)`` / ``arccos`` so values and gradients stay finite at ``|cos| = 1``
    (an embedding equal to its class weight);
  * the softmax cross entropy uses ``logsumexp``.

Labels outside [0, C): when the labels are concrete (not traced) a ``ValueError``
naming ``labels`` is raised; under ``jax.jit`` the check is impossible, and such
rows are given weight 0 (they do not contribute to the loss or the mean's count).

Rows can also be removed with an optional ``valid`` mask [B] (padded batches).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._validation import (
    check_choice,
    check_embeddings,
    check_label_range,
    check_labels,
    check_scalar,
    check_valid,
)
from dmljax.distances import l2_normalize, safe_sqrt
from dmljax.losses._core import check_loss_reduction
from dmljax.reductions import reduce_loss

__all__ = [
    "arcface_loss",
    "center_loss",
    "center_update",
    "cosface_loss",
    "large_margin_softmax_loss",
    "normalized_softmax_loss",
    "sphereface_loss",
    "subcenter_arcface_loss",
]

# Clamp for cosines entering sqrt(1 - c^2) / arccos. 1e-6 is representable next to 1 in
# float32 (spacing 6e-8), so the clamp is effective for float32 (and bf16 upcast) inputs.
COS_EPS = 1e-6


# --------------------------------------------------------------------------- helpers


def _check_class_labels(labels, *, num_classes: int, batch_size: int, name: str = "labels") -> jax.Array:
    """Integer labels [B]; values in [0, num_classes) checked when concrete."""
    labels = check_labels(labels, batch_size=batch_size, name=name)
    check_label_range(labels, num_classes, name=name, what="the number of class weights")
    return labels.astype(jnp.int32)


def _check_weights(weights, *, dim: int, name: str = "weights", rank: int = 2) -> jax.Array:
    shape = tuple(np.shape(weights))
    want = "[classes, dim]" if rank == 2 else "[classes, sub_centers, dim]"
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank} {want}, got shape {shape}")
    if shape[-1] != dim:
        raise ValueError(f"{name} must have feature dim {dim} like the embeddings, got shape {shape}")
    if any(s == 0 for s in shape[:-1]):
        raise ValueError(f"{name} must have at least one class (and sub-center), got shape {shape}")
    return check_embeddings(jnp.reshape(jnp.asarray(weights), (-1, dim)), name=name).reshape(shape)


def _prepare(embeddings, labels, weights, valid, *, weights_rank: int = 2):
    """Validated (x, labels, W, row_weights) with a common float dtype >= float32."""
    x = check_embeddings(embeddings)
    batch, dim = x.shape
    w = _check_weights(weights, dim=dim, rank=weights_rank)
    num_classes = w.shape[0]
    labels = _check_class_labels(labels, num_classes=num_classes, batch_size=batch)
    valid = check_valid(valid, batch_size=batch)
    dtype = jnp.promote_types(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    # Rows whose label is out of range (only possible under jit) or padded get weight 0.
    row_weights = (labels >= 0) & (labels < num_classes)
    if valid is not None:
        row_weights = row_weights & valid
    return x, labels, w, row_weights.astype(dtype)


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
    # jnp.clip keeps an out-of-range label (masked anyway) from producing an all-zero row.
    return jax.nn.one_hot(jnp.clip(labels, 0, num_classes - 1), num_classes, dtype=bool)


def _cosines(x: jax.Array, w: jax.Array) -> jax.Array:
    """[B, C] cosines between rows of x and rows of w (zero vectors -> 0)."""
    return l2_normalize(x) @ l2_normalize(w).T


def _clamp_cos(cos: jax.Array) -> jax.Array:
    return jnp.clip(cos, -1.0 + COS_EPS, 1.0 - COS_EPS)


def _margin_cross_entropy(logits: jax.Array, target_logit: jax.Array, target: jax.Array) -> jax.Array:
    """Per-row softmax cross entropy where the target column's logit is replaced.

    logits [B, C], target_logit [B], target one-hot bool [B, C] -> [B].
    """
    modified = jnp.where(target, target_logit[:, None], logits)
    return jax.nn.logsumexp(modified, axis=1) - target_logit


def _target(values: jax.Array, target: jax.Array) -> jax.Array:
    """values[i, labels[i]] as a masked sum (no gather)."""
    return jnp.sum(jnp.where(target, values, 0.0), axis=1)


def _check_common(scale, reduction, *, scale_name: str = "scale"):
    check_scalar(scale, name=scale_name, min_value=0.0, min_inclusive=False)
    check_loss_reduction(reduction)


# --------------------------------------------------------------------------- losses


def normalized_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    temperature: float = 0.05,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Normalized softmax (NormFace) loss.

    ``L_i = -log softmax_j(cos(x_i, w_j) / T)[y_i]`` with both the embedding and the
    class weights L2-normalised.

    References: Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification",
    ACM MM 2017 (scale s = 1/T); Zhai & Wu, "Classification is a Strong Baseline for Deep
    Metric Learning", BMVC 2019 (arXiv 1811.12649), whose temperature T = 0.05 is the
    default (also PML's ``NormalizedSoftmaxLoss``).

    Args:
      embeddings: [B, D] float (bf16 is computed in float32).
      labels: [B] int class ids in [0, C).
      weights: [C, D] class weights (PML's ``W.T``).
      temperature: T > 0.
      valid: optional [B] bool mask of real rows.
      reduction: "mean" (default, as the papers), "sum", "mean_nonzero" or "none" ([B]).
    Returns:
      scalar loss (or [B] per-row losses for reduction="none").
    """
    check_scalar(temperature, name="temperature", min_value=0.0, min_inclusive=False)
    check_loss_reduction(reduction)
    x, labels, w, row_weights = _prepare(embeddings, labels, weights, valid)
    target = _one_hot(labels, w.shape[0])
    logits = _cosines(x, w) / temperature
    per_row = _margin_cross_entropy(logits, _target(logits, target), target)
    return reduce_loss(per_row, row_weights, reduction=reduction)


def cosface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: float = 0.35,
    scale: float = 64.0,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """CosFace / large margin cosine loss (LMCL).

    ``L_i = -log( e^{s (cos t_{y_i} - m)} / (e^{s (cos t_{y_i} - m)} + sum_{j != y_i} e^{s cos t_j}) )``
    with normalised embeddings and class weights.

    Reference: Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
    CVPR 2018 (arXiv 1801.09414); defaults s = 64, m = 0.35 from the paper (= PML).

    Args:
      embeddings [B, D], labels [B] int, weights [C, D]; margin m >= 0; scale s > 0;
      valid optional [B]; reduction as in `normalized_softmax_loss`.
    """
    check_scalar(margin, name="margin", min_value=0.0)
    _check_common(scale, reduction)
    x, labels, w, row_weights = _prepare(embeddings, labels, weights, valid)
    target = _one_hot(labels, w.shape[0])
    cos = _cosines(x, w)
    per_row = _margin_cross_entropy(scale * cos, scale * (_target(cos, target) - margin), target)
    return reduce_loss(per_row, row_weights, reduction=reduction)


def _arcface_target(cos_target: jax.Array, margin, easy_margin: bool) -> jax.Array:
    """cos(theta + m) with the fallback of the official InsightFace code.

    cos(theta + m) = cos t cos m - sin t sin m, sin t = sqrt(1 - cos^2 t) on the clamped cosine.
    Beyond theta + m > pi the function is no longer monotone in theta, so the official code
    uses ``cos t - m sin m`` when cos t <= cos(pi - m) (theta > pi - m); with ``easy_margin``
    the margin is only applied where cos t > 0.
    """
    c = _clamp_cos(cos_target)
    sin = jnp.sqrt(1.0 - c * c)
    cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
    phi = c * cos_m - sin * sin_m
    if easy_margin:
        return jnp.where(cos_target > 0.0, phi, cos_target)
    threshold = jnp.cos(jnp.pi - margin)
    return jnp.where(cos_target > threshold, phi, cos_target - margin * sin_m)


def arcface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
    easy_margin: bool = False,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """ArcFace / additive angular margin loss.

    ``L_i = -log( e^{s cos(t_{y_i} + m)} / (e^{s cos(t_{y_i} + m)} + sum_{j != y_i} e^{s cos t_j}) )``
    with t_j the angle between the normalised embedding and class weight j.
    Where t_{y_i} > pi - m the target logit is ``s (cos t - m sin m)`` instead (the
    official code's fallback, also PML's), keeping the logit decreasing in t;
    ``easy_margin=True`` applies the margin only where cos t > 0 (official option).

    Reference: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019 (arXiv 1801.07698); defaults m = 0.5 rad, s = 64 from the
    paper. PML's ``ArcFaceLoss`` takes the margin in degrees with default 28.6, i.e.
    0.49916 rad (not exactly 0.5): pass ``margin=math.radians(28.6)`` to match PML's default.

    Args:
      embeddings [B, D], labels [B] int, weights [C, D]; margin m in [0, pi) radians;
      scale s > 0; valid optional [B]; reduction as in `normalized_softmax_loss`.
    """
    check_scalar(margin, name="margin", min_value=0.0, max_value=math.pi, max_inclusive=False)
    _check_common(scale, reduction)
    x, labels, w, row_weights = _prepare(embeddings, labels, weights, valid)
    target = _one_hot(labels, w.shape[0])
    cos = _cosines(x, w)
    target_logit = scale * _arcface_target(_target(cos, target), margin, easy_margin)
    per_row = _margin_cross_entropy(scale * cos, target_logit, target)
    return reduce_loss(per_row, row_weights, reduction=reduction)


def subcenter_arcface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
    easy_margin: bool = False,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Sub-center ArcFace: ArcFace on the best sub-center of every class.

    ``cos t_j = max_k cos(x_i, w_{j,k})`` over the K sub-centers of class j, then the
    ArcFace loss (see `arcface_loss`) on these cosines.

    Reference: Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale
    Noisy Web Faces", ECCV 2020; defaults m = 0.5, s = 64 (paper; K = 3 there, here K is
    the weights' second axis).

    Args:
      embeddings: [B, D]; labels: [B] int in [0, C); weights: [C, K, D] sub-centers
        (PML's ``W`` [D, C*K] is ``weights.reshape(C*K, D).T``, class-major).
      margin, scale, easy_margin, valid, reduction: as in `arcface_loss`.
    """
    check_scalar(margin, name="margin", min_value=0.0, max_value=math.pi, max_inclusive=False)
    _check_common(scale, reduction)
    x, labels, w, row_weights = _prepare(embeddings, labels, weights, valid, weights_rank=3)
    num_classes, sub_centers, dim = w.shape
    target = _one_hot(labels, num_classes)
    cos = _cosines(x, w.reshape(num_classes * sub_centers, dim))
    cos = jnp.max(cos.reshape(-1, num_classes, sub_centers), axis=2)
    target_logit = scale * _arcface_target(_target(cos, target), margin, easy_margin)
    per_row = _margin_cross_entropy(scale * cos, target_logit, target)
    return reduce_loss(per_row, row_weights, reduction=reduction)


def _multiplicative_angular_target(cos_target: jax.Array, margin: int) -> jax.Array:
    """psi(t) = (-1)^k cos(m t) - 2k for t in [k pi / m, (k + 1) pi / m].

    cos(m t) is the Chebyshev polynomial T_m(cos t) (no arccos in the gradient path);
    k comes from the clamped arccos and carries no gradient (piecewise constant).
    """
    c = _clamp_cos(cos_target)
    prev, cheb = jnp.ones_like(c), c
    for _ in range(margin - 1):
        prev, cheb = cheb, 2.0 * c * cheb - prev
    k = jax.lax.stop_gradient(jnp.floor(jnp.arccos(c) * margin / jnp.pi))
    k = jnp.clip(k, 0.0, max(margin - 1, 0))
    sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
    return sign * cheb - 2.0 * k


def _angular_softmax(x, labels, w, row_weights, *, margin, scale, lambda_, normalize_weights, reduction):
    target = _one_hot(labels, w.shape[0])
    x_norm = safe_sqrt(jnp.sum(x * x, axis=1))  # finite gradient at a zero embedding
    cos = _cosines(x, w)
    # Norm products multiplying the cosines: |x| (A-Softmax, normalised W) or |x||w_j| (L-Softmax).
    magnitude = jnp.broadcast_to(x_norm[:, None], cos.shape)
    if not normalize_weights:
        magnitude = magnitude * safe_sqrt(jnp.sum(w * w, axis=1))[None, :]
    logits = scale * magnitude * cos
    cos_target = _target(cos, target)
    psi = _multiplicative_angular_target(cos_target, margin)
    # The paper's annealing f = (lambda |x| cos + |x| psi) / (1 + lambda).
    margin_target = (lambda_ * cos_target + psi) / (1.0 + lambda_)
    target_logit = scale * _target(magnitude, target) * margin_target
    per_row = _margin_cross_entropy(logits, target_logit, target)
    return reduce_loss(per_row, row_weights, reduction=reduction)


def _check_int_margin(margin):
    if not isinstance(margin, (int, np.integer)) or isinstance(margin, bool) or margin < 1:
        raise ValueError(f"margin must be a positive integer (multiplicative angular margin), got {margin!r}")
    return int(margin)


def sphereface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: int = 4,
    scale: float = 1.0,
    lambda_: float = 0.0,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """SphereFace / A-Softmax loss (multiplicative angular margin, normalised weights).

    Logits ``s |x_i| cos t_j`` for j != y_i and, for the target class,
    ``s |x_i| (lambda cos t + psi(t)) / (1 + lambda)`` with
    ``psi(t) = (-1)^k cos(m t) - 2k``, t in [k pi/m, (k+1) pi/m], k in {0..m-1}.
    Weights are L2-normalised (A-Softmax sets ``|W| = 1``, ``b = 0``); the embedding norm is kept.

    Reference: Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition",
    CVPR 2017 (arXiv 1704.08063); m = 4 from the paper. The paper trains with an annealed
    ``lambda`` (from 1000 down to ~5) to make optimisation possible; pass the current
    value as ``lambda_`` (a traced scalar works). The default ``lambda_ = 0`` is the pure
    A-Softmax target, which is what PML's ``SphereFaceLoss`` computes (it has no annealing).
    ``scale`` multiplies all logits (PML's ``scale``, default 1 = the paper).

    Args:
      embeddings [B, D] (not normalised: the norm is part of the logit), labels [B] int,
      weights [C, D]; margin: integer m >= 1; scale > 0; ``lambda_ >= 0``; valid; reduction.
    """
    margin = _check_int_margin(margin)
    _check_common(scale, reduction)
    check_scalar(lambda_, name="lambda_", min_value=0.0)
    x, labels, w, row_weights = _prepare(embeddings, labels, weights, valid)
    return _angular_softmax(x, labels, w, row_weights, margin=margin, scale=scale, lambda_=lambda_,
                            normalize_weights=True, reduction=reduction)


def large_margin_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: int = 4,
    scale: float = 1.0,
    lambda_: float = 0.0,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """L-Softmax: as `sphereface_loss` but with unnormalised weights, logits ``|w_j||x_i| cos t_j``.

    Target logit ``s |w_y||x| (lambda cos t + psi(t)) / (1 + lambda)`` with the same psi.

    Reference: Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks",
    ICML 2016 (arXiv 1612.02295); m = 4 (the paper uses 2-4; PML default 4), lambda
    annealing as in the paper (``lambda_``; PML has none, default 0 matches PML).
    """
    margin = _check_int_margin(margin)
    _check_common(scale, reduction)
    check_scalar(lambda_, name="lambda_", min_value=0.0)
    x, labels, w, row_weights = _prepare(embeddings, labels, weights, valid)
    return _angular_softmax(x, labels, w, row_weights, margin=margin, scale=scale, lambda_=lambda_,
                            normalize_weights=False, reduction=reduction)


# --------------------------------------------------------------------------- center loss


def center_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Center loss ``L_i = 1/2 ||x_i - c_{y_i}||^2``.

    Reference: Wen et al., "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016, eq. 2: ``L_C = 1/2 sum_i ||x_i - c_{y_i}||^2`` over the
    mini-batch (``reduction="sum"``); the default "mean" divides by the batch size as the
    authors' Caffe layer does. The paper combines it with softmax, ``L = L_S + lambda L_C``.

    In the paper the centers are NOT learned by gradient descent on this loss: the loss
    differentiates w.r.t. the embeddings only and the centers move by `center_update`
    (eq. 4). This function is differentiable w.r.t. ``centers`` too; wrap them in
    ``jax.lax.stop_gradient`` to follow the paper.

    Args:
      embeddings: [B, D]; labels: [B] int in [0, C); centers: [C, D]; valid: optional [B];
      reduction: "mean" (default), "sum", "mean_nonzero" or "none" ([B]).
    """
    check_loss_reduction(reduction)
    x = check_embeddings(embeddings)
    c = _check_weights(centers, dim=x.shape[1], name="centers")
    labels = _check_class_labels(labels, num_classes=c.shape[0], batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    dtype = jnp.promote_types(x.dtype, c.dtype)
    x, c = x.astype(dtype), c.astype(dtype)
    target = _one_hot(labels, c.shape[0]).astype(dtype)
    own_center = target @ c  # [B, D]: c_{y_i} as a one-hot product (no gather)
    per_row = 0.5 * jnp.sum(jnp.square(x - own_center), axis=1)
    row_weights = (labels >= 0) & (labels < c.shape[0])
    if valid is not None:
        row_weights = row_weights & valid
    return reduce_loss(per_row, row_weights.astype(dtype), reduction=reduction)


def center_update(
    centers: jax.Array,
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 0.5,
    valid: jax.Array | None = None,
) -> jax.Array:
    """One step of the center update rule of Wen et al. 2016 (eq. 4), a pure function.

    ``delta c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)``, ``n_j = #{i: y_i = j}``;
    ``c_j <- c_j - alpha * delta c_j``. Classes absent from the batch do not move.
    The embeddings are treated as constants (no gradient flows through the update).

    Args:
      centers: [C, D] current centers; embeddings: [B, D]; labels: [B] int in [0, C);
      alpha: learning rate of the centers in [0, 1] (paper's alpha; 0.5 is the value of
        the authors' released models); valid: optional [B] mask of real rows.
    Returns:
      new centers [C, D] with the dtype of ``centers``.
    """
    check_scalar(alpha, name="alpha", min_value=0.0, max_value=1.0)
    x = jax.lax.stop_gradient(check_embeddings(embeddings))
    c = _check_weights(centers, dim=x.shape[1], name="centers")
    labels = _check_class_labels(labels, num_classes=c.shape[0], batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    dtype = jnp.promote_types(x.dtype, c.dtype)
    member = _one_hot(labels, c.shape[0]) & ((labels >= 0) & (labels < c.shape[0]))[:, None]
    if valid is not None:
        member = member & valid[:, None]
    member = member.astype(dtype)  # [B, C]
    counts = jnp.sum(member, axis=0)  # n_j
    sums = member.T @ x.astype(dtype)  # sum_{i: y_i=j} x_i
    c32 = c.astype(dtype)
    delta = (counts[:, None] * c32 - sums) / (1.0 + counts[:, None])
    return (c32 - alpha * delta).astype(jnp.result_type(centers))
