"""Deep Adversarial Metric Learning (DAML): a generator of synthetic hard negatives.

Duan, Zheng, Lu, Zhou, Zhou, "Deep Adversarial Metric Learning", CVPR 2018.

From a triplet (anchor ``a``, positive ``p``, negative ``n``) of embeddings a generator
``g`` produces a synthetic negative ``s = g(a, p, n)``. The generator objective is::

    J_gen = ||s - a||^2 + lambda_1 ||s - n||^2 + lambda_2 [ ||s - a||^2 - ||p - a||^2 - alpha ]_+

- hardness: ``s`` close to the anchor;
- regulariser: ``s`` close to the real negative it was made from (keeps it in the
  negative's neighbourhood, so the label "negative" stays plausible);
- adversarial: the hinge is active while the synthetic triplet still satisfies the metric's
  margin constraint ``d(a, s)^2 >= d(a, p)^2 + alpha``; minimising it makes ``s`` violate the
  constraint, i.e. a triplet the metric gets wrong.

The metric is trained on the triplet loss of real and synthetic negatives
(`daml_triplet_loss`), the generator on `daml_generator_loss`; the paper alternates the two
updates (min over the generator, min over the metric of ``J_gen + lambda J_m``).

Reading of the paper / deviations (documented):
  * DAML puts the generator on the CNN feature space before the metric layer; here it works
    on the embeddings the library's losses see (same formulas).
  * Distances are squared euclidean as in the paper's objective.
  * Defaults ``lambda_1 = 1`` and ``lambda_2 = 50`` are our recollection of the paper's settings,
    NOT verified against its text offline (the seed summary states 0 < lambda_1 < 1: pass e.g.
    0.5 to follow it); alpha = 1 is
    the triplet margin of the paper's setting for unnormalised features: for unit-norm
    embeddings a smaller margin (0.2) is the usual choice.
  * The generator here is an MLP on the concatenated triplet (hidden widths are ours).

Closed form (useful to understand the knobs): for fixed ``a, p, n`` with ``D = |n - a|`` the
optimum of J_gen over ``s`` lies on the segment ``s = a + t (n - a)`` with
``t* = max(lambda_1 / (1 + lambda_1 + lambda_2), min(lambda_1 / (1 + lambda_1),
sqrt(|p - a|^2 + alpha) / D))``: closer to the anchor than ``n`` (t < 1) but never the
anchor itself (t > 0).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmljax._validation import check_embeddings, check_labels, check_scalar, check_valid
from dmljax.distances import l2_normalize
from dmljax.methods._common import MLP, check_positive_int, check_same_shape, check_triplets, sample_triplets, triplet_validity
from dmljax.reductions import masked_mean

__all__ = ["HardNegativeGenerator", "daml_generator_loss", "daml_triplet_loss", "sample_triplets"]


class HardNegativeGenerator(nnx.Module):
    """MLP ``[a, p, n] -> s``: [T, 3D] -> [T, D] synthetic negatives (DAML's generator).

    Args:
      dim: embedding dimension D.
      hidden: hidden widths (default (2D,); the paper's generator is fully connected).
      normalize: L2-normalise the output (use when the metric works on unit-norm embeddings).
      residual: predict ``n + MLP(a, p, n)`` so the untrained generator starts near the real
        negative (a stable start; off reproduces a plain MLP).
    """

    def __init__(self, dim: int, *, hidden: Sequence[int] | None = None, normalize: bool = False,
                 residual: bool = True, rngs: nnx.Rngs):
        dim = check_positive_int(dim, name="dim")
        hidden = (2 * dim,) if hidden is None else tuple(hidden)
        self.mlp = MLP(3 * dim, hidden, dim, rngs=rngs)
        self.dim = dim
        self.normalize = bool(normalize)
        self.residual = bool(residual)

    def __call__(self, anchors: jax.Array, positives: jax.Array, negatives: jax.Array) -> jax.Array:
        a = check_embeddings(anchors, name="anchors")
        if a.shape[1] != self.dim:
            raise ValueError(f"anchors must have dim {self.dim}, got shape {a.shape}")
        p = check_same_shape(positives, name="positives", like=a, like_name="anchors")
        n = check_same_shape(negatives, name="negatives", like=a, like_name="anchors")
        out = self.mlp(jnp.concatenate([a, p, n], axis=-1))
        if self.residual:
            out = n + out
        return l2_normalize(out) if self.normalize else out


def _sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x), axis=-1)


def daml_generator_loss(
    anchors: jax.Array,
    positives: jax.Array,
    negatives: jax.Array,
    synthetic: jax.Array,
    *,
    lambda_reg: float = 1.0,
    lambda_adv: float = 50.0,
    margin: float = 1.0,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """DAML generator objective (Duan et al. 2018, Eq. 5), mean over triplets.

        J_gen = ||s - a||^2 + lambda_reg ||s - n||^2 + lambda_adv [||s - a||^2 - ||p - a||^2 - margin]_+

    Args:
      anchors, positives, negatives, synthetic: [T, D] (``synthetic`` = generator output).
        Pass the metric's embeddings through `jax.lax.stop_gradient` when updating only the
        generator.
      lambda_reg: weight of the regulariser towards the real negative (> 0).
      lambda_adv: weight of the adversarial hinge (>= 0).
      margin: alpha of the triplet constraint (>= 0).
      weights: optional [T] 0/1 or real weights (e.g. ``triplet_valid``).
      reduction: "mean" (weighted mean over triplets, divided by max(count, 1)) or "none" ([T]).
    Returns:
      scalar (or [T] with ``reduction="none"``).
    """
    a = check_embeddings(anchors, name="anchors")
    p = check_same_shape(positives, name="positives", like=a, like_name="anchors")
    n = check_same_shape(negatives, name="negatives", like=a, like_name="anchors")
    s = check_same_shape(synthetic, name="synthetic", like=a, like_name="anchors")
    check_scalar(lambda_reg, name="lambda_reg", min_value=0.0, min_inclusive=False)
    check_scalar(lambda_adv, name="lambda_adv", min_value=0.0)
    check_scalar(margin, name="margin", min_value=0.0)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'none'), got {reduction!r}")
    d_sa = _sq(s - a)
    values = d_sa + lambda_reg * _sq(s - n) + lambda_adv * jax.nn.relu(d_sa - _sq(p - a) - margin)
    if weights is not None:
        if tuple(jnp.shape(weights)) != values.shape:
            raise ValueError(f"weights must have shape {values.shape}, got {tuple(jnp.shape(weights))}")
        weights = jnp.asarray(weights).astype(values.dtype)
    if reduction == "none":
        return values if weights is None else values * weights
    return masked_mean(values, weights)


def daml_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    synthetic_negatives: jax.Array,
    triplets: jax.Array,
    *,
    margin: float = 1.0,
    real_weight: float = 1.0,
    synthetic_weight: float = 1.0,
    triplet_valid: jax.Array | None = None,
) -> jax.Array:
    """Metric loss of DAML: triplet hinge on real and on synthetic negatives (squared euclidean).

    ::

        J_m = real_weight      * mean_t [ |a - p|^2 - |a - n|^2 + margin ]_+
            + synthetic_weight * mean_t [ |a - p|^2 - |a - s|^2 + margin ]_+

    over the triplets ``t = (a, p, n)`` given as row indices into ``embeddings`` and their
    synthetic negatives ``s`` (one per triplet, from `HardNegativeGenerator`; stop its gradient
    when updating only the metric). Triplets whose labels do not form a valid triplet (or with
    ``triplet_valid`` False) do not count; means divide by max(count, 1).

    Args:
      embeddings: [B, D]. labels: [B] int.
      synthetic_negatives: [T, D].
      triplets: int [T, 3] rows (anchor, positive, negative), e.g. from `sample_triplets`.
        Indices must be in range (checked when concrete).
      margin: alpha >= 0 (paper: 1 on unnormalised features; 0.2 suits unit-norm embeddings).
      real_weight, synthetic_weight: >= 0 (paper's lambda for the synthetic part).
      triplet_valid: optional bool [T].
    Returns:
      scalar loss.
    """
    x = check_embeddings(embeddings)
    y = check_labels(labels, batch_size=x.shape[0])
    t = check_triplets(triplets, batch_size=x.shape[0])
    s = check_embeddings(synthetic_negatives, name="synthetic_negatives")
    if s.shape != (t.shape[0], x.shape[1]):
        raise ValueError(f"synthetic_negatives must have shape ({t.shape[0]}, {x.shape[1]}), got {s.shape}")
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(real_weight, name="real_weight", min_value=0.0)
    check_scalar(synthetic_weight, name="synthetic_weight", min_value=0.0)
    ok = triplet_validity(y, t)
    if triplet_valid is not None:
        ok = ok & check_valid(triplet_valid, batch_size=t.shape[0], name="triplet_valid")
    a, p, n = x[t[:, 0]], x[t[:, 1]], x[t[:, 2]]
    d_ap = _sq(a - p)
    real = jax.nn.relu(d_ap - _sq(a - n) + margin)
    synth = jax.nn.relu(d_ap - _sq(a - s.astype(x.dtype)) + margin)
    return real_weight * masked_mean(real, ok) + synthetic_weight * masked_mean(synth, ok)
