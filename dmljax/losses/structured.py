"""Further loss families of the seed documents: EET, CBML, the Gaussian-mixture
structured loss, and a hybrid pair + proxy combinator.

All functions are pure, take embeddings [B, D] and integer labels [B] (plus learnable
arrays where a term needs them), keep O(B^2) memory, accumulate in >= float32 and
accept an optional ``valid`` [B] mask for padded batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dmljax import distances
from dmljax._numerics import masked_logsumexp
from dmljax._validation import check_choice, check_embeddings, check_labels, check_scalar, check_valid
from dmljax.masks import label_masks
from dmljax.reductions import masked_mean

__all__ = [
    "cbml_loss",
    "combine_losses",
    "eet_loss",
    "gaussian_mixture_structured_loss",
    "hybrid_pair_proxy_loss",
]

_BIG = 1e9  # stands in for +inf in masked minima; never reaches a gradient (double where)


def _prepare(embeddings, labels, valid):
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    return x, labels, valid


def _row_weights(valid, batch, dtype):
    return jnp.ones((batch,), dtype) if valid is None else valid.astype(dtype)


def _check_metric(metric):
    return check_choice(metric, name="metric", choices=("euclidean", "squared_euclidean"))


# --------------------------------------------------------------------------- EET


def _hard_triplets(d, positive, negative):
    """Batch-hard triplet per anchor: (d_ap, d_an, d_pn, has_triplet), all [B]."""
    batch = d.shape[0]
    has = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
    hardest_pos = jnp.argmax(jnp.where(positive, d, -_BIG), axis=1)
    hardest_neg = jnp.argmin(jnp.where(negative, d, _BIG), axis=1)
    pos_onehot = jax.nn.one_hot(hardest_pos, batch, dtype=d.dtype)  # selection by mask product
    neg_onehot = jax.nn.one_hot(hardest_neg, batch, dtype=d.dtype)
    d_ap = jnp.sum(pos_onehot * d, axis=1)
    d_an = jnp.sum(neg_onehot * d, axis=1)
    d_pn = jnp.sum((pos_onehot @ d) * neg_onehot, axis=1)  # d[p*(a), n*(a)]
    return d_ap, d_an, d_pn, has


def _all_triplet_sums(d, positive, negative, margin):
    """Per anchor: (sum of hinges, sum of |d_an - d_pn|, triplet count) over all (p, n).

    A `lax.map` over anchors keeps memory at O(B^2) (one [B, B] slab per anchor).
    """
    dtype = d.dtype

    def one_anchor(args):
        d_a, pos_a, neg_a = args
        mask = (pos_a[:, None] & neg_a[None, :]).astype(dtype)  # [p, n]
        hinge = jax.nn.relu(d_a[:, None] - d_a[None, :] + margin)
        equidistant = jnp.abs(d_a[None, :] - d)  # |d(a, n) - d(p, n)|
        return jnp.sum(mask * hinge), jnp.sum(mask * equidistant), jnp.sum(mask)

    return jax.lax.map(one_anchor, (d, positive, negative))


def _class_min_distances(d, labels, valid):
    """Closest-pair distance between every two classes present in the batch.

    Returns (D [B, B] over dense class slots, present [B] bool). Class slots come from
    ``jnp.unique(labels, size=B)``; D[c1, c2] = min_{i in c1, j in c2} d(i, j) is two
    segment minima, so memory stays O(B^2).
    """
    batch = d.shape[0]
    _, ids = jnp.unique(labels, size=batch, return_inverse=True)
    ids = ids.reshape(-1)
    if valid is not None:
        ids = jnp.where(valid, ids, batch)  # out-of-range ids are dropped by segment_min
    present = jnp.zeros((batch,), bool).at[ids].set(True, mode="drop")
    row_min = jax.ops.segment_min(d.T, ids, num_segments=batch)  # [c, i]: min_{j in c} d(i, j)
    class_d = jax.ops.segment_min(row_min.T, ids, num_segments=batch)  # [c1, c2]
    return class_d, present


def eet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.2,
    equidistant_weight: float = 1.0,
    equidistributed_weight: float = 1.0,
    triplets: str = "hard",
    metric: str = "euclidean",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Equidistant and Equidistributed Triplet-based (EET) loss.

    Reference: Xu, Zhang, Cheng, Chu, "Metric Learning with Equidistant and Equidistributed
    Triplet-based Loss for Product Image Search", WWW 2020 (seed 001). The full paper was
    not available; the terms below are our reading of the seed article and of a published
    summary of the paper's equations (d = euclidean distance, N triplets, M classes in the
    batch)::

      margin constraint    L_MC = 1/N sum_(a,p,n) [d(a,p) - d(a,n) + margin]_+
      equidistant          L_EC = 1/N sum_(a,p,n) |d(a,n) - d(p,n)|
          (a and p, same class, must be equally far from the negative n: pulls p to a)
      equidistributed      L_M  = 1/(M(M-1)) sum_{c != c'} exp(-D(c, c'))
                           L_E  = 1/M sum_c |D_min(c) - D_min(n(c))|
          with D(c, c') = min_{i in c, j in c'} d(i, j) the closest-pair distance of two
          classes, D_min(c) = min_{c' != c} D(c, c') and n(c) the class attaining it: L_M
          maximises the minimum inter-class distances ("maximise the minimum distance",
          the summary's e^{D} is read as e^{-D}, the only sign that maximises D), L_E makes
          the minima equal ("constrain the minimum distances to be equal").

      L = L_MC + equidistant_weight * L_EC + equidistributed_weight * (L_M + L_E).

    The term weights (1.0) and margin (0.2, the FaceNet value for unit-norm embeddings)
    are our defaults: the paper's values were not available.

    Args:
      embeddings: [B, D] float (L2-normalised in the paper's setting).
      labels: [B] int class ids.
      margin: alpha >= 0 of the margin constraint.
      equidistant_weight, equidistributed_weight: >= 0 term weights.
      triplets: "hard" (default; one batch-hard triplet per anchor, hardest positive and
        hardest negative, so N = number of anchors with a triplet, matching the paper's
        sum over a = 1..N) or "all" (every valid triplet; O(B^2) memory, O(B^3) time).
      metric: "euclidean" (default) or "squared_euclidean".
      valid: optional [B] bool mask of real rows.
    Returns:
      scalar loss; 0 with zero gradient for a batch without triplets / a single class.
    """
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(equidistant_weight, name="equidistant_weight", min_value=0.0)
    check_scalar(equidistributed_weight, name="equidistributed_weight", min_value=0.0)
    check_choice(triplets, name="triplets", choices=("hard", "all"))
    _check_metric(metric)
    x, labels, valid = _prepare(embeddings, labels, valid)
    d = distances.pairwise(x, metric=metric)
    positive, negative = label_masks(labels, valid=valid)

    if triplets == "hard":
        d_ap, d_an, d_pn, has = _hard_triplets(d, positive, negative)
        weights = has.astype(d.dtype)
        margin_term = masked_mean(jax.nn.relu(d_ap - d_an + margin), weights)
        equidistant_term = masked_mean(jnp.abs(d_an - d_pn), weights)
    else:
        hinge_sum, equi_sum, count = _all_triplet_sums(d, positive, negative, margin)
        total = jnp.maximum(jnp.sum(count), 1.0)
        margin_term = jnp.sum(hinge_sum) / total
        equidistant_term = jnp.sum(equi_sum) / total

    class_d, present = _class_min_distances(d, labels, valid)
    batch = d.shape[0]
    pair_ok = present[:, None] & present[None, :] & ~jnp.eye(batch, dtype=bool)
    num_classes = jnp.sum(present, dtype=d.dtype)
    safe_d = jnp.where(pair_ok, class_d, 0.0)  # double where: masked slots never see +inf
    spread_term = jnp.sum(jnp.where(pair_ok, jnp.exp(-safe_d), 0.0)) / jnp.maximum(
        num_classes * (num_classes - 1.0), 1.0)
    nearest_class = jnp.argmin(jnp.where(pair_ok, safe_d, _BIG), axis=1)
    nearest_onehot = jax.nn.one_hot(nearest_class, batch, dtype=d.dtype) * pair_ok
    d_min = jnp.sum(nearest_onehot * safe_d, axis=1)  # D_min(c), 0 for absent / lone classes
    has_other = jnp.any(pair_ok, axis=1)
    d_min_of_nearest = nearest_onehot @ d_min  # D_min(n(c))
    equal_term = jnp.sum(jnp.where(has_other, jnp.abs(d_min - d_min_of_nearest), 0.0)) / jnp.maximum(
        num_classes, 1.0)

    return (margin_term + equidistant_weight * equidistant_term
            + equidistributed_weight * (spread_term + equal_term))


