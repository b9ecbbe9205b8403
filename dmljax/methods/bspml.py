"""BSPML: balanced self-paced metric learning against noisy labels.

Zhang, Luo, Gu, "Denoising Multi-Similarity Formulation: A Self-paced Curriculum-Driven
Approach for Robust Metric Learning", AAAI 2023 (arXiv 2211.11751; seed 003, abstract 18).

Self-paced learning treats noisy (mislabeled) samples as extremely hard samples and excludes
them by per-sample weights ``v in [0, 1]^B``. With the multi-similarity (MS) loss the weights
enter pairwise (a pair counts with ``v_i v_j``), which makes the weight sub-problem a
non-convex quadratic; a balance term keeps the average weight of every class near the
overall average (otherwise whole hard classes get dropped). Training alternates:

1. weights (`bspml_sample_weights`): minimise over ``v in [0, 1]^B``

       Q(v) = sum_ij v_i v_j M_ij - age * sum_i v_i + balance * sum_c (mean_{i in c} v_i - mean_i v_i)^2

   with ``M_ij = l_ij / (B - 1)`` (B the number of real, non-padding items) the MS pair losses ``l_ij = softplus(-alpha (S_ij - base)) / alpha``
   for positive pairs and ``softplus(beta (S_ij - base)) / beta`` for negative pairs (cosine
   similarities S; the per-pair terms of Wang et al. 2019). ``2 (M v)_i`` is item i's average
   pair loss: an item is kept while it is below the "age" ``age`` (self-paced threshold) and the
   age grows during training (`self_paced_age`) so harder samples are admitted later.
   Solved by projected gradient steps on the box (the paper uses a doubly stochastic projection
   coordinate gradient method; full-batch projected gradient is its deterministic special case
   with static shapes).
2. metric (`weighted_multi_similarity_loss`): the MS loss in which anchor ``i`` counts with
   weight ``v_i`` and each pair term inside its log-sum-exp with weight ``v_j``:

       L = sum_i v_i [ 1/alpha log(1 + sum_{p} v_p e^{-alpha (S_ip - base)})
                     + 1/beta  log(1 + sum_{n} v_n e^{ beta (S_in - base)}) ] / max(sum_i v_i, 1)

   With 0/1 weights this is exactly `dmljax.losses.weighted.multi_similarity_loss` on the kept
   rows (``valid = v > 0``), which the tests check.

Our reading (the full paper text was not available offline): the quadratic surrogate Q and the
box-projected gradient solver are built from the abstract's description; defaults (age 0.5
growing by 1.1 per epoch, balance 1, 20 solver steps) are ours, to be tuned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax import distances
from dmljax._validation import check_embeddings, check_labels, check_scalar, check_valid
from dmljax.masks import label_masks
from dmljax._validation import check_positive_int
from dmljax.losses import multi_similarity_loss

__all__ = ["bspml_sample_weights", "ms_pair_losses", "self_paced_age", "weighted_multi_similarity_loss"]


def _check_weights(weights, batch_size):
    if tuple(jnp.shape(weights)) != (batch_size,):
        raise ValueError(f"sample_weights must have shape ({batch_size},), got {tuple(jnp.shape(weights))}")
    if not jnp.issubdtype(jnp.result_type(weights), jnp.floating):
        raise ValueError(f"sample_weights must be floating in [0, 1], got dtype {jnp.result_type(weights)}")
    return jnp.clip(jnp.asarray(weights), 0.0, 1.0)


def ms_pair_losses(embeddings, labels, *, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                   valid=None) -> jax.Array:
    """[B, B] per-pair MS terms: softplus(-alpha (S-base))/alpha on positives, softplus(beta (S-base))/beta
    on negatives, 0 elsewhere (diagonal, padding)."""
    x = check_embeddings(embeddings)
    y = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    check_scalar(alpha, name="alpha", min_value=0.0, min_inclusive=False)
    check_scalar(beta, name="beta", min_value=0.0, min_inclusive=False)
    check_scalar(base, name="base")
    sim = distances.cosine_similarity(x)
    positive, negative = label_masks(y, valid=valid)
    pos = jax.nn.softplus(-alpha * (sim - base)) / alpha
    neg = jax.nn.softplus(beta * (sim - base)) / beta
    return jnp.where(positive, pos, jnp.where(negative, neg, 0.0))


def weighted_multi_similarity_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    sample_weights: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    mining: bool = True,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """BSPML's denoising MS loss with per-sample weights ``v`` (see the module docstring):
    `dmljax.losses.multi_similarity_loss` with ``pair_weights = v[None, :]`` (v_j inside the
    log-sum-exps) and ``sample_weights = v`` (the anchor weight).

    Args:
      embeddings: [B, D] float. labels: [B] int.
      sample_weights: [B] float in [0, 1] (clipped); treated as constants (stop-gradient):
        they are optimised by `bspml_sample_weights`, not by the metric's gradient.
      alpha, beta, base, epsilon, mining: as `dmljax.losses.weighted.multi_similarity_loss`
        (PML / paper defaults 2, 50, 0.5, 0.1). Rows with weight 0 take no part in mining.
      valid: optional [B] bool padding mask. reduction: "mean" (weighted by v) | "sum" | "none".
    """
    x = check_embeddings(embeddings)
    valid = check_valid(valid, batch_size=x.shape[0])
    v = jax.lax.stop_gradient(_check_weights(sample_weights, x.shape[0]).astype(x.dtype))
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    if valid is not None:
        v = jnp.where(valid, v, 0.0)
    # v_j inside each log-sum-exp (pair weights), v_i on the anchor (sample weights)
    pair_weights = jnp.broadcast_to(v[None, :], (x.shape[0], x.shape[0]))
    return multi_similarity_loss(x, labels, alpha=alpha, beta=beta, base=base, epsilon=epsilon, mining=mining,
                                 valid=valid, pair_weights=pair_weights, sample_weights=v, reduction=reduction)


def _balance_penalty(v, same, mask):
    """sum over classes c of (mean_{i in c} v_i - mean_i v_i)^2, each class counted once.

    ``same`` [B, B] same-label matrix restricted to real rows; item i's class mean is
    ``(same v)_i / n_i``; summing ``(class_mean_i - overall)^2 / n_i`` over items counts each
    class once.
    """
    n = jnp.maximum(jnp.sum(same, axis=1), 1.0)
    overall = jnp.sum(v) / jnp.maximum(jnp.sum(mask), 1.0)
    class_mean = (same @ v) / n
    return jnp.sum(jnp.where(mask, jnp.square(class_mean - overall) / n, 0.0))


def bspml_sample_weights(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    age: float,
    balance: float = 1.0,
    num_steps: int = 20,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    init: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Self-paced sample weights v in [0, 1]^B minimising BSPML's quadratic Q (module docstring).

    Runs ``num_steps`` projected gradient steps from ``init`` (default all ones) with step size
    ``1 / L`` (``L`` an upper bound of the Lipschitz constant of the gradient of Q), so Q never
    increases. Items whose average pair loss exceeds ``age / 2`` are driven to weight 0. No gradient
    flows back to the embeddings (the weights are a separate block of the alternating scheme).

    Args:
      embeddings: [B, D]. labels: [B] int (the possibly noisy labels).
      age: self-paced threshold lambda > 0 (see `self_paced_age`).
      balance: weight of the class-balance term (>= 0).
      num_steps: solver steps (static).
      init: optional [B] starting weights (e.g. last step's). valid: optional [B] bool (padding -> 0).
    Returns:
      float [B] weights.
    """
    x = jax.lax.stop_gradient(check_embeddings(embeddings))
    y = check_labels(labels, batch_size=x.shape[0])
    check_scalar(age, name="age", min_value=0.0, min_inclusive=False)
    check_scalar(balance, name="balance", min_value=0.0)
    num_steps = check_positive_int(num_steps, name="num_steps")
    valid = check_valid(valid, batch_size=x.shape[0])
    b = x.shape[0]
    pair = ms_pair_losses(x, y, alpha=alpha, beta=beta, base=base, valid=valid)
    real = b if valid is None else jnp.sum(valid)
    m = pair / jnp.maximum(real - 1, 1)  # per-item mean over its real partners (padding excluded)
    mask = jnp.ones((b,), bool) if valid is None else valid
    same = ((y[:, None] == y[None, :]) & mask[:, None] & mask[None, :]).astype(x.dtype)

    def objective(v):
        return v @ (m @ v) - age * jnp.sum(v) + balance * _balance_penalty(v, same, mask)

    # Lipschitz bound: 2 * max row sum of M (Gershgorin) + 2 * balance * (curvature of the penalty <= 4)
    lipschitz = 2.0 * jnp.max(jnp.sum(jnp.abs(m), axis=1)) + 8.0 * balance + 1e-6
    step = 1.0 / lipschitz
    v0 = jnp.ones((b,), x.dtype) if init is None else _check_weights(init, b).astype(x.dtype)

    def body(_, v):
        v = jnp.clip(v - step * jax.grad(objective)(v), 0.0, 1.0)
        return jnp.where(mask, v, 0.0)

    return jax.lax.fori_loop(0, num_steps, body, jnp.where(mask, v0, 0.0))


def self_paced_age(epoch, *, initial: float = 0.5, growth: float = 1.1, maximum: float | None = None):
    """Age schedule ``initial * growth ** epoch`` (capped at ``maximum``): the self-paced threshold
    grows so that harder samples are admitted as training proceeds (Kumar et al., NeurIPS 2010)."""
    check_scalar(initial, name="initial", min_value=0.0, min_inclusive=False)
    check_scalar(growth, name="growth", min_value=1.0)
    age = initial * jnp.power(growth, jnp.asarray(epoch, jnp.float32))
    return age if maximum is None else jnp.minimum(age, maximum)
