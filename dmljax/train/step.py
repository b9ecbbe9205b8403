"""The pure DML train step, single-device and data-parallel (``jax.shard_map`` over "data").

``train_step(state, batch, key) -> (state, metrics)``:

1. (optional) on-device augmentation ``state.augment_fn(images, key)``;
2. forward pass of the NNX model rebuilt from ``state`` (BN in train mode unless frozen);
3. ``loss = state.loss_fn(embeddings, labels, *state.params["loss"])`` - any loss of the
   library: pair/tuple losses take no extra arrays, proxy losses take ``(proxies,)`` which
   are trained alongside the network;
   or, with a stateful objective (``state.method_fn``, see `dmljax.train.state`)::

       loss, new_loss_state = state.method_fn(state.params["loss"], state.loss_state, embeddings,
                                              labels, loss_key, state.step, **extras)

   ``loss_key = fold_in(key, LOSS_KEY_TAG)`` (the same on every device); ``extras`` are the
   batch entries other than images / labels (e.g. ``cluster_ids`` [B] of divide and conquer),
   gathered like the labels, plus ``teacher_embeddings`` [B, Dt] (``stop_gradient``, eval mode)
   when the state has a teacher. ``new_loss_state`` is stored in the new state;
4. gradient w.r.t. ``{"model": params, "loss": loss_params}``, one optax update.

Data parallelism (`make_parallel_train_step`) follows /work/shared/DESIGN.md: each device
embeds its shard, embeddings and labels are ``all_gather(tiled=True)``-ed so mining and the
loss see the **global** batch, and the loss is divided by the number of devices because
``jax.grad`` w.r.t. replicated (invariant) parameters inside shard_map already sums the
per-device contributions (the transpose of all_gather is a reduce-scatter, so each device
receives the exact global-batch gradient of its own embeddings). BatchNorm is synchronised
across devices by default (batch statistics ``pmean``-ed over "data"), so the result equals
single-device training on the same global batch; running statistics are ``pmean``-ed too.
A stateful objective runs on the global batch with the same key on every device, so every
device computes the same new ``loss_state`` (it stays replicated; ``pmax`` over identical
copies only makes it replicated-typed for ``out_specs``).

Metrics (global batch): ``loss``, ``pos_dist`` / ``neg_dist`` (mean euclidean distance of
positive / negative pairs), ``active_fraction`` (fraction of embeddings that receive a non-zero
loss gradient), ``hard_negative_fraction`` (fraction of negative pairs closer than the farthest
positive of their anchor). A loss stuck at its margin with ``pos_dist ~ neg_dist`` or
``active_fraction`` falling to 0 flags collapsed embeddings (DESIGN.md pitfalls).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from dmljax import distances
from dmljax.masks import label_masks
from dmljax.reductions import masked_mean
from dmljax.train.state import TrainState, merge_model, merge_teacher

__all__ = ["train_step", "make_parallel_train_step", "embedding_metrics", "embed", "data_mesh"]

_GRAD_EPS = 1e-12
LOSS_KEY_TAG = 2**31 - 1  # loss_key = fold_in(key, LOSS_KEY_TAG): never a device index of the augmentation keys


def embedding_metrics(embeddings: jax.Array, labels: jax.Array, embedding_grad: jax.Array) -> dict:
    """Collapse-detection statistics of a batch (see module docstring). All O(B^2)."""
    dist = distances.euclidean(jax.lax.stop_gradient(embeddings))
    pos, neg = label_masks(labels)
    farthest_pos = jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1, keepdims=True)
    hard = neg & (dist < farthest_pos)
    grad_norm = jnp.sqrt(jnp.sum(jnp.square(embedding_grad), axis=1))
    return {
        "pos_dist": masked_mean(dist, pos),
        "neg_dist": masked_mean(dist, neg),
        "hard_negative_fraction": jnp.sum(hard) / jnp.maximum(jnp.sum(neg), 1),
        "active_fraction": jnp.mean((grad_norm > _GRAD_EPS).astype(jnp.float32)),
    }


def _check_batch(batch: Any, *, stateful: bool) -> tuple[jax.Array, jax.Array, dict]:
    if not isinstance(batch, dict) or "images" not in batch or "labels" not in batch:
        raise ValueError("batch must be a dict with 'images' [B, H, W, C] and 'labels' [B]")
    images, labels = batch["images"], batch["labels"]
    if np.ndim(images) != 4:
        raise ValueError(f"batch['images'] must have rank 4 [B, H, W, C], got {np.shape(images)}")
    if np.shape(labels) != np.shape(images)[:1]:
        raise ValueError(f"batch['labels'] must have shape ({np.shape(images)[0]},), got {np.shape(labels)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"batch['labels'] must be integer class ids, got {jnp.result_type(labels)}")
    extras = {k: v for k, v in batch.items() if k not in ("images", "labels")}
    if extras and not stateful:
        raise ValueError(f"batch has entries {sorted(extras)} beyond images / labels; only a state "
                         "with a method_fn receives them")
    for k, v in extras.items():
        if np.shape(v)[:1] != np.shape(images)[:1]:
            raise ValueError(f"batch[{k!r}] must have leading dimension {np.shape(images)[0]}, got {np.shape(v)}")
    return images, labels, extras


def _replicated(tree, axis_name):
    """Identical per-device values -> replicated-typed ones (``pmax`` is exact on equal copies)."""
    def one(x):
        if x.dtype == jnp.bool_:
            return jax.lax.pmax(x.astype(jnp.int32), axis_name).astype(jnp.bool_)
        return jax.lax.pmax(x, axis_name)
    return jax.tree.map(one, tree)


def _step(state: TrainState, batch: dict, key: jax.Array, *, axis_name: str | None,
          sync_batch_norm: bool) -> tuple[TrainState, dict]:
    stateful = state.method_fn is not None
    images, labels, extras = _check_batch(batch, stateful=stateful)
    if state.augment_fn is not None:
        aug_key = key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        images = state.augment_fn(images, aug_key)
    num_devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)

    def gather(x):
        return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)

    all_labels = gather(labels)
    if stateful:
        loss_key = jax.random.fold_in(key, LOSS_KEY_TAG)
        extras = {k: gather(v) for k, v in extras.items()}
        teacher = merge_teacher(state)
        if teacher is not None:
            extras["teacher_embeddings"] = jax.lax.stop_gradient(gather(teacher(images)))

        def loss_of(loss_params, emb):
            return state.method_fn(loss_params, state.loss_state, emb, all_labels, loss_key, state.step, **extras)
    else:
        def loss_of(loss_params, emb):
            return state.loss_fn(emb, all_labels, *loss_params), None

    def forward(model_params):
        model = merge_model(state, model_params, train=True,
                            batch_norm_axis_name=axis_name if sync_batch_norm else None)
        emb = model(images)
        return gather(emb), nnx.state(model, nnx.BatchStat)

    def objective(loss_params, emb):
        loss, new_loss_state = loss_of(loss_params, emb)
        return loss / num_devices, (loss, new_loss_state)

    # one forward and one backward pass: vjp of the model (params -> gathered embeddings), the
    # loss gradient w.r.t. (loss params, embeddings), the embedding cotangent pulled back; the
    # same embedding gradient feeds the collapse statistics (active_fraction).
    all_emb, pull_back, new_stats = jax.vjp(forward, state.params["model"], has_aux=True)
    (_, (loss, new_loss_state)), (loss_grads, emb_cot) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(state.params["loss"], all_emb)
    (model_grads,) = pull_back(emb_cot)
    grads = {"model": model_grads, "loss": loss_grads}
    if axis_name is not None and not state.freeze_batch_norm:
        new_stats = jax.tree.map(lambda s: jax.lax.pmean(s, axis_name), new_stats)
    if state.freeze_batch_norm:
        new_stats = state.batch_stats
    if not stateful:
        new_loss_state = state.loss_state
    elif axis_name is not None:
        new_loss_state = _replicated(new_loss_state, axis_name)

    emb_grad = emb_cot * num_devices  # d loss / d embeddings (the objective is loss / num_devices)
    metrics = {"loss": loss, **embedding_metrics(all_emb, all_labels, emb_grad)}
    if axis_name is not None:
        # identical on every device already; pmean makes them replicated-typed for out_specs
        metrics = jax.tree.map(lambda m: jax.lax.pmean(m, axis_name), metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)

    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, sampler_step=state.sampler_step + 1,
                              params=params, batch_stats=new_stats, opt_state=opt_state,
                              loss_state=new_loss_state)
    return new_state, metrics


def train_step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
    """One optimisation step on one device (pure; wrap in ``jax.jit``).

    Args:
      state: `TrainState` (`dmljax.train.state.create_train_state`).
      batch: ``{"images": [B, H, W, C] uint8 or float, "labels": [B] int}`` (+ per-item extras
        such as ``"cluster_ids"`` [B] for a ``state.method_fn``).
      key: PRNG key for augmentation and (``fold_in(key, LOSS_KEY_TAG)``) the stateful objective.

    Returns:
      (new state, metrics dict of scalars; see the module docstring).
    """
    return _step(state, batch, key, axis_name=None, sync_batch_norm=False)


def data_mesh(devices=None, axis_name: str = "data") -> Mesh:
    """1-D mesh over ``devices`` (default: all devices of all processes) with Auto axis type."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (axis_name,))


