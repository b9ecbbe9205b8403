"""Ranking losses: differentiable surrogates of average precision, precision@k and histograms.

FastAP, Smooth-AP, PNP, surrogate precision@k and the histogram loss all score how
positives are *ranked* among the batch for every anchor (query). Every function is a pure
``loss(embeddings [B, D], labels [B], *, config...) -> scalar`` with an optional ``valid`` [B]
mask (padded rows take part in nothing) and a ``reduction`` over anchors with at least one
positive (anchors without positives, a one-class or one-item batch give 0 with a zero,
finite gradient).

Memory. FastAP and the histogram loss build histograms with a scatter of the B x B pair
matrix (O(B^2 + B * bins)). Smooth-AP compares positive pairs only (a loop over the t-th
positive of every anchor, O(B^2) memory, see `smooth_ap_loss`). PNP and surrogate
precision@k compare, for each
anchor i, every pair (j, k) of other items: the naive tensor is B x B x B. Here the anchors
are processed in blocks of ``anchors_per_step`` with ``lax.map`` over a ``jax.checkpoint``-ed
body, so the live memory of the forward *and* the backward pass is
O(anchors_per_step * B^2) (the backward recomputes each block instead of storing all of
them); time stays O(B^3). The default block holds at most ``ANCHOR_BLOCK_ELEMENTS`` (2^26)
elements and at least one anchor: all anchors at once up to B = 406, one anchor (O(B^2)) from
B = 5793 on; pass ``anchors_per_step=1`` for the strict O(B^2) bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dmljax import distances
from dmljax._validation import check_positive_int, check_choice, check_scalar
from dmljax.losses._core import check_mining
from dmljax.losses.pair import _check_reduction, _prepare
from dmljax.reductions import reduce_loss

__all__ = [
    "PNP_VARIANTS",
    "fastap_loss",
    "histogram_loss",
    "pnp_loss",
    "smooth_ap_loss",
    "surrogate_precision_at_k_loss",
]

PNP_VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")

# elements of one block of B x B anchor comparisons (256 MiB in float32); a sequential map over
# single anchors would cost B tiny steps, which dominates the time on accelerators
ANCHOR_BLOCK_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------- helpers


def _safe_divide(num, den):
    """num / den where den > 0, else 0, with a finite gradient (double ``where``)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _linear_histogram(values, row_ids, weights, *, num_rows: int, low: float, high: float, num_bins: int):
    """Soft histograms with triangular kernels on ``num_bins + 1`` evenly spaced nodes.

    Node r sits at ``low + r * delta`` (``delta = (high - low) / num_bins``); a value between
    nodes r and r + 1 adds ``1 - frac`` to node r and ``frac`` to node r + 1, which equals the
    triangular kernel ``max(0, 1 - |v - node| / delta)`` of FastAP / the histogram loss.
    A scatter (not a [bins, B, B] pulse tensor) keeps the memory O(B^2 + rows * bins).

    values, row_ids, weights: same shape (any); returns [num_rows, num_bins + 1].
    """
    delta = (high - low) / num_bins
    pos = (jnp.clip(values, low, high) - low) / delta
    lower = jnp.clip(jnp.floor(jax.lax.stop_gradient(pos)), 0, num_bins - 1)
    frac = pos - lower
    lower = lower.astype(jnp.int32)
    flat_rows = row_ids.reshape(-1) * (num_bins + 1)
    w = weights.reshape(-1).astype(values.dtype)
    size = num_rows * (num_bins + 1)
    hist = jax.ops.segment_sum(w * (1.0 - frac.reshape(-1)), flat_rows + lower.reshape(-1), num_segments=size)
    hist = hist + jax.ops.segment_sum(w * frac.reshape(-1), flat_rows + lower.reshape(-1) + 1, num_segments=size)
    return hist.reshape(num_rows, num_bins + 1)


def _check_anchors_per_step(anchors_per_step):
    if anchors_per_step is not None:
        check_positive_int(anchors_per_step, name="anchors_per_step")
    return anchors_per_step


