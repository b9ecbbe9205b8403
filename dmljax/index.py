"""Serving: an embedding index with exact / approximate search, matching and distance thresholds.

`EmbeddingIndex` is TensorFlow Similarity's ``Indexer`` / ``model.index`` + ``lookup`` +
``match`` + ``calibrate`` in dmljax form: the stored embeddings are kept on the host
(numpy, for saving) and once on the device (copied at the first search, then updated by add /
remove, never re-copied per search); every search is batched over queries:

* exact (default): `dmljax.metrics.knn.knn` (blocked, memory independent of N * M);
* approximate on device: ``jax.lax.approx_max_k`` (TPU-friendly partial reduction; exact top-k
  on CPU/GPU backends where it falls back), one query block at a time;
* approximate on the host: ``backend="hnsw"``, an HNSW graph from usearch (optional extra
  ``dmljax[ann]``) for galleries too large for exhaustive search.

Persistence: ``save`` writes one self-checking file atomically, ``load`` validates it (see
`EmbeddingIndex`).

Matching a query (TF-Similarity ``match_nearest`` / ``match_majority_vote``):
  "nearest": the label of the nearest neighbour and its distance;
  "majority_vote": the most frequent label among the k nearest (a tie goes to the tied
  label that appears first, i.e. nearest) and the mean distance of the k neighbours (as
  TF-Similarity's majority-vote matcher).

Distance thresholds: a match is accepted when its distance is <= a cut-off, otherwise the
query is "unknown" (label -1). `calibrate_threshold` picks the cut-off from a calibration
set of (match distance, match correct) so that the accepted matches reach a target F1,
precision or recall, and reports the match metrics at every candidate threshold. The
confusion counts follow TF-Similarity's calibration: a *positive* is an accepted match,
TP = accepted and correct, FP = accepted and wrong, FN = rejected but correct,
TN = rejected and wrong. Then precision = TP/(TP+FP), recall = TP/(TP+FN),
FPR = FP/(FP+TN), NPV = TN/(TN+FN), F1 = 2PR/(P+R), accuracy = (TP+TN)/N (0/0 := 0).

Cut-offs: constant (`EmbeddingIndex.match(..., distance_threshold=t)`), per class
(`calibrate_class_thresholds`: one calibrated cut-off per predicted class, falling back to
the global one for classes with too few calibration matches) and per query
(`kth_neighbor_cutoff`: keep neighbours within ``scale`` times the distance of the query's
k-th neighbour, an adaptive radius that follows the local density of the gallery).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import numbers
import os
import tempfile
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_choice, check_embeddings, check_labels
from dmljax.distances import l2_normalize
from dmljax.metrics.knn import KNN_METRICS, check_finite, knn

__all__ = [
    "BACKENDS",
    "CALIBRATION_TARGETS",
    "HNSW_DEFAULTS",
    "INDEX_FORMAT_VERSION",
    "Calibration",
    "EmbeddingIndex",
    "SearchResult",
    "approximate_knn",
    "calibrate_class_thresholds",
    "calibrate_threshold",
    "kth_neighbor_cutoff",
    "match_labels",
    "match_metrics",
]

CALIBRATION_TARGETS = ("f1", "precision", "recall")
MATCH_STRATEGIES = ("nearest", "majority_vote")
_METRIC_NAMES = ("precision", "recall", "fpr", "npv", "f1", "accuracy")


def _positive_int(value, *, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- approximate search


@functools.partial(jax.jit, static_argnames=("k", "metric", "recall_target"))
def _approx_block(q, gallery, g_sq, *, k, metric, recall_target):
    dots = q @ gallery.T
    if metric in ("euclidean", "squared_euclidean"):
        scores = -jnp.maximum(jnp.sum(q * q, axis=1)[:, None] + g_sq[None, :] - 2.0 * dots, 0.0)
    else:
        scores = dots
    return jax.lax.approx_max_k(scores, k, recall_target=recall_target)


def approximate_knn(query, gallery, *, k: int, metric: str = "euclidean", recall_target: float = 0.95,
                    block_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Approximate k nearest neighbours with ``jax.lax.approx_max_k`` (Chern et al. 2022).

    Same outputs and distance conventions as `dmljax.metrics.knn.knn` (indices int32 [N, k],
    distances [N, k], nearest first); memory O(block_size * M). ``recall_target`` is the
    expected fraction of the true top-k returned on TPU; other backends return the exact top-k.
    """
    check_choice(metric, name="metric", choices=KNN_METRICS)
    query = check_embeddings(query, name="query")
    gallery = check_embeddings(gallery, name="gallery")
    if gallery.shape[1] != query.shape[1]:
        raise ValueError(f"gallery must have feature dim {query.shape[1]} like query, got shape {gallery.shape}")
    k = _positive_int(k, name="k")
    if k > gallery.shape[0]:
        raise ValueError(f"k must be <= the gallery size ({gallery.shape[0]}), got {k}")
    if not 0.0 < float(recall_target) <= 1.0:
        raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
    block_size = _positive_int(block_size, name="block_size")
    check_finite(query, name="query")
    check_finite(gallery, name="gallery")
    if metric == "cosine":
        query, gallery = l2_normalize(query), l2_normalize(gallery)
    g_sq = jnp.sum(jnp.square(gallery), axis=1)
    scores, index = [], []
    for start in range(0, query.shape[0], block_size):
        s, i = _approx_block(query[start:start + block_size], gallery, g_sq, k=k, metric=metric,
                             recall_target=float(recall_target))
        scores.append(s)
        index.append(i)
    scores = jnp.concatenate(scores)
    index = jnp.concatenate(index).astype(jnp.int32)
    if metric == "euclidean":
        dist = jnp.sqrt(-scores)
    elif metric == "squared_euclidean":
        dist = -scores
    elif metric == "cosine":
        dist = 1.0 - scores
    else:
        dist = -scores
    return index, dist


