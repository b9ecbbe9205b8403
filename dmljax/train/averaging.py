"""Weight averaging: an exponential moving average of the model weights and BN statistics.

`WeightAverage(decay)` keeps the average on the side of a step function (``wrap(step_fn)``);
``averaged(state)`` is the state with the averaged model, for evaluation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["WeightAverage"]


@functools.partial(jax.jit, donate_argnums=(0,))
def _ema_update(average, current, decay):
    return jax.tree.map(lambda a, c: a + (1.0 - decay) * (c - a), average, current)


class WeightAverage:
    """Exponential moving average of the model weights and BN statistics (Polyak & Juditsky
    1992; the "EMA model" of e.g. Tan & Le 2019), kept on the side of a step function.

    ``wrap(step_fn)`` returns a step function that updates the average after every step with
    decay ``min(decay, (1 + t) / (10 + t))`` (the usual warm-up, so early averages are not
    dominated by the random initialisation). ``averaged(state)`` is ``state`` with the averaged
    model (for evaluation). The average is not part of the checkpoint: after ``--resume`` it
    restarts from the restored weights.
    """

    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.average = None

    def wrap(self, step_fn):
        def step(state, batch, key):
            if self.average is None:
                self.average = jax.tree.map(jnp.copy, (state.params["model"], state.batch_stats))
            state, metrics = step_fn(state, batch, key)
            t = int(state.step)
            decay = min(self.decay, (1.0 + t) / (10.0 + t))
            self.average = _ema_update(self.average, (state.params["model"], state.batch_stats),
                                       jnp.float32(decay))
            return state, metrics
        return step

    def averaged(self, state):
        if self.average is None:
            return state
        model_params, batch_stats = self.average
        return state.replace(params={**state.params, "model": model_params}, batch_stats=batch_stats)


