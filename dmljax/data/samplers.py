"""Class-balanced batch samplers (host side, numpy) for deep metric learning.

Pair and proxy losses need several images of each class in every batch (otherwise there are no
positive pairs), so DML trains on "P x M" batches: P classes, M images each (the m-per-class
sampler of FaceNet, Schroff et al. 2015, and PyTorch Metric Learning's ``MPerClassSampler``).

Every sampler here is a **pure function of (seed, step)**: ``sampler.batch_indices(step)``
returns the same indices whenever it is called, in any order, in any process. Resuming a run at
step ``s`` therefore needs only the step counter (already in the train state / checkpoint), and
data-parallel hosts can each compute the global batch and take their own shard.

Epochs. The P classes of a batch are consecutive chunks of a random permutation of all classes,
re-drawn each epoch (``steps_per_epoch = num_classes // P`` batches), so within an epoch every
class appears at most once and all but ``num_classes % P`` classes appear exactly once. Within a
class, M images are drawn without replacement; a class with fewer than M images is sampled
**with replacement** (all of its images first, then random repeats), so batches keep their static
shape [P * M]. Indices are grouped by class: ``[c0 x M, c1 x M, ...]``.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterator

import numpy as np

__all__ = ["MPerClassSampler", "RepeatedCompositionSampler", "HierarchicalSampler"]

# Tags that separate the random streams derived from one seed.
_CLASS_ORDER, _SAMPLES, _REPRESENTATIVES, _SUPER_ORDER, _CLASS_CHOICE = range(5)


def _rng(seed: int, tag: int, counter: int) -> np.random.Generator:
    # SeedSequence of (seed, tag, counter): independent streams, stable across numpy versions.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, tag, counter])))


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _check_int_labels(labels: Any, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must have rank 1 [num_items], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise ValueError(f"{name} must be an integer array of class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _group_by_class(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sorted distinct classes, for each the sorted indices of its items)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
    return classes, np.split(order, bounds)


def _draw(rng: np.random.Generator, members: np.ndarray, count: int) -> np.ndarray:
    """``count`` items of ``members``: without replacement when possible, else all + repeats."""
    if len(members) >= count:
        return rng.choice(members, size=count, replace=False)
    extra = rng.choice(members, size=count - len(members), replace=True)
    return rng.permutation(np.concatenate([members, extra]))


class MPerClassSampler:
    """Batches of ``classes_per_batch`` (P) classes x ``samples_per_class`` (M) items.

    Args:
      labels: int [N] class id of every item of the dataset (any integers, need not be
        contiguous).
      classes_per_batch: P, at most the number of distinct classes.
      samples_per_class: M (>= 2 for pair losses; 1 is allowed for proxy losses).
      seed: non-negative integer; the whole sequence of batches is a function of it.

    ``batch_indices(step)`` -> int64 [P * M] indices into ``labels``. Classes with fewer than M
    items are sampled with replacement (duplicates inside the batch; the loss then sees
    identical embeddings as positives, which every loss of the library handles).

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.samplers import MPerClassSampler
      >>> labels = np.repeat(np.arange(6), 5)  # 6 classes x 5 items
      >>> sampler = MPerClassSampler(labels, classes_per_batch=3, samples_per_class=2, seed=0)
      >>> print(sampler.batch_size, sampler.steps_per_epoch)
      6 2
      >>> batch = sampler.batch_indices(0)
      >>> print(np.unique(labels[batch], return_counts=True)[1])
      [2 2 2]
    """

    def __init__(self, labels: Any, *, classes_per_batch: int, samples_per_class: int, seed: int = 0):
        self.labels = _check_int_labels(labels, "labels")
        self.classes_per_batch = _check_positive_int(classes_per_batch, "classes_per_batch")
        self.samples_per_class = _check_positive_int(samples_per_class, "samples_per_class")
        self.seed = _check_seed(seed)
        self.classes, self._members = _group_by_class(self.labels)
        if self.classes_per_batch > len(self.classes):
            raise ValueError(
                f"classes_per_batch ({self.classes_per_batch}) exceeds the number of classes "
                f"({len(self.classes)})"
            )

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.samples_per_class

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per pass over the classes (each class once per epoch; the remainder waits)."""
        return len(self.classes) // self.classes_per_batch

    def batch_classes(self, step: int) -> np.ndarray:
        """Positions (0..num_classes-1, into ``self.classes``) of the P classes of batch ``step``."""
        return self._classes_of_block(_check_step(step))

    def _classes_of_block(self, block: int) -> np.ndarray:
        # blocks (distinct class sets) per epoch: MPerClassSampler's steps_per_epoch, not a
        # subclass's (RepeatedCompositionSampler's counts each block `repeat` times)
        epoch, position = divmod(block, MPerClassSampler.steps_per_epoch.fget(self))
        order = _rng(self.seed, _CLASS_ORDER, epoch).permutation(len(self.classes))
        return order[position * self.classes_per_batch:(position + 1) * self.classes_per_batch]

    def batch_indices(self, step: int) -> np.ndarray:
        """int64 [P * M] dataset indices of batch ``step``, grouped by class."""
        step = _check_step(step)
        rng = _rng(self.seed, _SAMPLES, step)
        return np.concatenate(
            [_draw(rng, self._members[c], self.samples_per_class) for c in self._classes_of_block(step)]
        ).astype(np.int64)

    def local_batch_indices(self, step: int, *, process_index: int, process_count: int) -> np.ndarray:
        """This process's contiguous share of the global batch ``step`` (multi-host data loading:
        every process computes the same global batch and loads only its rows)."""
        process_count = _check_positive_int(process_count, "process_count")
        if isinstance(process_index, bool) or not isinstance(process_index, numbers.Integral) \
                or not 0 <= process_index < process_count:
            raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index!r}")
        if self.batch_size % process_count:
            raise ValueError(f"process_count ({process_count}) must divide the batch size ({self.batch_size})")
        share = self.batch_size // process_count
        return self.batch_indices(step)[process_index * share:(process_index + 1) * share]

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[np.ndarray]:
        """Yield ``batch_indices(start_step)``, ``batch_indices(start_step + 1)``, ..."""
        step = _check_step(start_step)
        stop = None if num_steps is None else step + num_steps
        while stop is None or step < stop:
            yield self.batch_indices(step)
            step += 1

    def state_dict(self, step: int) -> dict[str, int]:
        """Everything needed to resume at ``step`` (store it in the checkpoint)."""
        return {"seed": self.seed, "step": _check_step(step)}


