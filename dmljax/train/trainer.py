"""`train_and_evaluate(config, workdir)`: one training run from a config, as a library call.

Data source (`dmljax.data.sources.load_data_source`) -> sampler, model, objective, optimizer
(`dmljax.train.builders`) -> `dmljax.train.loop.fit` with evaluations every
``train.eval_every`` steps and checkpoints -> the final evaluation (`dmljax.train.evaluation`).

Writes ``<workdir>/metrics.jsonl`` (one JSON record per logged step / evaluation),
``<workdir>/metrics.csv`` (train scalars), ``<workdir>/final.json`` (the final table),
``<workdir>/config.json`` and ``<workdir>/run_info.json`` (class / item counts, read when the run
is used as a teacher), TensorBoard events when tensorboardX is installed, and orbax checkpoints
under ``<workdir>/checkpoints/{latest,best}`` (without ``resume`` an existing checkpoint
directory is replaced).

Several processes (``jax.distributed`` initialised first, `dmljax.train.distributed`): the step
is data-parallel over ``jax.devices()`` of all processes, each process loads and augments only
its rows of the global batch, embeds only its share of the test set (the embeddings are
all-gathered, so every process computes the same metrics), only process 0 prints and writes the
logs / ``final.json`` / ``run_info.json`` / ``config.json``, and every process takes part in the
orbax checkpoints (the state is saved as replicated global ``jax.Array`` objects; a checkpoint of any
process count resumes with any other).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time

import jax
import numpy as np

from dmljax.data.sources import add_label_noise, load_data_source
from dmljax.train import distributed
from dmljax.train.averaging import WeightAverage
from dmljax.train.builders import (build_lifted_sampler, build_sampler, build_step_fn, build_train_state,
                                   embed_chunk_options, load_teacher, matryoshka_dims)
from dmljax.train.checkpoint import Checkpointer
from dmljax.train.evaluation import (clustering, evaluate, format_results, make_embed_fn, make_eval_state_fn,
                                     prefix_metrics, rerank_metrics)
from dmljax.train.loop import KMeansReclustering, fit
from dmljax.train.metrics_log import LossWeightLog, MetricsLog
from dmljax.train.step import data_mesh, embed

__all__ = ["train_and_evaluate"]


def _print(*args):
    if distributed.is_writer():
        print(*args, flush=True)


def _check_multiprocess(config, sampler) -> None:
    """Launch errors of a multi-process run that the config decides (before any compilation)."""
    distributed.process_batch_share(sampler.batch_size)
    if config.sampler.name == "lifted_hard_negative":
        raise ValueError("sampler.name='lifted_hard_negative' runs in one process only (its pool is "
                         "re-embedded on the host); use m_per_class or hierarchical with several processes")
    if config.method.name == "divide_conquer":
        raise ValueError("method.name='divide_conquer' runs in one process only (k-means re-clustering "
                         "of the training set on the host)")


def _on_local_copy(for_eval):
    """``for_eval`` applied to this process's copy of a replicated state (the last result kept,
    like ``make_eval_state_fn`` keeps its own)."""
    last = [None, None]

    def local_for_eval(state):
        if state is not last[0]:
            last[:] = [state, for_eval(distributed.local_copy(state))]
        return last[1]

    return local_for_eval


def train_and_evaluate(config, workdir: str, *, resume: bool = False) -> dict[str, float]:
    """Train the model of ``config`` and evaluate it on the unseen classes; returns the final metrics.

    Args:
      config: a config of `dmljax.configs` (every key of `dmljax.configs.base`).
      workdir: output directory (module docstring).
      resume: continue from the latest checkpoint under ``workdir`` (same config); the batches,
        augmentations and keys are those an uninterrupted run would see.

    Returns:
      dict[str, float]: the final evaluation (`dmljax.train.evaluation.evaluate`), ensemble loss
      weights, re-ranking metrics, ``total_seconds`` and ``train_seconds``.
    """
    t_start = time.perf_counter()
    source = load_data_source(config)
    images, num_classes = source.train_images, source.num_classes
    clean_labels = np.asarray(source.train_labels, np.int32)
    labels = add_label_noise(config, clean_labels, num_classes)
    noise_fraction = float(np.mean(labels != clean_labels)) if len(labels) else 0.0
    if noise_fraction:
        _print(f"label noise: {noise_fraction:.1%} of the training labels corrupted ({config.data.label_noise_kind})")
    t_data = time.perf_counter() - t_start
    _print(f"data: {len(images)} train images / {num_classes} classes, {len(source.labels)} test images "
           f"/ {source.eval_set.num_classes} classes ({t_data:.1f} s)")

    key = jax.random.key(config.seed)
    _, k_train = jax.random.split(key)
    o = config.optim
    sampler = build_sampler(config, labels, class_super_labels=source.class_super_labels)
    teacher = None
    if config.distill.teacher:
        teacher, teacher_step = load_teacher(config.distill.teacher, num_classes=num_classes, num_train=len(labels))
        _print(f"teacher: {config.distill.teacher} (step {teacher_step}), distill.weight {config.distill.weight}")
    multiprocess = distributed.is_multiprocess()
    if multiprocess:
        _check_multiprocess(config, sampler)
    state, objective = build_train_state(config, num_classes=num_classes, num_train=len(labels),
                                         steps_per_epoch=sampler.steps_per_epoch, teacher=teacher)
    # the mesh spans the devices of every process (one process: its local devices)
    mesh = data_mesh() if config.train.data_parallel or multiprocess else None
    if multiprocess:
        state = distributed.replicate(state, mesh)
    step_fn = build_step_fn(config, state, mesh=mesh)
    chunking = embed_chunk_options(config, num_devices=mesh.size if mesh is not None else 1)
    if chunking is not None:
        _print(f"gradient caching: chunks of {chunking['chunk_size']} items per device "
               f"({chunking['num_chunks']} per step)")
    prefix_dims = matryoshka_dims(config)
    weight_average = WeightAverage(float(config.train.ema_decay)) if config.train.ema_decay > 0 else None
    if weight_average is not None:
        step_fn = weight_average.wrap(step_fn)
    for_eval = make_eval_state_fn(config, images, key=jax.random.fold_in(key, 0xB4),
                                  average=weight_average.averaged if weight_average is not None else None)
    if multiprocess:
        for_eval = _on_local_copy(for_eval)
    # several processes: each embeds its share of the images, all get every embedding
    embed_fn = distributed.sharded_embed_fn(make_embed_fn(config))
    final_embed_fn = distributed.sharded_embed_fn(make_embed_fn(config, final=True))
    eval_batch = int(config.eval.batch_size)
    last_eval: dict = {}
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    writer = distributed.is_writer()
    if writer and not resume and os.path.isdir(checkpoint_dir):
        # a fresh run must not mix its checkpoints with (or skip saving over) an older run's
        shutil.rmtree(checkpoint_dir)
    distributed.barrier("dmljax_checkpoint_dir")
    checkpointer = Checkpointer(checkpoint_dir, save_every=config.train.checkpoint_every, best_metric="recall@1")
    log = MetricsLog(workdir, resume) if writer else None
    if writer:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=1))
        with open(os.path.join(workdir, "run_info.json"), "w") as f:
            json.dump({"num_classes": int(num_classes), "num_train": int(len(labels)),
                       "method": objective.method, "loss": objective.spec.name,
                       "label_noise_fraction": noise_fraction,
                       "embed_chunk_size": None if chunking is None else chunking["chunk_size"],
                       "embed_chunks_per_step": None if chunking is None else chunking["num_chunks"],
                       "matryoshka_dims": None if prefix_dims is None else list(prefix_dims)}, f, indent=1)

    hooks, before = {}, []
    lifted = build_lifted_sampler(
        config, sampler, images, labels, key=key, embed_fn=lambda s, x: embed(s, x, batch_size=512),
        log=lambda step, size: _print(f"[step {step}] lifted hard-negative pool: {size} items re-embedded"))
    if lifted is not None:
        sampler = lifted
        before.append(lifted.before_step)
    if objective.method == "divide_conquer":
        recluster = KMeansReclustering(
            images, num_clusters=objective.num_learners, every=objective.recluster_every,
            key=jax.random.fold_in(key, 0xC1), embed_fn=lambda s, x: embed(s, x, batch_size=512),
            log=lambda step, sizes: _print(f"[step {step}] k-means re-clustering: cluster sizes {sizes.tolist()}"))
        before.append(recluster.before_step)
        hooks["batch_extras"] = recluster.batch_extras
    if before:
        hooks["before_step"] = functools.reduce(lambda f, g: (lambda st: g(f(st))), before)
    callbacks = [LossWeightLog(objective)] if objective.spec.name == "ensemble" else []
    callbacks += [log] if log is not None else []

    def eval_fn(s):
        fn = final_embed_fn if int(s.step) >= o.num_steps else embed_fn
        return evaluate(for_eval(s), source, batch_size=eval_batch, embed_fn=fn, keep=last_eval)

    state, _ = fit(state, images=images, labels=labels, sampler=sampler, num_steps=o.num_steps, key=k_train,
                   step_fn=step_fn, checkpointer=checkpointer, resume=resume, eval_every=config.train.eval_every,
                   eval_fn=eval_fn, callbacks=callbacks, progress=config.train.progress and writer,
                   log_every=config.train.log_every, mesh=mesh, **hooks)
    t_train = time.perf_counter() - t_start
    if last_eval.get("step") == int(state.step):  # fit() evaluated the last step already
        final = dict(last_eval["metrics"])
        if config.train.final_nmi:
            final.update(clustering(last_eval["embeddings"], source.labels.astype(np.int32)))
    else:
        final = evaluate(for_eval(state), source, with_nmi=config.train.final_nmi, batch_size=eval_batch,
                         embed_fn=final_embed_fn, keep=last_eval)
    if prefix_dims is not None:  # Matryoshka: the metrics of every prefix of the final embeddings
        final.update(prefix_metrics(source, last_eval["embeddings"], last_eval.get("gallery_embeddings"),
                                    dims=prefix_dims))
    final.update(objective.loss_weights(state))
    final.update(rerank_metrics(config, for_eval(state), train_images=images, train_labels=labels,
                                test_embeddings=last_eval["embeddings"], test_labels=source.labels,
                                embed_fn=final_embed_fn))
    if weight_average is not None:
        # the averaged weights evaluated above, for later analysis (the run's checkpoints hold
        # the raw weights that resume needs)
        averaged = Checkpointer(os.path.join(checkpoint_dir, "averaged"), best_metric=None)
        averaged.save(distributed.replicate(for_eval(state), mesh) if multiprocess else for_eval(state))
        averaged.close()
    checkpointer.close()
    final["total_seconds"] = time.perf_counter() - t_start
    final["train_seconds"] = t_train
    if writer:
        log(state, {"step": int(state.step), **{f"eval/final_{k}": v for k, v in final.items()}})
        log.close()
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump(final, f, indent=1)
    if source.one_shot_runs is None:
        _print(f"\n{source.describe()}")
    else:
        _print(f"\nOmniglot {config.data.test_split}: {source.eval_set.num_classes} unseen classes, "
               f"{len(source.labels)} queries (each vs all others); one-shot: 20 official 20-way runs")
    _print(format_results(final))
    _print(f"wall time: {final['total_seconds']:.0f} s (data {t_data:.0f} s)")
    return final
