"""Lifted-structured hard-negative batches for the training loop (a sampler + a before-step hook).

Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted Structured Feature
Embedding", CVPR 2016, Sec. 4: "we sample a few positive pairs at random, and then actively add
their difficult neighbors to the training mini-batch". `LiftedHardNegativeSampler` does this with
a pool of stale embeddings:

* every ``refresh_every`` steps (steps ``refresh_every, 2 refresh_every, ...``; not at step 0,
  where the embeddings are those of the random initialisation) ``before_step`` draws a random
  subset of ``pool_size`` training items (numpy stream of ``(seed, step)``), embeds it with the
  current model in eval mode and stores ``{"indices": int32 [S], "embeddings": float32 [S, D],
  "step": int32 []}`` in ``state.loss_state["lifted_pool"]``. The pool is part of the
  checkpoint, so a resumed run draws exactly the batches of an uninterrupted one;
* ``batch_indices(step)`` = `dmljax.methods.lifted_sampling.lifted_hard_negative_batch` on that
  pool (key ``fold_in(key, step)``): ``num_pairs`` (P) random positive pairs, each followed by its
  ``negatives_per_pair`` (K) pool items of other classes nearest to ``min(d(anchor, .),
  d(positive, .))``, mapped to dataset indices. Batch size P (2 + K), static.

Before the first refresh, the batch is ``base_sampler.batch_indices(step)`` (the class-balanced
P x M batch, which must have the same size); where the pool cannot provide a slot (``ok`` False:
no positive pair, fewer than K other-class items) the slot takes the base batch's item at that
position. Every batch is a pure function of (seed, key, step, the checkpointed pool).

Cost per refresh: one forward pass over S images; per step O(P S D + S log S) (no S x S matrix).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmljax.methods.lifted_sampling import lifted_hard_negative_batch

__all__ = ["LiftedHardNegativeSampler", "POOL_KEY", "init_lifted_pool"]

POOL_KEY = "lifted_pool"
_POOL_TAG = 0x11F7ED  # numpy stream tag of the pool draws


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def init_lifted_pool(pool_size: int, dim: int) -> dict:
    """The empty pool (``step`` -1: not refreshed yet) to put in ``loss_state["lifted_pool"]``:
    ``{"indices": int32 [pool_size], "embeddings": float32 [pool_size, dim], "step": int32 []}``."""
    pool_size = _positive_int(pool_size, "pool_size")
    dim = _positive_int(dim, "dim")
    return {"indices": jnp.zeros((pool_size,), jnp.int32), "embeddings": jnp.zeros((pool_size, dim), jnp.float32),
            "step": jnp.asarray(-1, jnp.int32)}


class LiftedHardNegativeSampler:
    """Hard-negative batches from a periodically re-embedded pool (see the module docstring).

    Args:
      images: host training images [N, ...] (what ``labels`` / the base sampler index).
      labels: int [N] training labels.
      base_sampler: the plain sampler (e.g. `dmljax.data.samplers.MPerClassSampler`) used before
        the first refresh and for slots the pool cannot fill; its ``batch_size`` must equal
        ``num_pairs * (2 + negatives_per_pair)``.
      num_pairs: P random positive pairs per batch.
      negatives_per_pair: K hardest other-class pool items per pair (K <= pool_size).
      pool_size: S items embedded at each refresh (<= N; the trainer caps its option at N).
      refresh_every: steps between refreshes (the trainer's default: one epoch of the base sampler).
      seed: non-negative int of the pool draws. key: PRNG key of the pair draws.
      embed_fn: ``embed_fn(state, images) -> [S, D]`` (default `dmljax.train.step.embed`, batch 512).
      log: optional ``log(step, pool_size)`` called after each refresh.

    Use ``before_step`` as the loop's before-step hook (`dmljax.train.loop.fit`) and the object
    as its sampler: ``batch_indices(step)`` uses the pool of the state last seen by
    ``before_step`` (`batch_for` takes the pool explicitly).
    """

    def __init__(self, images, labels, *, base_sampler, num_pairs: int, negatives_per_pair: int, pool_size: int,
                 refresh_every: int, seed: int, key: jax.Array, embed_fn: Callable | None = None,
                 log: Callable | None = None):
        self.images = images
        self.labels = np.asarray(labels)
        if self.labels.ndim != 1 or len(self.labels) != len(images):
            raise ValueError(f"labels must have shape [{len(images)}] (one per image), got {self.labels.shape}")
        self.num_pairs = _positive_int(num_pairs, "num_pairs")
        self.negatives_per_pair = _positive_int(negatives_per_pair, "negatives_per_pair")
        self.pool_size = _positive_int(pool_size, "pool_size")
        self.refresh_every = _positive_int(refresh_every, "refresh_every")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        n = len(self.labels)
        if self.pool_size > n:
            raise ValueError(f"pool_size must be <= the number of training items {n}, got {self.pool_size}")
        if self.negatives_per_pair > self.pool_size:
            raise ValueError(f"negatives_per_pair must be <= pool_size {self.pool_size}, got {self.negatives_per_pair}")
        if base_sampler.batch_size != self.batch_size:
            raise ValueError(f"num_pairs * (2 + negatives_per_pair) = {self.batch_size} must equal the base "
                             f"sampler's batch size {base_sampler.batch_size}")
        self.base_sampler, self.key = base_sampler, key
        self.embed_fn, self.log = embed_fn, log
        self._select = jax.jit(functools.partial(lifted_hard_negative_batch, num_pairs=self.num_pairs,
                                                 negatives_per_pair=self.negatives_per_pair))
        self._pool: dict | None = None

    @property
    def batch_size(self) -> int:
        return self.num_pairs * (2 + self.negatives_per_pair)

    @property
    def steps_per_epoch(self) -> int:
        return self.base_sampler.steps_per_epoch

    def pool_indices(self, step: int) -> np.ndarray:
        """Sorted int32 [S] dataset indices of the pool refreshed at ``step`` (without replacement)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _POOL_TAG, int(step)])))
        return np.sort(rng.choice(len(self.labels), size=self.pool_size, replace=False)).astype(np.int32)

    def _embed(self, state, images):
        if self.embed_fn is not None:
            return self.embed_fn(state, images)
        from dmljax.train.step import embed
        return embed(state, images, batch_size=512)

    def before_step(self, state):
        """Refresh the pool at steps ``refresh_every * k`` (k >= 1) unless the state already holds
        that step's pool (a resumed run); remember the state's pool for ``batch_indices``."""
        if not isinstance(state.loss_state, dict) or POOL_KEY not in state.loss_state:
            raise ValueError(f"state.loss_state must be a dict with a {POOL_KEY!r} entry (init_lifted_pool)")
        pool = state.loss_state[POOL_KEY]
        if tuple(pool["indices"].shape) != (self.pool_size,):
            raise ValueError(f"state.loss_state[{POOL_KEY!r}] holds {pool['indices'].shape[0]} items, "
                             f"the sampler's pool_size is {self.pool_size}")
        step = int(state.step)
        if step > 0 and step % self.refresh_every == 0 and int(pool["step"]) != step:
            idx = self.pool_indices(step)
            emb = np.asarray(self._embed(state, self.images[idx]), np.float32)
            if emb.shape != tuple(pool["embeddings"].shape):
                raise ValueError(f"embed_fn returned {emb.shape}, the pool holds {tuple(pool['embeddings'].shape)}")
            pool = {"indices": jnp.asarray(idx), "embeddings": jnp.asarray(emb), "step": jnp.asarray(step, jnp.int32)}
            state = state.replace(loss_state={**state.loss_state, POOL_KEY: pool})
            if self.log is not None:
                self.log(step, self.pool_size)
        self._pool = pool
        return state

    def batch_for(self, step: int, pool: dict | None) -> np.ndarray:
        """int64 [P (2 + K)] dataset indices of batch ``step`` drawn from ``pool`` (the base
        sampler's batch when ``pool`` is None or not refreshed yet; per-slot fallback where
        the pool has no pair / too few negatives)."""
        plain = np.asarray(self.base_sampler.batch_indices(step), np.int64)
        if pool is None or int(pool["step"]) < 0:
            return plain
        idx = np.asarray(pool["indices"], np.int64)
        chosen, ok = self._select(jax.random.fold_in(self.key, int(step)), pool["embeddings"],
                                  jnp.asarray(self.labels[idx], jnp.int32))
        return np.where(np.asarray(ok), idx[np.asarray(chosen)], plain).astype(np.int64)

    def batch_indices(self, step: int) -> np.ndarray:
        """`batch_for` with the pool of the state last passed to ``before_step``."""
        return self.batch_for(step, self._pool)