# ----------------------------------------------------------------------------- matching


def match_labels(neighbor_labels, neighbor_distances, *, strategy: str = "nearest"):
    """Predicted label and match distance per query from its k neighbours (nearest first).

    Args:
      neighbor_labels: int [N, k]; neighbor_distances: float [N, k].
      strategy: "nearest" (first neighbour) or "majority_vote" (most frequent label, ties to the
        nearest of the tied labels; distance = mean of the k distances, TF-Similarity).
    Returns:
      (labels int [N], distances float [N]) as numpy arrays.
    """
    check_choice(strategy, name="strategy", choices=MATCH_STRATEGIES)
    labels = np.asarray(neighbor_labels)
    dist = np.asarray(neighbor_distances, dtype=np.float64)
    if labels.ndim != 2:
        raise ValueError(f"neighbor_labels must have rank 2 [queries, k], got shape {labels.shape}")
    if dist.shape != labels.shape:
        raise ValueError(f"neighbor_distances must have shape {labels.shape}, got {dist.shape}")
    if strategy == "nearest":
        return labels[:, 0], dist[:, 0]
    # votes[q, j] = how many of the k neighbours carry neighbour j's label
    same = labels[:, :, None] == labels[:, None, :]
    votes = same.sum(axis=2)
    best = np.argmax(votes, axis=1)  # argmax returns the first (nearest) of the tied maxima
    return labels[np.arange(len(labels)), best], dist.mean(axis=1)


# ----------------------------------------------------------------------------- calibration


def _check_calibration(distances, matches):
    d = np.asarray(distances, dtype=np.float64)
    m = np.asarray(matches)
    if d.ndim != 1:
        raise ValueError(f"distances must have rank 1 [queries], got shape {d.shape}")
    if m.shape != d.shape:
        raise ValueError(f"matches must have shape {d.shape}, got {m.shape}")
    if m.dtype != bool and not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"matches must be bool (match correct), got dtype {m.dtype}")
    if d.size == 0:
        raise ValueError("distances must not be empty")
    if not np.all(np.isfinite(d)):
        raise ValueError("distances contains NaN or inf values")
    return d, m.astype(bool)


def _div(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)


def _metrics_from_counts(tp, fp, fn, tn):
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    return {
        "precision": precision,
        "recall": recall,
        "fpr": _div(fp, fp + tn),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * precision * recall, precision + recall),
        "accuracy": _div(tp + tn, tp + fp + fn + tn),
    }


def match_metrics(distances, matches, threshold: float) -> dict[str, float]:
    """Match metrics (precision, recall, FPR, NPV, F1, accuracy, counts) at one cut-off."""
    d, m = _check_calibration(distances, matches)
    accepted = d <= threshold
    tp = np.sum(accepted & m)
    fp = np.sum(accepted & ~m)
    fn = np.sum(~accepted & m)
    tn = np.sum(~accepted & ~m)
    out = {k: float(v) for k, v in _metrics_from_counts(tp, fp, fn, tn).items()}
    out.update(tp=int(tp), fp=int(fp), fn=int(fn), tn=int(tn), threshold=float(threshold))
    return out


