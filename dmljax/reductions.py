"""Reductions shared by every loss: an option (``reduction=...``), not a class hierarchy.

A loss computes per-element values (per anchor, per pair, per triplet group) of a
static shape plus a 0/1 (or real) ``weights`` array saying which elements count,
then calls `reduce_loss`. Masked means divide by ``max(count, 1)`` so an empty
batch (no positive pair, one class) gives 0 with zero gradient, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax._validation import check_choice

__all__ = ["REDUCTIONS", "masked_mean", "masked_sum", "reduce_loss"]

REDUCTIONS = ("mean", "sum", "mean_nonzero", "threshold", "none")


def masked_sum(values: jax.Array, weights: jax.Array | None = None, *, axis=None) -> jax.Array:
    if weights is None:
        return jnp.sum(values, axis=axis)
    return jnp.sum(jnp.where(weights != 0, values * weights, 0.0), axis=axis)


def masked_mean(values: jax.Array, weights: jax.Array | None = None, *, axis=None) -> jax.Array:
    """sum(w * v) / max(sum(w), 1); entries with w == 0 never reach the value (even if NaN/inf).

    Their gradient still flows through ``values``: a loss must keep masked entries
    finite itself (e.g. with a double ``where``) to keep gradients NaN-free.
    """
    if weights is None:
        return jnp.mean(values, axis=axis)
    weights = weights.astype(values.dtype)
    total = masked_sum(values, weights, axis=axis)
    return total / jnp.maximum(jnp.sum(weights, axis=axis), 1.0)


def reduce_loss(
    values: jax.Array,
    weights: jax.Array | None = None,
    *,
    reduction: str = "mean",
    threshold: float = 0.0,
    low: float | None = None,
    high: float | None = None,
) -> jax.Array:
    """Reduce per-element loss ``values`` with 0/1 or real ``weights`` of the same shape.

    reduction:

      - "mean": weighted mean over elements with weight != 0 (the default of the papers).
      - "sum": weighted sum.
      - "mean_nonzero": mean over elements whose loss is > ``threshold`` (PML's
        AvgNonZeroReducer); the gradient ignores the count, as in PML.
      - "threshold": mean over elements with ``low < value < high`` (either bound optional),
        PML's ThresholdReducer.
      - "none": ``values * weights`` of the input shape (0 where weight is 0).

    Class-weighted reduction (PML ClassWeightedReducer) is ``weights = class_weights[labels]``
    broadcast to the elements; per-anchor reduction is ``reduction="none"`` followed by a mean
    over anchors.
    """
    check_choice(reduction, name="reduction", choices=REDUCTIONS)
    if weights is None:
        weights = jnp.ones_like(values)
    weights = weights.astype(values.dtype)
    if reduction == "none":
        return jnp.where(weights != 0, values * weights, 0.0)
    if reduction == "sum":
        return masked_sum(values, weights)
    if reduction == "mean":
        return masked_mean(values, weights)
    if reduction == "threshold":
        keep = weights != 0
        if low is not None:
            keep = keep & (values > low)
        if high is not None:
            keep = keep & (values < high)
        count = jax.lax.stop_gradient(jnp.sum(keep, dtype=values.dtype))
        return masked_sum(values, jnp.where(keep, weights, 0.0)) / jnp.maximum(count, 1.0)
    active = (weights != 0) & (values > threshold)
    count = jax.lax.stop_gradient(jnp.sum(active, dtype=values.dtype))
    return masked_sum(values, jnp.where(active, weights, 0.0)) / jnp.maximum(count, 1.0)
