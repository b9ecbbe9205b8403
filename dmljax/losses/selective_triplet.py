"""Selectively contrastive triplet loss (Xuan, Stylianou, Liu, Pless, "Hard negative examples are
hard, but useful", ECCV 2020, arXiv 2007.12749; PML ``SelectivelyContrastiveTripletLoss``).

Hardest-negative triplet mining collapses early in training: when the negative is *more*
similar to the anchor than the positive (S_an > S_ap) the triplet gradient mostly pulls the
positive, and the paper shows this drives the embedding towards a collapsed state. The
selective loss keeps the usual triplet loss for the other triplets and, for those "hard"
triplets, only pushes the negative away::

    L_SC(a, p, n) = lambda * S_an                    if S_an > S_ap
                    L_triplet(S_ap, S_an)            otherwise

One triplet per anchor: the positive is the most similar ("easy positive", Xuan et al., WACV
2020, the paper's choice) or the least similar ("hard", batch-hard) positive, the negative the
most similar negative. Similarities are cosines. O(B^2) memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax import distances
from dmljax._validation import check_choice, check_scalar
from dmljax.losses._core import check_loss_reduction as _check_reduction
from dmljax.losses.pair import _prepare
from dmljax.reductions import reduce_loss

__all__ = ["SELECTIVE_BASE_LOSSES", "SELECTIVE_POSITIVES", "selectively_contrastive_triplet_loss"]

SELECTIVE_POSITIVES = ("easy", "hard")
SELECTIVE_BASE_LOSSES = ("nca", "margin")


def selectively_contrastive_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    positive_mining: str = "easy",
    base_loss: str = "nca",
    temperature: float = 0.1,
    margin: float = 0.05,
    penalty: float = 1.0,
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Selectively contrastive triplet loss over one (a, p, n) triplet per anchor.

    For anchor a with cosine similarities S: n = argmax_{n in N_a} S_an (hardest negative) and
    p = argmax_{p in P_a} S_ap (``positive_mining="easy"``) or argmin (``"hard"``); then::

        L_a = penalty * S_an                                            if S_an > S_ap
        L_a = -log( exp(S_ap / T) / (exp(S_ap / T) + exp(S_an / T)) )  otherwise, base_loss="nca"
        L_a = [S_an - S_ap + margin]_+                                   otherwise, base_loss="margin"

    averaged over anchors with a positive and a negative. The selection (which p, n, which
    branch) carries no gradient; the hard branch's gradient reaches only the anchor and the
    negative.

    Paper vs PML 3.0: the paper (eq. 4) uses the NCA-form triplet loss with T = 0.1 and
    ``lambda`` = 1 on easy-positive / hard-negative triplets (defaults here). PML 3.0's class
    derives from ``TripletMarginLoss(margin=0.05, ...)`` with a ``penalty`` (default 1): its
    "otherwise" branch is the margin hinge, ``base_loss="margin"`` with ``margin=0.05``. The version of
    its source stored in the code index has the constructor and docstring but an empty
    ``compute_loss``, so that branch follows its docstring.

    Args:
      embeddings: [B, D] (normalised inside). labels: [B] int.
      positive_mining: "easy" or "hard". base_loss: "nca" or "margin".
      temperature: T > 0 ("nca"). margin: >= 0 ("margin"). penalty: lambda >= 0.
      reduction: over anchors. valid: optional bool [B].
    Returns:
      Scalar loss ([B] per anchor with ``reduction="none"``).
    """
    check_choice(positive_mining, name="positive_mining", choices=SELECTIVE_POSITIVES)
    check_choice(base_loss, name="base_loss", choices=SELECTIVE_BASE_LOSSES)
    check_scalar(temperature, name="temperature", min_value=0.0, min_inclusive=False)
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(penalty, name="penalty", min_value=0.0)
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    sim = distances.cosine_similarity(x)
    fixed = jax.lax.stop_gradient(sim)
    if positive_mining == "easy":
        p_idx = jnp.argmax(jnp.where(positive, fixed, -jnp.inf), axis=1)
    else:
        p_idx = jnp.argmin(jnp.where(positive, fixed, jnp.inf), axis=1)
    n_idx = jnp.argmax(jnp.where(negative, fixed, -jnp.inf), axis=1)
    s_ap = jnp.take_along_axis(sim, p_idx[:, None], axis=1)[:, 0]
    s_an = jnp.take_along_axis(sim, n_idx[:, None], axis=1)[:, 0]
    has = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
    hard = jax.lax.stop_gradient(s_an > s_ap)
    if base_loss == "nca":
        usual = jnp.logaddexp(s_ap / temperature, s_an / temperature) - s_ap / temperature
    else:
        usual = jax.nn.relu(s_an - s_ap + margin)
    values = jnp.where(has, jnp.where(hard, penalty * s_an, usual), 0.0)
    return reduce_loss(values, has.astype(x.dtype), reduction=reduction)
