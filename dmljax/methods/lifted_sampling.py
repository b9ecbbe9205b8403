"""Hard-negative batch augmentation of the lifted structured embedding paper.

Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted Structured Feature
Embedding", CVPR 2016 (arXiv 1511.06452), Sec. 4: instead of uniform batches, "we sample a few
positive pairs at random, and then actively add their difficult neighbors to the training
mini-batch" (the importance sampling of hard negatives that the smooth upper bound of the loss,
`dmljax.losses.pair.lifted_structured_loss`, then exploits).

`lifted_hard_negative_batch` does this on a pool of (possibly stale) embeddings, e.g. the last
epoch's embeddings of the training set or a large candidate set: ``num_pairs`` random positive
pairs, and for each pair the ``negatives_per_pair`` pool items of other classes closest to
either end of the pair. It returns pool indices of a static-length batch for the data loader.
Memory O(num_pairs * N), time O(num_pairs * N * D + N log N) (no N x N matrix, so the pool can be
a large part of the training set). The trainer flag ``sampler.name=lifted_hard_negative``
(`dmljax.train.lifted_pool.LiftedHardNegativeSampler`) keeps such a pool of stale embeddings in the
checkpointed train state and draws every batch with this function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax._validation import check_embeddings, check_key, check_labels, check_valid
from dmljax.distances import squared_euclidean
from dmljax.methods._common import _random_member, check_positive_int

__all__ = ["lifted_hard_negative_batch"]


def lifted_hard_negative_batch(key: jax.Array, embeddings: jax.Array, labels: jax.Array, *, num_pairs: int,
                               negatives_per_pair: int, valid: jax.Array | None = None
                               ) -> tuple[jax.Array, jax.Array]:
    """Pool indices of a batch of random positive pairs plus their hardest negatives.

    Args:
      key: PRNG key (which pairs). embeddings: [N, D] pool embeddings (no gradient).
      labels: [N] int. num_pairs: P random anchors (uniform over items that have a positive),
        each with a uniform random positive. negatives_per_pair: K nearest other-class items to
        ``min(d(anchor, .), d(positive, .))``. valid: optional [N] bool pool mask.
    Returns:
      (indices int32 [P * (2 + K)]: for each pair ``anchor, positive, K negatives``;
       ok bool [P * (2 + K)]: False where the pool had no positive pair / too few negatives).
    """
    key = check_key(key)
    x = jax.lax.stop_gradient(check_embeddings(embeddings))
    y = check_labels(labels, batch_size=x.shape[0])
    p = check_positive_int(num_pairs, name="num_pairs")
    k = check_positive_int(negatives_per_pair, name="negatives_per_pair")
    n = x.shape[0]
    if k > n:
        raise ValueError(f"negatives_per_pair must be <= the pool size {n}, got {k}")
    valid = jnp.ones((n,), bool) if valid is None else check_valid(valid, batch_size=n)
    # has_positive without an N x N mask: sort by (valid first, label); a valid item has a valid
    # same-class partner iff a sorted neighbour is valid with its label. O(N log N).
    order = jnp.lexsort((y, ~valid))
    ys, vs = y[order], valid[order]
    dup = (ys[1:] == ys[:-1]) & vs[1:] & vs[:-1]
    none = jnp.zeros((1,), bool)
    has_positive = jnp.zeros((n,), bool).at[order].set(jnp.concatenate([none, dup]) | jnp.concatenate([dup, none]))
    k_anchor, k_pos = jax.random.split(key)
    anchor_logits = jnp.where(has_positive, 0.0, -jnp.inf)
    anchors = jax.random.categorical(k_anchor, anchor_logits, shape=(p,)).astype(jnp.int32)
    any_pair = jnp.any(has_positive)
    positive = (y[None, :] == y[anchors][:, None]) & valid[None, :] & (jnp.arange(n)[None, :] != anchors[:, None])
    positives, _ = _random_member(k_pos, positive)  # [P, N] masks only
    d = squared_euclidean(x[jnp.concatenate([anchors, positives])], x)  # [2P, N]
    d_pair = jnp.minimum(d[:p], d[p:])
    negative = (y[None, :] != y[anchors][:, None]) & valid[None, :]
    neg_score, negatives = jax.lax.top_k(jnp.where(negative, -d_pair, -jnp.inf), k)
    neg_ok = jnp.isfinite(neg_score) & any_pair
    indices = jnp.concatenate([anchors[:, None], positives[:, None], negatives.astype(jnp.int32)], axis=1)
    ok = jnp.concatenate([jnp.full((p, 2), any_pair), neg_ok], axis=1)
    return indices.reshape(-1), ok.reshape(-1)
