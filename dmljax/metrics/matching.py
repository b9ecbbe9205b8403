"""Verification-style and diagnostic metrics after Open Metric Learning (OML).

* `fnmr_at_fmr` (OML ``calc_fnmr_at_fmr``): the threshold is the ``fmr`` quantile of the
  negative-pair distances (so that a fraction ``fmr`` of the negative pairs would be falsely
  matched); FNMR is the fraction of positive-pair distances >= that threshold.
  ``pair_distances`` gives the positive / negative distances of a query-gallery protocol.
* `pcf` (OML ``calc_pcf``, "principal components fraction", a measure of dimensional
  collapse): the number of principal components needed to explain a fraction ``variance``
  of the embeddings' variance, divided by the dimension. Small values mean the embeddings
  occupy a low-dimensional subspace.
* `retrieval_by_category`: R@K / MAP@R / ... per category (e.g. the super-class of SOP or
  the category of In-shop), from neighbour lists (`dmljax.metrics.knn`).
* `query_gallery_metrics`: query/gallery retrieval where gallery items of the query's own
  sequence (OML ``sequence`` ids: frames of the same video, photos of the same session)
  are ignored -- neither neighbours nor relevant items -- so near-duplicates do not inflate
  the scores.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_embeddings, check_labels
from dmljax.distances import pairwise
from dmljax.metrics.knn import KNN_METRICS, knn
from dmljax.metrics.retrieval import _all_metrics, neighbor_hits, required_neighbors, same_class_counts

__all__ = [
    "fnmr_at_fmr",
    "pair_distances",
    "pcf",
    "query_gallery_metrics",
    "retrieval_by_category",
]


def _fractions(values, *, name):
    vals = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if vals.ndim != 1 or vals.size == 0 or np.any(~np.isfinite(vals)) or np.any(vals < 0) or np.any(vals > 1):
        raise ValueError(f"{name} must be fractions in [0, 1], got {values!r}")
    return vals


def _distances_1d(x, *, name):
    d = np.asarray(x, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"{name} must be a non-empty rank-1 array of distances, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"{name} contains NaN or inf values")
    return d


def fnmr_at_fmr(pos_distances, neg_distances, fmr: Sequence[float] | float = (0.001,)) -> np.ndarray:
    """FNMR at the thresholds where the false-match rate equals ``fmr`` (OML ``fnmr@fmr``).

    threshold(f) = quantile_f(neg_distances) (numpy's linear interpolation, as OML's
    ``np.percentile``); FNMR(f) = mean(pos_distances >= threshold(f)).

    Args:
      pos_distances: [P] distances of genuine (same-label) pairs.
      neg_distances: [Q] distances of impostor pairs.
      fmr: fractions in [0, 1] (OML's ``fmr_vals``; older OML versions took percents).
    Returns:
      float64 [len(fmr)].

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.matching import fnmr_at_fmr
      >>> pos = np.array([0.1, 0.2, 0.3, 0.9])
      >>> neg = np.array([0.5, 0.6, 0.7, 0.8, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
      >>> print(fnmr_at_fmr(pos, neg, fmr=(0.1, 0.5)))
      [0.25 0.  ]
    """
    pos = _distances_1d(pos_distances, name="pos_distances")
    neg = _distances_1d(neg_distances, name="neg_distances")
    fmr = _fractions(fmr, name="fmr")
    thresholds = np.quantile(neg, fmr)
    return np.mean(pos[None, :] >= thresholds[:, None], axis=1)


def pair_distances(query, query_labels, gallery=None, gallery_labels=None, *, metric: str = "euclidean",
                   query_sequence=None, gallery_sequence=None) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) pair distances of a query-gallery set, for `fnmr_at_fmr`.

    Without a gallery the query set is its own gallery and the self-pairs are excluded;
    pairs of the same sequence (when ``*_sequence`` are given) are excluded. Builds the
    [N, M] matrix: meant for verification sets of moderate size.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.matching import pair_distances
      >>> x = np.array([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
      >>> result = pair_distances(x, np.array([0, 0, 1]))
      >>> [np.round(np.asarray(r, dtype=np.float64), 4).tolist() for r in result]
      [[1.0, 1.0], [3.0, 3.1623, 3.0, 3.1623]]
    """
    q = check_embeddings(query, name="query")
    ql = np.asarray(check_labels(query_labels, batch_size=q.shape[0], name="query_labels"))
    self_search = gallery is None
    g = q if self_search else check_embeddings(gallery, name="gallery")
    gl = ql if self_search else np.asarray(check_labels(gallery_labels, batch_size=g.shape[0], name="gallery_labels"))
    if metric not in KNN_METRICS:
        raise ValueError(f"metric must be one of {KNN_METRICS}, got {metric!r}")
    d = np.asarray(pairwise(q, None if self_search else g, metric=metric), dtype=np.float64)
    if metric == "cosine":
        d = 1.0 - d
    elif metric == "dot":
        d = -d
    keep = np.ones(d.shape, bool)
    if self_search:
        np.fill_diagonal(keep, False)
    qs, gs = _sequences(query_sequence, gallery_sequence, q.shape[0], g.shape[0], self_search)
    if qs is not None:
        keep &= qs[:, None] != gs[None, :]
    same = ql[:, None] == gl[None, :]
    return d[keep & same], d[keep & ~same]


def pcf(embeddings, *, variance: Sequence[float] | float = (0.5,)) -> np.ndarray:
    """Principal components fraction (OML ``calc_pcf``): n_components(variance) / dim.

    With lambda_1 >= ... >= lambda_K the eigenvalues of the embeddings' covariance
    (K = min(N, D), as a PCA of N points keeps), r_n = sum_{i<=n} lambda_i / sum_i lambda_i, and
    n_components(v) = 1 + #{n : r_n <= v}, i.e. the smallest n with r_n > v, plus one when the
    fraction is explained exactly (scikit-learn's ``searchsorted(..., side="right") + 1``, which
    OML mirrors: ``pcf(eye(4, 10), variance=(0.5, 1)) == [0.2, 0.5]``), capped at D. Small
    values mean collapsed embeddings (a low-dimensional subspace). Embeddings with no variance
    at all give 0. OML's default variance is 0.5.

    Args:
      embeddings: [N, D] float, N >= 2. variance: fraction(s) in [0, 1].
    Returns:
      float64 [len(variance)], each in [0, 1].

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.matching import pcf
      >>> emb = np.random.default_rng(0).normal(size=(100, 8)) * np.array([10.0, 1, 1, 1, 1, 1, 1, 1])
      >>> print(pcf(emb, variance=(0.5, 0.99)))
      [0.125 0.875]
    """
    x = np.asarray(check_embeddings(embeddings), dtype=np.float64)
    if x.shape[0] < 2:
        raise ValueError(f"embeddings must have at least 2 rows for a covariance, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contains NaN or inf values")
    variance = _fractions(variance, name="variance")
    centered = x - x.mean(axis=0)
    eig = np.linalg.eigvalsh(centered.T @ centered / (x.shape[0] - 1))[::-1]
    eig = np.maximum(eig[: min(x.shape)], 0.0)
    cumulative = np.cumsum(eig)
    if cumulative[-1] <= 0:
        return np.zeros(len(variance))
    ratio = cumulative / cumulative[-1]  # the last entry is exactly 1
    n = np.searchsorted(ratio, variance, side="right") + 1
    return np.minimum(n, x.shape[1]) / x.shape[1]


def _sequences(query_sequence, gallery_sequence, n, m, self_search):
    if query_sequence is None and gallery_sequence is None:
        return None, None
    if query_sequence is None or (gallery_sequence is None and not self_search):
        raise ValueError("query_sequence and gallery_sequence must be given together")
    qs = np.asarray(query_sequence)
    gs = qs if self_search else np.asarray(gallery_sequence)
    if qs.shape != (n,):
        raise ValueError(f"query_sequence must have shape ({n},), got {qs.shape}")
    if gs.shape != (m,):
        raise ValueError(f"gallery_sequence must have shape ({m},), got {gs.shape}")
    # map arbitrary ids (ints or strings) to one shared integer code
    _, codes = np.unique(np.concatenate([qs, gs]), return_inverse=True)
    return codes[:n], codes[n:]


def _metrics_from_hits(hits, counts, ks, ndcg_ks=()):
    values = _all_metrics(jnp.asarray(hits), jnp.asarray(counts), ks=tuple(ks), ndcg_ks=tuple(ndcg_ks))
    return {k: float(v) for k, v in values.items()}


def retrieval_by_category(neighbor_indices, query_labels, categories, gallery_labels=None, *,
                          ks: Sequence[int] = (1,)) -> dict:
    """Retrieval metrics per query category (and "overall").

    Each category's metrics are the usual means (see `dmljax.metrics.retrieval`) over its
    queries only; neighbours are searched in the whole gallery.

    Args:
      neighbor_indices: int [N, K] from `knn` (K >= `required_neighbors`).
      query_labels: [N] int. categories: [N] category id per query (int or str).
      gallery_labels: [M] int or None (query-in-gallery protocol).
    Returns:
      {category: {metric: value}, ..., "overall": {...}}.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.matching import retrieval_by_category
      >>> neighbors = np.array([[1], [0], [3], [0]])
      >>> labels = np.array([0, 0, 1, 1])
      >>> out = retrieval_by_category(neighbors, labels, categories=np.array([0, 0, 1, 1]), ks=(1,))
      >>> print(out)
      {0: {'map_at_r': 1.0, 'mrr': 1.0, 'precision_at_1': 1.0, 'r_precision': 1.0, 'recall@1': 1.0}, 1: {'map_at_r': 0.5, 'mrr': 0.5, 'precision_at_1': 0.5, 'r_precision': 0.5, 'recall@1': 0.5}, 'overall': {'map_at_r': 0.75, 'mrr': 0.75, 'precision_at_1': 0.75, 'r_precision': 0.75, 'recall@1': 0.75}}
    """
    hits = np.asarray(neighbor_hits(neighbor_indices, query_labels, gallery_labels))
    counts = np.asarray(same_class_counts(query_labels, gallery_labels))
    cats = np.asarray(categories)
    if cats.shape != (hits.shape[0],):
        raise ValueError(f"categories must have shape ({hits.shape[0]},), got {cats.shape}")
    ks = tuple(int(k) for k in ks)
    if counts.max(initial=0) > hits.shape[1] or max(ks) > hits.shape[1]:
        raise ValueError(f"neighbor_indices: {hits.shape[1]} neighbours are too few; retrieve "
                         f"{required_neighbors(query_labels, gallery_labels, ks=ks)}")
    out = {}
    for c in np.unique(cats):
        sel = cats == c
        out[c.item()] = _metrics_from_hits(hits[sel], counts[sel], ks)
    out["overall"] = _metrics_from_hits(hits, counts, ks)
    return out


def query_gallery_metrics(query, query_labels, gallery, gallery_labels, *, query_sequence=None,
                          gallery_sequence=None, ks: Sequence[int] = (1, 5), metric: str = "euclidean",
                          categories=None, block_size: int = 1024) -> dict:
    """Query/gallery retrieval metrics ignoring gallery items of the query's own sequence.

    For query q, every gallery item g with sequence(g) == sequence(q) is removed from the
    neighbour list and from the relevant set R_q (OML's ``sequence`` handling). The search is
    the blocked exact `knn`, asked for K + (largest number of same-sequence gallery items of a
    query) neighbours, so the filtered lists keep K entries. Pass the same arrays as query and
    gallery for the query-in-gallery protocol with ``query_sequence`` = ``gallery_sequence``
    (an item is then in its own sequence and excluded too).

    Returns:
      recall@k for ``ks``, precision_at_1, r_precision, map_at_r, mrr; with ``categories`` [N]
      the same per category under "by_category".

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.matching import query_gallery_metrics
      >>> query = np.array([[0.0, 0.0], [5.0, 5.0]])
      >>> gallery = np.array([[0.1, 0.0], [5.0, 5.1], [9.0, 9.0]])
      >>> m = query_gallery_metrics(query, np.array([0, 1]), gallery, np.array([0, 1, 2]), ks=(1,))
      >>> {k: round(float(v), 4) for k, v in sorted(m.items())}
      {'map_at_r': 1.0, 'mrr': 1.0, 'precision_at_1': 1.0, 'r_precision': 1.0, 'recall@1': 1.0}
    """
    q = check_embeddings(query, name="query")
    g = check_embeddings(gallery, name="gallery")
    ql = np.asarray(check_labels(query_labels, batch_size=q.shape[0], name="query_labels"))
    gl = np.asarray(check_labels(gallery_labels, batch_size=g.shape[0], name="gallery_labels"))
    ks = tuple(int(k) for k in ks)
    for k in ks:
        if isinstance(k, bool) or k < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
    qs, gs = _sequences(query_sequence, gallery_sequence, q.shape[0], g.shape[0], False)
    if qs is None:
        qs = np.full(q.shape[0], -1)
        gs = np.full(g.shape[0], -2)
    # same-sequence gallery items per query, counted by sorting (no N x M matrix)
    gs_sorted = np.sort(gs)
    same_seq = np.searchsorted(gs_sorted, qs, side="right") - np.searchsorted(gs_sorted, qs, side="left")
    # relevant items: same label minus same label AND same sequence
    pair_codes_g = np.stack([gl, gs], axis=1)
    uniq, pair_count = np.unique(pair_codes_g, axis=0, return_counts=True)
    lookup = {(int(a), int(b)): int(c) for (a, b), c in zip(uniq, pair_count)}
    counts = np.asarray(same_class_counts(ql, gl)) - np.array(
        [lookup.get((int(a), int(b)), 0) for a, b in zip(ql, qs)], dtype=np.int64)
    need = max(max(ks), int(counts.max(initial=0)), 1)
    if max(ks) > g.shape[0]:
        raise ValueError(f"ks must be <= the gallery size ({g.shape[0]}), got {ks}")
    # enough neighbours that `need` remain after dropping the query's own sequence
    k_search = min(need + int(same_seq.max(initial=0)), g.shape[0])
    idx, _ = knn(q, g, k=k_search, metric=metric, exclude_self=False, block_size=block_size)
    idx = np.asarray(idx)
    drop = gs[idx] == qs[:, None]
    # stable sort moves the dropped neighbours to the end, keeping the order of the others
    order = np.argsort(drop, axis=1, kind="stable")
    kept = np.take_along_axis(idx, order, axis=1)[:, :need]
    kept_drop = np.take_along_axis(drop, order, axis=1)[:, :need]
    hits = (gl[kept] == ql[:, None]) & ~kept_drop
    result = _metrics_from_hits(hits, counts, ks)
    if categories is not None:
        cats = np.asarray(categories)
        if cats.shape != (q.shape[0],):
            raise ValueError(f"categories must have shape ({q.shape[0]},), got {cats.shape}")
        result["by_category"] = {c.item(): _metrics_from_hits(hits[cats == c], counts[cats == c], ks)
                                 for c in np.unique(cats)}
    return result

