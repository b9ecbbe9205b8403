"""Relational knowledge distillation (RKD; Park, Kim, Lu, Cho, CVPR 2019, arXiv 1904.05068).

RKD transfers the *relations* between the items of a batch from a teacher embedding
t [B, Dt] to a student embedding s [B, Ds] (the widths may differ):

Distance-wise (eq. 4-5)::

    psi_D(x_i, x_j) = |x_i - x_j| / mu,   mu = mean_{i != j} |x_i - x_j|
    L_D = mean_{i != j} huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))

Angle-wise (eq. 6-7), vertex j, over all pairwise distinct (i, j, k)::

    psi_A(x_i, x_j, x_k) = <e_ij, e_kj>,   e_ij = (x_i - x_j) / |x_i - x_j|
    L_A = mean_{i, j, k distinct} huber(psi_A(s_i, s_j, s_k) - psi_A(t_i, t_j, t_k))

``huber`` is the Huber loss with delta = 1 (smooth L1), as in the paper. The paper writes
sums over the relation sets; we take means over them (the official code, too, averages, over
all B^2 / B^3 entries including the degenerate ones i = j; we leave those out, so our values are
the official ones times B^2 / (B (B - 1)) resp. B^3 / (B (B - 1) (B - 2))). The teacher is
held fixed (``stop_gradient``). Defaults lambda_D = 1, lambda_A = 2 are the paper's metric
learning settings (Sec. 4.1).

Memory: the angle term has B^3 triplets. `rkd_angle_loss` maps over chunks of ``chunk_size``
vertices with a rematerialised `lax.map`, so the live memory is O(chunk_size * B^2 + B * D)
in the forward and the backward pass (never a B x B x B tensor). `rkd_angle_loss_sampled`
estimates the same mean from ``num_triplets`` uniformly sampled distinct triplets in
O(num_triplets * D) memory.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dmljax import distances
from dmljax._validation import check_embeddings, check_key, check_labels, check_scalar, check_valid
from dmljax.distances import l2_normalize
from dmljax.reductions import masked_mean

__all__ = [
    "huber",
    "rkd_angle_loss",
    "rkd_angle_loss_sampled",
    "rkd_distance_loss",
    "rkd_distillation_loss",
    "sample_distinct_triplets",
]


def huber(x: jax.Array, *, delta: float = 1.0) -> jax.Array:
    """Huber loss ``0.5 x^2`` for ``|x| <= delta``, ``delta (|x| - 0.5 delta)`` beyond (smooth L1 for delta=1)."""
    ax = jnp.abs(x)
    return jnp.where(ax <= delta, 0.5 * jnp.square(x), delta * (ax - 0.5 * delta))


def _prepare(student, teacher, valid):
    s = check_embeddings(student, name="student")
    t = check_embeddings(teacher, name="teacher")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"teacher has batch size {t.shape[0]} but the student has {s.shape[0]}")
    valid = check_valid(valid, batch_size=s.shape[0])
    rows = jnp.ones((s.shape[0],), s.dtype) if valid is None else valid.astype(s.dtype)
    return s, jax.lax.stop_gradient(t).astype(s.dtype), rows


def _normalised_distances(x, pair_weights):
    d = distances.euclidean(x)
    mu = masked_mean(d, pair_weights)
    # mu = 0 only when every item coincides; then every psi is 0 anyway
    return d / jnp.maximum(mu, 1e-12)


def rkd_distance_loss(
    student: jax.Array, teacher: jax.Array, *, delta: float = 1.0, valid: jax.Array | None = None
) -> jax.Array:
    """Distance-wise RKD loss L_D (see the module docstring).

    Args:
      student: [B, Ds] student embeddings (differentiated).
      teacher: [B, Dt] teacher embeddings of the same items (held fixed).
      delta: Huber threshold (paper: 1).
      valid: optional [B] mask of real rows.
    Returns:
      scalar: mean Huber loss over ordered pairs i != j of valid rows (0 for B < 2).
    """
    check_scalar(delta, name="delta", min_value=0.0, min_inclusive=False)
    s, t, rows = _prepare(student, teacher, valid)
    b = s.shape[0]
    pairs = rows[:, None] * rows[None, :] * (1.0 - jnp.eye(b, dtype=s.dtype))
    diff = _normalised_distances(s, pairs) - _normalised_distances(t, pairs)
    return masked_mean(huber(diff, delta=delta), pairs)


def _angles_at_vertices(x, vertices):
    """cos of the angle at each vertex j between x_i and x_k: [V, B, B] for V = len(vertices)."""
    e = l2_normalize(x[None, :, :] - vertices[:, None, :])  # [V, B, D]; e_jj = 0 (finite grad)
    return jnp.einsum("vid,vkd->vik", e, e)


def rkd_angle_loss(
    student: jax.Array,
    teacher: jax.Array,
    *,
    delta: float = 1.0,
    chunk_size: int = 8,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Angle-wise RKD loss L_A over all distinct triplets, chunked over vertices.

    Args:
      student: [B, Ds]; teacher: [B, Dt] (held fixed).
      delta: Huber threshold (paper: 1).
      chunk_size: vertices per step of the `lax.map`; live memory O(chunk_size * B^2).
      valid: optional [B] mask of real rows.
    Returns:
      scalar: mean Huber loss over ordered triplets (i, j, k), pairwise distinct and valid
      (0 for B < 3).
    """
    check_scalar(delta, name="delta", min_value=0.0, min_inclusive=False)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    s, t, rows = _prepare(student, teacher, valid)
    b = s.shape[0]
    idx = jnp.arange(b)

    # remat: the backward pass recomputes each chunk instead of storing its [chunk, B, B] slabs
    @jax.checkpoint
    def per_vertex(args):
        j, s_j, t_j, w_j = args
        diff = _angles_at_vertices(s, s_j[None]) - _angles_at_vertices(t, t_j[None])
        off = (idx[:, None] != j) & (idx[None, :] != j) & (idx[:, None] != idx[None, :])
        w = jnp.where(off, rows[:, None] * rows[None, :], 0.0) * w_j
        h = huber(diff[0], delta=delta)
        return jnp.sum(jnp.where(w > 0, h * w, 0.0)), jnp.sum(w)

    sums, counts = jax.lax.map(per_vertex, (idx, s, t, rows), batch_size=min(chunk_size, b))
    return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)