# --------------------------------------------------------------------------- CBML


def cbml_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    pos_a: float = 0.5,
    pos_b: float = 0.5,
    neg_a: float = 1.0,
    neg_b: float = 0.01,
    margin: float = 0.1,
    variance_weight: float = 1.0,
    hyper_weight: float = 0.0,
    loss_type: str = "log",
    weight_p: float = 0.25,
    weight_n: float = 0.25,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Contrastive Bayesian metric learning (CBML) loss with the metric variance constraint.

    Reference: Kan, He, Cen, Li, Mladenovic, He, "Contrastive Bayesian Analysis for Deep
    Metric Learning", IEEE TPAMI 2023 (arXiv 2210.04402; seed 003). The paper's text was
    not available here; this follows the authors' released code (github kanshichao/CBML,
    ``cbml_benchmark/losses/cbml.py``), whose defaults are used. With cosine similarities
    ``S`` and, per anchor i::

      P_i = {j: y_j = y_i, S_ij < 1 - 1e-5} (the anchor itself and exact duplicates excluded),
      N_i = {j: y_j != y_i}, both non-empty or the anchor is skipped;
      mined  P'_i = {j in P_i: S_ij - margin < max_N S},  N'_i = {j in N_i: S_ij + margin > min_P S}
      (the code's ``adaptive_neg`` branch; its alternative top-100-negatives branch has a
      data-dependent size and is not offered);
      posterior terms  f_p = 1 + sum_{P'} exp(-(S_ij - pos_a) / pos_b),
                       f_n = 1 + sum_{N'} exp( (S_ij - neg_a) / neg_b),
      pos/neg loss = log f (``loss_type="log"``), sqrt f ("sqrt"), or
        1 + weight_{p,n} * (f - 1) ("constant");
      metric variance  sigma_i = sum_{N_i} (S_ij - mu_i)^2,
        mu_i = (1 - hyper_weight) mean_j S_ij + hyper_weight (min_P S + max_N S) / 2
        (mean over all valid j, the anchor included, as in the code);
      L = 1/B sum_{i active} (pos_i + neg_i + variance_weight * sigma_i).

    The sum is divided by the number of (valid) anchors B, not the number of active
    anchors, as in the released code. ``hyper_weight`` is 0.0 in the released example
    configs (0.1 in its defaults file).

    Args:
      embeddings: [B, D] float (cosine similarity is used, so scale does not matter).
      labels: [B] int class ids.
      pos_a, neg_a: similarity offsets; pos_b, neg_b: > 0 temperatures; margin >= 0;
      variance_weight >= 0; hyper_weight in [0, 1]; loss_type "log" | "sqrt" | "constant";
      weight_p, weight_n >= 0 (only for "constant"); valid: optional [B] mask.
    """
    for name, value in (("pos_b", pos_b), ("neg_b", neg_b)):
        check_scalar(value, name=name, min_value=0.0, min_inclusive=False)
    check_scalar(pos_a, name="pos_a")
    check_scalar(neg_a, name="neg_a")
    check_scalar(margin, name="margin", min_value=0.0)
    check_scalar(variance_weight, name="variance_weight", min_value=0.0)
    check_scalar(hyper_weight, name="hyper_weight", min_value=0.0, max_value=1.0)
    check_scalar(weight_p, name="weight_p", min_value=0.0)
    check_scalar(weight_n, name="weight_n", min_value=0.0)
    check_choice(loss_type, name="loss_type", choices=("log", "sqrt", "constant"))
    x, labels, valid = _prepare(embeddings, labels, valid)
    batch = x.shape[0]
    s = distances.cosine_similarity(x)
    positive, negative = label_masks(labels, valid=valid)
    positive = positive & (s < 1.0 - 1e-5)
    rows = _row_weights(valid, batch, s.dtype)

    has_pos = jnp.any(positive, axis=1)
    has_neg = jnp.any(negative, axis=1)
    min_pos = jnp.min(jnp.where(positive, s, _BIG), axis=1)
    max_neg = jnp.max(jnp.where(negative, s, -_BIG), axis=1)
    min_pos = jnp.where(has_pos, min_pos, 0.0)
    max_neg = jnp.where(has_neg, max_neg, 0.0)
    pos_sel = positive & (s - margin < max_neg[:, None])
    neg_sel = negative & (s + margin > min_pos[:, None])
    active = has_pos & has_neg & jnp.any(pos_sel, axis=1) & jnp.any(neg_sel, axis=1)
    if valid is not None:
        active = active & valid

    pos_logits = -(s - pos_a) / pos_b
    neg_logits = (s - neg_a) / neg_b
    # log(1 + sum exp(z)) over the mined set: logsumexp with an extra zero logit.
    log_fp = masked_logsumexp(pos_logits, pos_sel, axis=1, include_zero=True)
    log_fn = masked_logsumexp(neg_logits, neg_sel, axis=1, include_zero=True)
    if loss_type == "log":
        pos_loss, neg_loss = log_fp, log_fn
    elif loss_type == "sqrt":
        pos_loss, neg_loss = jnp.exp(0.5 * log_fp), jnp.exp(0.5 * log_fn)
    else:
        pos_loss = 1.0 + weight_p * jnp.expm1(log_fp)
        neg_loss = 1.0 + weight_n * jnp.expm1(log_fn)

    col = rows[None, :]
    row_mean = jnp.sum(s * col, axis=1) / jnp.maximum(jnp.sum(col), 1.0)
    mean = (1.0 - hyper_weight) * row_mean + hyper_weight * 0.5 * (min_pos + max_neg)
    variance = jnp.sum(jnp.where(negative, jnp.square(s - mean[:, None]), 0.0), axis=1)

    per_anchor = pos_loss + neg_loss + variance_weight * variance
    total = jnp.sum(jnp.where(active, per_anchor, 0.0))
    return total / jnp.maximum(jnp.sum(rows), 1.0)


# --------------------------------------------------------------------------- Gaussian mixture


def gaussian_mixture_structured_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    sigma: float = 1.0,
    likelihood_weight: float = 0.1,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Structured loss imposing a mixture-of-Gaussians shape on the embedding space.

    Source: seed 003, abstract 7 — Marrero Fernandez, Ren, Jyh et al., "Deep Metric
    Structured Learning for Facial Expression Recognition" (arXiv 2001.06612): "a new loss
    function that imposes Gaussian structures on the output space ... a mixture of
    Gaussians solution space ... mean representatives at the centroids of individual
    classes". The paper's equations were not available; this is our formalisation of
    that description (assumptions stated)::

      * each class c present in the batch is one isotropic Gaussian component
        N(mu_c, sigma^2 I) with equal priors; mu_c is the batch centroid of class c
        (so the class means are the "mean representatives");
      * classification term: the negative log posterior of the true component,
        -log( exp(-|x_i - mu_{y_i}|^2 / 2 sigma^2) / sum_c exp(-|x_i - mu_c|^2 / 2 sigma^2) );
      * likelihood term (keeps each component compact, as in the Gaussian-mixture loss of
        Wan et al., CVPR 2018, whose lambda = 0.1 is our default weight):
        |x_i - mu_{y_i}|^2 / (2 sigma^2);
      * L = mean_i (posterior_i + likelihood_weight * likelihood_i).

    The paper's semi-supervised sub-class discovery is not part of the loss: pass sub-class
    ids (e.g. from k-means on the embeddings) as ``labels`` to model classes within classes.

    Memory O(B^2): the per-sample centroid matrix is (same-label mask / count) @ x and the
    sum over classes is a log-sum-exp over the B columns with weight 1/n_{y_k}, so each
    class counts once without knowing the number of classes.

    Args:
      embeddings: [B, D]; labels: [B] int; sigma > 0: component standard deviation;
      likelihood_weight >= 0; valid: optional [B] mask of real rows.
    """
    check_scalar(sigma, name="sigma", min_value=0.0, min_inclusive=False)
    check_scalar(likelihood_weight, name="likelihood_weight", min_value=0.0)
    x, labels, valid = _prepare(embeddings, labels, valid)
    batch = x.shape[0]
    rows = _row_weights(valid, batch, x.dtype)
    same = (labels[:, None] == labels[None, :]).astype(x.dtype) * rows[None, :] * rows[:, None]
    counts = jnp.sum(same, axis=1)  # n_{y_i} among valid rows (>= 1 for a valid row)
    centroids = (same @ x) / jnp.maximum(counts, 1.0)[:, None]  # mu_{y_k} for every k
    sq = distances.squared_euclidean(x, centroids)  # [i, k] = |x_i - mu_{y_k}|^2
    logits = -sq / (2.0 * sigma**2)
    column_weight = jnp.where(rows > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)  # each class once
    # Padded columns are removed from the normaliser entirely (-inf logit, weight 0).
    masked_logits = jnp.where(column_weight[None, :] > 0, logits, -jnp.inf)
    log_norm = jax.nn.logsumexp(masked_logits, axis=1, b=jnp.broadcast_to(column_weight, logits.shape))
    own = jnp.diagonal(logits)  # mu_{y_i} is column i's own centroid
    posterior = log_norm - own
    likelihood = -own
    per_row = posterior + likelihood_weight * likelihood
    return masked_mean(per_row, rows)


# --------------------------------------------------------------------------- hybrid / combinators

LossTerm = tuple  # (weight, fn) or (weight, fn, num_arrays)


def combine_losses(*terms: LossTerm) -> Callable[..., jax.Array]:
    """Weighted sum of losses as one pure loss ``fn(embeddings, labels, *arrays, valid=None)``.

    Each term is ``(weight, loss_fn)`` or ``(weight, loss_fn, num_arrays)``: ``loss_fn``
    is called as ``loss_fn(embeddings, labels, *its_arrays, valid=valid)`` where
    ``its_arrays`` are the next ``num_arrays`` (default 0) positional arrays after the
    labels, in term order. Configure each loss with ``functools.partial`` beforehand.
    ``valid`` is forwarded only when given. Weights are Python numbers >= 0 (or arrays).

    Example::

        loss = combine_losses((1.0, partial(multi_similarity_loss, alpha=2.0)),
                              (0.5, proxy_anchor_loss, 1))
        value = loss(embeddings, labels, proxies)
    """
    if not terms:
        raise ValueError("terms must contain at least one (weight, loss_fn) pair")
    parsed = []
    for i, term in enumerate(terms):
        if not isinstance(term, tuple) or len(term) not in (2, 3) or not callable(term[1]):
            raise ValueError(f"terms[{i}] must be (weight, loss_fn) or (weight, loss_fn, num_arrays), got {term!r}")
        weight, fn = term[0], term[1]
        num_arrays = term[2] if len(term) == 3 else 0
        check_scalar(weight, name=f"terms[{i}] weight", min_value=0.0)
        if not isinstance(num_arrays, int) or num_arrays < 0:
            raise ValueError(f"terms[{i}] num_arrays must be a non-negative int, got {num_arrays!r}")
        parsed.append((weight, fn, num_arrays))
    needed = sum(n for _, _, n in parsed)

    def combined(embeddings, labels, *arrays, valid=None):
        if len(arrays) != needed:
            raise ValueError(f"arrays: the combined loss needs {needed} learnable arrays, got {len(arrays)}")
        extra = {} if valid is None else {"valid": valid}
        total = 0.0
        offset = 0
        for weight, fn, n in parsed:
            total = total + weight * fn(embeddings, labels, *arrays[offset:offset + n], **extra)
            offset += n
        return total

    return combined


_PAIR_LOSSES = ("multi_similarity", "contrastive")
_PROXY_LOSSES = ("proxy_anchor", "proxy_nca")


def _named_loss(name: str) -> Callable[..., jax.Array]:
    # Imported lazily: these modules are owned by other parts of the library.
    if name == "multi_similarity":
        from dmljax.losses.weighted import multi_similarity_loss
        return multi_similarity_loss
    if name == "contrastive":
        from dmljax.losses.pair import contrastive_loss
        return contrastive_loss
    if name == "proxy_anchor":
        from dmljax.losses.proxy import proxy_anchor_loss
        return proxy_anchor_loss
    from dmljax.losses.proxy import proxy_nca_loss
    return proxy_nca_loss


def hybrid_pair_proxy_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    pair_weight: float = 1.0,
    proxy_weight: float = 1.0,
    pair_loss: str = "multi_similarity",
    proxy_loss: str = "proxy_anchor",
    pair_kwargs: Mapping[str, Any] | None = None,
    proxy_kwargs: Mapping[str, Any] | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Hybrid pair + proxy loss: ``pair_weight * L_pair + proxy_weight * L_proxy``.

    Source: seed 003, abstract 16 (a DML method "integrating pair-based and proxy-based
    loss functions" to get both the rich data-to-data relations of pair losses and the fast
    convergence of proxy losses). The abstract gives neither the component losses nor the
    weights; our defaults are multi-similarity (Wang et al. 2019) + Proxy-Anchor (Kim et
    al. 2020), weights 1 and 1, each with its own paper's defaults.
    (The abstract's global + local features and second-order attention belong to the
    model, not the loss.)

    Args:
      embeddings: [B, D]; labels: [B] int in [0, C); proxies: [C, D] learnable proxies.
      pair_weight, proxy_weight: >= 0.
      pair_loss: "multi_similarity" (`dmljax.losses.weighted.multi_similarity_loss`) or
        "contrastive" (`dmljax.losses.pair.contrastive_loss`).
      proxy_loss: "proxy_anchor" or "proxy_nca" (`dmljax.losses.proxy`).
      pair_kwargs, proxy_kwargs: keyword configuration of each component.
      valid: optional [B] mask forwarded to both.
    For other components use `combine_losses`.
    """
    check_scalar(pair_weight, name="pair_weight", min_value=0.0)
    check_scalar(proxy_weight, name="proxy_weight", min_value=0.0)
    check_choice(pair_loss, name="pair_loss", choices=_PAIR_LOSSES)
    check_choice(proxy_loss, name="proxy_loss", choices=_PROXY_LOSSES)
    extra = {} if valid is None else {"valid": valid}
    pair = _named_loss(pair_loss)(embeddings, labels, **dict(pair_kwargs or {}), **extra)
    proxy = _named_loss(proxy_loss)(embeddings, labels, proxies, **dict(proxy_kwargs or {}), **extra)
    return pair_weight * pair + proxy_weight * proxy
