"""Re-rank metric kNN results with a learned non-metric similarity network.

Garcia & Vogiatzis, "Learning Non-Metric Visual Similarity for Image Retrieval" (ECCV 2018 /
IVC 2019, arXiv 1709.01353; seed 002): an MLP on the concatenated pair of frozen features,
ReLU hidden layers, one linear output, trained by MSE to

    t(x1, x2) = cos(x1, x2) + margin  (same class),   cos(x1, x2) - margin  (different class)

(`dmljax.models.similarity`). ``rerank_report`` trains it on pairs of the TRAIN embeddings
(each item with its nearest neighbours by cosine + one random same-class partner, as in
`dmljax.models.similarity.train_similarity_network`), then, on the test set (every test item a
query against all other test items, self excluded -- the Omniglot / CUB protocol), re-orders
the top ``k`` of the metric (euclidean = cosine order for unit embeddings) kNN list of each
query by descending network score and reports the metrics before and after::

    recall@1, recall@k, map_at_r                 the metric kNN ranking
    recall@1_rerank, recall@k_rerank, map_at_r_rerank
                                                 top k re-ordered, ranks > k unchanged

Recall@k is unchanged by construction (the same k items, re-ordered); MAP@R changes only within
the first k ranks (MAP@R needs R = largest class size - 1 neighbours, retrieved in full).
Also returned: ``rerank_k``, ``rerank_final_loss`` (mean MSE of the last 10% of steps),
``rerank_seconds``.

Options (``config.eval``, defaults when missing): ``rerank_k`` 10, ``rerank_steps`` 1000,
``rerank_margin`` 0.5 (the library default), ``rerank_hidden`` (512, 512), ``rerank_neighbours``
20, ``rerank_batch_size`` 512, ``rerank_learning_rate`` 1e-3.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_key
from dmljax.distances import l2_normalize
from dmljax.metrics.knn import knn
from dmljax.metrics.retrieval import required_neighbors, retrieval_metrics
from dmljax.models.similarity import rerank, train_similarity_network

__all__ = ["DEFAULTS", "rerank_report"]

DEFAULTS = {
    "rerank_k": 10,
    "rerank_steps": 1000,
    "rerank_margin": 0.5,
    "rerank_hidden": (512, 512),
    "rerank_neighbours": 20,
    "rerank_batch_size": 512,
    "rerank_learning_rate": 1e-3,
}


def _options(config: Any) -> dict:
    section = None
    if config is not None:
        section = config.get("eval") if hasattr(config, "get") else getattr(config, "eval", None)
    out = dict(DEFAULTS)
    for name in DEFAULTS:
        value = None
        if section is not None:
            value = section.get(name) if hasattr(section, "get") else getattr(section, name, None)
        if value is not None:
            out[name] = value
    for name in ("rerank_k", "rerank_steps", "rerank_neighbours", "rerank_batch_size"):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"config.eval.{name} must be an int >= 1, got {v!r}")
    for name, strict in (("rerank_margin", False), ("rerank_learning_rate", True)):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0 or (strict and v == 0):
            raise ValueError(f"config.eval.{name} must be a finite number {'> 0' if strict else '>= 0'}, got {v!r}")
    hidden = tuple(out["rerank_hidden"])
    if not hidden or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in hidden):
        raise ValueError(f"config.eval.rerank_hidden must be a non-empty sequence of ints >= 1, got {out['rerank_hidden']!r}")
    out["rerank_hidden"] = hidden
    return out


def _embeddings(x, labels, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}_embeddings must be a floating [N >= 2, D] array, got shape {x.shape} dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}_embeddings must be finite")
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}_labels must be integer class ids of shape ({x.shape[0]},), got shape "
                         f"{labels.shape} dtype {labels.dtype}")
    return x.astype(np.float32), labels.astype(np.int32)


def rerank_report(*, train_embeddings, train_labels, test_embeddings, test_labels, key: jax.Array,
                  config: Any = None) -> dict[str, float]:
    """Train the similarity MLP on TRAIN pairs, re-rank each test query's top-k; metrics before/after.

    Args:
      train_embeddings: [N, D] frozen training-set embeddings; train_labels: int [N].
      test_embeddings: [M, D] test embeddings (each a query against the other M - 1); test_labels: int [M].
      key: PRNG key (network initialisation, pair partners, mini-batches).
      config: anything with an optional ``eval`` section holding the options of the module
        docstring (ml_collections ConfigDict, dict or attribute object); None: defaults.
    Returns:
      dict[str, float]: see the module docstring.
    Raises:
      ValueError: bad shapes/dtypes, non-finite embeddings, mismatched feature dims, a bad
        option, or ``rerank_k`` >= M (a query has M - 1 candidates).
    """
    t0 = time.perf_counter()
    key = check_key(key)
    opts = _options(config)
    xtr, ytr = _embeddings(train_embeddings, train_labels, name="train")
    xte, yte = _embeddings(test_embeddings, test_labels, name="test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"test_embeddings must have feature dim {xtr.shape[1]} like train_embeddings, got {xte.shape}")
    k = int(opts["rerank_k"])
    if k > len(xte) - 1:
        raise ValueError(f"config.eval.rerank_k must be <= {len(xte) - 1} (test items - 1), got {k}")

    net, losses = train_similarity_network(
        key, xtr, ytr, hidden=opts["rerank_hidden"], margin=float(opts["rerank_margin"]),
        neighbours=int(opts["rerank_neighbours"]), steps=int(opts["rerank_steps"]),
        batch_size=int(opts["rerank_batch_size"]), learning_rate=float(opts["rerank_learning_rate"]))

    queries = l2_normalize(jnp.asarray(xte))  # the metric ranking is the cosine ranking
    depth = max(required_neighbors(yte, ks=(1, k)), k)
    idx, _ = knn(queries, k=depth)
    top = rerank(net, jnp.asarray(xte), jnp.asarray(xte), idx[:, :k])
    reranked = jnp.concatenate([top, idx[:, k:]], axis=1)
    out = {}
    for suffix, ranking in (("", idx), ("_rerank", reranked)):
        m = retrieval_metrics(ranking, yte, ks=(1, k), ndcg_ks=())
        out.update({f"recall@1{suffix}": m["recall@1"], f"recall@{k}{suffix}": m[f"recall@{k}"],
                    f"map_at_r{suffix}": m["map_at_r"]})
    out["rerank_k"] = float(k)
    out["rerank_final_loss"] = float(np.mean(losses[-max(len(losses) // 10, 1):]))
    out["rerank_seconds"] = time.perf_counter() - t0
    return out
