"""Spherical embedding constraint (Zhang, Zheng, Tu, Wang, Zhou, "Deep Metric Learning with
Spherical Embedding", NeurIPS 2020, arXiv 2011.02785; PML ``SphericalEmbeddingRegularizer``).

Losses on cosine similarities ignore the embedding norm, but the norm scales their gradient:
with very different norms in a batch, the angular updates of small-norm embeddings are large
and those of large-norm ones small, which slows and destabilises training. The spherical
embedding constraint pulls every norm towards the batch's mean norm before normalisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax import distances
from dmljax._validation import check_matrix, check_valid
from dmljax.reductions import masked_mean

__all__ = ["spherical_embedding_regularizer"]


def spherical_embedding_regularizer(x: jax.Array, *, valid: jax.Array | None = None) -> jax.Array:
    """``L_sec = 1/N sum_i (||f_i||_2 - mu)^2`` with ``mu = 1/N sum_i ||f_i||_2`` (paper eq. 6).

    Apply it to the embeddings *before* L2 normalisation and add ``eta * L_sec`` to a
    metric loss (the paper tunes eta per loss, 0.1 to 5; PML's regularizer weight is the
    ``embedding_reg_weight`` of the loss, default 1). The derivative through ``mu`` cancels
    (sum_i (||f_i|| - mu) = 0), so computing mu with or without its gradient gives the same
    update. PML 3.0 lists a ``SphericalEmbeddingRegularizer``; its source was not available to
    check against (the stored PML snapshot is 2.8), this follows the paper.

    Args:
      x: [N, D] un-normalised embeddings. valid: optional bool [N] (padding rows do not count,
        neither in mu nor in the mean).
    Returns:
      Scalar >= 0; 0 when all norms are equal. Finite gradient at zero vectors.
    """
    x = check_matrix(x, name="x", shape=(None, None))
    valid = check_valid(valid, batch_size=x.shape[0])
    weights = None if valid is None else valid.astype(x.dtype)
    norms = distances.safe_sqrt(jnp.sum(jnp.square(x), axis=1))
    mu = masked_mean(norms, weights)
    return masked_mean(jnp.square(norms - mu), weights)
