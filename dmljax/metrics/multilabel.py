"""Multi-label retrieval metrics (images annotated with several labels, multi-hot [N, C]).

As used for multi-label content-based image retrieval (e.g. Sumbul et al., TGRS 2021, seed 003
abstract 17): a retrieved image is relevant to a query when they share at least one label, and
graded relevance is the number of shared labels.

Inputs are the query multi-hot labels [Q, C], gallery multi-hot labels [N, C] and the ranked
neighbour indices [Q, K] of each query into the gallery (e.g. from `dmljax.metrics.knn.knn`).
All functions return the mean over queries::

    precision@k = (1/k) sum_{r <= k} rel_r                                  (binary rel)
    mAP@k       = mean_q (1 / sum_{r<=k} rel_r) sum_{r <= k} rel_r P@r      (0 for a query with no
                  relevant item in its top k; the normaliser is the number of relevant items
                  retrieved in the top k, the common "mAP@k" of RS CBIR papers)
    nDCG@k      = DCG@k / IDCG@k,  DCG@k = sum_{r <= k} (2^{g_r} - 1) / log2(r + 1), g = shared
                  label count; IDCG@k is the DCG of the ideal ranking of the *whole* gallery
                  (its k largest gains), so the metric needs the gallery labels (O(Q N) memory).
                  Queries whose ideal DCG is 0 (no gallery item shares a label) are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "graded_relevance",
    "multilabel_map_at_k",
    "multilabel_ndcg_at_k",
    "multilabel_precision_at_k",
    "multilabel_retrieval_metrics",
]


def _multi_hot(x, name):
    if np.ndim(x) != 2:
        raise ValueError(f"{name} must have rank 2 [items, classes] (multi-hot), got shape {np.shape(x)}")
    return (jnp.asarray(x) != 0).astype(jnp.float32)


def graded_relevance(neighbor_indices, query_labels, gallery_labels) -> jax.Array:
    """[Q, K] float: shared-label count between each query and its k-th retrieved item.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.multilabel import graded_relevance
      >>> query = np.array([[1, 1, 0]], dtype=bool)
      >>> gallery = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> print(graded_relevance(np.array([[1, 0, 2]]), query, gallery))
      [[2. 1. 0.]]
    """
    q = _multi_hot(query_labels, "query_labels")
    g = _multi_hot(gallery_labels, "gallery_labels")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gallery_labels must have {q.shape[1]} classes like query_labels, got {g.shape}")
    idx = jnp.asarray(neighbor_indices)
    if idx.ndim != 2 or idx.shape[0] != q.shape[0]:
        raise ValueError(f"neighbor_indices must have shape ({q.shape[0]}, k), got {idx.shape}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"neighbor_indices must be integer indices, got dtype {idx.dtype}")
    return jnp.sum(q[:, None, :] * g[idx], axis=-1)


def _check_k(k, available):
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= available:
        raise ValueError(f"k must be an int in [1, {available}], got {k!r}")
    return k


def multilabel_precision_at_k(neighbor_indices, query_labels, gallery_labels, *, k: int) -> jax.Array:
    """Mean fraction of the top k retrieved items that share a label with the query.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.multilabel import multilabel_precision_at_k
      >>> query = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> gallery = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> neighbors = np.array([[1, 2], [0, 2]])
      >>> round(float(multilabel_precision_at_k(neighbors, query, gallery, k=2)), 4)
      0.5
    """
    rel = graded_relevance(neighbor_indices, query_labels, gallery_labels) > 0
    k = _check_k(k, rel.shape[1])
    return jnp.mean(jnp.mean(rel[:, :k], axis=1))


def multilabel_map_at_k(neighbor_indices, query_labels, gallery_labels, *, k: int) -> jax.Array:
    """mAP@k with binary relevance (shares >= 1 label); see the module docstring.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.multilabel import multilabel_map_at_k
      >>> query = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> gallery = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> neighbors = np.array([[1, 2], [0, 2]])
      >>> round(float(multilabel_map_at_k(neighbors, query, gallery, k=2)), 4)
      0.75
    """
    rel = (graded_relevance(neighbor_indices, query_labels, gallery_labels) > 0).astype(jnp.float32)
    k = _check_k(k, rel.shape[1])
    rel = rel[:, :k]
    precision = jnp.cumsum(rel, axis=1) / jnp.arange(1, k + 1)
    num = jnp.sum(rel, axis=1)
    return jnp.mean(jnp.sum(precision * rel, axis=1) / jnp.maximum(num, 1.0))


def multilabel_ndcg_at_k(neighbor_indices, query_labels, gallery_labels, *, k: int) -> jax.Array:
    """nDCG@k with graded relevance (shared-label count), gains 2^g - 1; see the module docstring.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.multilabel import multilabel_ndcg_at_k
      >>> query = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> gallery = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> neighbors = np.array([[1, 2], [0, 2]])
      >>> round(float(multilabel_ndcg_at_k(neighbors, query, gallery, k=2)), 4)
      0.7286
    """
    gains = graded_relevance(neighbor_indices, query_labels, gallery_labels)
    k = _check_k(k, gains.shape[1])
    discount = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
    dcg = jnp.sum((2.0 ** gains[:, :k] - 1.0) * discount, axis=1)
    all_gains = _multi_hot(query_labels, "query_labels") @ _multi_hot(gallery_labels, "gallery_labels").T
    ideal_gains = jax.lax.top_k(all_gains, min(k, all_gains.shape[1]))[0]
    idcg = jnp.sum((2.0 ** ideal_gains - 1.0) * discount[: ideal_gains.shape[1]], axis=1)
    has = idcg > 0
    per_query = jnp.where(has, dcg / jnp.where(has, idcg, 1.0), 0.0)
    return jnp.sum(per_query) / jnp.maximum(jnp.sum(has), 1)


def multilabel_retrieval_metrics(neighbor_indices, query_labels, gallery_labels, *, ks=(1, 5, 10)) -> dict:
    """{"precision@k", "map@k", "ndcg@k"} for every k in ``ks`` (k <= number of neighbours).

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.multilabel import multilabel_retrieval_metrics
      >>> query = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> gallery = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
      >>> m = multilabel_retrieval_metrics(np.array([[1, 2], [0, 2]]), query, gallery, ks=(1, 2))
      >>> {k: round(float(v), 4) for k, v in sorted(m.items())}
      {'map@1': 0.5, 'map@2': 0.75, 'ndcg@1': 0.5, 'ndcg@2': 0.7286, 'precision@1': 0.5, 'precision@2': 0.5}
    """
    out = {}
    for k in ks:
        out[f"precision@{k}"] = float(multilabel_precision_at_k(neighbor_indices, query_labels, gallery_labels, k=k))
        out[f"map@{k}"] = float(multilabel_map_at_k(neighbor_indices, query_labels, gallery_labels, k=k))
        out[f"ndcg@{k}"] = float(multilabel_ndcg_at_k(neighbor_indices, query_labels, gallery_labels, k=k))
    return out
