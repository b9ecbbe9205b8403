"""Orbax checkpoints of a `TrainState`: latest every N steps (+ at the end) and the best one.

Only the dynamic leaves (`TrainState.dynamic`: step, sampler position, params, BN statistics,
optimizer state) are written, as a flat list of arrays; restoring needs a template state of the
same structure (build it exactly as for a fresh run, then `restore_latest`). Two managers live
under ``directory``: ``latest/`` (keeps ``max_to_keep``) and ``best/`` (keeps the single step
with the best eval metric, chosen by orbax's ``best_fn``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dmljax.train.state import TrainState

__all__ = ["Checkpointer"]


def _is_global(x) -> bool:
    """A jax.Array spanning devices of other processes (multi-process run)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


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
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
        self.best_metric = best_metric
        self.best = None
        if best_metric is not None:
            self.best = ocp.CheckpointManager(
                os.path.join(self.directory, "best"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, create=True, best_fn=lambda m: float(m[best_metric]),
                    best_mode=best_mode))

    @staticmethod
    def _leaves(state: TrainState) -> list:
        # global arrays of a multi-process run are saved as jax.Arrays through orbax's
        # multi-process path (every process calls save); host copies otherwise
        return [x if _is_global(x) else np.asarray(x) for x in jax.tree.leaves(state.dynamic())]

    def save(self, state: TrainState, *, force: bool = True) -> None:
        step = int(state.step)
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.StandardSave(self._leaves(state)), force=force)

    def maybe_save(self, state: TrainState, *, step: int | None = None) -> None:
        """Save if the step is a multiple of ``save_every`` (``step``: the host's copy of
        ``state.step``, which spares a device sync)."""
        if (int(state.step) if step is None else step) % self.save_every == 0:
            self.save(state)

    def save_best(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self.best is None or self.best_metric not in metrics:
            return
        self.best.save(int(state.step), args=ocp.args.StandardSave(self._leaves(state)),
                       metrics={k: float(v) for k, v in metrics.items()}, force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def _restore(self, manager, step: int, template: TrainState) -> TrainState:
        dyn = template.dynamic()
        leaves, treedef = jax.tree.flatten(dyn)
        # a global template leaf restores with its sharding (any process count may have saved it)
        target = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if _is_global(x) else np.asarray(x)
                  for x in leaves]
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        new_leaves = [r if _is_global(t) else jax.numpy.asarray(r, dtype=np.asarray(t).dtype)
                      for r, t in zip(restored, leaves)]
        return template.replace_dynamic(jax.tree.unflatten(treedef, new_leaves))

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