def make_parallel_train_step(mesh: Mesh, *, axis_name: str = "data", sync_batch_norm: bool = True):
    """Data-parallel ``train_step`` over the 1-D ``mesh``; returns a jitted function.

    The global batch (leading dim divisible by the number of devices; every entry of the batch
    dict, e.g. ``cluster_ids``, is split the same way) is split over ``axis_name``; the state,
    including ``loss_state`` and a teacher, is replicated. Mining and the loss see the all-gathered global
    batch, so the result equals `train_step` on the global batch (to float tolerance) when
    BN is synchronised (default) and no augmentation is used (augmentation keys are folded
    with the device index, so the random draws differ from a single-device run).

    Multi-host: call ``jax.distributed.initialize()`` in every process first (on TPU/Slurm it
    reads the coordinator from the environment; otherwise pass ``coordinator_address``,
    ``num_processes`` and ``process_id``), build the mesh over ``jax.devices()`` (all hosts),
    let each process load its own shard of the global batch and assemble it with
    ``jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_batch)``.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    body = functools.partial(_step, axis_name=axis_name, sync_batch_norm=sync_batch_norm)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axis_name), P()),
                            out_specs=(P(), P()))
    return jax.jit(sharded)


@functools.partial(jax.jit, static_argnames=())
def _embed_batch(state: TrainState, images: jax.Array) -> jax.Array:
    return merge_model(state, train=False)(images)


def embed(state: TrainState, images: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Embeddings [N, D] of host images in eval mode (BN running stats), fixed-size chunks."""
    n = len(images)
    out = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad and n > batch_size:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        emb = np.asarray(_embed_batch(state, jnp.asarray(chunk)))
        out.append(emb[:len(images[start:start + batch_size])])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