class Calibration(NamedTuple):
    """Result of `calibrate_threshold`.

    - threshold: the chosen cut-off (accept a match when distance <= threshold); -inf when no
      cut-off reaches the target (then nothing is accepted).
    - achieved: whether the target was reached.
    - metrics: match metrics at ``threshold`` (see `match_metrics`).
    - curve: dict of numpy arrays over the candidate thresholds (ascending): "threshold",
      "precision", "recall", "fpr", "npv", "f1", "accuracy".
    """

    threshold: float
    achieved: bool
    metrics: dict
    curve: dict


def calibrate_threshold(distances, matches, *, target: str = "f1", value: float | None = None) -> Calibration:
    """Distance cut-off for accepting matches, calibrated on (distance, correct) pairs.

    Candidates are -inf (accept nothing) and every distinct match distance (accept all matches
    at or below it). Choice:

      - target="f1": the candidate with the highest F1 (``value`` must be None); ties -> the
        larger threshold (more accepted matches).
      - target="precision": the LARGEST threshold whose precision >= ``value`` (the most recall
        subject to the precision target; TF-Similarity's ``calibrate(..., "precision")``).
      - target="recall": the SMALLEST threshold whose recall >= ``value``.

    Metric definitions are in the module docstring.

    Args:
      distances: [N] float, the distance of each calibration query's match.
      matches: [N] bool, whether the matched label is the query's true label.
    """
    check_choice(target, name="target", choices=CALIBRATION_TARGETS)
    d, m = _check_calibration(distances, matches)
    if target == "f1":
        if value is not None:
            raise ValueError(f"value must be None for target='f1', got {value}")
    else:
        if value is None or isinstance(value, bool) or not isinstance(value, numbers.Number) \
                or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"value must be a number in [0, 1] for target={target!r}, got {value!r}")
    order = np.argsort(d, kind="stable")
    ds, ms = d[order], m[order]
    # accepted prefix for each distinct distance: up to its last occurrence
    thresholds, last = np.unique(ds, return_index=False), None
    last = np.searchsorted(ds, thresholds, side="right")
    tp = np.concatenate([[0], np.cumsum(ms)[last - 1]])
    accepted = np.concatenate([[0], last])
    fp = accepted - tp
    total_pos = int(ms.sum())
    fn = total_pos - tp
    tn = (len(ds) - total_pos) - fp
    thresholds = np.concatenate([[-np.inf], thresholds])
    curve = _metrics_from_counts(tp, fp, fn, tn)
    curve["threshold"] = thresholds
    if target == "f1":
        f1 = curve["f1"]
        choice = int(np.flatnonzero(f1 == f1.max())[-1])
        achieved = True
    elif target == "precision":
        ok = np.flatnonzero(curve["precision"] >= value)
        achieved = ok.size > 0
        choice = int(ok[-1]) if achieved else 0
    else:
        ok = np.flatnonzero(curve["recall"] >= value)
        achieved = ok.size > 0
        choice = int(ok[0]) if achieved else 0
    metrics = {k: float(curve[k][choice]) for k in _METRIC_NAMES}
    metrics.update(tp=int(tp[choice]), fp=int(fp[choice]), fn=int(fn[choice]), tn=int(tn[choice]),
                   threshold=float(thresholds[choice]))
    return Calibration(float(thresholds[choice]), bool(achieved), metrics, curve)


def calibrate_class_thresholds(distances, matches, predicted_labels, *, target: str = "f1",
                               value: float | None = None, min_count: int = 5) -> tuple[dict, float]:
    """Per-class cut-offs: `calibrate_threshold` on the calibration matches predicted as each class.

    Classes with fewer than ``min_count`` calibration matches (or whose target is not reached)
    use the global cut-off. Returns ({class: threshold}, global threshold); apply with
    `EmbeddingIndex.match(..., distance_threshold=dict)`.
    """
    d, m = _check_calibration(distances, matches)
    pred = np.asarray(predicted_labels)
    if pred.shape != d.shape:
        raise ValueError(f"predicted_labels must have shape {d.shape}, got {pred.shape}")
    min_count = _positive_int(min_count, name="min_count")
    overall = calibrate_threshold(d, m, target=target, value=value).threshold
    out = {}
    for c in np.unique(pred):
        sel = pred == c
        if sel.sum() < min_count:
            out[c.item()] = overall
            continue
        cal = calibrate_threshold(d[sel], m[sel], target=target, value=value)
        out[c.item()] = cal.threshold if cal.achieved else overall
    return out, overall


