"""Pairwise distances and similarities, with gradients that stay finite at zero distance.

Every function takes embeddings ``x`` of shape [B, D] and optionally a reference
set ``y`` of shape [M, D]; without ``y`` it is the self form (``y = x``, M = B) in
which the diagonal is exactly zero distance (or the exact self-similarity).
Computation runs in at least float32 (bf16 inputs are upcast), following the
dense expansion of Song et al. 2016 (arXiv 1511.06452):
``D^2 = |x|^2 1' + 1 |y|^2' - 2 X Y'``, which costs one matrix product and O(B M)
memory.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dmljax._validation import check_choice, check_embeddings

__all__ = [
    "METRICS",
    "cosine_similarity",
    "dot_product",
    "euclidean",
    "is_similarity",
    "l2_normalize",
    "pairwise",
    "safe_sqrt",
    "squared_euclidean",
]


def safe_sqrt(x: jax.Array, *, eps: float = 1e-12) -> jax.Array:
    """``sqrt(max(x, 0))`` whose gradient is 0 (not inf/NaN) where ``x <= eps``.

    The double ``where`` keeps NaN out of the backward pass: the branch not taken
    is evaluated at a safe point.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dmljax.distances import safe_sqrt
      >>> safe_sqrt(jnp.array([4.0, 0.0, -1.0])).tolist()
      [2.0, 0.0, 0.0]
      >>> float(jax.grad(safe_sqrt)(0.0))
      0.0
    """
    positive = x > eps
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along ``axis``; zero vectors stay zero with finite gradient.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dmljax.distances import l2_normalize
      >>> x = l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
      >>> [round(float(v), 4) for v in x[0]], x[1].tolist()
      ([0.6, 0.8], [0.0, 0.0])
    """
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _prepare(x, y):
    x = check_embeddings(x, name="x")
    if y is None:
        return x, x, True
    y = check_embeddings(y, name="y")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have feature dim {x.shape[1]} like x, got shape {y.shape}")
    dtype = jnp.promote_types(x.dtype, y.dtype)
    return x.astype(dtype), y.astype(dtype), False


def dot_product(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """Inner products ``S[i, j] = <x_i, y_j>``; [B, D], [M, D] -> [B, M] (a similarity).

    Examples:
      >>> import jax.numpy as jnp
      >>> from dmljax.distances import dot_product
      >>> dot_product(jnp.array([[1.0, 2.0], [3.0, 4.0]])).tolist()
      [[5.0, 11.0], [11.0, 25.0]]
    """
    x, y, _ = _prepare(x, y)
    return x @ y.T


def cosine_similarity(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """Cosine similarities ``<x_i, y_j> / (|x_i| |y_j|)``; [B, D], [M, D] -> [B, M].

    Zero vectors have similarity 0 to everything (finite gradient).

    Examples:
      >>> import jax.numpy as jnp
      >>> from dmljax.distances import cosine_similarity
      >>> s = cosine_similarity(jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
      >>> s.shape, round(float(s[0, 1]), 4), float(s[2, 0])
      ((3, 3), 0.7071, 0.0)
    """
    x, y, self_form = _prepare(x, y)
    xn = l2_normalize(x)
    yn = xn if self_form else l2_normalize(y)
    return xn @ yn.T


def squared_euclidean(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """Squared euclidean distances ``|x_i - y_j|^2`` >= 0; [B, D], [M, D] -> [B, M].

    In the self form the diagonal is exactly 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dmljax.distances import squared_euclidean
      >>> squared_euclidean(jnp.array([[0.0, 0.0], [3.0, 4.0]])).tolist()
      [[0.0, 25.0], [25.0, 0.0]]
    """
    x, y, self_form = _prepare(x, y)
    x_sq = jnp.sum(jnp.square(x), axis=1)
    y_sq = x_sq if self_form else jnp.sum(jnp.square(y), axis=1)
    d2 = x_sq[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
    d2 = jnp.maximum(d2, 0.0)
    if self_form:
        d2 = jnp.where(jnp.eye(d2.shape[0], dtype=bool), 0.0, d2)
    return d2


def euclidean(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """Euclidean distances ``|x_i - y_j|``; [B, D], [M, D] -> [B, M].

    The gradient is finite everywhere: it is defined as 0 at zero distance.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dmljax.distances import euclidean
      >>> x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
      >>> euclidean(x, jnp.array([[0.0, 4.0]])).tolist()
      [[4.0], [3.0]]
    """
    return safe_sqrt(squared_euclidean(x, y))


# name -> (function, is_similarity). Similarities grow as items get closer.
METRICS: dict[str, tuple[Callable[..., jax.Array], bool]] = {
    "euclidean": (euclidean, False),
    "squared_euclidean": (squared_euclidean, False),
    "cosine": (cosine_similarity, True),
    "dot": (dot_product, True),
}


def is_similarity(metric: str) -> bool:
    """True if larger values of ``metric`` mean closer items (cosine, dot).

    Examples:
      >>> from dmljax.distances import is_similarity
      >>> is_similarity("cosine"), is_similarity("euclidean")
      (True, False)
    """
    check_choice(metric, name="metric", choices=tuple(METRICS))
    return METRICS[metric][1]


def pairwise(x: jax.Array, y: jax.Array | None = None, *, metric: str = "euclidean") -> jax.Array:
    """Pairwise matrix [B, M] of ``metric`` in {"euclidean", "squared_euclidean", "cosine", "dot"}.

    Use `is_similarity(metric)` to know whether larger means closer.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dmljax.distances import pairwise
      >>> x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
      >>> pairwise(x, metric="euclidean").tolist(), pairwise(x, metric="dot").tolist()
      ([[0.0, 5.0], [5.0, 0.0]], [[0.0, 0.0], [0.0, 25.0]])
    """
    check_choice(metric, name="metric", choices=tuple(METRICS))
    return METRICS[metric][0](x, y)
