"""Train an embedding model and report DML metrics on unseen classes.

    python -m experiments.train                                  # standard Omniglot protocol, CPU
    python -m experiments.train --config omniglot_small          # minimal protocol (fast)
    python -m experiments.train --set optim.num_steps=500 --set loss.name=multi_similarity
    python -m experiments.train --resume                         # continue from the latest checkpoint
                                                                 # (same config; without --resume the
                                                                 # workdir's checkpoints are replaced)

Writes ``<workdir>/metrics.jsonl`` (one JSON record per logged step / evaluation),
``<workdir>/metrics.csv`` (train scalars), ``<workdir>/final.json`` (the final table),
``<workdir>/run_info.json`` (class / item counts, read when the run is used as a teacher),
TensorBoard events when tensorboardX is installed, and orbax checkpoints under
``<workdir>/checkpoints/{latest,best}``.

Trainer flags (all ``--set key=value``; values are Python literals):

* ``loss.name=<name>``: any training loss exported by `dmljax.losses` (`available_losses()`:
  short names such as ``contrastive``, ``arcface``, ``soft_triple``, ``proxy_nca``, ``circle``,
  or the full function name); ``loss.options.<kw>=...`` sets any keyword option of it (plus
  initialiser options: ``proxies_per_class``, ``centers_per_class``, ``sub_centers``,
  ``num_proxies``, ``init_std``, ``beta_init``, ``class_specific``; center loss ``alpha``).
  Learnable arrays (proxies, class weights, margin-loss beta) are created with the initialiser of
  the matching head of `dmljax.models.proxies` / `classifier_heads` and trained at
  ``optim.loss_lr_mult``; the center loss's centers and the dynamic soft margin's histogram are
  carried state. The historic keys ``loss.margin / alpha / ms_*`` still configure
  proxy_anchor, triplet and multi_similarity.
* ``loss.name=ensemble loss.components="['multi_similarity','proxy_anchor']"``: learned loss
  weights (`dmljax.losses.ensemble`, ``loss.options.method`` uncertainty | softmax), logged as
  ``loss_weight/<i>_<name>`` at every log step. Components may be dicts ``{"name": ...,
  "options": {...}}``.
* ``method.name=<m>`` in ``none, daml, hard_sample_generation, iaa, das, divide_conquer,
  alternating_projection, bspml`` with ``method.options.<kw>=...`` (`dmljax.methods.plugin`
  options): the method wraps the configured base loss; its generator / refiner networks train
  with the loss parameters, its state (IAA / DAS statistics, projection targets, ...) is carried
  and checkpointed. ``alternating_projection`` switches the sampler to
  `RepeatedCompositionSampler` (``method.options.repeat``, ``representatives_per_class``).
  ``divide_conquer`` re-clusters the whole training set with k-means every
  ``method.options.recluster_every`` steps (default 2 epochs; `dmljax.train.loop.KMeansReclustering`,
  a before-step callback of the loop) and passes the batch's cluster ids to the method.
* ``data.label_noise=0.2`` (``data.label_noise_kind`` symmetric | pairflip): corrupt that
  fraction of the training labels (`dmljax.methods.label_noise`), e.g. for ``bspml``.
* ``augment.elastic_alpha`` / ``augment.elastic_sigma`` (grey-scale conv-net data): elastic
  distortion (Simard et al. 2003, `dmljax.data.augment.elastic_displacement`) in the affine
  warp, 0 = off; ``model.pool_padding="SAME"`` keeps an odd last row / column when pooling;
  ``model.stem="space_to_depth"`` folds 2x2 pixel blocks into channels in place of the first pool
  (`dmljax.models.convnet.space_to_depth_2x2`).
* ``sampler.name=hierarchical``: super-class -> class -> item batches
  (`dmljax.data.samplers.HierarchicalSampler`): ``classes_per_batch / P_s`` super-classes per
  batch, ``sampler.options.classes_per_super_class`` (P_s, default 4) classes of each, so the
  negatives of a batch are mostly siblings (Omniglot: characters of the same alphabet, per
  rotation; SOP: the same product category). Needs a data source with super-classes.
* ``sampler.name=lifted_hard_negative`` (default ``m_per_class``): the hard-negative batches of
  the lifted structured embedding (Oh Song et al. 2016, Sec. 4;
  `dmljax.train.lifted_pool.LiftedHardNegativeSampler`, a before-step hook + sampler): every
  ``sampler.options.refresh_every`` steps (default one epoch; first at that step, not at step 0)
  ``pool_size`` random training images (default 4096, capped at the training-set size) are
  embedded with the current model; each batch is ``num_pairs`` random positive pairs of the pool,
  each followed by its ``negatives_per_pair`` nearest other-class pool items
  (``num_pairs * (2 + negatives_per_pair)`` must equal ``classes_per_batch * samples_per_class``;
  default 16 x (2 + 6) for 128). Before the first refresh, and for slots the pool cannot fill, the
  class-balanced batch. The pool lives in the checkpointed ``loss_state["lifted_pool"]`` (so the
  step runs the stateful-objective path), so ``--resume`` replays the same batches. Combines with
  any loss / method / memory except ``alternating_projection``.
* ``memory.size=N`` (``memory.start_step``): cross-batch memory (XBM) of N embeddings for a pair
  loss (`build_memory_loss`).
* ``distill.teacher=<workdir> distill.weight=1.0`` (``distance_weight``, ``angle_weight``):
  relational knowledge distillation (RKD, `dmljax.losses.distillation`) from the frozen model of
  an earlier run (rebuilt from its ``config.json`` and best checkpoint) into the configured model.
* ``model.backbone=global_local`` (``model.global_local.local_dim / local_embedding_dim /
  local_weight``): global + second-order-attention local embeddings
  (`dmljax.models.attention`), trained with ``L(global) + local_weight L(local)`` of the
  configured loss; ``loss.name=hybrid_pair_proxy`` gives the abstract's hybrid pair + proxy loss.
* ``eval.precise_bn_batches=K`` (``eval.precise_bn_batch_size``): evaluate with PreciseBN
  statistics (Wu & Johnson 2021; `dmljax.train.precise_bn`) of K batches of un-augmented training
  images instead of the running averages of the augmented training batches; 0 = off.
  ``eval.final_tta_shifts``: test-time views of the last evaluation only (() = ``eval.tta_shifts``).
* ``eval.rerank="similarity"``: at the end, `experiments.rerank.rerank_report` re-ranks the test
  kNN lists with a similarity network trained on the training embeddings; its metrics are merged
  into the final table.
* a config with ``entry="module.path"`` is not trained here: ``main`` returns
  ``importlib.import_module(entry).run(config, workdir)`` (e.g. the synthetic tasks).
* ``data.name="toy"``: a tiny synthetic image set (`dmljax.train.toy`), for smoke tests.

XLA:CPU: ``main`` adds ``--xla_cpu_experimental_ynn_fusion_type=`` to ``XLA_FLAGS`` before the
backend starts (`dmljax.train.xla_cpu.use_fast_cpu_flags`: the conv-net step ~1.2-1.4x faster on
CPU with jaxlib 0.10; skipped when ``XLA_FLAGS`` already sets it or ``DMLJAX_DEFAULT_XLA_FLAGS=0``).
``python -m experiments.train`` also makes glibc keep freed host memory mapped
(`dmljax.train.xla_cpu.keep_freed_host_memory`: no per-step ``mmap`` / page faults for XLA's
temporary buffers; the process keeps its peak memory; opt out ``DMLJAX_KEEP_HOST_MEMORY=0``).

Multi-device: ``--set train.data_parallel=True`` shards each global batch over all local
devices with ``jax.shard_map`` (see `dmljax.train.step.make_parallel_train_step`). Multi-host:
start one process per host with ``JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N
JAX_PROCESS_ID=i python -m experiments.train --distributed ...``; ``--distributed`` calls
``jax.distributed.initialize()`` before anything else touches the devices.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import functools
import importlib
import inspect
import json
import os
import shutil
import sys
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmljax._validation import check_choice, check_scalar
from dmljax.methods._common import check_positive_int
from dmljax.models.convnet import ConvNet
from dmljax.models.heads import EmbeddingHead, EmbeddingModel
from dmljax.train.checkpoint import Checkpointer
from dmljax.train.loop import KMeansReclustering, fit
from dmljax.train.optim import make_optimizer
from dmljax.train.state import create_train_state
from dmljax.train.step import data_mesh, embed, make_parallel_train_step, train_step
from dmljax.train.xla_cpu import keep_freed_host_memory, use_fast_cpu_flags
from experiments.configs import get_config


# ----------------------------------------------------------------------------- config
def apply_overrides(config, overrides):
    """``key.sub=value`` strings -> config (values parsed as Python literals, else strings).

    Keys must exist, except below an ``options`` node (``loss.options.<kw>``,
    ``method.options.<kw>``), whose entries are free-form keyword options."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node:
                raise ValueError(f"--set: unknown config key {key!r}")
            node = node[p]
        if leaf not in node:
            if parents and parents[-1] == "options":
                node[leaf] = value
                continue
            raise ValueError(f"--set: unknown config key {key!r}")
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value
    return config