def _per_anchor(fn, *arrays, anchors_per_step=None):
    """``lax.map`` of ``fn`` over the leading (anchor) axis in blocks, with a rematerialised body.

    The checkpoint keeps the backward pass from storing one B x B residual per anchor
    (B^3 in total): only the per-anchor inputs are kept and each block is recomputed.
    """
    n = arrays[0].shape[0]
    if anchors_per_step is None:
        anchors_per_step = max(1, ANCHOR_BLOCK_ELEMENTS // max(n * n, 1))
    anchors_per_step = min(int(anchors_per_step), max(n, 1))
    return jax.lax.map(jax.checkpoint(lambda args: fn(*args)), arrays, batch_size=anchors_per_step)


def _anchor_sets(positive, negative, include_query: bool):
    """(positive, retrieval set) bool [B, B] for each anchor row.

    The retrieval set is every valid item but the query; ``include_query`` adds the query
    itself to both sets for anchors that have a positive (the original Smooth-AP / PNP code).
    """
    n = positive.shape[0]
    has_pos = jnp.any(positive, axis=1)
    retrieval = positive | negative
    if include_query:
        self_mask = jnp.eye(n, dtype=bool) & has_pos[:, None]
        positive = positive | self_mask
        retrieval = retrieval | self_mask
    return positive, retrieval, has_pos


# ----------------------------------------------------------------------------- FastAP


def fastap_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    num_bins: int = 10,
    reduction: str = "mean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """FastAP (Cakir, He, Xia, Kulis & Sclaroff, "Deep Metric Learning to Rank", CVPR 2019).

    Embeddings are L2-normalised and compared with the squared euclidean distance
    ``d in [0, 4]``, quantised into ``num_bins`` bins with triangular kernels centred on the
    ``L = num_bins + 1`` nodes ``c_l = 4 l / num_bins`` (paper eq. 10 / PML ``FastAPLoss``).
    For every anchor i with positive set P_i and negative set N_i::

        h+_l = sum_{j in P_i} K(d_ij - c_l),   h-_l = sum_{j in N_i} K(d_ij - c_l)
        H+_l = sum_{l' <= l} h+_l',            H_l = sum_{l' <= l} (h+_l' + h-_l')
        FastAP_i = 1 / |P_i| * sum_l h+_l H+_l / H_l           (terms with H_l = 0 are 0)
        loss_i = 1 - FastAP_i

    reduced over anchors with ``|P_i| > 0`` (``reduction="mean"``, as PML).

    Args:
      embeddings: [B, D] float (normalised inside).
      labels: [B] int class ids.
      num_bins: number of histogram bins (paper and PML default 10).
      reduction: "mean" | "sum" | "mean_nonzero" | "none" (per anchor [B]).
      valid: optional [B] bool mask of real rows.
    """
    check_positive_int(num_bins, name="num_bins")
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    n = x.shape[0]
    d2 = distances.squared_euclidean(distances.l2_normalize(x))
    rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, n))
    h_pos = _linear_histogram(d2, rows, positive, num_rows=n, low=0.0, high=4.0, num_bins=num_bins)
    h_neg = _linear_histogram(d2, rows, negative, num_rows=n, low=0.0, high=4.0, num_bins=num_bins)
    cum_pos = jnp.cumsum(h_pos, axis=1)
    cum_all = jnp.cumsum(h_pos + h_neg, axis=1)
    ap_terms = _safe_divide(h_pos * cum_pos, cum_all)
    num_pos = jnp.sum(positive, axis=1).astype(x.dtype)
    fast_ap = jnp.sum(ap_terms, axis=1) / jnp.maximum(num_pos, 1.0)
    return reduce_loss(1.0 - fast_ap, (num_pos > 0).astype(x.dtype), reduction=reduction)


# ----------------------------------------------------------------------------- Smooth-AP


def smooth_ap_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.01,
    include_query: bool = False,
    reduction: str = "mean",
    valid: jax.Array | None = None,
    anchors_per_step: int | None = None,
) -> jax.Array:
    """Smooth-AP (Brown, Xie, Kalogeiton & Zisserman, ECCV 2020, eq. 6-8).

    With cosine similarities ``s`` and ``sigma_t(x) = sigmoid(x / temperature)``, for every
    anchor (query) i with positives P_i and retrieval set Omega_i (every other valid item)::

        R(k, S) = 1 + sum_{j in S, j != k} sigma_t(s_ij - s_ik)
        AP_i    = 1 / |P_i| * sum_{k in P_i} R(k, P_i) / R(k, Omega_i)
        loss_i  = 1 - AP_i

    reduced over anchors with a positive. ``temperature`` 0.01 is the paper's (and PML's).
    ``include_query=True`` also counts the query as its own positive (in P_i and Omega_i),
    which is what the official code and PML ``SmoothAPLoss`` compute; the default follows the
    paper (the query is not in its own ranking). Unlike PML, any label layout and class sizes
    are accepted (PML needs equal-sized, contiguous classes).

    Only the ranks of positives enter AP, so the (i, k, j) comparisons are made for positive
    pairs (i, k) only: a loop over "positive slots" t (the t-th positive of every anchor at
    once, one B x B pass each) that runs ``max_i |P_i|`` times, with a hand-written backward of
    the same form (``jax.custom_vjp``). Time ``O(B^2 max_i |P_i|)`` instead of O(B^3) (B^2 * 4
    for 4 images per class), memory O(B^2) in the forward and backward pass.

    Args:
      embeddings: [B, D] float. labels: [B] int. valid: optional [B] bool.
      temperature: sigmoid temperature > 0.
      reduction: "mean" | "sum" | "mean_nonzero" | "none".
      anchors_per_step: accepted for compatibility with the other ranking losses and
        validated; not needed (memory is O(B^2) whatever its value).
    """
    check_scalar(temperature, name="temperature", min_value=0.0, min_inclusive=False)
    _check_anchors_per_step(anchors_per_step)
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    sims = distances.cosine_similarity(x)
    positive, retrieval, has_pos = _anchor_sets(positive, negative, include_query)
    ap = _smooth_ap_per_anchor(sims, positive, retrieval, float(temperature))
    return reduce_loss(1.0 - ap, has_pos.astype(x.dtype), reduction=reduction)


def _positive_slots(positive):
    """slot[i, k] = t for the t-th positive k of anchor i (column order), -1 elsewhere;
    and the number of slots, max_i |P_i| (a traced scalar)."""
    slot = jnp.cumsum(positive, axis=1, dtype=jnp.int32) - 1
    return jnp.where(positive, slot, -1), jnp.max(jnp.sum(positive, axis=1, dtype=jnp.int32))


def _slot_sigmoid(sims, hit, temperature):
    """For every anchor i with a t-th positive k (``hit[i, k]``): sigma((s_ij - s_ik) / t) over j
    (0 at j = k), and whether the anchor has that slot."""
    s_k = jnp.sum(jnp.where(hit, sims, 0.0), axis=1)
    sig = jax.nn.sigmoid((sims - s_k[:, None]) / temperature)
    return jnp.where(hit, 0.0, sig), jnp.any(hit, axis=1)


def _smooth_ap_forward(sims, positive, retrieval, temperature):
    slot, num_slots = _positive_slots(positive)
    zeros = jnp.zeros(sims.shape[0], sims.dtype)
    ones = jnp.ones_like(sims)

    def body(carry):
        t, ap_sum, rank_all, rank_pos = carry
        hit = slot == t
        sig, has = _slot_sigmoid(sims, hit, temperature)
        r_all = 1.0 + jnp.sum(jnp.where(retrieval, sig, 0.0), axis=1)
        r_pos = 1.0 + jnp.sum(jnp.where(positive, sig, 0.0), axis=1)
        ap_sum = ap_sum + jnp.where(has, r_pos / r_all, 0.0)
        rank_all = jnp.where(hit, r_all[:, None], rank_all)
        rank_pos = jnp.where(hit, r_pos[:, None], rank_pos)
        return t + 1, ap_sum, rank_all, rank_pos

    _, ap_sum, rank_all, rank_pos = jax.lax.while_loop(
        lambda c: c[0] < num_slots, body, (jnp.int32(0), zeros, ones, ones))
    count = jnp.maximum(jnp.sum(positive, axis=1).astype(sims.dtype), 1.0)
    return ap_sum / count, (sims, positive, retrieval, rank_all, rank_pos, count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _smooth_ap_per_anchor(sims, positive, retrieval, temperature):
    """AP_i of Smooth-AP [B] from similarities [B, B] and the positive / retrieval masks."""
    return _smooth_ap_forward(sims, positive, retrieval, temperature)[0]


def _smooth_ap_fwd(sims, positive, retrieval, temperature):
    return _smooth_ap_forward(sims, positive, retrieval, temperature)


def _smooth_ap_bwd(temperature, residuals, g):
    # AP_i = sum_k R_pos(k) / R_all(k) / |P_i|: dAP/dR_pos = 1 / (|P| R_all),
    # dAP/dR_all = -R_pos / (|P| R_all^2); each R is 1 + sum_j sigma((s_ij - s_ik) / t).
    sims, positive, retrieval, rank_all, rank_pos, count = residuals
    slot, num_slots = _positive_slots(positive)
    scale = (g / count)[:, None]
    g_pos = jnp.where(positive, scale / rank_all, 0.0)
    g_all = jnp.where(positive, -scale * rank_pos / jnp.square(rank_all), 0.0)

    def body(carry):
        t, d_sims = carry
        hit = slot == t
        sig, _ = _slot_sigmoid(sims, hit, temperature)
        g_pos_k = jnp.sum(jnp.where(hit, g_pos, 0.0), axis=1)[:, None]
        g_all_k = jnp.sum(jnp.where(hit, g_all, 0.0), axis=1)[:, None]
        weight = jnp.where(retrieval, g_all_k, 0.0) + jnp.where(positive, g_pos_k, 0.0)
        coef = sig * (1.0 - sig) / temperature * weight  # d/ds_ij; 0 at j = k (sig = 0 there)
        d_sims = d_sims + coef - jnp.where(hit, jnp.sum(coef, axis=1)[:, None], 0.0)
        return t + 1, d_sims

    _, d_sims = jax.lax.while_loop(lambda c: c[0] < num_slots, body, (jnp.int32(0), jnp.zeros_like(sims)))
    return d_sims, None, None


_smooth_ap_per_anchor.defvjp(_smooth_ap_fwd, _smooth_ap_bwd)


# ----------------------------------------------------------------------------- PNP


def pnp_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    variant: str = "Dq",
    b: float = 2.0,
    alpha: float = 1.0,
    anneal: float = 0.01,
    include_query: bool = True,
    reduction: str = "mean",
    valid: jax.Array | None = None,
    anchors_per_step: int | None = None,
) -> jax.Array:
    """Rethinking-the-optimization-of-AP loss, PNP (Li, Wang, Li, Wu & Huang, AAAI 2022).

    For anchor i, positive k in P_i and negatives N_i, with cosine similarities ``s``, the
    smoothed number of negatives ranked before k is
    ``R_k = sum_{j in N_i} sigmoid((s_ij - s_ik) / anneal)``; the loss is
    ``1 / |P_i| sum_{k in P_i} D(R_k)`` with the paper's variants (PML ``PNPLoss``)::

        "O":  D(R) = R                                 (PNP-O, the plain count)
        "Ds": D(R) = log(1 + R)                        (decreasing derivative, PNP-D_s)
        "Dq": D(R) = 1 - 1 / (1 + R) ** alpha          (PNP-D_q, the paper's best; 1 - ... as PML)
        "Iu": D(R) = (1 + R) log(1 + R)                (increasing derivative, PNP-I_u)
        "Ib": D(R) = (b R - log(1 + b R)) / b ** 2     (PNP-I_b)

    reduced over anchors with a positive. Defaults: ``variant="Dq"`` (recommended by the
    paper; PML's default is "O"), ``b=2``, ``alpha=1``, ``anneal=0.01`` (paper / PML).
    ``include_query=True`` (default) counts the anchor itself as a positive of anchors that
    have one, exactly as the official code and PML do (its similarity 1 is ranked first, so it
    adds a near-zero count); set it False to use only the other positives.

    Memory O(anchors_per_step * B^2) (blocks of anchors, see the module docstring), time O(B^3).
    """
    check_choice(variant, name="variant", choices=PNP_VARIANTS)
    check_scalar(b, name="b", min_value=0.0, min_inclusive=False)
    check_scalar(alpha, name="alpha", min_value=0.0, min_inclusive=False)
    check_scalar(anneal, name="anneal", min_value=0.0, min_inclusive=False)
    _check_anchors_per_step(anchors_per_step)
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    sims = distances.cosine_similarity(x)
    positive, _, has_pos = _anchor_sets(positive, negative, include_query)

    def anchor_loss(s_i, pos_i, neg_i):
        # sig[k, j] = sigma((s_ij - s_ik) / anneal) for negatives j of the anchor
        sig = jax.nn.sigmoid((s_i[None, :] - s_i[:, None]) / anneal)
        rank = jnp.sum(jnp.where(neg_i[None, :], sig, 0.0), axis=1)
        if variant == "Ds":
            value = jnp.log1p(rank)
        elif variant == "Dq":
            value = 1.0 - (1.0 + rank) ** (-alpha)
        elif variant == "Iu":
            value = (1.0 + rank) * jnp.log1p(rank)
        elif variant == "Ib":
            value = (b * rank - jnp.log1p(b * rank)) / b**2
        else:
            value = rank
        value = jnp.where(pos_i, value, 0.0)
        return jnp.sum(value) / jnp.maximum(jnp.sum(pos_i).astype(s_i.dtype), 1.0)

    per_anchor = _per_anchor(anchor_loss, sims, positive, negative, anchors_per_step=anchors_per_step)
    return reduce_loss(per_anchor, has_pos.astype(x.dtype), reduction=reduction)


# ----------------------------------------------------------------------------- precision@k


def surrogate_precision_at_k_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    k: int,
    temperature1: float = 1.0,
    temperature2: float = 0.01,
    metric: str = "euclidean",
    reduction: str = "mean",
    valid: jax.Array | None = None,
    anchors_per_step: int | None = None,
) -> jax.Array:
    """Surrogate precision@k (Patel, Tolias & Matas, "Recall@k Surrogate Loss with Large
    Batches and Similarity Mixup", CVPR 2022, eq. 6-9; OML ``SurrogatePrecision``).

    Two step functions of precision@k are replaced by sigmoids. With distances ``d``
    (``metric`` "euclidean" as OML, or "cosine_distance", ``1 - cos``; formerly spelled "cosine"), for anchor
    i, its positives P_i and every other valid item Omega_i::

        R_ij   = 1 + sum_{m in Omega_i, m != j} sigmoid((d_ij - d_im) / temperature2)
        P@k_i  = sum_{j in P_i} sigmoid((k - R_ij) / temperature1) / min(|P_i|, k)
        loss_i = 1 - P@k_i

    reduced over anchors with a positive. Defaults ``temperature1=1``, ``temperature2=0.01``
    are the paper's (and OML's). OML keeps the query in its own ranking and uses ``k + 1``;
    that equals this formula with ``k + 0.5`` in the first sigmoid and the query counted as
    a found positive (``(P@k-hits + 1) / min(|P| + 1, k + 1)``): here the query is excluded,
    as in the paper's definition of precision@k.

    Memory O(anchors_per_step * B^2) (blocks of anchors, see the module docstring), time O(B^3).
    """
    check_positive_int(k, name="k")
    check_scalar(temperature1, name="temperature1", min_value=0.0, min_inclusive=False)
    check_scalar(temperature2, name="temperature2", min_value=0.0, min_inclusive=False)
    check_mining(metric, ("euclidean", "cosine_distance"), name="metric", renames={"cosine": "cosine_distance"})
    _check_anchors_per_step(anchors_per_step)
    _check_reduction(reduction)
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    n = x.shape[0]
    if metric == "euclidean":
        dist = distances.euclidean(x)
    else:
        dist = 1.0 - distances.cosine_similarity(x)
    retrieval = positive | negative
    has_pos = jnp.any(positive, axis=1)
    not_same = ~jnp.eye(n, dtype=bool)

    def anchor_precision(d_i, pos_i, ret_i):
        # sig[j, m] = sigma((d_ij - d_im) / t2): item m is closer to the anchor than j
        sig = jax.nn.sigmoid((d_i[:, None] - d_i[None, :]) / temperature2)
        rank = 1.0 + jnp.sum(jnp.where(ret_i[None, :] & not_same, sig, 0.0), axis=1)
        hits = jnp.where(pos_i, jax.nn.sigmoid((k - rank) / temperature1), 0.0)
        return jnp.sum(hits) / jnp.maximum(jnp.minimum(jnp.sum(pos_i).astype(d_i.dtype), float(k)), 1.0)

    precision = _per_anchor(anchor_precision, dist, positive, retrieval,
                            anchors_per_step=anchors_per_step)
    return reduce_loss(1.0 - precision, has_pos.astype(x.dtype), reduction=reduction)


# ----------------------------------------------------------------------------- histogram


def histogram_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    num_steps: int = 100,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Histogram loss (Ustinova & Lempitsky, "Learning Deep Embeddings with Histogram Loss",
    NIPS 2016, eq. 1-4; PML ``HistogramLoss``).

    Cosine similarities of the unordered pairs {i, j} (i < j) of positives S+ and negatives
    S- are spread over the ``num_steps + 1`` nodes ``t_r = -1 + r * delta``,
    ``delta = 2 / num_steps``, with triangular kernels; then::

        h+_r = 1 / |S+| sum_{(i,j) in S+} max(0, 1 - |s_ij - t_r| / delta)     (h- likewise)
        loss = sum_r h-_r * sum_{q <= r} h+_q

    the probability that a random negative pair is more similar than a random positive one.
    ``num_steps`` is PML's ``n_bins`` (default 100, i.e. PML's ``delta = 0.02``; the paper's
    R = num_steps + 1 nodes). Returns 0 (zero gradient) without positive or negative pairs.
    Unlike PML, which takes pairs from all (a, p, n) triplets, negative pairs between two
    items that both lack a positive still count, as in the paper.
    """
    check_positive_int(num_steps, name="num_steps")
    x, _, valid, positive, negative = _prepare(embeddings, labels, valid)
    n = x.shape[0]
    sims = distances.cosine_similarity(x)
    upper = jnp.triu(jnp.ones((n, n), dtype=bool), k=1)
    pos_pairs = positive & upper
    neg_pairs = negative & upper
    zero_rows = jnp.zeros((n, n), dtype=jnp.int32)
    h_pos = _linear_histogram(sims, zero_rows, pos_pairs, num_rows=1, low=-1.0, high=1.0, num_bins=num_steps)[0]
    h_neg = _linear_histogram(sims, zero_rows, neg_pairs, num_rows=1, low=-1.0, high=1.0, num_bins=num_steps)[0]
    n_pos = jnp.sum(pos_pairs).astype(x.dtype)
    n_neg = jnp.sum(neg_pairs).astype(x.dtype)
    h_pos = h_pos / jnp.maximum(n_pos, 1.0)
    h_neg = h_neg / jnp.maximum(n_neg, 1.0)
    return jnp.sum(h_neg * jnp.cumsum(h_pos))
