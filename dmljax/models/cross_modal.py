"""Cross-modal metric learning for zero-shot sketch-based image retrieval (ZS-SBIR).

Huang et al., "Modality-Aware Triplet Hard Mining for Zero-shot Sketch-Based Image Retrieval"
(MATHM, 2021; seed 003 abstract 19; code github.com/huangzongheng/mathm).

Model: two branches, a sketch encoder and a photo encoder, map each modality into one shared,
L2-normalised embedding space (`TwoBranchEmbedding`).

Loss (`modality_aware_triplet_loss`): batch-hard triplet terms (Hermans et al. 2017) of the
three kinds of pairs the paper names, on the union of both modalities' batches::

    L = w_cross * L_cross + w_intra * L_intra + w_mixed * L_mixed

* L_cross: anchor in one modality, hardest positive and hardest negative both from the *other*
  modality (the retrieval task: sketch query -> photo gallery and back);
* L_intra: hardest positive and hardest negative from the anchor's *own* modality;
* L_mixed: hardest positive from the other modality, hardest negative from the own modality,
  i.e. a cross-modal positive must beat every same-modality negative: this is what
  suppresses the modality gap (a sketch may not be closer to a sketch of another class
  than to a photo of its own class).

Each term is ``mean_a [d(a, p*) - d(a, n*) + margin]_+`` over anchors that have such a positive
and negative. Deviation: the paper balances the three terms with an adaptive weighting during
training; here the weights are fixed keyword arguments (default 1 each), which the trainer
may schedule. Margin 0.3 is the usual batch-hard setting for unit-norm embeddings (the
paper's exact value is not in the abstract).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmljax import distances
from dmljax._validation import check_embeddings, check_labels, check_scalar, check_valid
from dmljax.distances import l2_normalize
from dmljax.masks import label_masks
from dmljax.mining.miners import batch_hard
from dmljax.reductions import masked_mean

__all__ = ["MLPEncoder", "TwoBranchEmbedding", "modality_aware_triplet_loss"]


class MLPEncoder(nnx.Module):
    """Small MLP encoder for vector inputs [N, F] -> [N, out] (ReLU between layers)."""

    def __init__(self, in_features: int, out_features: int, *, hidden: Sequence[int] = (64,), rngs: nnx.Rngs):
        sizes = [in_features, *hidden, out_features]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


class TwoBranchEmbedding(nnx.Module):
    """Sketch branch and photo branch into one shared L2-normalised embedding space.

    ``sketch_encoder`` / ``photo_encoder`` are any NNX modules (e.g. a CNN backbone + head for
    images); by default `MLPEncoder`s over vector inputs of widths ``sketch_features`` /
    ``photo_features``. A shared linear projection after the branch-specific encoders
    (``shared_projection=True``) ties both modalities to one output map.
    """

    def __init__(self, sketch_features: int, photo_features: int, embedding_dim: int = 32, *,
                 hidden: Sequence[int] = (64,), sketch_encoder: nnx.Module | None = None,
                 photo_encoder: nnx.Module | None = None, shared_projection: bool = True, rngs: nnx.Rngs):
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        width = hidden[-1] if shared_projection and hidden else embedding_dim
        self.sketch_encoder = sketch_encoder or MLPEncoder(sketch_features, width, hidden=hidden[:-1] if shared_projection else hidden, rngs=rngs)
        self.photo_encoder = photo_encoder or MLPEncoder(photo_features, width, hidden=hidden[:-1] if shared_projection else hidden, rngs=rngs)
        self.projection = nnx.Linear(width, embedding_dim, rngs=rngs) if shared_projection else None

    def _finish(self, h):
        if self.projection is not None:
            h = self.projection(nnx.relu(h))
        return l2_normalize(h.astype(jnp.float32))

    def embed_sketch(self, sketches: jax.Array) -> jax.Array:
        return self._finish(self.sketch_encoder(sketches))

    def embed_photo(self, photos: jax.Array) -> jax.Array:
        return self._finish(self.photo_encoder(photos))

    def __call__(self, sketches: jax.Array, photos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(sketch embeddings [Ns, D], photo embeddings [Np, D])."""
        return self.embed_sketch(sketches), self.embed_photo(photos)


def _hinge_term(d, positive, negative, margin):
    hard = batch_hard(d, positive, negative)
    d_ap = jnp.sum(hard.positive_weights * d, axis=1)
    d_an = jnp.sum(hard.negative_weights * d, axis=1)
    return masked_mean(jax.nn.relu(d_ap - d_an + margin), hard.valid)


def modality_aware_triplet_loss(
    emb_a: jax.Array,
    labels_a: jax.Array,
    emb_b: jax.Array,
    labels_b: jax.Array,
    *,
    margin: float = 0.3,
    cross_weight: float = 1.0,
    intra_weight: float = 1.0,
    mixed_weight: float = 1.0,
    metric: str = "euclidean",
    valid_a: jax.Array | None = None,
    valid_b: jax.Array | None = None,
) -> jax.Array:
    """MATHM loss (see the module docstring) on two modalities' batches.

    Args:
      emb_a: [Na, D] embeddings of modality A (sketches); labels_a: [Na] int class ids.
      emb_b: [Nb, D] embeddings of modality B (photos); labels_b: [Nb] int class ids.
      margin: >= 0. cross_weight, intra_weight, mixed_weight: >= 0 weights of the three terms.
      metric: "euclidean" or "squared_euclidean".
      valid_a, valid_b: optional [Na] / [Nb] masks of real rows.
    Returns:
      scalar loss; every anchor of both modalities counts in each term. Terms without any
      valid anchor contribute 0 (finite gradient).
    """
    a = check_embeddings(emb_a, name="emb_a")
    b = check_embeddings(emb_b, name="emb_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"emb_b must have feature dim {a.shape[1]} like emb_a, got shape {b.shape}")
    la = check_labels(labels_a, batch_size=a.shape[0], name="labels_a")
    lb = check_labels(labels_b, batch_size=b.shape[0], name="labels_b")
    check_scalar(margin, name="margin", min_value=0.0)
    for name, w in (("cross_weight", cross_weight), ("intra_weight", intra_weight), ("mixed_weight", mixed_weight)):
        check_scalar(w, name=name, min_value=0.0)
    if metric not in ("euclidean", "squared_euclidean"):
        raise ValueError(f"metric must be one of ('euclidean', 'squared_euclidean'), got {metric!r}")
    va = check_valid(valid_a, batch_size=a.shape[0], name="valid_a")
    vb = check_valid(valid_b, batch_size=b.shape[0], name="valid_b")
    na, nb = a.shape[0], b.shape[0]
    dtype = jnp.promote_types(a.dtype, b.dtype)
    x = jnp.concatenate([a.astype(dtype), b.astype(dtype)])
    labels = jnp.concatenate([la.astype(jnp.int32), lb.astype(jnp.int32)])
    valid = None
    if va is not None or vb is not None:
        valid = jnp.concatenate([jnp.ones(na, bool) if va is None else va, jnp.ones(nb, bool) if vb is None else vb])
    d = distances.pairwise(x, metric=metric)
    positive, negative = label_masks(labels, valid=valid)
    modality = jnp.concatenate([jnp.zeros(na, bool), jnp.ones(nb, bool)])
    same_mod = modality[:, None] == modality[None, :]
    cross = _hinge_term(d, positive & ~same_mod, negative & ~same_mod, margin)
    intra = _hinge_term(d, positive & same_mod, negative & same_mod, margin)
    mixed = _hinge_term(d, positive & ~same_mod, negative & same_mod, margin)
    return cross_weight * cross + intra_weight * intra + mixed_weight * mixed
