"""Exact k-nearest-neighbour search on device, blocked so memory never grows like N^2.

Self search (``gallery=None``, the CUB / Cars / SOP protocol): the items are cut
into nb blocks of at most ``block_size`` rows (sizes balanced so the last block is
barely padded) and only the tiles (i, j), j >= i, of the symmetric distance matrix
are computed: tile (i, j) feeds the running top-k of block i through its rows and
of block j through its columns, so each distance is computed once (half the
matmul FLOPs of a query-by-gallery scan). Separate gallery: query blocks of
``block_size`` rows, each a ``lax.scan`` over gallery blocks of
``gallery_block_size`` rows.

Per tile the running top-k is updated exactly with a two-stage top-k (cheaper than
one ``lax.top_k`` over the whole tile row on XLA CPU): the row is cut into
contiguous chunks of 8, the k chunks with the largest maxima are kept and their
entries merged with the running [rows, k] result by one ``lax.top_k``. An entry of
the true top-k always lies in a kept chunk, so the result is exact.
Peak memory is O(tile + N k + (N + M) D), independent of N * M, so 60k x 60k
(Stanford Online Products) runs on a CPU with a few GiB or on one accelerator.

Distances returned (ascending, nearest first)::

  "euclidean": |q - g|;  "squared_euclidean": |q - g|^2;
  "cosine": 1 - cos(q, g) (cosine distance);  "dot": -<q, g>.

Scores are computed as ``|q|^2 + |g|^2 - 2 <q, g>`` (clamped at 0), the usual matmul form.

Tie-breaking is deterministic: among neighbours at exactly the same distance the
lower gallery index comes first (``lax.top_k`` is stable; kept chunks are merged in
ascending index order after the running top-k, and every query block meets the
gallery blocks in ascending order, in the symmetric schedule too).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dmljax._validation import check_choice, check_embeddings
from dmljax.distances import l2_normalize

__all__ = ["KNN_METRICS", "knn", "check_finite"]

KNN_METRICS = ("euclidean", "squared_euclidean", "cosine", "dot")
# contiguous chunk length of the two-stage top-k (CPU-tuned, see experiments/results/performance.md)
_CHUNK = 8


def check_finite(x, *, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if a concrete array holds NaN or inf.

    Traced arrays (inside ``jax.jit``) cannot be inspected and are passed through.

    Examples:
      >>> import numpy as np
      >>> from dmljax.metrics.knn import check_finite
      >>> check_finite(np.ones((2, 3)), name="embeddings")
      >>> try:
      ...     check_finite(np.array([[0.0, np.nan]]), name="embeddings")
      ... except ValueError as e:
      ...     print(str(e).split(":")[0])
      ...
      embeddings contains NaN or inf values
    """
    if isinstance(x, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_positive_int(value, *, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _pad_rows(x: jax.Array, block: int) -> jax.Array:
    n = x.shape[0]
    padded = -(-n // block) * block
    if padded == n:
        return x
    return jnp.concatenate([x, jnp.zeros((padded - n, x.shape[1]), x.dtype)], axis=0)


def _scores(q: jax.Array, q_sq: jax.Array, g: jax.Array, g_sq: jax.Array, metric: str) -> jax.Array:
    """Scores where larger means nearer: -squared distance or the (cosine) dot product."""
    dots = q @ g.T
    if metric in ("euclidean", "squared_euclidean"):
        return -jnp.maximum(q_sq[:, None] + g_sq[None, :] - 2.0 * dots, 0.0)
    return dots


def _num_chunks(width: int, k: int, chunk: int) -> int:
    """Chunks per row for the two-stage top-k, or 0 when the plain top-k is used."""
    if chunk <= 1 or width % chunk or width // chunk <= k:
        return 0
    return width // chunk


def _row_candidates(scores: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Candidates that contain the exact top-k of every row of ``scores`` [R, C].

    Two-stage exact top-k: the row is cut into C / chunk contiguous chunks, the k
    chunks with the largest maxima (ties: lower chunk) are kept and their k * chunk
    entries returned in ascending column order (so a later stable top-k still breaks
    ties by the lower column). Exact: an entry of the true top-k (score descending,
    column ascending) lies in a chunk whose best entry beats the best entry of every
    chunk that was dropped. Returns (candidate scores [R, n], columns int32 [R, n]).
    """
    rows, width = scores.shape
    nc = _num_chunks(width, k, chunk)
    if not nc:
        return scores, jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), scores.shape)
    chunked = scores.reshape(rows, nc, chunk)
    _, best_chunks = lax.top_k(jnp.max(chunked, axis=2), k)
    best_chunks = jnp.sort(best_chunks, axis=1).astype(jnp.int32)
    cand = jnp.take_along_axis(chunked, best_chunks[:, :, None], axis=1).reshape(rows, k * chunk)
    cols = (best_chunks[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)).reshape(rows, k * chunk)
    return cand, cols


def _col_candidates(scores: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """``_row_candidates(scores.T)`` without transposing the whole [R, C] tile."""
    rows, width = scores.shape
    nc = _num_chunks(rows, k, chunk)
    if not nc:
        return scores.T, jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32), (width, rows))
    chunked = scores.reshape(nc, chunk, width)
    _, best_chunks = lax.top_k(jnp.max(chunked, axis=1).T, k)  # [C, k]
    best_chunks = jnp.sort(best_chunks, axis=1).astype(jnp.int32)
    src_rows = (best_chunks[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)).reshape(width, k * chunk)
    cand = scores[src_rows, jnp.arange(width)[:, None]]
    return cand, src_rows


def _merge(best_scores, best_index, cand_scores, cand_index, k):
    """Running top-k merged with candidates of later (higher-index) gallery items.

    ``lax.top_k`` is stable, so with the running results first and the candidates in
    ascending index order, equal scores keep the lower gallery index.
    """
    scores = jnp.concatenate([best_scores, cand_scores], axis=1)
    index = jnp.concatenate([best_index, cand_index], axis=1)
    top_scores, pos = lax.top_k(scores, k)
    return top_scores, jnp.take_along_axis(index, pos, axis=1)


def _init_best(rows: int, k: int, dtype) -> tuple[jax.Array, jax.Array]:
    return jnp.full((rows, k), -jnp.inf, dtype), jnp.full((rows, k), np.iinfo(np.int32).max, jnp.int32)


def _search_query_block(q, q_sq, q_start, g_blocks, g_sq_blocks, *, k, metric, num_gallery, exclude_self,
                        chunk=_CHUNK):
    """Running top-k of one query block over all gallery blocks (a lax.scan)."""
    bq = q.shape[0]
    bg = g_blocks.shape[1]
    q_index = q_start + jnp.arange(bq)

    def step(carry, block):
        g, g_sq, g_start = block
        scores = _scores(q, q_sq, g, g_sq, metric)
        g_index = g_start + jnp.arange(bg)
        invalid = (g_index >= num_gallery)[None, :]
        if exclude_self:
            invalid = invalid | (q_index[:, None] == g_index[None, :])
        scores = jnp.where(invalid, -jnp.inf, scores)
        cand, cols = _row_candidates(scores, k, chunk)
        return _merge(*carry, cand, g_start + cols, k), None

    init = _init_best(bq, k, q.dtype)
    g_starts = (jnp.arange(g_blocks.shape[0]) * bg).astype(jnp.int32)
    (scores, index), _ = lax.scan(step, init, (g_blocks, g_sq_blocks, g_starts))
    return scores, index


@functools.partial(jax.jit, static_argnames=("k", "metric", "num_gallery", "exclude_self"))
def _search_one_block(q, q_sq, q_start, g_blocks, g_sq_blocks, *, k, metric, num_gallery, exclude_self):
    return _search_query_block(q, q_sq, q_start, g_blocks, g_sq_blocks, k=k, metric=metric,
                               num_gallery=num_gallery, exclude_self=exclude_self)


@functools.partial(jax.jit, static_argnames=("k", "metric", "num_gallery", "exclude_self"))
def _search_all_blocks(q_blocks, q_sq_blocks, g_blocks, g_sq_blocks, *, k, metric, num_gallery, exclude_self):
    bq = q_blocks.shape[1]
    q_starts = (jnp.arange(q_blocks.shape[0]) * bq).astype(jnp.int32)

    def one(args):
        q, q_sq, q_start = args
        return _search_query_block(q, q_sq, q_start, g_blocks, g_sq_blocks, k=k, metric=metric,
                                   num_gallery=num_gallery, exclude_self=exclude_self)

    return lax.map(one, (q_blocks, q_sq_blocks, q_starts))


def _self_search_row(i, best_scores, best_index, x_blocks, sq_blocks, *, k, metric, num_items, chunk):
    """Tiles (i, j), j >= i, of the symmetric self-search; updates blocks i and j > i.

    Tile (i, j) gives the candidates of query block i among gallery block j (its rows)
    and, for j > i, those of query block j among gallery block i (its columns), so
    every distance is computed once. Block i's row walks j = i, i+1, ...; its earlier
    gallery blocks 0..i-1 arrived as columns of tiles (i', i) in the rows i' < i before,
    so every block meets the gallery blocks in ascending order, as the stable merge
    needs for lower-index tie-breaking.
    """
    nb, b, _ = x_blocks.shape
    xi = lax.dynamic_index_in_dim(x_blocks, i, keepdims=False)
    sqi = lax.dynamic_index_in_dim(sq_blocks, i, keepdims=False)
    local = jnp.arange(b, dtype=jnp.int32)
    i_index = i * b + local
    i_invalid = i_index >= num_items

    # diagonal tile: rows only, self excluded
    scores = _scores(xi, sqi, xi, sqi, metric)
    scores = jnp.where(i_invalid[None, :] | (local[:, None] == local[None, :]), -jnp.inf, scores)
    cand, cols = _row_candidates(scores, k, chunk)
    row_best = _merge(best_scores[i], best_index[i], cand, i * b + cols, k)

    def body(j, carry):
        row_best, best_scores, best_index = carry
        xj = lax.dynamic_index_in_dim(x_blocks, j, keepdims=False)
        sqj = lax.dynamic_index_in_dim(sq_blocks, j, keepdims=False)
        invalid = i_invalid[:, None] | ((j * b + local) >= num_items)[None, :]
        scores = jnp.where(invalid, -jnp.inf, _scores(xi, sqi, xj, sqj, metric))
        cand, cols = _row_candidates(scores, k, chunk)
        row_best = _merge(*row_best, cand, j * b + cols, k)
        cand_t, rows_t = _col_candidates(scores, k, chunk)
        col_best = _merge(best_scores[j], best_index[j], cand_t, i * b + rows_t, k)
        best_scores = lax.dynamic_update_index_in_dim(best_scores, col_best[0], j, 0)
        best_index = lax.dynamic_update_index_in_dim(best_index, col_best[1], j, 0)
        return row_best, best_scores, best_index

    row_best, best_scores, best_index = lax.fori_loop(i + 1, nb, body, (row_best, best_scores, best_index))
    best_scores = lax.dynamic_update_index_in_dim(best_scores, row_best[0], i, 0)
    best_index = lax.dynamic_update_index_in_dim(best_index, row_best[1], i, 0)
    return best_scores, best_index


_SELF_STATIC = ("k", "metric", "num_items", "chunk")


@functools.partial(jax.jit, static_argnames=_SELF_STATIC, donate_argnums=(1, 2))
def _self_search_one_row(i, best_scores, best_index, x_blocks, sq_blocks, *, k, metric, num_items, chunk=_CHUNK):
    return _self_search_row(i, best_scores, best_index, x_blocks, sq_blocks, k=k, metric=metric,
                            num_items=num_items, chunk=chunk)


@functools.partial(jax.jit, static_argnames=_SELF_STATIC)
def _self_search_all(x_blocks, sq_blocks, *, k, metric, num_items, chunk=_CHUNK):
    nb, b, _ = x_blocks.shape
    best = _init_best(nb * b, k, x_blocks.dtype)
    best = (best[0].reshape(nb, b, k), best[1].reshape(nb, b, k))

    def body(i, carry):
        return _self_search_row(i, *carry, x_blocks, sq_blocks, k=k, metric=metric, num_items=num_items,
                                chunk=chunk)

    return lax.fori_loop(0, nb, body, best)


def _to_distances(scores: jax.Array, metric: str) -> jax.Array:
    if metric == "euclidean":
        return jnp.sqrt(-scores)
    if metric == "squared_euclidean":
        return -scores
    if metric == "cosine":
        return 1.0 - scores
    return -scores


def knn(
    query: jax.Array,
    gallery: jax.Array | None = None,
    *,
    k: int,
    metric: str = "euclidean",
    block_size: int = 1024,
    gallery_block_size: int = 4096,
    exclude_self: bool | None = None,
    progress: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest gallery items of every query, streamed over query and gallery blocks.

    Args:
      query: [N, D] floating embeddings (bf16 is upcast to float32).
      gallery: [M, D] embeddings to search; ``None`` searches the query set itself
        (the usual DML protocol for CUB / Cars / SOP).
      k: number of neighbours, 1 <= k <= M (M - 1 when excluding self).
      metric: "euclidean", "squared_euclidean", "cosine" or "dot" (see module doc
        for the distance each returns).
      block_size: query rows per block (self search: the side of the square tiles);
        gallery_block_size: gallery rows per block (separate gallery only). Block
        sizes are balanced down so the last block is barely padded. Peak memory is
        O(block_size * gallery_block_size + N k) (self search: O(block_size^2 + N k)).
      exclude_self: drop gallery item i from the neighbours of query i. Defaults to
        True without a gallery (query-in-gallery) and False with a separate gallery
        (In-shop protocol); True with a gallery requires M == N (same items, same order).
      progress: show a tqdm bar over query blocks (runs a Python loop of jitted
        block searches instead of one loop on device; the results are identical).

    Returns:
      (indices int32 [N, k], distances [N, k]) sorted nearest first; ties broken by
      the lower gallery index.

    Raises:
      ValueError: bad ranks or dims, k larger than the gallery, non-finite embeddings
        (when concrete), bad block sizes.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from dmljax.metrics.knn import knn
      >>> x = jnp.array([[0.0], [1.0], [3.0], [7.0]])
      >>> indices, dists = knn(x, k=2)
      >>> print(indices)
      [[1 2]
       [0 2]
       [1 0]
       [2 1]]
      >>> print(np.round(np.asarray(dists, dtype=np.float64), 4))
      [[1. 3.]
       [1. 2.]
       [2. 3.]
       [4. 6.]]
    """
    check_choice(metric, name="metric", choices=KNN_METRICS)
    query = check_embeddings(query, name="query")
    self_search = gallery is None
    if self_search:
        gallery = query
    else:
        gallery = check_embeddings(gallery, name="gallery")
        if gallery.shape[1] != query.shape[1]:
            raise ValueError(f"gallery must have feature dim {query.shape[1]} like query, got shape {gallery.shape}")
        dtype = jnp.promote_types(query.dtype, gallery.dtype)
        query, gallery = query.astype(dtype), gallery.astype(dtype)
    if exclude_self is None:
        exclude_self = self_search
    exclude_self = bool(exclude_self)
    n, m = query.shape[0], gallery.shape[0]
    if exclude_self and m != n:
        raise ValueError(f"exclude_self needs query and gallery to be the same items (N == M), got N={n}, M={m}")
    k = _check_positive_int(k, name="k")
    available = m - 1 if exclude_self else m
    if k > available:
        raise ValueError(f"k must be <= the number of candidate gallery items ({available}), got {k}")
    block_size = _check_positive_int(block_size, name="block_size")
    gallery_block_size = _check_positive_int(gallery_block_size, name="gallery_block_size")
    if n == 0:
        raise ValueError("query must contain at least one row")
    check_finite(query, name="query")
    if not self_search:
        check_finite(gallery, name="gallery")

    if metric == "cosine":
        query = l2_normalize(query)
        gallery = query if self_search else l2_normalize(gallery)
    show = progress and not isinstance(query, jax.core.Tracer)
    if self_search:
        scores, index = _self_search(query, k=k, metric=metric, block_size=block_size, progress=show)
    else:
        scores, index = _cross_search(query, gallery, k=k, metric=metric, block_size=block_size,
                                      gallery_block_size=gallery_block_size, exclude_self=exclude_self,
                                      progress=show)
    return index[:n], _to_distances(scores[:n], metric)


def _balanced_block(n: int, block: int, multiple: int = 1) -> int:
    """The smallest block (a multiple of ``multiple``) that covers n rows in ceil(n / block) blocks.

    Spreading the rows evenly keeps the padding of the last block below ``multiple``
    per block instead of up to a whole block.
    """
    blocks = -(-n // block)
    size = -(-n // blocks)
    rounded = -(-size // multiple) * multiple
    return rounded if rounded <= block else size


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        def tqdm(it, **_):
            return it
    return tqdm(range(total), desc="knn", unit="block")


def _self_search(x, *, k, metric, block_size, progress):
    """Query-in-gallery search (self excluded) over the upper triangle of square tiles."""
    n = x.shape[0]
    b = _balanced_block(n, block_size, _CHUNK)
    x_pad = _pad_rows(x, b)
    nb = x_pad.shape[0] // b
    x_blocks = x_pad.reshape(nb, b, x.shape[1])
    sq_blocks = jnp.sum(jnp.square(x_blocks), axis=2)
    static = dict(k=k, metric=metric, num_items=n)
    if progress:
        best = _init_best(nb * b, k, x.dtype)
        best_scores, best_index = best[0].reshape(nb, b, k), best[1].reshape(nb, b, k)
        for i in _progress_bar(nb):
            best_scores, best_index = _self_search_one_row(jnp.int32(i), best_scores, best_index, x_blocks,
                                                           sq_blocks, **static)
    else:
        best_scores, best_index = _self_search_all(x_blocks, sq_blocks, **static)
    return best_scores.reshape(-1, k), best_index.reshape(-1, k)


def _cross_search(query, gallery, *, k, metric, block_size, gallery_block_size, exclude_self, progress):
    """Query blocks against a separate gallery, each a scan over gallery blocks."""
    n, m = query.shape[0], gallery.shape[0]
    bq = _balanced_block(n, block_size)
    bg = _balanced_block(m, gallery_block_size, _CHUNK)
    q_pad = _pad_rows(query, bq)
    g_pad = _pad_rows(gallery, bg)
    q_sq = jnp.sum(jnp.square(q_pad), axis=1)
    g_sq = jnp.sum(jnp.square(g_pad), axis=1)
    g_blocks = g_pad.reshape(-1, bg, g_pad.shape[1])
    g_sq_blocks = g_sq.reshape(-1, bg)
    static = dict(k=k, metric=metric, num_gallery=m, exclude_self=exclude_self)
    num_q_blocks = q_pad.shape[0] // bq
    if progress:
        score_parts, index_parts = [], []
        for b in _progress_bar(num_q_blocks):
            sl = slice(b * bq, (b + 1) * bq)
            s, i = _search_one_block(q_pad[sl], q_sq[sl], jnp.int32(b * bq), g_blocks, g_sq_blocks, **static)
            score_parts.append(s)
            index_parts.append(i)
        return jnp.concatenate(score_parts, axis=0), jnp.concatenate(index_parts, axis=0)
    s, i = _search_all_blocks(q_pad.reshape(num_q_blocks, bq, -1), q_sq.reshape(num_q_blocks, bq),
                              g_blocks, g_sq_blocks, **static)
    return s.reshape(-1, k), i.reshape(-1, k)