def kth_neighbor_cutoff(neighbor_distances, *, k: int, scale: float = 1.0):
    """Adaptive per-query cut-off: keep neighbour j when d_j <= scale * d_k (the k-th distance).

    Returns a bool [N, K] mask over the neighbour lists (nearest first) and the [N] cut-offs.
    """
    dist = np.asarray(neighbor_distances, dtype=np.float64)
    if dist.ndim != 2:
        raise ValueError(f"neighbor_distances must have rank 2 [queries, k], got shape {dist.shape}")
    k = _positive_int(k, name="k")
    if k > dist.shape[1]:
        raise ValueError(f"k must be <= the number of neighbours ({dist.shape[1]}), got {k}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Number) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    cutoff = scale * dist[:, k - 1]
    return dist <= cutoff[:, None], cutoff


# ----------------------------------------------------------------------------- the index


class SearchResult(NamedTuple):
    """indices int [N, k]: rows of the index (they shift when rows are removed), distances [N, k]
    (nearest first), labels [N, k] (-1 where the index has no labels), metadata: list (per query)
    of lists of metadata, ids int64 [N, k]: the stable ids of the neighbours (`EmbeddingIndex.add`)."""

    indices: np.ndarray
    distances: np.ndarray
    labels: np.ndarray
    metadata: list
    ids: np.ndarray | None = None


INDEX_FORMAT = "dmljax.EmbeddingIndex"
INDEX_FORMAT_VERSION = 2
BACKENDS = ("exact", "hnsw")
_MAGIC = b"DMLJAX-INDEX\x00\x00\x00\x01"  # 16 bytes
_DIGEST_BYTES = 32  # sha256 of everything before it
_HEADER_LEN_BYTES = 8
# usearch metric for each dmljax metric (distances are recomputed exactly for the returned rows)
_HNSW_METRICS = {"cosine": "cos", "euclidean": "l2sq", "squared_euclidean": "l2sq", "dot": "ip"}
# usearch's defaults (connectivity = HNSW's M, expansion_add = efConstruction, expansion_search =
# ef). Measured with experiments/bench/index.py on 100k clustered embeddings, D=128, cosine,
# 1000 held-out queries: recall@10 = 0.9996 against exact search (the same at ef 64, 128, 256).
HNSW_DEFAULTS = {"connectivity": 16, "expansion_add": 128, "expansion_search": 64}


def _import_usearch():
    try:
        from usearch.index import Index
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "backend='hnsw' needs the usearch package: pip install 'dmljax[ann]' (or pip install usearch)"
        ) from err
    return Index