class RepeatedCompositionSampler(MPerClassSampler):
    """P x M batches whose composition is repeated for ``repeat`` (T) consecutive iterations.

    Can et al., "Deep metric learning with alternating projections onto feasible sets" (ICIP
    2021; seed 003): alternating projections onto per-class feasible sets amount to training on
    batches "constrained to contain the same samples from each class for a certain number of
    iterations"; those samples act as class representatives.

    Steps ``k*T .. k*T + T-1`` share the same P classes and, for each class, the same
    ``representatives_per_class`` (R) items (default R = M: the whole batch is repeated T times).
    With R < M the other M - R items of each class are re-drawn every step. Classes advance one
    chunk per block of T steps, so an epoch lasts ``steps_per_epoch = T * num_classes // P``
    steps. T = 1 with R = M is the plain :class:`MPerClassSampler` order of classes.

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.samplers import RepeatedCompositionSampler
      >>> labels = np.repeat(np.arange(4), 6)
      >>> sampler = RepeatedCompositionSampler(labels, classes_per_batch=2, samples_per_class=3, repeat=2, seed=0)
      >>> bool(np.array_equal(sampler.batch_indices(0), sampler.batch_indices(1)))  # same block of T = 2
      True
      >>> sampler.steps_per_epoch
      4
    """

    def __init__(
        self,
        labels: Any,
        *,
        classes_per_batch: int,
        samples_per_class: int,
        repeat: int,
        representatives_per_class: int | None = None,
        seed: int = 0,
    ):
        super().__init__(
            labels, classes_per_batch=classes_per_batch, samples_per_class=samples_per_class, seed=seed
        )
        self.repeat = _check_positive_int(repeat, "repeat")
        if representatives_per_class is None:
            representatives_per_class = self.samples_per_class
        self.representatives_per_class = _check_positive_int(representatives_per_class, "representatives_per_class")
        if self.representatives_per_class > self.samples_per_class:
            raise ValueError(
                f"representatives_per_class ({representatives_per_class}) exceeds samples_per_class "
                f"({self.samples_per_class})"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.repeat * super().steps_per_epoch

    def batch_classes(self, step: int) -> np.ndarray:
        return self._classes_of_block(_check_step(step) // self.repeat)

    def batch_indices(self, step: int) -> np.ndarray:
        step = _check_step(step)
        block = step // self.repeat
        fixed_rng = _rng(self.seed, _REPRESENTATIVES, block)
        fresh_rng = _rng(self.seed, _SAMPLES, step)
        r, m = self.representatives_per_class, self.samples_per_class
        parts = []
        for c in self._classes_of_block(block):
            members = self._members[c]
            # Draw the block's full M-item composition from the block's stream; the first R are
            # the representatives, the rest are replaced by fresh draws from what remains.
            composition = _draw(fixed_rng, members, m)
            representatives = composition[:r]
            if r < m:
                rest = np.setdiff1d(members, representatives)
                fresh = _draw(fresh_rng, rest if len(rest) else members, m - r)
                parts.append(np.concatenate([representatives, fresh]))
            else:
                parts.append(representatives)
        return np.concatenate(parts).astype(np.int64)


class HierarchicalSampler(MPerClassSampler):
    """Super-class -> class -> item batches (e.g. Stanford Online Products' 12 categories).

    Each batch holds ``super_classes_per_batch`` (S) super-classes, ``classes_per_super_class``
    (P_s) classes of each and M items of each class: batch size S * P_s * M. Hard negatives come
    from the sibling classes of the same super-class (the sampling of e.g. Cakir et al. 2019's
    FastAP and PML's ``HierarchicalSampler``). Super-classes are visited in a permutation that is
    re-drawn each epoch (``num_super_classes // S`` steps); classes inside a super-class are drawn
    without replacement, or with replacement when it has fewer than P_s classes (documented
    duplicates); items per class as in :class:`MPerClassSampler`.

    Args:
      labels: int [N] class ids.
      super_labels: int [N] super-class ids; every class must lie in exactly one super-class.

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.samplers import HierarchicalSampler
      >>> labels = np.repeat(np.arange(8), 3)  # 8 classes x 3 items
      >>> super_labels = labels // 2  # 4 super-classes of 2 classes each
      >>> sampler = HierarchicalSampler(labels, super_labels, super_classes_per_batch=2,
      ...                               classes_per_super_class=2, samples_per_class=2, seed=0)
      >>> batch = sampler.batch_indices(0)
      >>> print(batch.shape, len(np.unique(super_labels[batch])), len(np.unique(labels[batch])))
      (8,) 2 4
    """

    def __init__(
        self,
        labels: Any,
        super_labels: Any,
        *,
        super_classes_per_batch: int,
        classes_per_super_class: int,
        samples_per_class: int,
        seed: int = 0,
    ):
        self.labels = _check_int_labels(labels, "labels")
        self.super_labels = _check_int_labels(super_labels, "super_labels")
        if self.super_labels.shape != self.labels.shape:
            raise ValueError(
                f"super_labels has {self.super_labels.shape[0]} items but labels has {self.labels.shape[0]}"
            )
        self.super_classes_per_batch = _check_positive_int(super_classes_per_batch, "super_classes_per_batch")
        self.classes_per_super_class = _check_positive_int(classes_per_super_class, "classes_per_super_class")
        self.samples_per_class = _check_positive_int(samples_per_class, "samples_per_class")
        self.seed = _check_seed(seed)
        self.classes, self._members = _group_by_class(self.labels)
        super_of_class = [self.super_labels[m] for m in self._members]
        for c, supers in zip(self.classes, super_of_class):
            if len(np.unique(supers)) != 1:
                raise ValueError(f"super_labels must be constant within a class; class {c} has {np.unique(supers)}")
        first_super = np.array([s[0] for s in super_of_class])
        self.super_classes, self._classes_of_super = _group_by_class(first_super)
        if self.super_classes_per_batch > len(self.super_classes):
            raise ValueError(
                f"super_classes_per_batch ({self.super_classes_per_batch}) exceeds the number of "
                f"super-classes ({len(self.super_classes)})"
            )
        self.classes_per_batch = self.super_classes_per_batch * self.classes_per_super_class

    @property
    def steps_per_epoch(self) -> int:
        return len(self.super_classes) // self.super_classes_per_batch

    def _classes_of_block(self, block: int) -> np.ndarray:
        epoch, position = divmod(block, self.steps_per_epoch)
        order = _rng(self.seed, _SUPER_ORDER, epoch).permutation(len(self.super_classes))
        chosen = order[position * self.super_classes_per_batch:(position + 1) * self.super_classes_per_batch]
        rng = _rng(self.seed, _CLASS_CHOICE, block)
        return np.concatenate([_draw(rng, self._classes_of_super[s], self.classes_per_super_class) for s in chosen])
