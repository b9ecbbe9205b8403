"""Verification, open-set identification and anomaly detection from embeddings.

Convention: a *score* grows with the belief that a pair is genuine (same identity) or,
for anomaly scores, that an item is anomalous; a pair is accepted when
``score >= threshold``. Pass ``-distance`` as the score for distances
(`pair_scores` does this).

* `roc_curve` / `roc_auc`: every distinct score is a threshold, tied scores move
  together (one diagonal step of the ROC), so the trapezoidal AUC equals the
  Mann-Whitney probability P(s+ > s-) + P(s+ = s-) / 2, exactly as scikit-learn.
* `equal_error_rate`: the point where FAR (= FPR) equals FRR (= 1 - TPR), linearly
  interpolated on the segment of the ROC where FAR - FRR changes sign.
* `tar_at_far`: the largest TAR over ROC points with FAR <= the target
  (conservative: the target FAR is never exceeded).
* `best_threshold` / `accuracy_at_threshold` / `threshold_transfer`: choose the
  threshold maximising accuracy on one split (mid-points between distinct scores),
  report the accuracy on another (LFW-style protocol).
* `open_set_identification`: Detection and Identification Rate vs False Alarm Rate
  (the open-set curve of Phillips et al., FRVT / Grother): a probe of a gallery identity is
  correctly detected and identified at threshold t when its nearest gallery item has its
  label and distance < t; a probe of an unknown identity raises a false alarm when its
  nearest distance is < t.
* anomaly scores: distance to the k-th nearest normal (training) item, or to the
  nearest class centre; `roc_auc` of these scores against the anomaly flags is the AUROC.

These are host-side (numpy, float64) metrics over one-dimensional score arrays; the
embedding-level helpers use the on-device `knn`.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_choice, check_embeddings
from dmljax.distances import l2_normalize
from dmljax.metrics.knn import KNN_METRICS, check_finite, knn

__all__ = [
    "pair_scores",
    "roc_curve",
    "roc_auc",
    "equal_error_rate",
    "tar_at_far",
    "best_threshold",
    "accuracy_at_threshold",
    "threshold_transfer",
    "detection_identification_rate",
    "open_set_identification",
    "knn_anomaly_scores",
    "class_center_anomaly_scores",
    "anomaly_auroc",
]


def _check_scores(scores, labels, *, scores_name="scores", labels_name="is_positive", need_both=True):
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"{scores_name} must have rank 1, got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{labels_name} must have the shape of {scores_name} {s.shape}, got {y.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{scores_name} contains NaN or inf values")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.integer) or not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{labels_name} must be boolean (or 0/1 integers)")
        y = y.astype(bool)
    if need_both and (y.all() or not y.any()):
        raise ValueError(f"{labels_name} must contain both positives and negatives")
    return s, y


def pair_scores(x, y, *, metric: str = "cosine") -> np.ndarray:
    """Row-wise similarity scores of pairs (x_i, y_i), larger = more alike: cosine
    similarity, dot product, or minus the (squared) euclidean distance. [P, D] x2 -> [P].

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.verification import pair_scores
      >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])
      >>> y = np.array([[1.0, 0.0], [1.0, 0.0]])
      >>> print(pair_scores(x, y))
      [1. 0.]
      >>> print(np.round(pair_scores(x, y, metric="euclidean"), 4) + 0.0)
      [ 0.     -1.4142]
    """
    check_choice(metric, name="metric", choices=KNN_METRICS)
    x = check_embeddings(x, name="x")
    y = check_embeddings(y, name="y")
    if x.shape != y.shape:
        raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
    if metric == "cosine":
        return np.asarray(jnp.sum(l2_normalize(x) * l2_normalize(y), axis=1))
    if metric == "dot":
        return np.asarray(jnp.sum(x * y, axis=1))
    d2 = jnp.sum(jnp.square(x - y), axis=1)
    return -np.asarray(jnp.sqrt(d2) if metric == "euclidean" else d2)


def roc_curve(scores, is_positive):
    """(fpr, tpr, thresholds): one point per distinct score (descending), preceded by
    (0, 0) at threshold +inf. Same points as ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)``.

    Examples:
      >>> import numpy as np
      >>> scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
      >>> is_positive = np.array([True, True, False, True, False, False])
      >>> from dmljax.metrics.verification import roc_curve
      >>> fpr, tpr, thresholds = roc_curve(scores, is_positive)
      >>> print(fpr.round(3).tolist())
      [0.0, 0.0, 0.0, 0.333, 0.333, 0.667, 1.0]
      >>> print(tpr.round(3).tolist())
      [0.0, 0.333, 0.667, 0.667, 1.0, 1.0, 1.0]
    """
    s, y = _check_scores(scores, is_positive)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last_of_run].astype(np.float64)
    fps = (last_of_run + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def roc_auc(scores, is_positive) -> float:
    """Area under the ROC curve (trapezoids; ties count one half).

    Examples:
      >>> import numpy as np
      >>> scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
      >>> is_positive = np.array([True, True, False, True, False, False])
      >>> from dmljax.metrics.verification import roc_auc
      >>> round(roc_auc(scores, is_positive), 4)
      0.8889
    """
    fpr, tpr, _ = roc_curve(scores, is_positive)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def equal_error_rate(scores, is_positive) -> tuple[float, float]:
    """(EER, threshold) where FAR = FRR, interpolated linearly between ROC points.

    Examples:
      >>> import numpy as np
      >>> scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
      >>> is_positive = np.array([True, True, False, True, False, False])
      >>> from dmljax.metrics.verification import equal_error_rate
      >>> eer, threshold = equal_error_rate(scores, is_positive)
      >>> round(eer, 4), round(threshold, 4)
      (0.3333, 0.7)
    """
    fpr, tpr, thr = roc_curve(scores, is_positive)
    frr = 1.0 - tpr
    gap = fpr - frr  # increases from -1 to +1 along the curve
    j = int(np.argmax(gap >= 0))
    if gap[j] == 0 or j == 0:
        return float(fpr[j]), float(thr[j])
    w = -gap[j - 1] / (gap[j] - gap[j - 1])
    eer = fpr[j - 1] + w * (fpr[j] - fpr[j - 1])
    t_prev = thr[j - 1] if np.isfinite(thr[j - 1]) else thr[j]
    return float(eer), float(t_prev + w * (thr[j] - t_prev))


def tar_at_far(scores, is_positive, fars: Sequence[float]) -> np.ndarray:
    """True accept rate at each target false accept rate (largest TAR with FAR <= target).

    Examples:
      >>> import numpy as np
      >>> scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
      >>> is_positive = np.array([True, True, False, True, False, False])
      >>> from dmljax.metrics.verification import tar_at_far
      >>> print(tar_at_far(scores, is_positive, fars=(0.0, 0.34)))
      [0.66666667 1.        ]
    """
    fpr, tpr, _ = roc_curve(scores, is_positive)
    fars = np.asarray(fars, dtype=np.float64).reshape(-1)
    if np.any((fars < 0) | (fars > 1)) or not np.all(np.isfinite(fars)):
        raise ValueError(f"fars must lie in [0, 1], got {fars}")
    # tpr is non-decreasing in fpr, so the best admissible point is the last with fpr <= far
    idx = np.searchsorted(fpr, fars, side="right") - 1
    return tpr[idx]


def _accuracies(s, y):
    """Candidate thresholds (mid-points, plus both ends) and the accuracy of each."""
    u = np.unique(s)
    candidates = np.r_[u[0] - 1.0, (u[1:] + u[:-1]) / 2, u[-1] + 1.0]
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    true_accepts = pos.size - np.searchsorted(pos, candidates, side="left")
    true_rejects = np.searchsorted(neg, candidates, side="left")
    return candidates, (true_accepts + true_rejects) / s.size


def best_threshold(scores, is_positive) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score >= threshold``; the smallest
    such threshold (a mid-point between distinct scores) on ties.

    Examples:
      >>> import numpy as np
      >>> scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
      >>> is_positive = np.array([True, True, False, True, False, False])
      >>> from dmljax.metrics.verification import best_threshold
      >>> threshold, accuracy = best_threshold(scores, is_positive)
      >>> round(threshold, 4), round(accuracy, 4)
      (0.35, 0.8333)
    """
    s, y = _check_scores(scores, is_positive, need_both=False)
    candidates, acc = _accuracies(s, y)
    j = int(np.argmax(acc))
    return float(candidates[j]), float(acc[j])


