"""Retrieval metrics computed from k-nearest-neighbour indices (see `dmljax.metrics.knn`).

Notation, per query q with label y_q: the neighbours n_1, n_2, ... (nearest first, the
query itself already excluded in the query-in-gallery protocol), rel_i = [y_{n_i} == y_q],
and R_q = number of gallery items with label y_q other than q itself.

* Recall@K (the deep-metric-learning definition, Song et al. 2016 / Oh Song; not the IR
  recall): 1 if any of the first K neighbours shares the label, averaged over queries.
* Precision@1 = Recall@1.
* R-precision (Musgrave et al. 2020, "A Metric Learning Reality Check"):
  (1 / R_q) sum_{i<=R_q} rel_i.
* MAP@R (Musgrave et al. 2020): (1 / R_q) sum_{i<=R_q} P(i) rel_i with
  P(i) = (1 / i) sum_{j<=i} rel_j. Both need the neighbour lists to hold at least
  max_q R_q entries (the LARGEST class size, minus one in the self protocol), never a
  fixed cap: see `required_neighbors`.
* Mean reciprocal rank: 1 / (rank of the first relevant neighbour), 0 if none is among
  the retrieved K (MRR@K).
* nDCG@k (as proposed with the MPA loss, Saeki et al. 2021, arXiv 2110.03997), with
  binary relevance rel_i: DCG@k = sum_{i<=k} rel_i / log2(i + 1),
  IDCG@k = sum_{i<=min(k, R_q)} 1 / log2(i + 1) (all relevant items ranked first),
  nDCG@k = DCG@k / IDCG@k. (Their gain 2^rel - 1 equals rel for binary relevance.)

Queries whose class has no other member in the gallery (R_q = 0) cannot be scored by
R-precision, MAP@R or nDCG (the ideal list is empty): they are excluded from those three
means. They stay in Recall@K, Precision@1 and MRR, where they count as misses (as in
the usual R@K evaluation code), so a data set with many singletons lowers R@K.

All functions are pure JAX with static shapes (jit-able); the label logic uses sorting
and ``searchsorted``, not host-side dictionaries.
"""

from __future__ import annotations

import functools
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_labels

__all__ = [
    "neighbor_hits",
    "same_class_counts",
    "required_neighbors",
    "recall_at_k",
    "precision_at_1",
    "r_precision",
    "map_at_r",
    "mean_reciprocal_rank",
    "ndcg_at_k",
    "retrieval_metrics",
]


