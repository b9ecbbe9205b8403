"""Synthetic multi-label and cross-modal retrieval tasks: data, training, evaluation.

    python -m experiments.synthetic --config synthetic_multilabel --set loss.label_mode=first

    from dmljax.configs import get_config
    from experiments.synthetic import run
    metrics = run(get_config("synthetic_multilabel"), "runs/synthetic_multilabel")

``run(config, workdir)`` generates the data deterministically from ``config.seed``, trains a
small MLP embedding with one ``lax.scan`` over optax steps (`dmljax.train.optim.make_optimizer`)
and returns the test metrics as ``dict[str, float]`` (also written to ``<workdir>/final.json``
when ``workdir`` is given). ``config.task`` selects the task:

``"multilabel"`` -- multi-label retrieval (Sumbul et al., TGRS 2021, arXiv 2105.03647; seed 003
  abstract 17). ``C`` classes, each a random prototype vector ``P_c`` in R^F; an item carries a
  random set S of 1..``max_labels`` classes (drawn in a random order: the first drawn is its
  "first label") and has features

      x = [tanh((sum_{c in S} a_c P_c + noise * eps) M),  nuisance_scale * u],
      a_c ~ U(0.75, 1.25), eps ~ N(0, I_F), u ~ N(0, I_K),

  with one random mixing matrix M [F, F] (entries N(0, 4 / F)): the class content is a
  nonlinear view of a sum of patterns, and K = ``nuisance_dim`` appended class-free features
  mislead a kNN on the raw features (a learned embedding can ignore them). Training: ``multilabel_triplet_loss`` (informative
  anchors + relevant-hard positive + hardest negative, or multi-label batch-hard) on uniformly
  drawn batches. ``config.loss.label_mode``: "multi" (the loss sees the multi-hot sets: two
  items are positives when they share a label) or "first" (naive single-label baseline: the loss
  sees only the one-hot first label, so items sharing a non-first label are negatives). Both
  modes see the same batches. Evaluation: test queries against the training archive (kNN,
  euclidean on unit embeddings), `dmljax.metrics.multilabel.multilabel_retrieval_metrics`
  (precision@k, mAP@k, nDCG@k; relevance = shares >= 1 label, graded by the shared count),
  plus the same metrics on the raw features (``raw_*``) as a floor.

``"cross_modal"`` -- zero-shot sketch-based image retrieval (MATHM, Huang et al. 2021; seed 003
  abstract 19). Class latents ``z_c ~ N(0, I_L)``; an item is ``z = z_c + intra_noise * eps``
  seen through one of two fixed random nonlinear maps, "photo" ``x_p = tanh(z A1) A2`` and
  "sketch" ``x_s = relu(z B1 + b) B2`` (different widths and nonlinearities, + ``view_noise``
  Gaussian noise), with independent samples per modality (no paired items). Classes
  ``0..num_train_classes-1`` train; the next ``num_test_classes`` are unseen and only used for
  testing. Training batches hold ``classes_per_batch`` classes with ``samples_per_class``
  sketches and as many photos each; the model is `dmljax.models.cross_modal.TwoBranchEmbedding`.
  ``config.loss.mining``: "modality_aware" (`modality_aware_triplet_loss`: cross, intra and
  mixed batch-hard terms) or "batch_hard" (plain batch-hard `triplet_margin_loss` on the union
  of both modalities, modality ignored). Evaluation on the unseen classes: sketch queries vs the
  photo gallery, R@1/5/10 and MAP@R (`dmljax.metrics.retrieval`) and mAP@all (`map_at_all`,
  the ZS-SBIR papers' mAP over the whole gallery ranking).

Returned extras: ``final_loss`` (mean loss of the last 10% of steps), ``positive_pair_fraction``
(mean fraction of ordered off-diagonal batch pairs the loss treats as positives; multi-label
only), ``active_anchor_fraction`` (anchors with both a positive and a negative; multi-label
only), ``train_seconds`` (wall time of data + training + evaluation).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dmljax.distances import l2_normalize
from dmljax.losses.multilabel import multilabel_masks, multilabel_triplet_loss
from dmljax.losses.triplet import triplet_margin_loss
from dmljax.metrics.knn import knn
from dmljax.metrics.multilabel import multilabel_retrieval_metrics
from dmljax.metrics.retrieval import neighbor_hits, retrieval_metrics
from dmljax.models.cross_modal import MLPEncoder, TwoBranchEmbedding, modality_aware_triplet_loss
from dmljax.train.optim import make_optimizer

__all__ = ["TASKS", "main", "make_multilabel_data", "make_cross_modal_data", "map_at_all", "run"]

TASKS = ("multilabel", "cross_modal")


# ----------------------------------------------------------------------------- helpers
def _positive_int(value: Any, *, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _non_negative(value: Any, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _choice(value: Any, *, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _random_map(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    return rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)


# ----------------------------------------------------------------------------- data
def make_multilabel_data(*, seed: int, num_classes: int = 20, feature_dim: int = 32, num_train: int = 1200,
                         num_test: int = 400, max_labels: int = 3, noise: float = 1.0, nuisance_dim: int = 16,
                         nuisance_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Multi-label feature vectors (module docstring). Deterministic in ``seed``.

    Returns {"x_train" float32 [N, F + nuisance_dim], "y_train" int32 multi-hot [N, C], "first_train" int32 [N],
    "x_test", "y_test", "first_test"}; every item has between 1 and ``max_labels`` labels.
    """
    num_classes = _positive_int(num_classes, name="num_classes", minimum=2)
    feature_dim = _positive_int(feature_dim, name="feature_dim")
    num_train = _positive_int(num_train, name="num_train", minimum=2)
    num_test = _positive_int(num_test, name="num_test")
    max_labels = _positive_int(max_labels, name="max_labels")
    if max_labels > num_classes:
        raise ValueError(f"max_labels must be <= num_classes={num_classes}, got {max_labels}")
    noise = _non_negative(noise, name="noise")
    nuisance_dim = _positive_int(nuisance_dim, name="nuisance_dim", minimum=0)
    nuisance_scale = _non_negative(nuisance_scale, name="nuisance_scale")
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(num_classes, feature_dim))
    mixing = _random_map(rng, feature_dim, feature_dim) * 2.0

    def items(n):
        y = np.zeros((n, num_classes), np.int32)
        first = np.zeros(n, np.int32)
        h = noise * rng.normal(size=(n, feature_dim))
        for i in range(n):
            chosen = rng.choice(num_classes, size=rng.integers(1, max_labels + 1), replace=False)
            first[i] = chosen[0]
            y[i, chosen] = 1
            h[i] += rng.uniform(0.75, 1.25, size=len(chosen)) @ prototypes[chosen]
        nuisance = nuisance_scale * rng.normal(size=(n, nuisance_dim))
        return np.concatenate([np.tanh(h @ mixing), nuisance], 1).astype(np.float32), y, first

    x_tr, y_tr, f_tr = items(num_train)
    x_te, y_te, f_te = items(num_test)
    return {"x_train": x_tr, "y_train": y_tr, "first_train": f_tr, "x_test": x_te, "y_test": y_te, "first_test": f_te}