def sample_distinct_triplets(key: jax.Array, batch: int, num_triplets: int) -> jax.Array:
    """[num_triplets, 3] int32 (i, j, k), uniform over ordered pairwise-distinct triplets.

    j uniform; i = j + a, k = j + b (mod B) with distinct offsets a, b in [1, B). Needs B >= 3.
    """
    check_key(key)
    if batch < 3:
        raise ValueError(f"batch must be >= 3 to sample distinct triplets, got {batch}")
    kj, ka, kc = jax.random.split(key, 3)
    j = jax.random.randint(kj, (num_triplets,), 0, batch)
    a = jax.random.randint(ka, (num_triplets,), 1, batch)
    c = jax.random.randint(kc, (num_triplets,), 1, batch - 1)  # b = a shifted by c inside [1, B)
    bb = 1 + (a - 1 + c) % (batch - 1)
    return jnp.stack([(j + a) % batch, j, (j + bb) % batch], axis=1).astype(jnp.int32)


def _angle(x, tri):
    xi, xj, xk = x[tri[:, 0]], x[tri[:, 1]], x[tri[:, 2]]
    return jnp.sum(l2_normalize(xi - xj) * l2_normalize(xk - xj), axis=1)


def rkd_angle_loss_sampled(
    key: jax.Array,
    student: jax.Array,
    teacher: jax.Array,
    *,
    num_triplets: int = 4096,
    delta: float = 1.0,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Unbiased Monte-Carlo estimate of `rkd_angle_loss` from ``num_triplets`` sampled triplets.

    Triplets are drawn uniformly (with replacement) among pairwise-distinct ones
    (`sample_distinct_triplets`); triplets touching a padded row get weight 0 and the mean
    is over the remaining ones. Memory O(num_triplets * D). Returns 0 for B < 3.
    """
    check_key(key)
    check_scalar(delta, name="delta", min_value=0.0, min_inclusive=False)
    if not isinstance(num_triplets, int) or isinstance(num_triplets, bool) or num_triplets < 1:
        raise ValueError(f"num_triplets must be a positive int, got {num_triplets!r}")
    s, t, rows = _prepare(student, teacher, valid)
    if s.shape[0] < 3:
        return jnp.sum(s) * 0.0
    tri = sample_distinct_triplets(key, s.shape[0], num_triplets)
    w = rows[tri[:, 0]] * rows[tri[:, 1]] * rows[tri[:, 2]]
    return masked_mean(huber(_angle(s, tri) - _angle(t, tri), delta=delta), w)


def rkd_distillation_loss(
    student: jax.Array,
    teacher: jax.Array,
    labels: jax.Array | None = None,
    *,
    base_loss: Callable[..., jax.Array] | None = None,
    base_weight: float = 1.0,
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
    chunk_size: int = 8,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Teacher-student objective ``base_weight * L_base(s) + lambda_D L_D + lambda_A L_A``.

    Args:
      student: [B, Ds] student embeddings of the batch (trained).
      teacher: [B, Dt] embeddings of the same batch from the frozen teacher.
      labels: [B] int class ids, needed when ``base_loss`` is given.
      base_loss: optional metric loss ``fn(embeddings, labels, valid=...)`` (configure it with
        `functools.partial`), e.g. a triplet loss; None trains with RKD alone (the paper's
        "RKD-DA" student).
      distance_weight, angle_weight: lambda_D = 1 and lambda_A = 2 (paper, Sec. 4.1).
      chunk_size: vertices per chunk of the angle term (memory O(chunk_size * B^2)).
      valid: optional [B] mask.
    """
    for name, w in (("base_weight", base_weight), ("distance_weight", distance_weight),
                    ("angle_weight", angle_weight)):
        check_scalar(w, name=name, min_value=0.0)
    total = distance_weight * rkd_distance_loss(student, teacher, valid=valid)
    total = total + angle_weight * rkd_angle_loss(student, teacher, chunk_size=chunk_size, valid=valid)
    if base_loss is not None:
        if labels is None:
            raise ValueError("labels are required when base_loss is given")
        check_labels(labels, batch_size=jnp.shape(student)[0])
        extra = {} if valid is None else {"valid": valid}
        total = total + base_weight * base_loss(student, labels, **extra)
    return total
