"""The trainer's loss registry: ``loss.name`` -> a library loss + the initialiser of its arrays.

`LOSSES` lists, in one place, every training loss of `dmljax.losses` (full function name ->
`LossEntry`): the function, the initialiser of its learnable array (proxies, class weights, the
margin loss's beta; the initialisation of the matching head of `dmljax.models.proxies` /
`dmljax.models.classifier_heads`), the options that initialiser consumes (with the head's
defaults), whether the loss takes a PRNG key, and the carried non-trainable state of the two
stateful losses (center loss: the centers, moved by Wen et al.'s update rule; dynamic soft
margin: its running histogram). `NOT_TRAINABLE_LOSSES` names the exports that are not
``(embeddings, labels[, array]) -> scalar`` training losses; a test checks that the two cover
every ``*_loss`` export.

`build_loss_spec(config, ...)` turns ``config.loss`` into a `LossSpec`, one calling convention
for every loss: ``call(params: tuple, state, embeddings, labels, key, valid=None) -> (scalar,
new_state)``; ``loss.name="ensemble"`` combines ``loss.components`` with learned weights
(`dmljax.losses.ensemble`). Loss options are ``loss.options`` (the loss's keyword defaults
otherwise).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dmljax.losses as L
from dmljax._validation import check_choice, check_scalar
from dmljax.models import classifier_heads as ch
from dmljax.models import proxies as px

__all__ = ["LOSSES", "LOSS_ALIASES", "NOT_TRAINABLE_LOSSES", "LossEntry", "LossSpec", "available_losses", "build_loss",
           "build_loss_spec", "build_single_loss", "resolve_loss_name", "split_global_local"]


def _head_array(head_cls, attr, key, *args, **kwargs):
    """Initial array ``head_cls(*args, rngs=..., **kwargs).attr`` (the library's initialiser)."""
    head = head_cls(*args, rngs=nnx.Rngs(params=key), **kwargs)
    return jnp.asarray(getattr(head, attr)[...], jnp.float32)


def _head_init(head_cls, attr, *sizes):
    """init(key, C, D, opts) of a head taking ``(num_classes, dim, *[opts[s] for s in sizes])``."""
    def init(key, num_classes, dim, opts):
        return _head_array(head_cls, attr, key, num_classes, dim, *(int(opts[s]) for s in sizes))
    return init


def _class_weight_init(head_cls, *sizes):
    def init(key, num_classes, dim, opts):
        return _head_array(head_cls, "weights", key, num_classes, dim, *(int(opts[s]) for s in sizes),
                           init_std=float(opts["init_std"]))
    return init


def _hier_init(key, num_classes, dim, opts):
    return _head_array(px.HIERHead, "proxies", key, int(opts["num_proxies"]), dim, clip_r=float(opts["clip_r"]))


def _kaiming_init(key, num_classes, dim, opts):
    return px.kaiming_normal_fan_out(key, (num_classes, dim))


def _normal_init(key, num_classes, dim, opts):  # class weights N(0, init_std^2), normalised in the loss
    return jax.random.normal(key, (num_classes, dim)) * float(opts["init_std"])


def _linear_init(key, num_classes, dim, opts):  # a plain fully connected layer (PyTorch Linear init)
    return jax.random.uniform(key, (num_classes, dim), jnp.float32, -1.0, 1.0) / np.sqrt(dim)


def _beta_init(key, num_classes, dim, opts):  # Wu et al. 2017: beta starts at 1.2, per class
    shape = (num_classes,) if opts["class_specific"] else ()
    return jnp.full(shape, float(opts["beta_init"]), jnp.float32)


@dataclasses.dataclass(frozen=True)
class LossEntry:
    """One trainable loss: ``fn(embeddings, labels[, array], *, options)``.

    ``init(key, num_classes, dim, opts) -> array`` creates its learnable array (None: no array);
    ``init_options`` are options read by the initialiser only (name -> default, the matching
    head's default), ``shared_options`` options read by both. ``keyed``: takes ``key=``.
    ``state``: "centers" (center loss) or "histogram" (dynamic soft margin) for a carried state."""

    fn: Callable
    init: Callable | None = None
    init_options: tuple[tuple[str, Any], ...] = ()
    shared_options: tuple[tuple[str, Any], ...] = ()
    keyed: bool = False
    state: str | None = None


_CLASS_WEIGHTS = (("init_std", 1.0),)
LOSSES: dict[str, LossEntry] = {
    # pair / tuple / ranking / structured losses: no learnable array
    **{name: LossEntry(getattr(L, name)) for name in (
        "angular_loss", "cbml_loss", "centroid_triplet_loss", "circle_loss", "contrastive_loss", "eet_loss",
        "fastap_loss", "gaussian_mixture_structured_loss", "generalized_lifted_structured_loss",
        "histogram_loss", "intra_pair_variance_loss", "lifted_structured_loss", "multi_similarity_loss",
        "nca_loss", "npair_loss", "ntxent_loss", "pn_loss", "pnp_loss", "quadruplet_loss", "ranked_list_loss",
        "smooth_ap_loss", "snr_contrastive_loss", "soft_nearest_neighbour_loss", "supcon_loss",
        "surrogate_precision_at_k_loss", "threshold_consistent_margin_loss", "triplet_margin_loss",
        "tuplet_margin_loss")},
    # proxies (dmljax.models.proxies)
    "proxy_anchor_loss": LossEntry(L.proxy_anchor_loss, _head_init(px.ProxyAnchorHead, "proxies")),
    "proxy_nca_loss": LossEntry(L.proxy_nca_loss, _head_init(px.ProxyNCAHead, "proxies")),
    "multi_proxy_anchor_loss": LossEntry(L.multi_proxy_anchor_loss,
                                         _head_init(px.MultiProxyAnchorHead, "proxies", "proxies_per_class"),
                                         (("proxies_per_class", 3),)),
    "soft_triple_loss": LossEntry(L.soft_triple_loss, _head_init(px.SoftTripleHead, "proxies", "centers_per_class"),
                                  (("centers_per_class", 10),)),
    "hier_loss": LossEntry(L.hier_loss, _hier_init, (("num_proxies", 512),), (("clip_r", 2.3),)),
    "hybrid_pair_proxy_loss": LossEntry(L.hybrid_pair_proxy_loss, _kaiming_init),
    "manifold_loss": LossEntry(L.manifold_loss, _kaiming_init),  # the class labels are its meta-classes
    # class weights (dmljax.models.classifier_heads)
    "normalized_softmax_loss": LossEntry(L.normalized_softmax_loss, _class_weight_init(ch.NormalizedSoftmaxHead),
                                         _CLASS_WEIGHTS),
    "cosface_loss": LossEntry(L.cosface_loss, _class_weight_init(ch.CosFaceHead), _CLASS_WEIGHTS),
    "arcface_loss": LossEntry(L.arcface_loss, _class_weight_init(ch.ArcFaceHead), _CLASS_WEIGHTS),
    "sphereface_loss": LossEntry(L.sphereface_loss, _class_weight_init(ch.SphereFaceHead), _CLASS_WEIGHTS),
    "large_margin_softmax_loss": LossEntry(L.large_margin_softmax_loss,
                                           _class_weight_init(ch.LargeMarginSoftmaxHead), _CLASS_WEIGHTS),
    "subcenter_arcface_loss": LossEntry(L.subcenter_arcface_loss,
                                        _class_weight_init(ch.SubCenterArcFaceHead, "sub_centers"),
                                        (("sub_centers", 3),) + _CLASS_WEIGHTS),
    "p2sgrad_loss": LossEntry(L.p2sgrad_loss, _normal_init, _CLASS_WEIGHTS),
    "instance_loss": LossEntry(L.instance_loss, _linear_init),
    "margin_loss": LossEntry(L.margin_loss, _beta_init, (("beta_init", 1.2), ("class_specific", True)), keyed=True),
    # carried, non-trainable state
    "center_loss": LossEntry(L.center_loss, init_options=(("alpha", 0.5),), state="centers"),
    "dynamic_soft_margin_loss": LossEntry(L.dynamic_soft_margin_loss, state="histogram"),
}
LOSS_ALIASES = {"triplet": "triplet_margin_loss"}
# exported by dmljax.losses but not an (embeddings, labels[, array]) -> scalar training loss
NOT_TRAINABLE_LOSSES = {
    "fraction_active_triplets": "a batch statistic, not a loss",
    "imprint_weights": "returns class weights (an initialiser), not a loss",
    "hier_regularized_loss": "needs a base_loss callable: use loss.name=ensemble or hier",
    "log_ratio_loss": "takes continuous targets, not class labels",
    "multiple_negatives_ranking_loss": "takes (anchors, positives) pairs, not class labels",
    "tuplet_loss": "takes (anchors, positives, negatives) tuples, not class labels",
    "vicreg_loss": "takes two views (z1, z2), not class labels",
}
_NOT_OPTIONS = ("valid", "key")  # the trainer passes them


def available_losses() -> tuple[str, ...]:
    """Every name ``loss.name`` accepts (short names; the full function names work too)."""
    return tuple(sorted({n.removesuffix("_loss") for n in LOSSES} | set(LOSS_ALIASES) | {"ensemble"}))


def resolve_loss_name(name) -> str:
    """``loss.name`` -> the `LOSSES` key; ValueError naming the closest name otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"loss.name must be a string, got {name!r}")
    for candidate in (LOSS_ALIASES.get(name, name), f"{name}_loss"):
        if candidate in LOSSES:
            return candidate
    why = NOT_TRAINABLE_LOSSES.get(name) or NOT_TRAINABLE_LOSSES.get(f"{name}_loss")
    extra = f" ({name}: {why})" if why else ""
    close = difflib.get_close_matches(name, available_losses(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"loss.name {name!r} is not a trainable loss{extra}{hint}; choose one of "
                     f"{', '.join(available_losses())}")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A configured loss in one calling convention:
    ``call(params: tuple, state, embeddings, labels, key, valid=None) -> (scalar, new_state)``.

    ``plain`` is ``plain(embeddings, labels, *params)`` when the loss needs neither a state nor a
    key, else None. ``names`` label the components (ensembles)."""

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


def _check_options(fname: str, fn: Callable, opts: dict) -> None:
    """Unknown option -> ValueError naming the closest keyword option of ``fn``."""
    kw = {p.name: p for p in inspect.signature(fn).parameters.values()
          if p.kind == p.KEYWORD_ONLY and p.name not in _NOT_OPTIONS}
    for name in sorted(set(opts) - set(kw)):
        close = difflib.get_close_matches(name, kw, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"loss.options.{name} is not an option of {fname}{hint} (options: {sorted(kw)})")
    missing = [n for n, p in kw.items() if p.default is inspect.Parameter.empty and n not in opts]
    if missing:
        raise ValueError(f"loss {fname} needs loss.options.{missing[0]} (no default)")


def _valid_kw(valid):
    return {} if valid is None else {"valid": valid}


def build_single_loss(name, options, *, num_classes: int, dim: int, key) -> LossSpec:
    """One `LOSSES` entry with its options (``options``: dict) and initial learnable array."""
    fname = resolve_loss_name(name)
    entry = LOSSES[fname]
    opts = dict(options or {})
    init_opts = {n: opts.pop(n, default) for n, default in entry.init_options}
    init_opts.update({n: opts.get(n, default) for n, default in entry.shared_options})
    _check_options(fname, entry.fn, opts)
    bound = functools.partial(entry.fn, **opts)
    if entry.state == "centers":
        from dmljax.losses.classification import center_update
        alpha = float(init_opts["alpha"])  # Wen et al.: the centers' update rate

        def call(params, centers, x, y, k, valid=None):
            value = bound(x, y, centers, **_valid_kw(valid))
            return value, center_update(centers, x, y, alpha=alpha, valid=valid)
        return LossSpec(fname, call, (), ch.xavier_uniform_centers(key, (num_classes, dim)), None, opts, (fname,))
    if entry.state == "histogram":
        bins = int(opts.get("num_bins", inspect.signature(entry.fn).parameters["num_bins"].default))

        def call(params, hist, x, y, k, valid=None):
            return bound(x, y, hist, **_valid_kw(valid))
        return LossSpec(fname, call, (), jnp.zeros((bins,), jnp.float32), None, opts, (fname,))
    params = () if entry.init is None else (entry.init(key, num_classes, dim, init_opts),)

    def call(params, state, x, y, k, valid=None):
        extra = _valid_kw(valid)
        if entry.keyed:
            extra["key"] = k
        return bound(x, y, *params, **extra), state
    return LossSpec(fname, call, params, (), None if entry.keyed else bound, opts, (fname,))


def _fold(key, i):
    return None if key is None else jax.random.fold_in(key, i)


def build_ensemble_loss(loss_cfg, *, num_classes: int, dim: int, key) -> LossSpec:
    """``loss.name=ensemble``: `dmljax.losses.ensemble.weighted_loss_ensemble` over
    ``loss.components`` (names, or dicts ``{"name": ..., "options": {...}}``) with K learned raw
    weights (zeros); ``loss.options``: ``method`` ("uncertainty" | "softmax"), ``entropy_weight``
    (`weighted_loss_ensemble`'s defaults otherwise)."""
    from dmljax.losses.ensemble import ENSEMBLE_METHODS, weighted_loss_ensemble
    components = list(loss_cfg.components)
    if not components:
        raise ValueError("loss.components must list the losses of the ensemble, e.g. "
                         "--set loss.components=\"['multi_similarity','proxy_anchor']\"")
    opts = dict(loss_cfg.options)
    ens_kw = inspect.signature(weighted_loss_ensemble).parameters
    unknown = sorted(set(opts) - {"method", "entropy_weight"})
    if unknown:
        raise ValueError(f"loss.options: {unknown} are not options of the ensemble "
                         "(method, entropy_weight); give component options in loss.components")
    method = opts.get("method", ens_kw["method"].default)
    entropy_weight = float(opts.get("entropy_weight", ens_kw["entropy_weight"].default))
    check_choice(method, name="loss.options.method", choices=ENSEMBLE_METHODS)
    specs = []
    for i, comp in enumerate(components):
        if isinstance(comp, str):
            comp_name, comp_opts = comp, {}
        elif isinstance(comp, dict) or hasattr(comp, "keys"):
            comp = dict(comp)
            comp_name, comp_opts = comp.pop("name", None), dict(comp.pop("options", {}))
            if comp:
                raise ValueError(f"loss.components[{i}]: unknown keys {sorted(comp)} (name, options)")
        else:
            raise ValueError(f"loss.components[{i}] must be a loss name or a dict, got {comp!r}")
        if comp_name == "ensemble":
            raise ValueError("loss.components cannot contain another ensemble")
        specs.append(build_single_loss(comp_name, comp_opts, num_classes=num_classes, dim=dim,
                                       key=jax.random.fold_in(key, i)))
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
    """The `LossSpec` of ``config.loss`` (a single loss, or ``ensemble``)."""
    if config.loss.name == "ensemble":
        return build_ensemble_loss(config.loss, num_classes=num_classes, dim=dim, key=key)
    return build_single_loss(config.loss.name, config.loss.options, num_classes=num_classes, dim=dim, key=key)


def split_global_local(global_spec: LossSpec, local_spec: LossSpec, *, dim: int, local_weight: float) -> LossSpec:
    """The loss of `dmljax.train.models.GlobalLocalModel`'s concatenated [global (dim), local]
    embeddings: ``L(global) + local_weight * L(local)``, each part with its own learnable arrays
    (with ``loss.name=hybrid_pair_proxy`` this is `dmljax.models.attention.global_local_hybrid_loss`)."""
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


def build_loss(config, num_classes: int, key):
    """``(loss_fn, loss_params)`` of ``config.loss`` for a plain (stateless, key-free) loss, as
    `dmljax.train.state.create_train_state` takes them; see `dmljax.train.objective.build_objective`
    for everything else."""
    spec = build_loss_spec(config, num_classes=num_classes, dim=int(config.model.embedding_dim), key=key)
    if spec.plain is None:
        raise ValueError(f"loss {spec.name} carries a state or needs a key: use build_objective")
    return spec.plain, spec.params
