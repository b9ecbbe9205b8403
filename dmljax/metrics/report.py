"""One call that evaluates embeddings the way DML papers report them, and a text table.

`evaluate` runs the blocked on-device kNN once with as many neighbours as the largest
class needs (MAP@R, Musgrave et al. 2020) or the largest K asked for, derives every
retrieval metric from it (`dmljax.metrics.retrieval`), and optionally clusters the
query embeddings with k-means into as many clusters as there are query classes
(NMI / AMI / F1, `dmljax.metrics.clustering`).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np

from dmljax._validation import check_embeddings, check_labels
from dmljax.metrics.clustering import clustering_metrics
from dmljax.metrics.knn import knn
from dmljax.metrics.retrieval import required_neighbors, retrieval_metrics

__all__ = ["evaluate", "format_metrics_table"]


def evaluate(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    ndcg_ks: Sequence[int] | None = None,
    metric: str = "cosine",
    key=None,
    clustering: bool = True,
    kmeans_restarts: int = 3,
    kmeans_iters: int = 100,
    block_size: int = 1024,
    gallery_block_size: int = 4096,
    progress: bool | None = None,
) -> dict[str, float]:
    """All retrieval (+ clustering) metrics of a test set.

    Args:
      query_embeddings: [N, D]; query_labels: int [N].
      gallery_embeddings / gallery_labels: [M, D] / [M] for the separate query/gallery
        protocol (In-shop); ``None`` = every query searches the others (CUB, Cars, SOP).
      ks: Recall@K values (the papers' 1, 2, 4, 8; SOP uses 1, 10, 100, 1000).
      ndcg_ks: nDCG@k values, default ``ks``.
      metric: kNN metric, "cosine" (default: DML embeddings are compared by cosine) or
        "euclidean", "squared_euclidean", "dot".
      key: PRNG key for k-means (default ``jax.random.key(0)``).
      clustering: add "nmi", "ami", "f1" from k-means on the query embeddings (L2
        normalised when metric is "cosine").
      progress: tqdm bar over query blocks; default on when N >= 20000.

    Returns:
      dict with "recall@k", "precision_at_1", "r_precision", "map_at_r", "mrr", "ndcg@k",
      optionally "nmi", "ami", "f1", plus "num_queries", "num_gallery", "knn_k",
      "knn_seconds".

    Examples:
      >>> import jax.numpy as jnp
      >>> from dmljax.metrics.report import evaluate
      >>> emb = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
      >>> m = evaluate(emb, jnp.array([0, 0, 1, 1]), ks=(1,), clustering=False)
      >>> {k: round(float(v), 4) for k, v in sorted(m.items()) if k != "knn_seconds"}
      {'knn_k': 1.0, 'map_at_r': 1.0, 'mrr': 1.0, 'ndcg@1': 1.0, 'num_gallery': 4.0, 'num_queries': 4.0, 'precision_at_1': 1.0, 'r_precision': 1.0, 'recall@1': 1.0}
    """
    query = check_embeddings(query_embeddings, name="query_embeddings")
    query_labels = check_labels(query_labels, batch_size=query.shape[0], name="query_labels")
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("gallery_labels must be given exactly when gallery_embeddings is")
    gallery = None
    if gallery_embeddings is not None:
        gallery = check_embeddings(gallery_embeddings, name="gallery_embeddings")
        gallery_labels = check_labels(gallery_labels, batch_size=gallery.shape[0], name="gallery_labels")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks}")
    ndcg_ks = ks if ndcg_ks is None else tuple(int(k) for k in ndcg_ks)
    available = query.shape[0] - 1 if gallery is None else gallery.shape[0]
    if max(ks + ndcg_ks) > available:
        raise ValueError(f"ks must be <= the number of gallery candidates ({available}), got {max(ks + ndcg_ks)}")
    k = required_neighbors(query_labels, gallery_labels, ks=ks + ndcg_ks)
    if progress is None:
        progress = query.shape[0] >= 20000
    start = time.perf_counter()
    indices, _ = knn(query, gallery, k=k, metric=metric, block_size=block_size,
                     gallery_block_size=gallery_block_size, progress=progress)
    indices = jax.block_until_ready(indices)
    knn_seconds = time.perf_counter() - start
    out = retrieval_metrics(indices, query_labels, gallery_labels, ks=ks, ndcg_ks=ndcg_ks)
    if clustering:
        key = jax.random.key(0) if key is None else key
        out.update(clustering_metrics(query, np.asarray(query_labels), key=key, normalize=metric == "cosine",
                                      num_restarts=kmeans_restarts, max_iters=kmeans_iters))
    out.update({"num_queries": int(query.shape[0]),
                "num_gallery": int(query.shape[0] if gallery is None else gallery.shape[0]),
                "knn_k": int(k), "knn_seconds": float(knn_seconds)})
    return out


def format_metrics_table(metrics: dict[str, float], *, percent: bool = True) -> str:
    """Two-column text table; rates in [0, 1] shown as percentages (as in the papers).

    Examples:
      >>> from dmljax.metrics.report import format_metrics_table
      >>> print(format_metrics_table({"recall@1": 0.9036, "map_at_r": 0.657}))
      metric   | value
      ---------|------
      recall@1 | 90.36
      map_at_r | 65.70
    """
    counts = {"num_queries", "num_gallery", "knn_k"}
    rows = []
    for name, value in metrics.items():
        if name in counts:
            text = str(int(value))
        elif name.endswith("seconds"):
            text = f"{value:.2f}"
        elif percent:
            text = f"{100.0 * value:.2f}"
        else:
            text = f"{value:.4f}"
        rows.append((name, text))
    width = max([len("metric")] + [len(r[0]) for r in rows])
    vwidth = max([len("value")] + [len(r[1]) for r in rows])
    lines = [f"{'metric'.ljust(width)} | {'value'.rjust(vwidth)}", f"{'-' * width}-|-{'-' * vwidth}"]
    lines += [f"{n.ljust(width)} | {v.rjust(vwidth)}" for n, v in rows]
    return "\n".join(lines)
