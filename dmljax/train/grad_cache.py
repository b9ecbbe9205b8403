"""Gradient caching: the exact gradient of a loss on a batch larger than activation memory.

Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", RepL4NLP 2021 (arXiv 2101.06983; the sentence-transformers ``Cached*`` losses).

A DML loss couples every embedding of the batch (mining, softmax over the batch), but it only
needs the embeddings, not the backbone's activations. So the gradient of
``L(f(x_1; theta), ..., f(x_B; theta))`` splits into::

  1. embed the batch chunk by chunk without differentiation      e_i = f(x_i; theta)
     (only [B, D] embeddings stay in memory, never the activations of more than one chunk);
  2. loss and its gradient w.r.t. the embeddings on the full batch  g_i = dL / de_i
     (and w.r.t. the loss's learnable arrays: proxies, margins);
  3. per chunk, recompute the forward pass and back-propagate g_i   sum_i (de_i / dtheta)^T g_i
     (``jax.vjp`` per chunk inside ``lax.scan``: one chunk's activations at a time).

Steps 1 and 3 are ``lax.scan`` loops over the chunks, so the chunks run one after the other.

The result equals ``jax.grad`` of the loss on the unchunked batch (to float rounding) whenever
the chunked forward pass computes the same embeddings, at the price of a second forward pass
(2 forward + 1 backward passes instead of 1 + 1: roughly +30 to +50% step time where the loops
run efficiently, GPU/TPU; see ``unroll`` for XLA:CPU). Peak
activation memory is that of one chunk; the [B, D] embeddings, the loss's O(B^2) matrices and
the parameter gradients are the only batch-sized terms.

BatchNorm in train mode normalises with the statistics of the batch it sees, so with chunks
it uses **per-chunk** batch statistics (like ghost batch norm of ``chunk_size`` items, or the
per-GPU BN of an unsynchronised multi-GPU run): embeddings then differ from those of a
full-batch forward pass, and the gradient is the exact gradient of *that* chunked model (not of
the full-batch one). Both passes over a chunk use the same statistics, so steps 1 and 3 agree.
The running averages are updated with the mean over chunks of the per-chunk updates (equal to
the full-batch update for the mean; for the variance, the mean of the chunk variances, which
omits the between-chunk part). Exact full-batch equality holds with frozen BN (eval-mode
statistics, what DML papers use with ImageNet-pretrained backbones), with LayerNorm / no
normalisation, or with ``chunk_size`` equal to the local batch. Under data parallelism with
synchronised BN the statistics of chunk j are averaged over the devices' chunk j (a global
chunk of ``chunk_size * num_devices`` items).

The model must be a pure function of (params, images): stochastic layers (dropout) would draw
different masks in steps 1 and 3 and are not supported (run them deterministically).

Data parallelism (``axis_name``, inside ``jax.shard_map`` over a "data" mesh, DESIGN.md):
every device embeds its shard in chunks, the embeddings are ``all_gather``-ed so mining and the
loss see the global batch, the loss is divided by the number of devices (the transpose of
all_gather sums the devices' cotangents, so each device gets the exact gradient of its own
embeddings; the gradient of the replicated loss arrays is summed over devices by shard_map),
and the per-chunk parameter gradients are accumulated device-locally and summed over devices
once (one ``psum``, not one per chunk).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from dmljax.train.state import TrainState, merge_model
from dmljax.train.step import embedding_metrics

__all__ = [
    "grad_cache_train_step",
    "grad_cache_value_and_grad",
    "make_parallel_grad_cache_train_step",
    "state_embed_fn",
]


def _check_chunk_size(chunk_size, batch_size: int) -> int:
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if batch_size % chunk_size:
        raise ValueError(f"chunk_size must divide the (per-device) batch size {batch_size}, got {chunk_size}")
    return int(chunk_size)


def grad_cache_value_and_grad(
    embed_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    loss_fn: Callable[..., jax.Array],
    model_params: Any,
    loss_params: tuple,
    images: jax.Array,
    labels: jax.Array,
    *,
    chunk_size: int,
    axis_name: str | None = None,
    unroll: int | bool = 1,
) -> tuple[jax.Array, Any, tuple[Any, tuple], jax.Array, jax.Array]:
    """Loss and gradients of ``loss_fn(embed(images), labels, *loss_params)`` by gradient caching.

    Args:
      embed_fn: ``embed_fn(model_params, images [c, ...]) -> (embeddings [c, D], aux)``, pure
        and deterministic; ``aux`` is any pytree computed in the forward pass (e.g. the BN
        statistics after the pass, `state_embed_fn`), or None.
      loss_fn: ``loss_fn(embeddings [B, D], labels [B], *loss_params) -> scalar`` - any loss of
        the library with its configuration bound, mined ones included (mining only selects, the
        gradient w.r.t. the embeddings is that of the loss).
      model_params: pytree of the model's trainable arrays.
      loss_params: tuple of the loss's learnable arrays (proxies...), () for none.
      images: [B_local, ...]; labels: [B_local] (the device's shard under ``axis_name``).
      chunk_size: items per chunk (static), must divide B_local; activations of one chunk are
        in memory at a time.
      axis_name: mesh axis of the data-parallel ``jax.shard_map`` (None: one device).
      unroll: ``lax.scan``'s unroll of the two loops over chunks. 1 (default) runs the chunks
        strictly one after the other, which is what bounds the memory. ``True`` unrolls them:
        XLA then schedules the chunks itself (no memory guarantee), worth it on CPU, where XLA's
        while loops run conv-nets several times slower than straight-line code (measured on
        XLA:CPU, jaxlib 0.10.2, in a quick check on a loaded 2-core machine: a 4-chunk conv-net
        backward ~4x), and CPU memory is rarely the
        limit. GPU/TPU loops have no such cost: keep 1 there.
    Returns:
      ``(loss, aux, (model_grads, loss_grads), embeddings, embedding_grads)``: the global-batch
      loss; ``aux`` averaged over chunks (leaf-wise mean); the gradients (replicated under
      ``axis_name``); the device's embeddings [B_local, D] and dL/d embeddings [B_local, D].
    Raises:
      ValueError: ``chunk_size`` not a positive int dividing the batch; images / labels of
        different lengths; ``loss_params`` not a tuple.
    """
    batch = int(np.shape(images)[0])
    if np.shape(labels)[:1] != (batch,):
        raise ValueError(f"labels must have leading dimension {batch} like images, got shape {np.shape(labels)}")
    if not isinstance(loss_params, tuple):
        raise ValueError(f"loss_params must be a tuple of arrays, got {type(loss_params).__name__}")
    chunk_size = _check_chunk_size(chunk_size, batch)
    num_chunks = batch // chunk_size
    chunks = jnp.reshape(images, (num_chunks, chunk_size) + tuple(np.shape(images)[1:]))
    num_devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)

    # 1. embeddings, chunk by chunk, no differentiation (nothing of the forward pass is kept)
    frozen = jax.lax.stop_gradient(model_params)
    _, (emb_chunks, aux_chunks) = jax.lax.scan(lambda _, c: (None, embed_fn(frozen, c)), None, chunks,
                                               unroll=unroll)
    emb = jnp.reshape(emb_chunks, (batch,) + emb_chunks.shape[2:])
    aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux_chunks)

    # 2. loss and its gradient w.r.t. the embeddings (and loss arrays) on the global batch
    def gather(x):
        return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)

    all_labels = gather(labels)

    def objective(e, lp):
        return loss_fn(gather(e), all_labels, *lp) / num_devices

    scaled_loss, (emb_grad, loss_grads) = jax.value_and_grad(objective, argnums=(0, 1))(emb, loss_params)
    loss = scaled_loss * num_devices
    if axis_name is not None:  # the same value on every device; pmean makes it replicated-typed
        loss = jax.lax.pmean(loss, axis_name)

    # 3. back-propagate the cached embedding gradients chunk by chunk
    params_local = model_params
    if axis_name is not None:  # device-local accumulation, one psum at the end
        params_local = jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to="varying"), model_params)
    grad_chunks = jnp.reshape(emb_grad, emb_chunks.shape)

    def backward(total, chunk_and_grad):
        chunk, g = chunk_and_grad
        _, vjp = jax.vjp(lambda p: embed_fn(p, chunk)[0], params_local)
        (grads,) = vjp(g.astype(emb_chunks.dtype))
        return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params_local)
    model_grads, _ = jax.lax.scan(backward, zeros, (chunks, grad_chunks), unroll=unroll)
    if axis_name is not None:
        model_grads = jax.tree.map(lambda g: jax.lax.psum(g, axis_name), model_grads)
    return loss, aux, (model_grads, loss_grads), emb, emb_grad


def state_embed_fn(state: TrainState, *, train: bool = True, batch_norm_axis_name: str | None = None):
    """``embed_fn(model_params, images) -> (embeddings, batch_stats)`` of a `TrainState`'s model.

    ``train=True``: BN uses the chunk's batch statistics (unless ``state.freeze_batch_norm``) and
    ``batch_stats`` are the statistics after the pass; ``batch_norm_axis_name`` synchronises BN
    over that mesh axis (see `dmljax.train.state.merge_model`).
    """
    def embed_fn(model_params, images):
        model = merge_model(state, model_params, train=train, batch_norm_axis_name=batch_norm_axis_name)
        emb = model(images)
        return emb, nnx.state(model, nnx.BatchStat)
    return embed_fn


def _cached_step(state: TrainState, batch: dict, key: jax.Array, *, chunk_size: int, axis_name: str | None,
                 sync_batch_norm: bool, unroll: int | bool = 1) -> tuple[TrainState, dict]:
    if state.method_fn is not None:
        raise ValueError("grad_cache_train_step supports a state with loss_fn, not method_fn")
    if not isinstance(batch, dict) or "images" not in batch or "labels" not in batch:
        raise ValueError("batch must be a dict with 'images' [B, H, W, C] and 'labels' [B]")
    images, labels = batch["images"], batch["labels"]
    if state.augment_fn is not None:
        aug_key = key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        images = state.augment_fn(images, aug_key)
    embed_fn = state_embed_fn(state, train=True, batch_norm_axis_name=axis_name if sync_batch_norm else None)
    loss, new_stats, (model_grads, loss_grads), emb, emb_grad = grad_cache_value_and_grad(
        embed_fn, state.loss_fn, state.params["model"], state.params["loss"], images, labels,
        chunk_size=chunk_size, axis_name=axis_name, unroll=unroll)
    grads = {"model": model_grads, "loss": loss_grads}
    if state.freeze_batch_norm:
        new_stats = state.batch_stats
    elif axis_name is not None:
        new_stats = jax.tree.map(lambda s: jax.lax.pmean(s, axis_name), new_stats)

    def gather(x):
        return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)

    metrics = {"loss": loss, **embedding_metrics(gather(emb), gather(labels), gather(emb_grad))}
    if axis_name is not None:
        metrics = jax.tree.map(lambda m: jax.lax.pmean(m, axis_name), metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, sampler_step=state.sampler_step + 1, params=params,
                              batch_stats=new_stats, opt_state=opt_state)
    return new_state, metrics


def grad_cache_train_step(state: TrainState, batch: dict, key: jax.Array, *, chunk_size: int,
                          unroll: int | bool = 1) -> tuple[TrainState, dict]:
    """`dmljax.train.step.train_step` with the gradient computed by gradient caching (one device).

    Same state, batch, metrics and update as ``train_step`` (``loss_fn`` states; a stateful
    ``method_fn`` is not supported); ``chunk_size`` (static, divides B) bounds the activation
    memory. With frozen BN (or ``chunk_size == B``) the new state equals ``train_step``'s to
    float tolerance; with BN in train mode, BN sees chunks (module docstring). Wrap in
    ``jax.jit(functools.partial(grad_cache_train_step, chunk_size=...))``.
    """
    return _cached_step(state, batch, key, chunk_size=chunk_size, axis_name=None, sync_batch_norm=False,
                        unroll=unroll)


def make_parallel_grad_cache_train_step(mesh: Mesh, *, chunk_size: int, axis_name: str = "data",
                                        sync_batch_norm: bool = True, unroll: int | bool = 1):
    """Data-parallel `grad_cache_train_step` over the 1-D ``mesh`` (jitted), as
    `dmljax.train.step.make_parallel_train_step`: ``chunk_size`` divides the per-device batch
    ``B / num_devices``; mining and the loss see the all-gathered global batch."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    body = functools.partial(_cached_step, chunk_size=chunk_size, axis_name=axis_name,
                             sync_batch_norm=sync_batch_norm, unroll=unroll)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axis_name), P()), out_specs=(P(), P())))
