"""The training objective: ``config.loss`` (+ global-local split) -> ``method`` -> memory -> distillation.

`build_objective` returns an `Objective`: a plain ``loss_fn(embeddings, labels, *loss_params)``
when the configured loss is stateless and key-free and nothing wraps it, else a stateful
``method_fn(loss_params, loss_state, embeddings, labels, key, step, **extras) -> (loss,
new_loss_state)`` (`dmljax.train.state`): a method of `dmljax.methods.plugin` around the loss, a
cross-batch memory (`build_memory_loss`), the lifted hard-negative pool, RKD distillation
(``teacher_embeddings``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmljax._validation import check_choice, check_scalar
from dmljax.methods.plugin import METHODS, NUM_LEARNERS, make_method
from dmljax.train.loss_registry import LossSpec, build_loss_spec, split_global_local

__all__ = ["Objective", "build_memory_loss", "build_objective"]

_XBM_NATIVE = {"contrastive_loss": "contrastive", "multi_similarity_loss": "multi_similarity",
               "triplet_margin_loss": "triplet"}


def build_memory_loss(spec: LossSpec, *, size: int, start_step: int, dim: int, batch_size: int):
    """Cross-batch memory (XBM, `dmljax.memory`) around a pair loss: ``(fn(emb, labels, memory,
    step) -> (loss, new_memory), initial memory)``.

    contrastive / multi_similarity / triplet use `dmljax.memory.with_xbm`: anchors = the batch,
    references = the memory (which holds the batch too, minus each row's own copy), PML
    ``CrossBatchMemory`` semantics, with the configured options (multi-similarity keeps its
    mining default, on). Any other pair loss (taking ``valid``) is evaluated on the batch
    concatenated with the (stop-gradient) memory of the PREVIOUS steps, valid slots only, and
    the batch is enqueued after the loss: memory rows are then also anchors (constants; they
    contribute no gradient among themselves but count in the loss's normalisation) - an
    approximation of query x memory for losses without a reference-set form. Before
    ``start_step`` the batch alone is used (and still enqueued), as the paper's warm-up.
    """
    from dmljax.memory import with_xbm, xbm_enqueue, xbm_init
    if spec.params or spec.stateful or spec.plain is None or spec.name == "ensemble":
        raise ValueError(f"memory.size > 0 needs a pair loss without learnable arrays, state or key; "
                         f"loss {spec.name} is not one")
    if batch_size > size:
        raise ValueError(f"memory.size ({size}) must be >= the batch size ({batch_size})")
    memory = xbm_init(size, dim)
    if spec.name in _XBM_NATIVE:
        kwargs = dict(spec.options)
        metric = kwargs.pop("metric", None)
        if spec.name == "multi_similarity_loss":
            kwargs.setdefault("mining", True)  # multi_similarity_loss's default (PML's XBM has none)
        fn = with_xbm(_XBM_NATIVE[spec.name], metric=metric, **kwargs)
        with_memory = lambda x, y, m: fn(x, y, m)  # noqa: E731
        warmup = lambda x, y, m: fn(x, y, m, use_memory=False)  # noqa: E731
    else:
        plain = spec.plain

        def with_memory(x, y, m):
            refs = jax.lax.stop_gradient(m.embeddings).astype(x.dtype)
            value = plain(jnp.concatenate([x, refs]), jnp.concatenate([y, m.labels.astype(y.dtype)]),
                          valid=jnp.concatenate([jnp.ones(x.shape[:1], bool), m.valid]))
            return value, xbm_enqueue(m, x, y)

        def warmup(x, y, m):
            return plain(x, y), xbm_enqueue(m, x, y)

    def memory_loss(x, y, m, step):
        if start_step <= 0:
            return with_memory(x, y, m)
        return jax.lax.cond(jnp.asarray(step) >= start_step, lambda: with_memory(x, y, m),
                            lambda: warmup(x, y, m))
    return memory_loss, memory


@dataclasses.dataclass
class Objective:
    """What `create_train_state` needs (a plain ``loss_fn`` or a stateful ``method_fn``) plus the
    trainer's side information: ``loss_weights(state) -> dict`` (ensemble weights to log),
    ``method`` name and ``recluster`` settings for divide and conquer."""

    loss_fn: Callable | None
    method_fn: Callable | None
    loss_params: Any
    loss_state: Any
    spec: LossSpec
    method: str = "none"
    num_learners: int = 0
    recluster_every: int = 0

    def loss_weights(self, state) -> dict[str, float]:
        if self.spec.name != "ensemble":
            return {}
        from dmljax.losses.ensemble import ensemble_weights
        lp = state.params["loss"]
        base = lp if self.method_fn is None else lp["base"]
        w = np.asarray(ensemble_weights(base[0], method=self.spec.options["method"]))
        return {f"loss_weight/{i}_{n.removesuffix('_loss')}": float(v)
                for i, (n, v) in enumerate(zip(self.spec.names, w))}


def build_objective(config, *, num_classes: int, num_train: int, dim: int, batch_size: int,
                    steps_per_epoch: int, key, distill: bool = False) -> Objective:
    """loss.name (+ model.backbone=global_local) -> method.name -> memory -> distillation."""
    k_loss, k_local, k_method = key, jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    gl = config.model.global_local
    if config.model.backbone == "global_local":
        local_dim = int(gl.local_embedding_dim) or dim
        spec = split_global_local(build_loss_spec(config, num_classes=num_classes, dim=dim, key=k_loss),
                                  build_loss_spec(config, num_classes=num_classes, dim=local_dim, key=k_local),
                                  dim=dim, local_weight=float(gl.local_weight))
        dim = dim + local_dim
    else:
        spec = build_loss_spec(config, num_classes=num_classes, dim=dim, key=k_loss)
    m, mem, d = config.method, config.memory, config.distill
    check_choice(m.name, name="method.name", choices=METHODS)
    options = dict(m.options)
    if m.name == "none" and options:
        raise ValueError(f"method.options {sorted(options)} given without a method.name")
    if int(mem.size) > 0 and m.name != "none":
        raise ValueError("memory.size > 0 (XBM) combines with method.name='none' only")
    from dmljax.train.builders import lifted_sampler_options
    lifted = lifted_sampler_options(config, num_train=num_train, steps_per_epoch=steps_per_epoch)
    if m.name == "none" and int(mem.size) <= 0 and not distill and spec.plain is not None and lifted is None:
        return Objective(spec.plain, None, spec.params, None, spec)

    obj = Objective(None, None, {"base": spec.params}, {"base": spec.state}, spec, m.name)
    if lifted is not None:  # the sampler's pool rides in the checkpointed loss_state (method_fn keeps it)
        from dmljax.train.lifted_pool import POOL_KEY, init_lifted_pool
        obj.loss_state[POOL_KEY] = init_lifted_pool(lifted["pool_size"], dim)
    method = None
    memory_loss = None
    if m.name != "none":
        if spec.stateful:
            raise ValueError(f"method.name={m.name!r} needs a base loss without state; {spec.name} has one")
        if m.name == "alternating_projection":
            from dmljax.methods.alternating_projection import representative_mask
            s = config.sampler
            options["representatives"] = representative_mask(
                classes_per_batch=s.classes_per_batch, samples_per_class=s.samples_per_class,
                representatives_per_class=options.pop("representatives_per_class", None))
        if m.name == "bspml":
            options.setdefault("steps_per_epoch", max(int(steps_per_epoch), 1))
        if m.name == "divide_conquer":
            if spec.params:
                raise ValueError(f"method.name='divide_conquer' needs a base loss without learnable arrays "
                                 f"(each learner sees a slice of the embedding); {spec.name} has some")
            # the paper re-clusters every 2 epochs
            obj.num_learners = int(options.get("num_learners", NUM_LEARNERS))
            obj.recluster_every = int(options.pop("recluster_every", 0)) or 2 * max(int(steps_per_epoch), 1)
            obj.loss_state["clusters"] = jnp.zeros((num_train,), jnp.int32)

        def base_loss(x, y, k, *params, valid=None):
            return spec.call(params, (), x, y, k, valid=valid)[0]

        method = make_method(m.name, base_loss, num_classes=num_classes, dim=dim,
                             total_steps=int(config.optim.num_steps), **options)
        obj.loss_params["method"], obj.loss_state["method"] = method.init(k_method)
    elif int(mem.size) > 0:
        memory_loss, obj.loss_state["memory"] = build_memory_loss(
            spec, size=int(mem.size), start_step=int(mem.start_step), dim=dim, batch_size=batch_size)
    if distill:
        from dmljax.losses.distillation import rkd_distillation_loss
        check_scalar(d.weight, name="distill.weight", min_value=0.0)
        rkd = functools.partial(rkd_distillation_loss, distance_weight=float(d.distance_weight),
                                angle_weight=float(d.angle_weight))

    def method_fn(loss_params, loss_state, emb, labels, key, step, cluster_ids=None, teacher_embeddings=None):
        new_state = dict(loss_state)
        k_base, k_meth = jax.random.split(key)
        if method is not None:
            value, new_state["method"] = method.loss(
                loss_params["method"], loss_state["method"], emb, labels, k_meth, step,
                cluster_ids=cluster_ids, base_params=(k_base, *loss_params["base"]))
        elif memory_loss is not None:
            value, new_state["memory"] = memory_loss(emb, labels, loss_state["memory"], step)
        else:
            value, new_state["base"] = spec.call(loss_params["base"], loss_state["base"], emb, labels, k_base)
        if teacher_embeddings is not None:
            value = value + float(d.weight) * rkd(emb, teacher_embeddings)
        return value, new_state

    obj.method_fn = method_fn
    return obj