def _check_indices(neighbor_indices, *, num_queries=None, num_gallery=None):
    shape = np.shape(neighbor_indices)
    if len(shape) != 2:
        raise ValueError(f"neighbor_indices must have rank 2 [queries, k], got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(neighbor_indices), jnp.integer):
        raise ValueError(f"neighbor_indices must be integer, got dtype {jnp.result_type(neighbor_indices)}")
    if num_queries is not None and shape[0] != num_queries:
        raise ValueError(f"neighbor_indices has {shape[0]} rows but query_labels has {num_queries}")
    idx = jnp.asarray(neighbor_indices)
    if num_gallery is not None and not isinstance(idx, jax.core.Tracer) and idx.size:
        if int(jnp.min(idx)) < 0 or int(jnp.max(idx)) >= num_gallery:
            raise ValueError(f"neighbor_indices must lie in [0, {num_gallery}), the gallery size")
    return idx


def neighbor_hits(neighbor_indices, query_labels, gallery_labels=None) -> jax.Array:
    """Bool [N, K]: neighbour i of query q has the query's label (rel_i above).

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import neighbor_hits
      >>> labels = np.array([0, 0, 1, 1])
      >>> print(neighbor_hits(np.array([[1, 2], [2, 0], [3, 0], [0, 2]]), labels))
      [[ True False]
       [False  True]
       [ True False]
       [False  True]]
    """
    query_labels = check_labels(query_labels, name="query_labels")
    gallery_labels = query_labels if gallery_labels is None else check_labels(gallery_labels, name="gallery_labels")
    idx = _check_indices(neighbor_indices, num_queries=query_labels.shape[0], num_gallery=gallery_labels.shape[0])
    return gallery_labels[idx] == query_labels[:, None]


def same_class_counts(query_labels, gallery_labels=None) -> jax.Array:
    """R_q: int32 [N] number of gallery items sharing the query's label.

    Without ``gallery_labels`` the query set is the gallery and the query itself is not
    counted (R_q = class size - 1).

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import same_class_counts
      >>> print(same_class_counts(np.array([0, 0, 0, 1, 1])))
      [2 2 2 1 1]
    """
    query_labels = check_labels(query_labels, name="query_labels")
    self_search = gallery_labels is None
    ref = query_labels if self_search else check_labels(gallery_labels, name="gallery_labels")
    ref_sorted = jnp.sort(ref)
    counts = (jnp.searchsorted(ref_sorted, query_labels, side="right")
              - jnp.searchsorted(ref_sorted, query_labels, side="left"))
    return (counts - 1 if self_search else counts).astype(jnp.int32)


def required_neighbors(query_labels, gallery_labels=None, *, ks: Sequence[int] = ()) -> int:
    """Neighbours to retrieve for every metric here: max(max R_q, max ks) (concrete labels).

    MAP@R and R-precision need max R_q = the largest class size (minus 1 in the
    self protocol), Musgrave et al. 2020.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import required_neighbors
      >>> required_neighbors(np.array([0, 0, 0, 1, 1]), ks=(1, 4))
      4
    """
    r = same_class_counts(query_labels, gallery_labels)
    return int(max([int(jnp.max(r)) if r.size else 0, *[int(k) for k in ks], 1]))


def _check_k(k, *, available: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    if k > available:
        raise ValueError(f"{name} must be <= the number of retrieved neighbours ({available}), got {k}")
    return int(k)


def _check_hits(hits) -> jax.Array:
    shape = np.shape(hits)
    if len(shape) != 2:
        raise ValueError(f"hits must have rank 2 [queries, k], got shape {shape}")
    return jnp.asarray(hits).astype(bool)


def _check_counts(num_relevant, hits) -> jax.Array:
    shape = np.shape(num_relevant)
    if shape != (hits.shape[0],):
        raise ValueError(f"num_relevant must have shape ({hits.shape[0]},), got {shape}")
    num_relevant = jnp.asarray(num_relevant)
    if not isinstance(num_relevant, jax.core.Tracer) and num_relevant.size:
        if int(jnp.max(num_relevant)) > hits.shape[1]:
            raise ValueError(
                f"num_relevant: the largest class needs {int(jnp.max(num_relevant))} neighbours but only "
                f"{hits.shape[1]} were retrieved; retrieve required_neighbors(...) of them")
    return num_relevant


def _mean_over(values, include) -> jax.Array:
    include = include.astype(values.dtype)
    return jnp.sum(values * include) / jnp.maximum(jnp.sum(include), 1.0)


def recall_at_k(hits, *, k: int) -> jax.Array:
    """Recall@k (DML definition): mean over queries of [any of the first k neighbours is a hit].

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import recall_at_k
      >>> hits = np.array([[False, True], [True, False], [False, False]])
      >>> round(float(recall_at_k(hits, k=1)), 4), round(float(recall_at_k(hits, k=2)), 4)
      (0.3333, 0.6667)
    """
    hits = _check_hits(hits)
    k = _check_k(k, available=hits.shape[1])
    return jnp.mean(jnp.any(hits[:, :k], axis=1))


def precision_at_1(hits) -> jax.Array:
    """Fraction of queries whose nearest neighbour shares their label.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import precision_at_1
      >>> round(float(precision_at_1(np.array([[True, False], [False, True]]))), 4)
      0.5
    """
    return recall_at_k(hits, k=1)


def r_precision(hits, num_relevant) -> jax.Array:
    """Mean over queries with R_q > 0 of (hits among the first R_q neighbours) / R_q.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import r_precision
      >>> hits = np.array([[True, False, True], [False, True, False]])
      >>> round(float(r_precision(hits, np.array([2, 1]))), 4)
      0.25
    """
    hits = _check_hits(hits)
    num_relevant = _check_counts(num_relevant, hits)
    rank = jnp.arange(1, hits.shape[1] + 1)
    within = rank[None, :] <= num_relevant[:, None]
    per_query = jnp.sum(hits & within, axis=1) / jnp.maximum(num_relevant, 1)
    return _mean_over(per_query, num_relevant > 0)


def map_at_r(hits, num_relevant) -> jax.Array:
    """MAP@R (Musgrave et al. 2020): mean over queries with R_q > 0 of
    (1 / R_q) sum_{i <= R_q} P(i) rel_i.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import map_at_r
      >>> hits = np.array([[True, False, True], [False, True, False]])
      >>> round(float(map_at_r(hits, np.array([2, 1]))), 4)
      0.25
    """
    hits = _check_hits(hits)
    num_relevant = _check_counts(num_relevant, hits)
    rank = jnp.arange(1, hits.shape[1] + 1)
    within = rank[None, :] <= num_relevant[:, None]
    precision = jnp.cumsum(hits, axis=1) / rank[None, :]
    per_query = jnp.sum(jnp.where(hits & within, precision, 0.0), axis=1) / jnp.maximum(num_relevant, 1)
    return _mean_over(per_query, num_relevant > 0)


def mean_reciprocal_rank(hits) -> jax.Array:
    """Mean of 1 / (rank of the first hit); a query without a hit in its K neighbours adds 0.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import mean_reciprocal_rank
      >>> round(float(mean_reciprocal_rank(np.array([[True, False], [False, True]]))), 4)
      0.75
    """
    hits = _check_hits(hits)
    rank = jnp.arange(1, hits.shape[1] + 1)
    first = jnp.argmax(hits, axis=1)
    rr = jnp.where(jnp.any(hits, axis=1), 1.0 / rank[first], 0.0)
    return jnp.mean(rr)


def ndcg_at_k(hits, num_relevant, *, k: int) -> jax.Array:
    """nDCG@k with binary relevance (Saeki et al., MPA), mean over queries with R_q > 0.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import ndcg_at_k
      >>> hits = np.array([[False, True], [True, False]])
      >>> round(float(ndcg_at_k(hits, np.array([1, 1]), k=2)), 4)
      0.8155
    """
    hits = _check_hits(hits)
    k = _check_k(k, available=hits.shape[1])
    num_relevant = jnp.asarray(num_relevant)
    if np.shape(num_relevant) != (hits.shape[0],):
        raise ValueError(f"num_relevant must have shape ({hits.shape[0]},), got {np.shape(num_relevant)}")
    discount = 1.0 / jnp.log2(jnp.arange(2, k + 2).astype(float))
    dcg = jnp.sum(hits[:, :k] * discount[None, :], axis=1)
    ideal = jnp.sum(jnp.where(jnp.arange(1, k + 1)[None, :] <= num_relevant[:, None], discount[None, :], 0.0), axis=1)
    per_query = dcg / jnp.maximum(ideal, 1.0)  # ideal >= 1 whenever R_q > 0
    return _mean_over(per_query, num_relevant > 0)


def retrieval_metrics(
    neighbor_indices,
    query_labels,
    gallery_labels=None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    ndcg_ks: Sequence[int] | None = None,
) -> dict[str, float]:
    """All retrieval metrics from kNN indices: recall@k for ``ks``, precision_at_1,
    r_precision, map_at_r, mrr and ndcg@k for ``ndcg_ks`` (default: ``ks``).

    ``gallery_labels=None`` is the query-in-gallery protocol (indices from
    ``knn(query, k=..)`` with self excluded). The neighbour lists must be at least
    ``required_neighbors(query_labels, gallery_labels, ks=ks)`` long.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.retrieval import retrieval_metrics
      >>> neighbors = np.array([[1, 2], [2, 0], [3, 0], [0, 2]])
      >>> m = retrieval_metrics(neighbors, np.array([0, 0, 1, 1]), ks=(1, 2))
      >>> {k: round(float(v), 4) for k, v in sorted(m.items())}
      {'map_at_r': 0.5, 'mrr': 0.75, 'ndcg@1': 0.5, 'ndcg@2': 0.8155, 'precision_at_1': 0.5, 'r_precision': 0.5, 'recall@1': 0.5, 'recall@2': 1.0}
    """
    ks = tuple(int(k) for k in ks)
    ndcg_ks = ks if ndcg_ks is None else tuple(int(k) for k in ndcg_ks)
    hits = neighbor_hits(neighbor_indices, query_labels, gallery_labels)
    counts = same_class_counts(query_labels, gallery_labels)
    for k in ks + ndcg_ks:
        _check_k(k, available=hits.shape[1])
    _check_counts(counts, hits)
    values = _all_metrics(hits, counts, ks=ks, ndcg_ks=ndcg_ks)
    return {name: float(v) for name, v in values.items()}


@functools.partial(jax.jit, static_argnames=("ks", "ndcg_ks"))
def _all_metrics(hits, counts, *, ks, ndcg_ks):
    # one compiled program for the whole report instead of dozens of small eager ops
    out = {f"recall@{k}": recall_at_k(hits, k=k) for k in ks}
    out["precision_at_1"] = precision_at_1(hits)
    out["r_precision"] = r_precision(hits, counts)
    out["map_at_r"] = map_at_r(hits, counts)
    out["mrr"] = mean_reciprocal_rank(hits)
    out.update({f"ndcg@{k}": ndcg_at_k(hits, counts, k=k) for k in ndcg_ks})
    return out