def _np_distances(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    """Distances [N, k] between queries q [N, D] and their candidates g [N, k, D] (knn conventions)."""
    q = q.astype(np.float64)
    g = g.astype(np.float64)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
        return 1.0 - np.einsum("nd,nkd->nk", q, g)
    if metric == "dot":
        return -np.einsum("nd,nkd->nk", q, g)
    sq = np.sum(np.square(q[:, None, :] - g), axis=-1)
    return np.sqrt(sq) if metric == "euclidean" else sq


class EmbeddingIndex:
    """A set of embeddings with labels, stable ids and JSON metadata; exact or approximate search.

    ``index = EmbeddingIndex(dim=128, metric="cosine"); ids = index.add(emb, labels, metadata)``;
    ``index.search(queries, k=5)``; ``index.remove(ids[:3])``;
    ``index.match(queries, distance_threshold=cal.threshold)``; ``index.save(path)`` /
    ``EmbeddingIndex.load(path)``.

    The gallery is copied to the device once and kept there between searches (an ``add`` copies
    only the new rows, a ``remove`` gathers on the device); ``embeddings`` is the host copy.

    Backends:
      "exact" (default): blocked exact kNN on the device (`dmljax.metrics.knn.knn`);
        ``search(..., exact=False)`` uses ``jax.lax.approx_max_k`` instead (TPU).
      "hnsw": an HNSW graph (Malkov & Yashunin 2018) from usearch (``pip install 'dmljax[ann]'``),
        built on the host at the first search and then updated by add / remove. The returned
        rows are approximate; their distances are recomputed exactly (same conventions as
        exact search). ``search(..., exact=True)`` still runs the exact device search.
        ``hnsw_options``: connectivity / expansion_add / expansion_search (defaults:
        `HNSW_DEFAULTS`).

    File format (``save``; version `INDEX_FORMAT_VERSION`): ONE file, written to a temporary
    file in the same directory and renamed over ``path`` (``os.replace``, atomic on POSIX and
    Windows), so an interrupted save leaves the previous file intact. Layout: 16 magic bytes,
    a little-endian uint64 header length, a JSON header (format, version, dim, metric, dtype,
    size, backend, metadata, and offset / dtype / shape of each array), the raw arrays
    (embeddings, labels int64, ids int64, optionally the serialised HNSW graph), then the
    SHA-256 of everything before it. ``load`` checks every part and raises ``ValueError`` naming
    the file and what is wrong (truncated, corrupt, wrong version, inconsistent shapes,
    non-finite values, unknown metric).
    """

    def __init__(self, dim: int, *, metric: str = "cosine", dtype=np.float32, backend: str = "exact",
                 hnsw_options: dict | None = None):
        self.dim = _positive_int(dim, name="dim")
        self.metric = check_choice(metric, name="metric", choices=KNN_METRICS)
        if not np.issubdtype(np.dtype(dtype), np.floating):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dtype = np.dtype(dtype)
        self.backend = check_choice(backend, name="backend", choices=BACKENDS)
        options = dict(HNSW_DEFAULTS)
        if hnsw_options is not None:
            if not isinstance(hnsw_options, dict) or set(hnsw_options) - set(HNSW_DEFAULTS):
                raise ValueError(f"hnsw_options must be a dict with keys among {sorted(HNSW_DEFAULTS)}, "
                                 f"got {hnsw_options!r}")
            for key, value in hnsw_options.items():
                options[key] = _positive_int(value, name=f"hnsw_options[{key!r}]")
        self.hnsw_options = options
        if self.backend == "hnsw":
            _import_usearch()  # fail at construction, not at the first search
        self._embeddings = np.zeros((0, self.dim), self.dtype)
        self._labels = np.zeros((0,), np.int64)
        self._ids = np.zeros((0,), np.int64)
        self._metadata: list[Any] = []
        self._next_id = 0
        self._device: jax.Array | None = None  # device copy of the gallery, kept between searches
        self._ann = None  # usearch.index.Index (hnsw backend), in sync with the rows once built
        self._id_order: np.ndarray | None = None  # argsort of the ids (id -> row lookups)

    def __len__(self) -> int:
        return self._embeddings.shape[0]

    @property
    def embeddings(self) -> np.ndarray:
        return self._embeddings

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    @property
    def metadata(self) -> list:
        return list(self._metadata)

    @property
    def device_embeddings(self) -> jax.Array:
        """The gallery on the default device (copied on first use, then kept and updated)."""
        if self._device is None:
            self._device = jnp.asarray(self._embeddings)
        return self._device

    # ------------------------------------------------------------------ mutation

    def add(self, embeddings, labels=None, metadata: Sequence[Any] | None = None, *, ids=None) -> np.ndarray:
        """Append [n, dim] embeddings with optional int labels [n] (default -1 = unknown), a
        JSON-serialisable metadata entry per row (default None) and optional non-negative int
        ids [n] (default: consecutive ids after the largest one so far). Returns the ids."""
        x_device = check_embeddings(embeddings)  # on the device
        if x_device.shape[1] != self.dim:
            raise ValueError(f"embeddings must have dim {self.dim}, got shape {x_device.shape}")
        check_finite(x_device, name="embeddings")
        x = np.asarray(x_device, dtype=self.dtype)
        n = x.shape[0]
        if labels is None:
            y = np.full((n,), -1, np.int64)
        else:
            y = np.asarray(check_labels(np.asarray(labels), batch_size=n)).astype(np.int64)
        if metadata is None:
            meta = [None] * n
        else:
            meta = list(metadata)
            if len(meta) != n:
                raise ValueError(f"metadata must have one entry per row ({n}), got {len(meta)}")
            try:
                json.dumps(meta)
            except (TypeError, ValueError) as err:
                raise ValueError(f"metadata must be JSON-serialisable: {err}") from None
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        else:
            new_ids = np.asarray(ids)
            if new_ids.shape != (n,) or not (np.issubdtype(new_ids.dtype, np.integer) or n == 0):
                raise ValueError(f"ids must be an int array of shape ({n},), got {new_ids.dtype} {new_ids.shape}")
            new_ids = new_ids.astype(np.int64)
            if n and new_ids.min() < 0:
                raise ValueError("ids must be non-negative")
            if np.unique(new_ids).size != n:
                raise ValueError("ids must be unique")
            taken = np.intersect1d(new_ids, self._ids)
            if taken.size:
                raise ValueError(f"ids already in the index: {taken[:10].tolist()}")
        if n == 0:
            return new_ids
        self._embeddings = np.concatenate([self._embeddings, x])
        self._labels = np.concatenate([self._labels, y])
        self._ids = np.concatenate([self._ids, new_ids])
        self._metadata.extend(meta)
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._id_order = None
        if self._device is not None:  # copy only the new rows
            self._device = jnp.concatenate([self._device, x_device.astype(self._device.dtype)])
        if self._ann is not None:
            self._ann.add(new_ids.astype(np.uint64), x.astype(np.float32))
        return new_ids

    def rows_of(self, ids) -> np.ndarray:
        """Current rows of the given ids (ValueError naming the unknown ones)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(f"ids must be a rank-1 int array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        if self._id_order is None:
            self._id_order = np.argsort(self._ids, kind="stable")
        sorted_ids = self._ids[self._id_order]
        if len(self) == 0:
            pos, found = np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
        else:
            pos = np.minimum(np.searchsorted(sorted_ids, ids), len(self) - 1)
            found = sorted_ids[pos] == ids
        if not np.all(found):
            raise ValueError(f"ids not in the index: {ids[~found][:10].tolist()}")
        return self._id_order[pos]

    def remove(self, ids) -> None:
        """Remove the rows with these ids (all or nothing: unknown ids -> ValueError, no change)."""
        rows = self.rows_of(ids)
        if np.unique(rows).size != rows.size:
            raise ValueError("ids must be unique")
        keep = np.ones(len(self), bool)
        keep[rows] = False
        removed = self._ids[rows]
        self._embeddings = self._embeddings[keep]
        self._labels = self._labels[keep]
        self._ids = self._ids[keep]
        self._metadata = [m for m, k in zip(self._metadata, keep) if k]
        self._id_order = None
        if self._device is not None:
            self._device = self._device[jnp.asarray(np.flatnonzero(keep))]
        if self._ann is not None:
            self._ann.remove(removed.astype(np.uint64))

    # ------------------------------------------------------------------ search

    def _hnsw(self):
        if self._ann is None:
            index_cls = _import_usearch()
            ann = index_cls(ndim=self.dim, metric=_HNSW_METRICS[self.metric], dtype="f32",
                            connectivity=self.hnsw_options["connectivity"],
                            expansion_add=self.hnsw_options["expansion_add"],
                            expansion_search=self.hnsw_options["expansion_search"])
            if len(self):
                ann.add(self._ids.astype(np.uint64), self._embeddings.astype(np.float32))
            self._ann = ann
        return self._ann

    def _hnsw_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        matches = self._hnsw().search(q.astype(np.float32), k)
        keys = np.asarray(matches.keys).reshape(q.shape[0], -1)[:, :k]
        counts = np.asarray(matches.counts).reshape(-1)
        short = counts < k
        rows = np.zeros((q.shape[0], k), np.int64)
        if np.any(~short):
            rows[~short] = self.rows_of(keys[~short].astype(np.int64).reshape(-1)).reshape(-1, k)
        if np.any(short):  # the graph returned fewer than k rows: exact search for those queries
            idx, _ = knn(jnp.asarray(q[short]), self.device_embeddings, k=k, metric=self.metric,
                         exclude_self=False)
            rows[short] = np.asarray(idx)
        dist = _np_distances(q, self._embeddings[rows], self.metric)
        order = np.lexsort((rows, dist), axis=1)  # nearest first, ties to the lower row (as knn)
        rows = np.take_along_axis(rows, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        return rows, dist

    def search(self, queries, *, k: int = 1, exact: bool | None = None, recall_target: float = 0.95,
               block_size: int = 1024) -> SearchResult:
        """k nearest stored items of every query.

        exact: None -> the backend's search ("exact": blocked exact kNN on the device; "hnsw":
        the HNSW graph); True -> exact device search with either backend; False -> approximate
        (``approx_max_k`` with the exact backend, the graph with "hnsw").
        """
        if len(self) == 0:
            raise ValueError("index is empty: add embeddings before searching")
        q = check_embeddings(queries, name="queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries must have dim {self.dim}, got shape {q.shape}")
        k = _positive_int(k, name="k")
        if k > len(self):
            raise ValueError(f"k must be <= the index size ({len(self)}), got {k}")
        if exact is not None and not isinstance(exact, (bool, np.bool_)):
            raise ValueError(f"exact must be None or a bool, got {exact!r}")
        use_graph = self.backend == "hnsw" and not exact
        if use_graph:
            qn = np.asarray(q, dtype=np.float64)
            check_finite(q, name="queries")
            idx, dist = self._hnsw_search(qn, k)
        else:
            gallery = self.device_embeddings
            q = q.astype(gallery.dtype)
            if exact is None or exact:
                idx, dist = knn(q, gallery, k=k, metric=self.metric, exclude_self=False, block_size=block_size)
            else:
                idx, dist = approximate_knn(q, gallery, k=k, metric=self.metric, recall_target=recall_target,
                                            block_size=block_size)
            idx, dist = np.asarray(idx), np.asarray(dist)
        meta = [[self._metadata[j] for j in row] for row in idx]
        return SearchResult(idx, dist, self._labels[idx], meta, self._ids[idx])

    def match(self, queries, *, k: int = 1, strategy: str = "nearest", distance_threshold=None,
              exact: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted label and match distance per query; -1 where the distance exceeds the cut-off.

        distance_threshold: None (accept all), a float (constant cut-off) or a dict
        {class: cut-off} from `calibrate_class_thresholds` (classes missing from it are accepted
        only with the ``None`` key's cut-off if present, else always).
        """
        check_choice(strategy, name="strategy", choices=MATCH_STRATEGIES)
        res = self.search(queries, k=k, exact=exact)
        labels, dist = match_labels(res.labels, res.distances, strategy=strategy)
        if distance_threshold is None:
            return labels, dist
        if isinstance(distance_threshold, dict):
            default = distance_threshold.get(None, np.inf)
            cut = np.array([distance_threshold.get(int(c), default) for c in labels], dtype=np.float64)
        elif isinstance(distance_threshold, numbers.Number) and not isinstance(distance_threshold, bool):
            cut = float(distance_threshold)
        else:
            raise ValueError(f"distance_threshold must be None, a number or a dict, got {distance_threshold!r}")
        return np.where(dist <= cut, labels, -1), dist

    # ------------------------------------------------------------------ persistence

    def _file_chunks(self) -> list[bytes]:
        arrays = {"embeddings": self._embeddings, "labels": self._labels, "ids": self._ids}
        if self._ann is not None and len(self._ann) == len(self):
            arrays["hnsw_graph"] = np.frombuffer(bytes(self._ann.save()), np.uint8)
        specs, offset = {}, 0
        for name, a in arrays.items():
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            arrays[name] = a
            specs[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes}
            offset += a.nbytes
        header = {"format": INDEX_FORMAT, "version": INDEX_FORMAT_VERSION, "dim": self.dim,
                  "metric": self.metric, "dtype": self.dtype.name, "size": len(self), "backend": self.backend,
                  "hnsw_options": self.hnsw_options, "next_id": self._next_id, "arrays": specs,
                  "metadata": self._metadata}
        head = json.dumps(header).encode("utf-8")
        chunks = [_MAGIC, len(head).to_bytes(_HEADER_LEN_BYTES, "little"), head]
        chunks += [a.tobytes() for a in arrays.values()]
        digest = hashlib.sha256()
        for c in chunks:
            digest.update(c)
        chunks.append(digest.digest())
        return chunks

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ONE file at ``path`` atomically (temporary file + ``os.replace``)."""
        path = os.fspath(path)
        _atomic_write(path, self._file_chunks())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingIndex":
        """Read a file written by `save`, validating it (ValueError naming the file and the problem)."""
        path = os.fspath(path)
        if not os.path.exists(path) and os.path.exists(path + ".json") and os.path.exists(path + ".npz"):
            raise ValueError(f"{path}: not found; {path}.npz + {path}.json is the version-1 index format "
                             f"(two files), which this version does not read: load it with an older "
                             f"dmljax and save it again")
        with open(path, "rb") as f:
            data = f.read()
        return cls._from_bytes(data, path)

    @classmethod
    def _from_bytes(cls, data: bytes, path: str) -> "EmbeddingIndex":
        def bad(msg):
            return ValueError(f"{path}: {msg}")

        fixed = len(_MAGIC) + _HEADER_LEN_BYTES
        if len(data) < fixed or not data.startswith(_MAGIC):
            if len(data) < len(_MAGIC) and _MAGIC.startswith(data):
                raise bad(f"truncated file ({len(data)} bytes): not a complete dmljax embedding index")
            raise bad("not a dmljax embedding index file (wrong magic bytes)")
        head_len = int.from_bytes(data[len(_MAGIC):fixed], "little")
        if fixed + head_len + _DIGEST_BYTES > len(data):
            raise bad(f"truncated file ({len(data)} bytes; its header alone declares {head_len} bytes)")
        try:
            header = json.loads(data[fixed:fixed + head_len].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad(f"corrupt header (not valid JSON: {err})") from None
        if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
            raise bad(f"corrupt header: format must be {INDEX_FORMAT!r}")
        version = header.get("version")
        if version != INDEX_FORMAT_VERSION:
            raise bad(f"format version {version!r} is not supported (this dmljax reads version "
                      f"{INDEX_FORMAT_VERSION})")
        try:
            specs = header["arrays"]
            payload_len = sum(int(s["nbytes"]) for s in specs.values())
            dim, size, metric = header["dim"], header["size"], header["metric"]
            dtype, backend, metadata = header["dtype"], header["backend"], header["metadata"]
            options, next_id = header["hnsw_options"], header["next_id"]
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise bad(f"corrupt header: missing or malformed field {err}") from None
        expected = fixed + head_len + payload_len + _DIGEST_BYTES
        if len(data) < expected:
            raise bad(f"truncated file: {len(data)} bytes, its header declares {expected}")
        if len(data) > expected:
            raise bad(f"corrupt file: {len(data) - expected} bytes after the end its header declares")
        if hashlib.sha256(data[:-_DIGEST_BYTES]).digest() != data[-_DIGEST_BYTES:]:
            raise bad("corrupt file: SHA-256 checksum mismatch (the content was altered or partly written)")
        if metric not in KNN_METRICS:
            raise bad(f"metric must be one of {KNN_METRICS}, got {metric!r}")
        if backend not in BACKENDS:
            raise bad(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise bad(f"dim must be a positive integer, got {dim!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"size must be a non-negative integer, got {size!r}")
        try:
            float_dtype = np.dtype(dtype)
        except TypeError:
            raise bad(f"dtype {dtype!r} is not a numpy dtype") from None
        if not np.issubdtype(float_dtype, np.floating):
            raise bad(f"dtype must be floating, got {dtype!r}")
        if not isinstance(metadata, list) or len(metadata) != size:
            raise bad(f"metadata must be a list of {size} entries (one per embedding), got "
                      f"{len(metadata) if isinstance(metadata, list) else type(metadata).__name__}")
        want = {"embeddings": (float_dtype, (size, dim)), "labels": (np.dtype(np.int64), (size,)),
                "ids": (np.dtype(np.int64), (size,))}
        base = fixed + head_len
        arrays = {}
        for name, spec in specs.items():
            try:
                a_dtype = np.dtype(spec["dtype"])
                shape = tuple(int(s) for s in spec["shape"])
                offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
            except (KeyError, TypeError, ValueError) as err:
                raise bad(f"corrupt header: malformed entry for array {name!r} ({err})") from None
            if offset < 0 or offset + nbytes > payload_len or nbytes != int(np.prod(shape)) * a_dtype.itemsize:
                raise bad(f"corrupt header: array {name!r} does not fit its declared bytes")
            arrays[name] = np.frombuffer(data, a_dtype, count=int(np.prod(shape)), offset=base + offset).reshape(shape)
        for name, (a_dtype, shape) in want.items():
            if name not in arrays:
                raise bad(f"array {name!r} is missing")
            a = arrays[name]
            if a.shape != shape:
                what = {"embeddings": f"[size={size}, dim={dim}]", "labels": f"one label per embedding ({size})",
                        "ids": f"one id per embedding ({size})"}[name]
                raise bad(f"{name} has shape {a.shape}, expected {what}")
            if a.dtype.newbyteorder("=") != a_dtype:
                raise bad(f"{name} has dtype {a.dtype}, expected {a_dtype}")
        if not np.all(np.isfinite(arrays["embeddings"])):
            raise bad("embeddings contain NaN or inf values")
        ids = arrays["ids"]
        if size and (ids.min() < 0 or np.unique(ids).size != size):
            raise bad("ids must be unique and non-negative")
        try:
            index = cls(dim, metric=metric, dtype=float_dtype, backend=backend, hnsw_options=options)
        except ValueError as err:
            raise bad(f"invalid configuration: {err}") from None
        index._embeddings = arrays["embeddings"].astype(float_dtype)  # copies: owns writable memory
        index._labels = arrays["labels"].astype(np.int64)
        index._ids = ids.astype(np.int64)
        index._metadata = list(metadata)
        index._next_id = max(int(next_id), int(ids.max()) + 1 if size else 0)
        if backend == "hnsw" and "hnsw_graph" in arrays:
            index_cls = _import_usearch()
            try:
                ann = index_cls.restore(bytearray(arrays["hnsw_graph"].tobytes()), view=False)
            except Exception as err:  # noqa: BLE001 - usearch raises RuntimeError / ValueError
                raise bad(f"corrupt HNSW graph: {err}") from None
            if ann is None or len(ann) != size:
                raise bad("corrupt HNSW graph: its size differs from the number of embeddings")
            index._ann = ann
        return index


def _write_chunks(f, chunks: Sequence[bytes]) -> None:
    for chunk in chunks:
        f.write(chunk)


def _atomic_write(path: str, chunks: Sequence[bytes]) -> None:
    """Write ``chunks`` to a temporary file next to ``path``, fsync it, then ``os.replace`` it over
    ``path``: a reader sees the old file or the new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_chunks(f, chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX; not possible on Windows)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
