"""Decoupled contrastive learning: InfoNCE without the positive in the denominator (DCL, DCLW).

Yeh, Hong, Hsu, Liu, Chen, LeCun, "Decoupled Contrastive Learning", ECCV 2022 (arXiv 2110.06848).
The paper shows that the InfoNCE gradient carries a "negative-positive coupling" factor that
shrinks the update when the positive is easy or the batch is small; dropping the positive term
from the denominator removes it. Labels generalise the two-view form: every ordered positive
pair (a, p) of the batch is one term (two views of an image share a label), so the loss is
symmetric in the views as the paper's ``L_DC = sum_i (L_i^(1) + L_i^(2))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax import distances
from dmljax._validation import check_choice, check_scalar
from dmljax._numerics import masked_logsumexp
from dmljax.losses._core import check_loss_reduction as _check_reduction
from dmljax.losses.pair import _prepare
from dmljax.reductions import reduce_loss

__all__ = ["DCL_WEIGHTINGS", "decoupled_contrastive_loss", "von_mises_fisher_weights"]

DCL_WEIGHTINGS = (None, "von_mises_fisher")


def von_mises_fisher_weights(similarity: jax.Array, positive: jax.Array, *, sigma: float = 0.5) -> jax.Array:
    """DCLW's positive-pair weights ``w_ap = 2 - exp(s_ap / sigma) / E_{(i,j) in P}[exp(s_ij / sigma)]``.

    The paper's eq. (DCLW) normalises over the N anchors of the batch (one positive each:
    ``2 - N softmax_i(<z_i, z_i'> / sigma)``); with labels the mean runs over all positive
    pairs. The weights average to 1 over the positive pairs, so their total is unchanged; a
    pair more similar than the average gets less weight (it can fall below 0, as in the paper).
    Gradients flow through the weights (the official code does not detach them).

    Args:
      similarity: [B, B] cosine similarities. positive: bool [B, B].
      sigma: > 0, von Mises-Fisher concentration parameter; 0.5 is the paper's value.
    Returns:
      [B, B] weights, 0 outside ``positive``.
    """
    check_scalar(sigma, name="sigma", min_value=0.0, min_inclusive=False)
    logits = similarity / sigma
    log_total = masked_logsumexp(logits.reshape(-1), positive.reshape(-1), axis=0)
    any_pos = jnp.any(positive)
    count = jnp.maximum(jnp.sum(positive), 1).astype(similarity.dtype)
    log_ratio = logits - (log_total - jnp.log(count))
    ratio = jnp.exp(jnp.where(positive, log_ratio, 0.0))
    return jnp.where(positive & any_pos, 2.0 - ratio, 0.0)


def decoupled_contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.1,
    weighting: str | None = None,
    sigma: float = 0.5,
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Decoupled contrastive loss (DCL), optionally with von Mises-Fisher weighting (DCLW).

    With cosine similarities ``s`` and N_a the negatives of anchor a, for every positive pair::

        loss_ap = -w_ap s_ap / T + log sum_{n in N_a} exp(s_an / T)

    ``w_ap = 1`` (DCL) or `von_mises_fisher_weights` (``weighting="von_mises_fisher"``, DCLW).
    Compared with `dmljax.losses.ntxent_loss` (PML ``NTXentLoss``) the term ``exp(s_ap / T)`` is
    missing from the denominator: ``ntxent_ap - dcl_ap = softplus(s_ap / T - lse_n s_an / T)``.
    Averaged over positive pairs (``reduction``, default "mean"). Pairs whose anchor has no
    negative keep only ``-w s_ap / T`` (the paper's batch always has negatives; a one-class batch
    stays finite). The loss can be negative.

    Defaults: T = 0.1 and sigma = 0.5, the official code's defaults (raminnakhli/Decoupled-
    Contrastive-Learning; the paper's DCLW uses sigma = 0.5). Similarities are cosines (the
    official code takes dot products of the projections it is given; pass unit vectors there).
    PyTorch Metric Learning 3.0 lists a ``DecoupledContrastiveLoss``; its source was not available
    to check against (the stored PML snapshot is 2.8), so this follows the paper and the official
    code.

    Args:
      embeddings: [B, D] (normalised inside: cosine similarity). labels: [B] int.
      temperature: T > 0. weighting: None or "von_mises_fisher". sigma: > 0.
      reduction: over positive pairs (see `dmljax.reductions.reduce_loss`).
      valid: optional bool [B] of real (non-padding) rows.
    Returns:
      Scalar loss ([B] with ``reduction="none"``: each anchor's sum over its positive pairs,
      the library-wide per-anchor rule).
    """
    check_scalar(temperature, name="temperature", min_value=0.0, min_inclusive=False)
    check_choice(weighting, name="weighting", choices=DCL_WEIGHTINGS)
    check_scalar(sigma, name="sigma", min_value=0.0, min_inclusive=False)
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    sim = distances.cosine_similarity(x)
    logits = sim / temperature
    log_neg = masked_logsumexp(logits, negative, axis=1)
    if weighting is None:
        w = jnp.ones_like(sim)
    else:
        w = von_mises_fisher_weights(sim, positive, sigma=sigma)
    values = jnp.where(positive, log_neg[:, None] - w * logits, 0.0)
    if reduction == "none":
        return jnp.sum(values, axis=1)
    return reduce_loss(values, positive.astype(x.dtype), reduction=reduction)