def make_cross_modal_data(*, seed: int, num_train_classes: int = 200, num_test_classes: int = 50,
                          latent_dim: int = 16, sketch_dim: int = 24, photo_dim: int = 48,
                          per_class_train: int = 8, per_class_test: int = 10, intra_noise: float = 0.5,
                          view_noise: float = 0.1) -> dict[str, np.ndarray]:
    """Two-modality data with unseen test classes (module docstring). Deterministic in ``seed``.

    Returns {"sketch_train" float32 [Ctr * n, Fs], "sketch_train_labels" int32, "photo_train"
    [Ctr * n, Fp], "photo_train_labels", and the same "*_test" arrays for the unseen classes,
    labelled ``num_train_classes .. num_train_classes + num_test_classes - 1``}; ``n`` items per
    class and modality (``per_class_train`` / ``per_class_test``).
    """
    num_train_classes = _positive_int(num_train_classes, name="num_train_classes", minimum=2)
    num_test_classes = _positive_int(num_test_classes, name="num_test_classes", minimum=2)
    latent_dim = _positive_int(latent_dim, name="latent_dim")
    sketch_dim = _positive_int(sketch_dim, name="sketch_dim")
    photo_dim = _positive_int(photo_dim, name="photo_dim")
    per_class_train = _positive_int(per_class_train, name="per_class_train", minimum=2)
    per_class_test = _positive_int(per_class_test, name="per_class_test")
    intra_noise = _non_negative(intra_noise, name="intra_noise")
    view_noise = _non_negative(view_noise, name="view_noise")
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_train_classes + num_test_classes, latent_dim))
    a1, a2 = _random_map(rng, latent_dim, 64) * 2.0, _random_map(rng, 64, photo_dim)
    b1, b2 = _random_map(rng, latent_dim, 48) * 2.0, _random_map(rng, 48, sketch_dim) * 2.0
    bias = rng.normal(size=48) * 0.5

    def views(classes, per_class):
        labels = np.repeat(classes, per_class).astype(np.int32)
        z_p = centers[labels] + intra_noise * rng.normal(size=(len(labels), latent_dim))
        z_s = centers[labels] + intra_noise * rng.normal(size=(len(labels), latent_dim))
        photo = np.tanh(z_p @ a1) @ a2 + view_noise * rng.normal(size=(len(labels), photo_dim))
        sketch = np.maximum(z_s @ b1 + bias, 0.0) @ b2 + view_noise * rng.normal(size=(len(labels), sketch_dim))
        return sketch.astype(np.float32), photo.astype(np.float32), labels

    s_tr, p_tr, l_tr = views(np.arange(num_train_classes), per_class_train)
    s_te, p_te, l_te = views(np.arange(num_train_classes, num_train_classes + num_test_classes), per_class_test)
    return {"sketch_train": s_tr, "sketch_train_labels": l_tr, "photo_train": p_tr, "photo_train_labels": l_tr.copy(),
            "sketch_test": s_te, "sketch_test_labels": l_te, "photo_test": p_te, "photo_test_labels": l_te.copy()}


