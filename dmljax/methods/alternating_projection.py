"""Regulariser of deep metric learning with alternating projections onto feasible sets.

Can, Gürbüz, Alatan, "Deep Metric Learning with Alternating Projections onto Feasible Sets",
ICIP 2021 (arXiv 1907.07585; seed 003, abstract 10).

The minimisers of a DML loss are read as feasible points of a constraint set (intra- and
inter-class proximity); the set is the intersection of relaxed sets ``C_r`` that enforce the
constraints only for one representative per class. Alternating projections onto the ``C_r`` are
approximated by minimising the usual loss over batches that keep the same representatives for
T iterations (`dmljax.data.samplers.RepeatedCompositionSampler`) plus a proximity regulariser
that keeps the representatives' embeddings near the point obtained by the previous projection::

    R = weight / |reps| * sum_{i in reps} || f(x_i) - z_i ||^2

with ``z_i`` the (stop-gradient) embedding of representative ``i`` at the start of the current
block of T iterations (`projection_targets`: refreshed when ``step % T == 0``).

Our reading (the full text was not available offline): the quadratic proximity form is the
standard projection-onto-a-set penalty; the weight default 0.1 is ours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax._validation import check_embeddings, check_scalar, check_valid
from dmljax.methods._common import check_positive_int, check_same_shape
from dmljax.reductions import masked_mean

__all__ = ["alternating_projection_regularizer", "projection_targets", "representative_mask"]


def representative_mask(*, classes_per_batch: int, samples_per_class: int,
                        representatives_per_class: int | None = None) -> jax.Array:
    """bool [P * M]: the representatives in a `RepeatedCompositionSampler` batch (first R of each class)."""
    p = check_positive_int(classes_per_batch, name="classes_per_batch")
    m = check_positive_int(samples_per_class, name="samples_per_class")
    r = m if representatives_per_class is None else check_positive_int(
        representatives_per_class, name="representatives_per_class")
    if r > m:
        raise ValueError(f"representatives_per_class must be <= samples_per_class ({m}), got {r}")
    return jnp.tile(jnp.arange(m) < r, p)


def projection_targets(targets: jax.Array, embeddings: jax.Array, step, *, repeat: int) -> jax.Array:
    """Targets z for the regulariser: the current embeddings at the first step of each block of
    ``repeat`` (T) iterations, the previous targets otherwise (no gradient)."""
    x = check_embeddings(embeddings)
    t = check_same_shape(targets, name="targets", like=x, like_name="embeddings")
    repeat = check_positive_int(repeat, name="repeat")
    refresh = jnp.asarray(step) % repeat == 0
    return jax.lax.stop_gradient(jnp.where(refresh, x, t))


def alternating_projection_regularizer(embeddings: jax.Array, targets: jax.Array, representatives: jax.Array, *,
                                       weight: float = 0.1, valid: jax.Array | None = None) -> jax.Array:
    """``weight * mean_{i in representatives} ||embeddings_i - targets_i||^2`` (targets stop-gradient).

    Args:
      embeddings: [B, D]. targets: [B, D] (`projection_targets`). representatives: [B] bool.
      weight: >= 0. valid: optional [B] bool.
    """
    x = check_embeddings(embeddings)
    z = jax.lax.stop_gradient(check_same_shape(targets, name="targets", like=x, like_name="embeddings"))
    reps = check_valid(representatives, batch_size=x.shape[0], name="representatives")
    check_scalar(weight, name="weight", min_value=0.0)
    valid = check_valid(valid, batch_size=x.shape[0])
    if valid is not None:
        reps = reps & valid
    return weight * masked_mean(jnp.sum(jnp.square(x - z), axis=1), reps)