# ----------------------------------------------------------------------------- parts
TOY_TRAIN_CLASSES, TOY_TEST_CLASSES, TOY_PER_CLASS = 8, 4, 8


def _toy_source(config):
    """``data.name="toy"``: `dmljax.train.toy.toy_images` at ``data.image_size``; 8 training
    classes, 4 unseen test classes (other random patterns), 8 images each; training classes
    2k and 2k + 1 form super-class k (for ``sampler.name=hierarchical``)."""
    from dmljax.train.toy import toy_images
    from experiments.data_sources import DataSource, EvalSet
    size = int(config.data.image_size)
    images, labels = toy_images(config.seed, num_classes=TOY_TRAIN_CLASSES, per_class=TOY_PER_CLASS, size=size)
    test_images, test_labels = toy_images(config.seed + 1, num_classes=TOY_TEST_CLASSES,
                                          per_class=TOY_PER_CLASS, size=size)
    return DataSource("toy", images, labels, TOY_TRAIN_CLASSES, EvalSet(test_images, test_labels), channels=1,
                      class_super_labels=np.arange(TOY_TRAIN_CLASSES, dtype=np.int32) // 2)


def _grey_convnet_data(config) -> bool:
    return config.data.name in ("omniglot", "toy")


def load_data(config):
    if config.data.name == "toy":
        source = _toy_source(config)
        return source.train_images, source.train_labels, source.num_classes, source, None
    from experiments.data_sources import load_data_source
    source = load_data_source(config)  # stands in for `test` (.images / .labels = the test set)
    return source.train_images, source.train_labels, source.num_classes, source, source.one_shot_runs


def add_label_noise(config, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``data.label_noise`` > 0: corrupt exactly that fraction of the training labels
    (`dmljax.methods.label_noise.inject_label_noise`, kind ``data.label_noise_kind``; key from
    the seed), as in the noisy-label experiments of BSPML. The test labels stay clean."""
    rate = float(config.data.get("label_noise", 0.0) or 0.0)
    if rate == 0.0:
        return labels
    from dmljax.methods.label_noise import inject_label_noise
    kind = config.data.get("label_noise_kind", "symmetric")
    key = jax.random.fold_in(jax.random.key(config.seed), 0x4E015E)
    noisy = inject_label_noise(key, jnp.asarray(labels, jnp.int32), rate=rate, kind=kind, num_classes=num_classes)
    return np.asarray(noisy, np.int32)


class ConvFeatureMap(nnx.Module):
    """The Omniglot `ConvNet` without its final pooling: images -> feature map [N, s, s, C]."""

    def __init__(self, in_channels: int, channels, *, num_pools: int, input_size: int, rngs: nnx.Rngs):
        self.net = ConvNet(in_channels, tuple(channels), num_pools=num_pools, pooling="flatten",
                           input_size=input_size, rngs=rngs)
        self.side = input_size // 2 ** num_pools
        self.channels = int(channels[-1])

    def __call__(self, images: jax.Array) -> jax.Array:
        flat = self.net(images)
        return flat.reshape(flat.shape[0], self.side, self.side, self.channels)


class GlobalLocalModel(nnx.Module):
    """``backbone`` feature map -> `dmljax.models.attention.GlobalLocalEmbedding` -> the
    concatenation [global (D), local (D_local)] of the two unit embeddings (the step's loss
    splits it again; retrieval uses the concatenation, i.e. cosine of the pair averaged)."""

    def __init__(self, backbone: nnx.Module, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, images: jax.Array) -> jax.Array:
        g, l = self.head(self.backbone(images))
        return jnp.concatenate([g, l], axis=-1)


def build_model(config, key: int):
    if config.model.backbone == "global_local":
        if not _grey_convnet_data(config):
            raise ValueError("model.backbone='global_local' is available for data.name 'omniglot' / 'toy'")
        from dmljax.models.attention import GlobalLocalEmbedding
        gl = _section(config.model, "global_local", local_dim=64, local_embedding_dim=0, local_weight=1.0)
        rngs = nnx.Rngs(key)
        backbone = ConvFeatureMap(1, config.model.channels, num_pools=config.model.num_pools,
                                  input_size=config.data.image_size, rngs=rngs)
        head = GlobalLocalEmbedding(backbone.channels, config.model.embedding_dim, local_dim=int(gl.local_dim),
                                    local_embedding_dim=int(gl.local_embedding_dim) or None, rngs=rngs)
        return GlobalLocalModel(backbone, head)
    if not _grey_convnet_data(config) or config.model.backbone != "convnet":
        from experiments.data_sources import build_model as build_source_model
        return build_source_model(config, rngs=nnx.Rngs(key))
    rngs = nnx.Rngs(key)
    backbone = ConvNet(1, tuple(config.model.channels), num_pools=config.model.num_pools,
                       pooling=config.model.pooling,
                       pool_padding=config.model.get("pool_padding", "VALID"), input_size=config.data.image_size,
                       stem=config.model.get("stem", "conv"), rngs=rngs)
    head = EmbeddingHead(backbone.features, config.model.embedding_dim,
                         norm=config.model.head_norm or None, rngs=rngs)
    return EmbeddingModel(backbone, head)


def build_loss(config, num_classes: int, key):
    """``(loss_fn, loss_params)`` of ``loss.name`` for a plain (stateless, key-free) loss; see
    `build_objective` for everything else."""
    spec = build_loss_spec(config, num_classes=num_classes, dim=config.model.embedding_dim, key=key)
    if spec.plain is None:
        raise ValueError(f"loss {spec.name} carries a state or needs a key: use build_objective")
    return spec.plain, spec.params


# ----------------------------------------------------------------------------- loss registry
# Every loss exported by dmljax.losses whose signature is ``fn(embeddings, labels[, learnable
# array], *, options...) -> scalar`` is selectable as ``loss.name`` (short name without the
# "_loss" suffix, or the full function name). Learnable arrays are created here with the
# initialisation of the matching head in dmljax.models.{proxies,classifier_heads} (the init
# helpers of the library); two losses carry a non-trainable state (center loss: the centers,
# moved by Wen et al.'s update rule; dynamic soft margin: its running histogram).
LOSS_ALIASES = {"triplet": "triplet_margin_loss"}
# exported by dmljax.losses but not an (embeddings, labels[, params]) -> scalar training loss
NOT_TRAINABLE_LOSSES = {
    "fraction_active_triplets": "a batch statistic, not a loss",
    "imprint_weights": "returns class weights (an initialiser), not a loss",
    "hier_regularized_loss": "needs a base_loss callable: use loss.name=ensemble or hier",
    "log_ratio_loss": "takes continuous targets, not class labels",
}
_STATE_KW = ("valid", "key")  # never options: the trainer passes them


def _fold(key, i):
    return None if key is None else jax.random.fold_in(key, i)


def _head_param(head_cls, attr, *args, **kwargs):
    """Initial array of ``head_cls(*args, rngs=..., **kwargs).attr`` (the library's initialiser)."""
    from flax import nnx as _nnx

    def build(key):
        head = head_cls(*args, rngs=_nnx.Rngs(params=key), **kwargs)
        return jnp.asarray(getattr(head, attr)[...], jnp.float32)
    return build


def _param_init(fname: str, opts: dict, num_classes: int, dim: int):
    """(init(key) -> array, options consumed by the initialiser) for a loss with one learnable
    array after the labels, or None when the loss has none / is unknown."""
    from dmljax.models import classifier_heads as ch
    from dmljax.models import proxies as px
    C, D = num_classes, dim
    pop = opts.pop
    if fname == "proxy_anchor_loss":
        # the trainer's historic initialisation: N(0, 2 / D) (results recorded in the configs use it)
        return lambda key: (jax.random.normal(key, (C, D)) * np.sqrt(2.0 / D)).astype(jnp.float32)
    if fname == "proxy_nca_loss":
        return _head_param(px.ProxyNCAHead, "proxies", C, D)
    if fname == "multi_proxy_anchor_loss":
        return _head_param(px.MultiProxyAnchorHead, "proxies", C, D, int(pop("proxies_per_class", 3)))
    if fname == "soft_triple_loss":
        return _head_param(px.SoftTripleHead, "proxies", C, D, int(pop("centers_per_class", 10)))
    if fname == "hier_loss":
        return _head_param(px.HIERHead, "proxies", int(pop("num_proxies", 512)), D,
                           clip_r=opts.get("clip_r", 2.3) or 2.3)
    heads = {"normalized_softmax_loss": ch.NormalizedSoftmaxHead, "cosface_loss": ch.CosFaceHead,
             "arcface_loss": ch.ArcFaceHead, "sphereface_loss": ch.SphereFaceHead,
             "large_margin_softmax_loss": ch.LargeMarginSoftmaxHead}
    if fname in heads:
        return _head_param(heads[fname], "weights", C, D, init_std=float(pop("init_std", 1.0)))
    if fname == "subcenter_arcface_loss":
        return _head_param(ch.SubCenterArcFaceHead, "weights", C, D, int(pop("sub_centers", 3)),
                           init_std=float(pop("init_std", 1.0)))
    if fname in ("hybrid_pair_proxy_loss", "manifold_loss"):
        return lambda key: px.kaiming_normal_fan_out(key, (C, D))
    if fname == "p2sgrad_loss":  # class weights N(0, init_std^2), normalised inside the loss
        std = float(pop("init_std", 1.0))
        return lambda key: jax.random.normal(key, (C, D)) * std
    if fname == "instance_loss":  # a plain fully connected layer (PyTorch Linear init)
        return lambda key: jax.random.uniform(key, (C, D), jnp.float32, -1.0, 1.0) / np.sqrt(D)
    if fname == "margin_loss":  # learnable boundary beta, per class unless class_specific=False
        beta0 = float(pop("beta_init", 1.2))  # Wu et al. 2017 initialise beta to 1.2
        shape = (C,) if pop("class_specific", True) else ()
        return lambda key: jnp.full(shape, beta0, jnp.float32)
    return None


def _legacy_options(fname: str, loss_cfg) -> dict:
    """The config keys the 3 historic loss names always had (loss.margin, loss.ms_*, ...)."""
    g = loss_cfg.get
    if fname == "proxy_anchor_loss":
        return {"margin": g("margin", 0.1), "alpha": g("alpha", 32.0)}
    if fname == "multi_similarity_loss":
        return {"alpha": g("ms_alpha", 2.0), "beta": g("ms_beta", 50.0), "base": g("ms_base", 0.5),
                "epsilon": g("ms_epsilon", 0.1)}
    if fname == "triplet_margin_loss":
        return {"margin": g("margin", 0.2)}
    return {}


@functools.lru_cache(maxsize=1)
def _loss_functions() -> dict:
    """name -> function of every ``dmljax.losses`` export ``*_loss(embeddings, labels, ...)``
    (``manifold_loss(embeddings, meta_classes, proxies)`` takes the class labels as its
    meta-classes), minus `NOT_TRAINABLE_LOSSES`."""
    import dmljax.losses as L
    out = {}
    for n in sorted(dir(L)):
        fn = getattr(L, n)
        if n.startswith("_") or not callable(fn) or not n.endswith("_loss") or n in NOT_TRAINABLE_LOSSES:
            continue
        positional = [p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if positional[:2] in (["embeddings", "labels"], ["embeddings", "meta_classes"]):
            out[n] = fn
    return out


def available_losses() -> tuple[str, ...]:
    """Every name ``loss.name`` accepts (short names; the full function names work too)."""
    names = set()
    for n in _loss_functions():
        names.add(n[:-5] if n.endswith("_loss") else n)
    return tuple(sorted(names | set(LOSS_ALIASES) | {"ensemble"}))


def resolve_loss_name(name) -> str:
    """``loss.name`` -> the dmljax.losses function name; ValueError listing the names otherwise."""
    funcs = _loss_functions()
    if not isinstance(name, str):
        raise ValueError(f"loss.name must be a string, got {name!r}")
    for candidate in (LOSS_ALIASES.get(name, name), f"{name}_loss"):
        if candidate in funcs:
            return candidate
    why = NOT_TRAINABLE_LOSSES.get(name) or NOT_TRAINABLE_LOSSES.get(f"{name}_loss")
    extra = f" ({name}: {why})" if why else ""
    raise ValueError(f"loss.name {name!r} is not a trainable loss{extra}; choose one of "
                     f"{', '.join(available_losses())}")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A configured loss in one calling convention:
    ``call(params: tuple, state, embeddings, labels, key, valid=None) -> (scalar, new_state)``.

    ``plain`` is ``plain(embeddings, labels, *params)`` when the loss needs neither a state nor a
    key (the train step's ``loss_fn``), else None. ``names`` label the components (ensembles)."""

    name: str
    call: Callable
    params: tuple
    state: Any = ()
    plain: Callable | None = None
    options: dict = dataclasses.field(default_factory=dict)
    names: tuple = ()

    @property
    def stateful(self) -> bool:
        return bool(jax.tree.leaves(self.state))


def _kw_options(fn) -> dict[str, inspect.Parameter]:
    return {p.name: p for p in inspect.signature(fn).parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.name not in _STATE_KW}


def build_single_loss(name, options, *, loss_cfg, num_classes: int, dim: int, key) -> LossSpec:
    """One library loss (see the registry comment above) with its options and learnable array."""
    fname = resolve_loss_name(name)
    fn = _loss_functions()[fname]
    opts = {**_legacy_options(fname, loss_cfg), **dict(options or {})}
    init = _param_init(fname, opts, num_classes, dim)
    kw = _kw_options(fn)
    params_sig = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if fname == "center_loss":
        from dmljax.losses.classification import center_update
        from dmljax.models.classifier_heads import xavier_uniform_centers
        alpha = float(opts.pop("alpha", 0.5))  # Wen et al.: the centers' update rate
        _check_options(fname, opts, kw)
        bound = functools.partial(fn, **opts)

        def call(params, centers, x, y, k, valid=None):
            value = bound(x, y, centers, **({} if valid is None else {"valid": valid}))
            return value, center_update(centers, x, y, alpha=alpha, valid=valid)
        return LossSpec(fname, call, (), xavier_uniform_centers(key, (num_classes, dim)), None, opts, (fname,))
    if fname == "dynamic_soft_margin_loss":
        _check_options(fname, opts, kw)
        bound = functools.partial(fn, **opts)
        bins = int(opts.get("num_bins", kw["num_bins"].default))

        def call(params, hist, x, y, k, valid=None):
            return bound(x, y, hist, **({} if valid is None else {"valid": valid}))
        return LossSpec(fname, call, (), jnp.zeros((bins,), jnp.float32), None, opts, (fname,))
    needs_array = len(params_sig) > 2 and params_sig[2].default is inspect.Parameter.empty
    if needs_array and init is None:
        raise ValueError(f"loss.name {name!r}: no initialiser for its learnable array {params_sig[2].name!r}")
    _check_options(fname, opts, kw)
    missing = [n for n, p in kw.items() if p.default is inspect.Parameter.empty and n not in opts]
    if missing:
        raise ValueError(f"loss {fname} needs loss.options.{missing[0]} (no default)")
    params = (init(key),) if needs_array else ()
    bound = functools.partial(fn, **opts)
    keyed = "key" in inspect.signature(fn).parameters

    def call(params, state, x, y, k, valid=None):
        extra = {} if valid is None else {"valid": valid}
        if keyed:
            extra["key"] = k
        return bound(x, y, *params, **extra), state
    return LossSpec(fname, call, params, (), None if keyed else bound, opts, (fname,))


def _check_options(fname, opts, kw):
    unknown = sorted(set(opts) - set(kw))
    if unknown:
        raise ValueError(f"loss.options: {unknown} are not options of {fname} (options: {sorted(kw)})")


def build_ensemble_loss(loss_cfg, *, num_classes: int, dim: int, key) -> LossSpec:
    """``loss.name=ensemble``: `dmljax.losses.ensemble.weighted_loss_ensemble` over
    ``loss.components`` (names, or dicts ``{"name": ..., "options": {...}}``) with K learned raw
    weights (zeros), ``loss.options``: method ("uncertainty" | "softmax"), entropy_weight."""
    from dmljax.losses.ensemble import ENSEMBLE_METHODS, weighted_loss_ensemble
    components = list(loss_cfg.get("components", ()) or ())
    if not components:
        raise ValueError("loss.components must list the losses of the ensemble, e.g. "
                         "--set loss.components=\"['multi_similarity','proxy_anchor']\"")
    opts = dict(loss_cfg.get("options", {}) or {})
    method = opts.pop("method", "uncertainty")
    entropy_weight = float(opts.pop("entropy_weight", 1.0))
    check_choice(method, name="loss.options.method", choices=ENSEMBLE_METHODS)
    if opts:
        raise ValueError(f"loss.options: {sorted(opts)} are not options of the ensemble "
                         "(method, entropy_weight); give component options in loss.components")
    specs = []
    for i, comp in enumerate(components):
        if isinstance(comp, str):
            comp_name, comp_opts = comp, {}
        elif isinstance(comp, dict) or hasattr(comp, "keys"):
            comp = dict(comp)
            comp_name, comp_opts = comp.pop("name", None), dict(comp.pop("options", {}) or {})
            if comp:
                raise ValueError(f"loss.components[{i}]: unknown keys {sorted(comp)} (name, options)")
        else:
            raise ValueError(f"loss.components[{i}] must be a loss name or a dict, got {comp!r}")
        if comp_name == "ensemble":
            raise ValueError("loss.components cannot contain another ensemble")
        specs.append(build_single_loss(comp_name, comp_opts, loss_cfg=loss_cfg, num_classes=num_classes,
                                       dim=dim, key=jax.random.fold_in(key, i)))
    counts = [len(s.params) for s in specs]
    params = (jnp.zeros((len(specs),), jnp.float32),) + tuple(p for s in specs for p in s.params)

    def call(params, state, x, y, k, valid=None):
        raw, rest, values, new_states, offset = params[0], params[1:], [], [], 0
        for i, (spec, n) in enumerate(zip(specs, counts)):
            v, st = spec.call(rest[offset:offset + n], state[i], x, y, _fold(k, i), valid=valid)
            values.append(v)
            new_states.append(st)
            offset += n
        total, _ = weighted_loss_ensemble(values, raw, method=method, entropy_weight=entropy_weight)
        return total, tuple(new_states)

    state = tuple(s.state for s in specs)
    plain = None
    if all(s.plain is not None for s in specs) and not any(jax.tree.leaves(state)):
        def plain(x, y, *params):
            return call(params, state, x, y, None)[0]
    return LossSpec("ensemble", call, params, state, plain, {"method": method}, tuple(s.name for s in specs))


def build_loss_spec(config, *, num_classes: int, dim: int, key) -> LossSpec:
    loss_cfg = config.loss
    if loss_cfg.name == "ensemble":
        return build_ensemble_loss(loss_cfg, num_classes=num_classes, dim=dim, key=key)
    return build_single_loss(loss_cfg.name, loss_cfg.get("options", {}), loss_cfg=loss_cfg,
                             num_classes=num_classes, dim=dim, key=key)


def split_global_local(global_spec: LossSpec, local_spec: LossSpec, *, dim: int, local_weight: float) -> LossSpec:
    """The loss of `GlobalLocalModel`'s concatenated [global (dim), local] embeddings:
    ``L(global) + local_weight * L(local)``, each part with its own learnable arrays (with
    ``loss.name=hybrid_pair_proxy`` this is `dmljax.models.attention.global_local_hybrid_loss`)."""
    check_scalar(local_weight, name="model.global_local.local_weight", min_value=0.0)
    ng = len(global_spec.params)

    def call(params, state, x, y, k, valid=None):
        vg, sg = global_spec.call(params[:ng], state[0], x[:, :dim], y, _fold(k, 0), valid=valid)
        vl, sl = local_spec.call(params[ng:], state[1], x[:, dim:], y, _fold(k, 1), valid=valid)
        return vg + local_weight * vl, (sg, sl)

    state = (global_spec.state, local_spec.state)
    plain = None
    if global_spec.plain is not None and local_spec.plain is not None and not any(jax.tree.leaves(state)):
        def plain(x, y, *params):
            return call(params, state, x, y, None)[0]
    return LossSpec(global_spec.name, call, global_spec.params + local_spec.params, state, plain,
                    global_spec.options, global_spec.names)


# ----------------------------------------------------------------------------- objective
_XBM_NATIVE = {"contrastive_loss": "contrastive", "multi_similarity_loss": "multi_similarity",
               "triplet_margin_loss": "triplet"}


def _section(config, section: str, /, **defaults):
    """``config.<section>`` with defaults for keys (and whole sections) older configs lack."""
    node = config.get(section) if hasattr(config, "get") else None
    out = dict(defaults)
    if node is not None:
        out.update({k: node[k] for k in node.keys()})
    return types.SimpleNamespace(**out)


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
        if "valid" not in inspect.signature(_loss_functions()[spec.name]).parameters:
            raise ValueError(f"memory.size > 0: loss {spec.name} takes no valid mask")
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
    gl = _section(config.model, "global_local", local_dim=64, local_embedding_dim=0, local_weight=1.0)
    if config.model.backbone == "global_local":
        local_dim = int(gl.local_embedding_dim) or dim
        spec = split_global_local(build_loss_spec(config, num_classes=num_classes, dim=dim, key=k_loss),
                                  build_loss_spec(config, num_classes=num_classes, dim=local_dim, key=k_local),
                                  dim=dim, local_weight=float(gl.local_weight))
        dim = dim + local_dim
    else:
        spec = build_loss_spec(config, num_classes=num_classes, dim=dim, key=k_loss)
    m = _section(config, "method", name="none", options={})
    mem = _section(config, "memory", size=0, start_step=0)
    d = _section(config, "distill", teacher="", weight=1.0, distance_weight=1.0, angle_weight=2.0)
    from dmljax.methods.plugin import METHODS, make_method
    check_choice(m.name, name="method.name", choices=METHODS)
    options = dict(m.options or {})
    if m.name == "none" and options:
        raise ValueError(f"method.options {sorted(options)} given without a method.name")
    if int(mem.size) > 0 and m.name != "none":
        raise ValueError("memory.size > 0 (XBM) combines with method.name='none' only")
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
            obj.num_learners = int(options.get("num_learners", 4))
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


def _augment(images, key, *, config):
    from dmljax.data.augment import augment
    return augment(key, images, config)


def build_augment(config):
    if not _grey_convnet_data(config):  # random resized crop + flip (augment.preset)
        from experiments.data_sources import build_augment_fn
        return build_augment_fn(config)
    if not config.augment.enabled:
        return None
    from dmljax.data.augment import AugmentConfig
    aug = AugmentConfig(size=(config.data.image_size,) * 2, rotation=config.augment.rotation,
                        shear=config.augment.shear, translation=config.augment.translation,
                        zoom=tuple(config.augment.zoom),
                        elastic_alpha=float(config.augment.get("elastic_alpha", 0.0)),
                        elastic_sigma=float(config.augment.get("elastic_sigma", 4.0)))
    return functools.partial(_augment, config=aug)


def make_eval_state_fn(config, train_images, *, key, average=None):
    """``state -> state`` applied before every evaluation: the weight average (``average``, e.g.
    EMA) if any, then, with ``eval.precise_bn_batches > 0``, PreciseBN
    (`dmljax.train.precise_bn.precise_batch_norm`): the BatchNorm statistics recomputed on that
    many batches of ``eval.precise_bn_batch_size`` training images as stored, i.e. without the
    training augmentation (leave it 0 where the stored images are not what the model is evaluated
    on, e.g. crops of larger stored images). The result for the most recent state object is kept,
    so the final table, re-ranking and the averaged checkpoint reuse the last evaluation's state
    instead of recomputing the statistics."""
    e = config.get("eval")
    batches = int(e.get("precise_bn_batches", 0)) if e is not None else 0
    if batches < 0:
        raise ValueError(f"eval.precise_bn_batches must be >= 0, got {batches}")
    batch_size = min(int(e.get("precise_bn_batch_size", 256)), len(train_images)) if batches else 0

    last = [None, None]  # (state, result): main() asks again for the state fit() evaluated last

    def for_eval(state):
        if state is last[0]:
            return last[1]
        result = state if average is None else average(state)
        if batches:
            from dmljax.train.precise_bn import precise_batch_norm
            result = precise_batch_norm(result, train_images, key=key, num_batches=batches, batch_size=batch_size)
        last[:] = [state, result]
        return result

    return for_eval


def make_embed_fn(config, *, final: bool = False):
    """``embed_fn(state, images, batch_size) -> [N, D]``: plain, or test-time augmented
    (`dmljax.train.tta.embed_tta`) when ``config.eval`` asks for more than the identity view.

    ``final=True``: the views of the last evaluation, ``eval.final_tta_shifts`` when set (a
    non-empty tuple; e.g. a wider grid that is too slow to run at every evaluation), else
    ``eval.tta_shifts``."""
    e = config.get("eval")
    shifts = tuple(tuple(s) for s in e.tta_shifts) if e is not None else ((0, 0),)
    if final and e is not None and tuple(e.get("final_tta_shifts", ()) or ()):
        shifts = tuple(tuple(s) for s in e.final_tta_shifts)
    zooms = tuple(e.tta_zooms) if e is not None else (1.0,)
    feature_weight = float(e.feature_weight) if e is not None else 0.0
    if set(shifts) <= {(0, 0)} and set(zooms) <= {1.0} and not feature_weight:
        return lambda state, images, batch_size: embed(state, images, batch_size=batch_size)
    from dmljax.train.tta import embed_tta
    return lambda state, images, batch_size: embed_tta(state, images, shifts=shifts, zooms=zooms,
                                                       feature_weight=feature_weight, batch_size=batch_size)


def evaluate(state, test, runs, *, with_nmi: bool = False, embed_fn=None, keep: dict | None = None) -> dict[str, float]:
    """Retrieval on the unseen classes (each image vs all others) + 20-way one-shot error.

    ``keep`` (a dict) receives the step, metrics and test embeddings, so that the final table can
    reuse the evaluation the training loop already ran at the last step."""
    if runs is None:  # `test` is an experiments.data_sources.DataSource (see load_data)
        from experiments.data_sources import evaluate_source
        return evaluate_source(state, test, with_nmi=with_nmi, embed_fn=embed_fn, keep=keep)
    from dmljax.data.omniglot import one_shot_error
    from dmljax.metrics.knn import knn
    from dmljax.metrics.retrieval import required_neighbors, retrieval_metrics
    if embed_fn is None:
        embed_fn = lambda s, x, batch_size: embed(s, x, batch_size=batch_size)
    emb = embed_fn(state, test.images, 1024)
    labels = test.labels.astype(np.int32)
    k = required_neighbors(labels, ks=(1, 2, 4, 8))
    idx, _ = knn(jnp.asarray(emb), k=k)
    out = retrieval_metrics(idx, labels, ks=(1, 2, 4, 8))
    out = {k_: v for k_, v in out.items() if not k_.startswith("ndcg")}
    out["one_shot_error"], _ = one_shot_error(lambda x: embed_fn(state, x, 64), runs)
    if with_nmi:
        out.update(clustering(emb, labels))
    if keep is not None:
        keep.update(step=int(state.step), metrics=dict(out), embeddings=emb)
    return out


def clustering(emb, labels) -> dict[str, float]:
    """NMI & co. of k-means on the test embeddings (a bonus: never lose the run over it)."""
    from dmljax.metrics.clustering import clustering_metrics
    try:
        cm = clustering_metrics(emb, labels, key=jax.random.key(0), num_restarts=1)
        return {f"{k_}": float(v) for k_, v in cm.items() if np.ndim(v) == 0}
    except Exception as err:  # NMI is a bonus; never lose the run over it
        print(f"clustering metrics failed: {err}", file=sys.stderr)
        return {}


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


class MetricsLog:
    """JSONL of every record + CSV of train scalars + TensorBoard (only if tensorboardX exists)."""

    def __init__(self, workdir: str, resume: bool):
        os.makedirs(workdir, exist_ok=True)
        mode = "a" if resume else "w"
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), mode)
        self.csv_path = os.path.join(workdir, "metrics.csv")
        self.csv = open(self.csv_path, mode, newline="")
        self.writer = None
        self.tb = None
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:
            pass

    def __call__(self, state, record):
        if len(record) <= 1:
            return
        record = dict(record, time=time.time())
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if not k.startswith("eval/")}
        if "loss" in scalars:
            if self.writer is None:
                self.writer = csv.DictWriter(self.csv, fieldnames=sorted(scalars), extrasaction="ignore")
                if self.csv.tell() == 0:
                    self.writer.writeheader()
            self.writer.writerow(scalars)
            self.csv.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(k, v, record["step"])
        if any(k.startswith("eval/") for k in record):
            evals = {k[5:]: round(v, 4) for k, v in record.items() if k.startswith("eval/")}
            print(f"\n[step {record['step']}] eval: {evals}", flush=True)

    def close(self):
        self.jsonl.close()
        self.csv.close()
        if self.tb is not None:
            self.tb.close()


def format_table(metrics: dict[str, float]) -> str:
    names = [k for k in metrics if k.startswith("recall@") and "rerank" not in k]
    names += [k for k in ("map_at_r", "r_precision", "nmi", "one_shot_error") if k in metrics]
    names += [k for k in metrics if "rerank" in k and k not in names and np.ndim(metrics[k]) == 0]
    width = max(len(n) for n in names)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{n:<{width}}  {metrics[n]:.4f}" for n in names]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- state
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
    m = _section(config, "method", name="none", options={})
    hierarchical = hierarchical_sampler_options(config)
    if m.name == "alternating_projection":
        opts = dict(m.options or {})
        return RepeatedCompositionSampler(labels, classes_per_batch=s.classes_per_batch,
                                          samples_per_class=s.samples_per_class, repeat=int(opts.get("repeat", 5)),
                                          representatives_per_class=opts.get("representatives_per_class"),
                                          seed=config.seed)
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
    s = _section(config, "sampler", name="m_per_class", options={})
    if s.name != "hierarchical":
        return None
    opts = dict(s.options or {})
    unknown = sorted(set(opts) - {"classes_per_super_class"})
    if unknown:
        raise ValueError(f"sampler.options: {unknown} are not options of hierarchical "
                         "(options: ['classes_per_super_class'])")
    _check_not_alternating_projection(config, sampler="hierarchical")
    per_super = check_positive_int(opts.get("classes_per_super_class", 4), name="sampler.options.classes_per_super_class")
    classes = int(config.sampler.classes_per_batch)
    if classes % per_super:
        raise ValueError(f"sampler.options.classes_per_super_class ({per_super}) must divide "
                         f"sampler.classes_per_batch ({classes})")
    return {"super_classes_per_batch": classes // per_super, "classes_per_super_class": per_super}


def _check_not_alternating_projection(config, *, sampler: str) -> None:
    if _section(config, "method", name="none", options={}).name == "alternating_projection":
        raise ValueError(f"sampler.name={sampler!r} cannot be combined with "
                         "method.name='alternating_projection' (which fixes its own batch composition)")


SAMPLERS = ("m_per_class", "lifted_hard_negative", "hierarchical")
_LIFTED_OPTIONS = ("num_pairs", "negatives_per_pair", "pool_size", "refresh_every")


def lifted_sampler_options(config, *, num_train: int, steps_per_epoch: int) -> dict | None:
    """``sampler.name=lifted_hard_negative``: its resolved options (None for the other samplers).

    ``sampler.options``: ``num_pairs`` (P) and ``negatives_per_pair`` (K) with P (2 + K) = the
    configured batch size ``classes_per_batch * samples_per_class`` (B); given one, the other
    follows; given neither, K = the largest of 6, 5, ..., 1 with (2 + K) | B (B = 128: 16 pairs x
    6 negatives). ``pool_size`` (default 4096, capped at the training-set size), ``refresh_every``
    (default one epoch of the class-balanced sampler). ValueError naming the option otherwise."""
    s = _section(config, "sampler", name="m_per_class", options={})
    check_choice(s.name, name="sampler.name", choices=SAMPLERS)
    opts = dict(s.options or {})
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

    def positive(name, default=None):
        v = opts.get(name, default)
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
    pool = min(positive("pool_size", 4096), int(num_train))
    if negs > pool:
        raise ValueError(f"sampler.options.negatives_per_pair must be <= the pool size {pool}, got {negs}")
    refresh = positive("refresh_every", max(int(steps_per_epoch), 1))
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


def _output_dim(config) -> int:
    return int(config.model.embedding_dim)


def build_train_state(config, *, num_classes: int, num_train: int, steps_per_epoch: int, teacher=None):
    """(TrainState, Objective) of ``config``: model, optimizer, loss / method / memory objective.

    A run is rebuilt (for ``--resume`` or as a teacher) by calling this with the same config and
    counts: the checkpoint's leaves then match the template's structure."""
    key = jax.random.key(config.seed)
    k_loss, _ = jax.random.split(key)
    model = build_model(config, config.seed)
    objective = build_objective(
        config, num_classes=num_classes, num_train=num_train, dim=_output_dim(config),
        batch_size=config.sampler.classes_per_batch * config.sampler.samples_per_class,
        steps_per_epoch=steps_per_epoch, key=k_loss, distill=teacher is not None)
    o = config.optim
    tx = make_optimizer(learning_rate=o.learning_rate, total_steps=o.num_steps, warmup_steps=min(o.warmup_steps, o.num_steps),
                        backbone_lr_mult=o.backbone_lr_mult, head_lr_mult=o.head_lr_mult,
                        loss_lr_mult=o.loss_lr_mult, weight_decay=o.weight_decay, optimizer=o.optimizer)
    state = create_train_state(model, tx, objective.loss_fn, objective.loss_params, augment_fn=build_augment(config),
                               freeze_batch_norm=o.freeze_batch_norm, method_fn=objective.method_fn,
                               loss_state=objective.loss_state, teacher=teacher)
    return state, objective


def load_teacher(workdir: str, *, num_classes: int, num_train: int):
    """The frozen model of the run in ``workdir``: its ``config.json`` rebuilds the train state
    (with its ``run_info.json`` counts), the best checkpoint (else the latest) fills it."""
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"distill.teacher: {workdir!r} has no config.json (not a workdir of experiments.train)")
    with open(path) as f:
        tconfig = ml_collections.ConfigDict(json.load(f))
    if tconfig.get("distill") is not None:
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


class LossWeightLog:
    """Callback adding the ensemble's current loss weights to every logged record."""

    def __init__(self, objective: Objective):
        self.objective = objective

    def __call__(self, state, record):
        if "loss" in record:
            record.update(self.objective.loss_weights(state))


def rerank_metrics(config, state, *, train_images, train_labels, test_embeddings, test_labels, embed_fn):
    """``eval.rerank="similarity"``: `experiments.rerank.rerank_report` on the training and test
    embeddings (imported lazily; the training set is embedded here with ``embed_fn``)."""
    mode = config.eval.get("rerank", "") if config.get("eval") is not None else ""
    if not mode:
        return {}
    check_choice(mode, name="eval.rerank", choices=("similarity",))
    from experiments.rerank import rerank_report
    train_emb = embed_fn(state, train_images, 1024)
    report = rerank_report(train_embeddings=np.asarray(train_emb), train_labels=np.asarray(train_labels, np.int32),
                           test_embeddings=np.asarray(test_embeddings), test_labels=np.asarray(test_labels, np.int32),
                           key=jax.random.fold_in(jax.random.key(config.seed), 0x5E7A), config=config)
    return {k: float(v) for k, v in report.items()}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="omniglot", help="module in experiments/configs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set optim.num_steps=500")
    parser.add_argument("--workdir", default=None, help="output directory (default: config.workdir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize()")
    args = parser.parse_args(argv)
    # before anything starts a backend (XLA reads its flags once): the measured XLA:CPU
    # convolution setting of dmljax.train.xla_cpu (opt out: DMLJAX_DEFAULT_XLA_FLAGS=0)
    use_fast_cpu_flags()
    if args.distributed:
        jax.distributed.initialize()
    config = apply_overrides(get_config(args.config), args.set)
    workdir = args.workdir or config.workdir
    entry = config.get("entry") if hasattr(config, "get") else None
    if entry:  # another experiment's own loop (e.g. experiments.synthetic)
        module = importlib.import_module(entry)
        return module.run(config, workdir)
    t_start = time.perf_counter()

    images, labels, num_classes, test, runs = load_data(config)
    clean_labels = np.asarray(labels, np.int32)
    labels = add_label_noise(config, clean_labels, num_classes)
    noise_fraction = float(np.mean(labels != clean_labels)) if len(labels) else 0.0
    if noise_fraction:
        print(f"label noise: {noise_fraction:.1%} of the training labels corrupted "
              f"({config.data.get('label_noise_kind', 'symmetric')})", flush=True)
    t_data = time.perf_counter() - t_start
    print(f"data: {len(images)} train images / {num_classes} classes, {len(test.images)} test images "
          f"/ {len(np.unique(test.labels))} classes ({t_data:.1f} s)", flush=True)

    key = jax.random.key(config.seed)
    _, k_train = jax.random.split(key)
    o = config.optim
    sampler = build_sampler(config, labels, class_super_labels=test.class_super_labels)
    d = _section(config, "distill", teacher="", weight=1.0)
    teacher = None
    if d.teacher:
        teacher, teacher_step = load_teacher(d.teacher, num_classes=num_classes, num_train=len(labels))
        print(f"teacher: {d.teacher} (step {teacher_step}), distill.weight {d.weight}", flush=True)
    state, objective = build_train_state(config, num_classes=num_classes, num_train=len(labels),
                                         steps_per_epoch=sampler.steps_per_epoch, teacher=teacher)
    step_fn = make_parallel_train_step(data_mesh(jax.local_devices())) if config.train.data_parallel else jax.jit(train_step)
    ema_decay = float(config.train.get("ema_decay", 0.0))
    weight_average = WeightAverage(ema_decay) if ema_decay > 0 else None
    if weight_average is not None:
        step_fn = weight_average.wrap(step_fn)
    for_eval = make_eval_state_fn(config, images, key=jax.random.fold_in(key, 0xB4),
                                  average=weight_average.averaged if weight_average is not None else None)
    embed_fn = make_embed_fn(config)
    final_embed_fn = make_embed_fn(config, final=True)
    last_eval: dict = {}
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not args.resume and os.path.isdir(checkpoint_dir):
        # a fresh run must not mix its checkpoints with (or skip saving over) an older run's
        shutil.rmtree(checkpoint_dir)
    checkpointer = Checkpointer(checkpoint_dir, save_every=config.train.checkpoint_every,
                                best_metric="recall@1")
    log = MetricsLog(workdir, args.resume)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=1))
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
        json.dump({"num_classes": int(num_classes), "num_train": int(len(labels)),
                   "method": objective.method, "loss": objective.spec.name,
                   "label_noise_fraction": noise_fraction}, f, indent=1)

    hooks = {}
    before = []
    lifted = build_lifted_sampler(
        config, sampler, images, labels, key=key, embed_fn=lambda s, x: embed(s, x, batch_size=512),
        log=lambda step, size: print(f"[step {step}] lifted hard-negative pool: {size} items re-embedded",
                                     flush=True))
    if lifted is not None:
        sampler = lifted
        before.append(lifted.before_step)
    if objective.method == "divide_conquer":
        recluster = KMeansReclustering(
            images, num_clusters=objective.num_learners, every=objective.recluster_every,
            key=jax.random.fold_in(key, 0xC1), embed_fn=lambda s, x: embed(s, x, batch_size=512),
            log=lambda step, sizes: print(f"[step {step}] k-means re-clustering: cluster sizes {sizes.tolist()}",
                                          flush=True))
        before.append(recluster.before_step)
        hooks["batch_extras"] = recluster.batch_extras
    if before:
        hooks["before_step"] = functools.reduce(lambda f, g: (lambda st: g(f(st))), before)
    callbacks = [LossWeightLog(objective), log] if objective.spec.name == "ensemble" else [log]
    state, _ = fit(state, images=images, labels=labels, sampler=sampler, num_steps=o.num_steps, key=k_train,
                   step_fn=step_fn, checkpointer=checkpointer, resume=args.resume,
                   eval_every=config.train.eval_every, eval_fn=lambda s: evaluate(
                       for_eval(s), test, runs, keep=last_eval,
                       embed_fn=final_embed_fn if int(s.step) >= o.num_steps else embed_fn),
                   callbacks=callbacks, progress=config.train.progress, log_every=config.train.log_every, **hooks)
    t_train = time.perf_counter() - t_start
    if last_eval.get("step") == int(state.step):  # fit() evaluated the last step already
        final = dict(last_eval["metrics"])
        if config.train.final_nmi:
            final.update(clustering(last_eval["embeddings"], test.labels.astype(np.int32)))
    else:
        final = evaluate(for_eval(state), test, runs, with_nmi=config.train.final_nmi, embed_fn=final_embed_fn,
                         keep=last_eval)
    final.update(objective.loss_weights(state))
    final.update(rerank_metrics(config, for_eval(state), train_images=images, train_labels=labels,
                                test_embeddings=last_eval["embeddings"], test_labels=test.labels, embed_fn=final_embed_fn))
    if weight_average is not None:
        # the averaged weights evaluated above, for later analysis (the run's checkpoints hold
        # the raw weights that --resume needs)
        averaged = Checkpointer(os.path.join(checkpoint_dir, "averaged"), best_metric=None)
        averaged.save(for_eval(state))
        averaged.close()
    checkpointer.close()
    final["total_seconds"] = time.perf_counter() - t_start
    final["train_seconds"] = t_train
    log(state, {"step": int(state.step), **{f"eval/final_{k}": v for k, v in final.items()}})
    log.close()
    with open(os.path.join(workdir, "final.json"), "w") as f:
        json.dump(final, f, indent=1)
    if runs is None:
        print(f"\n{test.describe()}")
    else:
        print(f"\nOmniglot {config.data.test_split}: {len(np.unique(test.labels))} unseen classes, "
              f"{len(test.images)} queries (each vs all others); one-shot: 20 official 20-way runs")
    print(format_table(final))
    print(f"wall time: {final['total_seconds']:.0f} s (data {t_data:.0f} s)")
    return final


if __name__ == "__main__":
    # the command-line process only (not a notebook or pytest calling main): glibc keeps the
    # per-step XLA:CPU buffers mapped (dmljax.train.xla_cpu; opt out: DMLJAX_KEEP_HOST_MEMORY=0)
    keep_freed_host_memory()
    main()
