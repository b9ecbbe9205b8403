"""Builders of the trainer's parts from a config: sampler, augmentation, optimizer, train state.

Each reads its section of the config (every key has its default in `dmljax.configs.base`):
`build_sampler` (``config.sampler``, ``method.name=alternating_projection``),
`build_lifted_sampler` (``sampler.name=lifted_hard_negative``), `build_augment`
(``config.augment``), `build_optimizer` (``config.optim``), `build_train_state` (model +
objective + optimizer; ``loss.matryoshka_*``: `matryoshka_objective`), `build_step_fn`
(``train.data_parallel``, ``train.embed_chunk_size``: gradient caching), `load_teacher`
(``distill.teacher``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import numpy as np
from flax import nnx

from dmljax._validation import check_choice
from dmljax.methods._common import check_positive_int
from dmljax.train.checkpoint import Checkpointer
from dmljax.train.models import build_model
from dmljax.train.objective import build_objective
from dmljax.train.optim import make_optimizer
from dmljax.train.state import create_train_state

__all__ = ["SAMPLERS", "build_augment", "build_lifted_sampler", "build_optimizer", "build_sampler",
           "build_step_fn", "build_train_state", "embed_chunk_options", "hierarchical_sampler_options",
           "lifted_sampler_options", "load_teacher", "matryoshka_dims", "matryoshka_objective"]


def _augment(images, key, *, config):
    from dmljax.data.augment import augment
    return augment(key, images, config)


def build_augment(config):
    """``augment_fn(images, key)`` for `dmljax.train.state.create_train_state`, or None.

    ``augment.preset``: ``"affine"`` - rotations / shears / shifts / zooms from ``augment.*`` at
    ``data.image_size`` plus the elastic distortion ``augment.elastic_alpha / elastic_sigma``
    (0 = off; the Omniglot recipe); ``"imagenet"`` - `AugmentConfig.imagenet_style` at
    ``data.crop_size`` (random resized crop with ``augment.crop_scale``, horizontal flip
    ``augment.flip``; normalisation left to `dmljax.train.models.ImageInput`); ``""``: affine for
    the bundled Omniglot / toy data and conv-net backbones, imagenet otherwise.
    """
    from dmljax.data.augment import AugmentConfig
    a = config.augment
    if not a.enabled:
        return None
    affine = config.data.name in ("omniglot", "toy") or config.model.backbone == "convnet"
    preset = a.preset or ("affine" if affine else "imagenet")
    check_choice(preset, name="augment.preset", choices=("affine", "imagenet"))
    if preset == "imagenet":
        crop = int(config.data.crop_size) or int(config.data.image_size)
        aug = AugmentConfig.imagenet_style(crop)
        aug = dataclasses.replace(aug, crop_scale=tuple(a.crop_scale), flip=bool(a.flip), mean=None, std=None)
    else:
        aug = AugmentConfig(size=(config.data.image_size,) * 2, rotation=a.rotation, shear=a.shear,
                            translation=a.translation, zoom=tuple(a.zoom),
                            elastic_alpha=float(a.elastic_alpha), elastic_sigma=float(a.elastic_sigma))
    return functools.partial(_augment, config=aug)


def build_optimizer(config):
    """`dmljax.train.optim.make_optimizer` of ``config.optim`` (warm-up capped at num_steps)."""
    o = config.optim
    return make_optimizer(learning_rate=o.learning_rate, total_steps=o.num_steps,
                          warmup_steps=min(o.warmup_steps, o.num_steps), backbone_lr_mult=o.backbone_lr_mult,
                          head_lr_mult=o.head_lr_mult, loss_lr_mult=o.loss_lr_mult, weight_decay=o.weight_decay,
                          optimizer=o.optimizer)


def _with_tuples(config):
    """JSON turned the config's tuples into lists: back to tuples (the templates compare equal)."""
    def fix(node):
        for k in list(node.keys()):
            v = node[k]
            if hasattr(v, "keys"):
                fix(v)
            elif isinstance(v, list):
                node[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    fix(config)
    return config


def build_sampler(config, labels, *, class_super_labels=None):
    """The batch sampler of ``config.sampler`` over ``labels`` (int [N]).

    `MPerClassSampler` (``m_per_class``); `HierarchicalSampler` for ``sampler.name=hierarchical``
    (``class_super_labels``: int [num_classes], the super-class of each class, from the data
    source; see `hierarchical_sampler_options`); `RepeatedCompositionSampler` for
    ``method.name=alternating_projection`` (batches repeated ``method.options.repeat`` (T, default
    5) times, the first ``representatives_per_class`` items of each class fixed over the T steps).
    ``lifted_hard_negative`` starts from the class-balanced sampler (`build_lifted_sampler`)."""
    from dmljax.data.samplers import HierarchicalSampler, MPerClassSampler, RepeatedCompositionSampler
    s = config.sampler
    m = config.method
    hierarchical = hierarchical_sampler_options(config)
    if m.name == "alternating_projection":
        opts = {k: m.options[k] for k in ("repeat", "representatives_per_class") if k in m.options}
        return RepeatedCompositionSampler(labels, classes_per_batch=s.classes_per_batch,
                                          samples_per_class=s.samples_per_class, seed=config.seed, **opts)
    if hierarchical is not None:
        if class_super_labels is None:
            raise ValueError(f"sampler.name='hierarchical' needs super-classes; data.name={config.data.name!r} "
                             "has none (Omniglot: alphabets; SOP: product categories)")
        supers = np.asarray(class_super_labels)[np.asarray(labels)]
        return HierarchicalSampler(labels, supers, samples_per_class=s.samples_per_class, seed=config.seed,
                                   **hierarchical)
    return MPerClassSampler(labels, classes_per_batch=s.classes_per_batch,
                            samples_per_class=s.samples_per_class, seed=config.seed)


def hierarchical_sampler_options(config) -> dict | None:
    """``sampler.name=hierarchical``: ``{"super_classes_per_batch": S, "classes_per_super_class": P_s}``
    (None for the other samplers). ``sampler.options.classes_per_super_class`` (default 4) must
    divide ``sampler.classes_per_batch`` (P); S = P / P_s super-classes per batch, each giving
    P_s of its classes (hard negatives: Omniglot characters of one alphabet). ValueError naming
    the option otherwise."""
    s = config.sampler
    if s.name != "hierarchical":
        return None
    opts = dict(s.options)
    unknown = sorted(set(opts) - {"classes_per_super_class"})
    if unknown:
        raise ValueError(f"sampler.options: {unknown} are not options of hierarchical "
                         "(options: ['classes_per_super_class'])")
    _check_not_alternating_projection(config, sampler="hierarchical")
    opts = {**HIERARCHICAL_DEFAULTS, **opts}
    per_super = check_positive_int(opts["classes_per_super_class"], name="sampler.options.classes_per_super_class")
    classes = int(config.sampler.classes_per_batch)
    if classes % per_super:
        raise ValueError(f"sampler.options.classes_per_super_class ({per_super}) must divide "
                         f"sampler.classes_per_batch ({classes})")
    return {"super_classes_per_batch": classes // per_super, "classes_per_super_class": per_super}


def _check_not_alternating_projection(config, *, sampler: str) -> None:
    if config.method.name == "alternating_projection":
        raise ValueError(f"sampler.name={sampler!r} cannot be combined with "
                         "method.name='alternating_projection' (which fixes its own batch composition)")


SAMPLERS = ("m_per_class", "lifted_hard_negative", "hierarchical")
# the defaults of sampler.options (free-form per sampler); None = derived (lifted_sampler_options)
HIERARCHICAL_DEFAULTS = {"classes_per_super_class": 4}
LIFTED_DEFAULTS = {"num_pairs": None, "negatives_per_pair": None, "pool_size": 4096, "refresh_every": None}
_LIFTED_OPTIONS = ("num_pairs", "negatives_per_pair", "pool_size", "refresh_every")


def lifted_sampler_options(config, *, num_train: int, steps_per_epoch: int) -> dict | None:
    """``sampler.name=lifted_hard_negative``: its resolved options (None for the other samplers).

    ``sampler.options``: ``num_pairs`` (P) and ``negatives_per_pair`` (K) with P (2 + K) = the
    configured batch size ``classes_per_batch * samples_per_class`` (B); given one, the other
    follows; given neither, K = the largest of 6, 5, ..., 1 with (2 + K) | B (B = 128: 16 pairs x
    6 negatives). ``pool_size`` (default 4096, capped at the training-set size), ``refresh_every``
    (default one epoch of the class-balanced sampler). ValueError naming the option otherwise."""
    s = config.sampler
    check_choice(s.name, name="sampler.name", choices=SAMPLERS)
    opts = dict(s.options)
    if s.name == "m_per_class":
        if opts:
            raise ValueError(f"sampler.options {sorted(opts)} given with sampler.name='m_per_class', which has none")
        return None
    if s.name == "hierarchical":  # its options are checked by build_sampler
        return None
    unknown = sorted(set(opts) - set(_LIFTED_OPTIONS))
    if unknown:
        raise ValueError(f"sampler.options: {unknown} are not options of lifted_hard_negative "
                         f"(options: {list(_LIFTED_OPTIONS)})")
    _check_not_alternating_projection(config, sampler="lifted_hard_negative")

    opts = {**LIFTED_DEFAULTS, **opts}

    def positive(name):
        v = opts[name]
        return None if v is None else check_positive_int(v, name=f"sampler.options.{name}")

    batch = int(config.sampler.classes_per_batch) * int(config.sampler.samples_per_class)
    pairs, negs = positive("num_pairs"), positive("negatives_per_pair")
    if pairs is None and negs is None:
        negs = next((k for k in range(6, 0, -1) if batch % (2 + k) == 0), None)
        if negs is None:
            raise ValueError(f"sampler.options.num_pairs / negatives_per_pair: no default for the batch size "
                             f"{batch}; set them with num_pairs * (2 + negatives_per_pair) == {batch}")
    if pairs is None:
        if batch % (2 + negs):
            raise ValueError(f"sampler.options.negatives_per_pair: 2 + {negs} does not divide the batch size {batch} "
                             "(classes_per_batch * samples_per_class)")
        pairs = batch // (2 + negs)
    if negs is None:
        if batch % pairs or batch // pairs < 3:
            raise ValueError(f"sampler.options.num_pairs: {pairs} pairs of 2 + negatives_per_pair >= 3 items "
                             f"do not fill the batch size {batch}")
        negs = batch // pairs - 2
    if pairs * (2 + negs) != batch:
        raise ValueError(f"sampler.options.num_pairs * (2 + negatives_per_pair) = {pairs * (2 + negs)} must equal "
                         f"the batch size classes_per_batch * samples_per_class = {batch}")
    pool = min(positive("pool_size"), int(num_train))
    if negs > pool:
        raise ValueError(f"sampler.options.negatives_per_pair must be <= the pool size {pool}, got {negs}")
    refresh = positive("refresh_every") or max(int(steps_per_epoch), 1)
    return {"num_pairs": pairs, "negatives_per_pair": negs, "pool_size": pool, "refresh_every": refresh}


def build_lifted_sampler(config, base_sampler, images, labels, *, key, embed_fn=None, log=None):
    """`dmljax.train.lifted_pool.LiftedHardNegativeSampler` of ``sampler.name=lifted_hard_negative``
    around ``base_sampler`` (pair key ``fold_in(key, 0x11F7)``), or None for the plain sampler."""
    opts = lifted_sampler_options(config, num_train=len(labels), steps_per_epoch=base_sampler.steps_per_epoch)
    if opts is None:
        return None
    from dmljax.train.lifted_pool import LiftedHardNegativeSampler
    return LiftedHardNegativeSampler(images, labels, base_sampler=base_sampler, seed=int(config.seed),
                                     key=jax.random.fold_in(key, 0x11F7), embed_fn=embed_fn, log=log, **opts)


def build_train_state(config, *, num_classes: int, num_train: int, steps_per_epoch: int, teacher=None):
    """(TrainState, Objective) of ``config``: model, optimizer, loss / method / memory objective.

    A run is rebuilt (for ``--resume`` or as a teacher) by calling this with the same config and
    counts: the checkpoint's leaves then match the template's structure."""
    key = jax.random.key(config.seed)
    k_loss, _ = jax.random.split(key)
    model = build_model(config, config.seed)
    objective = build_objective(
        config, num_classes=num_classes, num_train=num_train, dim=int(config.model.embedding_dim),
        batch_size=config.sampler.classes_per_batch * config.sampler.samples_per_class,
        steps_per_epoch=steps_per_epoch, key=k_loss, distill=teacher is not None)
    objective = matryoshka_objective(config, objective)
    tx = build_optimizer(config)
    state = create_train_state(model, tx, objective.loss_fn, objective.loss_params, augment_fn=build_augment(config),
                               freeze_batch_norm=config.optim.freeze_batch_norm, method_fn=objective.method_fn,
                               loss_state=objective.loss_state, teacher=teacher)
    return state, objective


def matryoshka_dims(config) -> tuple[int, ...] | None:
    """``loss.matryoshka_dims`` validated against ``model.embedding_dim`` (distinct ints in
    [1, D]), or None when off. ValueError naming the key otherwise."""
    from dmljax.losses.matryoshka import check_prefix_dims
    dims = config.loss.matryoshka_dims
    if dims is None:
        return None
    return check_prefix_dims(dims, int(config.model.embedding_dim), name="loss.matryoshka_dims")


def matryoshka_objective(config, objective):
    """``loss.matryoshka_dims`` set: the objective's ``loss_fn`` wrapped by
    `dmljax.losses.matryoshka.matryoshka` (Kusupati et al. 2022: the loss on each prefix
    ``z[:, :m]``, weights ``loss.matryoshka_weights`` (None = 1 each), prefixes L2-normalised
    with ``loss.matryoshka_normalize``; proxies sliced like the embedding); unchanged otherwise.

    Needs a plain loss (``loss_fn``): ValueError with a stateful objective (``method.name``,
    ``memory.size``, ``distill.teacher``, the lifted sampler) or ``model.backbone=global_local``
    (whose embedding is two concatenated embeddings, not one nested one)."""
    from dmljax.losses.matryoshka import matryoshka
    dims = matryoshka_dims(config)
    weights = config.loss.matryoshka_weights
    if dims is None:
        if weights is not None:
            raise ValueError("loss.matryoshka_weights given without loss.matryoshka_dims")
        return objective
    if config.model.backbone == "global_local":
        raise ValueError("loss.matryoshka_dims cannot be combined with model.backbone='global_local'")
    if objective.loss_fn is None:
        raise ValueError("loss.matryoshka_dims needs a plain loss: method.name='none', memory.size=0, no "
                         f"distill.teacher, no lifted_hard_negative sampler (method.name={config.method.name!r})")
    if weights is not None:
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(dims):
            raise ValueError(f"loss.matryoshka_weights must have one weight per prefix of loss.matryoshka_dims "
                             f"{dims}, got {weights!r}")
        if any(not np.isfinite(float(w)) or float(w) < 0 for w in weights):
            raise ValueError(f"loss.matryoshka_weights must be finite and >= 0, got {tuple(weights)}")
    fn = matryoshka(objective.loss_fn, dims=dims, weights=None if weights is None else tuple(weights),
                    normalize=bool(config.loss.matryoshka_normalize))
    return dataclasses.replace(objective, loss_fn=fn)


def embed_chunk_options(config, *, num_devices: int = 1) -> dict | None:
    """``train.embed_chunk_size`` validated: ``{"chunk_size", "num_chunks", "unroll"}`` per device,
    or None when off. The chunk must divide the per-device batch ``classes_per_batch *
    samples_per_class / num_devices``. ValueError naming the key otherwise."""
    chunk = config.train.embed_chunk_size
    if chunk is None:
        return None
    chunk = check_positive_int(chunk, name="train.embed_chunk_size")
    batch = int(config.sampler.classes_per_batch) * int(config.sampler.samples_per_class)
    if batch % num_devices:
        raise ValueError(f"the batch size {batch} must be divisible by the number of devices {num_devices}")
    local = batch // num_devices
    if local % chunk:
        raise ValueError(f"train.embed_chunk_size ({chunk}) must divide the per-device batch size {local} "
                         f"(classes_per_batch * samples_per_class / {num_devices} devices)")
    return {"chunk_size": chunk, "num_chunks": local // chunk, "unroll": True if config.train.embed_chunk_unroll else 1}


def build_step_fn(config, state, *, devices=None, mesh=None):
    """The jitted train step of ``config.train``: `dmljax.train.step.train_step`, or
    `make_parallel_train_step` over ``mesh`` (given: always data-parallel, e.g. the global mesh of
    a multi-process run) or over ``devices`` (default: the local devices) with
    ``train.data_parallel``; with ``train.embed_chunk_size`` their gradient-caching counterparts
    (`dmljax.train.grad_cache`: exact gradients with the activations of one chunk in memory;
    BatchNorm in train mode then normalises per chunk, see that module). Gradient caching needs
    a plain loss (``state.method_fn`` None): ValueError for ``method.name``, ``memory.size``,
    ``distill.teacher`` or the lifted sampler."""
    from dmljax.train.grad_cache import grad_cache_train_step, make_parallel_grad_cache_train_step
    from dmljax.train.step import data_mesh, make_parallel_train_step, train_step
    parallel = bool(config.train.data_parallel) or mesh is not None
    if mesh is None:
        devices = list(jax.local_devices() if devices is None else devices)
        mesh = data_mesh(devices) if parallel else None
    opts = embed_chunk_options(config, num_devices=mesh.size if parallel else 1)
    if opts is not None and state.method_fn is not None:
        raise ValueError("train.embed_chunk_size (gradient caching) needs a plain loss: method.name='none', "
                         "memory.size=0, no distill.teacher, no lifted_hard_negative sampler "
                         f"(method.name={config.method.name!r}, distill.teacher={config.distill.teacher!r})")
    if opts is None:
        return make_parallel_train_step(mesh) if parallel else jax.jit(train_step)
    if parallel:
        return make_parallel_grad_cache_train_step(mesh, chunk_size=opts["chunk_size"],
                                                   unroll=opts["unroll"])
    return jax.jit(functools.partial(grad_cache_train_step, chunk_size=opts["chunk_size"], unroll=opts["unroll"]))


def load_teacher(workdir: str, *, num_classes: int, num_train: int):
    """The frozen model of the run in ``workdir``: its ``config.json`` rebuilds the train state
    (with its ``run_info.json`` counts), the best checkpoint (else the latest) fills it."""
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"distill.teacher: {workdir!r} has no config.json (not a workdir of the trainer)")
    with open(path) as f:
        tconfig = ml_collections.ConfigDict(json.load(f))
    tconfig = _with_tuples(tconfig)
    tconfig.distill.teacher = ""
    info_path = os.path.join(workdir, "run_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        num_classes, num_train = int(info["num_classes"]), int(info["num_train"])
    sampler_steps = max(num_train // max(tconfig.sampler.classes_per_batch * tconfig.sampler.samples_per_class, 1), 1)
    template, _ = build_train_state(tconfig, num_classes=num_classes, num_train=num_train,
                                    steps_per_epoch=sampler_steps)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), best_metric="recall@1")
    try:
        restored = ckpt.restore_best(template) or ckpt.restore_latest(template)
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"distill.teacher: no checkpoint under {workdir}/checkpoints")
    teacher = nnx.merge(restored.graphdef, restored.params["model"], restored.batch_stats)
    teacher.eval()
    return teacher, int(restored.step)
