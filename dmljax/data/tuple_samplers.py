"""Tuple-based samplers of PyTorch Metric Learning: a fixed set of triplets, and mined-tuple weights.

* `FixedSetOfTriplets` (PML ``samplers.FixedSetOfTriplets``): ``num_triplets`` triplets
  (anchor, positive, negative) are drawn **once** from the labels and are the only supervision
  an experiment sees; every epoch visits them in a new order. Like the samplers of
  `dmljax.data.samplers` it is a pure function of (seed, step): ``batch_indices(step)`` is the
  same in any call order and any process, so resuming needs only the step counter.
* `TuplesToWeightsSampler` (PML ``samplers.TuplesToWeightsSampler``): embed a random subset of
  the dataset, run a miner on it, weight every item by how often it appears in the mined tuples
  (`tuple_weights`, a pure JAX function), then draw the epoch's items with those weights. PML
  does all of this inside ``__iter__`` with a model and a tester; here embedding stays with the
  caller (any model, any device), and the sampler only draws, deterministically from
  (seed, epoch, weights)::

      sampler = TuplesToWeightsSampler(len(labels), subset_size=2048, seed=0)
      rows = sampler.subset_indices(epoch)                    # items to embed
      w = tuple_weights(embed(images[rows]), labels[rows], miner=my_miner, tuples="triplets")
      order = sampler.epoch_indices(epoch, w)                 # [subset_size] dataset indices
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_choice, check_embeddings, check_labels, check_valid
from dmljax.data.samplers import (
    _check_int_labels,
    _check_positive_int,
    _check_seed,
    _check_step,
    _group_by_class,
    _rng,
)

__all__ = ["TUPLE_KINDS", "FixedSetOfTriplets", "TuplesToWeightsSampler", "tuple_counts", "tuple_weights"]

TUPLE_KINDS = ("pairs", "triplets")

# Random-stream tags, distinct from those of dmljax.data.samplers.
_TRIPLETS, _TRIPLET_ORDER, _SUBSET, _DRAW = 101, 102, 103, 104




def _check_epoch(epoch: Any) -> int:
    if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    return int(epoch)


# --------------------------------------------------------------------------- fixed set of triplets


class FixedSetOfTriplets:
    """A fixed list of ``num_triplets`` (anchor, positive, negative) index triplets.

    Drawn once from ``(seed, labels)`` as PML does (Musgrave et al., pytorch-metric-learning): per
    triplet an ordered pair of distinct classes (anchor class, negative class) uniformly among the
    classes, then an anchor and a positive from the anchor class without replacement (the same item
    twice when the class has a single item), and a negative uniformly from the negative class.

    Batches: each epoch visits the triplets in a new random order (PML reshuffles every ``__iter__``);
    a batch holds ``triplets_per_batch`` (T) whole triplets flattened as ``[a0, p0, n0, a1, ...]``
    (PML's flattened order), ``steps_per_epoch = num_triplets // T`` (the last ``num_triplets % T``
    triplets of an epoch's order wait for the next epoch, so every batch has the static size 3T).

    Args:
      labels: int [N] class ids (any integers), at least two distinct classes.
      num_triplets: positive int.
      triplets_per_batch: T, 1 <= T <= num_triplets.
      seed: non-negative int; the triplets and every epoch's order are functions of it.
    Attributes:
      triplets: int64 [num_triplets, 3] dataset indices (a, p, n).

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.tuple_samplers import FixedSetOfTriplets
      >>> labels = np.array([0, 0, 1, 1, 2, 2])
      >>> sampler = FixedSetOfTriplets(labels, num_triplets=10, triplets_per_batch=2, seed=0)
      >>> print(sampler.triplets.shape, sampler.batch_size, sampler.steps_per_epoch)
      (10, 3) 6 5
      >>> a, p, n = labels[sampler.triplets].T
      >>> print(bool(np.all(a == p)), bool(np.all(a != n)))
      True True
    """

    def __init__(self, labels: Any, *, num_triplets: int, triplets_per_batch: int = 1, seed: int = 0):
        self.labels = _check_int_labels(labels, "labels")
        self.num_triplets = _check_positive_int(num_triplets, "num_triplets")
        self.triplets_per_batch = _check_positive_int(triplets_per_batch, "triplets_per_batch")
        if self.triplets_per_batch > self.num_triplets:
            raise ValueError(
                f"triplets_per_batch ({self.triplets_per_batch}) exceeds num_triplets ({self.num_triplets})"
            )
        self.seed = _check_seed(seed)
        self.classes, members = _group_by_class(self.labels)
        if len(self.classes) < 2:
            raise ValueError(f"labels must contain at least two classes for triplets, got {len(self.classes)}")
        self.triplets = _draw_triplets(members, self.num_triplets, _rng(self.seed, _TRIPLETS, 0))

    @property
    def batch_size(self) -> int:
        return 3 * self.triplets_per_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.num_triplets // self.triplets_per_batch

    def batch_triplets(self, step: int) -> np.ndarray:
        """int64 [T, 3] triplets of batch ``step``."""
        epoch, position = divmod(_check_step(step), self.steps_per_epoch)
        order = _rng(self.seed, _TRIPLET_ORDER, epoch).permutation(self.num_triplets)
        t = self.triplets_per_batch
        return self.triplets[order[position * t:(position + 1) * t]]

    def batch_indices(self, step: int) -> np.ndarray:
        """int64 [3T] dataset indices of batch ``step``: ``[a0, p0, n0, a1, p1, n1, ...]``."""
        return self.batch_triplets(step).reshape(-1)

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[np.ndarray]:
        """Yield ``batch_indices(start_step)``, ``batch_indices(start_step + 1)``, ..."""
        step = _check_step(start_step)
        stop = None if num_steps is None else step + _check_step(num_steps)
        while stop is None or step < stop:
            yield self.batch_indices(step)
            step += 1

    def state_dict(self, step: int) -> dict[str, int]:
        """Everything needed to resume at ``step`` (with the same labels and sizes)."""
        return {"seed": self.seed, "step": _check_step(step)}


def _draw_triplets(members: list[np.ndarray], num: int, rng: np.random.Generator) -> np.ndarray:
    """Vectorised PML draw: distinct (anchor class, negative class), distinct a != p when possible."""
    num_classes = len(members)
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    flat = np.concatenate(members).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    anchor_class = rng.integers(num_classes, size=num)
    negative_class = (anchor_class + rng.integers(1, num_classes, size=num)) % num_classes
    n_a = sizes[anchor_class]
    i = rng.integers(0, n_a)
    # j uniform over the other n_a - 1 positions (j = i when the class has one item)
    j = np.where(n_a > 1, (i + rng.integers(1, np.maximum(n_a, 2))) % np.maximum(n_a, 1), i)
    k = rng.integers(0, sizes[negative_class])
    return np.stack(
        [flat[start[anchor_class] + i], flat[start[anchor_class] + j], flat[start[negative_class] + k]], axis=1
    )


# --------------------------------------------------------------------------- mined-tuple weights


def tuple_counts(positive_weights: jax.Array, negative_weights: jax.Array, *, tuples: str = "pairs") -> jax.Array:
    """How often each item appears in the mined tuples, [B], from pair weights [B, B].

    Miners here return pair weights (masks or multiplicities) instead of PML's index tuples:
      "pairs" (PML pair tuples (a1, p, a2, n), e.g. `dmljax.mining.pair_margin`): item i occurs
        in every mined pair (i, .) and (., i): ``rowsum(P) + colsum(P) + rowsum(N) + colsum(N)``.
      "triplets" (PML (a, p, n), e.g. `dmljax.mining.batch_hard`, `mining.extra.angular_miner`:
        ``positive_weights[a, p]`` / ``negative_weights[a, n]`` count the triplets using the pair):
        as anchor ``rowsum(P)``, as positive ``colsum(P)``, as negative ``colsum(N)``.

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.tuple_samplers import tuple_counts
      >>> positive = np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]])  # one triplet (0, 1, 2)
      >>> negative = np.array([[0, 0, 1], [0, 0, 0], [0, 0, 0]])
      >>> print(np.asarray(tuple_counts(positive, negative, tuples="triplets")).astype(int))
      [1 1 1]
    """
    check_choice(tuples, name="tuples", choices=TUPLE_KINDS)
    p = jnp.asarray(positive_weights)
    n = jnp.asarray(negative_weights)
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"positive_weights must be a square [B, B] matrix, got shape {p.shape}")
    if n.shape != p.shape:
        raise ValueError(f"negative_weights must have the shape of positive_weights {p.shape}, got {n.shape}")
    dtype = jnp.result_type(p, n)
    # bool / integer masks: counts in the default float (float64 under x64); floats: >= float32
    dtype = jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)
    p, n = p.astype(dtype), n.astype(dtype)
    counts = jnp.sum(p, axis=1) + jnp.sum(p, axis=0) + jnp.sum(n, axis=0)
    if tuples == "pairs":
        counts = counts + jnp.sum(n, axis=1)
    return counts


def tuple_weights(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    miner: Callable[[jax.Array, jax.Array], Any],
    tuples: str = "pairs",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Per-item sampling weights [B] from a miner: PML ``lmu.convert_to_weights``.

    ``w_i = c_i / max_j c_j`` with c the number of occurrences of item i in the mined tuples
    (`tuple_counts`); items in no tuple weigh 0; when nothing is mined every (valid) item weighs 1
    (PML: "weights + 1"). Padding rows (``valid`` False) weigh 0. No gradient.

    Args:
      embeddings: [B, D] floating; labels: [B] integer class ids.
      miner: ``miner(embeddings, labels)`` -> a pair whose first two entries are the positive and
        negative pair weights [B, B] (`dmljax.mining.extra.PairSelection`, `BatchHard`,
        `AngularMined`, or a ``(positive, negative)`` tuple of masks). It should exclude padding
        itself (build its masks with ``label_masks(labels, valid=valid)``) when ``valid`` is used.
      tuples: "pairs" or "triplets": what the miner's weights count (see `tuple_counts`).
      valid: optional bool [B].
    Returns:
      float [B] weights in [0, 1].

    Examples:
      >>> import jax.numpy as jnp
      >>> from dmljax.data.tuple_samplers import tuple_weights
      >>> from dmljax.masks import label_masks
      >>> def positives_only(x, y):  # a toy miner: every positive pair, no negatives
      ...     positive, negative = label_masks(y)
      ...     return positive, jnp.zeros_like(negative)
      >>> x = jnp.eye(4)
      >>> w = tuple_weights(x, jnp.array([0, 0, 0, 1]), miner=positives_only)
      >>> print([round(float(v), 4) for v in w])
      [1.0, 1.0, 1.0, 0.0]
    """
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    if not callable(miner):
        raise ValueError(f"miner must be callable, got {miner!r}")
    mined = miner(jax.lax.stop_gradient(x), labels)
    try:
        positive_weights, negative_weights = mined[0], mined[1]
    except (TypeError, IndexError) as exc:
        raise ValueError("miner must return (positive_weights, negative_weights, ...) [B, B] pair weights") from exc
    counts = jax.lax.stop_gradient(tuple_counts(positive_weights, negative_weights, tuples=tuples))
    if counts.shape != (x.shape[0],):
        raise ValueError(f"miner must return [B, B] pair weights for B = {x.shape[0]}, got {counts.shape[0]} rows")
    ok = jnp.ones_like(counts, dtype=bool) if valid is None else valid
    counts = jnp.where(ok, counts, 0.0)
    top = jnp.max(counts)
    return jnp.where(top > 0, counts / jnp.maximum(top, 1e-30), ok.astype(counts.dtype))


