"""Shared numerics of the pair-based losses and the miners (private; import from here only).

* `masked_logsumexp`: the one masked log-sum-exp. Rule for an empty set: the result is 0
  with a zero gradient (never -inf / NaN); ``include_zero=True`` computes
  ``log(1 + sum_{mask} w exp(v))``, which is 0 on an empty set by itself. Optional
  non-negative ``weights`` give ``log sum_{mask} w exp(v)`` (entries with w = 0 count as masked).
  Masked entries are replaced by a safe value before ``exp`` (double ``where``), so
  inf / NaN in masked entries never reaches the value or the gradient.
* The sorted-prefix-sum hinge kernels: `sort_negatives` + `searchsorted_rows` +
  `window_hinge` (per-anchor triplet hinge sums; used by `dmljax.mining` and the triplet
  losses), `row_hinge_total` / `segment_hinge_total` (hinge sums over rows / segments
  with a counting custom VJP; quadruplet loss). None builds a B x M x M tensor.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "SortedNegatives",
    "class_ids",
    "masked_logsumexp",
    "row_hinge_total",
    "searchsorted_rows",
    "segment_hinge_total",
    "sort_negatives",
    "window_hinge",
]


def masked_logsumexp(values, mask, *, axis=-1, weights=None, include_zero=False):
    """``log sum_{j in mask} w_j exp(values_j)`` along ``axis`` (``log(1 + ...)`` with
    ``include_zero``); an empty set gives 0 with a zero, finite gradient.

    ``weights`` (optional, >= 0, broadcast to ``values``) scale the terms inside the sum;
    entries with weight 0 are left out. The shift (the masked maximum, at least 0 with
    ``include_zero``) carries no gradient.
    """
    values = jnp.asarray(values)
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), values.shape)
    if weights is not None:
        weights = jnp.broadcast_to(jnp.asarray(weights, values.dtype), values.shape)
        mask = mask & (weights > 0)
    any_set = jnp.any(mask, axis=axis, keepdims=True)
    shift = jnp.max(jnp.where(mask, values, -jnp.inf), axis=axis, keepdims=True)
    shift = jnp.where(any_set, shift, 0.0)
    if include_zero:
        shift = jnp.maximum(shift, 0.0)
    shift = jax.lax.stop_gradient(shift)
    terms = jnp.where(mask, jnp.exp(jnp.where(mask, values - shift, 0.0)), 0.0)
    if weights is not None:
        terms = terms * jnp.where(mask, weights, 0.0)
    total = jnp.sum(terms, axis=axis, keepdims=True)
    if include_zero:
        out = jnp.log(total + jnp.exp(-shift)) + shift
    else:
        out = jnp.where(any_set, jnp.log(jnp.where(any_set, total, 1.0)) + shift, 0.0)
    return jnp.squeeze(out, axis=axis)


def class_ids(labels):
    """Dense class ids in [0, B): the index of the first item carrying the same label."""
    return jnp.argmax(labels[:, None] == labels[None, :], axis=1).astype(jnp.int32)


def _order_key(values):
    """Order-preserving integer view of floats: non-negative floats compare like their bit
    patterns, negative ones get their magnitude bits flipped (``_from_order_key`` inverts).

    XLA:CPU sorts a single integer array much faster than floats or several operands (about
    7x for 1M float32), so the hinge sums below sort keys only.
    """
    itype = jnp.int64 if values.dtype == jnp.float64 else jnp.int32
    bits = jax.lax.bitcast_convert_type(values, itype)
    return jnp.where(bits < 0, bits ^ jnp.iinfo(itype).max, bits)


def _from_order_key(keys, dtype):
    bits = jnp.where(keys < 0, keys ^ jnp.iinfo(keys.dtype).max, keys)
    return jax.lax.bitcast_convert_type(bits, dtype)


def _sort_rows(values):
    """``jnp.sort(values, axis=-1)`` through the integer keys (same result, faster on CPU)."""
    return _from_order_key(jax.lax.sort(_order_key(values), dimension=values.ndim - 1), values.dtype)


def _row_search(sorted_rows, values, side):
    return jax.vmap(lambda a, v: jnp.searchsorted(a, v, side=side))(sorted_rows, values)


@jax.custom_vjp
def row_hinge_total(entries, entry_mask, queries, query_mask, center):
    """``sum_r sum_{q in row r} sum_{e in row r} relu(q - e)`` over masked entries / queries [R, M].

    Every row is a segment: its entries are sorted once, each query finds the entries below
    it by binary search and takes their count and (prefix) sum, so the R x M x M comparison
    tensor is never built: O(R M log M) time, O(R M) memory. ``center`` (a constant shift of
    every value, e.g. the mean entry) keeps the float32 prefix sums small; it cancels.
    The gradient is counting: d/dq = #entries below q, d/de = -#queries above e (same row).
    """
    return _row_hinge_forward(entries, entry_mask, queries, query_mask, center)[0]


def _row_hinge_forward(entries, entry_mask, queries, query_mask, center):
    inf = jnp.asarray(jnp.inf, entries.dtype)
    sorted_e = _sort_rows(jnp.where(entry_mask, entries, inf))
    finite = jnp.isfinite(sorted_e)
    prefix = jnp.cumsum(jnp.where(finite, sorted_e - center, 0.0), axis=1)
    prefix = jnp.concatenate([jnp.zeros_like(prefix[:, :1]), prefix], axis=1)
    below = _row_search(sorted_e, queries, "left")  # entries strictly below each query
    sum_below = jnp.take_along_axis(prefix, below, axis=1)
    hinge = below.astype(entries.dtype) * (queries - center) - sum_below
    total = jnp.sum(jnp.where(query_mask, hinge, 0.0))
    return total, below


def _row_hinge_fwd(entries, entry_mask, queries, query_mask, center):
    total, below = _row_hinge_forward(entries, entry_mask, queries, query_mask, center)
    return total, (entries, entry_mask, queries, query_mask, below)


def _row_hinge_bwd(residuals, g):
    entries, entry_mask, queries, query_mask, below = residuals
    sorted_q = _sort_rows(jnp.where(query_mask, queries, jnp.asarray(-jnp.inf, queries.dtype)))
    # left-out queries sit at -inf (before every entry): the count above e is M - #(q <= e)
    above = queries.shape[1] - _row_search(sorted_q, entries, "right")
    d_entries = jnp.where(entry_mask, -g * above.astype(entries.dtype), 0.0)
    d_queries = jnp.where(query_mask, g * below.astype(queries.dtype), 0.0)
    return d_entries, None, d_queries, None, jnp.zeros((), entries.dtype)


row_hinge_total.defvjp(_row_hinge_fwd, _row_hinge_bwd)


def _lex_search(sorted_seg, sorted_val, seg, val, side):
    """Per (seg, val): the number of sorted (segment, value) pairs before it (binary search on
    the lexicographic order; ``side="left"``: pairs < (seg, val), "right": <=)."""
    n = sorted_seg.shape[0]
    lo = jnp.zeros(seg.shape, jnp.int32)
    hi = jnp.full(seg.shape, n, jnp.int32)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        at = jnp.minimum(mid, n - 1)
        s, v = sorted_seg[at], sorted_val[at]
        value_before = v < val if side == "left" else v <= val
        before = (s < seg) | ((s == seg) & value_before)
        open_ = lo < hi
        return jnp.where(open_ & before, mid + 1, lo), jnp.where(open_ & ~before, mid, hi)

    lo, _ = jax.lax.fori_loop(0, max(n, 1).bit_length(), step, (lo, hi))
    return lo


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def segment_hinge_total(entries, entry_seg, queries, query_seg, center, num_segments):
    """``sum_q sum_{e: seg(e) = seg(q)} relu(q - e)`` over flat entries / queries with integer
    segments in [0, num_segments] (``num_segments`` marks entries / queries left out).

    Entries are sorted by (segment, value) once; per query a lexicographic binary search
    gives the count and prefix sum of the entries of its segment below it. O(E log E +
    Q log E) time, O(E + Q) memory; counting gradient as `row_hinge_total` (the queries
    above an entry come from a histogram of the queries' insertion points, so the backward
    pass needs no second sort).
    """
    return _segment_hinge_forward(entries, entry_seg, queries, query_seg, center, num_segments)[0]


def _segment_hinge_forward(entries, entry_seg, queries, query_seg, center, num_segments):
    order = jnp.arange(entries.shape[0], dtype=jnp.int32)
    seg_s, val_s, perm = jax.lax.sort((entry_seg, entries, order), num_keys=2)
    prefix = jnp.cumsum(jnp.where(seg_s < num_segments, val_s - center, 0.0))
    prefix = jnp.concatenate([jnp.zeros_like(prefix[:1]), prefix])
    counts = jax.ops.segment_sum(jnp.ones_like(entry_seg), entry_seg, num_segments=num_segments + 1)
    start = jnp.cumsum(counts) - counts  # first sorted position of every segment
    upto = _lex_search(seg_s, val_s, query_seg, queries, "left")
    q_start = start[query_seg]
    below = upto - q_start
    hinge = below.astype(entries.dtype) * (queries - center) - (prefix[upto] - prefix[q_start])
    total = jnp.sum(jnp.where(query_seg < num_segments, hinge, 0.0))
    return total, (seg_s, perm, upto, below, start, counts)


def _segment_hinge_fwd(entries, entry_seg, queries, query_seg, center, num_segments):
    total, aux = _segment_hinge_forward(entries, entry_seg, queries, query_seg, center, num_segments)
    return total, (entries, query_seg, *aux)


def _segment_hinge_bwd(num_segments, residuals, g):
    entries, query_seg, seg_s, perm, upto, below, start, counts = residuals
    # Queries inserted at sorted position u (u entries before them) are above the entries at
    # positions < u of their segment. Segment c's positions are shifted by c so the insertion
    # point after its last entry does not coincide with the first one of segment c + 1.
    n = entries.shape[0]
    valid_q = query_seg < num_segments
    hist = jnp.zeros(n + num_segments + 2, entries.dtype).at[upto + query_seg].add(valid_q.astype(entries.dtype))
    suffix = jnp.cumsum(hist[::-1])[::-1]  # suffix[t] = queries at shifted positions >= t
    suffix = jnp.concatenate([suffix, jnp.zeros_like(suffix[:1])])
    end = start + counts  # one past the last position of every segment
    shift = seg_s + jnp.arange(n, dtype=seg_s.dtype)
    above_sorted = suffix[shift + 1] - suffix[end[seg_s] + seg_s + 1]
    d_sorted = jnp.where(seg_s < num_segments, -g * above_sorted, 0.0)
    d_entries = jnp.zeros_like(entries).at[perm].set(d_sorted)
    d_queries = jnp.where(valid_q, g * below.astype(entries.dtype), 0.0)
    return d_entries, None, d_queries, None, jnp.zeros((), entries.dtype)


segment_hinge_total.defvjp(_segment_hinge_fwd, _segment_hinge_bwd)



class SortedNegatives(NamedTuple):
    """Each anchor's negatives sorted by distance (non-negatives last, key +inf).

    - keys: [B, M] ascending distances (no gradient), +inf for non-negatives.
    - order: [B, M] int32 column index of each sorted entry.
    - prefix: [B, M + 1] prefix sums of the sorted (centered) negative distances, differentiable;
      ``prefix[a, k]`` = sum of the k closest negatives' ``d - center[a]``.
    - center: [B] per-anchor mean negative distance (no gradient), subtracted before the cumulative
      sum to limit cancellation in float32 (window sums are differences of prefix sums).
    - count: [B] int32 number of negatives.
    """

    keys: jax.Array
    order: jax.Array
    prefix: jax.Array
    center: jax.Array
    count: jax.Array


def sort_negatives(d: jax.Array, negative: jax.Array) -> SortedNegatives:
    """Sort every anchor's negative distances once: O(B M log M) time, O(B M) memory."""
    d_sg = jax.lax.stop_gradient(d)
    keys = jnp.where(negative, d_sg, jnp.inf)
    order = jnp.argsort(keys, axis=1, stable=True).astype(jnp.int32)
    sorted_keys = jnp.take_along_axis(keys, order, axis=1)
    count = jnp.sum(negative, axis=1, dtype=jnp.int32)
    center = jnp.sum(jnp.where(negative, d_sg, 0.0), axis=1) / jnp.maximum(count, 1).astype(d.dtype)
    values = jnp.where(negative, d - center[:, None], 0.0)
    sorted_values = jnp.take_along_axis(values, order, axis=1)
    prefix = jnp.concatenate([jnp.zeros_like(sorted_values[:, :1]), jnp.cumsum(sorted_values, axis=1)], axis=1)
    return SortedNegatives(sorted_keys, order, prefix, center, count)