# ----------------------------------------------------------------------------- metrics
def map_at_all(neighbor_indices, query_labels, gallery_labels) -> float:
    """mAP over the whole gallery ranking (the ZS-SBIR "mAP@all").

    ``neighbor_indices`` [Q, N] must rank the *entire* gallery of N items per query (nearest
    first). AP_q = (1 / R_q) sum_i P(i) rel_i over all N ranks, R_q = gallery items of the
    query's class; queries with R_q = 0 are excluded from the mean (0.0 if none remain).
    """
    gallery_labels = np.asarray(gallery_labels)
    idx = np.asarray(neighbor_indices)
    if idx.ndim != 2 or idx.shape[1] != len(gallery_labels):
        raise ValueError(f"neighbor_indices must rank the whole gallery: shape (Q, {len(gallery_labels)}), "
                         f"got {idx.shape}")
    hits = np.asarray(neighbor_hits(idx, query_labels, gallery_labels), np.float64)
    num_relevant = hits.sum(axis=1)
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(axis=1) / np.maximum(num_relevant, 1.0)
    keep = num_relevant > 0
    return float(ap[keep].mean()) if keep.any() else 0.0


# ----------------------------------------------------------------------------- training
def _sub(config, name):
    if name not in config:
        raise ValueError(f"config.{name} is missing")
    return config[name]


def _optimizer(o) -> optax.GradientTransformation:
    steps = _positive_int(o.num_steps, name="config.optim.num_steps")
    return make_optimizer(learning_rate=float(o.learning_rate), total_steps=steps,
                          warmup_steps=min(int(o.warmup_steps), steps), weight_decay=float(o.weight_decay),
                          optimizer=o.optimizer)


def _train(graphdef, params, tx, loss_of_model, batches):
    """One jitted ``lax.scan`` of optax steps over the stacked batch arrays; returns (params, aux)."""
    trainable = {"model": params, "loss": ()}

    def step(carry, batch):
        trainable, opt_state = carry

        def loss_fn(tr):
            return loss_of_model(nnx.merge(graphdef, tr["model"]), batch)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), {"loss": loss, **aux}

    @jax.jit
    def train(trainable, batches):
        (trainable, _), history = jax.lax.scan(step, (trainable, tx.init(trainable)), batches)
        return trainable, history

    trainable, history = train(trainable, batches)
    return trainable["model"], jax.tree.map(np.asarray, history)