def accuracy_at_threshold(scores, is_positive, threshold: float) -> float:
    """Fraction of pairs classified correctly by ``score >= threshold``.

    Examples:
      >>> import numpy as np
      >>> scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
      >>> is_positive = np.array([True, True, False, True, False, False])
      >>> from dmljax.metrics.verification import accuracy_at_threshold
      >>> round(accuracy_at_threshold(scores, is_positive, 0.5), 4)
      0.6667
    """
    s, y = _check_scores(scores, is_positive, need_both=False)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return float(np.mean((s >= threshold) == y))


def threshold_transfer(train_scores, train_is_positive, test_scores, test_is_positive) -> dict[str, float]:
    """Pick the threshold on the train split, report accuracy on both splits.

    Examples:
      >>> import numpy as np
      >>> scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
      >>> is_positive = np.array([True, True, False, True, False, False])
      >>> from dmljax.metrics.verification import threshold_transfer
      >>> m = threshold_transfer(scores, is_positive, scores - 0.2, is_positive)
      >>> {k: round(float(v), 4) for k, v in sorted(m.items())}
      {'test_accuracy': 0.6667, 'threshold': 0.35, 'train_accuracy': 0.8333}
    """
    t, train_acc = best_threshold(train_scores, train_is_positive)
    test_acc = accuracy_at_threshold(test_scores, test_is_positive, t)
    return {"threshold": t, "train_accuracy": train_acc, "test_accuracy": test_acc}


