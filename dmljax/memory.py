"""Cross-batch memory (XBM, Wang, Zhang, Huang & Scott, CVPR 2020, arXiv 1912.06798) as explicit state.

XBM keeps a ring buffer ("queue") of the embeddings and labels of the most recent
mini-batches. Because embeddings drift slowly once training has warmed up, pairs
between the current batch (the anchors, differentiated) and the memory (the
references, constants) give many more informative pairs than the batch alone.

Here the memory is a pytree, `XBMState`, carried by the caller (e.g. in the train
state); every function is pure and jit-able with static shapes:

* `xbm_init(size, dim)` -> empty state (no valid slot, pointer 0);
* `xbm_enqueue(state, embeddings, labels, mask=...)` writes the (masked) rows into the
  next slots, wrapping around (FIFO), with ``stop_gradient``;
* `xbm_loss(loss, embeddings, labels, state, ...)` -> ``(loss, new_state)``.

Order of the two steps (the paper's Algorithm 1, and PyTorch Metric Learning's
``CrossBatchMemory``): the current batch is enqueued FIRST and the loss is computed
between the batch and the whole memory, which therefore already holds a (detached)
copy of every batch row. The pair (row i, its own copy) is removed from the positive
pairs (PML ``remove_self_comparisons``), so an embedding never pairs with itself;
pairs between row i and the copies of the OTHER batch rows are kept (they play the
role of the in-batch pairs, with the gradient flowing through the anchor side only,
exactly as in PML). Slots never written yet are excluded (``valid``).

Supported losses (PML semantics, where ``loss(embeddings, labels, indices_tuple,
ref_emb, ref_labels)`` is evaluated on all pairs between the batch and the memory): every
pair loss of `dmljax.losses` through its reference form (``ref_embeddings`` / ``ref_labels``
/ ``ref_valid``, the own copies removed by ``pair_weights``), by name (`XBM_LOSSES`) or as
the function itself; or any callable ``fn(matrix, positive, negative) -> scalar`` on the
[B, M] matrix of ``metric`` and the bool masks.

Training with XBM (for the trainer): put an `XBMState` next to the parameters in the
train state, make the loss ``fn = with_xbm("contrastive", ...)``, and in the step
compute ``(loss, new_memory), grads = jax.value_and_grad(lambda p: fn(embed(p), labels,
state.memory), has_aux=True)(params)``; then store ``new_memory`` in the new train
state. The paper starts using the memory after a warm-up ("start iteration", 1k
iterations on SOP): call the plain loss (or ``xbm_loss(..., use_memory=False)``,
which still enqueues) before that step.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import distances
from dmljax._validation import check_choice, check_embeddings, check_labels, check_positive_int, check_valid
from dmljax.masks import label_masks
from dmljax.reductions import REDUCTIONS

__all__ = ["XBM_LOSSES", "XBMState", "xbm_enqueue", "xbm_init", "xbm_loss", "with_xbm"]

XBM_LOSSES = ("contrastive", "multi_similarity", "triplet", "circle", "lifted_structured",
              "generalized_lifted_structured", "ranked_list", "npair", "angular", "supcon")


class XBMState(NamedTuple):
    """Ring buffer of past embeddings.

    embeddings: [M, D] float; labels: [M] int; valid: [M] bool (slot holds an item);
    pointer: int32 scalar, the next slot to write.
    """

    embeddings: jax.Array
    labels: jax.Array
    valid: jax.Array
    pointer: jax.Array


def xbm_init(size: int, dim: int, *, dtype=jnp.float32, label_dtype=jnp.int32) -> XBMState:
    """An empty memory of ``size`` slots for ``dim``-dimensional embeddings.

    The paper's memory sizes are a few thousand to the whole training set
    (e.g. M = 55k on SOP with batch 64); PML's default is 1024.
    """
    size = check_positive_int(size, name="size")
    dim = check_positive_int(dim, name="dim")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if not jnp.issubdtype(jnp.dtype(label_dtype), jnp.integer):
        raise ValueError(f"label_dtype must be an integer dtype, got {label_dtype}")
    return XBMState(
        embeddings=jnp.zeros((size, dim), dtype),
        labels=jnp.zeros((size,), label_dtype),
        valid=jnp.zeros((size,), bool),
        pointer=jnp.zeros((), jnp.int32),
    )


def _check_state(state) -> XBMState:
    if not isinstance(state, XBMState):
        raise ValueError(f"state must be an XBMState (see xbm_init), got {type(state).__name__}")
    shape = np.shape(state.embeddings)
    if len(shape) != 2:
        raise ValueError(f"state.embeddings must have rank 2 [size, dim], got shape {shape}")
    if np.shape(state.labels) != shape[:1] or np.shape(state.valid) != shape[:1]:
        raise ValueError(f"state.labels and state.valid must have shape ({shape[0]},)")
    return state


def _batch_slots(state: XBMState, batch_size: int, mask):
    """Slot of every batch row (rows not enqueued get -1) and the number enqueued."""
    size = state.embeddings.shape[0]
    take = jnp.ones((batch_size,), bool) if mask is None else mask
    rank = jnp.cumsum(take.astype(jnp.int32)) - 1  # position among the enqueued rows
    slots = jnp.where(take, (state.pointer + rank) % size, -1)
    return slots, jnp.sum(take.astype(jnp.int32))


def xbm_enqueue(state: XBMState, embeddings: jax.Array, labels: jax.Array, *, mask=None) -> XBMState:
    """Write the rows of ``embeddings`` / ``labels`` (where ``mask``) into the next slots.

    FIFO ring buffer: row r (the r-th enqueued row) goes to slot ``(pointer + r) % M``,
    overwriting the oldest item; the pointer advances by the number of enqueued rows.
    Embeddings are stored with ``stop_gradient`` (the memory is a constant, as in the
    paper) and cast to the memory dtype. Static shapes: rows left out by ``mask`` (padding)
    are scattered to an out-of-range slot and dropped.

    Args:
      state: `XBMState` of M slots. embeddings: [B, D], B <= M. labels: [B] int.
      mask: optional [B] bool, rows to enqueue (e.g. the batch's ``valid`` mask).
    """
    state = _check_state(state)
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    size, dim = state.embeddings.shape
    if x.shape[1] != dim:
        raise ValueError(f"embeddings must have dim {dim} like the memory, got shape {x.shape}")
    if x.shape[0] > size:
        raise ValueError(f"embeddings has {x.shape[0]} rows but the memory only {size} slots; "
                         "use a memory at least as large as the batch")
    mask = check_valid(mask, batch_size=x.shape[0], name="mask")
    slots, count = _batch_slots(state, x.shape[0], mask)
    target = jnp.where(slots >= 0, slots, size)  # out of range -> dropped
    x = jax.lax.stop_gradient(x).astype(state.embeddings.dtype)
    return XBMState(
        embeddings=state.embeddings.at[target].set(x, mode="drop"),
        labels=state.labels.at[target].set(labels.astype(state.labels.dtype), mode="drop"),
        valid=state.valid.at[target].set(True, mode="drop"),
        pointer=((state.pointer + count) % size).astype(jnp.int32),
    )


# ----------------------------------------------------------------------------- losses by name


def _named_losses():
    from dmljax import losses

    return {
        "contrastive": losses.contrastive_loss,
        "multi_similarity": losses.multi_similarity_loss,
        "triplet": losses.triplet_margin_loss,
        "circle": losses.circle_loss,
        "lifted_structured": losses.lifted_structured_loss,
        "generalized_lifted_structured": losses.generalized_lifted_structured_loss,
        "ranked_list": losses.ranked_list_loss,
        "npair": losses.npair_loss,
        "angular": losses.angular_loss,
        "supcon": losses.supcon_loss,
    }


# memory-specific defaults (PML's CrossBatchMemory wraps the loss without a miner)
_XBM_DEFAULTS = {"multi_similarity": {"mining": False}}
_RESERVED = ("embeddings", "labels", "ref_embeddings", "ref_labels", "ref_valid", "valid", "pair_weights")


def _takes_reference(fn) -> bool:
    try:
        return "ref_embeddings" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_options(fn, name, loss_kwargs):
    params = inspect.signature(fn).parameters
    options = tuple(k for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and k not in _RESERVED)
    unknown = sorted(set(loss_kwargs) - set(options))
    if unknown:
        raise ValueError(f"loss_kwargs: {unknown} are not options of the {name} loss (options: {options})")
    if loss_kwargs.get("reduction") == "none":
        raise ValueError("reduction must give a scalar loss for the memory, got 'none'")
    return options


def xbm_loss(
    loss: str | Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    embeddings: jax.Array,
    labels: jax.Array,
    state: XBMState,
    *,
    metric: str | None = None,
    valid: jax.Array | None = None,
    use_memory: bool = True,
    **loss_kwargs,
) -> tuple[jax.Array, XBMState]:
    """Pair loss between the current batch and the cross-batch memory; returns (loss, new_state).

    Steps (XBM Algorithm 1 / PML ``CrossBatchMemory`` without ``enqueue_mask``):
      1. ``new_state = xbm_enqueue(state, embeddings, labels, mask=valid)``;
      2. ``S = pairwise(embeddings, new_state.embeddings, metric)``: [B, M], anchors are the
         batch rows (with gradient), references every filled memory slot (constants);
      3. positive / negative masks from the labels, minus padded rows, unfilled slots and
         each row's own copy (its slot) -- the self-pair;
      4. the loss in its reference form: ``loss(embeddings, labels, ref_embeddings=memory,
         ref_labels=..., ref_valid=filled slots, valid=valid, pair_weights=not own copy,
         **loss_kwargs)`` -- the public loss itself, no copy of its body.

    Args:
      loss: a name in `XBM_LOSSES` ("contrastive", "multi_similarity", "triplet", "circle",
        "lifted_structured", "generalized_lifted_structured", "ranked_list", "npair", "angular",
        "supcon": the `dmljax.losses` function of that name with its defaults, except
        multi-similarity's ``mining=False``, PML's ``CrossBatchMemory`` without a miner); any
        loss function taking ``ref_embeddings`` (e.g. ``dmljax.losses.contrastive_loss``); or a
        callable ``fn(matrix [B, M], positive [B, M] bool, negative [B, M] bool) -> scalar``.
        ``loss_kwargs`` are the loss's keyword options (ValueError for unknown ones).
      embeddings: [B, D] float, B <= M. labels: [B] int (same dtype family as the memory).
      state: `XBMState` from `xbm_init` / a previous call.
      metric: distance or similarity of `dmljax.distances.pairwise`, for losses with a
        ``metric`` option (default: the loss's) and matrix callables (default euclidean); losses
        without one (multi-similarity, circle: cosine) accept only "cosine".
      valid: optional [B] bool: padded rows are neither enqueued nor anchors.
      use_memory: False computes the same loss on the batch alone (warm-up phase of the
        paper) but still enqueues the batch, so the memory is full when XBM starts.

    Returns:
      (scalar loss, new `XBMState`). Use ``jax.value_and_grad(..., has_aux=True)``.
    """
    state = _check_state(state)
    x = check_embeddings(embeddings)
    labels = check_labels(labels, batch_size=x.shape[0])
    valid = check_valid(valid, batch_size=x.shape[0])
    if callable(loss):
        name, fn = getattr(loss, "__name__", "callable"), loss
        pair_form = _takes_reference(loss)
    else:
        name = check_choice(loss, name="loss", choices=XBM_LOSSES)
        fn, pair_form = _named_losses()[name], True
        loss_kwargs = {**_XBM_DEFAULTS.get(name, {}), **loss_kwargs}
    if not isinstance(use_memory, bool):
        raise ValueError(f"use_memory must be a Python bool, got {use_memory!r}")
    if pair_form:
        options = _check_options(fn, name, loss_kwargs)
        if metric is not None:
            if "metric" in options:
                loss_kwargs = {**loss_kwargs, "metric": metric}
            elif metric != "cosine":
                raise ValueError(f"metric must be 'cosine' for the {name} loss (it has no metric option), "
                                 f"got {metric!r}")
    else:
        if metric is None:
            metric = "euclidean"
        check_choice(metric, name="metric", choices=tuple(distances.METRICS))
        if loss_kwargs:
            raise ValueError(f"loss_kwargs are not used with a callable loss, got {sorted(loss_kwargs)}")
    new_state = xbm_enqueue(state, x, labels, mask=valid)

    if use_memory:
        # the memory is a constant: no gradient reaches stored items, even old ones
        refs = jax.lax.stop_gradient(new_state.embeddings).astype(x.dtype)
        slots, _ = _batch_slots(state, x.shape[0], valid)
        not_own_copy = slots[:, None] != jnp.arange(refs.shape[0])[None, :]
        if pair_form:
            value = fn(x, labels, ref_embeddings=refs, ref_labels=new_state.labels.astype(labels.dtype),
                       ref_valid=new_state.valid, valid=valid, pair_weights=not_own_copy, **loss_kwargs)
        else:
            positive, negative = label_masks(labels, new_state.labels, valid=valid, ref_valid=new_state.valid)
            mat = distances.pairwise(x, refs, metric=metric)
            value = fn(mat, positive & not_own_copy, negative & not_own_copy)
    elif pair_form:
        value = fn(x, labels, valid=valid, **loss_kwargs)
    else:
        positive, negative = label_masks(labels, valid=valid)
        value = fn(distances.pairwise(x, metric=metric), positive, negative)
    return value, new_state


def with_xbm(loss: str | Callable, *, metric: str | None = None, **loss_kwargs):
    """Trainer-facing form: ``fn(embeddings, labels, state, *, valid=None, use_memory=True)
    -> (loss, new_state)`` with the loss configuration bound (static, jit-friendly).

    The reduction must give a scalar (not "none").
    """
    if not callable(loss):
        check_choice(loss, name="loss", choices=XBM_LOSSES)
    if "reduction" in loss_kwargs:
        check_choice(loss_kwargs["reduction"], name="reduction", choices=REDUCTIONS)
    if loss_kwargs.get("reduction") == "none":
        raise ValueError("reduction must give a scalar loss for training, got 'none'")
    check_choice(loss_kwargs.get("reduction", "mean"), name="reduction", choices=REDUCTIONS)

    def fn(embeddings, labels, state, *, valid=None, use_memory=True):
        return xbm_loss(loss, embeddings, labels, state, metric=metric, valid=valid,
                        use_memory=use_memory, **loss_kwargs)

    return fn
