"""`TrainState`: everything a DML run needs to continue, as one pytree.

Dynamic leaves (saved in checkpoints): ``step``, ``sampler_step`` (position of the batch
sampler, so ``--resume`` replays exactly the batches an uninterrupted run would see),
``params = {"model": nnx.State of nnx.Param, "loss": tuple of loss arrays}`` (proxies,
learnable margins... passed positionally to the loss after ``labels``), ``batch_stats``
(nnx.BatchStat, BN running averages) and ``opt_state``.

Optional stateful objective (`create_train_state(..., method_fn=..., loss_state=...)`):
``loss_state`` is a carried, checkpointed, NON-trainable pytree (a cross-batch memory, class
statistics of IAA/DAS, k-means cluster ids, ...) and ``method_fn(loss_params, loss_state,
embeddings, labels, key, step, **extras) -> (loss, new_loss_state)`` replaces ``loss_fn`` in
the step (`dmljax.train.step`). ``loss_params`` (``params["loss"]``) may then be any pytree
(e.g. ``{"base": (proxies,), "method": generator_params}``); it is trained like the proxies
(the "loss" learning-rate part of `dmljax.train.optim.make_optimizer`).

Optional frozen teacher (relational knowledge distillation): ``teacher`` holds the teacher's
``{"params", "batch_stats"}`` (a pytree, NOT checkpointed: it is rebuilt from the teacher's own
run on resume) and ``teacher_graphdef`` its NNX graph; the step embeds the batch with it in eval
mode and passes ``teacher_embeddings=`` to ``method_fn``.

Static fields (part of the jit cache key, never saved): the model's ``graphdef``, the optax
transformation ``tx``, the loss function (or ``method_fn``), an optional augmentation, the
BN-freezing flag and the teacher's graphdef.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

__all__ = ["TrainState", "create_train_state", "merge_model", "merge_teacher"]


@struct.dataclass
class TrainState:
    step: jax.Array
    sampler_step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    loss_fn: Callable[..., jax.Array] = struct.field(pytree_node=False)
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = struct.field(
        pytree_node=False, default=None)
    freeze_batch_norm: bool = struct.field(pytree_node=False, default=False)
    loss_state: Any = None
    method_fn: Callable[..., tuple[jax.Array, Any]] | None = struct.field(pytree_node=False, default=None)
    teacher: Any = None
    teacher_graphdef: Any = struct.field(pytree_node=False, default=None)

    @property
    def loss_params(self) -> Any:
        return self.params["loss"]

    def dynamic(self) -> dict:
        """The leaves a checkpoint stores (``loss_state=None`` has no leaves, so checkpoints of
        runs without a stateful objective keep their layout)."""
        return {"step": self.step, "sampler_step": self.sampler_step, "params": self.params,
                "batch_stats": self.batch_stats, "opt_state": self.opt_state,
                "loss_state": self.loss_state}

    def replace_dynamic(self, dynamic: dict) -> "TrainState":
        return self.replace(**dynamic)


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., jax.Array] | None,
    loss_params: Any = (),
    *,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    freeze_batch_norm: bool = False,
    method_fn: Callable[..., tuple[jax.Array, Any]] | None = None,
    loss_state: Any = None,
    teacher: nnx.Module | None = None,
) -> TrainState:
    """Split an NNX model into graphdef / params / BN statistics and initialise the optimizer.

    Args:
      model: an ``nnx.Module`` mapping images [B, ...] to embeddings [B, D]
        (`dmljax.models.heads.EmbeddingModel`).
      tx: optax transformation over ``{"model": params, "loss": loss_params}``
        (`dmljax.train.optim.make_optimizer`).
      loss_fn: ``loss_fn(embeddings, labels, *loss_params) -> scalar`` with its configuration
        bound (``functools.partial(multi_similarity_loss, alpha=2.0, ...)``).
        None when ``method_fn`` is given.
      loss_params: learnable loss arrays trained alongside the model (e.g. ``(proxies,)``); a
        tuple for ``loss_fn``, any pytree of arrays for ``method_fn``.
      augment_fn: optional ``augment_fn(images, key) -> images`` applied on device in the step.
      freeze_batch_norm: BN layers use (and do not update) their running statistics in training,
        as DML papers do with ImageNet-pretrained backbones.
      method_fn: optional stateful objective ``method_fn(loss_params, loss_state, embeddings
        [B, D], labels [B], key, step, **extras) -> (scalar, new_loss_state)`` (module docstring;
        e.g. `dmljax.methods.plugin.Method.loss` with its arguments bound, or a cross-batch
        memory loss). Exactly one of ``loss_fn`` / ``method_fn`` must be given.
      loss_state: initial non-trainable state of ``method_fn`` (carried and checkpointed).
      teacher: optional frozen NNX model images -> teacher embeddings [B, Dt] (distillation;
        needs ``method_fn``, which then receives ``teacher_embeddings=``).
    """
    if (loss_fn is None) == (method_fn is None):
        raise ValueError("exactly one of loss_fn and method_fn must be given")
    if method_fn is None:
        if not isinstance(loss_params, tuple):
            raise ValueError(f"loss_params must be a tuple of arrays, got {type(loss_params).__name__}")
        if loss_state is not None:
            raise ValueError("loss_state needs a method_fn (a plain loss_fn carries no state)")
        if teacher is not None:
            raise ValueError("teacher needs a method_fn (it receives teacher_embeddings=)")
    elif not callable(method_fn):
        raise ValueError(f"method_fn must be callable, got {method_fn!r}")
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    trainable = {"model": params, "loss": jax.tree.map(jnp.asarray, loss_params)}
    teacher_tree, teacher_graphdef = None, None
    if teacher is not None:
        teacher_graphdef, t_params, t_stats = nnx.split(teacher, nnx.Param, nnx.BatchStat)
        teacher_tree = {"params": t_params, "batch_stats": t_stats}
    return TrainState(
        step=jnp.zeros((), jnp.int32), sampler_step=jnp.zeros((), jnp.int32), params=trainable,
        batch_stats=batch_stats, opt_state=tx.init(trainable), graphdef=graphdef, tx=tx,
        loss_fn=loss_fn, augment_fn=augment_fn, freeze_batch_norm=freeze_batch_norm,
        loss_state=None if loss_state is None else jax.tree.map(jnp.asarray, loss_state),
        method_fn=method_fn, teacher=teacher_tree, teacher_graphdef=teacher_graphdef)


def _set_mode(model, *, train: bool, freeze_batch_norm: bool, batch_norm_axis_name: str | None):
    use_running = (not train) or freeze_batch_norm
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            module.use_running_average = use_running
            module.axis_name = batch_norm_axis_name
        elif hasattr(module, "deterministic"):
            module.deterministic = not train
    return model


def merge_teacher(state: TrainState):
    """The frozen teacher of ``state`` in eval mode (BN running statistics), or None."""
    if state.teacher is None:
        return None
    params, batch_stats = jax.tree.map(lambda x: x, (state.teacher["params"], state.teacher["batch_stats"]))
    model = nnx.merge(state.teacher_graphdef, params, batch_stats)
    return _set_mode(model, train=False, freeze_batch_norm=True, batch_norm_axis_name=None)


def merge_model(state: TrainState, model_params: Any = None, *, train: bool,
                batch_norm_axis_name: str | None = None):
    """Rebuild the NNX model from a state (inside jit) in train or eval mode.

    ``model_params`` replaces ``state.params["model"]`` (the values being differentiated).

    ``batch_norm_axis_name`` turns every BatchNorm into a cross-device (synchronised) one: the
    batch mean/variance are averaged over that mesh axis, so the forward pass of a sharded
    batch equals the single-device forward pass of the global batch.
    """
    if model_params is None:
        model_params = state.params["model"]
    # fresh Variable objects at the current trace level (a State's Variables may belong to an
    # outer trace, and BatchNorm mutates its statistics in place)
    model_params, batch_stats = jax.tree.map(lambda x: x, (model_params, state.batch_stats))
    model = nnx.merge(state.graphdef, model_params, batch_stats)
    return _set_mode(model, train=train, freeze_batch_norm=state.freeze_batch_norm,
                     batch_norm_axis_name=batch_norm_axis_name)
