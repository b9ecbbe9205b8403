"""Clustering quality of an embedding: k-means in JAX, NMI, AMI and pairwise F1.

The DML protocol (Song et al. 2016, "Deep Metric Learning via Lifted Structured Feature
Embedding", arXiv 1511.06452): cluster the test embeddings with k-means into as many
clusters as there are classes, then compare the clusters with the classes.

* `kmeans`: k-means++ seeding (Arthur & Vassilvitskii 2007; one candidate per step, an
  explicit PRNG key), Lloyd iterations in ``lax.while_loop`` until the relative
  decrease of the inertia is <= ``tol`` or ``max_iters``; ``num_restarts`` independent
  runs (``lax.map``, restart r seeded by ``fold_in(key, r)``) keep the lowest inertia. The point-to-centroid distances are
  computed in blocks of ``block_size`` points, so memory is O(block_size * C), not N C.
  An empty cluster keeps its previous centroid.
* `normalized_mutual_info`: I(Y; K) / mean(H(Y), H(K)) (arithmetic mean, scikit-learn's
  default; "geometric", "min", "max" available), natural logarithms.
* `adjusted_mutual_info`: (I - E[I]) / (mean(H(Y), H(K)) - E[I]) with E[I] the expected
  mutual information under the hypergeometric (permutation) model (Vinh, Epps & Bailey,
  JMLR 2010), edge cases as scikit-learn 1.5+ (both labellings
  one cluster: 1; only one of them: 0).
* `clustering_f1`: the pairwise F-measure used by Song et al. 2016: over all pairs of
  items, TP = pairs in the same class and the same cluster, precision = TP / pairs in the
  same cluster, recall = TP / pairs in the same class, F1 = 2PR / (P + R). When neither
  labelling has any pair (all singletons) the partitions agree and F1 = 1; when only one
  side has pairs F1 = 0.

The information-theoretic scores are computed on the host in float64 from a sparse
contingency table (only non-empty cells), so 11k x 11k classes (SOP) are cheap.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dmljax._validation import check_embeddings, check_key
from dmljax.distances import l2_normalize
from dmljax.metrics.knn import check_finite

__all__ = [
    "kmeans",
    "contingency_table",
    "normalized_mutual_info",
    "adjusted_mutual_info",
    "clustering_f1",
    "clustering_metrics",
]

_EPS = np.finfo(np.float64).eps


def _sq_dists_to_centroids(x_blocks, c):
    """Blocked argmin / min of squared distances: [nb, b, D], [C, D] -> ([nb, b], [nb, b])."""
    c_sq = jnp.sum(jnp.square(c), axis=1)

    def one(xb):
        d2 = jnp.sum(jnp.square(xb), axis=1)[:, None] + c_sq[None, :] - 2.0 * xb @ c.T
        d2 = jnp.maximum(d2, 0.0)
        return jnp.argmin(d2, axis=1).astype(jnp.int32), jnp.min(d2, axis=1)

    return lax.map(one, x_blocks)


def _kmeans_pp(x, key, num_clusters):
    n = x.shape[0]
    key, first_key = jax.random.split(key)
    first = jax.random.randint(first_key, (), 0, n)
    centroids = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
    min_d2 = jnp.sum(jnp.square(x - x[first]), axis=1)

    def body(i, state):
        centroids, min_d2, key = state
        key, sub = jax.random.split(key)
        # P(pick j) proportional to D(x_j)^2; all-zero distances (fewer distinct points than
        # clusters) fall back to a uniform pick.
        positive = min_d2 > 0
        logits = jnp.where(positive, jnp.log(jnp.where(positive, min_d2, 1.0)), -jnp.inf)
        logits = jnp.where(jnp.any(positive), logits, 0.0)
        j = jax.random.categorical(sub, logits)
        centroids = centroids.at[i].set(x[j])
        min_d2 = jnp.minimum(min_d2, jnp.sum(jnp.square(x - x[j]), axis=1))
        return centroids, min_d2, key

    centroids, _, _ = lax.fori_loop(1, num_clusters, body, (centroids, min_d2, key))
    return centroids


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_restarts", "max_iters", "block_size"))
def _kmeans(x, key, tol, *, num_clusters, num_restarts, max_iters, block_size):
    n, d = x.shape
    b = min(block_size, n)
    padded = -(-n // b) * b
    valid = jnp.arange(padded) < n
    x_blocks = jnp.concatenate([x, jnp.zeros((padded - n, d), x.dtype)]).reshape(-1, b, d)

    def assign(c):
        a, d2 = _sq_dists_to_centroids(x_blocks, c)
        a, d2 = a.reshape(-1), d2.reshape(-1)
        return a, jnp.sum(jnp.where(valid, d2, 0.0))

    def lloyd_step(c, a):
        w = valid.astype(x.dtype)
        flat = x_blocks.reshape(-1, d)
        sums = jax.ops.segment_sum(flat * w[:, None], a, num_segments=num_clusters)
        counts = jax.ops.segment_sum(w, a, num_segments=num_clusters)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    def run(run_key):
        c0 = _kmeans_pp(x, run_key, num_clusters)
        a0, inertia0 = assign(c0)

        def cond(state):
            _, _, inertia, prev, it = state
            return (it < max_iters) & (prev - inertia > tol * inertia)

        def body(state):
            c, a, inertia, _, it = state
            c_new = lloyd_step(c, a)
            a_new, inertia_new = assign(c_new)
            return c_new, a_new, inertia_new, inertia, it + 1

        state = (c0, a0, inertia0, jnp.asarray(jnp.inf, inertia0.dtype), jnp.asarray(0))
        c, a, inertia, _, _ = lax.while_loop(cond, body, state)
        return c, a[:n], inertia

    # restart r is seeded by fold_in(key, r): a run with more restarts contains the runs of one with fewer
    cs, assignments, inertias = lax.map(lambda r: run(jax.random.fold_in(key, r)), jnp.arange(num_restarts))
    best = jnp.argmin(inertias)
    return cs[best], assignments[best], inertias[best]


def _positive_int(value, *, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def kmeans(
    x: jax.Array,
    num_clusters: int,
    *,
    key: jax.Array,
    num_restarts: int = 3,
    max_iters: int = 100,
    tol: float = 1e-4,
    block_size: int = 4096,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """k-means++ / Lloyd k-means with restarts, in JAX.

    Args:
      x: [N, D] points (bf16 upcast to float32).
      num_clusters: C, 1 <= C <= N.
      key: PRNG key (required: results depend on it, never on global state).
      num_restarts: independent seedings; the run with the lowest inertia is returned
        (scikit-learn's ``n_init``).
      max_iters, tol: Lloyd stops after ``max_iters`` updates or when the inertia
        decreased by at most ``tol`` times its value (relative tolerance).
      block_size: points per distance block (memory O(block_size * C)).

    Returns:
      (centroids [C, D], assignments int32 [N], inertia = sum of squared distances of
      each point to its centroid).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dmljax.metrics.clustering import kmeans
      >>> x = jnp.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
      >>> centroids, assignments, inertia = kmeans(x, 2, key=jax.random.key(0))
      >>> bool(assignments[0] == assignments[1]) and bool(assignments[0] != assignments[2])
      True
      >>> round(float(inertia), 4)
      0.01
    """
    x = check_embeddings(x, name="x")
    num_clusters = _positive_int(num_clusters, name="num_clusters")
    if num_clusters > x.shape[0]:
        raise ValueError(f"num_clusters must be <= the number of points ({x.shape[0]}), got {num_clusters}")
    key = check_key(key)
    num_restarts = _positive_int(num_restarts, name="num_restarts")
    max_iters = _positive_int(max_iters, name="max_iters")
    block_size = _positive_int(block_size, name="block_size")
    if not isinstance(tol, numbers.Real) or not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    check_finite(x, name="x")
    return _kmeans(x, key, jnp.asarray(tol, x.dtype), num_clusters=num_clusters, num_restarts=num_restarts,
                   max_iters=max_iters, block_size=block_size)


def _check_label_pair(labels_true, labels_pred):
    a, b = np.asarray(labels_true), np.asarray(labels_pred)
    if a.ndim != 1:
        raise ValueError(f"labels_true must have rank 1, got shape {a.shape}")
    if b.ndim != 1:
        raise ValueError(f"labels_pred must have rank 1, got shape {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"labels_pred has {b.shape[0]} items but labels_true has {a.shape[0]}")
    for name, v in (("labels_true", a), ("labels_pred", b)):
        if not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.bool_)):
            raise ValueError(f"{name} must be integer class / cluster ids, got dtype {v.dtype}")
    return a, b


def contingency_table(labels_true, labels_pred):
    """Sparse contingency table: (row_sums a_i, col_sums b_j, cell rows, cell cols, cell counts n_ij).

    Examples:
      >>> from dmljax.metrics.clustering import contingency_table
      >>> print(contingency_table([0, 0, 1, 1], [1, 1, 1, 0]))
      (array([2, 2]), array([1, 3]), array([0, 1, 1]), array([1, 0, 1]), array([2, 1, 1]))
    """
    a, b = _check_label_pair(labels_true, labels_pred)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    ai, bi = ai.reshape(-1).astype(np.int64), bi.reshape(-1).astype(np.int64)
    nb = int(bi.max()) + 1 if bi.size else 0
    cells, counts = np.unique(ai * max(nb, 1) + bi, return_counts=True)
    return np.bincount(ai), np.bincount(bi), cells // max(nb, 1), cells % max(nb, 1), counts


def _entropy(counts):
    n = counts.sum()
    p = counts[counts > 0] / n
    return float(-np.sum(p * np.log(p)))


def _mutual_info(row, col, ci, cj, nij):
    n = float(row.sum())
    return float(np.sum(nij / n * (np.log(nij) + np.log(n) - np.log(row[ci]) - np.log(col[cj]))))


def _average(h_true, h_pred, method):
    if method == "arithmetic":
        return (h_true + h_pred) / 2
    if method == "geometric":
        return np.sqrt(h_true * h_pred)
    if method == "min":
        return min(h_true, h_pred)
    if method == "max":
        return max(h_true, h_pred)
    raise ValueError(f"average_method must be one of ('arithmetic', 'geometric', 'min', 'max'), got {method!r}")


def normalized_mutual_info(labels_true, labels_pred, *, average_method: str = "arithmetic") -> float:
    """NMI = I(Y; K) / mean(H(Y), H(K)); 1.0 if both labellings are a single (same) cluster.

    Examples:
      >>> from dmljax.metrics.clustering import normalized_mutual_info
      >>> round(normalized_mutual_info([0, 0, 1, 1], [5, 5, 7, 7]), 4)
      1.0
      >>> round(normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]), 4)
      0.0
    """
    _average(0.0, 0.0, average_method)
    row, col, ci, cj, nij = contingency_table(labels_true, labels_pred)
    if len(row) == len(col) and len(row) <= 1:
        return 1.0
    if len(row) == 1 or len(col) == 1:  # exact 0: rounding in I over a zero normaliser is not
        return 0.0
    mi = _mutual_info(row, col, ci, cj, nij)
    if mi <= 0:
        return 0.0
    normalizer = max(_average(_entropy(row), _entropy(col), average_method), _EPS)
    return float(mi / normalizer)


def _expected_mutual_info(row, col, n):
    """E[I] under the hypergeometric model, grouping equal marginals (few distinct sizes)."""
    a_vals, a_mult = np.unique(row, return_counts=True)
    b_vals, b_mult = np.unique(col, return_counts=True)
    # log(m!) for m = 0..n as a table (numpy only; every argument below is an integer <= n)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    total = 0.0
    for a, ma in zip(a_vals, a_mult):
        for b, mb in zip(b_vals, b_mult):
            lo, hi = max(1, a + b - n), min(a, b)
            if lo > hi:
                continue
            nij = np.arange(lo, hi + 1)
            log_prob = (log_fact[a] + log_fact[b] + log_fact[n - a] + log_fact[n - b] - log_fact[n]
                        - log_fact[nij] - log_fact[a - nij] - log_fact[b - nij] - log_fact[n - a - b + nij])
            term = nij / n * np.log(n * nij / (float(a) * float(b)))
            total += float(ma) * float(mb) * float(np.sum(term * np.exp(log_prob)))
    return total


def adjusted_mutual_info(labels_true, labels_pred, *, average_method: str = "arithmetic") -> float:
    """AMI = (I - E[I]) / (mean(H(Y), H(K)) - E[I]) (Vinh et al. 2010), as scikit-learn.

    Examples:
      >>> from dmljax.metrics.clustering import adjusted_mutual_info
      >>> round(adjusted_mutual_info([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 2]), 4)
      1.0
    """
    _average(0.0, 0.0, average_method)
    row, col, ci, cj, nij = contingency_table(labels_true, labels_pred)
    if len(row) == len(col) and len(row) <= 1:
        return 1.0
    if len(row) == 1 or len(col) == 1:  # one side does not split the data: no information
        return 0.0
    n = int(row.sum())
    mi = _mutual_info(row, col, ci, cj, nij)
    emi = _expected_mutual_info(row, col, n)
    denominator = _average(_entropy(row), _entropy(col), average_method) - emi
    denominator = min(denominator, -_EPS) if denominator < 0 else max(denominator, _EPS)
    numerator = mi - emi
    numerator = min(numerator, -_EPS) if numerator < 0 else max(numerator, _EPS)
    return float(numerator / denominator)


def clustering_f1(labels_true, labels_pred) -> float:
    """Pairwise F1 of a clustering against the classes (Song et al. 2016), see module doc.

    Examples:
      >>> from dmljax.metrics.clustering import clustering_f1
      >>> round(clustering_f1([0, 0, 1, 1], [0, 0, 1, 1]), 4)
      1.0
      >>> round(clustering_f1([0, 0, 1, 1], [0, 1, 0, 1]), 4)
      0.0
    """
    row, col, _, _, nij = contingency_table(labels_true, labels_pred)

    def pairs(c):
        c = c.astype(np.float64)
        return float(np.sum(c * (c - 1) / 2))

    tp, same_cluster, same_class = pairs(nij), pairs(col), pairs(row)
    if same_cluster == 0 and same_class == 0:
        return 1.0
    if tp == 0:
        return 0.0
    precision, recall = tp / same_cluster, tp / same_class
    return float(2 * precision * recall / (precision + recall))


def clustering_metrics(
    embeddings,
    labels,
    *,
    key,
    num_clusters: int | None = None,
    normalize: bool = True,
    num_restarts: int = 3,
    max_iters: int = 100,
) -> dict[str, float]:
    """k-means the embeddings into ``num_clusters`` (default: number of classes) and return
    {"nmi", "ami", "f1"}. ``normalize`` L2-normalises first (cosine embeddings).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dmljax.metrics.clustering import clustering_metrics
      >>> emb = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
      >>> m = clustering_metrics(emb, jnp.array([0, 0, 1, 1]), key=jax.random.key(0))
      >>> {k: round(float(v), 4) for k, v in sorted(m.items())}
      {'ami': 1.0, 'f1': 1.0, 'nmi': 1.0}
    """
    embeddings = check_embeddings(embeddings)
    labels_np = np.asarray(labels)
    if labels_np.shape != (embeddings.shape[0],):
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {labels_np.shape}")
    if num_clusters is None:
        num_clusters = len(np.unique(labels_np))
    x = l2_normalize(embeddings) if normalize else embeddings
    _, assignments, _ = kmeans(x, num_clusters, key=key, num_restarts=num_restarts, max_iters=max_iters)
    pred = np.asarray(assignments)
    return {
        "nmi": normalized_mutual_info(labels_np, pred),
        "ami": adjusted_mutual_info(labels_np, pred),
        "f1": clustering_f1(labels_np, pred),
    }