def _run_multilabel(config) -> dict[str, float]:
    d, m, loss_cfg, o = _sub(config, "data"), _sub(config, "model"), _sub(config, "loss"), _sub(config, "optim")
    label_mode = _choice(loss_cfg.label_mode, name="config.loss.label_mode", choices=("multi", "first"))
    mining = _choice(loss_cfg.mining, name="config.loss.mining", choices=("informative", "batch_hard"))
    margin = _non_negative(loss_cfg.margin, name="config.loss.margin")
    data = make_multilabel_data(seed=config.seed, num_classes=d.num_classes, feature_dim=d.feature_dim,
                                num_train=d.num_train, num_test=d.num_test, max_labels=d.max_labels,
                                noise=d.noise, nuisance_dim=d.nuisance_dim, nuisance_scale=d.nuisance_scale)
    num_classes = data["y_train"].shape[1]
    loss_labels = data["y_train"] if label_mode == "multi" else np.eye(num_classes, dtype=np.int32)[data["first_train"]]
    batch_size = _positive_int(o.batch_size, name="config.optim.batch_size", minimum=2)
    if batch_size > len(loss_labels):
        raise ValueError(f"config.optim.batch_size must be <= num_train={len(loss_labels)}, got {batch_size}")
    steps = _positive_int(o.num_steps, name="config.optim.num_steps")
    rng = np.random.default_rng([config.seed, 1])
    idx = np.stack([rng.choice(len(loss_labels), batch_size, replace=False) for _ in range(steps)])
    batches = {"x": jnp.asarray(data["x_train"][idx]), "y": jnp.asarray(loss_labels[idx])}

    model = MLPEncoder(data["x_train"].shape[1], int(m.embedding_dim), hidden=tuple(m.hidden),
                       rngs=nnx.Rngs(params=jax.random.key(config.seed)))
    graphdef, params = nnx.split(model)
    num_anchors = int(loss_cfg.num_anchors) or None

    def loss_of_model(net, batch):
        emb = l2_normalize(net(batch["x"]))
        loss = multilabel_triplet_loss(emb, batch["y"], margin=margin, mining=mining, num_anchors=num_anchors)
        positive, negative = multilabel_masks(batch["y"])
        b = batch["y"].shape[0]
        aux = {"positive_pair_fraction": jnp.sum(positive) / (b * (b - 1)),
               "active_anchor_fraction": jnp.mean(jnp.any(positive, 1) & jnp.any(negative, 1))}
        return loss, aux

    params, history = _train(graphdef, params, _optimizer(o), loss_of_model, batches)
    net = nnx.merge(graphdef, params)
    embed = jax.jit(lambda x: l2_normalize(net(x)))
    ks = tuple(int(k) for k in _sub(config, "eval").ks)
    k = max(ks)
    out = {}
    for prefix, (q, g) in (("", (embed(data["x_test"]), embed(data["x_train"]))),
                           ("raw_", (data["x_test"], data["x_train"]))):
        nbrs, _ = knn(jnp.asarray(q), jnp.asarray(g), k=k)
        metrics = multilabel_retrieval_metrics(nbrs, data["y_test"], data["y_train"], ks=ks)
        out.update({prefix + name: v for name, v in metrics.items()})
    tail = max(steps // 10, 1)
    out["final_loss"] = float(np.mean(history["loss"][-tail:]))
    out["positive_pair_fraction"] = float(np.mean(history["positive_pair_fraction"]))
    out["active_anchor_fraction"] = float(np.mean(history["active_anchor_fraction"]))
    return out


def _cross_modal_batches(rng, labels_s, labels_p, *, classes, steps, classes_per_batch, samples_per_class):
    members_s = {c: np.flatnonzero(labels_s == c) for c in classes}
    members_p = {c: np.flatnonzero(labels_p == c) for c in classes}
    idx_s, idx_p = [], []
    for _ in range(steps):
        chosen = rng.choice(classes, classes_per_batch, replace=False)
        idx_s.append(np.concatenate([rng.choice(members_s[c], samples_per_class, replace=False) for c in chosen]))
        idx_p.append(np.concatenate([rng.choice(members_p[c], samples_per_class, replace=False) for c in chosen]))
    return np.stack(idx_s), np.stack(idx_p)


def _run_cross_modal(config) -> dict[str, float]:
    d, m, loss_cfg, o, s = (_sub(config, n) for n in ("data", "model", "loss", "optim", "sampler"))
    mining = _choice(loss_cfg.mining, name="config.loss.mining", choices=("modality_aware", "batch_hard"))
    margin = _non_negative(loss_cfg.margin, name="config.loss.margin")
    data = make_cross_modal_data(seed=config.seed, num_train_classes=d.num_train_classes,
                                 num_test_classes=d.num_test_classes, latent_dim=d.latent_dim,
                                 sketch_dim=d.sketch_dim, photo_dim=d.photo_dim, per_class_train=d.per_class_train,
                                 per_class_test=d.per_class_test, intra_noise=d.intra_noise, view_noise=d.view_noise)
    steps = _positive_int(o.num_steps, name="config.optim.num_steps")
    p = _positive_int(s.classes_per_batch, name="config.sampler.classes_per_batch", minimum=2)
    k = _positive_int(s.samples_per_class, name="config.sampler.samples_per_class")
    if p > d.num_train_classes or k > d.per_class_train:
        raise ValueError(f"config.sampler: classes_per_batch must be <= {d.num_train_classes} and "
                         f"samples_per_class <= {d.per_class_train}, got {p} and {k}")
    rng = np.random.default_rng([config.seed, 2])
    idx_s, idx_p = _cross_modal_batches(rng, data["sketch_train_labels"], data["photo_train_labels"],
                                        classes=np.arange(d.num_train_classes), steps=steps,
                                        classes_per_batch=p, samples_per_class=k)
    batches = {"s": jnp.asarray(data["sketch_train"][idx_s]), "ls": jnp.asarray(data["sketch_train_labels"][idx_s]),
               "p": jnp.asarray(data["photo_train"][idx_p]), "lp": jnp.asarray(data["photo_train_labels"][idx_p])}

    model = TwoBranchEmbedding(d.sketch_dim, d.photo_dim, int(m.embedding_dim), hidden=tuple(m.hidden),
                               rngs=nnx.Rngs(params=jax.random.key(config.seed)))
    graphdef, params = nnx.split(model)
    weights = {"cross_weight": float(loss_cfg.cross_weight), "intra_weight": float(loss_cfg.intra_weight),
               "mixed_weight": float(loss_cfg.mixed_weight)}

    def loss_of_model(net, batch):
        es, ep = net(batch["s"], batch["p"])
        if mining == "modality_aware":
            loss = modality_aware_triplet_loss(es, batch["ls"], ep, batch["lp"], margin=margin, **weights)
        else:
            loss = triplet_margin_loss(jnp.concatenate([es, ep]), jnp.concatenate([batch["ls"], batch["lp"]]),
                                       margin=margin, mining="batch_hard", reduction="mean")
        return loss, {}

    params, history = _train(graphdef, params, _optimizer(o), loss_of_model, batches)
    net = nnx.merge(graphdef, params)
    q = jax.jit(net.embed_sketch)(data["sketch_test"])
    g = jax.jit(net.embed_photo)(data["photo_test"])
    lq, lg = data["sketch_test_labels"], data["photo_test_labels"]
    ranking, _ = knn(q, g, k=len(lg))  # the whole gallery ranked: R@K, MAP@R and mAP@all
    out = retrieval_metrics(ranking, lq, lg, ks=(1, 5, 10), ndcg_ks=())
    out = {name: out[name] for name in ("recall@1", "recall@5", "recall@10", "map_at_r")}
    out["map_at_all"] = map_at_all(ranking, lq, lg)
    tail = max(steps // 10, 1)
    out["final_loss"] = float(np.mean(history["loss"][-tail:]))
    return out


# ----------------------------------------------------------------------------- entry point
def run(config, workdir: str | os.PathLike | None = None) -> dict[str, float]:
    """Generate the task's data from ``config.seed``, train, evaluate; see the module docstring.

    ``workdir`` (optional): receives ``config.json`` and ``final.json`` (the returned metrics).
    """
    t0 = time.perf_counter()
    task = _choice(config.task, name="config.task", choices=TASKS)
    if isinstance(config.seed, bool) or not isinstance(config.seed, (int, np.integer)) or config.seed < 0:
        raise ValueError(f"config.seed must be an int >= 0, got {config.seed!r}")
    out = _run_multilabel(config) if task == "multilabel" else _run_cross_modal(config)
    out["train_seconds"] = time.perf_counter() - t0
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        if hasattr(config, "to_json"):
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=1))
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv=None) -> dict[str, float]:
    """``python -m experiments.synthetic --config synthetic_multilabel --set loss.label_mode=first``:
    the `dmljax.train.cli` flags (``--config`` a synthetic config of `dmljax.configs`, ``--set``,
    ``--workdir``); prints and returns the metrics."""
    from dmljax.train.cli import build_parser, parse_config
    args = build_parser(description="Synthetic multi-label / cross-modal retrieval tasks.",
                        default_config="synthetic_multilabel").parse_args(argv)
    config = parse_config(args)
    out = run(config, args.workdir or config.workdir)
    for key_, value in out.items():
        print(f"{key_:<28} {value:.4f}")
    return out


if __name__ == "__main__":
    main()