def searchsorted_rows(sorted_keys: jax.Array, thresholds: jax.Array, *, side: str) -> jax.Array:
    """Per row a: number of keys < t ("left") or <= t ("right") for every t in thresholds[a].

    Uses the default binary-search ("scan") method: O(M log M) per row, never an [M, M]
    comparison matrix (``method="compare_all"`` would be B^3 under the vmap).
    """
    fn = lambda k, t: jnp.searchsorted(k, t, side=side)  # noqa: E731
    return jax.vmap(fn)(sorted_keys, jax.lax.stop_gradient(thresholds)).astype(jnp.int32)


def window_hinge(d_ap_plus_margin: jax.Array, lo: jax.Array, hi: jax.Array, sn: SortedNegatives) -> jax.Array:
    """sum_{j in [lo, hi)} (d_ap + margin - d_{a, sorted j}) for every (a, p), [B, M].

    Equals ``(hi - lo) * (d_ap + margin - center) - (prefix[hi] - prefix[lo])``; both terms are
    differentiable, so the gradient is exact (1 per triplet w.r.t. d_ap, -1 w.r.t. each d_an
    inside the window) wherever no distance sits exactly on a window edge.
    """
    width = jnp.maximum(hi - lo, 0)
    hi = jnp.maximum(hi, lo)
    upper = jnp.take_along_axis(sn.prefix, hi, axis=1)
    lower = jnp.take_along_axis(sn.prefix, lo, axis=1)
    return width.astype(d_ap_plus_margin.dtype) * (d_ap_plus_margin - sn.center[:, None]) - (upper - lower)