def detection_identification_rate(nearest_distances, nearest_correct, is_known, *,
                                  false_alarm_rates: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(DIR at each false alarm rate, the distance thresholds used).

    Args:
      nearest_distances: [P] distance of each probe to its nearest gallery item.
      nearest_correct: [P] bool, that item has the probe's identity.
      is_known: [P] bool, the probe's identity is enrolled in the gallery.
      false_alarm_rates: targets f; threshold t_f is the largest value such that the
        fraction of unknown probes with distance < t_f is <= f (accept iff d < t).

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.verification import detection_identification_rate
      >>> distances = np.array([0.1, 0.2, 0.9, 0.5, 0.8])
      >>> correct = np.array([True, True, False, False, False])
      >>> known = np.array([True, True, True, False, False])
      >>> rates, thresholds = detection_identification_rate(distances, correct, known, false_alarm_rates=(0.0, 0.5))
      >>> print(rates)
      [0.66666667 0.66666667]
    """
    d = np.asarray(nearest_distances, dtype=np.float64)
    correct = np.asarray(nearest_correct, dtype=bool)
    known = np.asarray(is_known, dtype=bool)
    if d.ndim != 1:
        raise ValueError(f"nearest_distances must have rank 1, got shape {d.shape}")
    if correct.shape != d.shape:
        raise ValueError(f"nearest_correct must have shape {d.shape}, got {correct.shape}")
    if known.shape != d.shape:
        raise ValueError(f"is_known must have shape {d.shape}, got {known.shape}")
    if not known.any() or known.all():
        raise ValueError("is_known must contain both known and unknown probes")
    fars = np.asarray(false_alarm_rates, dtype=np.float64).reshape(-1)
    if np.any((fars < 0) | (fars > 1)):
        raise ValueError(f"false_alarm_rates must lie in [0, 1], got {fars}")
    unknown = np.sort(d[~known])
    allowed = np.floor(fars * unknown.size + 1e-9).astype(int)
    thresholds = np.where(allowed >= unknown.size, np.inf, unknown[np.minimum(allowed, unknown.size - 1)])
    hits = (d[known][None, :] < thresholds[:, None]) & correct[known][None, :]
    return hits.mean(axis=1), thresholds


def open_set_identification(probe_embeddings, probe_labels, gallery_embeddings, gallery_labels, *,
                            false_alarm_rates: Sequence[float] = (0.001, 0.01, 0.1),
                            metric: str = "euclidean") -> dict[str, np.ndarray]:
    """Open-set identification: nearest gallery item of each probe (on-device kNN), then
    `detection_identification_rate`. Returns {"false_alarm_rates", "dir", "thresholds",
    "closed_set_rank1"} (rank-1 accuracy of the known probes, i.e. DIR at FAR = 1).

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.verification import open_set_identification
      >>> gallery = np.array([[0.0, 0.0], [10.0, 0.0]])
      >>> probes = np.array([[0.1, 0.0], [9.9, 0.0], [5.0, 5.0]])
      >>> m = open_set_identification(probes, np.array([0, 1, 7]), gallery, np.array([0, 1]), false_alarm_rates=(0.0,))
      >>> {k: np.round(np.asarray(v, dtype=np.float64), 4).tolist() for k, v in sorted(m.items())}
      {'closed_set_rank1': 1.0, 'dir': [1.0], 'false_alarm_rates': [0.0], 'thresholds': [7.0711]}
    """
    probe_labels = np.asarray(probe_labels)
    gallery_labels = np.asarray(gallery_labels)
    n = np.shape(probe_embeddings)[0] if np.ndim(probe_embeddings) == 2 else None
    if probe_labels.shape != (n,):
        raise ValueError(f"probe_labels must have shape ({n},), got {probe_labels.shape}")
    m = np.shape(gallery_embeddings)[0] if np.ndim(gallery_embeddings) == 2 else None
    if gallery_labels.shape != (m,):
        raise ValueError(f"gallery_labels must have shape ({m},), got {gallery_labels.shape}")
    idx, dist = knn(probe_embeddings, gallery_embeddings, k=1, metric=metric)
    idx, dist = np.asarray(idx[:, 0]), np.asarray(dist[:, 0])
    correct = gallery_labels[idx] == probe_labels
    known = np.isin(probe_labels, gallery_labels)
    dir_, thresholds = detection_identification_rate(dist, correct, known, false_alarm_rates=false_alarm_rates)
    return {"false_alarm_rates": np.asarray(false_alarm_rates, np.float64), "dir": dir_,
            "thresholds": thresholds, "closed_set_rank1": float(correct[known].mean())}


def knn_anomaly_scores(test_embeddings, train_embeddings=None, *, k: int = 1, metric: str = "euclidean",
                       block_size: int = 1024) -> np.ndarray:
    """Distance of each test item to its k-th nearest normal (train) item; without
    ``train_embeddings`` the test set itself, excluding the item.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.verification import knn_anomaly_scores
      >>> train = np.array([[0.0], [1.0], [2.0]])
      >>> print(knn_anomaly_scores(np.array([[1.0], [5.0]]), train, k=1))
      [0. 3.]
    """
    _, dist = knn(test_embeddings, train_embeddings, k=k, metric=metric, block_size=block_size)
    return np.asarray(dist[:, -1])


def class_center_anomaly_scores(test_embeddings, train_embeddings, train_labels, *,
                                metric: str = "euclidean") -> np.ndarray:
    """Distance of each test item to the nearest class centre (mean of the train embeddings
    of the class; for "cosine" the centre of the L2-normalised embeddings).

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.verification import class_center_anomaly_scores
      >>> train = np.array([[0.0], [2.0], [10.0], [12.0]])
      >>> print(class_center_anomaly_scores(np.array([[1.0], [6.0]]), train, np.array([0, 0, 1, 1])))
      [0. 5.]
    """
    train = check_embeddings(train_embeddings, name="train_embeddings")
    labels = np.asarray(train_labels)
    if labels.shape != (train.shape[0],):
        raise ValueError(f"train_labels must have shape ({train.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"train_labels must be integer class ids, got dtype {labels.dtype}")
    check_finite(train, name="train_embeddings")
    if metric == "cosine":
        train = l2_normalize(train)
    _, inverse = np.unique(labels, return_inverse=True)
    num_classes = int(inverse.max()) + 1
    sums = jnp.zeros((num_classes, train.shape[1]), train.dtype).at[inverse.reshape(-1)].add(train)
    centers = sums / jnp.asarray(np.bincount(inverse.reshape(-1)), train.dtype)[:, None]
    _, dist = knn(test_embeddings, centers, k=1, metric=metric)
    return np.asarray(dist[:, 0])


def anomaly_auroc(scores, is_anomaly) -> float:
    """AUROC of anomaly scores (larger = more anomalous) against the anomaly flags.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.verification import anomaly_auroc
      >>> round(anomaly_auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([False, False, True, True])), 4)
      1.0
    """
    return roc_auc(scores, is_anomaly)