class TuplesToWeightsSampler:
    """Draw items with replacement, weighted by how often they appear in mined tuples.

    PML ``TuplesToWeightsSampler(model, miner, dataset, subset_size)``: each epoch, embed a random
    subset of ``subset_size`` items (all items when None), mine tuples on it, weight each subset
    item by `tuple_weights` (items outside the subset weigh 0), and yield ``subset_size`` (or
    ``num_items``) indices drawn **with replacement** proportionally to the weights. The embedding
    and mining are the caller's (see the module docstring); draws are a pure function of
    (seed, epoch, weights).

    Args:
      num_items: N, dataset size.
      subset_size: items embedded and drawn per epoch (1 <= S <= N), or None for all N items.
        (PML silently samples the subset with replacement when S > N; here that raises.)
      seed: non-negative int.

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.tuple_samplers import TuplesToWeightsSampler
      >>> sampler = TuplesToWeightsSampler(10, subset_size=4, seed=0)
      >>> subset = sampler.subset_indices(epoch=0)
      >>> drawn = sampler.epoch_indices(0, np.array([1.0, 0.0, 0.0, 0.0]))  # only the first subset item
      >>> print(len(drawn), bool(np.all(drawn == subset[0])))
      4 True
    """

    def __init__(self, num_items: int, *, subset_size: int | None = None, seed: int = 0):
        self.num_items = _check_positive_int(num_items, "num_items")
        if subset_size is not None:
            subset_size = _check_positive_int(subset_size, "subset_size")
            if subset_size > self.num_items:
                raise ValueError(f"subset_size ({subset_size}) exceeds num_items ({self.num_items})")
        self.subset_size = subset_size
        self.seed = _check_seed(seed)

    def __len__(self) -> int:
        return self.subset_size or self.num_items

    def subset_indices(self, epoch: int) -> np.ndarray:
        """int64 [S] dataset indices to embed and mine in ``epoch`` (``arange(N)`` without a subset)."""
        epoch = _check_epoch(epoch)
        if self.subset_size is None:
            return np.arange(self.num_items, dtype=np.int64)
        rng = _rng(self.seed, _SUBSET, epoch)
        return rng.choice(self.num_items, size=self.subset_size, replace=False).astype(np.int64)

    def dataset_weights(self, epoch: int, subset_weights: Any) -> np.ndarray:
        """float64 [N]: ``subset_weights`` [S] scattered onto ``subset_indices(epoch)``, 0 elsewhere."""
        rows = self.subset_indices(epoch)
        w = np.asarray(subset_weights, dtype=np.float64)
        if w.shape != rows.shape:
            raise ValueError(f"subset_weights must have shape {rows.shape}, got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
            raise ValueError("subset_weights must be finite, non-negative and not all zero")
        full = np.zeros(self.num_items, dtype=np.float64)
        full[rows] = w
        return full

    def epoch_indices(self, epoch: int, subset_weights: Any) -> np.ndarray:
        """int64 [len(self)] dataset indices drawn with replacement, P(i) proportional to its weight."""
        full = self.dataset_weights(epoch, subset_weights)
        rng = _rng(self.seed, _DRAW, _check_epoch(epoch))
        return rng.choice(self.num_items, size=len(self), replace=True, p=full / full.sum()).astype(np.int64)

    def state_dict(self, epoch: int) -> dict[str, int]:
        """Seed and epoch; the weights are recomputed from the checkpointed model (or stored)."""
        return {"seed": self.seed, "epoch": _check_epoch(epoch)}
