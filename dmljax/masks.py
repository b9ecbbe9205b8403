"""Positive / negative pair masks from labels, padding aware.

Labels are integer class ids of shape [B], or multi-hot rows of shape [B, C]
(two items are positives when they share at least one label). In the self form
(no reference labels) the diagonal is never a positive pair. An optional
``valid`` mask [B] (and ``ref_valid`` [M]) removes padded rows and columns from
both masks, so a padded batch gives the same loss as the unpadded one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax._validation import check_labels, check_valid

__all__ = ["same_label", "positive_mask", "negative_mask", "label_masks", "triplet_count"]


def same_label(labels: jax.Array, ref_labels: jax.Array | None = None) -> jax.Array:
    """Bool [B, M]: items share a label (class ids [B] or multi-hot [B, C])."""
    labels = check_labels(labels, allow_multi_hot=True)
    ref = labels if ref_labels is None else check_labels(ref_labels, name="ref_labels", allow_multi_hot=True)
    if labels.ndim != ref.ndim or (labels.ndim == 2 and labels.shape[1] != ref.shape[1]):
        raise ValueError(f"ref_labels must have the form of labels {labels.shape}, got {ref.shape}")
    if labels.ndim == 2:
        a = labels.astype(jnp.float32)
        b = ref.astype(jnp.float32)
        return (a @ b.T) > 0
    return labels[:, None] == ref[None, :]


def label_masks(
    labels: jax.Array,
    ref_labels: jax.Array | None = None,
    *,
    valid: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(positive, negative) bool masks [B, M].

    positive[i, j]: same label, i != j in the self form, both valid.
    negative[i, j]: different label, both valid.
    """
    same = same_label(labels, ref_labels)
    n, m = same.shape
    valid = check_valid(valid, batch_size=n)
    if ref_labels is None:
        if ref_valid is not None:
            raise ValueError("ref_valid needs ref_labels; in the self form pass only valid")
        ref_valid = valid
    else:
        ref_valid = check_valid(ref_valid, batch_size=m, name="ref_valid")
    both = jnp.ones((n, m), dtype=bool)
    if valid is not None:
        both = both & valid[:, None]
    if ref_valid is not None:
        both = both & ref_valid[None, :]
    positive = same & both
    if ref_labels is None:
        positive = positive & ~jnp.eye(n, dtype=bool)
    negative = ~same & both
    return positive, negative


def positive_mask(labels, ref_labels=None, *, valid=None, ref_valid=None) -> jax.Array:
    """Bool [B, M] of positive pairs (see `label_masks`)."""
    return label_masks(labels, ref_labels, valid=valid, ref_valid=ref_valid)[0]


def negative_mask(labels, ref_labels=None, *, valid=None, ref_valid=None) -> jax.Array:
    """Bool [B, M] of negative pairs (see `label_masks`)."""
    return label_masks(labels, ref_labels, valid=valid, ref_valid=ref_valid)[1]


def triplet_count(positive: jax.Array, negative: jax.Array) -> jax.Array:
    """Number of valid (a, p, n) triplets, ``sum_a |P(a)| |N(a)|``, without a B^3 tensor."""
    return jnp.sum(
        jnp.sum(positive, axis=1, dtype=jnp.float32) * jnp.sum(negative, axis=1, dtype=jnp.float32)
    )
