"""Matryoshka representation learning: one embedding whose prefixes are embeddings too.

Kusupati, Bhatt, Rege, Wallingford, Sinha, Ramanujan, Howard-Snyder, Chen, Kakade, Jain, Farhadi,
"Matryoshka Representation Learning", NeurIPS 2022 (arXiv 2205.13147). The loss is applied to
nested prefixes ``z[:, :m]`` for m in a set M of dimensions (the paper: powers of two from 8 to
the full 2048) and the weighted sum is minimised::

    L_MRL = sum_{m in M} c_m * L(z[:, :m], labels)          (paper eq. 1, c_m = 1 there)

so that the first m coordinates alone retrieve almost as well as the full embedding (adaptive
retrieval: shortlist with 64 dims, re-rank with 512). Any embedding loss of the library works;
learnable loss arrays whose last axis is the embedding dimension (proxies, class weights) are
sliced the same way, which is the paper's nested classifier ("MRL"; sharing one weight matrix
across prefixes is its "MRL-E" variant, ``slice_params=True`` is both: prefixes of one matrix).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_embeddings
from dmljax.distances import l2_normalize

__all__ = ["check_prefix_dims", "evaluate_prefixes", "matryoshka", "matryoshka_loss"]


def check_prefix_dims(dims: Sequence[int], dim: int, *, name: str = "dims") -> tuple[int, ...]:
    """Validate prefix dimensions: a non-empty sequence of distinct ints in [1, dim]."""
    if isinstance(dims, (int, np.integer)) or not hasattr(dims, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {dims!r}")
    dims = tuple(dims)
    if not dims:
        raise ValueError(f"{name} must not be empty")
    for m in dims:
        if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, np.integer)) or not 1 <= m <= dim:
            raise ValueError(f"{name} must be ints in [1, {dim}] (the embedding dimension), got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{name} must be distinct, got {dims}")
    return tuple(int(m) for m in dims)


def _check_weights(weights, n: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * n
    weights = tuple(float(w) for w in weights)
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per prefix dimension ({n}), got {len(weights)}")
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    return weights


def matryoshka_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *loss_params: jax.Array,
    loss_fn: Callable[..., jax.Array],
    dims: Sequence[int] = (512, 256, 128, 64, 32),
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    slice_params: bool = True,
) -> jax.Array:
    """``sum_k weights[k] * loss_fn(prefix(embeddings, dims[k]), labels, *prefix(loss_params))``.

    Args:
      embeddings: [B, D]. labels: whatever ``loss_fn`` takes ([B] ids, [B, C] multi-hot).
      *loss_params: the loss's learnable arrays (e.g. proxies [C, D]).
      loss_fn: ``loss_fn(embeddings, labels, *loss_params) -> scalar`` with its configuration
        bound (``functools.partial(multi_similarity_loss, alpha=2.0)``).
      dims: prefix dimensions, distinct, each in [1, D] (static); the paper's
        (512, 256, 128, 64, 32) style nesting is the default (D must be >= 512 for it).
      weights: c_m >= 0 per prefix, default 1 each (paper).
      normalize: L2-normalise every embedding prefix before the loss, for losses that expect
        unit-norm inputs (a prefix of a unit vector is not one). Losses that normalise
        internally (cosine-similarity ones) give the same value either way. Loss arrays are
        never re-normalised (proxy losses normalise their proxies themselves where they should).
      slice_params: slice loss arrays whose last axis has length D to the prefix too; other
        arrays (a learnable margin, a temperature) are passed unchanged.
    Returns:
      Scalar, the weighted sum.
    Raises:
      ValueError: bad ``dims`` / ``weights`` (named), embeddings not [B, D].
    """
    x = check_embeddings(embeddings)
    d = x.shape[1]
    dims = check_prefix_dims(dims, d)
    weights = _check_weights(weights, len(dims))
    total = jnp.zeros((), x.dtype)
    sliced = tuple(bool(slice_params) and np.ndim(p) >= 1 and np.shape(p)[-1] == d for p in loss_params)
    for m, c in zip(dims, weights):
        if c == 0:
            continue
        prefix = l2_normalize(x[:, :m]) if normalize else x[:, :m]
        params = tuple(p[..., :m] if cut else p for p, cut in zip(loss_params, sliced))
        total = total + c * loss_fn(prefix, labels, *params)
    return total


def matryoshka(
    loss_fn: Callable[..., jax.Array],
    *,
    dims: Sequence[int] = (512, 256, 128, 64, 32),
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    slice_params: bool = True,
) -> Callable[..., jax.Array]:
    """``loss_fn`` wrapped by `matryoshka_loss`: ``f(embeddings, labels, *loss_params)``.

    A hashable ``functools.partial`` (static configuration), usable as a `TrainState`'s
    ``loss_fn``. Validates ``dims`` / ``weights`` eagerly where possible.
    """
    dims = check_prefix_dims(dims, np.iinfo(np.int32).max)  # the bound D is checked at call time
    w = None if weights is None else _check_weights(weights, len(dims))
    return functools.partial(matryoshka_loss, loss_fn=loss_fn, dims=dims, weights=w, normalize=normalize,
                             slice_params=slice_params)


def evaluate_prefixes(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    *,
    dims: Sequence[int],
    normalize: bool = True,
    **evaluate_kwargs,
) -> dict[int, dict[str, float]]:
    """`dmljax.metrics.evaluate` on every prefix ``[:, :m]`` of the embeddings: ``{m: metrics}``.

    Args:
      query_embeddings [N, D], query_labels [N], gallery_embeddings / gallery_labels: as in
        `dmljax.metrics.evaluate`. dims: prefix dimensions (distinct, in [1, D]).
      normalize: L2-normalise each prefix (matters for "euclidean" / "dot" metrics; cosine
        normalises anyway). evaluate_kwargs: passed on (ks, metric, clustering, key, ...).
    Returns:
      dict from prefix dimension to the metrics dict of `evaluate`, in the order of ``dims``.
    """
    from dmljax.metrics.report import evaluate

    q = np.asarray(check_embeddings(query_embeddings, name="query_embeddings"))
    dims = check_prefix_dims(dims, q.shape[1])
    g = None if gallery_embeddings is None else np.asarray(check_embeddings(gallery_embeddings,
                                                                            name="gallery_embeddings"))
    if g is not None and g.shape[1] != q.shape[1]:
        raise ValueError(f"gallery_embeddings must have dim {q.shape[1]} like the queries, got shape {g.shape}")

    def cut(x, m):
        x = x[:, :m]
        if normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    return {m: evaluate(cut(q, m), query_labels, None if g is None else cut(g, m), gallery_labels, **evaluate_kwargs)
            for m in dims}
