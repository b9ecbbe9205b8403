"""The plain training loop: sampler -> jitted step -> logging / eval / checkpoints, resumable.

Everything that decides the result is a function of the state: the batch of step ``s`` comes
from ``sampler.batch_indices(state.sampler_step)`` and the step key is ``fold_in(key, step)``, so a run
resumed from a checkpoint replays exactly the batches and augmentations of an uninterrupted run.

Hooks for methods that need the whole training set between steps:

* ``before_step(state) -> state`` runs on the host before every step (it may replace
  ``state.loss_state``, e.g. new k-means cluster ids);
* ``batch_extras(state, indices) -> dict`` adds per-item arrays to the batch (e.g.
  ``{"cluster_ids": ids[indices]}``), which the step passes to ``state.method_fn``.

`KMeansReclustering` is both, for divide and conquer (Sanakoyeu et al. 2019): every ``every``
steps it embeds the whole training set with the current model (eval mode), runs k-means
(`dmljax.methods.divide_conquer.cluster_embeddings`, key ``fold_in(key, step)``) and stores the
cluster id of every training item in ``state.loss_state["clusters"]`` ([N] int32, checkpointed,
so a resumed run continues with the same clusters); each batch then carries its items' ids.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

from dmljax.train.checkpoint import Checkpointer
from dmljax.train.state import TrainState
from dmljax.train.step import train_step

__all__ = ["fit", "KMeansReclustering"]


class KMeansReclustering:
    """Periodic k-means re-clustering of the training embeddings (see the module docstring).

    Args:
      images: host training images [N, ...] (the array the sampler indexes).
      num_clusters: K (= number of learners of divide and conquer).
      every: re-cluster at steps 0, every, 2 every, ... (the paper: every 2 epochs; pass
        ``2 * sampler.steps_per_epoch``).
      key: PRNG key of k-means (folded with the step).
      embed_fn: ``embed_fn(state, images) -> [N, D]`` host embeddings (default
        `dmljax.train.step.embed` with batch 512).
      log: optional ``log(step, sizes)`` called after each re-clustering (cluster sizes [K]).

    ``state.loss_state`` must be a dict; its ``"clusters"`` entry ([N] int32) is (re)written.
    """

    def __init__(self, images, *, num_clusters: int, every: int, key: jax.Array,
                 embed_fn: Callable | None = None, log: Callable | None = None):
        if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
            raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.images, self.num_clusters, self.every, self.key = images, num_clusters, every, key
        self.embed_fn = embed_fn
        self.log = log
        self.ids: np.ndarray | None = None
        self.last_step: int | None = None

    def _embed(self, state):
        if self.embed_fn is not None:
            return self.embed_fn(state, self.images)
        from dmljax.train.step import embed
        return embed(state, self.images, batch_size=512)

    def before_step(self, state: TrainState) -> TrainState:
        step = int(state.step)
        if not isinstance(state.loss_state, dict) or "clusters" not in state.loss_state:
            raise ValueError("state.loss_state must be a dict with a 'clusters' entry [N] for KMeansReclustering")
        if step % self.every == 0 and self.last_step != step:
            from dmljax.methods.divide_conquer import cluster_embeddings
            emb = self._embed(state)
            _, ids = cluster_embeddings(jax.random.fold_in(self.key, step), emb, self.num_clusters)
            ids = np.asarray(ids, np.int32)
            state = state.replace(loss_state={**state.loss_state, "clusters": jax.numpy.asarray(ids)})
            self.ids, self.last_step = ids, step
            if self.log is not None:
                self.log(step, np.bincount(ids, minlength=self.num_clusters))
        elif self.ids is None:  # resumed between two re-clusterings: the checkpointed ids
            self.ids = np.asarray(state.loss_state["clusters"], np.int32)
        return state

    def batch_extras(self, state: TrainState, indices: np.ndarray) -> dict:
        return {"cluster_ids": self.ids[indices]}


def fit(
    state: TrainState,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    sampler: Any,
    num_steps: int,
    key: jax.Array,
    step_fn: Callable | None = None,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    eval_every: int | None = None,
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
    callbacks: Iterable[Callable[[TrainState, dict], None]] = (),
    progress: bool = False,
    log_every: int = 10,
    before_step: Callable[[TrainState], TrainState] | None = None,
    batch_extras: Callable[[TrainState, np.ndarray], dict] | None = None,
    mesh: Any = None,
) -> tuple[TrainState, list[dict]]:
    """Train until ``state.step == num_steps``; returns (final state, list of logged records).

    Args:
      images, labels: host arrays of the training set; ``sampler.batch_indices(step)`` picks a batch (`dmljax.data.samplers.MPerClassSampler`).
      step_fn: ``(state, batch, key) -> (state, metrics)``, default ``jax.jit(train_step)``
        (pass `make_parallel_train_step(mesh)` for data parallelism).
      checkpointer: saves every ``checkpointer.save_every`` steps, at the end, and the best
        state by ``eval_fn``'s metric; with ``resume=True`` the latest checkpoint is loaded first.
      eval_every / eval_fn: evaluation every this many steps and at the end.
      callbacks: called as ``cb(state, record)`` after every step (e.g. to stop a run); a
        callback may add entries to ``record`` (they are logged by the callbacks after it).
      before_step / batch_extras: hooks of the module docstring (e.g. `KMeansReclustering`).
      mesh: the data-parallel mesh over ``jax.devices()`` when several processes take part:
        each process then loads (and ``batch_extras`` sees) only its rows of the global batch
        (``sampler.local_batch_indices``), assembled into global arrays with
        `dmljax.train.distributed.global_batch`; the step key is replicated over the mesh.
        Ignored with one process (the host batch is passed whole, as before).
    """
    from dmljax.train import distributed
    multiprocess = mesh is not None and distributed.is_multiprocess()
    step_fn = jax.jit(train_step) if step_fn is None else step_fn
    if resume and checkpointer is not None:
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            state = restored
    records: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_steps, initial=int(state.step), dynamic_ncols=True, mininterval=1.0)
    # host copies of the two counters: reading them from the device state every step would block
    # until the previous step finished, so host work (sampling, copying the batch, dispatch) could
    # not overlap device compute; a before_step hook may rewrite the state, so re-read after it.
    step, sampler_step = int(state.step), int(state.sampler_step)
    t_last, n_last = time.perf_counter(), step
    while step < num_steps:
        if before_step is not None:
            state = before_step(state)
            step, sampler_step = int(state.step), int(state.sampler_step)
        if multiprocess:
            idx = sampler.local_batch_indices(sampler_step, process_index=jax.process_index(),
                                              process_count=jax.process_count())
        else:
            idx = sampler.batch_indices(sampler_step)
        batch = {"images": images[idx], "labels": labels[idx].astype(np.int32)}
        if batch_extras is not None:
            batch.update(batch_extras(state, idx))
        step_key = jax.random.fold_in(key, step)
        if multiprocess:
            batch = distributed.global_batch(mesh, batch)
            step_key = distributed.replicate(step_key, mesh)
        state, metrics = step_fn(state, batch, step_key)
        step, sampler_step = step + 1, sampler_step + 1
        record = {"step": step}
        if step % log_every == 0 or step == num_steps:
            record.update({k: float(v) for k, v in metrics.items()})
            now = time.perf_counter()
            record["steps_per_s"] = (step - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, step
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is not finite at step {step}: {record}")
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", pos=f"{record['pos_dist']:.2f}",
                                neg=f"{record['neg_dist']:.2f}", act=f"{record['active_fraction']:.2f}",
                                it_s=f"{record['steps_per_s']:.1f}")
        if eval_fn is not None and eval_every and (step % eval_every == 0 or step == num_steps):
            evaluation = eval_fn(state)
            record.update({f"eval/{k}": v for k, v in evaluation.items()})
            if checkpointer is not None:
                checkpointer.save_best(state, evaluation, key=key)
        if checkpointer is not None:
            if step == num_steps:
                checkpointer.save(state, key=key)
            else:
                checkpointer.maybe_save(state, step=step, key=key)
        if len(record) > 1:
            records.append(record)
        if bar is not None:
            bar.update(1)
        for cb in callbacks:
            cb(state, record)
    if bar is not None:
        bar.close()
    if checkpointer is not None:
        checkpointer.wait()
    return state, records
