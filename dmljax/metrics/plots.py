"""Pictures of an embedding, written to files with matplotlib's Agg backend (no display).

* `plot_retrieval_grid`: one row per query: the query image, then its top-k neighbours
  framed green (same label: hit) or red (miss).
* `plot_roc`: ROC curves (log-scaled FAR optional) with their AUC in the legend.
* `plot_embedding_map`: a 2-D map of the embeddings coloured by class; PCA (numpy SVD)
  by default, t-SNE when scikit-learn is installed and ``method="tsne"``.

matplotlib is imported lazily so `dmljax.metrics` imports without it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from dmljax.metrics.verification import roc_auc, roc_curve

__all__ = ["plot_retrieval_grid", "plot_roc", "plot_embedding_map", "pca_2d"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _as_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)  # CHW -> HWC
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def plot_retrieval_grid(path: str, query_images, query_labels, gallery_images, gallery_labels,
                        neighbor_indices, *, queries: Sequence[int] | None = None, k: int = 5,
                        border: int = 3) -> str:
    """Save a grid: row r shows query ``queries[r]`` and its first ``k`` neighbours.

    Args:
      query_images: [N, H, W] / [N, H, W, C] / [N, C, H, W] images of the queries.
      gallery_images / gallery_labels: the searched set (pass the query arrays again for
        the query-in-gallery protocol).
      neighbor_indices: [N, >=k] from `knn`.
      queries: which query rows to show (default: the first 8).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from dmljax.metrics.plots import plot_retrieval_grid
      >>> images = np.random.default_rng(0).integers(0, 255, size=(4, 8, 8), dtype=np.uint8)
      >>> labels = np.array([0, 0, 1, 1])
      >>> neighbors = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
      >>> path = plot_retrieval_grid(os.path.join(tempfile.mkdtemp(), "grid.png"), images, labels, images, labels, neighbors, k=2)
      >>> os.path.basename(path), os.path.getsize(path) > 0
      ('grid.png', True)
    """
    neighbor_indices = np.asarray(neighbor_indices)
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    if neighbor_indices.ndim != 2 or neighbor_indices.shape[1] < k:
        raise ValueError(f"neighbor_indices must have shape [N, >= {k}], got {neighbor_indices.shape}")
    if len(query_images) != len(query_labels) or len(query_labels) != neighbor_indices.shape[0]:
        raise ValueError("query_images, query_labels and neighbor_indices must have the same length")
    if len(gallery_images) != len(gallery_labels):
        raise ValueError("gallery_images and gallery_labels must have the same length")
    queries = list(range(min(8, len(query_labels)))) if queries is None else list(queries)
    plt = _pyplot()
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.6 * (k + 1), 1.7 * len(queries)), squeeze=False)
    for r, q in enumerate(queries):
        axes[r, 0].imshow(_as_image(query_images[q]), cmap="gray")
        axes[r, 0].set_title(f"query {q}\nlabel {query_labels[q]}", fontsize=7)
        for c in range(k):
            g = int(neighbor_indices[q, c])
            hit = gallery_labels[g] == query_labels[q]
            ax = axes[r, c + 1]
            ax.imshow(_as_image(gallery_images[g]), cmap="gray")
            ax.set_title(f"#{c + 1} label {gallery_labels[g]}", fontsize=7, color="green" if hit else "red")
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_edgecolor("limegreen" if hit else "red")
                spine.set_linewidth(border)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].figure.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_roc(path: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, log_far: bool = False) -> str:
    """Save ROC curves; ``curves`` maps a legend name to (scores, is_positive).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from dmljax.metrics.plots import plot_roc
      >>> scores, is_positive = np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False])
      >>> path = plot_roc(os.path.join(tempfile.mkdtemp(), "roc.png"), {"model": (scores, is_positive)})
      >>> os.path.basename(path), os.path.getsize(path) > 0
      ('roc.png', True)
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (scores, is_positive) in curves.items():
        fpr, tpr, _ = roc_curve(scores, is_positive)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(scores, is_positive):.3f})")
    if log_far:
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
    else:
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("false accept rate (FPR)")
    ax.set_ylabel("true accept rate (TPR)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components of ``x`` [N, D] (centred SVD, numpy).

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.plots import pca_2d
      >>> x = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
      >>> print(np.abs(np.round(pca_2d(x), 4)))
      [[2. 0.]
       [0. 0.]
       [2. 0.]]
    """
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))) if out.shape[1] < 2 else out


def plot_embedding_map(path: str, embeddings, labels, *, method: str = "pca", seed: int = 0,
                       max_points: int = 5000, title: str | None = None) -> str:
    """Save a 2-D scatter of the embeddings coloured by class (PCA or t-SNE).

    At most ``max_points`` random points are drawn (t-SNE is quadratic).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from dmljax.metrics.plots import plot_embedding_map
      >>> emb = np.random.default_rng(0).normal(size=(20, 5))
      >>> path = plot_embedding_map(os.path.join(tempfile.mkdtemp(), "map.png"), emb, np.arange(20) % 4)
      >>> os.path.basename(path), os.path.getsize(path) > 0
      ('map.png', True)
    """
    x = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"embeddings must have rank 2, got shape {x.shape}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be one of ('pca', 'tsne'), got {method!r}")
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_points:
        keep = rng.choice(x.shape[0], max_points, replace=False)
        x, labels = x[keep], labels[keep]
    if method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, random_state=seed, perplexity=min(30.0, max(2.0, (x.shape[0] - 1) / 3))
                  ).fit_transform(x)
    else:
        xy = pca_2d(x)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    classes, codes = np.unique(labels, return_inverse=True)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=codes.reshape(-1), cmap="tab20" if len(classes) <= 20 else "hsv", s=8)
    if len(classes) <= 20:
        handles, _ = sc.legend_elements()
        ax.legend(handles, [str(c) for c in classes], fontsize=6, loc="best", title="class")
    ax.set_title(title or f"embeddings ({method.upper()})")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
