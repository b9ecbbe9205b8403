"""Orbax checkpoints of a `TrainState`: latest every N steps (+ at the end) and the best one.

A checkpoint is one orbax PyTree of named trees, saved as jax.Arrays: ``step``,
``sampler_step`` (the sampler position), ``params`` (``{"model", "loss"}``), ``batch_stats``,
``opt_state``, ``loss_state`` (when the objective carries one) and ``key`` (the run's PRNG key
data, `jax.random.key_data`, when the loop passes it). Restoring into a `TrainState` needs a
template of the same structure (build it exactly as for a fresh run, e.g. with the library's
builders in your own loop, then `restore_latest`); `restore_trees` returns the named trees
without a template (any orbax reader can too: ``orbax.checkpoint.CheckpointManager(dir /
"latest").restore(step)``). Two managers live under ``directory``: ``latest/`` (keeps
``max_to_keep``) and ``best/`` (keeps the single step with the best eval metric, chosen by
orbax's ``best_fn``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from dmljax.train.state import TrainState

__all__ = ["Checkpointer"]


class Checkpointer:
    """Save / restore `TrainState`s with ``orbax.checkpoint.CheckpointManager``.

    Args:
      directory: root directory (created if missing; must be absolute for orbax, made so).
      save_every: save the latest state every this many steps (`maybe_save`).
      max_to_keep: number of latest checkpoints kept.
      best_metric: name of the eval metric that selects the best checkpoint (higher is better
        unless ``best_mode == "min"``); None disables the best checkpoint.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, max_to_keep: int = 2,
                 best_metric: str | None = "recall@1", best_mode: str = "max"):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.latest = ocp.CheckpointManager(
            os.path.join(self.directory, "latest"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers=ocp.StandardCheckpointHandler())
        self.best_metric = best_metric
        self.best = None
        if best_metric is not None:
            self.best = ocp.CheckpointManager(
                os.path.join(self.directory, "best"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, create=True, best_fn=lambda m: float(m[best_metric]),
                    best_mode=best_mode),
                item_handlers=ocp.StandardCheckpointHandler())

    @staticmethod
    def trees(state: TrainState, key: jax.Array | None = None) -> dict:
        """The named trees of a checkpoint of ``state`` (module docstring)."""
        out = {k: v for k, v in state.dynamic().items() if v is not None}
        if key is not None:
            out["key"] = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
            if jax.process_count() > 1:
                # the state's leaves are replicated global arrays (every process saves them
                # together); the run key is the same host value everywhere
                out["key"] = np.asarray(out["key"])
        return out

    def save(self, state: TrainState, *, key: jax.Array | None = None, force: bool = True) -> None:
        step = int(state.step)
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.StandardSave(self.trees(state, key)), force=force)

    def maybe_save(self, state: TrainState, *, step: int | None = None, key: jax.Array | None = None) -> None:
        """Save if the step is a multiple of ``save_every`` (``step``: the host's copy of
        ``state.step``, which spares a device sync)."""
        if (int(state.step) if step is None else step) % self.save_every == 0:
            self.save(state, key=key)

    def save_best(self, state: TrainState, metrics: dict[str, float], *, key: jax.Array | None = None) -> None:
        if self.best is None or self.best_metric not in metrics:
            return
        self.best.save(int(state.step), args=ocp.args.StandardSave(self.trees(state, key)),
                       metrics={k: float(v) for k, v in metrics.items()}, force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def _restore(self, manager, step: int, template: TrainState) -> TrainState:
        target = self.trees(template)
        saved = manager.item_metadata(step)
        if "key" in saved:
            target["key"] = (np.zeros(saved["key"].shape, saved["key"].dtype) if jax.process_count() > 1 else
                             jax.ShapeDtypeStruct(saved["key"].shape, saved["key"].dtype))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        restored.pop("key", None)
        if jax.process_count() == 1:
            # uncommitted copies: a checkpoint saved with another sharding (e.g. replicated over the
            # devices of a multi-process run) must not pin the state to the device orbax chose
            restored = jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), restored)
        return template.replace_dynamic({**template.dynamic(), **restored})

    def restore_trees(self, step: int | None = None) -> dict | None:
        """The named trees of the latest (or ``step``'s) checkpoint, without a template (nested
        dicts / lists of arrays: NNX and optax containers become plain ones), or None."""
        step = self.latest.latest_step() if step is None else step
        return None if step is None else self.latest.restore(step)

    def restore_latest(self, template: TrainState) -> TrainState | None:
        """The latest saved state (structure from ``template``), or None if nothing is saved."""
        step = self.latest.latest_step()
        return None if step is None else self._restore(self.latest, step, template)

    def restore_best(self, template: TrainState) -> TrainState | None:
        if self.best is None or self.best.best_step() is None:
            return None
        return self._restore(self.best, self.best.best_step(), template)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()
