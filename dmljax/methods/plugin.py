"""One interface for the trainer: ``make_method(name, ...)`` -> `Method` (init + loss).

Every method of this package becomes a single scalar objective so that the existing train step
(one ``jax.value_and_grad``, one optax update) can run it::

    method = make_method(config.method.name, base_loss, num_classes=C, dim=D, total_steps=T, **options)
    method_params, method_state = method.init(key)            # trainable pytree, non-trainable pytree
    loss, new_state = method.loss(method_params, method_state, embeddings, labels, key, step,
                                  cluster_ids=None, base_params=())  # inside the differentiated objective

Adversarial / alternating methods (DAML; the cGAN of the two-stage generation) are written as ONE
sum in which each parameter group only sees its own objective through `jax.lax.stop_gradient`:
``J_metric(embeddings, stop_gradient(synthetic)) + J_generator(stop_gradient(embeddings), synthetic)``.
The gradient w.r.t. the network is exactly the metric's, the gradient w.r.t. the generator exactly
the generator's, so one optimizer step is a simultaneous update of both players (the papers
alternate; with small learning rates this is the usual simultaneous-gradient variant).

``base_loss`` is any library loss ``base_loss(embeddings, labels, *base_params, valid=None)`` with
its configuration bound by functools.partial (for BSPML the loss is its weighted multi-similarity
loss and ``base_loss`` is ignored). ``base_params`` (a tuple, default empty) is forwarded by
``Method.loss`` on every call, so learnable arrays of the base loss (proxies, class weights; the
trainer passes them from its trainable tree) and even a PRNG key for a sampling loss can be
given per step; divide and conquer needs a parameter-free base loss (each learner sees a slice
of the embedding, which proxies of the full width cannot match).

Used by the trainer: ``experiments/train.py`` builds ``make_method(config.method.name, base, ...,
**config.method.options)`` and runs ``Method.loss`` as the train state's ``method_fn``
(`dmljax.train.state`), with the method state carried and checkpointed in ``loss_state``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dmljax._validation import check_choice, check_embeddings, check_key, check_labels
from dmljax.methods.alternating_projection import alternating_projection_regularizer, projection_targets
from dmljax.methods.bspml import bspml_sample_weights, self_paced_age, weighted_multi_similarity_loss
from dmljax.methods.daml import HardNegativeGenerator, daml_generator_loss, daml_triplet_loss
from dmljax.methods._common import sample_triplets, triplet_validity
from dmljax.methods.das import das_augment, das_init, das_update
from dmljax.methods.divide_conquer import divide_and_conquer_loss
from dmljax.methods.hard_sample_generation import (ConditionalDiscriminator, ConditionalRefiner,
                                                   adaptive_reverse_metric_loss, cgan_losses,
                                                   piecewise_linear_manipulation, piecewise_linear_schedule)
from dmljax.methods.iaa import iaa_init, iaa_neighbor_correction, iaa_strength_schedule, iaa_synthesize, iaa_update
from dmljax.reductions import masked_mean

__all__ = ["METHODS", "Method", "make_method"]

METHODS = ("none", "daml", "hard_sample_generation", "iaa", "das", "divide_conquer", "alternating_projection",
           "bspml")

NUM_LEARNERS = 4  # divide and conquer: default number of learners (Sanakoyeu et al. 2019 use 4-32)


class Method(NamedTuple):
    """init(key) -> (params, state); loss(params, state, embeddings, labels, key, step, cluster_ids=None,
    base_params=()) -> (scalar, new_state)."""

    name: str
    init: Callable[[jax.Array], tuple[Any, Any]]
    loss: Callable[..., tuple[jax.Array, Any]]


def _progress(step, total_steps):
    return jnp.asarray(step, jnp.float32) / max(total_steps, 1)


def make_method(name: str, base_loss: Callable[..., jax.Array], *, num_classes: int, dim: int,
                total_steps: int = 1, **options) -> Method:
    """Build the `Method` ``name`` in `METHODS` around ``base_loss`` (see the module docstring).

    Options per method (defaults in parentheses):

    * daml: lambda_reg (1.0), lambda_adv (50.0), margin (0.2), synthetic_weight (1.0), hidden (None).
    * hard_sample_generation: margin (0.2), beta (0.1), lambda_recon (1.0), lambda_gan (0.1),
      synthetic_weight (1.0); the metric's running loss J_avg is tracked in the state (EMA 0.9).
    * iaa: strength (0.8), num_augment (3), momentum (0.8), neighbor_correction (True).
    * das: num_produce (3), num_scale (4), bank_size (10), shift_scale (0.01), scale_range ((0.5, 2.0)).
    * divide_conquer: num_learners (4), finetune_fraction (0.0: the last fraction of ``total_steps``
      trains the merged full embedding with the plain base loss, `use_full_embedding`; the
      paper merges the learners at the end); ``cluster_ids`` [B] must be passed to ``loss``.
    * alternating_projection: weight (0.1), repeat (T of the sampler, 5), representatives ([B] bool, required).
    * bspml: age_initial (0.5), age_growth (1.1), steps_per_epoch (100), balance (1.0), alpha, beta,
      base, epsilon (MS defaults 2, 50, 0.5, 0.1).
    """
    check_choice(name, name="name", choices=METHODS)
    opt = dict(options)

    def pop(key, default):
        return opt.pop(key, default)

    if name == "none":
        init = lambda key: ((), ())  # noqa: E731

        def loss(params, state, x, y, key, step, cluster_ids=None, base=None):
            return base(x, y), state

    elif name == "daml":
        lambda_reg, lambda_adv = pop("lambda_reg", 1.0), pop("lambda_adv", 50.0)
        margin, synthetic_weight, hidden = pop("margin", 0.2), pop("synthetic_weight", 1.0), pop("hidden", None)
        graphdef = nnx.graphdef(HardNegativeGenerator(dim, hidden=hidden, normalize=True, rngs=nnx.Rngs(0)))

        def init(key):
            gen = HardNegativeGenerator(dim, hidden=hidden, normalize=True, rngs=nnx.Rngs(params=key))
            return nnx.state(gen, nnx.Param), ()

        def loss(params, state, x, y, key, step, cluster_ids=None, base=None):
            gen = nnx.merge(graphdef, params)
            trip, ok = sample_triplets(key, y)
            a, p, n = (x[trip[:, i]] for i in range(3))
            sa, sp, sn = (jax.lax.stop_gradient(v) for v in (a, p, n))
            synthetic = gen(sa, sp, sn)
            j_gen = daml_generator_loss(sa, sp, sn, synthetic, lambda_reg=lambda_reg, lambda_adv=lambda_adv,
                                        margin=margin, weights=ok)
            j_metric = base(x, y) + daml_triplet_loss(
                x, y, jax.lax.stop_gradient(synthetic), trip, margin=margin, real_weight=0.0,
                synthetic_weight=synthetic_weight, triplet_valid=ok)
            return j_metric + j_gen, state

    elif name == "hard_sample_generation":
        margin, beta = pop("margin", 0.2), pop("beta", 0.1)
        lambda_recon, lambda_gan = pop("lambda_recon", 1.0), pop("lambda_gan", 0.1)
        synthetic_weight = pop("synthetic_weight", 1.0)
        g_def = nnx.graphdef(ConditionalRefiner(dim, num_classes, rngs=nnx.Rngs(0)))
        d_def = nnx.graphdef(ConditionalDiscriminator(dim, num_classes, rngs=nnx.Rngs(0)))

        def init(key):
            kg, kd = jax.random.split(key)
            g = ConditionalRefiner(dim, num_classes, rngs=nnx.Rngs(params=kg))
            d = ConditionalDiscriminator(dim, num_classes, rngs=nnx.Rngs(params=kd))
            return {"refiner": nnx.state(g, nnx.Param), "discriminator": nnx.state(d, nnx.Param)}, \
                {"metric_loss_avg": jnp.ones((), jnp.float32)}

        def loss(params, state, x, y, key, step, cluster_ids=None, base=None):
            refiner = nnx.merge(g_def, params["refiner"])
            disc = nnx.merge(d_def, params["discriminator"])
            disc_frozen = nnx.merge(d_def, jax.lax.stop_gradient(params["discriminator"]))
            trip, ok = sample_triplets(key, y)
            a, p, n = (jax.lax.stop_gradient(x[trip[:, i]]) for i in range(3))
            strength = piecewise_linear_schedule(_progress(step, total_steps))
            mp, mn = piecewise_linear_manipulation(a, p, n, strength=strength)
            yp, yn = y[trip[:, 1]], y[trip[:, 2]]
            rp, rn = refiner(mp, yp), refiner(mn, yn)
            fake = jnp.concatenate([rp, rn])
            fake_y = jnp.concatenate([yp, yn])
            real = jnp.concatenate([p, n])
            d_loss, _ = cgan_losses(disc(real, fake_y), disc(jax.lax.stop_gradient(fake), fake_y))
            _, g_adv = cgan_losses(disc_frozen(real, fake_y), disc_frozen(fake, fake_y))
            recon = masked_mean(jnp.sum(jnp.square(rp - mp), 1) + jnp.sum(jnp.square(rn - mn), 1), ok)
            reverse = adaptive_reverse_metric_loss(a, rp, rn, state["metric_loss_avg"], margin=margin, beta=beta,
                                                   weights=ok)
            j_gen = reverse + lambda_recon * recon + lambda_gan * (g_adv + d_loss)
            # metric: triplet hinge on the synthetic (a, p~, n~) with the anchors' gradient
            anchors = x[trip[:, 0]]
            sp_, sn_ = jax.lax.stop_gradient(rp), jax.lax.stop_gradient(rn)
            d_ap = jnp.sqrt(jnp.sum(jnp.square(anchors - sp_), 1) + 1e-12)
            d_an = jnp.sqrt(jnp.sum(jnp.square(anchors - sn_), 1) + 1e-12)
            synth = masked_mean(jax.nn.relu(d_ap - d_an + margin), ok & triplet_validity(y, trip))
            metric = base(x, y)
            new_avg = 0.9 * state["metric_loss_avg"] + 0.1 * jax.lax.stop_gradient(metric)
            return metric + synthetic_weight * synth + j_gen, {"metric_loss_avg": new_avg}

    elif name == "iaa":
        strength, num_augment = pop("strength", 0.8), pop("num_augment", 3)
        momentum, correct = pop("momentum", 0.8), pop("neighbor_correction", True)
        init = lambda key: ((), iaa_init(num_classes, dim))  # noqa: E731

        def loss(params, state, x, y, key, step, cluster_ids=None, base=None):
            state = iaa_update(state, x, y, momentum=momentum)
            var = iaa_neighbor_correction(state) if correct else state.variance
            s = iaa_strength_schedule(_progress(step, total_steps), strength=strength)
            sx, sy = iaa_synthesize(key, x, y, var, strength=s, num_augment=num_augment)
            return base(jnp.concatenate([x, sx]), jnp.concatenate([y, sy])), state

    elif name == "das":
        kw = {k: pop(k, v) for k, v in (("num_produce", 3), ("shift_scale", 0.01), ("scale_range", (0.5, 2.0)))}
        num_scale, bank_size = pop("num_scale", 4), pop("bank_size", 10)
        init = lambda key: ((), das_init(num_classes, dim, bank_size=bank_size))  # noqa: E731

        def loss(params, state, x, y, key, step, cluster_ids=None, base=None):
            k1, k2 = jax.random.split(key)
            state = das_update(state, x, y, k1, num_scale=num_scale)
            ex, ey = das_augment(state, x, y, k2, num_scale=num_scale, **kw)
            return base(ex, ey), state

    elif name == "divide_conquer":
        num_learners, finetune_fraction = pop("num_learners", NUM_LEARNERS), pop("finetune_fraction", 0.0)
        if not 0.0 <= finetune_fraction <= 1.0:
            raise ValueError(f"finetune_fraction must be in [0, 1], got {finetune_fraction}")
        init = lambda key: ((), ())  # noqa: E731

        def loss(params, state, x, y, key, step, cluster_ids=None, base=None):
            if cluster_ids is None:
                raise ValueError("cluster_ids must be passed for divide_conquer (k-means ids of the batch items)")
            split = functools.partial(divide_and_conquer_loss, loss_fn=base, num_learners=num_learners)
            if finetune_fraction == 0.0:
                return split(x, y, cluster_ids), state
            merged = jnp.asarray(step) >= total_steps * (1.0 - finetune_fraction)  # use_full_embedding
            value = jax.lax.cond(merged, lambda: split(x, y, cluster_ids, full_embedding=True),
                                 lambda: split(x, y, cluster_ids))
            return value, state

    elif name == "alternating_projection":
        weight, repeat = pop("weight", 0.1), pop("repeat", 5)
        reps = pop("representatives", None)
        if reps is None:
            raise ValueError("representatives must be given for alternating_projection (representative_mask)")
        reps = jnp.asarray(reps, bool)
        init = lambda key: ((), jnp.zeros((reps.shape[0], dim), jnp.float32))  # noqa: E731

        def loss(params, state, x, y, key, step, cluster_ids=None, base=None):
            if reps.shape[0] != x.shape[0]:
                raise ValueError(f"representatives has {reps.shape[0]} entries but the batch {x.shape[0]} rows")
            targets = projection_targets(state.astype(x.dtype), x, step, repeat=repeat)
            reg = alternating_projection_regularizer(x, targets, reps, weight=weight)
            return base(x, y) + reg, targets

    else:  # bspml
        age0, growth = pop("age_initial", 0.5), pop("age_growth", 1.1)
        steps_per_epoch, balance = pop("steps_per_epoch", 100), pop("balance", 1.0)
        ms = {k: pop(k, v) for k, v in (("alpha", 2.0), ("beta", 50.0), ("base", 0.5), ("epsilon", 0.1))}
        init = lambda key: ((), ())  # noqa: E731

        def loss(params, state, x, y, key, step, cluster_ids=None, base=None):
            age = self_paced_age(jnp.asarray(step) // steps_per_epoch, initial=age0, growth=growth)
            v = bspml_sample_weights(x, y, age=age, balance=balance, alpha=ms["alpha"], beta=ms["beta"],
                                     base=ms["base"])
            return weighted_multi_similarity_loss(x, y, v, **ms), state

    if opt:
        raise ValueError(f"options not used by method {name!r}: {sorted(opt)}")

    @functools.wraps(loss)
    def checked_loss(params, state, embeddings, labels, key, step, cluster_ids=None, base_params=()):
        x = check_embeddings(embeddings)
        y = check_labels(labels, batch_size=x.shape[0])
        ids = None if cluster_ids is None else check_labels(cluster_ids, batch_size=x.shape[0], name="cluster_ids")
        if not isinstance(base_params, tuple):
            raise ValueError(f"base_params must be a tuple, got {type(base_params).__name__}")

        def base(e, lab, **kw):
            return base_loss(e, lab, *base_params, **kw)

        return loss(params, state, x, y, check_key(key), step, cluster_ids=ids, base=base)

    return Method(name, init, checked_loss)
